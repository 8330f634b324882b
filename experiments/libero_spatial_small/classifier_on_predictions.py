"""Does a success classifier see success in the frames a world model predicts? Checked on the final chunk.

For each of the first `--episodes` successful episodes of a recorded dataset (episodes of at least 30 frames whose
last frame carries the simulator's success flag), the world model predicts the episode's last 8 frames from the 4
recorded frames before them and the recorded actions; each classifier then scores three versions of those 8 frames:

- `real`: the recorded frames (at the world model's side, through the env's [-1, 1] round trip);
- `recon`: the recorded frames through the world model's VAE (encode, decode);
- `pred`: the world model's prediction.

It prints, per classifier and version, the mean success probability at each of the 8 offsets (-7 .. 0, the last
being LIBERO's first success frame) and the fraction of episodes in which some frame reaches 0.5 (the env's
success rule), and writes them as JSON.

python experiments/libero_spatial_small/classifier_on_predictions.py --world-model embedded:libero_spatial_small \
    --dataset s64/spatial64/dataset --classifiers rm_w1/resnet_rm.pth rm_w4/resnet_rm.pth --out diag.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from opensora_gym.checkpoint import resolve_checkpoint
from opensora_gym.data import TrajectoryDataset, load_trajectory
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.spaces import ACTION_CHUNK
from opensora_gym.world_model import WorldModel, frames_from_uint8

VERSIONS = ("real", "recon", "pred")


@torch.no_grad()
def score_final_chunks(
    world_model: WorldModel, classifiers: dict[str, ResNetRewardModel], dataset: TrajectoryDataset, episodes: int
) -> dict[str, dict[str, np.ndarray]]:
    """Per classifier and version, the probabilities [E, 8] of the final chunks of E successful episodes."""
    size, context = world_model.image_size, world_model.condition_frames
    scores = {name: {version: [] for version in VERSIONS} for name in classifiers}
    for index in range(len(dataset)):
        if len(next(iter(scores.values()))["real"]) == episodes:
            break
        frames = load_trajectory(dataset.paths[index])
        if len(frames) < 30 or not frames[-1]["success"]:
            continue
        recorded = dataset.episode(index)
        end = len(recorded.images)
        first = end - ACTION_CHUNK
        condition = frames_from_uint8(torch.from_numpy(recorded.images[first - context : first]), size)
        target = frames_from_uint8(torch.from_numpy(recorded.images[first:]), size)  # [8, 3, S, S]
        actions = torch.from_numpy(recorded.actions[first - 1 : end - 1])[None].float()  # [1, 8, 7]
        generator = torch.Generator().manual_seed(index)
        device, dtype = world_model.device, world_model.vae.dtype
        latents = world_model.vae.encode(
            rearrange(condition, "t c h w -> 1 c t h w").to(device, dtype), sample=True, generator=generator
        ).float()
        predicted = world_model.predict_chunk(latents, actions, generator=generator)
        reconstructed = world_model.vae.decode(
            world_model.vae.encode(
                rearrange(target, "t c h w -> 1 c t h w").to(device, dtype), sample=True, generator=generator
            )
        )
        versions = {
            "real": target,
            "recon": rearrange(reconstructed.float().cpu(), "1 c t h w -> t c h w").clamp(-1, 1),
            "pred": frames_from_uint8(predicted.frames[0].cpu(), size),
        }
        for name, classifier in classifiers.items():
            for version, images in versions.items():
                scores[name][version].append(classifier(images.float()).numpy())
    return {name: {v: np.stack(p) for v, p in versions.items()} for name, versions in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-model", required=True, help="world-model folder (or embedded:<name>)")
    parser.add_argument("--dataset", required=True, type=Path, help="recorded episodes (traj*.npy)")
    parser.add_argument("--classifiers", nargs="+", required=True, help="resnet_rm.pth files to compare")
    parser.add_argument("--episodes", type=int, default=40, help="successful episodes scored")
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    args = parser.parse_args()
    world_model = WorldModel.from_pretrained(
        resolve_checkpoint(args.world_model, "spatial"), device="cpu", dtype=torch.float32, image_size=64
    )
    classifiers = {path: ResNetRewardModel.from_pretrained(path).eval() for path in args.classifiers}
    scores = score_final_chunks(world_model, classifiers, TrajectoryDataset(args.dataset), args.episodes)
    result = {"episodes": args.episodes, "offsets": list(range(1 - ACTION_CHUNK, 1)), "classifiers": {}}
    for name, versions in scores.items():
        result["classifiers"][name] = {
            version: {
                "mean_prob_by_offset": probs.mean(0).round(3).tolist(),
                "detected_fraction": float((probs.max(1) >= 0.5).mean()),
                "episodes": len(probs),
            }
            for version, probs in versions.items()
        }
        for version, row in result["classifiers"][name].items():
            print(f"{name} {version:<5} {row['mean_prob_by_offset']} detected {row['detected_fraction']:.3f}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
