"""Training the STDiT3 world model on recorded trajectories, and writing the result in the released layout.

    config = WorldModelTrainingConfig(dataset="dataset", vae="runs/vae", out="runs/wm",
                                      dit=STDiT3Config(depth=6, hidden_size=384, num_heads=6), image_size=64)
    result = train_world_model(config)   # result.checkpoint loads in OpenSoraLiberoEnv(checkpoint=..., image_size=64)

One step (the reference's `train_web.py`): a batch of clips (4 condition + 8 generated latent frames, a fresh VAE
posterior sample each) -> `rectified_flow_loss` under bf16 autocast -> backward -> gradient clipping -> AdamW with a
linear warm-up -> EMA update of a float32 copy. Every random draw comes from one `torch.Generator` owned by the run,
whose state is saved in each checkpoint, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from opensora_gym.checkpoint import (
    CONFIG_NAME,
    DATASET_FOLDER,
    STATISTICS_NAME,
    VAE_FOLDER,
    CheckpointLayout,
)
from opensora_gym.data import ActionStatistics, TrajectoryDataset
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.models.stdit3 import CONDITION_TIMESTEP, STDiT3, STDiT3Config
from opensora_gym.models.vae import CONFIG_NAME as VAE_CONFIG_NAME
from opensora_gym.models.vae import WEIGHTS_NAME as VAE_WEIGHTS_NAME
from opensora_gym.models.vae import VideoVAE
from opensora_gym.rectified_flow import RectifiedFlowConfig, RectifiedFlowSampler
from opensora_gym.spaces import CONTROLLER_RANGE
from opensora_gym.training.clips import LatentClips, encode_latents
from opensora_gym.training.rectified_flow import rectified_flow_loss, sample_timesteps

LATENT_CACHE_NAME = "latents.safetensors"
CHECKPOINTS_FOLDER = "checkpoints"
EXPORT_FOLDER = "world_model"
TIMESTEP_BUCKETS = 4  # loss/t_bucket_k covers t in [k, k + 1) * 1000 / TIMESTEP_BUCKETS
_MIXED_PRECISION = ("bf16", "no")


@dataclass
class WorldModelTrainingConfig:
    """Everything a world-model training run reads.

    Attributes:
        dataset: folder of `traj*.npy` episodes (the `opensora_gym.data` layout).
        out: the run folder: latent cache, `checkpoints/`, `tensorboard/` and the exported `world_model/`.
        dit: the architecture to train from scratch; exclusive with `init_checkpoint`.
        init_checkpoint: a folder in the released layout to fine-tune (its STDiT3; by default also its VAE,
            action statistics and, if it has one, reward model).
        vae: a diffusers AutoencoderKL folder (`<checkpoint>/vae` or the output of `train-vae`).
        statistics: `dataset_statistics.json` to normalize actions with; default: the init checkpoint's, else the
            one beside the dataset folder (as `collect` and `convert` write it), else q01/q99 of its actions.
        reward_model: `resnet_rm.pth` (or a folder with it) to put in the exported folder, loaded once before the
            training so that a wrong file fails at once; default: the init checkpoint's, else none (the export
            then lacks `resnet_rm.pth`).
        image_size: side of the square frames the model works at (frames are resized to it).
        action_key: the per-frame key of the action in the episodes.
        generated_frames: A, latent frames predicted per clip (one per action).
        batch_size: clips per step.
        max_steps: optimizer steps of the whole run (a resumed run continues up to it).
        lr: AdamW learning rate after warm-up (the reference's default 1e-4).
        weight_decay, adam_eps: AdamW settings (the reference's defaults 0 and 1e-8).
        warmup_steps: linear warm-up, `lr * (step + 1) / (warmup_steps + 1)` (the reference's `LinearWarmupLR`).
        grad_clip: largest global gradient norm; 0 disables clipping.
        ema_decay: `ema <- decay * ema + (1 - decay) * weights` after every step.
        mixed_precision: `bf16` (autocast, float32 master weights) or `no`.
        gradient_checkpointing: recompute each block in the backward pass (saves activation memory).
        timestep_loc, timestep_scale: the normal before the sigmoid of the logit-normal timesteps.
        use_timestep_transform: apply the sampler's resolution transform to the drawn timesteps.
        condition_timestep_max: condition-noise augmentation (not in the reference): each clip's condition frames
            are noised to a level drawn uniformly in [15, condition_timestep_max] (0..1000 scale) and the model is
            given that level as their timestep, so that it learns to continue from frames as imperfect as its
            own; the world model then samples with `condition_timestep` above 15 (`OpenSoraLiberoEnv`). The
            default 15 is the reference's fixed level (no augmentation, no extra random draw).
        action_dropout: action dropout (not in the reference): the probability that a clip's generated frames get
            the "no action" embedding instead of their actions', so that the model also predicts chunks without
            them and can be sampled with guidance by the actions (`RectifiedFlowConfig.action_guidance`). The
            default 0 is the reference's training (no extra random draw).
        own_condition: training on the model's own frames (not in the reference; against the compounding of chunk
            errors over a rollout): the probability that a clip's condition frames are replaced by the EMA model's
            sample of them, generated from the recorded frames one chunk earlier under that chunk's actions, as a
            rollout generates every condition after its first chunk. The target stays the recorded continuation, so
            the model learns to continue from its own imperfect frames back towards what the actions did. Clips
            less than one chunk into their episode keep their recorded frames. Each such clip costs a 10-step
            sample (two forwards a step with `own_condition_guidance` other than 1) without gradients. The default
            0 is the reference's training (no extra random draw).
        own_condition_guidance: `RectifiedFlowConfig.action_guidance` of those samples (use the one the world
            model will be rolled out with).
        seed: the run's generator (data order, timesteps, noise, posterior samples) and the initial weights.
        device: torch device of the training.
        log_every: steps between TensorBoard scalars.
        preview_every: steps between TensorBoard frame grids of predicted vs real continuations; 0 disables them.
        preview_clips: clips in each preview.
        preview_sampling_steps: sampler steps of the previews.
        checkpoint_every: steps between resumable checkpoints (one is always written at the end).
        keep_checkpoints: how many of the latest checkpoints to keep.
        resume: continue from the latest checkpoint in `out/checkpoints` when there is one.
    """

    dataset: Path
    out: Path
    dit: STDiT3Config | None = None
    init_checkpoint: Path | None = None
    vae: Path | None = None
    statistics: Path | None = None
    reward_model: Path | None = None
    image_size: int = 256
    action_key: str = "delta_action"
    generated_frames: int = 8
    batch_size: int = 8
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    timestep_loc: float = 0.0
    timestep_scale: float = 1.0
    use_timestep_transform: bool = True
    condition_timestep_max: float = CONDITION_TIMESTEP
    action_dropout: float = 0.0
    own_condition: float = 0.0
    own_condition_guidance: float = 1.0
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    preview_every: int = 500
    preview_clips: int = 2
    preview_sampling_steps: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True

    def __post_init__(self) -> None:
        for name in ("dataset", "out", "init_checkpoint", "vae", "statistics", "reward_model"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if (self.dit is None) == (self.init_checkpoint is None):
            raise ValueError(
                "give exactly one of dit (an STDiT3Config, to train from scratch) and init_checkpoint (a folder in "
                f"the released layout, to fine-tune), got dit={self.dit} and init_checkpoint={self.init_checkpoint}"
            )
        if self.vae is None and self.init_checkpoint is None:
            raise ValueError("vae is required when training from scratch (a diffusers AutoencoderKL folder)")
        for name in (
            "image_size",
            "generated_frames",
            "batch_size",
            "max_steps",
            "log_every",
            "preview_clips",
            "preview_sampling_steps",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"WorldModelTrainingConfig.{name} must be a positive integer, got {getattr(self, name)}"
                )
        for name in ("warmup_steps", "preview_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldModelTrainingConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.adam_eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                "WorldModelTrainingConfig.lr and adam_eps must be > 0, weight_decay and grad_clip >= 0, got "
                f"lr={self.lr}, adam_eps={self.adam_eps}, weight_decay={self.weight_decay}, grad_clip={self.grad_clip}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"WorldModelTrainingConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not CONDITION_TIMESTEP <= self.condition_timestep_max <= 1000:
            raise ValueError(
                f"WorldModelTrainingConfig.condition_timestep_max must be in [{CONDITION_TIMESTEP}, 1000], "
                f"got {self.condition_timestep_max}"
            )
        if not 0.0 <= self.action_dropout < 1.0:
            raise ValueError(f"WorldModelTrainingConfig.action_dropout must be in [0, 1), got {self.action_dropout}")
        if not 0.0 <= self.own_condition <= 1.0:
            raise ValueError(f"WorldModelTrainingConfig.own_condition must be in [0, 1], got {self.own_condition}")
        if not math.isfinite(self.own_condition_guidance) or self.own_condition_guidance < 0:
            raise ValueError(
                "WorldModelTrainingConfig.own_condition_guidance must be a finite number >= 0, "
                f"got {self.own_condition_guidance}"
            )
        if self.timestep_scale <= 0:
            raise ValueError(f"WorldModelTrainingConfig.timestep_scale must be > 0, got {self.timestep_scale}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(
                f"WorldModelTrainingConfig.mixed_precision must be one of {_MIXED_PRECISION}, "
                f"got {self.mixed_precision!r}"
            )

    @property
    def vae_folder(self) -> Path:
        return self.vae if self.vae is not None else CheckpointLayout(self.init_checkpoint).vae


@dataclass
class TrainingResult:
    """What a run produced.

    Attributes:
        losses: the training loss of every step run by this call (a resumed run: only the new steps).
        step: the step reached.
        last_checkpoint: the latest resumable checkpoint folder.
        checkpoint: the exported folder in the released layout.
    """

    losses: list[float] = field(default_factory=list)
    step: int = 0
    last_checkpoint: Path | None = None
    checkpoint: Path | None = None


@dataclass
class TrainingState:
    """What a training step changes, and what a checkpoint saves.

    Attributes:
        model: the trained STDiT3 (float32 master weights).
        ema: its float32 exponential moving average.
        optimizer: AdamW over `model`'s parameters.
        scheduler: the warm-up schedule.
        generator: the run's only source of randomness (on the CPU).
        step: optimizer steps taken.
    """

    model: STDiT3
    ema: STDiT3
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    step: int = 0


@dataclass(frozen=True)
class StepOutput:
    """Attributes: per_clip (the loss of each clip [B], detached), grad_norm (before clipping), lr (used)."""

    per_clip: torch.Tensor
    grad_norm: float
    lr: float


def train_step(
    state: TrainingState,
    x0: torch.Tensor,
    actions: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    image_size: int,
    grad_clip: float = 1.0,
    ema_decay: float = 0.9999,
    bf16: bool = True,
    condition_t: torch.Tensor | None = None,
    drop_actions: torch.Tensor | None = None,
) -> StepOutput:
    """One optimizer step on a batch: loss, backward, clipping, AdamW, schedule, EMA.

    Args:
        state: model, EMA, optimizer, scheduler (updated in place; `step` is incremented).
        x0: clean latents [B, C, Tc + A, h, w]; actions: [B, A, action_dim]; noise: like x0; t: [B].
        condition_t: [B] noise levels of the condition frames (`rectified_flow_loss`); None: the fixed 15.
        drop_actions: [B] bool, clips trained without their actions (`rectified_flow_loss`); None: none.
        image_size: the frame side the latents stand for.
        grad_clip: largest global gradient norm (0: no clipping).
        ema_decay: EMA decay.
        bf16: compute under bf16 autocast.

    Raises:
        FloatingPointError: the loss is not finite (nothing is updated).
    """
    device = next(state.model.parameters()).device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        per_clip = rectified_flow_loss(
            state.model,
            x0.to(device),
            actions.to(device),
            noise.to(device),
            t.to(device),
            image_size,
            image_size,
            condition_t=None if condition_t is None else condition_t.to(device),
            drop_actions=None if drop_actions is None else drop_actions.to(device),
        )  # [B]
    loss = per_clip.mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {float(loss.detach())} at step {state.step}; stopping")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    update_ema(state.ema, state.model, ema_decay)
    state.step += 1
    return StepOutput(per_clip=per_clip.detach().float().cpu(), grad_norm=float(grad_norm), lr=lr)


@torch.no_grad()
def own_condition_frames(
    ema: STDiT3,
    clips: LatentClips,
    batch: torch.Tensor,
    x0: torch.Tensor,
    use: torch.Tensor,
    statistics: ActionStatistics,
    sampler: RectifiedFlowSampler,
    image_size: int,
    generator: torch.Generator,
    bf16: bool = True,
) -> tuple[torch.Tensor, float | None]:
    """`x0` with the condition frames of the clips in `use` replaced by `ema`'s sample of them
    (`WorldModelTrainingConfig.own_condition`).

    Args:
        ema: the model that generates them (the EMA weights, the ones exported and rolled out).
        clips, batch: the clip set and the batch's clip indices [B]; x0: their latents [B, C, Tc + A, h, w].
        use: [B] bool, the clips to replace; those less than one chunk into their episode are left as they are.
        statistics: normalizes the earlier chunk's actions.
        sampler: generates the earlier chunk (its `action_guidance` as the rollouts will use).
        image_size: the frame side the latents stand for.
        generator: the run's generator; it draws the earlier clip's posterior sample and the sampler's seed.
        bf16: sample under bf16 autocast.

    Returns:
        the new latents (a copy; `x0` is not changed) and the mean squared difference between the replaced
        condition latents and the recorded frames' posterior means (None when no clip was replaced). Its floor is
        the VAE's posterior variance, which a model that learned the posterior samples draws as well.
    """
    has_previous, previous = clips.previous_chunk(batch)
    use = use & has_previous
    if not use.any():
        return x0, None
    condition_frames = clips.condition_frames
    latents, actions = clips.batch(previous[use], statistics, generator)  # the earlier clips
    seed = int(torch.randint(2**62, (1,), generator=generator))
    device = next(ema.parameters()).device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        sampled = sampler.sample(
            ema,
            latents[:, :, :condition_frames].to(device),
            actions.to(device),
            height=image_size,
            width=image_size,
            generator=torch.Generator(device).manual_seed(seed),
        )  # [b, C, Tc + A, h, w]: the last Tc frames are the next clip's condition, as in a rollout
    own = sampled[:, :, -condition_frames:].float().cpu()
    replaced = x0.clone()
    replaced[use, :, :condition_frames] = own
    recorded = clips.batch(batch[use], statistics, generator=None)[0][:, :, :condition_frames]  # posterior means
    return replaced, float((own - recorded).pow(2).mean())


def build_training_state(
    model: STDiT3, lr: float, weight_decay: float, adam_eps: float, warmup_steps: int, seed: int
) -> TrainingState:
    """EMA copy, AdamW, linear warm-up and the run's generator around `model`."""
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor, warmup_steps=warmup_steps))
    return TrainingState(model, ema, optimizer, scheduler, torch.Generator().manual_seed(seed))


def enable_gradient_checkpointing(model: STDiT3) -> None:
    """Makes every spatial and temporal block recompute its activations in the backward pass.

    The block's `forward` is wrapped on the instance, so the state-dict keys do not change.
    """
    for block in (*model.spatial_blocks, *model.temporal_blocks):
        block.forward = partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """`ema <- decay * ema + (1 - decay) * model` for every parameter, in float32."""
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.mul_(decay).add_(param.detach().float(), alpha=1 - decay)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The reference's `LinearWarmupLR`: `(step + 1) / (warmup_steps + 1)` during warm-up, then 1."""
    return (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0


def check_finite(module: torch.nn.Module, what: str) -> None:
    """Raises FloatingPointError naming the first non-finite parameter, so nothing non-finite is saved."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"{what} parameter {name} has non-finite values; not saving")


def dataset_statistics(clips: LatentClips) -> ActionStatistics:
    """q01/q99 (and mean, std, min, max) of the recorded actions, leaving out each episode's last frame, which
    has no action in the recorder's layout; a dimension the data never varies gets the controller's range."""
    last_frames = clips.offsets[1:] - 1
    keep = torch.ones(len(clips.actions), dtype=torch.bool)
    keep[last_frames] = False
    return ActionStatistics.from_actions(clips.actions[keep].numpy(), flat_range=CONTROLLER_RANGE)


def save_training_checkpoint(folder: Path, state: TrainingState) -> Path:
    """Writes model, EMA, optimizer, scheduler, step and generator state to `folder`, atomically.

    Everything goes to `<folder>.tmp` first, which is renamed to `folder` once complete.
    """
    check_finite(state.model, "model")
    check_finite(state.ema, "EMA")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_cpu_state(state.model), tmp / "model.safetensors")
    save_file(_cpu_state(state.ema), tmp / "ema.safetensors")
    (tmp / CONFIG_NAME).write_text(json.dumps(state.model.config.to_json_dict(), indent=2))
    torch.save(
        {
            "step": state.step,
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "generator": state.generator.get_state(),
        },
        tmp / "trainer_state.pt",
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_training_checkpoint(folder: Path, state: TrainingState) -> None:
    """Restores what `save_training_checkpoint` wrote into `state`."""
    device = next(state.model.parameters()).device
    state.model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    state.ema.load_state_dict(load_file(folder / "ema.safetensors", device=str(device)))
    trainer_state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    state.optimizer.load_state_dict(trainer_state["optimizer"])
    state.scheduler.load_state_dict(trainer_state["scheduler"])
    state.generator.set_state(trainer_state["generator"])
    state.step = int(trainer_state["step"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder of the highest step in `run_dir/checkpoints` (temp folders are ignored)."""
    folders = sorted((run_dir / CHECKPOINTS_FOLDER).glob("step_[0-9]*[0-9]"))
    return folders[-1] if folders else None


def export_checkpoint(
    folder: Path,
    dit: STDiT3,
    vae_folder: Path,
    dataset_folder: Path,
    statistics: ActionStatistics,
    reward_model: ResNetRewardModel | None = None,
) -> Path:
    """Writes a world-model folder in the released layout (see `opensora_gym.checkpoint`), atomically.

    Args:
        folder: destination (replaced if it exists).
        dit: the STDiT3 to save (the EMA weights).
        vae_folder: the diffusers AutoencoderKL folder, copied to `vae/`.
        dataset_folder: the trajectories, whose `*.npy` files are copied to `dataset/` (the env's start frames).
        statistics: written to `dataset_statistics.json`.
        reward_model: the success classifier, saved as `resnet_rm.pth`; without it the folder lacks `resnet_rm.pth`
            and `OpenSoraLiberoEnv` cannot load it until one is added.
    """
    check_finite(dit, "STDiT3 (EMA)")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dit.save_pretrained(tmp)
    (tmp / VAE_FOLDER).mkdir()
    for name in (VAE_CONFIG_NAME, VAE_WEIGHTS_NAME):
        shutil.copy2(vae_folder / name, tmp / VAE_FOLDER / name)
    (tmp / DATASET_FOLDER).mkdir()
    for episode in TrajectoryDataset(dataset_folder).paths:
        shutil.copy2(episode, tmp / DATASET_FOLDER / episode.name)
    statistics.to_json(tmp / STATISTICS_NAME)
    if reward_model is not None:
        reward_model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


def _reward_model_source(config: WorldModelTrainingConfig) -> Path | None:
    """The classifier to put in the export: `reward_model`, else the init checkpoint's if it has one, else None."""
    if config.reward_model is not None:
        return config.reward_model
    if config.init_checkpoint is not None:
        weights = CheckpointLayout(config.init_checkpoint).reward_weights
        return weights if weights.is_file() else None
    return None


def _build_model(config: WorldModelTrainingConfig) -> STDiT3:
    if config.init_checkpoint is not None:
        return STDiT3.from_pretrained(config.init_checkpoint, device=config.device, dtype=torch.float32).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = STDiT3(config.dit)
    return model.to(config.device).train()


def _statistics(config: WorldModelTrainingConfig, clips: LatentClips) -> ActionStatistics:
    if config.statistics is not None:
        return ActionStatistics.from_json(config.statistics)
    if config.init_checkpoint is not None:
        return ActionStatistics.from_json(CheckpointLayout(config.init_checkpoint).statistics)
    beside = Path(config.dataset).parent / STATISTICS_NAME  # what `collect` and `convert` write next to `dataset/`
    if beside.is_file():
        return ActionStatistics.from_json(beside)
    return dataset_statistics(clips)


def _preview_grid(vae: VideoVAE, real: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Real and predicted generated latents [N, C, A, h, w] -> one image [3, 2N*H, A*W] in [0, 1]
    (per clip: the real frames in one row, the predicted ones below)."""
    frames = vae.decode(torch.stack([real, predicted], dim=1).flatten(0, 1).to(vae.dtype))  # [2N, 3, A, H, W]
    grid = rearrange(frames.float().clamp(-1, 1), "n c a h w -> c (n h) (a w)")
    return (grid + 1) / 2


class _Preview:
    """Samples the continuation of a few fixed clips with the EMA model and logs it against the real one."""

    def __init__(self, config: WorldModelTrainingConfig, clips: LatentClips, statistics: ActionStatistics):
        chosen = torch.linspace(0, len(clips) - 1, min(config.preview_clips, len(clips))).round().long()
        self.latents, self.actions = clips.batch(chosen, statistics, generator=None)  # posterior means
        self.vae = VideoVAE.from_pretrained(config.vae_folder).to(config.device).eval()
        self.sampler = RectifiedFlowSampler(RectifiedFlowConfig(num_sampling_steps=config.preview_sampling_steps))
        self.config = config

    @torch.no_grad()
    def log(self, writer, ema: STDiT3, step: int) -> None:
        cfg, device = self.config, self.config.device
        condition_frames = ema.config.condition_frames
        latents = self.latents.to(device)
        predicted = self.sampler.sample(
            ema,
            latents[:, :, :condition_frames],
            self.actions.to(device),
            height=cfg.image_size,
            width=cfg.image_size,
            generator=torch.Generator(device).manual_seed(cfg.seed),
        )[:, :, condition_frames:]  # [N, C, A, h, w]
        real = latents[:, :, condition_frames:]
        writer.add_scalar("preview/latent_mse", float((predicted - real).pow(2).mean()), step)
        writer.add_image("preview/real_top_predicted_below", _preview_grid(self.vae, real, predicted), step)


def train_world_model(config: WorldModelTrainingConfig) -> TrainingResult:
    """Runs (or resumes) training and exports the EMA model in the released layout to `out/world_model`.

    Returns:
        the losses of the steps run, the step reached, the last checkpoint and the exported folder.
    """
    from torch.utils.tensorboard import SummaryWriter

    run_dir, device = config.out, torch.device(config.device)
    source = _reward_model_source(config)
    # Loaded (with the safe loader) before the training, so that a wrong file fails at once.
    reward_model = None if source is None else ResNetRewardModel.from_pretrained(source)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = _build_model(config)
    cache = run_dir / LATENT_CACHE_NAME
    if not cache.is_file():
        vae = VideoVAE.from_pretrained(config.vae_folder)
        encode_latents(TrajectoryDataset(config.dataset, config.action_key), vae, config.image_size, cache, device)
    clips = LatentClips.load(cache, model.config.condition_frames, config.generated_frames)
    if clips.latent_shape[0] != model.config.in_channels:
        raise ValueError(
            f"the VAE gives {clips.latent_shape[0]} latent channels but the STDiT3 expects "
            f"in_channels={model.config.in_channels}; build the STDiT3Config with in_channels={clips.latent_shape[0]}"
        )
    statistics = _statistics(config, clips)
    if statistics.action_dim != model.config.action_dim:
        raise ValueError(
            f"the actions have {statistics.action_dim} dimensions but the STDiT3 expects action_dim="
            f"{model.config.action_dim}"
        )
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    state = build_training_state(
        model, config.lr, config.weight_decay, config.adam_eps, config.warmup_steps, config.seed
    )
    last = latest_checkpoint(run_dir) if config.resume else None
    if last is not None:
        load_training_checkpoint(last, state)
        print(f"resumed from {last} at step {state.step}")

    flow = RectifiedFlowConfig(use_timestep_transform=config.use_timestep_transform)
    size, num_frames = config.image_size, model.config.condition_frames + config.generated_frames
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    preview = _Preview(config, clips, statistics) if config.preview_every else None
    own_sampler = RectifiedFlowSampler(RectifiedFlowConfig(action_guidance=config.own_condition_guidance))
    own_mse = None
    result = TrainingResult(last_checkpoint=last)
    bucket_sum, bucket_count = np.zeros(TIMESTEP_BUCKETS), np.zeros(TIMESTEP_BUCKETS)
    bf16 = config.mixed_precision == "bf16"
    while state.step < config.max_steps:
        batch = torch.randint(len(clips), (config.batch_size,), generator=state.generator)
        x0, actions = clips.batch(batch, statistics, state.generator)  # [B, C, Tc + A, h, w], [B, A, D]
        noise = torch.randn(x0.shape, generator=state.generator)
        t = sample_timesteps(
            config.batch_size, state.generator, flow, size, size, num_frames, config.timestep_loc, config.timestep_scale
        )
        condition_t = None
        if config.condition_timestep_max > CONDITION_TIMESTEP:
            u = torch.rand(config.batch_size, generator=state.generator)
            condition_t = CONDITION_TIMESTEP + u * (config.condition_timestep_max - CONDITION_TIMESTEP)
        drop_actions = None
        if config.action_dropout > 0:
            drop_actions = torch.rand(config.batch_size, generator=state.generator) < config.action_dropout
        if config.own_condition > 0:
            use = torch.rand(config.batch_size, generator=state.generator) < config.own_condition
            x0, mse = own_condition_frames(
                state.ema, clips, batch, x0, use, statistics, own_sampler, size, state.generator, bf16
            )
            own_mse = own_mse if mse is None else mse
        out = train_step(
            state,
            x0,
            actions,
            noise,
            t,
            size,
            config.grad_clip,
            config.ema_decay,
            bf16,
            condition_t,
            drop_actions,
        )
        result.losses.append(float(out.per_clip.mean()))

        buckets = (t.float() * TIMESTEP_BUCKETS / flow.num_timesteps).long().clamp(0, TIMESTEP_BUCKETS - 1).numpy()
        np.add.at(bucket_sum, buckets, out.per_clip.numpy())
        np.add.at(bucket_count, buckets, 1)
        if state.step % config.log_every == 0:
            writer.add_scalar("train/loss", result.losses[-1], state.step)
            writer.add_scalar("train/lr", out.lr, state.step)
            writer.add_scalar("train/grad_norm", out.grad_norm, state.step)
            if own_mse is not None:  # the latest replaced condition frames against the recorded posterior means
                writer.add_scalar("own_condition/condition_mse", own_mse, state.step)
            for k in np.flatnonzero(bucket_count):
                low, high = k * flow.num_timesteps // TIMESTEP_BUCKETS, (k + 1) * flow.num_timesteps // TIMESTEP_BUCKETS
                writer.add_scalar(f"loss_by_t/{low:04d}-{high:04d}", bucket_sum[k] / bucket_count[k], state.step)
            bucket_sum[:], bucket_count[:] = 0, 0
        if preview is not None and state.step % config.preview_every == 0:
            preview.log(writer, state.ema, state.step)
        if state.step % config.checkpoint_every == 0 or state.step == config.max_steps:
            result.last_checkpoint = save_training_checkpoint(
                run_dir / CHECKPOINTS_FOLDER / f"step_{state.step:08d}", state
            )
            for old in sorted((run_dir / CHECKPOINTS_FOLDER).glob("step_[0-9]*[0-9]"))[: -config.keep_checkpoints]:
                shutil.rmtree(old)
    writer.close()
    result.step = state.step
    result.checkpoint = export_checkpoint(
        run_dir / EXPORT_FOLDER, state.ema, config.vae_folder, config.dataset, statistics, reward_model
    )
    return result
