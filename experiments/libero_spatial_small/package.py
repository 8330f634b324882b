"""Turns the trained models into the embedded world model that ships with the package.

python experiments/libero_spatial_small/package.py --models runs/spatial_small/models --dataset data/spatial64 \
    --policy runs/bc/policy --out src/opensora_gym/assets/libero_spatial_small

`--models` is the unpacked output of train_models.sh (world_model/ without dataset/ and vae/, and vae/). Weights
are stored as float16 (the loaders cast them to the env's dtype); the start frames are the first frame of every
episode (all the env reads of them), so the folder stays a few tens of MB; `--whole-episodes` ships the dataset's
episodes as they are (start windows made by `shrink.py --windows`, for an env with `start_frame="end-0"`). With
`--policy`, the behaviour-cloned policy goes to ``policy/`` (float16 too): ``embedded:libero_spatial_small/policy``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from opensora_gym.checkpoint import CheckpointLayout
from opensora_gym.data import TrajectoryDataset, load_trajectory, save_trajectory


def _halved(source: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(source)
    halved = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    for name, tensor in halved.items():
        if not torch.isfinite(tensor.float()).all():
            raise FloatingPointError(f"{source}:{name} does not fit in float16")
    return halved


def _copy_halved(source: Path, destination: Path) -> None:
    """Copies the files of `source` (not its subfolders) into `destination`, safetensors weights as float16.

    Every weight file is halved and checked before anything is written, so one that does not fit writes nothing."""
    files = [path for path in source.iterdir() if path.is_file()]
    halved = {path.name: _halved(path) for path in files if path.suffix == ".safetensors"}
    destination.mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.name in halved:
            save_file(halved[path.name], destination / path.name, metadata={"format": "pt"})
        else:
            shutil.copy2(path, destination / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", required=True, help="the unpacked models.tar.part* of train_models.sh")
    parser.add_argument("--dataset", required=True, help="the 64 px dataset folder (with dataset/)")
    parser.add_argument(
        "--whole-episodes", action="store_true", help="ship every frame of the dataset's episodes, not the first only"
    )
    parser.add_argument("--policy", help="a train-policy policy/ folder to ship in policy/")
    parser.add_argument("--out", required=True, help="the embedded world-model folder to write")
    args = parser.parse_args()
    source, out = Path(args.models) / "world_model", Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    _copy_halved(source, out)
    _copy_halved(Path(args.models) / "vae", out / "vae")
    (out / "dataset").mkdir()
    for path in TrajectoryDataset(Path(args.dataset) / "dataset").paths:
        frames = load_trajectory(path)
        save_trajectory(out / "dataset" / path.name, frames if args.whole_episodes else frames[:1])
    if args.policy:
        _copy_halved(Path(args.policy), out / "policy")
    CheckpointLayout.resolve(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
