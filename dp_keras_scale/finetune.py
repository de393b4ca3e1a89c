"""DP fine-tuning of pretrained backbones: TF-Hub handles, SavedModels and Keras models.

Two modes, as in De et al. (2022):

- ``"all_layers"``: every weight of the backbone and the classifier is trained with DP-SGD
  (per-example gradients through the whole network). Plain Keras ``Conv2D`` layers of a Keras
  backbone keep their weights and run through the library's per-example-fast convolution
  (`DPScaleModel` routes them automatically); BatchNormalization layers are frozen
  (``trainable=False``: stored statistics, an affine map per example). SavedModels are opaque
  graphs: their convolutions cannot be rerouted, so they train exactly but on TensorFlow's slow
  per-example loop, with a warning.
- ``"classifier_only"``: the backbone is frozen and runs in inference mode; only the classifier
  layer is trained. Because the features are then a fixed function of each example (the
  backbone was trained on public data and is never updated), they can be computed once
  (`extract_features`) and DP-SGD can train the classifier on the cached feature rows
  (`classifier_head`): Poisson sampling of rows of the feature array is the same mechanism, with
  the same guarantee, as sampling the images, and each step costs a single Dense layer.

Images are fitted to the backbone inside the model by `AdaptImages` (``build(...,
image_shape=..., image_size=..., pixel_scale=...)``): resize, gray -> RGB, pixel scale, all per
example and vectorized. Models whose backbone is a SavedModel reload it when loaded from a
``.keras`` file; Keras safe mode refuses that unless the source is listed in
`trusted_sources`.

The classifier is either new (``classifier="reset"``: the source's final Dense layer is replaced
by a zero-initialized one; ``classifier="add"``: the source is a feature extractor, a
zero-initialized Dense layer is added on its output) or the pretrained one (``"keep"``, for
label sets that match the pretraining labels, in the same order).

Example:
    >>> model = build("pretrained.keras", num_classes=10, mode="all_layers")
    >>> model.compile(optimizer=dks.DPSGD(...), loss=..., metrics=["accuracy"])
    >>> model.fit(sampler.dataset(x, y, steps=steps), ...)
    >>>
    >>> model = build("saved_model_dir/", num_classes=10, mode="classifier_only",
    ...               classifier="add")
    >>> features = extract_features(model, x)                   # computed once
    >>> head = classifier_head(model)                           # DP-trains model's classifier
    >>> head.compile(optimizer=dks.DPSGD(...), loss=...)
    >>> head.fit(dks.data.BatchSampler(len(features), 256).dataset(features, y, steps=steps))
    >>> model.evaluate(x_test, y_test)                          # images -> trained classifier
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from dp_keras_scale.model import DPScaleModel
from dp_keras_scale.models.scatternet import ScatterNet

__all__ = ["MODES", "CLASSIFIERS", "BackboneNotFoundError", "SavedModelLayer", "InferenceMode",
           "AdaptImages", "backbone", "build", "extract_features", "classifier_head",
           "load_source", "trusted_sources"]

MODES = ("all_layers", "classifier_only")
CLASSIFIERS = ("reset", "keep", "add")
BACKBONE_NAME = "backbone"
CLASSIFIER_NAME = "classifier"

# Forward ops whose per-example kernel gradient TensorFlow's vectorizer computes with a loop.
_SLOW_GRADIENT_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput",
                      "Conv3DBackpropInputV2")
_HUB_PREFIXES = ("http://", "https://", "gs://")
# Data-independent backbones available by name (no file, nothing learned from data).
BUILTIN_BACKBONES: dict[str, Callable[[], keras.layers.Layer]] = {
    "scatternet": lambda: ScatterNet(name=BACKBONE_NAME),
}


class BackboneNotFoundError(FileNotFoundError):
    """A backbone source (TF-Hub handle, SavedModel directory or model file) is unavailable."""


# --------------------------------------------------------------------------- SavedModel layer


def _concrete_functions(fn) -> list:
    if hasattr(fn, "concrete_functions"):
        return list(fn.concrete_functions)
    return [fn]


def _function_op_types(functions) -> dict[str, int]:
    """Counts op types in the graphs of `functions`, including nested library functions."""
    counts: dict[str, int] = {}
    for cf in functions:
        graph_def = cf.graph.as_graph_def()
        nodes = list(graph_def.node)
        for library_fn in graph_def.library.function:
            nodes.extend(library_fn.node_def)
        for node in nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class SavedModelLayer(keras.layers.Layer):
    """A TensorFlow SavedModel (TF-Hub format or a signature) as a Keras 3 layer.

    The layer calls the SavedModel's ``__call__`` (TF-Hub reusable SavedModels; called with
    ``training=False`` when it takes that argument) or one of its signatures, always in
    inference mode, and tracks the SavedModel's own variables as Keras variables (the same
    storage, not copies), so that a `DPScaleModel` differentiates and updates them when the
    layer is trainable. Prefer `backbone(...)`, which also resolves TF-Hub handles.

    Args:
        path: local SavedModel directory.
        trainable: train the SavedModel's trainable variables (all-layers fine-tuning).
        signature: call this signature (e.g. "serving_default") instead of ``__call__``.
        output_key: the output to use when the function returns a dict with several entries.
        handle: the TF-Hub handle the path was resolved from (for messages and config).

    Example:
        >>> features = SavedModelLayer("/models/feature_extractor", trainable=False)
        >>> features(tf.zeros([2, 28, 28, 1])).shape
        TensorShape([2, 64])
    """

    def __init__(self, path: str, trainable: bool = False, signature: str | None = None,
                 output_key: str | None = None, handle: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.saved_model_path = str(path)
        self.signature = signature
        self.output_key = output_key
        self.handle = handle
        self._source = handle or self.saved_model_path
        with tf.init_scope():
            self._sm_loaded = tf.saved_model.load(self.saved_model_path)
        self._sm_fn, self._sm_input_name, self._sm_takes_training = self._resolve_function()
        self._sm_functions = _concrete_functions(self._sm_fn)
        spec = self._saved_input_spec()
        self.saved_input_shape = None if spec is None else tuple(spec.shape)
        self._sm_input_dtype = tf.float32 if spec is None else spec.dtype
        self._track_saved_variables()
        self.trainable = trainable   # after tracking, so that it reaches the variables' flags
        self.built = True

    # -- loading -----------------------------------------------------------------------------

    def _resolve_function(self) -> tuple[Callable, str | None, bool]:
        signatures = dict(getattr(self._sm_loaded, "signatures", {}) or {})
        if self.signature is None and callable(self._sm_loaded):
            call = self._sm_loaded.__call__
            takes_training = any(
                "training" in cf.structured_input_signature[1]
                or len(cf.structured_input_signature[0]) > 1
                for cf in _concrete_functions(call))
            return call, None, takes_training
        name = self.signature or "serving_default"
        if name not in signatures:
            raise ValueError(
                f"SavedModel '{self._source}' has no callable `__call__` and no signature "
                f"{name!r}; its signatures are {sorted(signatures)}. Pass signature=... to pick "
                "one.")
        fn = signatures[name]
        inputs = fn.structured_input_signature[1]
        if len(inputs) != 1:
            raise ValueError(
                f"Signature {name!r} of SavedModel '{self._source}' takes inputs "
                f"{sorted(inputs)}; a backbone takes exactly one input (the images).")
        return fn, next(iter(inputs)), False

    def _saved_input_spec(self) -> tf.TensorSpec | None:
        for cf in self._sm_functions:
            args, kwargs = cf.structured_input_signature
            flat = tf.nest.flatten(kwargs[self._sm_input_name] if self._sm_input_name else args[0])
            if len(flat) == 1 and isinstance(flat[0], tf.TensorSpec):
                return flat[0]
        return None

    def _track_saved_variables(self) -> None:
        trainable, other, seen = [], [], set()
        for cf in self._sm_functions:
            for v in cf.trainable_variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    trainable.append(v)
        # TF-Hub reusable SavedModels list the variables meant to be fine-tuned.
        listed = getattr(self._sm_loaded, "trainable_variables", None)
        if isinstance(listed, (list, tuple)) and listed:
            allowed = {id(v) for v in listed}
            other = [v for v in trainable if id(v) not in allowed]
            trainable = [v for v in trainable if id(v) in allowed]
        for cf in self._sm_functions:
            for v in cf.variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    other.append(v)
        shared_trainable = [self._shared(v, True) for v in trainable]
        shared_other = [self._shared(v, False) for v in other]
        # Attribute assignment makes Keras track them (trainable ones are updated by fit).
        self.saved_trainable = shared_trainable
        self.saved_non_trainable = shared_other

    def _shared(self, variable: tf.Variable, trainable: bool) -> keras.Variable:
        name = variable.name.split(":")[0].replace("/", "_")
        shared = keras.Variable(variable, trainable=trainable, name=name)
        if shared.value is not variable:   # Keras must wrap the SavedModel's variable itself
            raise RuntimeError(
                f"Could not share variable '{variable.name}' of SavedModel '{self._source}' "
                "with Keras: training would not reach the SavedModel's function.")
        return shared

    def slow_gradient_ops(self) -> dict[str, int]:
        """Op types (with counts) whose per-example weight gradient runs on the slow path."""
        counts = _function_op_types(self._sm_functions)
        return {op: counts[op] for op in _SLOW_GRADIENT_OPS if op in counts}

    def check_examples_independent(self, input_shape: tuple[int, ...]) -> None:
        """Raises if one example's output depends on the other examples of its batch.

        A SavedModel that normalizes with batch statistics (BatchNorm exported in training
        mode) mixes examples, so neither per-example clipping nor cached features would mean
        what they say. Compares the first output of a batch of 3 with that of a batch of 1.
        """
        rng = np.random.default_rng(0)
        x = rng.uniform(0.0, 1.0, size=(3, *input_shape))
        if self._sm_input_dtype.is_integer:
            x = np.round(x * min(255, self._sm_input_dtype.max))
        x = tf.cast(tf.constant(x), self._sm_input_dtype)
        together = np.asarray(self(x))[0]
        alone = np.asarray(self(x[:1]))[0]
        scale = float(np.max(np.abs(alone))) + 1e-6
        if not np.allclose(together, alone, rtol=0, atol=1e-4 * scale):
            raise ValueError(
                f"SavedModel '{self._source}' computes an example's output from the other "
                "examples of the batch (e.g. BatchNormalization exported in training mode): "
                "DP fine-tuning needs a per-example function. Export it in inference mode.")

    # -- calling -----------------------------------------------------------------------------

    def call(self, inputs, training=None):
        del training   # SavedModels always run in inference mode (frozen BatchNorm, no dropout)
        x = tf.cast(inputs, self._sm_input_dtype)
        if self._sm_input_name is not None:
            outputs = self._sm_fn(**{self._sm_input_name: x})
        elif self._sm_takes_training:
            outputs = self._sm_fn(x, training=False)
        else:
            outputs = self._sm_fn(x)
        if isinstance(outputs, dict):
            if self.output_key is not None:
                if self.output_key not in outputs:
                    raise ValueError(f"output_key {self.output_key!r} is not an output of "
                                     f"SavedModel '{self._source}': {sorted(outputs)}")
                return outputs[self.output_key]
            if len(outputs) != 1:
                raise ValueError(f"SavedModel '{self._source}' returns several outputs "
                                 f"{sorted(outputs)}: choose one with output_key=...")
            return next(iter(outputs.values()))
        return outputs

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "path": self.saved_model_path, "signature": self.signature,
                "output_key": self.output_key, "handle": self.handle}

    @classmethod
    def from_config(cls, config, custom_objects=None, safe_mode=None):
        from keras.src.saving import serialization_lib
        config = dict(config)
        safe = safe_mode if safe_mode is not None else serialization_lib.in_safe_mode()
        if safe and not _is_trusted(config.get("path"), config.get("handle")):
            raise ValueError(
                f"Loading this model reloads the SavedModel at {config.get('path')!r}, which "
                "runs its TensorFlow graph. Keras refuses this in safe mode: if you trust the "
                "file, pass safe_mode=False to keras.models.load_model (or load it inside "
                "dks.finetune.trusted_sources(source)).")
        handle = config.get("handle")
        if handle and not os.path.isdir(config["path"]):   # another machine: its TF-Hub cache
            config["path"] = _resolve_hub(handle)
        return cls(**config)


_TRUSTED: list[set[str]] = []


def _normalized(source: str) -> str:
    return source if _is_hub_handle(source) else os.path.realpath(os.path.expanduser(source))


def _is_trusted(path: str | None, handle: str | None) -> bool:
    trusted = set().union(*_TRUSTED) if _TRUSTED else set()
    return bool((handle and handle in trusted) or (path and _normalized(path) in trusted))


@contextlib.contextmanager
def trusted_sources(*sources: str | os.PathLike) -> Iterator[None]:
    """Lets `keras.models.load_model` (safe mode) reload these SavedModel backbones.

    Safe mode refuses a saved model that reloads a SavedModel (its TensorFlow graph runs on
    load). Inside this block, models whose backbone is one of `sources` (TF-Hub handles or
    SavedModel directories, as given to `build`) load anyway; any other SavedModel is still
    refused.

    Example:
        >>> with trusted_sources("https://tfhub.dev/google/bit/m-r50x1/1"):
        ...     model = keras.models.load_model("runs/bit/model.keras")
    """
    _TRUSTED.append({_normalized(os.fspath(s)) for s in sources if os.fspath(s)})
    try:
        yield
    finally:
        _TRUSTED.pop()


# --------------------------------------------------------------------------- inference wrapper


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class InferenceMode(keras.layers.Layer):
    """Calls the wrapped layer or model in inference mode, whatever the outer `training`.

    Used for frozen backbones: dropout is off and normalization uses stored statistics, so the
    features are a fixed function of each example (what classifier-only DP training needs).

    Example:
        >>> frozen = InferenceMode(feature_model, name="backbone")
        >>> frozen(images, training=True)       # runs feature_model(images, training=False)
    """

    def __init__(self, layer: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        del training
        return self.layer(inputs, training=False)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "layer": keras.saving.serialize_keras_object(self.layer)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"],
                                                                custom_objects=custom_objects)
        return cls(**config)


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class AdaptImages(keras.layers.Layer):
    """Fits the private images to a backbone: resize, gray -> RGB, pixel scale. No weights.

    Each image is transformed on its own (bilinear resize with antialiasing to ``size``, the
    same values as ``tf.image.resize(..., antialias=True)``; a single channel repeated
    ``channels`` times; pixel values multiplied by ``scale``), so the layer changes neither
    per-example sensitivity nor the accounting. The resize is written as two matrix products
    (it is linear and separable), which vectorize over the examples of a DP step; TensorFlow's
    antialiased resize op would fall back to a per-example loop there.

    Args:
        size: (height, width) the backbone takes, or None to keep the images' size.
        channels: channels the backbone takes; 1-channel images are repeated to fill them.
        scale: factor on the pixel values (e.g. 1/255 for backbones that take [0, 1] images).

    Example:
        >>> adapt = AdaptImages(size=(224, 224), channels=3, scale=1 / 255)
        >>> adapt(np.zeros([2, 32, 32, 1], "uint8")).shape
        TensorShape([2, 224, 224, 3])
    """

    def __init__(self, size: tuple[int, int] | None = None, channels: int | None = None,
                 scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.channels = None if channels is None else int(channels)
        self.scale = float(scale)
        self.built = True

    def compute_output_shape(self, input_shape):
        height, width = self.size if self.size is not None else tuple(input_shape[1:3])
        return (input_shape[0], height, width, self.channels or input_shape[-1])

    def call(self, inputs):
        x = tf.cast(inputs, self.compute_dtype)
        if self.size is not None and tuple(x.shape[1:3]) != self.size:
            rows = _resize_matrix(x.shape[1], self.size[0], x.dtype)
            cols = _resize_matrix(x.shape[2], self.size[1], x.dtype)
            x = tf.einsum("hi,...ijc,wj->...hwc", rows, x, cols)
        if self.channels is not None and x.shape[-1] != self.channels:
            if x.shape[-1] != 1:
                raise ValueError(f"AdaptImages can repeat a single channel, not map "
                                 f"{x.shape[-1]} channels to {self.channels}.")
            x = tf.repeat(x, self.channels, axis=-1)
        return x * self.scale if self.scale != 1.0 else x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": self.size, "channels": self.channels,
                "scale": self.scale}


def _resize_matrix(n_in: int, n_out: int, dtype) -> tf.Tensor:
    """[n_out, n_in] weights of 1-D antialiased bilinear resizing (as tf.image.resize)."""
    if n_in is None:
        raise ValueError("AdaptImages needs images of a known size to resize them.")
    eye = tf.eye(n_in, dtype=tf.float32)[:, None, :]       # n_in one-pixel "channels"
    weights = tf.image.resize(eye, (n_out, 1), method="bilinear", antialias=True)
    return tf.cast(weights[:, 0, :], dtype)


def _adapter(image_shape: tuple, source_shape: tuple | None, image_size: int | None,
             pixel_scale: float, name: str) -> tuple[AdaptImages | None, tuple]:
    """The `AdaptImages` (or None) from `image_shape` images to the backbone, and its input shape.

    Rules: ``image_size`` (if given) resizes to image_size x image_size, else the images keep
    their size; a backbone with a fixed spatial size must then match it. Gray images are
    repeated to 3 channels when the backbone takes 3; other channel mismatches are errors.
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (height, width, channels), got {image_shape}")
    height, width, channels = (int(d) for d in image_shape)
    want = (None, None, None) if source_shape is None else tuple(source_shape)
    if len(want) != 3:
        raise ValueError(f"Backbone '{name}' takes inputs of shape {want}, not images "
                         "(height, width, channels).")
    size = (image_size, image_size) if image_size else (height, width)
    if any(w is not None and w != s for w, s in zip(want[:2], size)):
        hint = (f"set image_size={want[0]} (finetune.image_size) to resize the images"
                if want[0] == want[1] and None not in want[:2] else "resize the images first")
        raise ValueError(f"Backbone '{name}' takes {want[0]}x{want[1]} images, the model "
                         f"would give it {size[0]}x{size[1]}: {hint}.")
    target_channels = want[2] if want[2] is not None else channels
    if target_channels != channels and channels != 1:
        raise ValueError(f"Backbone '{name}' takes {target_channels}-channel images, the data "
                         f"have {channels}: only 1-channel (gray) images are converted (to "
                         f"{target_channels} equal channels).")
    backbone_shape = (*size, target_channels)
    if backbone_shape == (height, width, channels) and pixel_scale == 1.0:
        return None, backbone_shape
    adapt = AdaptImages(size=None if size == (height, width) else size,
                        channels=None if target_channels == channels else target_channels,
                        scale=pixel_scale, name="adapt_images")
    return adapt, backbone_shape


# --------------------------------------------------------------------------- loading sources


def _is_hub_handle(source: str) -> bool:
    return source.startswith(_HUB_PREFIXES)


def _resolve_hub(handle: str) -> str:
    try:
        import tensorflow_hub as hub
    except ImportError as error:   # pragma: no cover - tensorflow-hub is a dependency
        raise ImportError(f"Loading the TF-Hub handle '{handle}' needs tensorflow-hub: "
                          "pip install 'tensorflow-hub>=0.16'") from error
    cache = os.environ.get("TFHUB_CACHE_DIR") or "(unset: TF-Hub uses <tmp>/tfhub_modules)"
    try:
        return hub.resolve(handle)
    except Exception as error:
        raise BackboneNotFoundError(
            f"Could not resolve the TF-Hub handle '{handle}': it is not in the TF-Hub cache "
            f"(TFHUB_CACHE_DIR={cache}) and downloading it failed ({type(error).__name__}: "
            f"{error}). Without internet, download the model elsewhere and either set "
            "TFHUB_CACHE_DIR to the cache that holds it or pass its unpacked SavedModel "
            "directory instead of the handle.") from error


def load_source(source, signature: str | None = None, output_key: str | None = None
                ) -> keras.layers.Layer:
    """Loads a backbone source as it is: a Keras model, or a `SavedModelLayer`.

    Resolves TF-Hub handles (``TFHUB_CACHE_DIR``) and reads files, so a missing source fails
    here, before any work. The result can be passed to `build` or `backbone` as `source`.

    Example:
        >>> loaded = load_source("pretrained.keras")
        >>> model = build(loaded, 10, mode="classifier_only")
    """
    return _load_source(source, signature, output_key)


def _source_name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "_source", None) or getattr(source, "name", repr(source))


def _load_source(source, signature: str | None, output_key: str | None
                 ) -> keras.layers.Layer:
    """Loads `source` as a Keras model (Keras files, Keras models) or a SavedModelLayer."""
    if isinstance(source, keras.layers.Layer):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"backbone source must be a TF-Hub handle/URL, a SavedModel directory, a .keras or "
            f".h5 file, or a keras.Model; got {type(source).__name__}.")
    text = os.fspath(source)
    if text in BUILTIN_BACKBONES:
        return BUILTIN_BACKBONES[text]()
    if isinstance(source, str) and _is_hub_handle(text):
        path = _resolve_hub(text)
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
    return list(layer._flatten_layers(include_self=True, recursive=True))


def _freeze_batchnorm(layer: keras.layers.Layer) -> None:
    for sub in _all_layers(layer):
        if isinstance(sub, keras.layers.BatchNormalization):
            sub.trainable = False


def _sub_model(model: keras.Model, output, name: str) -> keras.Model:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(f"Model '{model.name}' has no known inputs (subclassed model?): cutting "
                         "it at a layer needs a functional or Sequential model.")
    return keras.Model(inputs, output, name=name)


def _feature_model(model: keras.Model, feature_layer: str | int) -> keras.Model:
    layer = (model.get_layer(index=feature_layer) if isinstance(feature_layer, int)
             else model.get_layer(feature_layer))
    return _sub_model(model, layer.output, BACKBONE_NAME)


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
    loaded = _load_source(source, signature, output_key)
    if isinstance(loaded, SavedModelLayer):
        if feature_layer is not None:
            raise ValueError("feature_layer applies to Keras models; a SavedModel's outputs are "
                             "chosen with signature=... and output_key=...")
        loaded.trainable = trainable
        slow = loaded.slow_gradient_ops() if trainable else {}
        if slow:
            ops = ", ".join(f"{op} x{count}" for op, count in slow.items())
            warnings.warn(
                f"Backbone '{loaded._source}' is a SavedModel whose convolutions ({ops}) cannot "
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
        loaded = _feature_model(loaded, feature_layer)
    # Layer by layer: Keras-on-TF skips `layer.trainable = x` when it already equals x, and
    # sublayers may have been frozen on their own.
    for layer in _all_layers(loaded):
        layer.trainable = trainable
    _freeze_batchnorm(loaded)
    return loaded


# --------------------------------------------------------------------------- full models


def _final_dense(model: keras.layers.Layer, source) -> keras.layers.Dense:
    """The source's classifier: a Dense layer producing the model's only output."""
    layers = getattr(model, "layers", None)
    outputs = getattr(model, "outputs", None)
    last = layers[-1] if layers else None
    if (not isinstance(last, keras.layers.Dense) or not outputs or len(outputs) != 1
            or last.output is not outputs[0]):
        raise ValueError(
            f"Backbone '{source}' does not end in a Dense classifier layer, so there is no "
            "pretrained classifier to keep or reset. If it is a feature extractor, use "
            "classifier='add' (a new classifier on its output).")
    return last


def _source_input_shape(loaded: keras.layers.Layer) -> tuple | None:
    """The backbone's input shape without the batch axis (None entries: any size), if known."""
    inputs = getattr(loaded, "inputs", None)
    if inputs:
        return tuple(inputs[0].shape[1:])
    shape = getattr(loaded, "saved_input_shape", None)
    return None if shape is None else tuple(shape[1:])


def _input_shape(loaded: keras.layers.Layer, input_shape, source) -> tuple:
    if input_shape is not None:
        return tuple(input_shape)
    shape = _source_input_shape(loaded)
    if shape is None or None in shape:
        raise ValueError(f"Cannot infer the input shape of backbone '{source}' (got {shape}): "
                         "pass input_shape=(height, width, channels), or image_shape=... (the "
                         "images' shape) with image_size=... for a backbone of any size.")
    return shape


def build(source, num_classes: int, *, mode: str = "all_layers", classifier: str = "reset",
          input_shape: tuple[int, ...] | None = None, feature_layer: str | int | None = None,
          signature: str | None = None, output_key: str | None = None,
          image_shape: tuple[int, int, int] | None = None, image_size: int | None = None,
          pixel_scale: float = 1.0, model_class: type[keras.Model] = DPScaleModel,
          name: str = "finetune") -> keras.Model:
    """A `DPScaleModel` images -> logits made of a pretrained backbone and a classifier.

    The model's layers named ``"backbone"`` and ``"classifier"`` are the two parts
    (`extract_features` and `classifier_head` use them). With `image_shape`, an `AdaptImages`
    layer named ``"adapt_images"`` first fits the images to the backbone.

    Args:
        source: anything `backbone` accepts (or `load_source` returns).
        num_classes: number of classes of the private task.
        mode: ``"all_layers"`` (train everything; BatchNorm frozen) or ``"classifier_only"``
            (backbone frozen in inference mode; train the classifier).
        classifier: ``"reset"``: replace the source's final Dense layer by a zero-initialized
            Dense(num_classes); ``"keep"``: keep the pretrained classifier (label sets must
            match: it must have ``num_classes`` outputs); ``"add"``: the source is a feature
            extractor (e.g. a TF-Hub feature vector), add a zero-initialized Dense(num_classes).
        input_shape: the backbone's input shape without batch axis (default: the source's).
        feature_layer: with ``classifier="add"``, cut a Keras source at this layer.
        signature, output_key: see `backbone`.
        image_shape: shape of the images the model will be given (e.g. the dataset's
            ``(28, 28, 1)``), when it differs from what the backbone takes. The rules:
            ``image_size`` resizes them to image_size x image_size (bilinear, antialiased),
            else they keep their size and a backbone with a fixed size must match it; gray
            images are repeated to 3 channels when the backbone takes 3 (other channel
            mismatches are errors); pixel values are multiplied by ``pixel_scale``.
        image_size: see `image_shape` (needs it).
        pixel_scale: see `image_shape` (needs it), e.g. 1/255 for TF-Hub image models, which
            take values in [0, 1].
        model_class: `DPScaleModel` (default) or keras.Model for non-private training.

    Example:
        >>> model = build("pretrained.keras", 10, mode="all_layers", classifier="reset")
        >>> model.compile(optimizer=dks.DPSGD(1.0, noise_multiplier=2.0), loss=...)
        >>> bit = build("https://tfhub.dev/google/bit/m-r50x1/1", 10, mode="classifier_only",
        ...             classifier="add", image_shape=(32, 32, 3), image_size=224,
        ...             pixel_scale=1 / 255)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    if feature_layer is not None and classifier != "add":
        raise ValueError("feature_layer picks the features for a new classifier: use it with "
                         "classifier='add'.")
    if image_shape is None and (image_size or pixel_scale != 1.0):
        raise ValueError("image_size and pixel_scale adapt images of a given shape: pass "
                         "image_shape=(height, width, channels) too.")
    if image_shape is not None and input_shape is not None:
        raise ValueError("Give image_shape (the images; the backbone's input follows from it) "
                         "or input_shape (the backbone's input), not both.")
    trainable = mode == "all_layers"
    loaded = _load_source(source, signature, output_key)
    source = _source_name(source)
    adapt = None
    if image_shape is not None:
        adapt, shape = _adapter(tuple(image_shape), _source_input_shape(loaded), image_size,
                                float(pixel_scale), source)
    else:
        shape = _input_shape(loaded, input_shape, source)
    pretrained_head = None

    if isinstance(loaded, SavedModelLayer):
        if classifier == "reset":
            raise ValueError(
                f"SavedModel '{source}' is an opaque graph: its final classifier cannot be "
                "removed. Use a feature-vector SavedModel with classifier='add', or "
                "classifier='keep' to fine-tune its own outputs as logits.")
        if classifier == "keep" and mode == "classifier_only":
            raise ValueError(
                "classifier='keep' with mode='classifier_only' needs a separable classifier "
                f"layer; SavedModel '{source}' is opaque. Use a .keras file of the same model.")
        loaded.check_examples_independent(shape)
        features = backbone(loaded, trainable=trainable)
    else:
        if classifier in ("keep", "reset"):
            pretrained_head = _final_dense(loaded, source)
            if classifier == "keep" and pretrained_head.units != num_classes:
                raise ValueError(
                    f"classifier='keep' needs the pretrained classifier to have num_classes="
                    f"{num_classes} outputs (same label set); it has {pretrained_head.units}. "
                    "Use classifier='reset'.")
            features = _sub_model(loaded, pretrained_head.input, BACKBONE_NAME)
        elif feature_layer is not None:
            features = _feature_model(loaded, feature_layer)
        else:
            features = loaded
        features = backbone(features, trainable=trainable)

    inputs = keras.Input(tuple(image_shape) if image_shape is not None else shape,
                         name="images")
    if mode == "classifier_only":
        features = InferenceMode(features, name=BACKBONE_NAME)
    elif features.name != BACKBONE_NAME:
        features = _sub_model_wrapper(features, shape)
    h = features(adapt(inputs) if adapt is not None else inputs)

    if classifier == "keep" and pretrained_head is None:      # SavedModel returning logits
        if h.shape[-1] != num_classes:
            raise ValueError(f"classifier='keep': SavedModel '{source}' outputs {h.shape[-1]} "
                             f"values, not num_classes={num_classes} logits. If it is a feature "
                             "extractor, use classifier='add'.")
        return model_class(inputs, h, name=name)
    if len(h.shape) != 2:
        raise ValueError(f"The backbone's features have shape {tuple(h.shape)}: a classifier "
                         "needs a vector per example. Pick a pooled layer with feature_layer=.")
    if classifier == "keep":
        if pretrained_head.activation not in (None, keras.activations.linear):
            raise ValueError(
                f"The pretrained classifier '{pretrained_head.name}' applies an activation "
                f"({pretrained_head.activation.__name__}); DP training expects logits. Use "
                "classifier='reset', or rebuild the model without the final activation.")
        head = keras.layers.Dense(num_classes, use_bias=pretrained_head.use_bias,
                                  name=CLASSIFIER_NAME)
        head.build(h.shape)
        head.set_weights(pretrained_head.get_weights())
    else:
        head = keras.layers.Dense(num_classes, kernel_initializer="zeros", name=CLASSIFIER_NAME)
    return model_class(inputs, head(h), name=name)


def _sub_model_wrapper(layer: keras.layers.Layer, shape: tuple) -> keras.Model:
    """Names the backbone "backbone" by nesting it in a functional model sharing its weights."""
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs), name=BACKBONE_NAME)


# --------------------------------------------------------------------------- cached features


def _feature_function(model: keras.layers.Layer) -> keras.layers.Layer:
    """The part of `model` that computes the classifier's input (images -> features)."""
    if not isinstance(model, keras.Model):
        return model
    names = {layer.name for layer in model.layers}
    if CLASSIFIER_NAME in names and getattr(model, "inputs", None):
        return keras.Model(model.inputs, model.get_layer(CLASSIFIER_NAME).input,
                           name=f"{model.name}_features")
    if BACKBONE_NAME in names:
        return model.get_layer(BACKBONE_NAME)
    return model


class _Progress:
    """Progress over `total` examples: a Keras progress bar on a terminal; on a log (not a
    terminal), one counted line per tenth of the work, so logs are not flooded."""

    def __init__(self, total: int, verbose: int, what: str):
        self.total, self.what, self.verbose = total, what, verbose
        self.tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
        self.bar = (keras.utils.Progbar(total, unit_name="image")
                    if verbose and self.tty else None)
        self.start, self.next_line = time.time(), 0

    def update(self, done: int) -> None:
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.update(done)
            return
        if done >= self.next_line or done == self.total:
            print(f"{self.what}: {done}/{self.total} images ({100 * done // self.total}%), "
                  f"{time.time() - self.start:.0f} s", flush=True)
            self.next_line = done + max(1, self.total // 10)


def extract_features(model: keras.layers.Layer, x, batch_size: int = 256, verbose: int = 0
                     ) -> np.ndarray:
    """Runs the frozen feature part of `model` once over `x` and returns the features.

    `model` is a model from `build` (everything before its "classifier" layer is used,
    including the `AdaptImages` resize) or a backbone itself. Features are a fixed function of
    each example, so DP-SGD on rows of the returned array (sampled by `dks.data.BatchSampler`)
    has the same guarantee as DP-SGD on the images, as long as the backbone never saw the
    private data. ``verbose=1`` shows progress (a progress bar on a terminal; counted lines,
    one per 10%, otherwise).

    Example:
        >>> features = extract_features(model, x_train, verbose=1)   # [N, feature_dim] float32
    """
    if len(x) == 0:
        raise ValueError("extract_features got no examples.")
    part = _feature_function(model)
    compute = tf.function(lambda t: part(t, training=False), reduce_retracing=True)
    progress = _Progress(len(x), verbose, "features")
    chunks = []
    for start in range(0, len(x), batch_size):
        chunk = tf.convert_to_tensor(np.asarray(x[start:start + batch_size]))
        chunks.append(compute(tf.cast(chunk, tf.float32)).numpy())
        progress.update(min(start + batch_size, len(x)))
    return np.concatenate(chunks).astype(np.float32)


def classifier_head(model: keras.Model, model_class: type[keras.Model] = DPScaleModel
                    ) -> keras.Model:
    """A model features -> logits that shares (and so trains) `model`'s classifier layer.

    Train it with DP-SGD on `extract_features` output; `model` then classifies images with the
    trained classifier.

    Example:
        >>> head = classifier_head(model)
        >>> head.compile(optimizer=dks.DPSGD(...), loss=...)
        >>> head.fit(sampler.dataset(features, y, steps=steps), ...)
    """
    try:
        classifier = model.get_layer(CLASSIFIER_NAME)
    except ValueError as error:
        raise ValueError(f"Model '{model.name}' has no layer named '{CLASSIFIER_NAME}': build it "
                         "with dks.finetune.build(...).") from error
    inputs = keras.Input(tuple(classifier.input.shape[1:]), name="features")
    return model_class(inputs, classifier(inputs), name=f"{model.name}_head")
