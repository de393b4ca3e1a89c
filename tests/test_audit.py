"""Privacy audit: statistics against scipy / direct computations, soundness of the epsilon
lower bounds on mechanisms with a known epsilon, and a tiny end-to-end audit on MNIST."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from scipy import special, stats

import dp_keras_scale as dks
from dp_keras_scale import audit

# --------------------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.999])
@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (1, 1000), (517, 1000), (999, 1000)])
def test_clopper_pearson_matches_scipy_binomtest(k, n, confidence):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    lo, hi = audit.clopper_pearson(k, n, confidence)
    np.testing.assert_allclose([lo, hi], [expected.low, expected.high], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("n,p", [(20, 0.1), (50, 0.5), (200, 0.97)])
def test_clopper_pearson_covers_with_at_least_the_confidence(n, p):
    # Exact coverage: sum of P[k] over the k whose interval contains p.
    confidence = 0.9
    coverage = sum(stats.binom.pmf(k, n, p) for k in range(n + 1)
                   if audit.clopper_pearson(k, n, confidence)[0] <= p
                   <= audit.clopper_pearson(k, n, confidence)[1])
    assert coverage >= confidence


# --------------------------------------------------------------------------- one-run bound


@pytest.mark.parametrize("v,r,m,eps,delta", [(60, 100, 1000, 0.5, 1e-5), (95, 100, 200, 2.0, 1e-3),
                                             (10, 10, 10, 1.0, 0.01), (0, 5, 10, 1.0, 0.1),
                                             (300, 400, 1000, 1.2, 0.0)])
def test_one_run_p_value_matches_the_theorem_computed_directly(v, r, m, eps, delta):
    p = math.exp(eps) / (1 + math.exp(eps))

    def f(t):                                          # P[Binomial(r, p) >= t]
        return stats.binom.sf(t - 1, r, p)

    expected = f(v)
    if v > 0:
        expected += 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    assert audit.one_run_p_value(v, r, m, eps, delta) == pytest.approx(min(1, expected),
                                                                       rel=1e-9, abs=1e-15)


def test_one_run_bound_is_where_the_p_value_crosses_beta():
    eps = audit.epsilon_lower_bound_one_run(180, 200, 1000, delta=1e-5, confidence=0.95)
    assert eps > 0
    assert audit.one_run_p_value(180, 200, 1000, eps, 1e-5) <= 0.05
    assert audit.one_run_p_value(180, 200, 1000, eps + 1e-6, 1e-5) > 0.05
    # Pure DP, all r guesses right: p^r = beta  =>  eps = logit(beta^(1/r)).
    assert audit.epsilon_lower_bound_one_run(100, 100, 500) == pytest.approx(
        special.logit(0.05 ** (1 / 100)), rel=1e-9)


def test_bounds_are_monotone():
    one_run = [audit.epsilon_lower_bound_one_run(v, 200, 1000, 1e-5) for v in range(100, 201, 10)]
    assert one_run[0] == 0.0                                  # chance accuracy: no evidence
    assert all(a < b for a, b in zip(one_run[2:], one_run[3:]))  # more correct -> larger
    assert all(a <= b for a, b in zip(one_run, one_run[1:]))
    by_conf = [audit.epsilon_lower_bound_one_run(170, 200, 1000, 1e-5, c)
               for c in (0.5, 0.9, 0.95, 0.99, 0.999)]
    assert all(a > b for a, b in zip(by_conf, by_conf[1:]))   # more confidence -> smaller
    by_delta = [audit.epsilon_lower_bound_one_run(170, 200, 1000, d) for d in (0, 1e-5, 1e-4, 1e-3)]
    assert all(a > b for a, b in zip(by_delta, by_delta[1:]))  # larger delta -> smaller
    by_m = [audit.epsilon_lower_bound_one_run(170, 200, m, 1e-4) for m in (200, 1000, 5000)]
    assert all(a > b for a, b in zip(by_m, by_m[1:]))          # 2 m delta term

    cp = [audit.epsilon_lower_bound_clopper_pearson(tp, 100, 5, 100) for tp in (50, 70, 90, 100)]
    assert all(a < b for a, b in zip(cp, cp[1:]))
    cp_fp = [audit.epsilon_lower_bound_clopper_pearson(90, 100, fp, 100) for fp in (0, 5, 20)]
    assert all(a > b for a, b in zip(cp_fp, cp_fp[1:]))
    cp_conf = [audit.epsilon_lower_bound_clopper_pearson(90, 100, 5, 100, 0, c)
               for c in (0.9, 0.95, 0.99)]
    assert all(a > b for a, b in zip(cp_conf, cp_conf[1:]))
    assert audit.epsilon_lower_bound_clopper_pearson(50, 100, 50, 100) == 0.0


def test_clopper_pearson_epsilon_is_the_formula():
    tpr_lo = audit.clopper_pearson(90, 100, 0.95)[0]
    fpr_hi = audit.clopper_pearson(5, 200, 0.95)[1]
    assert audit.epsilon_lower_bound_clopper_pearson(90, 100, 5, 200, 1e-3, 0.95) == \
        pytest.approx(math.log((tpr_lo - 1e-3) / fpr_hi))


def _randomized_response_audit(eps, m, seeds, reveal=0.0):
    """Exactly (eps, reveal)-DP per canary: each output bit is the truth with probability
    e^eps / (1 + e^eps) (randomized response), or, with probability `reveal`, the truth."""
    rng = np.random.default_rng(1234)
    keep = math.exp(eps) / (1 + math.exp(eps))
    correct = []
    for _ in range(seeds):
        secret = rng.random(m) < 0.5                      # canary included?
        truthful = (rng.random(m) < keep) | (rng.random(m) < reveal)
        guess = np.where(truthful, secret, ~secret)       # the attacker guesses the output
        correct.append(int(np.sum(guess == secret)))
    return correct


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0])
def test_one_run_bound_is_sound_for_an_exactly_eps_dp_mechanism(eps):
    seeds, m = 200, 500
    bounds = [audit.epsilon_lower_bound_one_run(v, m, m, 0.0, 0.95)
              for v in _randomized_response_audit(eps, m, seeds)]
    violations = sum(b > eps for b in bounds)
    # Sound at 95%: violations ~ at most Binomial(seeds, 0.05); allow its 99.9% quantile.
    assert violations <= stats.binom.ppf(0.999, seeds, 0.05)
    assert np.median(bounds) > 0.5 * eps                 # and not vacuous: RR is the tight case


def test_one_run_bound_grows_with_epsilon():
    means = [np.mean([audit.epsilon_lower_bound_one_run(v, 500, 500)
                      for v in _randomized_response_audit(eps, 500, 30)])
             for eps in (0.25, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(means, means[1:]))


def test_one_run_bound_with_delta_is_sound_for_an_eps_delta_mechanism():
    eps, delta, m, seeds = 1.0, 1e-3, 300, 200
    bounds = [audit.epsilon_lower_bound_one_run(v, m, m, delta, 0.95)
              for v in _randomized_response_audit(eps, m, seeds, reveal=delta)]
    assert sum(b > eps for b in bounds) <= stats.binom.ppf(0.999, seeds, 0.05)


def test_audit_canary_scores_counts_guesses_and_splits_confidence():
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    scores = np.where(included, 1.0, 0.0) + rng.normal(0, 0.7, 400)
    result = audit.audit_canary_scores(scores, included, delta=1e-5,
                                       guess_counts=[(20, 20), (40, 0)])
    order = np.argsort(-scores)
    first = result.settings[0]
    assert first["correct"] == included[order[:20]].sum() + (~included[order[-20:]]).sum()
    assert result.settings[1]["correct"] == included[order[:40]].sum()
    # Two settings: each at confidence 1 - 0.05 / 2 (Bonferroni), the maximum is reported.
    assert first["epsilon_one_run"] == pytest.approx(audit.epsilon_lower_bound_one_run(
        first["correct"], 40, 400, 1e-5, 0.975))
    assert result.epsilon_one_run == max(s["epsilon_one_run"] for s in result.settings) > 0
    tp, fp = first["true_positives"], first["false_positives"]
    assert first["epsilon_clopper_pearson"] == pytest.approx(
        audit.epsilon_lower_bound_clopper_pearson(tp, included.sum(), fp, 400 - included.sum(),
                                                  1e-5, 0.975))
    assert result.auc == pytest.approx(audit.roc_auc(scores[included], scores[~included]))


def test_default_guess_settings_are_the_documented_fractions():
    rng = np.random.default_rng(1)
    result = audit.audit_canary_scores(rng.normal(size=500), rng.random(500) < 0.5)
    assert [(s["k_plus"], s["k_minus"]) for s in result.settings] == \
        [(round(f * 500),) * 2 for f in audit.GUESS_FRACTIONS]
    for m in (1, 2, 3):                    # tiny audits still get valid settings
        tiny = audit.audit_canary_scores(np.arange(m, dtype=float), np.arange(m) % 2 == 0)
        assert all(s["guesses"] <= m for s in tiny.settings)


@pytest.mark.parametrize("call,match", [
    (lambda: audit.clopper_pearson(5, 3), "k <= n"),
    (lambda: audit.clopper_pearson(1, 3, confidence=95), "confidence"),
    (lambda: audit.epsilon_lower_bound_one_run(11, 10, 100), "correct <= guesses"),
    (lambda: audit.epsilon_lower_bound_one_run(5, 10, 100, delta=-1), "delta"),
    (lambda: audit.audit_canary_scores([1.0, 2.0], [1, 0]), "boolean"),
    (lambda: audit.audit_canary_scores([1.0, np.nan], np.array([True, False])), "non-finite"),
    (lambda: audit.audit_canary_scores([1.0, 2.0], np.array([True, False]),
                                       guess_counts=[(2, 1)]), "k_plus \\+ k_minus"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- ROC / AUC


def test_roc_auc_and_tpr_at_fpr_match_direct_computation():
    rng = np.random.default_rng(3)
    members = rng.integers(0, 30, 300).astype(float) + 3      # integer scores: many ties
    non_members = rng.integers(0, 30, 500).astype(float)
    pairwise = (np.mean(members[:, None] > non_members[None, :])
                + 0.5 * np.mean(members[:, None] == non_members[None, :]))
    assert audit.roc_auc(members, non_members) == pytest.approx(pairwise, rel=1e-12)

    fpr, tpr, thresholds = audit.roc_curve(members, non_members)
    for t, f, r in zip(thresholds[1:], fpr[1:], tpr[1:]):
        assert f == np.mean(non_members >= t) and r == np.mean(members >= t)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(pairwise, rel=1e-12)  # ties: straight segments
    for target in (0.0, 0.01, 0.1, 0.5):
        brute = max(np.mean(members >= t) for t in np.r_[np.inf, members, non_members]
                    if np.mean(non_members >= t) <= target)
        assert audit.tpr_at_fpr(fpr, tpr, target) == brute


def test_lira_calibration_beats_the_loss_attack_when_difficulty_varies():
    # Synthetic: per-example difficulty d_i shifts the statistic far more than membership.
    rng = np.random.default_rng(0)
    n, refs = 2000, 4
    difficulty = rng.normal(0, 3, n)
    member = rng.random(n) < 0.5
    target = difficulty + 1.0 * member + rng.normal(0, 0.5, n)
    reference = difficulty + rng.normal(0, 0.5, (refs, n))            # OUT models
    scores = audit.lira_offline_scores(target, reference)
    resid = reference - reference.mean(0)
    np.testing.assert_allclose(scores, (target - reference.mean(0))
                               / np.sqrt(np.sum(resid ** 2) / (n * (refs - 1))))
    calibrated = audit.MIAResult.from_scores(scores[member], scores[~member], "lira")
    uncalibrated = audit.MIAResult.from_scores(target[member], target[~member], "raw")
    assert calibrated.auc > 0.8 > uncalibrated.auc
    assert calibrated.tpr_at_fpr[0.01] > 2 * uncalibrated.tpr_at_fpr[0.01]
    per_example = audit.lira_offline_scores(target, reference, global_variance=False)
    np.testing.assert_allclose(per_example, (target - reference.mean(0)) / reference.std(0, ddof=1))


# --------------------------------------------------------------------------- model statistics


def _tiny_model(model_class=keras.Model, seed=0, width=64):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(width, activation="relu")(h)
    return model_class(inputs, keras.layers.Dense(10)(h))


def test_per_example_loss_and_logit_confidence_match_keras_and_softmax():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 28, 28, 1)).astype(np.uint8)
    y = rng.integers(0, 10, 20)
    model = _tiny_model()
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    np.testing.assert_allclose(audit.per_example_loss(model, x, y),
                               keras_loss(y, model.predict(x, verbose=0)), rtol=1e-4)
    probs = special.softmax(model.predict(x, verbose=0).astype(np.float64), axis=1)
    p_true = probs[np.arange(20), y]
    np.testing.assert_allclose(audit.logit_confidence(model, x, y),
                               np.log(p_true / (1 - p_true)), rtol=1e-6)
    with pytest.raises(ValueError, match="integer class indices"):
        audit.per_example_loss(model, x, keras.utils.to_categorical(y, 10))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mnist_split():
    x, y = dks.data.load("mnist", "train")
    base, held_out = (x[:256], y[:256]), (x[256:512], y[256:512])
    canaries = audit.mislabeled_canaries(x[512:640], y[512:640], num_classes=10, seed=0)
    assert np.all(canaries[1] != y[512:640])                      # every label is wrong
    return base, held_out, canaries


def test_tiny_end_to_end_audit_non_private_model_leaks(mnist_split, tmp_path):
    (x, y), (xh, yh), (cx, cy) = mnist_split

    def train(xt, yt):
        model = _tiny_model()
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(xt, yt, batch_size=64, epochs=60, verbose=0)
        return model

    result = audit.canary_audit(train, x, y, cx, cy, delta=1e-5, seed=0)
    assert result.num_canaries == 128 and 40 < result.num_included < 88
    assert result.auc > 0.9                          # memorized mislabeled canaries
    assert result.epsilon_one_run > 1.0             # clear leakage, 95% confidence
    mia = audit.membership_inference(result.model, (x, y), (xh, yh))
    assert mia.auc > 0.6 and mia.num_members == mia.num_non_members == 256
    path = audit.plot_roc({"loss": mia}, tmp_path / "roc.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# Sized so that the audit has power (measured with these seeds): the same pipeline with DP
# switched off (no noise, no clipping) memorizes the canaries and gets 254 of 256 guesses right,
# a bound of 3.38 against the private run's accounted 2.0; the private run's bound is 0.06. So
# the assertion `bound <= accounted` below would fail if the library stopped adding noise. It
# cannot see smaller faults: noise / 10 (accounted eps 67) still gives only 1.7 here, and
# missing clipping while noise is on gives 0.06 (see the README's audit section).
AUDIT_CANARIES, AUDIT_STEPS, AUDIT_BATCH, AUDIT_EPSILON, AUDIT_DELTA = 512, 600, 64, 2.0, 1e-5


@pytest.fixture(scope="module")
def sized_audit():
    x, y = dks.data.load("mnist", "train")
    canaries = audit.mislabeled_canaries(x[1024:1024 + AUDIT_CANARIES],
                                         y[1024:1024 + AUDIT_CANARIES], num_classes=10, seed=0)
    base = (x[:256], y[:256])
    # q and the normalizer are public constants, fixed before the canaries are drawn.
    q = AUDIT_BATCH / (len(base[0]) + AUDIT_CANARIES / 2)
    sigma = dks.accounting.calibrate_noise_multiplier(AUDIT_EPSILON, q, AUDIT_STEPS, AUDIT_DELTA)

    def run(noise_multiplier, l2_norm_clip):
        def train(xt, yt):
            sampler = dks.data.BatchSampler(len(xt), q * len(xt), seed=1)   # rate q exactly
            model = _tiny_model(dks.DPScaleModel, width=256)
            model.compile(dks.DPSGD(0.5, momentum=0.9, l2_norm_clip=l2_norm_clip,
                                    noise_multiplier=noise_multiplier,
                                    expected_batch_size=AUDIT_BATCH,
                                    gradient_accumulation_steps=sampler.accumulation_steps,
                                    noise_seed=2),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(sampler.dataset(xt, yt, steps=AUDIT_STEPS), epochs=1, shuffle=False,
                      steps_per_epoch=AUDIT_STEPS * sampler.accumulation_steps, verbose=0)
            assert int(model.optimizer.iterations) == AUDIT_STEPS
            return model

        return audit.canary_audit(train, *base, *canaries, delta=AUDIT_DELTA, seed=0)

    return {"sigma": sigma, "q": q, "private": run(sigma, 1.0),
            "dp_off": run(0.0, 1e9)}   # positive control: the same pipeline, no noise, no clip


def test_end_to_end_audit_positive_control_shows_the_audit_has_power(sized_audit):
    control = sized_audit["dp_off"]
    assert control.num_canaries == AUDIT_CANARIES
    assert control.auc > 0.9                        # the canaries are memorized without DP
    # A pipeline without DP is caught claiming the private run's epsilon: the bound clearly
    # exceeds it (3.38 measured; 2.5 is 247 of 256 guesses right).
    assert control.epsilon_one_run > AUDIT_EPSILON + 0.5


def test_end_to_end_audit_dp_model_stays_below_its_epsilon(sized_audit):
    private, control = sized_audit["private"], sized_audit["dp_off"]
    accounted = dks.accounting.epsilon(sized_audit["sigma"], sized_audit["q"], AUDIT_STEPS,
                                       AUDIT_DELTA)
    assert AUDIT_EPSILON - 1e-3 <= accounted <= AUDIT_EPSILON + 1e-6
    assert private.epsilon_one_run <= accounted
    assert private.epsilon_clopper_pearson <= accounted
    # Same canaries, inclusions, sampling and seeds: only the noise and the clipping differ.
    assert np.array_equal(private.included, control.included)
    assert private.epsilon_one_run < control.epsilon_one_run - 2.0
    assert private.auc < 0.7 < control.auc
