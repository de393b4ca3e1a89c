"""Package attributes imported on first use, so that the command line starts without TensorFlow.

``import dp_keras_scale`` in a program or notebook imports everything at once, as before (the
Keras classes of the library are then registered, so ``keras.models.load_model`` finds them).
When Python starts *as the command* (the ``dp-keras-scale`` script or
``python -m dp_keras_scale...``), the packages defer their TensorFlow modules until an
attribute is used: ``dp-keras-scale --help``, ``configs`` and ``epsilon`` never import
TensorFlow and answer in well under a second.

Example:
    >>> __getattr__, __dir__ = package_attributes(__name__, {"DPSGD": "optimizers"})
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

COMMAND = "dp-keras-scale"


def started_as_command() -> bool:
    """True when this Python process runs the command, not a program that imports the library.

    Decided once, when the package is first imported (`COMMAND_START`): under ``-m``,
    ``sys.argv[0]`` changes from ``"-m"`` to the module's path before the module runs.

    The console script's ``sys.argv[0]`` is its path (``.../bin/dp-keras-scale``). Under
    ``python -m dp_keras_scale.cli`` Python imports the package while it locates the module,
    and ``sys.argv[0]`` is ``"-m"`` until then (documented for ``-m``; any other ``-m`` module,
    such as pytest or ipykernel, is located before it can import this package).
    """
    return COMMAND_START


def _argv_names_the_command() -> bool:
    first = sys.argv[0] if sys.argv else ""
    return first == "-m" or os.path.basename(first).startswith(COMMAND)


COMMAND_START = _argv_names_the_command()


def package_attributes(package: str, exports: dict[str, str]
                       ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` (PEP 562) of a deferring package.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the submodule (relative to `package`) that defines it. A
            submodule itself (``"accounting"``) needs no entry: any submodule is found by name.

    Returns:
        ``(__getattr__, __dir__)``; ``__getattr__`` imports the defining submodule once and
        caches the attribute in the package.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        elif name.startswith("_"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__


def load_all(package: str, names: list[str]) -> None:
    """Imports every public name of `package` now (the behaviour of a plain import)."""
    module = sys.modules[package]
    for name in names:
        getattr(module, name)
