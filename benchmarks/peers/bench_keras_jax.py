"""One benchmark row for Keras 3 on the JAX backend, with jax_privacy's Keras API for DP.

    python benchmarks/peers/bench_keras_jax.py --method dp --batch 16 --copies 4 --out row.json

Methods:
- nonprivate: the WRN as a plain `keras.Model` (JAX backend), SGD, on the B*K images;
- dp: the same model wrapped by `jax_privacy.keras_api.make_private` (noise multiplier 1,
  clip 1), SGD. Its train step clips each ROW of the batch (`x` is [B*K, 32, 32, 3]); the
  Keras API has no augmentation-grouped clipping, so with K > 1 each augmented image is
  clipped separately (labelled).
Both compile with ``jit_compile=True`` and step through `train_on_batch`.
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("nonprivate", "dp")


def wide_resnet(keras, depth: int, width: int, num_classes: int, groups: int):
    """The layers of dks.models.wide_resnet(weight_standardization=False), plain Keras."""
    def conv(filters, kernel, stride):
        return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same",
                                   use_bias=False, kernel_initializer="he_normal")

    inputs = keras.Input(shape=common.IMAGE_SHAPE)
    x = conv(16, 3, 1)(inputs)
    for stage, filters in enumerate([16 * width, 32 * width, 64 * width]):
        for block in range((depth - 4) // 6):
            stride = 2 if stage > 0 and block == 0 else 1
            pre = keras.layers.ReLU()(keras.layers.GroupNormalization(groups)(x))
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = conv(filters, 1, stride)(pre)
            y = conv(filters, 3, stride)(pre)
            y = keras.layers.ReLU()(keras.layers.GroupNormalization(groups)(y))
            y = conv(filters, 3, 1)(y)
            x = keras.layers.Add()([shortcut, y])
    x = keras.layers.ReLU()(keras.layers.GroupNormalization(groups)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer="zeros")(x)
    return keras.Model(inputs, outputs)


def main() -> None:
    args = common.parse_args(METHODS)
    common.apply_threads(args.threads)
    os.environ["KERAS_BACKEND"] = "jax"

    import jax
    import keras
    import numpy as np

    if keras.config.backend() != "jax":
        raise SystemExit(f"Keras runs on {keras.config.backend()!r}, expected 'jax'")
    versions = {"keras": keras.__version__, "jax": jax.__version__}
    x, y = common.synthetic_batch(args.batch, args.copies)
    rows = args.batch * args.copies
    inputs, labels = x.reshape(rows, *common.IMAGE_SHAPE), np.repeat(y, args.copies)
    model = wide_resnet(keras, common.DEPTH, common.WIDTH, common.NUM_CLASSES, common.GROUPS)
    params = model.count_params()
    notes = ""
    if args.method == "dp":
        import jax_privacy
        from jax_privacy import keras_api

        versions["jax-privacy"] = jax_privacy.__version__
        # epsilon/train_steps/train_size only feed the API's budget check; sigma is fixed at 1.
        config = keras_api.DPKerasConfig(
            epsilon=100.0, delta=1e-5, clipping_norm=common.L2_NORM_CLIP, batch_size=rows,
            gradient_accumulation_steps=1, train_steps=1000, train_size=1000 * rows,
            noise_multiplier=common.NOISE_MULTIPLIER, rescale_to_unit_norm=False, seed=0)
        model = keras_api.make_private(model, config)
        if args.copies > 1:
            notes = (f"per-row clipping: {rows} rows of one image each (the Keras API has no "
                     "augmentation-grouped clipping)")
    model.compile(optimizer=keras.optimizers.SGD(common.LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)

    def step():
        return model.train_on_batch(inputs, labels)             # returns numpy: synchronous

    times = common.time_steps(step, args.steps, args.warmup)
    common.write_result(args, framework="keras-jax", method=args.method, versions=versions,
                        params=params, times=times, notes=notes)


if __name__ == "__main__":
    main()
