"""Layers whose per-example gradients vectorize across examples."""

from dp_keras_scale.layers.activations import ScaledActivation, activation_gamma
from dp_keras_scale.layers.conv import WSConv2D, conv2d

__all__ = ["ScaledActivation", "WSConv2D", "activation_gamma", "conv2d"]
