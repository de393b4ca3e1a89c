"""NF-ResNets and scaled activations against independent references.

References: published ResNet parameter counts, Monte-Carlo variances, the signal-propagation
recursion of Brock et al. (2021) derived here from the ResNet stage layouts, and the
per-example DP-SGD loop of conftest.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import integrate, special, stats

import dp_keras_scale as dks
from conftest import assert_close, compile_dp, reference_clipped_sum, weights_of
from dp_keras_scale.layers.activations import ScaledActivation
from dp_keras_scale.layers.conv import per_example_convolutions
from dp_keras_scale.models.nf_resnet import SkipInitResidual

# Blocks per stage of the published ResNets (He et al. 2016).
RESNET_LAYOUTS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
                  200: (3, 24, 36, 3)}


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "elu", "sigmoid"])
def test_scaled_activations_preserve_unit_variance(activation):
    z = np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)
    out = np.asarray(ScaledActivation(activation)(z), np.float64)
    assert abs(out.var() - 1.0) < 0.01          # standard error of the estimate is ~0.002
    # input_scale divides the input by its expected std beta before the nonlinearity.
    scaled = np.asarray(ScaledActivation(activation, input_scale=0.25)(4.0 * z), np.float64)
    np.testing.assert_allclose(scaled, out, rtol=1e-5, atol=1e-6)


def test_gamma_matches_closed_form_and_scipy_quadrature():
    # ReLU: Var(relu(z)) = 1/2 - 1/(2 pi), so gamma = sqrt(2 / (1 - 1/pi)).
    assert dks.layers.activation_gamma("relu") == pytest.approx(
        math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-7)
    density = stats.norm.pdf
    for name, fn in [("gelu", lambda z: z * stats.norm.cdf(z)),
                     ("silu", lambda z: z * special.expit(z)),
                     ("tanh", math.tanh)]:
        mean = integrate.quad(lambda z: fn(z) * density(z), -np.inf, np.inf)[0]
        var = integrate.quad(lambda z: (fn(z) - mean) ** 2 * density(z), -np.inf, np.inf)[0]
        assert dks.layers.activation_gamma(name) == pytest.approx(var ** -0.5, rel=1e-6), name
    with pytest.raises(ValueError, match="activation must be one of"):
        ScaledActivation("softmax")


def test_nf_resnet50_parameter_count_and_layers():
    model = dks.models.nf_resnet(50, num_classes=1000)
    assert isinstance(model, dks.DPScaleModel)
    # torchvision's ResNet-50 has 25,557,032 parameters; each BatchNorm's (gamma, beta) pair
    # becomes each WS convolution's (gain, bias) pair, and the 16 blocks add one SkipInit gain.
    assert model.count_params() == 25_557_032 + 16
    assert abs(model.count_params() / 25.5e6 - 1) < 0.015
    kinds = {type(layer).__name__ for layer in model.layers}
    assert kinds == {"InputLayer", "WSConv2D", "MaxPooling2D", "ScaledActivation",
                     "SkipInitResidual", "GlobalAveragePooling2D", "Dense"}
    assert sum(isinstance(layer, dks.layers.WSConv2D) for layer in model.layers) == 53
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dks.model.warn_slow_layers(model)
    assert not caught


@pytest.mark.parametrize("depth,input_shape,stem,width,classes,pooled", [
    (26, (32, 32, 3), "cifar", 1 / 16, 10, (4, 4)),
    (26, (40, 56, 3), "imagenet", 1 / 32, 5, (2, 2)),
    (26, (28, 28, 1), "cifar", 1 / 32, 10, (4, 4)),
])
def test_forward_shapes_and_skipinit_identity(depth, input_shape, stem, width, classes, pooled):
    keras.utils.set_random_seed(0)
    model = dks.models.nf_resnet(depth, classes, width=width, input_shape=input_shape, stem=stem,
                                 model_class=keras.Model)
    x = np.random.default_rng(1).normal(size=(2, *input_shape)).astype(np.float32)
    blocks = keras.Model(model.inputs, [model.get_layer("stage1_block1_add").output,
                                        model.get_layer("stage1_block2_add").output,
                                        model.get_layer("stage4_block1_add").output,
                                        model.output])
    first, second, last, logits = (np.asarray(t) for t in blocks(x))
    assert logits.shape == (2, classes) and np.all(logits == 0)   # zero-initialized classifier
    assert last.shape == (2, *pooled, round(2048 * width))
    # SkipInit: with zero gains an identity-shortcut block returns its input unchanged.
    np.testing.assert_array_equal(second, first)
    assert np.all(np.isfinite(first)) and np.std(first) > 0.1


def _expected_variances(depth: int, alpha: float) -> list[float]:
    """Var(h) after each block: +alpha^2 per block, reset to 1 at each stage's transition."""
    variances = []
    for blocks in RESNET_LAYOUTS[depth]:
        variance = 1.0
        for _ in range(blocks):
            variance += alpha ** 2
            variances.append(variance)
    return variances


@pytest.mark.parametrize("depth,input_shape,stem,width,activation,alpha", [
    (200, (16, 16, 3), "cifar", 1 / 8, "relu", 0.2),
    (50, (64, 64, 3), "imagenet", 1 / 4, "silu", 0.3),
])
def test_signal_propagation_follows_the_analytic_variance(depth, input_shape, stem, width,
                                                          activation, alpha):
    keras.utils.set_random_seed(0)
    model = dks.models.nf_resnet(depth, 10, width=width, input_shape=input_shape, stem=stem,
                                 activation=activation, alpha=alpha, model_class=keras.Model)
    adds = [layer for layer in model.layers if isinstance(layer, SkipInitResidual)]
    assert len(adds) == sum(RESNET_LAYOUTS[depth])
    for layer in adds:
        layer.skip_gain.assign(1.0)          # zero gains would make every block trivial
    probe = keras.Model(model.inputs, [layer.output for layer in adds])
    x = np.random.default_rng(0).normal(size=(16, *input_shape)).astype(np.float32)
    measured = [float(np.mean(np.mean(np.square(h), axis=(0, 1, 2)))) for h in probe(x)]
    ratios = np.array(measured) / np.array(_expected_variances(depth, alpha))
    # Without the 1/beta input scaling the deep stage's ratios exceed 2.6 (depth 200), without
    # gamma they fall below 0.1; small maps lose a little variance at zero-padded borders.
    assert np.all((ratios > 0.5) & (ratios < 1.5)), np.round(ratios, 2)


def test_per_example_gradients_of_every_layer_kind_vectorize_without_loops():
    # The layer kinds of an NF-ResNet (asserted above), composed as in a block.
    inputs = keras.Input((16, 16, 3))
    h = dks.layers.WSConv2D(4, 7, strides=2, use_bias=True)(inputs)
    h = keras.layers.MaxPooling2D(3, strides=2, padding="same")(h)
    pre = ScaledActivation("relu", input_scale=0.5)(h)
    y = dks.layers.WSConv2D(4, 3, strides=2, use_bias=True)(pre)
    h = SkipInitResidual(0.2)([dks.layers.WSConv2D(4, 1, strides=2, use_bias=True)(pre), y])
    h = keras.layers.GlobalAveragePooling2D()(ScaledActivation("gelu")(h))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    variables = model.trainable_variables

    def grad(xi):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(model(xi, training=True)))
        return tape.gradient(loss, variables)

    x = tf.random.normal([3, 2, 16, 16, 3])
    # As the per-example reference path runs it: WSConv2D's vectorizable kernel gradient is
    # used inside per_example_convolutions() (whole-batch steps take TF's native one).
    with dks.model.fast_convolutions(model), per_example_convolutions():
        graph = tf.function(lambda x: tf.vectorized_map(grad, x)).get_concrete_function(x).graph
    ops = {op.type for op in graph.get_operations()}
    assert "MaxPoolGrad" in ops and not any("While" in op for op in ops), sorted(ops)


@pytest.mark.slow   # converting the per-example gradient of 8 blocks takes ~30 s of CPU
def test_dp_step_matches_per_example_reference():
    keras.utils.set_random_seed(0)
    model = dks.models.nf_resnet(26, 3, width=1 / 32, input_shape=(16, 16, 3), stem="imagenet")
    rng = np.random.default_rng(2)
    for layer in model.layers:          # non-zero gains and classifier: every gradient is live
        if isinstance(layer, SkipInitResidual):
            layer.skip_gain.assign(rng.uniform(0.5, 1.5))
    logits = model.get_layer("logits")
    logits.kernel.assign(rng.normal(size=logits.kernel.shape).astype(np.float32))
    compile_dp(model, l2_norm_clip=0.05, learning_rate=0.5)
    x = rng.normal(size=(3, 2, 16, 16, 3)).astype(np.float32)   # 3 examples x 2 copies
    y = rng.integers(0, 3, size=3)
    expected = reference_clipped_sum(model, x, np.repeat(y[:, None], 2, 1), np.ones(3),
                                     clip=0.05)
    assert all(np.any(e != 0) for e in expected)

    before = weights_of(model)
    model.train_on_batch(x, y)
    update = [b - a for b, a in zip(before, weights_of(model))]
    assert_close(update, [0.5 * e / 3 for e in expected])


def test_save_load_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = dks.models.nf_resnet(26, 4, width=1 / 32, input_shape=(8, 8, 3), stem="cifar",
                                 activation="gelu", alpha=0.3, model_class=keras.Model)
    for i, layer in enumerate(l for l in model.layers if isinstance(l, SkipInitResidual)):
        layer.skip_gain.assign(0.1 * (i + 1))
    model.get_layer("logits").kernel.assign(np.ones(model.get_layer("logits").kernel.shape))
    model.save(tmp_path / "nf.keras")
    loaded = keras.models.load_model(tmp_path / "nf.keras")
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype(np.float32)
    out = np.asarray(model(x))
    assert np.std(out) > 0
    np.testing.assert_allclose(np.asarray(loaded(x)), out, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="26, 50, 101, 152, 200"):
        dks.models.nf_resnet(34)
    with pytest.raises(ValueError, match="stem must be one of"):
        dks.models.nf_resnet(26, stem="tiny")
    with pytest.raises(ValueError, match="width"):
        dks.models.nf_resnet(26, width=1 / 128, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="alpha"):
        dks.models.nf_resnet(26, alpha=0)
