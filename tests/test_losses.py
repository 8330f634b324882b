"""PPO losses and KL penalty: known answers, masking, and parity with RLinf's reference vectors."""

import math

import pytest
import torch

from trainers.losses import actor_loss, critic_loss, huber_loss, kl_penalty, masked_mean, masked_mean_ratio

CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 3.0


def _single_token(ratio: float, advantage: float, clip_ratio_c: float | None = CLIP_C):
    logprobs = torch.tensor([math.log(ratio)], requires_grad=True)
    loss, metrics = actor_loss(
        logprobs, torch.zeros(1), torch.tensor([advantage]), None, CLIP_LOW, CLIP_HIGH, clip_ratio_c
    )
    return logprobs, loss, metrics


# Actor


@pytest.mark.reference
def test_actor_loss_and_every_metric_match_reference(rl_math_reference):
    tensors = rl_math_reference.tensors
    prefix = "actor_metric_actor_"
    loss, metrics = actor_loss(
        tensors["actor_logprobs"],
        tensors["actor_old_logprobs"],
        tensors["actor_advantages"],
        tensors["actor_mask"],
        clip_ratio_low=rl_math_reference.setting("actor", "clip_ratio_low"),
        clip_ratio_high=rl_math_reference.setting("actor", "clip_ratio_high"),
        clip_ratio_c=rl_math_reference.setting("actor", "clip_ratio_c"),
    )
    torch.testing.assert_close(loss.reshape(1), tensors["actor_loss"], rtol=1e-5, atol=0)
    reference_names = [key.removeprefix(prefix) for key in tensors if key.startswith(prefix)]
    assert {"approx_kl", "clip_fraction", "clipped_ratio", "ratio", "policy_loss"} <= set(reference_names)
    for name in reference_names:
        assert name in metrics, f"reference metric {name!r} is missing from actor_loss metrics"
        torch.testing.assert_close(
            metrics[name].reshape(1), tensors[prefix + name], rtol=1e-5, atol=0, msg=f"actor metric {name}"
        )


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected_loss", "clipped", "dual_clipped"),
    [
        (1.5, 1.0, -1.28, True, False),  # A > 0, ratio above 1 + high: gain capped
        (0.5, 1.0, -0.5, False, False),  # A > 0, ratio below 1 - low: unclipped (pessimistic side)
        (1.5, -1.0, 1.5, False, False),  # A < 0, ratio above 1 + high: unclipped (pessimistic side)
        (0.5, -1.0, 0.8, True, False),  # A < 0, ratio below 1 - low: clipped at 0.8
        (4.0, -1.0, 3.0, False, True),  # A < 0, ratio far above: dual clip caps the loss at c * |A|
        (1.0, 2.0, -2.0, False, False),  # on-policy
    ],
)
def test_actor_clipping_cases(ratio, advantage, expected_loss, clipped, dual_clipped):
    _, loss, metrics = _single_token(ratio, advantage)
    torch.testing.assert_close(loss, torch.tensor(expected_loss), rtol=1e-6, atol=1e-6)
    assert metrics["clip_fraction"].item() == float(clipped)
    assert metrics["dual_clip_fraction"].item() == float(dual_clipped)
    expected_clipped_ratio = min(max(ratio, 1 - CLIP_LOW), 1 + CLIP_HIGH)
    torch.testing.assert_close(metrics["clipped_ratio"], torch.tensor(expected_clipped_ratio))
    torch.testing.assert_close(metrics["dual_cliped_ratio"], torch.tensor(ratio if dual_clipped else 0.0))


def test_actor_without_dual_clip_keeps_large_loss():
    _, loss, metrics = _single_token(4.0, -1.0, clip_ratio_c=None)
    torch.testing.assert_close(loss, torch.tensor(4.0))
    assert metrics["dual_clip_fraction"].item() == 0.0


@pytest.mark.parametrize(("ratio", "advantage", "has_gradient"), [(1.5, 1.0, False), (1.1, 1.0, True)])
def test_actor_gradient_vanishes_only_when_clipped(ratio, advantage, has_gradient):
    logprobs, loss, _ = _single_token(ratio, advantage)
    loss.backward()
    # d(-A * exp(logp - old)) / d logp = -A * ratio when the unclipped term is active
    expected = -advantage * ratio if has_gradient else 0.0
    torch.testing.assert_close(logprobs.grad, torch.tensor([expected]))


def test_actor_metrics_known_answers():
    log_ratio = 0.1
    logprobs = torch.full((2, 3, 4), -1.0 + log_ratio)
    old_logprobs = torch.full((2, 3, 4), -1.0)
    advantages = torch.ones(2, 3, 1)
    loss, metrics = actor_loss(logprobs, old_logprobs, advantages, None, CLIP_LOW, CLIP_HIGH, CLIP_C)
    ratio = math.exp(log_ratio)
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(-log_ratio))
    torch.testing.assert_close(metrics["ratio"], torch.tensor(ratio))
    torch.testing.assert_close(metrics["ratio_abs"], torch.tensor(ratio - 1))
    torch.testing.assert_close(loss, torch.tensor(-ratio))
    torch.testing.assert_close(metrics["policy_loss_abs"], torch.tensor(ratio))
    assert metrics["clip_fraction"].item() == 0.0


def test_actor_mask_excludes_tokens_completely():
    generator = torch.Generator().manual_seed(0)
    shape = (4, 3, 5)
    logprobs = torch.randn(shape, generator=generator) * 0.3 - 1
    old_logprobs = logprobs + torch.randn(shape, generator=generator) * 0.3
    advantages = torch.randn(4, 3, 1, generator=generator)
    chunk_mask = torch.rand(4, 3, 1, generator=generator) < 0.5
    chunk_mask[0, 0] = True
    loss, metrics = actor_loss(logprobs, old_logprobs, advantages, chunk_mask, CLIP_LOW, CLIP_HIGH, CLIP_C)

    # Anything (even inf) under the mask changes nothing.
    garbage = ~chunk_mask.expand(shape)
    logprobs_g = logprobs.masked_fill(garbage, float("inf")).requires_grad_()
    loss_g, metrics_g = actor_loss(
        logprobs_g,
        old_logprobs.masked_fill(garbage, -5.0),
        advantages.masked_fill(~chunk_mask, 100.0),
        chunk_mask,
        CLIP_LOW,
        CLIP_HIGH,
        CLIP_C,
    )
    torch.testing.assert_close(loss_g, loss, rtol=0, atol=0)
    loss_g.backward()
    assert torch.isfinite(logprobs_g.grad).all()
    assert (logprobs_g.grad[garbage] == 0).all()
    for name, value in metrics.items():
        torch.testing.assert_close(metrics_g[name], value, rtol=0, atol=0, msg=name)

    # The masked loss is the token-mean over the valid tokens alone.
    keep = chunk_mask.expand(shape)
    loss_subset, _ = actor_loss(
        logprobs[keep], old_logprobs[keep], advantages.expand(shape)[keep], None, CLIP_LOW, CLIP_HIGH, CLIP_C
    )
    torch.testing.assert_close(loss, loss_subset, rtol=1e-6, atol=1e-7)


def test_actor_rejects_bad_inputs():
    logprobs = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(4, 3\), got \(4, 2\)"):
        actor_loss(logprobs, torch.zeros(4, 2), torch.zeros(4, 3), None, 0.2, 0.28)
    with pytest.raises(ValueError, match=r"advantages must have shape \(4, 3\).*got \(3, 4\)"):
        actor_loss(logprobs, logprobs, torch.zeros(3, 4), None, 0.2, 0.28)
    with pytest.raises(ValueError, match=r"mask must have shape \(4, 3\).*got \(4, 3, 2\)"):
        actor_loss(logprobs, logprobs, logprobs, torch.ones(4, 3, 2, dtype=torch.bool), 0.2, 0.28)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        actor_loss(logprobs, logprobs, logprobs, None, 0.2, 0.28, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match=r"clip_ratio_low must lie in \[0, 1\)"):
        actor_loss(logprobs, logprobs, logprobs, None, 1.0, 0.28)
    with pytest.raises(ValueError, match="float32 or float64"):
        actor_loss(logprobs.half(), logprobs, logprobs, None, 0.2, 0.28)


# Critic


@pytest.mark.reference
def test_critic_loss_and_metrics_match_reference(rl_math_reference):
    tensors = rl_math_reference.tensors
    loss, metrics = critic_loss(
        tensors["critic_values"],
        tensors["critic_prev_values"],
        tensors["critic_returns"],
        tensors["critic_mask"],
        value_clip=rl_math_reference.setting("critic", "value_clip"),
        huber_delta=rl_math_reference.setting("critic", "huber_delta"),
    )
    torch.testing.assert_close(loss.reshape(1), tensors["critic_loss"], rtol=1e-5, atol=0)
    # RLinf logs "critic/<name>" and the summable stats as "__sum__/_critic_explained_variance/<stat>".
    prefixes = {"critic_metric_critic_": "", "critic_metric___sum____critic_explained_variance_": "explained_variance_"}
    checked = []
    for key, expected in tensors.items():
        for prefix, ours in prefixes.items():
            if key.startswith(prefix):
                name = ours + key.removeprefix(prefix)
                assert name in metrics, f"reference metric {key!r} has no counterpart {name!r}"
                torch.testing.assert_close(metrics[name].reshape(1), expected, rtol=1e-5, atol=0, msg=name)
                checked.append(name)
    assert "value_clip_ratio" in checked and "value_loss" in checked


def test_critic_clipping_known_answers():
    old_values = torch.tensor([0.0, 0.0, 0.0])
    values = torch.tensor([1.0, 0.1, 0.0])
    returns = torch.tensor([1.0, 0.1, 20.0])
    loss, metrics = critic_loss(values, old_values, returns, None, value_clip=0.2, huber_delta=10.0)
    # entry 0: V moved 1.0 but clips to 0.2, so the clipped error 0.8 wins: 0.5 * 0.64
    # entry 1: inside the clip band, zero error
    # entry 2: error 20 is in Huber's linear part: 10 * (20 - 5)
    torch.testing.assert_close(loss, torch.tensor((0.32 + 0.0 + 150.0) / 3))
    torch.testing.assert_close(metrics["value_clip_fraction"], torch.tensor(1 / 3))


def test_critic_mask_and_explained_variance():
    generator = torch.Generator().manual_seed(3)
    returns = torch.randn(6, 4, generator=generator)
    values = returns + 0.3 * torch.randn(6, 4, generator=generator)
    old_values = values + 0.1 * torch.randn(6, 4, generator=generator)
    mask = torch.rand(6, 4, generator=generator) < 0.7
    loss, metrics = critic_loss(values, old_values, returns, mask, 0.2, 10.0)
    loss_subset, metrics_subset = critic_loss(values[mask], old_values[mask], returns[mask], None, 0.2, 10.0)
    torch.testing.assert_close(loss, loss_subset, rtol=1e-6, atol=1e-7)
    for name in ("explained_variance", "value_clip_fraction"):
        torch.testing.assert_close(metrics[name], metrics_subset[name], rtol=1e-6, atol=1e-7, msg=name)
    errors = returns[mask] - values[mask]
    expected_ev = 1 - errors.var(unbiased=False) / returns[mask].var(unbiased=False)
    torch.testing.assert_close(metrics["explained_variance"], expected_ev, rtol=1e-4, atol=1e-5)
    assert metrics["explained_variance_count"].item() == mask.sum().item()

    _, perfect = critic_loss(returns, returns, returns, None, 0.2, 10.0)
    torch.testing.assert_close(perfect["explained_variance"], torch.tensor(1.0))
    _, constant = critic_loss(values, values, torch.ones(6, 4), None, 0.2, 10.0)
    assert math.isnan(constant["explained_variance"].item())


def test_critic_rejects_bad_inputs():
    values = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"returns must have shape \(4, 3\), got \(4,\)"):
        critic_loss(values, values, torch.zeros(4), None, 0.2, 10.0)
    with pytest.raises(ValueError, match="value_clip must be positive"):
        critic_loss(values, values, values, None, 0.0, 10.0)
    with pytest.raises(ValueError, match="huber_delta must be positive"):
        critic_loss(values, values, values, None, 0.2, -1.0)


def test_huber_loss_pieces():
    errors = torch.tensor([-3.0, 0.5, 2.0])
    torch.testing.assert_close(huber_loss(errors, 2.0), torch.tensor([2.0 * (3.0 - 1.0), 0.125, 2.0]))


# KL penalty and masked mean


def test_kl_penalty_k3_known_answer_and_mask():
    logprobs = torch.tensor([[0.0, -1.0], [-2.0, 0.0]])
    ref_logprobs = torch.tensor([[math.log(2.0), -1.0], [-2.0, 50.0]])
    mask = torch.tensor([[True, True], [True, False]])
    # token 0: d = log 2, exp(d) - d - 1 = 1 - log 2; tokens 1 and 2: d = 0; token 3 masked out
    expected = (1 - math.log(2.0)) / 3
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, mask), torch.tensor(expected))
    # unmasked, the outlier saturates at the cap of 10
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs), torch.tensor((1 - math.log(2.0) + 10) / 4))
    with pytest.raises(ValueError, match=r"ref_logprobs must have shape \(2, 2\), got \(2,\)"):
        kl_penalty(logprobs, torch.zeros(2))


def test_kl_penalty_is_non_negative_and_zero_on_policy():
    generator = torch.Generator().manual_seed(4)
    logprobs = torch.randn(5, 7, generator=generator)
    assert kl_penalty(logprobs, logprobs).item() == 0.0
    assert kl_penalty(logprobs, torch.randn(5, 7, generator=generator)).item() > 0.0


def test_masked_mean_counts_broadcast_tokens_and_handles_empty_mask():
    x = torch.tensor([[1.0, 3.0], [float("inf"), 7.0]])
    row_mask = torch.tensor([[True], [False]])
    torch.testing.assert_close(masked_mean(x, row_mask), torch.tensor(2.0))
    assert masked_mean(x, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 2\).*got \(3,\)"):
        masked_mean(x, torch.ones(3, dtype=torch.bool))


# RLinf's embodied aggregation (masked_mean_ratio)


@pytest.mark.reference
def test_embodied_actor_loss_matches_reference(rl_math_reference):
    tensors = rl_math_reference.tensors
    # The embodied case runs without dual clip; the clip ratios are the actor block's.
    assert "clip_ratio_c=None" in rl_math_reference.meta["embodied"]
    loss, _ = actor_loss(
        tensors["emb_actor_logprobs"],
        tensors["emb_actor_old_logprobs"],
        tensors["emb_actor_advantages"],
        tensors["emb_actor_mask"],
        clip_ratio_low=rl_math_reference.setting("actor", "clip_ratio_low"),
        clip_ratio_high=rl_math_reference.setting("actor", "clip_ratio_high"),
        clip_ratio_c=None,
        loss_mask_sum=tensors["emb_actor_loss_mask_sum"],
        max_episode_steps=int(tensors["emb_max_episode_steps"].item()),
    )
    torch.testing.assert_close(loss.reshape(1), tensors["emb_actor_loss"], rtol=1e-5, atol=0)


@pytest.mark.reference
def test_embodied_critic_loss_matches_reference(rl_math_reference):
    tensors = rl_math_reference.tensors
    loss, _ = critic_loss(
        tensors["emb_critic_values"],
        tensors["emb_critic_prev_values"],
        tensors["emb_critic_returns"],
        tensors["emb_critic_mask"],
        value_clip=rl_math_reference.setting("critic", "value_clip"),
        huber_delta=rl_math_reference.setting("critic", "huber_delta"),
        loss_mask_sum=tensors["emb_critic_loss_mask_sum"],
        max_episode_steps=int(tensors["emb_max_episode_steps"].item()),
    )
    torch.testing.assert_close(loss.reshape(1), tensors["emb_critic_loss"], rtol=1e-5, atol=0)


def test_masked_mean_ratio_weighs_trajectories_by_episode_limit_over_length():
    # Two trajectories: 2 valid actions of 4 (value 1) and 4 of 4 (value 3); limit 4, 8 entries in all.
    x = torch.tensor([[1.0, 1.0, float("nan"), float("inf")], [3.0, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    counts = torch.tensor([[2.0], [4.0]])
    # (1 * 4/2 * 2 + 3 * 4/4 * 4) / 8 = (4 + 12) / 8
    assert masked_mean_ratio(x, mask, counts, 4).item() == pytest.approx(2.0)
    # The token-mean of the same entries weighs every valid action alike: (2 + 12) / 6.
    assert masked_mean(x, mask).item() == pytest.approx(14 / 6)
    y = x.clone().requires_grad_(True)
    masked_mean_ratio(y, mask, counts, 4).backward()
    assert torch.isfinite(y.grad).all() and y.grad[0, 2:].eq(0).all()
    torch.testing.assert_close(y.grad[0, :2], torch.full((2,), 2.0 / 8))


def test_embodied_aggregation_needs_both_arguments_and_positive_counts():
    logprobs = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="both loss_mask_sum and max_episode_steps"):
        actor_loss(logprobs, logprobs, logprobs, None, CLIP_LOW, CLIP_HIGH, loss_mask_sum=torch.ones(2, 1))
    with pytest.raises(ValueError, match="loss_mask_sum must be positive"):
        masked_mean_ratio(logprobs, None, torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="max_episode_steps must be positive"):
        masked_mean_ratio(logprobs, None, torch.ones(2, 1), 0)
