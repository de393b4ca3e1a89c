"""Scattering features: layout, per-example independence, normalization, and DP training on them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_keras_scale as dks
from dp_keras_scale import finetune
from dp_keras_scale.models.scatternet import Scattering2D, scattering_channels


def test_channel_count_matches_order_two_formula():
    # order 0: 1 map; order 1: J*L; order 2: pairs j1 < j2 (J(J-1)/2) times L*L angles
    for J, L in [(1, 4), (2, 8), (3, 6)]:
        expected = 1 + J * L + sum(L * L for j1 in range(J) for j2 in range(j1 + 1, J))
        assert scattering_channels(J, L) == expected
    out = Scattering2D(2, 8)(tf.zeros([2, 32, 32, 3]))
    assert tuple(out.shape) == (2, 8, 8, 3 * 81)


def test_constant_image_has_only_the_low_pass_coefficient():
    # Wavelets have zero mean, so every order >= 1 coefficient of a constant image vanishes,
    # and the order-0 (low-pass) coefficient is the constant itself.
    value = 0.7
    out = Scattering2D(2, 8)(tf.fill([1, 28, 28, 1], value)).numpy()
    np.testing.assert_allclose(out[..., 0], value, rtol=1e-4)
    assert np.abs(out[..., 1:]).max() < 1e-4 * value


def test_each_channel_is_transformed_on_its_own_in_channels_last_order():
    rng = np.random.default_rng(0)
    x = rng.random([2, 16, 16, 3]).astype(np.float32)
    layer = Scattering2D(2, 4)
    joint = layer(x).numpy()
    k = scattering_channels(2, 4)
    for c in range(3):
        alone = Scattering2D(2, 4)(x[..., c:c + 1]).numpy()
        np.testing.assert_allclose(joint[..., c * k:(c + 1) * k], alone, rtol=1e-5, atol=1e-6)


def test_features_of_an_example_do_not_depend_on_its_batch():
    # Caching features is only DP-safe if each row is a function of its own example.
    x, _ = dks.data.load("mnist", "test")
    model = dks.models.scatternet((28, 28, 1))
    batch = model(x[:16]).numpy()
    for i in (0, 7, 15):
        alone = model(x[i:i + 1]).numpy()
        np.testing.assert_allclose(batch[i], alone[0], rtol=1e-4, atol=1e-5)


def test_group_normalized_features_have_zero_mean_unit_variance_per_group():
    x, _ = dks.data.load("mnist", "test")
    raw = Scattering2D(2, 8)(x[:4].astype(np.float32) / 255.0).numpy()
    features = dks.models.scatternet((28, 28, 1), groups=27)(x[:4]).numpy()
    groups = features.reshape(4, 7, 7, 27, 3)
    expected = raw.reshape(4, 7, 7, 27, 3)
    mean = expected.mean(axis=(1, 2, 4), keepdims=True)
    var = expected.var(axis=(1, 2, 4), keepdims=True)
    np.testing.assert_allclose(groups, (expected - mean) / np.sqrt(var + 1e-5), rtol=1e-3,
                               atol=1e-3)


def test_bad_shapes_and_groups_give_clear_errors():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*J"):
        Scattering2D(2, 8)(tf.zeros([1, 30, 30, 1]))
    with pytest.raises(ValueError, match="must divide the 81 scattering maps"):
        dks.models.scatternet((28, 28, 1), groups=10)


def test_scatternet_round_trips_through_keras_saving(tmp_path):
    x, _ = dks.data.load("mnist", "test")
    model = dks.models.scatternet((28, 28, 1))
    path = str(tmp_path / "scatternet.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(x[:8]).numpy(), model(x[:8]).numpy(), rtol=1e-5,
                               atol=1e-6)


def test_dp_linear_classifier_on_cached_scattering_features_learns_mnist():
    x, y = dks.data.load("mnist", "train")
    x_test, y_test = dks.data.load("mnist", "test")
    x, y, x_test, y_test = x[:3000], y[:3000], x_test[:1000], y_test[:1000]
    # L=4 angles (25 maps of 7x7) keeps the test fast; the recipe uses L=8 (81 maps).
    model = finetune.build(dks.models.scatternet((28, 28, 1), L=4, groups=5), 10,
                           mode="classifier_only", classifier="add")
    features = finetune.extract_features(model, x)
    assert features.shape == (3000, 25 * 7 * 7)
    head = finetune.classifier_head(model)
    sampler = dks.data.BatchSampler(len(features), 500, seed=0)
    head.compile(optimizer=dks.DPSGD(2.0, momentum=0.9, l2_norm_clip=1.0, noise_multiplier=1.0,
                                     expected_batch_size=sampler.expected_batch_size,
                                     rescale_to_unit_norm=True, noise_seed=0),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    head.fit(sampler.dataset(features, y, steps=20), steps_per_epoch=20, verbose=0)
    # The image model shares the trained classifier: evaluate it on raw test images.
    predictions = np.argmax(model(x_test).numpy(), axis=1)
    assert np.mean(predictions == y_test) > 0.85


def test_builtin_scatternet_source_matches_the_python_backbone():
    # finetune.source = "scatternet" (configs) builds the same features as the Python API.
    x, _ = dks.data.load("mnist", "test")
    model = finetune.build("scatternet", 10, mode="classifier_only", classifier="add",
                           image_shape=(28, 28, 1))
    reference = dks.models.scatternet((28, 28, 1))
    np.testing.assert_allclose(finetune.extract_features(model, x[:8]), reference(x[:8]).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert not model.get_layer(finetune.BACKBONE_NAME).trainable_weights
