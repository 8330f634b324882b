"""PPO (Schulman et al., 2017) with GAE and the value head as critic, as RLinf's embodied pipeline runs it.

Advantages: GAE (Schulman et al., 2016) over the actions (`action_level`, one value per action) or the chunks
(`chunk_level`, one value per chunk and the chunk's rewards summed), `dones[t + 1]` stopping the bootstrap; the
returns are the value targets. With `normalize_advantages` the advantages are whitened with the mean and std of
the valid entries (of every rank under `torchrun`).

Loss: the clipped policy loss (`trainers.losses.policy_loss`, with its entropy bonus and KL penalty) plus the
clipped value loss, `max(huber(R - V), huber(R - V_clip))`.

Logged under `train/`: GRPO's metrics (see `trainers.grpo`), with `loss` the sum of both terms, plus
`critic/value_loss`, `critic/value_clip_ratio` and `critic/explained_variance` (over every valid entry of the
update, from summed statistics).
"""

from __future__ import annotations

import torch
from einops import rearrange

from trainers.advantages import Targets, compute_gae, normalize_advantages, per_reward
from trainers.config import AlgorithmConfig
from trainers.distributed import DistributedContext, normalize_advantages_global
from trainers.losses import LossInputs, critic_loss, policy_loss
from trainers.rollout import RolloutBatch

__all__ = ["EXPLAINED_VARIANCE_STATS", "explained_variance", "gae_targets", "ppo_loss"]

# The statistics of `critic_loss` whose sums over micro-batches (and ranks) give the explained variance.
EXPLAINED_VARIANCE_STATS = ("count", "returns_sum", "returns_sq_sum", "errors_sum", "errors_sq_sum")


def gae_targets(batch: RolloutBatch, algorithm: AlgorithmConfig, context: DistributedContext | None = None) -> Targets:
    """GAE advantages, returns and the loss mask of a batch.

    Args:
        batch: B trajectories with the rollout's values.
        algorithm: `reward_type`, `gamma`, `gae_lambda` and `normalize_advantages`.
        context: the job; with several ranks the whitening uses every rank's valid entries.

    Returns:
        the `Targets`, with the returns.

    Raises:
        ValueError: the batch has no values, or not one per reward.
    """
    mask = per_reward(batch.loss_mask, algorithm.reward_type, "any")  # [T, B, R]
    if batch.values is None:
        raise ValueError("adv_type 'gae' needs the rollout's values: use a policy with a value head")
    rewards = per_reward(batch.rewards, algorithm.reward_type, "sum")  # [T, B, R]
    dones = per_reward(batch.dones, algorithm.reward_type, "any")  # [T + 1, B, R]
    num_steps, per_step = rewards.shape[0], rewards.shape[2]
    if batch.values.shape[-1] != per_step:
        raise ValueError(
            f"reward_type {algorithm.reward_type!r} needs {per_step} value(s) per chunk, the policy gives "
            f"{batch.values.shape[-1]}: set actor.model.value_type to match algorithm.reward_type"
        )
    flat_rewards = rearrange(rewards, "t b r -> (t r) b")  # [T * R, B]
    # As RLinf: action-level dones/values span (T + 1) * R rows; dones keep the last T * R + 1 (the done before
    # the first action is the last entry of row 0), values the first T * R + 1 (row T's first value bootstraps).
    flat_dones = rearrange(dones, "t b r -> (t r) b")[per_step - 1 :]  # [T * R + 1, B]
    flat_values = rearrange(batch.values, "t b r -> (t r) b")[: num_steps * per_step + 1]  # [T * R + 1, B]
    advantages, returns = compute_gae(flat_rewards, flat_values, flat_dones, algorithm.gamma, algorithm.gae_lambda)
    advantages = rearrange(advantages, "(t r) b -> t b r", r=per_step)  # [T, B, R]
    returns = rearrange(returns, "(t r) b -> t b r", r=per_step)
    if algorithm.normalize_advantages:
        if context is not None and context.is_distributed:
            advantages = normalize_advantages_global(advantages, mask, context)
        else:
            advantages = normalize_advantages(advantages, mask)
    advantages = torch.where(mask, advantages, 0.0)
    return Targets(advantages=advantages, returns=returns, loss_mask=mask, scores=None)


def ppo_loss(inputs: LossInputs, algorithm: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """PPO's loss of one micro-batch: the policy term plus the value term.

    Returns:
        (the 0-dim loss with gradient, its metrics as logged, its `EXPLAINED_VARIANCE_STATS`, to be summed).

    Raises:
        ValueError: the policy gave no values.
    """
    if inputs.values is None:
        raise ValueError("adv_type 'gae' needs a policy with a value head")
    loss, metrics = policy_loss(inputs, algorithm)
    embodied: dict[str, object] = {}
    if inputs.max_episode_steps is not None:
        # [m, 1] broadcasts over the R values.
        embodied = {"max_episode_steps": inputs.max_episode_steps, "loss_mask_sum": inputs.loss_mask_sum}
    value_loss, critic_metrics = critic_loss(
        inputs.values,
        inputs.old_values,
        inputs.returns,
        inputs.mask[:, :, 0],
        algorithm.value_clip,
        algorithm.huber_delta,
        **embodied,
    )
    value_loss = value_loss * inputs.row_share
    metrics["critic/value_loss"] = float(critic_metrics["value_loss"]) * inputs.row_share
    metrics["critic/value_clip_ratio"] = float(critic_metrics["value_clip_ratio"])
    statistics = {key: float(critic_metrics[f"explained_variance_{key}"]) for key in EXPLAINED_VARIANCE_STATS}
    loss = loss + value_loss
    metrics["loss"] = float(loss.detach())
    return loss, metrics, statistics


def explained_variance(statistics: dict[str, float]) -> float:
    """1 - Var(returns - values) / Var(returns) from the summed `EXPLAINED_VARIANCE_STATS` (nan when undefined:
    fewer than 2 entries, none summed, or constant returns)."""
    count = statistics.get("count", 0.0)
    if count < 2:
        return float("nan")
    returns_var = statistics["returns_sq_sum"] - statistics["returns_sum"] ** 2 / count
    errors_var = statistics["errors_sq_sum"] - statistics["errors_sum"] ** 2 / count
    return float("nan") if returns_var == 0 else 1.0 - errors_var / returns_var
