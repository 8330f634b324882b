"""How recorded episodes ended, start by start: the success rate and how many starts end both ways.

python experiments/libero_spatial_small/recorded_outcomes.py rec/dataset --out outcomes.json

An episode is a success when the simulator flagged success on any of its frames (`collect` keeps LIBERO's per-frame
flag, also over `--post-success-steps`). Episodes are grouped by their start (task, trial, from the file name); a
start is mixed when its episodes end both ways, the starts from which a world model can learn what the actions
change. Prints and writes the counts with 95% Wilson intervals, the mean length of successes and failures, and each
start's outcomes in file order.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from from_recorded import task_and_trial

from opensora_gym.data import TrajectoryDataset
from opensora_gym.intervals import wilson_rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+", help="dataset folders of recorded episodes (traj*.npy)")
    parser.add_argument("--out", help="the JSON to write")
    args = parser.parse_args(argv)
    by_start: dict[tuple[int, int], list[bool]] = defaultdict(list)
    lengths: dict[bool, list[int]] = {True: [], False: []}
    for folder in args.datasets:
        dataset = TrajectoryDataset(folder)
        for index, path in enumerate(dataset.paths):
            episode = dataset.episode(index)
            success = episode.success is not None and bool(episode.success.any())
            by_start[task_and_trial(path)].append(success)
            lengths[success].append(len(episode.images))
    episodes = sum(len(outcomes) for outcomes in by_start.values())
    successes = sum(sum(outcomes) for outcomes in by_start.values())
    mixed = [start for start, outcomes in by_start.items() if 0 < sum(outcomes) < len(outcomes)]
    always = [start for start, outcomes in by_start.items() if all(outcomes)]
    report = {
        "datasets": [Path(folder).name for folder in args.datasets],
        "episodes": episodes,
        "success": wilson_rate(successes, episodes),
        "mean_frames": {
            "success": sum(lengths[True]) / len(lengths[True]) if lengths[True] else None,
            "failure": sum(lengths[False]) / len(lengths[False]) if lengths[False] else None,
        },
        "starts": len(by_start),
        "mixed_starts": wilson_rate(len(mixed), len(by_start)),
        "always_success_starts": len(always),
        "never_success_starts": len(by_start) - len(mixed) - len(always),
        "per_start": [
            {"task": task, "trial": trial, "outcomes": [int(value) for value in outcomes]}
            for (task, trial), outcomes in sorted(by_start.items())
        ],
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({key: value for key, value in report.items() if key != "per_start"}, indent=1))


if __name__ == "__main__":
    main()
