"""Quick start with the Python API: DP-train a compact CNN on Fashion-MNIST (real data, offline).

    python examples/quickstart.py                 # about 3-6 min on 2 CPU cores, ~86% at eps 3
    python examples/quickstart.py --epsilon 8 --epochs 16

The same run from the command line: `dp-keras-scale train --config fashion_mnist_cpu`.

Poisson sampling, noise calibrated to the target epsilon by the accountant, weight-standardized
GroupNorm CNN, clipped gradients rescaled to unit norm (De et al. 2022).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import dp_keras_scale as dks  # noqa: E402

# Published pixel statistics (public constants: nothing is computed on the private data).
PIXEL_MEAN_STD = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024, help="expected (Poisson) batch")
    parser.add_argument("--microbatch-size", type=int, default=256)
    parser.add_argument("--widths", default="16,32", help="the CNN's two conv widths")
    parser.add_argument("--learning-rate", type=float, default=4.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="sampling/noise seed (testing)")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train on the first N examples only (smoke tests)")
    args = parser.parse_args()

    start = time.time()
    x_train, y_train = dks.data.load(args.dataset, "train")
    x_test, y_test = dks.data.load(args.dataset, "test")
    if args.train_subset:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    n = len(x_train)
    sampler = dks.data.BatchSampler(n, args.batch_size, microbatch_size=args.microbatch_size,
                                    seed=args.seed)
    q = args.batch_size / n
    steps_per_epoch = -(-n // args.batch_size)
    steps = args.epochs * steps_per_epoch
    sigma = dks.accounting.calibrate_noise_multiplier(args.epsilon, q, steps, args.delta)
    print(f"{args.dataset}: {n} training examples; Poisson rate q={q:.4f}, {steps} steps, "
          f"noise multiplier {sigma:.3f} for eps={args.epsilon} at delta={args.delta}")

    mean, std = PIXEL_MEAN_STD[args.dataset]
    model = dks.models.compact_cnn(x_train.shape[1:], 10, mean=mean, std=std,
                                   widths=tuple(int(w) for w in args.widths.split(",")))
    model.compile(
        optimizer=dks.DPSGD(learning_rate=args.learning_rate, momentum=args.momentum,
                            l2_norm_clip=args.clip, noise_multiplier=sigma,
                            rescale_to_unit_norm=True,
                            gradient_accumulation_steps=sampler.accumulation_steps,
                            expected_batch_size=sampler.expected_batch_size,
                            noise_seed=args.seed),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    budget = dks.callbacks.PrivacyBudget(delta=args.delta, sampling_rate=q, dataset_size=n,
                                         target_epsilon=args.epsilon, planned_steps=steps)
    model.fit(sampler.dataset(x_train, y_train, steps=steps), epochs=args.epochs,
              steps_per_epoch=steps_per_epoch * sampler.accumulation_steps,
              callbacks=[budget], verbose=2)

    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[:2]
    statement = dks.accounting.privacy_statement(sigma, q, int(model.optimizer.iterations),
                                                 args.delta, args.clip, dataset_size=n)
    print()
    print(statement)
    print()
    print(f"Test accuracy: {accuracy:.4f} on {len(x_test)} {args.dataset} test images; "
          f"privacy spent: (eps={budget.epsilon_now:.3f}, delta={args.delta}); "
          f"wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
