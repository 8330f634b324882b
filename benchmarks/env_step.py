"""Throughput of `OpenSoraLiberoEnv.step`: frames per second, seconds per chunk step and peak memory.

Modes:
    --tiny  a tiny random-weight checkpoint on the CPU (64 px, 2 sampling steps, float32): checks the script.
    --xl    the released architecture with random weights on a GPU: STDiT3-XL/2, the SDXL VAE and the full-size
            reward classifier, written once to a temporary folder in the released layout; 64 envs, 10 sampling
            steps, 256 px, bfloat16. `--checkpoint DIR` times a real checkpoint folder instead.

Every flag below overrides the mode's default. Prints one table and writes JSON (default
`benchmarks/results/env_step_<mode>.json`).

    python benchmarks/env_step.py --tiny
    python benchmarks/env_step.py --xl --num-envs 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from opensora_gym.checkpoint import DATASET_FOLDER, STATISTICS_NAME, VAE_FOLDER
from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
from opensora_gym.models.vae import VideoVAE
from opensora_gym.testing import TinyCheckpointSpec, make_tiny_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"

# The SDXL VAE (stabilityai/sdxl-vae config.json): the architecture of the released world model's `vae/`.
SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark run.

    Attributes:
        mode: `tiny` or `xl` (which checkpoint is built when `checkpoint` is None).
        device, dtype, num_envs, num_sampling_steps, image_size: the env's settings.
        warmup_steps: chunk steps run before timing (kernel selection, allocator growth).
        timed_steps: chunk steps timed.
        seed: seeds the env and the random actions.
        checkpoint: an existing checkpoint folder to time instead of the mode's random one.
        compile: `torch.compile` the DiT's blocks.
    """

    mode: str
    device: str
    dtype: str
    num_envs: int
    num_sampling_steps: int
    image_size: int
    warmup_steps: int
    timed_steps: int
    seed: int
    checkpoint: str | None
    compile: bool = False

    def __post_init__(self):
        if self.mode not in ("tiny", "xl"):
            raise ValueError(f"mode must be 'tiny' or 'xl', got {self.mode!r}")
        for name in ("num_envs", "num_sampling_steps", "image_size", "timed_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for but CUDA is not available: use --tiny or --device cpu")


MODE_DEFAULTS = {
    "tiny": {"device": "cpu", "dtype": "float32", "num_envs": 4, "num_sampling_steps": 2, "image_size": 64},
    "xl": {"device": "cuda", "dtype": "bfloat16", "num_envs": 64, "num_sampling_steps": 10, "image_size": 256},
}


def build_xl_checkpoint(folder: Path, device: str, seed: int = 0) -> Path:
    """Writes a random-weight checkpoint of the released sizes in the released layout.

    The DiT is initialized directly on `device` (a GPU makes the 1 B-parameter init take seconds) and stored in
    bfloat16; the start frames and action statistics come from a tiny checkpoint with 256 px frames.
    """
    tiny = make_tiny_checkpoint(folder / "tiny", TinyCheckpointSpec(image_size=256), seed=seed)
    root = folder / "xl"
    root.mkdir(parents=True)
    shutil.copytree(tiny / DATASET_FOLDER, root / DATASET_FOLDER)
    shutil.copy(tiny / STATISTICS_NAME, root / STATISTICS_NAME)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            dit = STDiT3(STDiT3Config.xl_2()).to(torch.bfloat16)
        dit.save_pretrained(root)
        del dit
        VideoVAE.from_config(SDXL_VAE_CONFIG).save_pretrained(root / VAE_FOLDER)
        ResNetRewardModel().save_pretrained(root)
    return root


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config: BenchmarkConfig, workdir: Path) -> dict:
    """Builds (or reads) the checkpoint, makes the env and times its chunk steps.

    Returns:
        the settings, per-step times and summary numbers (see `summarize`).
    """
    started = time.perf_counter()
    if config.checkpoint is not None:
        checkpoint = Path(config.checkpoint)
    elif config.mode == "xl":
        checkpoint = build_xl_checkpoint(workdir, config.device, config.seed)
    else:
        checkpoint = make_tiny_checkpoint(workdir / "tiny", seed=config.seed)
    build_s = time.perf_counter() - started

    steps = config.warmup_steps + config.timed_steps
    env = OpenSoraLiberoEnv(
        config.num_envs,
        checkpoint=checkpoint,
        device=config.device,
        dtype=config.dtype,
        num_sampling_steps=config.num_sampling_steps,
        image_size=config.image_size,
        compile=config.compile,
        # No episode ends while being timed (no time limit reached, no success), so every step imagines all
        # sub-envs: a sub-env that ended would reset on its next step and imagine nothing on it.
        max_episode_steps=8 * steps,
        success_from="probability",
        success_threshold=math.inf,
    )
    device = torch.device(config.device)
    rng = np.random.default_rng(config.seed)
    actions = rng.uniform(-1, 1, size=(steps, *env.action_space.shape)).astype(np.float32)  # [steps, N, 8, 7]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    _synchronize(device)
    start = time.perf_counter()
    env.reset(seed=config.seed)
    _synchronize(device)
    reset_s = time.perf_counter() - start

    step_s, frames = [], []
    for k in range(steps):
        _synchronize(device)
        start = time.perf_counter()
        _, _, _, _, info = env.step(actions[k])
        _synchronize(device)
        if k >= config.warmup_steps:
            step_s.append(time.perf_counter() - start)
            frames.append(int(info["_frame_rewards"].sum()) * env.config.action_chunk)

    if device.type == "cuda":
        peak_bytes, peak_kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        # ru_maxrss is in KiB on Linux: the process's peak resident memory, checkpoint building included.
        peak_bytes, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
    env.close()
    return {
        "config": asdict(config),
        "machine": {
            "device_name": (
                torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
            ),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
        },
        "checkpoint_build_s": build_s,
        "reset_s": reset_s,
        "step_s": step_s,
        "imagined_frames": frames,
        "seconds_per_step_mean": statistics.mean(step_s),
        "seconds_per_step_std": statistics.stdev(step_s) if len(step_s) > 1 else 0.0,
        "frames_per_second": sum(frames) / sum(step_s),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": peak_kind,
    }


def table(result: dict) -> str:
    """One row of the headline numbers."""
    c = result["config"]
    header = ["mode", "device", "dtype", "envs", "px", "steps", "s/chunk step", "frames/s", "peak GiB"]
    row = [
        c["mode"] if c["checkpoint"] is None else "checkpoint",
        result["machine"]["device_name"],
        c["dtype"],
        str(c["num_envs"]),
        str(c["image_size"]),
        str(c["num_sampling_steps"]),
        f"{result['seconds_per_step_mean']:.3f} ± {result['seconds_per_step_std']:.3f}",
        f"{result['frames_per_second']:.1f}",
        f"{result['peak_memory_bytes'] / 2**30:.2f} ({'GPU' if 'cuda' in result['peak_memory_kind'] else 'RSS'})",
    ]
    widths = [max(len(h), len(r)) for h, r in zip(header, row, strict=True)]
    lines = [" | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) for values in (header, row)]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), lines[1]])


def parse_args(argv: list[str] | None = None) -> tuple[BenchmarkConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="tiny checkpoint, CPU (default)")
    mode.add_argument("--xl", dest="mode", action="store_const", const="xl", help="released sizes, random weights")
    parser.add_argument("--device", help="torch device (tiny: cpu, xl: cuda)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="tiny: float32, xl: bfloat16")
    parser.add_argument("--num-envs", type=int, help="sub-envs in the batch (tiny: 4, xl: 64)")
    parser.add_argument("--num-sampling-steps", type=int, help="rectified-flow steps (tiny: 2, xl: 10)")
    parser.add_argument("--image-size", type=int, help="frame side in pixels (tiny: 64, xl: 256)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed chunk steps first")
    parser.add_argument("--timed-steps", type=int, default=5, help="chunk steps timed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the env and the actions")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks")
    parser.add_argument("--checkpoint", help="time this checkpoint folder (e.g. the released model) instead")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/env_step_<mode>.json)")
    args = parser.parse_args(argv)
    mode_name = args.mode or "tiny"
    defaults = MODE_DEFAULTS[mode_name]
    config = BenchmarkConfig(
        mode=mode_name,
        device=args.device or defaults["device"],
        dtype=args.dtype or defaults["dtype"],
        num_envs=args.num_envs or defaults["num_envs"],
        num_sampling_steps=args.num_sampling_steps or defaults["num_sampling_steps"],
        image_size=args.image_size or defaults["image_size"],
        warmup_steps=args.warmup_steps,
        timed_steps=args.timed_steps,
        seed=args.seed,
        checkpoint=args.checkpoint,
        compile=args.compile,
    )
    suffix = "_compiled" if args.compile else ""
    return config, args.out or RESULTS / f"env_step_{mode_name}{suffix}.json"


def main(argv: list[str] | None = None) -> int:
    config, out = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="env_step_") as workdir:
        result = run(config, Path(workdir))
    print(table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
