"""Every use of private Keras / TensorFlow API in the library, in one place, each with why.

Keras exposes no public hook for some of what DP training needs (a per-example loss with the
compiled loss's settings, the model's own loss tracker, the optimizer's backend-independent
update). A Keras release may rename these; `tests/test_keras_compat.py` checks that each still
exists and behaves as assumed, so an upgrade fails in the tests, not silently in training.

Methods that `DPScaleModel` and `DPOptimizer` OVERRIDE are listed in `OVERRIDDEN`: if Keras
renamed one, the override would silently stop running (for the optimizer's update step, the
TensorFlow version would then all-reduce already all-reduced gradients under
`tf.distribute`); the same test asserts that Keras still calls them by these names.
"""

from __future__ import annotations

import keras
import tensorflow as tf
# Private: the mask a Keras tensor carries (compiled metrics honour it, not sample weights).
from keras.src.backend import set_keras_mask  # noqa: F401  (re-exported)
# Private: the loss module's helper that undoes Keras's 1 / num_replicas loss scaling.
from keras.src.losses import loss as _loss_module
# Private: the backend-independent optimizer base (its update step does no all-reduce).
from keras.src.optimizers import base_optimizer as _base_optimizer
# Private: whether deserialization runs in safe mode (no public getter).
from keras.src.saving import serialization_lib as _serialization_lib
from keras.src.backend.tensorflow import trainer as _tf_trainer
from keras.src.trainers import trainer as _trainer

#: (class, method name) pairs that the library overrides; Keras must still define and call them.
OVERRIDDEN = (
    (_trainer.Trainer, "_symbolic_build"),        # DPScaleModel: build metrics from one copy
    (_tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build"),   # DPScaleModel: multi-worker
    (_base_optimizer.BaseOptimizer, "_backend_update_step"),   # DPOptimizer: no all-reduce
    (_base_optimizer.BaseOptimizer, "_apply_weight_decay"),    # DPOptimizer: per replica copy
)


def flatten_layers(model: keras.layers.Layer, include_self: bool = False) -> list:
    """Every nested layer of ``model`` (Keras has no public recursive listing; ``.layers`` is
    one level deep).

    Example:
        >>> [layer.name for layer in flatten_layers(model)]
    """
    return list(model._flatten_layers(include_self=include_self, recursive=True))


def own_trainable_variables(layer: keras.layers.Layer) -> list:
    """The trainable variables ``layer`` created itself, not those of its sub-layers
    (``trainable_variables`` includes both)."""
    own = getattr(layer, "_trainable_variables", None)
    return list(own) if own is not None else []


def compiled_loss(model: keras.Model, x, y, y_pred) -> tf.Tensor:
    """The loss ``model.compile`` configured (loss weights, regularization losses), for one
    example's batch of copies, without the 1 / num_replicas scaling Keras applies under
    `tf.distribute` (DP sums per-example gradients itself). ``Model.compute_loss`` is public
    but scales; ``_compute_loss`` is its unscaled core.

    Example:
        >>> loss = compiled_loss(model, x_i, y_i, model(x_i, training=True))
    """
    loss = model._compute_loss(x=x, y=y, y_pred=y_pred, training=True)
    return _loss_module.unscale_loss_for_distribution(loss)


def loss_tracker(model: keras.Model) -> keras.metrics.Metric:
    """The model's own ``loss`` metric (Keras updates it in its ``train_step``, which
    ``DPScaleModel.train_step`` replaces)."""
    return model._loss_tracker


def backend_free_update_step(optimizer, grads, variables, learning_rate) -> None:
    """The optimizer update without the TensorFlow backend's cross-replica all-reduce."""
    _base_optimizer.BaseOptimizer._backend_update_step(optimizer, grads, variables,
                                                       learning_rate)


def backend_free_weight_decay(optimizer, variables) -> None:
    """Weight decay applied to this replica's own copy (no replica context needed)."""
    _base_optimizer.BaseOptimizer._apply_weight_decay(optimizer, variables)


def optimizer_variables_trained(optimizer) -> list:
    """The trainable variables a built optimizer tracks (set by ``build``)."""
    return optimizer._trainable_variables


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """How many worker processes feed ``strategy`` (1 for one-process strategies). TF has no
    public accessor; single-worker strategies lack the methods, hence the defaults.

    Example:
        >>> num_workers(tf.distribute.MirroredStrategy())
        1
    """
    extended = strategy.extended
    if not getattr(extended, "_in_multi_worker_mode", lambda: False)():
        return 1
    return int(getattr(extended, "_num_workers", 1))


def in_safe_mode() -> bool:
    """Whether Keras is deserializing in safe mode (``load_model(safe_mode=True)``)."""
    return bool(_serialization_lib.in_safe_mode())
