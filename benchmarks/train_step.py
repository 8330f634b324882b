"""Seconds per training iteration and its split (world-model rollout, policy forward, update), peak memory per rank.

Runs `runner.Trainer` steps of a config (one or several `torchrun` processes) and times, per step: the rollout
(`collect`), the policy's `act` calls inside it, the env steps inside it (the world model), and the update. The
first step is a warm-up and is not counted.

    python benchmarks/train_step.py --config tiny_cpu_grpo
    torchrun --nproc_per_node 2 benchmarks/train_step.py --config tiny_cpu_grpo actor.strategy=ddp
    torchrun --nproc_per_node 2 benchmarks/train_step.py --xl actor.strategy=fsdp

`--xl` (GPUs) builds STDiT3-XL/2 + the SDXL VAE with random weights (`benchmarks/env_step.py`) and a ~1B-parameter
policy in the OpenVLA-OFT layout (DINOv2-L + SigLIP-So400m, a Llama of hidden 2048 and 16 layers, random weights,
LoRA, bf16) on top of the preset `opensora_libero_spatial_grpo_openvlaoft`. Prints one table on rank 0 and
writes JSON (default benchmarks/results/train_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from trainers.config import load_config
from trainers.distributed import init_distributed
from trainers.runner import Trainer

XL_CONFIG = "opensora_libero_spatial_grpo_openvlaoft"
# A ~1B-parameter Llama in the Llama-2 vocabulary layout of OpenVLA-OFT.
LLAMA_1B = {
    "model_type": "llama",
    "vocab_size": 32064,
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 32000,
}


def write_xl_policy(folder: Path, seed: int = 0) -> Path:
    """A random-weight OpenVLA-OFT folder with full-size vision backbones and the ~1B Llama of `LLAMA_1B`."""
    from vla_policies import ImageProcessorConfig, OpenVLAOFTConfig, OpenVLAOFTPolicy
    from vla_policies.testing import TINY_NORM_STATS, random_checkpoint_weights, tiny_tokenizer

    # No value head in the file: PPO configs add a fresh one at load time, GRPO configs have none.
    config = OpenVLAOFTConfig(text_config=dict(LLAMA_1B), norm_stats=TINY_NORM_STATS)
    weights = random_checkpoint_weights(config, torch.Generator().manual_seed(seed))
    image_config = ImageProcessorConfig.from_timm(config.timm_model_ids, config.image_sizes)
    policy = OpenVLAOFTPolicy.from_config(config, tiny_tokenizer(), image_config, weights, dtype=torch.bfloat16)
    policy.save_pretrained(folder)
    return folder


class Timed:
    """Wraps a bound method of `owner` (an instance attribute shadows it) and sums the seconds spent in it."""

    def __init__(self, owner, name: str, device: torch.device):
        self.method = getattr(owner, name)
        self.device = device
        self.seconds = 0.0
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.method(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on the CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: tiny CPU GRPO, or the XL recipe)")
    parser.add_argument("--xl", action="store_true", help="STDiT3-XL/2 and a ~1B OpenVLA-OFT policy, random weights")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args()
    config_path = args.config or (XL_CONFIG if args.xl else "tiny_cpu_grpo")
    device_name = "cuda" if args.xl else load_config(config_path, args.overrides).runner.device
    context = init_distributed(device_name)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(context.broadcast_object(scratch))
        extra = [
            f"runner.log_path={workdir}",
            "runner.progress_bar=false",
            "runner.save_interval=-1",
            "runner.val_check_interval=-1",
            f"runner.max_steps={args.steps + 1}",
            "env.train.video_cfg.save_video=false",
        ]
        if args.xl:
            if context.is_main:
                from env_step import build_xl_checkpoint

                build_xl_checkpoint(workdir / "world_model", "cuda")
                write_xl_policy(workdir / "policy")
            context.barrier()
            extra += [
                "runner.device=cuda",
                f"env.train.checkpoint={workdir / 'world_model' / 'xl'}",
                f"actor.model.model_path={workdir / 'policy'}",
                "actor.model.precision=bf16",
            ]
        config = load_config(config_path, [*extra, *args.overrides])
        trainer = Trainer(config)
        device = trainer.policy.device
        act = Timed(trainer.policy, "act", device)
        env_step = Timed(trainer.env, "step", device)
        collect = Timed(trainer, "collect", device)
        update = Timed(trainer.updater, "update", device)
        trainer.step()
        for timer in (act, env_step, collect, update):
            timer.seconds = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.step()
        total = (time.perf_counter() - start) / args.steps
        trainer.logger.close()
        row = {
            "step_s": total,
            "rollout_s": collect.seconds / args.steps,
            "world_model_s": env_step.seconds / args.steps,
            "policy_act_s": act.seconds / args.steps,
            "update_s": update.seconds / args.steps,
            "peak_memory_gib": peak_memory_gib(device),
        }
        rows = context.all_gather_objects(row)
    if not context.is_main:
        return
    result = {
        "config": os.path.relpath(config_path),
        "overrides": args.overrides,
        "strategy": config.actor.strategy,
        "world_size": context.world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "total_num_envs": config.env.train.total_num_envs,
        "policy_parameters": sum(p.numel() for p in trainer.policy.parameters()),
        "steps": args.steps,
        "ranks": rows,
    }
    header = (
        f"{'rank':>4} {'step s':>8} {'rollout s':>9} {'world model s':>13} {'act s':>7} {'update s':>8} {'peak GiB':>8}"
    )
    lines = [
        f"train_step: {result['config']} strategy={result['strategy']} ranks={context.world_size} "
        f"envs={result['total_num_envs']} device={result['device']} policy={result['policy_parameters'] / 1e6:.1f}M",
        header,
    ]
    for rank, r in enumerate(rows):
        lines.append(
            f"{rank:>4} {r['step_s']:>8.3f} {r['rollout_s']:>9.3f} {r['world_model_s']:>13.3f} "
            f"{r['policy_act_s']:>7.3f} {r['update_s']:>8.3f} {r['peak_memory_gib']:>8.2f}"
        )
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
