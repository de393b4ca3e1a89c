"""Privacy accounting for DP-SGD: epsilon, calibration and an honest privacy statement.

Every number here comes from Google's ``dp_accounting`` library (RDP and PLD accountants);
this module only builds the right ``DpEvent`` for the sampling that actually happened,
validates inputs and searches over sigma / steps.

Two sampling schemes are supported, and they are never mixed up:

* ``"poisson"`` (default): at every step each example joins the batch independently with
  probability ``q``. Neighbouring datasets differ by adding or removing one example
  (``NeighboringRelation.ADD_OR_REMOVE_ONE``). Event:
  ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``, self-composed ``steps`` times.
  Both the RDP and the PLD accountant support it; PLD is tighter.
* ``"fixed"``: at every step a fresh batch of exactly ``b = round(q * N)`` examples is drawn
  uniformly WITHOUT replacement from the ``N`` examples. dp_accounting 0.6 supports this only
  in the RDP accountant and only with ``NeighboringRelation.REPLACE_ONE`` (neighbouring
  datasets have the same size and differ in one example). Replacing one example moves the
  sum of clipped gradients by up to ``2 * C``, so the Gaussian event gets the noise
  multiplier ``sigma / 2`` (dp_accounting's ``GaussianDpEvent`` wants std / sensitivity).
  Event: ``SampledWithoutReplacementDpEvent(N, b, GaussianDpEvent(sigma / 2))``.

``noise_multiplier == 0`` (no noise) has no DP guarantee: `epsilon` returns ``math.inf``
for any positive number of steps instead of raising, so that a non-private baseline can
still be logged; negative values raise.

Example:
    >>> from dp_keras_scale import accounting
    >>> q, steps = accounting.sampling_schedule(dataset_size=50_000, batch_size=4096, epochs=72)
    >>> round(accounting.epsilon(10.0, q, steps, 1e-5, accountant="rdp"), 2)
    0.99
    >>> sigma = accounting.calibrate_noise_multiplier(8.0, q, steps, 1e-5)
    >>> print(accounting.privacy_statement(sigma, q, steps, 1e-5, l2_norm_clip=1.0,
    ...                                    dataset_size=50_000, augmult=16))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import numbers
import os
import warnings
from typing import Any, Iterator, Literal, Optional

import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
from scipy import optimize

from dp_keras_scale.options import ACCOUNTANTS, SAMPLINGS, check_delta

__all__ = [
    "RDP_ORDERS",
    "RDP_ORDERS_FIXED",
    "PLD_COARSE_DISCRETIZATION",
    "PLD_RELATIVE_DISCRETIZATION",
    "PLD_MIN_DISCRETIZATION",
    "dp_event",
    "neighboring_relation",
    "epsilon",
    "epsilons",
    "composed_epsilon",
    "calibrate_noise_multiplier",
    "calibrate_steps",
    "sampling_schedule",
    "PrivacyStatement",
    "privacy_statement",
    "ledger_statement",
]

Accountant = Literal["pld", "rdp"]
Sampling = Literal["poisson", "fixed"]

_ACCOUNTANTS = ACCOUNTANTS
_SAMPLINGS = SAMPLINGS

#: Renyi orders for Poisson sampling: dp_accounting's defaults plus orders near 1 (large
#: epsilon) and more large orders (small epsilon, e.g. 0.08 is optimal near order 150).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 100 for x in range(1, 10)]
    + [1 + x / 10 for x in range(1, 100)]
    + list(range(11, 64))
    + list(range(64, 256, 8))
    + [256, 320, 384, 512, 768, 1024, 1536, 2048]
)

#: Renyi orders for fixed-size sampling without replacement. dp_accounting evaluates that
#: bound exactly for integer orders <= 256 at a cost growing with the order (fractional
#: orders interpolate the two neighbouring integers), so large orders are kept sparse.
RDP_ORDERS_FIXED: tuple[float, ...] = tuple(
    [1 + x / 10 for x in range(1, 100)]
    + list(range(11, 64))
    + [64, 80, 96, 112, 128, 160, 192, 224, 256, 384, 512, 768, 1024]
)

#: PLD discretization. dp_accounting's PLD is a pessimistic (upper) estimate whose error
#: grows with the grid step ``value_discretization_interval``; a fixed step is either
#: slow (fine grid, small sigma: ~1 s per call at 1e-4) or inaccurate at small epsilon
#: (1e-4 is 31% off at epsilon 0.0045). So we compute epsilon on the coarse grid first and
#: then on a grid of ``PLD_RELATIVE_DISCRETIZATION * coarse_epsilon`` (clamped to
#: [PLD_MIN_DISCRETIZATION, PLD_COARSE_DISCRETIZATION]) and return the smaller of the two
#: upper estimates. Measured against grids 10x finer: relative error <= 0.2% for epsilon
#: from 0.004 to 11 (0.4% at 0.0003), 0.03-0.5 s per call.
PLD_COARSE_DISCRETIZATION: float = 1e-3
PLD_RELATIVE_DISCRETIZATION: float = 1e-4
PLD_MIN_DISCRETIZATION: float = 1e-6

_MAX_SIGMA = 1e4
_MIN_SIGMA = 1e-2
_DEFAULT_MAX_STEPS = 10_000_000

_NOT_COVERED = (
    "User-level privacy: if one person contributes k training examples, their guarantee "
    "degrades with k (group privacy: about k * epsilon, and a much larger delta).",
    "Data used outside this DP-SGD run: pre-training data, public data, and any data used "
    "to choose the model or preprocessing.",
    "Hyperparameter tuning: each training run on the private data spends budget; the "
    "statement covers only this run.",
    "The release of anything computed outside DP-SGD from the private data, e.g. the "
    "training-time metrics loss, accuracy, clipped_fraction and nonfinite_examples (computed "
    "on the private batches without noise), cached backbone features, BatchNorm statistics "
    "gathered in training mode, or checkpoints (they hold optimizer state: clipped gradient "
    "sums before noise, the noise key).",
)


# --------------------------------------------------------------------------- validation


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN.")
    return value


def _check_noise_multiplier(sigma: Any) -> float:
    sigma = _check_real("noise_multiplier", sigma)
    if sigma < 0 or math.isinf(sigma):
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0 (noise std divided by the clip "
            f"norm; 0 means no noise and no privacy), got {sigma}."
        )
    return sigma


def _check_sampling_rate(q: Any) -> float:
    q = _check_real("sampling_rate", q)
    if not 0 < q <= 1:
        raise ValueError(
            f"sampling_rate must be in (0, 1] (expected batch size / dataset size), got {q}. "
            "Use sampling_schedule(dataset_size, batch_size, epochs) to compute it."
        )
    return q


def _check_steps(steps: Any, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {type(steps).__name__} {steps!r}.")
    if isinstance(steps, numbers.Integral):
        steps = int(steps)
    elif math.isfinite(steps) and float(steps).is_integer():
        steps = int(steps)
    else:
        raise ValueError(
            f"{name} must be a whole number of training steps, got {steps}. Round it "
            "(e.g. math.ceil) or use sampling_schedule(...) to compute it."
        )
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps}.")
    return steps


def _check_dataset_size(dataset_size: Any) -> Optional[int]:
    if dataset_size is None:
        return None
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral):
        raise TypeError(
            f"dataset_size must be an integer (number of training examples), got "
            f"{type(dataset_size).__name__} {dataset_size!r}."
        )
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}.")
    return int(dataset_size)


def _check_delta(delta: Any, dataset_size: Optional[int]) -> float:
    delta = check_delta(delta)
    if dataset_size is not None and delta >= 1.0 / dataset_size:
        warnings.warn(
            f"delta={delta:g} is not smaller than 1/dataset_size = {1.0 / dataset_size:g}. "
            "A mechanism that publishes one random training example in full satisfies "
            "(0, 1/N)-DP, so such a delta gives no meaningful protection; choose delta much "
            f"smaller than 1/N (e.g. <= {0.1 / dataset_size:.1g}).",
            UserWarning,
            stacklevel=3,
        )
    return delta


def _check_target_epsilon(target: Any) -> float:
    target = _check_real("target_epsilon", target)
    if not 0 < target < math.inf:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target}.")
    return target


def _fixed_batch_size(q: float, dataset_size: Optional[int]) -> int:
    """Batch size b of fixed-size sampling, checking that q * N is a whole number."""
    if dataset_size is None:
        raise ValueError(
            "sampling='fixed' (fixed-size batches drawn without replacement) needs "
            "dataset_size=N: the accountant depends on N and the batch size b = q * N. "
            "Pass dataset_size, or use sampling='poisson' if batches were Poisson-sampled."
        )
    exact = q * dataset_size
    batch = round(exact)
    if batch < 1 or abs(exact - batch) > 1e-6 * max(1.0, exact):
        raise ValueError(
            f"With sampling='fixed', sampling_rate * dataset_size must be the whole batch "
            f"size, got {q} * {dataset_size} = {exact:.6g}. Pass "
            "sampling_rate=batch_size / dataset_size."
        )
    return batch


def _check_common(
    noise_multiplier: Any,
    sampling_rate: Any,
    delta: Any,
    accountant: Any,
    sampling: Any,
    dataset_size: Any,
) -> tuple[float, float, float, str, str, Optional[int]]:
    accountant = _check_choice("accountant", accountant, _ACCOUNTANTS)
    sampling = _check_choice("sampling", sampling, _SAMPLINGS)
    sigma = None if noise_multiplier is None else _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    n = _check_dataset_size(dataset_size)
    delta = _check_delta(delta, n)
    if sampling == "fixed":
        _fixed_batch_size(q, n)
        if accountant == "pld" and not _pld_supports_fixed():
            raise ValueError(
                "The PLD accountant of dp_accounting "
                f"{_dp_accounting_version()} does not support fixed-size batches sampled "
                "without replacement (SampledWithoutReplacementDpEvent). Use the \"rdp\" "
                "accountant for \"fixed\" sampling (accountant=\"rdp\"; in a config, "
                "privacy.accountant = \"rdp\"), or Poisson sampling, which both accountants "
                "support."
            )
    return sigma, q, delta, accountant, sampling, n


# --------------------------------------------------------------------------- events


def neighboring_relation(sampling: Sampling = "poisson") -> dp_accounting.NeighboringRelation:
    """The neighbouring relation our accounting uses for a sampling scheme.

    Example:
        >>> neighboring_relation("fixed")
        <NeighboringRelation.REPLACE_ONE: 2>
    """
    sampling = _check_choice("sampling", sampling, _SAMPLINGS)
    if sampling == "poisson":
        return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    return dp_accounting.NeighboringRelation.REPLACE_ONE


def dp_event(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    sampling: Sampling = "poisson",
    dataset_size: Optional[int] = None,
) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event describing ``steps`` DP-SGD steps.

    Useful to compose DP-SGD with other mechanisms in your own dp_accounting accountant
    (use `neighboring_relation(sampling)` for it).

    Example:
        >>> event = dp_event(10.0, 4096 / 50_000, 875)
        >>> acc = dp_accounting.rdp.RdpAccountant()
        >>> acc.compose(event).get_epsilon(1e-5)
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    steps = _check_steps(steps)
    sampling = _check_choice("sampling", sampling, _SAMPLINGS)
    n = _check_dataset_size(dataset_size)
    return _make_event(sigma, q, steps, sampling, n)


def _make_event(
    sigma: float, q: float, steps: int, sampling: str, n: Optional[int]
) -> dp_accounting.DpEvent:
    if sampling == "poisson":
        step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    else:
        # Replace-one: sensitivity of the sum of clipped gradients is 2C, so the Gaussian
        # event's noise multiplier (std / sensitivity) is sigma / 2.
        step = dp_accounting.SampledWithoutReplacementDpEvent(
            n, _fixed_batch_size(q, n), dp_accounting.GaussianDpEvent(sigma / 2.0)
        )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _make_accountant(
    accountant: str, sampling: str, pld_discretization: float = PLD_COARSE_DISCRETIZATION
) -> dp_accounting.PrivacyAccountant:
    relation = neighboring_relation(sampling)  # type: ignore[arg-type]
    if accountant == "rdp":
        orders = RDP_ORDERS if sampling == "poisson" else RDP_ORDERS_FIXED
        return dp_rdp.RdpAccountant(orders, relation)
    return dp_pld.PLDAccountant(relation, value_discretization_interval=pld_discretization)


@functools.lru_cache(maxsize=1)
def _pld_supports_fixed() -> bool:
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(1.0)
    )
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_pld.PLDAccountant(relation).supports(event)


def _dp_accounting_version() -> str:
    try:
        return importlib.metadata.version("dp-accounting")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silences dp_accounting's per-order convergence warnings (orders are then skipped)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(
    segments: tuple[tuple[float, float, int], ...], delta: float, accountant: str,
    sampling: str, n: Optional[int],
) -> float:
    """Validated-input epsilon of DP-SGD segments ``(sigma, q, steps)`` run one after another
    (heterogeneous composition), cached (the callback asks for the same values repeatedly)."""
    segments = tuple(seg for seg in segments if seg[2] > 0)
    if not segments:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in segments):
        return math.inf
    events = [_make_event(sigma, q, steps, sampling, n) for sigma, q, steps in segments]
    event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
    with _quiet_absl():
        eps = float(_make_accountant(accountant, sampling).compose(event).get_epsilon(delta))
        if accountant == "pld" and math.isfinite(eps):
            grid = min(PLD_COARSE_DISCRETIZATION,
                       max(PLD_MIN_DISCRETIZATION, PLD_RELATIVE_DISCRETIZATION * eps))
            if grid < PLD_COARSE_DISCRETIZATION:
                fine = _make_accountant(accountant, sampling, grid).compose(event)
                eps = min(eps, float(fine.get_epsilon(delta)))  # both are upper estimates
    return eps


def _epsilon(
    sigma: float, q: float, steps: int, delta: float, accountant: str, sampling: str,
    n: Optional[int], spent: tuple[tuple[float, float, int], ...] = (),
) -> float:
    """Epsilon of ``spent`` followed by ``steps`` steps at (sigma, q)."""
    return _composed_epsilon(spent + ((sigma, q, steps),), delta, accountant, sampling, n)


def _check_spent(spent: Any) -> tuple[tuple[float, float, int], ...]:
    """Validates segments already spent: ``(noise_multiplier, sampling_rate, steps)`` triples
    or objects with those attributes (`dks.ledger.Segment`)."""
    out = []
    for seg in spent or ():
        if hasattr(seg, "noise_multiplier"):
            if getattr(seg, "sampling_rate", None) is None:
                raise ValueError(
                    f"Segment {seg} has no sampling_rate: resolve the ledger with the dataset "
                    "size first (PrivacyLedger.resolved(dataset_size)).")
            seg = (seg.noise_multiplier, seg.sampling_rate, seg.steps)
        sigma, q, steps = seg
        out.append((_check_noise_multiplier(sigma), _check_sampling_rate(q),
                    _check_steps(steps)))
    return tuple(out)


def composed_epsilon(
    segments: Any,
    delta: float,
    accountant: Accountant = "pld",
    sampling: Sampling = "poisson",
    dataset_size: Optional[int] = None,
) -> float:
    """Epsilon of DP-SGD segments run one after another, each with its own noise multiplier
    and sampling rate (dp_accounting's heterogeneous composition, ``ComposedDpEvent``).

    Args:
        segments: ``(noise_multiplier, sampling_rate, steps)`` triples, or the segments of a
            `dks.ledger.PrivacyLedger` (``optimizer.ledger.spent()``), in the order they ran.
        delta, accountant, sampling, dataset_size: as in `epsilon`.

    Example:
        >>> composed_epsilon([(0.5, 0.01, 20), (50.0, 0.01, 20)], 1e-5)  # not eps(50, 40)
    """
    segments = _check_spent(segments)
    _, _, delta, accountant, sampling, n = _check_common(
        None, segments[0][1] if segments else 0.5, delta, accountant, sampling, dataset_size)
    return _composed_epsilon(segments, delta, accountant, sampling, n)


# --------------------------------------------------------------------------- epsilon


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "pld",
    sampling: Sampling = "poisson",
    dataset_size: Optional[int] = None,
) -> float:
    """Epsilon of ``steps`` DP-SGD steps at the given delta.

    Args:
        noise_multiplier: sigma, noise std divided by the clip norm C. 0 gives ``inf``.
        sampling_rate: q = (expected) batch size / dataset size.
        steps: number of logical (noisy) DP-SGD steps. 0 gives 0.0.
        delta: target delta, in (0, 1); should be much smaller than 1 / dataset_size.
        accountant: "pld" (tighter) or "rdp". Fixed-size sampling needs "rdp".
        sampling: "poisson" (add/remove-one) or "fixed" (fixed-size batches without
            replacement, replace-one; needs dataset_size).
        dataset_size: number of training examples N; needed for sampling="fixed" and used
            to warn when delta >= 1/N.

    Example:
        >>> epsilon(10.0, 4096 / 50_000, 875, 1e-5, accountant="rdp")  # paper, ~0.99
    """
    sigma, q, delta, accountant, sampling, n = _check_common(
        noise_multiplier, sampling_rate, delta, accountant, sampling, dataset_size
    )
    steps = _check_steps(steps)
    return _epsilon(sigma, q, steps, delta, accountant, sampling, n)


def epsilons(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    sampling: Sampling = "poisson",
    dataset_size: Optional[int] = None,
) -> dict[str, float]:
    """Epsilon from every accountant that supports the sampling: ``{"rdp": .., "pld": ..}``.

    Fixed-size sampling returns only ``"rdp"`` (dp_accounting's PLD does not support it).

    Example:
        >>> epsilons(10.0, 4096 / 50_000, 875, 1e-5)  # {'rdp': 0.988, 'pld': 0.903}
    """
    sigma, q, delta, _, sampling, n = _check_common(
        noise_multiplier, sampling_rate, delta, "rdp", sampling, dataset_size
    )
    steps = _check_steps(steps)
    out = {"rdp": _epsilon(sigma, q, steps, delta, "rdp", sampling, n)}
    if sampling == "poisson" or _pld_supports_fixed():
        out["pld"] = _epsilon(sigma, q, steps, delta, "pld", sampling, n)
    return out


# --------------------------------------------------------------------------- calibration


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "pld",
    sampling: Sampling = "poisson",
    dataset_size: Optional[int] = None,
    rtol: float = 1e-3,
    spent: Any = (),
) -> float:
    """Smallest noise multiplier sigma whose epsilon is <= ``target_epsilon``.

    The result is within a relative ``rtol`` of the exact smallest sigma and always on the
    safe side: ``epsilon(result, ...) <= target_epsilon``. With ``spent`` (segments already
    run, as in `composed_epsilon`), the ``steps`` new steps come after them and the target
    bounds the composition of all.

    Raises:
        ValueError: if the target cannot be reached with sigma <= 1e4 (lower the steps or
            sampling rate, or raise the target / delta), or if it is met even at sigma=0.01.

    Example:
        >>> calibrate_noise_multiplier(1.0, 4096 / 50_000, 875, 1e-5, accountant="rdp")
        9.88...
    """
    sigma, q, delta, accountant, sampling, n = _check_common(
        None, sampling_rate, delta, accountant, sampling, dataset_size
    )
    target = _check_target_epsilon(target_epsilon)
    steps = _check_steps(steps)
    spent = _check_spent(spent)
    if spent and _composed_epsilon(spent, delta, accountant, sampling, n) >= target:
        raise ValueError(
            f"The steps already taken spend epsilon = "
            f"{_composed_epsilon(spent, delta, accountant, sampling, n):.4g} >= target_epsilon "
            f"= {target:g}: no noise multiplier lets more steps fit in this budget.")
    if steps == 0:
        raise ValueError(
            "steps=0 spends no privacy budget, so any noise multiplier meets the target; "
            "pass the number of training steps you plan to run (steps >= 1)."
        )
    rtol = _check_real("rtol", rtol)
    if not 0 < rtol < 0.1:
        raise ValueError(f"rtol must be in (0, 0.1), got {rtol}.")

    def eps(s: float) -> float:
        return _epsilon(s, q, steps, delta, accountant, sampling, n, spent)

    # Bracket the answer: eps(lo) > target >= eps(hi). PLD at tiny sigma is slow (very wide
    # privacy-loss support), so PLD starts from the cheap RDP answer: PLD being tighter,
    # that sigma normally meets the target and the PLD sigma is a few percent below it.
    start, factor = 1.0, 4.0
    if accountant == "pld" and eps(_MAX_SIGMA) <= target:
        try:
            start = calibrate_noise_multiplier(target, q, steps, delta, "rdp", sampling, n,
                                               rtol=rtol, spent=spent)
            factor = 1.1
        except ValueError:
            pass
    if eps(start) <= target:
        hi = start
        while True:
            lo = max(hi / factor, _MIN_SIGMA)
            if eps(lo) > target:
                break
            if lo <= _MIN_SIGMA:
                raise ValueError(
                    f"target_epsilon={target:g} is met even with noise_multiplier="
                    f"{_MIN_SIGMA:g} (epsilon={eps(_MIN_SIGMA):.4g}); such a target gives "
                    "no meaningful privacy. Choose a smaller target_epsilon (typically 1-10)."
                )
            hi = lo
    else:
        lo = start
        while True:
            hi = min(lo * factor, _MAX_SIGMA)
            if eps(hi) <= target:
                break
            if hi >= _MAX_SIGMA:
                raise ValueError(
                    f"target_epsilon={target:g} is out of reach: even noise_multiplier="
                    f"{_MAX_SIGMA:g} gives epsilon={eps(_MAX_SIGMA):.4g} for {steps} steps "
                    f"at sampling_rate={q:g}, delta={delta:g}. Use fewer steps or a smaller "
                    "sampling rate, or accept a larger target_epsilon or delta."
                )
            lo = hi
    # Brent's method in log-sigma, then step up until safely within the target.
    if hi / lo > 1.0 + rtol:
        root = math.exp(optimize.brentq(
            lambda x: eps(math.exp(x)) - target, math.log(lo), math.log(hi),
            xtol=rtol / 4,
        ))
        hi = max(min(root, hi), lo)
        while eps(hi) > target:
            hi *= 1.0 + rtol / 4
    return hi


def calibrate_steps(
    target_epsilon: float,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    accountant: Accountant = "pld",
    sampling: Sampling = "poisson",
    dataset_size: Optional[int] = None,
    max_steps: int = _DEFAULT_MAX_STEPS,
    spent: Any = (),
) -> int:
    """Largest number of steps T with ``epsilon(..., T, ...) <= target_epsilon``.

    Returns at most ``max_steps`` (with a warning if even that many steps fit the budget).
    With ``spent`` (segments already run, as in `composed_epsilon`), T counts the steps that
    still fit after them.

    Raises:
        ValueError: if a single step already exceeds the target (raise noise_multiplier,
            lower the sampling rate, or accept a larger target_epsilon / delta).

    Example:
        >>> calibrate_steps(1.0, 10.0, 4096 / 50_000, 1e-5, accountant="rdp")
        895
    """
    sigma, q, delta, accountant, sampling, n = _check_common(
        noise_multiplier, sampling_rate, delta, accountant, sampling, dataset_size
    )
    target = _check_target_epsilon(target_epsilon)
    max_steps = _check_steps(max_steps, "max_steps")
    spent = _check_spent(spent)
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")

    def eps(t: int) -> float:
        return _epsilon(sigma, q, t, delta, accountant, sampling, n, spent)

    if eps(1) > target:
        what = "noise_multiplier=0 gives no privacy" if sigma == 0 else (
            f"one more step would give epsilon={eps(1):.4g}" if spent else
            f"a single step already gives epsilon={eps(1):.4g}"
        )
        raise ValueError(
            f"No training step fits in target_epsilon={target:g}: {what} "
            f"(noise_multiplier={sigma:g}, sampling_rate={q:g}, delta={delta:g}). Increase "
            "noise_multiplier, lower the sampling rate, or accept a larger target_epsilon."
        )
    # Exponential search for an infeasible step count. PLD starts from the RDP count: it
    # is cheap and, PLD being tighter, normally feasible for PLD too. RDP may find no
    # feasible step at all where PLD does (small sigma, few steps): then start from 1.
    lo = 1
    if accountant == "pld":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                start = calibrate_steps(target, sigma, q, delta, "rdp", sampling, n, max_steps,
                                        spent)
            except ValueError:
                start = 1
        if eps(start) <= target:
            lo = start
    growth = 1.25 if lo > 1 else 4.0
    while True:
        if lo >= max_steps:
            warnings.warn(
                f"{max_steps} steps still fit in target_epsilon={target:g}; returning "
                "max_steps. Pass a larger max_steps if you really plan to train longer.",
                UserWarning,
                stacklevel=2,
            )
            return max_steps
        hi = min(max(lo + 1, int(lo * growth)), max_steps)
        if eps(hi) > target:
            break
        lo = hi
    # Now eps(lo) <= target < eps(hi): Brent's method on the step count, then exact +-1.
    if hi - lo > 2:
        root = optimize.brentq(lambda x: eps(int(round(x))) - target, lo, hi, xtol=0.5)
        lo = max(lo, min(int(math.floor(root)), hi - 1))
    while eps(lo) > target:
        lo -= 1
    while lo < max_steps and eps(lo + 1) <= target:
        lo += 1
    return lo


def sampling_schedule(dataset_size: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """Sampling rate and number of steps for a training run.

    ``q = batch_size / dataset_size`` and ``steps = ceil(epochs * dataset_size / batch_size)``
    (with Poisson sampling, ``batch_size`` is the expected batch size).

    Example:
        >>> sampling_schedule(50_000, 4096, 72)
        (0.08192, 879)
    """
    n = _check_dataset_size(dataset_size)
    if n is None:
        raise ValueError("dataset_size is required (number of training examples).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an integer, got {batch_size!r}.")
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch_size must be between 1 and dataset_size={n}, got {batch_size}."
        )
    epochs = _check_real("epochs", epochs)
    if not 0 < epochs < math.inf:
        raise ValueError(f"epochs must be a finite number > 0, got {epochs}.")
    # Round away float noise (e.g. 72 * 50000 / 4096) before ceil.
    steps = math.ceil(round(epochs * n / batch_size, 9))
    return batch_size / n, steps


# --------------------------------------------------------------------------- statement


@dataclasses.dataclass(frozen=True)
class PrivacyStatement:
    """An (epsilon, delta) guarantee of one DP-SGD run with all its assumptions.

    Build it with `privacy_statement`; ``str(statement)`` is the human-readable text,
    `to_dict` / `save` give machine-readable JSON.
    """

    epsilon: float
    delta: float
    accountant: str
    epsilons: dict[str, float]
    noise_multiplier: float
    sampling_rate: float
    steps: int
    l2_norm_clip: float
    sampling: str
    neighboring_relation: str
    dataset_size: Optional[int] = None
    batch_size: Optional[float] = None
    epochs: Optional[float] = None
    augmult: int = 1
    unit_of_privacy: str = "one training example (record-level)"
    not_covered: tuple[str, ...] = _NOT_COVERED
    assumptions: tuple[str, ...] = ()
    segments: tuple[dict, ...] = ()
    deterministic_noise: bool = False
    dp_accounting_version: str = dataclasses.field(default_factory=_dp_accounting_version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field (infinite epsilon becomes the string "inf")."""
        out = dataclasses.asdict(self)
        out["not_covered"] = list(self.not_covered)
        out["assumptions"] = list(self.assumptions)
        out["segments"] = [dict(s) for s in self.segments]
        out["epsilon"] = _json_float(self.epsilon)
        out["epsilons"] = {k: _json_float(v) for k, v in self.epsilons.items()}
        out["text"] = str(self)
        return out

    def save(self, path: str | os.PathLike) -> tuple[str, str]:
        """Writes ``<path>.json`` and the text version ``<path>.txt``; returns both paths.

        Example:
            >>> statement.save("runs/cifar10/privacy.json")  # + runs/cifar10/privacy.txt
        """
        path = os.fspath(path)
        stem = path[: -len(".json")] if path.endswith(".json") else path
        json_path, txt_path = stem + ".json", stem + ".txt"
        directory = os.path.dirname(json_path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        with open(txt_path, "w", encoding="utf-8") as f:
            f.write(str(self) + "\n")
        return json_path, txt_path

    def __str__(self) -> str:
        names = {"rdp": "RDP", "pld": "PLD"}
        lines = ["DP-SGD privacy statement (dp_keras_scale)"]
        if self.deterministic_noise:
            lines.append(
                "  Guarantee: NONE - no privacy guarantee: deterministic noise. The noise came "
                "from a seed given by the user (DPSGD(noise_seed=...) or "
                "privacy.deterministic_noise), so anyone who knows the seed can regenerate and "
                f"remove it. With secret noise the same run would give epsilon = "
                f"{_fmt(self.epsilon)} at delta = {self.delta:g}.")
        elif math.isinf(self.epsilon):
            lines.append(
                "  Guarantee: NONE. noise_multiplier is 0, so the run is not differentially "
                "private (epsilon = inf)."
            )
        else:
            others = [
                f"{names[k]}: epsilon = {_fmt(v)}"
                for k, v in self.epsilons.items() if k != self.accountant
            ]
            extra = f" ({'; '.join(others)})" if others else ""
            lines.append(
                f"  Guarantee: ({_fmt(self.epsilon)}, {self.delta:g})-DP by the "
                f"{names[self.accountant]} accountant of dp_accounting "
                f"{self.dp_accounting_version}{extra}."
            )
        lines.append(
            f"  Mechanism: DP-SGD with Gaussian noise. Per-example gradients clipped to L2 "
            f"norm C = {self.l2_norm_clip:g}; noise of std sigma x C added once per step to "
            "their sum, with noise multiplier sigma = "
            + (f"{self.noise_multiplier:g}." if len(self.segments) <= 1 else
               "that of each segment listed under Steps.")
        )
        if self.sampling == "poisson":
            batch = (f"; expected batch {self.batch_size:g} of {self.dataset_size} examples"
                     if self.dataset_size else "")
            lines.append(
                f"  Sampling: Poisson - each example joins each batch independently with "
                f"probability q = {self.sampling_rate:.6g}{batch}. Neighbouring datasets "
                "differ by adding or removing one example (add/remove-one)."
            )
        else:
            lines.append(
                f"  Sampling: fixed-size batches of {self.batch_size:g} examples drawn "
                f"uniformly without replacement from {self.dataset_size}, independently at "
                "every step. Neighbouring datasets differ by replacing one example "
                "(replace-one; sensitivity 2C, so accounted with noise multiplier "
                f"{self.noise_multiplier / 2:g})."
            )
        epochs = f" (about {self.epochs:.4g} epochs)" if self.epochs is not None else ""
        lines.append(f"  Steps: {self.steps}{epochs}.")
        if len(self.segments) > 1:
            lines.append("  The steps ran in segments with different settings, composed "
                         "(dp_accounting ComposedDpEvent):")
            lines.extend(f"    - {s['steps']} steps at noise multiplier "
                         f"{s['noise_multiplier']:g}, sampling rate {s['sampling_rate']:.6g}"
                         for s in self.segments)
        lines.append(
            f"  Unit of privacy: {self.unit_of_privacy}. "
            + (
                f"The {self.augmult} augmented copies of an example are averaged into one "
                "gradient before clipping, so together they count as one example."
                if self.augmult > 1
                else "No augmentation multiplicity (1 copy per example)."
            )
        )
        lines.append("  Not covered:")
        lines.extend(f"    - {item}" for item in self.not_covered)
        lines.append("  Assumes:")
        lines.extend(f"    - {item}" for item in self.assumptions)
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


def _json_float(x: float) -> float | str:
    return "inf" if math.isinf(x) else float(x)


def privacy_statement(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    l2_norm_clip: float,
    dataset_size: Optional[int] = None,
    sampling: Sampling = "poisson",
    augmult: int = 1,
    accountant: Accountant = "pld",
    spent: Any = (),
    deterministic_noise: bool = False,
) -> PrivacyStatement:
    """The privacy statement of a DP-SGD run: (epsilon, delta), mechanism and assumptions.

    The epsilon of ``accountant`` is the headline; ``epsilons`` holds every accountant that
    supports the sampling (RDP and PLD for Poisson, RDP only for fixed-size batches).
    ``spent``: segments that ran before these ``steps`` (as in `composed_epsilon`; see
    `ledger_statement` for a whole ledger). ``deterministic_noise``: the noise came from a
    user-given seed, so the run has NO guarantee; the statement says so first.

    Example:
        >>> s = privacy_statement(10.0, 4096 / 50_000, 875, 1e-5, l2_norm_clip=1.0,
        ...                       dataset_size=50_000, augmult=16)
        >>> print(s)
        >>> s.save("privacy.json")
    """
    sigma, q, delta, accountant, sampling, n = _check_common(
        noise_multiplier, sampling_rate, delta, accountant, sampling, dataset_size
    )
    steps = _check_steps(steps)
    clip = _check_real("l2_norm_clip", l2_norm_clip)
    if not 0 < clip < math.inf:
        raise ValueError(f"l2_norm_clip must be a finite number > 0, got {clip}.")
    if isinstance(augmult, bool) or not isinstance(augmult, numbers.Integral) or augmult < 1:
        raise ValueError(f"augmult must be an integer >= 1, got {augmult!r}.")

    spent = _check_spent(spent)
    segments = spent + ((sigma, q, steps),)
    all_eps = {"rdp": _composed_epsilon(segments, delta, "rdp", sampling, n)}
    if sampling == "poisson" or _pld_supports_fixed():
        all_eps["pld"] = _composed_epsilon(segments, delta, "pld", sampling, n)
    steps = sum(t for _, _, t in segments)
    batch = None
    epochs = None
    if n is not None:
        batch = float(_fixed_batch_size(q, n)) if sampling == "fixed" else q * n
        epochs = sum(t * (_fixed_batch_size(r, n) if sampling == "fixed" else r * n) / n
                     for _, r, t in segments)
    assumptions = [
        "Batches were really sampled as stated ("
        + ("Poisson sampling with a fresh independent draw for every example at every step"
           if sampling == "poisson" else
           "a fresh uniformly random fixed-size batch at every step")
        + "), not by shuffling into fixed batches, and steps were not added, skipped or "
        "repeated. Which examples each batch held stays secret: a seed that fixes the "
        "sampler (training.seed) is kept like the data, never released.",
        "Noise is drawn once per logical step (after accumulating all micro-batches and "
        "replicas), with the noise multiplier of each segment listed, from a key the "
        "adversary does not know (the operating system's RNG; no seed given).",
        "The noise is an exact Gaussian. It is sampled in float32 by TensorFlow's "
        "counter-based normal sampler; floating-point Gaussian samplers are attackable in "
        "principle (Mironov 2012 for Laplace; Holohan & Braghin 2021 for Gaussian). No "
        "attack on a sum of DP-SGD gradients is known, and the noise is added to float32 "
        "gradients that already carry rounding, so we state the assumption rather than "
        "offer a secure mode.",
        "Each example's gradient (averaged over its augmented copies) is clipped to norm C "
        "on its own: no layer mixes examples in training mode (e.g. no BatchNorm).",
        "Nothing else computed from the private data is released. Every model along the "
        "way, the final one and its parameter EMA are covered (post-processing of the noisy "
        "steps).",
    ]
    if n is None:
        assumptions.append(
            "dataset_size was not given, so delta could not be checked against 1/N."
        )
    return PrivacyStatement(
        epsilon=all_eps[accountant],
        delta=delta,
        accountant=accountant,
        epsilons=all_eps,
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        l2_norm_clip=clip,
        sampling=sampling,
        neighboring_relation=(
            "add/remove-one" if sampling == "poisson" else "replace-one"
        ),
        dataset_size=n,
        batch_size=batch,
        epochs=epochs,
        augmult=int(augmult),
        assumptions=tuple(assumptions),
        segments=tuple({"noise_multiplier": s, "sampling_rate": r, "steps": t}
                       for s, r, t in segments),
        deterministic_noise=bool(deterministic_noise),
    )


def ledger_statement(
    segments: Any,
    delta: float,
    l2_norm_clip: float,
    dataset_size: Optional[int] = None,
    sampling: Sampling = "poisson",
    augmult: int = 1,
    accountant: Accountant = "pld",
) -> PrivacyStatement:
    """The privacy statement of every step in a ledger (`dks.ledger.Segment` s with known
    sampling rates, e.g. ``PrivacyBudget.spent()``), composed with dp_accounting.

    Example:
        >>> s = ledger_statement(budget.spent(), 1e-5, l2_norm_clip=1.0, dataset_size=60_000)
    """
    segments = list(segments)
    if not segments:
        raise ValueError("The ledger is empty: no step was taken, so there is nothing to state.")
    last = segments[-1]
    return privacy_statement(
        last.noise_multiplier, last.sampling_rate, last.steps, delta, l2_norm_clip,
        dataset_size=dataset_size, sampling=sampling, augmult=augmult, accountant=accountant,
        spent=segments[:-1], deterministic_noise=any(s.deterministic_noise for s in segments))
