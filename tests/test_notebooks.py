from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_runs_without_errors(name, monkeypatch, tmp_path):
    # The notebook makes its own tiny checkpoint unless this points to a real one.
    monkeypatch.delenv("OPENSORA_GYM_CHECKPOINT", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(cell.get("outputs", []) == [] for cell in notebook.cells if cell.cell_type == "code"), (
        f"{name} must be saved without outputs"
    )
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(o.output_type == "display_data" and "image/png" in o.data for o in outputs) == 2
    text = "".join(o.get("text", "") for o in outputs)
    assert "chunk 3: reward" in text
    # Success depends on the action: the sub-envs that move right succeed on their second chunk, the others go on.
    assert "chunk 0: reward [0. 0. 0. 0.], terminated [False False False False]" in text
    assert "chunk 1: reward [0. 0. 1. 1.], terminated [False False  True  True]" in text
