"""Recording episodes in the real LIBERO env into a world-model dataset folder (``opensora-gym collect``).

An actor (the scripted expert of :mod:`opensora_gym.expert`, or a policy behind an adapter) plays chosen LIBERO
episodes; each is written as the :class:`opensora_gym.wrappers.TrajectoryRecorder` layout
(``dataset/traj{e:06d}_task{t:02d}_trial{k:02d}.npy``: per-frame image, ``delta_action`` in the controller
convention, task, ``init_ee_pose`` and the simulator's per-frame ``success`` flag), and
``dataset_statistics.json`` of the executed actions goes next to ``dataset/``: the data folder of a world-model
checkpoint. A dimension the actions never vary (the expert never rotates) gets q01, q99 = ``CONTROLLER_RANGE``.

Episode ``e`` plays the ``e % P``-th of the P chosen (task, trial) pairs (task-major), and its actor is seeded with
``(seed, e)``, so an episode does not depend on the worker or the wave that plays it. Collection is resumable as
conversion is (:func:`opensora_gym.data.save_trajectory`): an episode file appears only complete, a rerun plays only
the missing episodes, and the statistics (of all episodes) are written last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from opensora_gym.checkpoint import DATASET_FOLDER
from opensora_gym.convert import write_statistics
from opensora_gym.data import ActionStatistics, load_trajectory, save_trajectory
from opensora_gym.libero import SUITES, LiberoConfig, LiberoVectorEnv
from opensora_gym.spaces import CONTROLLER_RANGE, controller_actions
from opensora_gym.wrappers.trajectory_recorder import episode_frames

__all__ = ["Actor", "CollectConfig", "CollectedEpisode", "collect_episodes"]

# q01/q99 of an action dimension the episodes never vary (the expert never rotates; a short run may never close the
# gripper): the controller's whole range, so that normalization stays defined.


class Actor(Protocol):
    """What plays the episodes: the scripted expert, or a policy adapter.

    Attributes:
        action_chunk: actions per env step.
    """

    action_chunk: int

    def begin(self, index: int, seed: Any) -> None:
        """Sub-env ``index`` starts an episode whose randomness is seeded with ``seed`` (a tuple of ints)."""

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> np.ndarray:
        """Actions ``[N, action_chunk, 7]`` in policy units (gripper 1 = open, 0 = close) for the env's N sub-envs.

        An actor whose actions are noisy on purpose also sets ``intended_actions`` (the same shape, before the
        noise): they are recorded as each frame's ``expert_action``.
        """


@dataclass(frozen=True)
class CollectConfig:
    """A collection run.

    Attributes:
        output: the output folder: ``dataset/traj*.npy`` and ``dataset_statistics.json``.
        suite: the LIBERO suite, one of ``opensora_gym.libero.SUITES``.
        task_ids: the tasks to play; None: all of the suite.
        trial_ids: the initial states (trials) to play of each task; None: all.
        num_episodes: episodes in the folder; None: one per chosen (task, trial) pair. More than the pairs cycles
            through them again.
        image_size: side of the recorded images, in pixels.
        num_envs: LIBERO worker processes.
        max_episode_steps: policy steps per episode; None: the suite's limit.
        post_success_steps: steps recorded after LIBERO's first success (`LiberoConfig.post_success_steps`); the
            frames carry the simulator's own per-frame success flag. 0: the episode ends at its success frame, the
            only frame flagged.
        privileged_state: give the actor the objects' poses (``info["object_poses"]``; the scripted expert needs it).
        seed: seeds each episode's actor with ``(seed, episode)``; LIBERO's scene seed is 0 (fixed initial states).
        progress: show a tqdm progress bar.
    """

    output: Path
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] | None = None
    trial_ids: tuple[int, ...] | None = None
    num_episodes: int | None = None
    image_size: int = 128
    num_envs: int = 1
    max_episode_steps: int | None = None
    post_success_steps: int = 0
    privileged_state: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {sorted(SUITES)}, got {self.suite!r}")
        for name in ("task_ids", "trial_ids"):
            value = getattr(self, name)
            if value is not None:
                if len(value) == 0 or any(not isinstance(v, int) or v < 0 for v in value):
                    raise ValueError(f"{name} must be a non-empty list of ints >= 0 or None, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        if self.num_episodes is not None and (not isinstance(self.num_episodes, int) or self.num_episodes < 1):
            raise ValueError(f"num_episodes must be a positive int or None, got {self.num_episodes!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.post_success_steps, int) or self.post_success_steps < 0:
            raise ValueError(f"post_success_steps must be an int >= 0, got {self.post_success_steps!r}")


@dataclass(frozen=True)
class CollectedEpisode:
    """One episode of the folder.

    Attributes:
        path: its file.
        task_id: LIBERO's task.
        trial_id: LIBERO's initial state.
        success: whether LIBERO's success check passed in it.
        length: actions executed (with the steps after its success, `CollectConfig.post_success_steps`).
        new: played by this call (False: found complete from an earlier call).
    """

    path: Path
    task_id: int
    trial_id: int
    success: bool
    length: int
    new: bool = True


def _plan(config: CollectConfig, walk: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (task, trial) of every episode of the folder, in episode order."""
    tasks = sorted({task for task, _ in walk})
    for name, chosen, valid in (
        ("task_ids", config.task_ids, tasks),
        ("trial_ids", config.trial_ids, sorted({trial for _, trial in walk})),
    ):
        unknown = sorted(set(chosen or ()) - set(valid))
        if unknown:
            title = SUITES[config.suite].title
            raise ValueError(f"{name} must lie in {valid[0]}..{valid[-1]} for {title}, got {unknown}")
    pairs = [
        (task, trial)
        for task, trial in walk
        if (config.task_ids is None or task in config.task_ids)
        and (config.trial_ids is None or trial in config.trial_ids)
    ]
    if not pairs:
        raise ValueError(f"no (task, trial) pair of {config.suite} matches task_ids and trial_ids")
    count = config.num_episodes or len(pairs)
    return [pairs[episode % len(pairs)] for episode in range(count)]


def _name(episode: int, task: int, trial: int) -> str:
    return f"traj{episode:06d}_task{task:02d}_trial{trial:02d}.npy"


def collect_episodes(config: CollectConfig, actor: Actor) -> list[CollectedEpisode]:
    """Plays the episodes missing from ``config.output`` and writes them, then the statistics of all of them.

    Args:
        config: what to collect and where.
        actor: plays the episodes (its ``action_chunk`` is the env's).

    Returns:
        Every episode of the plan, in episode order, found or new.
    """
    folder = config.output / DATASET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    libero = LiberoConfig(
        suite=config.suite,
        image_size=config.image_size,
        max_episode_steps=config.max_episode_steps,
        post_success_steps=config.post_success_steps,
        action_chunk=actor.action_chunk,
        return_frames=True,
        privileged_state=config.privileged_state,
    )
    env = LiberoVectorEnv(libero, num_envs=config.num_envs)
    try:
        plan = _plan(config, env.walk)
        episodes: dict[int, CollectedEpisode] = {}
        actions: dict[int, np.ndarray] = {}  # executed actions [T, 7] of every episode
        missing = []
        for episode, (task, trial) in enumerate(plan):
            path = folder / _name(episode, task, trial)
            if path.exists():
                frames = load_trajectory(path)
                actions[episode] = np.stack([frame["delta_action"] for frame in frames[:-1]])
                success = any(frame["success"] for frame in frames)
                episodes[episode] = CollectedEpisode(path, task, trial, success, len(frames) - 1, new=False)
            else:
                missing.append(episode)
        done = len(plan) - len(missing)
        bar = tqdm(total=len(plan), initial=done, desc="collect", unit="episode", disable=not config.progress)
        for start in range(0, len(missing), config.num_envs):
            for episode, played, executed in _play_wave(
                env, actor, config, plan, missing[start : start + config.num_envs]
            ):
                episodes[episode], actions[episode] = played, executed
                bar.update(1)
            bar.set_postfix(success=f"{sum(e.success for e in episodes.values()) / len(episodes):.2f}")
        bar.close()
    finally:
        env.close()
    executed = np.concatenate([actions[e] for e in range(len(plan))])  # [N, 7]
    write_statistics(config.output, ActionStatistics.from_actions(executed, flat_range=CONTROLLER_RANGE))
    return [episodes[e] for e in range(len(plan))]


def _play_wave(
    env: LiberoVectorEnv, actor: Actor, config: CollectConfig, plan: list[tuple[int, int]], wave: list[int]
) -> list[tuple[int, CollectedEpisode, np.ndarray]]:
    """Plays up to ``num_envs`` episodes side by side and writes each as it ends.

    Returns:
        ``(episode, its record, its executed actions [T, 7])`` of each episode of ``wave``, in the order they ended.
    """
    # Spare sub-envs of a last, short wave replay its first episode; their steps are not recorded.
    padded = wave + [wave[0]] * (env.num_envs - len(wave))
    options = {"task_id": [plan[e][0] for e in padded], "trial_id": [plan[e][1] for e in padded]}
    observation, info = env.reset(seed=0, options=options)
    for index, episode in enumerate(padded):
        actor.begin(index, (config.seed, episode))
    recordings = [
        {
            "images": [observation["image"][index]],
            "actions": [],
            "labels": [],
            "success": [False],  # LIBERO's flag of each frame; none at reset
            "init_ee_pose": info["state"][index].copy(),
        }
        for index in range(len(wave))
    ]
    alive = np.arange(env.num_envs) < len(wave)
    played = []
    while alive.any():
        observation, _, terminated, truncated, step_info = env.step(actor.act(observation, info))
        intended = getattr(actor, "intended_actions", None)  # [N, action_chunk, 7] policy units, or None
        for index in np.flatnonzero(alive):
            recording = recordings[index]
            executed = step_info["frame_executed"][index]  # [action_chunk] bool
            recording["images"].extend(step_info["frames"][index][executed])
            recording["actions"].extend(step_info["controller_actions"][index][executed])
            recording["success"].extend(step_info["frame_success"][index][executed])
            if intended is not None:
                recording["labels"].extend(controller_actions(intended[index][executed]))
            if not (terminated[index] or truncated[index]):
                continue
            alive[index] = False
            episode, (task, trial) = wave[index], plan[wave[index]]
            success = bool(terminated[index])
            frames = episode_frames(
                recording["images"],
                recording["actions"],
                env.catalog.languages[task],
                task,
                trial,
                recording["init_ee_pose"],
                recording["success"],
                labels=recording["labels"] if intended is not None else None,
            )
            path = config.output / DATASET_FOLDER / _name(episode, task, trial)
            save_trajectory(path, frames)
            length = len(recording["actions"])
            played.append(
                (episode, CollectedEpisode(path, task, trial, success, length), np.stack(recording["actions"]))
            )
        info = step_info
    return played
