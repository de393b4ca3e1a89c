"""Datasets (offline-first loaders), random-access TFDS sources, privacy-accountable batch
sampling, augmentation."""

from dp_keras_scale.data.augment import augment_images, augmult, augmult_map
from dp_keras_scale.data.random_access import (RandomAccessFormatError, TFDSSource, open_dataset,
                                               tfds_source)
from dp_keras_scale.data.sampling import BatchSampler, poisson_batches
from dp_keras_scale.data.sources import (DATASETS, CorruptDatasetError, DatasetNotFoundError,
                                         default_data_dir, load)

__all__ = ["BatchSampler", "CorruptDatasetError", "DATASETS", "DatasetNotFoundError",
           "RandomAccessFormatError", "TFDSSource", "augment_images", "augmult", "augmult_map",
           "default_data_dir", "load", "open_dataset", "poisson_batches", "tfds_source"]
