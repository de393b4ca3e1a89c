"""Augmentation multiplicity (dks.data.augmult): exact crops/flips against a numpy reference,
uniform and independent draws, alignment with labels and masks, and one DP training step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import dp_keras_scale as dks
from conftest import NUM_CLASSES, assert_close, compile_dp, reference_clipped_sum, small_convnet
from dp_keras_scale.data import BatchSampler, augment_images, augmult, augmult_map


def random_images(n, h, w, c, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w, c)).astype(dtype)


def transforms_matching(original, copy, pad):
    """All (top, left, flipped) for which the reference crop of the reflect-padded original
    (numpy's 'reflect' mode: the edge pixel is not repeated) equals `copy` exactly."""
    h, w = original.shape[:2]
    padded = np.pad(original, [(pad, pad), (pad, pad), (0, 0)], mode="reflect")
    found = []
    for top, left in itertools.product(range(2 * pad + 1), repeat=2):
        crop = padded[top:top + h, left:left + w]
        for flipped in (False, True):
            if np.array_equal(crop[:, ::-1] if flipped else crop, copy):
                found.append((top, left, flipped))
    return found


def recover_transforms(images, out, pad):
    """The unique (top, left, flipped) of every copy: an array [B, K, 3]; fails otherwise."""
    result = np.zeros(out.shape[:2] + (3,), np.int64)
    for b, k in np.ndindex(*out.shape[:2]):
        found = transforms_matching(images[b], out[b, k], pad)
        assert len(found) == 1, f"copy ({b}, {k}) matches {found}"
        result[b, k] = found[0]
    return result


def numpy_batches(ds):
    return [tuple(np.asarray(t) for t in element) for element in ds.as_numpy_iterator()]


# -- shapes and dtypes -------------------------------------------------------------------------

@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("copies", [1, 3])
def test_dataset_and_map_forms_shapes_and_dtypes(with_mask, copies):
    x = random_images(10, 9, 7, 2)
    y = np.arange(10)
    parts = (x, y, np.ones(10, np.float32)) if with_mask else (x, y)
    ds = tf.data.Dataset.from_tensor_slices(parts).batch(4, drop_remainder=True)

    for out_ds in (augmult(ds, copies, pad=2), ds.map(augmult_map(copies, pad=2))):
        spec = out_ds.element_spec
        assert len(spec) == len(parts)
        assert spec[0].shape.as_list() == [4, copies, 9, 7, 2] and spec[0].dtype == tf.uint8
        batches = numpy_batches(out_ds)
        assert len(batches) == 2
        for i, batch in enumerate(batches):
            assert batch[0].shape == (4, copies, 9, 7, 2) and batch[0].dtype == np.uint8
            np.testing.assert_array_equal(batch[1], y[4 * i:4 * i + 4])
            if with_mask:
                np.testing.assert_array_equal(batch[2], np.ones(4))

    as_float = augmult(ds, copies, pad=2, dtype="float32")
    assert as_float.element_spec[0].dtype == tf.float32
    only_images = augmult(tf.data.Dataset.from_tensor_slices(x).batch(5), copies, pad=2)
    assert [b.shape for b in only_images.as_numpy_iterator()] == [(5, copies, 9, 7, 2)] * 2


def test_batch_sampler_map_fn_gives_copies_labels_and_mask():
    x, y = random_images(50, 8, 8, 1), np.arange(50) % NUM_CLASSES
    sampler = BatchSampler(50, expected_batch_size=10, microbatch_size=8, seed=0)
    ds = sampler.dataset(x, y, steps=2, map_fn=augmult_map(4, pad=2, flip=False))
    batches = numpy_batches(ds)
    assert len(batches) == 2 * sampler.accumulation_steps
    for xb, yb, mask in batches:
        assert xb.shape == (sampler.microbatch_size, 4, 8, 8, 1) and xb.dtype == np.uint8
        assert yb.shape == mask.shape == (sampler.microbatch_size,)


# -- exactness against a numpy reference ------------------------------------------------------

@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("pad,dtype", [(1, np.uint8), (3, np.float32)])
def test_every_copy_is_an_exact_crop_of_the_reflect_padded_original(jit_compile, pad, dtype):
    # Width > 2 * pad + 1 and random pixels: each copy matches exactly one transform.
    images = random_images(6, 10, 9, 2, seed=pad, dtype=dtype)
    out = augment_images(images, 8, pad=pad, seed=pad, jit_compile=jit_compile).numpy()
    assert out.shape == (6, 8, 10, 9, 2) and out.dtype == dtype
    transforms = recover_transforms(images, out, pad)
    assert transforms[..., 2].any() and not transforms[..., 2].all()   # some flipped, some not
    assert transforms[..., :2].min() == 0 and transforms[..., :2].max() == 2 * pad


def test_xla_and_op_by_op_crops_agree():
    images = random_images(16, 12, 12, 3, seed=1)
    a = augment_images(images, 4, seed=5, jit_compile=True)
    b = augment_images(images, 4, seed=5, jit_compile=False)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


# -- randomness --------------------------------------------------------------------------------

def test_offsets_and_flips_are_uniform_and_copies_independent():
    pad, batch, copies = 2, 64, 16
    images = random_images(batch, 10, 10, 1, seed=3)
    t = recover_transforms(images, augment_images(images, copies, pad=pad, seed=11).numpy(), pad)
    top, left, flipped = t[..., 0].ravel(), t[..., 1].ravel(), t[..., 2].ravel()
    # Uniform marginals (5 offsets per axis, fair flips) and a uniform joint law (50 cells).
    for values, cells in ((top, 5), (left, 5), (flipped, 2)):
        assert stats.chisquare(np.bincount(values, minlength=cells)).pvalue > 1e-4
    joint = (top * 5 + left) * 2 + flipped
    assert stats.chisquare(np.bincount(joint, minlength=50)).pvalue > 1e-4
    # Vertical and horizontal offsets are independent of each other.
    table = np.zeros((5, 5))
    np.add.at(table, (top, left), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-4
    # Copies of one example: never all the same, and two copies coincide with probability
    # 1/50 (independent uniform draws), as do copies of neighbouring examples.
    codes = joint.reshape(batch, copies)
    assert all(len(set(row)) > 1 for row in codes)
    same_example = np.mean([a == b for row in codes for a, b in itertools.combinations(row, 2)])
    neighbours = np.mean(codes[1:] == codes[:-1])
    for rate in (same_example, neighbours):
        assert 0.5 / 50 < rate < 1.5 / 50


def test_seed_reproducibility_and_fresh_draws():
    images = random_images(8, 12, 12, 1, seed=4)
    same = [augment_images(images, 4, seed=7).numpy() for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], augment_images(images, 4, seed=8).numpy())
    assert not np.array_equal(augment_images(images, 4).numpy(), augment_images(images, 4).numpy())

    ds = tf.data.Dataset.from_tensors(images).repeat(3)
    first = [b for b in augmult(ds, 4, seed=1).as_numpy_iterator()]
    again = augmult(ds, 4, seed=1)
    for a, b in zip(first, again.as_numpy_iterator()):
        np.testing.assert_array_equal(a, b)                   # same seed: same sequence
    assert not np.array_equal(first[0], first[1])             # fresh draws every batch
    second_pass = [b for b in again.as_numpy_iterator()]       # ... and every iteration
    assert not any(np.array_equal(a, b) for a, b in zip(first, second_pass))

    # Map form: a seeded generator; sequential maps reproduce the sequence exactly.
    runs = [[b for b in ds.map(augmult_map(4, seed=3)).as_numpy_iterator()] for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0][0], runs[0][1])


# -- alignment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["dataset", "map_fn"])
def test_labels_and_mask_stay_aligned_with_their_images(form):
    # The label of example i is i: every copy in row b must be a crop of image y[b], and labels
    # and masks must equal those of the same sampler without augmentation.
    pad, n = 2, 40
    x, y = random_images(n, 10, 10, 1, seed=5), np.arange(n)
    plain = numpy_batches(BatchSampler(n, 6, microbatch_size=5, seed=9).dataset(x, y, steps=3))
    sampler = BatchSampler(n, 6, microbatch_size=5, seed=9)
    if form == "dataset":
        ds = augmult(sampler.dataset(x, y, steps=3), 3, pad=pad, seed=0)
    else:
        ds = sampler.dataset(x, y, steps=3, map_fn=augmult_map(3, pad=pad, seed=0))
    augmented = numpy_batches(ds)
    assert len(augmented) == len(plain) and any((m == 0).any() for _, _, m in plain)
    for (xa, ya, ma), (xp, yp, mp) in zip(augmented, plain):
        np.testing.assert_array_equal(ya, yp)
        np.testing.assert_array_equal(ma, mp)
        for b, k in np.ndindex(*xa.shape[:2]):
            assert transforms_matching(x[ya[b]], xa[b, k], pad), (b, k)


# -- options -----------------------------------------------------------------------------------

def test_flip_false_never_flips_and_crop_false_never_shifts():
    pad = 2
    images = random_images(16, 10, 10, 2, seed=6)
    t = recover_transforms(images, augment_images(images, 16, pad=pad, flip=False, seed=1).numpy(),
                           pad)
    assert not t[..., 2].any() and len(np.unique(t[..., :2].reshape(-1, 2), axis=0)) == 25

    flipped_only = augment_images(images, 16, pad=pad, crop=False, seed=2).numpy()
    mirrored = np.all(flipped_only == images[:, None, :, ::-1], axis=(2, 3, 4))
    unchanged = np.all(flipped_only == images[:, None], axis=(2, 3, 4))
    assert np.all(mirrored ^ unchanged) and 0.3 < mirrored.mean() < 0.7


@pytest.mark.parametrize("options", [dict(pad=0), dict(pad=0, flip=False, dtype="float32"),
                                     dict(crop=False, flip=False)])
def test_no_shift_and_no_flip_is_identity(options):
    images = random_images(5, 7, 6, 3, seed=7)
    flip = options.get("flip", True)
    out = augment_images(images, 4, seed=0, **options).numpy()
    if flip:   # pad=0: only flips remain
        assert all(np.array_equal(c, im) or np.array_equal(c, im[:, ::-1])
                   for im, copies in zip(images, out) for c in copies)
    else:
        np.testing.assert_array_equal(out, np.repeat(images[:, None], 4, axis=1))
        assert out.dtype == np.dtype(options.get("dtype", np.uint8))


def test_bad_arguments_raise_clear_errors():
    images = random_images(2, 8, 8, 1)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(2))).batch(2)
    for bad in (0, -2, 1.5, True, None):
        with pytest.raises(ValueError, match="augmult must be a positive integer"):
            augmult(ds, bad)
        with pytest.raises(ValueError, match="augmult must be a positive integer"):
            augmult_map(bad)
    with pytest.raises(ValueError, match="pad must be a non-negative"):
        augment_images(images, 2, pad=-1)
    with pytest.raises(ValueError, match="pad < image height"):
        augment_images(images, 2, pad=8)
    with pytest.raises(TypeError, match="flip must be True or False"):
        augmult_map(2, flip="yes")
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        augment_images(images[None], 2)
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        augment_images(images, 2, seed=[1, 2, 3])
    for arrays in ((images, np.arange(2)), images):
        with pytest.raises(TypeError, match="BatchSampler"):
            augmult(arrays, 2)
    with pytest.raises(ValueError, match="Batch the dataset first"):
        augmult(tf.data.Dataset.from_tensor_slices((images, np.arange(2))), 2)   # unbatched
    with pytest.raises(ValueError, match="copies axis"):
        augmult(augmult(ds, 2), 2)                                                # twice


# -- training ----------------------------------------------------------------------------------

def test_dp_model_trains_one_step_on_augmult_batches():
    # One noise-free DPSGD step on an augmult batch equals lr * (per-example loop over the
    # K copies: clip the gradient of the mean loss) / expected batch size.
    n, copies, expected = 24, 3, 6.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, n)

    def pipeline():
        sampler = BatchSampler(n, expected, seed=1)
        return augmult(sampler.dataset(x, y, steps=1), copies, pad=2, seed=2), sampler

    (xb, yb, mask), = numpy_batches(pipeline()[0])
    assert xb.shape[1:] == (copies, 8, 8, 3) and mask.sum() > 0
    model = compile_dp(small_convnet(), l2_norm_clip=0.05, expected_batch_size=expected)
    reference = reference_clipped_sum(model, xb, np.repeat(yb[:, None], copies, 1), mask, 0.05)
    before = [v.numpy() for v in model.trainable_variables]
    ds, sampler = pipeline()
    history = model.fit(ds, steps_per_epoch=sampler.accumulation_steps, shuffle=False,
                        verbose=0).history
    assert np.isfinite(history["loss"][0])
    update = [b - v.numpy() for b, v in zip(before, model.trainable_variables)]
    assert_close(update, [r / expected for r in reference])
    assert any(np.abs(u).max() > 0 for u in update)
