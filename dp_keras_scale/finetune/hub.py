"""TF-Hub handles: recognising them and resolving them to a local SavedModel directory.

Example:
    >>> is_hub_handle("https://tfhub.dev/google/bit/m-r50x1/1")
    True
    >>> path = resolve_hub("https://tfhub.dev/google/bit/m-r50x1/1")   # TFHUB_CACHE_DIR
"""

from __future__ import annotations

import os

__all__ = ["BackboneNotFoundError", "HUB_PREFIXES", "is_hub_handle", "resolve_hub"]

#: A backbone source starting with one of these is a TF-Hub handle (or URL), not a path.
HUB_PREFIXES = ("http://", "https://", "gs://")


class BackboneNotFoundError(FileNotFoundError):
    """A backbone source (TF-Hub handle, SavedModel directory or model file) is unavailable."""


def is_hub_handle(source: str) -> bool:
    """Whether `source` is a TF-Hub handle or URL (``https://...``, ``gs://...``).

    Args:
        source: a backbone source as the user wrote it.

    Returns:
        True for a handle, False for a local path or a built-in backbone's name.
    """
    return source.startswith(HUB_PREFIXES)


def resolve_hub(handle: str) -> str:
    """The local SavedModel directory of a TF-Hub handle (downloaded once, into the cache).

    Args:
        handle: a TF-Hub handle or URL.

    Returns:
        The directory ``tensorflow_hub.resolve`` gives, inside ``TFHUB_CACHE_DIR``.

    Raises:
        BackboneNotFoundError: the handle is not cached and cannot be downloaded; the message
            says how to work offline.
    """
    try:
        import tensorflow_hub as hub
    except ImportError as error:   # pragma: no cover - tensorflow-hub is a dependency
        raise ImportError(f"Loading the TF-Hub handle '{handle}' needs tensorflow-hub: "
                          "pip install 'tensorflow-hub>=0.16'") from error
    cache = os.environ.get("TFHUB_CACHE_DIR") or "(unset: TF-Hub uses <tmp>/tfhub_modules)"
    try:
        return hub.resolve(handle)
    except Exception as error:
        raise BackboneNotFoundError(
            f"Could not resolve the TF-Hub handle '{handle}': it is not in the TF-Hub cache "
            f"(TFHUB_CACHE_DIR={cache}) and downloading it failed ({type(error).__name__}: "
            f"{error}). Without internet, download the model elsewhere and either set "
            "TFHUB_CACHE_DIR to the cache that holds it or pass its unpacked SavedModel "
            "directory instead of the handle.") from error
