"""EMA / Polyak parameter averaging against a direct computation, validation swap, save/load."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import dp_keras_scale as dks
from conftest import small_convnet, xent

N, BATCH = 48, 8


class RecordWeights(keras.callbacks.Callback):
    """Weights after every logical step (Keras batches are micro-batches)."""

    def __init__(self):
        super().__init__()
        self.history: list[list[np.ndarray]] = []

    def on_train_begin(self, logs=None):
        self.history = [[v.numpy() for v in self.model.trainable_variables]]

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        if int(opt._micro_steps.numpy()) % opt.dp_accumulation_steps == 0:
            self.history.append([v.numpy() for v in self.model.trainable_variables])


def _trained(callbacks, steps=7, accumulation=1, noise=0.5):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, N)
    padded = dks.data.BatchSampler(N, BATCH).padded_batch_size
    sampler = dks.data.BatchSampler(N, BATCH, microbatch_size=-(-padded // accumulation), seed=0)
    model = small_convnet()
    model.compile(optimizer=dks.DPSGD(0.5, noise_multiplier=noise, expected_batch_size=BATCH,
                                      gradient_accumulation_steps=sampler.accumulation_steps),
                  loss=xent(), metrics=["accuracy"])
    record = RecordWeights()
    model.fit(sampler.dataset(x, y), epochs=1, steps_per_epoch=steps * accumulation, verbose=0,
              callbacks=[*callbacks, record])
    return model, record.history, (x, y)


def _ema_reference(history, decay, warmup=True, start_step=0):
    average = [w.astype(np.float64) for w in history[0]]
    count = 0
    for step, weights in enumerate(history[1:], start=1):
        if step <= start_step:
            average = [w.astype(np.float64) for w in weights]
            continue
        t = count
        count += 1
        mu = min(decay, (1 + t) / (10 + t)) if warmup else decay
        average = [mu * a + (1 - mu) * w for a, w in zip(average, weights)]
    return average


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ema_with_warmup_matches_direct_computation(accumulation):
    model, history, _ = _trained([dks.callbacks.EMA(0.9)], accumulation=accumulation)
    assert len(history) == 8                         # initial weights + 7 logical steps
    expected = _ema_reference(history, 0.9)
    for a, e in zip(model.optimizer.average_variables("ema"), expected):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-5, atol=1e-6)
    assert model.optimizer.averages.count("ema") == 7


def test_ema_without_warmup_and_polyak_from_a_start_step():
    model, history, _ = _trained([dks.callbacks.EMA(0.8, warmup=False, name="slow"),
                                  dks.callbacks.Polyak(start_step=3)])
    for a, e in zip(model.optimizer.average_variables("slow"),
                    _ema_reference(history, 0.8, warmup=False)):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-5, atol=1e-6)
    polyak = [np.mean([h[i] for h in history[4:]], axis=0) for i in range(len(history[0]))]
    for a, e in zip(model.optimizer.average_variables("polyak"), polyak):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-5, atol=1e-6)


def test_validation_and_averaged_weights_use_the_average_and_restore_training_weights():
    model, history, (x, y) = _trained([dks.callbacks.EMA(0.9)])
    training = [v.numpy() for v in model.trainable_variables]
    np.testing.assert_array_equal(training[0], history[-1][0])
    with dks.callbacks.averaged_weights(model, "ema"):
        for v, a in zip(model.trainable_variables, model.optimizer.average_variables("ema")):
            np.testing.assert_array_equal(v.numpy(), a.numpy())
        averaged = model.evaluate(x, y, verbose=0, return_dict=True)
    for v, w in zip(model.trainable_variables, training):
        np.testing.assert_array_equal(v.numpy(), w)
    raw = model.evaluate(x, y, verbose=0, return_dict=True)
    assert averaged["loss"] != raw["loss"]
    # Validation inside fit runs on the averaged weights.
    ema = dks.callbacks.EMA(0.9)
    ema.set_model(model)
    averaged_via_callback = model.evaluate(x, y, verbose=0, return_dict=True, callbacks=[ema])
    assert averaged_via_callback["loss"] == pytest.approx(averaged["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="No weight average named 'polyak'"):
        with dks.callbacks.averaged_weights(model, "polyak"):
            pass


def test_averages_round_trip_through_save_and_load(tmp_path):
    model, _, _ = _trained([dks.callbacks.EMA(0.9), dks.callbacks.Polyak()])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for name in ("ema", "polyak"):
        for a, b in zip(loaded.optimizer.average_variables(name),
                        model.optimizer.average_variables(name)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert loaded.optimizer.averages.count("ema") == 7
    # Saving inside the switch stores the averaged weights as the model's weights.
    with dks.callbacks.averaged_weights(model, "ema"):
        model.save(tmp_path / "ema.keras")
    ema_model = keras.models.load_model(tmp_path / "ema.keras")
    for v, a in zip(ema_model.trainable_variables, model.optimizer.average_variables("ema")):
        np.testing.assert_array_equal(v.numpy(), a.numpy())


def test_conflicting_or_invalid_averages_are_refused():
    with pytest.raises(ValueError, match="decay"):
        dks.callbacks.EMA(1.0)
    with pytest.raises(ValueError, match="start_step"):
        dks.callbacks.Polyak(start_step=-1)
    model, _, _ = _trained([dks.callbacks.EMA(0.9)], steps=1)
    with pytest.raises(ValueError, match="already tracked"):
        model.optimizer.track_average(dks.callbacks.EMA(0.99).spec)
