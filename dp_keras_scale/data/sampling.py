"""Batch sampling that the privacy accountant can describe: Poisson, or fixed size per step.

Poisson sampling includes every example independently with probability q at every logical
step, so batch sizes vary. To keep shapes static (XLA compiles once), each logical batch is
padded to a fixed size with a 0/1 mask and split into equal micro-batches that `DPSGD`
accumulates. The examples come from in-memory arrays or, for datasets too large for memory,
from a random-access source read by index (`random_access.tfds_source`), through the same
pipeline (`masked_microbatches`). Padding never drops an example: a batch larger than the
padded size (probability below `overflow_probability`, computed exactly from the binomial law)
raises an error.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import tensorflow as tf
from scipy import stats

SAMPLINGS = ("poisson", "fixed")


class BatchSampler:
    """Draws a fresh random batch of example indices for every logical step.

    Args:
        num_examples: dataset size N.
        expected_batch_size: q * N for Poisson sampling; the exact batch size for "fixed".
        sampling: "poisson" (each example independently with probability q) or "fixed"
            (a batch of exactly `expected_batch_size` examples drawn without replacement).
        microbatch_size: the most examples per micro-batch (memory bound); the padded logical
            batch is split into `accumulation_steps` equal micro-batches of at most this size,
            as small as needed to keep padding minimal. Default: one micro-batch.
        overflow_probability: bound on the chance that a Poisson batch exceeds the padded size.
        seed: integer seed (tests); by default the operating system's RNG.

    Pass `accumulation_steps` and `expected_batch_size` to `DPSGD`, and `sampling_rate` to the
    accountant. Example:
        >>> sampler = BatchSampler(len(x), expected_batch_size=256, microbatch_size=64)
        >>> opt = DPSGD(1.0, noise_multiplier=1.1,
        ...             gradient_accumulation_steps=sampler.accumulation_steps,
        ...             expected_batch_size=sampler.expected_batch_size)
        >>> model.fit(sampler.dataset(x, y), steps_per_epoch=sampler.steps_per_epoch, epochs=3)
    """

    def __init__(self, num_examples: int, expected_batch_size: float, sampling: str = "poisson",
                 microbatch_size: int | None = None, overflow_probability: float = 1e-12,
                 seed: int | None = None):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if int(num_examples) != num_examples or num_examples < 1:
            raise ValueError(f"num_examples must be a positive integer, got {num_examples}")
        if not 0 < expected_batch_size <= num_examples:
            raise ValueError(f"expected_batch_size must be in (0, num_examples={num_examples}], "
                             f"got {expected_batch_size}")
        if sampling == "fixed" and int(expected_batch_size) != expected_batch_size:
            raise ValueError("fixed-size sampling needs an integer batch size, got "
                             f"{expected_batch_size}")
        self.num_examples = int(num_examples)
        self.expected_batch_size = float(expected_batch_size)
        self.sampling = sampling
        self.sampling_rate = self.expected_batch_size / self.num_examples
        if sampling == "poisson":
            need = int(stats.binom.isf(overflow_probability, self.num_examples,
                                       self.sampling_rate)) + 1
        else:
            need = int(expected_batch_size)
        microbatch_size = microbatch_size or need
        if int(microbatch_size) != microbatch_size or microbatch_size < 1:
            raise ValueError(f"microbatch_size must be a positive integer, got {microbatch_size}")
        self.accumulation_steps = math.ceil(need / microbatch_size)
        self.microbatch_size = math.ceil(need / self.accumulation_steps)
        self.padded_batch_size = self.accumulation_steps * self.microbatch_size
        self._rng = np.random.default_rng(
            seed if seed is not None else int.from_bytes(os.urandom(16), "little"))

    @property
    def steps_per_epoch(self) -> int:
        """Keras steps (micro-batches) for one expected pass over the data."""
        return math.ceil(1 / self.sampling_rate) * self.accumulation_steps

    def sample_indices(self) -> np.ndarray:
        """One logical batch: example indices padded with -1 to `padded_batch_size`."""
        if self.sampling == "poisson":
            chosen = np.flatnonzero(self._rng.random(self.num_examples) < self.sampling_rate)
        else:
            chosen = self._rng.choice(self.num_examples, int(self.expected_batch_size),
                                      replace=False)
        if len(chosen) > self.padded_batch_size:
            raise RuntimeError(
                f"A Poisson batch of {len(chosen)} examples exceeded the padded size "
                f"{self.padded_batch_size}. Dropping examples would break the privacy "
                "accounting: use a smaller overflow_probability.")
        out = np.full(self.padded_batch_size, -1, dtype=np.int64)
        out[:len(chosen)] = self._rng.permutation(chosen)
        return out

    def dataset(self, x, y=None, steps: int | None = None,
                map_fn: Callable | None = None,
                num_classes: int | None = None) -> tf.data.Dataset:
        """An endless (or `steps` logical steps long) dataset of (x, y, mask) micro-batches.

        `x` and `y` are in-memory arrays, or `x` is a random-access source read by index
        (`dks.data.tfds_source(...)`, e.g. ImageNet) and `y` is None.
        `map_fn(x, y, mask) -> (x, y, mask)`, e.g. augmentation, runs on each micro-batch.
        Integer labels are checked here (`check_labels`): >= 0, and < `num_classes` if given.
        """
        if y is not None:
            check_labels(y, num_classes)
        return masked_microbatches(x, y, self.num_examples, self.sample_indices,
                                   self.padded_batch_size, self.microbatch_size, steps, map_fn)


def check_labels(y, num_classes: int | None = None) -> None:
    """Raises a one-line ``ValueError`` if integer class labels are negative or, given
    `num_classes`, not below it (TensorFlow would fail inside the training step instead).
    One-hot or float labels (2-d, or a float dtype) are left alone.

    Example:
        >>> check_labels(np.array([0, 9, 10]), num_classes=10)
        Traceback (most recent call last):
        ValueError: Labels must be class indices in 0..9 (num_classes=10); found 10 ...
    """
    labels = np.asarray(y)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or not labels.size:
        return
    low, high = int(labels.min()), int(labels.max())
    top = None if num_classes is None else int(num_classes) - 1
    if low >= 0 and (top is None or high <= top):
        return
    bad = labels < 0 if top is None else (labels < 0) | (labels > top)
    first = int(np.flatnonzero(bad)[0])
    valid = "non-negative class indices" if top is None else \
        f"class indices in 0..{top} (num_classes={num_classes})"
    raise ValueError(f"Labels must be {valid}; found {labels[first]} at index {first} "
                     f"({int(bad.sum())} of {labels.size} labels out of range, min {low}, "
                     f"max {high}).")


def masked_microbatches(x, y, num_examples: int, draw_indices: Callable[[], np.ndarray],
                        padded_size: int, microbatch_size: int, steps: int | None = None,
                        map_fn: Callable | None = None) -> tf.data.Dataset:
    """(x, y, mask) micro-batches of the padded index batches that `draw_indices` returns.

    Each call of `draw_indices` gives one logical batch of `padded_size` indices, -1 for
    padding (mask 0); it is cut into micro-batches of `microbatch_size` rows.
    `x` and `y` are arrays, or `y` is None and `x` is a random-access source (as
    `dks.data.tfds_source` returns): ``len(x)`` examples, ``x.tf_records(indices) ->
    (records, labels)`` reading a micro-batch of indices (-1: padding row), and
    ``x.tf_decode(record, real) -> image`` decoding one record (zeros where `real` is False),
    run per example in a parallel map before the rows are grouped back into the same
    micro-batch.
    """
    decode = None
    if y is None:
        read, decode = getattr(x, "tf_records", None), getattr(x, "tf_decode", None)
        if read is None or decode is None:
            raise TypeError(f"y is None, so x must be a random-access source with tf_records "
                            f"and tf_decode (dks.data.tfds_source(...)), got "
                            f"{type(x).__name__}; pass labels as y for in-memory arrays.")
        if len(x) != num_examples:
            raise ValueError(f"the source has {len(x)} examples, the sampler expects "
                             f"{num_examples} (num_examples)")
    else:
        x = tf.convert_to_tensor(x)
        y = tf.convert_to_tensor(y)
        if x.shape[0] != num_examples or y.shape[0] != num_examples:
            raise ValueError(f"x and y must have {num_examples} examples (num_examples), "
                             f"got {x.shape[0]} and {y.shape[0]}")

        def read(indices):
            safe = tf.maximum(indices, 0)
            return tf.gather(x, safe), tf.gather(y, safe)

    def logical_batches():
        step = 0
        while steps is None or step < steps:
            yield draw_indices()
            step += 1

    def gather(indices):
        xb, yb = read(indices)
        return xb, yb, tf.cast(indices >= 0, tf.float32)

    ds = tf.data.Dataset.from_generator(
        logical_batches, output_signature=tf.TensorSpec([padded_size], tf.int64))
    ds = ds.unbatch().batch(microbatch_size, drop_remainder=True)
    # deterministic=True even if the user's tf.data options allow reordering: a row or a
    # micro-batch that moved would join another logical step than the one that sampled it.
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if decode is not None:        # one image per map call, then the same rows regrouped
        ds = ds.unbatch().map(lambda xi, yi, mi: (decode(xi, mi > 0), yi, mi),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(microbatch_size, drop_remainder=True)
    if map_fn is not None:
        ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def poisson_batches(x, y, expected_batch_size: float, microbatch_size: int | None = None,
                    steps: int | None = None, seed: int | None = None
                    ) -> tuple[tf.data.Dataset, BatchSampler]:
    """Poisson-sampled, padded and masked micro-batches of (x, y); also returns the sampler.

    Example:
        >>> ds, sampler = poisson_batches(x, y, expected_batch_size=256, microbatch_size=64)
        >>> opt = DPSGD(1.0, noise_multiplier=1.1, expected_batch_size=256,
        ...             gradient_accumulation_steps=sampler.accumulation_steps)
    """
    sampler = BatchSampler(len(x), expected_batch_size, "poisson", microbatch_size, seed=seed)
    return sampler.dataset(x, y, steps), sampler
