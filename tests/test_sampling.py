"""Batch samplers: the sampling the accountant is told about is the sampling that happens."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import dp_keras_scale as dks
from dp_keras_scale.data import BatchSampler


def test_poisson_inclusion_is_independent_with_rate_q():
    sampler = BatchSampler(200, expected_batch_size=20, seed=0)
    counts = np.zeros(200)
    sizes = []
    for _ in range(2000):
        indices = sampler.sample_indices()
        chosen = indices[indices >= 0]
        assert len(np.unique(chosen)) == len(chosen)
        counts[chosen] += 1
        sizes.append(len(chosen))
    # Each example is included Binomial(2000, 0.1) times; batch sizes are Binomial(200, 0.1).
    assert stats.chisquare(counts).pvalue > 1e-4
    assert abs(np.mean(sizes) - 20) < 5 * np.sqrt(200 * 0.1 * 0.9 / 2000)
    assert abs(np.var(sizes) / (200 * 0.1 * 0.9) - 1) < 0.15


def test_fixed_size_batches_without_replacement():
    sampler = BatchSampler(50, expected_batch_size=10, sampling="fixed", seed=0)
    assert sampler.padded_batch_size == 10 and sampler.accumulation_steps == 1
    firsts = [sampler.sample_indices() for _ in range(300)]
    for indices in firsts:
        assert len(set(indices)) == 10 and indices.min() >= 0
    assert stats.chisquare(np.bincount(np.concatenate(firsts), minlength=50)).pvalue > 1e-4


def test_padding_covers_the_binomial_tail_and_splits_into_microbatches():
    sampler = BatchSampler(60000, expected_batch_size=256, microbatch_size=64, seed=0)
    assert sampler.microbatch_size <= 64
    assert sampler.padded_batch_size == sampler.accumulation_steps * sampler.microbatch_size
    assert stats.binom.sf(sampler.padded_batch_size, 60000, 256 / 60000) < 1e-12
    # Padding is minimal: one fewer micro-batch, or one fewer row each, would not cover the tail.
    assert stats.binom.sf((sampler.accumulation_steps - 1) * 64, 60000, 256 / 60000) > 1e-12
    assert stats.binom.sf(sampler.padded_batch_size - sampler.accumulation_steps,
                          60000, 256 / 60000) > 1e-12
    assert sampler.steps_per_epoch == int(np.ceil(60000 / 256)) * sampler.accumulation_steps


def test_dataset_yields_masked_microbatches_with_aligned_labels():
    x = np.arange(30, dtype=np.float32).reshape(30, 1) * np.ones((30, 3), np.float32)
    y = np.arange(30)
    ds, sampler = dks.data.poisson_batches(x, y, expected_batch_size=6, microbatch_size=4,
                                           steps=5, seed=1)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 5 * sampler.accumulation_steps
    for xb, yb, mask in batches:
        assert xb.shape == (4, 3) and mask.shape == (4,)
        real = mask > 0
        np.testing.assert_array_equal(xb[real, 0], yb[real])    # labels stay with their images
    total = sum(mask.sum() for _, _, mask in batches)
    assert 0 < total < 5 * sampler.padded_batch_size


def test_overflowing_batch_raises_instead_of_dropping_examples():
    sampler = BatchSampler(100, expected_batch_size=10, overflow_probability=0.5, seed=0)
    sampler.sampling_rate = 0.9   # force a batch far above the padded size
    with pytest.raises(RuntimeError, match="exceeded the padded size"):
        sampler.sample_indices()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_examples=10, expected_batch_size=11), "expected_batch_size"),
    (dict(num_examples=10, expected_batch_size=2, sampling="shuffle"), "sampling"),
    (dict(num_examples=10, expected_batch_size=2.5, sampling="fixed"), "integer"),
    (dict(num_examples=0, expected_batch_size=1), "num_examples"),
])
def test_bad_sampler_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSampler(**kwargs)


def test_poisson_training_end_to_end_uses_expected_batch_size():
    import keras
    import tensorflow as tf
    from conftest import assert_close, compile_dp, small_convnet, weights_of, xent
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    steps, lr, clip = 3, 0.5, 1.0
    ds, sampler = dks.data.poisson_batches(x, y, expected_batch_size=8, microbatch_size=8,
                                           seed=3)
    model = compile_dp(small_convnet(), learning_rate=lr, noise_multiplier=0.0,
                       l2_norm_clip=clip, expected_batch_size=sampler.expected_batch_size,
                       gradient_accumulation_steps=sampler.accumulation_steps)
    assert sampler.accumulation_steps > 1          # the logical batch spans micro-batches
    model.fit(ds, steps_per_epoch=steps * sampler.accumulation_steps, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == steps

    # Reference: the same draws (a sampler with the same seed), a per-example loop, and plain
    # SGD on sum_i clip(g_i) / 8, whatever the number of examples the batch realized.
    twin = BatchSampler(40, expected_batch_size=8, microbatch_size=8, seed=3)
    reference = small_convnet(model_class=keras.Model)
    by_expected, by_realized, sizes = weights_of(reference), weights_of(reference), []
    for _ in range(steps):
        chosen = twin.sample_indices()
        chosen = chosen[chosen >= 0]
        sizes.append(len(chosen))
        for weights, normalizer in ((by_expected, 8.0), (by_realized, float(len(chosen)))):
            for v, w in zip(reference.trainable_variables, weights):
                v.assign(w)
            total = [np.zeros(w.shape, np.float64) for w in weights]
            for i in chosen:
                with tf.GradientTape() as tape:
                    loss = xent()(y[i:i + 1], reference(x[i:i + 1], training=True))
                grads = [g.numpy().astype(np.float64)
                         for g in tape.gradient(loss, reference.trainable_variables)]
                norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
                for t, g in zip(total, grads):
                    t += min(1.0, clip / norm) * g
            weights[:] = [w - lr * t / normalizer for w, t in zip(weights, total)]
    assert 8 not in sizes and any(abs(n - 8) >= 3 for n in sizes), sizes   # 7, 9, 5
    assert_close(weights_of(model), by_expected, rtol=1e-5)
    # ... and dividing by the realized count would be visibly different.
    gap = max(np.max(np.abs(a - b)) for a, b in zip(by_realized, by_expected))
    assert gap > 1e-3 * max(np.max(np.abs(w)) for w in by_expected), sizes
