"""Layers that fit the private images to a backbone: `AdaptImages`, `InferenceMode`.

Both are per-example functions without weights, so they change neither the sensitivity of a
DP step nor the accounting.

Example:
    >>> adapt = AdaptImages(size=(224, 224), channels=3, scale=1 / 255)
    >>> frozen = InferenceMode(feature_model, name="backbone")
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

__all__ = ["AdaptImages", "InferenceMode", "image_adapter"]


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


def image_adapter(image_shape: tuple, source_shape: tuple | None, image_size: int | None,
             pixel_scale: float, name: str) -> tuple[AdaptImages | None, tuple]:
    """The `AdaptImages` (or None) from `image_shape` images to the backbone, and its input shape.

    Args:
        image_shape: (height, width, channels) of the images the model is given.
        source_shape: the backbone's input shape without the batch axis (None entries: any
            size), or None when unknown.
        image_size: resize to image_size x image_size; None or 0 keeps the images' size.
        pixel_scale: factor on the pixel values.
        name: the backbone's name, for error messages.

    Returns:
        ``(adapter, backbone_input_shape)``; the adapter is None when the images already fit.

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
