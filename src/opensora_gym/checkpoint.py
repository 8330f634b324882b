"""The released world-model folder layout and reading/writing its (possibly sharded) safetensors weights.

`RLinf/RLinf-OpenSora-LIBERO-Spatial` (and `-Object`) is laid out as::

    config.json                     STDiT3 architecture
    model-00001.safetensors         STDiT3 weights (one or more shards)
    model.safetensors.index.json    key -> shard file
    vae/                            diffusers AutoencoderKL (config.json, diffusion_pytorch_model.safetensors)
    resnet_rm.pth                   reward classifier state dict
    dataset/traj*.npy               start frames of recorded trajectories
    dataset_statistics.json         action q01 / q99 for normalization
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
VAE_FOLDER = "vae"
REWARD_WEIGHTS_NAME = "resnet_rm.pth"
DATASET_FOLDER = "dataset"
STATISTICS_NAME = "dataset_statistics.json"

LAYOUT_HELP = (
    "expected the RLinf-OpenSora layout: config.json, model-00001.safetensors (+ model.safetensors.index.json), "
    "vae/, resnet_rm.pth, dataset/traj*.npy, dataset_statistics.json"
)


# `embedded:NAME` (or `embedded:NAME/SUBFOLDER`) names a model that ships inside the package, under `assets/`.
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path(__file__).resolve().parent / "assets"


def locate(path: str | Path) -> Path:
    """A folder given by path, or by `embedded:NAME[/SUBFOLDER]` for a model shipped with the package.

    Raises:
        FileNotFoundError: an `embedded:` name that the package does not hold (the message lists those it does).
    """
    text = str(path)
    if not text.startswith(EMBEDDED_PREFIX):
        return Path(path)
    folder = EMBEDDED_DIR / text[len(EMBEDDED_PREFIX) :]
    if not folder.is_dir() or not text[len(EMBEDDED_PREFIX) :]:
        shipped = sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.is_dir()) if EMBEDDED_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no embedded model {text!r}; the package ships {[EMBEDDED_PREFIX + n for n in shipped]}"
        )
    return folder


def shard_name(index: int) -> str:
    """File name of the `index`-th weight shard (1-based), as in the released checkpoints."""
    return f"model-{index:05d}.safetensors"


def weight_files(path: str | Path) -> dict[str, Path]:
    """Maps every stored tensor name to the safetensors file that holds it.

    Args:
        path: a checkpoint folder (with `model.safetensors.index.json`, or holding a single `*.safetensors`),
            an index file, or one `.safetensors` file.
    """
    path = Path(path)
    if path.is_dir():
        index = path / WEIGHTS_INDEX_NAME
        if index.is_file():
            path = index
        else:
            candidates = sorted(path.glob("*.safetensors"))
            if len(candidates) != 1:
                raise FileNotFoundError(
                    f"{path} has no {WEIGHTS_INDEX_NAME} and {len(candidates)} .safetensors files "
                    f"(expected the index, or exactly one weights file; {LAYOUT_HELP})"
                )
            path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path} ({LAYOUT_HELP})")
    if path.name.endswith(".json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a safetensors index (expected a JSON object with 'weight_map')") from err
        files = {key: path.parent / name for key, name in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{path} names the shard {file.name}, which is missing from {path.parent}")
        return files
    with _open(path) as f:
        return dict.fromkeys(f.keys(), path)


def _open(file: Path):
    try:
        return safe_open(file, framework="pt")
    except Exception as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from err


def stored_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors, read from the file headers without loading any data."""
    shapes = {}
    for file in sorted(set(files.values())):
        with _open(file) as f:
            for key in f.keys():
                if files.get(key) == file:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def read_tensors(
    files: dict[str, Path], keys: list[str], device=None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Reads only `keys`, casting floating tensors to `dtype` when given."""
    out = {}
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    for file, file_keys in by_file.items():
        with _open(file) as f:
            for key in file_keys:
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                out[key] = tensor.to(device) if device is not None else tensor
    return out


def check_state_dict_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str, limit: int = 10
) -> None:
    """Raises ValueError listing the first missing, unexpected and mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys, first: {missing[:limit]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys, first: {unexpected[:limit]}")
    if wrong:
        details = [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}" for k in wrong[:limit]]
        lines.append(f"  {len(wrong)} keys with another shape, first: {details}")
    raise ValueError("\n".join(lines))


def save_sharded(state_dict: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int | None = None):
    """Writes `model-0000k.safetensors` shards and `model.safetensors.index.json` into `folder`.

    Args:
        max_shard_bytes: largest shard size; one shard when None.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        save_file(shard, folder / shard_name(i), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_name(i)))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of the parts of a world-model checkpoint folder; `resolve` checks that each exists."""

    root: Path

    @property
    def vae(self) -> Path:
        return self.root / VAE_FOLDER

    @property
    def reward_weights(self) -> Path:
        return self.root / REWARD_WEIGHTS_NAME

    @property
    def dataset(self) -> Path:
        return self.root / DATASET_FOLDER

    @property
    def statistics(self) -> Path:
        return self.root / STATISTICS_NAME

    @classmethod
    def resolve(cls, root: str | Path) -> CheckpointLayout:
        """Checks the folder (a path or `embedded:NAME`) and every part of the layout, naming what is missing."""
        layout = cls(locate(root))
        if not layout.root.is_dir():
            raise FileNotFoundError(f"checkpoint folder {layout.root} does not exist ({LAYOUT_HELP})")
        weight_files(layout.root)
        for part in (layout.vae, layout.reward_weights, layout.dataset, layout.statistics):
            if not part.exists():
                raise FileNotFoundError(f"checkpoint folder {layout.root} has no {part.name} ({LAYOUT_HELP})")
        return layout


# Where a world model comes from when none is given: this variable, else the released model of the suite.
CHECKPOINT_ENV_VAR = "OPENSORA_GYM_CHECKPOINT"
HUB_IDS = {"spatial": "RLinf/RLinf-OpenSora-LIBERO-Spatial", "object": "RLinf/RLinf-OpenSora-LIBERO-Object"}


def resolve_checkpoint(checkpoint: str | Path | None, suite: str) -> Path:
    """The checkpoint folder: the argument, else `$OPENSORA_GYM_CHECKPOINT`, else the released model from the Hub."""
    if checkpoint is None:
        checkpoint = os.environ.get(CHECKPOINT_ENV_VAR)
    if checkpoint is not None:
        return CheckpointLayout.resolve(checkpoint).root
    repo_id = HUB_IDS[suite]
    from huggingface_hub import snapshot_download

    try:
        return CheckpointLayout.resolve(snapshot_download(repo_id)).root
    except Exception as err:
        raise FileNotFoundError(
            f"no world-model checkpoint given and {repo_id} could not be fetched from the Hugging Face Hub ({err}). "
            f"Download it where there is network access (`hf download {repo_id} --local-dir <folder>`), then pass "
            f"checkpoint=<folder> or set {CHECKPOINT_ENV_VAR}=<folder>."
        ) from err
