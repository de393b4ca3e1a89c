"""Augmentation multiplicity: K independent random crops and flips of every example per step.

De et al. (2022) average each example's loss over K augmented copies before clipping its
gradient (K = 16 for CIFAR-10): the copies are reflect-padded by `pad` pixels, randomly cropped
back to H x W and randomly flipped left-right. This module turns batches of images
``[B, H, W, C]`` into ``[B, K, H, W, C]``, the layout `DPScaleModel` averages over.

Privacy: every copy of example i is computed from example i alone (its pixels and fresh
randomness independent of the data), so the clipped gradient of example i still depends on
example i only. Augmentation is part of the per-example loss and changes neither the clipping
sensitivity nor the accounting; the sampling (`BatchSampler`) is untouched.

Everything is TensorFlow ops vectorized over the batch, run inside a parallel `tf.data` map:
per-(example, copy) offsets and flips from stateless RNG ops, then two batched gathers (rows,
then columns) that read the padded image through reflected indices without materializing it,
compiled with XLA. Crops and flips only move pixels: the output keeps the input dtype (uint8
stays uint8, four times less memory than float32) unless `dtype` asks for a cast.
`dks.models.small_cnn` takes uint8-range pixels and rescales them itself.

Example:
    >>> x, y = dks.data.load("fashion_mnist", "train")
    >>> sampler = dks.data.BatchSampler(len(x), expected_batch_size=256)
    >>> ds = sampler.dataset(x, y, map_fn=dks.data.augmult_map(16))   # x: [B, 16, 28, 28, 1]
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

__all__ = ["augment_images", "augmult", "augmult_map"]


def _check_options(augmult: int, pad: int, flip: bool, crop: bool) -> None:
    if isinstance(augmult, bool) or not isinstance(augmult, int) or augmult < 1:
        raise ValueError(
            f"augmult must be a positive integer (the number of augmented copies per example, "
            f"e.g. 16 as in De et al. 2022, or 1 for a single augmentation), got {augmult!r}.")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative integer number of pixels, got {pad!r}.")
    for name, value in (("flip", flip), ("crop", crop)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")


def _as_seed(seed) -> tf.Tensor:
    """An int or shape-[2] seed as a stateless-RNG seed tensor; None draws one at random."""
    if seed is None:
        return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise TypeError(f"seed must be an integer or a shape-[2] integer tensor, got {seed.dtype}.")
    if seed.shape.rank == 0:
        return tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
    if seed.shape != (2,):
        raise ValueError(f"seed must be an integer or have shape [2], got shape {seed.shape}.")
    return tf.cast(seed, tf.int64)


def _reflect(index: tf.Tensor, size) -> tf.Tensor:
    """Maps indices in [1 - size, 2 * size - 2] into [0, size) by reflection (no edge repeat)."""
    index = tf.abs(index)
    return tf.where(index > size - 1, 2 * (size - 1) - index, index)


def _crop_and_flip(images: tf.Tensor, top: tf.Tensor, left: tf.Tensor, flipped: tf.Tensor,
                   pad: int, dtype: tf.DType) -> tf.Tensor:
    """Copy (b, k): the crop at (top, left) of image b reflect-padded by `pad`, maybe flipped.

    Reads the padded image through reflected indices instead of materializing it, gathers the
    rows of every copy ([B, K*H, W, C]), then their columns ([B, K, H, W, C]).
    """
    shape = tf.shape(images)
    batch, copies = shape[0], top.shape[1]
    height, width, channels = (images.shape[i] if images.shape[i] is not None else shape[i]
                               for i in (1, 2, 3))
    columns = tf.range(width)
    columns = tf.where(flipped[..., None], width - 1 - columns, columns)      # [B, K, W]
    rows = _reflect(top[..., None] + tf.range(height) - pad, height)          # [B, K, H]
    columns = _reflect(left[..., None] + columns - pad, width)                # [B, K, W]
    out = tf.gather(images, tf.reshape(rows, [batch, copies * height]), axis=1, batch_dims=1)
    out = tf.reshape(out, [batch, copies, height, width, channels])
    out = tf.gather(out, columns, axis=3, batch_dims=2)
    return tf.cast(out, dtype)


# XLA fuses the index arithmetic with the two gathers: about 4x faster on CPU than the op-by-op
# graph (measured in benchmarks/input_pipeline.py), and it runs fine inside tf.data maps.
_crop_and_flip_xla = tf.function(_crop_and_flip, jit_compile=True, autograph=False)


def augment_images(images, augmult: int, *, pad: int = 4, flip: bool = True, crop: bool = True,
                   seed=None, dtype=None, jit_compile: bool = True) -> tf.Tensor:
    """K independent random augmentations of each image: ``[B, H, W, C] -> [B, K, H, W, C]``.

    Each copy is a random H x W crop of the image reflect-padded by `pad` pixels (offsets
    uniform in ``{0, ..., 2 * pad}`` on each axis; `pad` must be smaller than H and W), then
    flipped left-right with probability 1/2 when `flip`. `crop=False` skips padding and
    cropping (`pad` is then unused). Every (example, copy) draws its own offsets and flip,
    independently of the others and of the pixels.

    Args:
        images: a ``[B, H, W, C]`` batch (any dtype; the output keeps it unless `dtype` is set).
        augmult: K >= 1, the number of copies per image.
        pad, flip, crop: the augmentation (see above). Use ``flip=False`` for digits.
        seed: a stateless seed (an int or a shape-[2] integer tensor): the same seed gives the
            same output. None draws a fresh seed on every call.
        dtype: cast the output to this dtype (e.g. "float32"); default: the input dtype.
        jit_compile: run the crop with XLA (default; much faster on CPU). Results are identical
            either way.

    Example:
        >>> images = tf.zeros([8, 32, 32, 3], tf.uint8)
        >>> augment_images(images, 16, seed=0).shape
        TensorShape([8, 16, 32, 32, 3])
    """
    _check_options(augmult, pad, flip, crop)
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(
            f"Expected a batch of images [B, H, W, C], got shape {images.shape}. Batch single "
            "images first (e.g. dks.data.BatchSampler(...).dataset(x, y)); inputs that already "
            "have a copies axis [B, K, H, W, C] must not be augmented twice.")
    dtype = tf.as_dtype(dtype) if dtype is not None else images.dtype
    pad = pad if crop else 0
    seeds = tf.random.experimental.stateless_split(_as_seed(seed), 3)
    batch = tf.shape(images)[0]
    if pad > 0:
        for axis, name in ((1, "height"), (2, "width")):
            size = images.shape[axis]
            if size is not None and pad >= size:
                raise ValueError(
                    f"Reflect padding needs pad < image {name}, got pad={pad} for {name} {size}.")
        if not images.shape[1:3].is_fully_defined():
            tf.debugging.assert_less(pad, tf.reduce_min(tf.shape(images)[1:3]),
                                     message="Reflect padding needs pad < image height, width")
        top, left = (tf.random.stateless_uniform([batch, augmult], seed=s, minval=0,
                                                 maxval=2 * pad + 1, dtype=tf.int32)
                     for s in (seeds[0], seeds[1]))
    elif not flip:   # nothing random: K exact copies
        return tf.cast(tf.repeat(images[:, None], augmult, axis=1), dtype)
    else:
        top = left = tf.zeros([batch, augmult], tf.int32)
    if flip:
        flipped = tf.random.stateless_uniform([batch, augmult], seed=seeds[2], minval=0,
                                              maxval=2, dtype=tf.int32) > 0
    else:
        flipped = tf.zeros([batch, augmult], tf.bool)
    crop_fn = _crop_and_flip_xla if jit_compile else _crop_and_flip
    return crop_fn(images, top, left, flipped, pad, dtype)


def _generator(seed: int | None) -> tf.random.Generator:
    """A generator of per-batch seeds; independent of TensorFlow's global seed."""
    if seed is None:
        return tf.random.Generator.from_non_deterministic_state()
    return tf.random.Generator.from_seed(seed)


def augmult_map(augmult: int, *, pad: int = 4, flip: bool = True, crop: bool = True,
                seed: int | None = None, dtype=None, jit_compile: bool = True) -> Callable:
    """A batch function ``(x, y[, mask]) -> (x', y[, mask])`` with x' = `augment_images(x, K)`.

    Pass it to ``BatchSampler.dataset(x, y, map_fn=...)`` or ``Dataset.map``. Labels and the
    mask pass through unchanged (`DPScaleModel` shares an example's label among its copies).
    Each call draws fresh augmentations from a `tf.random.Generator` seeded by `seed` (default:
    the OS entropy). A parallel map may hand those draws to batches in a different order from
    run to run; for bit-exact reproducibility use `augmult(dataset, ..., seed=...)`. Other
    options as in `augment_images`.

    Example:
        >>> sampler = dks.data.BatchSampler(len(x), expected_batch_size=256)
        >>> ds = sampler.dataset(x, y, map_fn=dks.data.augmult_map(16))   # x: [B, 16, H, W, C]
    """
    _check_options(augmult, pad, flip, crop)
    generator = _generator(seed)

    def augment_batch(x, *rest):
        step_seed = generator.make_seeds(1)[:, 0]
        x = augment_images(x, augmult, pad=pad, flip=flip, crop=crop, seed=step_seed,
                           dtype=dtype, jit_compile=jit_compile)
        return (x, *rest) if rest else x

    augment_batch.generator = generator   # its state (e.g. to checkpoint it with tf.train)
    return augment_batch


def augmult(data, augmult: int, *, pad: int = 4, flip: bool = True, crop: bool = True,
            seed: int | None = None, dtype=None, jit_compile: bool = True,
            num_parallel_calls: int | None = tf.data.AUTOTUNE) -> tf.data.Dataset:
    """Augmentation multiplicity on a `tf.data.Dataset` of batches: x becomes [B, K, H, W, C].

    `data` yields ``x``, ``(x, y)`` or ``(x, y, mask)`` with x ``[B, H, W, C]``, e.g.
    ``dks.data.BatchSampler(...).dataset(x, y)`` (Poisson batches padded with a mask). The other
    components pass through unchanged and stay aligned with their images. Every batch (and
    every pass over a finite dataset) gets fresh augmentations; with `seed` the whole sequence
    is reproducible. Options as in `augment_images`; `num_parallel_calls` is that of the map.

    In-memory arrays are refused (TypeError): augmenting them once would reuse the same K
    copies at every epoch instead of fresh ones per step, and batching them yourself would not
    be the sampling the accountant describes. Use
    ``BatchSampler(len(x), ...).dataset(x, y, map_fn=augmult_map(K))``, or `augment_images`
    for a one-off batch.

    Example:
        >>> sampler = dks.data.BatchSampler(len(x), expected_batch_size=4096, microbatch_size=256)
        >>> ds = dks.data.augmult(sampler.dataset(x, y), augmult=16, seed=0)
        >>> model.fit(ds, steps_per_epoch=sampler.steps_per_epoch, epochs=10)
    """
    _check_options(augmult, pad, flip, crop)
    if not isinstance(data, tf.data.Dataset):
        raise TypeError(
            f"augmult needs a tf.data.Dataset of batches, got {type(data).__name__}. For arrays "
            "(x, y) use dks.data.BatchSampler(len(x), expected_batch_size=...).dataset(x, y, "
            f"map_fn=dks.data.augmult_map({augmult})): fresh augmentations every step and "
            "sampling the accountant describes. dks.data.augment_images(images, K) augments a "
            "single batch.")
    spec = data.element_spec
    parts = spec if isinstance(spec, tuple) else (spec,)
    if not isinstance(parts[0], tf.TensorSpec) or len(parts) > 3 or any(
            not isinstance(p, tf.TensorSpec) for p in parts):
        raise TypeError(
            "augmult expects dataset elements x, (x, y) or (x, y, mask) of tensors with x a "
            f"batch of images [B, H, W, C]; got element_spec {spec}.")
    if parts[0].shape.rank != 4:
        raise ValueError(
            f"augmult expects batches of images [B, H, W, C], got x of shape {parts[0].shape}. "
            "Batch the dataset first (BatchSampler(...).dataset(x, y) does); do not augment a "
            "dataset that already has a copies axis.")
    # A cheap sequential map draws one stateless seed per batch in order (reproducible, and
    # fresh at every pass over a finite dataset); the crops then run in a parallel map.
    generator = _generator(seed)

    def attach_seed(*items):
        return items, generator.make_seeds(1)[:, 0]

    def augment_batch(items, step_seed):
        x = augment_images(items[0], augmult, pad=pad, flip=flip, crop=crop, seed=step_seed,
                           dtype=dtype, jit_compile=jit_compile)
        return (x, *items[1:]) if isinstance(spec, tuple) else x

    seeded = data.map(attach_seed)
    return seeded.map(augment_batch, num_parallel_calls=num_parallel_calls, deterministic=True)
