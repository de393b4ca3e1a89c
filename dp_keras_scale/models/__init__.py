"""Model families of the paper (and a CPU-sized CNN), built as `DPScaleModel`s."""

from dp_keras_scale.models.cnn import compact_cnn, small_cnn
from dp_keras_scale.models.nf_resnet import nf_resnet
from dp_keras_scale.models.scatternet import ScatterNet, Scattering2D, scatternet
from dp_keras_scale.models.wide_resnet import wide_resnet

__all__ = ["ScatterNet", "Scattering2D", "compact_cnn", "nf_resnet", "scatternet", "small_cnn", "wide_resnet"]
