"""Empirical privacy audits: membership inference and canary-based epsilon lower bounds.

DP-SGD comes with a proof: an *upper* bound epsilon on what any attacker can learn about one
training example. An audit runs a concrete attack and turns its success into a statistical
*lower* bound: "with confidence 1 - beta, the training run is not (eps_lo, delta)-DP for any
eps_lo below this number". Two families:

* **Membership inference** (`membership_inference`): score examples that were trained on
  (members) and examples that were not (non-members) and measure how well the score separates
  them: ROC AUC and the true-positive rate at low false-positive rates (0.1%, 1%), which is what
  matters for privacy (Carlini et al. 2022). Attacks: ``"loss"`` (score = -loss; Yeom et al.
  2018) and ``"lira"``, the offline likelihood-ratio attack (Carlini et al. 2022): per-example
  difficulty calibration with reference models trained WITHOUT the target examples, score =
  (phi - mean_ref(phi)) / std_ref with phi the logit-scaled confidence of the true class and a
  global (pooled) or per-example std.
* **Canary audit** (`canary_audit`): insert m canaries (e.g. `mislabeled_canaries`), each
  included independently with probability 1/2, train ONCE, score the canaries, guess "in" for
  the k+ highest scores and "out" for the k- lowest (abstain on the rest) and convert the number
  of correct guesses into an epsilon lower bound:

  - `epsilon_lower_bound_one_run`: Steinke, Nasr, Jagielski (2023), "Privacy auditing with one
    (1) training run". For an (eps, delta)-DP algorithm and r guesses out of m canaries, the
    number W of correct guesses satisfies
    ``P[W >= v] <= f(v) + 2 m delta max_{1<=i<=v} (f(v - i) - f(v)) / i`` with
    ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``. The reported bound is an epsilon at
    which this tail is <= beta = 1 - confidence: an eps-DP algorithm produces that many correct
    guesses with probability at most beta. Valid for a single training run.
  - `epsilon_lower_bound_clopper_pearson`: the classic bound from a threshold's TPR and FPR,
    ``eps >= log((TPR_lo - delta) / FPR_hi)`` with Clopper-Pearson intervals. It assumes the
    trials are independent, which holds across independent training runs (one canary per run)
    but not for many canaries of one run; `canary_audit` reports it for comparison and the
    one-run bound is the rigorous one there.

When several guess settings (k+, k-) are tried, the confidence is split between them
(Bonferroni), so the reported maximum keeps its confidence level.

What a lower bound proves, and what it does not:

* A lower bound ABOVE the claimed epsilon proves (up to probability beta) that the claim is
  false for this training pipeline: a bug in clipping, noise, sampling or accounting, or a
  broken assumption (e.g. an example duplicated in the data).
* A lower bound BELOW the claimed epsilon proves nothing about the claim being true. It only
  says that THIS attack, with this many canaries and this model, could not see more leakage.
  DP bounds the worst case over all datasets, canaries and attackers that see the whole
  training run; a black-box attack on the final model with input-space canaries is far from
  that worst case, so bounds near 0 for DP models are expected even when the accounting is
  tight. The guarantee itself comes from the proof and the accountant.
* A non-private model with a large lower bound shows real, measurable leakage; a small bound
  for a non-private model shows only that the attack was weak.
* Membership inference AUC / TPR are attack-success measurements on a particular split, not
  privacy parameters. TPR at FPR f is only resolved when there are well over 1/f non-members.

Example:
    >>> from dp_keras_scale import audit
    >>> mia = audit.membership_inference(model, (x_train, y_train), (x_test, y_test))
    >>> print(mia.auc, mia.tpr_at_fpr)
    >>> cx, cy = audit.mislabeled_canaries(x_pool[:500], y_pool[:500], num_classes=10, seed=0)
    >>> result = audit.canary_audit(train_fn, x_train, y_train, cx, cy, delta=1e-5)
    >>> print(result.epsilon_one_run)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import special, stats

from dp_keras_scale.options import check_delta

__all__ = [
    "MIAResult",
    "CanaryAuditResult",
    "clopper_pearson",
    "one_run_p_value",
    "epsilon_lower_bound_one_run",
    "epsilon_lower_bound_clopper_pearson",
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "per_example_loss",
    "logit_confidence",
    "lira_offline_scores",
    "membership_inference",
    "mislabeled_canaries",
    "audit_canary_scores",
    "canary_audit",
    "plot_roc",
]

#: Default false-positive rates at which the true-positive rate is reported.
FPR_TARGETS: tuple[float, ...] = (0.001, 0.01)

#: Default guess fractions for the canary audit: k+ = k- = fraction * num_canaries.
GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.25, 0.5)

_EPS_CAP = 100.0   # e^100 / (1 + e^100) rounds to 1: no finite audit reaches it


# --------------------------------------------------------------------------- validation


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def _check_confidence(confidence: Any) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) \
            or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}.")
    return float(confidence)


def _check_scores(name: str, scores: Any) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape "
                         f"{scores.shape}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(scores)))} non-finite scores: "
                         "every example must get a finite score (nothing is dropped silently).")
    return scores


# --------------------------------------------------------------------------- statistics


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided confidence interval for a binomial proportion k / n.

    Each side fails with probability at most (1 - confidence) / 2.

    Example:
        >>> clopper_pearson(7, 10, confidence=0.95)
        (0.3475..., 0.9332...)
    """
    k, n = _check_count("k", k), _check_count("n", n)
    if n == 0 or k > n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}.")
    alpha = 1 - _check_confidence(confidence)
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def one_run_p_value(correct: int, guesses: int, num_canaries: int, epsilon: float,
                    delta: float = 0.0) -> float:
    """Upper bound on P[>= `correct` of `guesses` right] for an (epsilon, delta)-DP algorithm.

    Steinke, Nasr, Jagielski (2023): with m = `num_canaries` canaries included independently
    with probability 1/2 and r = `guesses` non-abstaining guesses,
    ``P[W >= v] <= f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i`` where
    ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``. Returned clipped to 1.

    Example:
        >>> one_run_p_value(90, 100, 1000, epsilon=1.0)     # eps=1 rarely gets 90 of 100 right
        2.7...e-05
    """
    v, r, m = _check_count("correct", correct), _check_count("guesses", guesses), \
        _check_count("num_canaries", num_canaries)
    if not v <= r <= m:
        raise ValueError(f"need correct <= guesses <= num_canaries, got {v}, {r}, {m}.")
    delta = check_delta(delta, allow_zero=True)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}.")
    p = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))            # f(v) = P[Bin(r, p) >= v]
    if delta > 0 and v > 0:
        # f(v - i) - f(v) = P[v - i <= Bin < v] = sum_{j = v-i}^{v-1} pmf(j), i = 1..v
        window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
        tail += 2 * m * delta * float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail)


def epsilon_lower_bound_one_run(correct: int, guesses: int, num_canaries: int,
                                delta: float = 0.0, confidence: float = 0.95) -> float:
    """Empirical epsilon lower bound from one training run (Steinke, Nasr, Jagielski 2023).

    Returns an epsilon at which `one_run_p_value` is <= 1 - `confidence`: an (epsilon,
    delta)-DP algorithm would get at least `correct` of `guesses` right with probability at
    most 1 - confidence, so with that confidence the algorithm is not (eps', delta)-DP for any
    eps' below the returned value. 0 when the guesses carry no such evidence.

    Example:
        >>> epsilon_lower_bound_one_run(100, 100, 1000, delta=0.0)   # all of 100 right
        3.49...
    """
    beta = 1 - _check_confidence(confidence)

    def rejected(eps: float) -> bool:
        return one_run_p_value(correct, guesses, num_canaries, eps, delta) <= beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):                   # bracket: rejected(lo), not rejected(hi)
        lo, hi = hi, 2 * hi
        if hi > _EPS_CAP:
            return lo
    while hi - lo > 1e-9 * max(1.0, hi):
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo                             # always a rejected epsilon (sound side)


def epsilon_lower_bound_clopper_pearson(true_positives: int, positives: int,
                                        false_positives: int, negatives: int,
                                        delta: float = 0.0, confidence: float = 0.95) -> float:
    """Epsilon lower bound ``log((TPR_lo - delta) / FPR_hi)`` from one threshold's counts.

    TPR_lo and FPR_hi are Clopper-Pearson bounds, each failing with probability at most
    (1 - confidence) / 2, so the bound holds with probability >= `confidence` when the
    positives and negatives are independent trials (e.g. independent training runs). 0 when
    TPR_lo <= delta or the bound would be negative.

    Example:
        >>> epsilon_lower_bound_clopper_pearson(95, 100, 5, 100)   # TPR 0.95 at FPR 0.05
        2.06...
    """
    delta = check_delta(delta, allow_zero=True)
    tp, p = _check_count("true_positives", true_positives), _check_count("positives", positives)
    fp, n = _check_count("false_positives", false_positives), \
        _check_count("negatives", negatives)
    tpr_lo, _ = clopper_pearson(tp, p, confidence)
    _, fpr_hi = clopper_pearson(fp, n, confidence)
    if tpr_lo <= delta:
        return 0.0
    return max(0.0, math.log((tpr_lo - delta) / fpr_hi))


def roc_curve(member_scores: Any, non_member_scores: Any
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule "member if score >= t" over every distinct threshold t.

    Returns (fpr, tpr, thresholds), starting at (0, 0) with t = +inf and ending at (1, 1).

    Example:
        >>> fpr, tpr, t = roc_curve([3.0, 2.0], [1.0, 2.0])
    """
    members = _check_scores("member_scores", member_scores)
    non_members = _check_scores("non_member_scores", non_member_scores)
    scores = np.concatenate([members, non_members])
    is_member = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    tp = np.cumsum(is_member)[last_of_tie]
    fp = np.cumsum(1 - is_member)[last_of_tie]
    fpr = np.r_[0.0, fp / len(non_members)]
    tpr = np.r_[0.0, tp / len(members)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def roc_auc(member_scores: Any, non_member_scores: Any) -> float:
    """Area under the ROC: P[member score > non-member score] + P[tie] / 2 (Mann-Whitney U).

    Example:
        >>> roc_auc([3.0, 2.0], [1.0, 2.0])
        0.875
    """
    members = _check_scores("member_scores", member_scores)
    non_members = _check_scores("non_member_scores", non_member_scores)
    ranks = stats.rankdata(np.concatenate([members, non_members]))   # ties: average rank
    n1, n0 = len(members), len(non_members)
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    return float(u / (n1 * n0))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR on the ROC among thresholds whose FPR is <= `target`.

    Example:
        >>> fpr, tpr, _ = roc_curve(member_scores, non_member_scores)
        >>> tpr_at_fpr(fpr, tpr, 0.01)
    """
    if not 0 <= target <= 1:
        raise ValueError(f"target FPR must be in [0, 1], got {target!r}.")
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    return float(np.max(tpr[fpr <= target]))   # fpr[0] == 0: never empty


# --------------------------------------------------------------------------- attack statistics


def _logits(model: Any, x: Any, batch_size: int, from_logits: bool) -> np.ndarray:
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"The model must output [N, num_classes] scores, got shape {out.shape}.")
    if from_logits:
        return out
    if np.any(out < 0):
        raise ValueError("from_logits=False expects probabilities (>= 0) from the model; it "
                         "returned negative values: pass from_logits=True.")
    return np.log(np.maximum(out, np.finfo(np.float64).tiny))


def _labels(y: Any, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"Labels must be integer class indices of shape ({n},), got shape "
                         f"{y.shape} and dtype {y.dtype} (convert one-hot labels with argmax).")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"Labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}].")
    return y.astype(np.int64)


def _loss_and_confidence(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(y))
    true = logits[rows, y]
    loss = special.logsumexp(logits, axis=1) - true
    others = logits.copy()
    others[rows, y] = -np.inf
    return loss, true - special.logsumexp(others, axis=1)


def per_example_loss(model: Any, x: Any, y: Any, batch_size: int = 256,
                     from_logits: bool = True) -> np.ndarray:
    """Cross-entropy loss of each example, in float64: ``-log softmax(model(x))[y]``.

    Example:
        >>> losses = per_example_loss(model, x_test, y_test)
    """
    logits = _logits(model, x, batch_size, from_logits)
    return _loss_and_confidence(logits, _labels(y, len(logits), logits.shape[1]))[0]


def logit_confidence(model: Any, x: Any, y: Any, batch_size: int = 256,
                     from_logits: bool = True) -> np.ndarray:
    """Logit-scaled confidence ``log(p_y / (1 - p_y))`` of the true class (LiRA's statistic).

    Computed stably as ``z_y - logsumexp_{j != y} z_j`` from the logits z; roughly Gaussian
    across training runs, which is what the likelihood-ratio attack assumes.

    Example:
        >>> phi = logit_confidence(model, x_test, y_test)
    """
    logits = _logits(model, x, batch_size, from_logits)
    return _loss_and_confidence(logits, _labels(y, len(logits), logits.shape[1]))[1]


def lira_offline_scores(target_stats: Any, reference_stats: Any,
                        global_variance: bool = True) -> np.ndarray:
    """Offline likelihood-ratio scores (Carlini et al. 2022) from OUT reference models.

    Args:
        target_stats: [N] statistic (e.g. `logit_confidence`) of each example under the
            audited model.
        reference_stats: [R, N] the same statistic under R reference models trained on data
            from the same distribution WITHOUT these N examples.
        global_variance: pool one variance over all examples (robust with few reference
            models); otherwise each example gets its own variance (needs R >= 2; better with
            many models). With R = 1 there is no variance estimate and the score is the plain
            difference (difficulty calibration).

    Returns:
        [N] ``(target - mean_ref) / std_ref``: larger means more likely a member.

    Example:
        >>> refs = np.stack([logit_confidence(m, x, y) for m in reference_models])
        >>> scores = lira_offline_scores(logit_confidence(model, x, y), refs)
    """
    target = _check_scores("target_stats", target_stats)
    ref = np.asarray(reference_stats, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] != len(target) or ref.shape[0] < 1:
        raise ValueError(f"reference_stats must have shape [R >= 1, {len(target)}], got "
                         f"{ref.shape}.")
    if not np.all(np.isfinite(ref)):
        raise ValueError("reference_stats has non-finite values.")
    mean = ref.mean(axis=0)
    if len(ref) == 1:
        return target - mean
    if global_variance:
        std = np.sqrt(np.sum((ref - mean) ** 2) / (ref.shape[1] * (len(ref) - 1)))
    else:
        std = ref.std(axis=0, ddof=1)
    return (target - mean) / np.maximum(std, 1e-8)


# --------------------------------------------------------------------------- membership inference


@dataclasses.dataclass
class MIAResult:
    """Success of a membership-inference attack: ROC, AUC and TPR at low FPR.

    Example:
        >>> result = MIAResult.from_scores(-member_losses, -non_member_losses, attack="loss")
        >>> result.auc, result.tpr_at_fpr[0.01]
    """

    attack: str
    auc: float
    tpr_at_fpr: dict[float, float]
    fpr: np.ndarray
    tpr: np.ndarray
    member_scores: np.ndarray
    non_member_scores: np.ndarray

    @classmethod
    def from_scores(cls, member_scores: Any, non_member_scores: Any, attack: str = "custom",
                    fpr_targets: Iterable[float] = FPR_TARGETS) -> "MIAResult":
        members = _check_scores("member_scores", member_scores)
        non_members = _check_scores("non_member_scores", non_member_scores)
        fpr, tpr, _ = roc_curve(members, non_members)
        return cls(attack=attack, auc=roc_auc(members, non_members),
                   tpr_at_fpr={float(f): tpr_at_fpr(fpr, tpr, f) for f in fpr_targets},
                   fpr=fpr, tpr=tpr, member_scores=members, non_member_scores=non_members)

    @property
    def num_members(self) -> int:
        return len(self.member_scores)

    @property
    def num_non_members(self) -> int:
        return len(self.non_member_scores)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the per-example scores and the full ROC)."""
        return {"attack": self.attack, "auc": self.auc,
                "tpr_at_fpr": {str(k): v for k, v in self.tpr_at_fpr.items()},
                "num_members": self.num_members, "num_non_members": self.num_non_members}


def membership_inference(model: Any, members: tuple[Any, Any], non_members: tuple[Any, Any],
                         attack: str = "loss", reference_models: Sequence[Any] = (),
                         global_variance: bool = True, batch_size: int = 256,
                         from_logits: bool = True,
                         fpr_targets: Iterable[float] = FPR_TARGETS) -> MIAResult:
    """Runs a membership-inference attack on `model` and measures its success.

    Args:
        model: the audited Keras model (outputs logits, or probabilities with
            ``from_logits=False``).
        members: (x, y) examples the model was trained on.
        non_members: (x, y) examples from the same distribution it was not trained on.
        attack: "loss" (score = -loss) or "lira" (offline likelihood ratio, needs
            `reference_models`).
        reference_models: models trained with the same recipe on data that contains NONE of
            the members and non-members (for "lira").
        global_variance: see `lira_offline_scores`.

    Example:
        >>> mia = membership_inference(model, (x_train, y_train), (x_test, y_test))
        >>> lira = membership_inference(model, (x_train, y_train), (x_test, y_test),
        ...                             attack="lira", reference_models=refs)
    """
    (xm, ym), (xn, yn) = members, non_members
    if attack == "loss":
        if reference_models:
            raise ValueError('attack="loss" ignores reference_models; use attack="lira".')
        scores = [-per_example_loss(model, x, y, batch_size, from_logits)
                  for x, y in ((xm, ym), (xn, yn))]
    elif attack == "lira":
        if not reference_models:
            raise ValueError('attack="lira" needs reference_models: models trained like the '
                             "audited one on data without the members and non-members.")
        scores = []
        for x, y in ((xm, ym), (xn, yn)):
            refs = np.stack([logit_confidence(r, x, y, batch_size, from_logits)
                             for r in reference_models])
            scores.append(lira_offline_scores(
                logit_confidence(model, x, y, batch_size, from_logits), refs, global_variance))
    else:
        raise ValueError(f'attack must be "loss" or "lira", got {attack!r}.')
    return MIAResult.from_scores(scores[0], scores[1], attack, fpr_targets)


# --------------------------------------------------------------------------- canary audit


def mislabeled_canaries(x: Any, y: Any, num_classes: int, seed: Optional[int] = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Canaries: copies of `x` with a uniformly random WRONG label each.

    A model learns a mislabeled example only by memorizing it, so its loss separates
    included from excluded canaries far better than for ordinary examples.

    Example:
        >>> cx, cy = mislabeled_canaries(x_pool[:500], y_pool[:500], num_classes=10, seed=0)
    """
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be integer labels of shape ({len(x)},), got {y.shape}.")
    if num_classes < 2 or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"need num_classes >= 2 and labels in [0, num_classes), got "
                         f"num_classes={num_classes}, labels in [{y.min()}, {y.max()}].")
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, num_classes, size=len(y))
    return np.array(x, copy=True), ((y + shift) % num_classes).astype(y.dtype)


@dataclasses.dataclass
class CanaryAuditResult:
    """Epsilon lower bounds from one canary audit.

    Attributes:
        epsilon_one_run: the largest one-run bound over the guess settings (each computed at
            the Bonferroni-corrected confidence, so the maximum holds at `confidence`).
        epsilon_clopper_pearson: the same for the Clopper-Pearson TPR/FPR bound of the k+
            "in" guesses (assumes independent trials; see the module docstring).
        settings: one dict per guess setting: k_plus, k_minus, guesses, correct, accuracy,
            epsilon_one_run, true_positives, false_positives, epsilon_clopper_pearson.
        scores, included: per-canary score and inclusion (True = trained on).
        model: the trained model (`canary_audit` only; not serialized).
    """

    epsilon_one_run: float
    epsilon_clopper_pearson: float
    num_canaries: int
    num_included: int
    delta: float
    confidence: float
    settings: list[dict[str, Any]]
    scores: np.ndarray
    included: np.ndarray
    model: Any = None

    @property
    def auc(self) -> float:
        """ROC AUC of the scores separating included from excluded canaries (nan if all or
        none were included)."""
        if not 0 < self.num_included < self.num_canaries:
            return math.nan
        return roc_auc(self.scores[self.included], self.scores[~self.included])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without per-canary arrays and the model)."""
        return {"epsilon_one_run": self.epsilon_one_run,
                "epsilon_clopper_pearson": self.epsilon_clopper_pearson,
                "num_canaries": self.num_canaries, "num_included": self.num_included,
                "canary_auc": self.auc, "delta": self.delta, "confidence": self.confidence,
                "settings": self.settings}


def _guess_counts(m: int, guess_counts: Optional[Sequence[tuple[int, int]]]
                  ) -> list[tuple[int, int]]:
    if guess_counts is None:
        guess_counts = ([(max(1, min(round(f * m), m // 2)),) * 2 for f in GUESS_FRACTIONS]
                        if m >= 2 else [(1, 0)])
    out = []
    for pair in guess_counts:
        k_plus, k_minus = (_check_count("k_plus", pair[0]), _check_count("k_minus", pair[1]))
        if k_plus + k_minus > m or k_plus + k_minus == 0:
            raise ValueError(f"Each (k_plus, k_minus) needs 1 <= k_plus + k_minus <= "
                             f"num_canaries={m}, got {pair}.")
        if (k_plus, k_minus) not in out:
            out.append((k_plus, k_minus))
    if not out:
        raise ValueError("guess_counts is empty.")
    return out


def audit_canary_scores(scores: Any, included: Any, delta: float = 0.0,
                        confidence: float = 0.95,
                        guess_counts: Optional[Sequence[tuple[int, int]]] = None
                        ) -> CanaryAuditResult:
    """Epsilon lower bounds from canary scores (higher = more likely included) and inclusions.

    For each (k_plus, k_minus) in `guess_counts` (default: k+ = k- = 2%, 5%, 10%, 25%, 50% of
    the canaries) it guesses "in" for the k_plus highest scores and "out" for the k_minus lowest
    (ties broken by canary order, which must not depend on the inclusions). The canaries must
    have been included independently with probability 1/2, and the scores computed without
    looking at the inclusions.

    Example:
        >>> result = audit_canary_scores(-canary_losses, included, delta=1e-5)
        >>> result.epsilon_one_run
    """
    scores = _check_scores("scores", scores)
    included = np.asarray(included)
    if included.shape != scores.shape or included.dtype != bool:
        raise ValueError(f"included must be a boolean array of shape {scores.shape}, got "
                         f"{included.dtype} {included.shape}.")
    delta, confidence = check_delta(delta, allow_zero=True), _check_confidence(confidence)
    m = len(scores)
    counts = _guess_counts(m, guess_counts)
    per_setting = 1 - (1 - confidence) / len(counts)    # Bonferroni over the settings
    order = np.argsort(-scores, kind="stable")
    positives = int(included.sum())
    settings = []
    for k_plus, k_minus in counts:
        guessed_in, guessed_out = order[:k_plus], order[m - k_minus:]
        tp = int(included[guessed_in].sum())
        correct = tp + int((~included[guessed_out]).sum())
        guesses = k_plus + k_minus
        cp = 0.0
        if k_plus > 0 and 0 < positives < m:
            cp = epsilon_lower_bound_clopper_pearson(tp, positives, k_plus - tp, m - positives,
                                                     delta, per_setting)
        settings.append({
            "k_plus": k_plus, "k_minus": k_minus, "guesses": guesses, "correct": correct,
            "accuracy": correct / guesses,
            "epsilon_one_run": epsilon_lower_bound_one_run(correct, guesses, m, delta,
                                                           per_setting),
            "true_positives": tp, "false_positives": k_plus - tp,
            "epsilon_clopper_pearson": cp})
    return CanaryAuditResult(
        epsilon_one_run=max(s["epsilon_one_run"] for s in settings),
        epsilon_clopper_pearson=max(s["epsilon_clopper_pearson"] for s in settings),
        num_canaries=m, num_included=positives, delta=delta, confidence=confidence,
        settings=settings, scores=scores, included=included)


def _default_score(model: Any, x: Any, y: Any) -> np.ndarray:
    return -per_example_loss(model, x, y)


def canary_audit(train_fn: Callable[[np.ndarray, np.ndarray], Any], x: Any, y: Any,
                 canary_x: Any, canary_y: Any, delta: float = 0.0, confidence: float = 0.95,
                 score_fn: Callable[[Any, Any, Any], np.ndarray] = _default_score,
                 guess_counts: Optional[Sequence[tuple[int, int]]] = None,
                 seed: Optional[int] = None) -> CanaryAuditResult:
    """One-run canary audit: include each canary with probability 1/2, train once, bound eps.

    Args:
        train_fn: ``train_fn(x_train, y_train) -> model``: trains the audited pipeline on the
            given data (base examples followed by the included canaries) and returns the model.
            For a DP pipeline it must fix its sampling rate and normalization as public
            constants, independent of how many canaries were included.
        x, y: the base training data (always included).
        canary_x, canary_y: the m canaries (e.g. from `mislabeled_canaries`).
        delta: the delta of the guarantee being audited (0 for the pure-eps bound).
        score_fn: ``score_fn(model, canary_x, canary_y) -> [m]`` scores, higher = more likely
            included; default -loss.
        seed: seed of the inclusion draws (tests); by default the operating system's RNG.

    Example:
        >>> def train_fn(xt, yt):
        ...     model = build(); model.fit(xt, yt, epochs=50, verbose=0); return model
        >>> result = canary_audit(train_fn, x, y, cx, cy, delta=1e-5)
        >>> result.epsilon_one_run, result.epsilon_clopper_pearson
    """
    canary_y = np.asarray(canary_y)
    m = len(canary_y)
    if m == 0 or len(canary_x) != m:
        raise ValueError(f"Need m >= 1 canaries with one label each, got {len(canary_x)} "
                         f"inputs and {m} labels.")
    rng = np.random.default_rng(seed if seed is not None
                                else int.from_bytes(os.urandom(16), "little"))
    included = rng.random(m) < 0.5
    canary_x = np.asarray(canary_x)
    x_train = np.concatenate([np.asarray(x), canary_x[included]])
    y_train = np.concatenate([np.asarray(y), canary_y[included]])
    model = train_fn(x_train, y_train)
    scores = np.asarray(score_fn(model, canary_x, canary_y), dtype=np.float64)
    result = audit_canary_scores(scores, included, delta, confidence, guess_counts)
    result.model = model
    return result


# --------------------------------------------------------------------------- plotting


def plot_roc(results: Mapping[str, MIAResult] | Sequence[MIAResult],
             path: str | os.PathLike, title: str = "Membership inference ROC") -> str:
    """Saves ROC curves (log-log axes, as low FPR matters) of several attacks as a PNG.

    Needs matplotlib (``pip install dp-keras-scale[plots]``); uses no global pyplot state.

    Example:
        >>> plot_roc({"non-private, loss": mia, "DP eps=8, loss": mia_dp}, "roc.png")
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:   # pragma: no cover - depends on the environment
        raise ImportError("plot_roc needs matplotlib: pip install 'dp-keras-scale[plots]'."
                          ) from err
    if not isinstance(results, Mapping):
        results = {r.attack: r for r in results}
    if not results:
        raise ValueError("plot_roc needs at least one MIAResult.")
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    floor = 1.0
    for label, result in results.items():
        floor = min(floor, 1 / max(result.num_non_members, 1))
        ax.plot(np.maximum(result.fpr, 1e-5), np.maximum(result.tpr, 1e-5),
                label=f"{label} (AUC {result.auc:.3f})")
    grid = np.logspace(-5, 0, 100)
    ax.plot(grid, grid, "k--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)
