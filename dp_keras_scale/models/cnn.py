"""A small weight-standardized GroupNorm CNN for 28x28 / 32x32 images on a CPU budget."""

from __future__ import annotations

import keras

from dp_keras_scale.layers.conv import WSConv2D
from dp_keras_scale.model import DPScaleModel


def small_cnn(input_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10,
              widths: tuple[int, ...] = (16, 32, 32, 64), groups: int | None = 8,
              mean: float | None = None, std: float | None = None,
              weight_standardization: bool = True,
              model_class: type[keras.Model] = DPScaleModel) -> keras.Model:
    """Conv blocks WSConv2D -> GroupNorm -> ReLU (every second block strides 2), pooling, Dense.

    Takes uint8-range pixels; `mean`/`std` (of pixels scaled to [0, 1], public constants)
    standardize them inside the model. Each GroupNorm uses min(`groups`, width) groups; very
    narrow nets (one or two channels per group) learn slowly, as global pooling then sees
    nearly constant features. ``groups=None`` (or 0) removes normalization and
    ``weight_standardization=False`` uses plain Keras ``Conv2D`` (the paper's ablation rows).

    Example:
        >>> model = small_cnn((28, 28, 1), 10, mean=0.286, std=0.353)   # about 33k parameters
    """
    inputs, h = _pixel_input(input_shape, mean, std)
    for i, width in enumerate(widths):
        h = _conv(width, 3, 2 if i % 2 else 1, "same", weight_standardization,
                  f"conv{i + 1}")(h)
        if groups:
            h = keras.layers.GroupNormalization(groups=min(groups, width),
                                                name=f"norm{i + 1}")(h)
        h = keras.layers.ReLU(name=f"relu{i + 1}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="logits")(h)
    return model_class(inputs, outputs, name="small_cnn")


def compact_cnn(input_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10,
                widths: tuple[int, int] = (16, 32), hidden: int = 32, groups: int | None = 8,
                activation: str = "relu", mean: float | None = None, std: float | None = None,
                weight_standardization: bool = True,
                model_class: type[keras.Model] = DPScaleModel) -> keras.Model:
    """Two strided convolutions (8x8 / 2, 4x4 / 2), each followed by GroupNorm, `activation`
    and a 2x2 max-pool of stride 1; then Dense(`hidden`) and the classifier.

    The layout of the end-to-end DP CNN for 28x28 images of Papernot et al. (2021) and Tramer &
    Boneh (2021), with the paper's weight standardization and GroupNorm: about 26k parameters
    and a tenth of `small_cnn`'s flops, so a CPU runs the many epochs DP training wants.
    Those papers use tanh (without normalization); with GroupNorm, ReLU trained as well
    (Fashion-MNIST, B = 1024, 8 epochs at (3, 1e-5): 86.3% ReLU, 86.0% tanh, EMA weights).
    Pixels as in `small_cnn` (uint8 range; `mean`/`std` of [0, 1]-scaled pixels).

    Example:
        >>> model = compact_cnn((28, 28, 1), 10, mean=0.286, std=0.353)   # about 26k parameters
    """
    if len(widths) != 2:
        raise ValueError(f"compact_cnn takes two conv widths, e.g. (16, 32); got {widths}")
    inputs, h = _pixel_input(input_shape, mean, std)
    for i, (width, kernel, padding) in enumerate(zip(widths, (8, 4), ("same", "valid"))):
        h = _conv(width, kernel, 2, padding, weight_standardization, f"conv{i + 1}")(h)
        if groups:
            h = keras.layers.GroupNormalization(groups=min(groups, width),
                                                name=f"norm{i + 1}")(h)
        h = keras.layers.Activation(activation, name=f"act{i + 1}")(h)
        h = keras.layers.MaxPooling2D(2, strides=1, name=f"pool{i + 1}")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(hidden, activation=activation, name="hidden")(h)
    outputs = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="logits")(h)
    return model_class(inputs, outputs, name="compact_cnn")


def _pixel_input(input_shape, mean: float | None, std: float | None):
    """The images input (uint8 range) and its scaling to [0, 1], standardized when `mean` and
    `std` (public constants) are given."""
    inputs = keras.Input(input_shape, name="images")
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    if mean is not None and std is not None:
        h = keras.layers.Rescaling(1 / std, offset=-mean / std, name="standardize")(h)
    return inputs, h


def _conv(width: int, kernel: int, stride: int, padding: str, weight_standardization: bool,
          name: str) -> keras.layers.Layer:
    """A WSConv2D (no bias), or a plain He-initialized Keras Conv2D for the ablation rows."""
    if weight_standardization:
        return WSConv2D(width, kernel, strides=stride, padding=padding, name=name)
    return keras.layers.Conv2D(width, kernel, strides=stride, padding=padding,
                               kernel_initializer="he_normal", name=name)
