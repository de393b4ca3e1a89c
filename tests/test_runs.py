"""Run directories (dp_keras_scale.runs): a run whose data is a TFDS source is trained, then
evaluated and audited by the command, as runs of in-memory arrays are (tests/test_cli.py).

The TFDS dataset is the one tests/test_random_access.py builds from MNIST digits, prepared
here in a temporary directory; nothing downloads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dp_keras_scale import cli, experiment, registry, runs
from dp_keras_scale.config import load_config
from dp_keras_scale.run_data import evaluation_input, first_examples
from test_random_access import NAME, X_ALL, Y_ALL, DksRandomAccessDigits, source


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    DksRandomAccessDigits(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


@pytest.fixture
def known_dataset(monkeypatch):
    """The test dataset's class count and pixel statistics (MNIST's) in the registry."""
    monkeypatch.setitem(registry.NUM_CLASSES, NAME, 10)
    monkeypatch.setitem(registry.PIXEL_MEAN_STD, NAME, registry.PIXEL_MEAN_STD["mnist"])


def tfds_config(data_dir: str, *overrides: str) -> dict:
    return load_config("mnist_cpu", [
        f'data.dataset="tfds:{NAME}"', f'data.data_dir="{data_dir}"', "data.image_size=28",
        "data.train_subset=64", "data.test_subset=32", "training.batch_size=16",
        "training.microbatch_size=16", "training.steps=3", "model.widths=[8, 8]",
        "model.groups=4", "training.jit_compile=false", "training.seed=0",
        "privacy.target_epsilon=8", *overrides])


def test_first_examples_of_a_source_are_its_evaluation_images_in_order(data_dir):
    src = source(data_dir, "test")                  # area resize: the MNIST digits exactly
    ids = np.array([ex["id"] for ex in tfds.builder(NAME, data_dir=data_dir)
                    .as_data_source("test")])       # MNIST row of each record
    for n in (0, 7, 40):
        images, labels = first_examples(src, None, n)
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, X_ALL[ids[:n]])
        np.testing.assert_array_equal(labels, Y_ALL[ids[:n]])
    with pytest.raises(ValueError, match="41 examples asked of 40"):
        first_examples(src, None, 41)
    x, y = np.arange(10), np.arange(10) % 3
    np.testing.assert_array_equal(first_examples(x, y, 4)[1], y[:4])
    dataset, labels = evaluation_input(src, None)
    assert labels is None and len(dataset) == 1     # one batch of at most 1000


def test_tfds_run_is_evaluated_and_audited_by_the_command(data_dir, known_dataset, tmp_path,
                                                           capsys):
    out = str(tmp_path / "run")
    summary = experiment.train(tfds_config(data_dir), out, verbose=0)
    assert summary["train_examples"] == 64 and summary["test_examples"] == 32
    capsys.readouterr()

    assert cli.main(["evaluate", out]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_examples"] == 32
    assert evaluated["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert cli.main(["evaluate", out, "--weights", "ema"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(
        summary["ema_test_accuracy"], abs=1e-6)

    assert cli.main(["audit", out, "--examples", "20"]) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(f"{out}/audit.json") as f:
        report = json.load(f)
    assert report == printed
    assert report["members"] == report["non_members"] == 20 and 0 <= report["auc"] <= 1
    assert report["accounted_epsilon"] == summary["epsilon"]
    assert (tmp_path / "run" / "audit_roc.png").exists()

    run = runs.load_run(out)                        # sources, as training read them
    assert len(run.x) == 64 and run.y is None and len(run.x_test) == 32
    # More examples than the run has: capped at the test split's 32.
    assert runs.audit_run(out, examples=1000)["members"] == 32


def test_run_dir_rules_and_the_names_kept_in_experiment(tmp_path):
    config = load_config("mnist_cpu")
    assert runs.check_run_dir(str(tmp_path / "absent"), config) == "new"
    assert runs.prepare_run_dir(str(tmp_path / "run"), config) == "new"
    assert load_config(str(tmp_path / "run" / "config.toml")) == config
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a finished run"):
        runs.prepare_run_dir(str(tmp_path / "run"), config)
    with pytest.raises(FileNotFoundError, match="kept no EMA"):
        runs.release_path(str(tmp_path / "run"), "ema")
    assert experiment.check_run_dir is runs.check_run_dir       # the old names still work
    assert experiment.build_model is registry.build_model
