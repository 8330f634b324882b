import numpy as np
import pytest

from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.reward_rule import RewardRule


def probs(*values):
    return np.array(values, dtype=np.float32)


# ------------------------------------------------------------------------------------------ known answers


@pytest.mark.parametrize(
    ("settings", "chunk", "rewards", "terminated"),
    [
        ({}, [0.2, 0.6, 0.7, 0.4, 0.1, 0.1, 0.9, 0.3], [0, 1, 0, -1, 0, 0, 1, -1], True),
        ({"reward_coef": 5.0}, [0.6] + [0.1] * 7, [5, -5, 0, 0, 0, 0, 0, 0], True),
        ({"use_rel_reward": False}, [0.2, 0.6, 0.7, 0.4, 0.1, 0.1, 0.9, 0.3], [0, 1, 1, 0, 0, 0, 1, 0], True),
        ({"use_rel_reward": False, "reward_coef": 5.0}, [0.6, 0.1], [1, 0], True),  # the coefficient scales only
        ({}, [0.1] * 8, [0] * 8, False),
        ({}, [0.5, 0.49], [0, 0], False),  # numpy rounds half to even: 0.5 is a 0 frame
        ({"success_from": "probability"}, [0.6] * 8, [1, 0, 0, 0, 0, 0, 0, 0], False),
        ({"success_from": "probability", "success_threshold": 0.55}, [0.6] * 8, [1] + [0] * 7, True),
    ],
)
def test_hand_computed_chunks(settings, chunk, rewards, terminated):
    outcome = RewardRule(**settings)(probs(*chunk), baseline=0.0)
    assert outcome.rewards.dtype == np.float32
    np.testing.assert_array_equal(outcome.rewards, rewards)
    assert outcome.terminated is terminated
    assert outcome.truncated is False and outcome.withheld is False


def test_the_baseline_carries_over_between_chunks():
    rule = RewardRule()
    first = rule(probs(0.1, 0.1, 0.9), baseline=0.0)
    assert first.baseline == 1.0
    second = rule(probs(0.9, 0.9, 0.1), baseline=first.baseline)
    np.testing.assert_array_equal(second.rewards, [0, 0, -1])  # the success before the chunk counts once
    assert second.baseline == 0.0


def test_relative_rewards_telescope_to_the_last_frame():
    rule = RewardRule(reward_coef=3.0, success_threshold=2.0)
    rng = np.random.default_rng(0)
    baseline = 0.0
    for _ in range(20):
        chunk = rng.random(8, dtype=np.float32)
        outcome = rule(chunk, baseline)
        assert outcome.rewards.sum() == pytest.approx(3.0 * np.round(chunk[-1]) - baseline)
        baseline = outcome.baseline


def test_rewards_and_baseline_are_float32_like_the_reference():
    # The reference computes frame by frame on float32 scalars, the baseline included.
    rule = RewardRule(reward_coef=0.1, success_threshold=2.0)
    outcome = rule(probs(0.7, 0.2, 0.8), baseline=0.0)
    step = np.float32(0.1)
    np.testing.assert_array_equal(outcome.rewards, np.array([step, -step, step], dtype=np.float32))
    assert isinstance(outcome.baseline, np.float32) and outcome.baseline == step
    # A success that lasts into the next chunk is worth exactly 0 there (in float64, 0.1 - float32(0.1) is not 0).
    np.testing.assert_array_equal(rule(probs(0.9), outcome.baseline).rewards, [0.0])


# ------------------------------------------------------------------------------------------ uncertainty policies


def test_report_never_changes_a_chunk():
    outcome = RewardRule(uncertainty_policy="report")(probs(0.9, 0.9), baseline=0.0, uncertainty=np.float32(1.0))
    np.testing.assert_array_equal(outcome.rewards, [1, 0])
    assert outcome.terminated and not outcome.truncated and not outcome.withheld


@pytest.mark.parametrize(("uncertainty", "fired"), [(0.6, True), (0.5, False), (0.2, False)])
def test_withhold_takes_away_a_success_strictly_above_the_threshold(uncertainty, fired):
    rule = RewardRule(uncertainty_policy="withhold", uncertainty_threshold=0.5)
    outcome = rule(probs(0.2, 0.8, 0.9), baseline=0.0, uncertainty=np.float32(uncertainty))
    assert outcome.withheld is fired and outcome.terminated is not fired and outcome.truncated is False
    np.testing.assert_array_equal(outcome.rewards, [0, 0, 0] if fired else [0, 1, 0])
    assert outcome.baseline == (0.0 if fired else 1.0)  # a withheld success leaves the baseline where it was


def test_withhold_leaves_an_unsuccessful_chunk_alone():
    rule = RewardRule(uncertainty_policy="withhold", uncertainty_threshold=0.5, reward_coef=2.0)
    outcome = rule(probs(0.1, 0.2), baseline=2.0, uncertainty=np.float32(0.9))
    assert not outcome.withheld and not outcome.terminated
    np.testing.assert_array_equal(outcome.rewards, [-2, 0])
    assert outcome.baseline == 0.0


@pytest.mark.parametrize(("chunk", "terminated"), [([0.1, 0.2], False), ([0.1, 0.95], True)])
def test_truncate_ends_the_episode_whether_or_not_it_succeeded(chunk, terminated):
    rule = RewardRule(uncertainty_policy="truncate", uncertainty_threshold=0.5)
    outcome = rule(probs(*chunk), baseline=0.0, uncertainty=np.float32(0.7))
    assert outcome.truncated is True and outcome.terminated is terminated and outcome.withheld is False
    np.testing.assert_array_equal(outcome.rewards, [0, 1] if terminated else [0, 0])
    assert rule(probs(*chunk), baseline=0.0, uncertainty=np.float32(0.3)).truncated is False


def test_a_float32_signal_is_compared_in_float32():
    # As the env compares its float32 signal: float32(0.1) equals the threshold 0.1 in float32, so it does not fire.
    rule = RewardRule(uncertainty_policy="truncate", uncertainty_threshold=0.1)
    assert rule(probs(0.1), baseline=0.0, uncertainty=np.float32(0.1)).truncated is False
    assert rule(probs(0.1), baseline=0.0, uncertainty=np.float32(0.11)).truncated is True


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"success_from": "logits"}, "success_from must be 'reward' or 'probability', got 'logits'"),
        ({"uncertainty_policy": "drop"}, "uncertainty_policy must be 'report', 'truncate' or 'withhold', got 'drop'"),
        ({"uncertainty_policy": "truncate"}, "needs a finite uncertainty_threshold, got None"),
        ({"uncertainty_policy": "withhold", "uncertainty_threshold": float("nan")}, "got nan"),
    ],
)
def test_bad_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        RewardRule(**settings)


def test_a_policy_needs_the_signal():
    rule = RewardRule(uncertainty_policy="truncate", uncertainty_threshold=0.5)
    with pytest.raises(ValueError, match="uncertainty_policy 'truncate' needs the chunk's uncertainty, got None"):
        rule(probs(0.1), baseline=0.0)


def test_the_env_builds_its_rule_from_its_config(checkpoint, world_model):
    settings = {
        "use_rel_reward": False,
        "reward_coef": 2.0,
        "success_threshold": 0.7,
        "success_from": "probability",
        "uncertainty_policy": "withhold",
        "uncertainty_threshold": 0.4,
    }
    env = OpenSoraLiberoEnv(
        1, checkpoint=checkpoint, world_model=world_model, image_size=64, uncertainty="margin", **settings
    )
    assert env.reward_rule == RewardRule(**settings)
