"""Clipped gradient sums from one batched pass: per-layer norms (ghost or materialised).

`clipping.clipped_gradient_sum` differentiates every example separately under
`tf.vectorized_map`. This module computes the same `ClippedSum` from ONE ordinary forward and
backward pass of the whole micro-batch (all B x K copies as one batch), in four stages:

1. **Record.** While the model runs, each layer that owns trainable variables records its
   input ``a`` and its pre-activation output ``z`` (for Dense/Conv2D/WSConv2D the output of
   the matmul/convolution, before bias and activation).
2. **Output gradients.** ``G = d(sum_i loss_i) / dz`` in one batched backward pass. Examples
   never mix (BatchNorm in training mode is refused), so the rows of example i in ``G`` are
   the gradient of example i's own loss (the mean over its K copies).
3. **Per-example norms, per layer.** Dense and Conv2D kernels: either the *ghost norm*
   ``||sum_t a_t g_t^T||^2 = sum_{t,t'} (a_t . a_t')(g_t . g_t')`` over the example's
   K x T rows (for a convolution ``a_t`` is the input patch of output position t, and the
   patches' Gram matrix is formed from the padded input's own, its kh x kw shifted blocks
   summed: `layers.conv.patch_gram`), or the per-example kernel gradients materialised
   (a grouped native op, a product of extracted patches, or batched einsums); which
   route a layer takes is chosen per shape (`layers.conv_routes`: timed, or by flops).
   WSConv2D: the norm of the raw-kernel gradient follows from the standardised-kernel
   gradient ``h`` by per-channel sums (the standardisation's Jacobian is
   ``g s (P - a s^2 u u^T)``, P the centring projection, u the centred kernel,
   s = 1/||u||): ``||h_o||^2`` (ghost, per channel), ``sum(h_o)`` (from the patches' sums)
   and the gain's own per-example gradient ``s u . h`` (contracted from ``h`` where it is
   materialised; on the ghost route, the sum of G times the layer's output divided by the
   gain). Biases: the sum of ``G``.
   GroupNormalization (channels last): scale ``sum G * x_hat`` and offset ``sum G`` over the
   example's rows; the layer runs as `layers.group_norm.group_normalization` (the same
   function, its backward pass in closed form), which keeps ``x_hat``'s pieces. Any
   other layer with trainable variables (custom layers) gets its per-example gradients by
   re-running just that layer under `tf.vectorized_map`. Each layer's work starts only once
   its output gradient exists (`_after`), so nothing formed from its input is held from the
   forward pass until the backward pass reaches the layer.
4. **Sum (book-keeping).** With the clip factors known, the clipped sum of each layer is one
   contraction of the stored inputs with the re-weighted output gradients (a native batched
   kernel-gradient op) or of the materialised gradients with the factors; a WSConv2D sum is
   pushed through the standardisation once.

Formal guarantee: the result equals `clipping.clipped_gradient_sum` (same clipping, weights
clamped into [0, 1], non-finite examples contributing exactly zero and counted, K copies
averaged before clipping) up to floating-point rounding, provided examples do not interact in
the forward pass (checked for BatchNorm by `DPScaleModel`). Whenever the model is outside what
this module can compute exactly (a trainable variable not owned by a single leaf layer, a layer
with variables called more than once, regularisation losses), `fast_clipped_gradient_sum`
returns None and the caller uses the per-example path. Random layers (Dropout) draw their masks
for the whole batch here, one per image, where the per-example path shares one draw across the
examples; either way each example's gradient depends on its own rows only.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable

import keras
import tensorflow as tf

from dp_keras_scale import _keras_compat
from dp_keras_scale.clipping import ClippedSum, clip_factors
from dp_keras_scale.layers.conv import (
    WSConv2D,
    batched_kernel_gradient,
    ghost_channel_norms,
    patch_sums,
    per_example_convolutions,
)
from dp_keras_scale.layers.conv_routes import conv_route, materialized_kernel_gradients
from dp_keras_scale.layers.group_norm import (
    group_norm_parameter_rows,
    group_normalization,
)

METHODS = ("auto", "ghost", "materialize")


def _key(variable) -> int:
    return id(variable)


def _leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return _keras_compat.flatten_layers(model)


_owns = _keras_compat.own_trainable_variables


def _is_plain_dense(layer) -> bool:
    return (type(layer) is keras.layers.Dense and "call" not in vars(layer)
            and not getattr(layer, "lora_enabled", False)
            and layer.dtype_policy.quantization_mode is None
            and getattr(layer, "_remat_mode", None) is None)


def _is_plain_group_norm(layer) -> bool:
    return (type(layer) is keras.layers.GroupNormalization and "call" not in vars(layer)
            and layer.axis == -1)


def _is_plain_conv(layer) -> bool:
    ok = (isinstance(layer, keras.layers.Conv2D) and type(layer).call is keras.layers.Conv2D.call
          and layer.data_format == "channels_last" and tuple(layer.dilation_rate) == (1, 1)
          and getattr(layer, "groups", 1) == 1 and not getattr(layer, "lora_enabled", False)
          and layer.dtype_policy.quantization_mode is None
          and getattr(layer, "_remat_mode", None) is None)
    if not ok:
        return False
    if isinstance(layer, WSConv2D):
        return type(layer).standardized_kernel is WSConv2D.standardized_kernel
    return type(layer).convolution_op is keras.layers.Conv2D.convolution_op


@dataclasses.dataclass
class _Record:
    layer: keras.layers.Layer
    kind: str                 # "dense", "conv", "ws", "group_norm", "generic"
    inputs: object = None     # the layer's (first) input, or the args nest for "generic"
    kwargs: dict = None
    output: object = None     # pre-activation output (dense/conv/ws) or the layer output
    normalized: object = None  # group_norm: its `GroupNormalized` pieces
    calls: int = 0


class _Recorder:
    """Installs per-layer hooks that record inputs and pre-activation outputs."""

    def __init__(self, layers: list, original_calls: dict):
        self.records = {id(l): _Record(l, kind) for l, kind in layers}
        self.original_calls = original_calls
        self._saved = []

    def _record(self, layer, **fields):
        rec = self.records[id(layer)]
        rec.calls += 1
        for k, v in fields.items():
            setattr(rec, k, v)

    def _patch(self, layer, name, fn):
        had = name in vars(layer)
        self._saved.append((layer, name, had, vars(layer).get(name)))
        object.__setattr__(layer, name, fn)

    def __enter__(self):
        for rec in self.records.values():
            layer = rec.layer
            if rec.kind == "dense":
                self._patch(layer, "call", self._dense_call(layer))
            elif rec.kind in ("conv", "ws"):
                self._patch(layer, "convolution_op", self._conv_op(layer, rec.kind))
            elif rec.kind == "group_norm":
                self._patch(layer, "call", self._group_norm_call(layer))
            else:
                self._patch(layer, "call", self._generic_call(layer))
        return self

    def __exit__(self, *exc):
        for layer, name, had, value in reversed(self._saved):
            if had:
                object.__setattr__(layer, name, value)
            else:
                object.__delattr__(layer, name)
        self._saved.clear()

    def _dense_call(self, layer):
        def call(inputs, training=None):
            z = tf.matmul(inputs, tf.convert_to_tensor(layer.kernel)) if inputs.shape.rank == 2 \
                else tf.tensordot(inputs, tf.convert_to_tensor(layer.kernel), axes=1)
            self._record(layer, inputs=inputs, output=z)
            if layer.bias is not None:
                z = z + layer.bias
            if layer.activation is not None:
                z = layer.activation(z)
            return z
        return call

    def _conv_op(self, layer, kind):
        def convolution_op(inputs, kernel):
            if kind == "ws":
                kernel = layer.standardized_kernel()
            z = tf.nn.conv2d(inputs, kernel, strides=[1, *layer.strides, 1],
                             padding=layer.padding.upper())
            self._record(layer, inputs=inputs, output=z)
            return z
        return convolution_op

    def _group_norm_call(self, layer):
        def call(*args, **kwargs):          # call(x) or call(inputs=x)
            x = args[0] if args else kwargs["inputs"]
            normalized = group_normalization(x, layer.groups, layer.epsilon,
                                             layer.gamma if layer.scale else None,
                                             layer.beta if layer.center else None)
            z = tf.cast(tf.cast(normalized.output, x.dtype), layer.compute_dtype)  # as Keras
            self._record(layer, output=z, normalized=normalized)
            return z
        return call

    def _generic_call(self, layer):
        original = self.original_calls[id(layer)]

        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            self._record(layer, inputs=args, kwargs=kwargs, output=out)
            return out
        return call


def _plan(model: keras.Model, variables: list):
    """([(layer, kind)] covering every variable in `variables`, None) or (None, why not)."""
    wanted = {_key(v) for v in variables}
    covered, plan = set(), []
    for layer in _leaf_layers(model):
        own = [v for v in _owns(layer) if _key(v) in wanted]
        if not own:
            continue
        sub_vars = [v for sub in _keras_compat.flatten_layers(layer)
                    for v in _owns(sub) if _key(v) in wanted]
        if sub_vars:
            return None, (f"layer '{layer.name}' has trainable variables of its own and "
                          "sub-layers with trainable variables")
        if _is_plain_dense(layer):
            kind = "dense"
        elif _is_plain_conv(layer):
            kind = "ws" if isinstance(layer, WSConv2D) else "conv"
        elif _is_plain_group_norm(layer):
            kind = "group_norm"     # run by `group_normalization`, which records x_hat
        else:
            kind = "generic"
        for v in own:
            if _key(v) in covered:
                return None, f"variable '{v.path}' is owned by two layers"
            covered.add(_key(v))
        plan.append((layer, kind))
    if covered != wanted:
        return None, "some trainable variables are not owned by a Keras layer of the model"
    return plan, None


def supports_fast_clipping(model: keras.Model, variables=None) -> bool:
    """Whether `fast_clipped_gradient_sum` can compute `model`'s clipped sums exactly."""
    variables = model.trainable_variables if variables is None else variables
    return _plan(model, list(variables))[0] is not None


# -- per-layer rules ---------------------------------------------------------------------------
# Each rule returns (squared norms [B], finish(factors, counted) -> {variable key: summed grad}).


def _rows(t: tf.Tensor, batch) -> tf.Tensor:
    """[B*K, ..., C] -> [B, n, C] (n = K x positions, the rows of one example)."""
    return tf.reshape(t, [batch, -1, t.shape[-1]])


def _per_example_sum(t: tf.Tensor, batch) -> tf.Tensor:
    """[B*K, ..., C] -> [B, C]: the sum over each example's rows."""
    return tf.reduce_sum(_rows(t, batch), axis=1)


WS_NORM_FLOOR = 0.1
# A WS layer's closed-form norm ``q - m^2 / n - (s u . h)^2`` loses about log10(q / result)
# of float32's 7 digits to cancellation; below this fraction of q (with ReLU inputs the mean
# direction can hold most of h) the projection is applied to the materialised h instead.
# Just above it the closed form's rounding measured <= 1.2e-4 of the result (D = 27-2304).
WS_CLOSED_FORM_MIN = 0.01


class _Part(typing.NamedTuple):
    """One layer's share: per-example squared norms [B], the function that forms its clipped
    sums, and optionally a lower bound [B] on the example's squared norm (see `_conv_rule`)."""
    sq: tf.Tensor
    finish: Callable
    floor: tf.Tensor | None = None


class _Weights(typing.NamedTuple):
    """What the sum stage needs: each example's clip factor times its weight (zero for a
    dropped example), which examples count, and whether every example's gradient is finite
    (then a zero factor already removes a dropped example exactly and no masking pass is
    needed; a NaN or inf row would survive a zero factor, so it is masked)."""
    factors: tf.Tensor      # [B]
    keep: tf.Tensor         # [B] bool
    all_finite: tf.Tensor   # scalar bool


def _mask_rows(t: tf.Tensor, keep: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """Zero the entries of `t` along `axis` (examples) where `keep` is False (a scalar zero,
    broadcast: a `zeros_like` of a static shape is folded into a constant of `t`'s size that
    the step's graph then holds for good)."""
    shape = [1] * t.shape.rank
    shape[axis] = -1
    return tf.where(tf.reshape(keep, shape), t, tf.zeros([], t.dtype))


def _rows_per_example(t: tf.Tensor, copies) -> int | None:
    """K x positions: how many rows of `t` ([B*K, ..., C]) belong to one example, if static."""
    inner = t.shape[1:-1]
    if copies is None or not inner.is_fully_defined():
        return None
    return copies * int(inner.num_elements())


def _scale_rows(t: tf.Tensor, w: _Weights, scale: bool = True) -> tf.Tensor:
    """Rows ([B*K, ...]) of example i times w.factors[i] (`scale` False: times 1), exactly
    zero where `w.keep` is False (so NaN rows of dropped examples vanish)."""
    b = tf.shape(w.keep)[0]
    tb = tf.reshape(t, tf.concat([[b, -1], tf.shape(t)[1:]], 0))
    shape = [-1] + [1] * (tb.shape.rank - 1)
    if scale:
        tb = tb * tf.reshape(w.factors, shape)
    tb = tf.cond(w.all_finite, lambda: tb, lambda: _mask_rows(tb, w.keep))
    return tf.reshape(tb, tf.shape(t))


def _weighted_sum(per_example: tf.Tensor, w: _Weights, axis: int = 0) -> tf.Tensor:
    """sum_i factors[i] * per_example[i], the examples along `axis` (0, or 1 of [D, B, o])."""
    def total(t):
        if axis == 0:
            return tf.tensordot(w.factors, t, axes=1)
        return tf.matmul(tf.reshape(w.factors, [1, 1, -1]), t)[:, 0, :]
    return tf.cond(w.all_finite, lambda: total(per_example),
                   lambda: total(_mask_rows(per_example, w.keep, axis)))


def _after(t: tf.Tensor, ready: tf.Tensor) -> tf.Tensor:
    """`t`, for consumers that must wait until `ready` exists. A layer's work on its own input
    (shifted slices, patches, Gram matrices) is held until the layer's output gradient arrives;
    without this the graph executor runs it right after the forward pass, and every layer's
    copies wait in memory at once (430 MiB of WRN-16-4's first-stage slices at (64, 1))."""
    with tf.control_dependencies([ready]):
        return tf.identity(t)


def _ghost_sq(a: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """||sum_t a_t g_t^T||_F^2 per example, from a [B, n, d] and g [B, n, o]."""
    return tf.reduce_sum(tf.matmul(a, a, transpose_b=True) * tf.matmul(g, g, transpose_b=True),
                         axis=[1, 2])


def _use_ghost(method: str, rows, d_in: int, d_out: int) -> bool:
    if method != "auto":
        return method == "ghost"
    if rows is None:
        return False
    return rows * (d_in + d_out) < d_in * d_out


def _bias_rule(layer, G, batch, wanted):
    bias = getattr(layer, "bias", None)
    if bias is None or _key(bias) not in wanted:
        return None, None
    per_example = _per_example_sum(G, batch)                              # [B, o]
    return tf.reduce_sum(tf.square(per_example), axis=1), (bias, per_example)


def _dense_rule(rec: _Record, G, batch, copies, wanted, method):
    layer = rec.layer
    a, g = _rows(rec.inputs, batch), _rows(G, batch)
    n = _rows_per_example(rec.inputs, copies)
    d_in, d_out = a.shape[-1], g.shape[-1]
    kernel_key = _key(layer._kernel) if _key(layer._kernel) in wanted else None
    sq = tf.zeros([batch], G.dtype)
    ghost = _use_ghost(method, n, d_in, d_out)
    per_kernel = None
    if kernel_key is not None:
        if ghost:
            sq += _ghost_sq(a, g)
        else:
            per_kernel = tf.einsum("bnd,bno->bdo", a, g)
            sq += tf.reduce_sum(tf.square(per_kernel), axis=[1, 2])
    bias_sq, bias_part = _bias_rule(layer, G, batch, wanted)
    if bias_sq is not None:
        sq += bias_sq

    def finish(w: _Weights):
        out = {}
        if kernel_key is not None:
            if per_kernel is not None:
                out[kernel_key] = _weighted_sum(per_kernel, w)
            else:
                out[kernel_key] = tf.einsum("bnd,bno->do", _scale_rows(a, w, scale=False),
                                            _scale_rows(g, w))
        if bias_part is not None:
            out[_key(bias_part[0])] = _weighted_sum(bias_part[1], w)
        return out
    return _Part(sq, finish)


def _ws_stats(layer):
    """Per-output-channel pieces of the weight standardisation's Jacobian (see module doc)."""
    kernel = tf.convert_to_tensor(layer.kernel)
    kh, kw, cin, cout = kernel.shape
    fan_in = float(kh * kw * cin)
    mean, var = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
    pre = var * fan_in
    s = tf.reshape(tf.math.rsqrt(tf.maximum(pre, layer.epsilon)), [cout])
    active = tf.reshape(tf.cast(pre >= layer.epsilon, kernel.dtype), [cout])
    u = tf.reshape(kernel - mean, [-1, cout])                              # [D, o]
    gain = tf.reshape(tf.convert_to_tensor(layer.gain), [cout])
    return fan_in, s, active, u, gain


def _nan_where_nonfinite(sq: tf.Tensor, per_channel: tf.Tensor) -> tf.Tensor:
    """`sq` [B], NaN for the examples whose [B, o] entries are not all finite (so that they
    are dropped even where a closed form would cancel the non-finite part away)."""
    finite = tf.reduce_all(tf.math.is_finite(per_channel), axis=1)
    return tf.where(finite, sq, tf.fill(tf.shape(sq), float("nan")))


def _conv_rule(rec: _Record, G, batch, copies, wanted, method, xla=True):
    layer = rec.layer
    ws = rec.kind == "ws"
    x = rec.inputs
    kh, kw = layer.kernel_size
    strides, padding = tuple(layer.strides), layer.padding.upper()
    cin, cout = x.shape[-1], G.shape[-1]
    positions = _rows_per_example(G, copies)
    kernel_var = layer._kernel
    gain_var = layer.gain if ws else None
    want_kernel = _key(kernel_var) in wanted
    want_gain = ws and _key(gain_var) in wanted
    sq = tf.zeros([batch], G.dtype)
    route = conv_route(method, x, G, positions, copies, (kh, kw), strides, padding, xla)
    # Per channel o, with h the example's kernel gradient (of the standardised kernel for
    # WS): q = ||h_o||^2, and for WS m = sum(h_o). Ghost route: q from the Gram matrix of the
    # example's input patches, no h. Else h materialised ([B, D, o], or [D, B, o] for the
    # grouped native op's own layout; see `layers.conv_routes`).
    per_kernel, examples_axis = None, 0
    if want_kernel and route == "ghost":
        q = ghost_channel_norms(x, G, (kh, kw), strides, padding, copies, batch)
        if ws:
            m = _per_example_sum(patch_sums(x, (kh, kw), strides, padding) * G, batch)
    elif want_kernel:
        per_kernel, examples_axis = materialized_kernel_gradients(
            route, x, G, (kh, kw), strides, padding, batch)
        d_axis = 1 - examples_axis
        q = tf.reduce_sum(tf.square(per_kernel), axis=d_axis)
        if ws:
            m = tf.reduce_sum(per_kernel, axis=d_axis)

    floor = None
    if ws and (want_kernel or want_gain):
        fan_in, s, active, u, gain = _ws_stats(layer)
        # the gain's per-example gradient s (u . h); on the ghost route (no h) the sum over
        # the example's rows of G times the output of the unit-gain kernel, z / gain (float32
        # z; else that convolution itself, in float32: the kernel's norm below relies on it)
        def unit_gain_rows():
            unit = tf.nn.conv2d(x, tf.cast(layer.standardized_kernel(with_gain=False), x.dtype),
                                strides=[1, *strides, 1], padding=padding)
            return _per_example_sum(unit * G, batch)

        if per_kernel is not None:
            # s (u . h) per channel, from the materialised gradients: the layer's output is
            # then not held from the forward pass until the backward pass reaches the layer
            gain_rows = s * tf.reduce_sum(per_kernel * tf.expand_dims(u, examples_axis),
                                          axis=d_axis)
        elif rec.output.dtype == G.dtype:
            gain_rows = tf.cond(  # a gain this small (or zero) would lose the output's digits
                tf.reduce_all(tf.abs(gain) >= 1e-12),
                lambda: _per_example_sum(rec.output * G, batch) / gain, unit_gain_rows)
        else:
            gain_rows = unit_gain_rows()                                     # [B, o]
        if want_kernel:
            # The kernel's sum is pushed through the standardisation once, after the
            # examples are summed (see `finish`); its rounding is relative to |h|, not to the
            # projected |P h|, so each example's norm is at least WS_NORM_FLOOR * g s |h| (a
            # bound on what rounding can add to a clipped contribution; it binds only for an
            # example whose gradient the projection removes almost entirely).
            floor = tf.reduce_sum(tf.square(gain * s) * q, axis=1) * WS_NORM_FLOOR ** 2
            # ||h - mean(h) - s^2 (u . h) u||^2 per channel, in closed form
            inner = q - tf.square(m) / fan_in - active * tf.square(gain_rows)
            if per_kernel is not None:
                def projected():
                    """The same from the projection applied to h itself, where the closed
                    form cancels (float32 keeps about 7 digits of q)."""
                    per_ex = lambda t: tf.expand_dims(t, d_axis)          # [B, o]
                    per_ch = lambda t: tf.expand_dims(t, examples_axis)   # [D, o]
                    raw = (per_kernel - per_ex(m / fan_in)
                           - per_ex(active * s * gain_rows) * per_ch(u))
                    return tf.reduce_sum(tf.square(raw), axis=d_axis)
                inner = tf.cond(tf.reduce_any(inner < WS_CLOSED_FORM_MIN * q), projected,
                                lambda: inner)
            sq += _nan_where_nonfinite(
                tf.reduce_sum(tf.square(gain * s) * tf.maximum(inner, 0.0), axis=1), q)
        if want_gain:       # summed exactly as normed
            sq += tf.reduce_sum(tf.square(gain_rows), axis=1)
    elif want_kernel:
        sq += tf.reduce_sum(q, axis=1)
    bias_sq, bias_part = _bias_rule(layer, G, batch, wanted)
    if bias_sq is not None:
        sq += bias_sq

    def finish(w: _Weights):
        out = {}
        if want_kernel:
            if per_kernel is not None:
                total = tf.reshape(_weighted_sum(per_kernel, w, examples_axis),
                                   [kh, kw, cin, cout])
            else:       # book-keeping: one native kernel gradient of re-weighted rows
                total = batched_kernel_gradient(_scale_rows(x, w, scale=False),
                                                _scale_rows(G, w), (kh, kw, cin, cout),
                                                strides, padding)
            if ws:      # through the standardisation once, for the sum
                with tf.GradientTape() as tape:
                    standardized = layer.standardized_kernel()
                grad = tape.gradient(standardized, kernel_var, output_gradients=total)
                out[_key(kernel_var)] = tf.zeros(kernel_var.shape, total.dtype) \
                    if grad is None else grad
            else:
                out[_key(kernel_var)] = total
        if want_gain:
            out[_key(gain_var)] = _weighted_sum(gain_rows, w)
        if bias_part is not None:
            out[_key(bias_part[0])] = _weighted_sum(bias_part[1], w)
        return out
    return _Part(sq, finish, floor)


def _group_norm_rule(rec: _Record, G, batch, wanted):
    """GroupNormalization's scale and offset, per example: sums of ``G * x_hat`` and ``G``."""
    layer = rec.layer
    gamma_rows, beta_rows = group_norm_parameter_rows(rec.normalized, G)
    per_var = [(v, _per_example_sum(rows, batch))
               for v, rows, used in ((layer.gamma, gamma_rows, layer.scale),
                                     (layer.beta, beta_rows, layer.center))
               if used and _key(v) in wanted]
    sq = tf.add_n([tf.reduce_sum(tf.square(p), axis=1) for _, p in per_var])

    def finish(w: _Weights):
        return {_key(v): _weighted_sum(p, w) for v, p in per_var}
    return _Part(sq, finish)


def _generic_rule(rec: _Record, G, batch, copies, wanted, original_calls):
    """Per-example gradients of one layer's variables, re-running only that layer per example."""
    layer = rec.layer
    variables = [v for v in _owns(layer) if _key(v) in wanted]
    original = original_calls[id(layer)]
    kwargs = dict(rec.kwargs or {})
    args = rec.inputs
    def split(t):
        return tf.reshape(t, tf.concat([[batch, -1], tf.shape(t)[1:]], 0))
    args_b = tf.nest.map_structure(split, args)
    out_flat = tf.nest.flatten(rec.output)
    g_flat = [tf.zeros_like(o) if g is None else g for o, g in zip(out_flat, tf.nest.flatten(G))]
    g_b = [split(g) for g in g_flat]

    def per_example(item):
        a_i, g_i = item
        with tf.GradientTape() as tape:
            out = tf.nest.flatten(original(*a_i, **kwargs))
        grads = tape.gradient(out, variables, output_gradients=g_i)
        return [tf.zeros(v.shape, g_i[0].dtype) if gr is None else gr
                for gr, v in zip(grads, variables)]

    with per_example_convolutions():
        per_var = tf.vectorized_map(per_example, (args_b, g_b))
    sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(p), [batch, -1]), axis=1)
                   for p in per_var]) if per_var else tf.zeros([batch])

    def finish(w: _Weights):
        return {_key(v): _weighted_sum(p, w) for v, p in zip(variables, per_var)}
    return _Part(sq, finish)


def _zero_rule(rec: _Record, batch, wanted):
    """A layer the forward pass never called: zero gradient for its variables."""
    variables = [v for v in _owns(rec.layer) if _key(v) in wanted]

    def finish(w: _Weights):
        return {_key(v): tf.zeros(v.shape, w.factors.dtype) for v in variables}
    return _Part(tf.zeros([batch]), finish)


# -- the clipped sum ---------------------------------------------------------------------------


def model_example_loss(model: keras.Model) -> Callable:
    """`(x_i, y_i, predictions_i) -> loss`: one example's mean loss over its copies, from its
    predictions, computed exactly as `DPScaleModel._example_loss` computes it."""
    def loss_fn(x_i, y_i, pred_i):
        return _keras_compat.compiled_loss(model, x_i, y_i, pred_i)
    return loss_fn


def fast_clipped_gradient_sum(model: keras.Model, variables, x, y, weights: tf.Tensor,
                              l2_norm_clip: float, rescale_to_unit_norm: bool = False,
                              method: str = "auto", xla: bool = True,
                              on_fallback: Callable[[str], None] | None = None
                              ) -> ClippedSum | None:
    """`clipping.clipped_gradient_sum` from one batched pass (see the module docstring).

    Args:
        model: the Keras model; its layers are hooked while it runs.
        variables: the trainable variables (each must be owned by one leaf layer).
        x, y: nests with leading axes [B, K, ...], as for `clipped_gradient_sum`.
        weights: [B] example weights (clamped into [0, 1]).
        l2_norm_clip, rescale_to_unit_norm: as for `clipped_gradient_sum`.
        method: "auto" (per layer the faster of ghost norms and materialised per-example
            gradients: Dense by a flop count, convolutions timed once per shape without XLA,
            see `layers.conv_routes`), "ghost" or "materialize" (force one, for tests).
        xla: whether XLA compiles the step. Under XLA a convolution's per-example kernel
            gradients are batched einsums (XLA compiles the grouped native op into very
            slow code).
        on_fallback: called with the reason when this path returns None.

    Returns:
        A `ClippedSum`, or None when the model is outside what this path computes exactly
        (then use `clipped_gradient_sum`).

    Example:
        >>> out = fast_clipped_gradient_sum(model, model.trainable_variables, x, y,
        ...                                 tf.ones([batch]), l2_norm_clip=1.0)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    variables = list(variables)
    plan, reason = _plan(model, variables)
    if plan is None or not variables:
        if on_fallback is not None:
            on_fallback(reason or "no trainable variables")
        return None
    wanted = {_key(v) for v in variables}
    first = tf.nest.flatten(x)[0]
    batch = tf.shape(first)[0]
    copies = first.shape[1]
    def merge(t):
        return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))
    x_flat = tf.nest.map_structure(merge, x)
    original_calls = {id(layer): layer.call for layer, kind in plan if kind == "generic"}

    recorder = _Recorder(plan, original_calls)
    # The tape watches the variables, so it records the whole forward pass and can give the
    # gradients with respect to the recorded intermediate outputs.
    with tf.GradientTape() as tape:
        with recorder:
            pred_flat = model(x_flat, training=True)
        records = list(recorder.records.values())
        shared = [rec.layer.name for rec in records if rec.calls > 1]
        if shared or model.losses:
            if on_fallback is not None:
                on_fallback(f"layers {shared} are called more than once per forward pass"
                            if shared else "the model has regularization losses")
            return None
        unused = [rec for rec in records if rec.calls == 0]     # their gradient is zero
        records = [rec for rec in records if rec.calls == 1]
        outputs = [rec.output for rec in records]

        def split(t):
            if t.shape[1:].is_fully_defined():
                return tf.reshape(t, [batch, -1 if copies is None else copies, *t.shape[1:]])
            return tf.reshape(t, tf.concat([[batch, -1], tf.shape(t)[1:]], 0))
        predictions = tf.nest.map_structure(split, pred_flat)
    # Each example's loss and its gradient with respect to the example's predictions, under
    # `tf.vectorized_map` (the loss head only); the forward pass is then differentiated once,
    # batched, from those prediction gradients. (Differentiating *through* the vectorized loss
    # instead makes XLA treat the data as compile-time constants: a recompilation per step.)
    loss_fn = model_example_loss(model)

    def loss_and_gradient(item):
        x_i, y_i, pred_i = item
        with tf.GradientTape() as head:
            head.watch(tf.nest.flatten(pred_i))
            loss = loss_fn(x_i, y_i, pred_i)
        grad = head.gradient(loss, pred_i)
        grad = tf.nest.map_structure(lambda g, p: tf.zeros_like(p) if g is None else g,
                                     grad, pred_i)
        return loss, grad

    losses, pred_grads = tf.vectorized_map(loss_and_gradient, (x, y, predictions))
    pred_grads = tf.nest.map_structure(lambda g, p: tf.reshape(g, tf.shape(p)),
                                       pred_grads, pred_flat)
    grads = tape.gradient(pred_flat, outputs, output_gradients=pred_grads)

    parts = [_zero_rule(rec, batch, wanted) for rec in unused]
    for rec, G in zip(records, grads):
        if rec.kind == "generic":
            parts.append(_generic_rule(rec, G, batch, copies, wanted, original_calls))
            continue
        if G is None:
            G = tf.zeros_like(rec.output)
        if rec.kind == "group_norm":
            parts.append(_group_norm_rule(rec, G, batch, wanted))
            continue
        if G.dtype != tf.float32 or rec.inputs.dtype != tf.float32:
            # Mixed precision: norms and sums in float32 from the same values, so that each
            # summed per-example gradient has exactly the norm its clip factor was computed from.
            rec.inputs, G = tf.cast(rec.inputs, tf.float32), tf.cast(G, tf.float32)
        rec.inputs = _after(rec.inputs, G)
        if rec.kind == "dense":
            parts.append(_dense_rule(rec, G, batch, copies, wanted, method))
        else:
            parts.append(_conv_rule(rec, G, batch, copies, wanted, method, xla))

    weights = tf.clip_by_value(tf.cast(weights, losses.dtype), 0.0, 1.0)
    squared = tf.add_n([tf.cast(part.sq, losses.dtype) for part in parts])
    floors = [tf.cast(part.floor, losses.dtype) for part in parts if part.floor is not None]
    if floors:
        squared = tf.maximum(squared, tf.add_n(floors))
    norms = tf.sqrt(squared)
    finite = tf.math.is_finite(norms) & tf.math.is_finite(losses)
    counted = finite & (weights > 0)
    factors = tf.where(counted, clip_factors(norms, l2_norm_clip, rescale_to_unit_norm) * weights,
                       tf.zeros_like(norms))
    sums = {}
    weighting = _Weights(factors, counted, tf.reduce_all(finite))
    for part in parts:
        sums.update(part.finish(weighting))
    gradients = [tf.cast(sums[_key(v)], v.dtype) for v in variables]
    in_mask = weights > 0
    return ClippedSum(
        gradients=gradients,
        losses=tf.where(counted, losses, tf.zeros_like(losses)),
        predictions=predictions,
        valid=tf.cast(counted, losses.dtype),
        nonfinite=tf.reduce_sum(tf.cast(in_mask & ~finite, losses.dtype)),
        clipped=tf.reduce_sum(tf.cast(counted & (norms > l2_norm_clip), losses.dtype)),
    )
