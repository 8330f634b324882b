"""The world-model demo: imagine a few chunks in the world model and write an mp4 (`opensora-gym rollout`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

from opensora_gym.checkpoint import CheckpointLayout
from opensora_gym.data import TrajectoryDataset
from opensora_gym.env import DTYPES
from opensora_gym.presets import make_tiny_checkpoint
from opensora_gym.world_model import WorldModel


def rollout(args: argparse.Namespace) -> dict:
    """Starts `num_envs` episodes from recorded start frames, imagines `chunks` chunks, writes an mp4."""
    if args.image_size is None:
        args.image_size = 64 if args.checkpoint is None else 256
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = make_tiny_checkpoint(out / "tiny_checkpoint", seed=args.seed)
        print(f"no --checkpoint given: wrote a tiny random-weight checkpoint to {checkpoint}")
    layout = CheckpointLayout.resolve(checkpoint)
    model = WorldModel.from_pretrained(
        layout.root,
        device=args.device,
        dtype=DTYPES[args.dtype],
        num_sampling_steps=args.num_sampling_steps,
        image_size=args.image_size,
        dit_fp8_linears=args.dit_fp8_linears,
    )
    dataset = TrajectoryDataset(layout.dataset)
    episodes = [i % len(dataset) for i in range(args.num_envs)]
    starts = [dataset.start_frame(i) for i in episodes]
    images = torch.from_numpy(np.stack([image for image, _ in starts]))
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_envs)]
    low = torch.from_numpy(model.statistics.q01)
    high = torch.from_numpy(model.statistics.q99)

    start = time.perf_counter()
    latents = model.encode_start(images, generator=generators)
    chunks, probs = [], []
    for _ in range(args.chunks):
        # A random policy within the recorded action range: one action chunk per sub-env.
        noise = torch.stack([torch.rand(args.action_chunk, low.numel(), generator=g) for g in generators])
        actions = low + (high - low) * noise  # [N, A, action_dim]
        prediction = model.predict_chunk(latents, actions, generator=generators)
        latents = prediction.latents[:, :, -model.condition_frames :]
        chunks.append(prediction.frames.cpu())
        probs.append(prediction.success_prob.cpu())
    elapsed = time.perf_counter() - start

    frames = torch.cat(chunks, dim=1).numpy()  # [N, T, H, W, 3]
    video = out / "rollout.mp4"
    # Sub-envs side by side, one video frame per predicted frame.
    imageio.mimwrite(video, list(np.concatenate(list(frames), axis=2)), fps=args.fps, macro_block_size=1)
    num_frames = frames.shape[0] * frames.shape[1]
    result = {
        "video": str(video),
        "frames": num_frames,
        "seconds": elapsed,
        "frames_per_second": num_frames / elapsed,
        "mean_success_prob": float(torch.cat(probs, dim=1).mean()),
    }
    print(
        f"imagined {args.chunks} chunks x {args.action_chunk} frames for {args.num_envs} sub-envs "
        f"({num_frames} frames at {args.image_size}px) in {elapsed:.2f} s: {result['frames_per_second']:.1f} frames/s"
    )
    print(f"mean success probability {result['mean_success_prob']:.3f}; video: {video}")
    return result


def add_rollout_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `rollout`, added to `parser` (also used by the `opensora-gym` command of `trainers.cli`)."""
    parser.add_argument("--checkpoint", help="world-model folder (default: a tiny random-weight one, made on the fly)")
    parser.add_argument("--out", default="runs/rollout", help="output folder for the video (and the tiny checkpoint)")
    parser.add_argument("--num-envs", type=int, default=4, help="sub-envs imagined in one batch")
    parser.add_argument("--chunks", type=int, default=4, help="action chunks per sub-env")
    parser.add_argument("--action-chunk", type=int, default=8, help="actions (= predicted frames) per chunk")
    parser.add_argument("--num-sampling-steps", type=int, default=10, help="rectified-flow steps per chunk")
    parser.add_argument("--image-size", type=int, default=None, help="frame side (default: 64 tiny, 256 real)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="DiT and VAE dtype")
    parser.add_argument(
        "--dit-fp8-linears",
        action="store_true",
        help="approximate: FP8 matmuls in the DiT blocks (the CPU, or a GPU of compute capability >= 8.9)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sub-envs' generators")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of the video")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m opensora_gym.cli [rollout options]`: imagine a few chunks and write an mp4."""
    rollout(
        add_rollout_arguments(argparse.ArgumentParser(prog="opensora_gym.cli", description=__doc__)).parse_args(argv)
    )


if __name__ == "__main__":
    main()
