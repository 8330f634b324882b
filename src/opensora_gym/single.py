"""One episode at a time over a one-sub-env vector env: what `gym.make` returns for our ids.

Both the world-model env and the real LIBERO env are natively batched `VectorEnv`s; `SingleEpisodeEnv` gives
either the `gymnasium.Env` interface with unbatched observations, actions and infos. A single env has no
autoreset: stepping after the episode ended is an error until `reset()` is called.
"""

from __future__ import annotations

from types import FrameType
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv

__all__ = ["SingleEpisodeEnv", "make_time_limit"]


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


def make_time_limit(constructor_caller: FrameType) -> int | None:
    """The `max_episode_steps` given to `gymnasium.make`, when `gymnasium.make` is calling an env's constructor.

    `gym.make(id, max_episode_steps=N)` keeps N for a `TimeLimit` wrapper that counts `step()` calls and never
    passes it to the env. No registration changes that in Gymnasium 1.x (a spec's `additional_wrappers` could take
    the `TimeLimit` off again, but `make_vec` refuses such a spec with a vector entry point). An env that steps a
    chunk of actions per call and counts its limit in actions reads N here, from `make`'s frame, and takes it as
    that limit: N actions, N / action_chunk steps. The `TimeLimit` that `make` still adds allows N steps, so it
    never ends an episode first.

    Args:
        constructor_caller: the frame that called the constructor (`sys._getframe(1)` in `__init__`).

    Returns:
        N, or None when the caller is not `gymnasium.make`, or `make` got None (no limit given) or -1 (Gymnasium's
        "no TimeLimit"): the env then keeps its own limit.
    """
    if constructor_caller.f_code is not gym.make.__code__:
        return None
    limit = constructor_caller.f_locals.get("max_episode_steps")
    return None if limit is None or limit == -1 else limit
