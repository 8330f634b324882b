"""Recorded robot trajectories (the world model's start frames) and the action normalization statistics.

The RLinf-OpenSora datasets hold one ``.npy`` file per episode: a numpy object array of per-frame dicts
with an ``image`` ``[H, W, 3]`` uint8, the action under ``delta_action`` (or another key), the task text
under ``instruction`` or ``task`` (str or bytes), and optionally ``init_ee_pose``. Episode ``i`` is the
``i``-th name of ``sorted(glob("*.npy"))`` without names containing ``_kir``, as in RLinf, so an episode
index means the same thing here and there. ``dataset_statistics.json`` holds the per-dimension action
quantiles the world model's actions are normalized with.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from opensora_gym.checkpoint import STATISTICS_NAME
from opensora_gym.safe_loading import load_npy

__all__ = [
    "STATISTICS_NAME",
    "ActionStatistics",
    "Episode",
    "TrajectoryDataset",
    "load_trajectory",
    "save_trajectory",
]


_IMAGE_KEY = "image"
_TASK_KEYS = ("instruction", "task")
_INIT_EE_POSE_KEY = "init_ee_pose"
_SUCCESS_KEY = "success"
# RLinf skips these files unless asked to: they are not episodes to start from.
_EXCLUDED_MARKER = "_kir"
_LAYOUT = "dataset/traj*.npy: one .npy file per episode, each a numpy object array of per-frame dicts"

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def save_trajectory(path: str | PathLike[str], frames: Sequence[Mapping[str, Any]]) -> None:
    """Writes one episode in the RLinf-OpenSora layout: a numpy object array of per-frame dicts.

    A killed writer never leaves a partial episode under ``path``: the frames go to a hidden temporary file next to
    it (``TrajectoryDataset``'s listing skips dot-files, and a rerun overwrites it), which is then renamed to
    ``path``. So a resumable writer may take every ``.npy`` file it finds as finished.

    Args:
        path: destination ``.npy`` file.
        frames: per-frame dicts, e.g. ``{"image": [H, W, 3] uint8, "delta_action": [A] float32,
            "instruction": str}``.
    """
    path = Path(path)
    # np.save would silently append ".npy", so the file would not be where the caller asked.
    if path.suffix != ".npy":
        raise ValueError(f"trajectory path must end in .npy, got {path}")
    if len(frames) == 0:
        raise ValueError(f"a trajectory needs at least one frame, got none for {path}")
    not_dicts = [index for index, frame in enumerate(frames) if not isinstance(frame, Mapping)]
    if not_dicts:
        raise ValueError(f"every frame must be a dict, frames {not_dicts[:5]} are not (writing {path})")
    array = np.empty(len(frames), dtype=object)  # [T] of dicts
    array[:] = [dict(frame) for frame in frames]
    partial = path.parent / f".{path.stem}.partial.npy"
    np.save(partial, array, allow_pickle=True)
    os.replace(partial, path)


def load_trajectory(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """Reads one episode file without running code from it.

    Args:
        path: a ``.npy`` trajectory file.

    Returns:
        The per-frame dicts, in order.

    Raises:
        FileNotFoundError: no file at ``path``.
        opensora_gym.safe_loading.UnsafeFileError: the file carries anything but plain data.
        ValueError: the file is corrupt or does not hold a 1-D array of dicts.
    """
    path = Path(path)
    array = load_npy(path)
    if array.ndim != 1 or array.dtype != object or len(array) == 0:
        raise ValueError(
            f"{path} holds an array of shape {array.shape} and dtype {array.dtype}; expected a non-empty "
            "1-D object array of per-frame dicts"
        )
    not_dicts = [index for index, frame in enumerate(array) if not isinstance(frame, dict)]
    if not_dicts:
        raise ValueError(f"{path} frames {not_dicts[:5]} are not dicts (expected one dict per frame)")
    return list(array)


@dataclass(frozen=True)
class Episode:
    """One recorded episode.

    Attributes:
        images: camera frames ``[T, H, W, 3]`` uint8.
        actions: actions ``[T, A]`` float32, as recorded (not normalized).
        task: the language instruction.
        init_ee_pose: the end-effector pose at the start ``[D]`` float32, or None when not recorded.
        path: the file the episode came from.
        success: the simulator's per-frame success flags ``[T]`` bool (a frame without one counts as no success), or
            None when no frame records one.
    """

    images: np.ndarray
    actions: np.ndarray
    task: str
    init_ee_pose: np.ndarray | None
    path: Path
    success: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be [T, H, W, 3] uint8, got shape {self.images.shape} dtype {self.images.dtype} "
                f"({self.path})"
            )
        if self.actions.ndim != 2 or self.actions.dtype != np.float32:
            raise ValueError(
                f"actions must be [T, A] float32, got shape {self.actions.shape} dtype {self.actions.dtype} "
                f"({self.path})"
            )
        if len(self.actions) != len(self.images):
            raise ValueError(
                f"actions and images must have the same number of frames, got {len(self.actions)} and "
                f"{len(self.images)} ({self.path})"
            )
        if not isinstance(self.task, str):
            raise ValueError(f"task must be a str, got {type(self.task).__name__} ({self.path})")


class TrajectoryDataset:
    """The episodes of a folder of RLinf-OpenSora ``.npy`` trajectories, read one file at a time.

    Construction only lists the files; each call to :meth:`episode`, :meth:`images` or :meth:`start_frame` reads one
    file, with :func:`opensora_gym.safe_loading.load_npy`.

    Args:
        folder: the folder of ``*.npy`` episode files (names containing ``_kir`` are skipped).
        action_key: the per-frame key holding the action (``"delta_action"`` or e.g. ``"abs_action"``).

    Example:
        >>> dataset = TrajectoryDataset("dataset")  # doctest: +SKIP
        >>> image, task = dataset.start_frame(0)  # doctest: +SKIP
    """

    def __init__(self, folder: str | PathLike[str], action_key: str = "delta_action") -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"trajectory folder {folder} does not exist (expected the layout {_LAYOUT})")
        # glob.glob rather than Path.glob: it skips dot-files exactly as RLinf's listing does.
        names = sorted(glob.glob(os.path.join(glob.escape(str(folder)), "*.npy")))
        paths = tuple(Path(name) for name in names if _EXCLUDED_MARKER not in os.path.basename(name))
        if not paths:
            raise FileNotFoundError(
                f"trajectory folder {folder} has no .npy episode files (names with {_EXCLUDED_MARKER!r} are "
                f"skipped; expected the layout {_LAYOUT})"
            )
        self.folder = folder
        self.action_key = action_key
        self.paths: tuple[Path, ...] = paths

    def __len__(self) -> int:
        return len(self.paths)

    def episode(self, index: int) -> Episode:
        """Reads episode ``index``.

        Args:
            index: episode index in ``[0, len(self))``.

        Returns:
            The episode's images ``[T, H, W, 3]`` uint8, actions ``[T, A]`` float32, task and start pose.
        """
        path = self._path(index)
        frames = load_trajectory(path)
        images = np.stack([_frame_image(frame, path, t) for t, frame in enumerate(frames)])  # [T, H, W, 3]
        actions = [_frame_action(frame, self.action_key, path, t) for t, frame in enumerate(frames)]
        if len({action.shape for action in actions}) != 1:
            raise ValueError(
                f"{path} has actions of different shapes under {self.action_key!r}: "
                f"{sorted({action.shape for action in actions})}"
            )
        init_ee_pose = frames[0].get(_INIT_EE_POSE_KEY)
        flagged = any(_SUCCESS_KEY in frame for frame in frames)
        return Episode(
            images=images,
            actions=np.stack(actions),  # [T, A]
            task=_frame_task(frames[0], path),
            init_ee_pose=None if init_ee_pose is None else np.asarray(init_ee_pose, dtype=np.float32),
            path=path,
            success=np.array([bool(frame.get(_SUCCESS_KEY, False)) for frame in frames]) if flagged else None,
        )

    def start_frame(self, index: int) -> tuple[np.ndarray, str]:
        """Reads the first frame of episode ``index``: what a world-model rollout starts from.

        Args:
            index: episode index in ``[0, len(self))``.

        Returns:
            ``(image, task)``: the first camera frame ``[H, W, 3]`` uint8 and the task text.
        """
        path = self._path(index)
        first = load_trajectory(path)[0]
        return _frame_image(first, path, 0), _frame_task(first, path)

    def images(self, index: int) -> tuple[np.ndarray, str]:
        """Reads the camera frames of episode ``index`` only (no actions): where a start inside it is chosen.

        Args:
            index: episode index in ``[0, len(self))``.

        Returns:
            ``(images, task)``: the frames ``[T, H, W, 3]`` uint8 and the task text.
        """
        path = self._path(index)
        frames = load_trajectory(path)
        return np.stack([_frame_image(frame, path, t) for t, frame in enumerate(frames)]), _frame_task(frames[0], path)

    def _path(self, index: int) -> Path:
        if not 0 <= index < len(self.paths):
            raise IndexError(
                f"episode index {index} is out of range: valid indices are 0..{len(self.paths) - 1} "
                f"({len(self.paths)} episodes in {self.folder})"
            )
        return self.paths[index]


def _keys_present(frame: Mapping[str, Any]) -> list[str]:
    return sorted(map(str, frame))


def _frame_image(frame: Mapping[str, Any], path: Path, t: int) -> np.ndarray:
    if _IMAGE_KEY not in frame:
        raise ValueError(f"{path} frame {t} has no {_IMAGE_KEY!r} (keys present: {_keys_present(frame)})")
    image = np.asarray(frame[_IMAGE_KEY])
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"{path} frame {t} {_IMAGE_KEY!r} must be [H, W, 3] uint8, got shape {image.shape} dtype {image.dtype}"
        )
    return image


def _frame_action(frame: Mapping[str, Any], action_key: str, path: Path, t: int) -> np.ndarray:
    if action_key not in frame:
        raise ValueError(
            f"{path} frame {t} has no action under {action_key!r} (keys present: {_keys_present(frame)}); "
            "pass action_key= the key that holds the action"
        )
    action = np.asarray(frame[action_key], dtype=np.float32)
    if action.ndim != 1:
        raise ValueError(f"{path} frame {t} {action_key!r} must be a vector [A], got shape {action.shape}")
    return action


def _frame_task(frame: Mapping[str, Any], path: Path) -> str:
    for key in _TASK_KEYS:
        if key in frame:
            task = frame[key]
            return task.decode("utf-8") if isinstance(task, bytes) else str(task)
    raise ValueError(
        f"{path} frame 0 has no task text under {' or '.join(map(repr, _TASK_KEYS))} "
        f"(keys present: {_keys_present(frame)})"
    )


@dataclass
class ActionStatistics:
    """Per-dimension action statistics; ``q01``/``q99`` map actions to [-1, 1] for the world model.

    Attributes:
        q01: 1st percentile of each action dimension ``[A]`` float32.
        q99: 99th percentile ``[A]`` float32; must exceed ``q01`` in every dimension.
        mean: mean ``[A]`` float32, optional.
        std: standard deviation ``[A]`` float32, optional.
        min: minimum ``[A]`` float32, optional.
        max: maximum ``[A]`` float32, optional.
    """

    q01: np.ndarray
    q99: np.ndarray
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.q01 is None or self.q99 is None:
            raise ValueError("q01 and q99 are required: normalization maps [q01, q99] to [-1, 1]")
        converted = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            array = np.array(value, dtype=np.float32)
            if array.ndim != 1 or array.size == 0:
                raise ValueError(f"{field.name} must be a non-empty vector [A], got shape {array.shape}")
            if not np.isfinite(array).all():
                raise ValueError(f"{field.name} must be finite, got {array.tolist()}")
            converted[field.name] = array
        action_dim = len(converted["q01"])
        wrong = {name: array.shape for name, array in converted.items() if array.shape != (action_dim,)}
        if wrong:
            raise ValueError(f"every statistic must have shape ({action_dim},) like q01, got {wrong}")
        flat = np.flatnonzero(converted["q99"] <= converted["q01"])
        if flat.size:
            raise ValueError(
                f"q99 must exceed q01 in every dimension (normalization divides by q99 - q01), but dimensions "
                f"{flat.tolist()} have q01 {converted['q01'][flat].tolist()} and q99 "
                f"{converted['q99'][flat].tolist()}"
            )
        for name, array in converted.items():
            setattr(self, name, array)

    @property
    def action_dim(self) -> int:
        """A, the number of action dimensions."""
        return len(self.q01)

    @classmethod
    def from_json(cls, path: str | PathLike[str]) -> ActionStatistics:
        """Reads ``{"action": {"q01": [...], "q99": [...], ...}}`` (RLinf's ``dataset_statistics.json``).

        Args:
            path: the JSON file, or a folder containing ``dataset_statistics.json``.

        Returns:
            The statistics; keys other than q01, q99, mean, std, min and max are ignored.
        """
        path = Path(path)
        if path.is_dir():
            path = path / STATISTICS_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no action statistics at {path} (expected {STATISTICS_NAME} with "
                '{"action": {"q01": [...], "q99": [...]}})'
            )
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        action = content.get("action") if isinstance(content, dict) else None
        if not isinstance(action, dict):
            present = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise ValueError(f"{path} has no action statistics object (top level: {present})")
        for required in ("q01", "q99"):
            if required not in action:
                raise ValueError(f"{path} has no action.{required} (action keys present: {sorted(action)})")
        try:
            return cls(**{field.name: action.get(field.name) for field in fields(cls)})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def to_json(self, path: str | PathLike[str]) -> Path:
        """Writes the statistics as ``{"action": {...}}``.

        Args:
            path: the JSON file, or a folder to write ``dataset_statistics.json`` into.

        Returns:
            The path written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / STATISTICS_NAME
        action = {
            field.name: getattr(self, field.name).tolist()
            for field in fields(self)
            if getattr(self, field.name) is not None
        }
        path.write_text(json.dumps({"action": action}, indent=2) + "\n")
        return path

    @classmethod
    def from_actions(cls, actions: np.ndarray, flat_range: tuple[float, float] | None = None) -> ActionStatistics:
        """Computes the statistics of recorded actions.

        Args:
            actions: actions ``[N, A]``.
            flat_range: ``(q01, q99)`` given to the dimensions whose q99 does not exceed their q01 (the data hardly
                varies them, e.g. a scripted expert that never rotates); None: such dimensions raise ValueError.

        Returns:
            q01 and q99 (``np.quantile`` at 0.01 and 0.99, linear interpolation), mean, std (population),
            min and max, each computed in float64 and stored as float32.
        """
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"actions must have shape [N, A] with N >= 1, got {actions.shape}")
        q01, q99 = np.quantile(actions, 0.01, axis=0), np.quantile(actions, 0.99, axis=0)
        if flat_range is not None:
            flat = q99 <= q01
            q01[flat], q99[flat] = flat_range
        return cls(
            q01=q01,
            q99=q99,
            mean=actions.mean(axis=0),
            std=actions.std(axis=0),
            min=actions.min(axis=0),
            max=actions.max(axis=0),
        )

    def normalize(self, actions: ArrayOrTensor) -> ArrayOrTensor:
        """Maps actions to about [-1, 1]: ``2 * ((a - q01) / (q99 - q01)) - 1`` in float32, not clipped.

        Args:
            actions: actions ``[..., A]``, a numpy array or a torch tensor.

        Returns:
            Normalized actions ``[..., A]`` float32, of the same kind (and device) as ``actions``.
        """
        actions, q01, q99 = self._operands(actions)
        # The reference's order of operations, so results match it bit for bit.
        return 2 * ((actions - q01) / (q99 - q01)) - 1

    def unnormalize(self, normalized: ArrayOrTensor) -> ArrayOrTensor:
        """Inverse of :meth:`normalize`: ``(n + 1) / 2 * (q99 - q01) + q01`` in float32.

        Args:
            normalized: normalized actions ``[..., A]``, a numpy array or a torch tensor.

        Returns:
            Actions ``[..., A]`` float32, of the same kind (and device) as ``normalized``.
        """
        normalized, q01, q99 = self._operands(normalized)
        return (normalized + 1) / 2 * (q99 - q01) + q01

    def _operands(self, actions: Any) -> tuple[Any, Any, Any]:
        """Casts ``actions`` to float32 and returns it with q01 and q99 of the same kind and device."""
        if isinstance(actions, torch.Tensor):
            q01 = torch.from_numpy(self.q01).to(actions.device)
            q99 = torch.from_numpy(self.q99).to(actions.device)
            actions = actions.to(torch.float32)
        else:
            q01, q99 = self.q01, self.q99
            actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim == 0 or actions.shape[-1] != self.action_dim:
            raise ValueError(
                f"actions must have shape [..., {self.action_dim}] (the statistics' action dim), "
                f"got {tuple(actions.shape)}"
            )
        return actions, q01, q99
