import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
from opensora_gym.presets import make_tiny_checkpoint
from opensora_gym.world_model import WorldModel

_DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture
def load_benchmark(monkeypatch):
    """Imports a script of `benchmarks/` by name (e.g. `env_step`) as a module."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        script = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up there
        spec.loader.exec_module(script)
        return script

    return load


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of reference vectors: $REFERENCE_DIR, else ../shared/reference from the project root."""
    path = Path(os.environ.get("REFERENCE_DIR", _DEFAULT_REFERENCE_DIR))
    if not path.is_dir():
        pytest.skip(f"reference vectors not found at {path} (set REFERENCE_DIR to the folder)")
    return path


@dataclass(frozen=True)
class RLMathReference:
    """`rl_math_case.safetensors` and `rl_math_meta.json`, whose lines name the settings (`gamma=0.99`, ...)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    def setting(self, block: str, name: str) -> float:
        """The number `name=<number>` in the meta line of `block` (`actor`, `critic`, `gae`, `grpo`)."""
        match = re.search(rf"\b{name}=([0-9.eE+-]+)", self.meta[block])
        assert match is not None, f"no {name}=... in reference meta line {self.meta[block]!r}"
        return float(match.group(1))


@pytest.fixture(scope="session")
def rl_math_reference(reference_dir) -> RLMathReference:
    return RLMathReference(
        load_file(reference_dir / "rl_math_case.safetensors"),
        json.loads((reference_dir / "rl_math_meta.json").read_text()),
    )


@dataclass(frozen=True)
class STDiT3Reference:
    """The tiny STDiT3 reference: its meta (architecture, sizes, sampler settings), its case and the model."""

    meta: dict
    case: dict[str, torch.Tensor]
    model: STDiT3


@pytest.fixture(scope="session")
def stdit3_reference(reference_dir) -> STDiT3Reference:
    meta = json.loads((reference_dir / "stdit3_tiny_meta.json").read_text())
    model = STDiT3.from_pretrained(
        reference_dir / "stdit3_tiny_weights.safetensors", config=STDiT3Config.from_json_dict(meta["config"])
    )
    return STDiT3Reference(meta, load_file(reference_dir / "stdit3_tiny_case.safetensors"), model)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny world-model checkpoint in the released layout, shared by the tests."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def world_model(checkpoint):
    """The tiny checkpoint's world model at 64 px with 2 sampling steps; tests must not modify it."""
    return WorldModel.from_pretrained(checkpoint, num_sampling_steps=2, image_size=64)


@pytest.fixture(scope="session")
def never_success(checkpoint):
    """A world model whose classifier gives probability 0 to every frame, so episodes only truncate."""
    model = WorldModel.from_pretrained(checkpoint, num_sampling_steps=2, image_size=64)
    model.reward_model.net[-2].bias.data.fill_(-50.0)
    return model
