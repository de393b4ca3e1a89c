"""Public pre-training + DP fine-tuning, offline: MNIST (public) -> Fashion-MNIST (private).

    python benchmarks/finetune.py         # eps 1, 3, 8: 21 CPU-minutes (33 min on a busy 2-core box)
    python benchmarks/finetune.py --epsilons 3 --steps 20 --pretrain-steps 100   # quick check

1. Pre-trains `dks.models.small_cnn` non-privately on MNIST (treated as public data).
2. Exports it twice: the feature extractor (images -> pooled features) as a TF-Hub-format
   SavedModel (`tf.saved_model.save` of an object with `__call__(images, training=False)`),
   and the whole classifier as a `.keras` file.
3. DP-trains on Fashion-MNIST at each epsilon, with the same Poisson sampling rate, number of
   steps, clip norm and accountant (PLD, delta 1e-5) in every arm:
   - classifier-only: frozen SavedModel backbone, features computed once, DP-SGD on a new
     zero-initialized linear classifier over the cached feature rows;
   - all layers: the `.keras` model, classifier reset, every layer DP-trained (fast path);
   - from scratch: the same `small_cnn` architecture, randomly initialized.
   Learning rates are fixed in advance (not tuned on the test set): 1.0 for fine-tuning (the
   paper's fine-tuning value) and 4.0 from scratch (the library demo's value); classifier-only
   is also reported at lr 4.0, and with 10x more steps at the same epsilon (cached features
   make that cost seconds), as sensitivity rows; a non-private linear probe on the same
   features gives the ceiling of classifier-only fine-tuning (a reference, not DP).
4. Times a few all-layers steps through the SavedModel (slow path: its convolutions cannot be
   rerouted) against the `.keras` backbone (fast path), same batch.

Writes benchmarks/results/finetune.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no "failed call to cuInit" error line

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_keras_scale as dks  # noqa: E402
from dp_keras_scale import finetune  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
# Published pixel statistics (public constants).
MNIST_MEAN_STD = (0.1307, 0.3081)
FASHION_MEAN_STD = (0.2860, 0.3530)
DELTA = 1e-5


class HubFeatureExport(tf.Module):
    """TF-Hub reusable SavedModel: `__call__(images, training=False)` returning features."""

    def __init__(self, features: keras.Model):
        super().__init__()
        self.features = features

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)])
    def __call__(self, images):
        return self.features(images, training=False)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def pretrain(args, workdir: pathlib.Path) -> dict:
    """Non-private MNIST pre-training; exports a SavedModel (features) and a .keras file."""
    x, y = dks.data.load("mnist", "train")
    x_test, y_test = dks.data.load("mnist", "test")
    keras.utils.set_random_seed(args.pretrain_seed)
    model = dks.models.small_cnn((28, 28, 1), 10, widths=args.widths, mean=MNIST_MEAN_STD[0],
                                 std=MNIST_MEAN_STD[1], model_class=keras.Model)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.time()
    steps = args.pretrain_steps or -(-len(x) // 128)
    dataset = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).repeat()
               .batch(128).prefetch(2))
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=2)
    seconds = time.time() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    print(f"MNIST pre-training: {steps} steps of 128, test accuracy {accuracy:.4f}, "
          f"{seconds:.0f} s", flush=True)
    features = keras.Model(model.inputs, model.get_layer("pool").output)
    saved_model = workdir / "mnist_features_savedmodel"
    tf.saved_model.save(HubFeatureExport(features), str(saved_model))
    keras_file = workdir / "mnist_small_cnn.keras"
    model.save(keras_file)
    return {"steps": steps, "batch": 128, "mnist_test_accuracy": float(accuracy),
            "seconds": seconds, "saved_model": saved_model, "keras_file": keras_file}


def dp_optimizer(lr: float, sigma: float, sampler: dks.data.BatchSampler) -> dks.DPSGD:
    return dks.DPSGD(learning_rate=lr, l2_norm_clip=1.0, noise_multiplier=sigma,
                     rescale_to_unit_norm=True,
                     gradient_accumulation_steps=sampler.accumulation_steps,
                     expected_batch_size=sampler.expected_batch_size)


def dp_train(model: keras.Model, x, y, x_test, y_test, lr: float, sigma: float, args,
             steps: int | None = None) -> dict:
    """DP-SGD with Poisson sampling for `steps` (default args.steps) logical steps."""
    steps = steps or args.steps
    sampler = dks.data.BatchSampler(len(x), args.batch_size, microbatch_size=args.microbatch)
    model.compile(optimizer=dp_optimizer(lr, sigma, sampler),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.time()
    model.fit(sampler.dataset(x, y, steps=steps), epochs=1,
              steps_per_epoch=steps * sampler.accumulation_steps, verbose=0)
    seconds = time.time() - start
    if int(model.optimizer.iterations) != steps:
        raise RuntimeError(f"expected {steps} noisy steps, ran "
                           f"{int(model.optimizer.iterations)}")
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[:2]
    return {"accuracy": float(accuracy), "train_seconds": seconds, "lr": lr, "steps": steps,
            "noise_multiplier": sigma}


def linear_probe(features, y, features_test, y_test, epochs: int) -> float:
    """NON-private reference: the best a linear classifier on these features does (Adam)."""
    keras.utils.set_random_seed(0)
    probe = keras.Sequential([keras.Input(features.shape[1:]), keras.layers.Dense(10)])
    probe.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    probe.fit(features, y, epochs=epochs, batch_size=256, verbose=0)
    return float(probe.evaluate(features_test, y_test, batch_size=1000, verbose=0)[1])


def time_all_layers_steps(source, x, y, args) -> float:
    """Median seconds of a noise-free all-layers DP step at batch args.timing_batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = finetune.build(source, 10, mode="all_layers",
                               classifier="add" if source.is_dir() else "reset")
    model.compile(optimizer=dks.DPSGD(0.1, noise_multiplier=0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xb, yb = x[:args.timing_batch], y[:args.timing_batch]
    model.train_on_batch(xb, yb)   # tracing / compilation
    times = []
    for _ in range(args.timing_steps):
        start = time.perf_counter()
        model.train_on_batch(xb, yb)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--steps", type=int, default=100, help="noisy DP steps in every arm")
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch")
    parser.add_argument("--microbatch", type=int, default=320)
    parser.add_argument("--widths", default="16,32,32,64")
    parser.add_argument("--finetune-lr", type=float, default=1.0)
    parser.add_argument("--scratch-lr", type=float, default=4.0)
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="MNIST pre-training steps of 128 (default: one epoch)")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--long-head-steps", type=int, default=1000,
                        help="classifier-only steps of the extra cached-feature row")
    parser.add_argument("--probe-epochs", type=int, default=10,
                        help="epochs of the non-private linear-probe reference")
    parser.add_argument("--timing-batch", type=int, default=32)
    parser.add_argument("--timing-steps", type=int, default=3, help="0 skips the timing rows")
    parser.add_argument("--workdir", default=None, help="where the exported models go")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()
    args.widths = tuple(int(w) for w in args.widths.split(","))
    epsilons = [float(e) for e in args.epsilons.split(",")]

    start = time.time()
    load_start = load_average()
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="dks_finetune_"))
    workdir.mkdir(parents=True, exist_ok=True)
    pre = pretrain(args, workdir)

    x, y = dks.data.load("fashion_mnist", "train")
    x_test, y_test = dks.data.load("fashion_mnist", "test")
    q = args.batch_size / len(x)

    # Classifier-only: features from the SavedModel, computed once for train and test.
    reference = finetune.build(pre["saved_model"], 10, mode="classifier_only", classifier="add")
    feature_start = time.time()
    features = finetune.extract_features(reference, x, batch_size=1000)
    features_test = finetune.extract_features(reference, x_test, batch_size=1000)
    feature_seconds = time.time() - feature_start
    print(f"Fashion-MNIST features {features.shape} from the SavedModel in "
          f"{feature_seconds:.0f} s", flush=True)
    probe = linear_probe(features, y, features_test, y_test, args.probe_epochs)
    print(f"non-private linear probe on these features: {probe:.4f}", flush=True)

    rows = []
    for eps in epsilons:
        sigma = dks.accounting.calibrate_noise_multiplier(eps, q, args.steps, DELTA)
        spent = dks.accounting.epsilon(sigma, q, args.steps, DELTA)
        row = {"epsilon": eps, "epsilon_spent": spent, "noise_multiplier": sigma}
        long_sigma = dks.accounting.calibrate_noise_multiplier(eps, q, args.long_head_steps,
                                                               DELTA)
        for lr, key, steps, noise in (
                (args.finetune_lr, "classifier_only", args.steps, sigma),
                (args.scratch_lr, "classifier_only_alt_lr", args.steps, sigma),
                (args.finetune_lr, "classifier_only_long", args.long_head_steps, long_sigma)):
            model = finetune.build(pre["saved_model"], 10, mode="classifier_only",
                                   classifier="add")
            head = finetune.classifier_head(model)
            row[key] = dp_train(head, features, y, features_test, y_test, lr, noise, args,
                                steps)
        model = finetune.build(pre["keras_file"], 10, mode="all_layers", classifier="reset")
        row["all_layers"] = dp_train(model, x, y, x_test, y_test, args.finetune_lr, sigma, args)
        keras.utils.set_random_seed(int.from_bytes(os.urandom(4), "little"))
        scratch = dks.models.small_cnn((28, 28, 1), 10, widths=args.widths,
                                       mean=FASHION_MEAN_STD[0], std=FASHION_MEAN_STD[1])
        row["scratch"] = dp_train(scratch, x, y, x_test, y_test, args.scratch_lr, sigma, args)
        rows.append(row)
        print(f"eps={eps}: sigma={sigma:.3f}  classifier-only "
              f"{row['classifier_only']['accuracy']:.4f} "
              f"({args.long_head_steps} steps: {row['classifier_only_long']['accuracy']:.4f}) "
              f"(lr {args.scratch_lr}: {row['classifier_only_alt_lr']['accuracy']:.4f})  "
              f"all layers {row['all_layers']['accuracy']:.4f}  "
              f"scratch {row['scratch']['accuracy']:.4f}", flush=True)

    timing = {}
    if args.timing_steps:
        timing = {"batch": args.timing_batch,
                  "keras_seconds": time_all_layers_steps(pre["keras_file"], x, y, args),
                  "saved_model_seconds": time_all_layers_steps(pre["saved_model"], x, y, args)}
        print(f"all-layers step, batch {args.timing_batch}: .keras "
              f"{timing['keras_seconds']:.3f} s, SavedModel {timing['saved_model_seconds']:.3f} s",
              flush=True)

    wall = time.time() - start
    cpu = sum(os.times()[:2])
    report(args, pre, rows, timing, q, feature_seconds, probe, wall, cpu, load_start)


def report(args, pre, rows, timing, q, feature_seconds, probe, wall, cpu, load_start) -> None:
    widths = "-".join(str(w) for w in args.widths)
    lines = [
        f"MNIST (public) -> Fashion-MNIST (private, 60,000 train / 10,000 test), small_cnn "
        f"widths {widths}. Pre-training: {pre['steps']} non-private Adam steps of 128 on MNIST "
        f"(MNIST test accuracy {pre['mnist_test_accuracy']:.4f}). DP: Poisson sampling, "
        f"expected batch {args.batch_size} (q = {q:.5f}), {args.steps} steps in every arm, clip "
        f"1 with unit-norm rescaling, SGD, delta = {DELTA}, PLD accountant. Learning rates fixed "
        f"in advance: fine-tuning {args.finetune_lr}, from scratch {args.scratch_lr}. One run "
        "per cell; sampling and noise seeds from the OS RNG.",
        "",
        "Test accuracy (same sampling rate, steps, clip and epsilon in the first four "
        "columns):",
        "",
        "| eps | sigma | classifier-only | all layers | from scratch "
        "| all layers - scratch | classifier-only, lr "
        f"{args.scratch_lr} | classifier-only, {args.long_head_steps} steps (sigma) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        long = r["classifier_only_long"]
        lines.append(
            f"| {r['epsilon']:g} | {r['noise_multiplier']:.3f} "
            f"| {100 * r['classifier_only']['accuracy']:.1f}% "
            f"| {100 * r['all_layers']['accuracy']:.1f}% "
            f"| {100 * r['scratch']['accuracy']:.1f}% "
            f"| {100 * (r['all_layers']['accuracy'] - r['scratch']['accuracy']):+.1f} points "
            f"| {100 * r['classifier_only_alt_lr']['accuracy']:.1f}% "
            f"| {100 * long['accuracy']:.1f}% ({long['noise_multiplier']:.3f}) |")
    lines += ["", f"Non-private reference (NOT DP, Adam, {args.probe_epochs} epochs): a linear "
              f"classifier on the same cached MNIST features reaches {100 * probe:.1f}% on "
              "the Fashion-MNIST test set: the ceiling of classifier-only fine-tuning here."]
    lines += ["", "Training seconds per run (same steps and batch):", "",
              "| eps | classifier-only (cached features) | classifier-only, "
              f"{args.long_head_steps} steps | all layers | from scratch |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['epsilon']:g} | {r['classifier_only']['train_seconds']:.1f} "
                     f"| {r['classifier_only_long']['train_seconds']:.1f} "
                     f"| {r['all_layers']['train_seconds']:.1f} "
                     f"| {r['scratch']['train_seconds']:.1f} |")
    lines += ["", f"Feature extraction (once, 70,000 images through the SavedModel): "
              f"{feature_seconds:.1f} s. MNIST pre-training: {pre['seconds']:.0f} s."]
    if timing:
        lines += ["", f"All-layers DP step, batch {timing['batch']}, median of "
                  f"{args.timing_steps}: .keras backbone (fast per-example convolutions) "
                  f"{timing['keras_seconds']:.3f} s; SavedModel backbone (slow path) "
                  f"{timing['saved_model_seconds']:.3f} s "
                  f"({timing['saved_model_seconds'] / timing['keras_seconds']:.1f}x)."]
    lines += ["", f"Wall time {wall:.0f} s, process CPU time {cpu:.0f} s, on {os.cpu_count()} "
              "CPU threads shared with other jobs (load average at "
              f"start {load_start}, at end {load_average()}), TF {tf.__version__}, Keras "
              f"{keras.__version__}.", "",
              "Command: `python benchmarks/finetune.py " + " ".join(
                  f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                  for k, v in vars(args).items()
                  if v is not None and k not in ("workdir", "results_dir")) + "`"]
    table = "\n".join(lines)
    print("\n" + table)
    results = pathlib.Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "finetune.md").write_text(table + "\n")
    pre = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in pre.items()}
    (results / "finetune.json").write_text(json.dumps(
        {"machine": platform.platform(), "args": vars(args), "pretraining": pre,
         "sampling_rate": q, "delta": DELTA, "feature_seconds": feature_seconds,
         "nonprivate_linear_probe_accuracy": probe, "cpu_seconds": cpu,
         "rows": rows, "all_layers_step_timing": timing, "wall_seconds": wall,
         "load_average_start": load_start, "load_average_end": load_average()}, indent=2))


if __name__ == "__main__":
    main()
