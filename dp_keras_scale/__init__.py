"""dp_keras_scale: differentially private image classification at scale with Keras 3.

``import dp_keras_scale`` imports the whole library (and TensorFlow) and registers its Keras
classes, so ``keras.models.load_model`` can read models it saved. The ``dp-keras-scale``
command defers those imports until they are used (`dp_keras_scale._lazy`).

Example:
    >>> import dp_keras_scale as dks
    >>> model = dks.models.wide_resnet(16, 4, num_classes=10)
    >>> model.compile(optimizer=dks.DPSGD(2.0, l2_norm_clip=1.0, noise_multiplier=3.0),
    ...               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
"""

from dp_keras_scale import _allocator, _lazy

_allocator.prefer_caching_allocator()     # before TensorFlow starts (see _allocator)

__version__ = "0.1.0"

__all__ = ["DPScaleModel", "DPOptimizer", "DPSGD", "make_private", "accounting", "audit",
           "callbacks", "data", "distribute", "finetune", "layers", "ledger", "models"]

__getattr__, __dir__ = _lazy.package_attributes(__name__, {
    "DPScaleModel": "model", "make_private": "model", "DPOptimizer": "optimizers",
    "DPSGD": "optimizers"})

if not _lazy.started_as_command():
    _lazy.load_all(__name__, __all__)
