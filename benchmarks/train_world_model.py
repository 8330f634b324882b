"""Training throughput of the world model: clips/s and peak memory of `train_step` (the step `train-world-model` runs).

Random latents of 4 + 8 frames (4 channels, image side / 8), random actions, logit-normal timesteps; bf16 autocast,
AdamW, gradient clipping and the EMA update included; the first steps are a warm-up and are not counted.

    python benchmarks/train_world_model.py                 # GPU: XL/2 at 256 px (gradient checkpointing), small
    python benchmarks/train_world_model.py --tiny          # CPU: a tiny STDiT3 at 32 px, to check the script

Prints one table and writes JSON (default benchmarks/results/train_world_model[_tiny].json) naming the device.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import time
from pathlib import Path

import torch

from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
from opensora_gym.rectified_flow import RectifiedFlowConfig
from opensora_gym.training.rectified_flow import sample_timesteps
from opensora_gym.training.world_model import build_training_state, enable_gradient_checkpointing, train_step

# (name, architecture, image side, batch, gradient checkpointing)
GPU_CASES = (
    ("xl_2", STDiT3Config.xl_2(), 256, 8, True),
    ("small", STDiT3Config(depth=6, hidden_size=384, num_heads=6), 128, 64, False),
)
TINY_CASES = (("tiny", STDiT3Config(depth=2, hidden_size=64, num_heads=4), 32, 4, True),)


def measure(config: STDiT3Config, image_size: int, batch: int, checkpointing: bool, steps: int, device: str) -> dict:
    """Times `steps` training steps after 2 warm-up steps; returns clips/s, s/step and peak memory."""
    cuda = device.startswith("cuda")
    base = 0
    if cuda:
        # What an earlier case left behind is freed, and what stays is not counted as this case's.
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = STDiT3(config).to(device).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    state = build_training_state(model, lr=1e-4, weight_decay=0.0, adam_eps=1e-8, warmup_steps=0, seed=0)
    side, frames = image_size // 8, config.condition_frames + 8
    generator = state.generator

    def batch_tensors():
        x0 = torch.randn(batch, config.in_channels, frames, side, side, generator=generator)
        actions = torch.rand(batch, 8, config.action_dim, generator=generator) * 2 - 1
        noise = torch.randn(x0.shape, generator=generator)
        t = sample_timesteps(batch, generator, RectifiedFlowConfig(), image_size, image_size, frames)
        return x0, actions, noise, t

    for _ in range(2):
        train_step(state, *batch_tensors(), image_size=image_size)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elapsed = 0.0
    for _ in range(steps):
        tensors = batch_tensors()
        start = time.perf_counter()
        train_step(state, *tensors, image_size=image_size)
        if cuda:
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() - base if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "s_per_step": elapsed / steps,
        "clips_per_s": batch * steps / elapsed,
        "peak_gib": peak / 2**30,
        "peak_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny STDiT3 on the CPU (checks the script)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--device", default=None, help="default: cuda for the GPU cases, cpu with --tiny")
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.tiny else "cuda")
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    rows = []
    for name, config, image_size, batch, checkpointing in TINY_CASES if args.tiny else GPU_CASES:
        result = measure(config, image_size, batch, checkpointing, args.steps, device)
        rows.append({"model": name, "image_size": image_size, "batch": batch, "grad_ckpt": checkpointing, **result})
    print(f"world-model training step on {machine} ({device}), bf16 autocast, AdamW, EMA, 4 + 8 latent frames")
    header = ("model", "params M", "image", "batch", "ckpt", "s/step", "clips/s", "peak GiB")
    print(f"{header[0]:<7} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (9, 6, 6, 5, 8, 8, 9), strict=True)))
    for r in rows:
        print(
            f"{r['model']:<7} {r['params_m']:>9.1f} {r['image_size']:>6} {r['batch']:>6} {r['grad_ckpt']!s:>5} "
            f"{r['s_per_step']:>8.3f} {r['clips_per_s']:>8.1f} {r['peak_gib']:>9.2f}"
        )
    out = Path(args.out or f"benchmarks/results/train_world_model{'_tiny' if args.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "device": device, "args": vars(args), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
