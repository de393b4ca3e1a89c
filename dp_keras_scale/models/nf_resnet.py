"""Normalizer-free ResNets (Brock, De, Smith 2021), the paper's ImageNet model family.

NF-ResNets replace BatchNorm (which mixes the examples of a batch and so cannot be trained
with per-example clipping) by signal-propagation bookkeeping:

- every convolution is a scaled weight-standardized `WSConv2D` (zero-mean weights of variance
  1/fan_in per output channel, a learnable gain and a bias);
- every activation is scaled by `gamma` so that unit-variance inputs give unit-variance outputs
  (`ScaledActivation`; ReLU: `gamma = sqrt(2 / (1 - 1/pi))`);
- residual blocks compute `h_{i+1} = h_i + alpha * g_i * f_i(h_i / beta_i)`, where
  `beta_i = sqrt(Var(h_i))` is the expected standard deviation at block i, tracked
  analytically: the variance grows by `alpha^2` per block and is reset to `1 + alpha^2` at each
  stage's first (transition) block, whose shortcut is a 1x1 convolution of the scaled,
  activated input `gamma * g(h_i / beta_i)` instead of the identity;
- `g_i` is a learnable scalar initialized to 0 (SkipInit), so each block starts as the
  identity (or as its shortcut convolution), and the classifier is zero-initialized.

A bottleneck block is `pre = gamma * g(h / beta)`, then 1x1 conv -> scaled activation -> 3x3
conv (stride 2 in the first block of stages 2-4) -> scaled activation -> 1x1 conv, times
`alpha * g_i`, plus the shortcut. The activation is applied to `h / beta` as in the paper's
formula; for ReLU this equals the reference code's `g(h) / beta`, and for other activations it
keeps the variance-preserving gain `gamma` (computed for unit-variance inputs) exact.

There are no normalization layers; every layer is a `WSConv2D`, a max-pool, a `Dense` or an
elementwise operation, so per-example gradients vectorize (DP training is fast).
"""

from __future__ import annotations

import math

import keras

from dp_keras_scale.layers.activations import ScaledActivation
from dp_keras_scale.layers.conv import WSConv2D
from dp_keras_scale.model import DPScaleModel

STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
STAGE_CHANNELS = (256, 512, 1024, 2048)   # block output channels at width 1
STAGE_STRIDES = (1, 2, 2, 2)
STEM_CHANNELS = 64
BOTTLENECK_RATIO = 0.25
STEMS = ("imagenet", "cifar")


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class SkipInitResidual(keras.layers.Layer):
    """`shortcut + alpha * skip_gain * residual` with a learnable scalar `skip_gain` (init 0).

    Called on `[shortcut, residual]`. With `skip_gain = 0` the block starts as its shortcut
    (SkipInit, De & Smith 2020).

    Example:
        >>> add = SkipInitResidual(alpha=0.2)
        >>> out = add([shortcut, residual])       # equals shortcut at initialization
    """

    def __init__(self, alpha: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)

    def build(self, input_shape):
        shortcut_shape, residual_shape = input_shape
        if tuple(shortcut_shape[1:]) != tuple(residual_shape[1:]):
            raise ValueError(f"SkipInitResidual needs a shortcut and a residual of the same "
                             f"shape, got {shortcut_shape} and {residual_shape}")
        self.skip_gain = self.add_weight(name="skip_gain", shape=(), initializer="zeros")

    def call(self, inputs):
        shortcut, residual = inputs
        return shortcut + residual * (self.skip_gain * self.alpha)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


def _channels(base: int, width: float, what: str) -> int:
    channels = int(round(base * width))
    if channels < 1:
        raise ValueError(f"width={width} leaves {what} with {base} * {width} < 1 channel; "
                         f"use width >= {1 / base:g}")
    return channels


def _conv(filters: int, kernel: int, stride: int, name: str) -> WSConv2D:
    return WSConv2D(filters, kernel, strides=stride, padding="same", use_bias=True, name=name)


def _check_depth(depth: int) -> None:
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"NF-ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth!r}")


def nf_resnet(depth: int = 50, num_classes: int = 1000, width: float = 1,
              input_shape: tuple[int, int, int] = (224, 224, 3), alpha: float = 0.2,
              activation: str = "relu", drop_rate: float = 0.0, stem: str = "imagenet",
              model_class: type[keras.Model] = DPScaleModel,
              name: str | None = None) -> keras.Model:
    """NF-ResNet-`depth` with bottleneck blocks (depth in 26, 50, 101, 152, 200).

    Stage layout as in ResNet (50: 3, 4, 6, 3 blocks with 256, 512, 1024, 2048 output
    channels, a quarter of that inside each bottleneck, stride 2 in the 3x3 convolution of the
    first block of stages 2-4); `width` multiplies every channel count (e.g. `width=0.125` for
    a CPU-sized network). `stem="imagenet"` is ResNet's 7x7 stride-2 convolution followed by a
    3x3 stride-2 max-pool (as in the reference NF-ResNet); `stem="cifar"` is one 3x3 stride-1
    convolution without pooling, for 32x32 inputs. The max-pool shifts the stem's output away
    from zero mean and unit variance; the first block (a transition, whose shortcut is a
    convolution) absorbs that. Inputs are expected to be normalized images (roughly zero mean,
    unit variance per channel). The head is a scaled activation, global
    average pooling, optional dropout (`drop_rate`) and a zero-initialized `Dense`.

    Under `DPScaleModel`, Keras `Dropout` (`drop_rate > 0`) draws one mask per step shared by
    all examples of the batch (masks differ between augmentation copies and steps): it does
    not affect the privacy guarantee, but it is weaker regularization than in ordinary Keras.

    `model_class=keras.Model` builds the same network for ordinary (non-private) training.

    Example:
        >>> model = nf_resnet(50, num_classes=1000)                  # 25,557,048 parameters
        >>> small = nf_resnet(26, 10, width=0.25, input_shape=(32, 32, 3), stem="cifar")
        >>> small.compile(optimizer=dks.DPSGD(4.0, noise_multiplier=2.5), loss=...)
    """
    _check_depth(depth)
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number (channel multiplier), got {width!r}")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"alpha (residual branch scale) must be positive, got {alpha!r}")
    if not (isinstance(drop_rate, (int, float)) and 0 <= drop_rate < 1):
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS} ('imagenet': 7x7/2 conv + 3x3/2 max-pool; "
                         f"'cifar': 3x3/1 conv for small images), got {stem!r}")
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")

    inputs = keras.Input(shape=tuple(input_shape), name="images")
    stem_channels = _channels(STEM_CHANNELS, width, "the stem")
    if stem == "imagenet":
        x = _conv(stem_channels, 7, 2, "stem_conv")(inputs)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    else:
        x = _conv(stem_channels, 3, 1, "stem_conv")(inputs)

    variance = 1.0   # expected variance of x at initialization (unit skip gains); stem: 1
    for stage, (blocks, out_channels, stage_stride) in enumerate(
            zip(STAGE_BLOCKS[depth], STAGE_CHANNELS, STAGE_STRIDES)):
        out_channels = _channels(out_channels, width, f"stage {stage + 1}")
        mid_channels = _channels(STAGE_CHANNELS[stage] * BOTTLENECK_RATIO, width,
                                 f"the bottlenecks of stage {stage + 1}")
        for block in range(blocks):
            prefix = f"stage{stage + 1}_block{block + 1}"
            stride = stage_stride if block == 0 else 1
            beta = math.sqrt(variance)   # expected std of x
            pre = ScaledActivation(activation, input_scale=1.0 / beta, name=f"{prefix}_act0")(x)
            shortcut = x
            transition = stride != 1 or x.shape[-1] != out_channels
            if transition:
                shortcut = _conv(out_channels, 1, stride, f"{prefix}_shortcut")(pre)
            y = _conv(mid_channels, 1, 1, f"{prefix}_conv1")(pre)
            y = ScaledActivation(activation, name=f"{prefix}_act1")(y)
            y = _conv(mid_channels, 3, stride, f"{prefix}_conv2")(y)
            y = ScaledActivation(activation, name=f"{prefix}_act2")(y)
            y = _conv(out_channels, 1, 1, f"{prefix}_conv3")(y)
            x = SkipInitResidual(alpha, name=f"{prefix}_add")([shortcut, y])
            variance = (1.0 if transition else variance) + alpha ** 2

    x = ScaledActivation(activation, name="final_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if drop_rate:
        x = keras.layers.Dropout(drop_rate, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="logits")(x)
    return model_class(inputs, outputs, name=name or f"nf_resnet_{depth}")

