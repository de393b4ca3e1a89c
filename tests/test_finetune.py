"""dks.finetune: SavedModel, .keras and TF-Hub backbones; both modes; DP exactness."""

from __future__ import annotations

import hashlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_keras_scale as dks
from conftest import NUM_CLASSES, assert_close, compile_dp, reference_clipped_sum, weights_of
from dp_keras_scale import finetune

SHAPE = (8, 8, 3)


def pretrained_classifier(seed: int = 0) -> keras.Model:
    """Conv -> BatchNorm -> ReLU -> Conv -> pool ("features") -> Dense classifier."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(6, 3, padding="valid", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="features")(h)
    outputs = keras.layers.Dense(NUM_CLASSES, name="logits")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)   # non-trivial stored statistics, as after pre-training
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(size=4).astype(np.float32) * 0.3)
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=4).astype(np.float32))
    return model


class HubExport(tf.Module):
    """The TF-Hub reusable SavedModel layout: `__call__(images, training=False)` + variables."""

    def __init__(self, model: keras.Model, training_mode: bool = False):
        super().__init__()
        self.model = model
        self.training_mode = training_mode

    @tf.function(input_signature=[tf.TensorSpec([None, *SHAPE], tf.float32)])
    def __call__(self, images):
        return self.model(images, training=self.training_mode)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    model = pretrained_classifier()
    model.save(root / "classifier.keras")
    features = keras.Model(model.inputs, model.get_layer("features").output)
    tf.saved_model.save(HubExport(features), str(root / "hub_features"))
    features.export(str(root / "exported_features"), verbose=False)   # "serving_default"
    return {"keras": root / "classifier.keras", "hub": root / "hub_features",
            "export": root / "exported_features", "root": root}


def one_step_update(model, x, y, mask=None):
    before = weights_of(model)
    model.train_on_batch(x, y, sample_weight=mask)
    return [b - a for b, a in zip(before, weights_of(model))]


def graph_op_types(concrete) -> set[str]:
    graph_def = concrete.graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    for fn in graph_def.library.function:
        ops |= {node.op for node in fn.node_def}
    return ops


def randomize_classifier(model, seed=1):
    rng = np.random.default_rng(seed)
    for v in model.get_layer("classifier").trainable_variables:
        v.assign(rng.normal(size=v.shape).astype(np.float32))


# --------------------------------------------------------------------------- both modes train


@pytest.mark.parametrize("source,classifier,mode", [
    ("keras", "reset", "all_layers"), ("keras", "keep", "classifier_only"),
    ("hub", "add", "all_layers"), ("hub", "add", "classifier_only"),
    ("export", "add", "classifier_only")])
def test_both_modes_train_the_right_weights(files, batch, source, classifier, mode):
    x, y = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the slow-path warning has its own test
        model = finetune.build(files[source], NUM_CLASSES, mode=mode, classifier=classifier)
    compile_dp(model, l2_norm_clip=0.1, noise_multiplier=0.5)
    backbone = model.get_layer("backbone")
    classifier_layer = model.get_layer("classifier")
    frozen_before = [v.numpy().copy() for v in backbone.weights]
    head_before = [v.numpy().copy() for v in classifier_layer.weights]
    if classifier != "keep":
        np.testing.assert_array_equal(head_before[0], 0.0)      # reset: zero-initialized
    features_before = finetune.extract_features(model, x[:, 0])
    for _ in range(2):   # a zero-initialized head passes gradients to the backbone from step 2
        model.train_on_batch(x, y)
    assert all(np.any(b != a.numpy()) for b, a in zip(head_before, classifier_layer.weights))
    features_after = finetune.extract_features(model, x[:, 0])
    if mode == "classifier_only":
        assert len(model.trainable_variables) == 2
        for before, after in zip(frozen_before, backbone.weights):
            np.testing.assert_array_equal(before, after.numpy())
        np.testing.assert_array_equal(features_before, features_after)
    else:
        assert len(model.trainable_variables) > 2
        # the backbone's own function (the SavedModel graph, or the Keras layers) changed
        assert np.max(np.abs(features_after - features_before)) > 1e-6


def test_keep_reuses_the_pretrained_classifier(files, batch):
    x, _ = batch
    pretrained = keras.models.load_model(files["keras"])
    model = finetune.build(files["keras"], NUM_CLASSES, classifier="keep")
    np.testing.assert_allclose(model.predict(x[:, 0], verbose=0),
                               pretrained.predict(x[:, 0], verbose=0), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- DP exactness


@pytest.mark.parametrize("source", ["keras", "hub"])
def test_all_layers_clipped_sum_matches_per_example_loop(files, batch, source):
    x, y = batch
    mask = np.array([1, 1, 0, 1, 1, 1], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = finetune.build(files[source], NUM_CLASSES, mode="all_layers",
                               classifier="keep" if source == "keras" else "add")
    randomize_classifier(model)   # non-zero head: gradients reach the backbone at once
    # 5 examples are masked in; the normalizer is the expected batch size 6.5, not 5.
    compile_dp(model, l2_norm_clip=0.05, learning_rate=0.5, expected_batch_size=6.5)
    y_copies = np.repeat(y[:, None], 2, axis=1)
    expected = reference_clipped_sum(model, x, y_copies, mask, clip=0.05)
    backbone_ids = {id(v) for v in model.get_layer("backbone").trainable_variables}
    assert len(backbone_ids) >= 2
    for v, e in zip(model.trainable_variables, expected):
        if id(v) in backbone_ids:
            assert np.max(np.abs(e)) > 1e-6, v.path   # gradients flow into the backbone
    assert_close(one_step_update(model, x, y, mask), [0.5 * e / 6.5 for e in expected])


def test_keras_backbone_convs_take_the_fast_path_savedmodel_warns(files, batch):
    x, y = batch

    def train_step_ops(model):
        compile_dp(model, l2_norm_clip=0.05)
        model.train_on_batch(x, y)   # builds the optimizer; tracing below changes nothing
        return graph_op_types(tf.function(model.train_step, autograph=False).get_concrete_function(
            (tf.constant(x), tf.constant(y))))

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no slow-layer warning for plain Keras Conv2D
        fast = finetune.build(files["keras"], NUM_CLASSES, mode="all_layers")
        ops = train_step_ops(fast)
    assert "Conv2DBackpropFilter" not in ops and not any("While" in op for op in ops)

    with pytest.warns(UserWarning, match=r"hub_features.*Conv2D x2.*slow"):
        slow = finetune.build(files["hub"], NUM_CLASSES, mode="all_layers", classifier="add")
    assert any("While" in op for op in train_step_ops(slow))   # the warning is true
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # frozen SavedModel: no gradients, no warning
        finetune.build(files["hub"], NUM_CLASSES, mode="classifier_only", classifier="add")


def test_savedmodel_layer_trains_the_savedmodels_own_variables(files):
    layer = finetune.backbone(str(files["hub"]), trainable=True)
    # conv kernels and biases, BatchNorm gamma/beta (inference mode: an affine map per example)
    assert len(layer.trainable_variables) == 6
    assert len(layer.non_trainable_variables) == 2    # BatchNorm's stored statistics
    x = tf.random.stateless_normal([2, *SHAPE], seed=[1, 2])
    before = layer(x).numpy()
    for v in layer.trainable_variables:
        v.assign(v * 0.5)                              # writes reach the SavedModel's graph
    assert not np.allclose(before, layer(x).numpy())
    layer.trainable = False
    assert layer.trainable_variables == []


# --------------------------------------------------------------------------- BatchNorm


def test_frozen_batchnorm_accepted_statistics_unchanged(files, batch):
    x, y = batch
    model = finetune.build(files["keras"], NUM_CLASSES, mode="all_layers", classifier="keep")
    bn = model.get_layer("backbone").get_layer("bn")
    assert not bn.trainable and bn.weights
    # inference mode even when training: outputs do not depend on the batch
    np.testing.assert_allclose(model(x[:, 0], training=True), model(x[:, 0], training=False),
                               rtol=1e-5, atol=1e-6)
    compile_dp(model, l2_norm_clip=0.1)
    before = [v.numpy().copy() for v in bn.weights]
    conv_before = model.get_layer("backbone").get_layer("conv1").kernel.numpy().copy()
    model.fit(x, y, batch_size=3, epochs=1, verbose=0)
    for b, a in zip(before, bn.weights):
        np.testing.assert_array_equal(b, a.numpy())
    assert np.any(conv_before != model.get_layer("backbone").get_layer("conv1").kernel.numpy())


def test_trainable_batchnorm_is_rejected(files):
    model = finetune.build(files["keras"], NUM_CLASSES, mode="all_layers")
    model.get_layer("backbone").get_layer("bn").trainable = True
    with pytest.raises(ValueError, match="'bn'.*BatchNormalization"):
        compile_dp(model)


def test_savedmodel_mixing_examples_is_rejected(files):
    path = files["root"] / "training_mode_bn"
    features = keras.Model(*(lambda m: (m.inputs, m.get_layer("features").output))(
        pretrained_classifier()))
    tf.saved_model.save(HubExport(features, training_mode=True), str(path))
    with pytest.raises(ValueError, match="other examples of the batch"):
        finetune.build(path, NUM_CLASSES, classifier="add")


# --------------------------------------------------------------------------- cached features


@pytest.mark.parametrize("source,classifier", [("keras", "reset"), ("hub", "add")])
def test_cached_features_give_the_same_head_update(files, batch, source, classifier):
    x, y = batch
    x = x[:, 0]
    mask = np.array([1, 0, 1, 1, 1, 1], np.float32)
    options = dict(l2_norm_clip=0.05, learning_rate=0.5, expected_batch_size=5.0)
    images = compile_dp(finetune.build(files[source], NUM_CLASSES, mode="classifier_only",
                                       classifier=classifier), **options)
    cached = finetune.build(files[source], NUM_CLASSES, mode="classifier_only",
                            classifier=classifier)
    features = finetune.extract_features(cached, x, batch_size=4)
    head = compile_dp(finetune.classifier_head(cached), **options)
    for _ in range(2):
        update_images = one_step_update(images, x, y, mask)
        update_cached = one_step_update(head, features, y, mask)
        assert_close(update_cached, update_images, rtol=1e-5)
        assert max(np.max(np.abs(u)) for u in update_cached) > 1e-4
    # the image model classifies with the classifier that the head trained
    np.testing.assert_allclose(cached.predict(x, verbose=0), head.predict(features, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_cached_features_train_with_poisson_sampler(files):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, *SHAPE)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=40)
    model = finetune.build(files["hub"], NUM_CLASSES, mode="classifier_only", classifier="add")
    features = finetune.extract_features(model, x, batch_size=16)
    assert features.shape == (40, 6)
    sampler = dks.data.BatchSampler(len(features), expected_batch_size=8, seed=0)
    head = compile_dp(finetune.classifier_head(model), noise_multiplier=1.0,
                      expected_batch_size=sampler.expected_batch_size)
    head.fit(sampler.dataset(features, y, steps=3), epochs=1, steps_per_epoch=3, verbose=0)
    assert int(head.optimizer.iterations) == 3
    assert np.any(model.get_layer("classifier").kernel.numpy() != 0)


# --------------------------------------------------------------------------- sources and errors


def test_tfhub_handle_is_resolved_from_tfhub_cache_dir(files, monkeypatch, tmp_path):
    handle = "https://tfhub.dev/dp-keras-scale/test-features/1"
    cached = tmp_path / hashlib.sha1(handle.encode("utf8")).hexdigest()   # TF-Hub's cache key
    tf.saved_model.save(HubExport(keras.Model(*(lambda m: (
        m.inputs, m.get_layer("features").output))(pretrained_classifier()))), str(cached))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    layer = finetune.backbone(handle)
    direct = finetune.backbone(str(files["hub"]))
    x = tf.random.stateless_normal([3, *SHAPE], seed=[4, 5])
    np.testing.assert_allclose(layer(x), direct(x), rtol=1e-5, atol=1e-6)


def test_missing_tfhub_handle_names_handle_and_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    handle = "https://tfhub.dev/dp-keras-scale/does-not-exist/1"
    with pytest.raises(finetune.BackboneNotFoundError) as error:
        finetune.backbone(handle)
    assert handle in str(error.value) and str(tmp_path) in str(error.value)
    assert "TFHUB_CACHE_DIR" in str(error.value)


@pytest.mark.parametrize("make,match", [
    (lambda root: root / "missing_dir", "does not exist"),
    (lambda root: root, "not a SavedModel"),
    (lambda root: (root / "notes.txt").write_text("x") and root / "notes.txt", "Unsupported"),
    (lambda root: (root / "bad.keras").write_bytes(b"not a zip") and root / "bad.keras",
     "Could not load the Keras model file"),
])
def test_bad_paths_give_clear_errors(files, make, match):
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        finetune.backbone(make(files["root"]))


def test_bad_classifier_options(files):
    with pytest.raises(ValueError, match="same label set"):
        finetune.build(files["keras"], NUM_CLASSES + 2, classifier="keep")
    with pytest.raises(ValueError, match="opaque"):
        finetune.build(files["hub"], NUM_CLASSES, classifier="reset")
    with pytest.raises(ValueError, match="classifier='add'"):
        finetune.build(files["hub"], NUM_CLASSES, classifier="keep")   # 6 outputs != 3
    with pytest.raises(ValueError, match="mode must be"):
        finetune.build(files["keras"], NUM_CLASSES, mode="last_layer")


def test_feature_layer_and_model_save_load(files, batch, tmp_path):
    x, _ = batch
    model = finetune.build(files["keras"], 5, classifier="add", feature_layer="features")
    assert model.get_layer("classifier").kernel.shape == (6, 5)
    model.save(tmp_path / "finetuned.keras")
    loaded = keras.models.load_model(tmp_path / "finetuned.keras")
    assert isinstance(loaded, dks.DPScaleModel)
    np.testing.assert_allclose(loaded.predict(x[:, 0], verbose=0),
                               model.predict(x[:, 0], verbose=0), rtol=1e-5, atol=1e-6)


def test_savedmodel_backbone_model_saves_and_reloads(files, batch, tmp_path):
    x, y = batch
    model = finetune.build(files["hub"], NUM_CLASSES, mode="classifier_only", classifier="add")
    randomize_classifier(model)
    for v in model.get_layer("backbone").weights:   # as if fine-tuned: differs from the file
        v.assign(v * 0.5)
    model.save(tmp_path / "hub_finetuned.keras")
    with pytest.raises(ValueError, match="safe_mode=False"):
        keras.models.load_model(tmp_path / "hub_finetuned.keras")
    loaded = keras.models.load_model(tmp_path / "hub_finetuned.keras", safe_mode=False)
    np.testing.assert_allclose(loaded.predict(x[:, 0], verbose=0),
                               model.predict(x[:, 0], verbose=0), rtol=1e-5, atol=1e-6)


def test_sequential_h5_source(tmp_path, batch):
    x, _ = batch
    keras.utils.set_random_seed(2)
    sequential = keras.Sequential([keras.Input(SHAPE), keras.layers.Conv2D(4, 3),
                                   keras.layers.GlobalAveragePooling2D(),
                                   keras.layers.Dense(NUM_CLASSES)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Keras calls .h5 legacy
        sequential.save(tmp_path / "sequential.h5")
    kept = finetune.build(tmp_path / "sequential.h5", NUM_CLASSES, classifier="keep")
    np.testing.assert_allclose(kept.predict(x[:, 0], verbose=0),
                               sequential.predict(x[:, 0], verbose=0), rtol=1e-5, atol=1e-6)
    reset = finetune.build(tmp_path / "sequential.h5", 7, classifier="reset")
    np.testing.assert_array_equal(reset.predict(x[:, 0], verbose=0), 0.0)   # zero head
