"""DPScaleModel: a Keras model whose `fit` runs DP-SGD, and `make_private` to wrap any model."""

from __future__ import annotations

import contextlib
import functools
import gc
import warnings

import keras
import tensorflow as tf

from dp_keras_scale import _keras_compat
from dp_keras_scale.averaging import WeightAveraging
from dp_keras_scale.clipping import clipped_gradient_sum
from dp_keras_scale.distribute import num_workers
from dp_keras_scale.layers.conv import WSConv2D, fast_convolution_op, supports_fast_convolution
from dp_keras_scale.optimizers import DPOptimizer, is_first_replica

_CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
               keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
               keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def _layers(model: keras.Model) -> list[keras.layers.Layer]:
    return _keras_compat.flatten_layers(model)


def check_per_example_layers(model: keras.Model) -> None:
    """Raises for layers that mix examples (BatchNorm in training mode).

    A BatchNormalization layer with ``trainable=False`` runs in inference mode with stored
    statistics (an affine map per example) and is accepted.
    """
    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            raise ValueError(
                f"Layer '{layer.name}' (BatchNormalization) is trainable: in training mode it "
                "mixes the examples of a batch, so per-example gradients (and the privacy "
                "guarantee) are undefined. Use keras.layers.GroupNormalization (e.g. "
                "groups=16), or freeze it with `layer.trainable = False` to use its stored "
                "statistics (fine-tuning).")


@contextlib.contextmanager
def fast_convolutions(model: keras.Model):
    """Temporarily routes plain Keras Conv2D layers through the per-example-fast convolution."""
    patched = [layer for layer in _layers(model) if supports_fast_convolution(layer)]
    for layer in patched:
        layer.convolution_op = functools.partial(fast_convolution_op, layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.convolution_op


def _merge_copies(t: tf.Tensor) -> tf.Tensor:
    """[B, K, ...] -> [B * K, ...]."""
    if t.shape[2:].is_fully_defined():
        return tf.reshape(t, [-1, *t.shape[2:]])
    return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))


_warned_slow_layers: set[int] = set()


def warn_slow_layers(model: keras.Model) -> None:
    """Warns once per layer whose per-example gradient falls back to a slow while-loop."""
    for layer in _layers(model):
        if (isinstance(layer, _CONV_TYPES) and not isinstance(layer, WSConv2D)
                and not supports_fast_convolution(layer) and id(layer) not in _warned_slow_layers):
            _warned_slow_layers.add(id(layer))
            warnings.warn(
                f"Layer '{layer.name}' ({type(layer).__name__}) has no vectorized per-example "
                "kernel gradient: DP training is exact but slower (TensorFlow falls back to a "
                "loop over examples). Plain channels_last Conv2D layers without dilation and "
                "groups, and dks.layers.WSConv2D, are fast.", stacklevel=3)


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class DPScaleModel(keras.Model):
    """A Keras model trained with DP-SGD by `fit` (compile it with `dks.DPSGD` or any
    optimizer wrapped in `dks.DPOptimizer`).

    Batches are ``(x, y)`` or ``(x, y, mask)``: ``x`` is ``[B, H, W, C]`` or ``[B, K, H, W, C]``
    (K augmentation copies of each example), ``y`` is ``[B]`` (shared by the copies) or
    ``[B, K]`` (one-hot: ``[B, C]`` or ``[B, K, C]``), and ``mask`` is a ``[B]`` weight in
    [0, 1] (0 for padded rows). Each example contributes the clipped gradient of its mean loss
    over its K copies. Evaluation and prediction are ordinary Keras.

    Under a `tf.distribute` strategy (build and compile the model inside
    ``strategy.scope()``), each replica clips its own rows, the clipped sums are all-reduced
    with the noise added once (see `DPOptimizer.apply_private`), and logged metrics cover the
    global batch. With several workers, feed `dks.distribute.DistributedBatchSampler` batches.

    Example:
        >>> model = DPScaleModel(inputs, outputs)
        >>> model.compile(optimizer=DPSGD(0.5, l2_norm_clip=1.0, noise_multiplier=1.1),
        ...               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...               metrics=["accuracy"])
        >>> model.fit(train_ds, epochs=3)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nonfinite_tracker = keras.metrics.Sum(name="nonfinite_examples")
        self.clipped_tracker = keras.metrics.Mean(name="clipped_fraction")
        # How per-example clipped sums are computed: "reference" (per-example gradients,
        # vectorized; the default) or "auto" (batched per-layer norms, dks.ghost_clipping:
        # equal in the tests, not yet faster on CPU in benchmarks/results/throughput.md).
        self.clipping_method = "reference"

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(
                "DPScaleModel trains with differential privacy and needs a dks.DPSGD optimizer "
                f"or one wrapped in dks.DPOptimizer(...), got {optimizer!r}. For non-private "
                "training use a plain keras.Model.")
        check_per_example_layers(self)
        if self.dtype_policy.name == "mixed_float16":
            raise ValueError(
                "The mixed_float16 policy needs loss scaling (Keras would wrap the optimizer in a "
                "LossScaleOptimizer that scales the batch loss), and float16 per-example "
                "gradients can underflow before clipping. Use "
                "keras.mixed_precision.set_global_policy('mixed_bfloat16') instead: bfloat16 "
                "has float32's range, so DP training needs no loss scaling (variables, clipping "
                "and noise stay float32).")
        previous = getattr(self, "optimizer", None)
        super().compile(optimizer, *args, **kwargs)
        if isinstance(previous, DPOptimizer) and previous is not optimizer:
            # The weights carry what the earlier steps learned: their privacy cost stays.
            optimizer.carry_over(previous)

    def compile_from_config(self, config):
        """Recompiles a loaded model (Keras skips models that override `compile`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            **kwargs):
        """`keras.Model.fit`, with DP checks. Batches must come from a sampler the accountant
        describes (`dks.data.BatchSampler`).

        Before training it registers `dks.callbacks.EMA` / `Polyak` averages with the optimizer
        (so checkpoints carry them), runs `keras.callbacks.BackupAndRestore` callbacks first
        (so every other callback sees the restored step count), and checks that an
        uncalibrated ``DPSGD(noise_multiplier=None)`` comes with a `PrivacyBudget` that can
        calibrate it.

        Every ``fit`` starts a new sampled batch, so a logical step that an earlier ``fit``
        left half accumulated (interrupted, stopped by the budget) is discarded, at the end of
        that ``fit`` and again at the start of the next: a noisy step never sums two sampled
        batches (one example could then count twice). ``steps_per_epoch`` must be a multiple
        of the optimizer's ``gradient_accumulation_steps`` for the same reason.
        """
        check_per_example_layers(self)
        accumulation = getattr(self.optimizer, "dp_accumulation_steps", 1)
        steps_per_epoch = kwargs.get("steps_per_epoch")
        if steps_per_epoch is not None and steps_per_epoch % accumulation:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch} micro-batches would end an epoch inside a "
                f"logical step of {accumulation} micro-batches: pass a multiple of "
                f"{accumulation} (sampler.steps_per_epoch * sampler.accumulation_steps).")
        warn_slow_layers(self)
        callbacks = _order_callbacks(list(callbacks or []))
        _check_distributed_input(self.distribute_strategy, x)
        with self.distribute_strategy.scope():   # optimizer variables mirror like the model's
            for callback in callbacks:
                if isinstance(callback, WeightAveraging):
                    self.optimizer.track_average(callback.spec)
            if self.built and not self.optimizer.built:   # eagerly: callbacks read its state
                self.optimizer.build(self.trainable_variables)
        if self.optimizer.noise_multiplier is None and not any(
                getattr(cb, "can_calibrate", False) for cb in callbacks):
            raise ValueError(
                "DPSGD(noise_multiplier=None) needs calibrating before training: pass "
                "dks.callbacks.PrivacyBudget(delta=..., target_epsilon=..., planned_steps=...) "
                "in callbacks (it sets sigma from the accountant), or set noise_multiplier.")
        if not isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)) and x is not None:
            self._check_labels(y)
            warnings.warn(
                "DPScaleModel.fit on in-memory arrays batches them by shuffling and "
                "partitioning, which is neither Poisson nor fixed-size sampling: no accountant "
                "here describes it. For a guarantee that matches dks.accounting, feed "
                "dks.data.BatchSampler(...).dataset(x, y).", stacklevel=2)
        if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
            kwargs.setdefault("shuffle", False)     # a sampler's batches are already random
        self.optimizer.discard_partial_step()
        try:
            return super().fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                               callbacks=callbacks, **kwargs)
        finally:
            self.optimizer.discard_partial_step()
            # Keras's epoch iterator sits in a reference cycle: collect it now, so its tf.data
            # generator is finalized here rather than noisily at interpreter exit.
            gc.collect()

    def train_on_batch(self, x, y=None, sample_weight=None, class_weight=None,
                       return_dict=False):
        """`keras.Model.train_on_batch`, refusing out-of-range class labels before the step
        (inside a compiled step TensorFlow raises a kernel error, and XLA turns the example
        into a NaN loss instead)."""
        self._check_labels(y)
        return super().train_on_batch(x, y, sample_weight=sample_weight,
                                      class_weight=class_weight, return_dict=return_dict)

    def _check_labels(self, y) -> None:
        """Checks in-memory integer labels against the output width of a sparse-categorical
        loss (other losses may use other label conventions, e.g. -1/1 for hinge losses)."""
        loss = getattr(self, "loss", None)
        sparse = (loss in ("sparse_categorical_crossentropy",)
                  or isinstance(loss, keras.losses.SparseCategoricalCrossentropy))
        outputs = getattr(self, "outputs", None)
        if sparse and outputs and y is not None and not isinstance(y, tf.data.Dataset):
            from dp_keras_scale import data      # the data package loads lazily
            data.check_labels(y, num_classes=outputs[0].shape[-1])

    @property
    def metrics(self):
        return super().metrics + [self.nonfinite_tracker, self.clipped_tracker]

    # -- batch layout ------------------------------------------------------------------------

    def _has_copies_axis(self, x: tf.Tensor) -> bool:
        inputs = getattr(self, "inputs", None)
        if inputs:
            return x.shape.rank == len(inputs[0].shape) + 1
        return x.shape.rank == 5

    def _copies_layout(self, x, y):
        """Returns x as [B, K, ...], y as [B, K, ...] and K."""
        first = tf.nest.flatten(x)[0]
        if self._has_copies_axis(first):
            copies = first.shape[1]
        else:
            copies = 1
            x = tf.nest.map_structure(lambda t: tf.expand_dims(t, 1), x)
        y = tf.nest.map_structure(lambda t: self._labels_with_copies(t, copies), y)
        return x, y, copies

    def _labels_with_copies(self, y: tf.Tensor, copies: int) -> tf.Tensor:
        outputs = getattr(self, "outputs", None)
        out_rank = len(outputs[0].shape) if outputs else None
        per_copy = copies > 1 and y.shape.rank >= 2 and y.shape[1] == copies
        if per_copy and out_rank is not None:
            if y.shape.rank == out_rank == 2 and outputs[0].shape[-1] == copies:
                raise ValueError(
                    f"Ambiguous labels of shape {y.shape} with {copies} copies and {copies} "
                    "classes: pass sparse labels as [B] or [B, K], one-hot labels as [B, K, C].")
            per_copy = y.shape.rank in (out_rank, out_rank + 1)
        if per_copy:
            return y
        return tf.repeat(tf.expand_dims(y, 1), copies, axis=1)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Before distributed training Keras builds metrics from one batch, reducing it across
        workers first (which fails for multi-worker input): use this worker's first replica's
        share of the batch instead; only its shapes matter."""
        strategy = self.distribute_strategy
        if iterator is None or (strategy.num_replicas_in_sync == 1
                                and num_workers(strategy) == 1):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(
                lambda v: (strategy.experimental_local_results(v)[0]
                           if isinstance(v, tf.distribute.DistributedValues) else v), next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _symbolic_build(self, iterator=None, data_batch=None):
        """Keras builds metrics from one batch before distributed training: give it the first
        copy of each example (the model's input layout) instead of the [B, K, ...] batch."""
        if data_batch is not None:
            x, y, weights = keras.utils.unpack_x_y_sample_weight(data_batch)
            first = tf.nest.flatten(x)[0] if x is not None else None
            if y is not None and first is not None and self._has_copies_axis(first):
                x, y = tf.nest.map_structure(tf.convert_to_tensor, (x, y))
                x, y, _ = self._copies_layout(x, y)
                x, y = tf.nest.map_structure(lambda t: t[:, 0], (x, y))
                data_batch = (x, y) if weights is None else (x, y, weights)
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

    # -- training ----------------------------------------------------------------------------

    def _example_loss(self, x, y):
        """Mean loss over one example's copies (leading axis K), and its predictions."""
        pred = self(x, training=True)
        return _keras_compat.compiled_loss(self, x, y, pred), pred

    def _compiled_by_xla(self) -> bool:
        """Whether XLA compiles the train step (jit_compile, or a TPU, which always does)."""
        return bool(self.jit_compile) or isinstance(tf.distribute.get_strategy(),
                                                    tf.distribute.TPUStrategy)

    def train_step(self, data):
        x, y, weights = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError("DPScaleModel.fit needs labels: batches of (x, y) or (x, y, mask).")
        x, y = tf.nest.map_structure(tf.convert_to_tensor, (x, y))
        x, y, copies = self._copies_layout(x, y)
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        if weights is None:
            weights = tf.ones([batch])
        elif self.optimizer.expected_batch_size is None:
            raise ValueError(
                "Batches carry a mask (Poisson sampling or padding): set "
                "DPSGD(expected_batch_size=...) to the expected number of examples per logical "
                "step (sampling_rate * dataset_size). Dividing by the realized count would leak.")
        weights = tf.reshape(tf.cast(weights, tf.float32), [-1])

        with fast_convolutions(self):
            result = clipped_gradient_sum(
                self._example_loss, self.trainable_variables, x, y, weights,
                self.optimizer.l2_norm_clip, self.optimizer.rescale_to_unit_norm,
                model=self, method=self.clipping_method, xla=self._compiled_by_xla())
        logical_batch = None
        if self.optimizer.expected_batch_size is None:    # fixed-size batches: rows are public
            logical_batch = _global_rows(batch) * self.optimizer.dp_accumulation_steps
        self.optimizer.apply_private(result.gradients, self.trainable_variables, logical_batch)

        _keras_compat.loss_tracker(self).update_state(result.losses, sample_weight=result.valid)
        self.nonfinite_tracker.update_state(result.nonfinite)
        self.clipped_tracker.update_state(result.clipped / tf.maximum(
            tf.reduce_sum(result.valid), 1.0), sample_weight=tf.reduce_sum(result.valid))
        valid = tf.reshape(result.valid, [-1, 1]) * tf.ones([1, copies])
        predictions = _merge_copies(result.predictions)
        predictions = tf.where(tf.reshape(valid, [-1] + [1] * (predictions.shape.rank - 1)) > 0,
                               predictions, tf.zeros_like(predictions))
        # Unweighted compiled metrics (``metrics=["accuracy"]``) ignore sample weights but
        # honour a Keras mask: without it, padded rows would count as examples.
        _keras_compat.set_keras_mask(predictions, tf.reshape(valid, [-1]) > 0)
        logs = self.compute_metrics(x, tf.nest.map_structure(_merge_copies, y), predictions,
                                    sample_weight=tf.reshape(valid, [-1]))
        return _metrics_across_replicas(self.metrics, logs)

    def test_step(self, data):
        x, y, weights = keras.utils.unpack_x_y_sample_weight(data)
        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        if y is not None and self._has_copies_axis(tf.nest.flatten(x)[0]):
            x, y, copies = self._copies_layout(x, y)
            x, y = tf.nest.map_structure(_merge_copies, (x, y))
            if weights is not None:
                weights = tf.repeat(tf.reshape(weights, [-1]), copies)
            data = (x, y, weights) if weights is not None else (x, y)
        logs = super().test_step(data)
        for tracker in (self.nonfinite_tracker, self.clipped_tracker):   # training-only
            logs.pop(tracker.name, None)
        return _metrics_across_replicas(self.metrics, logs)


def _global_rows(rows: tf.Tensor) -> tf.Tensor:
    """The micro-batch's row count summed over replicas (a public constant, not a data count)."""
    context = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy() or context is None or context.num_replicas_in_sync == 1:
        return rows
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(rows, tf.float32))


_REDUCTIONS = {"sum": tf.distribute.ReduceOp.SUM, "mean": tf.distribute.ReduceOp.MEAN}


def _metrics_across_replicas(metrics: list, logs: dict) -> dict:
    """In replica context, each replica's metrics hold its own examples only: returns the
    results of the metrics' states all-reduced over replicas (so per-batch logs describe the
    whole global batch); ``logs`` unchanged on one replica."""
    context = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy() or context is None or context.num_replicas_in_sync == 1:
        return logs
    states = [v for metric in metrics for v in metric.variables]
    by_op: dict = {}
    for i, v in enumerate(states):
        aggregation = getattr(v, "aggregation", "sum")
        if aggregation == "only_first_replica":
            by_op.setdefault("first", []).append(i)
        elif aggregation in _REDUCTIONS:
            by_op.setdefault(aggregation, []).append(i)
    local = [tf.identity(tf.convert_to_tensor(v)) for v in states]   # this replica's state
    reduced = list(local)                                # kept for aggregation "none"
    for op, indices in by_op.items():
        values = [local[i] for i in indices]
        if op == "first":
            keep = tf.cast(is_first_replica(context), values[0].dtype)
            values = [keep * value for value in values]
        out = context.all_reduce(_REDUCTIONS.get(op, tf.distribute.ReduceOp.SUM), values)
        for i, value in zip(indices, out):
            reduced[i] = value
    results, start = {}, 0
    for metric in metrics:
        count = len(metric.variables)
        result = metric.stateless_result(reduced[start:start + count])
        start += count
        if isinstance(result, dict):
            results.update(result)
        else:
            results[metric.name] = result
    logs = {name: results.get(name, value) for name, value in logs.items()}
    if num_workers(tf.distribute.get_strategy()) > 1:
        # Keras averages multi-worker step outputs with reduce(MEAN, axis=0), which fails on
        # scalars; the values are identical on every replica, so a leading axis of 1 makes
        # that reduction return them unchanged.
        logs = {name: tf.expand_dims(value, 0) for name, value in logs.items()}
    return logs


def _check_distributed_input(strategy: tf.distribute.Strategy, x) -> None:
    """Refuses inputs whose multi-worker sharding no accountant describes."""
    workers = num_workers(strategy)
    if workers > 1 and not isinstance(x, tf.distribute.DistributedDataset):
        raise ValueError(
            f"Training on {workers} workers needs a per-worker Poisson sampler: Keras would "
            "auto-shard this input, and every worker's own batches would then be mixed into "
            "one logical step, which is not the Poisson sampling dks.accounting describes. "
            "Feed dks.distribute.DistributedBatchSampler(len(x), expected_batch_size, "
            "strategy).dataset(x, y): each worker samples a disjoint shard with the global "
            "rate q, which is exactly a Poisson sample of rate q of the whole dataset.")


def _order_callbacks(callbacks: list) -> list:
    """BackupAndRestore first (stable otherwise): the others must see the restored state."""
    restores = [cb for cb in callbacks if isinstance(cb, keras.callbacks.BackupAndRestore)]
    return restores + [cb for cb in callbacks if cb not in restores]


def make_private(model: keras.Model) -> DPScaleModel:
    """Wraps a built Keras model (functional or Sequential) as a `DPScaleModel`.

    The returned model shares the layers and weights of ``model``.

    Example:
        >>> base = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
        ...                          keras.layers.Dense(10)])
        >>> model = make_private(base)
        >>> model.compile(optimizer=DPSGD(0.1, noise_multiplier=1.0), loss=...)
    """
    if isinstance(model, DPScaleModel):
        return model
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"make_private needs a built functional or Sequential model with known inputs; "
            f"{type(model).__name__} has none. Build it with keras.Input(...) first, or subclass "
            "dks.DPScaleModel instead of keras.Model.")
    check_per_example_layers(model)
    return DPScaleModel(inputs=model.inputs, outputs=model.outputs, name=f"private_{model.name}")
