"""The policy update, in CleanRL's shape: epoch -> (shuffled) mini-batch -> loss -> optimizer step.

One update reads like RLinf's embodied actor (`run_training`):

    order = shuffle(every chunk step of the rollout, masked ones included)   # seeded actor.seed + rank
    for epoch in range(update_epoch):
        for global_batch in order cut into global_batch_size rows:
            for micro_batch in global_batch cut into micro_batch_size rows:
                (the algorithm's loss(micro_batch) x its weight).backward()
            clip the gradient norm; AdamW step

The permutation is drawn once per update, from a generator seeded `actor.seed + rank`: every epoch passes over the
same global batches, and every training step draws the same permutation, as RLinf draws it. The number of optimizer
steps is fixed by the config. The loss is the algorithm's: `trainers.grpo.grpo_loss` or `trainers.ppo.ppo_loss`
(`algorithm.adv_type` `grpo` or `gae`).

A micro-batch's loss is aggregated as `algorithm.loss_aggregation` says:
- `embodied` (RLinf's default for the OpenSora + OpenVLA-OFT recipe): the actor and critic losses are
  `masked_mean_ratio` over all entries of the micro-batch (each trajectory weighted by `max_episode_steps` over
  its number of valid actions), the entropy and KL terms token-means of the micro-batch; the sum is divided by
  the number of micro-batches of a global batch.
- `token_mean`: every term is the token-mean over the valid entries of the whole global batch (all ranks).

Rows whose every entry is masked (after the first episode, or in filtered GRPO groups) add exactly zero to
every loss term: they count in the `embodied` denominators but are never run through the policy. A micro-batch
without a valid row is skipped; a global batch without one still steps the optimizer with zero gradients, as
RLinf's does. The logged loss metrics average the micro-batches that ran (`MetricAccumulator`).

With `actor.optim.critic_warmup_steps` N > 0 (RLinf's critic warm-up) the first N optimizer steps of the run train
the value head alone: the policy's parameters are frozen (no gradient, no Adam state, no weight decay) and its loss
terms are 0. After the N-th step the optimizer forgets its state (Adam's moments and step counts), as RLinf builds
a new optimizer then, and every parameter trains. `PolicyUpdater.optimizer_steps` counts the steps; checkpoints
keep it.

Under `torchrun` (a `ParallelPolicy` over several ranks) every rank shuffles its own rows and takes
`global_batch_size / ranks` of them per optimizer step; `trainers.distributed` plans the passes of each step over
the ranks (FSDP's padding, the token-mean's counts), stops every rank on a non-finite loss or weight, and
averages the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from trainers.advantages import Targets
from trainers.config import ActorConfig, AlgorithmConfig, RolloutConfig
from trainers.distributed import (
    DistributedContext,
    OptimizerStepPlan,
    ParallelPolicy,
    all_ranks_finite,
    first_failure,
    plan_optimizer_steps,
    rank_batch_size,
)
from trainers.grpo import grpo_loss
from trainers.losses import LossInputs
from trainers.ppo import explained_variance, ppo_loss
from trainers.rollout import RolloutBatch
from vla_policies.base import Policy, PolicyEvaluation

__all__ = [
    "LoraBaseReference",
    "MetricAccumulator",
    "NonFiniteLossError",
    "PolicyUpdater",
    "UpdateData",
    "flatten_for_update",
]


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
        optimizer: the optimizer over its trainable parameters (`trainers.build.build_optimizer`).
        algorithm: loss settings (clip ratios, critic, entropy and KL weights, aggregation, `update_epoch`).
        actor: batch sizes, the shuffling seed and the gradient clip.
        rollout: the temperature and top-k the log-probs are computed with (as at rollout time).
        max_episode_steps: the training env's episode limit in actions (the `embodied` aggregation's scale).
        reference: the frozen reference policy of the KL penalty (needed when `algorithm.kl_beta > 0`): a frozen
            copy, or a `LoraBaseReference`.
        parallel: how `policy` is spread over ranks (`policy` must be its `module`); None: one process.
    """

    def __init__(
        self,
        policy: Policy,
        optimizer: torch.optim.Optimizer,
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
        trainable = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
        if actor.optim.critic_warmup_steps > 0 and not any("value_head." in name for name, _ in trainable):
            raise ValueError("actor.optim.critic_warmup_steps > 0 needs a policy with a trainable value head")
        # The parameters a critic warm-up freezes.
        self.policy_parameters = [p for name, p in trainable if "value_head." not in name]
        self.optimizer_steps = 0
        self.parallel = parallel or ParallelPolicy(policy, "none", DistributedContext())
        # The rows of each rank per optimizer step.
        self.rank_batch_size = rank_batch_size(actor.global_batch_size, actor.micro_batch_size, self.parallel.context)
        self.policy = policy
        self.algorithm = algorithm
        self.actor = actor
        self.rollout = rollout
        self.max_episode_steps = max_episode_steps
        self.reference = reference
        self.optimizer = optimizer
        self.with_critic = algorithm.adv_type == "gae"
        self.algorithm_loss = ppo_loss if self.with_critic else grpo_loss

    def update(self, data: UpdateData) -> dict[str, float]:
        """Fits the policy to `data`; returns the mean metrics (keys as logged under `train/`).

        Raises:
            ValueError: this rank's rows do not split into whole global batches.
            NonFiniteLossError: a loss or gradient norm was not finite; the optimizer did not step on it.
        """
        actor, context, share = self.actor, self.parallel.context, self.rank_batch_size
        if len(data) == 0 or len(data) % share:
            raise ValueError(
                f"the rollout gives {len(data)} chunk steps on this rank, which must be a positive multiple of "
                f"actor.global_batch_size / ranks = {share}: choose env.train.total_num_envs, rollout_epoch and "
                "max_episode_steps so that chunk steps x sub-envs is a multiple of actor.global_batch_size"
            )
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(actor.seed + context.rank))
        runs_row = data.mask.reshape(len(data), -1).any(dim=1)  # [M] rows with a valid entry
        global_batches = [
            [micro[runs_row[micro]] for micro in order[start : start + share].split(actor.micro_batch_size)]
            for start in range(0, len(data), share)
        ]
        plans = plan_optimizer_steps(global_batches, data.mask, context, self.parallel.lockstep)

        metrics = MetricAccumulator()
        self.policy.train()
        for _ in range(self.algorithm.update_epoch):
            for plan in plans:
                self._optimizer_step(data, plan, metrics)
        self.optimizer.zero_grad(set_to_none=True)
        means, statistics = metrics.result(context)
        if self.with_critic and means:
            means["critic/explained_variance"] = explained_variance(statistics)
        return means

    @property
    def critic_warmup(self) -> bool:
        """Whether the next optimizer step trains the value head alone."""
        return self.optimizer_steps < self.actor.optim.critic_warmup_steps

    def _optimizer_step(self, data: UpdateData, plan: OptimizerStepPlan, metrics: MetricAccumulator) -> None:
        """Accumulates the gradients of one global batch's micro-batches, then clips and steps."""
        context = self.parallel.context
        warmup = self.critic_warmup
        for parameter in self.policy_parameters:
            parameter.requires_grad_(not warmup)
        self.optimizer.zero_grad(set_to_none=True)
        failure: tuple[str, dict[str, float]] | None = None
        last_metrics: dict[str, float] = {}
        for rows in plan.passes:
            if rows is None or failure is not None:
                # A zero-weighted pass (see `OptimizerStepPlan`; after a failure, for the other ranks' collectives).
                zero_rows = torch.arange(min(self.actor.micro_batch_size, len(data)))
                (self._loss(data, zero_rows)[0] * 0.0).backward()
                continue
            loss, last_metrics, statistics = self._loss(data, rows)
            if not torch.isfinite(loss):
                failure = (f"the loss is {loss.item()}", last_metrics)
                if self.parallel.lockstep:
                    continue
                break
            if self.algorithm.loss_aggregation == "embodied":
                weight = 1.0 / plan.micro_batches
            else:
                weight = plan.token_mean_weight(int(data.mask[rows].sum()))
            (loss * weight).backward()
            metrics.add(last_metrics, statistics)
        failure = first_failure(failure, context)
        if failure is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(*failure)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.parallel.sync_gradients(params)
        grad_norm = self.parallel.local_norm(torch.nn.utils.clip_grad_norm_(params, self.actor.optim.clip_grad))
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the gradient norm is {grad_norm.item()}", last_metrics)
        self.optimizer.step()
        # A finite loss and gradient can still step to non-finite weights (e.g. an overflowing Adam moment).
        if not all_ranks_finite(params, context):
            raise NonFiniteLossError("the weights are not finite after the optimizer step", last_metrics)
        self.optimizer_steps += 1
        if warmup and not self.critic_warmup:
            self.optimizer.state.clear()  # RLinf's new optimizer after the warm-up
            for parameter in self.policy_parameters:
                parameter.requires_grad_(True)
        lr = 0.0 if warmup else self.optimizer.param_groups[0]["lr"]
        metrics.add({"actor/grad_norm": float(grad_norm), "actor/lr": lr})

    def _loss(self, data: UpdateData, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """The algorithm's loss of rows `rows` of `data` (one micro-batch's rows with a valid entry), its metrics
        and summed statistics."""
        policy, algorithm = self.policy, self.algorithm
        device = policy.device
        obs = {"image": data.images[rows], "task": [data.tasks[i] for i in rows.tolist()]}
        tokens = data.action_tokens[rows]
        temperature, top_k = self.rollout.temperature_train, self.rollout.top_k
        evaluation = policy.evaluate(obs, tokens, temperature=temperature, top_k=top_k)
        reference = None
        if algorithm.kl_beta > 0:
            with torch.no_grad():
                reference = self.reference.evaluate(obs, tokens, temperature=temperature, top_k=top_k)

        def per_action(tensor: torch.Tensor) -> torch.Tensor:
            return rearrange(tensor, "m (a d) -> m a d", d=policy.action_dim)  # [m, A, action_dim]

        embodied = algorithm.loss_aggregation == "embodied"
        inputs = LossInputs(
            logprobs=per_action(evaluation.logprobs.float()),
            old_logprobs=per_action(data.logprobs[rows].to(device)),
            entropy=per_action(evaluation.entropy.float()),
            ref_logprobs=None if reference is None else per_action(reference.logprobs.float()),
            advantages=data.advantages[rows].to(device)[:, :, None],  # [m, R, 1]
            mask=data.mask[rows].to(device)[:, :, None],  # [m, R, 1]
            loss_mask_sum=data.loss_mask_sum[rows].to(device),  # [m, 1]
            values=None if evaluation.values is None else evaluation.values.float(),
            old_values=None if data.values is None else data.values[rows].to(device),
            returns=None if data.returns is None else data.returns[rows].to(device),
            max_episode_steps=self.max_episode_steps if embodied else None,
            row_share=len(rows) / self.actor.micro_batch_size if embodied else 1.0,
            critic_warmup=self.critic_warmup,
        )
        return self.algorithm_loss(inputs, algorithm)


class MetricAccumulator:
    """Means of the logged metrics over every micro-batch and optimizer step (of every rank), and the sums of the
    summed statistics (the explained variance's)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.statistics: dict[str, float] = {}

    def add(self, metrics: dict[str, float], statistics: dict[str, float] | None = None) -> None:
        """Adds one value of each metric in `metrics`, and `statistics` to the summed statistics."""
        self._add(metrics, dict.fromkeys(metrics, 1), statistics or {})

    def result(self, context: DistributedContext) -> tuple[dict[str, float], dict[str, float]]:
        """(the mean of each metric, the summed statistics) over every rank, keys in first-seen order; a collective
        when distributed."""
        merged = self
        if context.is_distributed:
            merged = MetricAccumulator()
            for part in context.all_gather_objects((self.sums, self.counts, self.statistics)):
                merged._add(*part)
        return {key: merged.sums[key] / merged.counts[key] for key in merged.sums}, merged.statistics

    def _add(self, sums: dict[str, float], counts: dict[str, int], statistics: dict[str, float]) -> None:
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + counts[key]
        for key, value in statistics.items():
            self.statistics[key] = self.statistics.get(key, 0.0) + value
