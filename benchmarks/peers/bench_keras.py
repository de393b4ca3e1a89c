"""One benchmark row for dp-keras-scale (Keras 3 / TensorFlow), as a user runs it.

    python benchmarks/peers/bench_keras.py --method dp --batch 16 --copies 4 --out row.json

Methods (every step through `train_on_batch`, Keras's compiled train function, the one `fit`
runs):
- nonprivate: the same WRN-16-4 as a plain `keras.Model`, SGD, on the B*K images, XLA;
- dp: `dks.models.wide_resnet` (a `DPScaleModel`) compiled with `dks.DPSGD`, on [B, K, ...]
  batches: per-example gradient of the mean loss over the K copies, clipped, summed, noised;
  XLA, the default (per-example) clipping path;
- nonprivate_nojit: `nonprivate` without XLA;
- dp_batched: `dp` without XLA, ``clipping_method = "auto"`` (batched per-layer clipping,
  the CPU configs' setting);
- dp_batched_ws: `dp_batched` with weight-standardised convolutions (the paper's model).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("nonprivate", "dp", "nonprivate_nojit", "dp_batched", "dp_batched_ws")


def main() -> None:
    args = common.parse_args(METHODS)
    common.apply_threads(args.threads)

    import keras
    import numpy as np
    import tensorflow as tf

    import dp_keras_scale as dks

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    x, y = common.synthetic_batch(args.batch, args.copies)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    private = args.method.startswith("dp")
    jit = args.method in ("nonprivate", "dp")
    model = dks.models.wide_resnet(common.DEPTH, common.WIDTH, common.NUM_CLASSES,
                                   groups=common.GROUPS,
                                   weight_standardization=args.method == "dp_batched_ws",
                                   model_class=dks.DPScaleModel if private else keras.Model)
    if private:
        if not jit:
            model.clipping_method = "auto"
        optimizer = dks.DPSGD(common.LEARNING_RATE, l2_norm_clip=common.L2_NORM_CLIP,
                              noise_multiplier=common.NOISE_MULTIPLIER)
        inputs, labels = x, y                                   # [B, K, 32, 32, 3], [B]
    else:
        optimizer = keras.optimizers.SGD(common.LEARNING_RATE)
        inputs = x.reshape(-1, *common.IMAGE_SHAPE)             # [B*K, 32, 32, 3]
        labels = np.repeat(y, args.copies)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit)

    def step():
        return model.train_on_batch(inputs, labels)             # returns numpy: synchronous

    times = common.time_steps(step, args.steps, args.warmup)
    common.write_result(
        args, framework="ours", method=args.method,
        versions={"dp-keras-scale": dks.__version__, "tensorflow": tf.__version__,
                  "keras": keras.__version__},
        params=model.count_params(), times=times,
        notes={"dp": "XLA (jit_compile=True); DP step = DPScaleModel.train_step via "
                     "train_on_batch",
               "dp_batched_ws": "WS convolutions (the paper's model); its ratio is to the "
                                "plain-convolution non-private step"}.get(args.method, ""))


if __name__ == "__main__":
    main()
