"""Advantages (and returns) of a rollout batch: GRPO scores with the group filter, or GAE.

Both follow RLinf's embodied pipeline: the loss mask keeps the first episode of each trajectory; a GRPO score is
that episode's summed reward; GAE runs over actions (`action_level`) or chunks (`chunk_level`) with `dones[t + 1]`
stopping the bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from trainers.advantages import compute_gae, compute_grpo_advantages, grpo_group_filter, normalize_advantages
from trainers.config import AlgorithmConfig
from trainers.rollout import RolloutBatch

__all__ = ["Targets", "compute_targets", "grpo_scores"]


@dataclass(frozen=True)
class Targets:
    """What the update fits, per chunk step of a `RolloutBatch` (R = A for `action_level`, 1 for `chunk_level`).

    Attributes:
        advantages: [T, B, R] float32, zero where `loss_mask` is false.
        returns: [T, B, R] float32 value targets (GAE), or None (GRPO).
        loss_mask: [T, B, R] bool: the first episode, minus the groups the GRPO filter dropped.
        scores: [B] float32 GRPO scores, or None (GAE).
    """

    advantages: torch.Tensor
    returns: torch.Tensor | None
    loss_mask: torch.Tensor
    scores: torch.Tensor | None


def grpo_scores(batch: RolloutBatch) -> torch.Tensor:
    """[B] the summed reward of each trajectory's first episode (RLinf's `calculate_scores`)."""
    return (batch.rewards * batch.loss_mask).sum(dim=(0, 2))


def _per_reward(tensor: torch.Tensor, reward_type: str, reduce: str) -> torch.Tensor:
    """[T, B, A] -> [T, B, R]: unchanged for `action_level`, reduced over the chunk for `chunk_level`."""
    if reward_type == "action_level":
        return tensor
    if reduce == "sum":
        return tensor.sum(dim=-1, keepdim=True)
    return tensor.any(dim=-1, keepdim=True)


def compute_targets(batch: RolloutBatch, algorithm: AlgorithmConfig, group_size: int) -> Targets:
    """Advantages, returns and the final loss mask of a batch.

    Args:
        batch: B trajectories, groups of `group_size` consecutive ones sharing a start.
        algorithm: `adv_type`, `reward_type`, the GRPO filter, GAE's `gamma` / `gae_lambda` and
            `normalize_advantages` (GAE only: GRPO advantages are already standardized within each group).

    Returns:
        the `Targets`.
    """
    mask = _per_reward(batch.loss_mask, algorithm.reward_type, "any")  # [T, B, R]
    if algorithm.adv_type == "grpo":
        scores = grpo_scores(batch)  # [B]
        if algorithm.filter_rewards:
            keep = grpo_group_filter(
                scores, group_size, algorithm.rewards_lower_bound, algorithm.rewards_upper_bound
            )  # [B]
            mask = mask & keep[None, :, None]
        advantages = compute_grpo_advantages(scores, group_size)  # [B]
        advantages = torch.where(mask, advantages[None, :, None], 0.0)  # [T, B, R]
        return Targets(advantages=advantages, returns=None, loss_mask=mask, scores=scores)

    if batch.values is None:
        raise ValueError("adv_type 'gae' needs the rollout's values: use a policy with a value head")
    rewards = _per_reward(batch.rewards, algorithm.reward_type, "sum")  # [T, B, R]
    dones = _per_reward(batch.dones, algorithm.reward_type, "any")  # [T + 1, B, R]
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
        advantages = normalize_advantages(advantages, mask)
    advantages = torch.where(mask, advantages, 0.0)
    return Targets(advantages=advantages, returns=returns, loss_mask=mask, scores=None)
