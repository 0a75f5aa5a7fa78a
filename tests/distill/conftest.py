"""Shared fixtures of the distill tests: the tiny model and one recorded teacher-data folder.

The tiny teacher is run with one torch thread: on a shared 2-core machine two threads made
each small estimator call 10-50x slower (thread hand-offs), and the thread count is restored
after each test so other areas' tests are untouched.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model():
    from cbx.engine.tiny import build_tiny

    return build_tiny("original", seed=0)
