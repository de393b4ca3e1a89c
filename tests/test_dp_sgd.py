"""DPScaleModel + DPSGD against independent references: the privacy-critical properties."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import dp_keras_scale as dks
from conftest import (NUM_CLASSES, assert_close, compile_dp, reference_clipped_sum,
                      small_convnet, weights_of, xent)


def one_step_update(model, x, y, mask=None):
    """Runs one train step and returns (w_before - w_after)."""
    before = weights_of(model)
    if mask is None:
        model.train_on_batch(x, y)
    else:
        model.train_on_batch(x, y, sample_weight=mask)
    return [b - a for b, a in zip(before, weights_of(model))]


@pytest.mark.parametrize("mode", ["graph", "xla", "eager"])
def test_noise_free_update_matches_per_example_loop(batch, mode):
    x, y = batch
    model = compile_dp(small_convnet(), jit_compile=(mode == "xla"),
                       run_eagerly=(mode == "eager"), l2_norm_clip=0.05, learning_rate=0.5)
    y_copies = np.repeat(y[:, None], 2, axis=1)
    expected = reference_clipped_sum(model, x, y_copies, np.ones(6), clip=0.05)
    update = one_step_update(model, x, y)
    assert_close(update, [0.5 * e / 6 for e in expected])


def test_no_noise_and_no_clipping_is_exactly_plain_keras_sgd(batch):
    x, y = batch
    x = x[:, 0]
    plain = small_convnet(model_class=keras.Model)
    plain.compile(optimizer=keras.optimizers.SGD(0.3, momentum=0.5), loss=xent())
    private = compile_dp(small_convnet(), learning_rate=0.3, momentum=0.5, l2_norm_clip=1e9)
    for start in (0, 3, 0, 3):
        plain.train_on_batch(x[start:start + 3], y[start:start + 3])
        private.train_on_batch(x[start:start + 3], y[start:start + 3])
    assert_close(weights_of(private), weights_of(plain), rtol=1e-5)


def test_single_copy_images_and_per_copy_labels(batch):
    x, y = batch
    model = compile_dp(small_convnet(), l2_norm_clip=0.05)
    expected = reference_clipped_sum(model, x[:, :1], y[:, None], np.ones(6), clip=0.05)
    assert_close(one_step_update(model, x[:, 0], y), [e / 6 for e in expected])

    model = compile_dp(small_convnet(), l2_norm_clip=0.05)
    y_copies = np.stack([y, (y + 1) % NUM_CLASSES], axis=1)   # labels differ per copy
    expected = reference_clipped_sum(model, x, y_copies, np.ones(6), clip=0.05)
    assert_close(one_step_update(model, x, y_copies), [e / 6 for e in expected])


def test_rescale_to_unit_norm_and_ws_conv(batch):
    x, y = batch
    model = compile_dp(small_convnet(ws=True), l2_norm_clip=0.05, rescale_to_unit_norm=True)
    expected = reference_clipped_sum(model, x, np.repeat(y[:, None], 2, 1), np.ones(6),
                                     clip=0.05, rescale=True)
    assert_close(one_step_update(model, x, y), [e / 6 for e in expected])


def test_masked_rows_contribute_nothing_and_expected_batch_size_divides(batch):
    x, y = batch
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    model = compile_dp(small_convnet(), l2_norm_clip=0.05, expected_batch_size=4.5)
    expected = reference_clipped_sum(model, x, np.repeat(y[:, None], 2, 1), mask, clip=0.05)
    assert_close(one_step_update(model, x, y, mask), [e / 4.5 for e in expected])


def _per_example_gradients(model, x, y):
    """[B] lists of float64 gradients of each example's loss averaged over its K copies."""
    loss_fn = xent()
    out = []
    for xi, yi in zip(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(np.full(len(xi), yi), model(xi, training=True))
        out.append([g.numpy().astype(np.float64)
                    for g in tape.gradient(loss, model.trainable_variables)])
    return out


def _clipped_weighted_sum(grads, weights, clip):
    norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in gi)) for gi in grads])
    factors = weights * np.minimum(1.0, clip / norms)
    return [sum(f * gi[j] for f, gi in zip(factors, grads)) for j in range(len(grads[0]))]


def _relative_gap(other, expected):
    """Largest difference, relative to the largest entry (the scale assert_close uses)."""
    return (max(np.max(np.abs(a - b)) for a, b in zip(other, expected))
            / max(np.max(np.abs(e)) for e in expected))


@pytest.fixture
def mixed_clip_batch():
    """8 examples x 3 copies, and a clip norm with 3 examples below it and 5 above."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 3, 8, 8, 3)).astype(np.float32)
    x[:, 1:] *= rng.uniform(0.2, 3.0, size=(8, 2, 1, 1, 1)).astype(np.float32)  # unlike copies
    y = rng.integers(0, NUM_CLASSES, size=8)
    grads = _per_example_gradients(small_convnet(), x, y)
    norms = np.sort([np.sqrt(sum(np.sum(g ** 2) for g in gi)) for gi in grads])
    clip = float(np.sqrt(norms[2] * norms[3]))
    assert norms[2] < 0.95 * clip and norms[3] > 1.05 * clip      # a clear mix
    return x, y, grads, clip


def test_copies_are_averaged_before_clipping_with_examples_below_and_above_the_clip(
        mixed_clip_batch):
    x, y, grads, clip = mixed_clip_batch
    model = compile_dp(small_convnet(), l2_norm_clip=clip, learning_rate=0.5)
    expected = _clipped_weighted_sum(grads, np.ones(8), clip)
    # The test has power: summing the copies (K x the gradient) before clipping changes the
    # sum far beyond the tolerance, because unclipped examples keep their scale.
    summed = _clipped_weighted_sum([[3 * g for g in gi] for gi in grads], np.ones(8), clip)
    assert _relative_gap(summed, expected) > 0.01          # 50x the assert_close tolerance
    before = weights_of(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    update = [b - a for b, a in zip(before, weights_of(model))]
    assert_close(update, [0.5 * e / 8 for e in expected])
    assert logs["clipped_fraction"] == pytest.approx(5 / 8)


def test_example_weights_are_clamped_into_0_1_and_fractional_weights_scale(mixed_clip_batch):
    x, y, grads, clip = mixed_clip_batch
    weights = np.array([1.7, -0.5, 0.3, 1.0, 0.0, 0.6, 2.0, 0.25], np.float32)
    model = compile_dp(small_convnet(), l2_norm_clip=clip, expected_batch_size=5.0)
    expected = _clipped_weighted_sum(grads, np.clip(weights, 0.0, 1.0).astype(np.float64), clip)
    assert_close(one_step_update(model, x, y, weights), [e / 5.0 for e in expected])
    # Unclamped weights (1.7, 2.0 count more than one example) would move it by this much:
    unclamped = _clipped_weighted_sum(grads, np.maximum(weights, 0.0).astype(np.float64), clip)
    assert _relative_gap(unclamped, expected) > 0.01


def test_mask_without_expected_batch_size_is_refused(batch):
    x, y = batch
    model = compile_dp(small_convnet())
    with pytest.raises(ValueError, match="expected_batch_size"):
        model.train_on_batch(x, y, sample_weight=np.ones(6, np.float32))


def test_accumulation_equals_one_big_batch_and_steps_once(batch):
    x, y = batch
    big = compile_dp(small_convnet(), l2_norm_clip=0.05)
    expected = one_step_update(big, x, y)

    model = compile_dp(small_convnet(), l2_norm_clip=0.05, gradient_accumulation_steps=3)
    start = weights_of(model)
    model.train_on_batch(x[:2], y[:2])
    model.train_on_batch(x[2:4], y[2:4])
    assert_close(weights_of(model), start, rtol=0)           # no update mid-step
    assert int(model.optimizer.iterations) == 0
    model.train_on_batch(x[4:], y[4:])
    assert int(model.optimizer.iterations) == 1
    assert_close([s - w for s, w in zip(start, weights_of(model))], expected)


@pytest.mark.parametrize("attack", ["huge", "nan", "inf_label_scale"])
def test_sensitivity_one_changed_example_moves_sum_by_at_most_2c(batch, attack):
    x, y = batch
    clip = 0.05
    # lr = 1 and expected_batch_size = 1 make the update equal to the noise-free clipped sum.
    sums = []
    for variant in range(2):
        xv, yv = x.copy(), y.copy()
        if variant == 1:
            if attack == "huge":
                xv[3] *= 1e6
            elif attack == "nan":
                xv[3, 0, 0, 0, 0] = np.nan
            else:
                xv[3] = np.inf
        model = compile_dp(small_convnet(), l2_norm_clip=clip, expected_batch_size=1.0)
        sums.append(one_step_update(model, xv, yv, np.ones(6, np.float32)))
        assert all(np.all(np.isfinite(w)) for w in weights_of(model))
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(*sums)))
    assert diff <= 2 * clip * (1 + 1e-5)
    removed = [s for s in sums[0]]
    model = compile_dp(small_convnet(), l2_norm_clip=clip, expected_batch_size=1.0)
    mask = np.ones(6, np.float32)
    mask[3] = 0
    without = one_step_update(model, x, y, mask)
    assert np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(removed, without))) <= clip * (1 + 1e-5)


def test_nan_example_is_dropped_and_counted(batch):
    x, y = batch
    x = x.copy()
    x[2, 1, 4, 4, 1] = np.nan
    model = compile_dp(small_convnet(), l2_norm_clip=0.05)
    mask = np.ones(6)
    mask[2] = 0
    expected = reference_clipped_sum(model, x, np.repeat(y[:, None], 2, 1), mask, clip=0.05)
    before = weights_of(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    update = [b - a for b, a in zip(before, weights_of(model))]
    assert_close(update, [e / 6 for e in expected])
    assert logs["nonfinite_examples"] == 1.0
    assert np.isfinite(logs["loss"])


# The message of dks.data.check_labels ("Labels must be class indices in 0..2 ...").
LABEL_ERROR = rf"(?i)label.*(0\.\.{NUM_CLASSES - 1}|\[0, {NUM_CLASSES}\))"


@pytest.mark.parametrize("bad", [NUM_CLASSES, -1])
@pytest.mark.parametrize("mode", ["graph", "xla", "eager"])
def test_out_of_range_label_is_refused_up_front_with_a_clear_error(batch, mode, bad):
    """Without the check, TF's CPU loss kernel raises mid-step in graph/eager (after the
    optimizer's counters and noise key moved) and XLA silently drops the example as a NaN."""
    x, y = batch
    y = y.copy()
    y[0] = bad
    model = compile_dp(small_convnet(), jit_compile=(mode == "xla"),
                       run_eagerly=(mode == "eager"), l2_norm_clip=0.05)
    before = weights_of(model)
    with pytest.raises(ValueError, match=LABEL_ERROR) as error:
        model.train_on_batch(x, y)
    assert f"found {bad}" in str(error.value)
    for b, a in zip(before, weights_of(model)):
        np.testing.assert_array_equal(b, a)
    assert int(model.optimizer.iterations) == 0
    with pytest.raises(ValueError, match=LABEL_ERROR):      # fit on arrays too
        model.fit(x, y, batch_size=6, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 0


def _noise_after_one_step(sigma, clip, rescale=False, seed=3, steps=1, accumulation=1):
    """Weight change of a model whose every example is masked out: pure noise (lr = 1, n = 1)."""
    keras.utils.set_random_seed(0)
    model = dks.DPScaleModel(*_wide_dense())
    compile_dp(model, noise_multiplier=sigma, l2_norm_clip=clip, rescale_to_unit_norm=rescale,
               noise_seed=seed, expected_batch_size=1.0, gradient_accumulation_steps=accumulation)
    x = np.zeros((2, 16), np.float32)
    y = np.zeros(2, np.int64)
    draws = []
    for _ in range(steps):
        before = weights_of(model)
        for _ in range(accumulation):
            model.train_on_batch(x, y, sample_weight=np.zeros(2, np.float32))
        draws.append(np.concatenate([(a - b).ravel() for a, b in zip(weights_of(model), before)]))
    return draws


def _wide_dense():
    inputs = keras.Input((16,))
    return inputs, keras.layers.Dense(1000)(inputs)


@pytest.mark.parametrize("sigma,clip,rescale,expected_std",
                         [(2.0, 0.5, False, 1.0), (1.5, 4.0, True, 1.5)])
def test_noise_has_the_stated_scale(sigma, clip, rescale, expected_std):
    (noise,) = _noise_after_one_step(sigma, clip, rescale)
    n = noise.size   # 17,000 draws
    assert abs(noise.std() / expected_std - 1) < 5 / np.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * expected_std / np.sqrt(n)
    assert stats.kstest(noise / expected_std, "norm").pvalue > 1e-4


def test_noise_is_fresh_every_step_and_added_once_per_logical_step():
    first, second = _noise_after_one_step(1.0, 1.0, steps=2)
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / np.sqrt(first.size)
    (accumulated,) = _noise_after_one_step(1.0, 1.0, accumulation=3)
    assert abs(accumulated.std() - 1.0) < 5 / np.sqrt(2 * accumulated.size)   # not sqrt(3)
    seeds = [_noise_after_one_step(1.0, 1.0, seed=None)[0] for _ in range(2)]
    assert abs(np.corrcoef(*seeds)[0, 1]) < 5 / np.sqrt(first.size)   # OS seed differs per run


def test_trainable_batchnorm_is_rejected_frozen_is_accepted(batch):
    x, y = batch
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3)(inputs)
    norm = keras.layers.BatchNormalization(name="bn")
    h = norm(h)
    outputs = keras.layers.Dense(NUM_CLASSES)(keras.layers.GlobalAveragePooling2D()(h))
    model = dks.DPScaleModel(inputs, outputs)
    with pytest.raises(ValueError, match="'bn'.*GroupNormalization"):
        compile_dp(model)
    norm.trainable = False
    compile_dp(model)
    stats_before = [v.numpy().copy() for v in norm.non_trainable_variables]
    model.train_on_batch(x, y)
    for before, after in zip(stats_before, norm.non_trainable_variables):
        np.testing.assert_array_equal(before, after.numpy())   # inference mode: stats frozen
    norm.trainable = True
    with pytest.raises(ValueError, match="BatchNormalization"):
        model.fit(x, y, verbose=0)


def test_dpsgd_refuses_raw_gradients_and_models_need_dpsgd(batch):
    x, y = batch
    plain = small_convnet(model_class=keras.Model)
    plain.compile(optimizer=dks.DPSGD(0.1, noise_multiplier=1.0), loss="mse")
    with pytest.raises(RuntimeError, match="unclipped"):
        plain.train_on_batch(x[:, 0], np.zeros((6, NUM_CLASSES)))
    with pytest.raises(TypeError, match="DPSGD"):
        small_convnet().compile(optimizer="sgd", loss="mse")


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, l2_norm_clip=0.0), "l2_norm_clip"),
    (dict(noise_multiplier=1.0, gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(noise_multiplier=1.0, clipnorm=1.0), "clipnorm"),
])
def test_dpsgd_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dks.DPSGD(0.1, **kwargs)


def test_make_private_shares_weights_and_trains(batch):
    x, y = batch
    base = small_convnet(model_class=keras.Model)
    private = compile_dp(dks.make_private(base), l2_norm_clip=0.05)
    expected = reference_clipped_sum(private, x, np.repeat(y[:, None], 2, 1), np.ones(6), 0.05)
    assert_close(one_step_update(private, x, y), [e / 6 for e in expected])
    assert base.trainable_variables[0] is private.trainable_variables[0]
    with pytest.raises(ValueError, match="functional or Sequential"):
        dks.make_private(keras.Sequential([keras.layers.Dense(2)]))


def test_slow_layer_warns_once_naming_it(batch):
    x, y = batch
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.DepthwiseConv2D(3, name="depthwise")(inputs)
    outputs = keras.layers.Dense(NUM_CLASSES)(keras.layers.GlobalAveragePooling2D()(h))
    model = compile_dp(dks.DPScaleModel(inputs, outputs), l2_norm_clip=0.05)
    with pytest.warns(UserWarning, match="'depthwise'"):
        model.fit(x, y, verbose=0, batch_size=6)
    expected = reference_clipped_sum(model, x, np.repeat(y[:, None], 2, 1), np.ones(6), 0.05)
    assert_close(one_step_update(model, x, y), [e / 6 for e in expected])   # exact, just slow


def test_metrics_and_evaluate_on_copies(batch):
    x, y = batch
    model = compile_dp(small_convnet(), l2_norm_clip=1e-6)
    with pytest.warns(UserWarning, match="neither Poisson nor fixed-size"):
        logs = model.fit(x, y, batch_size=3, epochs=1, verbose=0).history
    assert logs["clipped_fraction"][0] == 1.0
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    twin = keras.Model(model.inputs, model.outputs)   # same weights, plain Keras evaluation
    twin.compile(loss=xent(), metrics=["accuracy"])
    flat = twin.evaluate(x.reshape(12, 8, 8, 3), np.repeat(y, 2), verbose=0, return_dict=True)
    assert result["accuracy"] == pytest.approx(flat["accuracy"])
    assert result["loss"] == pytest.approx(flat["loss"], rel=1e-5)
    assert "clipped_fraction" not in result and "nonfinite_examples" not in result


def test_save_and_load_keeps_model_class_optimizer_and_noise_stream(batch, tmp_path):
    x, y = batch
    model = compile_dp(small_convnet(ws=True), noise_multiplier=1.0, l2_norm_clip=0.05,
                       momentum=0.9)
    model.train_on_batch(x, y)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, dks.DPScaleModel) and isinstance(loaded.optimizer, dks.DPSGD)
    assert loaded.optimizer.noise_multiplier == 1.0 and loaded.optimizer.l2_norm_clip == 0.05
    assert int(loaded.optimizer.iterations) == 1
    # A restored optimizer never repeats the noise stream of the run it was saved from.
    assert np.all(loaded.optimizer._seed.numpy() != model.optimizer._seed.numpy())
    # Without noise, both continue identically (momentum and weights restored).
    for m in (model, loaded):
        m.optimizer.noise_multiplier = 0.0
        m.train_on_batch(x, y)
    assert_close(weights_of(loaded), weights_of(model), rtol=1e-5)


def test_variables_unused_by_the_loss_get_zero_gradient(batch):
    x, y = batch
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.GlobalAveragePooling2D()(inputs)
    unused = keras.layers.Dense(5, name="unused")
    outputs = keras.layers.Dense(NUM_CLASSES)(h)
    unused.build((None, 3))
    model = dks.DPScaleModel(inputs, outputs)
    model._tracker.unlock()
    model.extra = unused   # tracked, trainable, but not on the path to the loss
    model._tracker.lock()
    compile_dp(model, l2_norm_clip=0.05)
    assert len(model.trainable_variables) == 4
    update = one_step_update(model, x, y)
    assert all(np.all(u == 0) for u in update[2:]) and np.any(update[0] != 0)
