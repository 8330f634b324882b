"""One episode at a time over a one-sub-env vector env: what `gym.make` returns for our ids.

Both the world-model env and the real LIBERO env are natively batched `VectorEnv`s; `SingleEpisodeEnv` gives
either the `gymnasium.Env` interface with unbatched observations, actions and infos. A single env has no
autoreset: stepping after the episode ended is an error until `reset()` is called.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv

__all__ = ["SingleEpisodeEnv"]


class SingleEpisodeEnv(gym.Env):
    """`vector_env` (one sub-env, with an `episode_ended` property) as a `gymnasium.Env`.

    `reset(seed=s)` seeds the sub-env and Gymnasium's `np_random` with `s`. Actions, validation and errors are
    those of the vector env.

    Args:
        vector_env: the batched env with `num_envs == 1`.
        render_mode: the render mode the vector env was made with.
    """

    def __init__(self, vector_env: VectorEnv, render_mode: str | None = None) -> None:
        if vector_env.num_envs != 1:
            raise ValueError(f"a single-episode env needs a vector env of 1 sub-env, got {vector_env.num_envs}")
        self.vector_env = vector_env
        self.render_mode = render_mode
        self.action_space = vector_env.single_action_space
        self.observation_space = vector_env.single_observation_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.vector_env.reset(seed=seed, options=options)
        super().reset(seed=None if seed is None else int(seed))  # the seed is valid: the vector env checked it
        return first(obs), first(info)

    def step(self, action):
        if self.vector_env.episode_ended[0]:
            raise ValueError("the episode has ended: call reset() before step()")
        action = action if isinstance(action, torch.Tensor) else np.asarray(action)
        if tuple(action.shape) != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {tuple(action.shape)}")
        obs, reward, terminated, truncated, info = self.vector_env.step(action[None])
        return first(obs), float(reward[0]), bool(terminated[0]), bool(truncated[0]), first(info)

    def render(self) -> np.ndarray | None:
        frames = self.vector_env.render()
        return None if frames is None else frames[0]

    def close(self) -> None:
        self.vector_env.close()


def first(batched: dict) -> dict:
    """Sub-env 0 of a batched observation or info dict (the `_key` masks are dropped)."""
    return {k: v[0] for k, v in batched.items() if not k.startswith("_")}
