"""The feature cache of classifier-only fine-tuning runs (``dp-keras-scale train``).

A run directory keeps the frozen backbone's train and test features, keyed by SHA-256s of the
source and of the data, so that a resumed run reuses them and a changed source or data set
recomputes them. The features are computed from the private images without noise: like the
data itself, they must not be released.

Example:
    >>> features, features_test, info = cached_features(model, config, x, y, x_test, y_test,
    ...                                                 run_dir)
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import keras
import numpy as np

from dp_keras_scale.finetune.features import extract_features
from dp_keras_scale.finetune.sources import BACKBONE_NAME, BUILTIN_BACKBONES

__all__ = ["FEATURE_FILES", "FEATURE_KEY", "cached_features", "source_fingerprint"]


def _sha256_file(path: str, digest=None):
    """Feeds the bytes of the file at `path` into `digest` (a new SHA-256 by default)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def source_fingerprint(source: keras.layers.Layer, name: str) -> str:
    """SHA-256 of the backbone's files (a .keras/.h5 file, or every file of a SavedModel), or
    of the configuration of a built-in backbone (`BUILTIN_BACKBONES`)."""
    if name in BUILTIN_BACKBONES:
        config = json.dumps(source.get_config(), sort_keys=True, default=str)
        return hashlib.sha256(config.encode()).hexdigest()
    path = getattr(source, "saved_model_path", None) or name
    if os.path.isfile(path):
        return _sha256_file(path).hexdigest()
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for fname in sorted(files):
            full = os.path.join(root, fname)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            _sha256_file(full, digest)
    return digest.hexdigest()


def _array_sha256(*arrays) -> str:
    """SHA-256 of arrays' dtypes, shapes and contents, in order."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


#: The cached train and test features, in the run directory.
FEATURE_FILES = ("features_train.npy", "features_test.npy")
#: What the cached features were computed from (written last: a complete cache has a key).
FEATURE_KEY = "features_key.json"


def cached_features(model: keras.Model, config: dict, x, y, x_test, y_test, run_dir: str,
                    verbose: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train and test features of `model`'s frozen backbone, computed once per run directory.

    The features are saved in ``run_dir`` (``features_train.npy``, ``features_test.npy``)
    with ``features_key.json``: the source and a SHA-256 of its files, the options that shape
    the features, and SHA-256s of the train and test images and labels. A later call (a
    resumed run) loads them only if that key is unchanged, else computes them again.

    The cached features are computed from the private images WITHOUT noise: like the data
    itself, they must not be released (only the DP-trained model and metrics are covered).

    Args:
        model: the ``"classifier_only"`` model from `build` (its "backbone" layer is used).
        config: the run configuration; its ``[finetune]`` section shapes the features.
        x, y, x_test, y_test: the training and test images and labels.
        run_dir: the run directory that holds the cache.
        verbose: 1 prints what happens and shows progress.

    Returns:
        (train features, test features, {"reused": bool, "seconds": float, "dim": int}).

    Raises:
        ValueError: `run_dir` holds an interrupted run whose features came from another
            source or other data.

    Example:
        >>> features, features_test, info = cached_features(model, config, x, y, x_test,
        ...                                                 y_test, "runs/bit")
    """
    ft = config["finetune"]
    backbone = model.get_layer(BACKBONE_NAME)
    inner = getattr(backbone, "layer", backbone)
    key = {"source": ft["source"], "source_sha256": source_fingerprint(inner, ft["source"]),
           **{k: ft[k] for k in ("mode", "classifier", "feature_layer", "image_size",
                                  "pixel_range")},
           "train": {"examples": len(x), "sha256": _array_sha256(x, y)},
           "test": {"examples": len(x_test), "sha256": _array_sha256(x_test, y_test)}}
    paths = [os.path.join(run_dir, f) for f in FEATURE_FILES]
    key_path = os.path.join(run_dir, FEATURE_KEY)
    old_key = None
    if os.path.exists(key_path):
        with open(key_path) as f:
            old_key = json.load(f)
    if old_key == key and all(os.path.exists(p) for p in paths):
        features, features_test = (np.load(p) for p in paths)
        if len(features) == len(x) and len(features_test) == len(x_test):
            if verbose:
                print(f"Reusing the cached features in {run_dir} ({features.shape[1]} per "
                      "image; source and data unchanged).", flush=True)
            return features, features_test, {"reused": True, "seconds": 0.0,
                                             "dim": int(features.shape[1])}
    if old_key is not None and old_key != key and os.path.isdir(os.path.join(run_dir, "backup")):
        raise ValueError(
            f"{run_dir} holds an interrupted run whose features came from another source or "
            "other data (features_key.json differs): resuming it would train its classifier on "
            "different features. Use a new --out directory, or delete "
            f"{os.path.join(run_dir, 'backup')} to start this run over.")
    start = time.time()
    if verbose:
        print(f"Computing features of {len(x)} training and {len(x_test)} test images with "
              f"the frozen backbone '{ft['source']}' (once; cached in {run_dir}).", flush=True)
    computed = [extract_features(model, images, verbose=1 if verbose else 0)
                for images in (x, x_test)]
    if os.path.exists(key_path):
        os.remove(key_path)                  # the old features are no longer valid
    for array, path in zip(computed, paths):
        partial = path + ".partial.npy"
        np.save(partial, array)
        os.replace(partial, path)
    with open(key_path, "w") as f:           # written last: a complete cache has a key
        json.dump(key, f, indent=1)
    return computed[0], computed[1], {"reused": False, "seconds": round(time.time() - start, 1),
                                      "dim": int(computed[0].shape[1])}
