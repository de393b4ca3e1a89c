"""Choices and checks that several modules share, defined once.

The configuration (`dp_keras_scale.config`), the accountant (`dp_keras_scale.accounting`), the
samplers (`dp_keras_scale.data.sampling`, `dp_keras_scale.distribute`), the data sources and
the audit all accept the same sampling schemes, accountants, dataset names, fine-tuning
choices and delta. This module is their one definition. It imports only the standard library,
so that reading a config (and the ``dp-keras-scale`` command's light subcommands) never
imports TensorFlow or dp_accounting.

Example:
    >>> from dp_keras_scale.options import SAMPLINGS, check_delta
    >>> SAMPLINGS
    ('poisson', 'fixed')
    >>> check_delta(1e-5)
    1e-05
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["ACCOUNTANTS", "FINETUNE_CLASSIFIERS", "FINETUNE_MODES", "SAMPLINGS", "TFDS_PREFIX",
           "check_delta"]

#: Batch sampling schemes the accountant can describe: ``"poisson"`` (each example joins a
#: batch independently with probability q; add/remove-one neighbours) and ``"fixed"`` (a batch
#: of exactly q * N examples drawn without replacement; replace-one neighbours).
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")

#: Privacy accountants: ``"pld"`` (privacy loss distributions; tighter, the default) and
#: ``"rdp"`` (Renyi DP).
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")

#: Fine-tuning modes (`dks.finetune.MODES`): ``"all_layers"`` (DP-SGD through the whole
#: network) or ``"classifier_only"`` (frozen backbone, cached features).
FINETUNE_MODES: tuple[str, ...] = ("all_layers", "classifier_only")

#: What becomes of a backbone's classifier (`dks.finetune.CLASSIFIERS`): ``"reset"``,
#: ``"keep"`` or ``"add"``.
FINETUNE_CLASSIFIERS: tuple[str, ...] = ("reset", "keep", "add")

#: ``data.dataset = "tfds:NAME"`` names a TFDS dataset read by example index
#: (`dks.data.tfds_source`), not one of the in-memory ``DATASETS``.
TFDS_PREFIX = "tfds:"


def check_delta(delta: Any, *, allow_zero: bool = False) -> float:
    """Checks the delta of an (epsilon, delta)-DP guarantee and returns it as a float.

    Args:
        delta: the probability with which the epsilon bound may fail.
        allow_zero: accept ``delta = 0`` (pure epsilon-DP), as the audit's lower bounds do;
            an accountant's delta must be positive.

    Returns:
        ``float(delta)``, in (0, 1), or in [0, 1) with `allow_zero`.

    Raises:
        TypeError: `delta` is not a real number (a bool is not one).
        ValueError: `delta` is NaN or outside its interval.

    Example:
        >>> check_delta(0, allow_zero=True)
        0.0
        >>> check_delta(0)
        Traceback (most recent call last):
        ValueError: delta must be in (0, 1), got 0.0. ...
    """
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"delta must be a real number, got {type(delta).__name__} {delta!r}.")
    delta = float(delta)
    above_low = delta >= 0 if allow_zero else delta > 0
    if math.isnan(delta) or not (above_low and delta < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(
            f"delta must be in {interval}, got {delta}. It should be much smaller than "
            "1 / dataset_size, e.g. 1e-5 for 50,000 examples.")
    return delta
