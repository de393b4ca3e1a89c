"""`build`: a `DPScaleModel` images -> logits from a pretrained backbone and a classifier.

Example:
    >>> model = build("pretrained.keras", 10, mode="all_layers", classifier="reset")
"""

from __future__ import annotations

import keras

from dp_keras_scale.finetune.adapters import InferenceMode, image_adapter
from dp_keras_scale.finetune.saved_model import SavedModelLayer
from dp_keras_scale.finetune.sources import (BACKBONE_NAME, backbone, feature_model, load_source,
                                             source_name, sub_model)
from dp_keras_scale.model import DPScaleModel
from dp_keras_scale.options import FINETUNE_CLASSIFIERS, FINETUNE_MODES

__all__ = ["CLASSIFIERS", "CLASSIFIER_NAME", "MODES", "build"]

#: ``"all_layers"`` (DP-SGD through the whole network) or ``"classifier_only"``.
MODES = FINETUNE_MODES
#: ``"reset"``, ``"keep"`` or ``"add"``: what becomes of the source's classifier (see `build`).
CLASSIFIERS = FINETUNE_CLASSIFIERS
#: The name of the classifier layer in the models `build` makes.
CLASSIFIER_NAME = "classifier"


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
    _check_options(mode, classifier, input_shape, feature_layer, image_shape, image_size,
                   pixel_scale)
    loaded = load_source(source, signature, output_key)
    source = source_name(source)
    adapt = None
    if image_shape is not None:
        adapt, shape = image_adapter(tuple(image_shape), _source_input_shape(loaded), image_size,
                                     float(pixel_scale), source)
    else:
        shape = _input_shape(loaded, input_shape, source)
    features, pretrained_head = _feature_part(loaded, source, num_classes, mode, classifier,
                                              feature_layer, shape)
    inputs = keras.Input(tuple(image_shape) if image_shape is not None else shape,
                         name="images")
    h = features(adapt(inputs) if adapt is not None else inputs)
    return model_class(inputs, _logits(h, source, num_classes, classifier, pretrained_head),
                       name=name)


def _check_options(mode: str, classifier: str, input_shape, feature_layer, image_shape,
                   image_size, pixel_scale) -> None:
    """Refuses combinations of `build` arguments that cannot mean anything."""
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


def _feature_part(loaded: keras.layers.Layer, source: str, num_classes: int, mode: str,
                  classifier: str, feature_layer, shape: tuple
                  ) -> tuple[keras.layers.Layer, keras.layers.Dense | None]:
    """The layer named "backbone" (images -> features, trainable per `mode`) and the source's
    own classifier (None unless ``classifier`` is "keep" or "reset" on a Keras source)."""
    trainable = mode == "all_layers"
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
            features = sub_model(loaded, pretrained_head.input, BACKBONE_NAME)
        elif feature_layer is not None:
            features = feature_model(loaded, feature_layer)
        else:
            features = loaded
        features = backbone(features, trainable=trainable)
    if mode == "classifier_only":
        return InferenceMode(features, name=BACKBONE_NAME), pretrained_head
    if features.name != BACKBONE_NAME:
        features = _named_backbone(features, shape)
    return features, pretrained_head


def _logits(h, source: str, num_classes: int, classifier: str,
            pretrained_head: keras.layers.Dense | None):
    """The logits on features `h`: a new zero-initialized classifier, the pretrained one
    (``"keep"``), or `h` itself for a SavedModel that returns logits (``"keep"``)."""
    if classifier == "keep" and pretrained_head is None:      # SavedModel returning logits
        if h.shape[-1] != num_classes:
            raise ValueError(f"classifier='keep': SavedModel '{source}' outputs {h.shape[-1]} "
                             f"values, not num_classes={num_classes} logits. If it is a feature "
                             "extractor, use classifier='add'.")
        return h
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
    return head(h)


def _named_backbone(layer: keras.layers.Layer, shape: tuple) -> keras.Model:
    """Names the backbone "backbone" by nesting it in a functional model sharing its weights."""
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs), name=BACKBONE_NAME)
