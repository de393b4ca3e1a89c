"""DP optimizers: any Keras optimizer made private (noise once per logical step), and DPSGD.

`DPOptimizer(keras.optimizers.Adam(1e-3), l2_norm_clip=..., noise_multiplier=...)` wraps any
Keras optimizer; `DPSGD(...)` is the paper's SGD (with momentum) in the same form. The DP
stages (accumulate, add noise once, all-reduce, normalize) run here; the wrapped optimizer's
own update then sees only the noisy average.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from dp_keras_scale import _keras_compat
from dp_keras_scale.averaging import AverageSpec, WeightAverages
from dp_keras_scale.clipping import gaussian_noise, split_noise_seed
from dp_keras_scale.ledger import PrivacyLedger, Segment

_LEDGER_KEY = "privacy_ledger"   # the ledger's entry among the optimizer's saved variables


def is_first_replica(context: tf.distribute.ReplicaContext):
    """True (a Python bool when static, else a boolean tensor) on replica 0 of the sync group.

    Example:
        >>> is_first_replica(tf.distribute.get_replica_context())
        True
    """
    replica_id = context.replica_id_in_sync_group
    static = tf.get_static_value(replica_id)
    return bool(static == 0) if static is not None else tf.equal(replica_id, 0)


def _and(a, b):
    """Logical and of Python bools and/or boolean tensors, staying Python when both are."""
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    return tf.logical_and(a, b)


def _random_seed() -> np.ndarray:
    """Two 63-bit seeds from the operating system's cryptographic RNG."""
    return np.frombuffer(os.urandom(16), dtype=np.int64) & np.int64(2**63 - 1)


_NOT_UNDER_DP = ("loss_scale_factor", "clipnorm", "clipvalue", "global_clipnorm")


class DPOptimizer(keras.optimizers.Optimizer):
    """Any Keras optimizer under differential privacy (DP-SGD's aggregation, then its update).

    Formal guarantee: with the clipped per-example gradients that `DPScaleModel` hands it
    (each of norm <= C), every logical step releases ``(sum of clipped gradients + N(0,
    (sigma C)^2 I)) / B`` with ONE noise draw, whatever the number of micro-batches and
    replicas; the wrapped optimizer's update (momentum, Adam moments, weight decay) and the
    weight averages are post-processing of that release.

    Stages of a logical step, each a small method:
      1. accumulate: micro-batch sums of clipped gradients are added up (`_update`);
      2. noise: on the micro-batch that completes the step, replica 0 adds N(0, (sigma C)^2)
         once (`_add_noise`), from a counter-based key (OS RNG unless ``noise_seed``);
      3. all-reduce: under `tf.distribute`, the noisy local sums are summed once;
      4. normalize: divide by the expected logical batch size B (a public constant);
      5. update: the wrapped optimizer's update with that noisy average (`_noisy_step`),
         then the weight averages (EMA / Polyak).

    Create it from an optimizer (its configuration is taken, not its state):

        >>> opt = DPOptimizer(keras.optimizers.Adam(1e-3), l2_norm_clip=1.0,
        ...                   noise_multiplier=1.1, expected_batch_size=256)
        >>> model.compile(optimizer=opt, loss=...)

    The result is an instance of ``DP<Name>`` (e.g. ``DPAdam``), a subclass of both
    `DPOptimizer` and the wrapped class, saved and loaded like any Keras optimizer (classes of
    ``keras.optimizers`` are registered on import; for your own optimizer class, call
    `dp_optimizer_class` on it before ``keras.models.load_model``).

    Restoring a checkpoint (``load_weights``, ``load_model``, ``BackupAndRestore``) draws a
    fresh noise key from the operating system's RNG, so a resumed run never repeats a noise
    draw of the interrupted one, and discards a partially accumulated logical step (its
    micro-batches came from a batch the resumed input pipeline will not finish).
    `DPScaleModel.fit` discards a partial step at the start and end of every ``fit`` too, so
    a logical step never mixes two sampled batches.

    ``ledger`` (a `dks.ledger.PrivacyLedger`) records what was spent: steps per noise
    multiplier and sampling rate, including a sigma changed between fits and the history of
    an optimizer this one replaced in a recompile. It is saved and restored with the
    optimizer's variables; `spent` returns it and `dks.callbacks.PrivacyBudget` composes it.

    Under `tf.distribute` (create it inside ``strategy.scope()``), replica 0 adds the noise
    once to its clipped sum before the sums are all-reduced, so the global sum carries one draw
    of std sigma * C for any number of replicas; ``expected_batch_size`` is the GLOBAL
    expected logical batch (see `dks.distribute`).

    It refuses raw gradients: use it through `DPScaleModel` / `make_private`.

    Args:
        optimizer: the Keras optimizer to privatize (its ``get_config()`` is used).
        l2_norm_clip: clip norm C of each example's gradient (averaged over its copies).
        noise_multiplier: sigma; the noise std is sigma * C. ``None`` lets
            ``dks.callbacks.PrivacyBudget(target_epsilon=..., planned_steps=...)`` calibrate
            it with the accountant when training starts.
        rescale_to_unit_norm: divide clipped gradients by C (the paper's choice; decouples the
            learning rate from C).
        gradient_accumulation_steps: micro-batches per logical step.
        expected_batch_size: the expected number of examples per logical step, required with
            Poisson sampling (q * N). Without it, the logical batch size is the micro-batch
            size times ``gradient_accumulation_steps`` (fixed-size batches).
        noise_seed: integer seed for DETERMINISTIC noise (tests, debugging). Whoever knows
            the seed can regenerate every noise draw, so such steps carry no privacy
            guarantee: the ledger marks them and the privacy statement says so. By default
            a fresh key from the operating system's RNG. Restoring a checkpoint always
            re-keys from the OS RNG.
        weight_averages: configs of the averages to keep (set by `DPScaleModel.fit` from
            `dks.callbacks.EMA` / `Polyak` callbacks, and saved in the optimizer's config).
    """

    def __new__(cls, *args, **kwargs):
        if cls is not DPOptimizer:
            return super().__new__(cls)
        if not args or not isinstance(args[0], keras.optimizers.Optimizer):
            raise TypeError("DPOptimizer(optimizer, l2_norm_clip=..., noise_multiplier=..., ...) "
                            "takes the Keras optimizer to privatize as its first argument, e.g. "
                            "DPOptimizer(keras.optimizers.Adam(1e-3), ...).")
        inner, *rest = args
        if isinstance(inner, DPOptimizer):
            raise TypeError(f"{type(inner).__name__} is already differentially private: "
                            "compile with it directly.")
        if rest:
            raise TypeError("DPOptimizer takes one Keras optimizer, then keyword arguments for "
                            f"the DP settings; got {len(args)} positional arguments.")
        config = inner.get_config()
        if config.pop("gradient_accumulation_steps", None) is not None:
            raise ValueError("Set gradient_accumulation_steps on DPOptimizer (micro-batches per "
                             "noisy logical step), not on the optimizer it wraps.")
        # Python calls __init__ again on the returned instance with these arguments: the
        # instance is complete by then and ignores that call (see __init__).
        return dp_optimizer_class(type(inner))(**config, **kwargs)

    def __init__(self, *args, l2_norm_clip: float = 1.0, noise_multiplier: float | None = None,
                 rescale_to_unit_norm: bool = False, gradient_accumulation_steps: int = 1,
                 expected_batch_size: float | None = None, noise_seed: int | None = None,
                 weight_averages: list[dict] | None = None, **kwargs):
        if getattr(self, "_dp_initialized", False):   # the second call of DPOptimizer(opt, ...)
            return
        for option in _NOT_UNDER_DP:
            if kwargs.get(option) is not None:
                raise ValueError(f"{type(self).__name__} does not take `{option}`: per-example "
                                 "clipping is set by `l2_norm_clip`.")
        super().__init__(*args, **kwargs)
        if not l2_norm_clip > 0:
            raise ValueError(f"l2_norm_clip must be > 0, got {l2_norm_clip}")
        if int(gradient_accumulation_steps) != gradient_accumulation_steps or \
                gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be an integer >= 1, got "
                             f"{gradient_accumulation_steps}")
        if expected_batch_size is not None and not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.l2_norm_clip = float(l2_norm_clip)
        self._noise_stddev_variable = None
        self.ledger = PrivacyLedger()
        self.noise_multiplier = noise_multiplier
        self.rescale_to_unit_norm = bool(rescale_to_unit_norm)
        self.dp_accumulation_steps = int(gradient_accumulation_steps)
        self.expected_batch_size = (None if expected_batch_size is None
                                    else float(expected_batch_size))
        self.noise_seed = noise_seed
        self.ledger.update(0, expected_batch_size=self.expected_batch_size,
                           deterministic_noise=noise_seed is not None)
        self.averages = WeightAverages([AverageSpec(**spec) for spec in weight_averages or []])
        self._dp_initialized = True

    @property
    def noise_multiplier(self) -> float | None:
        """sigma. Setting it also updates the value the compiled train step reads."""
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float | None) -> None:
        if value is not None and not value >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {value}")
        self._noise_multiplier = None if value is None else float(value)
        self.ledger.update(self._steps_now(), noise_multiplier=self._noise_multiplier)
        if self._noise_stddev_variable is not None and value is not None:
            self._noise_stddev_variable.assign(self.noise_stddev)

    # -- the privacy ledger ------------------------------------------------------------------

    def _steps_now(self) -> int:
        return int(self.iterations.numpy())

    def spent(self) -> list[Segment]:
        """The segments of noisy steps taken so far (`dks.ledger.PrivacyLedger.spent`).

        Example:
            >>> [(s.noise_multiplier, s.steps) for s in model.optimizer.spent()]
        """
        return self.ledger.spent(self._steps_now())

    def describe_sampling(self, sampling_rate: float) -> None:
        """Records the sampling rate q of the steps from now on (`PrivacyBudget` calls it)."""
        self.ledger.update(self._steps_now(), sampling_rate=float(sampling_rate))

    def carry_over(self, previous: "DPOptimizer") -> None:
        """Takes over the spent history of the optimizer this one replaces (a recompile)."""
        self.ledger.restore(previous.spent() + self.spent(), self._steps_now())

    def discard_partial_step(self) -> bool:
        """Drops a partially accumulated logical step (its micro-batches' clipped sums, which
        carry no noise yet); returns whether there was one."""
        if not self.built or self.dp_accumulation_steps == 1:
            return False
        micro = int(self._micro_steps.numpy())
        partial = micro % self.dp_accumulation_steps
        if partial:
            self._micro_steps.assign(micro - partial)
            for acc in self._accumulators:
                acc.assign(tf.zeros_like(acc))
        return bool(partial)

    @property
    def noise_stddev(self) -> float:
        """Std of the Gaussian noise added to the summed clipped gradients."""
        if self.noise_multiplier is None:
            raise ValueError(
                f"{type(self).__name__}(noise_multiplier=None) has not been calibrated: train "
                "with "
                "dks.callbacks.PrivacyBudget(target_epsilon=..., planned_steps=..., delta=...) "
                "in the callbacks, or pass noise_multiplier (see "
                "dks.accounting.calibrate_noise_multiplier).")
        scale = 1.0 if self.rescale_to_unit_norm else self.l2_norm_clip
        return self.noise_multiplier * scale

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        seed = (_random_seed() if self.noise_seed is None
                else np.array([self.noise_seed, 0x5EED], dtype=np.int64))
        self._seed = self.add_variable(shape=(2,), dtype="int64", name="noise_seed",
                                       initializer=keras.initializers.Constant(seed))
        self._micro_steps = self.add_variable(shape=(), dtype="int64", name="micro_steps",
                                              initializer="zeros")
        # Read at run time, so changing noise_multiplier between fits takes effect.
        self._noise_stddev_variable = self.add_variable(
            shape=(), dtype="float32", name="noise_stddev", initializer=keras.initializers.Constant(
                float("nan") if self.noise_multiplier is None else self.noise_stddev))
        self._accumulators = []
        if self.dp_accumulation_steps > 1:
            self._accumulators = [self.add_variable_from_reference(v, "dp_accumulator")
                                  for v in var_list]
        self.averages.build(self, var_list)

    # -- weight averages (EMA / Polyak): post-processing of the noisy iterates --------------

    def track_average(self, spec: AverageSpec) -> None:
        """Keeps the average ``spec`` of the trainable weights from now on (idempotent)."""
        self.averages.track(spec, self, _keras_compat.optimizer_variables_trained(self)
                            if self.built else None)

    def average_variables(self, name: str = "ema") -> list:
        """The averaged copies of the trainable weights kept under ``name``."""
        return self.averages.variables(name)

    # -- restoring ---------------------------------------------------------------------------

    def save_own_variables(self, store):
        """Saves the optimizer's variables and its privacy ledger."""
        super().save_own_variables(store)
        store[_LEDGER_KEY] = PrivacyLedger.to_array(self.spent())

    def load_own_variables(self, store):
        """Restores a checkpoint and its ledger, then re-keys the noise from the OS RNG and
        drops a partial logical step."""
        saved = PrivacyLedger.from_array(store[_LEDGER_KEY]) if _LEDGER_KEY in store else None
        super().load_own_variables({k: store[k] for k in store.keys() if k != _LEDGER_KEY})
        if self.noise_multiplier is not None:   # the config's sigma, restored with it
            self._noise_stddev_variable.assign(self.noise_stddev)
        self._seed.assign(_random_seed())
        # A file without a ledger (older versions): its steps ran at the config's settings.
        self.ledger.restore(saved or [], self._steps_now() if saved is not None else 0)
        self.ledger.update(self._steps_now(), deterministic_noise=False)   # re-keyed above
        self.discard_partial_step()

    def apply(self, grads, trainable_variables=None):
        """Refuses raw gradients; `apply_private` is the way in."""
        raise RuntimeError(
                f"{type(self).__name__} received raw (unclipped) gradients, which would void "
                "the privacy guarantee. Train with a dks.DPScaleModel (or "
                "dks.make_private(model)); it clips per-example gradients and calls "
                "`apply_private`.")

    def apply_private(self, clipped_sums, variables, batch_normalizer) -> None:
        """Accumulates one micro-batch of summed clipped gradients; steps on the last one.

        Under a `tf.distribute` strategy it is called in replica context (as
        `DPScaleModel.train_step` runs) with the clipped sum of that replica's examples only.
        On the micro-batch that completes a logical step, replica 0 alone adds the Gaussian
        noise (std sigma * C, the very draw a single device would make from the same key) to
        its local sum; the noisy local sums are then all-reduced (SUM) once, so the global sum
        carries exactly one noise draw whatever the number of replicas. Every replica then
        applies the identical all-reduced value to its copy of the mirrored variables
        (accumulators, noise key, SGD state, weight averages), which therefore stay equal.

        Args:
            clipped_sums: summed clipped per-example gradients of one micro-batch (of this
                replica's share of it, under a strategy).
            variables: the trainable variables they belong to.
            batch_normalizer: the GLOBAL logical batch size (all replicas, all micro-batches)
                to divide by when no ``expected_batch_size`` is set (a public constant: never
                a realized count of Poisson-sampled examples); ignored otherwise.
        """
        if not self.built:
            self.build(variables)
        variables = list(variables)
        if self.expected_batch_size is None and batch_normalizer is None:
            raise ValueError("apply_private needs batch_normalizer (the global logical batch "
                             "size) when the optimizer has no expected_batch_size.")
        normalizer = (tf.constant(self.expected_batch_size, tf.float32)
                      if self.expected_batch_size is not None
                      else tf.cast(batch_normalizer, tf.float32))
        sums = [tf.cast(s, tf.float32) for s in clipped_sums]
        completes_step = (True if self.dp_accumulation_steps == 1 else
                          tf.equal((self._micro_steps + 1) % self.dp_accumulation_steps, 0))
        context = tf.distribute.get_replica_context()
        if not tf.distribute.has_strategy() or context is None:
            # One device (or cross-replica context): the sums are the global sums.
            self._update(self._add_noise(sums, variables, completes_step), variables, normalizer)
            return
        sums = self._add_noise(sums, variables, _and(completes_step, is_first_replica(context)))
        sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)

        def update_copy(_, sums, normalizer):
            # Runs once per replica device with that device's (identical) reduced sums; every
            # optimizer and model variable read or assigned here is that device's copy.
            self._update(list(sums), variables, normalizer)
            return tf.constant(0)

        tf.distribute.get_strategy().extended.update(
            self._micro_steps.value, update_copy, args=(sums, normalizer), group=False)

    def _add_noise(self, sums, variables, when):
        """``sums`` plus N(0, (sigma*C)^2) noise drawn from the current key when ``when``."""
        self.noise_stddev  # noqa: B018 -- raises now, at tracing, if sigma was never set

        def noisy():
            noise, _ = gaussian_noise([v.shape for v in variables],
                                      self._noise_stddev_variable.value, self._seed.value)
            return [s + n for s, n in zip(sums, noise)]

        if when is True:
            return noisy()
        if when is False:
            return sums
        return tf.cond(when, noisy, lambda: [tf.identity(s) for s in sums])

    def _update(self, sums, variables, normalizer) -> None:
        """Accumulates global (already noisy on a step's last micro-batch) sums; steps."""
        self._micro_steps.assign_add(1)
        if self.dp_accumulation_steps == 1:
            self._noisy_step(sums, variables, normalizer)
            return
        for acc, g in zip(self._accumulators, sums):
            acc.assign_add(tf.cast(g, acc.dtype))

        def step():
            self._noisy_step([acc.value for acc in self._accumulators], variables, normalizer)
            for acc in self._accumulators:
                acc.assign(tf.zeros_like(acc))

        is_last = tf.equal(self._micro_steps % self.dp_accumulation_steps, 0)
        tf.cond(is_last, lambda: (step(), tf.constant(True))[1], lambda: tf.constant(False))

    def _noisy_step(self, noisy_sums, variables, normalizer) -> None:
        """Advances the noise key and takes the wrapped optimizer's step with the noisy
        average."""
        _, next_seed = split_noise_seed(self._seed.value, len(variables))
        self._seed.assign(next_seed)
        grads = [tf.cast(s, tf.float32) / normalizer for s in noisy_sums]
        grads = [tf.cast(g, v.dtype) for g, v in zip(grads, variables)]
        super().apply(grads, variables)  # the wrapped update, bypassing the guard above
        self.averages.update(self.iterations, variables)

    # The gradients handed to the wrapped update are already the global noisy average (all-reduced
    # in `apply_private`) and the update runs on each replica's own copy of the variables: the
    # TensorFlow backend's versions of these two would all-reduce them again (doubling them)
    # and need a replica context. Use the backend-independent ones.
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        _keras_compat.backend_free_update_step(self, grads, trainable_variables, learning_rate)

    def _apply_weight_decay(self, variables):
        _keras_compat.backend_free_weight_decay(self, variables)

    def get_config(self):
        config = super().get_config()
        config.update(l2_norm_clip=self.l2_norm_clip, noise_multiplier=self.noise_multiplier,
                      rescale_to_unit_norm=self.rescale_to_unit_norm,
                      gradient_accumulation_steps=self.dp_accumulation_steps,
                      expected_batch_size=self.expected_batch_size, noise_seed=self.noise_seed,
                      weight_averages=self.averages.to_config())
        return config


_DP_CLASSES: dict[type, type] = {}


def dp_optimizer_class(optimizer_class: type) -> type:
    """The `DPOptimizer` subclass ``DP<Name>`` of a Keras optimizer class, made and registered
    for saving once (``DPSGD`` for `keras.optimizers.SGD`).

    Call it on your own optimizer class before ``keras.models.load_model`` reads a model
    saved with it (classes of ``keras.optimizers`` are registered on import).

    Example:
        >>> DPAdam = dp_optimizer_class(keras.optimizers.Adam)
        >>> opt = DPAdam(learning_rate=1e-3, l2_norm_clip=1.0, noise_multiplier=1.0)
    """
    if not (isinstance(optimizer_class, type)
            and issubclass(optimizer_class, keras.optimizers.Optimizer)):
        raise TypeError(f"dp_optimizer_class takes a Keras optimizer class, got "
                        f"{optimizer_class!r}.")
    if issubclass(optimizer_class, DPOptimizer):
        raise TypeError(f"{optimizer_class.__name__} is already differentially private.")
    if issubclass(optimizer_class, keras.optimizers.LossScaleOptimizer):
        raise TypeError("LossScaleOptimizer scales the loss of the whole batch; DP training "
                        "computes per-example gradients and needs no loss scaling for "
                        "float32 variables: wrap the inner optimizer instead.")
    if optimizer_class not in _DP_CLASSES:
        name = f"DP{optimizer_class.__name__}"
        if not optimizer_class.__module__.startswith("keras"):
            name = f"DP{optimizer_class.__module__.replace('.', '_')}_{optimizer_class.__name__}"
        cls = type(name, (DPOptimizer, optimizer_class), {"__module__": __name__,
                                                          "__doc__": DPOptimizer.__doc__})
        _DP_CLASSES[optimizer_class] = keras.saving.register_keras_serializable(
            package="dp_keras_scale", name=name)(cls)
    return _DP_CLASSES[optimizer_class]


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class DPSGD(DPOptimizer, keras.optimizers.SGD):
    """DP-SGD (De et al. 2022): the noisy average of clipped per-example gradients, then SGD.

    `DPOptimizer` around `keras.optimizers.SGD` (momentum, Nesterov and weight decay are
    post-processing of the noisy average); ``DPOptimizer(keras.optimizers.SGD(...), ...)``
    gives the same class.

    Args:
        learning_rate, momentum, nesterov: as `keras.optimizers.SGD`.
        **kwargs: the DP settings of `DPOptimizer` (``l2_norm_clip``, ``noise_multiplier``,
            ``rescale_to_unit_norm``, ``gradient_accumulation_steps``,
            ``expected_batch_size``, ``noise_seed``) and SGD's other arguments.

    Example:
        >>> opt = DPSGD(learning_rate=2.0, l2_norm_clip=1.0, noise_multiplier=3.0,
        ...             rescale_to_unit_norm=True)
        >>> model.compile(optimizer=opt, loss=..., metrics=["accuracy"])
    """

    def __init__(self, learning_rate=0.01, momentum: float = 0.0, nesterov: bool = False,
                 name: str = "DPSGD", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
                         name=name, **kwargs)


_DP_CLASSES[keras.optimizers.SGD] = DPSGD
for _optimizer_class in vars(keras.optimizers).values():     # registered for load_model
    if (isinstance(_optimizer_class, type) and _optimizer_class is not keras.optimizers.Optimizer
            and issubclass(_optimizer_class, keras.optimizers.Optimizer)
            and not issubclass(_optimizer_class, keras.optimizers.LossScaleOptimizer)):
        dp_optimizer_class(_optimizer_class)
