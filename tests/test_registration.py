"""`max_episode_steps` through `gym.make` and `gym.make_vec`: the env's one limit, in actions."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import SyncVectorEnv
from gymnasium.wrappers import TimeLimit

import opensora_gym  # noqa: F401  (registers the ids)
from opensora_gym.env import OpenSoraLiberoEnv, OpenSoraLiberoSingleEnv
from opensora_gym.testing import random_chunk_actions

# success_threshold 2: a 0/1 frame reward never reaches it, so episodes end only by the time limit.
FAST = {"num_sampling_steps": 2, "image_size": 64, "dtype": "float32", "success_threshold": 2.0}


def wrapper_chain(env: gym.Env) -> list[gym.Env]:
    """`env` and every env it wraps, outermost first."""
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def test_make_vec_gives_the_vector_env_its_limit_in_actions(checkpoint):
    env = gym.make_vec("OpenSoraLibero-Spatial-v0", num_envs=2, max_episode_steps=16, checkpoint=checkpoint, **FAST)
    assert type(env) is OpenSoraLiberoEnv and env.config.max_episode_steps == 16  # no wrapper, no TimeLimit
    env.reset(seed=0)
    truncated = [env.step(random_chunk_actions(2, seed))[3].tolist() for seed in range(2)]
    assert truncated == [[False, False], [True, True]]  # 16 actions: 2 chunk steps


def test_make_gives_the_single_env_its_limit_in_actions(checkpoint):
    env = gym.make("OpenSoraLibero-Spatial-v0", max_episode_steps=16, checkpoint=checkpoint, **FAST)
    assert env.unwrapped.vector_env.config.max_episode_steps == 16 and env.spec.max_episode_steps == 16
    # Gymnasium's make always adds its TimeLimit when given max_episode_steps; it counts steps, 16 of them.
    assert [type(e) for e in wrapper_chain(env)].count(TimeLimit) == 1
    for _ in range(3):  # episodes after the first one too
        env.reset(seed=0)
        ends = [env.step(env.action_space.sample())[2:4] for _ in range(2)]
        assert ends == [(False, False), (False, True)]  # 16 actions: 2 chunk steps, truncated by the env


@pytest.mark.parametrize("max_episode_steps", [None, -1])
def test_make_without_a_limit_keeps_the_env_default_and_adds_no_time_limit(checkpoint, max_episode_steps):
    env = gym.make("OpenSoraLibero-Spatial-v0", max_episode_steps=max_episode_steps, checkpoint=checkpoint, **FAST)
    assert env.unwrapped.vector_env.config.max_episode_steps == 256
    assert not any(isinstance(e, TimeLimit) for e in wrapper_chain(env))


def test_a_limit_given_to_make_is_checked_by_the_env(checkpoint):
    with pytest.raises(ValueError, match=r"max_episode_steps \(20\) must be a multiple of action_chunk \(8\)"):
        gym.make("OpenSoraLibero-Spatial-v0", max_episode_steps=20, checkpoint=checkpoint, **FAST)


def test_the_constructor_called_directly_takes_its_own_argument(checkpoint):
    env = OpenSoraLiberoSingleEnv(checkpoint=checkpoint, max_episode_steps=24, **FAST)
    assert env.vector_env.config.max_episode_steps == 24


def test_a_subclass_made_by_make_takes_the_limit_in_actions(checkpoint):
    class Subclass(OpenSoraLiberoSingleEnv):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    spec = EnvSpec("OpenSoraLiberoSubclass-v0", entry_point=Subclass, kwargs={"checkpoint": checkpoint, **FAST})
    assert gym.make(spec, max_episode_steps=24).unwrapped.vector_env.config.max_episode_steps == 24


def test_the_image_id_observes_the_image_and_takes_the_limit_in_actions(checkpoint):
    env = gym.make("OpenSoraLibero-Spatial-Image-v0", max_episode_steps=16, checkpoint=checkpoint, **FAST)
    assert env.observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and info["task"] == env.unwrapped.vector_env.get_state([0])[0].task
    ends = [env.step(env.action_space.sample()) for _ in range(2)]
    assert [step[2:4] for step in ends] == [(False, False), (False, True)]  # 16 actions: 2 chunk steps
    assert all(step[0].shape == (64, 64, 3) and isinstance(step[4]["task"], str) for step in ends)


def test_make_vec_of_the_image_id_steps_single_envs_with_the_limit_in_actions(checkpoint):
    env = gym.make_vec(
        "OpenSoraLibero-Spatial-Image-v0", num_envs=2, max_episode_steps=16, checkpoint=checkpoint, **FAST
    )
    assert type(env) is SyncVectorEnv
    assert [e.unwrapped.vector_env.config.max_episode_steps for e in env.envs] == [16, 16]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2, 64, 64, 3)
    truncated = [env.step(env.action_space.sample())[3].tolist() for _ in range(2)]
    assert truncated == [[False, False], [True, True]]


BASE_NAMES = ["OpenSoraLibero-Spatial", "OpenSoraLibero-Object"] + [
    f"Libero-{suite}" for suite in ("Spatial", "Object", "Goal", "10", "90")
]


@pytest.mark.parametrize("name", BASE_NAMES)
def test_every_id_has_an_image_id_with_the_same_env(name):
    base, image = gym.spec(f"{name}-v0"), gym.spec(f"{name}-Image-v0")
    assert image.entry_point == base.entry_point and image.kwargs == {**base.kwargs, "image_only": True}
    assert base.vector_entry_point is not None and image.vector_entry_point is None
