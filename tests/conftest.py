"""Fixtures shared by every area's tests: the built-in tiny Chatterbox models.

Each tiny model is built once per test session (about a second each, seeded, no download).
They are shared: a test that changes a model (quantizes, prunes, swaps modules, moves it to
another device or dtype) must work on its own copy, ``tiny_copy("original")`` (a deep copy,
cheaper than a rebuild), never on the session object.

Torch runs tests on ONE intra-op thread unless ``OMP_NUM_THREADS`` says otherwise: the tiny
models' small tensor ops gain nothing from a second thread, and on a busy 2-core machine
OpenMP's spinning threads made the engine tests 3.5x slower in wall time (204 s vs 58 s) and
4.7x more CPU (76 s vs 16 s), measured side by side on this machine.
"""

from __future__ import annotations

import copy
import os

import pytest

# No test may reach a model hub (CI has no network, and a test that downloads is not offline).
# Set before anything imports huggingface_hub/transformers, which read these once.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
# The voice-conditioning disk cache (cbx.engine.cond_cache) is off unless a test turns it on with
# its own tmp folder: tests never write to ~/.cache, and a hit from another test's voice would
# change what a test measures (computations counted, conditioning timed).
os.environ["CBX_COND_CACHE"] = "off"


def pytest_configure(config):
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    """The built-in tiny original (Llama T3 with CFG, 10-step CFM S3Gen), seed 0. Read-only."""
    from cbx.engine.tiny import build_tiny

    return build_tiny("original", seed=0)


@pytest.fixture(scope="session")
def tiny_turbo():
    """The built-in tiny Turbo (GPT-2 T3, MeanFlow S3Gen), seed 0. Read-only."""
    from cbx.engine.tiny import build_tiny

    return build_tiny("turbo", seed=0)


@pytest.fixture(scope="session")
def tiny_multilingual():
    """The built-in tiny multilingual model, seed 0. Read-only."""
    from cbx.engine.tiny import build_tiny

    return build_tiny("multilingual", seed=0)


@pytest.fixture
def tiny_copy(request):
    """``tiny_copy(variant)``: a private deep copy of a session tiny model, safe to modify."""
    names = {"original": "tiny_model", "turbo": "tiny_turbo", "multilingual": "tiny_multilingual"}

    def make(variant: str = "original"):
        return copy.deepcopy(request.getfixturevalue(names[variant]))

    return make
