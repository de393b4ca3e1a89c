"""Which SavedModel backbones Keras safe mode may reload: the `trusted_sources` registry.

A saved model whose backbone is a SavedModel runs that SavedModel's TensorFlow graph when it
loads, which Keras safe mode refuses. `trusted_sources` lists, for the length of a ``with``
block, the sources the user trusts; `SavedModelLayer.from_config` asks `is_trusted`. The
registry is a stack, so nested blocks add to and then restore what is trusted.

Example:
    >>> with trusted_sources("https://tfhub.dev/google/bit/m-r50x1/1"):
    ...     model = keras.models.load_model("runs/bit/model.keras")
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from dp_keras_scale.finetune.hub import is_hub_handle

__all__ = ["is_trusted", "trusted_sources"]

_TRUSTED: list[set[str]] = []


def _normalized(source: str) -> str:
    return source if is_hub_handle(source) else os.path.realpath(os.path.expanduser(source))


def is_trusted(path: str | None, handle: str | None) -> bool:
    """Whether a SavedModel (its directory `path`, or TF-Hub `handle`) is trusted right now.

    Args:
        path: the SavedModel directory a saved model refers to.
        handle: the TF-Hub handle it was resolved from, if any.

    Returns:
        True inside a `trusted_sources` block that names the handle or the directory.
    """
    trusted = set().union(*_TRUSTED) if _TRUSTED else set()
    return bool((handle and handle in trusted) or (path and _normalized(path) in trusted))


@contextlib.contextmanager
def trusted_sources(*sources: str | os.PathLike) -> Iterator[None]:
    """Lets `keras.models.load_model` (safe mode) reload these SavedModel backbones.

    Safe mode refuses a saved model that reloads a SavedModel (its TensorFlow graph runs on
    load). Inside this block, models whose backbone is one of `sources` (TF-Hub handles or
    SavedModel directories, as given to `build`) load anyway; any other SavedModel is still
    refused.

    Example:
        >>> with trusted_sources("https://tfhub.dev/google/bit/m-r50x1/1"):
        ...     model = keras.models.load_model("runs/bit/model.keras")
    """
    _TRUSTED.append({_normalized(os.fspath(s)) for s in sources if os.fspath(s)})
    try:
        yield
    finally:
        _TRUSTED.pop()
