"""The scoring run's process settings: freed memory is reused inside and returned after, native
thread pools are limited inside and restored after, and a user's own malloc tuning wins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from cbx.eval import runtime

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


_CHECK = r"""
import ctypes
import numpy as np
from cbx.eval import runtime


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


info = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
info.restype = Mallinfo2
MB64 = 64 * 2**20


def where_a_big_array_lives():
    # (bytes newly mmap'd, bytes the heap grew) while a 64 MB array is alive
    before = info()
    a = np.ones(MB64 // 8)  # malloc'd by numpy
    during = info()
    del a
    return during.hblkhd - before.hblkhd, during.arena - before.arena


mapped, _ = where_a_big_array_lives()
assert mapped >= MB64, "default: its own mmap, given back on free"
with runtime.keep_freed_memory() as active:
    assert active
    mapped, grown = where_a_big_array_lives()
    # served from the heap (which grows by most of it: a free chunk at its top may cover the rest)
    assert mapped == 0 and grown > MB64 // 2, ("inside: served from the heap", mapped, grown)
    mapped, grown = where_a_big_array_lives()
    assert mapped == 0 and grown < MB64 // 8, ("inside: freed memory reused, not taken again", mapped, grown)
mapped, _ = where_a_big_array_lives()
assert mapped >= MB64, "restored on exit"
print("ok")
"""


@glibc
def test_freed_memory_is_reused_inside_and_returned_after():
    # A fresh process: a long-lived one (the test session) may already hold free heap chunks
    # big enough to serve the test array, which would hide what the setting does.
    env = {k: v for k, v in os.environ.items() if k not in runtime._USER_MALLOC_ENV}
    r = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@glibc
def test_users_malloc_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    runtime._mallopt.cache_clear()
    try:
        with runtime.keep_freed_memory() as active:
            assert active is False
    finally:
        runtime._mallopt.cache_clear()


def test_thread_pools_are_limited_inside_and_restored_after():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})

    import torch

    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library loaded")
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the test session runs torch on one thread
    try:
        with runtime.scoring_runtime(threads=1):
            assert blas_threads() == [1]
            assert torch.get_num_threads() == 1  # torch's OpenMP pool too
        assert blas_threads() == before
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
