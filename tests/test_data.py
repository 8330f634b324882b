import glob
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora_gym.data import (
    STATISTICS_NAME,
    ActionStatistics,
    Episode,
    TrajectoryDataset,
    load_trajectory,
    save_trajectory,
)
from opensora_gym.safe_loading import UnsafeFileError

HEIGHT, WIDTH, ACTION_DIM = 6, 5, 7


def _frames(length: int, seed: int, task: object = "open the drawer", **extra: object) -> list[dict]:
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(length):
        frame = {
            "image": rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8),
            "delta_action": rng.standard_normal(ACTION_DIM).astype(np.float32),
            "abs_action": rng.standard_normal(ACTION_DIM),
            "instruction": task,
            "step": np.int64(t),
        }
        if t == 0:
            frame["init_ee_pose"] = rng.standard_normal(ACTION_DIM)
        frame.update(extra)
        frames.append(frame)
    return frames


def _dataset_folder(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "dataset"
    folder.mkdir()
    for seed, name in enumerate(names):
        save_trajectory(folder / name, _frames(length=3 + seed, seed=seed, task=f"task {name}"))
    return folder


class _TouchMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_save_load_trajectory_round_trip(tmp_path: Path) -> None:
    frames = _frames(length=4, seed=0, task=b"pick up the mug")
    path = tmp_path / "traj0.npy"

    save_trajectory(path, frames)
    loaded = load_trajectory(path)

    # The file is what RLinf reads: np.load with pickles gives a 1-D object array of the same dicts.
    raw = np.load(path, allow_pickle=True)
    assert raw.dtype == object and raw.shape == (4,)
    assert len(loaded) == 4
    for got, want in zip(loaded, frames, strict=True):
        assert got.keys() == want.keys()
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["delta_action"], want["delta_action"])
        assert got["instruction"] == b"pick up the mug"


def test_killed_save_leaves_no_partial_episode_under_its_name(tmp_path: Path, monkeypatch) -> None:
    """A writer killed after the bytes and before the rename leaves the folder's episodes as they were: no new file
    under the name, an earlier episode of that name intact, and the dataset lists only finished episodes."""
    folder = _dataset_folder(tmp_path, ["traj0.npy"])
    kept = load_trajectory(folder / "traj0.npy")

    def killed(source, destination):
        raise KeyboardInterrupt(f"killed before renaming {source}")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_trajectory(folder / "traj1.npy", _frames(length=5, seed=7))
    with pytest.raises(KeyboardInterrupt):
        save_trajectory(folder / "traj0.npy", _frames(length=5, seed=8))
    monkeypatch.undo()

    assert sorted(path.name for path in folder.iterdir()) == [".traj0.partial.npy", ".traj1.partial.npy", "traj0.npy"]
    assert [Path(path).name for path in TrajectoryDataset(folder).paths] == ["traj0.npy"]
    again = load_trajectory(folder / "traj0.npy")
    assert len(again) == len(kept) == 3
    np.testing.assert_array_equal(again[-1]["image"], kept[-1]["image"])

    save_trajectory(folder / "traj1.npy", _frames(length=5, seed=7))  # a rerun overwrites the leftover
    assert len(load_trajectory(folder / "traj1.npy")) == 5
    assert not (folder / ".traj1.partial.npy").exists()


def test_save_trajectory_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in \.npy"):
        save_trajectory(tmp_path / "traj0.pkl", _frames(1, 0))
    with pytest.raises(ValueError, match="at least one frame"):
        save_trajectory(tmp_path / "traj0.npy", [])
    with pytest.raises(ValueError, match=re.escape("frames [1] are not")):
        save_trajectory(tmp_path / "traj0.npy", [_frames(1, 0)[0], np.zeros(3)])
    assert list(tmp_path.iterdir()) == []


def test_episode_reads_images_actions_task_and_pose(tmp_path: Path) -> None:
    frames = _frames(length=5, seed=3, task=b"put the bowl on the plate")
    save_trajectory(tmp_path / "traj0.npy", frames)

    episode = TrajectoryDataset(tmp_path).episode(0)

    assert isinstance(episode, Episode)
    assert episode.images.shape == (5, HEIGHT, WIDTH, 3) and episode.images.dtype == np.uint8
    assert episode.actions.shape == (5, ACTION_DIM) and episode.actions.dtype == np.float32
    np.testing.assert_array_equal(episode.images, np.stack([f["image"] for f in frames]))
    np.testing.assert_array_equal(episode.actions, np.stack([f["delta_action"] for f in frames]))
    assert episode.task == "put the bowl on the plate"
    np.testing.assert_array_equal(episode.init_ee_pose, frames[0]["init_ee_pose"].astype(np.float32))
    assert episode.path == tmp_path / "traj0.npy"


def test_other_action_key_and_task_fallback(tmp_path: Path) -> None:
    frames = _frames(length=2, seed=4)
    for frame in frames:
        del frame["instruction"]
        frame["task"] = np.bytes_(b"close the microwave")
        frame.pop("init_ee_pose", None)
    save_trajectory(tmp_path / "traj0.npy", frames)

    episode = TrajectoryDataset(tmp_path, action_key="abs_action").episode(0)

    np.testing.assert_array_equal(episode.actions, np.stack([f["abs_action"] for f in frames]).astype(np.float32))
    assert episode.task == "close the microwave"
    assert episode.init_ee_pose is None


def test_start_frame(tmp_path: Path) -> None:
    frames = _frames(length=3, seed=5, task="stack the blocks")
    save_trajectory(tmp_path / "traj0.npy", frames)

    image, task = TrajectoryDataset(tmp_path).start_frame(0)

    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, frames[0]["image"])
    assert task == "stack the blocks"


def test_order_matches_sorted_glob_and_excludes_kir(tmp_path: Path) -> None:
    names = ["traj10.npy", "traj2.npy", "traj1.npy", "Traj3.npy", "traj1_kir.npy", "traj_kir_5.npy", ".hidden.npy"]
    folder = _dataset_folder(tmp_path, names)
    (folder / "notes.txt").write_text("not an episode")

    dataset = TrajectoryDataset(folder)

    reference_order = [
        name for name in sorted(glob.glob(os.path.join(folder, "*.npy"))) if "_kir" not in os.path.basename(name)
    ]
    assert [str(path) for path in dataset.paths] == reference_order
    assert [path.name for path in dataset.paths] == ["Traj3.npy", "traj1.npy", "traj10.npy", "traj2.npy"]
    assert len(dataset) == 4
    assert [dataset.start_frame(i)[1] for i in range(len(dataset))] == [f"task {path.name}" for path in dataset.paths]


def test_construction_is_lazy(tmp_path: Path) -> None:
    folder = _dataset_folder(tmp_path, ["traj0.npy", "traj1.npy"])
    (folder / "traj1.npy").write_bytes(b"corrupt")

    dataset = TrajectoryDataset(folder)

    assert len(dataset) == 2
    assert dataset.episode(0).task == "task traj0.npy"
    with pytest.raises(ValueError, match=re.escape(str(folder / "traj1.npy"))):
        dataset.episode(1)


def test_missing_and_empty_folders_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} does not exist")) as info:
        TrajectoryDataset(missing)
    assert "dataset/traj*.npy" in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    save_trajectory(empty / "traj0_kir.npy", _frames(1, 0))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{empty} has no .npy episode files")) as info:
        TrajectoryDataset(empty)
    assert "dataset/traj*.npy" in str(info.value)


def test_index_out_of_range_names_valid_range(tmp_path: Path) -> None:
    dataset = TrajectoryDataset(_dataset_folder(tmp_path, ["traj0.npy", "traj1.npy", "traj2.npy"]))

    for index in (3, -1):
        with pytest.raises(IndexError, match=re.escape("valid indices are 0..2 (3 episodes")):
            dataset.episode(index)
        with pytest.raises(IndexError, match=re.escape(f"episode index {index} is out of range")):
            dataset.start_frame(index)


def _write_single(tmp_path: Path, frames: list[dict]) -> TrajectoryDataset:
    save_trajectory(tmp_path / "traj0.npy", frames)
    return TrajectoryDataset(tmp_path)


def test_frame_without_image(tmp_path: Path) -> None:
    frames = _frames(3, 0)
    del frames[2]["image"]
    dataset = _write_single(tmp_path, frames)

    with pytest.raises(ValueError, match=r"traj0\.npy frame 2 has no 'image' \(keys present: \['abs_action'"):
        dataset.episode(0)


def test_frame_without_action_key(tmp_path: Path) -> None:
    frames = _frames(3, 0)
    del frames[1]["delta_action"]
    dataset = _write_single(tmp_path, frames)

    with pytest.raises(ValueError) as info:
        dataset.episode(0)

    message = str(info.value)
    assert "frame 1 has no action under 'delta_action'" in message
    assert "keys present: ['abs_action', 'image', 'instruction', 'step']" in message
    assert "action_key=" in message


def test_frame_without_task(tmp_path: Path) -> None:
    frames = _frames(2, 0)
    for frame in frames:
        del frame["instruction"]
    dataset = _write_single(tmp_path, frames)

    for read in (dataset.episode, dataset.start_frame, dataset.images):
        with pytest.raises(ValueError, match=r"traj0\.npy frame 0 has no task text under 'instruction' or 'task'"):
            read(0)


def test_bad_image_and_action_shapes(tmp_path: Path) -> None:
    frames = _frames(2, 0)
    frames[1]["image"] = frames[1]["image"].astype(np.float32)
    dataset = _write_single(tmp_path, frames)
    with pytest.raises(ValueError, match=re.escape("frame 1 'image' must be [H, W, 3] uint8")):
        dataset.episode(0)

    (tmp_path / "traj0.npy").unlink()
    frames = _frames(2, 0)
    frames[1]["delta_action"] = np.zeros(ACTION_DIM - 1, dtype=np.float32)
    dataset = _write_single(tmp_path, frames)
    with pytest.raises(ValueError, match="actions of different shapes under 'delta_action'"):
        dataset.episode(0)


def test_corrupt_trajectory_names_file(tmp_path: Path) -> None:
    save_trajectory(tmp_path / "traj0.npy", _frames(3, 0))
    path = tmp_path / "traj0.npy"
    path.write_bytes(path.read_bytes()[:-50])
    dataset = TrajectoryDataset(tmp_path)

    for read in (dataset.episode, dataset.start_frame, dataset.images):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read(0)


def test_trajectory_that_is_not_frames(tmp_path: Path) -> None:
    np.save(tmp_path / "traj0.npy", np.zeros((3, 4)))
    with pytest.raises(ValueError, match="expected a non-empty 1-D object array of per-frame dicts"):
        TrajectoryDataset(tmp_path).episode(0)


def test_malicious_trajectory_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    save_trajectory(tmp_path / "traj0.npy", _frames(2, 0, task=_TouchMarker(marker)))
    dataset = TrajectoryDataset(tmp_path)

    for read in (dataset.episode, dataset.start_frame, dataset.images):
        with pytest.raises(UnsafeFileError, match=re.escape(str(tmp_path / "traj0.npy"))):
            read(0)
    assert not marker.exists()


def test_episode_validates_fields(tmp_path: Path) -> None:
    images = np.zeros((2, HEIGHT, WIDTH, 3), dtype=np.uint8)
    actions = np.zeros((2, ACTION_DIM), dtype=np.float32)
    with pytest.raises(ValueError, match="same number of frames, got 3 and 2"):
        Episode(images, np.zeros((3, ACTION_DIM), np.float32), "t", None, tmp_path)
    with pytest.raises(ValueError, match=re.escape("images must be [T, H, W, 3] uint8")):
        Episode(images.astype(np.float32), actions, "t", None, tmp_path)
    with pytest.raises(ValueError, match=re.escape("actions must be [T, A] float32")):
        Episode(images, actions.astype(np.float64), "t", None, tmp_path)


def test_normalize_known_answers() -> None:
    stats = ActionStatistics(q01=[0.0, -1.0, -0.5], q99=[2.0, 1.0, 1.5])
    actions = np.array(
        [
            [1.0, 0.0, 0.5],  # the midpoints
            [2.0, 1.0, 1.5],  # q99 -> 1
            [0.0, -1.0, -0.5],  # q01 -> -1
            [0.5, 0.5, 0.0],  # a quarter, three quarters and a quarter of the way
            [3.0, 1.5, 2.5],  # beyond q99: not clipped
        ],
        dtype=np.float64,
    )

    normalized = stats.normalize(actions)

    expected = np.array(
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [-0.5, 0.5, -0.5], [2.0, 1.5, 2.0]], np.float32
    )
    assert normalized.dtype == np.float32
    np.testing.assert_array_equal(normalized, expected)
    np.testing.assert_array_equal(stats.unnormalize(normalized), actions.astype(np.float32))


def test_normalize_follows_reference_arithmetic_order() -> None:
    rng = np.random.default_rng(0)
    q01 = rng.uniform(-1.0, 0.0, ACTION_DIM).astype(np.float32)
    q99 = (q01 + rng.uniform(0.1, 2.0, ACTION_DIM)).astype(np.float32)
    actions = rng.uniform(-2.0, 2.0, (4, 8, ACTION_DIM)).astype(np.float32)
    stats = ActionStatistics(q01=q01, q99=q99)

    normalized = stats.normalize(actions)

    # RLinf: actions = 2 * ((actions - q01) / (q99 - q01)) - 1, on float32 arrays; the result is bit-exact.
    np.testing.assert_array_equal(normalized, 2 * ((actions - q01) / (q99 - q01)) - 1)
    np.testing.assert_allclose(stats.unnormalize(normalized), actions, rtol=0.0, atol=1e-6)


def test_normalize_keeps_tensor_kind_and_device() -> None:
    rng = np.random.default_rng(1)
    stats = ActionStatistics.from_actions(rng.standard_normal((200, ACTION_DIM)))
    actions = rng.standard_normal((3, 8, ACTION_DIM)).astype(np.float32)

    normalized = stats.normalize(torch.from_numpy(actions).to(torch.bfloat16))
    assert isinstance(normalized, torch.Tensor) and normalized.dtype == torch.float32
    np.testing.assert_array_equal(
        normalized.numpy(), stats.normalize(torch.from_numpy(actions).to(torch.bfloat16).float().numpy())
    )
    torch_result = stats.normalize(torch.from_numpy(actions))
    np.testing.assert_array_equal(torch_result.numpy(), stats.normalize(actions))
    assert isinstance(stats.unnormalize(torch_result), torch.Tensor)

    on_meta = stats.normalize(torch.empty(2, ACTION_DIM, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, ACTION_DIM)


def test_normalize_rejects_wrong_action_dim() -> None:
    stats = ActionStatistics(q01=np.zeros(ACTION_DIM), q99=np.ones(ACTION_DIM))
    with pytest.raises(ValueError, match=re.escape("shape [..., 7] (the statistics' action dim), got (4, 6)")):
        stats.normalize(np.zeros((4, 6)))
    with pytest.raises(ValueError, match=re.escape("got (2, 8)")):
        stats.unnormalize(torch.zeros(2, 8))


def test_from_actions_values() -> None:
    actions = np.stack([np.arange(101, dtype=np.float64), -2.0 * np.arange(101)], axis=1)  # [101, 2]

    stats = ActionStatistics.from_actions(actions)

    # With 101 evenly spaced samples 0..100 the 1% and 99% linear-interpolation quantiles are 1 and 99.
    np.testing.assert_allclose(stats.q01, [1.0, -198.0])
    np.testing.assert_allclose(stats.q99, [99.0, -2.0])
    np.testing.assert_allclose(stats.mean, [50.0, -100.0])
    np.testing.assert_allclose(stats.std, [np.sqrt(850.0), 2 * np.sqrt(850.0)], rtol=1e-6)
    np.testing.assert_array_equal(stats.min, [0.0, -200.0])
    np.testing.assert_array_equal(stats.max, [100.0, 0.0])
    assert all(value.dtype == np.float32 for value in (stats.q01, stats.q99, stats.mean, stats.std))


def test_statistics_json_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    stats = ActionStatistics.from_actions(rng.standard_normal((50, ACTION_DIM)))

    written = stats.to_json(tmp_path)
    loaded = ActionStatistics.from_json(tmp_path / STATISTICS_NAME)

    assert written == tmp_path / STATISTICS_NAME
    assert set(json.loads(written.read_text())["action"]) == {"q01", "q99", "mean", "std", "min", "max"}
    for name in ("q01", "q99", "mean", "std", "min", "max"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
    np.testing.assert_array_equal(ActionStatistics.from_json(tmp_path).q01, stats.q01)


def test_statistics_json_reference_layout(tmp_path: Path) -> None:
    # As released: extra keys (mask, proprio) around the action quantiles, which are all that is used.
    path = tmp_path / STATISTICS_NAME
    path.write_text(
        json.dumps(
            {
                "action": {"q01": [-0.5, -1.0], "q99": [0.5, 1.0], "mask": [True, False]},
                "proprio": {"mean": [0.0]},
            }
        )
    )

    stats = ActionStatistics.from_json(path)

    np.testing.assert_array_equal(stats.q01, np.array([-0.5, -1.0], np.float32))
    np.testing.assert_array_equal(stats.q99, np.array([0.5, 1.0], np.float32))
    assert stats.mean is None and stats.std is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"action": {"q99": [1.0]}}, "dataset_statistics.json has no action.q01 (action keys present: ['q99'])"),
        ({"action": {"q01": [0.0]}}, "dataset_statistics.json has no action.q99"),
        ({"proprio": {}}, "dataset_statistics.json has no action statistics object (top level: ['proprio'])"),
        ({"action": {"q01": [0.0, 1.0], "q99": [1.0]}}, "every statistic must have shape (2,) like q01"),
        ({"action": {"q01": [0.0, 1.0], "q99": [1.0, 1.0]}}, "dimensions [1] have q01 [1.0] and q99 [1.0]"),
    ],
)
def test_statistics_json_errors_name_file_and_key(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / STATISTICS_NAME
    path.write_text(json.dumps(content))

    with pytest.raises(ValueError, match=re.escape(message)):
        ActionStatistics.from_json(path)


def test_statistics_file_missing_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / STATISTICS_NAME))):
        ActionStatistics.from_json(tmp_path)
    (tmp_path / STATISTICS_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / STATISTICS_NAME} is not valid JSON")):
        ActionStatistics.from_json(tmp_path)


def test_statistics_validation() -> None:
    with pytest.raises(ValueError, match=re.escape("q01 must be a non-empty vector [A], got shape (2, 2)")):
        ActionStatistics(q01=np.zeros((2, 2)), q99=np.ones((2, 2)))
    with pytest.raises(ValueError, match="q99 must be finite"):
        ActionStatistics(q01=[0.0], q99=[np.inf])
    with pytest.raises(ValueError, match=re.escape("actions must have shape [N, A] with N >= 1, got (5,)")):
        ActionStatistics.from_actions(np.zeros(5))


def test_episodes_carry_the_per_frame_success_flags(tmp_path):
    frame = {"image": np.zeros((4, 4, 3), np.uint8), "delta_action": np.zeros(7, np.float32), "task": "t"}
    save_trajectory(tmp_path / "traj0.npy", [{**frame, "success": False}, {**frame, "success": True}])
    save_trajectory(tmp_path / "traj1.npy", [frame, frame])
    dataset = TrajectoryDataset(tmp_path)
    assert dataset.episode(0).success.tolist() == [False, True]
    assert dataset.episode(1).success is None
