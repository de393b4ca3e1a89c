"""DP training throughput with 1 vs 2 replicas (MirroredStrategy), side by side, in images/s.

    python benchmarks/replicas.py                        # small_cnn and WRN-16-4, 5 rounds
    python benchmarks/replicas.py --models small_cnn --rounds 2 --steps 4    # quicker
    python benchmarks/replicas.py --devices GPU          # on a machine with 2+ GPUs

On a CPU-only machine the physical CPU is split into 2 logical devices (this must happen
before TensorFlow starts, hence a script of its own). Both logical devices share the same
cores and thread pools, so a second replica adds synchronisation (an all-reduce of the
clipped sums per micro-batch) without adding compute: expect no speed-up there. On GPUs or
TPU cores every replica brings its own compute.

For every model the same global batch (B examples, K=1) is timed. The three models are built
and traced first, then timed in rounds that alternate the configurations (machine load
drifts), each round a `model.fit` over a repeated in-memory batch; a configuration's time is
the median over rounds of each round's median step time. Rows:
- 1 device: no strategy;
- 1 replica: MirroredStrategy over one device (the strategy's own overhead);
- 2 replicas: MirroredStrategy over two devices, each clipping half of the batch.
Results go to benchmarks/results/replicas.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no "failed call to cuInit" error line

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_keras_scale as dks  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MODELS = {  # name: (input shape, global batch)
    "small_cnn": ((28, 28, 1), 64),
    "wrn_16_4": ((32, 32, 3), 16),
}


def split_cpu(parts: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(parts)])


class StepTimer(keras.callbacks.Callback):
    """Wall time of each Keras training step."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self.start = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def build(name: str, strategy, jit: bool) -> keras.Model:
    shape, _ = MODELS[name]
    with strategy.scope():
        keras.utils.set_random_seed(0)
        if name == "small_cnn":
            model = dks.models.small_cnn(shape, 10)
        else:
            model = dks.models.wide_resnet(16, 4, num_classes=10, input_shape=shape)
        model.compile(optimizer=dks.DPSGD(0.5, l2_norm_clip=1.0, noise_multiplier=1.0,
                                          expected_batch_size=MODELS[name][1]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
    return model


def batches(name: str) -> tf.data.Dataset:
    shape, batch = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    return tf.data.Dataset.from_tensors((x, y, np.ones(batch, np.float32))).repeat()


def time_steps(model: keras.Model, data: tf.data.Dataset, steps: int) -> float:
    """Median seconds per DP step over `steps` steps of one `fit` call."""
    timer = StepTimer()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    return statistics.median(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small_cnn,wrn_16_4")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per model")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--devices", default="CPU", choices=["CPU", "GPU"])
    parser.add_argument("--jit", default="off", choices=["off", "on"],
                        help="XLA compilation of the step (Keras's 'auto' leaves it off on "
                             "CPU-only machines and under tf.distribute; XLA cannot compile a "
                             "MirroredStrategy step over several CPU devices)")
    args = parser.parse_args()
    jit = args.jit == "on"
    if args.devices == "CPU":
        split_cpu(2)
    devices = [d.name for d in tf.config.list_logical_devices(args.devices)][:2]
    if len(devices) < 2:
        raise SystemExit(f"Need 2 {args.devices} devices, found {devices}.")

    configs = {   # one strategy object per configuration for the whole run: new strategies
        # over the same devices would reuse the collective keys of earlier ones
        "1 device": tf.distribute.get_strategy(),
        "1 replica": tf.distribute.MirroredStrategy(devices[:1]),
        "2 replicas": tf.distribute.MirroredStrategy(devices),
    }
    load = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        batch = MODELS[name][1]
        data = batches(name)
        models = {}
        for config, strategy in configs.items():   # build and trace once (2 warm-up steps)
            models[config] = build(name, strategy, jit)
            time_steps(models[config], data, 2)
        seconds = {config: [] for config in configs}
        for round_ in range(args.rounds):
            for config, model in models.items():
                seconds[config].append(time_steps(model, data, args.steps))
                print(f"{name} round {round_ + 1}: {config}: {seconds[config][-1]:.3f} s/step",
                      flush=True)
        del models
        row = {"model": name, "global_batch": batch}
        for config, values in seconds.items():
            row[config] = {"seconds_per_step": values,
                           "images_per_s": batch / statistics.median(values)}
        row["2 replicas / 1 device"] = (row["2 replicas"]["images_per_s"]
                                        / row["1 device"]["images_per_s"])
        rows.append(row)

    header = (f"DP step (K=1, sigma=1), {args.devices}: {', '.join(devices)}; "
              f"{os.cpu_count()} CPU cores, TF {tf.__version__}, Keras {keras.__version__}, "
              f"XLA {args.jit}; median over {args.rounds} alternating rounds of the median of "
              f"{args.steps} steps; load average at start {load[0]:.1f}")
    command = "python benchmarks/replicas.py " + " ".join(sys.argv[1:])
    lines = [header, "", f"Command: `{command.strip()}`", "",
             "| model | global batch | 1 device (img/s) | 1 replica (img/s) | 2 replicas (img/s) "
             "| 2 replicas / 1 device |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['global_batch']} "
                     f"| {r['1 device']['images_per_s']:.1f} "
                     f"| {r['1 replica']['images_per_s']:.1f} "
                     f"| {r['2 replicas']['images_per_s']:.1f} "
                     f"| {r['2 replicas / 1 device']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.devices == "CPU" else f"_{args.devices.lower()}"
    (RESULTS / f"replicas{suffix}.md").write_text(table + "\n")
    (RESULTS / f"replicas{suffix}.json").write_text(json.dumps(
        {"machine": platform.platform(), "load_average": load, "args": vars(args),
         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
