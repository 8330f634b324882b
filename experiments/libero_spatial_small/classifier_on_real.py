"""Would a success classifier end real episodes as the world-model env ends imagined ones? Scored on real frames.

python experiments/libero_spatial_small/classifier_on_real.py --classifiers rm0.pth rmc/resnet_rm.pth \
    --dataset ends/dataset --skip 4 --held-out rmc/reward_report.json --out classifier_on_real.json

For every episode of the recorded dataset folders (frames of the simulator with LIBERO's per-frame success flags),
each classifier scores the frames after the first `--skip` + 1 (the condition frames and the start of an episode
started at a recorded frame) and calls the episode a success when one frame reaches `--threshold` (the env's rule
with `success_from=probability`). Against the simulator's outcome (a flagged frame among the same frames) this gives
each classifier's episode-level false-success rate (its successes among the real failures) and missed-success rate,
with 95% Wilson intervals. `--held-out` keeps only the episodes that a `train-reward-model` report held out (names as
in its dataset; a name found in none of the folders is an error).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from opensora_gym.audit import success_agreement
from opensora_gym.data import TrajectoryDataset
from opensora_gym.models.reward import ResNetRewardModel


def episode_verdicts(classifier: ResNetRewardModel, images: np.ndarray, threshold: float) -> bool:
    """Whether some frame of ``images`` [T, H, W, 3] uint8 reaches ``threshold`` (frames scaled to [-1, 1])."""
    frames = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return bool(classifier(frames).max() >= threshold)


def describe(rate: dict | None) -> str:
    """``count/of (rate, interval)``, or ``none`` where nothing was counted."""
    if rate is None:
        return "none"
    return f"{rate['count']}/{rate['of']} ({rate['rate']:.3f}, 95% {rate['ci_low']:.3f}-{rate['ci_high']:.3f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classifiers", nargs="+", required=True, help="resnet_rm.pth files")
    parser.add_argument("--dataset", nargs="+", required=True, help="recorded dataset folders (traj*.npy)")
    parser.add_argument("--skip", type=int, default=0, help="frames before the scored ones, after the first")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--held-out", help="a train-reward-model reward_report.json: score its held-out episodes only")
    parser.add_argument("--out", required=True, help="the JSON to write")
    args = parser.parse_args(argv)
    datasets = [TrajectoryDataset(folder) for folder in args.dataset]
    episodes = {path.name: (dataset, index) for dataset in datasets for index, path in enumerate(dataset.paths)}
    names = list(episodes)
    if len(names) < sum(len(dataset) for dataset in datasets):
        raise SystemExit("the dataset folders share episode file names: give folders whose names differ")
    if args.held_out:
        names = [row["episode"] for row in json.loads(Path(args.held_out).read_text())["episodes"]]
        missing = [name for name in names if name not in episodes]
        if missing:
            raise SystemExit(f"held-out episodes not found in the dataset folders: {missing[:5]} ({len(missing)})")
    classifiers = {name: ResNetRewardModel.from_pretrained(name).eval() for name in args.classifiers}
    real, verdicts = [], {name: [] for name in classifiers}
    for name in names:
        dataset, index = episodes[name]
        episode = dataset.episode(index)
        images, flags = episode.images[args.skip + 1 :], episode.success[args.skip + 1 :]
        real.append(bool(flags.any()))
        for name, classifier in classifiers.items():
            verdicts[name].append(episode_verdicts(classifier, images, args.threshold))
    report = {
        "episodes": len(names),
        "real_successes": int(sum(real)),
        "skip": args.skip,
        "threshold": args.threshold,
        "held_out": args.held_out is not None,
        "classifiers": {
            Path(name).parent.name + "/" + Path(name).name: success_agreement(verdict, real).to_dict()
            for name, verdict in verdicts.items()
        },
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, agreement in report["classifiers"].items():
        print(
            f"{name}: {describe(agreement['false_success_rate'])} false successes among the real failures, "
            f"{describe(agreement['missed_success_rate'])} missed among the real successes"
        )


if __name__ == "__main__":
    main()
