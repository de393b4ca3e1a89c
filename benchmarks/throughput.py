"""DP training step vs the non-private Keras step of the same model: images/s and peak RSS.

    python benchmarks/throughput.py                         # all models and settings, 2 rounds
    python benchmarks/throughput.py --models wrn-ws --settings 16x4 --rounds 1 --steps 3

Every cell (model, B x K setting, method) runs in its own process, one after another, so that
peak RSS is the cell's own and no cell inherits another's compiled graphs. Methods:
- ``nonprivate``: plain `keras.Model` step of the same network on the B*K images (with the
  library imported, so TensorFlow's caching CPU allocator, `dp_keras_scale._allocator`);
- ``nonprivate_malloc``: the same under TensorFlow's default CPU allocator
  (``TF_CPU_ALLOCATOR_USE_BFC=0``: what a Keras program that never imports the library runs);
- ``reference``: `DPScaleModel` step with ``clipping_method = "reference"`` (every example
  differentiated on its own under `tf.vectorized_map`);
- ``fast``: `DPScaleModel` step with the default batched per-layer clipping
  (`dp_keras_scale.ghost_clipping`).
Each round runs every cell once; ratios DP / non-private are taken within a round (same model
and setting) against the faster of the two non-private cells, and the spread is reported over
rounds. Separate processes drift (20-25% between runs of one cell on a 2-core machine), so each
round also runs the methods of a model and setting in one process, a step of each in turn
(``--alternate``): the "alternating" ratios come from there, the peak RSS from the cells.
A step processes B*K images; images/s is B*K over the median of at least `--steps` timed
steps (and at least 5 s of them) after two warm-up steps (XLA compilation). The load average
is recorded before each cell: on a shared machine it is part of the result.
Results go to benchmarks/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"
MODELS = {
    "wrn-ws": "WRN-16-4, WS convs (the paper's model)",
    "wrn-plain": "WRN-16-4, plain Keras Conv2D",
    "cnn": "small CNN (dks.models.small_cnn, WS convs, 28x28x1)",
}
METHODS = ("nonprivate", "nonprivate_malloc", "reference", "fast")
MIN_SECONDS, MAX_STEPS = 5.0, 200     # fast cells run more steps than --steps


def is_private(method: str) -> bool:
    """Whether a method's cell runs a DP step (``nonprivate*`` cells do not)."""
    return not method.startswith("nonprivate")


def build(model_name: str, method: str, jit: bool):
    import keras

    import dp_keras_scale as dks

    private = is_private(method)
    model_class = dks.DPScaleModel if private else keras.Model
    if model_name == "cnn":
        model = dks.models.small_cnn((28, 28, 1), 10, model_class=model_class)
        shape = (28, 28, 1)
    else:
        model = dks.models.wide_resnet(16, 4, num_classes=10, model_class=model_class,
                                       weight_standardization=model_name == "wrn-ws")
        shape = (32, 32, 3)
    if private:
        model.clipping_method = "reference" if method == "reference" else "auto"
        optimizer = dks.DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0)
    else:
        optimizer = keras.optimizers.SGD(0.1)
    model.compile(optimizer=optimizer, jit_compile=jit,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, shape


def images(model_name: str, shape, batch: int, copies: int, method: str):
    """The B*K random images and labels a cell trains on ([B, K, ...] for a DP step)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((batch * copies, *shape), dtype=np.float32)
    if model_name == "cnn":
        x = x * 255.0
    y = rng.integers(0, 10, batch * copies)
    if is_private(method):
        x, y = x.reshape(batch, copies, *shape), y.reshape(batch, copies)
    return x, y


def run_alternating(model_name: str, batch: int, copies: int, methods: list[str],
                    steps: int, jit: bool) -> dict[str, float]:
    """Images/s of each method's step, all built in this process and stepped in turn (one
    step of each, at least `steps` times and 5 s each, after two warm-up steps each): machine
    drift hits all alike."""
    cells = {}
    for method in methods:
        model, shape = build(model_name, method, jit)
        cells[method] = (model, *images(model_name, shape, batch, copies, method))
        for _ in range(2):
            model.train_on_batch(*cells[method][1:])
    times = {method: [] for method in methods}
    while (len(times[methods[0]]) < steps
           or (min(sum(t) for t in times.values()) < MIN_SECONDS
               and len(times[methods[0]]) < MAX_STEPS)):
        for method, (model, x, y) in cells.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[method].append(time.perf_counter() - start)
    return {method: batch * copies / statistics.median(t) for method, t in times.items()}


def run_cell(model_name: str, batch: int, copies: int, method: str, steps: int,
             jit: bool) -> dict:
    """Times one cell in this process; returns images/s and RSS figures (MiB)."""
    import resource

    from dp_keras_scale._allocator import caching_allocator_active

    model, shape = build(model_name, method, jit)
    x, y = images(model_name, shape, batch, copies, method)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(2):
        model.train_on_batch(x, y)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    while len(times) < steps or (sum(times) < MIN_SECONDS and len(times) < MAX_STEPS):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    per_step = {                        # CPU time in user code / in the kernel, page faults
        "cpu_user_seconds_per_step": usage.ru_utime - usage_before.ru_utime,
        "cpu_kernel_seconds_per_step": usage.ru_stime - usage_before.ru_stime,
        "page_faults_per_step": usage.ru_minflt - usage_before.ru_minflt}
    return {"seconds_per_step": seconds, "timed_steps": len(times),
            **{k: v / len(times) for k, v in per_step.items()},
            "images_per_s": batch * copies / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_training_mib": rss_before,
            "cpu_allocator": "bfc" if caching_allocator_active() else "malloc"}


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-"
            f"{fmt.format(max(values))})")


def table(rows: list[dict], rounds: int) -> str:
    """Markdown table: per model and setting, medians over rounds (min-max), within-round
    ratios. Rows marked ``superseded`` (by hand, with the reason) are left out."""
    rows = [r for r in rows if "superseded" not in r]
    lines = ["| model | (B, K) | non-private img/s | non-private img/s, TF's default allocator "
             "| reference DP img/s | fast DP img/s "
             "| reference / non-private | fast / non-private | fast / non-private, alternating "
             "| fast / reference "
             "| peak RSS MiB: " + " / ".join(METHODS).replace("_malloc", " (default allocator)")
             + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["B"], r["K"]) for r in rows},
                  key=lambda k: (list(MODELS).index(k[0]), -k[2], k[1]))
    for model, batch, copies in keys:
        cell = {m: [r for r in rows if (r["model"], r["B"], r["K"], r["method"])
                    == (model, batch, copies, m)] for m in METHODS}
        ips = {m: [r["images_per_s"] for r in cell[m]] for m in METHODS}
        rss = {m: [r["peak_rss_mib"] for r in cell[m]] for m in METHODS}

        def ratio(a, *bs):
            """Per round: a's images/s over the fastest of bs's."""
            by_round = {}
            for b in bs:
                for r in cell[b]:
                    by_round[r["round"]] = max(by_round.get(r["round"], 0), r["images_per_s"])
            return [r["images_per_s"] / by_round[r["round"]] for r in cell[a]
                    if r["round"] in by_round]
        nonprivate = ("nonprivate", "nonprivate_malloc")
        alternating = [r["images_per_s_by_method"]["fast"]
                       / r["images_per_s_by_method"]["nonprivate"] for r in rows
                       if (r["model"], r["B"], r["K"], r["method"])
                       == (model, batch, copies, "alternating")
                       and {"fast", "nonprivate"} <= r["images_per_s_by_method"].keys()]
        lines.append(
            f"| {model} | ({batch}, {copies}) | {spread(ips['nonprivate'])} "
            f"| {spread(ips['nonprivate_malloc'])} "
            f"| {spread(ips['reference'])} | {spread(ips['fast'])} "
            f"| {spread(ratio('reference', *nonprivate), '{:.2f}')} "
            f"| {spread(ratio('fast', *nonprivate), '{:.2f}')} "
            f"| {spread(alternating, '{:.2f}')} "
            f"| {spread(ratio('fast', 'reference'), '{:.2f}')} "
            f"| {' / '.join(spread(rss[m]) for m in METHODS)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--settings", default="16x4,64x1,32x4", help="BxK,BxK,...")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per cell")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of every cell")
    parser.add_argument("--jit", default="on", choices=["off", "on"],
                        help="XLA compilation of the training steps (Keras default: on)")
    parser.add_argument("--cell", nargs=4, metavar=("MODEL", "B", "K", "METHOD"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--alternate", nargs=3, metavar=("MODEL", "B", "K"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    args = parser.parse_args()

    if args.cell or args.alternate:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if args.cell:
            model, batch, copies, method = args.cell
            result = run_cell(model, int(batch), int(copies), method, args.steps,
                              args.jit == "on")
        else:
            model, batch, copies = args.alternate
            result = run_alternating(model, int(batch), int(copies),
                                     args.methods.split(","), args.steps, args.jit == "on")
        print("RESULT " + json.dumps(result), flush=True)
        return

    from dp_keras_scale import _allocator as allocator     # its variable, for each cell

    settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    methods = args.methods.split(",")
    alternating = [m for m in methods if m != "nonprivate_malloc"]  # one allocator per process

    def measure(flag: list[str], name: str, methods: str) -> dict:
        """Runs `flag` (--cell or --alternate) in its own process; its RESULT line."""
        env = dict(os.environ)
        env.pop(allocator.VARIABLE, None)              # the library's default...
        if methods == "nonprivate_malloc":            # ...or TensorFlow's
            env[allocator.VARIABLE] = "0"
        proc = subprocess.run([sys.executable, __file__, *flag, "--methods", methods,
                               "--steps", str(args.steps), "--jit", args.jit],
                              capture_output=True, text=True, check=False, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        return json.loads(lines[-1][len("RESULT "):])

    for rnd in range(args.rounds):
        for model in args.models.split(","):
            for batch, copies in settings:
                where = {"round": rnd, "model": model, "B": batch, "K": copies}
                for method in methods:
                    load = os.getloadavg()[0]
                    row = {**where, "method": method, "load_1min_before": load, **measure(
                        ["--cell", model, str(batch), str(copies), method],
                        f"cell {model} {batch}x{copies} {method}", method)}
                    rows.append(row)
                    print(f"round {rnd + 1} {model:>9} B={batch:<3} K={copies:<2} "
                          f"{method:>17}: {row['images_per_s']:6.1f} images/s, peak RSS "
                          f"{row['peak_rss_mib']:.0f} MiB (load {load:.2f})", flush=True)
                    write_results(rows, args, started)
                if len(alternating) > 1:
                    load = os.getloadavg()[0]
                    by_method = measure(["--alternate", model, str(batch), str(copies)],
                                        f"alternating {model} {batch}x{copies}",
                                        ",".join(alternating))
                    rows.append({**where, "method": "alternating", "load_1min_before": load,
                                 "images_per_s_by_method": by_method})
                    print(f"round {rnd + 1} {model:>9} B={batch:<3} K={copies:<2} "
                          f"      alternating: " + ", ".join(
                              f"{m} {v:.1f}" for m, v in by_method.items()) + " images/s",
                          flush=True)
                    write_results(rows, args, started)


def write_results(rows: list[dict], args, started: str) -> None:
    """Writes the table and the raw rows (after every cell, so a cut-short run keeps them)."""
    import keras
    import tensorflow as tf   # only for the version line

    loads = [r["load_1min_before"] for r in rows]
    rounds = max(r["round"] for r in rows) + 1
    header = (f"{os.cpu_count()} CPU threads, TF {tf.__version__}, Keras {keras.__version__}, "
              f"XLA {args.jit}, median of >= {args.steps} steps (>= {MIN_SECONDS:.0f} s) per "
              f"cell and per method alternating, {rounds} of "
              f"{args.rounds} rounds (each cell its own process), started "
              f"{started}; "
              f"1-minute load average before the cells: {min(loads):.2f}-{max(loads):.2f} "
              f"(median {statistics.median(loads):.2f}). Cells: median over rounds (min-max).")
    text = "\n".join([header, "", table(rows, args.rounds), "",
                      "Models: " + "; ".join(f"{k}: {v}" for k, v in MODELS.items()
                                              if k in args.models.split(","))])
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.md").write_text(text + "\n")
    (out / "throughput.json").write_text(json.dumps(
        {"machine": platform.platform(), "args": vars(args), "started": started, "rows": rows},
        indent=2))

if __name__ == "__main__":
    main()
