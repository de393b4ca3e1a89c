"""DP fine-tuning with the Python API: public pre-training (MNIST), private Fashion-MNIST.

    python examples/finetune.py                 # about 5-10 min on 2 CPU cores
    python examples/finetune.py --quick         # a tiny run (smoke test), about a minute

1. Pre-trains `dks.models.small_cnn` non-privately on MNIST, which plays the public data, and
   saves it as a `.keras` file (any pretrained Keras model, SavedModel or TF-Hub handle works).
2. DP-fine-tunes it on Fashion-MNIST (the private data) at one epsilon, two ways, with the same
   Poisson sampling rate, steps, noise, clip and accountant:
   - classifier only: the backbone is frozen, its features are computed once
     (`dks.finetune.extract_features`) and DP-SGD trains a new zero-initialized classifier on
     the feature rows (`dks.finetune.classifier_head`): each step costs one Dense layer;
   - all layers: DP-SGD through every layer (`dks.finetune.build(mode="all_layers")`).
3. Prints both test accuracies and the epsilon each run spent.

The same from the command line (features cached in the run directory):

    dp-keras-scale train --config fashion_mnist_finetune_cpu --set finetune.source=PRETRAINED.keras

The guarantee covers the Fashion-MNIST training set only; the pre-training data must be public.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_keras_scale as dks  # noqa: E402
from dp_keras_scale import finetune  # noqa: E402

# Published pixel statistics of MNIST (public constants), standardized inside the model.
MNIST_MEAN_STD = (0.1307, 0.3081)
DELTA = 1e-5


def pretrain(steps: int, widths: tuple[int, ...], path: str) -> float:
    """Non-private MNIST pre-training; saves the model to `path`, returns its MNIST accuracy."""
    x, y = dks.data.load("mnist", "train")
    x_test, y_test = dks.data.load("mnist", "test")
    model = dks.models.small_cnn((28, 28, 1), 10, widths=widths, mean=MNIST_MEAN_STD[0],
                                 std=MNIST_MEAN_STD[1], model_class=keras.Model)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x)).repeat().batch(128)
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    model.save(path)
    return float(model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[1])


def dp_fit(model: keras.Model, x, y, sigma: float, args) -> int:
    """DP-SGD with Poisson sampling for `args.steps` logical steps; returns the steps taken."""
    sampler = dks.data.BatchSampler(len(x), args.batch_size, microbatch_size=args.microbatch,
                                    seed=args.seed)
    model.compile(optimizer=dks.DPSGD(learning_rate=args.learning_rate, l2_norm_clip=1.0,
                                      noise_multiplier=sigma, rescale_to_unit_norm=True,
                                      gradient_accumulation_steps=sampler.accumulation_steps,
                                      expected_batch_size=sampler.expected_batch_size,
                                      noise_seed=args.seed),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(sampler.dataset(x, y, steps=args.steps), epochs=1,
              steps_per_epoch=args.steps * sampler.accumulation_steps, verbose=0)
    return int(model.optimizer.iterations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=100, help="DP-SGD steps of each run")
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch")
    parser.add_argument("--microbatch", type=int, default=320)
    parser.add_argument("--learning-rate", type=float, default=1.0,
                        help="the paper's fine-tuning learning rate")
    parser.add_argument("--pretrain-steps", type=int, default=469,
                        help="non-private MNIST steps of 128 (469 = one epoch)")
    parser.add_argument("--widths", default="16,32,32,64", help="conv widths of the CNN")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="fine-tune on the first N Fashion-MNIST examples only")
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--out", default=None, help="where the pretrained .keras file goes")
    parser.add_argument("--seed", type=int, default=None,
                        help="initialization, sampling and noise seed (testing only)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run: 30 pre-training steps, 2000 examples, 5 DP steps")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.steps, args.batch_size, args.microbatch = 30, 5, 200, 400
        args.train_subset, args.test_subset = args.train_subset or 2000, args.test_subset or 1000
        args.widths = "8,16"
    widths = tuple(int(w) for w in args.widths.split(","))
    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)

    start = time.time()
    out = args.out or tempfile.mkdtemp(prefix="dks_finetune_")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "mnist_small_cnn.keras")
    accuracy = pretrain(args.pretrain_steps, widths, path)
    print(f"Pre-trained on MNIST (public, non-private): {args.pretrain_steps} steps of 128, "
          f"MNIST test accuracy {accuracy:.4f}; saved to {path}")

    x, y = dks.data.load("fashion_mnist", "train")
    x_test, y_test = dks.data.load("fashion_mnist", "test")
    x, y = x[:args.train_subset], y[:args.train_subset]
    x_test, y_test = x_test[:args.test_subset], y_test[:args.test_subset]
    q = args.batch_size / len(x)
    sigma = dks.accounting.calibrate_noise_multiplier(args.epsilon, q, args.steps, DELTA)
    print(f"Fashion-MNIST (private): {len(x)} examples, Poisson rate q={q:.5f}, {args.steps} "
          f"steps, noise multiplier {sigma:.4f} for epsilon={args.epsilon:g} at delta={DELTA:g}")

    # Classifier only: the frozen backbone's features, computed once, are the training rows.
    model = finetune.build(path, 10, mode="classifier_only", classifier="reset")
    features = finetune.extract_features(model, x, verbose=1)
    head = finetune.classifier_head(model)           # shares model's "classifier" layer
    steps = dp_fit(head, features, y, sigma, args)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], optimizer=head.optimizer)
    accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[1]   # on images
    eps = dks.accounting.epsilon(sigma, q, steps, DELTA)
    print(f"classifier only: test accuracy {accuracy:.4f}; epsilon = {eps:.3f} at delta = "
          f"{DELTA:g} ({steps} steps)")

    # All layers: per-example gradients through the whole pretrained network.
    model = finetune.build(path, 10, mode="all_layers", classifier="reset")
    steps = dp_fit(model, x, y, sigma, args)
    accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[1]
    eps = dks.accounting.epsilon(sigma, q, steps, DELTA)
    print(f"all layers: test accuracy {accuracy:.4f}; epsilon = {eps:.3f} at delta = "
          f"{DELTA:g} ({steps} steps)")
    print(f"Done in {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
