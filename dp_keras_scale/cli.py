"""The ``dp-keras-scale`` command: train, evaluate, epsilon, report, audit, configs.

    dp-keras-scale train --config fashion_mnist_cpu --out runs/fmnist
    dp-keras-scale train --config cifar10_wrn16_4_eps8 --set training.steps=100
    dp-keras-scale evaluate runs/fmnist
    dp-keras-scale epsilon --noise-multiplier 10 --batch-size 4096 --dataset-size 50000 \\
        --steps 875 --delta 1e-5
    dp-keras-scale epsilon --target-epsilon 8 --batch-size 4096 --dataset-size 50000 \\
        --epochs 100 --delta 1e-5
    dp-keras-scale report runs/* --out runs/report.png
    dp-keras-scale audit runs/fmnist

Every command takes --verbose (TensorFlow's own log lines, hidden otherwise). --help, configs
and epsilon never import TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

from dp_keras_scale import _quiet, runs
from dp_keras_scale.options import ACCOUNTANTS, SAMPLINGS
from dp_keras_scale.config import (ConfigError, bundled_configs, check_complete, describe,
                                   load_config)
# Run-directory names the command has always offered (runs.py imports no TensorFlow).
from dp_keras_scale.runs import MIN_FALSE_POSITIVES, RUN_FILES, supported_fprs  # noqa: F401

TRAIN_HELP = """Trains a config with DP-SGD and writes a run directory: config.toml (resolved),
metrics.csv/json per epoch (loss, test accuracy, EMA test accuracy, epsilon), privacy.txt/json
(the privacy statement), model.keras (+ ema_model.keras), summary.json and PNG plots.
Re-running with the same --out resumes an interrupted run.

Configs are TOML files with sections [run] [data] [model] [privacy] [training] [finetune];
a bundled name (see `dp-keras-scale configs`) or a path. Override any key with
--set section.key=value, e.g. --set training.epochs=4 --set privacy.target_epsilon=8. With
privacy.noise_multiplier = "auto" the noise is calibrated by the accountant so the planned
steps spend exactly privacy.target_epsilon.

Fine-tuning: --set finetune.source=PATH_OR_TFHUB_HANDLE (a .keras/.h5 file, a SavedModel
directory or a TF-Hub handle; [model] is then ignored), finetune.mode=all_layers or
classifier_only (frozen backbone, features computed once and cached in the run directory),
finetune.classifier=reset|keep|add, finetune.image_size=N (resize to NxN inside the model)."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's own log lines (hidden by default)")
    parser = argparse.ArgumentParser(
        prog="dp-keras-scale", description="Differentially private image classification "
        "(DP-SGD, De et al. 2022) with Keras 3.", epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str | None = None, **kwargs):
        return commands.add_parser(name, help=summary, description=description or summary,
                                   parents=[common], **kwargs)

    train = command("train", "DP-train a config into a run directory", TRAIN_HELP,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", required=True, help="bundled config name or .toml path")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable)")
    train.add_argument("--out", help="run directory (default: runs/<config name>)")
    train.add_argument("--quiet", action="store_true", help="no progress lines")
    train.add_argument("--no-training-metrics", action="store_true",
                       help="leave the training loss/accuracy/clipped fraction (computed on the "
                       "private batches without noise, not covered by the guarantee) out of the "
                       "run directory (same as --set run.training_metrics=false)")

    evaluate = command(
        "evaluate", "test accuracy of a run's saved model",
        "Loads a finished run's model.keras (or ema_model.keras) and prints its loss and "
        "accuracy on the run's test set as JSON. Evaluation uses only the test data, so it "
        "spends no privacy budget.")
    evaluate.add_argument("run_dir", help="a run directory written by `dp-keras-scale train`")
    evaluate.add_argument("--weights", choices=["final", "ema"], default="final",
                          help="the trained weights or their EMA (if the run kept one)")

    eps = command(
        "epsilon", "privacy accounting from the command line",
        "Epsilon of a DP-SGD schedule; with --target-epsilon, the noise multiplier "
        "that reaches it (or, given --noise-multiplier too, the number of steps that fit).")
    eps.add_argument("--noise-multiplier", type=float)
    eps.add_argument("--target-epsilon", type=float)
    eps.add_argument("--sampling-rate", type=float, help="q (or give --batch-size and "
                     "--dataset-size)")
    eps.add_argument("--batch-size", type=float, help="expected batch size")
    eps.add_argument("--dataset-size", type=int)
    eps.add_argument("--steps", type=int)
    eps.add_argument("--epochs", type=float, help="instead of --steps (needs --dataset-size)")
    eps.add_argument("--delta", type=float, required=True)
    eps.add_argument("--clip", type=float, default=1.0, help="l2 clip norm (for the statement)")
    eps.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
    eps.add_argument("--sampling", choices=SAMPLINGS, default="poisson")

    report = command(
        "report", "compare runs: table + accuracy-vs-epsilon PNG",
        "A Markdown table of finished runs (epsilon, delta, steps, test accuracy of the final "
        "and of the EMA weights) and a PNG of test accuracy against epsilon.")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", default="report.png", help="PNG path")

    audit = command(
        "audit", "membership inference on a run's model (training vs test examples)",
        "Loss-threshold membership inference: training examples of the run "
        "(members) against as many test examples (non-members). Writes audit.json and "
        "audit_roc.png into the run directory. An attack's success is empirical evidence, "
        "not a privacy guarantee; for an epsilon lower bound use dks.audit.canary_audit. "
        f"TPR at a false-positive rate f is reported only with at least {MIN_FALSE_POSITIVES}/f "
        "non-members (fewer cannot measure it).")
    audit.add_argument("run_dir", help="a run directory written by `dp-keras-scale train`")
    audit.add_argument("--weights", choices=["final", "ema"], default="final")
    audit.add_argument("--examples", type=int, default=5000,
                       help="members and non-members used (each)")

    command("configs", "list the bundled configs",
            "The bundled configs, each with its one-line description. Use a name with "
            "`dp-keras-scale train --config NAME`; the files are in dp_keras_scale/configs/.")
    return parser


def _train(args) -> None:
    overrides = args.set + (["run.training_metrics=false"] if args.no_training_metrics else [])
    config = load_config(args.config, overrides)
    check_complete(config)             # before any data or model is loaded: a fast, clear error
    out = args.out or os.path.join("runs", config["run"]["name"])
    if not args.quiet:
        print(f"{config['run']['name']}: training into {out} (loading TensorFlow and "
              f"{config['data']['dataset']})", flush=True)
    with _quiet.importing(args.verbose):
        from dp_keras_scale import experiment
    existed = os.path.isdir(out)
    try:
        summary = experiment.train(config, out, verbose=0 if args.quiet else 2)
    except BaseException:   # (DPScaleModel.fit collects Keras's epoch iterator itself)
        _remove_if_only_config(out, existed)
        raise
    print(f"\n{open(os.path.join(out, 'privacy.txt')).read()}")
    ema = (f", EMA weights {summary['ema_test_accuracy']:.4f}"
           if "ema_test_accuracy" in summary else "")
    print(f"Test accuracy: {summary['test_accuracy']:.4f}{ema} on {summary['test_examples']} "
          f"{summary['dataset']} test images; privacy spent: (eps={summary['epsilon']:.3f}, "
          f"delta={summary['delta']:g}); {summary['wall_time_s']:.0f} s. Run directory: {out}")


def _remove_if_only_config(out: str, existed: bool) -> None:
    """After a failed run: removes a directory this command created that holds nothing but
    config.toml (a run that got further keeps its files: it can be resumed)."""
    if not existed and os.path.isdir(out) and set(os.listdir(out)) <= {"config.toml"}:
        shutil.rmtree(out)


def _evaluate(args) -> None:
    result = runs.evaluate_run(args.run_dir, args.weights, quiet_import=not args.verbose)
    print(json.dumps(result, indent=1))


def _epsilon(args) -> None:
    from dp_keras_scale import accounting
    q = args.sampling_rate
    if q is None:
        if args.batch_size is None or args.dataset_size is None:
            raise ConfigError("Give --sampling-rate, or --batch-size and --dataset-size.")
        q = args.batch_size / args.dataset_size
    steps = args.steps
    if steps is None and args.epochs is not None:
        if args.dataset_size is None:
            raise ConfigError("--epochs needs --dataset-size (or give --steps).")
        steps = math.ceil(args.epochs / q)
    common = dict(delta=args.delta, accountant=args.accountant, sampling=args.sampling,
                  dataset_size=args.dataset_size)
    sigma = args.noise_multiplier
    if args.target_epsilon is not None and sigma is not None and steps is None:
        steps = accounting.calibrate_steps(args.target_epsilon, sigma, q, **common)
        print(f"At most {steps} steps fit in epsilon={args.target_epsilon:g}.")
    elif args.target_epsilon is not None:
        if steps is None:
            raise ConfigError("--target-epsilon needs --steps or --epochs (to calibrate the "
                              "noise multiplier), or --noise-multiplier (to find the steps).")
        if sigma is not None:
            raise ConfigError("Give at most two of --target-epsilon, --noise-multiplier and "
                              "--steps/--epochs: the third is computed.")
        sigma = accounting.calibrate_noise_multiplier(args.target_epsilon, q, steps, **common)
        print(f"Noise multiplier for epsilon={args.target_epsilon:g}: {sigma:.4f}")
    if sigma is None or steps is None:
        raise ConfigError("Give --noise-multiplier and --steps (or --epochs), or a "
                          "--target-epsilon with one of them.")
    print(accounting.privacy_statement(sigma, q, steps, args.delta, args.clip,
                                       dataset_size=args.dataset_size, sampling=args.sampling,
                                       accountant=args.accountant))


def _report(args) -> None:
    from dp_keras_scale import plots
    summaries = []
    for run_dir in args.run_dirs:
        path = os.path.join(run_dir, "summary.json")
        if not os.path.exists(path):
            print(f"skipping {run_dir}: no summary.json (unfinished run?)", file=sys.stderr)
            continue
        with open(path) as f:
            summaries.append({**json.load(f), "run_dir": run_dir})
    if not summaries:
        raise ConfigError("No finished runs among the given directories.")
    print("| run | dataset | epsilon | delta | steps | test acc | EMA test acc | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for s in sorted(summaries, key=lambda s: (s["dataset"], s["epsilon"])):
        ema = s.get("ema_test_accuracy")
        print(f"| {s['run_dir']} | {s['dataset']} | {s['epsilon']:.3f} | {s['delta']:g} | "
              f"{s['steps']} | {s['test_accuracy']:.4f} | "
              f"{'-' if ema is None else f'{ema:.4f}'} | {s['wall_time_s']:.0f} |")
    print(f"plot: {plots.accuracy_vs_epsilon(summaries, args.out)}")


def _audit(args) -> None:
    report = runs.audit_run(args.run_dir, args.weights, args.examples,
                            quiet_import=not args.verbose)
    print(json.dumps(report, indent=1))


def _configs(args) -> None:
    names = bundled_configs()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {describe(name)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dp-keras-scale`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    _quiet.configure(args.verbose)
    try:
        {"train": _train, "evaluate": _evaluate, "epsilon": _epsilon, "report": _report,
         "audit": _audit, "configs": _configs}[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"dp-keras-scale {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
