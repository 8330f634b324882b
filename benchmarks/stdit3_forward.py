"""STDiT3 forward: bf16 against float32, the cached condition frames against the full forward, and speed.

Builds STDiT3 (XL/2 by default, random weights) on the chosen device and reports
- the relative error of the bf16 output against float32 on the same inputs (full forward and cached path);
- the error of `forward_generated` (condition frames cached) against `forward` in each dtype;
- seconds per sampler step at the given batch for both paths (bf16), and the peak GPU memory.

    python benchmarks/stdit3_forward.py --device cuda --batch 64          # the env's default load
    python benchmarks/stdit3_forward.py --tiny                            # a quick CPU check of the script

Prints one table and writes JSON (default benchmarks/results/stdit3_forward_<preset>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from opensora_gym.models.stdit3 import STDiT3, STDiT3Config


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a depth-2 width-64 model instead of XL/2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64, help="sub-envs per forward for the timing")
    parser.add_argument("--check-batch", type=int, default=2, help="batch of the precision checks")
    parser.add_argument("--image-size", type=int, default=256, help="image side; latents are 8x smaller")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile every block for the timing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    preset = ("tiny" if args.tiny else "xl2") + ("_compiled" if args.compile else "")
    config = STDiT3Config(depth=2, hidden_size=64, num_heads=4) if args.tiny else STDiT3Config.xl_2()
    device = args.device
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = STDiT3(config).eval()
    latent = args.image_size // 8
    frames = config.condition_frames + 8

    def inputs(batch: int):
        x = torch.randn(batch, 4, frames, latent, latent, generator=generator).to(device)
        timestep = torch.full((batch,), 700.0, device=device)
        actions = (torch.rand(batch, 8, 7, generator=generator) * 2 - 1).to(device)
        x_mask = torch.zeros(batch, frames, dtype=torch.bool, device=device)
        x_mask[:, config.condition_frames :] = True
        return x, timestep, actions, x_mask

    size = (args.image_size, args.image_size)
    c = config.condition_frames
    rows = {}
    with torch.no_grad():
        check = inputs(args.check_batch)
        x, timestep, actions, x_mask = check
        outputs = {}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model.to(dtype)
            full = model(x, timestep, actions, x_mask, *size)[:, :, c:]
            cache = model.condition_cache(x[:, :, :c], *size)
            cached = model.forward_generated(x[:, :, c:], timestep, actions, cache, *size)
            outputs[name] = (full, cached)
            rows[f"cached vs full forward ({name}), relative error"] = relative_error(cached, full)
        rows["bf16 vs float32 full forward, relative error"] = relative_error(
            outputs["bfloat16"][0], outputs["float32"][0]
        )
        rows["bf16 vs float32 cached path, relative error"] = relative_error(
            outputs["bfloat16"][1], outputs["float32"][1]
        )
        rows["bf16 output finite"] = bool(torch.isfinite(outputs["bfloat16"][1]).all())

        model.to(torch.bfloat16)
        if args.compile:
            eager = outputs["bfloat16"][1]
            model.compile_blocks()
            x, timestep, actions, x_mask = check
            cache = model.condition_cache(x[:, :, :c], *size)
            compiled = model.forward_generated(x[:, :, c:], timestep, actions, cache, *size)
            rows["compiled vs eager cached path (bf16), relative error"] = relative_error(compiled, eager)
        x, timestep, actions, x_mask = inputs(args.batch)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rows[f"full forward, batch {args.batch}, s"] = timed(
            lambda: model(x, timestep, actions, x_mask, *size), device, args.repeats
        )
        cache = model.condition_cache(x[:, :, :c], *size)
        rows[f"condition cache, batch {args.batch}, s"] = timed(
            lambda: model.condition_cache(x[:, :, :c], *size), device, args.repeats
        )
        rows[f"cached forward, batch {args.batch}, s"] = timed(
            lambda: model.forward_generated(x[:, :, c:], timestep, actions, cache, *size), device, args.repeats
        )
        if device.startswith("cuda"):
            rows["peak GPU memory, GiB"] = torch.cuda.max_memory_allocated() / 2**30

    machine = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    print(f"STDiT3 {preset} on {machine}, {args.image_size}px ({latent}x{latent} latents), {frames} frames")
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    out = Path(args.out or f"benchmarks/results/stdit3_forward_{preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": preset, "machine": machine, "args": vars(args), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
