"""One WS convolution at a time: the DP step's cost by route, against the non-private step.

    python benchmarks/conv_layers.py                    # WRN-16-4's convolution shapes
    python benchmarks/conv_layers.py --settings 64x1 --steps 5

Each model is one `WSConv2D` (3x3, no bias) of a WRN-16-4 stage on its input size, then
global average pooling and Dense(10), so that the convolution dominates. For each (B, K) the
step runs as a plain `keras.Model` (non-private), and as a `DPScaleModel` with
``clipping_method`` "materialize" (per-example kernel gradients from the grouped op),
"ghost" (norms from the patches' Gram matrix, book-keeping sum) and "auto" (the route timed
fastest for the shape, `dks.layers.conv_routes`: possibly the extracted patches' product or
einsums, which no forced method runs), without XLA. Times are medians of `--steps` steps
after two warm-up steps, all in this process, one model after another; the ratios to the non-private step are what to read (absolute times
depend on the machine's load). Writes benchmarks/results/conv_layers.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

RESULTS = pathlib.Path(__file__).parent / "results"
# WRN-16-4 on 32x32 inputs: (label, input size, input channels, filters, stride)
SHAPES = [("stage 1, 16->64", 32, 16, 64, 1), ("stage 1, 64->64", 32, 64, 64, 1),
          ("stage 2, 64->128 /2", 32, 64, 128, 2), ("stage 2, 128->128", 16, 128, 128, 1),
          ("stage 3, 128->256 /2", 16, 128, 256, 2), ("stage 3, 256->256", 8, 256, 256, 1)]
METHODS = ("nonprivate", "materialize", "ghost", "auto")


def step_ms(size, cin, cout, stride, batch, copies, method, steps) -> float:
    import keras
    import numpy as np

    import dp_keras_scale as dks

    private = method != "nonprivate"
    inputs = keras.Input((size, size, cin))
    h = dks.layers.WSConv2D(cout, 3, strides=stride, padding="same", use_bias=False)(inputs)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    model = (dks.DPScaleModel if private else keras.Model)(inputs, outputs)
    if private:
        model.clipping_method = method
    optimizer = (dks.DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0) if private
                 else keras.optimizers.SGD(0.1))
    model.compile(optimizer=optimizer, jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((batch * copies, size, size, cin), dtype=np.float32)
    y = rng.integers(0, 10, batch * copies)
    if private:
        x, y = x.reshape(batch, copies, size, size, cin), y.reshape(batch, copies)
    for _ in range(2):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="64x1,16x4", help="BxK,BxK,...")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per model")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no "failed call to cuInit" error line
    settings = [tuple(int(v) for v in item.split("x")) for item in args.settings.split(",")]
    rows = []
    for batch, copies in settings:
        for label, size, cin, cout, stride in SHAPES:
            ms = {m: step_ms(size, cin, cout, stride, batch, copies, m, args.steps)
                  for m in METHODS}
            rows.append({"B": batch, "K": copies, "layer": label, "ms": ms})
            ratios = "  ".join(f"{m} {ms[m] / ms['nonprivate']:.2f}x" for m in METHODS[1:])
            print(f"({batch}, {copies}) {label:22s} non-private {ms['nonprivate']:6.1f} ms  "
                  f"{ratios}", flush=True)
    lines = ["One `WSConv2D` (3x3) + pooling + Dense(10), no XLA; step time in ms (DP / "
             f"non-private); median of {args.steps} steps. Load average at the end: "
             f"{os.getloadavg()[0]:.2f}. Command: `python benchmarks/conv_layers.py "
             f"--settings {args.settings} --steps {args.steps}`", "",
             "| (B, K) | layer | non-private | materialize | ghost | auto |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[m]:.1f} ({ms[m] / ms['nonprivate']:.2f}x)" for m in METHODS[1:]]
        lines.append(f"| ({r['B']}, {r['K']}) | {r['layer']} | {ms['nonprivate']:.1f} | "
                     + " | ".join(cells) + " |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conv_layers.md").write_text("\n".join(lines) + "\n")
    (out / "conv_layers.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
