"""LIBERO demonstration files and LeRobot datasets, written in their documented layouts, converted and read back."""

import io
import json
import shutil
from pathlib import Path

import h5py
import imageio.v2 as imageio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from opensora_gym import convert
from opensora_gym.checkpoint import DATASET_FOLDER, STATISTICS_NAME
from opensora_gym.convert import convert_lerobot, convert_libero_hdf5, to_dataset_actions
from opensora_gym.data import ActionStatistics, TrajectoryDataset, load_trajectory
from opensora_gym.env import OpenSoraLiberoEnv
from trainers import cli

TASK = "put the black bowl on the plate"
OTHER_TASK = "open the top drawer of the cabinet"
LENGTH, SIZE, FPS = 5, 32, 10


def _random_images(seed: int, length: int = LENGTH, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(length, size, size, 3), dtype=np.uint8)


def _smooth_images(seed: int, length: int = LENGTH, size: int = SIZE) -> np.ndarray:
    """Gradients that a lossy codec keeps close, each frame brighter than the last, a dark top-left corner."""
    y, x = np.mgrid[0:size, 0:size]
    frames = []
    for t in range(length):
        frame = np.stack([x * 4 + 30 * t, y * 4 + 20 * seed, np.full_like(x, 100 + 20 * t)], axis=-1)
        frame[: size // 4, : size // 4] = 0
        frames.append(np.clip(frame, 0, 255))
    return np.stack(frames).astype(np.uint8)  # [T, S, S, 3]


def _controller_actions(seed: int, length: int = LENGTH) -> np.ndarray:
    actions = np.random.default_rng(seed).uniform(-1, 1, size=(length, 7))
    actions[:, -1] = np.where(np.arange(length) < length // 2, -1.0, 1.0)  # open, then close
    return actions


def write_libero_hdf5(path: Path, num_demos: int = 2, convention: str | None = None, task: str = TASK) -> dict:
    """LIBERO's layout (scripts/create_dataset.py); returns the images and actions written per demo key."""
    written = {}
    with h5py.File(path, "w") as handle:
        data = handle.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {"problem_name": "libero_tabletop_manipulation", "domain_name": "kitchen", "language_instruction": task}
        )
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation", "env_kwargs": {}})
        data.attrs["bddl_file_name"] = f"libero/bddl_files/libero_spatial/{path.stem}.bddl"
        if convention is not None:
            data.attrs["macros_image_convention"] = convention
        for index in range(num_demos):
            demo = data.create_group(f"demo_{index}")
            images, actions = _random_images(index), _controller_actions(index)
            demo.create_dataset("obs/agentview_rgb", data=images)
            demo.create_dataset("obs/eye_in_hand_rgb", data=_random_images(100 + index))
            demo.create_dataset("obs/ee_states", data=np.full((LENGTH, 6), 0.5 + index))
            demo.create_dataset("obs/gripper_states", data=np.full((LENGTH, 2), 0.04))
            demo.create_dataset("actions", data=actions)
            demo.create_dataset("states", data=np.zeros((LENGTH, 9)))
            demo.create_dataset("robot_states", data=np.zeros((LENGTH, 9)))
            demo.create_dataset("rewards", data=(np.arange(LENGTH) == LENGTH - 1).astype(np.uint8))
            demo.create_dataset("dones", data=(np.arange(LENGTH) == LENGTH - 1).astype(np.uint8))
            demo.attrs["num_samples"] = LENGTH
            written[f"demo_{index}"] = (images, actions)
    return written


def _png(image: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_lerobot(
    root: Path, *, video: bool, version: str = "v2.1", num_episodes: int = 2, success: bool = False
) -> list:
    """LeRobot's layout (v2.1: a file per episode; v3.0: all episodes in one file); returns (images, actions)s.

    With `success`, a `next.success` feature: episode 0 reaches success on the step from its second-to-last frame
    (and stays there), the others never do."""
    camera = "observation.images.image"
    features = {
        camera: {"dtype": "video" if video else "image", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "rgb"]},
        "observation.images.wrist_image": {"dtype": "image", "shape": [SIZE, SIZE, 3], "names": None},
        "observation.state": {"dtype": "float32", "shape": [8], "names": None},
        "action": {"dtype": "float32", "shape": [7], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    if success:
        features["next.success"] = {"dtype": "bool", "shape": [1], "names": None}
    v2 = version.startswith("v2")
    info = {
        "codebase_version": version,
        "robot_type": "panda",
        "total_episodes": num_episodes,
        "total_frames": num_episodes * LENGTH,
        "fps": FPS,
        "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        if v2
        else "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        if v2
        else "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": features,
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = [TASK, OTHER_TASK]
    written, tables = [], []
    for episode in range(num_episodes):
        images = _smooth_images(episode) if video else _random_images(episode)
        actions = _controller_actions(episode).astype(np.float32)
        written.append((images, actions))
        columns = {
            "observation.images.wrist_image": [_png(image) for image in _random_images(50 + episode)],
            "observation.state": [np.zeros(8, np.float32).tolist()] * LENGTH,
            "action": actions.tolist(),
            "timestamp": (np.arange(LENGTH) / FPS).astype(np.float32),
            "frame_index": np.arange(LENGTH),
            "episode_index": np.full(LENGTH, episode),
            "index": episode * LENGTH + np.arange(LENGTH),
            "task_index": np.full(LENGTH, episode % 2),
        }
        if success:
            columns["next.success"] = (np.arange(LENGTH) >= LENGTH - 2) & (episode == 0)
        if not video:
            columns[camera] = [_png(image) for image in images]
        tables.append(pa.table(columns))
    if v2:
        for episode, table in enumerate(tables):
            path = root / info["data_path"].format(episode_chunk=0, episode_index=episode)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            if video:
                path = root / info["video_path"].format(episode_chunk=0, video_key=camera, episode_index=episode)
                path.parent.mkdir(parents=True, exist_ok=True)
                imageio.mimwrite(path, list(written[episode][0]), fps=FPS, quality=10, macro_block_size=1)
        rows = [{"task_index": index, "task": task} for index, task in enumerate(tasks)]
        (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        rows = [{"episode_index": e, "tasks": [tasks[e % 2]], "length": LENGTH} for e in range(num_episodes)]
        (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path = root / info["data_path"].format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True)
        pq.write_table(pa.concat_tables(tables), path)
        if video:
            path = root / info["video_path"].format(video_key=camera, chunk_index=0, file_index=0)
            path.parent.mkdir(parents=True)
            frames = [frame for images, _ in written for frame in images]
            imageio.mimwrite(path, frames, fps=FPS, quality=10, macro_block_size=1)
        # pandas writes the task text as the frame's index column, named "task".
        pq.write_table(pa.table({"task_index": [0, 1], "task": tasks}), root / "meta" / "tasks.parquet")
        episodes = {
            "episode_index": list(range(num_episodes)),
            "tasks": [[tasks[e % 2]] for e in range(num_episodes)],
            "length": [LENGTH] * num_episodes,
            "data/chunk_index": [0] * num_episodes,
            "data/file_index": [0] * num_episodes,
            f"videos/{camera}/chunk_index": [0] * num_episodes,
            f"videos/{camera}/file_index": [0] * num_episodes,
            f"videos/{camera}/from_timestamp": [e * LENGTH / FPS for e in range(num_episodes)],
        }
        path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table(episodes), path)
    return written


def _episodes(output: Path) -> TrajectoryDataset:
    return TrajectoryDataset(output / DATASET_FOLDER)


# LIBERO's HDF5 files


def test_libero_hdf5_round_trip(tmp_path):
    written = write_libero_hdf5(tmp_path / "put_the_bowl_demo.hdf5")
    output = convert_libero_hdf5([tmp_path / "put_the_bowl_demo.hdf5"], tmp_path / "out", progress=False)

    dataset = _episodes(output)
    assert [path.name for path in dataset.paths] == [
        "traj_put_the_bowl_demo_demo0000.npy",
        "traj_put_the_bowl_demo_demo0001.npy",
    ]
    for index, (images, actions) in enumerate(written.values()):
        episode = dataset.episode(index)
        # LIBERO's files hold robosuite's raw render: rotated by 180 degrees into the env's orientation.
        np.testing.assert_array_equal(episode.images, images[:, ::-1, ::-1])
        # LIBERO's gripper is already the controller's (-1 open, +1 close): unchanged.
        np.testing.assert_array_equal(episode.actions, actions.astype(np.float32))
        assert episode.task == TASK
        np.testing.assert_allclose(episode.init_ee_pose, [0.5 + index] * 6 + [0.04] * 2, rtol=1e-6)
        frames = load_trajectory(episode.path)
        # Per frame, as the collector writes it: only the last step of a demonstration reached success.
        assert [frame["success"] for frame in frames] == [False] * (len(frames) - 1) + [True]

    statistics = ActionStatistics.from_json(output)
    expected = ActionStatistics.from_actions(np.concatenate([actions for _, actions in written.values()]))
    np.testing.assert_allclose(statistics.q01, expected.q01)
    np.testing.assert_allclose(statistics.q99, expected.q99)


def test_libero_hdf5_orientation_camera_and_size(tmp_path):
    written = write_libero_hdf5(tmp_path / "task_demo.hdf5", num_demos=1, convention="opencv")
    output = convert_libero_hdf5([tmp_path], tmp_path / "out", progress=False)
    # robosuite's opencv convention is the raw render flipped upside down: a left-right flip remains.
    np.testing.assert_array_equal(_episodes(output).episode(0).images, written["demo_0"][0][:, :, ::-1])

    with h5py.File(tmp_path / "task_demo.hdf5", "r") as handle:
        wrist = handle["data/demo_0/obs/eye_in_hand_rgb"][()]
    output = convert_libero_hdf5(
        [tmp_path / "task_demo.hdf5"], tmp_path / "wrist", camera="eye_in_hand_rgb", orientation="env", progress=False
    )
    np.testing.assert_array_equal(_episodes(output).episode(0).images, wrist)

    output = convert_libero_hdf5([tmp_path], tmp_path / "small", image_size=16, progress=False)
    assert _episodes(output).episode(0).images.shape == (LENGTH, 16, 16, 3)


def _break_libero(path: Path, edit) -> None:
    with h5py.File(path, "a") as handle:
        edit(handle["data"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda data: data["demo_1"].__delitem__("actions"), r"data/demo_1 has no 'actions'"),
        (
            lambda data: (
                data["demo_1/obs"].__delitem__("agentview_rgb"),
                data["demo_1/obs"].create_dataset("agentview_rgb", data=np.zeros((LENGTH, SIZE, SIZE, 3), np.float32)),
            ),
            r"demo_1/obs/agentview_rgb must be \[T, H, W, 3\] uint8, got shape \(5, 32, 32, 3\) dtype float32",
        ),
        (
            lambda data: (
                data["demo_1/obs"].__delitem__("agentview_rgb"),
                data["demo_1/obs"].create_dataset("agentview_rgb", data=np.zeros((LENGTH, SIZE, SIZE), np.uint8)),
            ),
            r"must be \[T, H, W, 3\] uint8, got shape \(5, 32, 32\)",
        ),
        (
            lambda data: (
                data["demo_1"].__delitem__("actions"),
                data["demo_1"].create_dataset("actions", data=np.zeros((0, 7))),
            ),
            r"data/demo_1 has no frames \(actions has shape \(0, 7\)\)",
        ),
        (lambda data: data.attrs.__delitem__("problem_info"), r"data has no 'problem_info' attribute"),
    ],
)
def test_libero_hdf5_malformed_files_name_the_file_and_the_field(tmp_path, edit, message):
    path = tmp_path / "task_demo.hdf5"
    write_libero_hdf5(path)
    _break_libero(path, edit)
    with pytest.raises(ValueError, match=message) as error:
        convert_libero_hdf5([path], tmp_path / "out", progress=False)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_interrupted_conversion_resumes_and_writes_statistics_last(tmp_path, monkeypatch):
    source = tmp_path / "task_demo.hdf5"
    write_libero_hdf5(source, num_demos=3)
    real_save = convert.save_trajectory
    calls = []

    def interrupted_on_second(path, frames):
        calls.append(Path(path).name)
        if calls == [
            "traj_task_demo_demo0000.npy",
            "traj_task_demo_demo0001.npy",
        ]:  # killed mid-write: a truncated hidden file, the rename never happens
            (path.parent / f".{path.stem}.partial.npy").write_bytes(b"\x93NUMPY truncated")
            raise RuntimeError("simulated crash")
        real_save(path, frames)

    monkeypatch.setattr(convert, "save_trajectory", interrupted_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_libero_hdf5([source], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / STATISTICS_NAME).exists()
    assert [path.name for path in _episodes(tmp_path / "out").paths] == ["traj_task_demo_demo0000.npy"]

    calls.clear()
    output = convert_libero_hdf5([source], tmp_path / "out", progress=False)
    assert calls == ["traj_task_demo_demo0001.npy", "traj_task_demo_demo0002.npy"]
    assert not list((output / DATASET_FOLDER).glob(".*"))
    fresh = convert_libero_hdf5([source], tmp_path / "fresh", progress=False)
    assert (output / STATISTICS_NAME).read_text() == (fresh / STATISTICS_NAME).read_text()
    assert len(_episodes(output)) == 3


# LeRobot datasets


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_parquet_images_round_trip(tmp_path, version):
    written = write_lerobot(tmp_path / "lerobot", video=False, version=version)
    output = convert_lerobot(tmp_path / "lerobot", tmp_path / "out", progress=False)

    dataset = _episodes(output)
    assert [path.name for path in dataset.paths] == ["traj000000.npy", "traj000001.npy"]
    for index, (images, actions) in enumerate(written):
        episode = dataset.episode(index)
        # LIBERO ports store frames as the env returns them: no rotation.
        np.testing.assert_array_equal(episode.images, images)
        np.testing.assert_array_equal(episode.actions, actions)
        assert episode.task == (TASK, OTHER_TASK)[index]
        assert "success" not in load_trajectory(episode.path)[0]
    statistics = ActionStatistics.from_json(output)
    np.testing.assert_allclose(
        statistics.q99, ActionStatistics.from_actions(np.concatenate([a for _, a in written])).q99, rtol=1e-6
    )


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_video_round_trip_is_close(tmp_path, version):
    written = write_lerobot(tmp_path / "lerobot", video=True, version=version)
    output = convert_lerobot(tmp_path / "lerobot", tmp_path / "out", progress=False)
    dataset = _episodes(output)
    for index, (images, _) in enumerate(written):
        decoded = dataset.episode(index).images.astype(np.int16)  # [T, H, W, 3]
        assert decoded.shape == images.shape
        # mp4 is lossy: every frame is close to its own source frame, and closer to it than to any other.
        errors = np.abs(decoded[:, None] - images[None].astype(np.int16)).mean(axis=(2, 3, 4))  # [T, T]
        assert errors.diagonal().max() < 6
        np.testing.assert_array_equal(errors.argmin(axis=1), np.arange(LENGTH))


def test_lerobot_gripper_orientation_and_camera_options(tmp_path):
    written = write_lerobot(tmp_path / "lerobot", video=False)
    output = convert_lerobot(
        tmp_path / "lerobot",
        tmp_path / "out",
        camera="observation.images.wrist_image",
        orientation="opengl",
        gripper="policy",
        image_size=16,
        progress=False,
    )
    episode = _episodes(output).episode(0)
    assert episode.images.shape == (LENGTH, 16, 16, 3)
    policy_actions = written[0][1]
    # In the policy's convention 1 = open: the controller's -1. Values below 0.5 (here -1 and 0) close: +1.
    np.testing.assert_array_equal(episode.actions[:, -1], np.where(policy_actions[:, -1] > 0.5, -1.0, 1.0))
    np.testing.assert_array_equal(episode.actions[:, :-1], policy_actions[:, :-1])

    full = convert_lerobot(
        tmp_path / "lerobot",
        tmp_path / "full",
        camera="observation.images.wrist_image",
        orientation="opengl",
        progress=False,
    )
    wrist = _episodes(full).episode(0).images
    np.testing.assert_array_equal(wrist, _random_images(50)[:, ::-1, ::-1])


def test_to_dataset_actions_maps_the_policy_gripper_with_controller_actions():
    actions = np.array([[0.1, 0, 0, 0, 0, 0, 1.0], [0.2, 0, 0, 0, 0, 0, 0.0]])
    np.testing.assert_array_equal(to_dataset_actions(actions, "policy")[:, -1], [-1.0, 1.0])
    np.testing.assert_array_equal(to_dataset_actions(actions, "controller"), actions.astype(np.float32))
    with pytest.raises(ValueError, match="gripper must be one of"):
        to_dataset_actions(actions, "robot")


def _gray_png_images(root: Path) -> None:
    path = root / "data/chunk-000/episode_000001.parquet"
    table = pq.read_table(path)
    gray = [_png(np.zeros((SIZE, SIZE), np.uint8))] * LENGTH
    index = table.schema.get_field_index("observation.images.image")
    pq.write_table(table.set_column(index, "observation.images.image", pa.array(gray)), path)


def _empty_episode(root: Path) -> None:
    path = root / "data/chunk-000/episode_000001.parquet"
    pq.write_table(pq.read_table(path).slice(0, 0), path)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda root: (root / "meta/info.json").unlink(), FileNotFoundError, r"has no meta/info.json"),
        (_empty_episode, ValueError, r"episode_000001.parquet has no frames of episode 1"),
        (_gray_png_images, ValueError, r"must decode to \[H, W, 3\] uint8 images, got shape \(32, 32\)"),
        (
            lambda root: pq.write_table(
                pq.read_table(root / "data/chunk-000/episode_000001.parquet").drop_columns(["action"]),
                root / "data/chunk-000/episode_000001.parquet",
            ),
            ValueError,
            r"episode_000001.parquet has no column \['action'\]",
        ),
    ],
)
def test_lerobot_malformed_datasets_name_the_file_and_the_field(tmp_path, edit, error, message):
    root = tmp_path / "lerobot"
    write_lerobot(root, video=False)
    edit(root)
    with pytest.raises(error, match=message) as raised:
        convert_lerobot(root, tmp_path / "out", progress=False)
    assert str(root) in str(raised.value) and "\n" not in str(raised.value)


def test_lerobot_unknown_camera_lists_the_cameras(tmp_path):
    write_lerobot(tmp_path / "lerobot", video=False)
    with pytest.raises(
        ValueError, match=r"no image or video feature 'front' \(cameras: \['observation.images.image', "
    ):
        convert_lerobot(tmp_path / "lerobot", tmp_path / "out", camera="front", progress=False)


# The command line and the world-model env


def test_cli_converts_and_reports_malformed_sources_in_one_line(tmp_path, capsys):
    write_libero_hdf5(tmp_path / "task_demo.hdf5")
    cli.main(
        [
            "convert",
            "libero-hdf5",
            str(tmp_path / "task_demo.hdf5"),
            "--output",
            str(tmp_path / "out"),
            "--image-size",
            "16",
            "--no-progress",
        ]
    )
    assert "converted into" in capsys.readouterr().out
    assert _episodes(tmp_path / "out").episode(1).images.shape == (LENGTH, 16, 16, 3)
    with pytest.raises(SystemExit, match=r"^opensora-gym convert: .*has no meta/info.json"):
        cli.main(["convert", "lerobot", str(tmp_path), "--output", str(tmp_path / "out2"), "--no-progress"])


def test_converted_folder_is_a_world_model_dataset(tmp_path, checkpoint, world_model):
    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns(DATASET_FOLDER, STATISTICS_NAME))
    write_libero_hdf5(tmp_path / "task_demo.hdf5")
    convert_libero_hdf5([tmp_path / "task_demo.hdf5"], folder, image_size=64, progress=False)

    env = OpenSoraLiberoEnv(1, checkpoint=folder, world_model=world_model, num_sampling_steps=2, image_size=64)
    observation, _ = env.reset(seed=0, options={"episode_indices": [1]})
    start, task = TrajectoryDataset(folder / DATASET_FOLDER).start_frame(1)
    assert task == TASK
    # The env passes the start frame through its resize to image_size: equal up to rounding.
    np.testing.assert_allclose(observation["image"][0], start, atol=1)
    assert observation["task"][0] == task


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_success_is_per_frame(tmp_path, version):
    write_lerobot(tmp_path / "src", video=False, version=version, success=True)
    convert_lerobot(tmp_path / "src", tmp_path / "out", progress=False)
    dataset = _episodes(tmp_path / "out")
    flags = [[frame["success"] for frame in load_trajectory(path)] for path in dataset.paths]
    assert flags == [[False] * (LENGTH - 2) + [True, True], [False] * LENGTH]
