"""Keras callbacks for DP training: `PrivacyBudget` (epsilon, budget stop, calibration) and
parameter averaging (`EMA`, `Polyak`, `averaged_weights`, defined in `dks.averaging`)."""

from __future__ import annotations

import math
from typing import Any, Optional

import keras

from dp_keras_scale import accounting
from dp_keras_scale.averaging import EMA, Polyak, averaged_weights
from dp_keras_scale.ledger import PrivacyLedger

__all__ = ["EMA", "Polyak", "PrivacyBudget", "averaged_weights"]


class PrivacyBudget(keras.callbacks.Callback):
    """Tracks the privacy spent by DP training and stops it before it exceeds a budget.

    It reads the optimizer's privacy ledger (`dp_keras_scale.DPSGD.spent`): the logical
    (noisy) steps taken, with the noise multiplier and sampling rate of each, across every
    ``fit``, recompile and checkpoint restore, and composes them with dp_accounting. A
    noise multiplier changed between fits (or by a callback) is accounted step by step.

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
        planned_steps: total logical steps the run will reach (all steps in the ledger,
            counting earlier ``fit`` calls); checked against the budget before any step. A
            ``fit`` that starts with the plan already done is refused (Keras would take one
            step before a callback can stop it).
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
        done = self._read_steps()
        if done >= self.planned_steps:
            raise ValueError(self._plan_done_message(done))
        sigma = accounting.calibrate_noise_multiplier(
            self.target_epsilon, self._q, self.planned_steps - done, self.delta,
            self.accountant, self.sampling, self.dataset_size, spent=self._spent())
        optimizer.noise_multiplier = sigma
        if self.verbose:
            print(f"PrivacyBudget: calibrated noise_multiplier = {sigma:.4g} so that "
                  f"{self.planned_steps} steps at sampling_rate {self._q:g} spend epsilon "
                  f"{self.target_epsilon:g} at delta {self.delta:g} "
                  f"({self.accountant.upper()}).")

    # ------------------------------------------------------------------ model state

    def _optimizer(self) -> Any:
        model = self.model
        if model is None or getattr(model, "optimizer", None) is None:
            raise RuntimeError(
                "PrivacyBudget is not attached to a compiled model; pass it to "
                "model.fit(callbacks=[...]) (or call set_model) first."
            )
        optimizer = model.optimizer
        if not hasattr(optimizer, "spent"):
            raise ValueError(
                "PrivacyBudget needs a DP optimizer that keeps a privacy ledger, such as "
                f"dp_keras_scale.DPSGD; the model's optimizer {type(optimizer).__name__} "
                "has none.")
        return optimizer

    def _read_sigma(self) -> float:
        sigma = self._optimizer().noise_multiplier
        if sigma is None:
            raise ValueError(
                "The optimizer's noise_multiplier is None (not calibrated yet): it is set when "
                "training starts with PrivacyBudget(target_epsilon=..., planned_steps=...).")
        return accounting._check_noise_multiplier(float(sigma))

    def spent(self) -> list:
        """The optimizer's ledger (`dks.ledger.Segment` s), every sampling rate known."""
        if self._q is None:
            self._q = self._resolve_sampling_rate()
        return PrivacyLedger.resolved(self._optimizer().spent(), self.dataset_size, self._q)

    def _spent(self) -> tuple:
        return tuple((s.noise_multiplier, s.sampling_rate, s.steps) for s in self.spent())

    def _read_steps(self) -> int:
        """Logical steps in the ledger: every fit, recompile and restore included."""
        return sum(s.steps for s in self._optimizer().spent())

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

    def _epsilon_after(self, more_steps: int = 0) -> float:
        """Epsilon of the ledger followed by ``more_steps`` steps at the current settings."""
        return accounting._epsilon(
            self._sigma, self._q, more_steps, self.delta, self.accountant, self.sampling,
            self.dataset_size, self._spent())

    @property
    def epsilon_now(self) -> float:
        """Epsilon spent by every step in the optimizer's ledger (0.0 before the first)."""
        return accounting._composed_epsilon(self._spent(), self.delta, self.accountant,
                                            self.sampling, self.dataset_size)

    def statement(self, l2_norm_clip: float, augmult: int = 1) -> accounting.PrivacyStatement:
        """The privacy statement of every step in the ledger (`accounting.privacy_statement`).

        Example:
            >>> print(budget.statement(l2_norm_clip=1.0, augmult=16))
        """
        return accounting.ledger_statement(
            self.spent(), self.delta, l2_norm_clip, dataset_size=self.dataset_size,
            sampling=self.sampling, augmult=augmult, accountant=self.accountant)

    def _plan_done_message(self, done: int) -> str:
        return (f"PrivacyBudget: the optimizer has already taken {done} steps, the "
                f"{self.planned_steps} planned (epsilon = {self.epsilon_now:.4g}). Keras would "
                "take one more step before any callback could stop it: raise planned_steps "
                "(its epsilon is checked against the target), or stop here.")

    def _steps_that_fit(self) -> int:
        """Steps that still fit in the target after the ledger, at the current sigma."""
        try:
            return accounting.calibrate_steps(
                self.target_epsilon, self._sigma, self._q, self.delta, self.accountant,
                self.sampling, self.dataset_size, spent=self._spent())
        except ValueError as err:
            done = self._read_steps()
            spent = (f" The {done} steps already taken spend epsilon = "
                     f"{self.epsilon_now:.4g}." if done else "")
            raise ValueError(f"PrivacyBudget: no training is possible within budget.{spent} "
                             f"{err}") from None

    # ------------------------------------------------------------------ callback hooks

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self._q = self._resolve_sampling_rate()
        self._optimizer().describe_sampling(self._q)
        self._calibrate_noise_multiplier()
        self._sigma = self._read_sigma()
        self.stopped_by_budget = False
        done = self._read_steps()
        if self.planned_steps is not None and done >= self.planned_steps:
            raise ValueError(self._plan_done_message(done))
        if self.target_epsilon is None:
            if self.verbose and self.planned_steps is not None:
                print(f"PrivacyBudget: {self.planned_steps} planned steps will spend epsilon "
                      f"= {self._epsilon_after(self.planned_steps - done):.4g} at delta = "
                      f"{self.delta:g}.")
            return
        target = self.target_epsilon
        self.max_steps = done + self._steps_that_fit()
        if self.planned_steps is not None and self.planned_steps > self.max_steps:
            raise ValueError(
                f"PrivacyBudget: planned_steps={self.planned_steps} would spend epsilon = "
                f"{self._epsilon_after(self.planned_steps - done):.4g} > target_epsilon = "
                f"{target:g} (noise_multiplier={self._sigma:g}, sampling_rate={self._q:g}, "
                f"delta={self.delta:g}, {self.accountant.upper()} accountant"
                + (f", after the {done} steps already taken" if done else "") + "). At most "
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
        steps = self._read_steps()
        sigma = self._read_sigma()
        if sigma != self._sigma:      # changed by a callback: the ledger has the old steps
            self._sigma = sigma
            self.max_steps = steps + self._steps_that_fit()
        lookahead = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        if steps + lookahead > self.max_steps and not self.model.stop_training:
            self.model.stop_training = True
            self.stopped_by_budget = True
            if self.verbose:
                print(f"\nPrivacyBudget: stopping after {steps} steps (epsilon = "
                      f"{self.epsilon_now:.4g}): {self.max_steps + 1} steps would spend "
                      f"epsilon = {self._epsilon_after(self.max_steps + 1 - steps):.4g} > "
                      f"target {self.target_epsilon:g} at delta {self.delta:g}.")

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if logs is not None:
            logs["epsilon"] = self.epsilon_now

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        if self.verbose and self._sigma is not None:
            steps = self._read_steps()
            eps = self.epsilon_now
            shown = "inf (no noise: not private)" if math.isinf(eps) else f"{eps:.4g}"
            print(f"PrivacyBudget: {steps} steps, epsilon = {shown} at delta = {self.delta:g} "
                  f"({self.accountant.upper()}, {self.sampling} sampling).")
