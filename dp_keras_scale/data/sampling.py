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

from dp_keras_scale.options import SAMPLINGS


class SamplerCore:
    """The privacy-critical part of every sampler: the sampling law, its padding and its checks.

    `BatchSampler` (one input pipeline) and `dks.distribute.DistributedBatchSampler` (one per
    worker) both build on this class, so the rules the accountant relies on live here once:

    1. **Validation**: N is a positive integer, the expected batch size is in (0, N] (an integer
       for fixed-size sampling), the overflow bound is in (0, 1).
    2. **The sampling law** (`draw`): Poisson sampling includes every example of the population
       independently with probability q = expected_batch_size / N, read from
       ``self.sampling_rate`` at each draw; fixed-size sampling draws exactly q * N examples
       without replacement.
    3. **Padding** (`sample_size_bound`): a sample is padded with -1 to a size it exceeds with
       probability at most the overflow bound, computed exactly from the binomial law
       (``scipy.stats.binom.isf``) and never above the population.
    4. **Overflow**: a sample larger than its padded size raises `RuntimeError`; no example is
       ever dropped (that would break the accounting).
    5. **Epoch length** (`steps_per_epoch`): ceil(1 / q) logical steps, each
       ``accumulation_steps`` Keras steps.

    Formal guarantee: `draw` returns, for each logical step, the indices of a Poisson sample of
    rate q of the population (or a uniformly random q * N subset), in random order, followed by
    padding; with the sample drawn from an RNG independent of the data, this is the subsampling
    the accountant's ``sampling_rate`` and ``sampling`` describe.

    Args:
        num_examples: dataset size N.
        expected_batch_size: q * N.
        sampling: "poisson" or "fixed" (see `dp_keras_scale.options.SAMPLINGS`).
        overflow_probability: bound on the chance that a sample exceeds its padded size.

    Example:
        >>> core = SamplerCore(60000, 256)
        >>> core.sampling_rate, core.sample_size_bound(60000, 1e-12) > 256
        (0.004266666666666667, True)
    """

    #: Keras steps per logical step; subclasses set it once they have planned micro-batches.
    accumulation_steps: int = 1

    def __init__(self, num_examples: int, expected_batch_size: float,
                 sampling: str = "poisson", overflow_probability: float = 1e-12):
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
        if not 0 < overflow_probability < 1:
            raise ValueError(f"overflow_probability must be in (0, 1), got "
                             f"{overflow_probability}")
        self.num_examples = int(num_examples)
        self.expected_batch_size = float(expected_batch_size)
        self.sampling = sampling
        self.sampling_rate = self.expected_batch_size / self.num_examples
        self.overflow_probability = float(overflow_probability)

    @property
    def steps_per_epoch(self) -> int:
        """Keras steps (micro-batches) for one expected pass over the data."""
        return math.ceil(1 / self.sampling_rate) * self.accumulation_steps

    def sample_size_bound(self, population: int, overflow_probability: float) -> int:
        """The padded size of one sample drawn from `population` examples.

        Args:
            population: how many examples the sample is drawn from (N, or a worker's shard).
            overflow_probability: the most probability a Poisson sample may exceed the bound.

        Returns:
            The batch size for fixed-size sampling; for Poisson sampling the least size s
            with P[Binomial(population, q) > s] <= overflow_probability, at least 1 and at most
            `population` (a sample never holds more).
        """
        if self.sampling == "fixed":
            return int(self.expected_batch_size)
        need = int(stats.binom.isf(overflow_probability, population, self.sampling_rate)) + 1
        return max(1, min(need, population))

    @staticmethod
    def plan_microbatches(need: int, microbatch_size: int | None, *, name: str = "microbatch_size",
                          parts: int = 1, row_multiple: int = 1) -> tuple[int, int]:
        """Splits a padded sample of `need` rows into equal micro-batches, padding minimally.

        Args:
            need: rows one logical step must hold.
            microbatch_size: the most rows per micro-batch and part (memory bound); None: all.
            name: the argument's name in the error message.
            parts: the rows of each micro-batch are split evenly into this many parts
                (replicas).
            row_multiple: round the rows per part up to a multiple of this.

        Returns:
            ``(accumulation_steps, rows)``: micro-batches per logical step and rows per part
            of each; ``accumulation_steps * parts * rows >= need``.
        """
        per_part = math.ceil(need / parts)
        cap = microbatch_size or per_part
        if int(cap) != cap or cap < 1:
            raise ValueError(f"{name} must be a positive integer, got {microbatch_size}")
        if int(row_multiple) != row_multiple or row_multiple < 1:
            raise ValueError(f"row_multiple must be a positive integer, got {row_multiple}")
        accumulation_steps = math.ceil(per_part / cap)
        rows = math.ceil(per_part / accumulation_steps)
        return accumulation_steps, math.ceil(rows / row_multiple) * row_multiple

    def draw(self, rng: np.random.Generator, padded_size: int,
             population: np.ndarray | None = None) -> np.ndarray:
        """One logical step's sample, in random order, padded with -1 to `padded_size`.

        Args:
            rng: the random stream (independent of the data).
            padded_size: the length of the result.
            population: the example indices to sample from; default all ``num_examples``.

        Returns:
            An int64 array of `padded_size` indices, -1 for padding.

        Raises:
            RuntimeError: the sample does not fit into `padded_size` (examples are never
                dropped).
        """
        size = self.num_examples if population is None else len(population)
        if self.sampling == "poisson":
            chosen = np.flatnonzero(rng.random(size) < self.sampling_rate)
        else:
            chosen = rng.choice(size, int(self.expected_batch_size), replace=False)
        if population is not None:
            chosen = population[chosen]
        if len(chosen) > padded_size:
            raise RuntimeError(
                f"A Poisson sample of {len(chosen)} examples exceeded the padded size "
                f"{padded_size}. Dropping examples would break the privacy accounting: use a "
                "smaller overflow_probability.")
        out = np.full(padded_size, -1, dtype=np.int64)
        out[:len(chosen)] = rng.permutation(chosen)
        return out


class BatchSampler(SamplerCore):
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
        super().__init__(num_examples, expected_batch_size, sampling, overflow_probability)
        need = self.sample_size_bound(self.num_examples, self.overflow_probability)
        self.accumulation_steps, self.microbatch_size = self.plan_microbatches(
            need, microbatch_size)
        self.padded_batch_size = self.accumulation_steps * self.microbatch_size
        self._rng = np.random.default_rng(
            seed if seed is not None else int.from_bytes(os.urandom(16), "little"))

    def sample_indices(self) -> np.ndarray:
        """One logical batch: example indices padded with -1 to `padded_batch_size`."""
        return self.draw(self._rng, self.padded_batch_size)

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
