"""Scattering-network features: a fixed, data-independent image representation.

Tramer & Boneh (2021, "Differentially Private Learning Needs Better Features") showed that a
linear classifier trained with DP-SGD on the wavelet scattering transform of the images
(Oyallon & Mallat) beats end-to-end DP CNNs on MNIST, Fashion-MNIST and CIFAR-10 at small
epsilon. The transform has no learned weights and never sees data, so it is a "public"
backbone: features can be computed once and a classifier DP-trained on the cached rows
(`dks.finetune.build(..., mode="classifier_only", classifier="add")`, `extract_features`,
`classifier_head`), with the same guarantee as DP-SGD on the images.

The transform is Kymatio's (``kymatio`` package, its TensorFlow backend): Morlet wavelets at
`J` scales and `L` angles, order 2, giving ``1 + J*L + L*L*J*(J-1)/2`` maps per input
channel at ``1/2**J`` of the resolution (81 maps of 7x7 for a 28x28 image with J=2, L=8).
The maps are normalized per example with a GroupNorm without learned parameters (Tramer &
Boneh normalize the same way), which is also a fixed function of each example.
"""

from __future__ import annotations

import keras
import tensorflow as tf


__all__ = ["ScatterNet", "Scattering2D", "scattering_channels", "scatternet"]


def scattering_channels(J: int, L: int) -> int:
    """Maps per input channel of an order-2 scattering transform with J scales, L angles."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def _kymatio_scattering(J: int, shape: tuple[int, int], L: int):
    try:
        # The 2-D frontend alone: `kymatio.tensorflow` also imports the 3-D transform, which
        # needs functions that recent SciPy releases removed.
        from kymatio.scattering2d.frontend.tensorflow_frontend import ScatteringTensorFlow2D
    except ImportError as error:  # pragma: no cover - kymatio is a dependency
        raise ImportError("The scattering transform needs the 'kymatio' package: "
                          "pip install kymatio") from error
    return ScatteringTensorFlow2D(J=J, shape=shape, L=L)


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class Scattering2D(keras.layers.Layer):
    """Order-2 wavelet scattering transform of channels-last images (no trainable weights).

    Input ``[B, H, W, C]`` (H and W divisible by ``2**J``); output
    ``[B, H / 2**J, W / 2**J, C * scattering_channels(J, L)]``.

    Example:
        >>> Scattering2D(J=2, L=8)(tf.zeros([4, 28, 28, 1])).shape
        TensorShape([4, 7, 7, 81])
    """

    def __init__(self, J: int = 2, L: int = 8, **kwargs):
        super().__init__(**kwargs)
        if J < 1 or L < 1:
            raise ValueError(f"Scattering2D needs J >= 1 and L >= 1, got J={J}, L={L}.")
        self.J, self.L = int(J), int(L)
        self.trainable = False
        self._transform = None

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"Scattering2D takes images [batch, height, width, channels], "
                             f"got shape {tuple(input_shape)}.")
        height, width = input_shape[1], input_shape[2]
        step = 2 ** self.J
        if height is None or width is None or height % step or width % step:
            raise ValueError(f"Scattering2D(J={self.J}) needs a known image height and width "
                             f"divisible by 2**J = {step}; got {height}x{width}. Pad or resize "
                             "the images, or lower J.")
        self._transform = _kymatio_scattering(self.J, (int(height), int(width)), self.L)

    def call(self, images):
        images = tf.cast(images, tf.float32)
        batch, height, width, channels = tf.unstack(tf.shape(images))
        planes = tf.transpose(images, [0, 3, 1, 2])                  # [B, C, H, W]
        maps = self._transform(planes)                                # [B, C, K, h, w]
        maps = tf.transpose(maps, [0, 3, 4, 1, 2])                    # [B, h, w, C, K]
        step = 2 ** self.J
        out = tf.reshape(maps, [batch, height // step, width // step,
                                channels * scattering_channels(self.J, self.L)])
        out.set_shape(self.compute_output_shape(tuple(images.shape)))
        return out

    def compute_output_shape(self, input_shape):
        step = 2 ** self.J
        return (input_shape[0], input_shape[1] // step, input_shape[2] // step,
                input_shape[3] * scattering_channels(self.J, self.L))

    def get_config(self) -> dict:
        return {**super().get_config(), "J": self.J, "L": self.L}


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class ScatterNet(keras.layers.Layer):
    """Pixels -> flat, per-example normalized scattering features, as one layer (no weights).

    Multiplies by `pixel_scale`, applies `Scattering2D(J, L)`, a GroupNorm over the maps
    without learned scale or offset (``groups``; None or 0 to skip) and flattens. Built for
    the image size it first sees. The name ``"scatternet"`` as a `dks.finetune` source (and
    ``finetune.source = "scatternet"`` in configs) means this layer with its defaults.

    Example:
        >>> ScatterNet()(tf.zeros([2, 28, 28, 1])).shape          # 81 maps of 7x7
        TensorShape([2, 3969])
    """

    def __init__(self, J: int = 2, L: int = 8, groups: int | None = 27,
                 pixel_scale: float = 1 / 255.0, **kwargs):
        super().__init__(**kwargs)
        self.J, self.L, self.groups, self.pixel_scale = J, L, groups or 0, float(pixel_scale)
        self.scattering = Scattering2D(J, L, name="scattering")
        self.normalize = None
        self.trainable = False

    def build(self, input_shape):
        self.scattering.build(input_shape)
        maps = input_shape[-1] * scattering_channels(self.J, self.L)
        if self.groups:
            if maps % self.groups:
                raise ValueError(f"groups={self.groups} must divide the {maps} scattering maps "
                                 f"({input_shape[-1]} channels x "
                                 f"{scattering_channels(self.J, self.L)}).")
            self.normalize = keras.layers.GroupNormalization(
                groups=self.groups, center=False, scale=False, epsilon=1e-5, name="normalize")
            self.normalize.build(self.scattering.compute_output_shape(input_shape))

    def call(self, images):
        h = self.scattering(tf.cast(images, tf.float32) * self.pixel_scale)
        if self.normalize is not None:
            h = self.normalize(h)
        return tf.reshape(h, [-1, h.shape[1] * h.shape[2] * h.shape[3]])

    def compute_output_shape(self, input_shape):
        _, height, width, maps = self.scattering.compute_output_shape(input_shape)
        return (input_shape[0], height * width * maps)

    def get_config(self) -> dict:
        return {**super().get_config(), "J": self.J, "L": self.L, "groups": self.groups,
                "pixel_scale": self.pixel_scale}


def scatternet(input_shape: tuple[int, int, int] = (28, 28, 1), J: int = 2, L: int = 8,
               groups: int | None = 27, pixel_scale: float = 1 / 255.0,
               model_class: type[keras.Model] = keras.Model, name: str = "scatternet"
               ) -> keras.Model:
    """Images -> flat, per-example normalized scattering features (a frozen backbone).

    Args:
        input_shape: (H, W, C), H and W divisible by ``2**J``.
        J, L: scales and angles of the wavelets (Tramer & Boneh use J=2, L=8).
        groups: GroupNorm groups over the feature maps (no learned scale or offset);
            None or 0 to skip normalization. Must divide the number of maps.
        pixel_scale: multiplies the input first (default: uint8-range pixels to [0, 1]).

    Example:
        >>> backbone = scatternet((28, 28, 1))                    # 3969 features per image
        >>> model = dks.finetune.build(backbone, 10, mode="classifier_only", classifier="add")
        >>> features = dks.finetune.extract_features(model, x_train)   # computed once
        >>> head = dks.finetune.classifier_head(model)              # DP-train this on features
    """
    inputs = keras.Input(input_shape, name="images")
    features = ScatterNet(J, L, groups, pixel_scale, name="features")
    return model_class(inputs, features(inputs), name=name)
