"""Any functional or Sequential Keras model, made private with `dks.make_private` (MNIST).

    python examples/custom_model.py                      # a few minutes on 2 CPU cores
    python examples/custom_model.py --train-subset 2000 --epochs 1
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
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=None)
    args = parser.parse_args()

    x, y = dks.data.load("mnist", "train")
    x_test, y_test = dks.data.load("mnist", "test")
    if args.train_subset:
        x, y = x[:args.train_subset], y[:args.train_subset]

    # An ordinary Keras model: GroupNorm instead of BatchNorm (BatchNorm mixes examples).
    base = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(16, 5, strides=2, padding="same", activation="relu"),
        keras.layers.GroupNormalization(groups=4),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model = dks.make_private(base)           # shares base's layers and weights

    batch = 256
    sampler = dks.data.BatchSampler(len(x), batch)
    steps_per_epoch = -(-len(x) // batch)
    steps = args.epochs * steps_per_epoch
    sigma = dks.accounting.calibrate_noise_multiplier(args.epsilon, sampler.sampling_rate,
                                                      steps, 1e-5)
    model.compile(optimizer=dks.DPSGD(2.0, l2_norm_clip=1.0, noise_multiplier=sigma,
                                      rescale_to_unit_norm=True,
                                      expected_batch_size=sampler.expected_batch_size),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    budget = dks.callbacks.PrivacyBudget(delta=1e-5, sampling_rate=sampler.sampling_rate,
                                         dataset_size=len(x), target_epsilon=args.epsilon)
    model.fit(sampler.dataset(x, y), epochs=args.epochs, steps_per_epoch=steps_per_epoch,
              callbacks=[budget], verbose=2)
    base.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"])
    accuracy = base.evaluate(x_test, y_test, verbose=0)[1]
    print(f"Test accuracy of the original (now DP-trained) model: {accuracy:.4f}; "
          f"epsilon = {budget.epsilon_now:.3f} at delta = 1e-05")


if __name__ == "__main__":
    main()
