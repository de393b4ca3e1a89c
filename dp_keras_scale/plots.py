"""PNG plots of DP training runs (matplotlib, headless): curves of one run, accuracy vs epsilon."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(rows: list[dict], run_dir: str) -> list[str]:
    """Writes ``accuracy_vs_steps.png`` and ``epsilon_vs_steps.png`` from metrics rows.

    Example:
        >>> training_curves(json.load(open("runs/x/metrics.json")), "runs/x")
    """
    steps = [r["step"] for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in [("test_accuracy", "test accuracy"),
                       ("ema_test_accuracy", "test accuracy (EMA weights)"),
                       ("accuracy", "train accuracy (sampled batches)")]:
        if rows and key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], marker="o", label=label)
    ax.set(xlabel="DP-SGD steps", ylabel="accuracy", title="Accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, os.path.join(run_dir, "accuracy_vs_steps.png")))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, [r["epsilon"] for r in rows], marker="o", color="tab:red")
    ax.set(xlabel="DP-SGD steps", ylabel="epsilon", title="Privacy spent")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, os.path.join(run_dir, "epsilon_vs_steps.png")))
    return paths


def accuracy_vs_epsilon(summaries: list[dict], path: str) -> str:
    """One point per run (its final epsilon and test accuracy), labelled by run name.

    Example:
        >>> accuracy_vs_epsilon([json.load(open(p)) for p in summary_paths], "report.png")
    """
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for s in sorted(summaries, key=lambda s: s["epsilon"]):
        accuracy = s.get("ema_test_accuracy", s["test_accuracy"])
        ax.scatter(s["epsilon"], accuracy)
        ax.annotate(s["name"], (s["epsilon"], accuracy), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="epsilon", ylabel="test accuracy", title="Accuracy vs privacy")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
