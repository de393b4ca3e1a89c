"""The notebooks run top to bottom (on CPU, with the offline data), and the Colab one installs
the library from its repository without replacing the runtime's TensorFlow."""

from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def code_cells(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_colab_notebook_installs_from_the_repository_keeping_tensorflow():
    install = code_cells(nbformat.read(NOTEBOOKS / "tpu_colab.ipynb", as_version=4))[0]
    assert '"git", "clone"' in install and '"pip", "install"' in install
    # every pip call is held to the runtime's TensorFlow family (or installs without deps)
    pip_calls = install.split('"pip", "install"')[1:]
    assert pip_calls and all('"-c"' in call.split("check=True")[0]
                             or '"--no-deps"' in call.split("check=True")[0]
                             for call in pip_calls)
    for name in ("tensorflow", "tensorflow-tpu", "numpy"):
        assert f'"{name}"' in install
    assert "%pip install /content" not in install


@pytest.mark.parametrize("name", ["tpu_colab.ipynb"])
def test_notebook_runs_top_to_bottom(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()     # raises CellExecutionError, naming the cell, if any cell fails
    outputs = "".join(out.get("text", "") for cell in notebook.cells
                      if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert "device: CPU | replicas: 1 | TPU: False" in outputs     # the CPU fallback was taken
    assert "dp-keras-scale 0.1.0" in outputs                      # the install cell found it
    assert "test accuracy" in outputs and "epsilon" in outputs.lower()
    assert "UserWarning" not in outputs
