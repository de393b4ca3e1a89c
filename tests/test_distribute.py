"""DP-SGD under tf.distribute: MirroredStrategy on 2 logical CPU devices, MultiWorkerMirrored
with 2 worker processes on 127.0.0.1, and the per-worker Poisson sampler.

Logical devices must be configured before TensorFlow initializes its devices, so the
distributed runs happen in fresh processes: this file doubles as their script
(``python tests/test_distribute.py mirrored OUT.json`` / ``worker OUT.json`` with TF_CONFIG).
The pytest process checks their results against an independent per-example loop.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_keras_scale as dks  # noqa: E402
from dp_keras_scale.distribute import DistributedBatchSampler  # noqa: E402
from dp_keras_scale.layers import conv_routes  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP, LR, MOMENTUM, EXPECTED = 0.05, 1.0, 0.5, 5.0
SIGMA, NOISE_CLIP, NOISE_SEED = 3.0, 0.5, 11         # noise std 1.5
TRAIN_SEED = 7


# -- shared data and the independent reference ----------------------------------------------

def data(n: int = 16):
    """n examples x 2 copies; masked-out rows and one NaN example (masked in)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=n)
    mask = np.ones(n, np.float32)
    mask[[2, 9]] = 0
    x[5, 1, 3, 3, 0] = np.nan
    return x, y, mask


def microbatches(x, y, mask, rows: int):
    return [(x[i:i + rows], y[i:i + rows], mask[i:i + rows]) for i in range(0, len(x), rows)]


def reference_run(model, batches, accumulation: int, normalizer: float, lr=LR,
                  momentum=MOMENTUM, clip=CLIP):
    """Momentum DP-SGD by a per-example Python loop; returns final weights and epoch metrics."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    velocity = [np.zeros(v.shape, np.float64) for v in variables]
    total = [np.zeros(v.shape, np.float64) for v in variables]
    stats = dict(loss=0.0, valid=0.0, correct=0.0, copies=0.0, clipped=0.0, nonfinite=0.0)
    for step, (xb, yb, mb) in enumerate(batches, start=1):
        for xi, yi, mi in zip(xb, yb, mb):
            labels = np.full(len(xi), yi)
            with tf.GradientTape() as tape:
                logits = model(xi, training=True)
                loss = loss_fn(labels, logits)
            grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
            norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
            if mi <= 0:
                continue
            if not (np.isfinite(norm) and np.isfinite(loss.numpy())):
                stats["nonfinite"] += 1
                continue
            for t, g in zip(total, grads):
                t += mi * min(1.0, clip / norm) * g
            stats["loss"] += float(loss)
            stats["valid"] += 1
            stats["correct"] += float(np.sum(np.argmax(logits, -1) == labels))
            stats["copies"] += len(xi)
            stats["clipped"] += float(norm > clip)
        if step % accumulation == 0:
            for v, m, t in zip(variables, velocity, total):
                m *= momentum
                m -= lr * t / normalizer
                v.assign(v.numpy() + m)
                t[:] = 0
    metrics = {"loss": stats["loss"] / stats["valid"],
               "accuracy": stats["correct"] / stats["copies"],
               "clipped_fraction": stats["clipped"] / stats["valid"],
               "nonfinite_examples": stats["nonfinite"]}
    return [v.numpy() for v in variables], metrics


def small_convnet():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(inputs)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(6, 3, padding="valid")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return dks.DPScaleModel(inputs, keras.layers.Dense(3)(h))


def wide_dense():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    return dks.DPScaleModel(inputs, keras.layers.Dense(1000)(inputs))


def compile_dp(model, **options):
    config = dict(learning_rate=LR, l2_norm_clip=CLIP, noise_multiplier=0.0, noise_seed=TRAIN_SEED)
    config.update(options)
    model.compile(optimizer=dks.DPSGD(**config), metrics=["accuracy"], jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def dp_adam(model):
    model.compile(optimizer=dks.DPOptimizer(
        keras.optimizers.Adam(0.01), l2_norm_clip=CLIP, noise_multiplier=SIGMA,
        noise_seed=NOISE_SEED, expected_batch_size=EXPECTED, gradient_accumulation_steps=2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    return model


def weights(model):
    return [np.array(v.numpy()) for v in model.trainable_variables]


def seed_after(steps: int, seed: tuple, tensors: int) -> list[int]:
    """The noise key after ``steps`` logical steps of a model with ``tensors`` variables."""
    key = tf.constant(seed, tf.int64)
    for _ in range(steps):
        _, key = dks.clipping.split_noise_seed(key, tensors)
    return key.numpy().tolist()


class BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({k: float(np.ravel(v)[0]) for k, v in logs.items()})


class StepWeights(keras.callbacks.Callback):
    """Weights and per-replica noise keys after every logical step."""

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy
        self.weights, self.keys = [], []

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        if int(opt._micro_steps.numpy()) % opt.dp_accumulation_steps == 0:
            self.weights.append(weights(self.model))
            self.keys.append([v.numpy().tolist() for v in
                              self.strategy.experimental_local_results(opt._seed.value)])


def as_lists(arrays):
    return [np.asarray(a).tolist() for a in arrays]


# -- roles run in fresh processes ------------------------------------------------------------

def mirrored_role() -> dict:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y, mask = data()
    out = {"replicas": strategy.num_replicas_in_sync}

    with strategy.scope():   # masks, momentum, accumulation 2, NaN example: 2 logical steps
        model = compile_dp(small_convnet(), momentum=MOMENTUM, expected_batch_size=EXPECTED,
                           gradient_accumulation_steps=2)
    out["masked_initial"] = as_lists(weights(model))
    batch_logs = BatchLogs()
    ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(4)
    history = model.fit(ds, epochs=1, verbose=0, callbacks=[batch_logs])
    out["masked_weights"] = as_lists(weights(model))
    out["masked_copies_equal"] = all(
        np.array_equal(*strategy.experimental_local_results(v.value))
        for v in model.trainable_variables + model.optimizer.variables)
    out["masked_history"] = {k: v[-1] for k, v in history.history.items()}
    out["masked_batch_logs"] = batch_logs.logs
    out["masked_iterations"] = int(model.optimizer.iterations.numpy())

    with strategy.scope():   # fixed-size batches: no mask, normalized by the global rows
        model = compile_dp(small_convnet(), gradient_accumulation_steps=2)
    clean = np.isfinite(x).all(axis=(1, 2, 3, 4))
    ds = tf.data.Dataset.from_tensor_slices((x[clean][:8], y[clean][:8])).batch(4)
    model.fit(ds, epochs=1, verbose=0)
    out["fixed_weights"] = as_lists(weights(model))

    # The per-worker sampler with q = 1 (every example in every step): a known logical batch.
    sampler = DistributedBatchSampler(8, 8, strategy, per_replica_microbatch_size=2, seed=3)
    with strategy.scope():
        model = compile_dp(small_convnet(), gradient_accumulation_steps=sampler.accumulation_steps,
                           expected_batch_size=sampler.expected_batch_size)
    model.fit(sampler.dataset(x[clean][:8], y[clean][:8]), epochs=1, verbose=0,
              steps_per_epoch=sampler.accumulation_steps)
    out["sampler_weights"] = as_lists(weights(model))
    out["sampler_layout"] = [sampler.accumulation_steps, sampler.per_replica_microbatch_size]

    # Noise only: every row masked out, lr = 1, expected batch 1 -> update = -noise.
    with strategy.scope():
        model = compile_dp(wide_dense(), noise_multiplier=SIGMA, l2_norm_clip=NOISE_CLIP,
                           noise_seed=NOISE_SEED, expected_batch_size=1.0,
                           gradient_accumulation_steps=2)
    recorder = StepWeights(strategy)
    zeros = np.zeros((16, 16), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((zeros, np.zeros(16, np.int64),
                                             np.zeros(16, np.float32))).batch(4)
    out["noise_initial"] = as_lists(weights(model))
    model.fit(ds, epochs=1, verbose=0, callbacks=[recorder])
    out["noise_steps"] = [as_lists(w) for w in recorder.weights]
    out["noise_keys"] = recorder.keys
    out["noise_copies_equal"] = all(
        np.array_equal(*strategy.experimental_local_results(v.value))
        for v in model.trainable_variables)

    # Any optimizer under DP: DP-Adam with noise from a fixed key, 2 steps of 2 micro-batches.
    with strategy.scope():
        model = dp_adam(small_convnet())
    out["adam_initial"] = as_lists(weights(model))
    model.fit(tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(4), epochs=1, verbose=0)
    out["adam_weights"] = as_lists(weights(model))
    # The same with the batched per-layer path (static shapes: its conv routes are timed
    # while the replicas trace the step).
    with strategy.scope():
        model = dp_adam(small_convnet())
    model.clipping_method = "auto"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(4, drop_remainder=True),
                  epochs=1, verbose=0)
    out["adam_auto_weights"] = as_lists(weights(model))
    out["adam_auto_warnings"] = [str(w.message) for w in caught]
    out["adam_auto_timed"] = len(conv_routes.timed_routes())
    return out


def worker_role() -> dict:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    print("RUNTIME_READY", flush=True)
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    x, y, mask = data()
    out = {"replicas": strategy.num_replicas_in_sync, "worker": worker}
    with strategy.scope():
        model = compile_dp(small_convnet(), momentum=MOMENTUM, expected_batch_size=EXPECTED,
                           gradient_accumulation_steps=2)
    out["initial"] = as_lists(weights(model))
    try:   # an ordinary dataset would be auto-sharded: refused
        model.fit(tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(4), verbose=0)
        out["plain_dataset_refused"] = False
    except ValueError as error:
        out["plain_dataset_refused"] = "DistributedBatchSampler" in str(error)

    def worker_batches(context):   # worker p feeds rows [2p, 2p + 2) of each 4-row micro-batch
        p = context.input_pipeline_id
        rows = np.concatenate([np.arange(i + 2 * p, i + 2 * p + 2) for i in range(0, 16, 4)])
        return tf.data.Dataset.from_tensor_slices((x[rows], y[rows], mask[rows])).batch(2)

    history = model.fit(strategy.distribute_datasets_from_function(worker_batches), epochs=1,
                        verbose=0, steps_per_epoch=4)
    out["weights"] = as_lists(weights(model))
    out["history"] = {k: v[-1] for k, v in history.history.items()}
    out["key"] = model.optimizer._seed.numpy().tolist()
    out["iterations"] = int(model.optimizer.iterations.numpy())

    # Noise only (sigma > 0): every row masked out, lr = 1, expected batch 1 -> update = -noise.
    with strategy.scope():
        noisy = compile_dp(wide_dense(), noise_multiplier=SIGMA, l2_norm_clip=NOISE_CLIP,
                           noise_seed=NOISE_SEED, expected_batch_size=1.0,
                           gradient_accumulation_steps=2)
        noisy.optimizer.build(noisy.trainable_variables)
    out["noise_initial"] = as_lists(weights(noisy))
    out["noise_initial_key"] = noisy.optimizer._seed.numpy().tolist()

    def masked_zeros(context):    # 2 logical steps of 2 micro-batches of 2 rows per worker
        return tf.data.Dataset.from_tensor_slices(
            (np.zeros((8, 16), np.float32), np.zeros(8, np.int64), np.zeros(8, np.float32))
        ).batch(2)

    recorder = StepWeights(strategy)
    noisy.fit(strategy.distribute_datasets_from_function(masked_zeros), epochs=1, verbose=0,
              steps_per_epoch=4, callbacks=[recorder])
    out["noise_steps"] = [as_lists(w) for w in recorder.weights]
    out["noise_keys"] = recorder.keys
    return out


# -- the tests (pytest process) -------------------------------------------------------------

import pytest  # noqa: E402
from scipy import stats  # noqa: E402


def _run(role: str, tmp_path, env=None, timeout: float = 420) -> subprocess.Popen:
    out = tmp_path / f"{role}-{len(list(tmp_path.iterdir()))}.json"
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, __file__, role, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.out_path, proc.deadline = out, time.monotonic() + timeout
    return proc


def _finish(proc) -> tuple[dict | None, str]:
    try:
        log, _ = proc.communicate(timeout=max(1.0, proc.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        log += "\n[timed out]"
    if proc.returncode == 0 and proc.out_path.exists():
        return json.loads(proc.out_path.read_text()), log
    return None, log


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    result, log = _finish(_run("mirrored", tmp_path_factory.mktemp("mirrored")))
    assert result is not None, f"the MirroredStrategy run failed:\n{log[-6000:]}"
    return result


def _set_weights(model, values):
    for v, w in zip(model.trainable_variables, values):
        v.assign(np.asarray(w, np.float32))


def _assert_weights(actual, expected, rtol=1e-5):
    scale = max(np.max(np.abs(e)) for e in expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(a), e, atol=rtol * scale, rtol=0)


def test_two_replicas_match_one_device_with_masks_accumulation_and_momentum(mirrored):
    assert mirrored["replicas"] == 2
    model = small_convnet()
    _set_weights(model, mirrored["masked_initial"])
    x, y, mask = data()
    expected, metrics = reference_run(model, microbatches(x, y, mask, 4), accumulation=2,
                                      normalizer=EXPECTED)
    _assert_weights(mirrored["masked_weights"], expected)
    assert mirrored["masked_iterations"] == 2 and mirrored["masked_copies_equal"]
    for name, value in metrics.items():    # global metrics, not one replica's or their mean
        assert mirrored["masked_history"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)
        assert mirrored["masked_batch_logs"][-1][name] == pytest.approx(value, rel=1e-5,
                                                                        abs=1e-6)
    assert metrics["nonfinite_examples"] == 1


def test_dp_adam_on_two_replicas_matches_one_device(mirrored):
    model = dp_adam(small_convnet())
    _set_weights(model, mirrored["adam_initial"])
    x, y, mask = data()
    model.fit(tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(4), epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 2
    _assert_weights(mirrored["adam_weights"], weights(model))
    _assert_weights(mirrored["adam_auto_weights"], weights(model))    # batched path, replicas
    assert not mirrored["adam_auto_warnings"] and mirrored["adam_auto_timed"] >= 1


def test_fixed_size_batches_divide_by_the_global_batch(mirrored):
    model = small_convnet()
    _set_weights(model, mirrored["masked_initial"])
    x, y, _ = data()
    clean = np.isfinite(x).all(axis=(1, 2, 3, 4))
    batch = (x[clean][:8], y[clean][:8], np.ones(8, np.float32))
    expected, _ = reference_run(model, [batch], accumulation=1, normalizer=8, momentum=0.0)
    _assert_weights(mirrored["fixed_weights"], expected)       # 2 replicas x 2 micro-batches


def test_distributed_sampler_feeds_the_whole_logical_batch(mirrored):
    assert mirrored["sampler_layout"] == [2, 2]    # 8 rows = 2 micro-batches x 2 replicas x 2
    model = small_convnet()
    _set_weights(model, mirrored["masked_initial"])
    x, y, _ = data()
    clean = np.isfinite(x).all(axis=(1, 2, 3, 4))
    batch = (x[clean][:8], y[clean][:8], np.ones(8, np.float32))
    expected, _ = reference_run(model, [batch], accumulation=1, normalizer=8, momentum=0.0)
    _assert_weights(mirrored["sampler_weights"], expected)


def test_noise_is_added_once_with_std_sigma_c_and_keys_stay_in_sync(mirrored):
    initial = [np.asarray(w) for w in mirrored["noise_initial"]]
    std = SIGMA * NOISE_CLIP
    steps = mirrored["noise_steps"]
    assert len(steps) == 2
    deltas, before = [], initial
    for after in steps:
        deltas.append([np.asarray(b) - np.asarray(a) for a, b in zip(after, before)])
        before = [np.asarray(a) for a in after]
    flat = [np.concatenate([d.ravel() for d in delta]) for delta in deltas]
    for total in flat:   # chi-square: sum of squares / (sigma C)^2 ~ chi2(n)
        n = total.size
        statistic = float(np.sum(total.astype(np.float64) ** 2) / std ** 2)
        assert min(stats.chi2.sf(statistic, n), stats.chi2.cdf(statistic, n)) > 1e-6, \
            f"noise variance {statistic / n:.4f} (sigma C)^2, expected 1"
    assert abs(np.corrcoef(*flat)[0, 1]) < 5 / np.sqrt(flat[0].size)      # fresh every step
    # The total noise is exactly the one draw a single device makes from the same key.
    key = tf.constant([NOISE_SEED, 0x5EED], tf.int64)
    shapes = [np.asarray(w).shape for w in initial]
    for delta in deltas:
        noise, key = dks.clipping.gaussian_noise(shapes, std, key)
        for d, e in zip(delta, noise):
            np.testing.assert_allclose(d, e.numpy(), atol=1e-5 * std * 10)
    assert mirrored["noise_copies_equal"]
    keys = mirrored["noise_keys"]      # [step][replica] -> key
    expected = [seed_after(s, (NOISE_SEED, 0x5EED), len(initial)) for s in (1, 2)]
    assert [k[0] for k in keys] == expected and all(k[0] == k[1] for k in keys)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _train_two_workers(tmp_path) -> tuple[list, list[str], list[int]]:
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [_run("worker", tmp_path, {"TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}})}) for i in range(2)]
    finished = [_finish(p) for p in procs]
    return [r for r, _ in finished], [log for _, log in finished], ports


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("workers")
    for attempt in range(2):      # a second try with fresh ports if the cluster did not start
        results, logs, ports = _train_two_workers(tmp_path)
        started = all("RUNTIME_READY" in log for log in logs)
        if started or all(r is not None for r in results):
            break
    if any(r is None for r in results):
        joined = "\n----\n".join(log[-4000:] for log in logs)
        if not started:
            print(joined)
            pytest.skip("the multi-worker runtime did not start in this sandbox (2 workers on "
                        f"127.0.0.1:{ports}, twice); worker logs printed above")
        pytest.fail(f"multi-worker training failed:\n{joined}")
    return results


def test_multi_worker_two_processes_match_one_process(two_workers):
    results = two_workers
    first, second = results
    assert first["replicas"] == second["replicas"] == 2
    assert first["plain_dataset_refused"] and second["plain_dataset_refused"]

    model = small_convnet()
    _set_weights(model, first["initial"])
    x, y, mask = data()
    expected, metrics = reference_run(model, microbatches(x, y, mask, 4), accumulation=2,
                                      normalizer=EXPECTED)
    for result in (first, second):
        _assert_weights(result["weights"], expected)
        assert result["iterations"] == 2
        assert result["key"] == seed_after(2, (TRAIN_SEED, 0x5EED), len(expected))
        for name, value in metrics.items():
            assert result["history"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_multi_worker_noise_is_added_once_not_once_per_worker(two_workers):
    # sigma > 0 on 2 worker processes: the update is the single-device draw from the same key
    # (noise from every worker would double its variance and differ from that draw).
    std = SIGMA * NOISE_CLIP
    for result in two_workers:
        assert result["noise_initial_key"] == two_workers[0]["noise_initial_key"]
        initial = [np.asarray(w) for w in result["noise_initial"]]
        assert len(result["noise_steps"]) == 2
        key = tf.constant(result["noise_initial_key"], tf.int64)
        before = initial
        for after, keys in zip(result["noise_steps"], result["noise_keys"]):
            delta = [b - np.asarray(a) for a, b in zip(after, before)]
            before = [np.asarray(a) for a in after]
            flat = np.concatenate([d.ravel() for d in delta]).astype(np.float64)
            statistic = float(np.sum(flat ** 2) / std ** 2)      # ~ chi2(n) for one draw
            assert min(stats.chi2.sf(statistic, flat.size),
                       stats.chi2.cdf(statistic, flat.size)) > 1e-6, \
                f"noise variance {statistic / flat.size:.3f} (sigma C)^2, expected 1"
            noise, key = dks.clipping.gaussian_noise([d.shape for d in delta], std, key)
            for d, e in zip(delta, noise):
                np.testing.assert_allclose(d, e.numpy(), atol=1e-4 * std)
            assert keys == [key.numpy().tolist()]                 # one replica per worker
    for a, b in zip(two_workers[0]["noise_steps"][-1], two_workers[1]["noise_steps"][-1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- the sampler, in process ----------------------------------------------------------------

def test_sampler_layout_fits_every_worker_and_divides_between_replicas():
    sampler = DistributedBatchSampler(1000, 100, num_replicas=4, num_input_pipelines=2,
                                      per_replica_microbatch_size=16)
    need = stats.binom.isf(1e-12 / 2, 500, 0.1) + 1
    assert sampler.worker_padded_size >= need
    assert sampler.worker_padded_size == (sampler.accumulation_steps * 2
                                          * sampler.per_replica_microbatch_size)
    assert sampler.per_replica_microbatch_size <= 16
    assert sampler.global_microbatch_size == 4 * sampler.per_replica_microbatch_size
    assert sampler.sampling_rate == 0.1
    tpu = DistributedBatchSampler(1000, 100, num_replicas=8, num_input_pipelines=1,
                                  per_replica_microbatch_size=16, row_multiple=8)
    assert tpu.per_replica_microbatch_size % 8 == 0
    assert tpu.worker_padded_size >= stats.binom.isf(1e-12, 1000, 0.1) + 1
    full = DistributedBatchSampler(10, 10, num_replicas=2, num_input_pipelines=2)
    assert full.worker_padded_size == 5                     # never more than the shard
    with pytest.raises(ValueError, match="evenly"):
        DistributedBatchSampler(100, 10, num_replicas=3, num_input_pipelines=2)


def test_per_worker_poisson_samples_are_one_poisson_sample_of_rate_q():
    n, q, steps = 60, 0.25, 3000
    sampler = DistributedBatchSampler(n, n * q, num_replicas=2, num_input_pipelines=2, seed=5)
    counts = np.zeros(n)
    sizes = []
    for _ in range(steps):
        parts = [sampler.sample_indices(p) for p in range(2)]
        for p, part in enumerate(parts):
            chosen = part[part >= 0]
            assert np.all(chosen % 2 == p) and len(set(chosen)) == len(chosen)
        union = np.concatenate([part[part >= 0] for part in parts])
        counts[union] += 1
        sizes.append(len(union))
    # Every example is included with probability q ...
    chi2 = np.sum((counts - steps * q) ** 2 / (steps * q * (1 - q)))
    assert stats.chi2.sf(chi2, n) > 1e-6
    # ... independently across workers: the global batch size is Binomial(n, q). Correlated
    # worker streams (e.g. one seed on every worker) would inflate its variance.
    sizes = np.asarray(sizes)
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / steps)
    dispersion = (steps - 1) * sizes.var(ddof=1) / (n * q * (1 - q))
    assert min(stats.chi2.sf(dispersion, steps - 1), stats.chi2.cdf(dispersion, steps - 1)) > 1e-6


def test_sampler_raises_instead_of_dropping_examples():
    sampler = DistributedBatchSampler(200, 100, num_replicas=1, num_input_pipelines=1,
                                      overflow_probability=0.5, seed=0)
    with pytest.raises(RuntimeError, match="exceeded the padded size"):
        for _ in range(200):
            sampler.sample_indices(0)


def test_worker_dataset_deals_each_logical_batch_exactly_once():
    n = 40
    sampler = DistributedBatchSampler(n, 10, num_replicas=4, num_input_pipelines=2,
                                      per_replica_microbatch_size=3, seed=1)
    x = np.arange(n, dtype=np.float32)[:, None]
    per_step = sampler.accumulation_steps * sampler.local_replicas
    elements = list(sampler.worker_dataset(x, np.arange(n), pipeline_id=1, steps=3))
    assert len(elements) == 3 * per_step
    for step in range(3):
        chunk = elements[step * per_step:(step + 1) * per_step]
        assert all(xb.shape[0] == sampler.per_replica_microbatch_size for xb, _, _ in chunk)
        rows = np.concatenate([xb.numpy()[mb.numpy() > 0, 0] for xb, _, mb in chunk])
        labels = np.concatenate([yb.numpy()[mb.numpy() > 0] for _, yb, mb in chunk])
        assert np.array_equal(rows, labels) and len(set(rows)) == len(rows)
        assert np.all(rows % 2 == 1)                       # worker 1's shard only


if __name__ == "__main__":
    role, path = sys.argv[1], sys.argv[2]
    result = {"mirrored": mirrored_role, "worker": worker_role}[role]()
    with open(path, "w") as f:
        json.dump(result, f)
