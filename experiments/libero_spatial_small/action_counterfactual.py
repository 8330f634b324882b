"""Does the world model follow the action where the episode's outcome is decided? A counterfactual check.

For each failed episode of a recorded dataset (no frame flagged a success; e.g. `collect --mistake-kinds hover`, the
hand holding the bowl over the plate to the end), the world model predicts the episode's last chunk from the 4
recorded frames before it three times:

- `recorded`: the recorded actions (hold still, gripper closed), noise seed s;
- `rise_open`: the same chunk with the gripper opened and the hand rising at full speed (z = +1, about 10 cm over the
  8 steps in the simulator), the same noise seed s: only the actions differ;
- `reseeded`: the recorded actions with another noise seed: the sampling's own spread.

It prints and writes, per episode and on average: the mean absolute pixel difference (0-255) between `recorded` and
`rise_open` (the action's effect) and between `recorded` and `reseeded` (the noise floor), the PSNR of `recorded`
against the recorded frames, and the classifier's largest success probability over each version's frames. A world
model that follows the action draws a clearly different chunk for `rise_open` than for `recorded` (effect well above
the noise floor); one that does not draws the same.

python experiments/libero_spatial_small/action_counterfactual.py --world-model embedded:libero_spatial_small \
    --dataset s64h/dataset --out counterfactual.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from opensora_gym.audit import psnr
from opensora_gym.checkpoint import resolve_checkpoint
from opensora_gym.data import TrajectoryDataset, load_trajectory
from opensora_gym.spaces import ACTION_CHUNK
from opensora_gym.world_model import WorldModel, frames_from_uint8

# Controller convention of the recorded actions: z is the third number, the gripper the last (-1 = open).
RISE_OPEN = {2: 1.0, 6: -1.0}


def _predict(
    world_model: WorldModel, latents: torch.Tensor, actions: np.ndarray, seed: int
) -> tuple[np.ndarray, float]:
    """The predicted chunk [8, S, S, 3] uint8 for `actions` [8, 7] from `latents` [1, C, 4, h, w], and the
    classifier's largest success probability over its frames."""
    generator = torch.Generator().manual_seed(seed)
    chunk = world_model.predict_chunk(latents, torch.from_numpy(actions)[None].float(), generator=generator)
    return chunk.frames[0].cpu().numpy(), float(chunk.success_prob.max())


@torch.no_grad()
def counterfactuals(world_model: WorldModel, dataset: TrajectoryDataset, episodes: int) -> list[dict[str, float]]:
    """One row of measures per failed episode (up to `episodes` of them), in dataset order."""
    size, context = world_model.image_size, world_model.condition_frames
    rows = []
    for index, path in enumerate(dataset.paths):
        if len(rows) == episodes:
            break
        if any(frame["success"] for frame in load_trajectory(path)):
            continue
        recorded = dataset.episode(index)
        end = len(recorded.images)
        first = end - ACTION_CHUNK
        condition = frames_from_uint8(torch.from_numpy(recorded.images[first - context : first]), size)
        latents = world_model.vae.encode(
            rearrange(condition, "t c h w -> 1 c t h w").to(world_model.device, world_model.vae.dtype),
            sample=True,
            generator=torch.Generator().manual_seed(index),
        ).float()
        actions = recorded.actions[first - 1 : end - 1].copy()  # the action that led to each predicted frame
        changed = actions.copy()
        for column, value in RISE_OPEN.items():
            changed[:, column] = value
        versions = {
            "recorded": _predict(world_model, latents, actions, seed=index),
            "rise_open": _predict(world_model, latents, changed, seed=index),
            "reseeded": _predict(world_model, latents, actions, seed=index + 100_000),
        }
        target = rearrange(
            ((frames_from_uint8(torch.from_numpy(recorded.images[first:]), size) + 1) * 127.5).round(),
            "t c h w -> t h w c",
        ).numpy()
        base = versions["recorded"][0].astype(np.float64)
        row = {
            "episode": path.name,
            "action_effect": float(np.abs(base - versions["rise_open"][0]).mean()),
            "noise_floor": float(np.abs(base - versions["reseeded"][0]).mean()),
            "psnr_recorded_db": float(psnr(target, versions["recorded"][0]).mean()),
        }
        row.update({f"success_prob_{name}": prob for name, (_, prob) in versions.items()})
        rows.append(row)
        print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-model", required=True, help="world-model folder (or embedded:<name>)")
    parser.add_argument("--dataset", required=True, type=Path, help="recorded episodes (traj*.npy)")
    parser.add_argument("--episodes", type=int, default=20, help="failed episodes checked")
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    args = parser.parse_args()
    world_model = WorldModel.from_pretrained(
        resolve_checkpoint(args.world_model, "spatial"), device="cpu", dtype=torch.float32, image_size=64
    )
    rows = counterfactuals(world_model, TrajectoryDataset(args.dataset), args.episodes)
    if not rows:
        raise SystemExit(f"no failed episode in {args.dataset}: the check needs episodes without a success flag")
    mean = {key: float(np.mean([row[key] for row in rows])) for key in rows[0] if key != "episode"}
    print("mean over", len(rows), "episodes:", ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    args.out.write_text(json.dumps({"world_model": args.world_model, "mean": mean, "episodes": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
