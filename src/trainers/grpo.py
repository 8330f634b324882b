"""GRPO (Shao et al., 2024, "DeepSeekMath"), as RLinf's embodied pipeline trains the RLinf-OpenSora policies.

Advantages: a trajectory's score is the summed reward of its first episode (the steps the loss mask keeps). The
`group_size` consecutive trajectories that share a start are a group; a trajectory's advantage is
`(score - group mean) / (group std + 1e-6)` (unbiased std), the same for every valid action (`action_level`) or
chunk (`chunk_level`) of its first episode. With `filter_rewards`, the groups whose mean score lies outside
`[rewards_lower_bound, rewards_upper_bound]` (all failed or all succeeded: zero advantage, no signal) leave the
loss mask.

Loss: the clipped policy loss on these advantages (`trainers.losses.policy_loss`), minus `entropy_bonus` x the
entropy, plus `kl_beta` x the KL to the reference policy; no value function.

Logged under `train/`: `actor/policy_loss`, `actor/approx_kl`, `actor/clip_fraction`, `actor/clipped_ratio`,
`actor/ratio`, `actor/dual_clip_fraction`, `entropy_loss`, `actor/kl` (with `kl_beta > 0`) and `loss`, the means
over the update's micro-batches; the update adds `actor/grad_norm` and `actor/lr`.
"""

from __future__ import annotations

import torch

from trainers.advantages import Targets, compute_grpo_advantages, grpo_group_filter, per_reward
from trainers.config import AlgorithmConfig
from trainers.losses import LossInputs, policy_loss
from trainers.rollout import RolloutBatch

__all__ = ["grpo_loss", "grpo_scores", "grpo_targets"]


def grpo_scores(batch: RolloutBatch) -> torch.Tensor:
    """[B] the summed reward of each trajectory's first episode (RLinf's `calculate_scores`)."""
    return (batch.rewards * batch.loss_mask).sum(dim=(0, 2))


def grpo_targets(batch: RolloutBatch, algorithm: AlgorithmConfig, group_size: int) -> Targets:
    """Group-relative advantages and the loss mask of a batch (no returns: GRPO has no critic).

    Args:
        batch: B trajectories, groups of `group_size` consecutive ones sharing a start.
        algorithm: `reward_type` and the group filter (`filter_rewards`, `rewards_lower_bound`,
            `rewards_upper_bound`).
        group_size: trajectories per group.

    Returns:
        the `Targets`, with the scores.
    """
    mask = per_reward(batch.loss_mask, algorithm.reward_type, "any")  # [T, B, R]
    scores = grpo_scores(batch)  # [B]
    if algorithm.filter_rewards:
        keep = grpo_group_filter(scores, group_size, algorithm.rewards_lower_bound, algorithm.rewards_upper_bound)
        mask = mask & keep[None, :, None]
    advantages = compute_grpo_advantages(scores, group_size)  # [B]
    advantages = torch.where(mask, advantages[None, :, None], 0.0)  # [T, B, R]
    return Targets(advantages=advantages, returns=None, loss_mask=mask, scores=scores)


def grpo_loss(
    inputs: LossInputs, algorithm: AlgorithmConfig
) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """GRPO's loss of one micro-batch.

    Returns:
        (the 0-dim loss with gradient, its metrics as logged, no summed statistics).
    """
    loss, metrics = policy_loss(inputs, algorithm)
    metrics["loss"] = float(loss.detach())
    return loss, metrics, {}
