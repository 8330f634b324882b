import math

import pytest
import torch

from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.presets import make_tiny_checkpoint
from trainers.advantages import compute_gae
from trainers.config import AlgorithmConfig
from trainers.grpo import grpo_scores, grpo_targets
from trainers.ppo import gae_targets
from trainers.rollout import RolloutBatch, collect_rollout, loss_mask_from_dones, merge_epochs
from trainers.runner import rollout_metrics
from vla_policies import SmallCNNPolicy, SmallPolicyConfig


def batch_of(rewards, dones, values=None):
    """A RolloutBatch around hand-made rewards [T, B, A] and dones [T + 1, B, A]."""
    rewards = torch.tensor(rewards, dtype=torch.float32)
    dones = torch.tensor(dones, dtype=torch.bool)
    T, B, A = rewards.shape
    return RolloutBatch(
        images=torch.zeros(T, B, 4, 4, 3, dtype=torch.uint8),
        tasks=[("task",) * B for _ in range(T)],
        action_tokens=torch.zeros(T, B, A * 7, dtype=torch.int64),
        logprobs=torch.zeros(T, B, A * 7),
        values=None if values is None else torch.tensor(values, dtype=torch.float32),
        rewards=rewards,
        dones=dones,
        loss_mask=loss_mask_from_dones(dones),
        success=torch.zeros(B, dtype=torch.bool),
        episode_return=torch.zeros(B),
        episode_length=torch.zeros(B, dtype=torch.int64),
    )


def test_loss_mask_keeps_the_first_episode_including_its_last_action():
    # T = 3 chunks, B = 3, A = 2; the done flag sits on the last action of a chunk, as the env sets it.
    dones = torch.zeros(4, 3, 2, dtype=torch.bool)
    dones[2, 0, 1] = True  # trajectory 0 ends with chunk 1
    dones[1, 1, 1] = dones[3, 1, 1] = True  # trajectory 1 ends with chunk 0 (the later done is a second episode)
    dones[0, 2, 1] = True  # trajectory 2 was done before the first step: nothing is valid
    mask = loss_mask_from_dones(dones)
    assert mask.shape == (3, 3, 2)
    assert mask[:, 0].tolist() == [[True, True], [True, True], [False, False]]
    assert mask[:, 1].tolist() == [[True, True], [False, False], [False, False]]
    assert not mask[:, 2].any()
    # A done on a middle action masks the actions after it within the chunk too.
    middle = torch.zeros(2, 1, 3, dtype=torch.bool)
    middle[1, 0, 0] = True
    assert loss_mask_from_dones(middle)[0, 0].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="bool tensor of shape"):
        loss_mask_from_dones(torch.zeros(2, 3))


def test_grpo_scores_filter_and_advantages_by_hand():
    # B = 4 trajectories in groups of 2, T = 2 chunks of A = 2 actions.
    # traj 0 succeeds in chunk 0 (reward 5) and its chunk 1 reward (after the done) must be ignored;
    # traj 1 fails; traj 2 and 3 both succeed in chunk 1 (an all-success group: filtered).
    rewards = [
        [[0, 5], [0, 0], [0, 0], [0, 0]],
        [[7, 7], [0, 0], [0, 5], [5, 0]],
    ]
    dones = [[[0, 0]] * 4, [[0, 1], [0, 0], [0, 0], [0, 0]], [[0, 0], [0, 1], [0, 1], [0, 1]]]
    batch = batch_of(rewards, dones)
    assert grpo_scores(batch).tolist() == [5.0, 0.0, 5.0, 5.0]
    algorithm = AlgorithmConfig(filter_rewards=True, rewards_lower_bound=0.5, rewards_upper_bound=4.5)
    targets = grpo_targets(batch, algorithm, group_size=2)
    adv = 2.5 / (math.sqrt(12.5) + 1e-6)  # (5 - 2.5) / (unbiased std of (5, 0) + 1e-6)
    assert targets.loss_mask.shape == (2, 4, 2) and targets.returns is None
    assert targets.loss_mask[:, 2:].sum() == 0  # the all-success group is dropped
    assert targets.loss_mask[:, 0].tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(targets.advantages[:, 0], torch.tensor([[adv, adv], [0.0, 0.0]]))
    torch.testing.assert_close(targets.advantages[:, 1], torch.full((2, 2), -adv))
    assert targets.advantages[:, 2:].abs().sum() == 0
    unfiltered = grpo_targets(batch, AlgorithmConfig(), group_size=2)
    assert unfiltered.loss_mask[:, 2:].any() and unfiltered.advantages[:, 2:].abs().sum() == 0
    # Of the groups (5, 0) and (5, 5), only the first has a signal, filtered or not; groups of 4: the one has.
    for kept in (targets, unfiltered):
        assert rollout_metrics(batch, kept, group_size=2)["rollout/groups_with_signal"] == 0.5
    assert rollout_metrics(batch, targets, group_size=4)["rollout/groups_with_signal"] == 1.0
    assert "rollout/groups_with_signal" not in rollout_metrics(batch, targets)


def test_gae_chunk_level_by_hand():
    # One trajectory, 2 chunks of 2 actions; chunk rewards 1 and 2, values 0.5, 1, 3; gamma 0.5, lambda 1.
    batch = batch_of([[[0.5, 0.5]], [[2.0, 0.0]]], [[[0, 0]], [[0, 0]], [[0, 0]]], values=[[[0.5]], [[1.0]], [[3.0]]])
    algorithm = AlgorithmConfig(
        adv_type="gae", reward_type="chunk_level", gamma=0.5, gae_lambda=1.0, normalize_advantages=False
    )
    targets = gae_targets(batch, algorithm)
    # delta_1 = 2 + 0.5 * 3 - 1 = 2.5; A_0 = (1 + 0.5 * 1 - 0.5) + 0.5 * 2.5 = 2.25
    torch.testing.assert_close(targets.advantages[:, 0, 0], torch.tensor([2.25, 2.5]))
    torch.testing.assert_close(targets.returns[:, 0, 0], torch.tensor([2.75, 3.5]))
    # A done after chunk 0 stops the bootstrap: A_0 = 1 - 0.5, and chunk 1 is masked.
    ended = batch_of([[[0.5, 0.5]], [[2.0, 0.0]]], [[[0, 0]], [[0, 1]], [[0, 0]]], values=[[[0.5]], [[1.0]], [[3.0]]])
    targets = gae_targets(ended, algorithm)
    assert targets.advantages[0, 0, 0].item() == pytest.approx(0.5)
    assert targets.loss_mask[:, 0, 0].tolist() == [True, False] and targets.advantages[1, 0, 0] == 0


def test_gae_action_level_runs_over_actions():
    # T = 1 chunk of 2 actions; values [2, 1, 2]; gamma = lambda = 1, no done: A_1 = r_1 + v10 - v01,
    # A_0 = r_0 + v01 - v00 + A_1.
    values = [[[1.0, 2.0]], [[4.0, 8.0]]]
    batch = batch_of([[[3.0, 5.0]]], [[[0, 0]], [[0, 0]]], values=values)
    algorithm = AlgorithmConfig(adv_type="gae", gamma=1.0, gae_lambda=1.0, normalize_advantages=False)
    targets = gae_targets(batch, algorithm)
    a1 = 5.0 + 4.0 - 2.0
    a0 = 3.0 + 2.0 - 1.0 + a1
    torch.testing.assert_close(targets.advantages[0, 0], torch.tensor([a0, a1]))
    reference, _ = compute_gae(
        torch.tensor([[3.0], [5.0]]), torch.tensor([[1.0], [2.0], [4.0]]), torch.zeros(3, 1, dtype=torch.bool), 1.0, 1.0
    )
    torch.testing.assert_close(targets.advantages[0, 0], reference[:, 0])
    normalized = gae_targets(batch, AlgorithmConfig(adv_type="gae"))
    assert normalized.advantages.mean().abs() < 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return OpenSoraLiberoEnv(
        4,
        checkpoint=checkpoint,
        num_sampling_steps=1,
        image_size=32,
        dtype="float32",
        max_episode_steps=16,
        group_size=2,
    )


@pytest.mark.parametrize(("bias", "chunks"), [(-50.0, 2), (50.0, 1)])
def test_collect_rollout_shapes_masks_and_first_episode_stats(env, bias, chunks):
    # The classifier's bias decides: -50 never succeeds (episodes truncate after 2 chunks), +50 always does
    # (episodes end with their first chunk).
    env.world_model.reward_model.net[-2].bias.data.fill_(bias)
    policy = SmallCNNPolicy(SmallPolicyConfig(image_size=32, channels=(8,), hidden_size=32, value_type="action_level"))
    generator = torch.Generator().manual_seed(0)
    # 4 chunk steps allowed: the pass stops once every first episode ended.
    batch = collect_rollout(env, policy, 4, seed=3, generator=generator, temperature=1.6)
    assert batch.images.shape == (4, 4, 32, 32, 3) and batch.action_tokens.shape == (4, 4, 56)
    assert batch.logprobs.shape == (4, 4, 56) and batch.values.shape == (5, 4, 8)
    assert batch.rewards.shape == (4, 4, 8) and batch.dones.shape == (5, 4, 8)
    assert batch.loss_mask[:chunks].all() and not batch.loss_mask[chunks:].any()
    assert batch.dones[chunks, :, -1].all() and batch.dones[chunks + 1 :].all()
    assert not batch.dones[: chunks + 1, :, :-1].any()  # only the last action of a chunk carries the done flag
    assert (batch.episode_length == 8 * chunks).all() and (batch.success == (bias > 0)).all()
    torch.testing.assert_close(grpo_scores(batch), batch.episode_return)
    assert batch.episode_return.tolist() == [1.0 if bias > 0 else 0.0] * 4  # relative reward: +1 once
    assert batch.values[chunks + 1 :].abs().sum() == 0
    # Groups share their start frame; the same seed and generator state give the same pass.
    assert torch.equal(batch.images[0, 0], batch.images[0, 1])
    again = collect_rollout(env, policy, 4, seed=3, generator=torch.Generator().manual_seed(0), temperature=1.6)
    assert torch.equal(again.action_tokens, batch.action_tokens) and torch.equal(again.rewards, batch.rewards)
    merged = merge_epochs([batch, again])
    assert merged.rewards.shape == (4, 8, 8) and len(merged.tasks[0]) == 8
    assert torch.equal(merged.action_tokens[:, 4:], batch.action_tokens)
