"""The paper's ablation on real data: add one trick per row at a fixed (eps, delta).

    python benchmarks/ablation.py                       # Fashion-MNIST, (3, 1e-5), 2 epochs per row
    python benchmarks/ablation.py --epochs 1 --train-subset 5000     # quick check

Rows (each adds one change to the previous row, like De et al. 2022, Table 1):
baseline without normalization -> + GroupNorm -> + larger batch (same epochs, so same
compute and fewer, less noisy steps) -> + weight standardization -> + augmentation
multiplicity (K copies: K times the compute, as in the paper) -> + parameter EMA.
The EMA row is not a new training run: EMA is post-processing of the weights, so it is the
augmult row's own run evaluated with its averaged weights (same trajectory, same privacy cost).
Noise is calibrated per row for the same (eps, delta). Writes
benchmarks/results/ablation.{md,json,png}; each row's run directory is under
benchmarks/results/ablation/.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dp_keras_scale import config as cfg  # noqa: E402
from dp_keras_scale import experiment  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

ROWS = [
    ("baseline (no normalization)", ["model.groups=0", "model.weight_standardization=false",
                                     "training.batch_size=256", "training.microbatch_size=160"]),
    ("+ GroupNorm", ["model.groups=8"]),
    ("+ larger batch (1024)", ["training.batch_size=1024", "training.microbatch_size=192"]),
    ("+ weight standardization", ["model.weight_standardization=true"]),
    ("+ augmult (K=4)", ["training.augmult=4", "training.pad=2", "training.flip=true",
                         "training.microbatch_size=64", "training.ema_decay=0.99"]),
]
EMA_ROW = "+ EMA (0.99)"   # the last run's EMA weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--train-subset", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "ablation"))
    args = parser.parse_args()

    overrides = [f"data.dataset={args.dataset}", "training.ema_decay=0",
                 f"privacy.target_epsilon={args.epsilon}", f"training.epochs={args.epochs}",
                 f"data.train_subset={args.train_subset}"]
    rows = []
    for index, (label, change) in enumerate(ROWS):
        overrides += change
        config = cfg.load_config("fashion_mnist_cpu", overrides)
        config["run"]["name"] = f"ablation_{index}"
        summary = experiment.train(config, os.path.join(args.out, f"row{index}"), verbose=0)
        rows.append(row(label, summary["test_accuracy"], summary, change))
        if "ema_test_accuracy" in summary:
            rows.append(row(EMA_ROW, summary["ema_test_accuracy"], summary,
                            ["(same run, EMA weights)"]))
    write(rows, args)


def row(label: str, accuracy: float, summary: dict, change: list[str]) -> dict:
    """One table row; printed as soon as it is known."""
    print(f"{label:32s} acc {accuracy:.4f}  eps {summary['epsilon']:.3f}  "
          f"steps {summary['steps']}  sigma {summary['noise_multiplier']:.3f}  "
          f"{summary['wall_time_s']:.0f} s", flush=True)
    return {"row": label, "test_accuracy": accuracy, "epsilon": summary["epsilon"],
            "steps": summary["steps"], "noise_multiplier": summary["noise_multiplier"],
            "wall_time_s": summary["wall_time_s"], "overrides": change}


def write(rows: list[dict], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Ablation on {args.dataset} at (eps={args.epsilon:g}, delta=1e-5), "
             f"{args.epochs:g} epochs per row (`python benchmarks/ablation.py "
             f"{' '.join(sys.argv[1:])}`).", "",
             "| row | test accuracy | change vs previous | steps | sigma | wall s |",
             "|---|---|---|---|---|---|"]
    previous = None
    for r in rows:
        change = "" if previous is None else f"{100 * (r['test_accuracy'] - previous):+.1f} pts"
        previous = r["test_accuracy"]
        lines.append(f"| {r['row']} | {100 * r['test_accuracy']:.1f}% | {change} | {r['steps']} | "
                     f"{r['noise_multiplier']:.3f} | {r['wall_time_s']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ablation.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "ablation.json").write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["row"] for r in rows][::-1], [100 * r["test_accuracy"] for r in rows][::-1])
    ax.set(xlabel="test accuracy (%)", title=f"{args.dataset}, eps={args.epsilon:g}")
    fig.tight_layout()
    fig.savefig(RESULTS / "ablation.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
