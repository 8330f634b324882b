"""The speed ladder of `OpenSoraLiberoEnv.step`: each lever and each approximate mode, measured on one machine.

Every rung builds the env from the same checkpoint with one more lever (or one approximate mode) and reports
seconds per chunk step, imagined frames per second, the env's peak memory, where the time of a chunk step goes
(DiT sampling, VAE decode, reward model, host transfers; the VAE encode of a reset of every sub-env beside them),
and how far the rung's chunks are from the baseline rung's on the same inputs (condition latents, actions and
noise), chunk by chunk: latent MSE, PSNR of the decoded uint8 frames, and the share of frames whose rounded
success label agrees. Exact rungs differ from the baseline by bf16 rounding only; approximate ones say so. The
`draws-K` rungs are exact mode with the env's reliability signal on (K samples per chunk, `uncertainty="draws"`):
their cost over `exact` is the signal's. The `fp8` rungs are exact mode with the env's `dit_fp8_linears` (FP8
matmuls in the DiT blocks; a GPU needs compute capability >= 8.9), an approximate mode.

Modes:
    --tiny  a tiny random-weight checkpoint on the CPU (64 px, 2 sampling steps, float32): checks the script.
    --xl    the released architecture with random weights on a GPU: STDiT3-XL/2, the SDXL VAE and the full-size
            reward classifier, written once to a temporary folder in the released layout; 64 envs, 10 sampling
            steps, 256 px, bfloat16. `--checkpoint DIR` times a real checkpoint folder instead.

Every flag below overrides the mode's default. Prints one table and writes JSON (default
`benchmarks/results/env_step_<mode>_ladder.json`, rewritten after every rung).

    python benchmarks/env_step.py --tiny --compile-backend eager
    python benchmarks/env_step.py --xl --rungs eager-sdpa,eager,compiled,static,exact,steps-5,steps-4
    python benchmarks/env_step.py --xl --rungs exact,draws-2,draws-4
    python benchmarks/env_step.py --xl --rungs exact,fp8,steps-5,fp8-steps-5
    python benchmarks/env_step.py --xl --rungs exact,triton --kernels 25
"""

from __future__ import annotations

import argparse
import gc
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
import torch._inductor.config
from einops import rearrange

from opensora_gym.checkpoint import DATASET_FOLDER, STATISTICS_NAME, VAE_FOLDER
from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
from opensora_gym.models.vae import VideoVAE
from opensora_gym.presets import TinyCheckpointSpec, make_tiny_checkpoint
from opensora_gym.world_model import WorldModel, frames_to_uint8

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
class Rung:
    """One configuration of the ladder.

    Attributes:
        name: short name for `--rungs`.
        description: what the rung adds, for the table.
        temporal_attention: kernel of the causal temporal attention (`STDiT3.set_temporal_attention`).
        compile_dit: `torch.compile` the DiT blocks (static shapes when `dit_micro_batch_size` is set).
        dit_micro_batch_size: sub-envs per DiT forward; 0 stands for all of them (padded, one static shape).
        compile_vae: compiled channels-last VAE decode.
        num_sampling_steps: sampling steps; None keeps the benchmark's (10 for --xl, the exact number).
        uncertainty_draws: K samples per chunk for the env's reliability signal (`uncertainty="draws"`, report
            only: the stepped draw is the exact one); None: the signal is off.
        dit_fp8_linears: FP8 matmuls in the DiT blocks (the env's `dit_fp8_linears`, approximate).
        cudnn_benchmark: let cuDNN time its convolution algorithms and keep the fastest for each shape
            (`torch.backends.cudnn.benchmark`, a process-wide switch set for the rung): the VAE's convolutions.
        fused_gelu: each MLP's fc1 and GELU as one matmul with a GELU epilogue (`STDiT3.set_fused_gelu`).
        one_pass_head_norms: compiled blocks with the per-head QK-norms as one-pass reductions
            (`STDiT3.compile_blocks(one_pass_head_norms=True)`).
        coordinate_descent_tuning: inductor times each of its Triton kernels at neighbouring block sizes and warp
            counts while compiling and keeps the fastest (`torch._inductor.config.coordinate_descent_tuning`).
    """

    name: str
    description: str
    temporal_attention: str = "matmul"
    compile_dit: bool = False
    dit_micro_batch_size: int | None = None
    compile_vae: bool = False
    num_sampling_steps: int | None = None
    uncertainty_draws: int | None = None
    dit_fp8_linears: bool = False
    cudnn_benchmark: bool = False
    fused_gelu: bool = False
    one_pass_head_norms: bool = False
    coordinate_descent_tuning: bool = False

    @property
    def exact(self) -> bool:
        return self.num_sampling_steps is None and not self.dit_fp8_linears


EXACT = {"compile_dit": True, "dit_micro_batch_size": 0, "compile_vae": True}
# Exact mode with the fused kernels (the approximate rungs build on it); `WorldModel.from_pretrained(compile=True)`
# on a CUDA GPU also compiles the per-head QK-norms as one-pass reductions (rung head-norms).
FUSED = {**EXACT, "temporal_attention": "triton", "fused_gelu": True}
# FP8 linears leave no float fc1 weight for the fused GELU (`set_fused_gelu` refuses), as in the env.
FP8 = {**EXACT, "temporal_attention": "triton", "dit_fp8_linears": True}
RUNGS = (
    Rung("eager-sdpa", "eager, masked SDPA for temporal attention (before)", temporal_attention="sdpa"),
    Rung("eager", "eager: matmul temporal attention, fused QK-norm + RoPE, K/V freed"),
    Rung("compiled", "+ compiled blocks, dynamic shapes", compile_dit=True),
    Rung("static", "+ static shapes (batch padded to the envs)", compile_dit=True, dit_micro_batch_size=0),
    Rung("exact", "+ compiled channels-last VAE decode (exact mode)", **EXACT),
    Rung(
        "triton",
        "exact mode, one fused Triton kernel for the temporal QK-norm, RoPE and attention",
        **EXACT,
        temporal_attention="triton",
    ),
    Rung("gelu", "exact mode, fc1 and its GELU as one matmul with a GELU epilogue", **EXACT, fused_gelu=True),
    Rung(
        "fused",
        "exact mode, + the fused temporal attention and fc1 + GELU kernels",
        **FUSED,
    ),
    Rung(
        "head-norms",
        "exact mode as the env runs it on a GPU: fused + the per-head QK-norms as one-pass reductions",
        **FUSED,
        one_pass_head_norms=True,
    ),
    Rung(
        "tuned",
        "exact mode (head-norms), inductor's kernels tuned by coordinate descent while compiling",
        **FUSED,
        one_pass_head_norms=True,
        coordinate_descent_tuning=True,
    ),
    Rung("cudnn", "exact mode, cuDNN picks the fastest convolution algorithms", **EXACT, cudnn_benchmark=True),
    Rung("micro-32", "exact mode, DiT micro-batches of 32 envs", **{**EXACT, "dit_micro_batch_size": 32}),
    Rung("steps-5", "APPROXIMATE: exact mode (fused) with 5 sampling steps", **FUSED, num_sampling_steps=5),
    Rung("steps-4", "APPROXIMATE: exact mode (fused) with 4 sampling steps", **FUSED, num_sampling_steps=4),
    Rung("fp8", "APPROXIMATE: exact mode with FP8 linears in the DiT blocks (fused temporal attention)", **FP8),
    Rung(
        "fp8-steps-5",
        "APPROXIMATE: exact mode with FP8 linears in the DiT blocks (fused temporal attention) and 5 sampling steps",
        **FP8,
        num_sampling_steps=5,
    ),
    Rung("draws-2", "exact mode + reliability signal, K = 2 draws per chunk", **EXACT, uncertainty_draws=2),
    Rung("draws-4", "exact mode + reliability signal, K = 4 draws per chunk", **EXACT, uncertainty_draws=4),
)
RUNGS_BY_NAME = {rung.name: rung for rung in RUNGS}


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark run.

    Attributes:
        mode: `tiny` or `xl` (which checkpoint is built when `checkpoint` is None).
        device, dtype, num_envs, num_sampling_steps, image_size: the env's settings (the exact number of steps).
        warmup_steps: chunk steps run before timing (compilation, kernel selection, allocator growth).
        timed_steps: chunk steps timed.
        seed: seeds the env, the random actions and the compared chunks' noise.
        checkpoint: an existing checkpoint folder to time instead of the mode's random one.
        rungs: names of the rungs to run, in order; the first is the baseline of the comparisons.
        compare_chunks: chained chunks compared with the baseline's.
        compile_backend: `torch.compile` backend (`inductor`; `eager` traces without building kernels, for CPUs).
        compile_mode: `torch.compile` mode of the DiT blocks (None: the default; e.g.
            `max-autotune-no-cudagraphs`, which times Triton matmul templates against cuBLAS when compiling).
        kernels: profile one more chunk step of each rung and keep its `kernels` slowest device kernels (CPU
            operators on a CPU) and the time per kind of kernel; 0: no profile.
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
    rungs: tuple[str, ...]
    compare_chunks: int = 2
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    kernels: int = 0

    def __post_init__(self):
        if self.mode not in ("tiny", "xl"):
            raise ValueError(f"mode must be 'tiny' or 'xl', got {self.mode!r}")
        for name in ("num_envs", "num_sampling_steps", "image_size", "timed_steps", "compare_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "kernels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        unknown = [name for name in self.rungs if name not in RUNGS_BY_NAME]
        if unknown or not self.rungs:
            raise ValueError(f"rungs must be names among {list(RUNGS_BY_NAME)}, got {list(self.rungs)}")
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


def sub_env_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sub-env, seeded `seed + i` (the world model's per-sub-env noise)."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_env(config: BenchmarkConfig, rung: Rung, checkpoint: Path, steps: int) -> OpenSoraLiberoEnv:
    """The env with the rung's levers applied to its world model."""
    micro = rung.dit_micro_batch_size
    torch.backends.cudnn.benchmark = rung.cudnn_benchmark
    env = OpenSoraLiberoEnv(
        config.num_envs,
        checkpoint=checkpoint,
        device=config.device,
        dtype=config.dtype,
        num_sampling_steps=rung.num_sampling_steps or config.num_sampling_steps,
        image_size=config.image_size,
        dit_micro_batch_size=config.num_envs if micro == 0 else micro,
        # No episode ends while being timed (no time limit reached, no success), so every step imagines all
        # sub-envs: a sub-env that ended would reset on its next step and imagine nothing on it.
        max_episode_steps=8 * steps,
        success_from="probability",
        success_threshold=math.inf,
        uncertainty="off" if rung.uncertainty_draws is None else "draws",
        uncertainty_draws=rung.uncertainty_draws or 2,
        dit_fp8_linears=rung.dit_fp8_linears,
    )
    world_model = env.world_model
    world_model.dit.set_temporal_attention(rung.temporal_attention)
    world_model.dit.set_fused_gelu(rung.fused_gelu)
    if rung.compile_dit:
        world_model.dit.compile_blocks(
            dynamic=micro is None,
            one_pass_head_norms=rung.one_pass_head_norms,
            backend=config.compile_backend,
            mode=config.compile_mode,
        )
    if rung.compile_vae:
        world_model.vae.compile_decoder(backend=config.compile_backend)
    return env


@torch.inference_mode()
def profile_chunk(world_model: WorldModel, latents: torch.Tensor, actions: torch.Tensor, seed: int) -> dict:
    """Seconds of each part of one chunk step (synchronized between parts), as `predict_chunk` and the env run it.

    Args:
        latents: condition latents [N, C, Tc, h, w]; actions: [N, A, action_dim] in robot units.
    """
    device = world_model.device
    n = latents.shape[0]
    times = {}

    def timed(name, fn):
        _synchronize(device)
        start = time.perf_counter()
        out = fn()
        _synchronize(device)
        times[name] = time.perf_counter() - start
        return out

    generator = sub_env_generators(seed, n)
    normalized = world_model.statistics.normalize(actions.float().to(device)).to(world_model.dit.dtype)
    sampled = timed(
        "dit_s",
        lambda: world_model.sampler.sample(
            world_model.dit,
            latents.to(device),
            normalized,
            height=world_model.image_size,
            width=world_model.image_size,
            generator=generator,
        )[:, :, world_model.condition_frames :],
    )
    decoded = timed("vae_decode_s", lambda: world_model.vae.decode(sampled.to(world_model.vae.dtype)))
    timed("reward_model_s", lambda: world_model.reward_model(rearrange(decoded, "n c t h w -> (n t) c h w")))
    timed("host_transfer_s", lambda: (frames_to_uint8(decoded).cpu(), sampled[:, :, -latents.shape[2] :].cpu()))
    images = torch.randint(0, 256, (n, world_model.image_size, world_model.image_size, 3), dtype=torch.uint8)
    timed("vae_encode_reset_s", lambda: world_model.encode_start(images, generator=generator))
    return times


# Kinds of device kernels (or CPU operators), matched in this order on the lower-cased name.
# Inductor's kernels first (their names list the fused operators, attention's among them), then cuDNN's attention
# (`..._sdpa_..._flash_fprop_...`) before its convolutions, and those (implicit GEMMs) before the matmuls.
KERNEL_KINDS = (
    ("fused (inductor)", ("triton",)),
    ("attention", ("sdpa", "flash", "fmha", "attention", "softmax")),
    ("convolution", ("conv", "cudnn", "implicit", "fprop", "dgrad", "wgrad")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "addmm", "aten::mm", "bmm", "scaled_mm")),
)


def kernel_kind(name: str) -> str:
    """The kind of a kernel or operator name: one of KERNEL_KINDS' names, or `other`."""
    lower = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(key in lower for key in keys):
            return kind
    return "other"


@torch.inference_mode()
def kernel_table(world_model: WorldModel, latents: torch.Tensor, actions: torch.Tensor, seed: int, top: int) -> dict:
    """Where the device time of one chunk step (`predict_chunk` on the compared inputs) goes, by kernel.

    On a GPU the entries are CUDA kernels and their device time; on a CPU, operators and their own CPU time.

    Returns:
        `total_s`, `by_kind` (seconds per kernel kind) and `top` (the `top` slowest: name, calls, seconds).
    """
    device = world_model.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    generator = sub_env_generators(seed, latents.shape[0])
    _synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        world_model.predict_chunk(latents, actions, generator=generator)
        _synchronize(device)
    # Operators also carry the device time of the kernels they launched: keep the kernels' own events only.
    device_type = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [event for event in profiler.key_averages() if event.device_type == device_type]
    rows = [(event.key, event.count, getattr(event, field) / 1e6) for event in events]
    rows = sorted((row for row in rows if row[2] > 0), key=lambda row: -row[2])
    by_kind: dict[str, float] = {}
    for name, _, seconds in rows:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    return {
        "total_s": sum(row[2] for row in rows),
        "by_kind": by_kind,
        "top": [{"name": name[:160], "calls": calls, "s": seconds} for name, calls, seconds in rows[:top]],
    }


def compare_inputs(world_model: WorldModel, config: BenchmarkConfig, action_chunk: int) -> dict:
    """Start latents [N, C, Tc, h, w] and per-chunk actions [chunks, N, A, 7] shared by every rung (on the CPU)."""
    rng = np.random.default_rng(config.seed + 1)
    n, s = config.num_envs, config.image_size
    images = torch.from_numpy(rng.integers(0, 256, size=(n, s, s, 3), dtype=np.uint8))
    generators = sub_env_generators(config.seed, n)
    actions = rng.uniform(-1, 1, size=(config.compare_chunks, n, action_chunk, world_model.action_dim))
    latents = world_model.encode_start(images, generator=generators).cpu()
    return {"latents": latents, "actions": torch.from_numpy(actions.astype(np.float32))}


def chunk_outputs(world_model: WorldModel, inputs: dict, seed: int, conditions: list[torch.Tensor] | None) -> list:
    """(latents, uint8 frames, rounded success labels) of each compared chunk, on the CPU.

    Chunk 0 starts from the shared start latents; chunk k > 0 from `conditions[k]` (the baseline's chunk k - 1)
    or, for the baseline itself (`conditions` None), from its own previous chunk.
    """
    outputs, condition = [], inputs["latents"]
    tc = world_model.condition_frames
    for k, actions in enumerate(inputs["actions"]):
        if conditions is not None:
            condition = conditions[k]
        generator = sub_env_generators(seed + 1000 * (k + 1), actions.shape[0])
        prediction = world_model.predict_chunk(condition, actions, generator=generator)
        outputs.append((prediction.latents.cpu(), prediction.frames.cpu(), prediction.success_prob.round().cpu()))
        condition = prediction.latents[:, :, -tc:].cpu()
    return outputs


def differences(outputs: list, baseline: list) -> list[dict]:
    """Per chunk: latent MSE, PSNR (dB) of the uint8 frames, and the share of agreeing success labels."""
    rows = []
    for (latents, frames, labels), (base_latents, base_frames, base_labels) in zip(outputs, baseline, strict=True):
        frame_mse = float((frames.float() - base_frames.float()).pow(2).mean())
        rows.append(
            {
                "latent_mse": float((latents - base_latents).pow(2).mean()),
                "psnr_db": 10 * math.log10(255**2 / frame_mse) if frame_mse > 0 else math.inf,
                "label_agreement": float((labels == base_labels).float().mean()),
            }
        )
    return rows


def run_rung(config: BenchmarkConfig, rung: Rung, checkpoint: Path, baseline: dict | None) -> tuple[dict, dict]:
    """Builds the rung's env, times its chunk steps, profiles one, and compares its chunks with the baseline's.

    Returns:
        the rung's results, and the baseline: `baseline` as given, or (given None) this rung's shared inputs and
        outputs, the baseline of the rungs after it.
    """
    device = torch.device(config.device)
    steps = config.warmup_steps + config.timed_steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    env = make_env(config, rung, checkpoint, steps)
    rng = np.random.default_rng(config.seed)
    actions = rng.uniform(-1, 1, size=(steps, *env.action_space.shape)).astype(np.float32)  # [steps, N, 8, 7]

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
        step_s.append(time.perf_counter() - start)
        frames.append(int(info["_frame_rewards"].sum()) * env.config.action_chunk)
    timed_s, timed_frames = step_s[config.warmup_steps :], frames[config.warmup_steps :]

    world_model = env.world_model
    if baseline is None:
        inputs = compare_inputs(world_model, config, env.config.action_chunk)
        outputs = chunk_outputs(world_model, inputs, config.seed, None)
        baseline = {"rung": rung.name, "inputs": inputs, "outputs": outputs}
    else:
        conditions = [baseline["inputs"]["latents"]] + [
            out[0][:, :, -world_model.condition_frames :] for out in baseline["outputs"][:-1]
        ]
        outputs = chunk_outputs(world_model, baseline["inputs"], config.seed, conditions)
    parts = profile_chunk(world_model, baseline["inputs"]["latents"], baseline["inputs"]["actions"][0], config.seed)
    kernels = None
    if config.kernels:
        first = baseline["inputs"]["latents"], baseline["inputs"]["actions"][0]
        kernels = kernel_table(world_model, *first, config.seed, config.kernels)

    if device.type == "cuda":
        peak_bytes, peak_kind = torch.cuda.max_memory_allocated(device) - before, "cuda_max_memory_allocated"
    else:
        # ru_maxrss is in KiB on Linux: the process's peak resident memory so far, earlier rungs included.
        peak_bytes, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
    env.close()
    result = {
        "rung": asdict(rung),
        "exact": rung.exact,
        "reset_s": reset_s,
        "warmup_step_s": step_s[: config.warmup_steps],
        "step_s": timed_s,
        "seconds_per_step_mean": statistics.mean(timed_s),
        "seconds_per_step_std": statistics.stdev(timed_s) if len(timed_s) > 1 else 0.0,
        "frames_per_second": sum(timed_frames) / sum(timed_s),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": peak_kind,
        "parts": parts,
        "kernels": kernels,
        "compared_with": baseline["rung"],
        "difference_per_chunk": differences(outputs, baseline["outputs"]),
    }
    return result, baseline


def table(results: list[dict]) -> str:
    """The ladder: one row per rung."""
    header = [
        "rung",
        "s/chunk step",
        "frames/s",
        "peak GiB",
        "DiT s",
        "decode s",
        "RM s",
        "host s",
        "encode s (reset)",
        "latent MSE",
        "PSNR dB",
        "labels agree",
    ]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["rung"]["name"], f"failed: {r['error'][:60]}"] + [""] * (len(header) - 2))
            continue
        p, diffs = r["parts"], r["difference_per_chunk"]
        rows.append(
            [
                r["rung"]["name"] + ("" if r["exact"] else " (approx.)"),
                f"{r['seconds_per_step_mean']:.3f} ± {r['seconds_per_step_std']:.3f}",
                f"{r['frames_per_second']:.1f}",
                f"{r['peak_memory_bytes'] / 2**30:.2f}",
                f"{p['dit_s']:.3f}",
                f"{p['vae_decode_s']:.3f}",
                f"{p['reward_model_s']:.3f}",
                f"{p['host_transfer_s']:.3f}",
                f"{p['vae_encode_reset_s']:.3f}",
                " / ".join(f"{d['latent_mse']:.2g}" for d in diffs),
                " / ".join(f"{d['psnr_db']:.1f}" for d in diffs),
                " / ".join(f"{d['label_agreement']:.3f}" for d in diffs),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) for values in (header, *rows)]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def parse_args(argv: list[str] | None = None) -> tuple[BenchmarkConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="tiny checkpoint, CPU (default)")
    mode.add_argument("--xl", dest="mode", action="store_const", const="xl", help="released sizes, random weights")
    parser.add_argument("--device", help="torch device (tiny: cpu, xl: cuda)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="tiny: float32, xl: bfloat16")
    parser.add_argument("--num-envs", type=int, help="sub-envs in the batch (tiny: 4, xl: 64)")
    parser.add_argument("--num-sampling-steps", type=int, help="exact rectified-flow steps (tiny: 2, xl: 10)")
    parser.add_argument("--image-size", type=int, help="frame side in pixels (tiny: 64, xl: 256)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed chunk steps first (compilation)")
    parser.add_argument("--timed-steps", type=int, default=2, help="chunk steps timed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the env and the actions")
    parser.add_argument("--rungs", default=",".join(RUNGS_BY_NAME), help="comma-separated rungs; first = baseline")
    parser.add_argument("--compare-chunks", type=int, default=2, help="chained chunks compared with the baseline")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: CPU check)")
    parser.add_argument("--compile-mode", help="torch.compile mode of the DiT blocks (e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--checkpoint", help="time this checkpoint folder (e.g. the released model) instead")
    parser.add_argument("--kernels", type=int, default=0, help="profile one chunk step: keep the N slowest kernels")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/env_step_<mode>_ladder.json)")
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
        rungs=tuple(name for name in args.rungs.split(",") if name),
        compare_chunks=args.compare_chunks,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        kernels=args.kernels,
    )
    return config, args.out or RESULTS / f"env_step_{mode_name}_ladder.json"


def main(argv: list[str] | None = None) -> int:
    config, out = parse_args(argv)
    device = torch.device(config.device)
    machine = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    results, baseline, compiled_as = [], None, None
    cudnn_benchmark = torch.backends.cudnn.benchmark  # the rungs set it; given back at the end
    with tempfile.TemporaryDirectory(prefix="env_step_") as workdir:
        started = time.perf_counter()
        if config.checkpoint is not None:
            checkpoint = Path(config.checkpoint)
        elif config.mode == "xl":
            checkpoint = build_xl_checkpoint(Path(workdir), config.device, config.seed)
        else:
            checkpoint = make_tiny_checkpoint(Path(workdir) / "tiny", seed=config.seed)
        build_s = time.perf_counter() - started
        for name in config.rungs:
            rung = RUNGS_BY_NAME[name]
            # Rungs that compile the same shapes, layers and kernels share graphs; any other (FP8 linears, the
            # triton kernel, the fused GELU) would pile up recompilations (and reach torch.compile's limit, past
            # which blocks silently run eager), so start those afresh.
            shapes = (
                rung.compile_dit,
                rung.dit_micro_batch_size,
                rung.dit_fp8_linears,
                rung.temporal_attention,
                rung.fused_gelu,
                rung.one_pass_head_norms,
                rung.coordinate_descent_tuning,
            )
            if rung.compile_dit and compiled_as not in (None, shapes):
                torch._dynamo.reset()
            compiled_as = shapes if rung.compile_dit else compiled_as
            try:
                # Past the limit, torch.compile would run the blocks eager and time them as this rung: fail instead.
                # Inductor's FX graph cache does not key on the one-pass head norms' heuristic: without it, a rung
                # could reuse an earlier rung's kernels for the same graph.
                with (
                    torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
                    torch._inductor.config.patch(
                        fx_graph_cache=False, coordinate_descent_tuning=rung.coordinate_descent_tuning
                    ),
                ):
                    result, baseline = run_rung(config, rung, checkpoint, baseline)
            except Exception as error:  # a failing rung is reported in the table; the others still run
                result = {"rung": asdict(rung), "error": f"{type(error).__name__}: {error}"}
            results.append(result)
            gc.collect()
            print(f"rung {name} done", flush=True)
            out.write_text(
                json.dumps(
                    {"config": asdict(config), "machine": machine, "checkpoint_build_s": build_s, "rungs": results},
                    indent=2,
                )
            )
    torch.backends.cudnn.benchmark = cudnn_benchmark
    print(f"{config.mode}: {machine['device_name']}, {config.dtype}, {config.num_envs} envs, {config.image_size} px")
    print(table(results))
    for r in results:
        if r.get("kernels"):
            k = r["kernels"]
            shares = ", ".join(f"{kind} {s / k['total_s']:.0%}" for kind, s in sorted(k["by_kind"].items()))
            print(f"{r['rung']['name']}: kernels {k['total_s']:.3f} s ({shares}); slowest:")
            for row in k["top"]:
                print(f"  {row['s']:8.3f} s {row['calls']:6d} x  {row['name'][:110]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
