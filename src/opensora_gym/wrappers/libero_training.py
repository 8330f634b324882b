"""The real LIBERO simulator as a training env: GRPO groups that share a start, and per-action rewards.

RL in the simulator is what RLinf's LIBERO recipes do and what the world model stands in for; with this wrapper a
run can train in either and compare (``env.train.env_type: libero``). It gives the simulator the step interface
the rollout reads from the world-model env (:class:`opensora_gym.env.OpenSoraLiberoEnv`):

- **Starts**: ``reset(seed=s)`` draws one (task, trial) pair of ``pairs`` for each group of ``group_size``
  consecutive sub-envs, uniformly with a generator seeded by ``s``, so a group's episodes start from the same
  initial state and differ only by the policy's actions (LIBERO is deterministic given both). ``options`` with
  ``task_id`` and ``trial_id`` (or ``reset_mask``) pass through to :class:`opensora_gym.libero.LiberoVectorEnv`.
- **Rewards**: a frame's reward is LIBERO's success check after that action (0/1), turned into step rewards by the
  world-model env's rule (:class:`opensora_gym.reward_rule.RewardRule`: with ``use_rel_reward``
  ``reward_coef * (r_t - r_(t-1))``, so a success counts once). ``info["frame_rewards"]`` ``[N, A]`` holds them
  (0 for actions the chunk did not execute after a success or at the step limit), the step's reward ``[N]`` is their
  sum and ``info["episode_return"]`` their sum over the episode. Episode end, autoreset and the other infos are the
  simulator env's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.vector import VectorWrapper

from opensora_gym.libero import LiberoVectorEnv
from opensora_gym.reward_rule import RewardRule

__all__ = ["LiberoTrainingEnv"]


class LiberoTrainingEnv(VectorWrapper):
    """`LiberoVectorEnv` with GRPO groups of shared starts and the world-model env's per-action rewards.

    Args:
        env: the simulator env; its episodes end at the first success (``post_success_steps=0``).
        pairs: the (task, trial) pairs starts are drawn from.
        group_size: consecutive sub-envs that share a start; divides ``env.num_envs``.
        rule: the reward rule (its ``success_threshold`` is met by a 0/1 success flag for any value in (0, 1]).

    Raises:
        ValueError: on a group size that does not divide the sub-envs, no pairs, a pair the suite does not have,
            or an env that goes on after successes.
    """

    def __init__(
        self, env: LiberoVectorEnv, pairs: Sequence[tuple[int, int]], group_size: int, rule: RewardRule
    ) -> None:
        super().__init__(env)
        if not isinstance(group_size, int) or group_size < 1 or env.num_envs % group_size:
            raise ValueError(
                f"group_size must be a positive int dividing num_envs ({env.num_envs}), got {group_size!r}"
            )
        pairs = tuple((int(task), int(trial)) for task, trial in pairs)
        if not pairs:
            raise ValueError("pairs must name at least one (task, trial) start, got none")
        unknown = sorted(set(pairs) - set(env.walk))
        if unknown:
            raise ValueError(
                f"pairs must be (task, trial) starts of {env.config.suite} (tasks 0-{env.num_tasks - 1}, trials "
                f"0-{max(trial for _, trial in env.walk)}), got {unknown[:5]}"
            )
        if env.config.post_success_steps:
            raise ValueError(
                f"the training env ends an episode at its first success: post_success_steps must be 0, got "
                f"{env.config.post_success_steps}"
            )
        if not 0.0 < rule.success_threshold <= 1.0:
            raise ValueError(f"rule.success_threshold must lie in (0, 1] for 0/1 flags, got {rule.success_threshold}")
        self.pairs = pairs
        self.group_size = group_size
        self.rule = rule
        self._baseline = np.zeros(env.num_envs, dtype=np.float32)
        self._return = np.zeros(env.num_envs, dtype=np.float32)
        self._rng = np.random.default_rng()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Starts every sub-env (or those of ``options["reset_mask"]``); without ``task_id``/``trial_id`` in
        ``options`` each group starts on a pair drawn from ``pairs`` (module docstring)."""
        options = dict(options or {})
        if "task_id" not in options and "trial_id" not in options:
            if seed is not None:
                self._rng = np.random.default_rng(seed)
            drawn = self._rng.integers(len(self.pairs), size=self.num_envs // self.group_size)
            chosen = [self.pairs[index] for index in np.repeat(drawn, self.group_size)]
            options.update(task_id=[task for task, _ in chosen], trial_id=[trial for _, trial in chosen])
        obs, info = self.env.reset(seed=seed, options=options)
        fresh = np.asarray(info["_task_id"])
        self._baseline[fresh] = 0.0
        self._return[fresh] = 0.0
        return obs, info

    def step(self, actions: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One chunk per sub-env; rewards as the module docstring says."""
        obs, _, terminated, truncated, info = self.env.step(actions)
        stepped = np.asarray(info["_success_once"])
        executed, flags = np.asarray(info["frame_executed"]), np.asarray(info["frame_success"])
        frame_rewards = np.zeros(flags.shape, dtype=np.float32)  # [N, A]
        for index in np.flatnonzero(stepped):
            count = int(executed[index].sum())
            # After the last executed action the flag holds: a success that stopped the chunk counts once.
            held = np.where(executed[index], flags[index], flags[index, count - 1]).astype(np.float32)
            outcome = self.rule(held, float(self._baseline[index]))
            frame_rewards[index] = np.where(executed[index], outcome.rewards, 0.0)
            self._baseline[index] = outcome.baseline
            self._return[index] += frame_rewards[index].sum()
        fresh = ~stepped  # sub-envs whose episode ended last step reset on this one
        self._baseline[fresh] = 0.0
        self._return[fresh] = 0.0
        info.update(
            frame_rewards=frame_rewards,
            _frame_rewards=stepped.copy(),
            episode_return=self._return.copy(),
            _episode_return=stepped.copy(),
        )
        return obs, frame_rewards.sum(axis=1), terminated, truncated, info
