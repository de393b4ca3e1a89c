"""Keras callbacks for DP training: `PrivacyBudget` (epsilon, budget stop, calibration) and
parameter averaging (`EMA`, `Polyak`, `averaged_weights`, defined in `dks.averaging`)."""

from __future__ import annotations

import math
from typing import Any, Optional

import keras

from dp_keras_scale import accounting
from dp_keras_scale.averaging import EMA, Polyak, averaged_weights

__all__ = ["EMA", "Polyak", "PrivacyBudget", "averaged_weights"]


class PrivacyBudget(keras.callbacks.Callback):
    """Tracks the privacy spent by DP training and stops it before it exceeds a budget.

    It reads sigma from ``model.optimizer.noise_multiplier`` and the number of logical
    (noisy) DP-SGD steps from ``model.optimizer.iterations`` (`dp_keras_scale.DPSGD` counts
    one iteration per noisy step, whatever the gradient accumulation).

    * At the end of every epoch it writes ``logs["epsilon"]``, so ``History``, the progress
      bar, ``TensorBoard`` and ``CSVLogger`` show it. Keras runs callbacks in list order
      and appends its own ``History`` / ``ProgbarLogger`` after yours, so those always see
      it; put ``PrivacyBudget`` BEFORE ``TensorBoard``, ``CSVLogger``, ``EarlyStopping``,
      ``ModelCheckpoint`` or your own ``ProgbarLogger`` in the ``callbacks`` list.
    * With ``planned_steps``: training stops when the optimizer reaches that many logical
      steps, so a run resumed from a checkpoint (``keras.callbacks.BackupAndRestore`` restarts
      the interrupted epoch) ends at the same step count, hence the same epsilon, as an
      uninterrupted one.
    * With ``target_epsilon`` and ``planned_steps`` and an uncalibrated
      ``DPSGD(noise_multiplier=None)``: at train begin it sets the optimizer's noise
      multiplier to the smallest sigma for which ``planned_steps`` spend ``target_epsilon``
      (`accounting.calibrate_noise_multiplier`).
    * With ``target_epsilon``: at train begin it computes once how many steps fit in the
      budget (`accounting.calibrate_steps`) and raises ``ValueError`` if ``planned_steps``
      does not fit; after every batch it compares integers and sets
      ``model.stop_training`` when one more step would exceed the budget. With
      ``steps_per_execution=k`` Keras reports only every k batches, so it stops when the
      next k steps could exceed the budget (up to k - 1 steps early, never late).

    Args:
        delta: target delta, much smaller than 1 / dataset_size.
        sampling_rate: q = expected batch size / dataset size. If None, it is taken from
            the optimizer's ``expected_batch_size`` divided by ``dataset_size``.
        dataset_size: number of training examples N (required for ``sampling="fixed"``).
        target_epsilon: privacy budget; None only logs epsilon.
        planned_steps: total logical steps the run will reach (the final value of
            ``optimizer.iterations``, counting steps of earlier ``fit`` calls); checked
            against the budget before any step.
        accountant: "pld" (tighter) or "rdp" (required for ``sampling="fixed"``).
        sampling: "poisson" or "fixed", as in `accounting.epsilon`. It must describe how
            batches were really drawn.
        verbose: 0 silent, 1 prints the budget at train begin and why training stopped.

    Example:
        >>> budget = PrivacyBudget(delta=1e-5, sampling_rate=4096 / 50_000,
        ...                        dataset_size=50_000, target_epsilon=8.0)
        >>> model.fit(train_ds, epochs=100, callbacks=[budget, keras.callbacks.TensorBoard()])
        >>> budget.epsilon_now
    """

    def __init__(
        self,
        delta: float,
        sampling_rate: Optional[float] = None,
        dataset_size: Optional[int] = None,
        target_epsilon: Optional[float] = None,
        planned_steps: Optional[int] = None,
        accountant: accounting.Accountant = "pld",
        sampling: accounting.Sampling = "poisson",
        verbose: int = 1,
    ):
        super().__init__()
        # Validate everything we can now (the noise multiplier is read at train begin).
        n = accounting._check_dataset_size(dataset_size)
        if sampling_rate is None and n is None:
            raise ValueError(
                "PrivacyBudget needs sampling_rate (expected batch size / dataset size), "
                "or dataset_size so it can use the optimizer's expected_batch_size."
            )
        _, q, delta, accountant, sampling, n = accounting._check_common(
            None, 1.0 / n if sampling_rate is None else sampling_rate, delta, accountant,
            sampling, n,
        )
        self.delta = delta
        self.sampling_rate = None if sampling_rate is None else q
        self.dataset_size = n
        self.target_epsilon = (
            None if target_epsilon is None else accounting._check_target_epsilon(target_epsilon)
        )
        self.planned_steps = (
            None if planned_steps is None else accounting._check_steps(planned_steps,
                                                                       "planned_steps")
        )
        self.accountant = accountant
        self.sampling = sampling
        self.verbose = int(verbose)
        self.max_steps: Optional[int] = None  # steps within budget, set at train begin
        self.stopped_by_budget = False
        self._sigma: Optional[float] = None
        self._q: Optional[float] = self.sampling_rate
        # Per-batch work only matters with a budget or a plan; otherwise Keras may dispatch
        # asynchronously.
        self.async_safe = self.target_epsilon is None and self.planned_steps is None

    @property
    def can_calibrate(self) -> bool:
        """Whether it can set an uncalibrated optimizer's noise multiplier at train begin."""
        return self.target_epsilon is not None and self.planned_steps is not None

    def _calibrate_noise_multiplier(self) -> None:
        """Sets ``DPSGD(noise_multiplier=None)`` so that the plan spends the target."""
        optimizer = self._optimizer()
        if getattr(optimizer, "noise_multiplier", 0.0) is not None:
            return
        if not self.can_calibrate:
            raise ValueError(
                "The optimizer has noise_multiplier=None: give PrivacyBudget both "
                "target_epsilon and planned_steps so it can calibrate sigma.")
        sigma = accounting.calibrate_noise_multiplier(
            self.target_epsilon, self._q, self.planned_steps, self.delta, self.accountant,
            self.sampling, self.dataset_size)
        optimizer.noise_multiplier = sigma
        if self.verbose:
            print(f"PrivacyBudget: calibrated noise_multiplier = {sigma:.4g} so that "
                  f"{self.planned_steps} steps at sampling_rate {self._q:g} spend epsilon "
                  f"{self.target_epsilon:g} at delta {self.delta:g} "
                  f"({self.accountant.upper()}).")

    # ------------------------------------------------------------------ model state

    def _optimizer(self) -> Any:
        model = getattr(self, "_model", None)
        if model is None or getattr(model, "optimizer", None) is None:
            raise RuntimeError(
                "PrivacyBudget is not attached to a compiled model; pass it to "
                "model.fit(callbacks=[...]) (or call set_model) first."
            )
        return model.optimizer

    def _read_sigma(self) -> float:
        optimizer = self._optimizer()
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # e.g. a LossScaleOptimizer
        if getattr(inner, "noise_multiplier", 0.0) is None:
            raise ValueError(
                "The optimizer's noise_multiplier is None (not calibrated yet): it is set when "
                "training starts with PrivacyBudget(target_epsilon=..., planned_steps=...).")
        sigma = getattr(inner, "noise_multiplier", None)
        if sigma is None:
            raise ValueError(
                "PrivacyBudget needs a DP optimizer with a `noise_multiplier` attribute, "
                "such as dp_keras_scale.DPSGD; the model's optimizer "
                f"{type(self._optimizer()).__name__} has none."
            )
        return accounting._check_noise_multiplier(float(sigma))

    def _read_steps(self) -> int:
        return int(self._optimizer().iterations)

    def _resolve_sampling_rate(self) -> float:
        if self.sampling_rate is not None:
            return self.sampling_rate
        batch = getattr(self._optimizer(), "expected_batch_size", None)
        if batch is None:
            raise ValueError(
                "PrivacyBudget has no sampling_rate and the optimizer has no "
                "expected_batch_size; pass sampling_rate=batch_size / dataset_size."
            )
        q = float(batch) / self.dataset_size
        _, q, *_ = accounting._check_common(
            None, q, self.delta, self.accountant, self.sampling, self.dataset_size
        )
        return q

    def _epsilon(self, steps: int) -> float:
        return accounting.epsilon(
            self._sigma, self._q, steps, self.delta, self.accountant, self.sampling,
            self.dataset_size,
        )

    def _check_sigma_unchanged(self) -> None:
        sigma = self._read_sigma()
        if sigma != self._sigma:
            raise ValueError(
                f"The optimizer's noise_multiplier changed during training ({self._sigma:g} "
                f"-> {sigma:g}). PrivacyBudget accounts a constant noise multiplier; keep it "
                "fixed for the whole run."
            )

    @property
    def epsilon_now(self) -> float:
        """Epsilon spent by the optimizer's steps so far (0.0 before the first step)."""
        if self._sigma is None:
            self._sigma = self._read_sigma()
        if self._q is None:
            self._q = self._resolve_sampling_rate()
        return self._epsilon(self._read_steps())

    # ------------------------------------------------------------------ callback hooks

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self._q = self._resolve_sampling_rate()
        self._calibrate_noise_multiplier()
        self._sigma = self._read_sigma()
        self.stopped_by_budget = False
        done = self._read_steps()
        if self.target_epsilon is None:
            if self.verbose and self.planned_steps is not None:
                print(f"PrivacyBudget: {self.planned_steps} planned steps will spend epsilon "
                      f"= {self._epsilon(self.planned_steps):.4g} at delta = {self.delta:g}.")
            return
        target = self.target_epsilon
        try:
            self.max_steps = accounting.calibrate_steps(
                target, self._sigma, self._q, self.delta, self.accountant, self.sampling,
                self.dataset_size,
            )
        except ValueError as err:
            raise ValueError(f"PrivacyBudget: no training is possible within budget. {err}") \
                from None
        if done > self.max_steps:
            raise ValueError(
                f"PrivacyBudget: the optimizer has already taken {done} steps, which spend "
                f"epsilon = {self._epsilon(done):.4g} > target_epsilon = {target:g}. "
                "No further training fits in this budget."
            )
        if self.planned_steps is not None and self.planned_steps > self.max_steps:
            raise ValueError(
                f"PrivacyBudget: planned_steps={self.planned_steps} would spend epsilon = "
                f"{self._epsilon(self.planned_steps):.4g} > target_epsilon = {target:g} "
                f"(noise_multiplier={self._sigma:g}, sampling_rate={self._q:g}, "
                f"delta={self.delta:g}, {self.accountant.upper()} accountant). At most "
                f"{self.max_steps} steps fit: train fewer steps/epochs, or raise the noise "
                "multiplier (accounting.calibrate_noise_multiplier gives the one you need)."
            )
        if self.verbose:
            print(f"PrivacyBudget: target epsilon {target:g} at delta {self.delta:g} allows "
                  f"{self.max_steps} steps (noise_multiplier={self._sigma:g}, "
                  f"sampling_rate={self._q:g}, {self.accountant.upper()}); {done} done.")

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        if self.planned_steps is not None and not self.model.stop_training:
            if self._read_steps() >= self.planned_steps:
                self.model.stop_training = True
                if self.verbose:
                    print(f"\nPrivacyBudget: reached the {self.planned_steps} planned steps.")
        if self.max_steps is None or self.target_epsilon is None:
            return
        self._check_sigma_unchanged()
        steps = self._read_steps()
        lookahead = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        if steps + lookahead > self.max_steps and not self.model.stop_training:
            self.model.stop_training = True
            self.stopped_by_budget = True
            if self.verbose:
                print(f"\nPrivacyBudget: stopping after {steps} steps (epsilon = "
                      f"{self._epsilon(steps):.4g}): {self.max_steps + 1} steps would spend "
                      f"epsilon = {self._epsilon(self.max_steps + 1):.4g} > target "
                      f"{self.target_epsilon:g} at delta {self.delta:g}.")

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if self._sigma is None:  # on_train_begin not called (manual use)
            self._sigma = self._read_sigma()
            self._q = self._resolve_sampling_rate()
        self._check_sigma_unchanged()
        if logs is not None:
            logs["epsilon"] = self._epsilon(self._read_steps())

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        if self.verbose and self._sigma is not None:
            steps = self._read_steps()
            eps = self._epsilon(steps)
            shown = "inf (no noise: not private)" if math.isinf(eps) else f"{eps:.4g}"
            print(f"PrivacyBudget: {steps} steps, epsilon = {shown} at delta = {self.delta:g} "
                  f"({self.accountant.upper()}, {self.sampling} sampling).")
