"""The policy update: clipped PPO/GRPO actor loss, optional critic, entropy and KL terms, AdamW with two groups.

One update reads like RLinf's embodied actor (`run_training`): shuffle every chunk step of the rollout (masked
ones included) with a generator seeded `actor.seed + rank` (the same permutation at every training step, as
RLinf draws it), cut the rows into global batches of `global_batch_size`, so the number of optimizer steps is
fixed by the config; for `update_epoch` passes over these batches, accumulate the gradients of each global
batch's micro-batches of `micro_batch_size`, clip the gradient norm, step AdamW.

The loss of a micro-batch is aggregated as `algorithm.loss_aggregation` says:
- `embodied` (RLinf's default for the OpenSora + OpenVLA-OFT recipe): the actor and critic losses are
  `masked_mean_ratio` over all entries of the micro-batch (each trajectory weighted by `max_episode_steps` over
  its number of valid actions), the entropy and KL terms token-means of the micro-batch; the sum is divided by
  the number of micro-batches of a global batch.
- `token_mean`: every term is the token-mean over the valid entries of the whole global batch (all ranks).

Rows whose every entry is masked (after the first episode, or in filtered GRPO groups) add exactly zero to
every loss term: they count in the `embodied` denominators but are never run through the policy. A micro-batch
without a valid row is skipped; a global batch without one still steps the optimizer with zero gradients, as
RLinf's does. The logged loss metrics average the micro-batches that ran.

Under `torchrun` (a `ParallelPolicy` over several ranks) every rank shuffles its own rows and takes
`global_batch_size / ranks` of them per optimizer step; the gradients are averaged over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from trainers.config import ActorConfig, AlgorithmConfig, RolloutConfig
from trainers.distributed import DistributedContext, ParallelPolicy
from trainers.losses import actor_loss, critic_loss, kl_penalty, masked_mean
from trainers.rollout import RolloutBatch
from trainers.targets import Targets
from vla_policies.base import Policy, PolicyEvaluation

__all__ = [
    "LoraBaseReference",
    "NonFiniteLossError",
    "PolicyUpdater",
    "UpdateData",
    "build_optimizer",
    "flatten_for_update",
]

EXPLAINED_VARIANCE_STATS = ("count", "returns_sum", "returns_sq_sum", "errors_sum", "errors_sq_sum")


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite; the parameters were not stepped with it.

    Attributes:
        metrics: the metrics of the micro-batch that produced it.
    """

    def __init__(self, message: str, metrics: dict[str, float]):
        super().__init__(message)
        self.metrics = metrics


@dataclass(frozen=True)
class UpdateData:
    """The M chunk steps of a batch, flattened (R rewards per chunk, V values per chunk, K tokens).

    Attributes:
        images: [M, H, W, 3] uint8.
        tasks: M task strings.
        action_tokens: [M, K] int64.
        logprobs: [M, K] float32 rollout log-probs.
        advantages: [M, R] float32.
        mask: [M, R] bool.
        loss_mask_sum: [M, 1] float32: the number of valid actions of the row's trajectory (its first episode,
            counted before the GRPO filter, as RLinf counts it).
        returns: [M, R] float32, or None without a critic.
        values: [M, V] float32 rollout values, or None without a critic.
    """

    images: torch.Tensor
    tasks: list[str]
    action_tokens: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    loss_mask_sum: torch.Tensor
    returns: torch.Tensor | None
    values: torch.Tensor | None

    def __len__(self) -> int:
        return self.action_tokens.shape[0]


def flatten_for_update(batch: RolloutBatch, targets: Targets, with_critic: bool) -> UpdateData:
    """Every chunk step of the batch, masked ones included, as rows `(t, b)` in time-major order."""

    def flat(tensor: torch.Tensor) -> torch.Tensor:
        return rearrange(tensor, "t b ... -> (t b) ...")

    num_steps = batch.action_tokens.shape[0]
    valid_actions = batch.loss_mask.sum(dim=(0, 2)).float()  # [B]
    return UpdateData(
        images=flat(batch.images),
        tasks=[task for step in batch.tasks for task in step],  # (t b) order
        action_tokens=flat(batch.action_tokens),
        logprobs=flat(batch.logprobs),
        advantages=flat(targets.advantages),
        mask=flat(targets.loss_mask),
        loss_mask_sum=flat(valid_actions[None, :, None].expand(num_steps, -1, 1)),
        returns=flat(targets.returns) if with_critic else None,
        values=flat(batch.values[:-1]) if with_critic else None,
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


class LoraBaseReference:
    """The KL reference of a LoRA-trained policy: the same network with its adapters switched off.

    Equals the policy LoRA training started from (LoRA's B matrices start at zero) and costs no memory, where a
    frozen copy would double a 7B model.
    """

    def __init__(self, policy: Policy):
        if getattr(policy, "lora_settings", None) is None:
            raise ValueError("LoraBaseReference needs a policy with LoRA enabled")
        self.policy = policy

    def evaluate(self, obs, action_tokens: torch.Tensor, **kwargs) -> PolicyEvaluation:
        with self.policy.lora_disabled():
            return self.policy.evaluate(obs, action_tokens, **kwargs)


class PolicyUpdater:
    """Runs the update of one training step (see the module docstring).

    Args:
        policy: the trained policy.
        algorithm: loss settings (clip ratios, critic, entropy and KL weights, aggregation, `update_epoch`).
        actor: batch sizes, the shuffling seed and the optimizer settings.
        rollout: the temperature and top-k the log-probs are computed with (as at rollout time).
        max_episode_steps: the training env's episode limit in actions (the `embodied` aggregation's scale).
        reference: the frozen reference policy of the KL penalty (needed when `algorithm.kl_beta > 0`): a frozen
            copy, or a `LoraBaseReference`.
        parallel: how `policy` is spread over ranks (`policy` must be its `module`); None: one process.
    """

    def __init__(
        self,
        policy: Policy,
        algorithm: AlgorithmConfig,
        actor: ActorConfig,
        rollout: RolloutConfig,
        max_episode_steps: int,
        reference: Policy | LoraBaseReference | None = None,
        parallel: ParallelPolicy | None = None,
    ):
        if algorithm.kl_beta > 0 and reference is None:
            raise ValueError("algorithm.kl_beta > 0 needs a reference policy")
        if parallel is not None and parallel.module is not policy:
            raise ValueError("parallel.module must be the updated policy")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
        world_size = 1 if parallel is None else parallel.context.world_size
        if actor.global_batch_size % (actor.micro_batch_size * world_size):
            raise ValueError(
                f"actor.global_batch_size ({actor.global_batch_size}) must be a multiple of actor.micro_batch_size "
                f"({actor.micro_batch_size}) times the number of ranks ({world_size}): each rank takes an equal "
                "share of every global batch in whole micro-batches"
            )
        self.policy = policy
        self.algorithm = algorithm
        self.actor = actor
        self.rollout = rollout
        self.max_episode_steps = max_episode_steps
        self.reference = reference
        self.parallel = parallel
        self.optimizer = build_optimizer(policy, actor)
        self.with_critic = algorithm.adv_type == "gae"

    def update(self, data: UpdateData) -> dict[str, float]:
        """Fits the policy to `data`; returns the mean metrics (keys as logged under `train/`).

        Raises:
            ValueError: this rank's rows do not split into whole global batches.
            NonFiniteLossError: a loss or gradient norm was not finite; the optimizer did not step on it.
        """
        parallel = self.parallel
        context = DistributedContext() if parallel is None else parallel.context
        share = self.actor.global_batch_size // context.world_size  # rows of each rank per optimizer step
        if len(data) == 0 or len(data) % share:
            raise ValueError(
                f"the rollout gives {len(data)} chunk steps on this rank, which must be a positive multiple of "
                f"actor.global_batch_size / ranks = {share}: choose env.train.total_num_envs, rollout_epoch and "
                "max_episode_steps so that chunk steps x sub-envs is a multiple of actor.global_batch_size"
            )
        micro_size = self.actor.micro_batch_size
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.actor.seed + context.rank))
        runs_row = data.mask.reshape(len(data), -1).any(dim=1)  # [M] rows with a valid entry
        steps = []  # per optimizer step: the rows of each of its micro-batches that run through the policy
        for start in range(0, len(data), share):
            micro_batches = order[start : start + share].split(micro_size)
            steps.append([micro[runs_row[micro]] for micro in micro_batches])
        # Per optimizer step: passes with rows on every rank (lockstep pads to the largest), valid entries summed.
        plans = context.all_gather_objects(
            [(sum(len(rows) > 0 for rows in step), int(data.mask[torch.cat(step)].sum())) for step in steps]
        )

        metrics = MetricAccumulator()
        self.policy.train()
        for _ in range(self.algorithm.update_epoch):
            for index, step in enumerate(steps):
                # A global batch without a valid row still steps the optimizer (zero gradients: Adam's momentum and
                # the weight decay move the weights), as RLinf's does; it takes one zero-weighted pass.
                passes = max(1, *(plan[index][0] for plan in plans))
                valid_entries = sum(plan[index][1] for plan in plans)
                self._optimizer_step(data, step, passes, valid_entries, metrics, context)
        self.optimizer.zero_grad(set_to_none=True)
        return metrics.result(context, self.with_critic)

    def _optimizer_step(
        self,
        data: UpdateData,
        step: list[torch.Tensor],
        passes: int,
        valid_entries: int,
        metrics: MetricAccumulator,
        context: DistributedContext,
    ) -> None:
        """Accumulates the micro-batches of one global batch, then clips and steps."""
        lockstep = self.parallel is not None and self.parallel.lockstep
        micro_size = self.actor.micro_batch_size
        accumulation = len(step)  # micro-batches of a global batch on each rank
        runs: list[torch.Tensor | None] = [rows for rows in step if len(rows)]
        if lockstep:
            runs += [None] * (passes - len(runs))
        elif not runs:
            runs = [None]
        self.optimizer.zero_grad(set_to_none=True)
        failure: tuple[str, dict[str, float]] | None = None
        last_metrics: dict[str, float] = {}
        for rows in runs:
            if rows is None or failure is not None:
                # FSDP's collectives need this pass on every rank (or the batch has no valid row); its gradient is 0.
                (self._micro_batch_loss(data, torch.arange(min(micro_size, len(data))))[0] * 0.0).backward()
                continue
            loss, last_metrics, stats = self._micro_batch_loss(data, rows)
            if not torch.isfinite(loss):
                failure = (f"the loss is {loss.item()}", last_metrics)
                if lockstep:
                    continue
                break
            if self.algorithm.loss_aggregation == "embodied":
                weight = 1.0 / accumulation
            else:  # every rank's share of the global batch's valid entries (gradients are averaged over ranks)
                weight = context.world_size * int(data.mask[rows].sum()) / valid_entries
            (loss * weight).backward()
            metrics.add(last_metrics, stats)
        failure = _first_failure(context.all_gather_objects(failure), context.rank)
        if failure is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(*failure)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.parallel is not None:
            self.parallel.sync_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.actor.optim.clip_grad)
        if self.parallel is not None:
            grad_norm = self.parallel.local_norm(grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the gradient norm is {grad_norm.item()}", last_metrics)
        self.optimizer.step()
        # A finite loss and gradient can still step to non-finite weights (e.g. an overflowing Adam moment).
        finite = all(context.all_gather_objects(_all_finite(params)))
        if not finite:
            raise NonFiniteLossError("the weights are not finite after the optimizer step", last_metrics)
        metrics.add({"actor/grad_norm": float(grad_norm), "actor/lr": self.optimizer.param_groups[0]["lr"]})

    def _micro_batch_loss(
        self, data: UpdateData, rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """The loss of rows `rows` of `data` (one micro-batch's rows with a valid entry), its metrics and the
        explained-variance sums.

        Under the `embodied` aggregation the actor and critic terms are scaled from a mean over `rows` to a mean
        over a whole micro-batch of `actor.micro_batch_size` rows: the rows left out are fully masked and add 0.
        """
        policy, algorithm = self.policy, self.algorithm
        device = policy.device
        obs = {"image": data.images[rows], "task": [data.tasks[i] for i in rows.tolist()]}
        tokens = data.action_tokens[rows]
        temperature, top_k = self.rollout.temperature_train, self.rollout.top_k
        evaluation = policy.evaluate(obs, tokens, temperature=temperature, top_k=top_k)
        embodied: dict[str, object] = {}
        row_share = 1.0
        if algorithm.loss_aggregation == "embodied":
            embodied = {"max_episode_steps": self.max_episode_steps}
            row_share = len(rows) / self.actor.micro_batch_size

        def per_action(tensor: torch.Tensor) -> torch.Tensor:
            return rearrange(tensor, "m (a d) -> m a d", d=policy.action_dim)  # [m, A, action_dim]

        logprobs = per_action(evaluation.logprobs.float())
        old_logprobs = per_action(data.logprobs[rows].to(device))
        mask = data.mask[rows].to(device)[:, :, None]  # [m, R, 1]: R = A or 1 broadcasts over the tokens
        advantages = data.advantages[rows].to(device)[:, :, None]  # [m, R, 1]
        loss_mask_sum = data.loss_mask_sum[rows].to(device)  # [m, 1]
        if embodied:
            embodied["loss_mask_sum"] = loss_mask_sum[:, :, None]  # [m, 1, 1]
        loss, actor_metrics = actor_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            algorithm.clip_ratio_low,
            algorithm.clip_ratio_high,
            algorithm.clip_ratio_c,
            **embodied,
        )
        loss = loss * row_share
        metrics = {f"actor/{key}": float(actor_metrics[key]) for key in ACTOR_METRICS}
        metrics["actor/policy_loss"] *= row_share
        entropy = masked_mean(per_action(evaluation.entropy.float()), mask)
        metrics["entropy_loss"] = float(entropy.detach())
        if algorithm.entropy_bonus > 0:
            loss = loss - algorithm.entropy_bonus * entropy
        if algorithm.kl_beta > 0:
            with torch.no_grad():
                reference = self.reference.evaluate(obs, tokens, temperature=temperature, top_k=top_k)
            kl = kl_penalty(logprobs, per_action(reference.logprobs.float()), mask)
            metrics["actor/kl"] = float(kl.detach())
            loss = loss + algorithm.kl_beta * kl
        stats: dict[str, float] = {}
        if self.with_critic:
            if evaluation.values is None:
                raise ValueError("adv_type 'gae' needs a policy with a value head")
            if embodied:
                embodied["loss_mask_sum"] = loss_mask_sum  # [m, 1] broadcasts over the R values
            value_loss, critic_metrics = critic_loss(
                evaluation.values.float(),
                data.values[rows].to(device),
                data.returns[rows].to(device),
                data.mask[rows].to(device),
                algorithm.value_clip,
                algorithm.huber_delta,
                **embodied,
            )
            value_loss = value_loss * row_share
            metrics["critic/value_loss"] = float(critic_metrics["value_loss"]) * row_share
            metrics["critic/value_clip_ratio"] = float(critic_metrics["value_clip_ratio"])
            stats = {key: float(critic_metrics[f"explained_variance_{key}"]) for key in EXPLAINED_VARIANCE_STATS}
            loss = loss + value_loss
        metrics["loss"] = float(loss.detach())
        return loss, metrics, stats


class MetricAccumulator:
    """Means of the metrics of every micro-batch and optimizer step, and summed explained-variance statistics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.ev_stats = dict.fromkeys(EXPLAINED_VARIANCE_STATS, 0.0)

    def add(self, metrics: dict[str, float], ev_stats: dict[str, float] | None = None) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        for key, value in (ev_stats or {}).items():
            self.ev_stats[key] += value

    def result(self, context: DistributedContext, with_critic: bool) -> dict[str, float]:
        """The means over every rank; `critic/explained_variance` from the summed statistics."""
        sums, counts, ev_stats = self.sums, self.counts, self.ev_stats
        if context.is_distributed:
            sums, counts, ev_stats = _merge_statistics(context.all_gather_objects((sums, counts, ev_stats)))
        result = {key: sums[key] / counts[key] for key in sums}
        if with_critic and sums:
            result["critic/explained_variance"] = _explained_variance(ev_stats)
        return result


def _all_finite(params: list[torch.Tensor]) -> bool:
    """Whether this rank's part of every parameter is finite (a sharded parameter checks its local shard)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    return bool(torch.stack([p.detach().isfinite().all() for p in local]).all())


ACTOR_METRICS = ("policy_loss", "approx_kl", "clip_fraction", "clipped_ratio", "ratio", "dual_clip_fraction")


def _first_failure(
    failures: list[tuple[str, dict[str, float]] | None], rank: int
) -> tuple[str, dict[str, float]] | None:
    """This rank's non-finite loss, else another rank's (every rank stops together), else None."""
    if failures[rank] is not None:
        return failures[rank]
    for other, failure in enumerate(failures):
        if failure is not None:
            return f"{failure[0]} on rank {other}", failure[1]
    return None


def _merge_statistics(
    parts: list[tuple[dict[str, float], dict[str, int], dict[str, float]]],
) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """Sums every rank's (metric sums, metric counts, explained-variance sums), keys in first-seen order."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    ev_stats = dict.fromkeys(EXPLAINED_VARIANCE_STATS, 0.0)
    for part_sums, part_counts, part_ev in parts:
        for key, value in part_sums.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + part_counts[key]
        for key, value in part_ev.items():
            ev_stats[key] += value
    return sums, counts, ev_stats


def _explained_variance(stats: dict[str, float]) -> float:
    """1 - Var(returns - values) / Var(returns) from summed statistics (nan when undefined)."""
    count = stats["count"]
    if count < 2:
        return float("nan")
    returns_var = stats["returns_sq_sum"] - stats["returns_sum"] ** 2 / count
    errors_var = stats["errors_sq_sum"] - stats["errors_sum"] ** 2 / count
    return float("nan") if returns_var == 0 else 1.0 - errors_var / returns_var
