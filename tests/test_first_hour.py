"""A user's first hour (issue 19): a fast, quiet command line, errors that say what to do,
evaluation points a curve can be drawn from, and TensorBoard scalars that include epsilon."""

from __future__ import annotations

import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dp_keras_scale as dks
from dp_keras_scale import cli
from dp_keras_scale import config as cfg
from dp_keras_scale import experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = shutil.which("dp-keras-scale", path=os.path.dirname(sys.executable))
EPSILON_ARGS = ["epsilon", "--noise-multiplier", "10", "--batch-size", "4096",
                "--dataset-size", "50000", "--steps", "875", "--delta", "1e-5"]
# A TensorFlow / absl C++ log line ("I0000 00:00:... port.cc:153] ...") or Python warning.
NOISE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|UserWarning|GeneratorDataset|PyFunc|"
                   r"cuInit", re.M)


def quiet_env(**extra) -> dict:
    """The environment of a fresh shell: no log-level variables of the test runner."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}
    return {**env, **extra}


def run_command(args, launcher="module", importtime=False, env=None, timeout=600):
    """Runs the command as users do: ``python -m dp_keras_scale.cli`` or the console script."""
    python = [sys.executable] + (["-X", "importtime"] if importtime else [])
    target = ["-m", "dp_keras_scale.cli"] if launcher == "module" else [SCRIPT]
    return subprocess.run(python + target + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env or quiet_env())


def imported(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


LAUNCHERS = ["module"] + (["script"] if SCRIPT else [])


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("args", [["--help"], ["configs"], EPSILON_ARGS, ["train", "--help"]],
                         ids=["help", "configs", "epsilon", "train-help"])
def test_light_commands_never_import_tensorflow(args, launcher):
    result = run_command(args, launcher, importtime=True)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = imported(result.stderr)
    assert "dp_keras_scale.config" in modules       # the command ran, and imported this
    heavy = sorted(m for m in modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
    assert not heavy, heavy[:5]
    assert not NOISE.search(result.stderr)


def test_a_program_still_imports_the_whole_library():
    code = ("import sys, keras, dp_keras_scale; "
            "print(keras.saving.get_registered_object('dp_keras_scale>DPScaleModel'), "
            "'dp_keras_scale.models' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=quiet_env(TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DPScaleModel" in out.stdout and out.stdout.strip().endswith("True")


@pytest.mark.parametrize("setting,active", [(None, True), ("0", False)])
def test_importing_the_library_selects_the_caching_cpu_allocator_unless_told_not_to(
        setting, active):
    # TensorFlow's BFC allocator keeps freed blocks (no page faults per DP step); only it
    # keeps the statistics get_memory_info reads, so they show which allocator TF created.
    code = ("import os, dp_keras_scale, tensorflow as tf; tf.ones([4]) + 1; "
            "from dp_keras_scale import _allocator; "
            "print(os.environ['TF_CPU_ALLOCATOR_USE_BFC'], _allocator.caching_allocator_active())")
    env = quiet_env(TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    if setting is not None:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [setting or "1", str(active)]


def test_configs_prints_a_description_for_every_bundled_config():
    result = run_command(["configs"])
    lines = result.stdout.splitlines()
    assert len(lines) == len(cfg.bundled_configs())
    for name, line in zip(cfg.bundled_configs(), lines):
        description = cfg.describe(name)
        assert description and line.split()[0] == name and line.endswith(description)


@pytest.mark.parametrize("command,text", [
    ("evaluate", "spends no privacy budget"), ("configs", "one-line description"),
    ("audit", "non-members"), ("report", "Markdown table")])
def test_every_command_has_a_description(command, text):
    result = run_command([command, "--help"])
    assert result.returncode == 0 and text in result.stdout.replace("\n", " ")
    assert "--verbose" in result.stdout


@pytest.mark.parametrize("command", ["evaluate", "audit"])
def test_a_directory_that_is_not_a_run_is_named_as_such(command, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = run_command([command, str(tmp_path)])
    assert result.returncode == 2
    assert "is not a run directory" in result.stderr and "Bundled" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    missing = run_command([command, str(tmp_path / "nope")])
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


@pytest.mark.parametrize("override,message", [
    ("model.widths=true", "must be a list of positive integers, got true."),
    ("training.flip=1", "training.flip must be true or false, got 1."),
    ("privacy.accountant=RDP", 'privacy.accountant = "RDP" is not valid'),
    ("training.seed=lucky", 'must be an integer or "random", got "lucky".'),
])
def test_config_errors_spell_values_as_the_user_typed_them(override, message):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config("mnist_cpu", [override])
    assert message in str(err.value)
    assert "True" not in str(err.value) and "'" not in str(err.value).replace("'s", "")


def test_a_missing_labels_file_does_not_blame_the_images_file(tmp_path):
    cache = dks.data.default_data_dir() / "mnist"
    images = sorted(cache.glob("train-images-idx3-ubyte*"))
    if not images:
        pytest.skip("MNIST is not in the data cache (make data)")
    (tmp_path / "mnist").mkdir()
    os.symlink(images[0], tmp_path / "mnist" / images[0].name)
    with pytest.raises(dks.data.CorruptDatasetError) as err:
        dks.data.load("mnist", "train", data_dir=tmp_path)
    message = str(err.value)
    assert "train-labels-idx1-ubyte" in message and f"Keep {images[0].name}" in message
    assert "Delete" not in message and "dp_keras_scale.data.fetch mnist" in message


def test_labels_out_of_range_fail_before_training_with_one_line():
    x = np.zeros((20, 4), np.float32)
    sampler = dks.data.BatchSampler(20, 5, seed=0)
    with pytest.raises(ValueError, match=r"non-negative class indices; found -1 at index 3"):
        sampler.dataset(x, np.array([0, 1, 2, -1] + [0] * 16))
    with pytest.raises(ValueError, match=r"in 0\.\.9 \(num_classes=10\); found 10 at index 19"):
        sampler.dataset(x, np.array([1] * 19 + [10]), num_classes=10)
    sampler.dataset(x, np.arange(20) % 10, num_classes=10)         # valid labels pass
    sampler.dataset(x, np.eye(20, 10, dtype=np.float32))           # one-hot: not checked


def test_a_failed_run_leaves_no_directory_and_no_tensorflow_noise(tmp_path):
    out = tmp_path / "run"
    result = run_command(["train", "--config", "mnist_cpu", "--out", str(out),
                          "--set", "data.dataset=cifar10",
                          "--set", f"data.data_dir={tmp_path / 'empty'}"],
                         env=quiet_env(DP_KERAS_SCALE_NO_TFDS="1"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cifar10" in result.stderr and not out.exists()
    assert result.stdout.startswith("mnist_cpu: training into")   # before TensorFlow loads
    assert not NOISE.search(result.stderr), result.stderr[-2000:]


def test_audit_reports_only_the_operating_points_its_sample_supports():
    assert cli.supported_fprs([0.01, 0.001], 500) == ([], [0.001, 0.01])
    assert cli.supported_fprs([0.01, 0.001], 1000) == ([0.01], [0.001])
    assert cli.supported_fprs([0.01, 0.001], 10_000) == ([0.001, 0.01], [])


def test_evaluation_points_start_at_zero_and_make_a_curve():
    assert experiment.evaluation_steps(12) == list(range(13))
    long = experiment.evaluation_steps(1000)
    assert long[0] == 0 and long[-1] == 1000 and 20 <= len(long) <= 22
    odd = experiment.evaluation_steps(97)
    assert odd[0] == 0 and odd[-1] == 97 and len(odd) <= 22
    line = experiment.progress_line({"step": 6, "nonprivate_train_loss": 1.0,
                                     "test_accuracy": 0.5, "test_examples": 300,
                                     "epsilon": 2.0}, 12, 3.0)
    assert line.startswith("step  6/12: loss 1.0000") and "epsilon 2.000" in line


def test_tensorboard_event_files_hold_epsilon(tmp_path):
    pytest.importorskip("tensorboard")
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 3, 64)
    inputs = keras.Input((6,))
    model = dks.DPScaleModel(inputs, keras.layers.Dense(3)(inputs))
    sampler = dks.data.BatchSampler(64, 16, seed=0)
    model.compile(optimizer=dks.DPSGD(0.5, l2_norm_clip=1.0, noise_multiplier=1.0,
                                      gradient_accumulation_steps=sampler.accumulation_steps,
                                      expected_batch_size=sampler.expected_batch_size),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    budget = dks.callbacks.PrivacyBudget(delta=1e-5, sampling_rate=sampler.sampling_rate,
                                         dataset_size=64, verbose=0)
    model.fit(sampler.dataset(x, y), epochs=2, steps_per_epoch=sampler.steps_per_epoch,
              callbacks=[budget, keras.callbacks.TensorBoard(str(tmp_path), write_graph=False)],
              verbose=0, shuffle=False)
    values: dict[str, list[float]] = {}
    for path in glob.glob(str(tmp_path / "train" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(
                    float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                    else value.simple_value)
    assert "epoch_epsilon" in values, sorted(values)
    assert values["epoch_epsilon"][-1] == pytest.approx(budget.epsilon_now, rel=1e-6)
    assert values["epoch_epsilon"][0] < values["epoch_epsilon"][-1]
    assert "epoch_loss" in values
