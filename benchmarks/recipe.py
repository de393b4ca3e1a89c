"""The paper's recipe end to end on MNIST / Fashion-MNIST, split by claim (issue 17).

    python benchmarks/recipe.py --part batch_budget        # batch size x compute budget
    python benchmarks/recipe.py --part augmult --batch-sizes 1024 --epochs 8
    python benchmarks/recipe.py --part scale --models compact_cnn,compact_cnn_x2,wrn10_1
    python benchmarks/recipe.py --part throughput          # DP / non-private images/s
    python benchmarks/recipe.py --part batch_budget --no-privacy --lrs 0.1,0.3,1
    python benchmarks/recipe.py --part batch_budget --no-noise --lrs 4
    python benchmarks/recipe.py --quick                    # a minutes-long check of everything

Every run is from scratch, learned from pixels (no pre-trained backbone, no ScatterNet), on the
full training set (`--train-subset` only for checks) at (`--epsilon`, `--delta`) = (3, 1e-5):
Poisson batches of the expected size B (`dks.data.BatchSampler`), sigma calibrated per run by
`dks.accounting.calibrate_noise_multiplier` for that run's (q = B / N, steps), `dks.DPSGD`
with clip 1 and rescale-to-unit-norm, `dks.callbacks.EMA` (post-processing: its accuracy is
reported beside the final weights' for every run) and `dks.callbacks.PrivacyBudget`, which
checks the spent epsilon. A row is one setting (part, model, B, epochs, K, privacy, seed); it
runs once per learning rate of `--lrs` and the pick (best test accuracy of the final or EMA
weights; the grid is small and the tuning itself is not accounted, as in the paper) is
written with the grid. Each run records a test-accuracy curve (final and EMA weights, on the
first 2000 test examples, about 12 points from step 0; the last point on the whole test set)
and, at the end, the accuracy on the first 10000 training examples next to the test accuracy.

Parts (`--part`):
- ``batch_budget``: for each B of `--batch-sizes`, each budget of `--epochs` (the same epsilon,
  sigma recalibrated each time). Claims: at a fixed B accuracy peaks at an intermediate
  budget; the best budget grows with B; the best accuracy rises with B.
- ``augmult``: K of `--augmult` (1 = one augmented copy) at one (B, epochs): reflect-pad 2 +
  random crop (+ flip on Fashion-MNIST), same steps and sigma for every K; `--augment-pad P`
  pads by P pixels instead (0: flips only, no crop; Fashion-MNIST), rows of their own.
- ``scale``: WS/GroupNorm models of growing size at one (B, epochs) (`--models`:
  compact_cnn, compact_cnn_x2 (widths doubled), small_cnn, wrnD_W with D = 6n+4).

The study's model (`--model`) is `dks.models.compact_cnn`: two strided WS convolutions with
GroupNorm, about 26k parameters; a tenth of small_cnn's flops, so a 2-core CPU runs the
budgets the claims need (32 epochs of Fashion-MNIST in about 10 minutes).
- ``throughput``: images/s of one DP step (`DPScaleModel` + `DPSGD`, the study's micro-batch)
  against a plain Keras step of the same network on the same images.

`--no-privacy`: sigma = 0 and clip 1e6 without rescaling (plain mini-batch SGD through the same
DP code path; its own learning-rate grid), to separate optimisation from privacy.
`--no-noise`: sigma = 0 with the DP rows' clipping (clip 1, unit-norm rescaling) and learning
rates: the same rows with the noise alone removed.
`--lr-schedule cosine` (the rate decayed to 0 at the run's last step), `--momentum M` and
`--ema-decay D`: the optimizer's variants (SGD at a constant rate without momentum, EMA decay
0.99 otherwise), rows of their own, shown beside the model's name in the tables and plots
(as is `--augment-pad`).

Results: ``benchmarks/results/recipe.json`` (every run, appended as it finishes; a re-run
skips the runs already there, so a stopped study resumes), ``recipe.md`` and one PNG per part
(``recipe_<part>.png``: accuracy against the varied quantity, the range of the seeds as error
bars). `--results DIR` writes them elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no "failed call to cuInit" error line

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PARTS = ("batch_budget", "augmult", "scale", "throughput")
CURVE_POINTS = 12
CURVE_TEST_EXAMPLES = 2000
TRAIN_EVAL_EXAMPLES = 10000
NO_PRIVACY_CLIP = 1e6
DEFAULTS = {  # part -> option defaults (full study); see --help
    "batch_budget": {"batch_sizes": "4096,1024,256", "epochs": "2,8,32"},
    "augmult": {"batch_sizes": "1024", "epochs": "8", "augmult": "1,2,4,8"},
    "scale": {"batch_sizes": "1024", "epochs": "8", "models": "compact_cnn,compact_cnn_x2"},
    "throughput": {"batch_sizes": "256", "epochs": "1"},
}


# --------------------------------------------------------------------------- models and data


def build_model(name: str, dataset: str, shape, private: bool = True):
    """``small_cnn`` (the library's, widths 16-32-32-64), ``compact_cnn`` (16-32, Dense 32;
    ``compact_cnn_tanh``: tanh; ``compact_cnn_x2``: every width doubled) or ``wrnD_W`` (WS +
    GroupNorm pre-activation Wide-ResNet), taking uint8-range pixels; standardized with the
    published per-dataset constants."""
    import keras
    import numpy as np

    import dp_keras_scale as dks
    from dp_keras_scale.experiment import PIXEL_MEAN_STD

    mean, std = PIXEL_MEAN_STD[dataset]
    model_class = dks.DPScaleModel if private else keras.Model
    if name == "small_cnn":
        return dks.models.small_cnn(shape, 10, mean=mean, std=std, model_class=model_class)
    if name.startswith("compact_cnn"):     # compact_cnn[_tanh][_xM]: M times the widths
        options = name.removeprefix("compact_cnn").split("_")[1:]
        scale = int(options.pop()[1:]) if options and options[-1].startswith("x") else 1
        activation = options[0] if options else "relu"
        return dks.models.compact_cnn(shape, 10, widths=(16 * scale, 32 * scale),
                                      hidden=32 * scale, mean=mean, std=std,
                                      activation=activation, model_class=model_class)
    if not name.startswith("wrn"):
        raise ValueError(f"unknown model {name!r}: small_cnn, compact_cnn[_tanh][_xM] or "
                         "wrnD_W (e.g. wrn10_1)")
    depth, width = (int(v) for v in name[3:].split("_"))
    body = dks.models.wide_resnet(depth, width, 10, groups=min(16, 16 * width // 2) or None,
                                  input_shape=shape, model_class=keras.Model)
    inputs = keras.Input(shape, name="images")
    scaled = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.Normalization(mean=mean, variance=np.square(std), name="standardize")(scaled)
    return model_class(inputs, body(h), name=body.name)


def load_data(dataset: str, train_subset: int, test_subset: int):
    import dp_keras_scale as dks

    x, y = dks.data.load(dataset, "train")
    x_test, y_test = dks.data.load(dataset, "test")
    if train_subset:
        x, y = x[:train_subset], y[:train_subset]
    if test_subset:
        x_test, y_test = x_test[:test_subset], y_test[:test_subset]
    return x, y, x_test, y_test


# --------------------------------------------------------------------------- one run


def run_one(spec: dict, data, args) -> dict:
    """Trains one (row, learning rate) and returns its record (curve, accuracies, privacy)."""
    import keras

    import dp_keras_scale as dks

    x, y, x_test, y_test = data
    n, batch, seed = len(x), spec["batch_size"], spec["seed"]
    keras.utils.set_random_seed(seed)
    sampler = dks.data.BatchSampler(n, batch, microbatch_size=max(1, args.microbatch // max(
        1, spec["augmult"])), seed=seed)
    q = batch / n
    steps = max(1, math.ceil(spec["epochs"] * n / batch))
    private = not spec["no_privacy"]              # clipped (and noised unless noise_off)
    noised = private and not spec.get("noise_off", False)
    sigma = (dks.accounting.calibrate_noise_multiplier(args.epsilon, q, steps, args.delta,
                                                       dataset_size=n) if noised else 0.0)
    model = build_model(spec["model"], args.dataset, x.shape[1:])
    model.clipping_method = args.clipping
    learning_rate = spec["learning_rate"]
    if spec["lr_schedule"] == "cosine":                      # to 0 at the last planned step
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    optimizer = dks.DPSGD(learning_rate, momentum=spec["momentum"],
                          l2_norm_clip=1.0 if private else NO_PRIVACY_CLIP,
                          noise_multiplier=sigma, rescale_to_unit_norm=private,
                          gradient_accumulation_steps=sampler.accumulation_steps,
                          expected_batch_size=sampler.expected_batch_size)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=args.jit)
    fit_callbacks = [dks.callbacks.EMA(args.ema_decay, use_for_validation=False)]
    budget = None
    if noised:
        budget = dks.callbacks.PrivacyBudget(delta=args.delta, sampling_rate=q, dataset_size=n,
                                             target_epsilon=args.epsilon, planned_steps=steps)
        fit_callbacks.append(budget)
    curve = Curve(x, y, x_test, y_test, steps, args.verbose, args.curve_points)
    fit_callbacks.append(curve)
    pad = spec["augment_pad"]
    map_fn = (dks.data.augmult_map(spec["augmult"], pad=pad, crop=pad > 0,
                                   flip=args.dataset != "mnist", seed=seed)
              if spec["augmult"] else None)
    start = time.time()
    model.fit(sampler.dataset(x, y, map_fn=map_fn), epochs=1,
              steps_per_epoch=steps * sampler.accumulation_steps, callbacks=fit_callbacks,
              verbose=0, shuffle=False)
    wall = time.time() - start
    done = int(optimizer.iterations)
    final = curve.evaluate(model, full=True)
    return {**spec, "steps": done, "planned_steps": steps, "sampling_rate": q,
            "noise_multiplier": sigma, "epsilon": budget.epsilon_now if budget else math.inf,
            "microbatch_size": sampler.microbatch_size,
            "accumulation_steps": sampler.accumulation_steps,
            "test_accuracy": final["test"], "ema_test_accuracy": final["ema_test"],
            "train_accuracy": final["train"], "ema_train_accuracy": final["ema_train"],
            "best": max(final["test"], final["ema_test"]),
            "curve": curve.rows, "wall_time_s": round(wall, 1),
            "clipping_method": args.clipping, "jit_compile": args.jit,
            "examples_per_s": round(done * batch * max(1, spec["augmult"]) / wall, 1)}


class Curve:
    """Test (and train) accuracy of the final and EMA weights at about `CURVE_POINTS` steps."""

    def __new__(cls, *args, **kwargs):
        import keras

        class _Curve(keras.callbacks.Callback):
            def __init__(self, x, y, x_test, y_test, steps, verbose, points=CURVE_POINTS):
                super().__init__()
                self.x, self.y, self.x_test, self.y_test = x, y, x_test, y_test
                every = max(1, math.ceil(steps / points))
                self.points = set(range(0, steps, every))      # the last step: at the end
                self.verbose, self.rows, self.start = verbose, [], time.time()

            def evaluate(self, model, full: bool) -> dict:
                import dp_keras_scale as dks

                m = CURVE_TEST_EXAMPLES if not full else len(self.x_test)
                t = CURVE_TEST_EXAMPLES if not full else TRAIN_EVAL_EXAMPLES
                sets = {"test": (self.x_test[:m], self.y_test[:m]),
                        "train": (self.x[:t], self.y[:t])}
                out = {}
                for prefix, weights in (("", None), ("ema_", "ema")):
                    for key, (xs, ys) in sets.items():
                        if weights:
                            with dks.callbacks.averaged_weights(model, weights):
                                acc = _accuracy(model, xs, ys)
                        else:
                            acc = _accuracy(model, xs, ys)
                        out[prefix + key] = acc
                step = int(model.optimizer.iterations)
                self.rows.append({"step": step, "test_accuracy": out["test"],
                                  "ema_test_accuracy": out["ema_test"],
                                  "train_accuracy": out["train"],
                                  "ema_train_accuracy": out["ema_train"],
                                  "test_examples": m, "seconds": round(time.time() - self.start,
                                                                       1)})
                if self.verbose:
                    print(f"    step {step:5d}  test {out['test']:.4f}  ema {out['ema_test']:.4f}"
                          f"  train {out['train']:.4f}  {time.time() - self.start:.0f} s",
                          flush=True)
                return out

            def on_train_begin(self, logs=None):
                self.evaluate(self.model, full=False)

            def on_train_batch_end(self, batch, logs=None):
                step = int(self.model.optimizer.iterations)
                if step in self.points and not any(r["step"] == step for r in self.rows):
                    self.evaluate(self.model, full=False)

        return _Curve(*args, **kwargs)


def _accuracy(model, x, y) -> float:
    import numpy as np

    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


# --------------------------------------------------------------------------- throughput

def source_commit() -> str | None:
    """The checkout's commit (suffix "+" when files differ from it), or None outside git."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=RESULTS.parent, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+" if dirty else "")



def throughput(args) -> list[dict]:
    """Images/s of a DP step (DPScaleModel + DPSGD, masked micro-batch of the study's size)
    and of a plain Keras step (keras.Model + SGD) of the same network on the same images,
    median of `--timing-steps` after two warm-up steps; alternated over `--timing-rounds`.

    `--methods`: ``nonprivate``, ``dp_reference``, ``dp_auto`` (`DPScaleModel.clipping_method`),
    each under XLA unless `--no-jit` or suffixed ``_nojit`` (e.g. ``dp_auto_nojit``)."""
    import keras
    import numpy as np

    import dp_keras_scale as dks

    rng = np.random.default_rng(0)
    rows = []
    commit = source_commit()
    for name in args.models.split(","):
        for rnd in range(args.timing_rounds):
            for cell in args.methods.split(","):
                method = cell.removesuffix("_nojit")
                jit = args.jit and not cell.endswith("_nojit")
                b = args.microbatch
                shape = (28, 28, 1)
                x = (rng.random((b, *shape)) * 255).astype("float32")
                y = rng.integers(0, 10, b)
                keras.utils.set_random_seed(0)
                private = method != "nonprivate"
                model = build_model(name, args.dataset, shape, private=private)
                if private:     # dp_reference / dp_auto: DPScaleModel.clipping_method
                    model.clipping_method = method.removeprefix("dp_")
                opt = (dks.DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0,
                                 expected_batch_size=b) if private
                       else keras.optimizers.SGD(0.1))
                model.compile(optimizer=opt, jit_compile=jit,
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                for _ in range(2):
                    model.train_on_batch(x, y)
                times = []
                for _ in range(args.timing_steps):
                    start = time.perf_counter()
                    model.train_on_batch(x, y)
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                rows.append({"part": "throughput", "model": name, "method": method,
                             "round": rnd, "jit": jit, "batch": b, "seconds_per_step": seconds,
                             "images_per_s": b / seconds, "commit": commit,
                             "load_average": os.getloadavg()[0]})
                print(f"{name:10s} {method:12s} XLA {'on ' if jit else 'off'} round {rnd}  "
                      f"{b / seconds:8.0f} img/s  (load {os.getloadavg()[0]:.1f})", flush=True)
    return rows


# --------------------------------------------------------------------------- the study


def specs(args) -> list[dict]:
    """Every (row, learning rate) of the part, in the order they run."""
    out = []
    lrs = [float(v) for v in args.lrs.split(",")]
    models = args.models.split(",") if args.part == "scale" else [args.model]
    ks = [int(v) for v in args.augmult.split(",")] if args.part == "augmult" else [0]
    for seed in seed_list(args.seeds):
        for model in models:
            for batch in (int(v) for v in args.batch_sizes.split(",")):
                for epochs in (float(v) for v in args.epochs.split(",")):
                    for k in ks:
                        for lr in lrs:
                            out.append({"part": args.part, "dataset": args.dataset,
                                        "model": model, "batch_size": batch, "epochs": epochs,
                                        "augmult": k, "no_privacy": args.no_privacy,
                                        "noise_off": args.no_noise,
                                        "seed": seed, "learning_rate": lr,
                                        "target_epsilon": args.epsilon, "delta": args.delta,
                                        "train_examples": args.train_n,
                                        "ema_decay": args.ema_decay,
                                        "lr_schedule": args.lr_schedule,
                                        "momentum": args.momentum,
                                        "augment_pad": args.augment_pad if k else AUGMENT_PAD})
    return out


def seed_list(text) -> list[int]:
    """``--seeds``: "N" = seeds 0..N-1, "a,b" = those seeds, "a-b" = a..b inclusive.

    >>> seed_list("3"), seed_list("1,2"), seed_list("2-2")
    ([0, 1, 2], [1, 2], [2])
    """
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(v) for v in text.split(",") if v.strip()]
        elif "-" in text:
            first, last = (int(v) for v in text.split("-"))
            seeds = list(range(first, last + 1))
        else:
            seeds = list(range(int(text)))
    except ValueError:
        seeds = None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r} names no seed: use N (seeds 0..N-1, N >= 1), a list "
                         "such as 1,2, or a range such as 2-2 (seed 2 alone)")
    return seeds


ROW_KEYS = ("part", "dataset", "model", "batch_size", "epochs", "augmult", "no_privacy",
            "noise_off", "seed", "train_examples", "target_epsilon", "lr_schedule", "momentum",
            "ema_decay", "augment_pad")
RUN_KEYS = ROW_KEYS + ("learning_rate",)
EMA_DECAY = 0.99                                        # the study's, --ema-decay's default
AUGMENT_PAD = 2                                         # the study's, --augment-pad's default
KEY_DEFAULTS = {"noise_off": False, "lr_schedule": "constant", "momentum": 0.0,
                "ema_decay": EMA_DECAY, "augment_pad": AUGMENT_PAD}   # runs before the option


def key(record: dict, keys=RUN_KEYS) -> tuple:
    return tuple(record.get(k, KEY_DEFAULTS.get(k)) for k in keys)


VARIANT_LABELS = {"lr_schedule": "{}", "momentum": "momentum {:g}", "ema_decay": "EMA {:g}",
                  "augment_pad": "pad {:d}"}


def variant(record: dict) -> str:
    """The run's departure from the study's defaults (`KEY_DEFAULTS`: constant learning rate,
    no momentum, EMA decay 0.99, augmentation padded by 2 pixels), e.g. "cosine, momentum
    0.9"; "" for the default."""
    values = {k: record.get(k, KEY_DEFAULTS[k]) for k in VARIANT_LABELS}
    return ", ".join(label.format(values[k]) for k, label in VARIANT_LABELS.items()
                     if values[k] != KEY_DEFAULTS[k])


def model_label(record: dict) -> str:
    """The model's name, with its variant (`variant`) in brackets where there is one."""
    label = variant(record)
    return f"{record['model']} ({label})" if label else record["model"]


def privacy_label(record: dict) -> str:
    """DP; "clip, no noise" (sigma 0, clipping kept); "no noise" (sigma 0, no clipping)."""
    if record["no_privacy"]:
        return "no noise"
    return "clip, no noise" if record.get("noise_off", False) else "DP"


def rows_of(runs: list[dict]) -> list[dict]:
    """Groups runs into rows; each row keeps its grid and picks the best learning rate."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r.get("part") != "throughput":
            groups.setdefault(key(r, ROW_KEYS), []).append(r)
    rows = []
    for group in groups.values():
        pick = max(group, key=lambda r: r["best"])
        rows.append({**{k: pick.get(k, KEY_DEFAULTS.get(k, False)) for k in ROW_KEYS},
                     "privacy": privacy_label(pick), "variant": variant(pick), "lr_grid": sorted(
            r["learning_rate"] for r in group), "lr_pick": pick["learning_rate"],
            "pick": pick, "lr_results": {str(r["learning_rate"]): round(r["best"], 4)
                                         for r in group}})
    return rows


def load_results(path: pathlib.Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": [], "throughput": []}


def add_results(out: pathlib.Path, name: str, kind: str, records: list[dict],
                supersede: tuple[str, ...] = ()) -> None:
    """Appends records to NAME.json's `kind` list ("runs" or "throughput") under a file lock,
    so that several parts may run at once into the same results. Earlier records that agree
    with a new one on every key of `supersede` are dropped (a re-measurement replaces them)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(out / f"{name}.json")
        if supersede:
            new = {tuple(r.get(k) for k in supersede) for r in records}
            results[kind] = [r for r in results.get(kind, [])
                             if tuple(r.get(k) for k in supersede) not in new]
        results.setdefault(kind, []).extend(records)
        save_results(results, out, name)


def save_results(results: dict, out: pathlib.Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / f"{name}.json")
    write_report(results, out, name)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return _pct(values[0])
    return f"{_pct(statistics.median(values))} ({_pct(min(values))}-{_pct(max(values))})"


def write_report(results: dict, out: pathlib.Path, name: str) -> None:
    rows = rows_of(results["runs"])
    lines = [f"# The paper's recipe on MNIST / Fashion-MNIST ({name})", "",
             "Written by `benchmarks/recipe.py` (see its docstring). Every row: from scratch, "
             "Poisson batches of expected size B, sigma calibrated for the row's (q, steps) at "
             "the target epsilon; the learning rate is picked from the grid by the best test "
             "accuracy of the final or EMA weights. Accuracies in %; train = first 10000 "
             "training examples. `no noise`: sigma = 0, clip 1e6 (plain SGD); `clip, no noise`: "
             "sigma = 0 with the DP rows' clipping and learning rates.", ""]
    for part in PARTS[:3]:
        part_rows = [r for r in rows if r["part"] == part]
        if not part_rows:
            continue
        lines += [f"## {part}", "",
                  "| dataset | model | privacy | B | epochs | K | seed | steps | sigma | eps "
                  "| lr grid: best acc | pick | test final | test EMA | train final "
                  "| train EMA | s |", "|" + "---|" * 17]
        for r in sorted(part_rows, key=lambda r: (r["dataset"], r["privacy"], r["model"],
                                                   r["batch_size"], r["augmult"],
                                                   r["epochs"], r["seed"])):
            p = r["pick"]
            grid = ", ".join(f"{lr}: {_pct(a)}" for lr, a in r["lr_results"].items())
            lines.append(
                f"| {r['dataset']} | {model_label(r)} | {r['privacy']} "
                f"| {r['batch_size']} | {r['epochs']:g} | {r['augmult']} | {r['seed']} "
                f"| {p['steps']} | {p['noise_multiplier']:.3f} | {p['epsilon']:.2f} | {grid} "
                f"| {r['lr_pick']:g} | {_pct(p['test_accuracy'])} "
                f"| {_pct(p['ema_test_accuracy'])} | {_pct(p['train_accuracy'])} "
                f"| {_pct(p['ema_train_accuracy'])} | {p['wall_time_s']:.0f} |")
        lines.append("")
        if part == "batch_budget":
            lines += ["Best budget per batch size (median over seeds of the best of final/EMA "
                      "accuracy):", "", "| dataset | model | privacy | B | best epochs "
                      "| best acc (seed range) |", "|---|---|---|---|---|---|"]
            for (ds, privacy, _, _, b), group in _by(part_rows, (
                    "dataset", "privacy", "model", "variant", "batch_size")).items():
                by_epochs = _by(group, ("epochs",))
                med = {e: statistics.median(r["pick"]["best"] for r in g)
                       for (e,), g in by_epochs.items()}
                best = max(med, key=med.get)
                lines.append(f"| {ds} | {model_label(group[0])} | {privacy} | {b} "
                             f"| {best:g} | "
                             f"{_spread([r['pick']['best'] for r in by_epochs[(best,)]])} |")
            lines.append("")
        if part != "batch_budget":  # the budget part's runs of the same settings (K = 0)
            fields = ("dataset", "privacy", "batch_size", "epochs") + (
                ("model", "variant") if part == "augmult" else ())
            settings = {tuple(r[f] for f in fields) for r in part_rows}
            part_rows = [r for r in rows if r["part"] == "batch_budget" and r["augmult"] == 0
                         and tuple(r[f] for f in fields) in settings] + part_rows
        plot_part(part, part_rows, out / f"{name}_{part}.png")
        lines += [f"![{part}]({name}_{part}.png)", ""]
    tp = results.get("throughput", [])
    if tp:
        lines += ["## throughput (DP step / non-private Keras step, same network and images)",
                  "", "Ratios are taken within a round (cells of one round run one after "
                  "another in one process); median over rounds, rounds in brackets. "
                  "\"fastest non-private\": the faster of the XLA and non-XLA Keras steps.", "",
                  "| model | micro-batch | step | XLA | img/s | / non-private, same XLA "
                  "| / fastest non-private |", "|---|---|---|---|---|---|---|"]
        for (model, batch), group in _by(tp, ("model", "batch")).items():
            fastest: dict[int, float] = {}
            same: dict[tuple, float] = {}
            for r in group:
                if r["method"] == "nonprivate":
                    fastest[r["round"]] = max(fastest.get(r["round"], 0.0), r["images_per_s"])
                    same[(r["round"], r["jit"])] = r["images_per_s"]
            for (method, jit), cells in _by(group, ("method", "jit")).items():
                speeds = [r["images_per_s"] for r in cells]
                row = f"| {model} | {batch} | {method} | {'on' if jit else 'off'} | " \
                      f"{statistics.median(speeds):.0f} |"
                if method == "nonprivate":
                    lines.append(row + " | |")
                    continue
                for base in (lambda r: same.get((r["round"], jit)),
                             lambda r: fastest.get(r["round"])):
                    ratios = [r["images_per_s"] / base(r) for r in cells if base(r)]
                    row += (f" {statistics.median(ratios):.2f} "
                            f"({', '.join(f'{v:.2f}' for v in ratios)}) |" if ratios else " |")
                lines.append(row)
        lines.append("")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _by(rows: list[dict], keys: tuple) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: kv[0]))


def plot_part(part: str, rows: list[dict], path: pathlib.Path) -> None:
    """Best-of-grid accuracy against the part's varied quantity: one line per setting
    (EMA solid, final weights dashed), median over seeds with the seed range as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = {"batch_budget": "epochs", "augmult": "augmult", "scale": "model"}[part]
    line_keys = tuple(k for k in ("privacy", "model", "variant", "batch_size", "epochs")
                      if k != x_key)
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        models = list(dict.fromkeys(r["model"] for r in rows if r["dataset"] == dataset))
        for i, (label, group) in enumerate(_by([r for r in rows if r["dataset"] == dataset],
                                               line_keys).items()):
            color = f"C{i % 10}"
            xs = sorted({r[x_key] for r in group}, key=lambda v: (str(type(v)), v))
            if part == "scale":     # one categorical axis shared by every line
                xs = [m for m in models if m in xs]
            for weights, style in (("ema_test_accuracy", "-o"), ("test_accuracy", "--x")):
                meds, lows, highs = [], [], []
                for xv in xs:
                    values = [100 * r["pick"][weights] for r in group if r[x_key] == xv]
                    meds.append(statistics.median(values))
                    lows.append(meds[-1] - min(values))
                    highs.append(max(values) - meds[-1])
                positions = xs if part != "scale" else [models.index(m) for m in xs]
                name = " ".join(f"B={v}" if k == "batch_size" else
                                f"{v:g} epochs" if k == "epochs" else str(v)
                                for k, v in zip(line_keys, label) if v != "")
                ax.errorbar(positions, meds, yerr=[lows, highs], fmt=style, color=color,
                            capsize=3,
                            label=f"{name} ({'EMA' if 'ema' in weights else 'final'})")
        if part == "scale":
            ax.set_xticks(range(len(models)), models)
        if part == "batch_budget":
            ax.set_xscale("log", base=2)
            ax.set_xlabel("epochs (compute budget) at the same epsilon")
        else:
            ax.set_xlabel({"augmult": "augmentation multiplicity K (0: no augmentation)",
                           "scale": "model"}[part])
        ax.set_ylabel("test accuracy (%), best lr of the grid")
        ax.set_title(f"{dataset} {part}: median over seeds, bars = seed range", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=PARTS, default=None,
                        help="which claim to run (default batch_budget; --quick runs all)")
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seeds", default="1",
                        help="N (seeds 0..N-1), a list (1,2) or a range (2-2: seed 2 alone)")
    parser.add_argument("--batch-sizes", default=None, help="expected batch sizes, comma list")
    parser.add_argument("--epochs", default=None, help="compute budgets (epochs), comma list")
    parser.add_argument("--augmult", default=None, help="K values for --part augmult")
    parser.add_argument("--models", default=None, help="models for --part scale/throughput")
    parser.add_argument("--model", default="compact_cnn", help="model of the other parts")
    parser.add_argument("--lrs", default=None,
                        help="learning-rate grid (default 2,4,8 with DP; 0.1,0.3,1 without)")
    parser.add_argument("--no-privacy", action="store_true",
                        help="sigma = 0 and clip 1e6 without rescaling (diagnosis rows)")
    parser.add_argument("--no-noise", action="store_true",
                        help="sigma = 0 with the DP clipping (clip 1, unit-norm rescaling) and "
                             "learning rates: the noise's effect alone (diagnosis rows)")
    parser.add_argument("--ema-decay", type=float, default=EMA_DECAY)
    parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                        help="cosine: decays each run's learning rate to 0 at its last step")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    parser.add_argument("--augment-pad", type=int, default=AUGMENT_PAD,
                        help="reflect padding of the random crops (K >= 1); 0: flips only")
    parser.add_argument("--microbatch", type=int, default=256,
                        help="examples x copies per micro-batch (memory / speed)")
    parser.add_argument("--no-jit", dest="jit", action="store_false")
    parser.add_argument("--train-subset", type=int, default=0)
    parser.add_argument("--test-subset", type=int, default=0)
    parser.add_argument("--clipping", default="reference", choices=["reference", "auto"],
                        help="DPScaleModel.clipping_method of the study's runs; for compact_cnn "
                             "'--clipping auto --no-jit' is the fastest DP step (part "
                             "throughput); for wrn10_1 the two are level, for small_cnn "
                             "reference with XLA is faster")
    parser.add_argument("--methods",
                        default="nonprivate,nonprivate_nojit,dp_reference,dp_auto_nojit",
                        help="--part throughput: steps to time (suffix _nojit: without XLA)")
    parser.add_argument("--curve-points", type=int, default=CURVE_POINTS,
                        help="evaluation points of each run's curve besides the last step")
    parser.add_argument("--timing-steps", type=int, default=5)
    parser.add_argument("--timing-rounds", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS), help="output directory")
    parser.add_argument("--name", default="recipe", help="results file stem")
    parser.add_argument("--quick", action="store_true",
                        help="minutes-long check: 1000 training / 300 test examples, tiny "
                             "budgets, every part once")
    parser.add_argument("--report-only", action="store_true",
                        help="regenerate NAME.md and the plots from NAME.json, run nothing")
    parser.add_argument("--quick-parts", default="",
                        help="with --quick: only these parts (comma list; default all)")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        seed_list(args.seeds)
    except ValueError as error:
        parser.error(str(error))
    if args.augment_pad < 0 or (args.augment_pad == 0 and args.dataset == "mnist"):
        parser.error(f"--augment-pad {args.augment_pad}: use a padding >= 0 pixels (0, flips "
                     "only, needs Fashion-MNIST: MNIST's digits are not flipped)")
    out = pathlib.Path(args.results)
    path = out / f"{args.name}.json"
    results = load_results(path)
    if args.report_only:
        write_report(results, out, args.name)
        return
    if args.quick:
        if args.name == "recipe":       # a check never mixes into the study's results
            args.name = "recipe_quick"
            results = load_results(out / f"{args.name}.json")
        quick(args, results, out)
        return
    args.part = args.part or "batch_budget"
    for option, value in DEFAULTS[args.part].items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    args.models = args.models or "compact_cnn"
    args.augmult = args.augmult or "0"
    args.lrs = args.lrs or ("0.1,0.3,1" if args.no_privacy else "2,4,8")
    run_part(args, results, out)


def run_part(args, results: dict, out: pathlib.Path) -> None:
    import dp_keras_scale  # noqa: F401  (TensorFlow, Keras classes)

    if args.part == "throughput":
        add_results(out, args.name, "throughput", throughput(args),
                    supersede=("model", "batch"))
        return
    data = load_data(args.dataset, args.train_subset, args.test_subset)
    args.train_n = len(data[0])
    done = {key(r) for r in results["runs"]}
    # cheapest budgets first (all batch sizes), so a stopped study has complete columns
    todo = sorted((s for s in specs(args) if key(s) not in done),
                  key=lambda s: (s["seed"], s["epochs"] * max(1, s["augmult"])))
    print(f"{args.part}: {len(todo)} run(s) to do ({len(done)} in {out / args.name}.json)",
          flush=True)
    for spec in todo:
        # another process on the same results may have finished it meanwhile
        if key(spec) in {key(r) for r in load_results(out / f"{args.name}.json")["runs"]}:
            continue
        print(f"  {model_label(spec)} B={spec['batch_size']} epochs={spec['epochs']:g} "
              f"K={spec['augmult']} lr={spec['learning_rate']:g} seed={spec['seed']}"
              f" [{privacy_label(spec)}]", flush=True)
        record = run_one(spec, data, args)
        print(f"  -> test {record['test_accuracy']:.4f} ema {record['ema_test_accuracy']:.4f} "
              f"train {record['train_accuracy']:.4f} sigma {record['noise_multiplier']:.3f} "
              f"eps {record['epsilon']:.3f} steps {record['steps']} "
              f"{record['wall_time_s']:.0f} s", flush=True)
        add_results(out, args.name, "runs", [record])   # after every run: a stopped study keeps it


def quick(args, results: dict, out: pathlib.Path) -> None:
    """Every part once on 1000 training / 300 test examples (a check, not a result)."""
    common = dict(dataset=args.dataset, epsilon=args.epsilon, delta=args.delta, seeds=1,
                  model="compact_cnn", no_privacy=False, no_noise=False, ema_decay=args.ema_decay,
                  lr_schedule=args.lr_schedule, momentum=args.momentum,
                  augment_pad=args.augment_pad, microbatch=64, jit=args.jit,
                  train_subset=args.train_subset or 1000,
                  test_subset=args.test_subset or 300, verbose=args.verbose, curve_points=3,
                  timing_steps=2, timing_rounds=1, name=args.name, clipping=args.clipping,
                  methods="nonprivate,dp_reference")
    plans = [dict(part="batch_budget", batch_sizes="64,128", epochs="0.5", lrs="4",
                  augmult="0", models="compact_cnn"),
             dict(part="batch_budget", batch_sizes="128", epochs="0.5", lrs="0.3",
                  augmult="0", models="compact_cnn", no_privacy=True),
             dict(part="batch_budget", batch_sizes="64", epochs="0.5", lrs="4",
                  augmult="0", models="compact_cnn", no_noise=True),
             dict(part="augmult", batch_sizes="128", epochs="0.25", lrs="4", augmult="1,2",
                  models="compact_cnn"),
             dict(part="scale", batch_sizes="128", epochs="0.25", lrs="4", augmult="0",
                  models="compact_cnn,small_cnn"),
             dict(part="throughput", batch_sizes="64", epochs="1", lrs="1", augmult="0",
                  models="compact_cnn")]
    parts = args.quick_parts.split(",") if args.quick_parts else PARTS
    for plan in plans:
        if plan["part"] not in parts:
            continue
        run_part(argparse.Namespace(**{**common, **plan}), results, out)


if __name__ == "__main__":
    main(sys.argv[1:])
