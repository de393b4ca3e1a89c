"""The data a run's config names, in the forms training, evaluation and audits take.

``config["data"]`` names in-memory arrays ("mnist", "cifar10", ...) or a random-access TFDS
source (``"tfds:NAME"``, `dp_keras_scale.data.TFDSSource`, read from disk). `load_data` opens
either; the helpers here hide the difference from their callers: `image_shape` (the model's
input), `evaluation_input` (what ``model.evaluate`` takes), `first_examples` (the first n
examples as arrays, for an audit) and `accuracy`.

Example:
    >>> x, y, x_test, y_test = load_data(load_config("mnist_cpu"))
    >>> accuracy(model, x_test, y_test)
"""

from __future__ import annotations

import keras
import numpy as np

from dp_keras_scale import data
from dp_keras_scale.options import TFDS_PREFIX

__all__ = ["EVALUATION_BATCH", "accuracy", "evaluation_input", "first_examples", "image_shape",
           "load_data"]

#: Examples per batch when a run's model is evaluated.
EVALUATION_BATCH = 1000


def load_data(config: dict):
    """The training and test data of ``config["data"]`` (its subsets applied).

    Args:
        config: a resolved config.

    Returns:
        (x, y, x_test, y_test): arrays, or for a "tfds:" dataset random-access sources
        (`data.TFDSSource`) with y = y_test = None.
    """
    d = config["data"]
    data_dir, size = d["data_dir"] or None, d["image_size"] or None
    if d["dataset"].startswith(TFDS_PREFIX):
        train_split = f"train[:{d['train_subset']}]" if d["train_subset"] else "train"
        source = data.open_dataset(d["dataset"], train_split, data_dir, image_size=size)
        test = data.open_dataset(d["dataset"], "test", data_dir, image_size=size)
        if d["test_subset"]:
            test = data.open_dataset(d["dataset"], f"{test.split}[:{d['test_subset']}]",
                                     data_dir, image_size=size)
        return source, None, test, None
    x, y = data.open_dataset(d["dataset"], "train", data_dir, image_size=size)
    x_test, y_test = data.open_dataset(d["dataset"], "test", data_dir, image_size=size)
    if d["train_subset"]:
        x, y = x[:d["train_subset"]], y[:d["train_subset"]]
    if d["test_subset"]:
        x_test, y_test = x_test[:d["test_subset"]], y_test[:d["test_subset"]]
    return x, y, x_test, y_test


def image_shape(x) -> tuple[int, ...]:
    """The shape of one training image (arrays or a random-access source)."""
    return tuple(x.image_shape) if isinstance(x, data.TFDSSource) else tuple(x.shape[1:])


def evaluation_input(x, y, batch_size: int = EVALUATION_BATCH):
    """`model.evaluate` arguments: arrays as they are, a source as an in-order dataset.

    Args:
        x, y: arrays, or a `data.TFDSSource` (y None: the labels come with the images).
        batch_size: the dataset's batch size (a source only).

    Returns:
        (x, y) to pass to ``model.evaluate`` / ``model.predict``.
    """
    if isinstance(x, data.TFDSSource):
        return x.dataset(batch_size), None
    return x, y


def first_examples(x, y, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` examples as arrays: ``(x[:n], y[:n])``, or read from a source.

    A `data.TFDSSource` is read in index order as evaluation reads it (cropped and resized to
    its ``image_shape``), so the images are the ones the model was trained and tested on.

    Args:
        x, y: arrays, or a `data.TFDSSource` with y None.
        n: how many (at most ``len(x)``).

    Returns:
        (images, labels) NumPy arrays of `n` examples.

    Example:
        >>> images, labels = first_examples(source, None, 500)
    """
    if not isinstance(x, data.TFDSSource):
        return x[:n], y[:n]
    if not 0 <= n <= len(x):
        raise ValueError(f"{n} examples asked of {len(x)} in {x.name}/{x.split}.")
    batch = max(1, min(n, EVALUATION_BATCH))
    images, labels = [], []
    for batch_images, batch_labels in x.dataset(batch).take(-(-n // batch)).as_numpy_iterator():
        images.append(batch_images)
        labels.append(batch_labels)
    if not images:
        return np.zeros((0, *x.image_shape), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def accuracy(model: keras.Model, x, y) -> float:
    """The compiled model's "accuracy" metric on (x, y) (arrays or a source)."""
    x, y = evaluation_input(x, y)
    return float(model.evaluate(x, y, batch_size=EVALUATION_BATCH, verbose=0,
                                return_dict=True)["accuracy"])
