import os
from pathlib import Path

import pytest

from opensora_gym.testing import make_tiny_checkpoint
from opensora_gym.world_model import WorldModel

_DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of reference vectors: $REFERENCE_DIR, else ../shared/reference from the project root."""
    path = Path(os.environ.get("REFERENCE_DIR", _DEFAULT_REFERENCE_DIR))
    if not path.is_dir():
        pytest.skip(f"reference vectors not found at {path} (set REFERENCE_DIR to the folder)")
    return path


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
