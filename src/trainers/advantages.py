"""Advantage estimators for PPO and GRPO on embodied rollouts, and `Targets`, what the update fits.

Pure functions on tensors (`trainers.grpo` and `trainers.ppo` apply them to a rollout), with the conventions of
RLinf's embodied pipeline (the one the RLinf-OpenSora checkpoints were trained with):

- Time-major layout: rewards are ``[T, B]`` (step, environment). Values and dones carry one extra
  leading row, ``[T + 1, B]``, so that ``values[t + 1]`` bootstraps step ``t`` and ``dones[t + 1]``
  says that the episode ended with step ``t`` (no bootstrapping across it).
- GRPO works on one scalar score per trajectory; groups are ``group_size`` consecutive
  trajectories (all rollouts of one task/initial state are stored next to each other).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat

__all__ = [
    "Targets",
    "compute_gae",
    "compute_grpo_advantages",
    "grpo_group_filter",
    "normalize_advantages",
    "per_reward",
]


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


def per_reward(tensor: torch.Tensor, reward_type: str, reduce: str) -> torch.Tensor:
    """[T, B, A] -> [T, B, R]: unchanged for `action_level`, reduced over the chunk (`reduce`: `sum` or `any`) for
    `chunk_level`."""
    if reward_type == "action_level":
        return tensor
    if reduce == "sum":
        return tensor.sum(dim=-1, keepdim=True)
    return tensor.any(dim=-1, keepdim=True)


def _as_bool_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Returns ``mask`` as a bool tensor; integer and float masks must hold only 0 and 1."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"{name} must be a bool tensor or hold only 0 and 1, got dtype {mask.dtype} with other values; "
            "pass a bool mask (True = valid)"
        )
    return mask != 0


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _check_group_size(scores: torch.Tensor, group_size: int) -> None:
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (B,) with one score per trajectory, got {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (the group std needs two samples), got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"the number of scores ({scores.shape[0]}) must be a multiple of group_size ({group_size}); "
            "store every rollout of a group next to each other and keep whole groups"
        )


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al., 2016), without normalization.

    ``delta_t = r_t + gamma * V_{t+1} * (1 - d_{t+1}) - V_t`` and
    ``A_t = delta_t + gamma * lambda * (1 - d_{t+1}) * A_{t+1}``, with ``A_T = 0``.

    Args:
        rewards: ``[T, B]`` reward of each step (any trailing batch dims are allowed: ``[T, *B]``).
        values: ``[T + 1, B]`` value estimates; row ``T`` bootstraps the last step.
        dones: ``[T + 1, B]`` bool (or 0/1) flags; ``dones[t + 1]`` ends the episode after step ``t``
            and stops both bootstrapping and the advantage recursion. ``dones[0]`` is not used.
        gamma: Discount factor in ``[0, 1]``.
        gae_lambda: GAE smoothing factor in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``[T, B]``, with ``returns = advantages + values[:T]``
        (computed as returns first, as the reference does, so the two agree bit for bit).

    Raises:
        ValueError: If shapes disagree or ``gamma``/``gae_lambda`` lie outside ``[0, 1]``.
    """
    if rewards.ndim < 2:
        raise ValueError(f"rewards must have shape (T, B), got {tuple(rewards.shape)}")
    expected = (rewards.shape[0] + 1, *rewards.shape[1:])
    for name, tensor in (("values", values), ("dones", dones)):
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} (one more step than rewards {tuple(rewards.shape)}), "
                f"got {tuple(tensor.shape)}"
            )
    _check_probability("gamma", gamma)
    _check_probability("gae_lambda", gae_lambda)

    not_done = ~_as_bool_mask("dones", dones)  # [T + 1, B]
    num_steps = rewards.shape[0]
    returns = torch.zeros_like(rewards)  # [T, B]
    gae = torch.zeros_like(rewards[0])  # [B]
    for step in reversed(range(num_steps)):
        delta = rewards[step] + gamma * values[step + 1] * not_done[step + 1] - values[step]
        gae = delta + gamma * gae_lambda * not_done[step + 1] * gae
        returns[step] = gae + values[step]
    advantages = returns - values[:-1]
    return advantages, returns


def compute_grpo_advantages(
    scores: torch.Tensor,
    group_size: int,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages (GRPO): ``(r - mean_group) / (std_group + eps)``.

    The std is the unbiased one (Bessel's correction), as in RLinf; a group whose scores are all
    equal gets advantage 0 for every member.

    Args:
        scores: ``[B]`` one score per trajectory; ``B = num_groups * group_size`` and the members of
            a group are consecutive.
        group_size: Number of trajectories per group, at least 2.
        mask: Optional ``[S, B]`` bool (or 0/1) mask over steps. When given, each trajectory's
            advantage is broadcast over its valid steps and is 0 elsewhere.
        eps: Added to the std before dividing; must be positive.

    Returns:
        ``[B]`` advantages, or ``[S, B]`` when ``mask`` is given.

    Raises:
        ValueError: On a bad shape, a ``B`` that is not a multiple of ``group_size``, or ``eps <= 0``.
    """
    _check_group_size(scores, group_size)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if mask is not None and (mask.ndim != 2 or mask.shape[1] != scores.shape[0]):
        raise ValueError(f"mask must have shape (S, {scores.shape[0]}) (steps, trajectories), got {tuple(mask.shape)}")

    grouped = rearrange(scores, "(g n) -> g n", n=group_size)  # [G, N]
    mean = grouped.mean(dim=-1, keepdim=True)  # [G, 1]
    std = grouped.std(dim=-1, keepdim=True)  # [G, 1]
    advantages = rearrange((grouped - mean) / (std + eps), "g n -> (g n)")  # [B]
    if mask is None:
        return advantages
    valid = _as_bool_mask("mask", mask)  # [S, B]
    return torch.where(valid, advantages, 0.0)  # [S, B]


def normalize_advantages(
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Whitens advantages with the mean and unbiased std of the valid entries (PPO batch norm).

    Every entry (valid or not) is shifted and scaled, so masked entries stay finite. With no valid
    entry the input comes back unchanged, as from RLinf's ``safe_normalize``; with exactly one it
    also comes back unchanged, where RLinf would return nan (the unbiased std of one value).

    Args:
        advantages: Advantages of any shape, e.g. ``[T, B]``.
        mask: Optional bool (or 0/1) mask of the same shape; ``None`` uses every entry.
        eps: Added to the std before dividing; must be positive.

    Returns:
        ``(advantages - mean) / (std + eps)``, same shape as ``advantages``.

    Raises:
        ValueError: If the mask shape differs from the advantages shape or ``eps <= 0``.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if mask is None:
        valid = advantages.reshape(-1)
    else:
        if mask.shape != advantages.shape:
            raise ValueError(
                f"mask must have the shape of advantages {tuple(advantages.shape)}, got {tuple(mask.shape)}"
            )
        valid = advantages[_as_bool_mask("mask", mask)]  # [num_valid]
    if valid.numel() < 2:
        return advantages
    return (advantages - valid.mean()) / (valid.std() + eps)


def grpo_group_filter(
    scores: torch.Tensor,
    group_size: int,
    lower: float,
    upper: float,
) -> torch.Tensor:
    """Keeps the GRPO groups whose mean score lies in ``[lower, upper]`` (both inclusive).

    Groups where every rollout fails or every rollout succeeds have zero advantage and carry no
    learning signal; RLinf drops them with ``rewards_lower_bound``/``rewards_upper_bound``.

    Args:
        scores: ``[B]`` one score per trajectory (e.g. the summed reward of the episode), groups of
            ``group_size`` consecutive trajectories.
        group_size: Number of trajectories per group, at least 2.
        lower: ``rewards_lower_bound``; groups with a smaller mean are dropped.
        upper: ``rewards_upper_bound``; groups with a larger mean are dropped.

    Returns:
        ``[B]`` bool keep mask, equal for all members of a group. Combine it with a ``[S, B]`` loss
        mask as ``loss_mask & keep``.

    Raises:
        ValueError: On a bad shape, a ``B`` that is not a multiple of ``group_size``, or ``lower > upper``.
    """
    _check_group_size(scores, group_size)
    if lower > upper:
        raise ValueError(f"lower ({lower}) must not exceed upper ({upper}); the kept interval is [lower, upper]")
    group_mean = rearrange(scores, "(g n) -> g n", n=group_size).mean(dim=-1)  # [G]
    keep = (group_mean >= lower) & (group_mean <= upper)  # [G]
    return repeat(keep, "g -> (g n)", n=group_size)  # [B]
