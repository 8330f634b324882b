"""Typed configuration of a training or evaluation run, filled from YAML and `key=value` overrides.

The sections follow RLinf's embodied configs (`runner`, `algorithm`, `env.train` / `env.eval`, `rollout`, `actor`),
so a published recipe reads the same here; each section is a dataclass validated in `__post_init__`. YAML only
fills these dataclasses: an unknown key or a value of the wrong type is an error that names the key and what it
accepts.

    >>> config = load_config("tiny_cpu_grpo", ["env.train.group_size=4", "runner.max_steps=3"])
    >>> config.env.train.group_size
    4
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from opensora_gym.env import OpenSoraLiberoConfig

__all__ = [
    "PRESETS_DIR",
    "ActorConfig",
    "AlgorithmConfig",
    "AuditConfig",
    "ConfigError",
    "EnvConfig",
    "EvalEnvConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "RunnerConfig",
    "TrainConfig",
    "TrainEnvConfig",
    "VideoConfig",
    "config_to_dict",
    "from_dict",
    "load_config",
    "preset_names",
    "resolve_config_path",
]

# The shipped configs (package data): `--config tiny_cpu_grpo` names `PRESETS_DIR / "tiny_cpu_grpo.yaml"`.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"

LOGGER_BACKENDS = ("tensorboard", "wandb", "swanlab")
# More sub-envs than this in one process is a typo (the recipe steps 64; an H200 fits a few hundred small ones).
MAX_NUM_ENVS = 4096


class ConfigError(ValueError):
    """A configuration value or key that is not accepted; the message names the key and the allowed values."""


def _positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{owner}.{name} must be a finite positive number, got {value!r}")


def _unit_interval(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{owner}.{name} must lie in [0, 1], got {value!r}")


@dataclass
class VideoConfig:
    """Videos of rollouts (`env.train.video_cfg` / `env.eval.video_cfg`).

    Attributes:
        save_video: write mp4 files of episodes.
        video_base_dir: folder of the videos; None: `<run folder>/video/train` or `.../eval`.
        num_envs: sub-envs recorded (the first ones).
        interval: training steps between recorded rollouts (the first step is always recorded).
        fps: frames per second.
    """

    save_video: bool = False
    video_base_dir: str | None = None
    num_envs: int = 2
    interval: int = 25
    fps: int = 10

    def __post_init__(self) -> None:
        _positive("video_cfg", num_envs=self.num_envs, interval=self.interval, fps=self.fps)


@dataclass(frozen=True)
class TrainEnvConfig(OpenSoraLiberoConfig):
    """The env that rollouts are collected in (`env.train`): the world-model env, with every setting of
    `OpenSoraLiberoConfig` (which documents them and checks their values) and training's defaults, or the real
    LIBERO simulator (`env_type: libero`), and how training uses the env.

    Attributes:
        env_type: `world_model` (the OpenSora env) or `libero` (the real simulator, as RLinf's LIBERO recipes
            train: `opensora_gym.wrappers.LiberoTrainingEnv`, suite `libero_<suite>`; each GRPO group starts on
            one task x trial initial state drawn from `task_ids` x `trial_ids`, and a frame's reward is LIBERO's
            success check under the world-model env's rule: `use_rel_reward`, `reward_coef`). With `libero` the
            settings of the world model (checkpoint, sampling, starts, reliability) are not used.
        task_ids, trial_ids: `libero` only: the tasks and initial states starts are drawn from (None: all).
        protocol: `libero` only: the settling steps before an episode (`opensora_gym.libero.LIBERO_PROTOCOLS`;
            the episode's length is `max_episode_steps`).
        render_size: `libero` only: the side the simulator renders at; None: `image_size` (render at the side of
            the policy's training frames when it resizes them, as `env.eval.image_size`).
        checkpoint: world-model folder (`opensora_wm_hf_ckpt_path` in RLinf); None: a tiny one when
            `tiny_checkpoint` is set, else as the env resolves it (`$OPENSORA_GYM_CHECKPOINT`, then the released
            model of `suite`).
        device: torch device of the world model; None: `runner.device`.
        group_size: consecutive sub-envs that start from the same episode (GRPO's groups); divides total_num_envs.
        tiny_checkpoint: with no `checkpoint`, make a tiny checkpoint under the run folder (the embedded default
            job) instead of fetching the released model: `random` (random weights, `make_tiny_checkpoint`) or
            `action_sensitive` (success iff an action's first normalized number exceeds 0.8, so a policy can
            learn it: `make_action_sensitive_checkpoint`, trained at `image_size`).
        total_num_envs: sub-envs stepped together (over all ranks).
        rollout_epoch: env resets (passes) per training step; their trajectories form one batch.
        enable_offload: move the world model to the CPU while the policy trains.
        video_cfg: videos of training rollouts.
    """

    env_type: Literal["world_model", "libero"] = "world_model"
    task_ids: tuple[int, ...] | None = None
    trial_ids: tuple[int, ...] | None = None
    protocol: Literal["rlinf", "openvla_oft"] = "openvla_oft"
    render_size: int | None = None
    # A YAML value is a string; the env itself also takes a Path.
    checkpoint: str | None = None
    device: str | None = None
    group_size: int = 8
    tiny_checkpoint: Literal["random", "action_sensitive"] | None = None
    total_num_envs: int = 64
    rollout_epoch: int = 16
    enable_offload: bool = False
    video_cfg: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as error:
            raise ConfigError(f"env.train.{error}") from None
        # Training rejects what the env alone would run: no reward to learn from, a threshold never reached.
        _positive(
            "env.train",
            total_num_envs=self.total_num_envs,
            rollout_epoch=self.rollout_epoch,
            reward_coef=self.reward_coef,
        )
        _unit_interval("env.train", success_threshold=self.success_threshold)
        if self.total_num_envs % self.group_size:
            raise ConfigError(
                f"env.train.total_num_envs ({self.total_num_envs}) must be a multiple of env.train.group_size "
                f"({self.group_size}): every group of sub-envs shares a start"
            )
        if self.total_num_envs > MAX_NUM_ENVS:
            raise ConfigError(f"env.train.total_num_envs must be at most {MAX_NUM_ENVS}, got {self.total_num_envs}")
        libero_only = {"task_ids": self.task_ids, "trial_ids": self.trial_ids, "render_size": self.render_size}
        if self.env_type != "libero":
            chosen = [name for name, value in libero_only.items() if value is not None]
            if chosen:
                raise ConfigError(
                    f"env.train.{chosen[0]} is a setting of the simulator: set env.train.env_type: libero"
                )
            return
        if self.render_size is not None:
            _positive("env.train", render_size=self.render_size)
        if self.enable_offload:
            raise ConfigError(
                "env.train.enable_offload moves a world model off the GPU: with env_type libero set it false"
            )


@dataclass
class EvalEnvConfig:
    """The env of `opensora-gym eval` and of periodic evaluation (`env.eval`).

    Attributes:
        env_type: `world_model` (the OpenSora env of `env.train`'s checkpoint) or `libero` (the simulator).
        suite: for `libero`, the LIBERO suite (`libero_spatial`, ...); for `world_model`, `spatial` or `object`.
        total_num_envs: sub-envs stepped together.
        num_episodes: episodes evaluated; None: every start trajectory (world model) or every task x trial
            pair (LIBERO: the 500-episode protocol of a 10-task suite).
        task_ids: LIBERO only: evaluate only these tasks (None: all).
        trial_ids: LIBERO only: evaluate only these initial states of each task (None: all 50).
        max_episode_steps: actions per episode; None: the training env's (world model) or the protocol's (LIBERO).
        image_size: LIBERO only: the side the simulator renders at; None: `env.train.image_size`. Render at the
            side the training frames were recorded at when the policy resizes them (e.g. 128 px recordings shrunk
            to 64 px: the policy then shrinks the 128 px render the same way).
        protocol: LIBERO only: `rlinf` (RLinf's evaluation: 15 settling zero actions, 512 steps) or `openvla_oft`
            (10 settling steps with the gripper open, per-suite limits 220/280/300/520/400); see
            `opensora_gym.libero.LIBERO_PROTOCOLS`.
        do_sample: sample actions (with `rollout.temperature_eval`) rather than decode greedily.
        seed: seed of the env and of the sampling.
        video_cfg: videos of evaluation episodes.
    """

    env_type: Literal["world_model", "libero"] = "world_model"
    suite: str | None = None
    total_num_envs: int = 8
    num_episodes: int | None = None
    task_ids: tuple[int, ...] | None = None
    trial_ids: tuple[int, ...] | None = None
    max_episode_steps: int | None = None
    image_size: int | None = None
    protocol: Literal["rlinf", "openvla_oft"] = "rlinf"
    do_sample: bool = False
    seed: int = 0
    video_cfg: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self) -> None:
        _positive("env.eval", total_num_envs=self.total_num_envs)
        if self.total_num_envs > MAX_NUM_ENVS:
            raise ConfigError(f"env.eval.total_num_envs must be at most {MAX_NUM_ENVS}, got {self.total_num_envs}")
        if self.env_type != "libero" and (self.task_ids is not None or self.trial_ids is not None):
            raise ConfigError("env.eval.task_ids and env.eval.trial_ids choose LIBERO episodes: set env_type: libero")
        if self.num_episodes is not None:
            _positive("env.eval", num_episodes=self.num_episodes)
        if self.max_episode_steps is not None:
            _positive("env.eval", max_episode_steps=self.max_episode_steps)
        if self.image_size is not None:
            if self.env_type != "libero":
                raise ConfigError("env.eval.image_size sets the LIBERO render size: set env_type: libero")
            _positive("env.eval", image_size=self.image_size)


@dataclass
class EnvConfig:
    """`env`: the training env and the evaluation env."""

    train: TrainEnvConfig = field(default_factory=TrainEnvConfig)
    eval: EvalEnvConfig = field(default_factory=EvalEnvConfig)


@dataclass
class AlgorithmConfig:
    """The RL algorithm (`algorithm`), with RLinf's names.

    Attributes:
        adv_type: `grpo` (group-relative score of each trajectory) or `gae` (PPO with the value head as critic).
        normalize_advantages: whiten the advantages over the valid entries of the batch.
        reward_type: `action_level` (one reward, value and advantage per action) or `chunk_level` (per chunk).
        kl_beta: weight of the KL penalty to the initial policy (0 disables it and the reference copy).
        entropy_bonus: weight of the entropy bonus.
        clip_ratio_low, clip_ratio_high: PPO's asymmetric ratio clip.
        clip_ratio_c: dual-clip constant (> 1), or None.
        value_clip: clip range of the value update; huber_delta: Huber threshold of the value loss.
        gamma, gae_lambda: GAE's discount and smoothing.
        filter_rewards: drop GRPO groups whose mean score is outside [rewards_lower_bound, rewards_upper_bound].
        update_epoch: passes over the batch per training step.
        loss_aggregation: `embodied` (RLinf's embodied actor: each trajectory weighted by `max_episode_steps` over
            its number of valid actions, averaged over all entries, masked ones included) or `token_mean` (every
            valid action token of a global batch weighs alike, so long episodes weigh more); see
            `trainers.update`.
    """

    adv_type: Literal["grpo", "gae"] = "grpo"
    normalize_advantages: bool = True
    reward_type: Literal["action_level", "chunk_level"] = "action_level"
    kl_beta: float = 0.0
    entropy_bonus: float = 0.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = None
    value_clip: float = 0.2
    huber_delta: float = 10.0
    gamma: float = 0.99
    gae_lambda: float = 0.95
    filter_rewards: bool = False
    rewards_lower_bound: float = 0.5
    rewards_upper_bound: float = 4.5
    update_epoch: int = 1
    loss_aggregation: Literal["embodied", "token_mean"] = "embodied"

    def __post_init__(self) -> None:
        _positive("algorithm", update_epoch=self.update_epoch)
        _positive("algorithm", value_clip=self.value_clip, huber_delta=self.huber_delta)
        _unit_interval("algorithm", gamma=self.gamma, gae_lambda=self.gae_lambda)
        if self.rewards_lower_bound > self.rewards_upper_bound:
            raise ConfigError(
                f"algorithm.rewards_lower_bound ({self.rewards_lower_bound}) must not exceed rewards_upper_bound "
                f"({self.rewards_upper_bound})"
            )
        if not 0.0 <= self.clip_ratio_low < 1.0 or self.clip_ratio_high < 0.0:
            raise ConfigError(
                f"algorithm.clip_ratio_low must lie in [0, 1) and clip_ratio_high be >= 0, got "
                f"{self.clip_ratio_low} and {self.clip_ratio_high}"
            )
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ConfigError(f"algorithm.clip_ratio_c must be > 1 (or null to disable), got {self.clip_ratio_c}")
        if self.kl_beta < 0 or self.entropy_bonus < 0:
            raise ConfigError(
                f"algorithm.kl_beta and entropy_bonus must be >= 0, got {self.kl_beta} and {self.entropy_bonus}"
            )


@dataclass
class RolloutConfig:
    """Sampling of actions (`rollout.sampling_params` in RLinf, flattened).

    Attributes:
        do_sample: sample during training rollouts (else greedy).
        temperature_train, temperature_eval: logit divisors for training rollouts and the update, and for eval.
        top_k: keep the k most likely tokens; -1 keeps all.
    """

    do_sample: bool = True
    temperature_train: float = 1.6
    temperature_eval: float = 1.6
    top_k: int = -1

    def __post_init__(self) -> None:
        _positive("rollout", temperature_train=self.temperature_train, temperature_eval=self.temperature_eval)
        if self.top_k != -1 and self.top_k < 1:
            raise ConfigError(f"rollout.top_k must be -1 (all tokens) or positive, got {self.top_k}")


@dataclass
class ModelConfig:
    """The policy (`actor.model`).

    Attributes:
        model_type: `small` (`SmallCNNPolicy`, CPU-fast) or `openvla_oft` (`OpenVLAOFTPolicy`).
        model_path: folder to load the policy from (required for `openvla_oft`; optional for `small`).
        precision: `fp32` or `bf16` parameters (`openvla_oft`).
        add_value_head: build a value head (needed by `gae`).
        value_type: `chunk_level` (one value per chunk) or `action_level` (one per action).
        unnorm_key: dataset of the action un-normalization statistics (`openvla_oft`).
        append_stop_token: end the sequence with the stop token after the action slots, as openvla-oft's
            `predict_action` does; false is RLinf's RL model (`openvla_oft`).
        is_lora, lora_rank: train LoRA adapters of this rank instead of the full network (`openvla_oft`).
        gradient_checkpointing: recompute activations in the backward pass (`openvla_oft`).
        image_size, channels, hidden_size, task_embed_dim, n_bins, pooling: the architecture of `small`
            (`pooling`: `mean` or `spatial_softmax`, see `SmallPolicyConfig`).
    """

    model_type: Literal["small", "openvla_oft"] = "small"
    model_path: str | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    add_value_head: bool = True
    value_type: Literal["chunk_level", "action_level"] = "chunk_level"
    unnorm_key: str | None = None
    append_stop_token: bool = False
    is_lora: bool = False
    lora_rank: int = 32
    gradient_checkpointing: bool = False
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64)
    hidden_size: int = 128
    task_embed_dim: int = 32
    n_bins: int = 256
    pooling: Literal["mean", "spatial_softmax"] = "mean"

    def __post_init__(self) -> None:
        _positive("actor.model", lora_rank=self.lora_rank, image_size=self.image_size, hidden_size=self.hidden_size)
        if self.model_type == "openvla_oft" and self.model_path is None:
            raise ConfigError(
                "actor.model.model_path is required for model_type 'openvla_oft' (a folder of the OpenVLA-OFT "
                "checkpoint, e.g. Haozhan72/Openvla-oft-SFT-libero-spatial-traj1 downloaded locally)"
            )


@dataclass
class OptimConfig:
    """AdamW with separate learning rates for the policy and the value head (`actor.optim`).

    Attributes:
        critic_warmup_steps: RLinf's critic warm-up: the first this-many optimizer steps train the value head
            alone (the policy frozen, its loss terms 0, `actor/lr` logged as 0); after them the optimizer starts
            afresh over every parameter, as RLinf builds a new one. 0 turns it off; it needs `adv_type` `gae`.
    """

    lr: float = 2e-5
    value_lr: float = 3e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    critic_warmup_steps: int = 0

    def __post_init__(self) -> None:
        _positive("actor.optim", lr=self.lr, value_lr=self.value_lr, adam_eps=self.adam_eps, clip_grad=self.clip_grad)
        if self.critic_warmup_steps < 0:
            raise ConfigError(
                f"actor.optim.critic_warmup_steps must be >= 0 (0: no warm-up), got {self.critic_warmup_steps}"
            )
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0) or self.weight_decay < 0:
            raise ConfigError(
                f"actor.optim: adam betas must lie in [0, 1) and weight_decay be >= 0, got "
                f"({self.adam_beta1}, {self.adam_beta2}) and {self.weight_decay}"
            )


@dataclass
class ActorConfig:
    """The trained policy and its update (`actor`).

    Attributes:
        model: the policy.
        optim: the optimizer.
        micro_batch_size: chunk steps per forward/backward pass.
        global_batch_size: chunk steps per optimizer step (gradients accumulate over its micro-batches).
        seed: seed of the policy's initial weights, the rollout sampling and the batch shuffling.
        strategy: how the policy is spread over `torchrun` processes: `none` (one process), `ddp` (a full copy
            per rank, gradients averaged) or `fsdp` (FSDP2-sharded, for OpenVLA-OFT-size policies); see
            `trainers.distributed`. `global_batch_size` counts chunk steps over all ranks.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_size: int = 32
    global_batch_size: int = 8192
    seed: int = 1234
    strategy: Literal["none", "ddp", "fsdp"] = "none"

    def __post_init__(self) -> None:
        _positive("actor", micro_batch_size=self.micro_batch_size, global_batch_size=self.global_batch_size)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"actor.global_batch_size ({self.global_batch_size}) must be a multiple of actor.micro_batch_size "
                f"({self.micro_batch_size})"
            )


@dataclass
class RunnerConfig:
    """The run (`runner`, with RLinf's `runner.logger` fields flattened in).

    Attributes:
        experiment_name: name of the run folder `<log_path>/<experiment_name>`.
        log_path: parent folder of runs.
        logger_backends: any of `tensorboard`, `wandb`, `swanlab`.
        max_steps: training steps (one rollout + one update each).
        save_interval: steps between checkpoints (-1: only at the end).
        val_check_interval: steps between evaluations (-1: never during training).
        resume_dir: a checkpoint folder (`.../checkpoints/global_step_N`) to continue from exactly.
        ckpt_path: a policy folder to start from (training) or to evaluate (`eval`).
        device: torch device of the policy (and of the world model unless `env.train.device` says otherwise).
        progress_bar: show a tqdm bar.
        overwrite: let a fresh run (no `resume_dir`) replace the checkpoints of an earlier run in its folder.
    """

    experiment_name: str = "opensora_gym"
    log_path: str = "runs"
    logger_backends: tuple[str, ...] = ("tensorboard",)
    max_steps: int = 100
    save_interval: int = 25
    val_check_interval: int = -1
    resume_dir: str | None = None
    ckpt_path: str | None = None
    device: str = "cpu"
    progress_bar: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        name = self.experiment_name
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(
                "runner.experiment_name must be a plain folder name inside runner.log_path (no '/', '..'), "
                f"got {name!r}"
            )
        self.logger_backends = tuple(self.logger_backends)
        unknown = [b for b in self.logger_backends if b not in LOGGER_BACKENDS]
        if unknown:
            raise ConfigError(f"runner.logger_backends must be a list of {list(LOGGER_BACKENDS)}, got {unknown}")
        _positive("runner", max_steps=self.max_steps)
        for name in ("save_interval", "val_check_interval"):
            value = getattr(self, name)
            if value != -1 and value < 1:
                raise ConfigError(f"runner.{name} must be -1 (off) or positive, got {value}")

    @property
    def run_dir(self) -> Path:
        """`<log_path>/<experiment_name>`."""
        return Path(self.log_path) / self.experiment_name


@dataclass
class AuditConfig:
    """The fidelity audit of the world model against the LIBERO simulator (`audit`; see `opensora_gym.audit`).

    `opensora-gym audit` runs it once; during training it runs every `interval` steps with the current policy and
    logs `audit/...`, so a curve shows when the policy starts exploiting the world model.

    Attributes:
        interval: training steps between audits (-1: never during training, the default).
        suite: the LIBERO suite of the starts (`libero_spatial`, `libero_object`, ...).
        task_ids: the tasks whose initial states are audited (None: all).
        trial_ids: the initial states of each task (None: all 50).
        num_starts: K, the first K of the chosen (task, trial) pairs in task-major order (None: all of them).
        max_episode_steps: actions per audited episode; None: the protocol's limit.
        protocol: how LIBERO episodes start and end (`rlinf` or `openvla_oft`, as `env.eval.protocol`).
        total_num_envs: LIBERO worker processes (and world-model sub-envs) per wave of starts; None: one per start.
        divergence_psnr: an open-loop chunk whose PSNR is below this many dB counts as diverged.
        compare_steps: also audit these approximate sampling-step counts against the exact mode
            (`env.train.num_sampling_steps`), from the same starts and noise.
        recorded_episodes: replay these trajectories of the world model's dataset open loop (one per start)
            instead of the policy's actions; the closed loop still runs the policy.
        save_video: write side-by-side videos (simulator | world model | difference) of the open loop and the
            policy's closed-loop episodes in the world model.
        seed: the reset seed of every env (LIBERO's scene seed, the world model's noise) and of the policy.
    """

    interval: int = -1
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] | None = None
    trial_ids: tuple[int, ...] | None = (0,)
    num_starts: int | None = None
    max_episode_steps: int | None = None
    protocol: Literal["rlinf", "openvla_oft"] = "rlinf"
    total_num_envs: int | None = None
    divergence_psnr: float = 20.0
    compare_steps: tuple[int, ...] = ()
    recorded_episodes: tuple[int, ...] | None = None
    save_video: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.interval != -1 and self.interval < 1:
            raise ConfigError(f"audit.interval must be -1 (off) or positive, got {self.interval}")
        for name in ("num_starts", "max_episode_steps", "total_num_envs"):
            if getattr(self, name) is not None:
                _positive("audit", **{name: getattr(self, name)})
        _positive("audit", divergence_psnr=self.divergence_psnr)
        self.compare_steps = tuple(self.compare_steps)
        if any(steps < 1 for steps in self.compare_steps):
            raise ConfigError(f"audit.compare_steps must be positive sampling-step counts, got {self.compare_steps}")


@dataclass
class TrainConfig:
    """A whole run: the root of a YAML config."""

    runner: RunnerConfig = field(default_factory=RunnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        train, algorithm = self.env.train, self.algorithm
        if algorithm.adv_type == "grpo" and train.group_size < 2:
            raise ConfigError(
                f"env.train.group_size must be at least 2 for algorithm.adv_type 'grpo' (the group std needs two "
                f"samples), got {train.group_size}"
            )
        if algorithm.filter_rewards and train.group_size < 2:
            raise ConfigError("algorithm.filter_rewards needs env.train.group_size >= 2 (it filters groups)")
        if algorithm.adv_type == "gae" and not self.actor.model.add_value_head:
            raise ConfigError("algorithm.adv_type 'gae' needs a critic: set actor.model.add_value_head true")
        if self.actor.optim.critic_warmup_steps > 0 and algorithm.adv_type != "gae":
            raise ConfigError(
                f"actor.optim.critic_warmup_steps {self.actor.optim.critic_warmup_steps} warms up a critic, but "
                f"algorithm.adv_type is {algorithm.adv_type!r}: use adv_type 'gae' or set it to 0"
            )
        if algorithm.adv_type == "gae" and algorithm.reward_type != self.actor.model.value_type:
            raise ConfigError(
                f"adv_type 'gae' needs one value per reward: algorithm.reward_type {algorithm.reward_type!r} and "
                f"actor.model.value_type {self.actor.model.value_type!r} must be equal (both 'chunk_level' or both "
                "'action_level')"
            )
        rows = train.max_episode_steps // train.action_chunk * train.rollout_epoch * train.total_num_envs
        if rows % self.actor.global_batch_size:
            raise ConfigError(
                f"a training step fits {rows} chunk steps (env.train max_episode_steps / {train.action_chunk} x "
                f"rollout_epoch x total_num_envs), which must be a multiple of actor.global_batch_size "
                f"({self.actor.global_batch_size}): as in RLinf, every chunk step (masked ones included) goes into a "
                "global batch"
            )


# ------------------------------------------------------------------------------------------------ loading


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """`value` checked against (and converted to) `annotation`; ConfigError naming `key` otherwise."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of {sorted(f.name for f in dataclasses.fields(annotation))}")
        return from_dict(annotation, value, prefix=key)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(annotation)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key} must be {_type_name(annotation)}, got {value!r}")
        item = typing.get_args(annotation)[0]
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key} must be null, got {value!r}")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # PyYAML reads `1e-2` (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from a nested mapping, checking every key and type.

    Args:
        cls: a config dataclass of this module.
        data: its fields by name; absent fields keep their defaults.
        prefix: the dotted path of `data` in the whole config, for error messages.

    Raises:
        ConfigError: for an unknown key (naming the allowed ones), a wrong type, or a value `__post_init__`
            rejects.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"in {prefix}" if prefix else "at the top level"
        raise ConfigError(f"unknown config key(s) {unknown} {where}; allowed keys: {names}")
    values = {name: _convert(data[name], hints[name], f"{prefix}.{name}" if prefix else name) for name in data}
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Sets `a.b.c=value` in the nested mapping (the value parsed as YAML: `3`, `1e-4`, `null`, `[a, b]`)."""
    if "=" not in override:
        raise ConfigError(f"an override must look like key.path=value, got {override!r}")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    node_cls: type = TrainConfig
    node = data
    for depth, key in enumerate(keys):
        fields_by_name = {f.name: f for f in dataclasses.fields(node_cls)}
        if key not in fields_by_name:
            where = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(
                f"unknown config key {key!r} in override {override!r} (at {where}); allowed keys: "
                f"{list(fields_by_name)}"
            )
        if depth == len(keys) - 1:
            node[key] = yaml.safe_load(raw) if raw.strip() else None
            return
        child_cls = typing.get_type_hints(node_cls)[key]
        if not dataclasses.is_dataclass(child_cls):
            raise ConfigError(f"{'.'.join(keys[: depth + 1])} is a value, not a section: cannot set {path}")
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys[: depth + 1])} must be a mapping in the YAML file")
        node_cls = child_cls


def preset_names() -> list[str]:
    """The names of the shipped configs, for `--config NAME`."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(config: str | Path) -> Path:
    """A config file: `config` itself when it is a file, else the shipped preset of that name (`.yaml` optional).

    Raises:
        FileNotFoundError: neither a file nor a preset; the message lists the presets.
    """
    path = Path(config)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and preset.is_file():
        return preset
    raise FileNotFoundError(f"config {config} is neither a file nor a preset (presets: {', '.join(preset_names())})")


def _read_yaml(path: Path) -> Any:
    """The YAML document of `path`; a syntax error or a Python tag is one ConfigError naming the file and line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML config (or starts from the defaults) and applies `key.path=value` overrides.

    Args:
        path: a YAML file whose sections match `TrainConfig`, or the name of a shipped preset (`preset_names`);
            None uses the defaults.
        overrides: dotted assignments applied in order, e.g. `runner.max_steps=10`.

    Returns:
        the validated config.

    Raises:
        ConfigError: for unknown keys, wrong types or invalid values, and for files that are not YAML.
        FileNotFoundError: when `path` is neither a file nor a preset.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for override in overrides:
        _apply_override(data, override)
    return from_dict(TrainConfig, data)
