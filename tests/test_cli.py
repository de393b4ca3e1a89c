"""The dp-keras-scale command and its configs: validation, accounting, and a real tiny run."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import dp_keras_scale as dks
from dp_keras_scale import config as cfg
from dp_keras_scale.experiment import plan

ROOT = pathlib.Path(__file__).resolve().parents[1]


# A TensorFlow / absl C++ log line ("I0000 00:00:... port.cc:153] ...") or a Python warning.
NOISE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|Warning|GeneratorDataset|PyFunc|cuInit",
                   re.M)


def cli(*args, timeout=600):
    """Runs the command in the environment of a fresh shell (no log-level variables)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "dp_keras_scale.cli", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("name", cfg.bundled_configs())
def test_every_bundled_config_resolves_and_fits_its_privacy_target(name):
    config = cfg.load_config(name)
    assert cfg.resolve(__import__("tomllib").loads(cfg.dumps(config))) == config
    size = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000,
            "tfds:imagenet2012": 1_281_167}[
        config["data"]["dataset"]]
    schedule = plan(config, size)
    p = config["privacy"]
    eps = dks.accounting.epsilon(schedule["noise_multiplier"], schedule["sampling_rate"],
                                 schedule["steps"], p["delta"], p["accountant"])
    assert eps <= p["target_epsilon"]
    if p["noise_multiplier"] == "auto":      # calibrated: the target is (almost) spent
        assert eps > 0.99 * p["target_epsilon"]


def test_paper_config_matches_the_published_accounting():
    config = cfg.load_config("cifar10_wrn16_4_eps1")
    schedule = plan(config, 50_000)
    assert schedule["sampling_rate"] == 4096 / 50_000 and schedule["steps"] == 875
    eps = dks.accounting.epsilon(10.0, 4096 / 50_000, 875, 1e-5, accountant="rdp")
    assert eps == pytest.approx(0.99, abs=0.01)


@pytest.mark.parametrize("overrides,match", [
    (["training.epoch=3"], r"Unknown key training\.epoch; valid keys of \[training\]:.*epochs"),
    (["optim.lr=3"], r"Unknown config section \[optim\]; valid sections:.*training"),
    (["model.architecture=resnet"], r"choose one of small_cnn, compact_cnn, wide_resnet, nf_resnet"),
    (["training.batch_size=12.5"], r"training\.batch_size must be an integer"),
    (["training.batch_size=0"], r"training\.batch_size must be > 0"),
    (["privacy.noise_multiplier=loud"], r'must be a number or "auto"'),
    (["training.flip=yes"], r"training\.flip must be true or false"),
    (["training.ema_decay=1"], r"ema_decay must be in \[0, 1\)"),
    (["epochs=3"], r"section\.key=value"),
])
def test_invalid_configs_name_the_key_and_the_choices(overrides, match):
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.load_config("fashion_mnist_cpu", overrides)


def test_overrides_parse_toml_values_and_unknown_config_lists_bundled_ones():
    config = cfg.load_config("mnist_cpu", ["training.epochs=3", "model.widths=[8, 16]",
                                           "privacy.noise_multiplier=2", "training.seed=5"])
    assert config["training"]["epochs"] == 3.0 and config["model"]["widths"] == [8, 16]
    assert config["privacy"]["noise_multiplier"] == 2.0 and config["training"]["seed"] == 5
    with pytest.raises(cfg.ConfigError, match="Bundled: .*fashion_mnist_cpu"):
        cfg.load_config("no_such_config")


def test_epsilon_command_matches_the_accountant():
    out = cli("epsilon", "--noise-multiplier", "10", "--batch-size", "4096", "--dataset-size",
              "50000", "--steps", "875", "--delta", "1e-5", "--accountant", "rdp")
    assert out.returncode == 0, out.stderr
    expected = dks.accounting.epsilon(10.0, 4096 / 50_000, 875, 1e-5, accountant="rdp")
    assert f"({expected:.4g}, 1e-05)-DP" in out.stdout
    out = cli("epsilon", "--target-epsilon", "2", "--sampling-rate", "0.01", "--steps", "1000",
              "--delta", "1e-5")
    sigma = float(re.search(r"Noise multiplier for epsilon=2: ([0-9.]+)", out.stdout).group(1))
    assert sigma == pytest.approx(dks.accounting.calibrate_noise_multiplier(
        2.0, 0.01, 1000, 1e-5), abs=1e-4)
    bad = cli("epsilon", "--target-epsilon", "2", "--sampling-rate", "0.01", "--delta", "1e-5")
    assert bad.returncode == 2 and "--steps or --epochs" in bad.stderr


def test_train_evaluate_and_report_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = cli("train", "--config", "fashion_mnist_cpu", "--out", str(out),
                 "--set", "data.train_subset=1200", "--set", "data.test_subset=300",
                 "--set", "training.batch_size=200", "--set", "training.microbatch_size=150",
                 "--set", "training.epochs=2", "--set", "model.widths=[8, 16]",
                 "--set", "privacy.target_epsilon=8", "--set", "training.seed=0",
                 "--set", "training.augmult=2", "--set", "training.jit_compile=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not NOISE.search(result.stderr), result.stderr[-3000:]
    assert result.stdout.startswith("fashion_mnist_cpu: training into")
    progress = re.findall(r"^step +(\d+)/12: ", result.stdout, re.M)   # logical steps
    assert progress == [str(i) for i in range(13)]
    for name in ("config.toml", "metrics.csv", "metrics.json", "privacy.txt", "privacy.json",
                 "model.keras", "ema_model.keras", "summary.json", "accuracy_vs_steps.png",
                 "epsilon_vs_steps.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 12 and [r["step"] for r in rows] == list(range(13))
    assert rows[0]["epsilon"] == 0 and rows[-1]["test_examples"] == 300
    assert "nonprivate_train_loss" in rows[-1] and "loss" not in rows[-1]   # labelled: not DP
    assert rows[-1]["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert list((out / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert summary["epsilon"] == pytest.approx(dks.accounting.epsilon(
        summary["noise_multiplier"], 200 / 1200, 12, 1e-5), rel=1e-9)
    assert 7.9 < summary["epsilon"] <= 8.0 and rows[-1]["epsilon"] == summary["epsilon"]
    assert json.loads((out / "privacy.json").read_text())["augmult"] == 2
    assert f"Test accuracy: {summary['test_accuracy']:.4f}" in result.stdout
    assert cfg.load_config(str(out / "config.toml"))["training"]["augmult"] == 2

    evaluated = cli("evaluate", str(out), "--weights", "ema", "--verbose")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert NOISE.search(evaluated.stderr)           # --verbose brings TensorFlow's logs back
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(
        summary["ema_test_accuracy"], abs=1e-6)
    audited = cli("audit", str(out), "--examples", "200")
    assert audited.returncode == 0, audited.stderr[-2000:]
    audit_report = json.loads((out / "audit.json").read_text())
    assert 0 <= audit_report["auc"] <= 1 and audit_report["members"] == 200
    assert audit_report["tpr_at_fpr"] == {}          # 200 non-members measure no 1% FPR
    assert "needs at least 1000 non-members" in audit_report["not_measured"]["0.01"]
    assert audit_report["accounted_epsilon"] == summary["epsilon"]
    assert (out / "audit_roc.png").exists()
    report = cli("report", str(out), "--out", str(tmp_path / "report.png"))
    assert report.returncode == 0 and (tmp_path / "report.png").exists()
    assert f"| {summary['epsilon']:.3f} |" in report.stdout


def test_bad_command_lines_fail_with_a_clear_message(tmp_path):
    result = cli("train", "--config", "fashion_mnist_cpu", "--set", "training.lr=1",
                 "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "Unknown key training.lr" in result.stderr
    assert not (tmp_path / "x").exists()
    assert cli("evaluate", str(tmp_path)).returncode == 2
    helped = cli("train", "--help")
    assert helped.returncode == 0 and "--set section.key=value" in helped.stdout.replace(
        "SECTION.KEY=VALUE", "section.key=value")
