"""One benchmark row for dp-keras-scale (Keras 3 / TensorFlow, XLA), as a user runs it.

    python benchmarks/peers/bench_keras.py --method dp --batch 16 --copies 4 --out row.json

Methods:
- nonprivate: the same WRN-16-4 as a plain `keras.Model`, SGD, on the B*K images;
- dp: `dks.models.wide_resnet` (a `DPScaleModel`) compiled with `dks.DPSGD`, on [B, K, ...]
  batches: per-example gradient of the mean loss over the K copies, clipped, summed, noised.
Both compile with ``jit_compile=True`` and step through `train_on_batch` (Keras's compiled
train function, the one `fit` runs).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("nonprivate", "dp")


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
    if args.method == "dp":
        model = dks.models.wide_resnet(common.DEPTH, common.WIDTH, common.NUM_CLASSES,
                                       groups=common.GROUPS, weight_standardization=False)
        optimizer = dks.DPSGD(common.LEARNING_RATE, l2_norm_clip=common.L2_NORM_CLIP,
                              noise_multiplier=common.NOISE_MULTIPLIER)
        inputs, labels = x, y                                   # [B, K, 32, 32, 3], [B]
    else:
        model = dks.models.wide_resnet(common.DEPTH, common.WIDTH, common.NUM_CLASSES,
                                       groups=common.GROUPS, weight_standardization=False,
                                       model_class=keras.Model)
        optimizer = keras.optimizers.SGD(common.LEARNING_RATE)
        inputs = x.reshape(-1, *common.IMAGE_SHAPE)             # [B*K, 32, 32, 3]
        labels = np.repeat(y, args.copies)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=True)

    def step():
        return model.train_on_batch(inputs, labels)             # returns numpy: synchronous

    times = common.time_steps(step, args.steps, args.warmup)
    common.write_result(
        args, framework="ours", method=args.method,
        versions={"dp-keras-scale": dks.__version__, "tensorflow": tf.__version__,
                  "keras": keras.__version__},
        params=model.count_params(), times=times,
        notes="XLA (jit_compile=True); DP step = DPScaleModel.train_step via train_on_batch"
        if args.method == "dp" else "")


if __name__ == "__main__":
    main()
