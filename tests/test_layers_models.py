"""The per-example-fast convolution, WSConv2D and Wide-ResNet against direct references."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_keras_scale as dks
from dp_keras_scale.layers.conv import conv2d
from dp_keras_scale.layers.group_norm import group_normalization, group_norm_parameter_rows


@pytest.mark.parametrize("stride,padding,size,kernel", [
    (1, "SAME", 8, 3), (2, "SAME", 9, 3), (2, "SAME", 8, 3), (2, "VALID", 9, 3),
    (1, "SAME", 8, 1), (2, "SAME", 8, 1), (1, "VALID", 7, 5)])
def test_conv2d_matches_tf_conv_and_its_gradients(stride, padding, size, kernel):
    rng = np.random.default_rng(stride * 100 + size + kernel)
    x = tf.constant(rng.normal(size=(3, size, size, 4)), tf.float32)
    k = tf.constant(rng.normal(size=(kernel, kernel, 4, 5)), tf.float32)
    probe = tf.constant(rng.normal(size=(3, *tf.nn.conv2d(x, k, stride, padding).shape[1:])),
                        tf.float32)
    results = []
    for conv in (lambda a, b: tf.nn.conv2d(a, b, stride, padding),
                 lambda a, b: conv2d(a, b, (stride, stride), padding)):
        with tf.GradientTape() as tape:
            tape.watch([x, k])
            y = conv(x, k)
            loss = tf.reduce_sum(y * probe)
        results.append([y, *tape.gradient(loss, [x, k])])
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,groups,scale,center", [
    ((3, 6, 5, 8), 4, True, True), ((3, 6, 5, 8), 1, True, False), ((3, 6, 5, 8), 8, False, True),
    ((4, 7, 6), 2, True, True)])
def test_group_normalization_matches_keras_layer_and_its_gradients(shape, groups, scale, center):
    """The closed-form GroupNorm (used by the DP step) against keras.layers.GroupNormalization:
    output, gradients for the input, gamma and beta under a random output gradient (inputs
    with a large mean, so that cancellation would show), and the per-row gamma / beta
    gradients against a per-example loop of the Keras layer."""
    rng = np.random.default_rng(sum(shape) + groups)
    x = tf.constant(rng.normal(size=shape) * 3 + 5, tf.float32)
    probe = tf.constant(rng.normal(size=shape), tf.float32)
    layer = keras.layers.GroupNormalization(groups=groups, scale=scale, center=center,
                                            epsilon=1e-3)
    layer.build(shape)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    params = [v for v, used in ((layer.gamma, scale), (layer.beta, center)) if used]
    results = []
    for fn in (layer, lambda t: group_normalization(t, groups, 1e-3,
                                                     layer.gamma if scale else None,
                                                     layer.beta if center else None).output):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = fn(x)
            loss = tf.reduce_sum(z * probe)
        results.append([z, *tape.gradient(loss, [x, *params])])
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    gamma_rows, beta_rows = group_norm_parameter_rows(
        group_normalization(x, groups, 1e-3), probe)
    for i in range(shape[0]):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x[i:i + 1]) * probe[i:i + 1])
        expected = tape.gradient(loss, params)
        actual = [rows[i] for rows, used in ((gamma_rows, scale), (beta_rows, center)) if used]
        for e, a in zip(expected, actual, strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


def test_per_example_kernel_gradients_vectorize_without_a_loop():
    rng = np.random.default_rng(1)
    kernel = tf.Variable(rng.normal(size=(3, 3, 4, 6)).astype(np.float32))
    x = tf.constant(rng.normal(size=(5, 2, 8, 8, 4)), tf.float32)   # 5 examples x 2 copies

    def grad(xi, conv):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(conv(xi, kernel)))
        return tape.gradient(loss, kernel)

    fast = tf.function(lambda x: tf.vectorized_map(
        lambda xi: grad(xi, lambda a, b: conv2d(a, b, (2, 2), "SAME")), x))
    ops = {op.type for op in fast.get_concrete_function(x).graph.get_operations()}
    assert "Conv2DBackpropFilter" not in ops and not any("While" in op for op in ops)
    expected = np.stack([grad(x[i], lambda a, b: tf.nn.conv2d(a, b, 2, "SAME")) for i in range(5)])
    np.testing.assert_allclose(fast(x), expected, rtol=1e-4, atol=1e-4)


def test_wsconv2d_standardizes_each_output_channel():
    layer = dks.layers.WSConv2D(8, 3)
    layer.build((None, 6, 6, 4))
    layer.gain.assign(np.arange(1, 9, dtype=np.float32))
    w = layer.standardized_kernel().numpy()
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    fan_in = 3 * 3 * 4
    np.testing.assert_allclose(w.std(axis=(0, 1, 2)) * np.sqrt(fan_in), np.arange(1, 9), rtol=1e-3)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(layer(x), tf.nn.conv2d(x, w, 1, "SAME"), rtol=1e-4, atol=1e-4)


def test_wsconv2d_saves_and_loads(tmp_path):
    model = keras.Sequential([keras.Input((6, 6, 3)), dks.layers.WSConv2D(4, 3, epsilon=1e-3)])
    model.layers[0].gain.assign(np.full(4, 2.0, np.float32))
    path = tmp_path / "ws.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[0].epsilon == 1e-3
    x = np.ones((1, 6, 6, 3), np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


@pytest.mark.parametrize("depth,width,classes,expected", [
    (16, 4, 10, 2.75e6), (40, 4, 10, 8.9e6), (28, 10, 10, 36.5e6)])
def test_wide_resnet_parameter_counts(depth, width, classes, expected):
    model = dks.models.wide_resnet(depth, width, num_classes=classes)
    assert isinstance(model, dks.DPScaleModel)
    assert abs(model.count_params() / expected - 1) < 0.02
    assert model.output_shape == (None, classes)


def test_wide_resnet_variants_and_bad_depth():
    plain = dks.models.wide_resnet(10, 1, groups=None, weight_standardization=False,
                                   model_class=keras.Model, input_shape=(28, 28, 1))
    assert not any(isinstance(layer, keras.layers.GroupNormalization) for layer in plain.layers)
    assert plain(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        dks.models.wide_resnet(depth=15)


@pytest.mark.parametrize("clipping_method, jit", [("reference", True), ("auto", False)])
def test_compact_cnn_dp_update_matches_the_per_example_loop(clipping_method, jit):
    """The 8x8 / stride-2 and 4x4 / stride-2 WS convolutions, max-pooling and Dense layers of
    `compact_cnn` go exactly through the vectorized per-example path under XLA and through
    the batched path without XLA (grouped kernel gradients: what the bundled CPU configs run)."""
    from conftest import assert_close, compile_dp, reference_clipped_sum

    rng = np.random.default_rng(3)
    x = (rng.random((5, 28, 28, 1)) * 255).astype(np.float32)
    y = rng.integers(0, 10, 5)
    keras.utils.set_random_seed(0)
    model = dks.models.compact_cnn((28, 28, 1), 10, mean=0.3, std=0.35)
    assert model.count_params() == 26_106 and model.name == "compact_cnn"
    for layer in ("logits",):      # a zero classifier has zero gradients below it: perturb it
        model.get_layer(layer).kernel.assign(rng.normal(size=(32, 10)).astype(np.float32))
    compile_dp(model, jit_compile=jit, l2_norm_clip=0.1, learning_rate=1.0)
    model.clipping_method = clipping_method
    expected = reference_clipped_sum(model, x[:, None], y[:, None], np.ones(5), clip=0.1)
    before = [v.numpy() for v in model.trainable_variables]
    model.train_on_batch(x, y)
    update = [b - v.numpy() for b, v in zip(before, model.trainable_variables)]
    assert_close(update, [e / 5 for e in expected])
    with pytest.raises(ValueError, match="two conv widths"):
        dks.models.compact_cnn(widths=(8, 16, 32))


def test_compact_cnn_config_needs_two_widths():
    from dp_keras_scale import config as cfg

    config = cfg.load_config("mnist_cpu", ["model.architecture=\"compact_cnn\"",
                                           "model.widths=[8, 16]"])
    from dp_keras_scale import registry

    model = registry.build_model(config, (28, 28, 1))
    assert model.name == "compact_cnn" and model.get_layer("conv2").filters == 16
    assert cfg.load_config("mnist_cpu")["training"]["clipping_method"] == "auto"
    with pytest.raises(cfg.ConfigError, match="clipping_method.*reference, auto"):
        cfg.load_config("mnist_cpu", ["training.clipping_method=\"ghost\""])
    with pytest.raises(cfg.ConfigError, match="two numbers, e.g. \\[16, 32\\]"):
        cfg.load_config("mnist_cpu", ["model.architecture=\"compact_cnn\"",
                                      "model.widths=[16, 32, 32, 64]"])
