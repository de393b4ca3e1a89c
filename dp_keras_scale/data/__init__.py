"""Datasets (offline-first loaders), privacy-accountable batch sampling, augmentation."""

from dp_keras_scale.data.augment import augment_images, augmult, augmult_map
from dp_keras_scale.data.sampling import BatchSampler, poisson_batches
from dp_keras_scale.data.sources import (DATASETS, CorruptDatasetError, DatasetNotFoundError,
                                         default_data_dir, load)

__all__ = ["BatchSampler", "CorruptDatasetError", "DATASETS", "DatasetNotFoundError",
           "augment_images", "augmult", "augmult_map", "default_data_dir", "load",
           "poisson_batches"]
