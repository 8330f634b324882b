"""The training runner: rollouts in the world-model env, advantages, the update, logging, videos, checkpoints.

A run folder `<runner.log_path>/<runner.experiment_name>` holds `config.yaml`, `tensorboard/` event files,
`video/train` and `video/eval` mp4s, `checkpoints/global_step_N/` (policy, optimizer, step and generator states),
and, when no world model is configured and `env.train.tiny_checkpoint` is on, the tiny checkpoint it made.

Randomness is owned: the policy's sampling generator is saved in every checkpoint (the update's shuffle is
seeded `actor.seed + rank` at every step, as RLinf's), and each rollout pass resets the env with a seed computed
from (`actor.seed`, step, pass), so a run resumed from `runner.resume_dir` continues exactly as the
uninterrupted run would have.

Launched by `torchrun` with `actor.strategy` `ddp` or `fsdp`, every rank runs this loop on its share of the
sub-envs; `trainers.distributed` says how the work and the files are split.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from opensora_gym.checkpoint import CheckpointLayout, locate
from trainers.advantages import Targets
from trainers.build import (
    CONFIG_NAME,
    POLICY_FOLDER,
    build_eval_env,
    build_optimizer,
    build_train_env,
    eval_metrics,
    evaluate,
    load_policy,
    record_video,
    resolve_world_model,
    starting_policy,
)
from trainers.config import ConfigError, TrainConfig, config_to_dict
from trainers.distributed import DistributedContext, ParallelPolicy, gather_concat, init_distributed
from trainers.evaluate import EvalResult
from trainers.grpo import grpo_targets
from trainers.loggers import MetricLogger
from trainers.ppo import gae_targets
from trainers.rollout import RolloutBatch, collect_rollout, merge_epochs
from trainers.update import LoraBaseReference, NonFiniteLossError, PolicyUpdater, flatten_for_update

__all__ = ["Trainer", "TrainingDivergedError", "rollout_metrics", "train"]

CHECKPOINTS_FOLDER = "checkpoints"
# Rank r seeds its sampling and shuffling generators `r * RANK_SEED_STRIDE` away from rank 0's.
RANK_SEED_STRIDE = 7_919
STATE_NAME = "trainer_state.pt"


class TrainingDivergedError(RuntimeError):
    """A non-finite loss stopped the run; the last good checkpoint is left as it was.

    Attributes:
        step: the training step (1-based) that failed.
        last_metrics: the metrics of the last completed step.
        failing_metrics: the metrics of the micro-batch with the non-finite loss.
    """

    def __init__(self, step: int, last_metrics: dict[str, float], failing_metrics: dict[str, float], reason: str):
        self.step, self.last_metrics, self.failing_metrics = step, last_metrics, failing_metrics
        super().__init__(
            f"training diverged at step {step}: {reason}. Metrics of the failing micro-batch: "
            f"{_format_metrics(failing_metrics)}. Metrics of the last completed step: {_format_metrics(last_metrics)}. "
            "The last checkpoint was not overwritten; resume from it with a lower learning rate "
            "(actor.optim.lr) or a smaller clip_grad."
        )


def _format_metrics(metrics: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:.4g}" for k, v in sorted(metrics.items())) + "}" if metrics else "{}"


# ------------------------------------------------------------------------------------------------ metrics


def rollout_metrics(
    batch: RolloutBatch, targets: Targets, context: DistributedContext | None = None, group_size: int | None = None
) -> dict[str, float]:
    """`env/*` over the first episodes and `rollout/*` over the valid entries, RLinf's names.

    With GRPO's scores and its `group_size`, also `rollout/groups_with_signal`: the share of groups whose scores
    are not all equal (the others have zero advantage everywhere and teach nothing, filtered or not).
    With a `context` of several ranks, the metrics are those of every rank's trajectories and entries together.
    """
    length = batch.episode_length.float().clamp(min=1)
    action_mask = batch.loss_mask & targets.loss_mask  # [T, B, A]; R = 1 broadcasts
    selections = {
        "success": batch.success.float(),  # [B]
        "episode_return": batch.episode_return,  # [B]
        "episode_length": batch.episode_length.float(),  # [B]
        "reward_per_action": batch.episode_return / length,  # [B]
        "rewards": batch.rewards[action_mask],  # [valid actions]
        "advantages": targets.advantages[targets.loss_mask],  # [valid entries]
        "loss_mask": targets.loss_mask.float().reshape(-1),  # [T * B * R]
    }
    if targets.returns is not None:
        selections["returns"] = targets.returns[targets.loss_mask]  # [valid entries]
    if targets.scores is not None and group_size is not None:
        grouped = targets.scores.reshape(-1, group_size)  # [B / G, G]
        mixed = (grouped != grouped[:, :1]).any(dim=1)  # [B / G]
        selections["group_signal"] = mixed.float()
    if batch.wm_uncertainty is not None:
        selections["wm_uncertainty"] = batch.wm_uncertainty[batch.loss_mask[:, :, 0]]  # [first episodes' chunks]
        selections["wm_truncated"] = batch.wm_truncated.float()  # [B]
        selections["wm_withheld"] = batch.wm_withheld.float()  # [B]
    selections = gather_concat(selections, context or DistributedContext())
    metrics = {
        "env/success_once": float(selections["success"].mean()),
        "env/return": float(selections["episode_return"].mean()),
        "env/episode_len": float(selections["episode_length"].mean()),
        "env/reward": float(selections["reward_per_action"].mean()),
    }
    rewards, advantages = selections["rewards"], selections["advantages"]
    if rewards.numel():  # every group filtered: no reward was fitted, so there is no point to log
        metrics["rollout/rewards"] = float(rewards.mean())
    if advantages.numel():
        metrics.update(
            {
                "rollout/advantages_mean": float(advantages.mean()),
                "rollout/advantages_max": float(advantages.max()),
                "rollout/advantages_min": float(advantages.min()),
            }
        )
    if "returns" in selections and advantages.numel():
        returns = selections["returns"]
        metrics.update(
            {
                "rollout/returns_mean": float(returns.mean()),
                "rollout/returns_max": float(returns.max()),
                "rollout/returns_min": float(returns.min()),
            }
        )
    metrics["rollout/valid_fraction"] = float(selections["loss_mask"].mean())
    if "group_signal" in selections:
        metrics["rollout/groups_with_signal"] = float(selections["group_signal"].mean())
    if "wm_uncertainty" in selections:
        # The env's reliability signal: its mean over the chunks of the first episodes, and the fraction of first
        # episodes that its truncate / withhold policy cut or had a success withheld in.
        metrics["env/wm_uncertainty_mean"] = float(selections["wm_uncertainty"].mean())
        metrics["env/wm_truncated_fraction"] = float(selections["wm_truncated"].mean())
        metrics["env/wm_withheld_fraction"] = float(selections["wm_withheld"].mean())
    return metrics


# ------------------------------------------------------------------------------------------------ runner


@dataclass
class TrainResult:
    """What a finished run leaves.

    Attributes:
        run_dir: the run folder.
        history: the logged metrics of every step of this process, in order.
        last_checkpoint: the last checkpoint folder written, or None.
    """

    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None


class Trainer:
    """Wires env, policy, update and logging for `TrainConfig`; `run()` trains, `step()` does one step.

    Args:
        config: the run.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        runner = config.runner
        check_run_inputs(config)
        self.context = _join_job(config)
        self.local_num_envs = _local_num_envs(config, self.context.world_size)
        self.run_dir = runner.run_dir
        if self.context.is_main:
            _check_run_folder(config)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_NAME).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
            resolve_world_model(config)
        # Other ranks use the tiny world model rank 0 may just have written.
        self.context.barrier()
        self.env = build_train_env(config, num_envs=self.local_num_envs)
        # Training in the simulator has no world model; the policy then keeps its own action statistics.
        self.world_model = self.env.world_model if config.env.train.env_type == "world_model" else None
        self.statistics = None if self.world_model is None else self.world_model.statistics
        policy = starting_policy(config, self.statistics)
        reference = None
        if config.algorithm.kl_beta > 0:
            if getattr(policy, "lora_settings", None) is not None:
                reference = LoraBaseReference(policy)
            else:
                reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.parallel = ParallelPolicy(policy, config.actor.strategy, self.context)
        # `policy` acts, evaluates and is saved; the updater steps `parallel.module` (the same one unless fsdp).
        self.policy = self.parallel.replica
        self.updater = PolicyUpdater(
            self.parallel.module,
            build_optimizer(self.parallel.module, config.actor),
            config.algorithm,
            config.actor,
            config.rollout,
            config.env.train.max_episode_steps,
            reference,
            parallel=self.parallel,
        )
        # Rank 0 keeps the one-process seed; other ranks sample with their own streams.
        rank_offset = RANK_SEED_STRIDE * self.context.rank
        self.sampling_generator = torch.Generator(device=self.policy.device).manual_seed(
            config.actor.seed + rank_offset
        )
        self.global_step = 0
        self.last_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        self.evaluations: list[tuple[int, EvalResult]] = []
        if runner.resume_dir is not None:
            self.load_checkpoint(runner.resume_dir)
        backends = runner.logger_backends if self.context.is_main else ()
        self.logger = MetricLogger(backends, self.run_dir, runner.experiment_name, config_to_dict(config))

    @property
    def num_chunk_steps(self) -> int:
        return self.config.env.train.max_episode_steps // self.policy.action_chunk

    def env_seed(self, step: int, rollout_pass: int) -> int:
        """The reset seed of pass `rollout_pass` of step `step`: distinct for every (seed, step, pass).

        Rank r adds `r * local_num_envs`, so its sub-env i gets the seed of the one-process run's sub-env
        `r * local_num_envs + i`.
        """
        base = self.config.actor.seed * 1_000_003 + step * 1_009 + rollout_pass
        return (base + self.context.rank * self.local_num_envs) % 2**62

    def _video_due(self, step: int) -> bool:
        video = self.config.env.train.video_cfg
        return self.context.is_main and video.save_video and (step == 1 or step % video.interval == 0)

    def collect(self, step: int) -> RolloutBatch:
        """Every rollout pass of training step `step` (1-based), merged."""
        config = self.config
        self.policy.eval()
        passes = []
        for rollout_pass in range(config.env.train.rollout_epoch):
            env = self.env
            if rollout_pass == 0 and self._video_due(step):
                env = record_video(
                    self.env, config.env.train.video_cfg, self.run_dir / "video" / "train", f"step{step}"
                )
            try:
                passes.append(
                    collect_rollout(
                        env,
                        self.policy,
                        self.num_chunk_steps,
                        seed=self.env_seed(step, rollout_pass),
                        generator=self.sampling_generator,
                        temperature=config.rollout.temperature_train,
                        top_k=config.rollout.top_k,
                        do_sample=config.rollout.do_sample,
                    )
                )
            finally:
                if env is not self.env:
                    env.stop()
        return merge_epochs(passes)

    def step(self) -> dict[str, float]:
        """One training step: rollouts, targets, update, logging; returns the logged metrics.

        Raises:
            TrainingDivergedError: the update met a non-finite loss (nothing was saved).
        """
        config = self.config
        step = self.global_step + 1
        batch = self.collect(step)
        targets = self._targets(batch)
        with_critic = config.algorithm.adv_type == "gae"
        data = flatten_for_update(batch, targets, with_critic=with_critic)
        if config.env.train.enable_offload:
            self.env.offload()
        try:
            train_metrics = self.updater.update(data)
        except NonFiniteLossError as error:
            raise TrainingDivergedError(step, self.last_metrics, error.metrics, str(error)) from error
        finally:
            if config.env.train.enable_offload:
                self.env.onload()
        self.parallel.sync_replica()
        group_size = config.env.train.group_size if config.algorithm.adv_type == "grpo" else None
        metrics = rollout_metrics(batch, targets, self.context, group_size)
        metrics.update({f"train/{key}": value for key, value in train_metrics.items()})
        self.global_step = step
        self.logger.log(metrics, step)
        self.last_metrics = metrics
        self.history.append(metrics)
        return metrics

    def _targets(self, batch: RolloutBatch) -> Targets:
        """The algorithm's advantages (and returns) of the batch: `grpo_targets` or `gae_targets`."""
        algorithm = self.config.algorithm
        if algorithm.adv_type == "grpo":
            return grpo_targets(batch, algorithm, self.config.env.train.group_size)
        return gae_targets(batch, algorithm, self.context)

    def run(self) -> TrainResult:
        """Trains until `runner.max_steps`, saving every `save_interval` steps and at the end."""
        runner = self.config.runner
        bar = tqdm(
            total=runner.max_steps,
            initial=self.global_step,
            desc="train",
            disable=not (runner.progress_bar and self.context.is_main),
            unit="step",
        )
        try:
            while self.global_step < runner.max_steps:
                metrics = self.step()
                bar.update(1)
                bar.set_postfix(success=f"{metrics['env/success_once']:.2f}", ret=f"{metrics['env/return']:.2f}")
                if runner.save_interval != -1 and self.global_step % runner.save_interval == 0:
                    self.save_checkpoint()
                if runner.val_check_interval != -1 and self.global_step % runner.val_check_interval == 0:
                    self.evaluate()
                if self.config.audit.interval != -1 and self.global_step % self.config.audit.interval == 0:
                    self.audit()
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"_{self.global_step}"):
                self.save_checkpoint()
        finally:
            bar.close()
            self.logger.close()
        return TrainResult(self.run_dir, self.history, self.last_checkpoint)

    def evaluate(self) -> EvalResult:
        """Evaluates the policy on `env.eval` (the world model's start trajectories, or real LIBERO); logs `eval/*`.

        The result is also kept in `evaluations` with the step it was taken at. Under `torchrun`, rank 0 evaluates
        and the other ranks receive its result.
        """
        result = self._evaluate_here() if self.context.is_main else None
        result = self.context.broadcast_object(result)
        self.evaluations.append((self.global_step, result))
        return result

    def _evaluate_here(self) -> EvalResult:
        prefix = f"step{self.global_step}"
        with build_eval_env(self.config, self.run_dir, self.world_model, video_prefix=prefix) as setup:
            result = evaluate(self.config, setup, self.policy)
        self.logger.log(eval_metrics(result), self.global_step)
        return result

    def audit(self) -> dict[str, float]:
        """Audits the world model against the LIBERO simulator with the current policy (the `audit` section):
        reports in `<run folder>/audit/step<N>/`, numbers logged as `audit/...`; returns them.

        Under `torchrun`, rank 0 audits (the other ranks return no numbers).
        """
        metrics: dict[str, float] = {}
        if self.context.is_main:
            from trainers.fidelity import audit_metrics, run_fidelity_audit

            folder = self.run_dir / "audit" / f"step{self.global_step}"
            metrics = audit_metrics(run_fidelity_audit(self.config, self.world_model, self.policy, folder))
            self.logger.log(metrics, self.global_step)
        self.context.barrier()
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Writes `checkpoints/global_step_N` atomically (a temporary folder renamed when complete).

        Under `torchrun` every rank calls it (the optimizer state and the generators are gathered); rank 0 writes.
        """
        folder = self.run_dir / CHECKPOINTS_FOLDER / f"global_step_{self.global_step}"
        layout, optimizer_state = self.parallel.optimizer_state(self.updater.optimizer)
        generators = self.context.all_gather_objects(self.sampling_generator.get_state())
        if self.context.is_main:
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            self.policy.save_pretrained(partial / POLICY_FOLDER)
            state = {
                "global_step": self.global_step,
                "optimizer": optimizer_state,
                "optimizer_steps": self.updater.optimizer_steps,
                "sampling_generator": self.sampling_generator.get_state(),
                "last_metrics": self.last_metrics,
            }
            if self.context.is_distributed:
                state["optimizer_layout"] = layout
                state["rank_generators"] = generators
            torch.save(state, partial / STATE_NAME)
            (partial / CONFIG_NAME).write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        self.context.barrier()
        self.last_checkpoint = folder
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restores policy weights, optimizer, step and generators from `save_checkpoint`'s folder.

        Raises:
            ConfigError: when the checkpoint comes from a run with another policy or algorithm.
            FileNotFoundError: when the folder is not a trainer checkpoint.
        """
        folder = Path(folder)
        if not (folder / STATE_NAME).is_file():
            raise FileNotFoundError(
                f"resume_dir {folder} has no {STATE_NAME} (expected a folder like <run>/checkpoints/global_step_N)"
            )
        loaded = load_policy(folder, self.config.runner.device, self.config, self.statistics)
        self.parallel.load_state_dict(loaded.state_dict())
        state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
        try:
            self.parallel.load_optimizer_state(
                self.updater.optimizer, state.get("optimizer_layout", "ids"), state["optimizer"]
            )
        except ValueError as error:
            raise ConfigError(f"the optimizer state in {folder} does not fit this policy ({error})") from error
        sampling_state = state["sampling_generator"]
        if self.context.is_distributed:
            saved = state.get("rank_generators") or [sampling_state]
            if len(saved) != self.context.world_size:
                raise ConfigError(
                    f"checkpoint {folder} was written by {len(saved)} process(es), this run has "
                    f"{self.context.world_size}: resume with torchrun --nproc_per_node {len(saved)} to continue exactly"
                )
            sampling_state = saved[self.context.rank]
        self.sampling_generator.set_state(sampling_state)
        self.global_step = int(state["global_step"])
        # Checkpoints from before the critic warm-up existed were written without one (its default, 0).
        self.updater.optimizer_steps = int(state.get("optimizer_steps", 0))
        self.last_metrics = dict(state["last_metrics"])
        self.last_checkpoint = folder


def check_run_inputs(config: TrainConfig, evaluation: bool = False) -> None:
    """Checks, before anything heavy loads, what a run needs: devices that exist, policy and checkpoint folders
    that are complete. Each problem is one `ConfigError` that says what to do.

    Args:
        config: the run.
        evaluation: for `opensora-gym eval` (the training env is needed only to evaluate in the world model).
    """
    runner, train, model = config.runner, config.env.train, config.actor.model
    for key, device in (("runner.device", runner.device), ("env.train.device", train.device)):
        if device is not None:
            _check_device(key, device)
    if runner.resume_dir is not None and not Path(runner.resume_dir).is_dir():
        raise ConfigError(
            f"runner.resume_dir {runner.resume_dir} does not exist (expected <run>/checkpoints/global_step_N)"
        )
    for key, folder in (("runner.ckpt_path", runner.ckpt_path), ("actor.model.model_path", model.model_path)):
        if folder is None or (model.model_type != "small" and key == "actor.model.model_path"):
            continue
        try:
            exists = locate(folder).is_dir()
        except FileNotFoundError as error:
            raise ConfigError(f"{key}: {error}") from None
        if not exists:
            raise ConfigError(f"{key} {folder} does not exist (expected a policy folder)")
    if model.model_type == "openvla_oft" and runner.ckpt_path is None and runner.resume_dir is None:
        if model.model_path is None or not (Path(model.model_path) / "config.json").is_file():
            raise ConfigError(
                f"actor.model.model_path {model.model_path} is not an OpenVLA-OFT folder with a config.json; download "
                "one first, e.g. hf download Haozhan72/Openvla-oft-SFT-libero-spatial-traj1 --local-dir "
                "models/Openvla-oft-SFT-libero-spatial-traj1"
            )
    if train.checkpoint is not None and (not evaluation or config.env.eval.env_type == "world_model"):
        try:
            CheckpointLayout.resolve(train.checkpoint)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"env.train.checkpoint: {error}") from None


def _check_device(key: str, device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{key} must be a torch device such as cpu, cuda or cuda:1, got {device!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key} is {device!r} but torch sees no CUDA GPU on this machine: use {key}=cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(
                f"{key} is {device!r} but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} is 'mps' but torch sees no Apple GPU on this machine: use {key}=cpu")


def _check_run_folder(config: TrainConfig) -> None:
    """A fresh run must not replace an earlier run's checkpoints unless told to (`runner.overwrite`)."""
    runner = config.runner
    checkpoints = runner.run_dir / CHECKPOINTS_FOLDER
    if runner.resume_dir is None and not runner.overwrite and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(
            f"{runner.run_dir} already holds checkpoints of an earlier run: resume it with "
            f"runner.resume_dir={checkpoints}/global_step_N, choose another runner.experiment_name, or set "
            "runner.overwrite=true"
        )


def _join_job(config: TrainConfig) -> DistributedContext:
    """This process's place in a torchrun job (`actor.strategy` ddp / fsdp), or the one-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.actor.strategy == "none":
        if world_size > 1:
            raise ConfigError(
                f"launched by torchrun with {world_size} processes but actor.strategy is 'none' (every process would "
                "train alone and write the same files): set actor.strategy=ddp or actor.strategy=fsdp"
            )
        return DistributedContext()
    return init_distributed(config.runner.device)


def _local_num_envs(config: TrainConfig, world_size: int) -> int:
    """Sub-envs of each rank: an equal share of `env.train.total_num_envs`, whole GRPO groups."""
    total, group_size = config.env.train.total_num_envs, config.env.train.group_size
    if total % world_size or (total // world_size) % group_size:
        raise ConfigError(
            f"env.train.total_num_envs ({total}) must split into {world_size} equal shares (one per rank), each a "
            f"multiple of env.train.group_size ({group_size}) so no group spans ranks: use a multiple of "
            f"{world_size * group_size}"
        )
    return total // world_size


def train(config: TrainConfig) -> TrainResult:
    """Trains as `config` says (see `Trainer`)."""
    return Trainer(config).run()
