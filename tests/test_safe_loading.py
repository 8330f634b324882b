import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora_gym.safe_loading import UnsafeFileError, load_npy, load_torch_state_dict


class _TouchMarker:
    """Pickles as a call to os.system that creates a marker file: what a booby-trapped download could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _ExecMarker:
    """Pickles as builtins.exec of code that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _object_array(items: list) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _write_pickled_npy(path: Path, payload: bytes, length: int) -> None:
    """Writes a .npy file of a 1-D object array from a pickle made elsewhere (another protocol or numpy)."""
    with path.open("wb") as fp:
        np.lib.format.write_array_header_1_0(fp, {"descr": "|O", "fortran_order": False, "shape": (length,)})
        fp.write(payload)


def _trajectory_frames() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8),
            "delta_action": rng.standard_normal(7).astype(np.float32),
            "instruction": b"put the bowl on the plate",
            "task": "put the bowl on the plate",
            "init_ee_pose": rng.standard_normal(7),
            "step": np.int64(t),
            "done": np.bool_(t == 1),
            "scale": np.float32(0.5),
            "history": [1, 2.5, None, "x"],
            "pair": (np.float64(1.0), b"raw"),
        }
        for t in range(2)
    ]


@pytest.mark.parametrize("payload_type", [_TouchMarker, _ExecMarker])
def test_payload_is_real_when_unpickled_unsafely(tmp_path: Path, payload_type: type) -> None:
    # Positive control: the same payload does run under plain pickle, so its absence below is meaningful.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(payload_type(marker)))
    assert marker.exists()


@pytest.mark.parametrize(("payload_type", "refused"), [(_TouchMarker, "posix.system"), (_ExecMarker, "builtins.exec")])
def test_malicious_npy_is_refused_and_does_not_run(tmp_path: Path, payload_type: type, refused: str) -> None:
    marker = tmp_path / "ran"
    frames = _trajectory_frames()
    frames[1]["instruction"] = payload_type(marker)
    path = tmp_path / "traj0.npy"
    np.save(path, _object_array(frames), allow_pickle=True)

    with pytest.raises(UnsafeFileError) as info:
        load_npy(path)

    assert str(path) in str(info.value)
    assert refused in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


def test_malicious_pth_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "resnet_rm.pth"
    torch.save({"net.7.weight": torch.zeros(1, 4), "hook": _TouchMarker(marker)}, path)

    with pytest.raises(UnsafeFileError) as info:
        load_torch_state_dict(path)

    assert str(path) in str(info.value)
    assert "posix.system" in str(info.value)
    assert not marker.exists()


def test_object_array_round_trip(tmp_path: Path) -> None:
    frames = _trajectory_frames()
    path = tmp_path / "traj0.npy"
    np.save(path, _object_array(frames), allow_pickle=True)

    loaded = load_npy(path)

    assert loaded.dtype == object
    assert loaded.shape == (2,)
    for got, want in zip(loaded, frames, strict=True):
        assert got.keys() == want.keys()
        np.testing.assert_array_equal(got["image"], want["image"])
        assert got["image"].dtype == np.uint8
        np.testing.assert_array_equal(got["delta_action"], want["delta_action"])
        assert got["instruction"] == want["instruction"]
        assert got["task"] == want["task"]
        assert got["step"] == want["step"] and type(got["step"]) is np.int64
        assert got["done"] == want["done"]
        assert got["history"] == want["history"]
        assert got["pair"] == want["pair"]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_object_array_every_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    # numpy 1 wrote protocol 3, numpy 2 writes 4; older tools wrote 2 (with `__builtin__` and `_codecs`).
    frames = [{"a": np.arange(3, dtype=np.float32), "b": b"bytes", "c": {1, 2}, "d": np.float16(2)}]
    path = tmp_path / "proto.npy"
    _write_pickled_npy(path, pickle.dumps(_object_array(frames), protocol=protocol), len(frames))

    loaded = load_npy(path)

    np.testing.assert_array_equal(loaded[0]["a"], frames[0]["a"])
    assert loaded[0]["b"] == b"bytes"
    assert loaded[0]["c"] == {1, 2}
    assert loaded[0]["d"] == np.float16(2)


def test_numpy1_module_names_are_accepted(tmp_path: Path) -> None:
    # Files pickled by numpy 1 name `numpy.core.multiarray`; protocol 2 spells globals as plain text.
    payload = pickle.dumps(_object_array([{"a": np.arange(3), "s": np.float32(1.5)}]), protocol=2)
    assert b"numpy._core.multiarray" in payload
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "numpy1.npy"
    _write_pickled_npy(path, payload, 1)

    loaded = load_npy(path)

    np.testing.assert_array_equal(loaded[0]["a"], np.arange(3))
    assert loaded[0]["s"] == np.float32(1.5)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        np.array(7.5),
        np.zeros((0, 3), dtype=np.uint8),
        np.array([(1.0, 2), (3.0, 4)], dtype=[("x", "<f4"), ("y", "<i8")]),
    ],
)
def test_plain_array_round_trip(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "plain.npy"
    np.save(path, array)

    loaded = load_npy(path)

    assert loaded.dtype == array.dtype
    assert loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)
    assert loaded.flags.writeable


def test_oversized_header_is_refused(tmp_path: Path) -> None:
    # As np.load does for untrusted files, a header over numpy's size cap (here a format 2.0 header of
    # 4000 fields) is not parsed.
    dtype = np.dtype([(f"field_{i:05d}", "<f4") for i in range(4000)])
    path = tmp_path / "wide.npy"
    with pytest.warns(UserWarning, match="format 2.0"):
        np.save(path, np.zeros(2, dtype=dtype))

    with pytest.raises(ValueError, match=r"(?s)wide\.npy.*max_header_size"):
        load_npy(path)


@pytest.mark.parametrize("kept_bytes", [5, 40, -10])
def test_truncated_object_npy_names_file(tmp_path: Path, kept_bytes: int) -> None:
    full = tmp_path / "full.npy"
    np.save(full, _object_array(_trajectory_frames()), allow_pickle=True)
    path = tmp_path / "truncated.npy"
    path.write_bytes(full.read_bytes()[:kept_bytes])

    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        load_npy(path)

    assert not isinstance(info.value, UnsafeFileError)


def test_truncated_plain_npy_names_file(tmp_path: Path) -> None:
    full = tmp_path / "full.npy"
    np.save(full, np.arange(100, dtype=np.float64))
    path = tmp_path / "truncated.npy"
    path.write_bytes(full.read_bytes()[:-8])

    with pytest.raises(ValueError, match=r"truncated\.npy is truncated.*100 elements"):
        load_npy(path)


def test_not_an_npy_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.npy"
    path.write_text("not numpy at all, just some text")

    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_npy(path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    for path, load in ((tmp_path / "absent.npy", load_npy), (tmp_path / "absent.pth", load_torch_state_dict)):
        with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
            load(path)


@pytest.mark.parametrize("wrap", [False, True])
def test_torch_state_dict_round_trip(tmp_path: Path, wrap: bool) -> None:
    state_dict = {"net.0.0.weight": torch.randn(4, 3, 7, 7), "net.0.1.num_batches_tracked": torch.tensor(3)}
    path = tmp_path / "resnet_rm.pth"
    torch.save({"model_state_dict": state_dict, "epoch": 2} if wrap else state_dict, path)

    loaded = load_torch_state_dict(path)

    assert loaded.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype


def test_torch_checkpoint_without_tensors_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet_rm.pth"
    torch.save({"weight": torch.zeros(2), "note": "hello"}, path)

    with pytest.raises(ValueError, match=r"resnet_rm\.pth state dict has entries that are not tensors: note"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("kept", [0.0, 0.01, 0.1, 0.5, 0.9])
def test_corrupt_torch_checkpoint_names_file(tmp_path: Path, kept: float) -> None:
    full = tmp_path / "full.pth"
    torch.save({f"weight{i}": torch.zeros(256) for i in range(8)}, full)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: int(len(data) * kept)])  # each cut fails in another part of torch's zip reader
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage" * 10)

    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=re.escape(str(path))) as info:
            load_torch_state_dict(path)
        assert not isinstance(info.value, UnsafeFileError)


def test_header_and_pickle_disagree(tmp_path: Path) -> None:
    path = tmp_path / "mismatch.npy"
    _write_pickled_npy(path, pickle.dumps(_object_array([{"a": 1}])), length=2)

    with pytest.raises(ValueError, match=re.escape(f"{path} header promises shape (2,), its pickled array has (1,)")):
        load_npy(path)
