"""Everything a run is made of, from its config: the envs, the policy, the optimizer and the evaluation.

The runner (`trainers.runner`) and the command line (`trainers.cli`) build with these functions alone, so a setting
goes from the YAML to the object that uses it in one place:

    >>> config = load_config("tiny_cpu_grpo")  # doctest: +SKIP
    >>> env = build_train_env(config)  # doctest: +SKIP
    >>> policy = starting_policy(config, env.world_model.statistics)  # doctest: +SKIP
    >>> optimizer = build_optimizer(policy, config.actor)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
import yaml

from opensora_gym import WORLD_MODEL_ENV_IDS
from opensora_gym.checkpoint import locate
from opensora_gym.data import ActionStatistics
from opensora_gym.env import OpenSoraLiberoConfig, OpenSoraLiberoEnv
from opensora_gym.presets import make_action_sensitive_checkpoint, make_tiny_checkpoint
from opensora_gym.world_model import WorldModel
from trainers.config import ActorConfig, ConfigError, ModelConfig, TrainConfig, VideoConfig, config_to_dict, from_dict
from trainers.evaluate import EvalResult, evaluate_policy, libero_episodes, world_model_episodes
from vla_policies.base import Policy

__all__ = [
    "CONFIG_NAME",
    "POLICY_FOLDER",
    "EvalSetup",
    "build_eval_env",
    "build_optimizer",
    "build_policy",
    "build_train_env",
    "build_world_model_env",
    "eval_metrics",
    "evaluate",
    "load_policy",
    "record_video",
    "resolve_world_model",
    "starting_policy",
]

# A trainer checkpoint (`checkpoints/global_step_N`) keeps its policy and its run's config under these names.
POLICY_FOLDER = "policy"
CONFIG_NAME = "config.yaml"
TINY_CHECKPOINT_FOLDER = "tiny_world_model"


# ------------------------------------------------------------------------------------------------ envs


def resolve_world_model(config: TrainConfig) -> str | None:
    """The world-model folder: `env.train.checkpoint`, a tiny one made in the run folder, or None (env default)."""
    train = config.env.train
    if train.checkpoint is not None:
        return train.checkpoint
    if train.tiny_checkpoint is None:
        return None
    folder = config.runner.run_dir / f"{TINY_CHECKPOINT_FOLDER}_{train.tiny_checkpoint}"
    if folder.is_dir():
        return str(folder)
    # Built aside and renamed when complete: a run killed meanwhile leaves no half-written model behind.
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if train.tiny_checkpoint == "random":
        make_tiny_checkpoint(partial, seed=config.actor.seed)
    else:
        report = make_action_sensitive_checkpoint(partial, seed=config.actor.seed, image_size=train.image_size)
        print(
            f"wrote an action-sensitive tiny world model to {folder} (success iff an action's first normalized "
            f"number > {report.threshold}; reward classifier accuracy {report.classifier_accuracy:.1%})"
        )
    partial.rename(folder)
    return str(folder)


def build_world_model_env(config: TrainConfig, num_envs: int | None = None, **overrides: Any) -> OpenSoraLiberoEnv:
    """The training env of `config` (`env.train`), made as a user makes it: `gym.make_vec` of the registered id.

    Args:
        config: the run.
        num_envs: sub-envs; None: `env.train.total_num_envs`.
        overrides: env settings (`OpenSoraLiberoConfig` fields, or `world_model` to share a loaded one) that
            replace `env.train`'s.
    """
    train = config.env.train
    # `env.train` is an `OpenSoraLiberoConfig` with training's settings added: the env takes its own fields.
    settings = {f.name: getattr(train, f.name) for f in fields(OpenSoraLiberoConfig)}
    settings.update(checkpoint=resolve_world_model(config), device=train.device or config.runner.device)
    settings.update(overrides)
    # The id of `env.train.suite` (a checked value); the settings, an evaluation's other suite included, are the
    # env's arguments, so a wrong `env.eval.suite` is rejected by the env's own config.
    return gym.make_vec(WORLD_MODEL_ENV_IDS[train.suite], num_envs=num_envs or train.total_num_envs, **settings)


def build_train_env(config: TrainConfig, num_envs: int | None = None) -> Any:
    """The env rollouts are collected in (`env.train`): the world model (`build_world_model_env`) or, with
    `env_type: libero`, the real simulator as `opensora_gym.wrappers.LiberoTrainingEnv`.

    Args:
        config: the run.
        num_envs: sub-envs; None: `env.train.total_num_envs`.
    """
    train = config.env.train
    if train.env_type == "world_model":
        return build_world_model_env(config, num_envs)
    from opensora_gym.libero import LiberoConfig, LiberoVectorEnv
    from opensora_gym.reward_rule import RewardRule
    from opensora_gym.wrappers import LiberoTrainingEnv

    libero_config = LiberoConfig.from_protocol(
        train.protocol,
        train.max_episode_steps,
        suite=f"libero_{train.suite}",
        image_size=train.render_size or train.image_size,
        action_chunk=train.action_chunk,
    )
    env = LiberoVectorEnv(libero_config, num_envs=num_envs or train.total_num_envs)
    try:
        starts = libero_episodes(env.walk, None, train.task_ids, train.trial_ids)
    except ValueError as error:
        env.close()
        raise ConfigError(f"env.train.{error}") from None
    rule = RewardRule(
        use_rel_reward=train.use_rel_reward, reward_coef=train.reward_coef, success_threshold=train.success_threshold
    )
    pairs = [(start["task_id"], start["trial_id"]) for start in starts]
    return LiberoTrainingEnv(env, pairs, train.group_size, rule)


def record_video(env: Any, video: VideoConfig, folder: Path, prefix: str) -> Any:
    """`env` wrapped to write mp4s of the first episode of its first `video.num_envs` sub-envs, into
    `video.video_base_dir` (else `folder`), named `<prefix>-env<i>-episode<i>.mp4`."""
    from opensora_gym.wrappers.video import RecordEpisodeVideo

    folder = Path(video.video_base_dir) if video.video_base_dir else folder
    count = video.num_envs
    # Episode ids 0..N-1 are the first episodes of the N sub-envs: record the first `count` of them.
    return RecordEpisodeVideo(env, folder, episode_trigger=lambda i: i < count, name_prefix=prefix, fps=video.fps)


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalSetup:
    """What an evaluation runs: the env of `env.eval` (videos recorded when configured), the action statistics
    the policy is built with (None for LIBERO: the policy's own) and the episodes.

    A context manager: leaving it closes the env (stops LIBERO's workers, finishes the videos; a shared world
    model stays loaded).
    """

    env: Any
    statistics: ActionStatistics | None
    episodes: list[dict[str, int]]

    def __enter__(self) -> EvalSetup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.env.close()


def build_eval_env(
    config: TrainConfig, run_dir: Path, world_model: WorldModel | None = None, video_prefix: str = "episode"
) -> EvalSetup:
    """The evaluation env of `config.env.eval`: the world model (sharing `world_model` when given) or the real
    LIBERO simulator under the named protocol (`env.eval.protocol`); used by training and by `opensora-gym eval`.
    """
    eval_cfg = config.env.eval
    if eval_cfg.env_type == "world_model":
        env = build_world_model_env(
            config,
            num_envs=eval_cfg.total_num_envs,
            group_size=1,
            **({"suite": eval_cfg.suite} if eval_cfg.suite else {}),
            **({"world_model": world_model} if world_model is not None else {}),
            max_episode_steps=eval_cfg.max_episode_steps or config.env.train.max_episode_steps,
        )
        statistics = env.world_model.statistics
        episodes = world_model_episodes(len(env.dataset), eval_cfg.num_episodes)
    else:
        from opensora_gym.libero import LiberoConfig, LiberoVectorEnv

        # Rendered at `env.eval.image_size`, else at the size the policy sees in the world model.
        libero_config = LiberoConfig.from_protocol(
            eval_cfg.protocol,
            eval_cfg.max_episode_steps,
            suite=eval_cfg.suite or "libero_spatial",
            image_size=eval_cfg.image_size or config.env.train.image_size,
        )
        env = LiberoVectorEnv(libero_config, num_envs=eval_cfg.total_num_envs)
        statistics = None
        episodes = libero_episodes(env.walk, eval_cfg.num_episodes, eval_cfg.task_ids, eval_cfg.trial_ids)
    if eval_cfg.video_cfg.save_video:
        env = record_video(env, eval_cfg.video_cfg, run_dir / "video" / "eval", video_prefix)
    return EvalSetup(env, statistics, episodes)


def evaluate(config: TrainConfig, setup: EvalSetup, policy: Policy) -> EvalResult:
    """`policy` on the setup's episodes, sampling as `env.eval` and `rollout` say (`evaluate_policy`)."""
    eval_cfg = config.env.eval
    return evaluate_policy(
        setup.env,
        policy,
        setup.episodes,
        do_sample=eval_cfg.do_sample,
        temperature=config.rollout.temperature_eval,
        top_k=config.rollout.top_k,
        seed=eval_cfg.seed,
        progress_bar=config.runner.progress_bar,
    )


def eval_metrics(result: EvalResult) -> dict[str, float]:
    """The logged numbers of an evaluation: `eval/success_once` and its 95% interval."""
    low, high = result.interval
    return {"eval/success_once": result.success_rate, "eval/success_ci_low": low, "eval/success_ci_high": high}


# ------------------------------------------------------------------------------------------ policy, optimizer


def starting_policy(config: TrainConfig, statistics: ActionStatistics | None) -> Policy:
    """The policy a run starts from (and `eval` / `audit` measure): `runner.ckpt_path` when set, else `actor.model`."""
    if config.runner.ckpt_path is not None:
        return load_policy(config.runner.ckpt_path, config.runner.device, config, statistics)
    return build_policy(config.actor.model, statistics, config.runner.device, config.actor.seed)


def load_policy(
    path: str | Path, device: str, config: TrainConfig | None = None, statistics: ActionStatistics | None = None
) -> Policy:
    """A saved policy: a `save_pretrained` folder, or a trainer checkpoint (`checkpoints/global_step_N`: its
    `policy/` subfolder).

    Args:
        path: the folder.
        device: where the parameters go.
        config: the run the policy is built for, as its `actor.model` says (a trainer checkpoint must come from a
            run with the same policy and algorithm); None: the architecture is read from the folder's config.json
            (SmallCNNPolicy when it has only SmallPolicyConfig fields, else OpenVLAOFTPolicy in bfloat16 on CUDA
            and float32 on the CPU).
        statistics: with `config`, the world model's action statistics (see `build_policy`).

    Raises:
        FileNotFoundError: the folder is not a policy folder or a trainer checkpoint.
        ConfigError: the policy or its checkpoint's run does not match `config`.
    """
    path = locate(path)
    if (path / POLICY_FOLDER).is_dir():
        if config is not None:
            _check_same_model(config, path)
        path = path / POLICY_FOLDER
    if config is not None:
        if not path.is_dir():
            raise FileNotFoundError(f"policy folder {path} does not exist (expected a save_pretrained folder)")
        return build_policy(config.actor.model, statistics, device, config.actor.seed, path=path)

    from vla_policies import OpenVLAOFTPolicy, SmallCNNPolicy, SmallPolicyConfig

    saved_config = path / "config.json"
    if not saved_config.is_file():
        raise FileNotFoundError(f"policy folder {path} has no config.json (expected a save_pretrained folder)")
    if set(json.loads(saved_config.read_text())) <= {field.name for field in fields(SmallPolicyConfig)}:
        return SmallCNNPolicy.from_pretrained(path, device=device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return OpenVLAOFTPolicy.from_pretrained(path, dtype=dtype, device=device)


def _small_policy_config(model: ModelConfig, statistics: ActionStatistics | None):
    from vla_policies import SmallPolicyConfig

    stats = None if statistics is None else {"q01": statistics.q01.tolist(), "q99": statistics.q99.tolist()}
    return SmallPolicyConfig(
        image_size=model.image_size,
        channels=model.channels,
        task_embed_dim=model.task_embed_dim,
        hidden_size=model.hidden_size,
        n_bins=model.n_bins,
        pooling=model.pooling,
        add_value_head=model.add_value_head,
        value_type=model.value_type,
        action_stats=stats,
    )


def build_policy(
    model: ModelConfig, statistics: ActionStatistics | None, device: str, seed: int, path: str | Path | None = None
) -> Policy:
    """The policy of `actor.model`, loaded from `path` (else `model.model_path`) or, for `small`, freshly built.

    Args:
        model: the policy section of the config.
        statistics: the world model's action statistics: a `small` policy outputs robot units with them.
        device: where the parameters go.
        seed: seed of newly initialized weights.
        path: a policy folder written by `save_pretrained` to load instead of `model.model_path`.

    Raises:
        ConfigError: when the folder holds a policy of another architecture than `model` describes.
    """
    path = path if path is not None else model.model_path
    path = None if path is None else locate(path)
    if model.model_type == "small":
        from vla_policies import SmallCNNPolicy

        expected = _small_policy_config(model, statistics)
        if path is None:
            return SmallCNNPolicy(expected, generator=torch.Generator().manual_seed(seed)).to(device)
        saved_config = Path(path) / "config.json"
        if saved_config.is_file():
            saved = json.loads(saved_config.read_text())
            wanted = config_to_dict(expected)
            # A policy saved without a value head (behaviour cloning) gets a new one for PPO.
            ignored = {"action_stats"}
            if not saved.get("add_value_head"):
                ignored |= {"add_value_head", "value_type"}
            differing = sorted(k for k in wanted if k not in ignored and saved.get(k) != wanted[k])
            if differing:
                raise ConfigError(
                    f"the policy in {path} was saved with another architecture: "
                    + ", ".join(f"{k}={saved.get(k)!r} (config: {wanted[k]!r})" for k in differing)
                    + "; use the config it was trained with, or set actor.model to match"
                )
        return SmallCNNPolicy.from_pretrained(
            path, device=device, add_value_head=model.add_value_head, value_type=model.value_type, seed=seed
        )

    from vla_policies import LoraSettings, OpenVLAOFTPolicy

    dtype = torch.bfloat16 if model.precision == "bf16" else torch.float32
    policy = OpenVLAOFTPolicy.from_pretrained(
        path,
        dtype=dtype,
        device=device,
        unnorm_key=model.unnorm_key,
        add_value_head=model.add_value_head,
        value_type=model.value_type,
        append_stop_token=model.append_stop_token,
        seed=seed,
    )
    if model.is_lora and policy.lora_settings is None:
        policy.enable_lora(LoraSettings(rank=model.lora_rank, alpha=model.lora_rank))
    if model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    return policy


def _check_same_model(config: TrainConfig, checkpoint: Path) -> None:
    """Raises ConfigError when the checkpoint's run had another policy or algorithm layout."""
    saved_path = checkpoint / CONFIG_NAME
    if not saved_path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {CONFIG_NAME} (expected a trainer checkpoint)")
    saved = from_dict(TrainConfig, yaml.safe_load(saved_path.read_text()))
    differing = []
    for section, ours, theirs in (
        ("actor.model", config.actor.model, saved.actor.model),
        ("algorithm", config.algorithm, saved.algorithm),
    ):
        ours_dict, theirs_dict = config_to_dict(ours), config_to_dict(theirs)
        # Where the weights came from and how activations are stored do not change what a checkpoint holds.
        keys = ("adv_type",) if section == "algorithm" else set(ours_dict) - {"model_path", "gradient_checkpointing"}
        differing += [
            f"{section}.{k}: {theirs_dict[k]!r} (now {ours_dict[k]!r})"
            for k in sorted(keys)
            if ours_dict[k] != theirs_dict[k]
        ]
    if differing:
        raise ConfigError(
            f"checkpoint {checkpoint} comes from another config: "
            + "; ".join(differing)
            + ". Resume with the config it was saved with (its config.yaml), or start a new run."
        )


def build_optimizer(policy: Policy, actor: ActorConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the value head at `value_lr`, everything else at `lr`.

    Group 0 is the policy (its learning rate is logged as `train/actor/lr`), group 1 the value head if any.
    """
    optim = actor.optim
    policy_params, value_params = [], []
    for name, parameter in policy.named_parameters():
        if parameter.requires_grad:
            (value_params if "value_head." in name else policy_params).append(parameter)
    if not policy_params:
        raise ValueError("the policy has no trainable parameters outside its value head")
    groups = [{"params": policy_params, "lr": optim.lr}]
    if value_params:
        groups.append({"params": value_params, "lr": optim.value_lr})
    return torch.optim.AdamW(
        groups, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps, weight_decay=optim.weight_decay
    )
