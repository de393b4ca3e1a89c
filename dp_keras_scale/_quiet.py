"""A quiet TensorFlow start for the command line (``dp-keras-scale ... --verbose`` keeps the logs).

TensorFlow 2.21 logs through absl from C++. Two kinds of lines reach a terminal:

- lines written while the shared libraries load (oneDNN, "Could not find cuda drivers",
  CPU instructions, "All log messages before absl::InitializeLog()"), once per library. absl
  prints them before any of its settings exist, so no environment variable silences them:
  `importing` sends file descriptor 2 elsewhere while TensorFlow is imported, and replays
  what was written there if the import fails;
- lines written later (XLA service start, "failed call to cuInit" on a machine without a GPU,
  "Error occurred when finalizing GeneratorDataset iterator"): ``TF_CPP_MIN_LOG_LEVEL=3``
  silences them, but only when it is set before TensorFlow is imported (`configure`).

Example:
    >>> configure(verbose=False)
    >>> with importing(verbose=False):
    ...     from dp_keras_scale import experiment
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

# Log-level variables of TensorFlow (C++), gRPC (distributed runs) and absl (Python side).
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}


def configure(verbose: bool) -> None:
    """Sets TensorFlow's log levels for this process (before it imports TensorFlow).

    Args:
        verbose: keep TensorFlow's own levels (all its logs) instead.

    Variables the user set are left as they are.
    """
    if verbose:
        return
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def importing(verbose: bool) -> Iterator[None]:
    """Imports inside the block load TensorFlow without its start-up lines on stderr.

    Args:
        verbose: leave stderr alone.

    What TensorFlow writes to stderr meanwhile goes to a temporary file, shown only if the
    block raises (so a failed import still explains itself). Python-side TensorFlow / absl
    loggers are set to errors only.
    """
    if verbose or "tensorflow" in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
