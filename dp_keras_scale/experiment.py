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

This module orchestrates; the pieces live in modules of one concern each (their public names
stay importable from here): `dp_keras_scale.registry` (the model a config names, dataset
constants), `dp_keras_scale.run_data` (the config's data), `dp_keras_scale.run_metrics`
(`RunMetrics` and the metrics files) and `dp_keras_scale.runs` (the run directory's rules,
the release model, and loading, evaluating and auditing a finished run).

Example:
    >>> summary = train(load_config("fashion_mnist_cpu"), "runs/fmnist")
    >>> summary["test_accuracy"], summary["epsilon"]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import keras

from dp_keras_scale import accounting, callbacks, data, finetune
from dp_keras_scale.config import check_complete, load_config  # noqa: F401 (docstring examples)
# The pieces of a run live in modules of their own; their names stay importable from here.
from dp_keras_scale.finetune.cache import (FEATURE_FILES, FEATURE_KEY,  # noqa: F401
                                           cached_features, source_fingerprint)
from dp_keras_scale.optimizers import DPSGD
from dp_keras_scale.registry import (NUM_CLASSES, PIXEL_MEAN_STD, build_model,  # noqa: F401
                                     finetune_model, pixel_scale)
from dp_keras_scale.run_data import image_shape, load_data
from dp_keras_scale.run_metrics import (EVALUATION_POINTS,  # noqa: F401
                                        INTERMEDIATE_TEST_EXAMPLES, TRAINING_METRICS, RunMetrics,
                                        evaluation_steps, progress_line, tensorboard_callbacks,
                                        write_metrics)
from dp_keras_scale.runs import (RESUME_NEUTRAL_KEYS, RUN_OUTPUTS, check_run_dir,  # noqa: F401
                                 prepare_run_dir, save_release)

__all__ = ["build_model", "finetune_model", "plan", "train"]


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
    prepare_run_dir(run_dir, config)
    seed = None if t["seed"] == "random" else t["seed"]
    if config["privacy"]["deterministic_noise"]:
        print("WARNING: privacy.deterministic_noise = true: the noise is generated from "
              "training.seed, so this run has NO privacy guarantee (anyone who knows the seed "
              "can remove the noise). Use it for debugging only.", file=sys.stderr, flush=True)
    x, y, x_test, y_test = load_data(config)
    if isinstance(x, data.TFDSSource) and ft["mode"] == "classifier_only" and source is not None:
        raise ValueError("finetune.mode = 'classifier_only' caches features of in-memory "
                         f"images; {config['data']['dataset']} is read from disk. Use "
                         "finetune.mode = 'all_layers'.")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = (finetune_model(config, image_shape(x), source) if source is not None
             else build_model(config, image_shape(x)))
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

    schedule, statement, last = _dp_fit(trained, config, train_x, y, test_x, y_test, run_dir,
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
               "delta": p["delta"], "test_accuracy": last["test_accuracy"], **extra}
    if t["ema_decay"] > 0:
        summary["ema_test_accuracy"] = last["ema_test_accuracy"]
        with callbacks.averaged_weights(trained, "ema"):   # shares the classifier with model
            save_release(model, os.path.join(run_dir, "ema_model.keras"))
    summary["wall_time_s"] = round(time.time() - start, 1)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        plots.training_curves(json.load(f), run_dir)
    return summary


def _dp_fit(model: keras.Model, config: dict, x, y, x_test, y_test, run_dir: str,
            verbose: int, seed: int | None):
    """The DP-SGD loop shared by every run: Poisson batches of rows of `x` (images or cached
    features), DPSGD, privacy budget, EMA, per-epoch test metrics, resumable checkpoints.

    Returns the schedule, the privacy statement of the steps taken and the last row of the
    run's metrics (final and EMA accuracy on the whole test set).
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
    model.clipping_method = t["clipping_method"]
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
    metrics = RunMetrics(x_test, y_test, run_dir, ema, budget, verbose, kept)
    fit_callbacks.append(metrics)
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
              callbacks=fit_callbacks, verbose=0)   # progress: RunMetrics
    statement = budget.statement(p["l2_norm_clip"], augmult=max(1, t["augmult"]))
    return schedule, statement, metrics.rows[-1]


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
