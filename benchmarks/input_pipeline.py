"""Augmentation-multiplicity input pipeline vs the DP training step it feeds, in images/s.

    python benchmarks/input_pipeline.py                      # K = 1, 4, 16; expected batch 256
    python benchmarks/input_pipeline.py --copies 16 --batches 10 --train-steps 2   # quicker

For each data set (Fashion-MNIST 28x28x1 from dks.data.load, and random CIFAR-shaped 32x32x3
uint8 data) and each K, measures:
- pipeline: `BatchSampler(N, 256).dataset(x, y, map_fn=augmult_map(K))` (Poisson batches padded
  with a mask, gathered, augmented K times), iterated after warm-up: padded rows x K images/s;
- augment op alone: `augment_images` on one fixed padded batch, with XLA (the default) and
  op by op;
- DP training step: `dks.models.small_cnn` (a DPScaleModel, DPSGD, jit_compile=True) on the
  pipeline's own [B, K, H, W, C] uint8 batch with its mask, median of `--train-steps` steps
  after two warm-up steps.
The pipeline and the step are timed one after the other (each may use every core); the ratio
pipeline / step says how much faster the input side is. Results go to
benchmarks/results/input_pipeline.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no "failed call to cuInit" error line

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_keras_scale as dks  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def load_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "fashion_mnist":
        return dks.data.load("fashion_mnist", "train")
    rng = np.random.default_rng(0)          # CIFAR-10-shaped: 50,000 uint8 images 32x32x3
    return (rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, 50_000))


def images_per_second(iterator, images_per_batch: int, warmup: int, batches: int,
                      min_seconds: float) -> float:
    """Rate over at least `batches` batches and `min_seconds` seconds, after `warmup` batches
    (long enough that batches prefetched during warm-up do not inflate it)."""
    for _ in range(warmup):
        next(iterator)
    start, count = time.perf_counter(), 0
    while count < batches or time.perf_counter() - start < min_seconds:
        next(iterator)
        count += 1
    return images_per_batch * count / (time.perf_counter() - start)


def op_images_per_second(images: tf.Tensor, copies: int, jit_compile: bool, repeats: int,
                         min_seconds: float) -> float:
    augment = tf.function(lambda batch: dks.data.augment_images(batch, copies,
                                                                jit_compile=jit_compile))
    for _ in range(3):
        augment(images).numpy()
    start, count = time.perf_counter(), 0
    while count < repeats or time.perf_counter() - start < min_seconds:
        augment(images).numpy()
        count += 1
    return images.shape[0] * copies * count / (time.perf_counter() - start)


def train_images_per_second(batch, input_shape, expected_batch_size: float, steps: int) -> float:
    x, y, mask = batch
    keras.backend.clear_session()
    model = dks.models.small_cnn(input_shape, 10)
    model.compile(optimizer=dks.DPSGD(0.5, l2_norm_clip=1.0, noise_multiplier=1.0,
                                      expected_batch_size=expected_batch_size),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    for _ in range(2):
        model.train_on_batch(x, y, sample_weight=mask)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y, sample_weight=mask)
        times.append(time.perf_counter() - start)
    return x.shape[0] * x.shape[1] / statistics.median(times)


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", default="1,4,16", help="comma-separated K values")
    parser.add_argument("--batch", type=float, default=256, help="expected (Poisson) batch size")
    parser.add_argument("--batches", type=int, default=20,
                        help="timed pipeline batches per row (at least)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="timed seconds per pipeline row (at least)")
    parser.add_argument("--train-steps", type=int, default=3, help="timed DP steps per row")
    parser.add_argument("--data", default="fashion_mnist,cifar_shaped",
                        help="comma-separated: fashion_mnist, cifar_shaped")
    parser.add_argument("--train-data", default="fashion_mnist",
                        help="data sets whose DP step is timed too (comma-separated, or none)")
    args = parser.parse_args()
    copies_list = [int(k) for k in args.copies.split(",")]
    train_data = [] if args.train_data == "none" else args.train_data.split(",")

    load_before = load_average()
    rows = []
    for name in args.data.split(","):
        x, y = load_data(name)
        shape = x.shape[1:]
        sampler = dks.data.BatchSampler(len(x), args.batch, seed=0)
        rows_per_batch = sampler.padded_batch_size
        plain = iter(sampler.dataset(x, y))
        sampler_rate = images_per_second(plain, rows_per_batch, 10, args.batches,
                                         args.seconds)
        print(f"{name}: BatchSampler alone {sampler_rate:,.0f} rows/s "
              f"({rows_per_batch} padded rows per batch)", flush=True)
        fixed = tf.constant(x[:rows_per_batch])
        for copies in copies_list:
            row = {"data": name, "shape": "x".join(map(str, shape)), "K": copies,
                   "rows": rows_per_batch, "sampler_rows_per_s": sampler_rate}
            ds = sampler.dataset(x, y, map_fn=dks.data.augmult_map(copies))
            iterator = iter(ds)
            row["pipeline"] = images_per_second(iterator, rows_per_batch * copies, 10,
                                                args.batches, args.seconds)
            row["op_xla"] = op_images_per_second(fixed, copies, True, args.batches,
                                                 args.seconds)
            row["op_plain"] = op_images_per_second(fixed, copies, False, args.batches,
                                                   args.seconds)
            if name in train_data:
                batch = tuple(t.numpy() for t in next(iterator))
                row["train"] = train_images_per_second(batch, shape, args.batch,
                                                       args.train_steps)
                row["ratio"] = row["pipeline"] / row["train"]
            print(f"{name} K={copies}: pipeline {row['pipeline']:,.0f} img/s, op XLA "
                  f"{row['op_xla']:,.0f}, op plain {row['op_plain']:,.0f}"
                  + (f", DP step {row['train']:,.0f} img/s, ratio {row['ratio']:.1f}x"
                     if "train" in row else ""), flush=True)
            rows.append(row)

    header = (f"Expected batch {args.batch:g} (Poisson, padded to the rows shown), uint8 "
              f"images, {os.cpu_count()} CPU threads, TF {tf.__version__}, "
              f"Keras {keras.__version__}; pipeline: >= {args.batches} batches and "
              f">= {args.seconds:g} s after 10 warm-up; DP step: small_cnn, XLA, median of "
              f"{args.train_steps} steps; load average before {load_before}, after "
              f"{load_average()} (1/5/15 min)")
    lines = [header, "",
             "| data | K | rows x K per batch | pipeline (img/s) | augment op, XLA (img/s) "
             "| augment op, op by op (img/s) | DP step small_cnn (img/s) | pipeline / step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        train = f"{r['train']:,.0f}" if "train" in r else "-"
        ratio = f"{r['ratio']:.1f}x" if "ratio" in r else "-"
        lines.append(f"| {r['data']} {r['shape']} | {r['K']} | {r['rows']} x {r['K']} "
                     f"| {r['pipeline']:,.0f} | {r['op_xla']:,.0f} | {r['op_plain']:,.0f} "
                     f"| {train} | {ratio} |")
    samplers = {r["data"]: r["sampler_rows_per_s"] for r in rows}
    lines += ["", "BatchSampler alone (no augmentation): " + ", ".join(
        f"{d} {v:,.0f} rows/s" for d, v in samplers.items())]
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "input_pipeline.md").write_text(table + "\n")
    (RESULTS / "input_pipeline.json").write_text(json.dumps(
        {"machine": platform.platform(), "args": vars(args), "load_before": load_before,
         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
