"""Behaviour cloning of the small policy on recorded episodes: the base policy that RL then improves.

`opensora-gym train-policy --dataset data/dataset --out runs/bc`: every frame ``k`` of the chosen episodes (by
default the successful ones) that a recorded frame follows is one example: the observation is frame ``k`` with the
episode's task, the target is the chunk of actions ``k .. k + chunk - 1`` (the last executed action repeated past
the end), read from the frames' ``action_key`` (``delta_action``: the executed actions; ``expert_action``: the
scripted expert's actions before their noise), taken from the recorded controller convention (gripper -1 open, +1
close) to the policy's robot units (gripper 1 open, 0 close; `opensora_gym.spaces.policy_actions`), normalized with
the BOUNDS_Q99 rule and cut into the policy's bins. The loss is the cross-entropy of every action token; images are
randomly shifted by a few pixels (replicate padding, then a random crop), the usual augmentation of image-based
behaviour cloning. Whole episodes are held out to report the token accuracy and the mean absolute action error on
unseen episodes. The policy is written with `save_pretrained` to ``out/policy`` (atomically), the report to
``out/bc_report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from opensora_gym.data import ActionStatistics, TrajectoryDataset
from opensora_gym.spaces import policy_actions
from vla_policies.small import SmallCNNPolicy, SmallPolicyConfig

POLICY_FOLDER = "policy"
REPORT_NAME = "bc_report.json"


@dataclass
class BehaviorCloningConfig:
    """A behaviour-cloning run.

    Attributes:
        datasets: folders of ``traj*.npy`` episodes.
        out: where ``policy/`` and ``bc_report.json`` are written.
        successful_only: keep only episodes whose frames carry a true ``success`` flag somewhere.
        action_key: the per-frame key of the targets (``delta_action`` or ``expert_action``).
        image_size: the policy's image side.
        channels: the policy's convolution widths.
        hidden_size: the policy's trunk width.
        pooling: the policy's pooling of image features ("mean" or "spatial_softmax").
        shift: the random-shift augmentation, in pixels at ``image_size`` (0: none).
        held_out_fraction: episodes held out for the report (0: none).
        max_steps, batch_size, lr, weight_decay: the AdamW optimisation.
        seed: initial weights, split and batches.
        device: torch device.
        log_every: steps between printed losses.
    """

    datasets: list[Path]
    out: Path
    successful_only: bool = True
    action_key: str = "delta_action"
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    hidden_size: int = 256
    pooling: str = "spatial_softmax"
    shift: int = 4
    held_out_fraction: float = 0.1
    max_steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    log_every: int = 200

    def __post_init__(self) -> None:
        self.datasets = [Path(d) for d in self.datasets]
        self.out = Path(self.out)
        self.channels = tuple(int(c) for c in self.channels)
        if not self.datasets:
            raise ValueError("BehaviorCloningConfig.datasets must name at least one folder, got none")
        for name in ("image_size", "hidden_size", "max_steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"BehaviorCloningConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.shift < 0:
            raise ValueError(f"BehaviorCloningConfig.shift must be >= 0, got {self.shift}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"BehaviorCloningConfig.held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if not self.lr > 0:
            raise ValueError(f"BehaviorCloningConfig.lr must be > 0, got {self.lr}")


@dataclass
class BehaviorCloningReport:
    """What a run learned.

    Attributes:
        episodes: training episodes; held_out_episodes: episodes of the report.
        frames: training examples.
        final_loss: the mean token cross-entropy of the last `log_every` steps.
        held_out_token_accuracy: fraction of held-out action tokens predicted exactly (greedy); NaN without any.
        held_out_action_mae: mean absolute error of the greedy actions in robot units (gripper 1 open, 0 close), per
            dimension.
        losses: the mean loss of every `log_every` steps.
    """

    episodes: int
    held_out_episodes: int
    frames: int
    final_loss: float
    held_out_token_accuracy: float
    held_out_action_mae: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass
class _Examples:
    images: torch.Tensor  # [N, S, S, 3] uint8 at the policy's size
    chunks: torch.Tensor  # [N, chunk, A] float32, robot units
    tasks: list[str]  # [N]


def chunk_targets(actions: np.ndarray, chunk: int) -> np.ndarray:
    """[T, A] actions -> [T, chunk, A]: row k holds actions k .. k + chunk - 1, the last one repeated past the end."""
    index = np.minimum(np.arange(len(actions))[:, None] + np.arange(chunk)[None, :], len(actions) - 1)
    return actions[index]


def resize_images(images: np.ndarray, size: int) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [T, size, size, 3] uint8 (antialiased bilinear, as the policy resizes)."""
    pixels = rearrange(torch.from_numpy(images), "t h w c -> t c h w").float()
    if pixels.shape[-1] != size or pixels.shape[-2] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return rearrange(pixels.round().clamp(0, 255).to(torch.uint8), "t c h w -> t h w c")


def _load(datasets: list[TrajectoryDataset], successful_only: bool, size: int, chunk: int) -> list[_Examples]:
    episodes = []
    for dataset in datasets:
        for index in range(len(dataset)):
            episode = dataset.episode(index)
            if successful_only and (episode.success is None or not episode.success.any()):
                continue
            # An action counts when a recorded frame follows it (a recorded episode's final frame holds zeros).
            executed = policy_actions(episode.actions[:-1])
            if len(executed) == 0:
                continue
            episodes.append(
                _Examples(
                    images=resize_images(episode.images[:-1], size),
                    chunks=torch.from_numpy(chunk_targets(executed, chunk)).float(),
                    tasks=[episode.task] * len(executed),
                )
            )
    return episodes


def _concat(episodes: list[_Examples]) -> _Examples:
    return _Examples(
        images=torch.cat([e.images for e in episodes]),
        chunks=torch.cat([e.chunks for e in episodes]),
        tasks=[t for e in episodes for t in e.tasks],
    )


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """[N, S, S, 3] uint8, each moved by up to `shift` pixels in x and y (edges replicated)."""
    if shift == 0:
        return images
    size = images.shape[1]
    padded = F.pad(rearrange(images, "n h w c -> n c h w").float(), (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (len(images), 2), generator=generator).tolist()
    crops = [padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets)]
    return rearrange(torch.stack(crops), "n c h w -> n h w c").to(torch.uint8)


def _targets(policy: SmallCNNPolicy, chunks: torch.Tensor) -> torch.Tensor:
    """[N, chunk, A] robot units -> [N, chunk * A] bin indices (the policy's token ids)."""
    stats = policy.config.action_stats
    low, high = torch.tensor(stats["q01"]), torch.tensor(stats["q99"])
    normalized = (2.0 * (chunks - low) / (high - low + 1e-8) - 1.0).clamp(-1.0, 1.0)
    return policy.action_tokenizer.encode(normalized).flatten(1) - policy.token_range[0]


def _statistics(train: _Examples) -> dict[str, list[float]]:
    """BOUNDS_Q99 statistics of the training actions; dimensions the data never varies get [-1, 1]."""
    stats = ActionStatistics.from_actions(train.chunks[:, 0].numpy().astype(np.float64), flat_range=(-1.0, 1.0))
    return {"q01": stats.q01.tolist(), "q99": stats.q99.tolist(), "mask": [True] * stats.action_dim}


@torch.no_grad()
def _evaluate(policy: SmallCNNPolicy, examples: _Examples) -> tuple[float, list[float]]:
    """Greedy token accuracy and per-dimension mean absolute action error over `examples`."""
    policy.eval()
    correct, errors = 0.0, []
    for start in range(0, len(examples.tasks), 256):
        part = slice(start, start + 256)
        observation = {"image": examples.images[part], "task": examples.tasks[part]}
        logits, _ = policy.action_logits(observation)
        tokens = logits.argmax(dim=-1)
        correct += float((tokens.cpu() == _targets(policy, examples.chunks[part])).float().sum())
        actions = policy.tokens_to_actions(tokens + policy.token_range[0])
        errors.append((actions - examples.chunks[part]).abs().flatten(0, 1))
    policy.train()
    return correct / (len(examples.tasks) * policy.num_action_tokens), torch.cat(errors).mean(0).tolist()


def train_behavior_cloning(config: BehaviorCloningConfig) -> tuple[BehaviorCloningReport, Path]:
    """Trains the small policy; writes ``out/policy`` and ``out/bc_report.json``.

    Returns:
        the report and the policy folder.
    """
    generator = torch.Generator().manual_seed(config.seed)
    chunk = SmallPolicyConfig().action_chunk
    episodes = _load(
        [TrajectoryDataset(d, action_key=config.action_key) for d in config.datasets],
        config.successful_only,
        config.image_size,
        chunk,
    )
    if len(episodes) < 1 + (config.held_out_fraction > 0):
        which = "successful " if config.successful_only else ""
        raise ValueError(
            f"behaviour cloning needs at least {1 + (config.held_out_fraction > 0)} {which}episodes, "
            f"got {len(episodes)} in {[str(d) for d in config.datasets]}"
        )
    order = torch.randperm(len(episodes), generator=generator).tolist()
    held_count = min(math.ceil(config.held_out_fraction * len(episodes)), len(episodes) - 1)
    held_out = [episodes[i] for i in order[:held_count]]
    train = _concat([episodes[i] for i in order[held_count:]])

    policy_config = SmallPolicyConfig(
        image_size=config.image_size,
        channels=config.channels,
        hidden_size=config.hidden_size,
        pooling=config.pooling,
        action_dim=train.chunks.shape[-1],
        add_value_head=False,  # PPO's critic starts where the RL config builds it; GRPO needs none
        action_stats=_statistics(train),
    )
    policy = SmallCNNPolicy(policy_config, generator=torch.Generator().manual_seed(config.seed)).to(config.device)
    targets = _targets(policy, train.chunks)  # [N, chunk * A]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_steps)
    policy.train()
    losses, running = [], []
    for step in range(1, config.max_steps + 1):
        batch = torch.randint(0, len(train.tasks), (config.batch_size,), generator=generator)
        observation = {
            "image": random_shift(train.images[batch], config.shift, generator),
            "task": [train.tasks[i] for i in batch.tolist()],
        }
        logits, _ = policy.action_logits(observation)  # [B, chunk * A, n_bins]
        loss = F.cross_entropy(logits.flatten(0, 1), targets[batch].flatten().to(logits.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite behaviour-cloning loss {float(loss)} at step {step}; stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % config.log_every == 0 or step == config.max_steps:
            losses.append(float(np.mean(running)))
            running = []
            print(f"bc step {step}: loss {losses[-1]:.4f}")

    accuracy, mae = _evaluate(policy, _concat(held_out)) if held_out else (math.nan, [])
    report = BehaviorCloningReport(
        episodes=len(episodes) - held_count,
        held_out_episodes=held_count,
        frames=len(train.tasks),
        final_loss=losses[-1],
        held_out_token_accuracy=accuracy,
        held_out_action_mae=mae,
        losses=losses,
    )
    for name, tensor in policy.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"policy parameter {name} has non-finite values; not saving")
    config.out.mkdir(parents=True, exist_ok=True)
    tmp, final = config.out / (POLICY_FOLDER + ".tmp"), config.out / POLICY_FOLDER
    shutil.rmtree(tmp, ignore_errors=True)
    policy.cpu().save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (config.out / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report, final


def add_command(commands: argparse._SubParsersAction) -> None:
    """Adds `train-policy` to the `opensora-gym` subcommands."""
    parser = commands.add_parser("train-policy", help="behaviour cloning of the small policy on recorded episodes")
    parser.add_argument("--dataset", nargs="+", required=True, help="folders of traj*.npy episodes")
    parser.add_argument("--out", required=True, help="output folder (policy/, bc_report.json)")
    parser.add_argument("--all-episodes", action="store_true", help="also clone the unsuccessful episodes")
    parser.add_argument(
        "--action-key", default="delta_action", help="per-frame targets: delta_action (executed) or expert_action"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--pooling", choices=("mean", "spatial_softmax"), default="spatial_softmax")
    parser.add_argument("--shift", type=int, default=4, help="random-shift augmentation in pixels (0: none)")
    parser.add_argument("--held-out-fraction", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-every", type=int, default=200)


def run(args: argparse.Namespace) -> None:
    """Runs `train-policy`."""
    report, folder = train_behavior_cloning(
        BehaviorCloningConfig(
            datasets=args.dataset,
            out=args.out,
            successful_only=not args.all_episodes,
            action_key=args.action_key,
            image_size=args.image_size,
            channels=tuple(args.channels),
            hidden_size=args.hidden_size,
            pooling=args.pooling,
            shift=args.shift,
            held_out_fraction=args.held_out_fraction,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            log_every=args.log_every,
        )
    )
    print(
        f"{report.episodes} episodes ({report.frames} frames), final loss {report.final_loss:.4f}; held-out "
        f"{report.held_out_episodes} episodes: token accuracy {report.held_out_token_accuracy:.3f}; policy: {folder}"
    )
