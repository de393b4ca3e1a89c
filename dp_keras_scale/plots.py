"""PNG plots of DP training runs (matplotlib, headless): curves of one run, accuracy vs epsilon."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STEPS_LABEL = "logical DP-SGD steps (noisy updates)"


def training_curves(rows: list[dict], run_dir: str,
                    target_epsilon: float | None = None) -> list[str]:
    """Writes ``accuracy_vs_steps.png`` and ``epsilon_vs_steps.png`` from metrics rows.

    Args:
        rows: ``metrics.json`` rows (``step``, ``test_accuracy``, ``test_examples``,
            ``epsilon``, optionally ``ema_test_accuracy`` and ``accuracy``).
        run_dir: where the PNGs go.
        target_epsilon: drawn as a line on the epsilon plot; None reads
            ``privacy.target_epsilon`` from ``run_dir/config.toml`` if there is one.

    Returns:
        The paths of the two PNGs.

    Example:
        >>> training_curves(json.load(open("runs/x/metrics.json")), "runs/x")
    """
    if target_epsilon is None:
        target_epsilon = _target_epsilon(run_dir)
    steps = [r["step"] for r in rows]
    paths = []
    sizes = sorted({r["test_examples"] for r in rows if "test_examples" in r})
    subset = (f" (first {sizes[0]:,} images; last point: all {sizes[-1]:,})"
              if len(sizes) > 1 else "")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label, style in [("test_accuracy", "test accuracy" + subset, "-o"),
                              ("ema_test_accuracy", "test accuracy (EMA weights)", "-s"),
                              ("nonprivate_train_accuracy",
                               "train accuracy (private batches, no noise: not DP)", ":.")]:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, markersize=3.5, label=label)
    ax.set(xlabel=STEPS_LABEL, ylabel="accuracy", title="Accuracy",
           xlim=(0, 1.03 * (max(steps, default=1) or 1)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, os.path.join(run_dir, "accuracy_vs_steps.png")))

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(steps, [r["epsilon"] for r in rows], "-o", markersize=3.5, color="tab:red",
            label="epsilon spent")
    if target_epsilon is not None:
        ax.axhline(target_epsilon, color="0.3", linestyle="--", linewidth=1,
                   label=f"target epsilon {target_epsilon:g}")
    ax.set(xlabel=STEPS_LABEL, ylabel="epsilon", title="Privacy spent",
           xlim=(0, 1.03 * (max(steps, default=1) or 1)), ylim=(0, None))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    paths.append(_save(fig, os.path.join(run_dir, "epsilon_vs_steps.png")))
    return paths


def _target_epsilon(run_dir: str) -> float | None:
    from dp_keras_scale.config import ConfigError, load_config
    path = os.path.join(run_dir, "config.toml")
    try:
        return float(load_config(path)["privacy"]["target_epsilon"])
    except (OSError, ConfigError):
        return None


def accuracy_vs_epsilon(summaries: list[dict], path: str) -> str:
    """One point per run (its final epsilon and test accuracy), labelled by run name: the
    final weights as circles and, where the run kept one, the EMA weights as triangles.

    Example:
        >>> accuracy_vs_epsilon([json.load(open(p)) for p in summary_paths], "report.png")
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    runs = sorted(summaries, key=lambda s: s["epsilon"])
    ax.scatter([s["epsilon"] for s in runs], [s["test_accuracy"] for s in runs],
               marker="o", color="tab:blue", label="final weights")
    ema = [s for s in runs if s.get("ema_test_accuracy") is not None]
    if ema:
        ax.scatter([s["epsilon"] for s in ema], [s["ema_test_accuracy"] for s in ema],
                   marker="^", color="tab:orange", label="EMA weights")
    for s in runs:
        accuracy = max(s["test_accuracy"], s.get("ema_test_accuracy") or 0.0)
        ax.annotate(s["name"], (s["epsilon"], accuracy), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="epsilon spent", ylabel="test accuracy", title="Accuracy vs privacy")
    ax.margins(x=0.2, y=0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
