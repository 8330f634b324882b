"""The policy update: clipped PPO/GRPO actor loss, optional critic, entropy and KL terms, AdamW with two groups.

One update reads like the pseudocode: for `update_epoch` passes, shuffle the valid chunk steps, cut them into
global batches of `global_batch_size`; per global batch, accumulate the gradients of its micro-batches of
`micro_batch_size` (each weighted by its share of the global batch), clip the gradient norm, step AdamW. Chunk
steps where every action is masked (after the first episode, or in filtered GRPO groups) are left out: they
would add nothing but compute.

Under `torchrun` (a `ParallelPolicy` over several ranks) the global batch is spread over the ranks; see
`trainers.distributed` for how the micro-batches are weighted so the step equals the one-process step.
"""

from __future__ import annotations

import math
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
    """The M valid chunk steps of a batch, flattened (R rewards per chunk, V values per chunk, K tokens).

    Attributes:
        images: [M, H, W, 3] uint8.
        tasks: M task strings.
        action_tokens: [M, K] int64.
        logprobs: [M, K] float32 rollout log-probs.
        advantages: [M, R] float32.
        mask: [M, R] bool.
        returns: [M, R] float32, or None without a critic.
        values: [M, V] float32 rollout values, or None without a critic.
    """

    images: torch.Tensor
    tasks: list[str]
    action_tokens: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    returns: torch.Tensor | None
    values: torch.Tensor | None

    def __len__(self) -> int:
        return self.action_tokens.shape[0]


def flatten_for_update(batch: RolloutBatch, targets: Targets, with_critic: bool) -> UpdateData:
    """Keeps the chunk steps with at least one valid action, as rows `(t, b)` in time-major order."""
    valid = targets.loss_mask.any(dim=-1)  # [T, B]
    rows = valid.reshape(-1).nonzero().squeeze(1)  # [M] indices into the (t b) order

    def flat(tensor: torch.Tensor) -> torch.Tensor:
        return rearrange(tensor, "t b ... -> (t b) ...")[rows]

    tasks = [task for step in batch.tasks for task in step]  # (t b) order
    return UpdateData(
        images=flat(batch.images),
        tasks=[tasks[i] for i in rows.tolist()],
        action_tokens=flat(batch.action_tokens),
        logprobs=flat(batch.logprobs),
        advantages=flat(targets.advantages),
        mask=flat(targets.loss_mask),
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
        algorithm: loss settings (clip ratios, critic, entropy and KL weights, `update_epoch`).
        actor: batch sizes and the optimizer settings.
        rollout: the temperature and top-k the log-probs are computed with (as at rollout time).
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
        reference: Policy | LoraBaseReference | None = None,
        parallel: ParallelPolicy | None = None,
    ):
        if algorithm.kl_beta > 0 and reference is None:
            raise ValueError("algorithm.kl_beta > 0 needs a reference policy")
        if parallel is not None and parallel.module is not policy:
            raise ValueError("parallel.module must be the updated policy")
        world_size = 1 if parallel is None else parallel.context.world_size
        if actor.global_batch_size % world_size:
            raise ValueError(
                f"actor.global_batch_size ({actor.global_batch_size}) must be a multiple of the number of ranks "
                f"({world_size}): each rank takes an equal share of every global batch"
            )
        self.policy = policy
        self.algorithm = algorithm
        self.actor = actor
        self.rollout = rollout
        self.reference = reference
        self.parallel = parallel
        self.optimizer = build_optimizer(policy, actor)
        self.with_critic = algorithm.adv_type == "gae"

    def update(self, data: UpdateData, generator: torch.Generator) -> dict[str, float]:
        """Fits the policy to `data`; returns the mean metrics (keys as logged under `train/`).

        Raises:
            NonFiniteLossError: a loss or gradient norm was not finite; the optimizer did not step on it.
        """
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        last_metrics: dict[str, float] = {}
        ev_stats = dict.fromkeys(EXPLAINED_VARIANCE_STATS, 0.0)

        def record(metrics: dict[str, float]) -> None:
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1

        self.policy.train()
        parallel = self.parallel
        context = DistributedContext() if parallel is None else parallel.context
        lockstep = parallel is not None and parallel.lockstep
        # Under lockstep a rank without rows to fit still runs zero-weighted passes over a padding row.
        own = 0 if lockstep and not bool(data.mask.any()) else len(data)
        row_counts = context.all_gather_objects(own)  # rows to fit on every rank
        if sum(row_counts) == 0:
            return {}
        if lockstep and len(data) == 0:
            raise ValueError("under actor.strategy 'fsdp' every rank needs at least one (padding) row to run passes")
        micro_size = self.actor.micro_batch_size
        share = self.actor.global_batch_size // context.world_size  # rows of each rank per optimizer step
        num_steps = max(math.ceil(count / share) for count in row_counts)
        for _ in range(self.algorithm.update_epoch):
            order = torch.randperm(own, generator=generator)
            for start in range(0, num_steps * share, share):
                rows = order[start : start + share]
                step_counts = [min(max(count - start, 0), share) for count in row_counts]  # rows of every rank
                micro_batches: list[torch.Tensor | None] = [m for m in torch.split(rows, micro_size) if len(m)]
                if lockstep:
                    passes = max(math.ceil(count / micro_size) for count in step_counts)
                    micro_batches += [None] * (passes - len(micro_batches))
                self.optimizer.zero_grad(set_to_none=True)
                failure: tuple[str, dict[str, float]] | None = None
                for micro in micro_batches:
                    if micro is None or failure is not None:
                        # FSDP's collectives need this pass on every rank; its gradient is zero.
                        padding = torch.arange(min(micro_size, len(data)))
                        (self._micro_batch_loss(data, padding)[0] * 0.0).backward()
                        continue
                    loss, metrics, stats = self._micro_batch_loss(data, micro)
                    last_metrics = metrics
                    if not torch.isfinite(loss):
                        failure = (f"the loss is {loss.item()}", metrics)
                        if lockstep:
                            continue
                        break
                    (loss * (context.world_size * len(micro) / sum(step_counts))).backward()
                    record(metrics)
                    for key in stats:
                        ev_stats[key] += stats[key]
                failure = _first_failure(context.all_gather_objects(failure), context.rank)
                if failure is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(*failure)
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                if parallel is not None:
                    parallel.sync_gradients(params)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.actor.optim.clip_grad)
                if parallel is not None:
                    grad_norm = parallel.local_norm(grad_norm)
                if not torch.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(f"the gradient norm is {grad_norm.item()}", last_metrics)
                self.optimizer.step()
                record({"actor/grad_norm": float(grad_norm), "actor/lr": self.optimizer.param_groups[0]["lr"]})
        self.optimizer.zero_grad(set_to_none=True)
        if context.is_distributed:
            sums, counts, ev_stats = _merge_statistics(context.all_gather_objects((sums, counts, ev_stats)))
        result = {key: sums[key] / counts[key] for key in sums}
        if self.with_critic:
            result["critic/explained_variance"] = _explained_variance(ev_stats)
        return result

    def _micro_batch_loss(
        self, data: UpdateData, rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """The loss of rows `rows` of `data`, its metrics and the explained-variance sums."""
        policy, algorithm = self.policy, self.algorithm
        device = policy.device
        obs = {"image": data.images[rows], "task": [data.tasks[i] for i in rows.tolist()]}
        tokens = data.action_tokens[rows]
        temperature, top_k = self.rollout.temperature_train, self.rollout.top_k
        evaluation = policy.evaluate(obs, tokens, temperature=temperature, top_k=top_k)

        def per_action(tensor: torch.Tensor) -> torch.Tensor:
            return rearrange(tensor, "m (a d) -> m a d", d=policy.action_dim)  # [m, A, action_dim]

        logprobs = per_action(evaluation.logprobs.float())
        old_logprobs = per_action(data.logprobs[rows].to(device))
        mask = data.mask[rows].to(device)[:, :, None]  # [m, R, 1]: R = A or 1 broadcasts over the tokens
        advantages = data.advantages[rows].to(device)[:, :, None]  # [m, R, 1]
        loss, actor_metrics = actor_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            algorithm.clip_ratio_low,
            algorithm.clip_ratio_high,
            algorithm.clip_ratio_c,
        )
        metrics = {f"actor/{key}": float(actor_metrics[key]) for key in ACTOR_METRICS}
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
            value_loss, critic_metrics = critic_loss(
                evaluation.values.float(),
                data.values[rows].to(device),
                data.returns[rows].to(device),
                data.mask[rows].to(device),
                algorithm.value_clip,
                algorithm.huber_delta,
            )
            metrics["critic/value_loss"] = float(critic_metrics["value_loss"])
            metrics["critic/value_clip_ratio"] = float(critic_metrics["value_clip_ratio"])
            stats = {key: float(critic_metrics[f"explained_variance_{key}"]) for key in EXPLAINED_VARIANCE_STATS}
            loss = loss + value_loss
        metrics["loss"] = float(loss.detach())
        return loss, metrics, stats


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
