"""Does the world model read the outcome of the actions, or only remember which starts succeed? (run 16)

A world model fine-tuned on a policy's recorded rollouts can score new rollouts of the same starts well by
remembering each start's outcome in its data. GRPO compares rollouts of one start with each other, so only the
part of the score that follows the actions helps it. This script takes `imagined_frames.py score`'s JSON of held-out
rollouts (new samples of the policy from the training starts, imagined with `write --from-start`) and the recorded
training rollouts, and reports:

- `auroc_world_model`: the held-out imagined score (peak success probability) against the real outcome;
- `auroc_training_outcome`: the share of the start's training rollouts that succeed as the score, the memory
  baseline;
- `auroc_where_outcomes_differ`: the imagined score over the held-out rollouts whose outcome differs from that of
  every training rollout of their start, where memory is always wrong (0.5: the actions are not read; 1: they are);
- the imagined score's AUROC within the starts whose training rollouts all succeeded, all failed, and both;
- beside each AUROC its 95% interval (Hanley and McNeil's standard error, `<name>_interval_95`).

python experiments/libero_spatial_small/start_or_action.py --score wmp_rmp_on_policy_cycle2.json \
    --heldout h64/dataset --train s64/dataset --out start_or_action.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from branch_discrimination import _NAME  # the script's folder
from imagined_vs_real import report

from opensora_gym.data import TrajectoryDataset
from opensora_gym.reliability import auroc, auroc_interval


def outcomes_by_number(folder: Path) -> dict[int, tuple[tuple[int, int], bool]]:
    """Episode number -> ((task, trial), whether the simulator flags a success) of a recorded dataset folder."""
    dataset, found = TrajectoryDataset(folder), {}
    for index, path in enumerate(dataset.paths):
        match = _NAME.search(path.name)
        if match is None:
            raise ValueError(f"expected episodes named traj<n>_task<T>_trial<R>.npy, got {path.name}")
        flags = dataset.episode(index).success
        found[int(match[1])] = ((int(match[2]), int(match[3])), bool(flags is not None and flags.any()))
    return found


def _with_intervals(measures: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Each named AUROC and, beside it, its 95% interval (`<name>_interval_95`); both None where a class is missing."""
    summary = {}
    for name, (scores, labels) in measures.items():
        positives, negatives = int(labels.sum()), int((~labels).sum())
        both = positives > 0 and negatives > 0
        summary[name] = auroc(scores, labels) if both else None
        summary[f"{name}_interval_95"] = auroc_interval(summary[name], positives, negatives) if both else None
    return summary


def compare(rows: list[dict], heldout: dict, train: dict) -> dict:
    """The summary for the score rows (`episode`, `real`, and `peak_probability` or `end_probability`) of held-out
    episodes."""
    train_outcome: dict[tuple[int, int], list[bool]] = {}
    for start, success in train.values():
        train_outcome.setdefault(start, []).append(success)
    scores, real, memory = [], [], []
    for row in rows:
        start, success = heldout[int(row["episode"])]
        if success != row["real"]:
            said = row["real"]
            raise ValueError(f"held-out episode {row['episode']}: the score says real={said}, its recording {success}")
        if start not in train_outcome:
            raise ValueError(f"held-out start (task, trial) {start} has no training rollout")
        scores.append(row["peak_probability"] if "peak_probability" in row else row["end_probability"])
        real.append(success)
        memory.append(float(np.mean(train_outcome[start])))
    scores, real, memory = np.array(scores), np.array(real), np.array(memory)
    differ = ((memory == 1) & ~real) | ((memory == 0) & real)
    mixed = (memory > 0) & (memory < 1)
    measures = {
        "auroc_world_model": (scores, real),
        "auroc_training_outcome": (memory, real),
        "auroc_where_outcomes_differ": (scores[differ], real[differ]),
        "auroc_within_training_successes": (scores[memory == 1], real[memory == 1]),
        "auroc_within_training_failures": (scores[memory == 0], real[memory == 0]),
        "auroc_within_mixed_starts": (scores[mixed], real[mixed]),
    }
    counts = {
        "episodes": len(rows),
        "real_successes": int(real.sum()),
        "starts_where_outcomes_differ": int(differ.sum()),
    }
    return counts | _with_intervals(measures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--score", type=Path, required=True, help="imagined_frames.py score's JSON (held-out)")
    parser.add_argument("--heldout", type=Path, required=True, help="the held-out recordings that were imagined")
    parser.add_argument("--train", type=Path, required=True, help="the recordings the world model was trained on")
    parser.add_argument("--out", type=Path, help="also write the summary here as JSON")
    args = parser.parse_args()
    rows = json.loads(args.score.read_text())["episodes"]
    report(compare(rows, outcomes_by_number(args.heldout), outcomes_by_number(args.train)), args.out)


if __name__ == "__main__":
    main()
