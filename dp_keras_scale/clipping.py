"""Per-example gradients (vectorized over examples x augmentation copies), clipping and noise.

This is where the privacy guarantee is made. For a micro-batch of B examples, each with K
augmented copies, `clipped_gradient_sum` returns

    sum_i  w_i * clip_C( grad of (mean loss over the K copies of example i) )

where w_i in [0, 1] is the example's mask/weight, clip_C scales a gradient to L2 norm <= C
(or to <= 1 with `rescale_to_unit_norm`), and an example whose gradient is NaN or infinite
contributes exactly zero. `gaussian_noise` draws the noise added once per logical step.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Sequence

import tensorflow as tf

from dp_keras_scale.layers.conv import per_example_convolutions


@dataclasses.dataclass
class ClippedSum:
    """Result of `clipped_gradient_sum` for one micro-batch."""

    gradients: list[tf.Tensor]   # summed clipped gradients, one per variable
    losses: tf.Tensor            # [B] per-example loss (mean over copies); 0 where invalid
    predictions: tf.Tensor       # [B, K, ...] model outputs for every copy
    valid: tf.Tensor             # [B] float: 1 where the example counted (mask > 0, finite)
    nonfinite: tf.Tensor         # scalar: masked-in examples dropped for a NaN/Inf gradient
    clipped: tf.Tensor           # scalar: examples whose gradient norm exceeded the clip norm


def clip_factors(norms: tf.Tensor, l2_norm_clip: float, rescale_to_unit_norm: bool) -> tf.Tensor:
    """Per-example multipliers that bring each gradient to norm <= C (or <= 1 when rescaled).

    Example:
        >>> clip_factors(tf.constant([0.5, 4.0]), 2.0, False).numpy()
        array([1. , 0.5], dtype=float32)
    """
    c = tf.cast(l2_norm_clip, norms.dtype)
    numerator = tf.ones_like(c) if rescale_to_unit_norm else c
    return numerator / tf.maximum(norms, c)


_warned_fallback: set[tuple[int, str]] = set()


def _warn_fallback(model, reason: str) -> None:
    if (id(model), reason) not in _warned_fallback:
        _warned_fallback.add((id(model), reason))
        warnings.warn(f"Model '{model.name}': per-example clipping uses the per-example path "
                      f"(exact, slower) because {reason}.", stacklevel=4)


def clipped_gradient_sum(
    loss_fn: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    variables: Sequence[tf.Variable],
    x, y, weights: tf.Tensor,
    l2_norm_clip: float,
    rescale_to_unit_norm: bool = False,
    *,
    model=None,
    method: str = "reference",
    xla: bool = True,
) -> ClippedSum:
    """Sums per-example clipped gradients of `loss_fn` over a micro-batch.

    Two implementations give the same result: the per-example reference (``method=
    "reference"``, this function's body: every example differentiated on its own under
    `tf.vectorized_map`) and, when `model` is given, the batched path of
    `dp_keras_scale.ghost_clipping` (``method="auto"``, ``"ghost"`` or ``"materialize"``: one
    forward and backward pass of the whole micro-batch, per-layer gradient norms). A model the
    batched path cannot compute exactly uses the reference, with a one-time warning.

    Args:
        loss_fn: `(x_i, y_i) -> (loss, predictions)` for ONE example: `x_i` holds its K copies
            (leading axis K) and `loss` is the scalar mean over them.
        variables: the trainable variables.
        x, y: nests of tensors with leading axes [B, K, ...] (labels may be [B, K] or [B, K, C]).
        weights: [B] per-example weights in [0, 1] (a 0/1 mask for padded rows). Values are
            clamped into [0, 1] so that no example can weigh more than the clip norm.
        l2_norm_clip: the clip norm C.
        rescale_to_unit_norm: divide clipped gradients by C (their norm is then <= 1).
        model: the Keras model `loss_fn` runs (needed by the batched path).
        method: "reference", or "auto" / "ghost" / "materialize" for the batched path.
        xla: whether XLA compiles the step (the batched path then forms per-example
            convolution kernel gradients with einsums; outside XLA, with one grouped native
            op: each is much faster where it is used).

    Example:
        >>> out = clipped_gradient_sum(loss_fn, model.trainable_variables, x, y,
        ...                            tf.ones([batch]), l2_norm_clip=1.0)
    """
    variables = list(variables)
    if model is not None and method != "reference":
        from dp_keras_scale import ghost_clipping     # imports this module

        result = ghost_clipping.fast_clipped_gradient_sum(
            model, variables, x, y, weights, l2_norm_clip, rescale_to_unit_norm, method=method,
            xla=xla, on_fallback=lambda reason: _warn_fallback(model, reason))
        if result is not None:
            return result

    def per_example(args):
        xi, yi = args
        with tf.GradientTape() as tape:
            loss, pred = loss_fn(xi, yi)
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros(v.shape, loss.dtype) if g is None else g
                 for g, v in zip(grads, variables)]
        return grads, loss, pred

    with per_example_convolutions():
        grads, losses, predictions = tf.vectorized_map(per_example, (x, y))

    weights = tf.clip_by_value(tf.cast(weights, losses.dtype), 0.0, 1.0)
    squared = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)
                        for g in grads])
    norms = tf.sqrt(squared)
    finite = tf.math.is_finite(norms) & tf.math.is_finite(losses)
    counted = finite & (weights > 0)
    factors = tf.where(counted, clip_factors(norms, l2_norm_clip, rescale_to_unit_norm) * weights,
                       tf.zeros_like(norms))

    def weighted_sum(g):
        keep = tf.reshape(counted, [-1] + [1] * (g.shape.rank - 1))
        return tf.tensordot(factors, tf.where(keep, g, tf.zeros([], g.dtype)), axes=1)

    in_mask = weights > 0
    return ClippedSum(
        gradients=[weighted_sum(g) for g in grads],
        losses=tf.where(counted, losses, tf.zeros_like(losses)),
        predictions=predictions,
        valid=tf.cast(counted, losses.dtype),
        nonfinite=tf.reduce_sum(tf.cast(in_mask & ~finite, losses.dtype)),
        clipped=tf.reduce_sum(tf.cast(counted & (norms > l2_norm_clip), losses.dtype)),
    )


def split_noise_seed(seed: tf.Tensor, num_tensors: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Splits a noise key into ``num_tensors`` per-tensor keys ``[n, 2]`` and the next key.

    Counter-based: a pure function of ``seed``, so every replica holding the same key computes
    the same next key without communicating.

    Example:
        >>> keys, next_seed = split_noise_seed(tf.constant([1, 2], tf.int64), 3)
    """
    seeds = tf.random.experimental.stateless_split(seed, num=num_tensors + 1)
    return seeds[1:], seeds[0]


def gaussian_noise(shapes: Sequence[tf.TensorShape], stddev: float, seed: tf.Tensor,
                   dtype=tf.float32) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Independent N(0, stddev^2) noise for each shape, and the next seed.

    Uses counter-based stateless sampling: the same `seed` gives the same draw, and the returned
    next seed (split from `seed`, see `split_noise_seed`) never repeats a draw of an earlier step.

    Example:
        >>> noise, seed = gaussian_noise([w.shape for w in model.trainable_variables], 3.0, seed)
    """
    keys, next_seed = split_noise_seed(seed, len(shapes))
    noise = [tf.random.stateless_normal(shape, seed=keys[i], stddev=stddev, dtype=dtype)
             for i, shape in enumerate(shapes)]
    return noise, next_seed
