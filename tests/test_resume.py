"""Interrupted-and-resumed training, calibration by target epsilon, and the live noise scale."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import dp_keras_scale as dks
from conftest import small_convnet, xent

N, BATCH, DELTA = 64, 8, 1e-3
SIGMA = 1.5


class Interrupt(keras.callbacks.Callback):
    """Raises (like a killed process) after `after` Keras batches of a fit call."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.seen = after, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt("simulated kill")


class RecordNoiseKeys(keras.callbacks.Callback):
    """Records the noise key each logical step is about to use."""

    def __init__(self, keys: list):
        super().__init__()
        self.keys = keys

    def on_train_batch_begin(self, batch, logs=None):
        opt = self.model.optimizer
        if opt.built and int(opt._micro_steps.numpy()) % opt.dp_accumulation_steps == 0:
            self.keys.append(tuple(opt._seed.numpy()))


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 8, 8, 3)).astype("float32"), rng.integers(0, 3, N)


def _new_run(noise_multiplier=SIGMA, accumulation=1):
    """A fresh model, optimizer and input pipeline, as a new process would build them."""
    x, y = _data()
    padded = dks.data.BatchSampler(N, BATCH).padded_batch_size
    sampler = dks.data.BatchSampler(N, BATCH, microbatch_size=-(-padded // accumulation))
    model = small_convnet()
    model.compile(optimizer=dks.DPSGD(0.5, l2_norm_clip=1.0, noise_multiplier=noise_multiplier,
                                      gradient_accumulation_steps=sampler.accumulation_steps,
                                      expected_batch_size=BATCH),
                  loss=xent())
    return model, sampler, sampler.dataset(x, y)


def _budget(planned_steps, **kwargs):
    return dks.callbacks.PrivacyBudget(delta=DELTA, sampling_rate=BATCH / N, dataset_size=N,
                                       planned_steps=planned_steps, verbose=0, **kwargs)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_interrupted_then_resumed_run_matches_the_plan_and_never_reuses_noise(tmp_path,
                                                                              accumulation):
    planned, steps_per_epoch = 10, 4        # logical steps; the plan ends mid-epoch 3
    keys: list = []
    # Run 1: checkpoints every 3 Keras batches, killed during the second epoch.
    model, sampler, ds = _new_run(accumulation=accumulation)
    assert sampler.accumulation_steps == accumulation
    backup = keras.callbacks.BackupAndRestore(tmp_path / "backup", save_freq=3)
    with pytest.raises(KeyboardInterrupt):
        model.fit(ds, epochs=5, steps_per_epoch=steps_per_epoch * accumulation, verbose=0,
                  callbacks=[_budget(planned), RecordNoiseKeys(keys),
                             Interrupt(6 * accumulation - 1), backup])
    steps_before = int(model.optimizer.iterations)

    # Run 2: a new model/optimizer/pipeline resumes from the backup directory.
    model, sampler, ds = _new_run(accumulation=accumulation)
    budget = _budget(planned)
    resumed_keys: list = []
    model.fit(ds, epochs=5, steps_per_epoch=steps_per_epoch * accumulation, verbose=0,
              callbacks=[budget, RecordNoiseKeys(resumed_keys),
                         keras.callbacks.BackupAndRestore(tmp_path / "backup", save_freq=3)])

    assert 0 < steps_before < planned
    assert int(model.optimizer.iterations) == planned       # same step count as planned
    expected = dks.accounting.epsilon(SIGMA, BATCH / N, planned, DELTA)
    assert budget.epsilon_now == pytest.approx(expected, rel=1e-9)
    # Every logical step of both runs (including the steps lost after the last checkpoint)
    # used its own noise key; the resumed run started from a fresh one.
    all_keys = keys + resumed_keys
    assert len(set(all_keys)) == len(all_keys)
    assert len(resumed_keys) > 0
    opt = model.optimizer
    assert int(opt._micro_steps.numpy()) == planned * accumulation
    assert all(np.all(acc.numpy() == 0) for acc in opt._accumulators)


def test_restoring_mid_step_drops_the_partial_accumulation(tmp_path):
    class SaveMidStep(keras.callbacks.Callback):
        """Checkpoints after 3 micro-batches: 1 step + half of the next (a save_freq of 3)."""

        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                opt = self.model.optimizer
                assert any(np.any(acc.numpy() != 0) for acc in opt._accumulators)
                self.model.save_weights(tmp_path / "mid.weights.h5")

    model, sampler, ds = _new_run(accumulation=2)
    model.fit(ds, epochs=1, steps_per_epoch=4, verbose=0, callbacks=[SaveMidStep()])

    restored, _, _ = _new_run(accumulation=2)
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(tmp_path / "mid.weights.h5")
    opt = restored.optimizer
    assert int(opt.iterations) == 1 and int(opt._micro_steps.numpy()) == 2
    assert all(np.all(acc.numpy() == 0) for acc in opt._accumulators)
    assert [(s.noise_multiplier, s.steps) for s in opt.spent()] == [(SIGMA, 1)]


def test_noise_multiplier_none_is_calibrated_by_the_budget():
    model, sampler, ds = _new_run(noise_multiplier=None)
    planned = 6
    model.fit(ds, epochs=2, steps_per_epoch=4, verbose=0,
              callbacks=[_budget(planned, target_epsilon=4.0)])
    sigma = model.optimizer.noise_multiplier
    assert sigma == dks.accounting.calibrate_noise_multiplier(4.0, BATCH / N, planned, DELTA)
    assert int(model.optimizer.iterations) == planned
    eps = dks.accounting.epsilon(sigma, BATCH / N, planned, DELTA)
    assert 4.0 * 0.99 < eps <= 4.0
    assert model.optimizer._noise_stddev_variable.numpy() == pytest.approx(sigma)


@pytest.mark.parametrize("callbacks", [[], [_budget(6)]])
def test_uncalibrated_noise_multiplier_refuses_to_train(callbacks):
    model, sampler, ds = _new_run(noise_multiplier=None)
    with pytest.raises(ValueError, match="noise_multiplier=None"):
        model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0, callbacks=callbacks)
    assert not model.optimizer.built or int(model.optimizer.iterations) == 0


def test_changing_noise_multiplier_between_fits_takes_effect():
    model, sampler, ds = _new_run(noise_multiplier=0.0)
    model.optimizer.learning_rate = 1e-3
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)    # traces with sigma = 0
    before = [v.numpy() for v in model.trainable_variables]
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    quiet = np.concatenate([(v.numpy() - b).ravel() for v, b in
                            zip(model.trainable_variables, before)])
    model.optimizer.noise_multiplier = 1000.0
    before = [v.numpy() for v in model.trainable_variables]
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    noisy = np.concatenate([(v.numpy() - b).ravel() for v, b in
                            zip(model.trainable_variables, before)])
    # update = lr * (clipped sum + noise) / B: noise std lr * sigma * C / B = 0.125 per weight.
    assert np.std(quiet) < 0.01 and 0.1 < np.std(noisy) < 0.15
