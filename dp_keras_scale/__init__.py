"""dp_keras_scale: differentially private image classification at scale with Keras 3.

Example:
    >>> import dp_keras_scale as dks
    >>> model = dks.models.wide_resnet(16, 4, num_classes=10)
    >>> model.compile(optimizer=dks.DPSGD(2.0, l2_norm_clip=1.0, noise_multiplier=3.0),
    ...               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
"""

from dp_keras_scale import accounting, audit, callbacks, data, distribute, finetune, layers, models
from dp_keras_scale.model import DPScaleModel, make_private
from dp_keras_scale.optimizers import DPSGD

__version__ = "0.1.0"

__all__ = ["DPScaleModel", "DPSGD", "make_private", "accounting", "audit", "callbacks", "data",
           "distribute", "finetune", "layers", "models"]
