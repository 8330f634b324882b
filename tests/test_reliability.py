import math

import numpy as np
import pytest
import torch

from opensora_gym.env import OpenSoraLiberoConfig, OpenSoraLiberoEnv
from opensora_gym.reliability import (
    auroc,
    auroc_interval,
    average_ranks,
    classifier_uncertainty,
    draw_disagreement,
    spearman,
)
from opensora_gym.testing import random_chunk_actions
from opensora_gym.world_model import WorldModel
from trainers.advantages import Targets
from trainers.config import ConfigError, TrainEnvConfig, load_config
from trainers.rollout import collect_rollout
from trainers.runner import rollout_metrics
from vla_policies import SmallCNNPolicy, SmallPolicyConfig

FAST = {"num_sampling_steps": 2, "image_size": 64, "dtype": "float32", "max_episode_steps": 16}
DRAWS = {"uncertainty": "draws", "uncertainty_draws": 3}
RANDOM = {"uncertainty": "random"}


def make_env(checkpoint, world_model, num_envs=2, **overrides):
    return OpenSoraLiberoEnv(num_envs, checkpoint=checkpoint, world_model=world_model, **{**FAST, **overrides})


def constant_classifier(checkpoint, prob):
    """The tiny world model with a classifier that gives every frame probability `prob`."""
    model = WorldModel.from_pretrained(checkpoint, num_sampling_steps=2, image_size=64)
    model.reward_model.net[-2].weight.data.zero_()
    model.reward_model.net[-2].bias.data.fill_(math.log(prob / (1 - prob)))
    return model


# ------------------------------------------------------------------------------------------ known answers


def test_auroc_interval_follows_hanley_and_mcneil():
    # A = 0.5, 10 and 10: Q1 = Q2 = 1/3, SE^2 = (0.25 + 9/12 + 9/12) / 100 = 0.0175
    low, high = auroc_interval(0.5, 10, 10)
    assert low == pytest.approx(0.5 - 1.959964 * np.sqrt(0.0175)) and high == pytest.approx(1 - low)
    narrow = auroc_interval(0.5, 100, 100)
    assert high - low > narrow[1] - narrow[0] > 0  # more samples, a narrower interval
    assert auroc_interval(1.0, 5, 5) == (1.0, 1.0) and auroc_interval(0.9, 3, 4)[1] == 1.0  # clipped to [0, 1]
    with pytest.raises(ValueError, match="both classes"):
        auroc_interval(0.5, 0, 10)


def test_auroc_known_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # 3 of the 4 (positive, negative) pairs ordered
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5  # ties count one half
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, size=40), rng.random(40) < 0.4  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(scores, labels) == pytest.approx(pairs, abs=1e-12)
    with pytest.raises(ValueError, match="AUROC needs both classes, got 0 positives and 3 negatives"):
        auroc([1, 2, 3], [0, 0, 0])


def test_spearman_known_cases():
    assert average_ranks(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 100, 1000, 10_000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks of y: 1, 2, 3.5, 5, 3.5; centred products sum to 8, squares to 10 and 9.5: 8 / sqrt(95).
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    with pytest.raises(ValueError, match="non-constant x and y"):
        spearman([1, 2, 3], [7, 7, 7])


def test_signals_known_cases():
    draws = torch.randn(3, 4, 2, 8, 2, 2)
    assert torch.equal(draw_disagreement(draws[:, :1].expand(-1, 4, -1, -1, -1, -1)), torch.zeros(3))
    two = torch.stack([torch.zeros(2, 8, 2, 2), torch.full((2, 8, 2, 2), 2.0)])[None]  # [1, 2, ...]: 0 and 2
    assert draw_disagreement(two).tolist() == [1.0]  # std of {0, 2} is 1 everywhere
    torch.testing.assert_close(draw_disagreement(draws), draws.std(dim=1, correction=0).mean(dim=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"draws must have shape \[N, K >= 2, C, A, h, w\], got \(3, 1, 2, 8, 2, 2\)"):
        draw_disagreement(draws[:, :1])
    probs = np.array([[0.0, 1.0], [0.5, 0.9], [0.25, 1.0]])
    np.testing.assert_allclose(classifier_uncertainty(probs), [0.0, 1.0, 0.5])


# ------------------------------------------------------------------------------------------ world model


def test_extra_draws_share_the_cache_and_leave_draw_0_unchanged(world_model, monkeypatch):
    condition = torch.randn(3, 4, 4, 8, 8)
    actions = torch.rand(3, 8, 7)
    plain = world_model.predict_chunk(
        condition, actions, generator=[torch.Generator().manual_seed(i) for i in range(3)]
    )
    assert plain.draw_disagreement is None
    calls = []
    original = world_model.dit.condition_cache
    monkeypatch.setattr(world_model.dit, "condition_cache", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    drawn = world_model.predict_chunk(
        condition,
        actions,
        generator=[torch.Generator().manual_seed(i) for i in range(3)],
        num_draws=4,
        draw_generator=[torch.Generator().manual_seed(100 + i) for i in range(3)],
    )
    assert calls == [3]  # the condition frames' keys/values: once for the 3 sub-envs, not once per draw
    assert torch.equal(drawn.latents, plain.latents) and torch.equal(drawn.frames, plain.frames)
    assert drawn.draw_disagreement.shape == (3,) and (drawn.draw_disagreement > 0).all()
    # Extra draws from the same noise as draw 0 coincide with it: the signal is exactly 0.
    same = world_model.predict_chunk(
        condition,
        actions,
        generator=[torch.Generator().manual_seed(i) for i in range(3)],
        num_draws=2,
        draw_generator=[torch.Generator().manual_seed(i) for i in range(3)],
    )
    assert same.draw_disagreement.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_an_extra_draw_equals_sampling_it_alone(world_model, micro_batch_size):
    sampler = type(world_model.sampler)(
        type(world_model.sampler.config)(num_sampling_steps=2, micro_batch_size=micro_batch_size)
    )
    condition, actions = torch.randn(3, 4, 4, 8, 8), torch.rand(3, 8, 7) * 2 - 1
    noise, extra = torch.randn(3, 4, 8, 8, 8), torch.randn(3, 2, 4, 8, 8, 8)
    kwargs = {"height": 64, "width": 64}
    first, drawn = sampler.sample_draws(world_model.dit, condition, actions, noise=noise, extra_noise=extra, **kwargs)
    assert torch.equal(first, sampler.sample(world_model.dit, condition, actions, noise=noise, **kwargs))
    alone = sampler.sample(world_model.dit, condition, actions, noise=extra[:, 1], **kwargs)[:, :, 4:]
    torch.testing.assert_close(drawn[:, 1], alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ env


def test_signal_is_in_info_with_masks_and_deterministic(checkpoint, never_success):
    infos = []
    for _ in range(2):
        env = make_env(checkpoint, never_success, max_episode_steps=8, **DRAWS)
        env.reset(seed=5)
        infos.append([env.step(random_chunk_actions(2, seed=k))[-1] for k in range(2)])
    first, second = infos[0][0], infos[0][1]
    assert first["wm_uncertainty"].dtype == np.float32 and (first["wm_uncertainty"] > 0).all()
    assert first["_wm_uncertainty"].all() and not first["wm_truncated"].any() and not first["wm_withheld"].any()
    # Both sub-envs truncated on step 1 (8 actions): they reset on step 2, whose signal is masked out.
    assert not second["_wm_uncertainty"].any() and not second["_wm_truncated"].any()
    np.testing.assert_array_equal(first["wm_uncertainty"], infos[1][0]["wm_uncertainty"])
    env = make_env(checkpoint, never_success, max_episode_steps=8)
    env.reset(seed=5)
    assert "wm_uncertainty" not in env.step(random_chunk_actions(2))[-1]


@pytest.mark.parametrize("signal", [DRAWS, {"uncertainty": "margin"}, RANDOM])
def test_report_only_changes_no_observation_or_reward(checkpoint, world_model, signal):
    runs = []
    for overrides in ({}, signal):
        env = make_env(checkpoint, world_model, num_envs=3, **overrides)
        obs, _ = env.reset(seed=11)
        run = [obs["image"]]
        for k in range(3):
            obs, reward, terminated, truncated, _ = env.step(random_chunk_actions(3, seed=k))
            run += [obs["image"], reward, terminated, truncated]
        runs.append(run)
    for off, on in zip(*runs, strict=True):
        np.testing.assert_array_equal(off, on)


@pytest.mark.parametrize("signal", [DRAWS, RANDOM])
def test_state_round_trip_restores_the_signal_stream(checkpoint, world_model, signal):
    env = make_env(checkpoint, world_model, **signal)
    env.reset(seed=2)
    saved = env.get_state()
    first = env.step(random_chunk_actions(2))[-1]["wm_uncertainty"]
    env.set_state(saved, [0, 1])
    np.testing.assert_array_equal(env.step(random_chunk_actions(2))[-1]["wm_uncertainty"], first)


def test_truncate_policy_ends_the_episode_when_the_signal_passes_the_threshold(checkpoint, never_success):
    env = make_env(checkpoint, never_success, uncertainty_policy="truncate", uncertainty_threshold=0.0, **DRAWS)
    env.reset(seed=0)
    _, _, terminated, truncated, info = env.step(random_chunk_actions(2))
    assert truncated.all() and not terminated.any() and info["wm_truncated"].all()
    assert info["episode_length"].tolist() == [8, 8]  # well before max_episode_steps (16)
    env = make_env(checkpoint, never_success, uncertainty_policy="truncate", uncertainty_threshold=1e6, **DRAWS)
    env.reset(seed=0)
    _, _, _, truncated, info = env.step(random_chunk_actions(2))
    assert not truncated.any() and not info["wm_truncated"].any()


def test_random_signal_is_uniform_seeded_and_different_per_sub_env(checkpoint, never_success):
    runs = []
    for _ in range(2):
        env = make_env(checkpoint, never_success, num_envs=4, max_episode_steps=24, **RANDOM)
        env.reset(seed=3)
        runs.append(np.stack([env.step(random_chunk_actions(4, seed=k))[-1]["wm_uncertainty"] for k in range(3)]))
    signals = runs[0]  # [3 chunks, 4 sub-envs]
    np.testing.assert_array_equal(runs[1], signals)
    assert signals.dtype == np.float32 and ((signals >= 0) & (signals < 1)).all()
    assert len(np.unique(signals)) == signals.size  # every sub-env and chunk has its own draw
    env.reset(seed=3)  # reseeding the same env restarts the streams
    np.testing.assert_array_equal(env.step(random_chunk_actions(4, seed=0))[-1]["wm_uncertainty"], signals[0])
    # The stream is a function of the sub-env's seed: with seed 4, sub-env i has sub-env i + 1's seed of before.
    env.reset(seed=4)
    shifted = env.step(random_chunk_actions(4, seed=0))[-1]["wm_uncertainty"]
    np.testing.assert_array_equal(shifted[:3], signals[0, 1:])
    assert shifted[3] not in signals


@pytest.mark.parametrize(("threshold", "fires"), [(0.0, True), (1.0, False)])
def test_random_signal_truncates_every_chunk_at_threshold_0_and_none_at_1(checkpoint, never_success, threshold, fires):
    env = make_env(
        checkpoint, never_success, num_envs=4, uncertainty_policy="truncate", uncertainty_threshold=threshold, **RANDOM
    )
    env.reset(seed=0)
    stepped = []
    for k in range(3):
        _, _, terminated, truncated, info = env.step(random_chunk_actions(4, seed=k))
        stepping = info["_wm_truncated"]  # false for the sub-envs that reset on this step
        assert info["wm_truncated"].tolist() == (stepping & fires).tolist() and not terminated.any()
        # Without the policy only max_episode_steps (2 chunks) truncates: the second chunk of each episode.
        assert truncated.tolist() == (stepping & (fires or k == 1)).tolist()
        stepped.append(stepping.tolist())
    # Cut after every chunk, the sub-envs alternate between a chunk and a reset; otherwise they run 2 chunks.
    assert stepped == [[True] * 4, [False] * 4, [True] * 4] if fires else [[True] * 4, [True] * 4, [False] * 4]


@pytest.mark.parametrize(("prob", "withheld"), [(0.6, True), (0.999, False)])
def test_withhold_policy_takes_away_uncertain_successes(checkpoint, prob, withheld):
    # Every frame scores `prob`: a success (rounded to 1) whose margin signal is 1 - 2 |prob - 0.5|.
    model = constant_classifier(checkpoint, prob)
    env = make_env(checkpoint, model, uncertainty="margin", uncertainty_policy="withhold", uncertainty_threshold=0.5)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(random_chunk_actions(2))
    np.testing.assert_allclose(info["wm_uncertainty"], [1 - 2 * abs(prob - 0.5)] * 2, atol=1e-4)
    assert info["wm_withheld"].tolist() == [withheld] * 2
    assert terminated.tolist() == [not withheld] * 2 and not truncated.any()
    assert reward.tolist() == [0.0 if withheld else 1.0] * 2 and info["success_once"].tolist() == [not withheld] * 2
    if withheld:
        # The relative reward's baseline is the frame reward before the withheld chunk, so a confident success
        # later would still count once.
        assert [s.prev_frame_reward for s in env.get_state()] == [0.0, 0.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"uncertainty": "ensemble"}, "uncertainty must be 'off', 'draws', 'margin' or 'random', got 'ensemble'"),
        ({"uncertainty_draws": 1}, "uncertainty_draws must be an integer >= 2, got 1"),
        ({"uncertainty_policy": "truncate"}, "uncertainty_policy 'truncate' needs a signal"),
        ({"uncertainty": "margin", "uncertainty_policy": "withhold"}, "needs a finite uncertainty_threshold, got None"),
    ],
)
def test_config_rejects_bad_reliability_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        OpenSoraLiberoConfig(**overrides)
    if "uncertainty_policy" in overrides:
        with pytest.raises(ConfigError, match=r"env\.train\.uncertainty_policy"):
            TrainEnvConfig(**overrides)


# ------------------------------------------------------------------------------------------ training metrics


def test_training_config_takes_the_random_signal():
    overrides = ["env.train.uncertainty=random", "env.train.uncertainty_policy=truncate"]
    train = load_config("tiny_cpu_grpo", [*overrides, "env.train.uncertainty_threshold=0.8"]).env.train
    assert (train.uncertainty, train.uncertainty_policy, train.uncertainty_threshold) == ("random", "truncate", 0.8)


@pytest.mark.parametrize("signal", [DRAWS, RANDOM])
def test_rollout_metrics_log_how_often_the_policies_fired(checkpoint, never_success, signal):
    env = make_env(
        checkpoint, never_success, num_envs=4, uncertainty_policy="truncate", uncertainty_threshold=0.0, **signal
    )
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=64, channels=(8,), hidden_size=32))
    batch = collect_rollout(env, policy, 2, seed=0, generator=torch.Generator().manual_seed(0), temperature=1.0)
    assert batch.wm_uncertainty.shape == (2, 4) and (batch.wm_uncertainty[0] > 0).all()
    assert batch.wm_uncertainty[1].eq(0).all()  # every first episode was cut after its first chunk
    assert batch.wm_truncated.all() and not batch.wm_withheld.any()
    targets = Targets(advantages=torch.zeros(2, 4, 8), returns=None, loss_mask=batch.loss_mask, scores=None)
    metrics = rollout_metrics(batch, targets)
    assert metrics["env/wm_truncated_fraction"] == 1.0 and metrics["env/wm_withheld_fraction"] == 0.0
    assert metrics["env/wm_uncertainty_mean"] == pytest.approx(float(batch.wm_uncertainty[0].mean()))


# ------------------------------------------------------------------------------------------ validation script


def test_validation_script_runs_on_recorded_episodes(checkpoint, world_model, load_benchmark):
    script = load_benchmark("reliability_validation")
    dataset = OpenSoraLiberoEnv(1, checkpoint=checkpoint, world_model=world_model, **FAST).dataset
    records = []
    for episode, first_success in ((0, None), (1, 0)):
        records += script.replay_episode(
            world_model, dataset, episode, num_draws=2, seed=0, max_chunks=1, first_success=first_success
        )
    assert [r.real_success for r in records] == [False, True]
    assert all(r.draw_disagreement > 0 and r.frame_error > 0 for r in records)
    result = script.statistics(records)
    assert result["chunks"] == 2 and result["draw_disagreement/spearman_frame_error"] in (-1.0, 1.0)
