"""OpenVLA-OFT 7B in bf16 on a GPU: `act` (rollout) and `evaluate` with grad (update), time and memory.

Builds the full-size model (DINOv2-L + SigLIP-So400m + Llama-2-7B layout, random weights) directly on the device,
with LoRA and gradient checkpointing as in RL training, and a value head. The prompt tokenizer is the small
character-level one of `vla_policies.testing` (it has Llama-2's special ids; prompt lengths are a little longer
than with the real tokenizer, so timings are slightly pessimistic).

    python benchmarks/policy_act.py --batch 64 --micro-batch 8

Prints one table and writes JSON (default benchmarks/results/policy_act.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vla_policies import ImageProcessorConfig, OpenVLAOFTConfig, OpenVLAOFTModel, OpenVLAOFTPolicy
from vla_policies.testing import TINY_NORM_STATS, tiny_config, tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="observations per act() call (the env batch)")
    parser.add_argument("--micro-batch", type=int, default=8, help="observations per evaluate() + backward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny test architecture on the CPU (checks the script)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (the 7B model in bf16); --tiny runs a CPU check")
    device = "cpu" if args.tiny else "cuda"
    memory = torch.cuda.max_memory_allocated if device == "cuda" else lambda: 0

    config = (
        tiny_config(add_value_head=True)
        if args.tiny
        else OpenVLAOFTConfig(norm_stats=TINY_NORM_STATS, add_value_head=True)
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = OpenVLAOFTModel(config).to(torch.bfloat16)
    image_config = (
        ImageProcessorConfig(config.image_sizes, ((0.5,) * 3,) * 2, ((0.5,) * 3,) * 2, ("bicubic",) * 2)
        if args.tiny
        else ImageProcessorConfig.from_timm(config.timm_model_ids, config.image_sizes)
    )
    policy = OpenVLAOFTPolicy(model, tiny_tokenizer(), image_config)
    policy.enable_lora()
    policy.gradient_checkpointing_enable()
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())

    rng = np.random.default_rng(0)
    tasks = ("pick up the black bowl between the plate and the ramekin and place it on the plate",)
    obs = {
        "image": rng.integers(0, 256, size=(args.batch, 256, 256, 3), dtype=np.uint8),
        "task": tasks * args.batch,
    }
    generator = torch.Generator(device).manual_seed(0)

    def act():
        return policy.act(obs, generator=generator)

    def timed(fn):
        result = fn()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.repeats):
            result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result, (time.perf_counter() - start) / args.repeats, memory() / 2**30

    out, act_seconds, act_memory = timed(act)

    m = args.micro_batch
    micro = {"image": obs["image"][:m], "task": obs["task"][:m]}
    tokens = out.action_tokens[:m].to(device)

    def update():
        evaluation = policy.evaluate(micro, tokens)
        loss = -(evaluation.logprobs.mean() + evaluation.values.float().mean())
        loss.backward()
        return evaluation

    evaluation, update_seconds, update_memory = timed(update)
    logprob_gap = float((evaluation.logprobs.detach().float().cpu() - out.logprobs[:m].float().cpu()).abs().max())

    rows = {
        "parameters, B": total / 1e9,
        "trainable (LoRA + value head), M": trainable / 1e6,
        f"act, batch {args.batch}, s": act_seconds,
        "act peak memory, GiB": act_memory,
        f"evaluate + backward, micro-batch {m}, s": update_seconds,
        "evaluate + backward peak memory, GiB": update_memory,
        "max |logprob act - logprob evaluate| (bf16)": logprob_gap,
        "outputs finite": bool(torch.isfinite(evaluation.logprobs).all() and torch.isfinite(out.actions).all()),
    }
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"OpenVLA-OFT {'tiny' if args.tiny else '7B'} layout, bf16, LoRA rank {policy.lora_settings.rank}, on {machine}"
    )
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    path = Path(args.out or f"benchmarks/results/policy_act_{'tiny' if args.tiny else '7b'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, "args": vars(args), "results": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
