"""Process settings for a scoring run: native thread pools and the C allocator.

The scorer runs two lanes (ASR beside the other metric groups, see :mod:`cbx.eval.scorer`).
Two process-wide settings decided whether that fits in 0.1 of real time on the 2-core machine
(``cbx bench scorer``, figures in its docstring):

- **Thread pools.** numpy's OpenBLAS and the OpenMP runtime start one thread per core and
  spin them between calls. The small products the metrics make (Whisper's mel filters,
  Resemblyzer's preprocessing) then burn the other lane's core: on 2 cores ASR took 0.56 s of
  CPU for 0.46 s of wall time. Inside a run BLAS and OpenMP get ``threads`` each
  (threadpoolctl), so the lanes do not steal from each other.
- **Freed memory.** CTranslate2 allocates its activations per call; Whisper's encoder takes
  about 54 MB for the 1,500x1,500 attention scores of every layer. glibc serves requests of
  that size with a fresh ``mmap`` and unmaps them on free, so every call page-faults and zeroes
  that memory again: a third of the encoder's time went to the kernel (``perf``). Inside a run
  glibc keeps freed memory for reuse (``mallopt``: no ``mmap`` for large requests, no trimming),
  which took the encoder from 0.45 s to 0.29 s. On exit the defaults are restored and the kept
  memory is given back (``malloc_trim``).

``mallopt`` is set by hand (ctypes) because no maintained Python library exposes it; it is
skipped where the C library is not glibc, or where the user already tunes glibc's allocator
through its environment variables (those win).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
from typing import Iterator

# glibc's mallopt parameters and defaults (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
KEEP_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the top of a heap

_USER_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.lru_cache(maxsize=1)
def _mallopt():
    """glibc's ``(mallopt, malloc_trim)``, or None where absent or the user set the allocator up."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(k in os.environ for k in _USER_MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        libc = ctypes.CDLL(None)
        fn, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return fn, trim


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Inside: glibc reuses freed memory instead of returning it to the kernel. Yields whether
    the setting took effect (False off glibc or when the user tunes malloc)."""
    fns = _mallopt()
    if fns is None:
        yield False
        return
    mallopt, malloc_trim = fns
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
    try:
        yield ok
    finally:
        mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        malloc_trim(0)  # give what the run kept back to the kernel now


def thread_pools():
    """The process's native thread pools (BLAS, OpenMP), for temporary limits.

    Found again whenever a module was imported since the last look (native libraries arrive
    with imports: a model's runtime loads its own BLAS): a controller found once, before the
    metric models loaded, left their BLAS unlimited. The scan costs ~5 ms; the check, nothing.
    """
    return _thread_pools(len(sys.modules))


@functools.lru_cache(maxsize=1)
def _thread_pools(_n_modules: int):
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def lane_threads() -> int:
    """Native threads per lane: half the CPUs this process may use (two lanes), at least one."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


@contextlib.contextmanager
def scoring_runtime(threads: int | None = None) -> Iterator[None]:
    """The settings of a scoring run (see the module docstring); everything is restored on exit."""
    n = threads or lane_threads()
    with thread_pools().limit(limits=n, user_api="blas"), thread_pools().limit(limits=n, user_api="openmp"), keep_freed_memory():
        yield
