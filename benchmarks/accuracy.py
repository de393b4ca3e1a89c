"""Test accuracy of the best CPU recipe on MNIST and Fashion-MNIST at several epsilons.

    python benchmarks/accuracy.py                          # eps 1, 3, 8 on both, 1 seed each
    python benchmarks/accuracy.py --seeds 3 --epsilons 3   # median of 3 runs at eps 3

Each run is `dp-keras-scale train --config {mnist,fashion_mnist}_scatternet --set
privacy.target_epsilon=EPS`: scattering features computed once, a linear classifier DP-trained
on them (noise calibrated for the target), full test sets. Seeds are the OS RNG's (every run
draws fresh sampling and noise). Writes benchmarks/results/accuracy.{md,json,png} and
accuracy_curves.png (test accuracy per epoch); run directories go under
benchmarks/results/accuracy/. A run for some settings replaces those rows and keeps the other
rows of earlier runs; every row names the command that produced it.
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
CONFIGS = {"mnist": "mnist_scatternet", "fashion_mnist": "fashion_mnist_scatternet"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="fashion_mnist,mnist")
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--seeds", type=int, default=1, help="runs per setting (median shown)")
    parser.add_argument("--out", default=str(RESULTS / "accuracy"))
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")

    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    path = RESULTS / "accuracy.json"
    earlier = json.loads(path.read_text()) if path.exists() else []
    rows = []
    for dataset in args.datasets.split(","):
        for eps in [float(e) for e in args.epsilons.split(",")]:
            runs = []
            for seed in range(args.seeds):
                config = cfg.load_config(CONFIGS[dataset], [f"privacy.target_epsilon={eps}"])
                run_dir = os.path.join(args.out, f"{dataset}_eps{eps:g}_run{seed}")
                summary = experiment.train(config, run_dir, verbose=0)
                with open(os.path.join(run_dir, "metrics.json")) as f:
                    summary["curve"] = json.load(f)
                runs.append(summary)
                print(f"{dataset} eps {eps:g} run {seed}: "
                      f"acc {summary['test_accuracy']:.4f} "
                      f"ema {summary.get('ema_test_accuracy', float('nan')):.4f} "
                      f"eps {summary['epsilon']:.3f} {summary['wall_time_s']:.0f} s", flush=True)
            rows.append({"dataset": dataset, "target_epsilon": eps, "runs": runs,
                         "command": command, "median_accuracy": statistics.median(
                             r.get("ema_test_accuracy", r["test_accuracy"]) for r in runs)})
            write(merge(earlier, rows))   # after every setting: a stopped run keeps its rows


def merge(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """Earlier rows, each replaced by this run's row for the same setting; new ones last."""
    new = {(r["dataset"], r["target_epsilon"]): r for r in rows}
    kept = [new.pop((r["dataset"], r["target_epsilon"]), r) for r in earlier]
    return kept + list(new.values())


def write(rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commands = list(dict.fromkeys(r["command"] for r in rows))
    lines = ["Full test sets; accuracy of the EMA weights; wall time includes feature "
             "extraction. Commands:", ""]
    lines += [f"{i + 1}. `{c}`" for i, c in enumerate(commands)]
    lines += ["", "| dataset | (eps, delta) | test accuracy | runs | steps | sigma | "
              "wall time (s) | command |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = r["runs"]
        accs = ", ".join(f"{100 * x.get('ema_test_accuracy', x['test_accuracy']):.2f}"
                         for x in runs)
        lines.append(f"| {r['dataset']} | ({runs[0]['epsilon']:.2f}, {runs[0]['delta']:g}) | "
                     f"**{100 * r['median_accuracy']:.2f}%** | {accs} | {runs[0]['steps']} | "
                     f"{runs[0]['noise_multiplier']:.3f} | "
                     f"{max(x['wall_time_s'] for x in runs):.0f} | "
                     f"{commands.index(r['command']) + 1} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accuracy.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "accuracy.json").write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = sorted((r for r in rows if r["dataset"] == dataset),
                      key=lambda r: r["target_epsilon"])
        ax.plot([r["target_epsilon"] for r in mine], [100 * r["median_accuracy"] for r in mine],
                "o-", label=dataset)
    epsilons = sorted({r["target_epsilon"] for r in rows})
    ax.set(xscale="log", xlabel="epsilon (delta = 1e-5)", ylabel="test accuracy (%)",
           title="ScatterNet + DP linear classifier", xticks=epsilons,
           xticklabels=[f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy.png", dpi=120)
    plot_curves(rows, plt)
    print("\n".join(lines))


def plot_curves(rows: list[dict], plt) -> None:
    """Test accuracy (EMA weights) after each epoch, for every run that recorded its curve."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in rows:
        for i, run in enumerate(x for x in r["runs"] if "curve" in x):
            key = "ema_test_accuracy" if "ema_test_accuracy" in run["curve"][0] else \
                "test_accuracy"
            ax.plot([c["epoch"] for c in run["curve"]], [100 * c[key] for c in run["curve"]],
                    label=f"{r['dataset']} eps {r['target_epsilon']:g} (run {i})")
    if not ax.lines:
        plt.close(fig)
        return
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="ScatterNet + DP linear classifier")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_curves.png", dpi=120)


if __name__ == "__main__":
    main()
