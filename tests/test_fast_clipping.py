"""The batched clipping path (dp_keras_scale.ghost_clipping) equals the per-example reference.

Every comparison is of the noise-free clipped sum (and the other `ClippedSum` fields) from
`fast_clipped_gradient_sum` against `clipped_gradient_sum(method="reference")`, at 1e-5 of the
largest entry of each variable's gradient, for every rule choice ("ghost", "materialize",
"auto") and every layer kind the bundled models use.
"""

from __future__ import annotations

import dataclasses
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import compile_dp, reference_clipped_sum, small_convnet, weights_of, xent

import dp_keras_scale as dks
from dp_keras_scale.clipping import clipped_gradient_sum
from dp_keras_scale.ghost_clipping import fast_clipped_gradient_sum, supports_fast_clipping
from dp_keras_scale.layers import conv_routes
from dp_keras_scale.layers.conv import grouped_kernel_gradients_available
from dp_keras_scale.model import fast_convolutions
from dp_keras_scale.models.nf_resnet import SkipInitResidual

# TensorFlow runs its oneDNN CPU kernels (which take the grouped kernel-gradient op) only on
# some CPUs (not on an AVX2-only AMD EPYC, seen here); elsewhere its Eigen kernels refuse the
# op and the library never routes to it (`test_without_onednn_the_materialised_route_uses_einsums`).
GROUPED = grouped_kernel_gradients_available()

RTOL = 1e-5
METHODS = ["ghost", "materialize", "auto"]


class Scale(keras.layers.Layer):
    """A layer without a fast rule: per-channel learnable scale (gets the generic rule)."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],),
                                     initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def zoo(seed: int = 0, extra_conv: bool = True) -> keras.Model:
    """Every layer kind: strided / 1x1 / SAME / VALID convs with and without bias, WS convs
    with gain and bias, GroupNorm scale and offset, Dense on 2-D and 3-D inputs, a custom layer
    and a SkipInit residual (generic rule), a dilated conv (generic rule)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((9, 9, 3))
    h = keras.layers.Conv2D(5, 3, strides=2, padding="same", use_bias=False)(inputs)   # 5x5
    h = keras.layers.GroupNormalization(groups=1)(h)
    h = keras.layers.ReLU()(h)
    s = keras.layers.Conv2D(6, 1, strides=2, padding="valid", use_bias=True)(h)        # 3x3
    h = dks.layers.WSConv2D(6, 3, strides=2, padding="same", use_bias=True)(h)         # 3x3
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = SkipInitResidual(alpha=0.5)([s, h])
    h = dks.layers.WSConv2D(4, 1, padding="valid")(h)
    h = Scale()(h)
    if extra_conv:
        h = keras.layers.Conv2D(4, 2, dilation_rate=2, padding="same", activation="relu")(h)
    h = dks.layers.WSConv2D(4, 2, padding="valid", use_bias=True)(h)                    # 2x2
    h = keras.layers.Reshape((4, 4))(h)
    h = keras.layers.Dense(5, activation="tanh")(h)                                     # 3-D
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:       # no zero gains: every path carries gradient
        v.assign(v.numpy() + 0.3 * rng.normal(size=v.shape).astype(np.float32))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data(batch: int, copies: int, shape=(9, 9, 3), classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, copies, *shape)).astype(np.float32)
    y = np.repeat(rng.integers(0, classes, size=batch)[:, None], copies, 1)
    return tf.constant(x), tf.constant(y)


def both(model, x, y, weights, clip, method, rescale=False, jit=False, xla=None,
         variables=None):
    """(fast ClippedSum, reference ClippedSum) inside one tf.function (XLA-compiled if `jit`);
    `xla`: the fast path's kernel-gradient form (default: the one for how it is compiled);
    `variables`: those to differentiate (default: all trainable ones)."""
    xla = jit if xla is None else xla
    variables = model.trainable_variables if variables is None else variables
    weights = tf.constant(weights, tf.float32)

    def loss_fn(xi, yi):
        pred = model(xi, training=True)
        return model._compute_loss(x=xi, y=yi, y_pred=pred, training=True), pred

    @tf.function(jit_compile=jit)
    def run():
        fast = fast_clipped_gradient_sum(model, variables, x, y, weights, clip, rescale,
                                         method=method, xla=xla)
        assert fast is not None, "the model should be covered by the fast path"
        with fast_convolutions(model):
            ref = clipped_gradient_sum(loss_fn, variables, x, y, weights, clip, rescale,
                                       method="reference")
        return ({f.name: getattr(fast, f.name) for f in dataclasses.fields(fast)},
                {f.name: getattr(ref, f.name) for f in dataclasses.fields(ref)})

    fast, ref = run()
    return types.SimpleNamespace(**fast), types.SimpleNamespace(**ref)


def assert_same(fast, ref, model, variables=None):
    variables = model.trainable_variables if variables is None else variables
    for v, a, e in zip(variables, fast.gradients, ref.gradients, strict=True):
        a, e = a.numpy(), e.numpy()
        scale = np.max(np.abs(e)) + 1e-30
        np.testing.assert_allclose(a, e, atol=RTOL * scale, rtol=0, err_msg=v.path)
    for field in ("losses", "valid", "nonfinite", "clipped"):
        np.testing.assert_allclose(getattr(fast, field).numpy(), getattr(ref, field).numpy(),
                                   rtol=1e-6, atol=1e-6, err_msg=field)
    np.testing.assert_allclose(np.nan_to_num(fast.predictions.numpy()),
                               np.nan_to_num(ref.predictions.numpy()), rtol=1e-5, atol=1e-5)


def median_norm(model, x, y):
    """A clip norm that some examples exceed and some do not: halfway between the two middle
    examples' norms (never one example's own norm, whose side of the clip would be decided by
    float rounding, which differs between kernels and machines)."""
    norms = []
    for i in range(x.shape[0]):
        with tf.GradientTape() as tape:
            pred = model(x[i], training=True)
            loss = model._compute_loss(x=x[i], y=y[i], y_pred=pred, training=True)
        grads = tape.gradient(loss, model.trainable_variables)
        norms.append(np.sqrt(sum(np.sum(g.numpy() ** 2) for g in grads if g is not None)))
    middle = np.sort(norms)[len(norms) // 2 - 1:len(norms) // 2 + 1]
    return float(np.mean(middle))


@pytest.mark.parametrize("xla", [False, True], ids=["grouped", "einsum"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("copies", [1, 3])
def test_every_layer_kind_matches_the_reference(method, copies, xla):
    """Both forms of the per-example conv kernel gradients (the grouped native op used
    outside XLA, the einsums used under it), here both run without XLA."""
    model = zoo()
    x, y = data(5, copies)
    assert supports_fast_clipping(model)
    clip = median_norm(model, x, y)
    weights = [1.0, 0.5, 0.0, 1.0, 1.0]
    fast, ref = both(model, x, y, weights, clip, method, xla=xla)
    assert 0 < ref.clipped.numpy() < 4          # some clipped, some not
    assert_same(fast, ref, model)


@pytest.mark.parametrize("route", conv_routes.ROUTES)
@pytest.mark.parametrize("copies", [1, 3])
def test_every_conv_route_matches_the_reference(route, copies, monkeypatch):
    """Each way of forming a convolution's per-example norms and sum, forced on every conv
    layer of the zoo (strided, 1x1, SAME / VALID, WS and plain)."""
    from dp_keras_scale import ghost_clipping

    if route == "grouped" and not GROUPED:
        pytest.skip("the grouped op needs TensorFlow's oneDNN CPU kernels, off on this CPU "
                    "(the library never routes to it here)")
    chosen = []
    monkeypatch.setattr(ghost_clipping, "conv_route",
                        lambda *args: chosen.append(route) or route)
    model = zoo()
    x, y = data(6, copies)
    clip = median_norm(model, x, y)
    x = x.numpy()
    x[5, copies - 1, 2, 3, 0] = np.nan          # one copy of the last example is NaN
    x = tf.constant(x)
    fast, ref = both(model, x, y, [1.0, 0.5, 0.0, 1.0, 1.0, 1.0], clip, "auto")
    assert chosen and 0 < ref.clipped.numpy() < 4 and fast.nonfinite.numpy() == 1
    assert all(np.all(np.isfinite(g.numpy())) for g in fast.gradients)
    assert_same(fast, ref, model)


def test_auto_conv_route_is_timed_once_per_shape_and_is_a_candidate(monkeypatch):
    """Without XLA, "auto" times the plausible routes of a shape once per process (the
    ghost route only where its flops are within reach), then reuses the choice."""
    timed = []
    fastest = conv_routes._fastest
    monkeypatch.setattr(conv_routes, "_fastest",
                        lambda candidates, *a: timed.append(candidates) or fastest(
                            candidates, *a))
    monkeypatch.setattr(conv_routes, "_timed", {})
    x, dy = tf.zeros([8, 12, 12, 4]), tf.zeros([8, 6, 6, 8])    # 4 examples x 2 copies
    args = (x, dy, 72, 2, (3, 3), (2, 2), "SAME")
    picks = {conv_routes.conv_route("auto", *args, False) for _ in range(3)}
    assert len(timed) == 1 and len(picks) == 1 and picks <= set(timed[0])
    assert set(timed[0]) >= {"patches", "einsum"}
    # a 32x32 stride-1 layer: the ghost route is far too many flops to be worth timing
    big_x, big_dy = tf.zeros([2, 32, 32, 4]), tf.zeros([2, 32, 32, 4])
    conv_routes.conv_route("auto", big_x, big_dy, 1024, 1, (3, 3), (1, 1), "SAME", False)
    assert "ghost" not in timed[-1]
    # WRN-16-4's 8x8 stage at B = 64: materialised gradients (151 MB) are not worth timing
    # next to the ghost route the flop count picks, so nothing is timed
    deep_x, deep_dy = tf.zeros([64, 8, 8, 256]), tf.zeros([64, 8, 8, 256])
    assert conv_routes.conv_route("auto", deep_x, deep_dy, 64, 1, (3, 3), (1, 1), "SAME",
                                  False) == "ghost"
    assert len(timed) == 2
    # under XLA, forced, or without static shapes: no timing
    assert conv_routes.conv_route("auto", *args, True) in ("ghost", "einsum")
    assert conv_routes.conv_route("ghost", *args, False) == "ghost"
    assert conv_routes.conv_route("materialize", *args, True) == "einsum"
    assert len(timed) == 2


@pytest.mark.parametrize("method", METHODS)
def test_rescale_to_unit_norm_weights_clamped_and_nan_example(method):
    model = zoo(seed=1, extra_conv=False)
    x, y = data(6, 2, seed=1)
    x = x.numpy()
    x[4, 1, 2, 3, 0] = np.nan                    # one copy of example 4 is NaN
    x = tf.constant(x)
    weights = [1.0, 2.0, -1.0, 0.25, 1.0, 0.0]   # clamped into [0, 1]
    fast, ref = both(model, x, y, weights, 0.5, method, rescale=True)
    assert ref.nonfinite.numpy() == 1 and fast.nonfinite.numpy() == 1
    assert all(np.all(np.isfinite(g.numpy())) for g in fast.gradients)
    assert_same(fast, ref, model)


@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_small_convnet_against_the_per_example_loop(batch, ws, method):
    x, y = batch
    model = compile_dp(small_convnet(model_class=keras.Model, ws=ws))
    y_copies = np.repeat(y[:, None], 2, 1)
    fast = both(model, tf.constant(x), tf.constant(y_copies), np.ones(6), 0.05, method)[0]
    expected = reference_clipped_sum(model, x, y_copies, np.ones(6), clip=0.05)
    for a, e in zip(fast.gradients, expected):
        np.testing.assert_allclose(a.numpy(), e, atol=RTOL * np.max(np.abs(e)), rtol=0)


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v.numpy() + 0.1 * rng.normal(size=v.shape).astype(np.float32))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("name", ["wrn_ws", "wrn_plain", "small_cnn", "nf_resnet"])
def test_bundled_models_match_the_reference(name):
    keras.utils.set_random_seed(0)
    if name.startswith("wrn"):
        model = dks.models.wide_resnet(10, 1, num_classes=4, input_shape=(8, 8, 3), groups=4,
                                       weight_standardization=name == "wrn_ws",
                                       model_class=keras.Model)
        shape = (8, 8, 3)
    elif name == "small_cnn":
        model = dks.models.small_cnn((12, 12, 1), 4, widths=(4, 8), groups=2,
                                     model_class=keras.Model)
        shape = (12, 12, 1)
    else:
        model = dks.models.nf_resnet(26, 4, width=0.0625, input_shape=(16, 16, 3),
                                     stem="cifar", model_class=keras.Model)
        shape = (16, 16, 3)
    model = _randomize(model)
    assert supports_fast_clipping(model)
    x, y = data(4, 2, shape=shape, classes=4)
    if name == "small_cnn":
        x = tf.abs(x) * 100.0
    clip = median_norm(model, x, y)
    fast, ref = both(model, x, y, [1.0, 1.0, 0.5, 1.0], clip, "auto")
    assert_same(fast, ref, model)


def test_under_xla():
    model = zoo(seed=2, extra_conv=False)
    x, y = data(4, 2, seed=2)
    fast, ref = both(model, x, y, [1.0, 1.0, 1.0, 0.0], 0.3, "auto", jit=True)
    assert_same(fast, ref, model)


def test_frozen_layers_are_skipped():
    model = zoo(seed=3)
    for layer in model.layers[:4]:
        layer.trainable = False
    x, y = data(4, 2, seed=3)
    fast, ref = both(model, x, y, np.ones(4), 0.3, "auto")
    assert_same(fast, ref, model)


def test_shared_layers_and_regularizers_fall_back_to_the_reference():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh")
    outputs = keras.layers.Dense(3)(shared(shared(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = tf.random.normal([5, 2, 4])
    y = tf.zeros([5, 2], tf.int32)
    assert fast_clipped_gradient_sum(model, model.trainable_variables, x, y, tf.ones([5]),
                                     1.0) is None
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, kernel_regularizer="l2")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert fast_clipped_gradient_sum(model, model.trainable_variables, x, y, tf.ones([5]),
                                     1.0) is None


def test_unknown_method_is_refused():
    model = zoo()
    x, y = data(2, 1)
    with pytest.raises(ValueError, match="method"):
        fast_clipped_gradient_sum(model, model.trainable_variables, x, y, tf.ones([2]), 1.0,
                                  method="fastest")


def test_fallback_warns_once_naming_the_reason(batch):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    shared = keras.layers.Conv2D(3, 3, padding="same")
    h = keras.layers.GlobalAveragePooling2D()(shared(shared(inputs)))
    model = compile_dp(dks.DPScaleModel(inputs, keras.layers.Dense(3)(h)), l2_norm_clip=0.05)
    model.clipping_method = "auto"
    x, y = batch
    y_copies = np.repeat(y[:, None], 2, 1)
    expected = reference_clipped_sum(model, x, y_copies, np.ones(6), clip=0.05)
    before = [w.copy() for w in weights_of(model)]
    with pytest.warns(UserWarning, match="called more than once"):
        model.train_on_batch(x, y)
    for b, a, e in zip(before, weights_of(model), expected):
        np.testing.assert_allclose(b - a, e / 6, atol=1e-5 * np.max(np.abs(e)) + 1e-7)


@pytest.mark.parametrize("method, jit", [("auto", False), ("auto", True), ("reference", False)])
def test_dp_model_fit_batched_and_reference_agree(batch, method, jit, monkeypatch):
    grouped_calls = []
    grouped = conv_routes.grouped_kernel_gradients
    monkeypatch.setattr(conv_routes, "_timed", {})
    monkeypatch.setattr(conv_routes, "grouped_kernel_gradients",
                        lambda *a, **k: grouped_calls.append(1) or grouped(*a, **k))
    x, y = batch
    model = compile_dp(small_convnet(ws=True), l2_norm_clip=0.05, jit_compile=jit)
    model.clipping_method = method
    y_copies = np.repeat(y[:, None], 2, 1)
    expected = reference_clipped_sum(model, x, y_copies, np.ones(6), clip=0.05)
    before = weights_of(model)
    model.train_on_batch(x, y)
    for b, a, e in zip(before, weights_of(model), expected):
        np.testing.assert_allclose(b - a, e / 6, atol=1e-5 * np.max(np.abs(e)) + 1e-8)
    # the grouped kernel-gradient op (very slow under XLA) never in steps XLA compiles (and
    # without XLA, "auto" times it among the routes of each conv shape)
    assert bool(grouped_calls) == (method == "auto" and not jit and GROUPED)


def test_wsconv2d_native_gradient_outside_and_vectorizable_inside_per_example_code(batch):
    """A whole-batch step uses TensorFlow's native kernel gradient; the per-example reference
    (under `tf.vectorized_map`) uses the vectorizable one, with no while-loop fallback."""
    x, y = batch
    model = compile_dp(small_convnet(model_class=keras.Model, ws=True))
    flat = tf.constant(x[:, 0])

    @tf.function
    def batched(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, training=True))
        return tape.gradient(loss, model.trainable_variables)

    ops = {op.type for op in batched.get_concrete_function(flat).graph.get_operations()}
    assert "Conv2DBackpropFilter" in ops

    def loss_fn(xi, yi):
        pred = model(xi, training=True)
        return model._compute_loss(x=xi, y=yi, y_pred=pred, training=True), pred

    @tf.function
    def reference(images, labels):
        return clipped_gradient_sum(loss_fn, model.trainable_variables, images, labels,
                                    tf.ones([6]), 1.0, method="reference").gradients

    graph = reference.get_concrete_function(
        tf.constant(x), tf.constant(np.repeat(y[:, None], 2, 1))).graph
    ops = {op.type for op in graph.get_operations()}
    assert not any("While" in op for op in ops) and "Conv2DBackpropFilter" not in ops


@pytest.mark.parametrize("method", METHODS)
def test_mixed_bfloat16_contribution_never_exceeds_the_clip_norm(method):
    """Under mixed_bfloat16 the norms are computed in float32 from the very values that are
    summed, so one example's clipped contribution has norm <= C (float32 rounding)."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
        h = keras.layers.GroupNormalization(2)(h)
        h = dks.layers.WSConv2D(4, 3, use_bias=True)(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(h))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(4, 2, shape=(8, 8, 3))
    clip = 1e-3
    for i in range(4):
        out = fast_clipped_gradient_sum(model, model.trainable_variables, x[i:i + 1],
                                        y[i:i + 1], tf.ones([1]), clip, method=method)
        norm = np.sqrt(sum(np.sum(np.square(g.numpy().astype(np.float64)))
                           for g in out.gradients))
        assert out.clipped.numpy() == 1
        assert norm <= clip * (1 + 1e-5), norm


PATCH_GRAM_CASES = [   # (size, kernel, strides, padding, copies)
    (8, (3, 3), (1, 1), "SAME", 2), (9, (3, 3), (2, 2), "SAME", 1),
    (10, (4, 4), (2, 2), "VALID", 3), (7, (2, 2), (1, 1), "SAME", 2),
    (8, (1, 1), (1, 1), "VALID", 2), (9, (3, 3), (2, 2), "VALID", 1),
    (16, (3, 3), (2, 2), "SAME", 1), (13, (4, 4), (2, 2), "VALID", 1),
    (9, (1, 1), (2, 2), "SAME", 2), (4, (3, 3), (1, 1), "VALID", 2),
    (5, (3, 3), (3, 3), "SAME", 1)]


@pytest.mark.parametrize("size, kernel, strides, padding, copies", PATCH_GRAM_CASES)
def test_patch_gram_and_sums_equal_those_of_the_extracted_patches(size, kernel, strides, padding,
                                                                 copies):
    """`patch_gram` (both of its ways, every stride phase) against P P^T of each example's
    rows of `image_patches`, and `patch_sums` against the patches' sums."""
    from dp_keras_scale.layers.conv import (_gram_ways, image_patches, patch_gram,
                                            patch_gram_flops, patch_sums)

    rng = np.random.default_rng(4)
    examples, channels = 3, 4
    x = tf.constant(rng.normal(size=(examples * copies, size, size, channels)), tf.float32)
    patches = image_patches(x, kernel, strides, padding)
    rows = tf.reshape(patches, [examples, -1, patches.shape[-1]])
    expected = tf.matmul(rows, rows, transpose_b=True).numpy()
    got = patch_gram(x, kernel, strides, padding, copies).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(patch_sums(x, kernel, strides, padding)[..., 0].numpy(),
                               tf.reduce_sum(patches, axis=-1).numpy(), rtol=1e-5, atol=1e-4)
    ways = _gram_ways((size, size, channels), kernel, strides, padding, copies)
    assert patch_gram_flops((size, size, channels), kernel, strides, padding, copies) == min(ways)
    assert ways[1] == rows.shape[1] ** 2 * patches.shape[-1]


def test_patch_gram_cases_cover_both_ways():
    from dp_keras_scale.layers.conv import _gram_ways
    ways = [_gram_ways((size, size, 4), kernel, strides, padding, copies)
            for size, kernel, strides, padding, copies in PATCH_GRAM_CASES]
    assert any(a < b for a, b in ways) and any(b < a for a, b in ways)


@pytest.mark.parametrize("kernel, strides, padding, copies", [
    ((3, 3), (1, 1), "SAME", 1), ((3, 3), (2, 2), "SAME", 2), ((8, 8), (2, 2), "SAME", 1),
    ((4, 4), (2, 2), "VALID", 3), ((1, 1), (2, 2), "VALID", 2)])
def test_every_materialised_form_equals_the_native_op_per_example(
        kernel, strides, padding, copies):
    """Each example's kernel gradient (its copies summed), from TensorFlow's native op run on
    that example alone, against every batched form (einsums, patches, the loop, and the
    grouped op where it runs, with an unknown batch)."""
    from dp_keras_scale.layers.conv import (grouped_kernel_gradients, looped_kernel_gradients,
                                            patch_kernel_gradients, per_example_kernel_gradients)

    rng = np.random.default_rng(3)
    examples, channels, filters = 4, 3, 5
    x = tf.constant(rng.normal(size=(examples * copies, 11, 11, channels)), tf.float32)
    out = tf.nn.conv2d(x, tf.zeros([*kernel, channels, filters]), [1, *strides, 1], padding)
    dy = tf.constant(rng.normal(size=out.shape), tf.float32)
    loop = np.stack([tf.raw_ops.Conv2DBackpropFilter(
        input=x[i * copies:(i + 1) * copies], filter_sizes=[*kernel, channels, filters],
        out_backprop=dy[i * copies:(i + 1) * copies], strides=[1, *strides, 1],
        padding=padding).numpy() for i in range(examples)])

    @tf.function(input_signature=[tf.TensorSpec([None, *x.shape[1:]]),
                                  tf.TensorSpec([None, *dy.shape[1:]])])
    def grouped(x, dy):
        return grouped_kernel_gradients(x, dy, kernel, strides, padding,
                                        tf.shape(x)[0] // copies)

    patches = patch_kernel_gradients(x, dy, kernel, strides, padding, examples)
    forms = [per_example_kernel_gradients(x, dy, kernel, strides, padding, examples),
             tf.reshape(patches, [examples, *kernel, channels, filters]),
             looped_kernel_gradients(x, dy, kernel, strides, padding, examples)]
    for got in forms + ([grouped(x, dy)] if GROUPED else []):
        assert got.shape == loop.shape
        np.testing.assert_allclose(got.numpy(), loop, rtol=0, atol=1e-5 * np.abs(loop).max())


@pytest.mark.parametrize("scale, center", [(True, False), (False, True)])
def test_group_norm_rule_with_scale_or_offset_alone(scale, center):
    """GroupNormalization's closed-form rule (sum of G * x_hat, sum of G) with only one of its
    variables, on 4-D and 3-D inputs, against the per-example reference."""
    from dp_keras_scale.ghost_clipping import _plan

    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = keras.layers.GroupNormalization(groups=2, scale=scale, center=center)(h)
    h = keras.layers.Reshape((36, 4))(keras.layers.ReLU()(h))
    h = keras.layers.GroupNormalization(groups=2, scale=scale, center=center)(h)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = _randomize(keras.Model(inputs, outputs), seed=4)
    kinds = [kind for _, kind in _plan(model, model.trainable_variables)[0]]
    assert kinds.count("group_norm") == 2
    x, y = data(4, 2, shape=(6, 6, 4))
    clip = median_norm(model, x, y)
    for xla in (False, True):
        fast, ref = both(model, x, y, [1.0, 0.5, 1.0, 1.0], clip, "auto", jit=xla)
        assert_same(fast, ref, model)


def test_group_norm_rule_when_called_with_keyword_inputs():
    """A GroupNormalization called as ``layer(inputs=x)`` inside a custom layer still gets
    the closed-form rule, equal to the reference."""
    from dp_keras_scale.ghost_clipping import _plan

    class Normalized(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.norm = keras.layers.GroupNormalization(groups=2)

        def call(self, x):
            return self.norm(inputs=x)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 4))
    h = Normalized()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.ReLU()(h)))
    model = _randomize(keras.Model(inputs, outputs))
    assert [kind for _, kind in _plan(model, model.trainable_variables)[0]] == [
        "conv", "group_norm", "dense"]
    x, y = data(4, 2, shape=(6, 6, 4))
    fast, ref = both(model, x, y, [1.0, 1.0, 1.0, 1.0], median_norm(model, x, y), "auto")
    assert_same(fast, ref, model)


def single_ws_model(shape, padding, head, gains, seed):
    """(model, its WSConv2D): three 3x3 WS filters with the given gains, tanh, `head()`
    (a flattening layer), Dense(3)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape)
    ws = dks.layers.WSConv2D(3, 3, padding=padding)
    h = head()(keras.layers.Activation("tanh")(ws(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ws.gain.assign(np.asarray(gains, np.float32))
    return model, ws


@pytest.mark.parametrize("xla", [False, True], ids=["grouped", "einsum"])
@pytest.mark.parametrize("which", ["kernel", "gain", "both"])
def test_ws_kernel_and_gain_alone_and_a_nearly_constant_example(which, xla):
    """WSConv2D's norms: the kernel's in closed form from per-channel sums (here with an
    example whose image is nearly constant, so that much of its gradient lies along the
    directions the standardisation removes), the gain's from the activations alone. Every
    example is clipped (clip 1e-6), so a wrong norm would scale its contribution visibly."""
    model, ws = single_ws_model((7, 7, 2), "valid", keras.layers.Flatten,
                                np.linspace(0.5, 1.5, 3), seed=4)
    x, y = data(4, 1, shape=(7, 7, 2), seed=4)
    rng = np.random.default_rng(4)
    x = x.numpy()
    x[1] = 0.7 + 0.07 * rng.normal(size=x[1].shape)
    x = tf.constant(x)
    variables = {"kernel": [ws._kernel], "gain": [ws.gain], "both": [ws._kernel, ws.gain]}[which]
    fast, ref = both(model, x, y, np.ones(4), 1e-6, "materialize", rescale=True, xla=xla,
                     variables=variables)
    assert_same(fast, ref, model, variables)


@pytest.mark.parametrize("gains", [(0.0, 1.0, -2.0), (1e-13, 0.5, 1.0), (0.7, 1.0, 1.3)])
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_ws_gain_rows_with_zero_tiny_and_negative_gains(gains, method):
    """The gain's per-example gradients: from the materialised kernel gradients (s u . h), or
    on the ghost route from the layer's output divided by the gain, where a zero or tiny gain
    takes the unit-gain convolution instead. Against the reference, with every example
    clipped (a wrong gain row would change its norm and its share)."""
    model, _ = single_ws_model((6, 6, 2), "same", keras.layers.GlobalAveragePooling2D, gains,
                               seed=5)
    x, y = data(4, 2, shape=(6, 6, 2), seed=5)
    fast, ref = both(model, x, y, np.ones(4), 1e-6, method, rescale=True)
    assert_same(fast, ref, model)


@pytest.mark.parametrize("xla", [False, True], ids=["grouped", "einsum"])
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_ws_contribution_of_a_constant_image_with_a_huge_loss_stays_within_the_clip(method,
                                                                                     xla):
    """An adversarial example: a constant image, so its WS-kernel gradient is (nearly) all
    along the directions the standardisation removes, scaled up by a huge loss. The kernel's
    clipped sum is pushed through the standardisation after summing, where rounding is
    relative to the unprojected gradient; the norm floor keeps the clipped contribution
    within the clip norm."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6, 6, 2))
    h = dks.layers.WSConv2D(4, 3, padding="valid")(inputs)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(3, kernel_initializer="ones")(h))
    model.compile(loss=keras.losses.MeanSquaredError())
    clip = 1e-3
    for value in (1.0, 1e4):
        x = tf.fill([1, 1, 6, 6, 2], value)
        y = tf.fill([1, 1, 3], -1e6)
        out = fast_clipped_gradient_sum(model, model.trainable_variables, x, y, tf.ones([1]),
                                        clip, method=method, xla=xla)
        norm = np.sqrt(sum(np.sum(np.square(g.numpy().astype(np.float64)))
                           for g in out.gradients))
        assert norm <= clip * (1 + 1e-3), (value, norm / clip)


def test_without_onednn_the_materialised_route_uses_einsums(tmp_path):
    """TensorFlow's Eigen CPU kernels (TF_ENABLE_ONEDNN_OPTS=0) refuse the grouped kernel
    gradient: there the batched step must take the einsum form, not crash, and still equal
    the reference (run in a fresh process: the switch is read when TensorFlow starts)."""
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(
        "import sys; sys.path.insert(0, %r)\n" % str(pathlib.Path(__file__).parent)
        + "import numpy as np\n"
        "from conftest import compile_dp, reference_clipped_sum, small_convnet, weights_of\n"
        "from dp_keras_scale.layers.conv import grouped_kernel_gradients_available\n"
        "assert not grouped_kernel_gradients_available()\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.normal(size=(6, 2, 8, 8, 3)).astype('float32'); y = rng.integers(0, 3, 6)\n"
        "model = compile_dp(small_convnet(ws=True), l2_norm_clip=0.05, jit_compile=False)\n"
        "model.clipping_method = 'materialize'\n"
        "expected = reference_clipped_sum(model, x, np.repeat(y[:, None], 2, 1), np.ones(6),"
        " clip=0.05)\n"
        "before = weights_of(model)\n"
        "model.train_on_batch(x, y)\n"
        "for b, a, e in zip(before, weights_of(model), expected):\n"
        "    np.testing.assert_allclose(b - a, e / 6, atol=1e-5 * np.max(np.abs(e)) + 1e-8)\n"
        "print('MATCHED')\n")
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "MATCHED" in done.stdout, done.stdout + done.stderr[-3000:]


# WRN-DEPTH-WIDTH at B = MEMORY_BATCH, K = 1, every convolution on the einsum route: the DP
# step's peak memory against the non-private step's (both: what the step adds to the live
# tensors; WRN-10-2, B = 32 on the AMD machine: 2.7x without the wait, 1.2-1.4x with it)
MEMORY_DEPTH, MEMORY_WIDTH, MEMORY_BATCH, MEMORY_RATIO = 10, 2, 32, 1.75


@dataclasses.dataclass
class StepMemory:
    resident: float     # MiB the first step (trace, route timing) leaves in the live tensors
    added: float        # MiB a later step adds to them at its peak


def _step_memory(model, x, y) -> StepMemory:
    """BFC statistics of the CPU's live tensors around two training steps."""
    start = tf.config.experimental.get_memory_info("CPU:0")["current"]
    model.train_on_batch(x, y)                                    # trace, time the routes
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    model.train_on_batch(x, y)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return StepMemory((before - start) / 2**20, (peak - before) / 2**20)


@pytest.fixture(scope="module")
def step_memory():
    """{private: StepMemory} of WRN-MEMORY_DEPTH-MEMORY_WIDTH, every conv on the einsum route
    (which one "auto" times fastest varies, and with it the memory)."""
    from dp_keras_scale import ghost_clipping
    from dp_keras_scale._allocator import caching_allocator_active

    if not caching_allocator_active():
        pytest.skip("TF_CPU_ALLOCATOR_USE_BFC=0: only TensorFlow's caching allocator keeps the "
                    "statistics these tests read")
    rng = np.random.default_rng(0)
    x = rng.random((MEMORY_BATCH, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, MEMORY_BATCH)
    measured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ghost_clipping, "conv_route", lambda *args: "einsum")
        for private in (False, True):
            keras.utils.set_random_seed(0)
            model = dks.models.wide_resnet(MEMORY_DEPTH, MEMORY_WIDTH, 10, model_class=(
                dks.DPScaleModel if private else keras.Model))
            if private:
                model.clipping_method = "auto"
                compile_dp(model)
                measured[private] = _step_memory(model, x[:, None], y[:, None])
            else:
                model.compile(optimizer=keras.optimizers.SGD(0.1), loss=xent())
                measured[private] = _step_memory(model, x, y)
            measured["parameters"] = model.count_params()
    return measured


def test_the_dp_step_holds_no_layer_work_from_the_forward_pass(step_memory):
    # Each layer's per-example work (the einsum route's shifted inputs, patches, Gram matrices)
    # must wait for the layer's output gradient: formed right after the forward pass, every
    # layer's copies were alive at once, and the DP step's peak was 3.3x the non-private
    # step's for WRN-16-4 at (64, 1) (1.3x with the wait).
    added = {private: step_memory[private].added for private in (False, True)}
    assert added[True] <= MEMORY_RATIO * added[False], added


def test_the_dp_step_keeps_no_per_example_buffers_between_steps(step_memory):
    # A `zeros_like` of per-example gradients (the masked sum's branch for non-finite
    # examples) was folded into a constant of B x parameters that the step's graph held for
    # good: 60 MiB of WRN-16-4's resident memory at (64, 1). What the DP step keeps beyond
    # the non-private one must stay within a few copies of the parameters (variables,
    # optimizer and accumulator state), far below one copy per example.
    extra = step_memory[True].resident - step_memory[False].resident
    copies = extra * 2**20 / (4 * step_memory["parameters"])
    assert copies <= 8, (step_memory, copies)
