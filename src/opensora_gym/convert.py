"""Robot data in other formats -> the trajectory layout the world model reads (``opensora-gym convert``).

Two sources:

- LIBERO's demonstration files (HDF5, one per task): ``data/demo_<i>/`` with ``obs/agentview_rgb``
  ``[T, H, W, 3]`` uint8 (and ``obs/eye_in_hand_rgb``), ``actions`` ``[T, 7]``, ``dones`` and ``rewards`` ``[T]``,
  optionally ``obs/ee_states`` ``[T, 6]`` and ``obs/gripper_states`` ``[T, 2]``; the task text is
  ``language_instruction`` of the JSON attribute ``data.attrs["problem_info"]``.
- LeRobot datasets (v2.x: one parquet and one mp4 per episode; v3: many episodes per file, located through
  ``meta/episodes/``): ``meta/info.json``, the tasks (``meta/tasks.jsonl`` or ``meta/tasks.parquet``), frames in
  ``data/**.parquet`` with ``action``, ``episode_index``, ``frame_index``, ``timestamp`` and ``task_index``; a
  camera is an ``image`` feature (PNG bytes in the parquet) or a ``video`` feature (mp4 per episode or per file).

The output folder has the layout of a world-model checkpoint's data: ``dataset/traj*.npy`` (one episode per file,
read by :class:`opensora_gym.data.TrajectoryDataset`) and ``dataset_statistics.json`` next to it. A source episode
of T frames becomes T per-frame dicts: ``image`` ``[H, W, 3]`` uint8, ``delta_action`` ``[A]`` float32 (the action
taken from that frame; the source has no image after the last action), ``task``, ``success`` when the source
records it, and ``init_ee_pose`` ``[8]`` for LIBERO files that store the proprio state.

Conventions of the output, the same as :class:`opensora_gym.wrappers.TrajectoryRecorder` writes:

- Images are in the orientation the LIBERO env returns (:mod:`opensora_gym.libero`): robosuite's raw OpenGL render
  rotated by 180 degrees, as OpenVLA-OFT, openpi and LeRobot's LIBERO ports store them. :func:`to_env_orientation`
  maps each source orientation to it.
- Actions follow LIBERO's controller (gripper -1 = open, +1 = close). :func:`to_dataset_actions` is the one place
  a source's gripper convention is mapped to it.

Conversion is resumable: each episode is written under a hidden temporary name and renamed when complete, a rerun
skips the episodes already written, and the statistics (of every episode of the call) are written last, also
through a rename.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from opensora_gym.checkpoint import DATASET_FOLDER, STATISTICS_NAME
from opensora_gym.data import ActionStatistics, save_trajectory
from opensora_gym.spaces import controller_actions

__all__ = [
    "GRIPPER_CONVENTIONS",
    "ORIENTATIONS",
    "add_convert_arguments",
    "convert_lerobot",
    "convert_libero_hdf5",
    "resize_images",
    "run_convert",
    "to_dataset_actions",
    "to_env_orientation",
    "write_statistics",
]

Orientation = Literal["opengl", "opencv", "env"]
GripperConvention = Literal["controller", "policy"]
# Image orientations a source may use, each relative to robosuite's raw render.
ORIENTATIONS: tuple[str, ...] = ("opengl", "opencv", "env")
GRIPPER_CONVENTIONS: tuple[str, ...] = ("controller", "policy")
_ACTION_KEY = "delta_action"
_INSTALL_HINT = "install the converter's dependencies: pip install 'opensora-gym[convert]'"


def to_env_orientation(images: np.ndarray, orientation: Orientation) -> np.ndarray:
    """Turns images into the orientation the LIBERO env returns (robosuite's raw render rotated 180 degrees).

    Args:
        images: ``[T, H, W, 3]`` uint8 frames as the source stores them.
        orientation: the source's orientation: ``"opengl"``, robosuite's raw render (bottom-up; LIBERO's HDF5 files
            by default), rotated by 180 degrees; ``"opencv"``, robosuite's ``IMAGE_CONVENTION = "opencv"`` (the raw
            render flipped upside down), flipped left-right; ``"env"``, already as the env returns them (LeRobot's
            and openpi's LIBERO ports, OpenVLA's RLDS), unchanged.

    Returns:
        ``[T, H, W, 3]`` uint8 frames, contiguous.
    """
    if orientation == "opengl":
        images = images[:, ::-1, ::-1]
    elif orientation == "opencv":
        images = images[:, :, ::-1]
    elif orientation != "env":
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    return np.ascontiguousarray(images)


def to_dataset_actions(actions: np.ndarray, gripper: GripperConvention) -> np.ndarray:
    """Maps a source's actions to the dataset's: the one place a source's gripper convention is converted.

    The dataset (like the recorder and the world model's action statistics) uses LIBERO's controller convention,
    gripper -1 = open, +1 = close.

    Args:
        actions: ``[T, A]`` source actions.
        gripper: ``"controller"`` when the source uses LIBERO's controller convention already (LIBERO's HDF5
            files, LeRobot's and openpi's LIBERO ports): unchanged; ``"policy"`` when it stores the policy's
            convention (1 = open, 0 = close, as OpenVLA-OFT emits): mapped by
            :func:`opensora_gym.spaces.controller_actions` (needs A = 7).

    Returns:
        ``[T, A]`` float32 actions in the controller convention.
    """
    if gripper == "controller":
        return np.asarray(actions, dtype=np.float32)
    if gripper == "policy":
        return controller_actions(actions)
    raise ValueError(f"gripper must be one of {GRIPPER_CONVENTIONS}, got {gripper!r}")


def resize_images(images: np.ndarray, image_size: int | None) -> np.ndarray:
    """Resizes frames to ``image_size`` x ``image_size`` (bilinear, antialiased when shrinking).

    Args:
        images: ``[T, H, W, 3]`` uint8.
        image_size: the output side, or None to keep the size.

    Returns:
        ``[T, image_size, image_size, 3]`` uint8 (``images`` itself when no resize is needed).
    """
    if image_size is None or images.shape[1:3] == (image_size, image_size):
        return images
    if image_size <= 0:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    size = (image_size, image_size)
    return np.stack([np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)) for image in images])


@dataclass(frozen=True)
class _SourceEpisode:
    """One source episode, before orientation, resizing and the gripper mapping.

    Attributes:
        images: ``[T, H, W, 3]`` uint8 in the source's orientation.
        actions: ``[T, A]`` in the source's gripper convention.
        task: the language instruction.
        success: ``[T]`` bool per frame, true from the first frame whose step reached success (LIBERO's ``dones``
            or ``rewards``, LeRobot's ``next.success``), or None when the source does not say.
        init_ee_pose: ``[8]`` float32 proprio state at frame 0, or None.
    """

    images: np.ndarray
    actions: np.ndarray
    task: str
    success: np.ndarray | None = None
    init_ee_pose: np.ndarray | None = None


def _success_from(reached: np.ndarray, num_frames: int) -> np.ndarray:
    """``[T]`` per-frame success: true from the first frame whose step reached success on (a source's flags
    ``[T]``); frame t's step leads to frame t + 1, so the flag sits one control step before the success is seen."""
    if reached.shape != (num_frames,):
        raise ValueError(f"success flags must have one entry per frame ({num_frames}), got shape {reached.shape}")
    return np.logical_or.accumulate(reached)


@dataclass(frozen=True)
class _EpisodeRef:
    """Where one episode comes from: its output file name, its image orientation, readers of its actions and of it."""

    name: str
    orientation: Orientation
    actions: Callable[[], np.ndarray]
    read: Callable[[], _SourceEpisode]


def _write_dataset(
    episodes: Sequence[_EpisodeRef],
    output: Path,
    image_size: int | None,
    gripper: GripperConvention,
    progress: bool,
    description: str,
) -> Path:
    """Writes every episode not yet in ``output/dataset``, then the statistics of all of them."""
    if gripper not in GRIPPER_CONVENTIONS:
        raise ValueError(f"gripper must be one of {GRIPPER_CONVENTIONS}, got {gripper!r}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    folder = output / DATASET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    all_actions = []
    for ref in tqdm(episodes, desc=description, unit="episode", disable=not progress):
        path = folder / ref.name
        if path.exists():
            all_actions.append(to_dataset_actions(ref.actions(), gripper))
            continue
        episode = ref.read()
        actions = to_dataset_actions(episode.actions, gripper)  # [T, A]
        images = resize_images(to_env_orientation(episode.images, ref.orientation), image_size)  # [T, H, W, 3]
        shared: dict[str, Any] = {"task": episode.task}
        if episode.init_ee_pose is not None:
            shared["init_ee_pose"] = episode.init_ee_pose
        frames = [
            {"image": image, _ACTION_KEY: action, **shared} for image, action in zip(images, actions, strict=True)
        ]
        if episode.success is not None:  # per frame, as the collector writes it
            for frame, success in zip(frames, episode.success, strict=True):
                frame["success"] = bool(success)
        save_trajectory(path, frames)
        all_actions.append(actions)
    if not all_actions:
        raise ValueError(f"nothing to convert: the source holds no episodes (writing {output})")
    write_statistics(output, ActionStatistics.from_actions(np.concatenate(all_actions)))  # over [N, A]
    return output


def write_statistics(output: Path, statistics: ActionStatistics) -> Path:
    """Writes ``output/dataset_statistics.json`` through a temporary file and a rename; returns its path."""
    partial = output / f".{STATISTICS_NAME}.partial"
    statistics.to_json(partial)
    os.replace(partial, output / STATISTICS_NAME)
    return output / STATISTICS_NAME


# LIBERO's demonstration files.

_DEMO_NAME = re.compile(r"demo_(\d+)")


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as error:
        raise ImportError(f"reading LIBERO's HDF5 files needs h5py ({_INSTALL_HINT})") from error
    return h5py


def _libero_files(paths: Sequence[str | PathLike[str]]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.hdf5"))
            if not found:
                raise FileNotFoundError(f"{path} holds no .hdf5 files (expected LIBERO's <task>_demo.hdf5 files)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no LIBERO demonstration file or folder at {path}")
    stems = [file.stem for file in files]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ValueError(f"LIBERO files must have distinct names (they name the episodes), got {repeated} twice")
    return files


def _libero_task(file: Path, data: Any) -> str:
    if "problem_info" not in data.attrs:
        raise ValueError(
            f"{file} data has no 'problem_info' attribute (expected LIBERO's JSON with language_instruction; "
            f"attributes present: {sorted(data.attrs)})"
        )
    try:
        task = json.loads(data.attrs["problem_info"])["language_instruction"]
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise ValueError(
            f"{file} data.attrs['problem_info'] must be JSON with a 'language_instruction' string ({error!r})"
        ) from error
    # LIBERO stores it as a string or as a list of words.
    return " ".join(task) if isinstance(task, list) else str(task)


def _libero_orientation(file: Path, data: Any) -> Orientation:
    convention = data.attrs.get("macros_image_convention", "opengl")
    convention = convention.decode() if isinstance(convention, bytes) else str(convention)
    if convention not in ("opengl", "opencv"):
        raise ValueError(f"{file} data.attrs['macros_image_convention'] must be opengl or opencv, got {convention!r}")
    return convention


def _libero_field(file: Path, demo: Any, key: str) -> np.ndarray:
    if key not in demo:
        raise ValueError(f"{file} {demo.name} has no {key!r} (expected LIBERO's demo layout; present: {_tree(demo)})")
    return demo[key][()]


def _tree(group: Any) -> list[str]:
    names: list[str] = []
    group.visit(names.append)
    return sorted(names)


def _libero_actions(file: Path, demo: Any) -> np.ndarray:
    actions = _libero_field(file, demo, "actions")
    if actions.ndim != 2 or not np.issubdtype(actions.dtype, np.number):
        raise ValueError(
            f"{file} {demo.name}/actions must be a numeric [T, A] array, got {actions.shape} {actions.dtype}"
        )
    if len(actions) == 0:
        raise ValueError(f"{file} {demo.name} has no frames (actions has shape {actions.shape})")
    return actions


def _libero_episode(file: Path, demo_key: str, camera: str) -> _SourceEpisode:
    h5py = _import_h5py()
    with h5py.File(file, "r") as handle:
        data = handle["data"]
        demo = data[demo_key]
        actions = _libero_actions(file, demo)
        images = _libero_field(file, demo, f"obs/{camera}")
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{file} {demo.name}/obs/{camera} must be [T, H, W, 3] uint8, got shape {images.shape} "
                f"dtype {images.dtype}"
            )
        if len(images) != len(actions):
            raise ValueError(
                f"{file} {demo.name}: obs/{camera} has {len(images)} frames but actions has {len(actions)}; "
                "expected one image per action"
            )
        # LIBERO marks the last step of every (successful) demonstration done, with reward 1.
        ends = [np.asarray(demo[key][()]) > 0 for key in ("dones", "rewards") if key in demo and len(demo[key])]
        init_ee_pose = None
        if "obs/ee_states" in demo and "obs/gripper_states" in demo:
            # End-effector position and axis-angle, then finger positions: the recorder's init_ee_pose.
            init_ee_pose = np.concatenate([demo["obs/ee_states"][0], demo["obs/gripper_states"][0]]).astype(np.float32)
        return _SourceEpisode(
            images=images,
            actions=actions,
            task=_libero_task(file, data),
            success=_success_from(np.logical_or.reduce(ends), len(actions)) if ends else None,
            init_ee_pose=init_ee_pose,
        )


def _libero_refs(file: Path, camera: str, orientation: Orientation | None) -> list[_EpisodeRef]:
    h5py = _import_h5py()
    try:
        handle = h5py.File(file, "r")
    except OSError as error:
        raise ValueError(f"{file} is not a readable HDF5 file ({error})") from error
    with handle:
        if "data" not in handle:
            raise ValueError(f"{file} has no 'data' group (expected LIBERO's data/demo_<i>/ layout)")
        data = handle["data"]
        _libero_task(file, data)
        orientation = orientation or _libero_orientation(file, data)
        keys = list(data.keys())
    wrong = [key for key in keys if not _DEMO_NAME.fullmatch(key)]
    if wrong:
        raise ValueError(f"{file} data holds {wrong[:3]}; expected only groups named demo_<i>")
    refs = []
    for key in sorted(keys, key=lambda key: int(key.split("_")[1])):

        def actions(key: str = key) -> np.ndarray:
            with h5py.File(file, "r") as handle:
                return _libero_actions(file, handle["data"][key])

        def read(key: str = key) -> _SourceEpisode:
            return _libero_episode(file, key, camera)

        name = f"traj_{file.stem}_demo{int(key.split('_')[1]):04d}.npy"
        refs.append(_EpisodeRef(name=name, orientation=orientation, actions=actions, read=read))
    return refs


def convert_libero_hdf5(
    paths: Sequence[str | PathLike[str]],
    output: str | PathLike[str],
    *,
    camera: str = "agentview_rgb",
    image_size: int | None = None,
    orientation: Orientation | None = None,
    gripper: GripperConvention = "controller",
    progress: bool = True,
) -> Path:
    """Converts LIBERO demonstration files into ``output/dataset/traj*.npy`` and ``output/dataset_statistics.json``.

    Demo ``demo_<i>`` of ``<stem>.hdf5`` becomes ``traj_<stem>_demo<iiii>.npy``; its per-frame success comes from
    ``dones``/``rewards`` (LIBERO keeps only successful demonstrations: their last frame is the success).

    Args:
        paths: ``.hdf5`` files, or folders of them (one file per task, e.g. a whole suite).
        output: the output folder (created if missing; episodes already there are kept and skipped).
        camera: the image under ``obs/``: ``"agentview_rgb"`` (third person, what the env observes) or
            ``"eye_in_hand_rgb"``.
        image_size: side of the output frames, or None to keep LIBERO's (128).
        orientation: the files' image orientation (see :func:`to_env_orientation`); None reads it from
            ``data.attrs["macros_image_convention"]``, ``"opengl"`` when absent as in LIBERO's released files.
        gripper: the files' gripper convention (see :func:`to_dataset_actions`); LIBERO's own is ``"controller"``.
        progress: show a tqdm progress bar.

    Returns:
        The output folder.

    Example:
        >>> convert_libero_hdf5(["libero_spatial"], "data/libero_spatial", image_size=256)  # doctest: +SKIP
    """
    if orientation is not None and orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS} or None, got {orientation!r}")
    refs = [ref for file in _libero_files(paths) for ref in _libero_refs(file, camera, orientation)]
    return _write_dataset(refs, Path(output), image_size, gripper, progress, "LIBERO demos")


# LeRobot datasets.


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError(f"reading LeRobot datasets needs pyarrow ({_INSTALL_HINT})") from error
    return pyarrow.parquet


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not valid JSON: {error}") from error
    return rows


def _lerobot_actions(path: Path, rows: dict[str, list[Any]]) -> np.ndarray:
    actions = np.asarray(rows["action"])  # [T, A]
    if actions.ndim != 2 or not np.issubdtype(actions.dtype, np.number):
        raise ValueError(f"{path} column 'action' must hold one numeric vector per frame, got shape {actions.shape}")
    return actions


class _LeRobotDataset:
    """Reads the episodes of a LeRobot dataset folder (v2.x or v3), one camera, without the lerobot package."""

    def __init__(self, root: Path, camera: str) -> None:
        self.root = root
        self.camera = camera
        self.parquet = _import_parquet()
        info_path = root / "meta" / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{root} has no meta/info.json (expected a LeRobot dataset folder)")
        info = _read_json(info_path)
        for key in ("features", "fps", "data_path", "codebase_version"):
            if key not in info:
                raise ValueError(f"{info_path} has no {key!r} (keys present: {sorted(info)})")
        self.info = info
        self.v2 = str(info["codebase_version"]).startswith("v2")
        features = info["features"]
        cameras = sorted(key for key, feature in features.items() if feature.get("dtype") in ("image", "video"))
        if camera not in cameras:
            raise ValueError(f"{info_path} has no image or video feature {camera!r} (cameras: {cameras})")
        self.is_video = features[camera]["dtype"] == "video"
        if self.is_video and not info.get("video_path"):
            raise ValueError(f"{info_path} declares video feature {camera!r} but no 'video_path' template")
        if "action" not in features:
            raise ValueError(f"{info_path} features have no 'action' (features: {sorted(features)})")
        self.tasks = self._tasks()
        self.episodes = self._episodes()
        self._table_cache: tuple[tuple[Path, tuple[str, ...]], Any] | None = None
        self._video_cache: tuple[Path, Any] | None = None

    def _tasks(self) -> dict[int, str]:
        jsonl, parquet = self.root / "meta" / "tasks.jsonl", self.root / "meta" / "tasks.parquet"
        if jsonl.is_file():
            rows = _read_jsonl(jsonl)
            if any("task_index" not in row or "task" not in row for row in rows):
                raise ValueError(f"{jsonl} rows must each hold 'task_index' and 'task'")
            return {int(row["task_index"]): str(row["task"]) for row in rows}
        if parquet.is_file():
            table = self.parquet.read_table(parquet).to_pydict()
            # The task text is the frame's index column (named "task", or pandas' default name).
            text = [name for name in table if name != "task_index"]
            if "task_index" not in table or len(text) != 1:
                raise ValueError(f"{parquet} must hold task_index and one task text column, got {sorted(table)}")
            return {int(index): str(task) for index, task in zip(table["task_index"], table[text[0]], strict=True)}
        raise FileNotFoundError(f"{self.root} has neither meta/tasks.jsonl nor meta/tasks.parquet")

    def _episodes(self) -> dict[int, dict[str, Any]]:
        if self.v2:
            path = self.root / "meta" / "episodes.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{self.root} has no meta/episodes.jsonl (expected with LeRobot v2.x)")
            rows = _read_jsonl(path)
        else:
            files = sorted((self.root / "meta" / "episodes").glob("**/*.parquet"))
            if not files:
                raise FileNotFoundError(f"{self.root} has no meta/episodes/**/*.parquet (expected with LeRobot v3)")
            rows = [row for file in files for row in self.parquet.read_table(file).to_pylist()]
        if any("episode_index" not in row for row in rows):
            raise ValueError(f"{self.root}/meta episode records must each hold 'episode_index'")
        return {int(row["episode_index"]): row for row in rows}

    def _location(self, episode: int, kind: str) -> dict[str, Any]:
        """The fields that fill the ``data_path``/``video_path`` template of ``episode``."""
        if self.v2:
            chunk = episode // int(self.info.get("chunks_size", 1000))
            return {"episode_chunk": chunk, "episode_index": episode, "video_key": self.camera}
        row = self.episodes[episode]
        prefix = "data" if kind == "data" else f"videos/{self.camera}"
        missing = [f"{prefix}/{key}" for key in ("chunk_index", "file_index") if f"{prefix}/{key}" not in row]
        if missing:
            raise ValueError(f"{self.root}/meta/episodes record of episode {episode} has no {missing}")
        return {
            "chunk_index": int(row[f"{prefix}/chunk_index"]),
            "file_index": int(row[f"{prefix}/file_index"]),
            "video_key": self.camera,
        }

    def _rows(self, episode: int, columns: Sequence[str]) -> tuple[Path, dict[str, list[Any]]]:
        """The columns of ``episode``'s frames, in frame order, and the parquet file they come from."""
        path = self.root / self.info["data_path"].format(**self._location(episode, "data"))
        if not path.is_file():
            raise FileNotFoundError(f"episode {episode}'s data file {path} does not exist")
        wanted = tuple(dict.fromkeys(("episode_index", "frame_index", *columns)))
        key = (path, wanted)
        if self._table_cache is None or self._table_cache[0] != key:
            schema = self.parquet.read_schema(path)
            missing = [column for column in wanted if column not in schema.names]
            if missing:
                raise ValueError(f"{path} has no column {missing} (columns present: {schema.names})")
            self._table_cache = (key, self.parquet.read_table(path, columns=list(wanted)).to_pydict())
        table = self._table_cache[1]
        rows = [row for row, index in enumerate(table["episode_index"]) if index == episode]
        if not rows:
            raise ValueError(f"{path} has no frames of episode {episode} (episode listed in {self.root}/meta)")
        rows.sort(key=lambda row: table["frame_index"][row])
        return path, {column: [table[column][row] for row in rows] for column in wanted}

    def actions(self, episode: int) -> np.ndarray:
        return _lerobot_actions(*self._rows(episode, ["action"]))

    def read(self, episode: int) -> _SourceEpisode:
        columns = ["action", "task_index", "timestamp", *(() if self.is_video else (self.camera,))]
        success_column = "next.success" if "next.success" in self.info["features"] else None
        path, rows = self._rows(episode, [*columns, *([success_column] if success_column else [])])
        task_index = int(rows["task_index"][0])
        if task_index not in self.tasks:
            raise ValueError(f"{path} episode {episode} has task_index {task_index}, not in the dataset's tasks")
        if self.is_video:
            images = self._video_frames(episode, rows["timestamp"])
        else:
            images = np.stack([self._decode_image(path, cell) for cell in rows[self.camera]])  # [T, H, W, 3]
        return _SourceEpisode(
            images=images,
            actions=_lerobot_actions(path, rows),
            task=self.tasks[task_index],
            success=_success_from(np.asarray(rows[success_column], dtype=bool), len(rows["action"]))
            if success_column
            else None,
        )

    def _decode_image(self, path: Path, cell: Any) -> np.ndarray:
        if not isinstance(cell, dict) or not isinstance(cell.get("bytes"), bytes):
            raise ValueError(
                f"{path} column {self.camera!r} must hold image structs with PNG 'bytes', got {type(cell).__name__}"
            )
        image = np.asarray(Image.open(io.BytesIO(cell["bytes"])))
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"{path} column {self.camera!r} must decode to [H, W, 3] uint8 images, got shape {image.shape} "
                f"dtype {image.dtype}"
            )
        return image

    def _video_frames(self, episode: int, timestamps: Sequence[float]) -> np.ndarray:
        import imageio.v2 as imageio

        path = self.root / self.info["video_path"].format(**self._location(episode, "video"))
        if not path.is_file():
            raise FileNotFoundError(f"episode {episode}'s video {path} does not exist")
        # v3 videos hold many episodes: the episode's frames start at its from_timestamp.
        start = 0.0 if self.v2 else float(self.episodes[episode].get(f"videos/{self.camera}/from_timestamp", 0.0))
        fps = float(self.info["fps"])
        if self._video_cache is None or self._video_cache[0] != path:
            if self._video_cache is not None:
                self._video_cache[1].close()
            self._video_cache = (path, imageio.get_reader(path, "ffmpeg"))
        reader = self._video_cache[1]
        frames = []
        for timestamp in timestamps:
            index = round((start + float(timestamp)) * fps)
            try:
                frames.append(reader.get_data(index))
            except IndexError as error:
                raise ValueError(f"{path} has no frame {index} (episode {episode}, timestamp {timestamp})") from error
        return np.stack(frames)  # [T, H, W, 3]

    def refs(self, orientation: Orientation) -> Iterator[_EpisodeRef]:
        for episode in sorted(self.episodes):
            yield _EpisodeRef(
                name=f"traj{episode:06d}.npy",
                orientation=orientation,
                actions=lambda episode=episode: self.actions(episode),
                read=lambda episode=episode: self.read(episode),
            )


def convert_lerobot(
    root: str | PathLike[str],
    output: str | PathLike[str],
    *,
    camera: str = "observation.images.image",
    image_size: int | None = None,
    orientation: Orientation = "env",
    gripper: GripperConvention = "controller",
    progress: bool = True,
) -> Path:
    """Converts a LeRobot dataset folder into ``output/dataset/traj*.npy`` and ``output/dataset_statistics.json``.

    Episode ``e`` becomes ``traj{e:06d}.npy``; its task is its first frame's ``task_index``; ``success`` is per
    frame, from ``next.success`` when the dataset has that feature. Frames of a video feature are decoded with ffmpeg
    (imageio-ffmpeg) at ``round((from_timestamp + timestamp) * fps)``.

    Args:
        root: the dataset folder (``meta/info.json``, ``data/``, maybe ``videos/``), downloaded beforehand.
        output: the output folder (created if missing; episodes already there are kept and skipped).
        camera: the image or video feature: LIBERO ports name the third-person camera ``observation.images.image``
            and the wrist camera ``observation.images.wrist_image`` (openpi) or ``observation.images.image2``.
        image_size: side of the output frames, or None to keep the dataset's.
        orientation: the dataset's image orientation (see :func:`to_env_orientation`); the LIBERO ports store the
            frames as the env returns them, ``"env"``.
        gripper: the dataset's gripper convention (see :func:`to_dataset_actions`); the LIBERO ports keep LIBERO's
            ``"controller"`` convention.
        progress: show a tqdm progress bar.

    Returns:
        The output folder.

    Example:
        >>> convert_lerobot("libero_lerobot", "data/libero", image_size=256)  # doctest: +SKIP
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    dataset = _LeRobotDataset(Path(root), camera)
    return _write_dataset(
        list(dataset.refs(orientation)), Path(output), image_size, gripper, progress, "LeRobot episodes"
    )


# The command line.


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``opensora-gym convert``, added to ``parser``."""
    parser.add_argument("format", choices=("libero-hdf5", "lerobot"), help="the source format")
    parser.add_argument("source", nargs="+", help="LIBERO .hdf5 files or folders of them; or one LeRobot folder")
    parser.add_argument("--output", required=True, help="output folder: dataset/traj*.npy, dataset_statistics.json")
    parser.add_argument(
        "--camera", help="LIBERO obs key (default agentview_rgb) or LeRobot feature (default observation.images.image)"
    )
    parser.add_argument("--image-size", type=int, help="side of the output frames (default: keep the source's)")
    parser.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        help="source image orientation (default: the HDF5 file's attribute, or env for LeRobot)",
    )
    parser.add_argument("--gripper", choices=GRIPPER_CONVENTIONS, default="controller", help="source gripper sign")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_convert(args: argparse.Namespace) -> Path:
    """Runs ``opensora-gym convert``; exits with a one-line message when the source is malformed."""
    options = {"image_size": args.image_size, "gripper": args.gripper, "progress": not args.no_progress}
    if args.camera is not None:
        options["camera"] = args.camera
    try:
        if args.format == "libero-hdf5":
            output = convert_libero_hdf5(args.source, args.output, orientation=args.orientation, **options)
        else:
            if len(args.source) != 1:
                raise ValueError(f"lerobot takes one dataset folder, got {len(args.source)}: {args.source}")
            output = convert_lerobot(args.source[0], args.output, orientation=args.orientation or "env", **options)
    except (ValueError, FileNotFoundError, ImportError) as error:
        sys.exit(f"opensora-gym convert: {error}")
    print(f"converted into {output / DATASET_FOLDER} and {output / STATISTICS_NAME}")
    return output
