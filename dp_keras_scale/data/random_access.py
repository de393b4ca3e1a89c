"""Random-access datasets read by index from disk: ImageNet-sized data with Poisson sampling.

Poisson sampling draws every example independently with probability q at every logical step,
so a training step needs arbitrary example indices. Datasets that fit in memory are arrays
(`dks.data.load`); larger ones (ImageNet: 1.28M JPEGs, about 140 GB) are read by index from
TensorFlow Datasets files in the ``array_record`` format, which supports random access
(TFDS's default ``tfrecord`` format only supports sequential reads).

`tfds_source` opens a prepared split; `BatchSampler.dataset(source)` turns it into the same
padded, masked micro-batches as in-memory arrays (`sampling.masked_microbatches` is the one
pipeline for both). The serialized records of each micro-batch of sampled indices are read in
one call (array_record fetches them on parallel threads); the micro-batch is then split into
examples, each image is decoded (JPEG or PNG), centre-cropped and resized to ``image_size`` on
its own in a parallel `tf.data` map (images may have any size), and the same rows are grouped
back into the same micro-batch. Nothing is materialized beyond the prefetched micro-batches.

Privacy: preprocessing one image depends on that image only, every sampled index is read
exactly once into its own row of its logical batch (mask 1), and padding rows are zero images
with mask 0 that are never read from disk. The sampling, and so the accounting, is exactly
that of `BatchSampler`.

Example:
    >>> source = dks.data.tfds_source("imagenet2012", "train", data_dir="/data/tfds",
    ...                               image_size=224)     # central 87.5% crop, resized
    >>> sampler = dks.data.BatchSampler(len(source), expected_batch_size=16384,
    ...                                 microbatch_size=64)
    >>> train_ds = sampler.dataset(source, map_fn=dks.data.augmult_map(4, flip=True))
    >>> test_ds = dks.data.tfds_source("imagenet2012", "validation", data_dir="/data/tfds",
    ...                                image_size=224).dataset(256)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from dp_keras_scale.data.sources import DatasetNotFoundError, load
from dp_keras_scale.options import TFDS_PREFIX

__all__ = ["RandomAccessFormatError", "TFDSSource", "TFDS_PREFIX", "open_dataset",
           "tfds_source"]

RESIZE_METHODS = ("bilinear", "bicubic", "area", "lanczos3", "nearest")

# TFDS datasets whose "test" split has no labels: `open_dataset(..., "test")` evaluates on
# this split instead (ImageNet's test labels were never released; TFDS stores -1).
EVALUATION_SPLITS = {"imagenet2012": "validation"}


class RandomAccessFormatError(ValueError):
    """The dataset is prepared, but in a format without random access (e.g. tfrecord)."""


def _prepare_instructions(name: str, data_dir: str, manual: bool) -> str:
    """How to prepare `name` in the array_record format under `data_dir`."""
    text = ""
    if manual:
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        text += (f"  {name} needs a manual download first"
                 + (" (ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                    "https://image-net.org)" if name == "imagenet2012" else "")
                 + f": put the files in {manual_dir}, then\n")
    text += (f"  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
             "  (the tfds command needs `pip install apache-beam`), or in Python:\n"
             f"  tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
             ".download_and_prepare()")
    return text


def _builder(name: str, data_dir: str | None):
    """The TFDS builder of a prepared, random-access dataset; clear errors otherwise."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("Random-access datasets need tensorflow_datasets: "
                          "pip install tensorflow-datasets array_record") from e
    from tensorflow_datasets.core import file_adapters

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise DatasetNotFoundError(
            f"TFDS knows no dataset {name!r} and none is prepared in {where}. Check the name "
            "(`tfds.list_builders()`), or prepare a custom dataset there in the array_record "
            f"format: builder.download_and_prepare(file_format='array_record').") from e
    root = os.path.dirname(os.path.dirname(str(builder.data_dir)))
    if not builder.is_prepared():
        manual = bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
        searched = (f"{builder.data_dir}" if data_dir else
                    f"{builder.data_dir} (TFDS's default; pass data_dir= or set TFDS_DATA_DIR "
                    "to look elsewhere)")
        raise DatasetNotFoundError(
            f"TFDS dataset {name!r} is not prepared: no dataset_info.json in {searched}. "
            "Random access needs it prepared in the array_record format "
            "(file_format='array_record'):\n" + _prepare_instructions(name, root, manual)
            + "\nNothing is downloaded at run time.")
    formats = builder.info.available_file_formats()
    if not formats & set(file_adapters.FileFormat.with_random_access()):
        found = ", ".join(sorted(f.value for f in formats)) or str(builder.info.file_format)
        version_dir = str(builder.data_dir)
        raise RandomAccessFormatError(
            f"TFDS dataset {name!r} in {version_dir} is stored as {found}, which can only be "
            "read sequentially; Poisson sampling reads examples by index and needs the "
            "array_record format (file_format='array_record'). Convert it in place:\n"
            f"  tfds convert_format --dataset_version_dir={version_dir} "
            "--out_file_format=array_record   (needs `pip install apache-beam`)\n"
            "or prepare it again into another data_dir:\n"
            + _prepare_instructions(name, root, False))
    return builder


def _image_and_label_features(builder, image_key: str, label_key: str):
    import tensorflow_datasets as tfds

    features = builder.info.features
    keys = list(features.keys())
    for key, role in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in keys:
            raise ValueError(f"{role}={key!r} is not a feature of {builder.name}; its features "
                             f"are {keys}. Pass the right {role}=...")
    image, label = features[image_key], features[label_key]
    if not isinstance(image, tfds.features.Image):
        raise ValueError(f"{builder.name}[{image_key!r}] is a {type(image).__name__}, not an "
                         "encoded tfds.features.Image; pass image_key= naming the image.")
    channels = image.shape[-1]
    if channels is None:
        raise ValueError(f"{builder.name}[{image_key!r}] has an unknown number of channels; "
                         "random access needs a fixed one (1 or 3).")
    if isinstance(label, tfds.features.ClassLabel):
        num_classes = label.num_classes
    elif isinstance(label, tfds.features.Tensor) and label.shape == () and \
            tf.as_dtype(label.dtype).is_integer:
        num_classes = None
    else:
        raise ValueError(f"{builder.name}[{label_key!r}] is not an integer class label "
                         f"({label!r}); pass label_key= naming the label.")
    return tuple(image.shape), int(channels), num_classes


def _as_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                 and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive integer or (height, width), "
                         f"got {image_size!r}")
    return int(size[0]), int(size[1])


class TFDSSource:
    """One split of a TFDS dataset, read by example index (random access).

    Build it with `tfds_source`. ``len(source)`` is the number of examples; ``read`` returns
    decoded images by index (NumPy); ``tf_records`` and ``tf_decode`` are the graph-mode
    reader and per-image decoder `BatchSampler.dataset(source)` uses (``tf_read`` chains
    them); ``dataset(batch_size)`` is every example once, in order (evaluation).

    Attributes:
        name, split: the TFDS dataset and split (slices such as "train[:10%]" work).
        num_classes: from the label's ClassLabel feature (None for a plain integer label).
        native_shape: the stored image shape, None for sizes that vary (ImageNet).
        image_shape: the (height, width, channels) of the images it yields for training
            and evaluation (None until `image_size` is given for sizes that vary).
        central_fraction: the centre crop used (see `tfds_source`).
    """

    def __init__(self, builder, split: str, image_key: str, label_key: str,
                 image_size, central_fraction: float | None, resize_method: str,
                 antialias: bool):
        from tensorflow_datasets.core import decode

        if central_fraction is not None and not 0 < central_fraction <= 1:
            raise ValueError(f"central_fraction must be in (0, 1] (or None: automatic), got "
                             f"{central_fraction}")
        if resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize_method must be one of {RESIZE_METHODS}, got "
                             f"{resize_method!r}")
        self.name, self.split = builder.name, split
        self.image_key, self.label_key = image_key, label_key
        shape, self.channels, self.num_classes = _image_and_label_features(
            builder, image_key, label_key)
        self.native_shape = shape if None not in shape else None
        size = _as_size(image_size)
        if size is None and self.native_shape is not None:
            size = self.native_shape[:2]
        self.image_shape = None if size is None else (*size, self.channels)
        # Stored images of exactly the requested size are passed through untouched.
        self._identity = (self.native_shape is not None and self.image_shape == self.native_shape)
        if central_fraction is None:    # photos of any size: the usual S / (S + 32) crop
            central_fraction = 1.0 if self.native_shape is not None or size is None else \
                min(size) / (min(size) + 32)
        self.central_fraction = float(central_fraction)
        self.resize_method, self.antialias = resize_method, bool(antialias)
        try:
            self._records = builder.as_data_source(
                split=split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)
        except (KeyError, ValueError) as e:
            raise ValueError(f"Split {split!r} of {self.name} cannot be read ({e}); prepared "
                             f"splits: {sorted(builder.info.splits)}.") from e
        self._num_examples = len(self._records)
        self._spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
                      label_key: tf.io.FixedLenFeature([], tf.int64, default_value=-1)}

    def __len__(self) -> int:
        return self._num_examples

    def __repr__(self) -> str:
        return (f"TFDSSource({self.name!r}, split={self.split!r}, examples={len(self)}, "
                f"image_shape={self.image_shape})")

    # ----------------------------------------------------------------------- reading

    def _fetch(self, indices: np.ndarray) -> np.ndarray:
        """Serialized records of `indices` (b"" where the index is -1, a padding row)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (indices < -1) | (indices >= self._num_examples)
        if bad.any():
            raise IndexError(f"indices {indices[bad][:5].tolist()} are outside "
                             f"[0, {self._num_examples}) of {self.name}/{self.split}")
        out = np.full(len(indices), b"", dtype=object)
        real = np.flatnonzero(indices >= 0)
        if len(real):
            out[real] = self._records.__getitems__(indices[real].tolist())
        return out

    def _parse(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(encoded images, labels, real-row flags) of an int64 index vector."""
        indices = tf.reshape(tf.cast(indices, tf.int64), [-1])
        records = tf.numpy_function(self._fetch, [indices], tf.string, stateful=False)
        records = tf.reshape(records, [-1])
        records.set_shape(indices.shape)
        parsed = tf.io.parse_example(records, self._spec)
        encoded, labels = parsed[self.image_key], parsed[self.label_key]
        real = indices >= 0
        checks = [tf.debugging.assert_equal(
            tf.reduce_all(tf.logical_or(~real, tf.strings.length(encoded) > 0)), True,
            message=f"a record of {self.name}/{self.split} has no {self.image_key!r} bytes")]
        upper = self.num_classes if self.num_classes is not None else np.iinfo(np.int64).max
        checks.append(tf.debugging.assert_equal(
            tf.reduce_all(tf.logical_or(~real, (labels >= 0) & (labels < upper))), True,
            message=f"{self.name}/{self.split} has labels outside [0, {upper}) (-1: the split "
                    "has no labels, e.g. ImageNet's test split; evaluate on 'validation')"))
        with tf.control_dependencies(checks):
            labels = tf.where(real, labels, tf.zeros_like(labels))
        return encoded, labels, real

    def _crop_window(self, height: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """The central window with the output's aspect ratio, scaled by central_fraction."""
        out_h, out_w = self.image_shape[:2]
        h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
        scale = tf.minimum(h / out_h, w / out_w) * self.central_fraction
        crop_h = tf.clip_by_value(tf.cast(tf.round(scale * out_h), tf.int32), 1, height)
        crop_w = tf.clip_by_value(tf.cast(tf.round(scale * out_w), tf.int32), 1, width)
        return (height - crop_h + 1) // 2, (width - crop_w + 1) // 2, crop_h, crop_w

    def _decode_native(self, encoded: tf.Tensor) -> tf.Tensor:
        return tf.io.decode_image(encoded, channels=self.channels, expand_animations=False)

    def _decode_resized(self, encoded: tf.Tensor) -> tf.Tensor:
        """One image: decode, central crop, resize to `image_shape`, uint8."""
        if self._identity:
            return tf.ensure_shape(self._decode_native(encoded), self.image_shape)

        # Decoding the whole JPEG and slicing is exact; tf.image.decode_and_crop_jpeg was no
        # faster here (3% on 500x375 images) and differs at the window's edge.
        image = self._decode_native(encoded)
        shape = tf.shape(image)
        top, left, crop_h, crop_w = self._crop_window(shape[0], shape[1])
        cropped = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1]))
        cropped.set_shape([None, None, self.channels])
        resized = tf.image.resize(cropped, self.image_shape[:2], method=self.resize_method,
                                  antialias=self.antialias)
        if resized.dtype != tf.uint8:
            resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
        return tf.ensure_shape(resized, self.image_shape)

    def _check_fixed_size(self) -> None:
        if self.image_shape is None:
            raise ValueError(
                f"{self.name} images have varying sizes: pass image_size=... (e.g. 224) to "
                "tfds_source so that every example is cropped and resized to one shape.")

    def tf_records(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Graph-mode read of a vector of indices: (encoded images [M] string, labels [M]).

        One call reads the whole vector (array_record fetches the records on parallel
        threads). An index of -1 is a padding row: an empty record with label 0, read from
        nothing. `tf_decode` turns each encoded image into pixels.
        """
        self._check_fixed_size()
        encoded, labels, _ = self._parse(indices)
        return encoded, labels

    def tf_decode(self, encoded: tf.Tensor, real: tf.Tensor) -> tf.Tensor:
        """One encoded image -> uint8 `image_shape` (decoded, centre-cropped, resized);
        zeros where `real` is False (a padding row)."""
        self._check_fixed_size()
        return tf.cond(real, lambda: self._decode_resized(encoded),
                       lambda: tf.zeros(self.image_shape, tf.uint8))

    def tf_read(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Graph-mode read of a vector of indices: (uint8 [M, H, W, C], int64 [M]).

        `tf_records` then `tf_decode` on every row (-1: a zero image with label 0).
        Pipelines decode faster with a per-example `tf.data` map, as `BatchSampler.dataset`
        and `dataset` do.
        """
        self._check_fixed_size()
        encoded, labels, real = self._parse(indices)
        images = tf.map_fn(lambda args: self.tf_decode(*args), (encoded, real),
                           fn_output_signature=tf.TensorSpec(self.image_shape, tf.uint8))
        return images, labels

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """The stored images (decoded, native size) and labels of `indices`.

        Images come as one uint8 array [n, H, W, C] when the dataset's images share one
        shape, else as a list of [H_i, W_i, C] arrays.

        Example:
            >>> images, labels = source.read([0, 17, 42])
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (indices < 0) | (indices >= len(self))
        if bad.any():
            raise IndexError(f"indices {indices[bad][:5].tolist()} are outside "
                             f"[0, {len(self)}) of {self.name}/{self.split}")
        encoded, labels, _ = self._parse(tf.constant(indices))
        images = [self._decode_native(e).numpy() for e in encoded]
        if self.native_shape is not None:
            images = np.stack(images) if images else np.zeros((0, *self.native_shape), np.uint8)
        return images, labels.numpy()

    def dataset(self, batch_size: int = 256) -> tf.data.Dataset:
        """Every example once, in index order, as (images, labels) batches (evaluation).

        The last batch is smaller when `batch_size` does not divide ``len(source)``.

        Example:
            >>> model.evaluate(source.dataset(512))
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self._check_fixed_size()
        ds = tf.data.Dataset.range(len(self)).batch(int(batch_size))
        ds = ds.map(self.tf_records, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True).unbatch()
        ds = ds.map(lambda encoded, label: (self.tf_decode(encoded, tf.constant(True)), label),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(int(batch_size))     # unbatch hid the length: state it again for Keras
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-len(self) // int(batch_size))))
        return ds.prefetch(tf.data.AUTOTUNE)


def tfds_source(name: str, split: str, data_dir: str | None = None, image_key: str = "image",
                label_key: str = "label", *, image_size=None,
                central_fraction: float | None = None, resize_method: str = "bilinear",
                antialias: bool = True) -> TFDSSource:
    """Open a split of a TFDS dataset prepared in the array_record format, for random access.

    Nothing is downloaded: the dataset must already be prepared in ``data_dir`` (default:
    $TFDS_DATA_DIR or ~/tensorflow_datasets) with ``file_format="array_record"``; the error
    says how to do it otherwise (ImageNet needs a manual download of its tar files).

    Args:
        name: a TFDS name ("imagenet2012", "cifar10", "name/config:version").
        split: "train", "validation", "test", or a TFDS slice such as "train[:10%]".
        data_dir: the TFDS data directory holding the prepared dataset.
        image_key, label_key: the features holding the encoded image and the integer label.
        image_size: an int or (height, width) every image is cropped and resized to; needed
            when the stored sizes vary (ImageNet: 224). Default: the stored size.
        central_fraction: the crop is the largest central window with the output's aspect
            ratio, scaled by this fraction (1.0: keep it whole). None (default): 1.0 for
            datasets stored at one size (CIFAR), S / (S + 32) for photos of varying sizes
            (ImageNet: 224 / 256 = 0.875, the usual crop, and De et al.'s pipeline's).
            Images stored at exactly `image_size` are not touched.
        resize_method, antialias: passed to `tf.image.resize`; results are rounded to uint8.

    Example:
        >>> source = tfds_source("imagenet2012", "train", "/data/tfds", image_size=224)
        >>> len(source), source.num_classes, source.image_shape
        (1281167, 1000, (224, 224, 3))
        >>> ds = dks.data.BatchSampler(len(source), 4096, microbatch_size=128).dataset(source)
    """
    builder = _builder(name, data_dir or None)
    return TFDSSource(builder, split, image_key, label_key, image_size, central_fraction,
                      resize_method, antialias)


def open_dataset(name: str, split: str, data_dir: str | None = None, *, image_size=None,
                 **source_options: Any) -> tuple[np.ndarray, np.ndarray] | TFDSSource:
    """In-memory arrays for a known dataset name, a random-access source for "tfds:NAME".

    ``open_dataset("mnist", "train")`` is ``dks.data.load("mnist", "train")`` (uint8 images
    [N, H, W, C], int64 labels). ``open_dataset("tfds:imagenet2012", "train", "/data/tfds",
    image_size=224)`` is ``tfds_source("imagenet2012", "train", "/data/tfds", image_size=224)``
    (`data_dir` is then the TFDS data directory). For datasets whose TFDS test split has no
    labels (`EVALUATION_SPLITS`: ImageNet), split "test" opens the validation split.
    Both results feed `BatchSampler.dataset`: ``sampler.dataset(x, y)`` or
    ``sampler.dataset(source)``.

    Example:
        >>> train = open_dataset("tfds:imagenet2012", "train", "/data/tfds", image_size=224)
        >>> x_test, y_test = open_dataset("cifar10", "test")
    """
    if name.startswith(TFDS_PREFIX):
        tfds_name = name[len(TFDS_PREFIX):]
        if not tfds_name:
            raise ValueError(f"{name!r} names no dataset: write e.g. 'tfds:imagenet2012'.")
        base = tfds_name.split(":")[0].split("/")[0]
        if split == "test" and base in EVALUATION_SPLITS:
            split = EVALUATION_SPLITS[base]
        return tfds_source(tfds_name, split, data_dir, image_size=image_size, **source_options)
    if source_options:
        raise ValueError(f"{sorted(source_options)} only apply to 'tfds:' datasets, not {name!r}.")
    x, y = load(name, split, data_dir=data_dir or None)
    if image_size is not None and _as_size(image_size) != x.shape[1:3]:
        raise ValueError(f"{name} images are {x.shape[1]}x{x.shape[2]}; image_size="
                         f"{image_size!r} resizes only 'tfds:' datasets. Leave it unset (0).")
    return x, y
