"""GRPO in the real LIBERO simulator: the training wrapper's starts and rewards, the config, a run of the trainer.

The simulator tests need the ``libero`` extra and skip only when the ``libero`` package is missing.
"""

from importlib.util import find_spec

import numpy as np
import pytest

from opensora_gym.collect import CollectConfig, collect_episodes
from opensora_gym.data import load_trajectory
from opensora_gym.expert import ScriptedSpatialExpert, SpatialExpertConfig
from opensora_gym.libero import LiberoConfig, LiberoVectorEnv
from opensora_gym.reward_rule import RewardRule
from opensora_gym.spaces import policy_actions
from opensora_gym.wrappers import LiberoTrainingEnv
from trainers.config import ConfigError, load_config
from trainers.runner import train

needs_libero = pytest.mark.skipif(
    find_spec("libero") is None,
    reason="the libero package is not installed (pip install 'opensora-gym[libero]')",
)


def test_simulator_settings_need_env_type_libero():
    with pytest.raises(ConfigError, match=r"env.train.task_ids is a setting of the simulator: set env.train.env_type"):
        load_config("tiny_cpu_grpo", ["env.train.task_ids=[0]"])
    with pytest.raises(ConfigError, match=r"env.train.render_size is a setting of the simulator"):
        load_config("tiny_cpu_grpo", ["env.train.render_size=128"])
    with pytest.raises(ConfigError, match=r"env.train.enable_offload .* with env_type libero set it false"):
        load_config("tiny_cpu_grpo", ["env.train.env_type=libero", "env.train.enable_offload=true"])
    with pytest.raises(ConfigError, match=r"env.train.render_size must be a finite positive number, got 0"):
        load_config("tiny_cpu_grpo", ["env.train.env_type=libero", "env.train.render_size=0"])
    config = load_config("tiny_cpu_grpo", ["env.train.env_type=libero", "env.train.task_ids=[0, 1]"])
    assert config.env.train.task_ids == (0, 1) and config.env.train.protocol == "openvla_oft"


@needs_libero
@pytest.mark.slow
def test_groups_share_a_drawn_start_and_bad_settings_are_named():
    env = LiberoVectorEnv(LiberoConfig(image_size=32, max_episode_steps=16), num_envs=4)
    pairs = [(0, 3), (1, 5), (2, 7)]
    with pytest.raises(ValueError, match=r"group_size must be a positive int dividing num_envs \(4\), got 3"):
        LiberoTrainingEnv(env, pairs, 3, RewardRule())
    with pytest.raises(ValueError, match=r"pairs must be \(task, trial\) starts of libero_spatial .* \[\(0, 50\)\]"):
        LiberoTrainingEnv(env, [(0, 50)], 2, RewardRule())
    training = LiberoTrainingEnv(env, pairs, 2, RewardRule(reward_coef=5.0))
    try:
        draws = []
        for seed in (11, 12, 11):
            _, info = training.reset(seed=seed)
            chosen = list(zip(info["task_id"].tolist(), info["trial_id"].tolist(), strict=True))
            assert chosen[0] == chosen[1] and chosen[2] == chosen[3] and set(chosen) <= set(pairs)
            draws.append(chosen)
        assert draws[0] == draws[2], "the same seed draws the same starts"
        observation, reward, terminated, truncated, info = training.step(np.zeros((4, 8, 7), dtype=np.float32))
        assert observation["image"].shape == (4, 32, 32, 3)
        assert info["frame_rewards"].shape == (4, 8) and not info["frame_rewards"].any() and not reward.any()
        assert info["_frame_rewards"].all() and not terminated.any() and not truncated.any()
        _, info = training.reset(options={"task_id": 2, "trial_id": [0, 1, 2, 3]})  # chosen starts pass through
        assert info["task_id"].tolist() == [2] * 4 and info["trial_id"].tolist() == [0, 1, 2, 3]
    finally:
        training.close()


@needs_libero
@pytest.mark.slow
def test_a_success_is_rewarded_once_at_its_action(tmp_path):
    """The expert's successful episode of task 0 trial 0, replayed in chunks of 8: the action whose step LIBERO
    first checks as a success gets `reward_coef`, every other action 0, the episode terminates there and its
    return is `reward_coef`; without the relative reward, the raw 0/1 flag of each executed action."""
    config = CollectConfig(tmp_path, task_ids=(0,), trial_ids=(0,), image_size=32, privileged_state=True)
    (episode,) = collect_episodes(config, ScriptedSpatialExpert(SpatialExpertConfig(), num_envs=1))
    assert episode.success
    actions = policy_actions(np.stack([frame["delta_action"] for frame in load_trajectory(episode.path)[:-1]]))
    length = len(actions)  # the success comes with the last action
    padded = np.concatenate([actions, np.repeat(actions[-1:], -length % 8, axis=0)]).reshape(-1, 1, 8, 7)
    for use_rel_reward, expected_last in ((True, 5.0), (False, 1.0)):
        env = LiberoVectorEnv(LiberoConfig(image_size=32, max_episode_steps=224), num_envs=1)
        training = LiberoTrainingEnv(env, [(0, 0)], 1, RewardRule(use_rel_reward=use_rel_reward, reward_coef=5.0))
        try:
            training.reset(seed=0)
            rewards = []
            for chunk in padded:
                _, reward, terminated, truncated, info = training.step(chunk)
                rewards.append(info["frame_rewards"][0])
                assert reward[0] == pytest.approx(info["frame_rewards"][0].sum())
                if terminated[0] or truncated[0]:
                    break
            assert terminated[0] and info["success_once"][0]
            flat = np.concatenate(rewards)
            expected = np.zeros(len(flat), dtype=np.float32)
            expected[length - 1] = expected_last
            np.testing.assert_array_equal(flat, expected)
            assert info["episode_return"][0] == expected_last and info["episode_length"][0] == length
        finally:
            training.close()


@needs_libero
@pytest.mark.slow
def test_grpo_trains_the_embedded_policy_in_the_simulator(tmp_path):
    """One GRPO step of the shipped preset (the embedded small policy in the real simulator), shrunk to 2 sub-envs
    in one group and 16 actions from task 0's initial states: finite metrics, a checkpoint and the rollout's videos."""
    overrides = [
        f"runner.log_path={tmp_path}",
        "runner.logger_backends=[]",
        "runner.max_steps=1",
        "runner.save_interval=1",
        "env.train.task_ids=[0]",
        "env.train.trial_ids=[0, 1, 2]",
        "env.train.total_num_envs=2",
        "env.train.group_size=2",
        "env.train.max_episode_steps=16",
        "env.train.video_cfg.interval=1",
        "actor.global_batch_size=4",
        "actor.micro_batch_size=4",
    ]
    result = train(load_config("libero_spatial_small_sim_grpo", overrides))
    (metrics,) = result.history
    assert all(np.isfinite(value) for value in metrics.values())
    assert metrics["env/success_once"] == 0.0  # 16 actions reach no plate
    assert (result.last_checkpoint / "policy").is_dir()
    assert sorted(path.name for path in (result.run_dir / "video" / "train").iterdir()) == [
        "step1-env0-episode0.mp4",
        "step1-env1-episode1.mp4",
    ]
