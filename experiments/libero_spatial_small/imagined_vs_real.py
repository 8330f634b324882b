"""Does the world model know which starts a policy solves? Its imagined success per start against the real outcome.

Reads `imagine.py`'s rollouts of a policy (an .npz with `task`, `trial`, `success` per episode, several draws per
start) and `opensora-gym eval`'s results of the same policy in the simulator (`eval_results.json`, one greedy episode
per start), and prints (and with --out writes) the imagined success rate of each start averaged over the starts that
really succeed and over those that really fail, and the AUROC of the per-start imagined rate as a predictor of the
real outcome (0.5: the imagination ranks the starts no better than a coin, 1: perfectly).

python experiments/libero_spatial_small/imagined_vs_real.py imagined_base.npz real_bc_6000_steps_float16.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from opensora_gym.reliability import auroc


def compare(imagined: dict[str, np.ndarray], outcomes: list[dict]) -> dict:
    """The summary for imagined episodes (`task`, `trial`, `success` arrays) and the real eval's `outcomes`.

    Raises:
        ValueError: a real start has no imagined episode (the two were run on different starts).
    """
    real = {(o["episode"]["task_id"], o["episode"]["trial_id"]): bool(o["success"]) for o in outcomes}
    starts = sorted(real)
    rates, draws = [], []
    for task, trial in starts:
        mine = (imagined["task"] == task) & (imagined["trial"] == trial)
        if not mine.any():
            raise ValueError(f"the real start (task {task}, trial {trial}) has no imagined episode")
        rates.append(float(imagined["success"][mine].mean()))
        draws.append(int(mine.sum()))
    rates, labels = np.array(rates), np.array([real[s] for s in starts])
    both = 0 < labels.sum() < len(labels)
    return {
        "starts": len(starts),
        "imagined_draws_per_start": [min(draws), max(draws)],
        "real_success_rate": float(labels.mean()),
        "imagined_success_rate": float(rates.mean()),
        "imagined_rate_on_real_successes": float(rates[labels].mean()) if labels.any() else None,
        "imagined_rate_on_real_failures": float(rates[~labels].mean()) if not labels.all() else None,
        "auroc": auroc(rates, labels) if both else None,
    }


def report(summary: dict, out: Path | None) -> None:
    """Prints `summary` as JSON and, with `out`, writes it there too."""
    text = json.dumps(summary, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("imagined", type=Path, help="imagine.py's .npz")
    parser.add_argument("real", type=Path, help="opensora-gym eval's eval_results.json of the same policy")
    parser.add_argument("--out", type=Path, help="also write the summary here as JSON")
    args = parser.parse_args()
    with np.load(args.imagined) as data:
        imagined = {key: data[key] for key in ("task", "trial", "success")}
    report(compare(imagined, json.loads(args.real.read_text())["outcomes"]), args.out)


if __name__ == "__main__":
    main()
