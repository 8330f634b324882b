"""Does the world model know which recorded states lead to success? Imagined success per start against the outcome
of the recorded rollout that the start was taken from.

`imagine.py` runs a policy from every start of a world model's dataset (`--draws` times each, draw after draw over the
files in order). When those starts lie inside recorded rollouts (the env's `start_frame`, e.g. `end-48`), each has a
recorded outcome: whether the simulator flagged success anywhere in its file. This prints (and with --out writes) the
mean imagined success over the starts from recorded successes and from recorded failures, and the AUROC of the
per-start imagined rate as a predictor of the recorded outcome, with its 95% interval.

python experiments/libero_spatial_small/imagined_vs_recorded.py imagined_base.npz WM/dataset --out ends.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from imagined_vs_real import report  # the script's folder

from opensora_gym.data import TrajectoryDataset
from opensora_gym.reliability import auroc, auroc_interval


def compare(success: np.ndarray, recorded: np.ndarray) -> dict:
    """The summary for imagined outcomes `success` [draws * S] (draw-major, as `imagine.py` runs them) and the
    recorded outcomes [S] of the S starts."""
    if len(success) % len(recorded):
        raise ValueError(f"expected a whole number of draws of the {len(recorded)} starts, got {len(success)} episodes")
    rates = success.reshape(-1, len(recorded)).mean(axis=0)  # [S]
    summary = {
        "starts": len(recorded),
        "draws": len(success) // len(recorded),
        "recorded_success": float(recorded.mean()),
        "imagined_success": float(rates.mean()),
        "imagined_on_recorded_successes": float(rates[recorded].mean()) if recorded.any() else None,
        "imagined_on_recorded_failures": float(rates[~recorded].mean()) if not recorded.all() else None,
    }
    if 0 < recorded.sum() < len(recorded):
        area = auroc(rates, recorded)
        summary["auroc"] = area
        summary["auroc_95"] = list(auroc_interval(area, int(recorded.sum()), int((~recorded).sum())))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("imagined", type=Path, help="imagine.py's npz")
    parser.add_argument("dataset", type=Path, help="the dataset/ folder the world model started from")
    parser.add_argument("--out", type=Path, help="the JSON to write")
    args = parser.parse_args()
    dataset = TrajectoryDataset(args.dataset)
    recorded = []
    for index in range(len(dataset)):
        flags = dataset.episode(index).success
        if flags is None:
            raise SystemExit(f"{dataset.paths[index].name} records no success flag: expected recorded rollouts")
        recorded.append(bool(flags.any()))
    try:
        summary = compare(np.load(args.imagined)["success"].astype(bool), np.array(recorded))
    except ValueError as error:
        raise SystemExit(f"{args.imagined}: {error}") from None
    report(summary, args.out)


if __name__ == "__main__":
    main()
