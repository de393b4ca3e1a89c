"""TensorFlow's caching (BFC) allocator for CPU memory, chosen before TensorFlow starts.

By default TensorFlow takes every CPU tensor from the C library's `malloc`, which hands large
blocks back to the operating system when they are freed. A DP step allocates and frees
several large temporaries per layer (per-example gradients, Gram matrices, re-weighted output
gradients), so each step faults hundreds of megabytes of fresh pages back in: measured on
WRN-16-4 (WS) at (B 64, K 1) and (16, 4) on a quiet 2-core CPU, 120,000-175,000 page faults
and 0.4-0.6 s of kernel time per DP step, against 600-2,200 faults and 0.09-0.11 s with
TensorFlow's BFC allocator, which keeps freed blocks for reuse (README, Performance).
``TF_CPU_ALLOCATOR_USE_BFC=1`` selects it; TensorFlow
reads the variable once, when it creates its CPU device, so it must be set before the first
TensorFlow operation runs.

`prefer_caching_allocator` sets it unless the user set it (``TF_CPU_ALLOCATOR_USE_BFC=0``
keeps `malloc`). The pool is capped at 64 GiB by TensorFlow (``TF_CPU_BFC_MEM_LIMIT_IN_MB``)
and is not returned to the system while the process lives.

Example:
    >>> prefer_caching_allocator()            # before TensorFlow's first operation
    >>> caching_allocator_active()            # after it
    True
"""

from __future__ import annotations

import os

VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"


def prefer_caching_allocator() -> None:
    """Selects TensorFlow's BFC allocator for CPU memory, unless ``TF_CPU_ALLOCATOR_USE_BFC``
    is already set (either way)."""
    os.environ.setdefault(VARIABLE, "1")


def caching_allocator_active() -> bool:
    """Whether this process's CPU tensors come from the BFC allocator (only it keeps the
    statistics that `tf.config.experimental.get_memory_info` reads)."""
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return False
    return True
