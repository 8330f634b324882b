import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import _check_box_obs, _check_image_input, _check_obs
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.vec_env import VecCheckNan, VecMonitor, VecTransposeImage

from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.testing import random_chunk_actions
from opensora_gym.wrappers.sb3 import OpenSoraLiberoVecEnv

FAST = {"num_sampling_steps": 2, "image_size": 64, "dtype": "float32", "max_episode_steps": 16}


def make_env(checkpoint, world_model, num_envs=2, **overrides):
    return OpenSoraLiberoEnv(num_envs, checkpoint=checkpoint, world_model=world_model, **{**FAST, **overrides})


def flat(actions):
    return actions.reshape(len(actions), -1)  # [N, A * 7]


def test_spaces_and_returned_values_pass_sb3_checks(checkpoint, world_model):
    venv = OpenSoraLiberoVecEnv(make_env(checkpoint, world_model))
    assert venv.num_envs == 2
    assert venv.observation_space.shape == (64, 64, 3) and venv.observation_space.dtype == np.uint8
    assert is_image_space(venv.observation_space)
    assert venv.action_space.shape == (56,) and venv.action_space.dtype == np.float32
    np.testing.assert_array_equal(venv.action_space.low, -1)
    np.testing.assert_array_equal(venv.action_space.high, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_image_input(venv.observation_space)
        _check_box_obs(venv.observation_space)
    checked = VecCheckNan(venv, raise_exception=True)
    venv.seed(0)
    obs = checked.reset()
    assert obs.shape == (2, 64, 64, 3) and obs.dtype == np.uint8
    for i in range(2):
        _check_obs(obs[i], venv.observation_space, "reset")
        assert venv.reset_infos[i]["task"] == venv.tasks[i]
    for _ in range(3):
        obs, rewards, dones, infos = checked.step(np.stack([venv.action_space.sample() for _ in range(2)]))
        assert rewards.shape == (2,) and rewards.dtype == np.float32
        assert dones.shape == (2,) and dones.dtype == bool
        assert len(infos) == 2
        for i in range(2):
            _check_obs(obs[i], venv.observation_space, "step")
            assert infos[i]["frame_rewards"].shape == (8,) and infos[i]["task"] == venv.tasks[i]
            np.testing.assert_allclose(rewards[i], infos[i]["frame_rewards"].sum(), rtol=1e-6)
    transposed = VecTransposeImage(venv)
    assert transposed.observation_space.shape == (3, 64, 64)
    assert transposed.reset().shape == (2, 3, 64, 64)


def test_a_done_sub_env_resets_on_the_same_step_as_the_env_would_reset_it_on_the_next(checkpoint, never_success):
    """The adapter's episodes are the env's own, minus the env's reset step, and nobody else is stepped."""
    raw = make_env(checkpoint, never_success)
    venv = OpenSoraLiberoVecEnv(make_env(checkpoint, never_success))
    raw.reset(seed=5)
    venv.seed(5)
    venv.reset()
    # Sub-env 1 is half-way through its episode, so the sub-envs end on different steps.
    for env in (raw, venv.env):
        state = env.get_state([1])
        state[0].elapsed_steps = 8
        env.set_state(state, [1])
    a = [random_chunk_actions(2, seed) for seed in range(3)]
    raw_obs = [raw.step(actions) for actions in a]  # (obs, reward, terminated, truncated, info) per step

    obs, rewards, dones, infos = venv.step(flat(a[0]))
    assert dones.tolist() == [False, True]
    assert infos[1]["TimeLimit.truncated"] and "terminal_observation" not in infos[0]
    np.testing.assert_array_equal(obs[0], raw_obs[0][0]["image"][0])
    np.testing.assert_array_equal(infos[1]["terminal_observation"], raw_obs[0][0]["image"][1])
    np.testing.assert_array_equal(rewards, raw_obs[0][1])
    # Sub-env 1's new episode starts now: the observation the env only gives on its reset step.
    np.testing.assert_array_equal(obs[1], raw_obs[1][0]["image"][1])
    assert infos[1]["terminal_task"] == raw_obs[0][4]["task"][1]
    assert infos[1]["task"] == raw_obs[1][4]["task"][1] == venv.tasks[1]
    assert infos[1]["episode_index"] == raw_obs[1][4]["episode_index"][1]

    # Next step: sub-env 0 continues with its second chunk; sub-env 1 imagines the first chunk of its new
    # episode, which the env does one step later (with sub-env 0 resetting next to it).
    obs, _, dones, infos = venv.step(flat(np.stack([a[1][0], a[2][1]])))
    assert dones.tolist() == [True, False]
    np.testing.assert_array_equal(infos[0]["terminal_observation"], raw_obs[1][0]["image"][0])
    np.testing.assert_array_equal(obs[0], raw_obs[2][0]["image"][0])
    # Sub-env 1 ran in a batch of 2 here and of 1 in the env: batched kernels may move a pixel by one level.
    assert np.abs(obs[1].astype(int) - raw_obs[2][0]["image"][1].astype(int)).max() <= 1
    assert infos[1]["episode_length"] == 8 and infos[0]["episode_length"] == 16


def test_terminated_episodes_are_not_marked_as_truncated(checkpoint, world_model):
    venv = OpenSoraLiberoVecEnv(make_env(checkpoint, world_model, num_envs=3, max_episode_steps=64))
    venv.seed(0)
    venv.reset()
    ended = []
    for seed in range(4):
        _, _, dones, infos = venv.step(flat(random_chunk_actions(3, seed)))
        ended += [info for info, done in zip(infos, dones, strict=True) if done]
    # The tiny classifier succeeds often: episodes end by termination, before the 8-chunk time limit.
    assert ended and all(not info["TimeLimit.truncated"] and info["success_once"] for info in ended)


def test_attribute_access_options_and_bad_input(checkpoint, world_model):
    venv = OpenSoraLiberoVecEnv(make_env(checkpoint, world_model, num_envs=3))
    assert venv.get_attr("render_mode") == [None, None, None]
    assert venv.get_attr("num_envs", indices=[0, 2]) == [3, 3]
    assert venv.env_is_wrapped(VecMonitor) == [False, False, False]
    venv.set_options({"episode_indices": [1, 2, 3]})
    venv.reset()
    assert [info["episode_index"] for info in venv.reset_infos] == [1, 2, 3]
    states = venv.env_method("get_state")
    assert len(states) == 3 and [s.episode_index for s in states[0]] == [1, 2, 3]
    venv.set_attr("return_frames", True)
    assert venv.env.return_frames
    with pytest.raises(ValueError, match=r"indices must be None or all sub-envs, got \[1\]"):
        venv.set_attr("return_frames", False, indices=[1])
    with pytest.raises(ValueError, match=r"actions must have shape \(3, 56\), got \(3, 8, 7\)"):
        venv.step_async(random_chunk_actions(3))
    with pytest.raises(ValueError, match="call step_async first"):
        venv.step_wait()
    venv.set_options([{"episode_indices": [0, 0, 0]}, {}, {}])
    with pytest.raises(ValueError, match="one options dict"):
        venv.reset()
    with pytest.raises(TypeError, match="must be an OpenSoraLiberoEnv"):
        OpenSoraLiberoVecEnv(VecMonitor(venv))


@pytest.mark.slow
def test_ppo_cnn_policy_learns_on_the_adapter(checkpoint, never_success):
    venv = VecMonitor(OpenSoraLiberoVecEnv(make_env(checkpoint, never_success)))
    model = PPO(
        "CnnPolicy",
        venv,
        n_steps=16,
        batch_size=32,
        n_epochs=2,
        seed=0,
        device="cpu",
        policy_kwargs={"features_extractor_kwargs": {"features_dim": 32}, "net_arch": {"pi": [32], "vf": [32]}},
    )
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=256)
    assert model.num_timesteps == 256
    # 128 chunk steps of each sub-env, 2 per episode: every episode ended through the same-step reset.
    assert venv.episode_count == 128 and all(ep["l"] == 2 for ep in model.ep_info_buffer)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.policy.parameters(), strict=True))


def test_sb3_check_env_passes_on_the_image_observation_of_the_single_env(checkpoint):
    from stable_baselines3.common.env_checker import check_env

    import opensora_gym  # noqa: F401  (registers the ids)
    from opensora_gym.wrappers.sb3 import ImageObservation

    # 40 px: the smallest multiple of the VAE's 8 that SB3's default CnnPolicy takes (36 px and more).
    env = ImageObservation(gym.make("OpenSoraLibero-Spatial-v0", checkpoint=checkpoint, **{**FAST, "image_size": 40}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env)
    obs, info = env.reset(seed=0)
    assert obs.shape == (40, 40, 3) and info["task"] == env.unwrapped.vector_env.get_state([0])[0].task
    with pytest.raises(TypeError, match="Dict observation space with an 'image'"):
        ImageObservation(gym.make("CartPole-v1"))

    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(
        "OpenSoraLibero-Spatial-v0",
        wrapper_class=ImageObservation,
        env_kwargs={"checkpoint": checkpoint, **FAST, "image_size": 40},
    )
    assert venv.reset().shape == (1, 40, 40, 3)


def test_make_vec_env_takes_the_limit_in_actions_on_the_image_id(checkpoint):
    from stable_baselines3.common.env_checker import check_env
    from stable_baselines3.common.env_util import make_vec_env

    import opensora_gym  # noqa: F401  (registers the ids)

    # success_threshold 2: a 0/1 frame reward never reaches it, so episodes end only by the time limit.
    env_kwargs = {"checkpoint": checkpoint, **FAST, "image_size": 40, "max_episode_steps": 16, "success_threshold": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make("OpenSoraLibero-Spatial-Image-v0", **env_kwargs))

    venv = make_vec_env("OpenSoraLibero-Spatial-Image-v0", n_envs=2, seed=0, env_kwargs=env_kwargs)
    assert venv.reset().shape == (2, 40, 40, 3)
    for chunk_steps in range(1, 5):
        _, _, dones, infos = venv.step(np.stack([venv.action_space.sample() for _ in range(2)]))
        # 16 actions: every second chunk step ends the episode, by truncation, and SB3 resets it at once.
        assert dones.tolist() == [chunk_steps % 2 == 0] * 2
        assert all(isinstance(info["task"], str) for info in infos)
    assert infos[0]["TimeLimit.truncated"] and infos[0]["episode"]["l"] == 2


def test_make_vec_env_on_the_text_observation_points_to_the_image_id_and_the_adapter(checkpoint):
    from stable_baselines3.common.env_util import make_vec_env

    import opensora_gym  # noqa: F401  (registers the ids)
    from opensora_gym.wrappers.sb3 import ImageObservation

    env_kwargs = {"checkpoint": checkpoint, **FAST, "image_size": 40, "max_episode_steps": 16, "success_threshold": 2}
    points = r"use the image-only id \(OpenSoraLibero-Spatial-Image-v0.*opensora_gym\.wrappers\.sb3\.ImageObservation"
    with pytest.raises(TypeError, match=points):
        make_vec_env("OpenSoraLibero-Spatial-v0", env_kwargs=env_kwargs)

    venv = make_vec_env("OpenSoraLibero-Spatial-v0", seed=0, wrapper_class=ImageObservation, env_kwargs=env_kwargs)
    venv.reset()
    for chunk_steps in range(1, 5):
        _, _, dones, _ = venv.step(np.stack([venv.action_space.sample()]))
        assert dones.tolist() == [chunk_steps % 2 == 0]  # the limit in actions here too
