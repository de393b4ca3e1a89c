"""Loading backbones: TF-Hub handles, SavedModel directories, Keras files, built-in backbones.

`load_source` reads a source as it is; `backbone` also sets what trains (BatchNormalization
always frozen) and can cut a Keras model at a feature layer.

Example:
    >>> features = backbone("https://tfhub.dev/google/imagenet/resnet_50/feature_vector/5")
    >>> features = backbone("pretrained.keras", trainable=True, feature_layer="pool")
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Callable

import keras

from dp_keras_scale import _keras_compat
from dp_keras_scale.finetune.hub import BackboneNotFoundError, is_hub_handle, resolve_hub
from dp_keras_scale.finetune.saved_model import SavedModelLayer
from dp_keras_scale.models.scatternet import ScatterNet

__all__ = ["BACKBONE_NAME", "BUILTIN_BACKBONES", "backbone", "feature_model", "load_source",
           "source_name", "sub_model"]

#: The name of the backbone layer in the models `build` makes.
BACKBONE_NAME = "backbone"
#: Data-independent backbones available by name (no file, nothing learned from data).
BUILTIN_BACKBONES: dict[str, Callable[[], keras.layers.Layer]] = {
    "scatternet": lambda: ScatterNet(name=BACKBONE_NAME),
}


def source_name(source) -> str:
    """How messages name a backbone source: its path or handle, else the layer's name."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, SavedModelLayer):
        return source.source
    return getattr(source, "name", repr(source))


def load_source(source, signature: str | None = None, output_key: str | None = None
                ) -> keras.layers.Layer:
    """Loads a backbone source as it is: a Keras model, or a `SavedModelLayer`.

    Resolves TF-Hub handles (``TFHUB_CACHE_DIR``) and reads files, so a missing source fails
    here, before any work. The result can be passed to `build` or `backbone` as `source`.

    Args:
        source: a TF-Hub handle or URL, a SavedModel directory, a ``.keras``/``.h5`` file, the
            name of a built-in backbone (`BUILTIN_BACKBONES`), or a Keras layer/model (returned
            as it is).
        signature, output_key: SavedModel sources only (see `SavedModelLayer`).

    Returns:
        The loaded Keras model or layer.

    Raises:
        BackboneNotFoundError: the source does not exist or cannot be resolved.

    Example:
        >>> loaded = load_source("pretrained.keras")
        >>> model = build(loaded, 10, mode="classifier_only")
    """
    if isinstance(source, keras.layers.Layer):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"backbone source must be a TF-Hub handle/URL, a SavedModel directory, a .keras or "
            f".h5 file, or a keras.Model; got {type(source).__name__}.")
    text = os.fspath(source)
    if text in BUILTIN_BACKBONES:
        return BUILTIN_BACKBONES[text]()
    if isinstance(source, str) and is_hub_handle(text):
        path = resolve_hub(text)
        return SavedModelLayer(path, signature=signature, output_key=output_key, handle=text,
                               name=BACKBONE_NAME)
    path = pathlib.Path(text).expanduser()
    if not path.exists():
        raise BackboneNotFoundError(
            f"Backbone '{text}' does not exist. Give a SavedModel directory, a .keras/.h5 file, "
            "or a TF-Hub handle starting with https:// (resolved through TFHUB_CACHE_DIR).")
    if path.is_dir():
        if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
            raise BackboneNotFoundError(
                f"Directory '{text}' is not a SavedModel (no saved_model.pb). Give the "
                "directory written by tf.saved_model.save / model.export, or a .keras file.")
        if (path / "tfhub_module.pb").exists():
            raise ValueError(f"'{text}' is in the TF1 Hub format (hub.Module), which TensorFlow "
                             "2 cannot fine-tune; use a TF2 SavedModel of the same model.")
        return SavedModelLayer(str(path), signature=signature, output_key=output_key,
                               name=BACKBONE_NAME)
    if path.suffix in (".keras", ".h5", ".hdf5"):
        try:
            return keras.models.load_model(path, compile=False)
        except Exception as error:
            raise ValueError(f"Could not load the Keras model file '{text}': {error}") from error
    raise ValueError(f"Unsupported backbone file '{text}': expected a .keras or .h5 file, a "
                     "SavedModel directory or a TF-Hub handle.")


def _all_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    return _keras_compat.flatten_layers(layer, include_self=True)


def _freeze_batchnorm(layer: keras.layers.Layer) -> None:
    for sub in _all_layers(layer):
        if isinstance(sub, keras.layers.BatchNormalization):
            sub.trainable = False


def sub_model(model: keras.Model, output, name: str) -> keras.Model:
    """The functional model from `model`'s inputs to `output` (sharing its layers), as `name`."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(f"Model '{model.name}' has no known inputs (subclassed model?): cutting "
                         "it at a layer needs a functional or Sequential model.")
    return keras.Model(inputs, output, name=name)


def feature_model(model: keras.Model, feature_layer: str | int) -> keras.Model:
    """`model` cut at `feature_layer` (a name or an index), named ``"backbone"``."""
    layer = (model.get_layer(index=feature_layer) if isinstance(feature_layer, int)
             else model.get_layer(feature_layer))
    return sub_model(model, layer.output, BACKBONE_NAME)


def backbone(source, trainable: bool = False, *, feature_layer: str | int | None = None,
             signature: str | None = None, output_key: str | None = None
             ) -> keras.layers.Layer:
    """Loads a pretrained network as a Keras 3 layer/model for use inside a `DPScaleModel`.

    Args:
        source: a TF-Hub handle or URL (``https://...``, resolved by ``tensorflow_hub.resolve``
            into ``TFHUB_CACHE_DIR``), a local SavedModel directory, a ``.keras``/``.h5`` file,
            or a Keras model/layer.
        trainable: train its weights (all-layers fine-tuning). BatchNormalization layers are
            always frozen (stored statistics), whatever this says.
        feature_layer: Keras sources only: name or index of the layer whose output are the
            features (default: the model's output).
        signature, output_key: SavedModel sources only: the signature to call instead of
            ``__call__``, and which output to use when it returns a dict.

    Returns:
        a keras.Model (Keras sources; shares the source's layers and weights) or a
        `SavedModelLayer` (SavedModels; warns when ``trainable`` and its convolutions can only
        run on the slow per-example path).

    Example:
        >>> features = backbone("https://tfhub.dev/google/imagenet/resnet_50/feature_vector/5")
        >>> features = backbone("pretrained.keras", trainable=True, feature_layer="pool")
    """
    loaded = load_source(source, signature, output_key)
    if isinstance(loaded, SavedModelLayer):
        if feature_layer is not None:
            raise ValueError("feature_layer applies to Keras models; a SavedModel's outputs are "
                             "chosen with signature=... and output_key=...")
        loaded.trainable = trainable
        slow = loaded.slow_gradient_ops() if trainable else {}
        if slow:
            ops = ", ".join(f"{op} x{count}" for op, count in slow.items())
            warnings.warn(
                f"Backbone '{loaded.source}' is a SavedModel whose convolutions ({ops}) cannot "
                "be converted to the per-example-fast form: all-layers DP training is exact but "
                "runs on TensorFlow's slow per-example loop (often 10x slower or worse). Load "
                "the same network as a .keras file to get the fast path, or fine-tune in "
                "classifier-only mode.", stacklevel=2)
        return loaded
    if signature is not None or output_key is not None:
        raise ValueError("signature and output_key apply to SavedModels, not Keras models.")
    if feature_layer is not None:
        if not isinstance(loaded, keras.Model):
            raise ValueError("feature_layer needs a keras.Model source.")
        loaded = feature_model(loaded, feature_layer)
    # Layer by layer: Keras-on-TF skips `layer.trainable = x` when it already equals x, and
    # sublayers may have been frozen on their own.
    for layer in _all_layers(loaded):
        layer.trainable = trainable
    _freeze_batchnorm(loaded)
    return loaded
