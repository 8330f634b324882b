"""`OpenSoraLiberoVecEnv`: `OpenSoraLiberoEnv` as a Stable-Baselines3 `VecEnv`.

SB3 does not take a Gymnasium `VectorEnv`; this adapter translates the three things that differ:
- the action: SB3 policies output flat vectors, so a chunk [A, 7] is a Box of shape (A * 7,);
- the observation: the image alone, [N, S, S, 3] uint8 channel-last (`VecTransposeImage`, which SB3 applies
  for `CnnPolicy`, moves the channels). Text cannot be an SB3 observation: the instruction of each sub-env's
  current observation is in `infos[i]["task"]`, `reset_infos[i]["task"]` and `tasks`;
- the autoreset: SB3 resets a sub-env on the step it ends, returns the new episode's first observation and puts
  the last one in `infos[i]["terminal_observation"]`, while `OpenSoraLiberoEnv` resets on the next step.

For one env at a time (SB3's `check_env`, `make_vec_env`), use the image-only ids (`OpenSoraLibero-Spatial-Image-v0`,
`Libero-Spatial-Image-v0`, ...), or `ImageObservation` on the single env of `gym.make("OpenSoraLibero-Spatial-v0")`:
the observation becomes the image and the task goes to `info["task"]`. `make_vec_env` on an id with the text
observation fails with a `TypeError` that names both (`opensora_gym.spaces.TaskText`).
SB3's default `CnnPolicy` needs images of at least 36 px: use `image_size=40` or more (a multiple of 8).

Requires the `sb3` extra (`pip install opensora-gym[sb3]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from einops import rearrange
from gymnasium import spaces

try:
    from stable_baselines3.common.vec_env import VecEnv
    from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        "opensora_gym.wrappers.sb3 needs Stable-Baselines3, which is not installed: pip install 'opensora-gym[sb3]'"
    ) from err

from opensora_gym.env import OpenSoraLiberoEnv

# Step infos that describe the chunk just imagined (for a sub-env that ended: the last chunk of its episode).
CHUNK_INFO_KEYS = ("frame_rewards", "success_prob", "success_once", "episode_return", "episode_length")


class ImageObservation(gym.ObservationWrapper):
    """The single env's observation without its text: the image (S, S, 3) uint8, which SB3 can batch.

    The instruction of the returned observation is in `info["task"]` after `reset` and `step`.

    Example:
        >>> from stable_baselines3.common.env_util import make_vec_env  # doctest: +SKIP
        >>> venv = make_vec_env(  # doctest: +SKIP
        ...     "OpenSoraLibero-Spatial-v0", wrapper_class=ImageObservation, env_kwargs={"image_size": 64}
        ... )
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        if not isinstance(env.observation_space, spaces.Dict) or "image" not in env.observation_space.spaces:
            raise TypeError(
                f"env must have a Dict observation space with an 'image' (the OpenSoraLibero single env), got "
                f"{env.observation_space}"
            )
        self.observation_space = env.observation_space["image"]

    def observation(self, observation: dict) -> np.ndarray:
        return observation["image"]


class OpenSoraLiberoVecEnv(VecEnv):
    """A Stable-Baselines3 `VecEnv` over one batched `OpenSoraLiberoEnv`.

    Observation: Box (S, S, 3) uint8 per sub-env. Action: Box (action_chunk * action_dim,) float32 in [-1, 1]
    per sub-env, reshaped to the env's chunk [action_chunk, action_dim]. Reward: the chunk's summed reward.

    Infos per sub-env: `frame_rewards` [A] and `success_prob` [A] of the imagined chunk, `success_once`,
    `episode_return`, `episode_length` (in actions) of its episode; `task` and `episode_index` of the returned
    observation. When a sub-env is done it is reset on the same step: its info also holds
    `terminal_observation` (the last image, [S, S, 3]), `terminal_task`, and `TimeLimit.truncated` (truncated
    and not terminated, so SB3 bootstraps the value). Other sub-envs are not stepped by that reset.

    The sub-envs share one batched env, so `get_attr` returns the same attribute of that env for each index,
    and `set_attr`/`env_method` act on it once and only for all sub-envs together. Wrap with
    `stable_baselines3.common.vec_env.VecMonitor` to log episode returns. `seed(s)` (SB3's own) makes the next
    `reset()` seed sub-env i's generator with `s + i`, the numbering SB3 uses too.

    Args:
        env: the env to adapt. It must not be wrapped: the adapter resets single sub-envs itself, which a
            wrapper would not see.
    """

    def __init__(self, env: OpenSoraLiberoEnv):
        if not isinstance(env, OpenSoraLiberoEnv):
            raise TypeError(
                f"env must be an OpenSoraLiberoEnv (not wrapped: the adapter resets sub-envs on its own), "
                f"got {type(env).__name__}"
            )
        self.env = env
        chunk = env.single_action_space
        action_space = spaces.Box(
            low=chunk.low.reshape(-1), high=chunk.high.reshape(-1), dtype=chunk.dtype
        )  # [A * action_dim]
        super().__init__(env.num_envs, env.single_observation_space["image"], action_space)
        self._actions: np.ndarray | None = None
        self._tasks: tuple[str, ...] = ()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The instruction of each sub-env's current observation."""
        return self._tasks

    def reset(self) -> VecEnvObs:
        """Starts a new episode in every sub-env, with the seed from `seed()` and the options from
        `set_options()` if they were set since the last reset.

        Returns:
            images [N, S, S, 3] uint8.
        """
        seed = self._seeds[0]
        if any(o != self._options[0] for o in self._options):
            raise ValueError(
                "the sub-envs share one batched env, so they take one options dict; got different options per "
                f"sub-env {self._options}. Pass {{'episode_indices': [...]}} to choose each sub-env's episode."
            )
        obs, info = self.env.reset(seed=seed, options=self._options[0] or None)
        self._reset_seeds()
        self._reset_options()
        self._tasks = tuple(obs["task"])
        self.reset_infos = [
            {"task": obs["task"][i], "episode_index": int(info["episode_index"][i])} for i in range(self.num_envs)
        ]
        return obs["image"]

    def step_async(self, actions: np.ndarray) -> None:
        """Stores the actions [N, A * action_dim] for `step_wait`."""
        actions = np.asarray(actions)
        expected = (self.num_envs, *self.action_space.shape)
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {expected}, got {actions.shape}")
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """Imagines one chunk per sub-env; sub-envs that end are reset at once.

        Returns:
            (images [N, S, S, 3] uint8, rewards [N] float32, dones [N] bool, infos: N dicts).
        """
        if self._actions is None:
            raise ValueError("step_wait() called without step_async(actions): call step_async first")
        actions = rearrange(self._actions, "n (a d) -> n a d", d=self.env.single_action_space.shape[-1])
        self._actions = None
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        dones = terminated | truncated
        images = obs["image"].copy()
        infos: list[dict[str, Any]] = [{key: info[key][i] for key in CHUNK_INFO_KEYS} for i in range(self.num_envs)]
        done = np.flatnonzero(dones).tolist()
        if done:
            new_obs, new_info = self._reset_sub_envs(done)
            for i in done:
                infos[i].update(
                    terminal_observation=images[i].copy(),
                    terminal_task=obs["task"][i],
                    **{"TimeLimit.truncated": bool(truncated[i] and not terminated[i])},
                )
            images[done] = new_obs["image"][done]
            obs, info = new_obs, new_info
        for i, item in enumerate(infos):
            item.update(task=obs["task"][i], episode_index=int(info["episode_index"][i]))
        self._tasks = tuple(obs["task"])
        return images, rewards, dones, infos

    def _reset_sub_envs(self, indices: list[int]) -> tuple[dict, dict]:
        """Starts the next episode of the given sub-envs now (SB3's same-step reset), without a chunk step of the
        others: the env's partial reset, which does exactly what its next-step autoreset would.

        Returns:
            the env's observation and reset info after the reset (all sub-envs).
        """
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[indices] = True
        return self.env.reset(options={"reset_mask": mask})

    def close(self) -> None:
        self.env.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        """The current image of each sub-env (needs render_mode='rgb_array')."""
        images = self.env.render()
        return [None] * self.num_envs if images is None else list(images)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The attribute of the shared env, once per requested sub-env."""
        value = getattr(self.env, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Sets the attribute of the shared env (only for all sub-envs at once)."""
        self._check_all(indices, "set_attr")
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Calls the method of the shared env once (only for all sub-envs at once); its result for each."""
        self._check_all(indices, "env_method")
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result] * self.num_envs

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        """False for each sub-env: the adapter only takes an unwrapped `OpenSoraLiberoEnv`."""
        return [isinstance(self.env, wrapper_class) for _ in self._get_indices(indices)]

    def _check_all(self, indices: VecEnvIndices, name: str) -> None:
        chosen = sorted(self._get_indices(indices))
        if chosen != list(range(self.num_envs)):
            raise ValueError(
                f"{name} acts on the one batched env that all {self.num_envs} sub-envs share, so indices must be "
                f"None or all sub-envs, got {chosen}"
            )
