"""Micro-benchmark of exact mode's two fused kernels against the compiled torch code they replace.

1. The causal temporal attention of the generated frames (QK-norm, rotary embedding, attention over the cached
   condition frames and themselves): `Attention`'s compiled matmul path against the fused Triton kernel
   (`opensora_gym.models.temporal_attention`) at each launch configuration of `--block-n` x `--num-warps`.
2. An MLP's fc1 and tanh GELU: the compiled linear + GELU pair against `linear_gelu_tanh` (one matmul with a GELU
   epilogue on a CUDA GPU).

Shapes default to the released model at the recipe's 64 envs and 256 px (16,384 patches x 16 heads x 72 channels,
4 cached + 8 generated frames; 131,072 tokens x 1152 -> 4608 for the MLP). Each row gives the median time of
`--repeats` calls after warm-up and the largest difference from the same computation in float32 (each kernel's
rounding error); a float32 check says whether the fused GELU is the tanh form. Prints a table and writes JSON with
the device named (default `benchmarks/results/fused_kernels.json`).

    python benchmarks/fused_kernels.py                      # a CUDA GPU, the released shapes
    python benchmarks/fused_kernels.py --device cpu --patches 64 --tokens 256 --compile-backend eager
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from opensora_gym.models.stdit3 import (
    RMSNorm,
    RotaryEmbedding,
    linear_gelu_tanh,
    normalize_and_rotate,
    short_causal_attention,
)

try:
    from opensora_gym.models.temporal_attention import kernel_available, launch
except ImportError:  # no Triton: the kernel rows are left out
    kernel_available = launch = None

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_attention(qkv, past_k, past_v, q_norm, k_norm, rope, num_heads):
    """What `Attention.forward` computes from `qkv` with the `"matmul"` kernel, [N, L, C] out."""
    q, k, v = rearrange(qkv, "n l (three h d) -> three n h l d", three=3, h=num_heads)
    tables = rope.tables(q.shape[-2], past_k.shape[-2], qkv.device)
    q, k = normalize_and_rotate(q, q_norm, tables), normalize_and_rotate(k, k_norm, tables)
    out = short_causal_attention(q, torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2))
    return rearrange(out, "n h l d -> n l (h d)")


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def attention_rows(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    generator = torch.Generator().manual_seed(args.seed)
    heads, head_dim = args.heads, args.head_dim
    hidden = heads * head_dim
    q_norm, k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
    for norm in (q_norm, k_norm):
        norm.weight.data = 1 + 0.1 * torch.randn(head_dim, generator=generator)
    q_norm, k_norm = q_norm.to(device), k_norm.to(device)
    rope = RotaryEmbedding(head_dim).to(device)
    qkv = torch.randn(args.patches, args.frames, 3 * hidden, generator=generator).to(device, dtype)
    past = torch.randn(2, args.patches, heads, args.past, head_dim, generator=generator).to(device, dtype)
    past_k, past_v = past[0], past[1]
    with torch.no_grad():
        exact = matmul_attention(qkv.float(), past_k.float(), past_v.float(), q_norm, k_norm, rope, heads)
        compiled = torch.compile(matmul_attention, backend=args.compile_backend, dynamic=False)
        inputs = (qkv, past_k, past_v, q_norm, k_norm, rope, heads)
        rows = [
            {
                "kernel": "compiled matmul path (exact mode's default)",
                "s": timed(lambda: compiled(*inputs), args.repeats, device),
                "max_difference_from_float32": max_difference(compiled(*inputs), exact),
            }
        ]
        if launch is None or not kernel_available(device):
            return rows
        weights = (q_norm.weight, k_norm.weight, *rope.pair_tables(args.frames, args.past, device), heads, q_norm.eps)
        for block_n in args.block_n:
            for num_warps in args.num_warps:
                fused = (qkv, past_k, past_v, *weights, block_n, num_warps)
                rows.append(
                    {
                        "kernel": f"fused Triton kernel, block_n {block_n}, {num_warps} warps",
                        "block_n": block_n,
                        "num_warps": num_warps,
                        "s": timed(lambda call=fused: launch(*call), args.repeats, device),
                        "max_difference_from_float32": max_difference(launch(*fused), exact),
                    }
                )
    return rows


def gelu_rows(args, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], dict]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    width = args.heads * args.head_dim
    x = torch.randn(args.tokens, width, generator=generator).to(device, dtype)
    weight = (torch.randn(4 * width, width, generator=generator) * width**-0.5).to(device, dtype)
    bias = (0.1 * torch.randn(4 * width, generator=generator)).to(device, dtype)

    def unfused(x, weight, bias):
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    with torch.no_grad():
        exact = unfused(x.float(), weight.float(), bias.float())
        compiled = torch.compile(unfused, backend=args.compile_backend, dynamic=False)
        rows = [
            {
                "kernel": name,
                "s": timed(lambda fn=fn: fn(x, weight, bias), args.repeats, device),
                "max_difference_from_float32": max_difference(fn(x, weight, bias), exact),
            }
            for name, fn in (("compiled fc1 + GELU", compiled), ("linear_gelu_tanh (GELU epilogue)", linear_gelu_tanh))
        ]
        # In float32 the tanh and erf forms differ by up to about 5e-4: which one is the epilogue's?
        small = (x[:256].float(), weight.float(), bias.float())
        fused32 = linear_gelu_tanh(*small)
        linear32 = F.linear(*small)
        form = {
            "max_difference_from_tanh_gelu": max_difference(fused32, F.gelu(linear32, approximate="tanh")),
            "max_difference_from_erf_gelu": max_difference(fused32, F.gelu(linear32)),
        }
    return rows, form


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--patches", type=int, default=64 * 256, help="batch x patches per frame")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--past", type=int, default=4, help="cached condition frames")
    parser.add_argument("--frames", type=int, default=8, help="generated frames")
    parser.add_argument("--tokens", type=int, default=64 * 8 * 256, help="tokens through the MLP's fc1")
    parser.add_argument("--block-n", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fused_kernels.json")
    args = parser.parse_args(argv)
    for name in ("patches", "heads", "head_dim", "past", "frames", "tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.head_dim % 2:
        parser.error(f"--head-dim must be even (rotary pairs), got {args.head_dim}")
    bad = [b for b in args.block_n if b < 1 or b & (b - 1)]
    if bad:
        parser.error(f"--block-n must be powers of 2, got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    attention = attention_rows(args, device, dtype)
    gelu, gelu_form = gelu_rows(args, device, dtype)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(f"{machine['device']}, torch {machine['torch']}, {args.dtype}")
    for title, rows in (("temporal attention", attention), ("fc1 + GELU", gelu)):
        print(f"\n{title}: ms per call | max |difference| from float32")
        for row in rows:
            print(f"  {row['kernel']:<48} {1e3 * row['s']:9.3f} | {row['max_difference_from_float32']:.3g}")
    print(f"\nGELU epilogue in float32: {gelu_form}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(
        json.dumps(
            {"config": config, "machine": machine, "attention": attention, "gelu": gelu, "gelu_form": gelu_form},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
