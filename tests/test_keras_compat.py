"""The private Keras / TensorFlow API the library uses (`dp_keras_scale._keras_compat`) still
exists and behaves as assumed: a Keras or TF upgrade that breaks it fails here, not silently
in training."""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_keras_scale as dks
from dp_keras_scale import _keras_compat as compat


def _model():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="inner_dense")],
                             name="inner")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inner(inputs)))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    return model


def test_flatten_layers_lists_nested_layers():
    names = [layer.name for layer in compat.flatten_layers(_model())]
    assert "inner_dense" in names and "head" in names and "inner" in names
    model = _model()
    assert compat.flatten_layers(model, include_self=True)[0] is model


def test_compiled_loss_is_the_compiled_loss_unscaled():
    model = _model()
    x, y = np.ones((1, 3), np.float32), np.array([1])
    pred = model(x)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, pred)
    np.testing.assert_allclose(compat.compiled_loss(model, x, y, pred), expected, rtol=1e-6)
    assert isinstance(compat.loss_tracker(model), keras.metrics.Mean)


def test_set_keras_mask_attaches_a_mask():
    t = tf.constant([1.0, 2.0])
    compat.set_keras_mask(t, tf.constant([True, False]))
    assert t._keras_mask.numpy().tolist() == [True, False]


def test_overridden_methods_still_exist_and_are_called_by_these_names():
    for cls, name in compat.OVERRIDDEN:
        assert callable(getattr(cls, name, None)), f"Keras no longer defines {cls}.{name}"
    # Keras calls them: the TF optimizer's apply path reaches _backend_update_step, and fit
    # reaches _symbolic_build / _maybe_symbolic_build (source check, as a call would need a
    # strategy).
    apply_source = inspect.getsource(keras.src.optimizers.base_optimizer.BaseOptimizer)
    assert "self._backend_update_step(" in apply_source
    assert "self._apply_weight_decay(" in apply_source
    fit_source = inspect.getsource(keras.src.backend.tensorflow.trainer.TensorFlowTrainer.fit)
    assert "_maybe_symbolic_build(" in fit_source
    maybe_source = inspect.getsource(
        keras.src.backend.tensorflow.trainer.TensorFlowTrainer._maybe_symbolic_build)
    assert "self._symbolic_build(" in maybe_source
    # DPOptimizer's versions come first for every wrapped class (they replace the TF
    # backend's, which all-reduce).
    for cls in (dks.DPSGD, dks.optimizers.dp_optimizer_class(keras.optimizers.Adam)):
        assert cls._backend_update_step is dks.DPOptimizer._backend_update_step
        assert cls._apply_weight_decay is dks.DPOptimizer._apply_weight_decay


def test_backend_free_update_step_applies_the_update_without_a_replica_context():
    opt = keras.optimizers.SGD(0.5)
    v = keras.Variable(np.ones(2, np.float32))
    opt.build([v])
    compat.backend_free_update_step(opt, [tf.constant([1.0, 2.0])], [v], opt.learning_rate)
    np.testing.assert_allclose(v.numpy(), [0.5, 0.0])
    wd = keras.optimizers.SGD(1.0, weight_decay=0.5)
    w = keras.Variable(np.ones(2, np.float32))
    wd.build([w])
    compat.backend_free_weight_decay(wd, [w])
    np.testing.assert_allclose(w.numpy(), [0.5, 0.5])
    assert compat.optimizer_variables_trained(opt) == [v]
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    assert compat.own_trainable_variables(dense) == dense.trainable_variables


def test_strategy_helpers():
    assert compat.num_workers(tf.distribute.get_strategy()) == 1
    assert compat.num_workers(tf.distribute.OneDeviceStrategy("/cpu:0")) == 1
    assert compat.in_safe_mode() in (True, False)
    with keras.src.saving.serialization_lib.SafeModeScope(True):
        assert compat.in_safe_mode() is True
    with keras.src.saving.serialization_lib.SafeModeScope(False):
        assert compat.in_safe_mode() is False


@pytest.mark.parametrize("module", ["model", "optimizers", "callbacks", "distribute", "clipping",
                                    "ghost_clipping",
                                    "averaging", "finetune.sources", "finetune.saved_model"])
def test_no_private_keras_api_outside_the_compat_module(module):
    import importlib
    source = inspect.getsource(importlib.import_module(f"dp_keras_scale.{module}"))
    for private in ("keras.src", "._flatten_layers(", "._compute_loss(", "._loss_tracker",
                    "_in_multi_worker_mode", "._trainable_variables"):
        assert private not in source, f"{module} uses {private}: go through _keras_compat"
