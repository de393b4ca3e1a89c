"""Classifier-only fine-tuning: backbone features computed once, and the head trained on them.

The backbone of a ``"classifier_only"`` model is frozen and runs in inference mode, so its
features are a fixed function of each example; DP-SGD on rows of the feature array (Poisson
sampled) is the same mechanism, with the same guarantee, as DP-SGD on the images.

Example:
    >>> features = extract_features(model, x)                   # computed once
    >>> head = classifier_head(model)                           # DP-trains model's classifier
"""

from __future__ import annotations

import sys
import time

import keras
import numpy as np
import tensorflow as tf

from dp_keras_scale.finetune.builder import CLASSIFIER_NAME
from dp_keras_scale.finetune.sources import BACKBONE_NAME
from dp_keras_scale.model import DPScaleModel

__all__ = ["classifier_head", "extract_features"]


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

    Args:
        model: a model from `build`, or a backbone.
        x: the images (an array, or anything sliceable that numpy can convert).
        batch_size: images per forward pass.
        verbose: 1 shows progress.

    Returns:
        The features, a float32 array with one row per image.

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

    Args:
        model: a model from `build` (it has a layer named "classifier").
        model_class: `DPScaleModel` (default) or keras.Model for non-private training.

    Returns:
        A `model_class` from the features to the logits, named ``"<model.name>_head"``.

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
