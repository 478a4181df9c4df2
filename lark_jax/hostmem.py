"""Host memory allocation for XLA:CPU: keep its per-step temporaries mapped.

XLA:CPU allocates a program's temporaries with ``malloc`` on every execution. Its worker
threads allocate from glibc's per-thread arenas, whose heaps cannot hold a block of more than
64 MB, so a larger block (a training step's attention probabilities and activations: 100+ MB
for the demo's student) is a fresh ``mmap`` each step, returned with ``munmap``, and every
page of it faults in again: on the demo's fine-tunes 28,000 page faults and 40-60 ms of
kernel time per 120 ms step. One arena (``M_ARENA_MAX`` 1), blocks up to 1 GiB from the heap
(``M_MMAP_THRESHOLD``) and freed memory kept (``M_TRIM_THRESHOLD``) serve every step from
pages already mapped: no faults, ~1.4x faster steps (``benchmarks/bench_cpu_malloc.py``).

It only helps a CPU backend, and one arena could slow many host threads allocating at once,
so :func:`tune_cpu_malloc` leaves processes that may run on an accelerator alone. It must run
before JAX creates its CPU client (its threads pick their arena then): the CLI calls it first.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP = 1 << 30  # blocks up to 1 GiB from the heap; up to 1 GiB of freed memory kept

_applied = False


def cpu_only() -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` says cpu, or it is unset and no
    accelerator plugin (CUDA, ROCm, TPU) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def tune_cpu_malloc(force: bool = False) -> bool:
    """Set glibc's allocator for XLA:CPU (see the module docstring) if this is Linux with
    glibc and JAX will run on the CPU (``force``: whatever the platform). Call it before the
    first JAX computation. Returns whether the settings were applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or not (force or cpu_only()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    ok = all(mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP),
                                             (M_TRIM_THRESHOLD, KEEP)))
    _applied = ok
    return ok


__all__ = ["cpu_only", "tune_cpu_malloc"]
