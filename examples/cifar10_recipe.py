"""The paper's CIFAR-10 recipe with the Python API (De et al. 2022, WRN-16-4).

    python examples/cifar10_recipe.py --data-dir ~/data          # the eps=8 setting; needs a GPU/TPU
    python examples/cifar10_recipe.py --steps 20 --batch-size 256 --augmult 2 --width 1   # CPU check

CIFAR-10 is read from --data-dir (the python or binary tarball / extracted folder) or from
tensorflow_datasets. Pieces: Poisson batches with gradient accumulation, augmentation
multiplicity (reflect-pad 4, crop, flip), WS + GroupNorm Wide-ResNet, clipping with unit-norm
rescaling, noise calibrated to the target epsilon for the planned steps, EMA of the weights.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import dp_keras_scale as dks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=2468)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--microbatch-size", type=int, default=256)
    parser.add_argument("--augmult", type=int, default=16)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2.0)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    args = parser.parse_args()

    x, y = dks.data.load("cifar10", "train", data_dir=args.data_dir)
    x_test, y_test = dks.data.load("cifar10", "test", data_dir=args.data_dir)
    sampler = dks.data.BatchSampler(len(x), args.batch_size,
                                    microbatch_size=args.microbatch_size)
    train_ds = sampler.dataset(x, y, map_fn=dks.data.augmult_map(args.augmult, pad=4, flip=True,
                                                                 dtype="float32"))

    inputs = keras.Input((32, 32, 3))
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    body = dks.models.wide_resnet(args.depth, args.width, 10, model_class=keras.Model)
    model = dks.DPScaleModel(inputs, body(scaled))
    model.compile(
        optimizer=dks.DPSGD(learning_rate=args.learning_rate, l2_norm_clip=1.0,
                            noise_multiplier=None,   # calibrated by PrivacyBudget below
                            rescale_to_unit_norm=True,
                            gradient_accumulation_steps=sampler.accumulation_steps,
                            expected_batch_size=sampler.expected_batch_size),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    budget = dks.callbacks.PrivacyBudget(delta=args.delta, sampling_rate=sampler.sampling_rate,
                                         dataset_size=len(x), target_epsilon=args.epsilon,
                                         planned_steps=args.steps)
    steps_per_epoch = min(args.steps, -(-len(x) // args.batch_size))
    model.fit(train_ds, epochs=-(-args.steps // steps_per_epoch),
              steps_per_epoch=steps_per_epoch * sampler.accumulation_steps,
              callbacks=[budget, dks.callbacks.EMA(args.ema_decay)], verbose=2)

    accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
    with dks.callbacks.averaged_weights(model, "ema"):
        ema_accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
    print(dks.accounting.privacy_statement(
        model.optimizer.noise_multiplier, sampler.sampling_rate, int(model.optimizer.iterations),
        args.delta, 1.0, dataset_size=len(x), augmult=args.augmult))
    print(f"Test accuracy: {accuracy:.4f} (EMA weights: {ema_accuracy:.4f}); "
          f"epsilon = {budget.epsilon_now:.3f} at delta = {args.delta:g}")


if __name__ == "__main__":
    main()
