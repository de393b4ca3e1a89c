"""Parameter averaging (EMA and Polyak): callbacks, the update rule, and a weight-swap switch.

Averaging is post-processing of the noisy DP-SGD iterates, so it has no privacy cost: the
averaged weights are a function of the released sequence of noisy updates and nothing else.

The averages live in the optimizer (`WeightAverages`, kept by every `dks.DPOptimizer`,
updated right after each noisy logical step, inside the compiled train step), so checkpoints
(`model.save`, `ModelCheckpoint`, `BackupAndRestore`) save and restore them with the rest of
the training state. The callbacks
here declare which averages to keep (`DPScaleModel.fit` registers them with the optimizer)
and, by default, run validation with the averaged weights.

Example:
    >>> ema = dks.callbacks.EMA(decay=0.999)                  # De et al. 2022 warm-up
    >>> model.fit(train_ds, epochs=10, validation_data=val_ds, callbacks=[ema])
    >>> with dks.callbacks.averaged_weights(model, "ema"):
    ...     model.evaluate(test_ds)
    ...     model.save("ema_model.keras")
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Literal

import keras
import tensorflow as tf

Kind = Literal["ema", "polyak"]


@dataclasses.dataclass(frozen=True)
class AverageSpec:
    """What one average tracks: an EMA (``decay``, optional warm-up) or a Polyak mean.

    ``start_step``: only logical steps after the optimizer's ``iterations`` reaches it are
    averaged (the average follows the weights until then).
    """

    name: str
    kind: Kind
    decay: float = 0.0
    warmup: bool = True
    start_step: int = 0

    def __post_init__(self):
        if self.kind not in ("ema", "polyak"):
            raise ValueError(f"Averaging kind must be 'ema' or 'polyak', got {self.kind!r}")
        if self.kind == "ema" and not 0.0 <= self.decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {self.decay}")
        if int(self.start_step) != self.start_step or self.start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {self.start_step}")
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"An average's name must be a Python identifier, got {self.name!r}")

    def to_config(self) -> dict:
        return dataclasses.asdict(self)

    def weight_of_new_value(self, count: tf.Tensor) -> tf.Tensor:
        """Weight of the current weights in the update, given ``count`` (>= 1) updates so far.

        EMA: ``1 - mu_t`` with ``mu_t = min(decay, (1 + t) / (10 + t))`` under warm-up, where
        ``t = count - 1`` counts the earlier updates; Polyak: ``1 / count`` (a running mean).
        """
        count = tf.cast(count, tf.float32)
        if self.kind == "polyak":
            return 1.0 / count
        mu = tf.constant(self.decay, tf.float32)
        if self.warmup:
            t = count - 1.0
            mu = tf.minimum(mu, (1.0 + t) / (10.0 + t))
        return 1.0 - mu


class WeightAverages:
    """The averages (EMA / Polyak) of the trainable weights that an optimizer keeps.

    Their variables are created through the optimizer (``add_variable_from_reference``), so
    they are saved and restored with its checkpoints; `update` runs right after each noisy
    logical step, inside the compiled train step, whatever optimizer is wrapped by
    `dks.DPOptimizer`. Averaging reads only the released iterates: it is post-processing.

    Example:
        >>> averages = WeightAverages([AverageSpec("ema", "ema", decay=0.999)])
        >>> averages.build(optimizer, model.trainable_variables)
        >>> averages.update(optimizer.iterations, model.trainable_variables)
    """

    def __init__(self, specs: list[AverageSpec] = ()):
        self.specs: list[AverageSpec] = list(specs)
        self._state: dict[str, tuple[list, keras.Variable]] = {}

    def to_config(self) -> list[dict]:
        return [spec.to_config() for spec in self.specs]

    def track(self, spec: AverageSpec, optimizer, var_list=None) -> None:
        """Adds ``spec`` (idempotent); builds its variables now if ``var_list`` is given (the
        optimizer is already built)."""
        known = {s.name: s for s in self.specs}
        if spec.name in known:
            if known[spec.name] != spec:
                raise ValueError(f"An average named '{spec.name}' is already tracked with other "
                                 f"settings ({known[spec.name]}); give the new one another name.")
            return
        self.specs.append(spec)
        if var_list is not None:
            self._build(spec, optimizer, var_list)

    def build(self, optimizer, var_list) -> None:
        """Creates every average's variables (a copy of each weight and a step count)."""
        for spec in self.specs:
            self._build(spec, optimizer, var_list)

    def _build(self, spec: AverageSpec, optimizer, var_list) -> None:
        averages = []
        for v in var_list:
            with tf.init_scope():      # build may run while tracing the first train step
                start = tf.identity(v.value)
            averages.append(optimizer.add_variable_from_reference(
                v, f"{spec.name}_average", initializer=lambda shape, dtype, start=start: start))
        count = optimizer.add_variable(shape=(), dtype="int64", name=f"{spec.name}_count",
                                       initializer="zeros")
        self._state[spec.name] = (averages, count)

    def variables(self, name: str = "ema") -> list:
        """The averaged copies of the trainable weights kept under ``name``."""
        if name not in self._state:
            raise ValueError(f"No weight average named '{name}'; tracked: "
                             f"{sorted(self._state) or 'none'}. Train with "
                             "dks.callbacks.EMA(...) or Polyak(...) in the callbacks.")
        return self._state[name][0]

    def count(self, name: str = "ema") -> int:
        """How many steps the average ``name`` has taken in (0 before ``start_step``)."""
        self.variables(name)           # a clear error for an unknown name
        return int(self._state[name][1].numpy())

    def update(self, steps_done, variables) -> None:
        """Moves every average towards ``variables`` after a step (``steps_done`` counts the
        finished steps, so ``start_step`` compares against it)."""
        for spec in self.specs:
            averages, count = self._state[spec.name]
            active = steps_done > spec.start_step
            count.assign_add(tf.cast(active, tf.int64))
            weight = tf.where(active, spec.weight_of_new_value(tf.maximum(count, 1)), 1.0)
            for average, v in zip(averages, variables):
                average.assign(average + tf.cast(weight, average.dtype) * (v - average))


class WeightAveraging(keras.callbacks.Callback):
    """Base class of `EMA` and `Polyak`: registers the average and swaps it in for validation."""

    def __init__(self, spec: AverageSpec, use_for_validation: bool = True):
        super().__init__()
        self.spec = spec
        self.use_for_validation = bool(use_for_validation)
        self._swap: contextlib.ExitStack | None = None

    def on_test_begin(self, logs=None):
        # Keras runs validation inside `fit` through these hooks; a standalone `evaluate`
        # only sees this callback if it is passed to it.
        if self.use_for_validation and self._swap is None:
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(averaged_weights(self.model, self.spec.name))

    def on_test_end(self, logs=None):
        if self._swap is not None:
            self._swap.close()
            self._swap = None


class EMA(WeightAveraging):
    """Exponential moving average of the trainable weights, one update per logical DP step.

    ``avg <- mu_t * avg + (1 - mu_t) * w`` with ``mu_t = min(decay, (1 + t) / (10 + t))`` when
    ``warmup`` (De et al. 2022), else ``mu_t = decay``. Free in privacy (post-processing).

    Args:
        decay: e.g. 0.999 (CIFAR-10 in the paper) or 0.99999 (ImageNet).
        warmup: use the warm-up schedule above.
        use_for_validation: validation inside `fit` uses the averaged weights.
        start_step: logical step (optimizer ``iterations``) from which to average.
        name: the average's name, for `averaged_weights(model, name)`.

    Example:
        >>> model.fit(ds, epochs=3, callbacks=[dks.callbacks.EMA(0.999)])
        >>> with dks.callbacks.averaged_weights(model, "ema"):
        ...     print(model.evaluate(test_ds, return_dict=True))
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True,
                 use_for_validation: bool = True, start_step: int = 0, name: str = "ema"):
        super().__init__(AverageSpec(name, "ema", float(decay), bool(warmup), int(start_step)),
                         use_for_validation)


class Polyak(WeightAveraging):
    """Polyak (uniform) average of the weights after every logical DP step from ``start_step``.

    Example:
        >>> model.fit(ds, epochs=3, callbacks=[dks.callbacks.Polyak(start_step=100)])
        >>> with dks.callbacks.averaged_weights(model, "polyak"):
        ...     model.save("polyak.keras")
    """

    def __init__(self, start_step: int = 0, use_for_validation: bool = True,
                 name: str = "polyak"):
        super().__init__(AverageSpec(name, "polyak", start_step=int(start_step)),
                         use_for_validation)


@contextlib.contextmanager
def averaged_weights(model: keras.Model, name: str = "ema") -> Iterator[None]:
    """Temporarily loads the average ``name`` into the model's trainable weights.

    Everything inside the block (``evaluate``, ``predict``, ``save``) sees the averaged
    weights; the training weights come back on exit, even after an exception.

    Example:
        >>> with averaged_weights(model, "ema"):
        ...     model.save("ema_model.keras")
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not hasattr(optimizer, "average_variables"):
        raise ValueError("averaged_weights needs a model compiled with a dks.DPOptimizer "
                         "(e.g. dks.DPSGD) that trained "
                         "with a dks.callbacks.EMA or Polyak callback.")
    averages = optimizer.average_variables(name)
    variables = model.trainable_variables
    if len(averages) != len(variables) or any(
            tuple(a.shape) != tuple(v.shape) for a, v in zip(averages, variables)):
        raise ValueError(f"The '{name}' average does not match the model's trainable weights "
                         "(did the set of trainable layers change after training?).")
    saved = [tf.identity(v.value) for v in variables]
    for v, a in zip(variables, averages):
        v.assign(a.value)
    try:
        yield
    finally:
        for v, s in zip(variables, saved):
            v.assign(s)
