"""Datasets (offline-first loaders), random-access TFDS sources, privacy-accountable batch
sampling, augmentation.

The `dp-keras-scale` command imports the TensorFlow-based modules here only when it uses them
(`dp_keras_scale._lazy`); a program's ``import dp_keras_scale.data`` imports them all.
"""

from dp_keras_scale import _lazy

__all__ = ["BatchSampler", "CorruptDatasetError", "check_labels", "DATASETS",
           "DatasetNotFoundError", "RandomAccessFormatError", "TFDSSource", "augment_images",
           "augmult", "augmult_map", "default_data_dir", "load", "open_dataset",
           "poisson_batches", "tfds_source"]

__getattr__, __dir__ = _lazy.package_attributes(__name__, {
    "augment_images": "augment", "augmult": "augment", "augmult_map": "augment",
    "RandomAccessFormatError": "random_access", "TFDSSource": "random_access",
    "open_dataset": "random_access", "tfds_source": "random_access",
    "BatchSampler": "sampling", "poisson_batches": "sampling", "check_labels": "sampling",
    "DATASETS": "sources", "CorruptDatasetError": "sources", "DatasetNotFoundError": "sources",
    "default_data_dir": "sources", "load": "sources"})

if not _lazy.started_as_command():
    _lazy.load_all(__name__, __all__)
