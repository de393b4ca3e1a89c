"""A run directory: what training may do with one, and what is done with a finished run.

`dp_keras_scale.experiment.train` fills a run directory: ``config.toml`` (resolved),
``metrics.csv`` / ``metrics.json``, ``privacy.txt`` / ``privacy.json``, ``model.keras`` (and
``ema_model.keras``), ``summary.json`` and PNG plots. This module holds its rules, shared by
`train` and the ``dp-keras-scale`` command:

- before training, `check_run_dir` / `prepare_run_dir` decide whether a directory may be
  (re)used: a new one, an interrupted run of the same config (resumed) or one that stopped
  before its first checkpoint (restarted); anything else is refused;
- `save_release` writes the model to publish (no optimizer state);
- after training, `load_run` reads a finished run back (config, release model compiled for
  evaluation, data), `evaluate_run` measures it on the test set and `audit_run` runs the
  loss-threshold membership inference on it (``audit.json``, ``audit_roc.png``).

Importing this module does not import TensorFlow (the command's light subcommands read its
constants); the functions that need Keras or the data import them when called.

Example:
    >>> check_run_dir("runs/new_dir", load_config("mnist_cpu"))
    'new'
    >>> evaluate_run("runs/fmnist")["accuracy"]
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple

from dp_keras_scale import _quiet
from dp_keras_scale.config import ConfigError, dumps, load_config

__all__ = ["MIN_FALSE_POSITIVES", "RESUME_NEUTRAL_KEYS", "RUN_FILES", "RUN_OUTPUTS", "Run",
           "audit_run", "check_run_dir", "evaluate_run", "load_run", "prepare_run_dir",
           "read_summary", "release_path", "require_run_dir", "save_release", "supported_fprs"]

#: What marks a finished run directory.
RUN_FILES = ("config.toml", "summary.json", "model.keras")
#: Keys that may differ when an interrupted run resumes: they cannot change what is trained
#: or what it spends (where the data lies, compilation, the description).
RESUME_NEUTRAL_KEYS = (("data", "data_dir"), ("training", "jit_compile"),
                       ("training", "clipping_method"), ("run", "description"),
                       ("run", "training_metrics"))
#: Files a run writes that describe its model; removed when a directory starts over.
RUN_OUTPUTS = ("metrics.json", "metrics.csv", "privacy.json", "privacy.txt", "model.keras",
               "ema_model.keras", "summary.json", "audit.json")
#: TPR at FPR f is reported only if at least this many false positives are possible (n * f):
#: with fewer non-members the rate is not measured, only guessed from a handful of examples.
MIN_FALSE_POSITIVES = 10


# --------------------------------------------------------------------------- before training


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


def prepare_run_dir(run_dir: str, config: dict) -> str:
    """`check_run_dir`, then creates ``run_dir`` and writes the resolved ``config.toml``.

    Returns:
        What `check_run_dir` decided: "new", "resume" or "restart".
    """
    state = check_run_dir(run_dir, config)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.toml"), "w") as f:
        f.write(dumps(config))
    return state


def save_release(model, path: str) -> None:
    """Saves the model to publish: architecture and weights, without the optimizer (its
    state holds noiseless clipped gradient sums and the noise key of future steps) and
    uncompiled. ``load_model`` gives a plain Keras model; compile it to evaluate.

    Example:
        >>> save_release(model, "runs/fmnist/model.keras")
    """
    import keras

    keras.Model(model.inputs, model.outputs, name=model.name).save(path)


# --------------------------------------------------------------------------- a finished run


class Run(NamedTuple):
    """A finished run read back by `load_run`: its config, its release model (compiled for
    evaluation) and its data (arrays, or `dp_keras_scale.data.TFDSSource` with y None)."""

    config: dict
    model: Any
    x: Any
    y: Any
    x_test: Any
    y_test: Any


def require_run_dir(run_dir: str) -> None:
    """Raises FileNotFoundError unless ``run_dir`` is a directory holding ``config.toml``."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a directory; give a run directory written "
                                "by `dp-keras-scale train --out DIR`.")
    if not os.path.exists(os.path.join(run_dir, "config.toml")):
        raise FileNotFoundError(f"{run_dir} is not a run directory (it has no config.toml); "
                                "give the --out directory of `dp-keras-scale train`.")


def release_path(run_dir: str, weights: str = "final") -> str:
    """The path of the run's released model: ``model.keras`` ("final") or ``ema_model.keras``
    ("ema"); raises FileNotFoundError, saying why, when it does not exist."""
    path = os.path.join(run_dir, "ema_model.keras" if weights == "ema" else "model.keras")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist" + (
            " (the run kept no EMA: training.ema_decay was 0)" if weights == "ema" else
            " (the run has not finished: resume it with the same `dp-keras-scale train` "
            "command)"))
    return path


def read_summary(run_dir: str) -> dict:
    """The run's ``summary.json``; FileNotFoundError if the run has not finished."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} has no summary.json: the run has not "
                                "finished (resume it with the same `dp-keras-scale train` "
                                "command).")
    with open(path) as f:
        return json.load(f)


def load_run(run_dir: str, weights: str = "final", quiet_import: bool = False) -> Run:
    """Reads a finished run back: config, release model and data.

    Args:
        run_dir: a run directory written by `dp_keras_scale.experiment.train`.
        weights: "final" (``model.keras``) or "ema" (``ema_model.keras``).
        quiet_import: import TensorFlow without its start-up lines on stderr (the command
            line's default; `dp_keras_scale._quiet`).

    Returns:
        A `Run`; its model is compiled with the training loss and an "accuracy" metric.

    Example:
        >>> run = load_run("runs/fmnist", "ema")
        >>> run.model.evaluate(run.x_test, run.y_test, return_dict=True)
    """
    require_run_dir(run_dir)
    config = load_config(os.path.join(run_dir, "config.toml"))
    path = release_path(run_dir, weights)
    with _quiet.importing(verbose=not quiet_import):
        import keras

        from dp_keras_scale import finetune, run_data
    # A fine-tuned model may reload its SavedModel / TF-Hub backbone: only the one its own
    # config names is trusted (Keras safe mode still refuses anything else).
    source = config["finetune"]["source"]
    with finetune.trusted_sources(*([source] if source else [])):
        model = keras.models.load_model(path)
    if not model.compiled:      # a run directory holds the uncompiled release model
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    return Run(config, model, *run_data.load_data(config))


def evaluate_run(run_dir: str, weights: str = "final", quiet_import: bool = False) -> dict:
    """Loss and accuracy of a finished run's model on its test set (no privacy spent).

    Returns:
        ``{"run_dir", "weights", "test_examples", "loss", "accuracy"}``.

    Example:
        >>> evaluate_run("runs/fmnist", "ema")["accuracy"]
    """
    run = load_run(run_dir, weights, quiet_import)        # imports TensorFlow (quietly)
    from dp_keras_scale.run_data import EVALUATION_BATCH, evaluation_input

    x_test, y_test = evaluation_input(run.x_test, run.y_test)
    result = run.model.evaluate(x_test, y_test, batch_size=EVALUATION_BATCH, verbose=0,
                                return_dict=True)
    return {"run_dir": run_dir, "weights": weights, "test_examples": len(run.x_test), **result}


def supported_fprs(fprs, non_members: int) -> tuple[list[float], list[float]]:
    """Splits false-positive rates into (measurable, not measurable) with `non_members`.

    Example:
        >>> supported_fprs([0.001, 0.01], 500)
        ([], [0.001, 0.01])
    """
    fprs = sorted(fprs)
    good = [f for f in fprs if non_members * f >= MIN_FALSE_POSITIVES]
    return good, [f for f in fprs if f not in good]


def audit_run(run_dir: str, weights: str = "final", examples: int = 5000,
              quiet_import: bool = False) -> dict:
    """Loss-threshold membership inference on a finished run's model.

    The first `examples` training examples of the run (members) against as many test
    examples (non-members); fewer when the run has fewer. TPR at a false-positive rate f is
    reported only with at least ``MIN_FALSE_POSITIVES / f`` non-members (`supported_fprs`).
    Writes ``audit.json`` (the returned report) and ``audit_roc.png`` into ``run_dir``. An
    attack's success is empirical evidence, not a privacy guarantee.

    Returns:
        The report: members, non-members, AUC, TPR at the measurable FPRs, the accounted
        epsilon and delta, and the FPRs not measured with why.

    Example:
        >>> audit_run("runs/fmnist", examples=1000)["auc"]
    """
    if examples < 1:
        raise ConfigError(f"--examples must be at least 1, got {examples}.")
    require_run_dir(run_dir)
    summary = read_summary(run_dir)
    run = load_run(run_dir, weights, quiet_import)        # imports TensorFlow (quietly)
    from dp_keras_scale import audit
    from dp_keras_scale.run_data import first_examples

    n = min(examples, len(run.x), len(run.x_test))
    good, dropped = supported_fprs(audit.FPR_TARGETS, n)
    result = audit.membership_inference(run.model, first_examples(run.x, run.y, n),
                                        first_examples(run.x_test, run.y_test, n),
                                        fpr_targets=good)
    report = {"run_dir": run_dir, "weights": weights, "attack": "loss",
              "members": n, "non_members": n, "auc": result.auc,
              "tpr_at_fpr": {str(k): v for k, v in result.tpr_at_fpr.items()},
              "accounted_epsilon": summary["epsilon"], "delta": summary["delta"]}
    if dropped:
        report["not_measured"] = {
            str(f): f"TPR at FPR {f:g} needs at least {math.ceil(MIN_FALSE_POSITIVES / f)} "
                    f"non-members ({MIN_FALSE_POSITIVES} possible false positives); "
                    f"this audit used {n} (--examples)" for f in dropped}
    with open(os.path.join(run_dir, "audit.json"), "w") as f:
        json.dump(report, f, indent=1)
    audit.plot_roc({"loss attack": result}, os.path.join(run_dir, "audit_roc.png"))
    return report
