"""Run a config end to end: data, sampler, model, DP-SGD, averaging, budget, and a run directory.

A run directory holds ``config.toml`` (resolved), ``metrics.csv`` / ``metrics.json`` (one row
per evaluation point, about 20 from step 0: logical step, epoch, test accuracy, EMA test
accuracy, epsilon, and the training-time metrics labelled ``nonprivate_...`` unless
``run.training_metrics = false``; `RunMetrics`), ``privacy.txt`` /
``privacy.json`` (the privacy statement), ``model.keras`` (and ``ema_model.keras``),
``summary.json`` and PNG plots. Re-running the same command with the same directory resumes
an interrupted run (`keras.callbacks.BackupAndRestore` under ``backup/``).

Fine-tuning (``[finetune] source``): the model is a pretrained backbone plus a classifier.
In ``classifier_only`` mode the directory also holds the cached backbone features
(``features_train.npy``, ``features_test.npy``, ``features_key.json``) that DP-SGD trains the
classifier on; ``model.keras`` is always the whole model, images -> logits. The cached
features are a non-private function of the private images: keep them with the data, never
publish them with the model.

Example:
    >>> summary = train(load_config("fashion_mnist_cpu"), "runs/fmnist")
    >>> summary["test_accuracy"], summary["epsilon"]
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any

import keras
import numpy as np

from dp_keras_scale import accounting, callbacks, data, finetune, models
from dp_keras_scale.config import check_complete, dumps, load_config
# The feature cache lives with the fine-tuning code; its names stay importable from here.
from dp_keras_scale.finetune.cache import (FEATURE_FILES, FEATURE_KEY,  # noqa: F401
                                           cached_features, source_fingerprint)
from dp_keras_scale.model import DPScaleModel
from dp_keras_scale.optimizers import DPSGD

# Published per-dataset pixel statistics (public constants; nothing is computed on private data).
PIXEL_MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530),
                  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                  "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
               "imagenet2012": 1000}


def _dataset_constant(table: dict, dataset: str, table_name: str):
    """``table[dataset]``; a "tfds:NAME" dataset uses NAME's entry."""
    key = dataset.removeprefix(data.random_access.TFDS_PREFIX).split(":")[0].split("/")[0]
    if key not in table:
        raise ValueError(f"Dataset {dataset!r} has no entry in dp_keras_scale.experiment."
                         f"{table_name}: add {key!r} there (published values only, never "
                         "statistics computed on the private data).")
    return table[key]


def _standardized_input(input_shape, dataset: str):
    """uint8 images -> standardized floats, as the first layers of a model."""
    mean, std = _dataset_constant(PIXEL_MEAN_STD, dataset, "PIXEL_MEAN_STD")
    inputs = keras.Input(input_shape, name="images")
    scaled = keras.layers.Rescaling(1 / 255.0)(inputs)
    return inputs, keras.layers.Normalization(mean=mean, variance=np.square(std),
                                              name="standardize")(scaled)


def build_model(config: dict, input_shape: tuple[int, ...]) -> keras.Model:
    """The `DPScaleModel` named by ``config["model"]`` for uint8 images of ``input_shape``."""
    m, dataset = config["model"], config["data"]["dataset"]
    classes = _dataset_constant(NUM_CLASSES, dataset, "NUM_CLASSES")
    if m["architecture"] == "small_cnn":
        mean, std = _dataset_constant(PIXEL_MEAN_STD, dataset, "PIXEL_MEAN_STD")
        if not np.isscalar(mean):
            mean, std = float(np.mean(mean)), float(np.mean(std))
        return models.small_cnn(input_shape, classes, widths=tuple(m["widths"]),
                                groups=m["groups"] or None, mean=mean, std=std,
                                weight_standardization=m["weight_standardization"])
    if m["architecture"] == "wide_resnet":
        body = models.wide_resnet(m["depth"], int(m["width"]), classes,
                                  groups=m["groups"] or None, input_shape=input_shape,
                                  weight_standardization=m["weight_standardization"],
                                  dropout=m["dropout"], model_class=keras.Model)
    else:
        body = models.nf_resnet(m["depth"], classes, width=m["width"], input_shape=input_shape,
                                drop_rate=m["dropout"], stem=m["stem"], model_class=keras.Model)
    inputs, standardized = _standardized_input(input_shape, dataset)
    return DPScaleModel(inputs, body(standardized), name=body.name)


#: Evaluation points of a run besides step 0 (`RunMetrics`): enough for a curve.
EVALUATION_POINTS = 20
#: Test examples evaluated at the intermediate points (the last point uses all of them).
INTERMEDIATE_TEST_EXAMPLES = 2000


def evaluation_steps(planned_steps: int, points: int = EVALUATION_POINTS) -> list[int]:
    """The logical steps at which a run is evaluated: 0, about `points` evenly spaced steps
    and the last one.

    Example:
        >>> evaluation_steps(12)
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        >>> evaluation_steps(1000)[:4]
        [0, 50, 100, 150]
    """
    every = max(1, math.ceil(planned_steps / points))
    return sorted(set(range(0, planned_steps, every)) | {planned_steps})


class RunMetrics(keras.callbacks.Callback):
    """Test metrics at about `EVALUATION_POINTS` logical steps of a run, from step 0.

    At each step of `evaluation_steps` (logical, noisy steps: ``optimizer.iterations``) it
    evaluates the training weights (and the EMA weights) on the test set, reads epsilon from
    the `PrivacyBudget`, appends a row to ``metrics.csv`` / ``metrics.json`` in ``run_dir``
    and, with ``verbose``, prints one progress line. Intermediate points use the first
    `INTERMEDIATE_TEST_EXAMPLES` test examples (cheap); the last point uses all of them.
    A resumed run keeps the rows up to its restored step. Training-time metrics (loss,
    accuracy, clipped fraction, non-finite examples of the private batches, without noise)
    are written under the names of `TRAINING_METRICS` (``nonprivate_...``), or left out.

    Args:
        x_test, y_test: the test set (arrays, or a random-access source with y_test None).
        run_dir: where the metrics files are written.
        ema: whether the optimizer keeps an "ema" average to evaluate too.
        budget: the run's `dks.callbacks.PrivacyBudget` (before this callback in the list).
        verbose: 0 silent; otherwise one line per evaluation point.
        training_metrics: write the training-time metrics (not covered by the guarantee).

    Example:
        >>> model.fit(ds, callbacks=[budget, RunMetrics(x_test, y_test, "runs/x", False,
        ...                                              budget, verbose=1)], verbose=0)
    """

    def __init__(self, x_test, y_test, run_dir: str, ema: bool, budget, verbose: int = 0,
                 training_metrics: bool = True):
        super().__init__()
        self.training_metrics = training_metrics
        self.x_test, self.y_test, self.run_dir, self.ema, self.budget = \
            x_test, y_test, run_dir, ema, budget
        self.verbose = verbose
        self.rows: list[dict[str, Any]] = []
        self._points: set[int] = set()
        self._last, self._steps_per_epoch = 0, 1
        self._start = time.time()
        path = os.path.join(run_dir, "metrics.json")
        if os.path.exists(path):             # a resumed run keeps the earlier rows
            with open(path) as f:
                self.rows = json.load(f)

    def _step(self) -> int:
        return int(self.model.optimizer.iterations)

    def _accuracy(self, final: bool) -> tuple[float, int]:
        x, y = self.x_test, self.y_test
        if not final and not isinstance(x, data.TFDSSource):
            x, y = x[:INTERMEDIATE_TEST_EXAMPLES], y[:INTERMEDIATE_TEST_EXAMPLES]
        inputs, labels = _evaluation_input(x, y)
        result = self.model.evaluate(inputs, labels, batch_size=1000, verbose=0,
                                     return_dict=True)
        return float(result["accuracy"]), len(x)

    def on_train_begin(self, logs=None):
        step = self._step()
        self._steps_per_epoch = max(1, (self.params.get("steps") or 1) // self._accumulation())
        planned = self.budget.planned_steps or step + self.params["epochs"] * \
            self._steps_per_epoch
        self._last = planned
        self._points = set(evaluation_steps(planned))
        self._start = time.time()
        self.rows = [r for r in self.rows if r["step"] <= step]
        if not any(r["step"] == step for r in self.rows) and step in self._points | {0}:
            self._record(step, {}, final=False)

    def _accumulation(self) -> int:
        return int(getattr(self.model.optimizer, "dp_accumulation_steps", 1) or 1)

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step in self._points and not any(r["step"] == step for r in self.rows):
            self._record(step, logs or {}, final=step >= self._last)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.rows:
            logs.update({k: v for k, v in self.rows[-1].items()
                         if k.startswith(("test_acc", "ema"))})

    def on_train_end(self, logs=None):
        step = self._step()
        last = self.rows[-1] if self.rows else None
        if last is None or last["step"] != step or last["test_examples"] < len(self.x_test):
            self.rows = [r for r in self.rows if r["step"] < step]
            self._record(step, logs or {}, final=True)

    def _record(self, step: int, logs: dict, final: bool) -> None:
        row: dict[str, Any] = {"step": step,
                               "epoch": round(step / self._steps_per_epoch, 4)}  # fractional
        if self.training_metrics:   # running means over the epoch so far; no noise: not DP
            for key, name in TRAINING_METRICS.items():
                if key in logs:
                    row[name] = float(logs[key])
        row["test_accuracy"], row["test_examples"] = self._accuracy(final)
        if self.ema:
            with callbacks.averaged_weights(self.model, "ema"):
                row["ema_test_accuracy"] = self._accuracy(final)[0]
        row["epsilon"] = float(self.budget.epsilon_now)
        self.rows.append(row)
        write_metrics(self.rows, self.run_dir)
        if self.verbose:
            print(progress_line(row, self._last, time.time() - self._start), flush=True)


#: Training-time metrics (computed on the private batches without noise, so NOT covered by
#: the privacy statement) and their labelled names in metrics.* files.
TRAINING_METRICS = {"loss": "nonprivate_train_loss", "accuracy": "nonprivate_train_accuracy",
                    "clipped_fraction": "nonprivate_clipped_fraction",
                    "nonfinite_examples": "nonprivate_nonfinite_examples"}


def tensorboard_callbacks(run_dir: str) -> list[keras.callbacks.Callback]:
    """``[keras.callbacks.TensorBoard]`` writing to ``run_dir/tensorboard`` when the
    ``tensorboard`` package is installed (``pip install dp-keras-scale[tensorboard]``), else
    ``[]``. Put it after `PrivacyBudget` and `RunMetrics`: its epoch scalars then include
    epsilon and the test accuracies, next to loss, accuracy and the DP counters.

    Example:
        >>> model.fit(ds, callbacks=[budget, *tensorboard_callbacks("runs/x")])
    """
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return [keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"),
                                        write_graph=False)]


def progress_line(row: dict, planned_steps: int, seconds: float) -> str:
    """One line of training progress, counted in logical (noisy) DP-SGD steps.

    Example:
        >>> progress_line({"step": 6, "nonprivate_train_loss": 1.2, "test_accuracy": 0.5,
        ...                "test_examples": 300, "epsilon": 4.1}, 12, 30.0)
        'step 6/12: loss 1.2000, test acc 0.5000 (300 images), epsilon 4.100 [30 s]'
    """
    width = len(str(planned_steps))
    loss = row.get(TRAINING_METRICS["loss"])
    parts = [f"loss {loss:.4f}"] if loss is not None else []
    parts.append(f"test acc {row['test_accuracy']:.4f}" + (
        f", EMA {row['ema_test_accuracy']:.4f}" if "ema_test_accuracy" in row else "")
        + f" ({row['test_examples']} images)")
    parts.append(f"epsilon {row['epsilon']:.3f}")
    return (f"step {row['step']:>{width}}/{planned_steps}: {', '.join(parts)} "
            f"[{seconds:.0f} s]")


def write_metrics(rows: list[dict], run_dir: str) -> None:
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _load_data(config: dict):
    """(x, y, x_test, y_test): arrays, or for a "tfds:" dataset random-access sources
    (`data.TFDSSource`) with y = y_test = None."""
    d = config["data"]
    data_dir, size = d["data_dir"] or None, d["image_size"] or None
    if d["dataset"].startswith(data.random_access.TFDS_PREFIX):
        train_split = f"train[:{d['train_subset']}]" if d["train_subset"] else "train"
        source = data.open_dataset(d["dataset"], train_split, data_dir, image_size=size)
        test = data.open_dataset(d["dataset"], "test", data_dir, image_size=size)
        if d["test_subset"]:
            test = data.open_dataset(d["dataset"], f"{test.split}[:{d['test_subset']}]",
                                     data_dir, image_size=size)
        return source, None, test, None
    x, y = data.open_dataset(d["dataset"], "train", data_dir, image_size=size)
    x_test, y_test = data.open_dataset(d["dataset"], "test", data_dir, image_size=size)
    if d["train_subset"]:
        x, y = x[:d["train_subset"]], y[:d["train_subset"]]
    if d["test_subset"]:
        x_test, y_test = x_test[:d["test_subset"]], y_test[:d["test_subset"]]
    return x, y, x_test, y_test


def _image_shape(x) -> tuple[int, ...]:
    """The shape of one training image (arrays or a random-access source)."""
    return tuple(x.image_shape) if isinstance(x, data.TFDSSource) else tuple(x.shape[1:])


def _evaluation_input(x, y):
    """`model.evaluate` arguments: arrays as they are, a source as an in-order dataset."""
    if isinstance(x, data.TFDSSource):
        return x.dataset(1000), None
    return x, y


def plan(config: dict, dataset_size: int) -> dict:
    """Sampling rate, logical steps, epochs and the noise multiplier a config implies."""
    t, p = config["training"], config["privacy"]
    if t["batch_size"] > dataset_size:
        raise ValueError(f"training.batch_size={t['batch_size']} exceeds the {dataset_size} "
                         "training examples.")
    q = t["batch_size"] / dataset_size
    steps_per_epoch = math.ceil(dataset_size / t["batch_size"])
    steps = t["steps"] or math.ceil(t["epochs"] * steps_per_epoch)
    sigma = p["noise_multiplier"]
    if sigma == "auto":
        sigma = accounting.calibrate_noise_multiplier(
            p["target_epsilon"], q, steps, p["delta"], p["accountant"], p["sampling"],
            dataset_size)
    return {"sampling_rate": q, "steps": steps, "steps_per_epoch": steps_per_epoch,
            "epochs": math.ceil(steps / steps_per_epoch), "noise_multiplier": float(sigma)}


def pixel_scale(config: dict, source: keras.layers.Layer) -> float:
    """The factor from uint8 pixel values to what the backbone takes (``finetune.pixel_range``).

    ``"auto"``: [0, 1] (TF-Hub's image convention) for SavedModels and TF-Hub handles; raw
    0-255 values for Keras models (this library's models, like most Keras models, standardize
    inside).
    """
    rng = config["finetune"]["pixel_range"]
    if rng == "auto":
        rng = "0-1" if isinstance(source, finetune.SavedModelLayer) else "0-255"
    return 1 / 255.0 if rng == "0-1" else 1.0


def finetune_model(config: dict, image_shape: tuple[int, ...],
                   source: keras.layers.Layer | str | None = None) -> keras.Model:
    """The `DPScaleModel` images -> logits that ``config["finetune"]`` describes.

    `source` is the already loaded backbone (`finetune.load_source`), or None to load
    ``finetune.source``. Images of `image_shape` (the dataset's) are fitted to the backbone
    by `finetune.AdaptImages` inside the model (``image_size``, gray -> RGB, ``pixel_range``).
    """
    ft = config["finetune"]
    loaded = finetune.load_source(ft["source"]) if source is None else source
    return finetune.build(loaded, _dataset_constant(NUM_CLASSES, config["data"]["dataset"],
                                                    "NUM_CLASSES"), mode=ft["mode"],
                          classifier=ft["classifier"], feature_layer=ft["feature_layer"] or None,
                          image_shape=tuple(image_shape), image_size=ft["image_size"] or None,
                          pixel_scale=pixel_scale(config, loaded), name="finetune")


#: Keys that may differ when an interrupted run resumes: they cannot change what is trained
#: or what it spends (where the data lies, compilation, the description).
RESUME_NEUTRAL_KEYS = (("data", "data_dir"), ("training", "jit_compile"), ("run", "description"),
                       ("run", "training_metrics"))
#: Files a run writes that describe its model; removed when a directory starts over.
RUN_OUTPUTS = ("metrics.json", "metrics.csv", "privacy.json", "privacy.txt", "model.keras",
               "ema_model.keras", "summary.json", "audit.json")


def _config_differences(old: dict, new: dict) -> list[str]:
    return [f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {value!r}"
            for section, values in new.items() for key, value in values.items()
            if (section, key) not in RESUME_NEUTRAL_KEYS
            and old.get(section, {}).get(key) != value]


def check_run_dir(run_dir: str, config: dict) -> str:
    """Decides what ``train(config, run_dir)`` may do with ``run_dir``; raises otherwise.

    Returns "new" (absent or empty), "resume" (an interrupted run of the same config: its
    checkpoint is under ``backup/``) or "restart" (a run that stopped before its first
    checkpoint: its files are removed, so none describes another model). Refused: a directory
    that is not a run directory, a finished run (its files describe its model), and an
    interrupted run of another config (the resumed weights and the ledger would mix two
    settings); only the keys in `RESUME_NEUTRAL_KEYS` may differ on resume.

    Example:
        >>> check_run_dir("runs/new_dir", load_config("mnist_cpu"))
        'new'
    """
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return "new"
    config_path = os.path.join(run_dir, "config.toml")
    if not os.path.exists(config_path):
        raise ValueError(f"{run_dir} is not empty and is not a run directory (no config.toml): "
                         "choose a new --out directory.")
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        raise ValueError(f"{run_dir} holds a finished run; its files describe its model. Choose "
                         f"another --out directory, or delete {run_dir} to train it again.")
    if os.path.isdir(os.path.join(run_dir, "backup")):
        differences = _config_differences(load_config(config_path), config)
        if differences:
            raise ValueError(
                f"{run_dir} holds an interrupted run with other settings; resuming it would "
                "continue its weights and privacy ledger under new ones. Differences: "
                + "; ".join(differences) + ". Resume with the original settings, or choose "
                "another --out directory (or delete this one) to start over.")
        return "resume"
    for name in RUN_OUTPUTS + tuple(f for f in os.listdir(run_dir) if f.endswith(".png")):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    return "restart"


def save_release(model: keras.Model, path: str) -> None:
    """Saves the model to publish: architecture and weights, without the optimizer (its
    state holds noiseless clipped gradient sums and the noise key of future steps) and
    uncompiled. ``load_model`` gives a plain Keras model; compile it to evaluate.

    Example:
        >>> save_release(model, "runs/fmnist/model.keras")
    """
    keras.Model(model.inputs, model.outputs, name=model.name).save(path)


def train(config: dict, run_dir: str, verbose: int = 2) -> dict:
    """DP-trains ``config`` and fills ``run_dir``; returns the summary (also summary.json).

    With ``[finetune] source`` set, the model is the pretrained backbone plus a classifier
    (`finetune_model`). In ``classifier_only`` mode the backbone's features are computed once
    (cached in ``run_dir`` as ``features_train.npy`` / ``features_test.npy`` with
    ``features_key.json``; a re-run reuses them when source and data are unchanged) and DP-SGD
    trains the classifier on feature rows; ``model.keras`` is still the whole images -> logits
    model.

    Example:
        >>> summary = train(load_config("mnist_cpu", ["training.steps=10"]), "runs/smoke")
    """
    from dp_keras_scale import plots            # matplotlib is only needed here

    check_complete(config)
    start = time.time()
    ft, t = config["finetune"], config["training"]
    source = finetune.load_source(ft["source"]) if ft["source"] else None   # fail fast
    check_run_dir(run_dir, config)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.toml"), "w") as f:
        f.write(dumps(config))
    seed = None if t["seed"] == "random" else t["seed"]
    if config["privacy"]["deterministic_noise"]:
        print("WARNING: privacy.deterministic_noise = true: the noise is generated from "
              "training.seed, so this run has NO privacy guarantee (anyone who knows the seed "
              "can remove the noise). Use it for debugging only.", file=sys.stderr, flush=True)
    x, y, x_test, y_test = _load_data(config)
    if isinstance(x, data.TFDSSource) and ft["mode"] == "classifier_only" and source is not None:
        raise ValueError("finetune.mode = 'classifier_only' caches features of in-memory "
                         f"images; {config['data']['dataset']} is read from disk. Use "
                         "finetune.mode = 'all_layers'.")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = (finetune_model(config, _image_shape(x), source) if source is not None
             else build_model(config, _image_shape(x)))
    extra: dict[str, Any] = {}
    if source is not None:
        extra["finetune"] = {k: ft[k] for k in ("source", "mode", "classifier")}
    if ft["mode"] == "classifier_only" and source is not None:
        features, features_test, extra["features"] = cached_features(
            model, config, x, y, x_test, y_test, run_dir, verbose)
        trained = finetune.classifier_head(model)
        train_x, test_x = features, features_test
    else:
        trained, train_x, test_x = model, x, x_test

    schedule, statement = _dp_fit(trained, config, train_x, y, test_x, y_test, run_dir,
                                  verbose, seed)
    statement.save(os.path.join(run_dir, "privacy.json"))
    if trained is not model:
        # The whole images -> logits model, ready for evaluate(). Its only trainable weights
        # are the classifier's, which the head trained: it takes over the head's optimizer
        # (step counter, noise key, EMA), so the saved model carries them as usual.
        model.compile(optimizer=trained.optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=t["jit_compile"])
    save_release(model, os.path.join(run_dir, "model.keras"))
    p = config["privacy"]
    summary = {"name": config["run"]["name"], "dataset": config["data"]["dataset"],
               "train_examples": len(x), "test_examples": len(x_test),
               "steps": statement.steps, "noise_multiplier": statement.noise_multiplier,
               "sampling_rate": schedule["sampling_rate"], "epsilon": statement.epsilon,
               "delta": p["delta"], "test_accuracy": _accuracy(trained, test_x, y_test), **extra}
    if t["ema_decay"] > 0:
        with callbacks.averaged_weights(trained, "ema"):   # shares the classifier with model
            summary["ema_test_accuracy"] = _accuracy(trained, test_x, y_test)
            save_release(model, os.path.join(run_dir, "ema_model.keras"))
    summary["wall_time_s"] = round(time.time() - start, 1)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        plots.training_curves(json.load(f), run_dir)
    return summary


def _accuracy(model: keras.Model, x, y) -> float:
    x, y = _evaluation_input(x, y)
    return float(model.evaluate(x, y, batch_size=1000, verbose=0,
                                return_dict=True)["accuracy"])


def _dp_fit(model: keras.Model, config: dict, x, y, x_test, y_test, run_dir: str,
            verbose: int, seed: int | None):
    """The DP-SGD loop shared by every run: Poisson batches of rows of `x` (images or cached
    features), DPSGD, privacy budget, EMA, per-epoch test metrics, resumable checkpoints.

    Returns the schedule and the privacy statement of the steps taken.
    """
    t, p = config["training"], config["privacy"]
    n = len(x)
    schedule = plan(config, n)
    sampler = data.BatchSampler(n, t["batch_size"], sampling=p["sampling"],
                                microbatch_size=t["microbatch_size"], seed=seed)
    map_fn = (data.augmult_map(t["augmult"], pad=t["pad"], flip=t["flip"], seed=seed)
              if t["augmult"] else None)
    model.compile(
        optimizer=_optimizer(config, sampler, seed, schedule["noise_multiplier"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=t["jit_compile"])
    budget = callbacks.PrivacyBudget(
        delta=p["delta"], sampling_rate=schedule["sampling_rate"], dataset_size=n,
        target_epsilon=p["target_epsilon"], planned_steps=schedule["steps"],
        accountant=p["accountant"], sampling=p["sampling"], verbose=1 if verbose else 0)
    ema = t["ema_decay"] > 0
    fit_callbacks = [keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup"),
                                                      save_freq="epoch"), budget]
    if ema:
        fit_callbacks.append(callbacks.EMA(t["ema_decay"], use_for_validation=False))
    kept = config["run"]["training_metrics"]
    fit_callbacks.append(RunMetrics(x_test, y_test, run_dir, ema, budget, verbose, kept))
    if kept:     # TensorBoard logs Keras's training metrics too
        fit_callbacks += tensorboard_callbacks(run_dir)
    if verbose:
        rows = "feature rows" if getattr(x, "ndim", 4) == 2 else "examples"
        print(f"{config['run']['name']}: {n} {rows}, Poisson rate "
              f"{schedule['sampling_rate']:.5f}, {schedule['steps']} steps, noise multiplier "
              f"{schedule['noise_multiplier']:.4g}, target epsilon {p['target_epsilon']:g} at "
              f"delta {p['delta']:g}", flush=True)
    model.fit(sampler.dataset(x, y, map_fn=map_fn), epochs=schedule["epochs"],
              steps_per_epoch=schedule["steps_per_epoch"] * sampler.accumulation_steps,
              callbacks=fit_callbacks, verbose=0, shuffle=False)   # progress: RunMetrics
    statement = budget.statement(p["l2_norm_clip"], augmult=max(1, t["augmult"]))
    return schedule, statement


def _optimizer(config: dict, sampler, seed, noise_multiplier: float) -> DPSGD:
    """The run's DPSGD. ``training.seed`` never seeds the noise (whoever read it from
    config.toml could regenerate every draw) unless ``privacy.deterministic_noise`` opts in."""
    t, p = config["training"], config["privacy"]
    if p["deterministic_noise"] and seed is None:
        raise ValueError("privacy.deterministic_noise = true needs an integer training.seed to "
                         "generate the noise from.")
    return DPSGD(learning_rate=t["learning_rate"], momentum=t["momentum"],
                 l2_norm_clip=p["l2_norm_clip"], noise_multiplier=noise_multiplier,
                 rescale_to_unit_norm=p["rescale_to_unit_norm"],
                 gradient_accumulation_steps=sampler.accumulation_steps,
                 expected_batch_size=sampler.expected_batch_size,
                 noise_seed=seed if p["deterministic_noise"] else None)
