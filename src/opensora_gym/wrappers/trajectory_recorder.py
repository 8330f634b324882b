"""Recording LIBERO episodes in the trajectory layout the world model reads, and their action statistics.

An episode of T actions becomes one file ``traj{index:06d}_task{t:02d}_trial{k:02d}.npy`` (a numpy object array
read by :class:`opensora_gym.data.TrajectoryDataset`) of T + 1 per-frame dicts:

- ``image``: ``[H, W, 3]`` uint8, the observation (frame 0 is the one after reset, frame T the final one);
- ``delta_action``: ``[7]`` float32, the controller action executed from this frame (LIBERO's convention, gripper
  -1 = open, +1 = close; see :func:`opensora_gym.libero.controller_actions`); the final frame has no action and
  holds zeros;
- ``success``: LIBERO's success check at this frame (``info["frame_success"]``; false at frame 0). The env ends an
  episode at its first success, so only the final frame of a successful episode is true, unless the env goes on
  after it (``LiberoConfig.post_success_steps``); the per-frame label the reward model is trained on;
- ``expert_action`` (only when the actor is the scripted expert): ``[7]`` float32, the expert's action before its
  noise, in the controller convention (zeros on the final frame): the label behaviour cloning learns
  (``opensora-gym train-policy --action-key expert_action``);
- ``task`` (the instruction), ``task_id``, ``trial_id`` and ``init_ee_pose`` (``[8]`` float32, the proprio state
  at frame 0: end-effector position, rotation vector, finger positions), the same in every frame.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium.vector import VectorEnv, VectorWrapper

from opensora_gym.data import ActionStatistics, TrajectoryDataset, save_trajectory

_ACTION_KEY = "delta_action"
EXPERT_ACTION_KEY = "expert_action"


def episode_frames(
    images: Sequence[np.ndarray],
    actions: Sequence[np.ndarray],
    task: str,
    task_id: int,
    trial_id: int,
    init_ee_pose: np.ndarray,
    frame_success: Sequence[bool],
    labels: Sequence[np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """The per-frame dicts of one recorded episode (the layout in the module docstring).

    Args:
        images: the T + 1 observations ``[H, W, 3]`` uint8, from the one after reset to the final one.
        actions: the T controller actions ``[7]`` executed between them.
        task: the instruction.
        task_id: LIBERO's task index.
        trial_id: LIBERO's initial-state index.
        init_ee_pose: ``[8]`` proprio state at frame 0.
        frame_success: the T + 1 flags of LIBERO's success check, one per image (false for the first).
        labels: the T expert actions ``[7]`` before their noise (controller convention), stored as
            ``expert_action``; None: none stored.

    Returns:
        T + 1 frame dicts.
    """
    if len(images) != len(actions) + 1:
        raise ValueError(f"an episode of {len(actions)} actions needs {len(actions) + 1} images, got {len(images)}")
    if len(actions) == 0:
        raise ValueError("an episode needs at least one executed action, got none")
    if labels is not None and len(labels) != len(actions):
        raise ValueError(f"an episode of {len(actions)} actions needs {len(actions)} expert labels, got {len(labels)}")
    if len(frame_success) != len(images):
        raise ValueError(
            f"an episode of {len(images)} images needs {len(images)} success flags, got {len(frame_success)}"
        )
    actions = [np.asarray(action, dtype=np.float32) for action in actions]
    actions.append(np.zeros_like(actions[0]))  # the final frame: no action was taken from it
    shared = {
        "task": task,
        "task_id": int(task_id),
        "trial_id": int(trial_id),
        "init_ee_pose": np.asarray(init_ee_pose, dtype=np.float32),
    }
    frames = [
        {"image": image, _ACTION_KEY: action, "success": bool(flag), **shared}
        for image, action, flag in zip(images, actions, frame_success, strict=True)
    ]
    if labels is not None:
        for frame, label in zip(frames, [*labels, np.zeros_like(actions[0])], strict=True):
            frame[EXPERT_ACTION_KEY] = np.asarray(label, dtype=np.float32)
    return frames


class TrajectoryRecorder(VectorWrapper):
    """Writes every episode that ends in a LIBERO vector env to ``folder``, one ``.npy`` file per episode.

    The env must return per-action frames (``LiberoVectorEnv`` made with ``return_frames=True``). Files are
    numbered in the order episodes end, after the ``traj*.npy`` files already in the folder; an episode still
    running at ``reset()`` or ``close()`` is dropped. ``saved`` lists the files written.

    Args:
        env: the LIBERO vector env (``gym.make_vec("Libero-...-v0", num_envs=N, return_frames=True)``).
        folder: where to write the episodes (created if missing).

    Example:
        >>> envs = TrajectoryRecorder(  # doctest: +SKIP
        ...     gym.make_vec("Libero-Spatial-v0", num_envs=4, return_frames=True), "dataset"
        ... )
    """

    def __init__(self, env: VectorEnv, folder: str | PathLike[str]) -> None:
        super().__init__(env)
        config = getattr(env.unwrapped, "config", None)
        if not getattr(config, "return_frames", False):
            raise ValueError(
                "TrajectoryRecorder needs the image after every action: make the env with return_frames=True "
                f"(got {type(env.unwrapped).__name__} with return_frames="
                f"{getattr(config, 'return_frames', 'missing')})"
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.saved: list[Path] = []
        self._next_index = len(glob.glob(os.path.join(glob.escape(str(self.folder)), "traj*.npy")))
        self._episodes: list[dict[str, Any] | None] = [None] * self.num_envs
        self._ended = np.zeros(self.num_envs, dtype=bool)

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        observation, info = self.env.reset(seed=seed, options=options)
        for index in range(self.num_envs):
            self._begin(index, observation, info)
        self._ended[:] = False
        return observation, info

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(actions)
        for index in range(self.num_envs):
            if self._ended[index]:
                # Next-step autoreset: this step started the sub-env's new episode.
                self._begin(index, observation, info)
                continue
            episode = self._episodes[index]
            executed = info["frame_executed"][index]  # [action_chunk] bool
            episode["images"].extend(info["frames"][index][executed])
            episode["actions"].extend(info["controller_actions"][index][executed])
            episode["success"].extend(info["frame_success"][index][executed])
            if terminated[index] or truncated[index]:
                self._save(episode)
                self._episodes[index] = None
        self._ended = np.logical_or(terminated, truncated)
        return observation, reward, terminated, truncated, info

    def _begin(self, index: int, observation: dict[str, Any], info: dict[str, Any]) -> None:
        self._episodes[index] = {
            "images": [observation["image"][index]],
            "actions": [],
            "success": [False],  # LIBERO's flag of each frame; none at reset
            "task": observation["task"][index],
            "task_id": int(info["task_id"][index]),
            "trial_id": int(info["trial_id"][index]),
            "init_ee_pose": np.asarray(info["state"][index], dtype=np.float32),
        }

    def _save(self, episode: dict[str, Any]) -> None:
        frames = episode_frames(
            episode["images"],
            episode["actions"],
            episode["task"],
            episode["task_id"],
            episode["trial_id"],
            episode["init_ee_pose"],
            episode["success"],
        )
        name = f"traj{self._next_index:06d}_task{episode['task_id']:02d}_trial{episode['trial_id']:02d}.npy"
        path = self.folder / name
        if path.exists():
            raise FileExistsError(f"{path} exists already; record into an empty folder or move the old episodes")
        save_trajectory(path, frames)
        self._next_index += 1
        self.saved.append(path)


def build_action_statistics(folder: str | PathLike[str], output: str | PathLike[str] | None = None) -> ActionStatistics:
    """The action statistics (q01, q99, mean, std, min, max) of the episodes a TrajectoryRecorder wrote.

    Each episode's last frame carries no executed action (see the module docstring) and is left out.

    Args:
        folder: the folder of ``traj*.npy`` episodes.
        output: where to write ``dataset_statistics.json`` (a file, or a folder to write it into); None writes
            nothing.

    Returns:
        The statistics of all executed actions ``[N, 7]``.
    """
    dataset = TrajectoryDataset(folder, action_key=_ACTION_KEY)
    actions = np.concatenate([dataset.episode(index).actions[:-1] for index in range(len(dataset))])  # [N, 7]
    if len(actions) == 0:
        raise ValueError(f"the episodes in {folder} hold no executed actions (each has only its final frame)")
    statistics = ActionStatistics.from_actions(actions)
    if output is not None:
        statistics.to_json(output)
    return statistics
