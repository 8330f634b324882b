"""Loading of pickled files that does not run code a downloaded file carries.

The RLinf-OpenSora trajectories are `.npy` files holding numpy object arrays of per-frame dicts, and the
reward checkpoint `resnet_rm.pth` is a torch pickle. Plain ``np.load(allow_pickle=True)`` or
``torch.load(weights_only=False)`` would call any callable the pickle names. Here the trajectories are
unpickled with an allow-list of the few globals numpy arrays and scalars need, and torch checkpoints go
through ``torch.load(weights_only=True)``; anything else is refused with :class:`UnsafeFileError`.
"""

from __future__ import annotations

import math
import pickle
import re
from os import PathLike
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from numpy.lib import format as npy_format

__all__ = ["UnsafeFileError", "load_npy", "load_torch_state_dict"]

# Exactly what `pickle.dump(ndarray)` emits for arrays and numpy scalars, under the numpy 1 (`numpy.core`)
# and numpy 2 (`numpy._core`) module names, plus the builtins that containers of plain data need when
# pickled with older protocols (`__builtin__` and `_codecs.encode` come from protocol 2 files).
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *(
            (f"{core}.{module}", name)
            for core in ("numpy.core", "numpy._core")
            for module, name in (
                ("multiarray", "_reconstruct"),
                ("multiarray", "scalar"),
                ("numeric", "_frombuffer"),
            )
        ),
        *(
            (builtins_module, name)
            for builtins_module in ("builtins", "__builtin__")
            for name in ("set", "frozenset", "bytearray", "complex")
        ),
        ("_codecs", "encode"),
    ]
)

_TORCH_GLOBAL_PATTERN = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeFileError(ValueError):
    """A file asked to load something other than plain data (a callable or a class outside the allow-list)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in `_ALLOWED_GLOBALS`."""

    def __init__(self, file: IO[bytes], source: Path) -> None:
        # latin1 is what numpy needs to read arrays pickled by Python 2; Python 3 pickles ignore it.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeFileError(
                f"{self._source} asks to load {module}.{name}, which is not plain numpy/list/dict/str data; "
                "refusing to unpickle it (only load files from sources you trust, and re-save them as "
                "plain arrays)"
            )
        return super().find_class(module, name)


def _read_header(fp: IO[bytes], source: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Reads the .npy magic string and header, returning (shape, fortran_order, dtype)."""
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(fp)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(fp)
    except (ValueError, EOFError, SyntaxError) as error:
        raise ValueError(f"{source} is not a readable .npy file (corrupt, truncated or not .npy): {error}") from error
    raise ValueError(
        f"{source} has .npy format version {version[0]}.{version[1]}; expected 1.0 or 2.0 (re-save it with numpy.save)"
    )


def load_npy(path: str | PathLike[str]) -> np.ndarray:
    """Reads a .npy file, including pickled object arrays, without running code from the file.

    Object arrays are unpickled with an allow-list that admits ndarray reconstruction, dtypes and numpy
    scalars (numpy 1 and numpy 2 module names), and the builtins that dicts, lists and strings need.
    Headers larger than numpy's ``max_header_size`` default are refused, as ``np.load`` does for untrusted
    files.

    Args:
        path: the .npy file.

    Returns:
        The array stored in the file (for a trajectory: a 1-D object array of per-frame dicts).

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeFileError: the pickle asks for any other global; nothing from the file has run.
        ValueError: the file is truncated or is not a .npy file.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no .npy file at {source}")
    with source.open("rb") as fp:
        shape, fortran_order, dtype = _read_header(fp, source)
        if dtype.hasobject:
            array = _read_pickled_payload(fp, source)
            if array.shape != shape:
                raise ValueError(f"{source} header promises shape {shape}, its pickled array has {array.shape}")
            return array
        count = math.prod(shape)
        data = np.fromfile(fp, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(
            f"{source} is truncated: its header promises {count} elements of {dtype} for shape {shape}, "
            f"the file holds {data.size}"
        )
    return data.reshape(shape, order="F" if fortran_order else "C")


def _read_pickled_payload(fp: IO[bytes], source: Path) -> np.ndarray:
    try:
        array = _RestrictedUnpickler(fp, source).load()
    except UnsafeFileError:
        raise
    # A damaged pickle can fail in many ways (EOFError, UnpicklingError, KeyError, TypeError, ...): all of
    # them mean the same thing here, and none can come from running foreign code, which find_class stops.
    except Exception as error:
        raise ValueError(
            f"{source} holds a corrupt or truncated pickled array ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{source} holds a pickled {type(array).__name__}, expected a numpy array")
    return array


def load_torch_state_dict(
    path: str | PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Reads a torch checkpoint with ``weights_only=True`` and returns its state dict.

    Args:
        path: the checkpoint file (e.g. ``resnet_rm.pth``).
        map_location: where the tensors are loaded.

    Returns:
        The state dict: the file's top-level dict, or its ``"model_state_dict"`` entry when present.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeFileError: the pickle asks for a global that ``weights_only`` loading does not allow.
        ValueError: the file is corrupt, or does not hold a dict of tensors.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no checkpoint file at {source}")
    try:
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_torch_globals(source, error)
        if unsafe:
            raise UnsafeFileError(
                f"{source} asks to load {', '.join(unsafe)}, which weights_only loading does not allow; "
                "refusing to unpickle it (only plain state dicts of tensors are accepted)"
            ) from error
        raise ValueError(f"{source} is not a readable torch checkpoint (corrupt or truncated)") from error
    # A truncated zip archive fails in torch's reader (RuntimeError) or, cut inside a record, as a bad seek (OSError).
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{source} is not a readable torch checkpoint (corrupt or truncated): {error}") from error
    if isinstance(checkpoint, dict) and "model_state_dict" in checkpoint:
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f'{source} holds a {type(checkpoint).__name__}; expected a state dict or {{"model_state_dict": state dict}}'
        )
    not_tensors = [f"{key} ({type(value).__name__})" for key, value in checkpoint.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise ValueError(f"{source} state dict has entries that are not tensors: {', '.join(not_tensors[:5])}")
    return checkpoint


def _unsafe_torch_globals(source: Path, error: pickle.UnpicklingError) -> list[str]:
    """Names the globals torch refused, from the checkpoint itself or, failing that, from the error text."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(source))
    # The scan is only used to name the refused types; a file it cannot scan falls back to the message.
    except Exception:
        names = []
    return names or _TORCH_GLOBAL_PATTERN.findall(str(error))
