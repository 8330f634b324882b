import os
from pathlib import Path

import pytest

_DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of reference vectors: $REFERENCE_DIR, else ../shared/reference from the project root."""
    path = Path(os.environ.get("REFERENCE_DIR", _DEFAULT_REFERENCE_DIR))
    if not path.is_dir():
        pytest.skip(f"reference vectors not found at {path} (set REFERENCE_DIR to the folder)")
    return path
