"""Which way a convolution's per-example gradient norms are formed, per layer shape.

`ghost_clipping` needs, for every example, the squared norm of its kernel gradient and, once
the clip factors are known, the clipped sum. Five routes give the same numbers:

- ``"ghost"``: norms from the Gram matrices of the example's input patches
  (`conv.patch_gram`) and output gradients; the sum is one batched kernel gradient of the
  re-weighted rows. No per-example gradients in memory.
- ``"grouped"``: per-example kernel gradients from one grouped native op (TensorFlow's oneDNN
  CPU kernels only: `conv.grouped_kernel_gradients_available`).
- ``"patches"``: per-example kernel gradients as a batched product of the extracted patches with
  the output gradients (`conv.patch_kernel_gradients`).
- ``"einsum"``: per-example kernel gradients from one batched einsum per kernel offset
  (`conv.per_example_kernel_gradients`: the form XLA compiles well).
- ``"loop"``: per-example kernel gradients from the native kernel-gradient op run on each
  example in a loop (`conv.looped_kernel_gradients`; timed without XLA only).

Which one is fastest depends on the layer's shape and on the machine: on a 2-core x86 CPU the
grouped op costs from 1.5x to more than 6x the batch's kernel gradient over the bundled
models' layers (it is slow with 32 or more output channels per example and few input
channels), extracted patches cost kh kw / (sh sw) times the input's memory, and the ghost route
grows with the square of the positions. So with ``method="auto"`` and no XLA, `conv_route`
times the plausible routes once per layer shape in each process (a few calls each, on random
data, when the step is first traced) and keeps the fastest (`timed_routes` lists them); under
XLA, or where a shape is not static (a dataset batched without ``drop_remainder``;
`dks.data.BatchSampler`'s micro-batches are static), it picks by a flop count. Every route equals the per-example reference up to float
rounding (tests), so the choice changes speed, not the result beyond rounding.
"""

from __future__ import annotations

import statistics
import threading
import time

import tensorflow as tf

from dp_keras_scale.layers.conv import (
    batched_kernel_gradient,
    ghost_channel_norms,
    grouped_kernel_gradients,
    grouped_kernel_gradients_available,
    looped_kernel_gradients,
    patch_gram_elements,
    patch_gram_flops,
    patch_kernel_gradients,
    per_example_kernel_gradients,
)

ROUTES = ("ghost", "grouped", "patches", "einsum", "loop")

# Materialised per-example kernel gradients cost about this many times the flops of the
# batch's kernel gradient, and the ghost route pays its Gram matrices on top of one batched
# kernel gradient. 2.5 sends every convolution of the bundled models measured (WRN-16-4,
# small_cnn, compact_cnn) to the faster of the two (the flop rule, used where nothing is timed).
MATERIALIZE_COST = 2.5
# The ghost route is timed only where its flops are below this many times materialising's.
GHOST_TIMED_BELOW = 3.0
# A route other than the flop count's pick is timed only where what it holds (per-example
# gradients, Gram matrices, extracted patches) fits in this many bytes or in the layer's own
# input and output gradient (timing the Gram matrices of WRN-16-4's 16x16 stage at K = 4
# raised the process's peak memory by up to 600 MiB, and the step would hold as much again).
ROUTE_MAX_BYTES = 64 << 20
# A timed route replaces the flop rule's pick only when it is this much faster.
TIMED_MARGIN = 0.8
TIMING_CALLS = 3

_timed: dict[tuple, tuple[str, dict[str, float]]] = {}
_timing_lock = threading.Lock()


def timed_routes() -> list[dict]:
    """What `conv_route` has timed in this process: per layer shape, the seconds of each
    candidate route (median of the calls) and the route kept.

    Example:
        >>> model.fit(ds, epochs=1)          # DPScaleModel, clipping_method="auto", no XLA
        >>> [(t["input_shape"], t["route"]) for t in timed_routes()]   # compact_cnn_x2
        [((256, 28, 28, 1), 'patches'), ((256, 13, 13, 32), 'ghost')]
    """
    return [{"input_shape": key[0], "output_gradient_shape": key[1], "kernel_size": key[2],
             "strides": key[3], "padding": key[4], "copies": key[5], "route": route,
             "seconds": dict(seconds)} for key, (route, seconds) in _timed.items()]


def materialized_kernel_gradients(route: str, x: tf.Tensor, dy: tf.Tensor,
                                  kernel_size: tuple[int, int], strides: tuple[int, int],
                                  padding: str, examples) -> tuple[tf.Tensor, int]:
    """Each example's kernel gradient, flattened to [B, D, O] (examples axis 0) or, for
    ``"grouped"``, the op's own [D, B, O] (axis 1: no transpose of B x parameters).

    Example:
        >>> per, axis = materialized_kernel_gradients("patches", x, dy, (3, 3), (1, 1),
        ...                                           "SAME", batch)
    """
    kh, kw = kernel_size
    d_in, o = kh * kw * x.shape[-1], dy.shape[-1]
    if route == "grouped":
        per = grouped_kernel_gradients(x, dy, kernel_size, strides, padding, examples,
                                       examples_first=False)
        return tf.reshape(per, [d_in, -1, o]), 1
    if route == "patches":
        return patch_kernel_gradients(x, dy, kernel_size, strides, padding, examples), 0
    if route in ("einsum", "loop"):
        form = per_example_kernel_gradients if route == "einsum" else looped_kernel_gradients
        per = form(x, dy, kernel_size, strides, padding, examples)
        return tf.reshape(per, [-1, d_in, o]), 0
    raise ValueError(f"no per-example kernel gradients for route {route!r}; one of "
                     f"{ROUTES[1:]}")


def _ghost_and_materialized_flops(input_shape, kernel_size, strides, padding, copies,
                                  positions, cout) -> tuple[int, int]:
    """Multiply-adds per example of the ghost norms and of one materialised gradient."""
    kh, kw = kernel_size
    ghost = (patch_gram_flops(input_shape, kernel_size, strides, padding, copies)
             + positions * positions * cout)
    return ghost, positions * kh * kw * input_shape[-1] * cout


def _route_bytes(x_shape, cout, positions, copies, kernel_size, strides,
                 padding) -> dict[str, int]:
    """Bytes (float32) each route holds for the whole micro-batch, besides the layer's input
    and output gradient."""
    examples, d_in = x_shape[0] // copies, kernel_size[0] * kernel_size[1] * x_shape[-1]
    per_example = d_in * cout
    gram = patch_gram_elements(x_shape[1:], kernel_size, strides, padding, copies)
    return {route: 4 * examples * size for route, size in {
        "ghost": gram + positions * cout, "grouped": per_example, "einsum": 2 * per_example,
        "patches": per_example + positions * d_in, "loop": per_example}.items()}


def conv_route(method: str, x: tf.Tensor, dy: tf.Tensor, positions: int | None, copies,
               kernel_size: tuple[int, int], strides: tuple[int, int], padding: str,
               xla: bool) -> str:
    """The route (one of `ROUTES`) of one convolution in a DP step.

    `x` [B*K, H, W, C] and `dy` [B*K, Ho, Wo, O] are the layer's input and output gradient,
    `positions` the K x Ho x Wo rows of each example (None if unknown). `method`: "ghost" or
    "materialize" force a route ("materialize": the grouped op without XLA where it runs,
    else the einsums); "auto" times the plausible routes without XLA (see the module
    docstring) and otherwise compares flops.

    Example:
        >>> conv_route("auto", x, dy, 1024, 1, (3, 3), (1, 1), "SAME", xla=False)
        'grouped'
    """
    default = "einsum" if xla or not grouped_kernel_gradients_available() else "grouped"
    if positions is None or not x.shape[1:].is_fully_defined():
        return default                 # the Gram matrices need static sizes
    if method != "auto":
        return "ghost" if method == "ghost" else default
    ghost, materialized = _ghost_and_materialized_flops(
        tuple(x.shape[1:]), kernel_size, strides, padding, copies, positions, dy.shape[-1])
    by_flops = "ghost" if ghost < (MATERIALIZE_COST - 1) * materialized else default
    if xla or x.shape[0] is None or copies is None or not dy.shape.is_fully_defined():
        return by_flops
    budget = max(ROUTE_MAX_BYTES, 4 * (x.shape.num_elements() + dy.shape.num_elements()))
    held = _route_bytes(tuple(x.shape), dy.shape[-1], positions, copies, kernel_size,
                        strides, padding)
    candidates = [route for route in ROUTES
                  if route == by_flops
                  or (held[route] <= budget
                      and (route != "ghost" or ghost < GHOST_TIMED_BELOW * materialized)
                      and (route != "grouped" or default == "grouped"))]
    if len(candidates) == 1:
        return by_flops
    key = (tuple(x.shape), tuple(dy.shape), tuple(kernel_size), tuple(strides),
           padding.upper(), copies, tuple(candidates), by_flops)
    with _timing_lock:
        if key not in _timed:
            with tf.init_scope():
                _timed[key] = _fastest(candidates, by_flops, tuple(x.shape), tuple(dy.shape),
                                       kernel_size, strides, padding, copies)
        return _timed[key][0]


def _fastest(candidates, preferred, x_shape, dy_shape, kernel_size, strides, padding,
             copies) -> tuple[str, dict[str, float]]:
    """Times each candidate's norms + clipped sum (eagerly, on random data of the layer's
    shapes): the fastest (`preferred` unless another is clearly faster) and the medians."""
    examples = x_shape[0] // copies
    x = tf.random.stateless_normal(x_shape, seed=[0, 1])       # no variables: this may run
    dy = tf.random.stateless_normal(dy_shape, seed=[0, 2])     # in a replica's context
    factors = tf.random.stateless_uniform([examples], seed=[0, 3])

    def work(route):
        if route == "ghost":
            q = ghost_channel_norms(x, dy, kernel_size, strides, padding, copies, examples)
            rows = tf.reshape(tf.repeat(factors, copies), [-1, 1, 1, 1])
            total = batched_kernel_gradient(x, dy * rows, (*kernel_size, x_shape[-1],
                                                           dy_shape[-1]), strides, padding)
        else:
            per, axis = materialized_kernel_gradients(route, x, dy, kernel_size, strides,
                                                      padding, examples)
            q = tf.reduce_sum(tf.square(per), axis=1 - axis)
            total = (tf.tensordot(factors, per, axes=1) if axis == 0
                     else tf.matmul(tf.reshape(factors, [1, 1, -1]), per))
        return tf.reduce_sum(q) + tf.reduce_sum(total)

    steps = {route: tf.function(lambda route=route: work(route)) for route in candidates}
    seconds = {route: [] for route in candidates}
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")    # one trace per route and shape is the plan, not a retracing bug
    try:
        for route, step in steps.items():
            step().numpy()                               # trace and warm up
    finally:
        logger.setLevel(level)
    for _ in range(TIMING_CALLS):                        # interleaved: load hits all alike
        for route, step in steps.items():
            start = time.perf_counter()
            step().numpy()
            seconds[route].append(time.perf_counter() - start)
    median = {route: statistics.median(s) for route, s in seconds.items()}
    best = min(median, key=median.get)
    if preferred in median and median[best] > TIMED_MARGIN * median[preferred]:
        best = preferred
    return best, median
