"""`opensora-gym train-vae | train-world-model | train-reward-model`: make a world model of your own.

opensora-gym train-vae --dataset dataset --out runs/vae --image-size 64
opensora-gym train-reward-model --dataset dataset --out runs/reward --image-size 64
opensora-gym train-world-model --dataset dataset --vae runs/vae/vae --reward-model runs/reward --out runs/wm \
    --image-size 64 --preset small
opensora-gym train-world-model --init-checkpoint RLinf-OpenSora-LIBERO-Spatial --dataset dataset --out runs/ft
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from opensora_gym.models.stdit3 import CONDITION_TIMESTEP, STDiT3Config
from opensora_gym.training.reward_model import RewardTrainingConfig, train_reward_model
from opensora_gym.training.vae import VAETrainingConfig, train_vae
from opensora_gym.training.world_model import WorldModelTrainingConfig, train_world_model

COMMANDS = ("train-vae", "train-world-model", "train-reward-model")
# Architectures by name; any other size: --depth, --hidden-size, --num-heads.
PRESETS = {
    "xl_2": STDiT3Config.xl_2(),
    "small": STDiT3Config(depth=6, hidden_size=384, num_heads=6),
    "tiny": STDiT3Config(depth=4, hidden_size=256, num_heads=4),
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Adds the three training commands to the `opensora-gym` subcommands."""
    vae = commands.add_parser("train-vae", help="train a small frame VAE (diffusers AutoencoderKL) on the frames")
    _common(vae, steps=2000, batch_size=32, lr=1e-4, image_size=64)
    vae.add_argument("--block-out-channels", type=int, nargs="+", default=[64, 128, 256, 256])
    vae.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term")

    world_model = commands.add_parser("train-world-model", help="train the STDiT3 world model (rectified flow)")
    _common(world_model, steps=10000, batch_size=8, lr=1e-4, image_size=256)
    source = world_model.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="small", help="STDiT3 size from scratch")
    source.add_argument("--init-checkpoint", help="fine-tune this folder in the released layout")
    for name in ("depth", "hidden-size", "num-heads"):
        world_model.add_argument(f"--{name}", type=int, help="override the preset's value")
    world_model.add_argument(
        "--patch-size",
        type=int,
        help="side of a token's square of latent pixels (default 2, as released; 1 gives 4x the tokens)",
    )
    world_model.add_argument("--vae", help="diffusers AutoencoderKL folder (default: <init-checkpoint>/vae)")
    world_model.add_argument("--statistics", help="dataset_statistics.json (default: computed from the dataset)")
    world_model.add_argument("--reward-model", help="resnet_rm.pth (or its folder) to put in the exported folder")
    world_model.add_argument("--warmup-steps", type=int, default=1000)
    world_model.add_argument("--grad-clip", type=float, default=1.0)
    world_model.add_argument("--ema-decay", type=float, default=0.9999)
    world_model.add_argument("--mixed-precision", choices=("bf16", "no"), default="bf16")
    world_model.add_argument("--gradient-checkpointing", action="store_true")
    world_model.add_argument(
        "--condition-timestep-max",
        type=float,
        default=CONDITION_TIMESTEP,
        help="condition-noise augmentation: noise each clip's condition frames to a level drawn in [15, this] "
        "(0..1000) and tell the model (default 15: the reference, no augmentation)",
    )
    world_model.add_argument(
        "--action-dropout",
        type=float,
        default=0.0,
        help="probability that a clip is trained without its actions, for sampling with action_guidance "
        "(default 0: the reference)",
    )
    world_model.add_argument(
        "--own-condition",
        type=float,
        default=0.0,
        help="probability that a clip's condition frames are the model's own sample of them from one chunk earlier, "
        "against compounding errors in rollouts (default 0: the reference)",
    )
    world_model.add_argument(
        "--own-condition-guidance",
        type=float,
        default=1.0,
        help="action guidance of those samples (the one the world model is rolled out with; default 1)",
    )
    world_model.add_argument("--preview-every", type=int, default=500, help="steps between preview grids (0: none)")
    world_model.add_argument("--checkpoint-every", type=int, default=500)
    world_model.add_argument("--no-resume", action="store_true", help="start over even if out/ has checkpoints")

    reward = commands.add_parser("train-reward-model", help="train the ResNet success classifier on per-frame flags")
    _common(reward, steps=1000, batch_size=64, lr=1e-3, image_size=256)
    reward.add_argument("--widths", type=int, nargs=4, default=[64, 128, 256, 512], help="ResNet stage widths")
    reward.add_argument(
        "--success-window", type=int, default=1, help="also label the N - 1 frames before a success frame a success"
    )
    reward.add_argument("--held-out-fraction", type=float, default=0.2, help="episodes held out for the report")


def _common(parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float, image_size: int) -> None:
    parser.add_argument("--dataset", required=True, help="folder of traj*.npy episodes")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=image_size, help="frame side the model works at")
    parser.add_argument("--max-steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--log-every", type=int, default=100)


def run(args: argparse.Namespace) -> None:
    """Runs the command `args.command` (one of `COMMANDS`)."""
    common = {
        "dataset": args.dataset,
        "out": args.out,
        "image_size": args.image_size,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": args.device,
        "log_every": args.log_every,
    }
    if args.command == "train-vae":
        result = train_vae(
            VAETrainingConfig(**common, block_out_channels=args.block_out_channels, kl_weight=args.kl_weight)
        )
        print(f"final loss {result.losses[-1]:.4f}; latent scale factor {result.scale:.3f}; VAE: {result.folder}")
    elif args.command == "train-reward-model":
        report, path = train_reward_model(
            RewardTrainingConfig(
                **common,
                widths=args.widths,
                held_out_fraction=args.held_out_fraction,
                success_window=args.success_window,
            )
        )
        print(report.table())
        print(f"reward model: {path}")
    else:
        patch = None if args.patch_size is None else (1, args.patch_size, args.patch_size)
        overrides = {"depth": args.depth, "hidden_size": args.hidden_size, "num_heads": args.num_heads}
        overrides = {k: v for k, v in {**overrides, "patch_size": patch}.items() if v is not None}
        if args.init_checkpoint is not None and overrides:
            raise ValueError(
                "--init-checkpoint keeps that checkpoint's architecture: expected no size options, got "
                f"{sorted(overrides)}"
            )
        dit = None if args.init_checkpoint is not None else dataclasses.replace(PRESETS[args.preset], **overrides)
        config = WorldModelTrainingConfig(
            **common,
            dit=dit,
            init_checkpoint=args.init_checkpoint,
            vae=args.vae,
            statistics=args.statistics,
            reward_model=args.reward_model,
            warmup_steps=args.warmup_steps,
            grad_clip=args.grad_clip,
            ema_decay=args.ema_decay,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            condition_timestep_max=args.condition_timestep_max,
            action_dropout=args.action_dropout,
            own_condition=args.own_condition,
            own_condition_guidance=args.own_condition_guidance,
            preview_every=args.preview_every,
            checkpoint_every=args.checkpoint_every,
            resume=not args.no_resume,
        )
        result = train_world_model(config)
        summary = {
            "step": result.step,
            "last_checkpoint": str(result.last_checkpoint),
            "world_model": str(result.checkpoint),
        }
        print(json.dumps(summary, indent=2))
