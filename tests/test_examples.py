"""The examples end to end at a tiny scale: real data, real subprocess, parsed output."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_trains_and_reports_accuracy_and_epsilon():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--train-subset", "6000",
         "--epochs", "3", "--batch-size", "600", "--microbatch-size", "400", "--widths", "8,16",
         "--epsilon", "8", "--learning-rate", "2", "--seed", "0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"Test accuracy: ([0-9.]+) on 10000 .*\(eps=([0-9.]+), delta=1e-05\)",
                      result.stdout)
    assert match, result.stdout[-3000:]
    accuracy, eps = float(match.group(1)), float(match.group(2))
    assert 0.15 < accuracy <= 1.0         # better than chance (0.1) after 30 noisy steps
    assert 0 < eps <= 8.0                  # within the target it was calibrated for
    assert "Poisson" in result.stdout and "DP-SGD" in result.stdout   # the privacy statement


def _run_example(*args, timeout=600):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_custom_model_example_trains_the_users_keras_model():
    out = _run_example(ROOT / "examples" / "custom_model.py", "--train-subset", "1500",
                       "--epochs", "1", "--epsilon", "8")
    match = re.search(r"Test accuracy of the original .*: ([0-9.]+); epsilon = ([0-9.]+)", out)
    assert match, out[-2000:]
    assert 0 < float(match.group(2)) <= 8.0


def test_cifar10_recipe_example_runs_on_a_local_cifar_directory(tmp_path):
    from test_data import _make_cifar10_py
    _make_cifar10_py(tmp_path, n_per_batch=40, n_test=20)    # real file format, 200 images
    out = _run_example(ROOT / "examples" / "cifar10_recipe.py", "--data-dir", tmp_path,
                       "--steps", "3", "--batch-size", "40", "--microbatch-size", "40",
                       "--augmult", "2", "--depth", "10", "--width", "1", "--epsilon", "8")
    match = re.search(r"Test accuracy: ([0-9.]+) \(EMA weights: ([0-9.]+)\); epsilon = "
                      r"([0-9.]+)", out)
    assert match, out[-2000:]
    assert 0 < float(match.group(3)) <= 8.0
    assert "The 2 augmented copies of an example are averaged" in out


def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="install the test extras")
    from nbclient import NotebookClient
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    os.environ["DKS_NOTEBOOK_SMOKE"] = "1"
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["DKS_NOTEBOOK_SMOKE"]
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "EMA test accuracy" in printed and "DP-SGD privacy statement" in printed


def test_finetune_example_pretrains_then_dp_finetunes_both_ways():
    import dp_keras_scale as dks
    out = _run_example(ROOT / "examples" / "finetune.py", "--quick", "--seed", "0",
                       "--epsilon", "3")
    assert re.search(r"Pre-trained on MNIST \(public, non-private\): 30 steps", out), out[-2000:]
    match = re.search(r"Poisson rate q=([0-9.]+), (\d+) steps, noise multiplier ([0-9.]+)", out)
    assert match, out[-2000:]
    q, steps, sigma = float(match.group(1)), int(match.group(2)), float(match.group(3))
    expected_eps = dks.accounting.epsilon(sigma, q, steps, 1e-5)
    for arm in ("classifier only", "all layers"):
        found = re.search(arm + r": test accuracy ([0-9.]+); epsilon = ([0-9.]+) at delta = "
                          r"1e-05 \((\d+) steps\)", out)
        assert found, out[-2000:]
        assert 0 <= float(found.group(1)) <= 1 and int(found.group(3)) == steps
        assert float(found.group(2)) == pytest.approx(expected_eps, abs=1e-3)
        assert float(found.group(2)) <= 3.0 + 1e-3
    assert "features: 2000/2000 images (100%)" in out         # extraction progress
