"""Shared by the per-framework benchmark scripts: arguments, timing, and the result record.

Standard library only: every framework's virtualenv imports it. A script measures ONE row
(framework, method, B, K) per process, so rows do not share thread pools, caches or memory and
the peak resident memory reported is the row's own.

    python bench_torch.py --method func --batch 16 --copies 4 --steps 5 --out row.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

# Same settings in every framework (the driver also sets them in the environment).
LEARNING_RATE = 0.1
L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.0
NUM_CLASSES = 10
GROUPS = 16
DEPTH, WIDTH = 16, 4
IMAGE_SHAPE = (32, 32, 3)


def thread_environment(threads: int) -> dict[str, str]:
    """Environment variables that cap every framework at `threads` compute threads."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": str(threads),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # XLA:CPU (JAX, and TensorFlow's jit_compile) runs its Eigen pool on the intra-op count.
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}",
    }


def parse_args(methods: tuple[str, ...]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=methods)
    parser.add_argument("--batch", type=int, required=True, help="B: examples per step")
    parser.add_argument("--copies", type=int, required=True, help="K: augmentation copies")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (tracing, compilation, allocator warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file for this row's result")
    args = parser.parse_args()
    if args.batch < 1 or args.copies < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch, --copies and --steps must be >= 1 and --warmup >= 0")
    return args


def synthetic_batch(batch: int, copies: int, seed: int = 0):
    """Images [B, K, 32, 32, 3] uniform in [0, 1) and integer labels [B] (numpy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((batch, copies, *IMAGE_SHAPE), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, batch).astype(np.int64)
    return x, y


def time_steps(step: Callable[[], object], steps: int,
               warmup: int) -> tuple[list[float], list[float], float]:
    """Runs `step` `warmup` times untimed, then `steps` times timed.

    `step` must return only when the update has been computed (block on asynchronous results).
    Returns the timed steps' wall-clock durations and process CPU times (all threads; less
    sensitive than wall-clock time to other processes competing for the CPUs), in seconds, and
    the warm-up wall-clock time (compilation included).
    """
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times, warmup_s


def write_result(args: argparse.Namespace, *, framework: str, method: str, versions: dict,
                 params: int, times: tuple[list[float], list[float], float],
                 notes: str = "") -> dict:
    """Writes one row's record to ``args.out`` and prints a one-line summary.

    `times` is what `time_steps` returns.
    """
    times, cpu_times, warmup_s = times
    median = statistics.median(times)
    images = args.batch * args.copies
    record = {
        "framework": framework,
        "method": method,
        "versions": versions,
        "python": platform.python_version(),
        "params": int(params),
        "B": args.batch,
        "K": args.copies,
        "threads": args.threads,
        "step_times_s": times,
        "median_step_s": median,
        "images_per_s": images / median,
        "cpu_step_times_s": cpu_times,
        "images_per_cpu_s": images / statistics.median(cpu_times),
        "warmup_s": warmup_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "notes": notes,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"{framework} {method} B={args.batch} K={args.copies}: {median:.3f} s/step, "
          f"{images / median:.1f} images/s, {params} parameters, "
          f"peak RSS {record['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return record


def apply_threads(threads: int) -> None:
    """Caps this process at `threads` compute threads; call before importing a framework."""
    os.environ.update(thread_environment(threads))
