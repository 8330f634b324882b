"""One episode at a time over a one-sub-env vector env: what `gym.make` returns for our ids.

Both the world-model env and the real LIBERO env are natively batched `VectorEnv`s; `SingleEpisodeEnv` gives
either the `gymnasium.Env` interface with unbatched observations, actions and infos. A single env has no
autoreset: stepping after the episode ended is an error until `reset()` is called.
"""

from __future__ import annotations

import sys
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
        image_only: observe the image alone, (S, S, 3) uint8, with the task text in `info["task"]`: the
            observation Stable-Baselines3 can batch (it cannot store text).
    """

    def __init__(self, vector_env: VectorEnv, render_mode: str | None = None, image_only: bool = False) -> None:
        if vector_env.num_envs != 1:
            raise ValueError(f"a single-episode env needs a vector env of 1 sub-env, got {vector_env.num_envs}")
        if not isinstance(image_only, bool):
            raise TypeError(f"image_only must be a bool, got {image_only!r}")
        self.vector_env = vector_env
        self.render_mode = render_mode
        self.image_only = image_only
        self.action_space = vector_env.single_action_space
        space = vector_env.single_observation_space
        self.observation_space = space["image"] if image_only else space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.vector_env.reset(seed=seed, options=options)
        super().reset(seed=None if seed is None else int(seed))  # the seed is valid: the vector env checked it
        return self._unbatch(obs, info)

    def step(self, action):
        if self.vector_env.episode_ended[0]:
            raise ValueError("the episode has ended: call reset() before step()")
        action = action if isinstance(action, torch.Tensor) else np.asarray(action)
        if tuple(action.shape) != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {tuple(action.shape)}")
        obs, reward, terminated, truncated, info = self.vector_env.step(action[None])
        obs, info = self._unbatch(obs, info)
        return obs, float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self) -> np.ndarray | None:
        frames = self.vector_env.render()
        return None if frames is None else frames[0]

    def close(self) -> None:
        self.vector_env.close()

    def _unbatch(self, obs: dict, info: dict) -> tuple[dict | np.ndarray, dict]:
        obs, info = first(obs), first(info)
        if self.image_only:
            return obs["image"], {**info, "task": obs["task"]}
        return obs, info


def first(batched: dict) -> dict:
    """Sub-env 0 of a batched observation or info dict (the `_key` masks are dropped)."""
    return {k: v[0] for k, v in batched.items() if not k.startswith("_")}


def make_time_limit(env: gym.Env) -> int | None:
    """The `max_episode_steps` given to `gymnasium.make`, when `gymnasium.make` is constructing `env`.

    Call it from `env`'s constructor. `gym.make(id, max_episode_steps=N)` keeps N for a `TimeLimit` wrapper that
    counts `step()` calls and never passes it to the env, and no registration changes that in Gymnasium 1.x: `make`
    adds the `TimeLimit` after the entry point returns, and the one later hook, a spec's `additional_wrappers`, makes
    `make_vec` refuse the spec's vector entry point. Our envs step a chunk of actions per call and count their limit
    in actions, so they read N here, from `make`'s frame (the first one above `env`'s constructors), and take it as
    that limit: N actions, N / action_chunk steps. The `TimeLimit` of N steps that `make` still adds never ends an
    episode first.

    Returns:
        N, or None when `gymnasium.make` is not constructing `env`, or got None (no limit given) or -1
        (Gymnasium's "no TimeLimit"): the env then keeps its own limit.
    """
    frame = sys._getframe(1)
    while frame is not None and frame.f_locals.get("self") is env:  # env's constructors, subclasses first
        frame = frame.f_back
    if frame is None or frame.f_code is not gym.make.__code__:
        return None
    if "max_episode_steps" not in frame.f_locals:
        raise RuntimeError(
            f"gymnasium.make (gymnasium {gym.__version__}) has no local max_episode_steps, got locals "
            f"{sorted(frame.f_locals)}; opensora_gym reads it to count the limit in actions (tested with gymnasium 1.x)"
        )
    limit = frame.f_locals["max_episode_steps"]
    return None if limit is None or limit == -1 else limit
