"""The notebooks run top to bottom (on CPU, with the offline data)."""

from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["tpu_colab.ipynb"])
def test_notebook_runs_top_to_bottom(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()     # raises CellExecutionError, naming the cell, if any cell fails
    outputs = "".join(out.get("text", "") for cell in notebook.cells
                      if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert "replicas: 1 | TPU: False" in outputs      # the CPU fallback was taken
    assert "test accuracy" in outputs and "epsilon" in outputs.lower()
