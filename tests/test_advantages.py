"""Advantage estimators: known answers, a plain-loop GAE, and parity with RLinf's reference vectors."""

import pytest
import torch

from trainers.advantages import (
    compute_gae,
    compute_grpo_advantages,
    grpo_group_filter,
    normalize_advantages,
)


def _gae_loop(rewards, values, dones, gamma, gae_lambda):
    """GAE written element by element in Python floats, as in CleanRL's ppo.py."""
    num_steps, batch = len(rewards), len(rewards[0])
    advantages = [[0.0] * batch for _ in range(num_steps)]
    for b in range(batch):
        last = 0.0
        for t in reversed(range(num_steps)):
            not_done = 1.0 - float(dones[t + 1][b])
            delta = rewards[t][b] + gamma * values[t + 1][b] * not_done - values[t][b]
            last = delta + gamma * gae_lambda * not_done * last
            advantages[t][b] = last
    return advantages


# GAE


@pytest.mark.reference
def test_gae_matches_reference(rl_math_reference):
    tensors = rl_math_reference.tensors
    gamma = rl_math_reference.setting("gae", "gamma")
    gae_lambda = rl_math_reference.setting("gae", "lambda")
    advantages, returns = compute_gae(
        tensors["gae_rewards"], tensors["gae_values"], tensors["gae_dones"], gamma, gae_lambda
    )
    torch.testing.assert_close(advantages, tensors["gae_advantages"], rtol=1e-5, atol=0)
    torch.testing.assert_close(returns, tensors["gae_returns"], rtol=1e-5, atol=0)


def test_gae_hand_computed_episode_end():
    # dones[2] ends the episode after step 1: step 1 neither bootstraps nor sees step 2's advantage.
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [1.0], [2.0], [3.0]])
    dones = torch.tensor([[False], [False], [True], [False]])
    advantages, returns = compute_gae(rewards, values, dones, gamma=0.5, gae_lambda=0.5)
    # step 2: 2 + 0.5*3 - 2 = 1.5; step 1: 0 - 1 = -1; step 0: (1 + 0.5*1 - 0.5) + 0.25*(-1) = 0.75
    torch.testing.assert_close(advantages, torch.tensor([[0.75], [-1.0], [1.5]]))
    torch.testing.assert_close(returns, torch.tensor([[1.25], [0.0], [3.5]]))


def test_gae_matches_plain_loop_with_dones_in_the_middle():
    generator = torch.Generator().manual_seed(0)
    num_steps, batch = 9, 4
    rewards = torch.randn(num_steps, batch, generator=generator)
    values = torch.randn(num_steps + 1, batch, generator=generator)
    dones = torch.rand(num_steps + 1, batch, generator=generator) < 0.25
    dones[4, 0] = True  # at least one episode boundary strictly inside the rollout
    advantages, returns = compute_gae(rewards, values, dones, gamma=0.99, gae_lambda=0.95)
    expected = torch.tensor(_gae_loop(rewards.tolist(), values.tolist(), dones.tolist(), 0.99, 0.95))
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(returns, expected + values[:-1], rtol=1e-5, atol=1e-6)


def test_gae_accepts_integer_dones():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 3, generator=generator)
    values = torch.randn(6, 3, generator=generator)
    dones = torch.rand(6, 3, generator=generator) < 0.3
    expected = compute_gae(rewards, values, dones, 0.9, 0.8)
    actual = compute_gae(rewards, values, dones.to(torch.uint8), 0.9, 0.8)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("values_shape", "dones_shape", "message"),
    [
        ((5, 3), (6, 3), r"values must have shape \(6, 3\).*got \(5, 3\)"),
        ((6, 3), (6, 2), r"dones must have shape \(6, 3\).*got \(6, 2\)"),
    ],
)
def test_gae_rejects_bad_shapes(values_shape, dones_shape, message):
    with pytest.raises(ValueError, match=message):
        compute_gae(torch.zeros(5, 3), torch.zeros(values_shape), torch.zeros(dones_shape), 0.99, 0.95)


def test_gae_rejects_out_of_range_discount():
    with pytest.raises(ValueError, match="gamma must lie in"):
        compute_gae(torch.zeros(2, 1), torch.zeros(3, 1), torch.zeros(3, 1), 1.5, 0.95)
    with pytest.raises(ValueError, match="dones must be a bool tensor"):
        compute_gae(torch.zeros(2, 1), torch.zeros(3, 1), torch.full((3, 1), 2.0), 0.99, 0.95)


# GRPO


@pytest.mark.reference
def test_grpo_matches_reference(rl_math_reference):
    tensors = rl_math_reference.tensors
    group_size = int(rl_math_reference.setting("grpo", "group_size"))
    expected = tensors["grpo_advantages"]  # [S, B]
    mask = torch.ones(expected.shape, dtype=torch.bool)
    advantages = compute_grpo_advantages(tensors["grpo_scores"], group_size, mask)
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=0)


def test_grpo_hand_computed_groups():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = compute_grpo_advantages(scores, group_size=4)
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: all equal, so no signal
    scale = 0.5 / (1.0 / 3.0) ** 0.5
    expected = torch.tensor([scale, -scale, -scale, scale, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-6)


def test_grpo_broadcasts_over_mask():
    scores = torch.tensor([3.0, 1.0, 0.0, 4.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0]], dtype=torch.uint8)
    per_trajectory = compute_grpo_advantages(scores, group_size=2)
    advantages = compute_grpo_advantages(scores, group_size=2, mask=mask)
    assert advantages.shape == (3, 4)
    torch.testing.assert_close(advantages, per_trajectory.expand(3, 4) * mask, rtol=0, atol=0)


def test_grpo_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"multiple of group_size \(4\)"):
        compute_grpo_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="at least 2"):
        compute_grpo_advantages(torch.zeros(6), group_size=1)
    with pytest.raises(ValueError, match=r"scores must have shape \(B,\).*got \(2, 4\)"):
        compute_grpo_advantages(torch.zeros(2, 4), group_size=4)
    with pytest.raises(ValueError, match=r"mask must have shape \(S, 8\).*got \(3, 4\)"):
        compute_grpo_advantages(torch.zeros(8), group_size=4, mask=torch.ones(3, 4))


# GRPO group filter


def test_filter_drops_all_fail_and_all_success_groups():
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    keep = grpo_group_filter(scores, group_size=4, lower=0.1, upper=0.9)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False] * 8 + [True] * 4


def test_filter_bounds_are_inclusive():
    scores = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # group means 0.75 and 0.25
    assert grpo_group_filter(scores, 4, lower=0.25, upper=0.75).tolist() == [True] * 8
    assert grpo_group_filter(scores, 4, lower=0.3, upper=0.75).tolist() == [True] * 4 + [False] * 4


def test_filter_rejects_bad_bounds():
    with pytest.raises(ValueError, match=r"lower \(0.9\) must not exceed upper \(0.1\)"):
        grpo_group_filter(torch.zeros(4), 2, lower=0.9, upper=0.1)


# Advantage normalization


def test_normalize_uses_only_valid_entries():
    generator = torch.Generator().manual_seed(2)
    advantages = torch.randn(6, 5, generator=generator) * 3 + 2
    mask = torch.rand(6, 5, generator=generator) < 0.6
    normalized = normalize_advantages(advantages, mask)
    valid = normalized[mask]
    torch.testing.assert_close(valid.mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(valid.std(), torch.tensor(1.0), rtol=0, atol=1e-4)

    changed = advantages.clone()
    changed[~mask] = 1e6
    torch.testing.assert_close(normalize_advantages(changed, mask)[mask], valid, rtol=0, atol=0)


def test_normalize_without_mask_and_with_too_few_valid_entries():
    advantages = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(normalize_advantages(advantages), torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4, rtol=0)
    empty = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(normalize_advantages(advantages, empty), advantages, rtol=0, atol=0)
    single = torch.tensor([False, True, False])
    torch.testing.assert_close(normalize_advantages(advantages, single), advantages, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shape of advantages \(3,\), got \(4,\)"):
        normalize_advantages(advantages, torch.ones(4, dtype=torch.bool))
