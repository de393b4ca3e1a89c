"""Random-access TFDS sources: a real array_record dataset built here from MNIST digits.

Every stored image is an MNIST digit scaled up by k (1, 2 or 3) and padded on two opposite
sides with noise, so it has its own size; a central square crop plus an "area" resize by 1/k
gives back the original 28x28 digit exactly. The original digits are the independent
reference for everything the source reads. Nothing downloads.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import dp_keras_scale as dks
from conftest import compile_dp, weights_of
from dp_keras_scale.data import random_access
from dp_keras_scale.data.random_access import RandomAccessFormatError, open_dataset, tfds_source
from dp_keras_scale.data.sources import DatasetNotFoundError

NAME = "dks_random_access_digits"
SPLITS = {"train": range(0, 160), "test": range(160, 200)}
X_ALL, Y_ALL = (a[:200] for a in dks.data.load("mnist", "train"))


def stored_image(i: int) -> np.ndarray:
    """Digit i scaled by k and padded with noise of k*p pixels on both sides of one axis."""
    k, p = 1 + i % 3, i % 4
    image = np.repeat(np.repeat(X_ALL[i], k, axis=0), k, axis=1)
    pad = np.random.default_rng(i).integers(0, 256, (28 * k, k * p, 1), dtype=np.uint8)
    if i % 2:                                       # pad left/right, else top/bottom
        return np.concatenate([pad, image, pad[:, ::-1]], axis=1)
    return np.concatenate([pad.transpose(1, 0, 2), image, pad[:, ::-1].transpose(1, 0, 2)], 0)


class DksRandomAccessDigits(tfds.core.GeneratorBasedBuilder):
    """MNIST digits of varying sizes; `id` is the digit's row in MNIST's training set."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": tfds.features.Scalar(dtype=np.int64)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = {name: self._generate_examples(ids) for name, ids in SPLITS.items()}
        splits["unlabeled"] = self._generate_examples(range(8), labeled=False)
        return splits

    def _generate_examples(self, ids, labeled: bool = True):
        for i in ids:
            yield i, {"image": stored_image(i), "label": int(Y_ALL[i]) if labeled else -1,
                      "id": i}


class DksRandomAccessPhotos(tfds.core.GeneratorBasedBuilder):
    """A few RGB JPEGs of varying sizes (the ImageNet storage format)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(6):
            h, w = rng.integers(40, 90, size=2)
            rows, cols = np.mgrid[:h, :w]
            image = np.stack([(3 * rows + c * cols) % 256 for c in (1, 2, 5)], -1)
            yield i, {"image": image.astype(np.uint8), "label": i % 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for builder in (DksRandomAccessDigits, DksRandomAccessPhotos):
        builder(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


@pytest.fixture(scope="module")
def ids(data_dir):
    """MNIST row of each stored record, by record index, read with TFDS's own decoder."""
    builder = tfds.builder(NAME, data_dir=data_dir)
    return {split: np.array([ex["id"] for ex in builder.as_data_source(split)])
            for split in SPLITS}


def source(data_dir, split="train", **options):
    options = {"image_size": 28, "resize_method": "area", "central_fraction": 1.0, **options}
    return tfds_source(NAME, split, data_dir, **options)


def test_read_returns_the_stored_images_and_labels_by_index(data_dir, ids):
    src = tfds_source(NAME, "train", data_dir)
    assert len(src) == 160 and src.num_classes == 10 and src.native_shape is None
    assert sorted(ids["train"]) == list(SPLITS["train"])    # every example stored once
    order = np.random.default_rng(0).permutation(len(src))
    images, labels = src.read(order)
    assert len({im.shape for im in images}) > 3               # sizes really vary
    for index, image, label in zip(order, images, labels):
        i = ids["train"][index]
        np.testing.assert_array_equal(image, stored_image(i))
        assert label == Y_ALL[i]


@pytest.mark.parametrize("size, fraction, window", [(28, 1.0, np.s_[:, :]),
                                                     (14, 0.5, np.s_[7:21, 7:21])])
def test_tf_read_crops_the_centre_and_resizes_every_size(data_dir, ids, size, fraction, window):
    src = source(data_dir, image_size=size, central_fraction=fraction)
    indices = np.array([5, -1, 0, 159, 42, -1, 77])
    images, labels = (t.numpy() for t in src.tf_read(tf.constant(indices)))
    assert images.shape == (7, size, size, 1) and images.dtype == np.uint8
    for row, index in enumerate(indices):
        if index < 0:                                       # padding: zeros, never read
            assert labels[row] == 0 and not images[row].any()
        else:
            i = ids["train"][index]
            np.testing.assert_array_equal(images[row], X_ALL[i][window])
            assert labels[row] == Y_ALL[i]


def test_jpeg_images_are_cut_at_the_central_window_and_resized(data_dir):
    src = tfds_source("dks_random_access_photos", "train", data_dir, image_size=(24, 32),
                      central_fraction=0.75)
    full, _ = src.read(range(len(src)))
    # Photos of varying sizes get the usual S / (S + 32) crop unless told otherwise.
    assert tfds_source("dks_random_access_photos", "train", data_dir,
                       image_size=(24, 32)).central_fraction == 24 / 56
    images, _ = src.tf_read(tf.range(len(src), dtype=tf.int64))
    for image, stored in zip(images.numpy(), full):
        h, w = stored.shape[:2]
        scale = min(h / 24, w / 32) * 0.75                  # the window, computed here
        ch, cw = round(scale * 24), round(scale * 32)
        top, left = (h - ch + 1) // 2, (w - cw + 1) // 2
        crop = stored[top:top + ch, left:left + cw].astype(np.float32)
        expected = tf.image.resize(crop, (24, 32), antialias=True).numpy()
        expected = np.clip(np.round(expected), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(image, expected)


def test_poisson_batches_from_a_source_are_the_samplers_draws(data_dir, ids):
    src, steps = source(data_dir), 120
    sampler = dks.data.BatchSampler(len(src), 16, microbatch_size=16, seed=3)
    twin = dks.data.BatchSampler(len(src), 16, microbatch_size=16, seed=3)
    batches = list(sampler.dataset(src, steps=steps).as_numpy_iterator())
    assert len(batches) == steps * sampler.accumulation_steps
    sizes = []
    for step in range(steps):
        drawn = twin.sample_indices()
        part = batches[step * sampler.accumulation_steps:(step + 1) * sampler.accumulation_steps]
        x, y, mask = (np.concatenate(t) for t in zip(*part))
        real = drawn >= 0
        assert len(np.unique(drawn[real])) == real.sum()       # each index once per step
        np.testing.assert_array_equal(mask, real.astype(np.float32))
        np.testing.assert_array_equal(x[real], X_ALL[ids["train"][drawn[real]]])
        np.testing.assert_array_equal(y[real], Y_ALL[ids["train"][drawn[real]]])
        assert not x[~real].any()
        sizes.append(real.sum())
    # Batch sizes are Binomial(160, 0.1): mean 16, standard error sqrt(160*0.1*0.9/steps).
    assert abs(np.mean(sizes) - 16) < 4 * np.sqrt(160 * 0.1 * 0.9 / steps)


def digit_model():
    tf.keras.utils.set_random_seed(0)
    import keras
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Rescaling(1 / 255)(inputs)
    h = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return dks.DPScaleModel(inputs, keras.layers.Dense(10)(h))


def test_dp_step_on_source_batches_equals_the_step_on_the_arrays(data_dir, ids):
    src = source(data_dir)
    x, y = X_ALL[ids["train"]], Y_ALL[ids["train"]]            # the same examples, in memory
    results = []
    for inputs in ((src, None), (x, y)):
        sampler = dks.data.BatchSampler(len(src), 24, microbatch_size=20, seed=5)
        model = compile_dp(digit_model(), gradient_accumulation_steps=sampler.accumulation_steps,
                           expected_batch_size=sampler.expected_batch_size)
        start = weights_of(model)
        model.fit(sampler.dataset(*inputs, steps=2), epochs=1,
                  steps_per_epoch=2 * sampler.accumulation_steps, shuffle=False, verbose=0)
        results.append(weights_of(model))
    assert sampler.accumulation_steps > 1
    assert max(np.abs(a - b).max() for a, b in zip(results[0], start)) > 1e-3
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluation_dataset_reads_every_example_once_in_order(data_dir, ids):
    src = source(data_dir, "test")
    ds = src.dataset(batch_size=16)
    assert len(ds) == 3                     # a known length: Keras stops without a warning
    batches = list(ds.as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), X_ALL[ids["test"]])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), Y_ALL[ids["test"]])


def test_open_dataset_gives_arrays_or_a_source(data_dir, monkeypatch):
    x, y = open_dataset("mnist", "test")
    x_ref, y_ref = dks.data.load("mnist", "test")
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)
    src = open_dataset(f"tfds:{NAME}", "train", data_dir, image_size=28)
    assert isinstance(src, dks.data.TFDSSource) and len(src) == 160
    assert src.image_shape == (28, 28, 1)
    monkeypatch.setitem(random_access.EVALUATION_SPLITS, NAME, "unlabeled")
    assert open_dataset(f"tfds:{NAME}", "test", data_dir, image_size=28).split == "unlabeled"
    with pytest.raises(ValueError, match="only 'tfds:' datasets"):
        open_dataset("mnist", "test", image_size=32)
    with pytest.raises(ValueError, match="names no dataset"):
        open_dataset("tfds:", "train")


def test_missing_or_sequential_only_datasets_say_how_to_prepare_them(data_dir, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="array_record") as info:
        tfds_source(NAME, "train", str(tmp_path))
    assert str(tmp_path) in str(info.value) and "tfds build" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="ILSVRC2012_img_train.tar"):
        tfds_source("imagenet2012", "train", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="knows no dataset"):
        tfds_source("dks_no_such_dataset", "train", str(tmp_path))
    DksRandomAccessDigits(data_dir=str(tmp_path / "seq"), file_format="tfrecord"
                          ).download_and_prepare()
    with pytest.raises(RandomAccessFormatError, match="tfrecord.*array_record") as info:
        tfds_source(NAME, "train", str(tmp_path / "seq"))
    assert "convert_format" in str(info.value)


def test_bad_inputs_are_refused_with_a_clear_error(data_dir):
    with pytest.raises(ValueError, match="varying sizes: pass image_size"):
        tfds_source(NAME, "train", data_dir).tf_read(tf.constant([0], tf.int64))
    with pytest.raises(ValueError, match="features are"):
        tfds_source(NAME, "train", data_dir, image_key="picture")
    with pytest.raises(ValueError, match="prepared splits"):
        source(data_dir, "validation")
    with pytest.raises(TypeError, match="random-access source"):
        dks.data.BatchSampler(160, 16).dataset(X_ALL[:160])
    with pytest.raises(ValueError, match="160"):
        dks.data.BatchSampler(150, 15).dataset(source(data_dir))
    with pytest.raises(IndexError, match="outside"):
        source(data_dir).read([160])
    # A split without labels (-1) is refused when read, never trained on as class -1.
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels outside"):
        source(data_dir, "unlabeled").tf_read(tf.constant([0, 1], tf.int64))
