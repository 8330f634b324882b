"""The training curves of GRPO seeds (`grpo_seeds_gpu.sh`'s result folder), as JSON, with the change of each.

python experiments/libero_spatial_small/grpo_curves.py RESULT --out grpo_curves.json [--last-step 20]

Reads each ``seedS/tensorboard`` under RESULT and writes, per seed, the scalars imagined success
(``env/success_once``), return, the actor's approximate KL, its clip fraction and its KL to the reference policy
(``train/actor/kl``), the share of groups with a signal (``rollout/groups_with_signal``), and, for PPO, the critic's
explained variance and value loss (each where logged) at every step up to ``--last-step``; prints the mean imagined
success over the first and the last 5 steps of each seed, and the mean share of groups with a signal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

KEYS = (
    "env/success_once",
    "env/return",
    "train/actor/approx_kl",
    "train/actor/clip_fraction",
    "train/actor/kl",
    "rollout/groups_with_signal",
    "train/critic/explained_variance",
    "train/critic/value_loss",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result", type=Path, help="the folder holding seedS/tensorboard")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--last-step", type=int, default=20, help="the last step to read")
    args = parser.parse_args()
    seeds = sorted(path.parent.name for path in args.result.glob("seed*/tensorboard"))
    if not seeds:
        raise SystemExit(f"expected seedS/tensorboard folders under {args.result}, found none")
    curves = {}
    for seed in seeds:
        events = EventAccumulator(str(args.result / seed / "tensorboard"))
        events.Reload()
        tags = events.Tags()["scalars"]
        curves[seed] = {
            key: [[e.step, round(e.value, 5)] for e in events.Scalars(key) if e.step <= args.last_step]
            for key in KEYS
            if key in tags
        }
        success = [value for _, value in curves[seed].get("env/success_once", [])]
        if len(success) >= 5:
            first, last = sum(success[:5]) / 5, sum(success[-5:]) / 5
            print(f"{seed}: imagined success {first:.3f} (first 5 steps) -> {last:.3f} (last 5 of {len(success)})")
        signal = [value for _, value in curves[seed].get("rollout/groups_with_signal", [])]
        if signal:
            print(f"{seed}: groups with a signal {sum(signal) / len(signal):.3f} (mean of {len(signal)} steps)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(curves) + "\n")


if __name__ == "__main__":
    main()
