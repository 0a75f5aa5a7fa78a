"""Fixtures shared by every area's tests: the built-in tiny Chatterbox models.

Each tiny model is built once per test session (about a second each, seeded, no download).
They are shared: a test that changes a model (quantizes, prunes, swaps modules, moves it to
another device or dtype) must work on its own copy, ``tiny_copy("original")`` (a deep copy,
cheaper than a rebuild), never on the session object.
"""

from __future__ import annotations

import copy

import pytest


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
