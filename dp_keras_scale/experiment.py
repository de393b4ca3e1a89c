"""Run a config end to end: data, sampler, model, DP-SGD, averaging, budget, and a run directory.

A run directory holds ``config.toml`` (resolved), ``metrics.csv`` / ``metrics.json`` (one row
per epoch: step, loss, test accuracy, EMA test accuracy, epsilon), ``privacy.txt`` /
``privacy.json`` (the privacy statement), ``model.keras`` (and ``ema_model.keras``),
``summary.json`` and PNG plots. Re-running the same command with the same directory resumes
an interrupted run (`keras.callbacks.BackupAndRestore` under ``backup/``).

Example:
    >>> summary = train(load_config("fashion_mnist_cpu"), "runs/fmnist")
    >>> summary["test_accuracy"], summary["epsilon"]
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any

import keras
import numpy as np

from dp_keras_scale import accounting, callbacks, data, models
from dp_keras_scale.config import dumps
from dp_keras_scale.model import DPScaleModel
from dp_keras_scale.optimizers import DPSGD

# Published per-dataset pixel statistics (public constants; nothing is computed on private data).
PIXEL_MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530),
                  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def _standardized_input(input_shape, dataset: str):
    """uint8 images -> standardized floats, as the first layers of a model."""
    mean, std = PIXEL_MEAN_STD[dataset]
    inputs = keras.Input(input_shape, name="images")
    scaled = keras.layers.Rescaling(1 / 255.0)(inputs)
    return inputs, keras.layers.Normalization(mean=mean, variance=np.square(std),
                                              name="standardize")(scaled)


def build_model(config: dict, input_shape: tuple[int, ...]) -> keras.Model:
    """The `DPScaleModel` named by ``config["model"]`` for uint8 images of ``input_shape``."""
    m, dataset = config["model"], config["data"]["dataset"]
    classes = NUM_CLASSES[dataset]
    if m["architecture"] == "small_cnn":
        mean, std = PIXEL_MEAN_STD[dataset]
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


class EpochMetrics(keras.callbacks.Callback):
    """Evaluates on the test set every epoch (training and EMA weights) and writes metrics.

    It runs after `PrivacyBudget` (which writes ``logs["epsilon"]``) and appends a row to
    ``metrics.csv`` / ``metrics.json`` in ``run_dir``.
    """

    def __init__(self, x_test, y_test, run_dir: str, ema: bool, budget):
        super().__init__()
        self.x_test, self.y_test, self.run_dir, self.ema, self.budget = \
            x_test, y_test, run_dir, ema, budget
        self.rows: list[dict[str, Any]] = []
        path = os.path.join(run_dir, "metrics.json")
        if os.path.exists(path):             # a resumed run keeps the earlier rows
            with open(path) as f:
                self.rows = json.load(f)

    def _accuracy(self) -> float:
        result = self.model.evaluate(self.x_test, self.y_test, batch_size=1000, verbose=0,
                                     return_dict=True)
        return float(result["accuracy"])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        row = {"epoch": epoch + 1, "step": int(self.model.optimizer.iterations),
               "loss": float(logs.get("loss", math.nan)),
               "accuracy": float(logs.get("accuracy", math.nan)),
               "test_accuracy": self._accuracy(),
               "epsilon": float(self.budget.epsilon_now)}
        if self.ema:
            with callbacks.averaged_weights(self.model, "ema"):
                row["ema_test_accuracy"] = self._accuracy()
        logs.update({k: v for k, v in row.items() if k.startswith(("test", "ema"))})
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        write_metrics(self.rows, self.run_dir)


def write_metrics(rows: list[dict], run_dir: str) -> None:
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _load_data(config: dict):
    d = config["data"]
    data_dir = d["data_dir"] or None
    x, y = data.load(d["dataset"], "train", data_dir=data_dir)
    x_test, y_test = data.load(d["dataset"], "test", data_dir=data_dir)
    if d["train_subset"]:
        x, y = x[:d["train_subset"]], y[:d["train_subset"]]
    if d["test_subset"]:
        x_test, y_test = x_test[:d["test_subset"]], y_test[:d["test_subset"]]
    return x, y, x_test, y_test


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


def train(config: dict, run_dir: str, verbose: int = 2) -> dict:
    """DP-trains ``config`` and fills ``run_dir``; returns the summary (also summary.json).

    Example:
        >>> summary = train(load_config("mnist_cpu", ["training.steps=10"]), "runs/smoke")
    """
    from dp_keras_scale import plots            # matplotlib is only needed here

    start = time.time()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.toml"), "w") as f:
        f.write(dumps(config))
    t, p = config["training"], config["privacy"]
    seed = None if t["seed"] == "random" else t["seed"]
    x, y, x_test, y_test = _load_data(config)
    n = len(x)
    schedule = plan(config, n)
    sampler = data.BatchSampler(n, t["batch_size"], sampling=p["sampling"],
                                microbatch_size=t["microbatch_size"], seed=seed)
    map_fn = (data.augmult_map(t["augmult"], pad=t["pad"], flip=t["flip"], seed=seed)
              if t["augmult"] else None)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = build_model(config, x.shape[1:])
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
    fit_callbacks.append(EpochMetrics(x_test, y_test, run_dir, ema, budget))
    if verbose:
        print(f"{config['run']['name']}: {n} examples, Poisson rate {schedule['sampling_rate']:.5f}, "
              f"{schedule['steps']} steps, noise multiplier {schedule['noise_multiplier']:.4g}, "
              f"target epsilon {p['target_epsilon']:g} at delta {p['delta']:g}")
    model.fit(sampler.dataset(x, y, map_fn=map_fn), epochs=schedule["epochs"],
              steps_per_epoch=schedule["steps_per_epoch"] * sampler.accumulation_steps,
              callbacks=fit_callbacks, verbose=verbose)

    steps = int(model.optimizer.iterations)
    sigma = model.optimizer.noise_multiplier
    statement = accounting.privacy_statement(
        sigma, schedule["sampling_rate"], steps, p["delta"], p["l2_norm_clip"],
        dataset_size=n, sampling=p["sampling"], augmult=max(1, t["augmult"]),
        accountant=p["accountant"])
    statement.save(os.path.join(run_dir, "privacy.json"))
    model.save(os.path.join(run_dir, "model.keras"))
    summary = {"name": config["run"]["name"], "dataset": config["data"]["dataset"],
               "train_examples": n, "test_examples": len(x_test), "steps": steps,
               "noise_multiplier": sigma, "sampling_rate": schedule["sampling_rate"],
               "epsilon": statement.epsilon, "delta": p["delta"],
               "test_accuracy": float(model.evaluate(x_test, y_test, batch_size=1000,
                                                     verbose=0, return_dict=True)["accuracy"])}
    if ema:
        with callbacks.averaged_weights(model, "ema"):
            summary["ema_test_accuracy"] = float(model.evaluate(
                x_test, y_test, batch_size=1000, verbose=0, return_dict=True)["accuracy"])
            model.save(os.path.join(run_dir, "ema_model.keras"))
    summary["wall_time_s"] = round(time.time() - start, 1)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        plots.training_curves(json.load(f), run_dir)
    return summary


def _optimizer(config: dict, sampler, seed, noise_multiplier: float) -> DPSGD:
    t, p = config["training"], config["privacy"]
    return DPSGD(learning_rate=t["learning_rate"], momentum=t["momentum"],
                 l2_norm_clip=p["l2_norm_clip"], noise_multiplier=noise_multiplier,
                 rescale_to_unit_norm=p["rescale_to_unit_norm"],
                 gradient_accumulation_steps=sampler.accumulation_steps,
                 expected_batch_size=sampler.expected_batch_size, noise_seed=seed)
