"""A TensorFlow SavedModel (TF-Hub format or a signature) as a trainable Keras 3 layer.

Example:
    >>> features = SavedModelLayer("/models/feature_extractor", trainable=False)
    >>> features(tf.zeros([2, 28, 28, 1])).shape
    TensorShape([2, 64])
"""

from __future__ import annotations

import os
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from dp_keras_scale import _keras_compat
from dp_keras_scale.finetune.hub import resolve_hub
from dp_keras_scale.finetune.trust import is_trusted

__all__ = ["SavedModelLayer"]

# Forward ops whose per-example kernel gradient TensorFlow's vectorizer computes with a loop.
_SLOW_GRADIENT_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput",
                      "Conv3DBackpropInputV2")


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

    @property
    def source(self) -> str:
        """The TF-Hub handle this layer was loaded from, else its SavedModel directory."""
        return self._source

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
        config = dict(config)
        safe = safe_mode if safe_mode is not None else _keras_compat.in_safe_mode()
        if safe and not is_trusted(config.get("path"), config.get("handle")):
            raise ValueError(
                f"Loading this model reloads the SavedModel at {config.get('path')!r}, which "
                "runs its TensorFlow graph. Keras refuses this in safe mode: if you trust the "
                "file, pass safe_mode=False to keras.models.load_model (or load it inside "
                "dks.finetune.trusted_sources(source)).")
        handle = config.get("handle")
        if handle and not os.path.isdir(config["path"]):   # another machine: its TF-Hub cache
            config["path"] = resolve_hub(handle)
        return cls(**config)
