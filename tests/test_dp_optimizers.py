"""Any Keras optimizer under DP (`dks.DPOptimizer`): its noise-free update equals a per-example
loop followed by the same Keras optimizer, one noise draw per logical step, saving, and the
refusals."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_keras_scale as dks
from conftest import reference_clipped_sum, small_convnet, xent
from dp_keras_scale.clipping import gaussian_noise

CLIP, EXPECTED = 0.05, 5.0

OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.5, momentum=0.9, nesterov=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
}


def _batches(steps: int):
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = rng.normal(size=(6, 2, 8, 8, 3)).astype(np.float32)   # 6 examples x 2 copies
        y = rng.integers(0, 3, size=6)
        mask = np.array([1, 1, 0, 1, 0.5, 1], np.float32)
        yield x, y, mask


def _dp_model(make_inner, **dp):
    model = small_convnet()
    model.compile(optimizer=dks.DPOptimizer(make_inner(), l2_norm_clip=CLIP,
                                            expected_batch_size=EXPECTED, **dp), loss=xent())
    return model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_noise_free_update_equals_a_per_example_loop_then_the_same_keras_optimizer(name):
    model = _dp_model(OPTIMIZERS[name], noise_multiplier=0.0)
    reference = small_convnet()                   # same initial weights (same seed)
    inner = OPTIMIZERS[name]()
    for x, y, mask in _batches(3):
        model.train_on_batch(x, y, sample_weight=mask)
        clipped = reference_clipped_sum(reference, x, np.repeat(y[:, None], 2, 1), mask, CLIP)
        inner.apply([tf.constant(g / EXPECTED, tf.float32) for g in clipped],
                    reference.trainable_variables)
    assert type(model.optimizer).__name__ == {"adam": "DPAdam", "sgd_momentum": "DPSGD",
                                              "adamw": "DPAdamW"}[name]
    assert int(model.optimizer.iterations) == 3
    for a, e in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-4, atol=1e-6)


def test_one_noise_draw_per_logical_step_reaches_the_wrapped_optimizer():
    """Every row masked out: the wrapped Adam sees exactly noise / B, drawn once per logical
    step of two micro-batches from the optimizer's key."""
    sigma = 2.0
    model = _dp_model(OPTIMIZERS["adam"], noise_multiplier=sigma, noise_seed=5,
                      gradient_accumulation_steps=2)
    opt = model.optimizer
    opt.build(model.trainable_variables)
    reference = small_convnet()
    inner = OPTIMIZERS["adam"]()
    x, y, _ = next(_batches(1))
    for _ in range(2):                           # two logical steps
        key = tf.constant(opt._seed.numpy())
        noise, _ = gaussian_noise([v.shape for v in reference.trainable_variables],
                                  sigma * CLIP, key)
        for _ in range(2):
            model.train_on_batch(x, y, sample_weight=np.zeros(6, np.float32))
        inner.apply([n / EXPECTED for n in noise], reference.trainable_variables)
    assert int(opt.iterations) == 2
    for a, e in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)


def test_save_and_load_keep_the_wrapped_optimizer_state(tmp_path):
    model = _dp_model(OPTIMIZERS["adam"], noise_multiplier=1.0)
    for x, y, mask in _batches(2):
        model.train_on_batch(x, y, sample_weight=mask)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    opt, original = loaded.optimizer, model.optimizer
    assert type(opt) is type(original) and opt.get_config() == original.get_config()
    assert int(opt.iterations) == 2 and opt.spent() == original.spent()
    moments = [v for v in original.variables if "momentum" in v.path or "velocity" in v.path]
    assert moments
    restored = {v.path: v.numpy() for v in opt.variables}
    for v in moments:
        np.testing.assert_array_equal(restored[v.path], v.numpy())


def test_refusals_are_clear():
    with pytest.raises(TypeError, match="first argument"):
        dks.DPOptimizer(l2_norm_clip=1.0)
    with pytest.raises(TypeError, match="already differentially private"):
        dks.DPOptimizer(dks.DPSGD(0.1, noise_multiplier=1.0))
    with pytest.raises(ValueError, match="does not take `clipnorm`"):
        dks.DPOptimizer(keras.optimizers.Adam(clipnorm=1.0), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps on DPOptimizer"):
        dks.DPOptimizer(keras.optimizers.Adam(gradient_accumulation_steps=2))
    model = small_convnet()
    with pytest.raises(TypeError, match="dks.DPOptimizer"):
        model.compile(optimizer=keras.optimizers.Adam(), loss=xent())


def test_weight_averages_work_whatever_optimizer_is_wrapped():
    """EMA of a DP-Adam run equals the EMA recurrence applied to its iterates."""
    model = _dp_model(OPTIMIZERS["adam"], noise_multiplier=0.0)
    ema = dks.callbacks.EMA(0.9, warmup=False, use_for_validation=False)
    x, y, mask = next(_batches(1))
    iterates = [[v.numpy() for v in model.trainable_variables]]

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            iterates.append([v.numpy() for v in self.model.trainable_variables])

    ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(3)
    model.fit(ds, epochs=2, verbose=0, callbacks=[ema, Record()])
    expected = iterates[0]
    for weights in iterates[1:]:
        expected = [0.9 * e + 0.1 * w for e, w in zip(expected, weights)]
    assert model.optimizer.averages.count("ema") == 4
    for average, e in zip(model.optimizer.average_variables("ema"), expected):
        np.testing.assert_allclose(average.numpy(), e, rtol=1e-5, atol=1e-7)


def _mixed_model(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
        h = keras.layers.GroupNormalization(2)(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        return dks.DPScaleModel(inputs, keras.layers.Dense(3, dtype="float32")(h))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_bfloat16_trains_with_float32_variables_and_float16_is_refused():
    x, y, mask = next(_batches(1))
    x = x[:, 0]
    updates = {}
    for policy in ("float32", "mixed_bfloat16"):
        model = _mixed_model(policy)
        model.compile(optimizer=dks.DPSGD(0.5, l2_norm_clip=CLIP, noise_multiplier=0.0,
                                          expected_batch_size=EXPECTED), loss=xent())
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y, sample_weight=mask)
        assert all(v.dtype == "float32" for v in model.trainable_variables)
        updates[policy] = np.concatenate([(v.numpy() - b).ravel() for v, b in
                                          zip(model.trainable_variables, before)])
    # bfloat16 compute: the same update up to bfloat16 rounding (8 bits of mantissa).
    np.testing.assert_allclose(updates["mixed_bfloat16"], updates["float32"],
                               atol=0.05 * np.abs(updates["float32"]).max())
    model = _mixed_model("mixed_float16")
    with pytest.raises(ValueError, match="mixed_bfloat16"):
        model.compile(optimizer=dks.DPSGD(0.5, noise_multiplier=1.0), loss=xent())
