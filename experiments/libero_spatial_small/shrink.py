"""Merges recorded dataset folders into one at a smaller image side, for training and for the GPU transfer.

python experiments/libero_spatial_small/shrink.py --size 64 --out data/spatial64 data/expert_a data/expert_b

Episodes are renumbered in the order given (``traj{n:06d}`` keeps the rest of each name); every per-frame key is
kept, the image is resized with the policy's antialiased bilinear rule (``--first-frames``: only each episode's first
frame, the start frames of a world model's ``dataset/``; ``--last N``: only its last N frames, all that an env with
``start_frame="end-K"`` reads when N >= K + 4). ``dataset_statistics.json`` is recomputed from all actions (dimensions
the data never varies get [-1, 1]).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from opensora_gym.data import ActionStatistics, TrajectoryDataset, load_trajectory, save_trajectory
from trainers.behavior_cloning import resize_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="collect output folders (with dataset/) or dataset folders")
    parser.add_argument("--out", required=True, help="output folder: dataset/ and dataset_statistics.json")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument(
        "--first-frames", action="store_true", help="keep each episode's first frame only (a world model's dataset/)"
    )
    parser.add_argument("--last", type=int, help="keep each episode's last N frames only (starts at end-K, K <= N - 4)")
    args = parser.parse_args()
    if args.first_frames and args.last is not None:
        parser.error("--first-frames and --last both choose the frames: give one")
    if args.last is not None and args.last < 1:
        parser.error(f"--last must be a positive number of frames, got {args.last}")
    out = Path(args.out) / "dataset"
    out.mkdir(parents=True, exist_ok=False)
    actions, count = [], 0
    for folder in map(Path, args.folders):
        folder = folder / "dataset" if (folder / "dataset").is_dir() else folder
        for path in TrajectoryDataset(folder).paths:
            frames = load_trajectory(path)
            frames = frames[:1] if args.first_frames else frames[-args.last :] if args.last else frames
            images = resize_images(np.stack([frame["image"] for frame in frames]), args.size).numpy()
            for frame, image in zip(frames, images, strict=True):
                frame["image"] = image
            actions.append(np.stack([frame["delta_action"] for frame in frames]))
            suffix = path.stem.split("_", 1)[1] if "_" in path.stem else ""
            save_trajectory(out / f"traj{count:06d}_{suffix}.npy", frames)
            count += 1
    ActionStatistics.from_actions(np.concatenate(actions), flat_range=(-1.0, 1.0)).to_json(out.parent)
    print(f"{count} episodes, {sum(len(a) for a in actions)} frames -> {out}")


if __name__ == "__main__":
    main()
