"""The privacy ledger: what DP-SGD actually spent, as segments of constant settings.

A run's epsilon must describe every noisy step that ran, with the noise multiplier and
sampling rate each step really used. `DPSGD` keeps a `PrivacyLedger`: a list of closed
`Segment` s (noise multiplier, sampling rate, steps) plus the open segment that the steps of
the optimizer's ``iterations`` counter are currently added to. A segment closes whenever a
setting that the accountant needs changes (``noise_multiplier`` set between fits, a sampling
rate described by `dks.callbacks.PrivacyBudget`), when the model is recompiled with a new
optimizer (the new one carries the old ledger over), and when it is saved: checkpoints and
``model.save`` files store the closed list, and a restore reopens at the restored step count.

`dks.accounting.composed_epsilon` composes the segments with dp_accounting (heterogeneous
composition); `PrivacyBudget`, the run directory's privacy statement and the CLI read it.

Example:
    >>> ledger = PrivacyLedger()
    >>> ledger.update(0, noise_multiplier=0.5, sampling_rate=0.01)
    >>> ledger.update(20, noise_multiplier=50.0)           # 20 steps ran at sigma 0.5
    >>> [(s.noise_multiplier, s.steps) for s in ledger.spent(40)]
    [(0.5, 20), (50.0, 20)]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

import numpy as np

__all__ = ["Segment", "PrivacyLedger"]

_FIELDS = ("noise_multiplier", "sampling_rate", "expected_batch_size", "deterministic_noise")


@dataclasses.dataclass(frozen=True)
class Segment:
    """``steps`` consecutive noisy steps run with the same settings.

    Attributes:
        noise_multiplier: sigma (noise std / clip norm) of these steps.
        steps: number of logical (noisy) steps.
        sampling_rate: q, when the training loop described it (`PrivacyBudget` does); None
            until then (`PrivacyLedger.resolved` derives it from ``expected_batch_size``).
        expected_batch_size: the optimizer's expected logical batch size (None: fixed-size).
        deterministic_noise: the noise came from a user-given seed (``DPSGD(noise_seed=...)``),
            so whoever holds the seed can regenerate it: such steps have no guarantee.
    """

    noise_multiplier: float
    steps: int
    sampling_rate: Optional[float] = None
    expected_batch_size: Optional[float] = None
    deterministic_noise: bool = False

    def settings(self) -> tuple:
        return tuple(getattr(self, name) for name in _FIELDS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PrivacyLedger:
    """Closed segments plus the open one (settings and the step count at which it opened).

    Steps are counted by the caller's step counter (``optimizer.iterations``), passed to
    every method as ``iterations``; the ledger never counts steps itself.
    """

    def __init__(self, segments: Iterable[Segment] = ()):
        self._closed: list[Segment] = list(segments)
        self._settings: dict = {name: None for name in _FIELDS}
        self._settings["deterministic_noise"] = False
        self._mark = 0

    # -- recording ---------------------------------------------------------------------------

    def update(self, iterations: int, **settings) -> None:
        """Changes settings of the open segment; closes it first if steps ran since it opened.

        Args:
            iterations: the step counter now.
            **settings: any of ``noise_multiplier``, ``sampling_rate``,
                ``expected_batch_size``, ``deterministic_noise``.
        """
        unknown = set(settings) - set(_FIELDS)
        if unknown:
            raise TypeError(f"Unknown ledger settings {sorted(unknown)}; known: {_FIELDS}.")
        new = {**self._settings, **settings}
        if new == self._settings:
            return
        self._close(iterations)
        self._settings = new

    def _close(self, iterations: int) -> None:
        steps = int(iterations) - self._mark
        if steps < 0:
            raise RuntimeError(f"The step counter went back from {self._mark} to {iterations}: "
                               "the ledger cannot tell which steps ran.")
        if steps:
            if self._settings["noise_multiplier"] is None:   # pragma: no cover - DPSGD refuses
                raise RuntimeError("Steps ran with no noise multiplier set.")
            self._closed.append(Segment(steps=steps, **self._settings))
        self._mark = int(iterations)

    def restore(self, segments: Iterable[Segment], iterations: int) -> None:
        """Makes ``segments`` the whole spent history and reopens at ``iterations``: after a
        checkpoint restore (its saved history, its restored counter) or in a new optimizer
        that carries an old one's history over (its counter, usually 0)."""
        self._closed = list(segments)
        self._mark = int(iterations)

    # -- reading -----------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        """The open segment's settings."""
        return dict(self._settings)

    def spent(self, iterations: int) -> list[Segment]:
        """Every segment so far, the open one counted up to ``iterations``; neighbours with
        equal settings are merged."""
        open_steps = int(iterations) - self._mark
        segments = list(self._closed)
        if open_steps > 0:
            segments.append(Segment(steps=open_steps, **self._settings))
        merged: list[Segment] = []
        for seg in segments:
            if merged and merged[-1].settings() == seg.settings():
                seg = dataclasses.replace(seg, steps=merged.pop().steps + seg.steps)
            merged.append(seg)
        return merged

    @staticmethod
    def resolved(segments: Iterable[Segment], dataset_size: Optional[int] = None,
                 sampling_rate: Optional[float] = None) -> list[Segment]:
        """``segments`` with every unknown sampling rate filled in: the segment's own
        ``expected_batch_size / dataset_size`` when it recorded one (what its steps ran
        with), else ``sampling_rate`` (the current run's q, e.g. for fixed-size batches).

        Raises:
            ValueError: when a segment's rate cannot be derived (fixed-size batches without a
                stated sampling rate).
        """
        out = []
        for seg in segments:
            q = seg.sampling_rate
            if q is None and seg.expected_batch_size is not None and dataset_size:
                q = seg.expected_batch_size / dataset_size
            if q is None:
                q = sampling_rate
            if q is None:
                raise ValueError(
                    f"{seg.steps} steps at noise_multiplier {seg.noise_multiplier:g} have no "
                    "known sampling rate: pass sampling_rate (batch size / dataset size), or "
                    "dataset_size with DPSGD(expected_batch_size=...).")
            out.append(dataclasses.replace(seg, sampling_rate=float(q)))
        return out

    # -- saving ------------------------------------------------------------------------------

    @staticmethod
    def to_array(segments: Iterable[Segment]) -> np.ndarray:
        """Segments as a float64 array [n, 5] (NaN for unknown values), for weight files."""
        rows = [[s.noise_multiplier, s.steps,
                 math.nan if s.sampling_rate is None else s.sampling_rate,
                 math.nan if s.expected_batch_size is None else s.expected_batch_size,
                 float(s.deterministic_noise)] for s in segments]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 5)

    @staticmethod
    def from_array(array) -> list[Segment]:
        """Inverse of `to_array`."""
        def known(x):
            return None if math.isnan(x) else float(x)
        return [Segment(noise_multiplier=float(r[0]), steps=int(r[1]), sampling_rate=known(r[2]),
                        expected_batch_size=known(r[3]), deterministic_noise=bool(r[4]))
                for r in np.asarray(array, dtype=np.float64).reshape(-1, 5)]
