"""The paper's ablation on real data: add one trick per row at a fixed (eps, delta).

    python benchmarks/ablation.py                       # Fashion-MNIST, (3, 1e-5), 2 epochs per row
    python benchmarks/ablation.py --seeds 3             # median of 3 runs per row
    python benchmarks/ablation.py --epochs 6 --name ablation_6ep   # a longer budget per row
    python benchmarks/ablation.py --epochs 0.06 --train-subset 20000   # quick check (minutes)

Rows (each adds one change to the previous row, like De et al. 2022, Table 1), on the
`fashion_mnist_cpu` settings with the 16-32-32-64 `small_cnn` (the model of the measured table):
baseline without normalization -> + GroupNorm -> + larger batch (same epochs, so same
compute and fewer, less noisy steps) -> + weight standardization -> + augmentation
multiplicity (K copies: K times the compute, as in the paper) -> + parameter EMA.
The EMA row is not a new training run: EMA is post-processing of the weights, so it is the
augmult row's own run evaluated with its averaged weights (same trajectory, same privacy cost).
Noise is calibrated per row for the same (eps, delta). Writes
benchmarks/results/NAME.{md,json,png} (NAME: --name, default "ablation"); each row's run
directories are under benchmarks/results/NAME/.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no "failed call to cuInit" error line

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
    parser.add_argument("--seeds", type=int, default=1, help="runs per row (median shown)")
    parser.add_argument("--train-subset", type=int, default=0)
    parser.add_argument("--name", default="ablation",
                        help="results go to benchmarks/results/NAME.{md,json,png} and NAME/")
    parser.add_argument("--out", default=None, help="run directories (default: results/NAME)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    args.out = args.out or str(RESULTS / args.name)

    overrides = [f"data.dataset={args.dataset}", "training.ema_decay=0",
                 "model.architecture=\"small_cnn\"", "model.widths=[16, 32, 32, 64]",
                 f"privacy.target_epsilon={args.epsilon}", f"training.epochs={args.epochs}",
                 f"data.train_subset={args.train_subset}"]
    rows = []
    for index, (label, change) in enumerate(ROWS):
        overrides += change
        config = cfg.load_config("fashion_mnist_cpu", overrides)
        config["run"]["name"] = f"ablation_{index}"
        runs = [experiment.train(config, os.path.join(args.out, f"row{index}_run{seed}"),
                                 verbose=0) for seed in range(args.seeds)]
        rows.append(row(label, [r["test_accuracy"] for r in runs], runs, change))
        if "ema_test_accuracy" in runs[0]:
            rows.append(row(EMA_ROW, [r["ema_test_accuracy"] for r in runs], runs,
                            ["(same runs, EMA weights)"]))
        write(rows, args)                 # after every row: a stopped run keeps its rows


def row(label: str, accuracies: list[float], runs: list[dict], change: list[str]) -> dict:
    """One table row (median over the runs); printed as soon as it is known."""
    first, accuracy = runs[0], statistics.median(accuracies)
    wall = max(r["wall_time_s"] for r in runs)
    print(f"{label:32s} acc {accuracy:.4f} ({', '.join(f'{a:.4f}' for a in accuracies)})  "
          f"eps {first['epsilon']:.3f}  steps {first['steps']}  "
          f"sigma {first['noise_multiplier']:.3f}  {wall:.0f} s", flush=True)
    return {"row": label, "test_accuracy": accuracy, "runs": accuracies,
            "epsilon": first["epsilon"], "steps": first["steps"],
            "noise_multiplier": first["noise_multiplier"], "wall_time_s": wall,
            "overrides": change}


def write(rows: list[dict], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Ablation on {args.dataset} at (eps={args.epsilon:g}, delta=1e-5), "
             f"{args.epochs:g} epochs per row, median of {args.seeds} run(s) "
             f"(`python benchmarks/ablation.py {' '.join(sys.argv[1:])}`).", "",
             "| row | test accuracy | runs | change vs previous | steps | sigma | wall s |",
             "|---|---|---|---|---|---|---|"]
    previous = None
    for r in rows:
        change = "" if previous is None else f"{100 * (r['test_accuracy'] - previous):+.1f} pts"
        previous = r["test_accuracy"]
        runs = ", ".join(f"{100 * a:.1f}" for a in r["runs"])
        lines.append(f"| {r['row']} | {100 * r['test_accuracy']:.1f}% | {runs} | {change} | "
                     f"{r['steps']} | {r['noise_multiplier']:.3f} | {r['wall_time_s']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [r["row"] for r in rows][::-1]
    ax.barh(labels, [100 * r["test_accuracy"] for r in rows][::-1], color="lightsteelblue")
    for y, r in enumerate(rows[::-1]):
        ax.plot([100 * a for a in r["runs"]], [y] * len(r["runs"]), "k.")
    low = min(a for r in rows for a in r["runs"])
    ax.set(xlabel="test accuracy (%): median bar, runs as dots", xlim=(100 * low - 5, None),
           title=f"{args.dataset}, eps={args.epsilon:g}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
