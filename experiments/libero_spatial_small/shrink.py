"""Merges recorded dataset folders into one at a smaller image side, for training and for the GPU transfer.

python experiments/libero_spatial_small/shrink.py --size 64 --out data/spatial64 data/expert_a data/expert_b

Episodes are renumbered in the order given (``traj{n:06d}`` keeps the rest of each name); every per-frame key is
kept, the image is resized with the policy's antialiased bilinear rule (``--first-frames``: only each episode's first
frame, the start frames of a world model's ``dataset/``; ``--last N``: only its last N frames, all that an env with
``start_frame="end-K"`` reads when N >= K + 4; ``--windows K``: K frames of each episode drawn uniformly without
replacement (``--seed``), each written as its own episode of that frame and the ``--context`` - 1 recorded frames
before it (fewer at the start), named ``..._frameF``: an env with ``start_frame="end-0"`` starts from them as one
with ``start_frame="random"`` starts from the whole episodes, from a fixed sample of the starts it would draw;
``--until-success`` first cuts each episode after its first success frame, episodes without one staying whole: with
``--last N``, ``start_frame="random"`` then draws its starts among the N frames up to a recorded success, or the last N
of a failure, where a policy's sampled episodes can end either way).
``dataset_statistics.json`` is recomputed from all actions kept (dimensions the data never varies get [-1, 1]).
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
    parser.add_argument("--windows", type=int, help="write K start windows of each episode (starts at end-0)")
    parser.add_argument(
        "--until-success", action="store_true", help="first cut each episode after its first success frame, if any"
    )
    parser.add_argument("--context", type=int, default=4, help="frames of a window: the start frame and those before")
    parser.add_argument("--seed", type=int, default=0, help="the draw of the windows' frames")
    args = parser.parse_args()
    if sum([args.first_frames, args.last is not None, args.windows is not None]) > 1:
        parser.error("--first-frames, --last and --windows each choose the frames: give one")
    for name in ("last", "windows", "context"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive number, got {getattr(args, name)}")
    generator = np.random.default_rng(args.seed)
    out = Path(args.out) / "dataset"
    if out.exists():
        raise SystemExit(f"{out} exists: give a new --out folder")
    episodes = []  # (name, frames): all read and checked before anything is written
    for folder in map(Path, args.folders):
        folder = folder / "dataset" if (folder / "dataset").is_dir() else folder
        for path in TrajectoryDataset(folder).paths:
            frames = load_trajectory(path)
            if args.until_success:
                flags = [bool(frame.get("success", False)) for frame in frames]
                frames = frames[: flags.index(True) + 1] if any(flags) else frames
            suffix = path.stem.split("_", 1)[1] if "_" in path.stem else ""
            if args.windows is not None:
                if args.windows > len(frames):
                    raise SystemExit(f"--windows {args.windows} needs as many frames, {path} has {len(frames)}")
                picked = np.sort(generator.choice(len(frames), args.windows, replace=False))
                pieces = [(frames[max(f - args.context + 1, 0) : f + 1], f"_frame{f:04d}") for f in picked]
            else:
                pieces = [(frames[:1] if args.first_frames else frames[-args.last :] if args.last else frames, "")]
            for piece, tag in pieces:
                images = resize_images(np.stack([frame["image"] for frame in piece]), args.size).numpy()
                piece = [{**frame, "image": image} for frame, image in zip(piece, images, strict=True)]
                episodes.append((f"traj{len(episodes):06d}_{suffix}{tag}.npy", piece))
    out.mkdir(parents=True)
    for name, frames in episodes:
        save_trajectory(out / name, frames)
    actions = [np.stack([frame["delta_action"] for frame in frames]) for _, frames in episodes]
    ActionStatistics.from_actions(np.concatenate(actions), flat_range=(-1.0, 1.0)).to_json(out.parent)
    print(f"{len(episodes)} episodes, {sum(len(a) for a in actions)} frames -> {out}")


if __name__ == "__main__":
    main()
