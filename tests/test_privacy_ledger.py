"""The reported epsilon is the guarantee of what ran: fit boundaries, sigma changes, recompiles,
restores, seeds, released files and run directories."""

from __future__ import annotations

import json
import os
import zipfile

import dp_accounting
import h5py
import keras
import numpy as np
import pytest

import dp_keras_scale as dks
from dp_keras_scale import accounting, experiment
from dp_keras_scale.config import dumps, load_config
from dp_keras_scale.ledger import PrivacyLedger, Segment

N, BATCH, DELTA = 64, 8, 1e-5
Q = BATCH / N


class StopAfter(keras.callbacks.Callback):
    """Ends the fit after `after` Keras batches (an interrupted cell, a budget stop)."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 >= self.after:
            self.model.stop_training = True


def _dense_model(sigma, learning_rate=0.1, accumulation=1, **dpsgd):
    keras.utils.set_random_seed(0)
    model = dks.make_private(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    model.compile(optimizer=dks.DPSGD(learning_rate, noise_multiplier=sigma,
                                      gradient_accumulation_steps=accumulation,
                                      expected_batch_size=BATCH, **dpsgd), loss="mse")
    return model


def _dataset(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 4)).astype("float32")
    return dks.data.BatchSampler(N, BATCH).dataset(x, np.zeros((N, 2), "float32"))


def _budget(**kwargs):
    return dks.callbacks.PrivacyBudget(delta=DELTA, dataset_size=N, accountant="rdp",
                                       verbose=0, **kwargs)


def _rdp_epsilon(*segments):
    """Independent reference: dp_accounting's own composition of the segments."""
    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in segments]
    rdp = dp_accounting.rdp.RdpAccountant(accounting.RDP_ORDERS)
    return rdp.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(DELTA)


# ------------------------------------------------------------------ a step within one fit


def test_a_logical_step_never_sums_two_sampled_batches():
    """4 orthogonal examples, q = 1, C = 1, two micro-batches per step; a fit that ends after
    one micro-batch must not leave that micro-batch in the next fit's first noisy step."""
    keras.utils.set_random_seed(0)
    model = dks.make_private(keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]))
    padded = dks.data.BatchSampler(4, 4).padded_batch_size
    sampler = dks.data.BatchSampler(4, 4, microbatch_size=-(-padded // 2))
    assert sampler.accumulation_steps == 2
    model.compile(optimizer=dks.DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=0.0,
                                      gradient_accumulation_steps=2, expected_batch_size=4),
                  loss="mse")
    # Each example's gradient points along its own axis (norm 200 -> clipped to 1).
    ds = sampler.dataset(100 * np.eye(4, dtype="float32"), np.full((4, 1), 100, "float32"))
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0, callbacks=[StopAfter(1)])
    opt = model.optimizer
    assert int(opt.iterations) == 0
    assert all(np.all(acc.numpy() == 0) for acc in opt._accumulators)   # nothing left behind

    before = model.get_weights()[0].ravel().copy()
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
    assert int(opt.iterations) == 1
    # w <- w - lr * sum_i clip(g_i) / B: each example moves its own weight by 1/4.
    contributions = (model.get_weights()[0].ravel() - before) * 4
    np.testing.assert_allclose(contributions, [1, 1, 1, 1], atol=1e-5)


def test_steps_per_epoch_must_be_whole_logical_steps():
    model = _dense_model(1.0, accumulation=2)
    with pytest.raises(ValueError, match="multiple of 2"):
        model.fit(_dataset(), epochs=1, steps_per_epoch=3, verbose=0)


# ------------------------------------------------------------------ the ledger


def test_sigma_changed_between_fits_is_composed_step_by_step():
    model = _dense_model(0.5)
    model.fit(_dataset(), epochs=1, steps_per_epoch=20, verbose=0, callbacks=[_budget()])
    model.optimizer.noise_multiplier = 50.0
    budget = _budget()
    model.fit(_dataset(1), epochs=1, steps_per_epoch=20, verbose=0, callbacks=[budget])
    assert [(s.noise_multiplier, s.steps) for s in budget.spent()] == [(0.5, 20), (50.0, 20)]
    expected = _rdp_epsilon((0.5, Q, 20), (50.0, Q, 20))
    assert budget.epsilon_now == pytest.approx(expected, rel=1e-9)
    # What a constant-sigma accountant would have claimed: far below what ran.
    assert budget.epsilon_now > 10 * accounting.epsilon(50.0, Q, 40, DELTA, "rdp")
    statement = budget.statement(l2_norm_clip=1.0)
    assert statement.epsilon == pytest.approx(expected, rel=1e-9) and statement.steps == 40
    assert "20 steps at noise multiplier 0.5" in str(statement)


def test_recompile_with_a_new_optimizer_carries_the_ledger_over(tmp_path):
    model = _dense_model(1.0)
    model.fit(_dataset(), epochs=1, steps_per_epoch=5, verbose=0)
    model.compile(optimizer=dks.DPSGD(0.01, noise_multiplier=2.0, expected_batch_size=BATCH),
                  loss="mse")
    assert int(model.optimizer.iterations) == 0
    budget = _budget()
    model.fit(_dataset(1), epochs=1, steps_per_epoch=5, verbose=0, callbacks=[budget])
    spent = [(s.noise_multiplier, s.steps) for s in model.optimizer.spent()]
    assert spent == [(1.0, 5), (2.0, 5)]
    assert budget.epsilon_now == pytest.approx(_rdp_epsilon((1.0, Q, 5), (2.0, Q, 5)), rel=1e-9)

    # Checkpoints carry it: a whole-model save and a weights checkpoint.
    model.save(tmp_path / "ckpt.keras")
    loaded = keras.models.load_model(tmp_path / "ckpt.keras")
    assert loaded.optimizer.spent() == model.optimizer.spent()
    model.save_weights(tmp_path / "ckpt.weights.h5")
    fresh = _dense_model(2.0, learning_rate=0.01)
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(tmp_path / "ckpt.weights.h5")
    assert [(s.noise_multiplier, s.steps) for s in fresh.optimizer.spent()] == spent
    fresh.fit(_dataset(2), epochs=1, steps_per_epoch=3, verbose=0)   # no budget: q unknown
    assert [(s.noise_multiplier, s.sampling_rate, s.steps) for s in fresh.optimizer.spent()] \
        == [(1.0, None, 5), (2.0, Q, 5), (2.0, None, 3)]


def test_a_resume_under_another_sigma_is_composed(tmp_path):
    backup = tmp_path / "backup"

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt("simulated kill")

    model = _dense_model(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.fit(_dataset(), epochs=4, steps_per_epoch=4, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup), Kill()])
    resumed = _dense_model(3.0)
    budget = _budget()
    resumed.fit(_dataset(1), epochs=4, steps_per_epoch=4, verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(backup), budget])
    # Two epochs were checkpointed at sigma 1 before the kill; the resumed two ran at sigma 3.
    assert [(s.noise_multiplier, s.steps) for s in budget.spent()] == [(1.0, 8), (3.0, 8)]
    assert budget.epsilon_now == pytest.approx(_rdp_epsilon((1.0, Q, 8), (3.0, Q, 8)),
                                               rel=1e-9)


def test_ledger_bookkeeping_and_array_round_trip():
    ledger = PrivacyLedger()
    ledger.update(0, noise_multiplier=1.0, expected_batch_size=8.0)
    ledger.update(3, sampling_rate=0.5)
    ledger.update(3, sampling_rate=0.5)                 # unchanged: no new segment
    ledger.update(7, noise_multiplier=2.0)
    spent = ledger.spent(9)
    assert [(s.noise_multiplier, s.sampling_rate, s.steps) for s in spent] == \
        [(1.0, None, 3), (1.0, 0.5, 4), (2.0, 0.5, 2)]
    assert PrivacyLedger.from_array(PrivacyLedger.to_array(spent)) == spent
    resolved = PrivacyLedger.resolved(spent, dataset_size=64)
    assert [s.sampling_rate for s in resolved] == [8 / 64, 0.5, 0.5]
    # Steps recorded with their own expected batch keep it over a later run's rate.
    resolved = PrivacyLedger.resolved(spent, dataset_size=64, sampling_rate=0.01)
    assert [s.sampling_rate for s in resolved] == [8 / 64, 0.5, 0.5]
    assert PrivacyLedger.resolved([Segment(1.0, 3)], sampling_rate=0.01)[0].sampling_rate \
        == 0.01
    with pytest.raises(ValueError, match="no known sampling rate"):
        PrivacyLedger.resolved([Segment(1.0, 3)])
    with pytest.raises(RuntimeError, match="went back"):
        ledger.update(2, noise_multiplier=3.0)


# ------------------------------------------------------------------ the budget


def test_a_fit_after_the_planned_steps_is_refused_before_any_step():
    model = _dense_model(1.0)
    model.fit(_dataset(), epochs=3, steps_per_epoch=4, verbose=0,
              callbacks=[_budget(planned_steps=6)])
    assert int(model.optimizer.iterations) == 6
    weights = model.get_weights()
    with pytest.raises(ValueError, match="already taken 6 steps"):
        model.fit(_dataset(1), epochs=1, steps_per_epoch=4, verbose=0,
                  callbacks=[_budget(planned_steps=6)])
    assert int(model.optimizer.iterations) == 6
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_a_fit_after_the_budget_is_spent_is_refused_before_any_step():
    target = accounting.epsilon(1.0, Q, 6, DELTA, "rdp")        # exactly 6 steps fit
    model = _dense_model(1.0)
    model.fit(_dataset(), epochs=3, steps_per_epoch=4, verbose=0,
              callbacks=[_budget(target_epsilon=target)])
    assert int(model.optimizer.iterations) == 6
    with pytest.raises(ValueError, match="no training is possible within budget"):
        model.fit(_dataset(1), epochs=1, steps_per_epoch=4, verbose=0,
                  callbacks=[_budget(target_epsilon=target)])
    assert int(model.optimizer.iterations) == 6
    # Calibrating sigma for more steps after the budget is spent is refused too.
    with pytest.raises(ValueError, match="already taken"):
        accounting.calibrate_noise_multiplier(target, Q, 5, DELTA, "rdp",
                                              spent=[(1.0, Q, 6)])


def test_calibration_after_earlier_steps_meets_the_target_over_the_whole_ledger():
    spent = [(2.0, Q, 10)]
    sigma = accounting.calibrate_noise_multiplier(4.0, Q, 30, DELTA, "rdp", spent=spent)
    total = accounting.composed_epsilon(spent + [(sigma, Q, 30)], DELTA, "rdp")
    assert 4.0 * 0.99 < total <= 4.0
    steps = accounting.calibrate_steps(4.0, 1.5, Q, DELTA, "rdp", spent=spent)
    assert accounting.composed_epsilon(spent + [(1.5, Q, steps)], DELTA, "rdp") <= 4.0
    assert accounting.composed_epsilon(spent + [(1.5, Q, steps + 1)], DELTA, "rdp") > 4.0


# ------------------------------------------------------------------ seeds and released files


def test_seeded_noise_is_flagged_as_no_guarantee():
    model = _dense_model(1.0, noise_seed=3)
    budget = _budget()
    model.fit(_dataset(), epochs=1, steps_per_epoch=2, verbose=0, callbacks=[budget])
    text = str(budget.statement(l2_norm_clip=1.0))
    assert "no privacy guarantee: deterministic noise" in text
    honest = _dense_model(1.0)
    budget = _budget()
    honest.fit(_dataset(), epochs=1, steps_per_epoch=2, verbose=0, callbacks=[budget])
    text = str(budget.statement(l2_norm_clip=1.0))
    assert "deterministic noise" not in text and "Guarantee: (" in text


def test_a_config_seed_never_seeds_the_noise_unless_asked():
    config = load_config("mnist_cpu", ["training.seed=5"])
    sampler = dks.data.BatchSampler(N, BATCH)
    assert experiment._optimizer(config, sampler, 5, 1.0).noise_seed is None
    config = load_config("mnist_cpu", ["training.seed=5", "privacy.deterministic_noise=true"])
    assert experiment._optimizer(config, sampler, 5, 1.0).noise_seed == 5
    with pytest.raises(ValueError, match="needs an integer training.seed"):
        experiment._optimizer(config, sampler, None, 1.0)


def _h5_paths(path) -> list[str]:
    with zipfile.ZipFile(path) as z, z.open("model.weights.h5") as f, h5py.File(f) as h5:
        names: list[str] = []
        h5.visit(names.append)
    return names


def test_the_released_model_holds_no_optimizer_state(tmp_path):
    model = _dense_model(1.0, accumulation=2)
    model.fit(_dataset(), epochs=1, steps_per_epoch=4, verbose=0)
    model.save(tmp_path / "checkpoint.keras")
    assert any("optimizer" in p for p in _h5_paths(tmp_path / "checkpoint.keras"))  # control
    experiment.save_release(model, str(tmp_path / "model.keras"))
    assert not any("optimizer" in p for p in _h5_paths(tmp_path / "model.keras"))
    with zipfile.ZipFile(tmp_path / "model.keras") as z:
        assert not json.loads(z.read("config.json")).get("compile_config")
    released = keras.models.load_model(tmp_path / "model.keras")
    x = np.ones((3, 4), "float32")
    np.testing.assert_allclose(released.predict(x, verbose=0), model.predict(x, verbose=0))


# ------------------------------------------------------------------ run directories


def _write_run(run_dir, config, *files):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.toml"), "w") as f:
        f.write(dumps(config))
    for name in files:
        if name.endswith("/"):
            os.makedirs(os.path.join(run_dir, name), exist_ok=True)
        else:
            open(os.path.join(run_dir, name), "w").close()


def test_resuming_with_changed_settings_is_refused(tmp_path):
    run = str(tmp_path / "run")
    old = load_config("fashion_mnist_cpu", ["training.epochs=4", "privacy.target_epsilon=8"])
    _write_run(run, old, "backup/", "metrics.json")
    new = load_config("fashion_mnist_cpu", ["training.epochs=4", "privacy.target_epsilon=3"])
    with pytest.raises(ValueError, match=r"privacy.target_epsilon: 8.0 -> 3.0"):
        experiment.check_run_dir(run, new)
    other = load_config("mnist_cpu", ["training.epochs=4", "privacy.target_epsilon=8"])
    with pytest.raises(ValueError, match=r"data.dataset: 'fashion_mnist' -> 'mnist'"):
        experiment.check_run_dir(run, other)
    same = load_config("fashion_mnist_cpu", ["training.epochs=4", "privacy.target_epsilon=8",
                                             "data.data_dir=/elsewhere"])
    assert experiment.check_run_dir(run, same) == "resume"


def test_finished_and_foreign_directories_are_refused_and_stale_files_removed(tmp_path):
    config = load_config("mnist_cpu")
    finished = str(tmp_path / "finished")
    _write_run(finished, config, "summary.json", "model.keras", "audit.json")
    with pytest.raises(ValueError, match="holds a finished run"):
        experiment.check_run_dir(finished, config)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a run directory"):
        experiment.check_run_dir(str(foreign), config)
    # A run that stopped before its first checkpoint starts over without stale files.
    failed = str(tmp_path / "failed")
    _write_run(failed, load_config("fashion_mnist_cpu"), "metrics.json", "accuracy.png")
    assert experiment.check_run_dir(failed, config) == "restart"
    assert os.listdir(failed) == ["config.toml"]
    assert experiment.check_run_dir(str(tmp_path / "absent"), config) == "new"


def test_a_run_directory_states_deterministic_noise_and_releases_no_optimizer(tmp_path, capsys):
    run = str(tmp_path / "run")
    config = load_config("mnist_cpu", ["training.steps=2", "data.train_subset=1000",
                                       "training.batch_size=256",
                                       "data.test_subset=200", "training.seed=3",
                                       "privacy.deterministic_noise=true",
                                       "run.training_metrics=false"])
    experiment.train(config, run, verbose=0)
    with open(os.path.join(run, "metrics.json")) as f:     # training metrics left out
        assert not any(k.startswith("nonprivate") or k in ("loss", "accuracy")
                       for row in json.load(f) for k in row)
    assert not os.path.exists(os.path.join(run, "tensorboard"))
    assert "NO privacy guarantee" in capsys.readouterr().err
    with open(os.path.join(run, "privacy.txt")) as f:
        assert "no privacy guarantee: deterministic noise" in f.read()
    with open(os.path.join(run, "privacy.json")) as f:
        statement = json.load(f)
    assert statement["deterministic_noise"] and statement["steps"] == 2
    assert not any("optimizer" in p for p in _h5_paths(os.path.join(run, "model.keras")))
    with pytest.raises(ValueError, match="holds a finished run"):
        experiment.train(config, run, verbose=0)
