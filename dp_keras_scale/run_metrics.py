"""A run's metrics files: test accuracy and epsilon at about 20 logical steps, from step 0.

`RunMetrics` (a Keras callback) evaluates the model at the steps of `evaluation_steps`, reads
epsilon from the run's `PrivacyBudget` and writes one row per point to ``metrics.csv`` /
``metrics.json`` (`write_metrics`), printing a `progress_line` when asked. The training-time
metrics (computed on the private batches without noise, so not covered by the privacy
statement) are written under the labelled names of `TRAINING_METRICS` (``nonprivate_...``), or
left out. `tensorboard_callbacks` adds TensorBoard when it is installed.

Example:
    >>> evaluation_steps(12)
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any

import keras

from dp_keras_scale import callbacks, data
from dp_keras_scale.run_data import EVALUATION_BATCH, evaluation_input

__all__ = ["EVALUATION_POINTS", "INTERMEDIATE_TEST_EXAMPLES", "TRAINING_METRICS", "RunMetrics",
           "evaluation_steps", "progress_line", "tensorboard_callbacks", "write_metrics"]

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
        inputs, labels = evaluation_input(x, y)
        result = self.model.evaluate(inputs, labels, batch_size=EVALUATION_BATCH,
                                     verbose=0, return_dict=True)
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
    """Writes the rows to ``run_dir/metrics.json`` and ``run_dir/metrics.csv`` (one column per
    key that any row has, in order of first appearance)."""
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
