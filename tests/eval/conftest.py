"""Session-wide fixtures of the eval tests: each metric model loads once per test session.

The groups come from :func:`cbx.eval.scorer.get_group`, the scorer's own process-wide cache, so
scorer tests reuse the very instances the metric tests loaded.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def asr_group():
    from cbx.eval.scorer import ScorerConfig, get_group

    g = get_group("asr", ScorerConfig().asr)
    g.load()
    return g


@pytest.fixture(scope="session")
def speaker_group():
    from cbx.eval.scorer import ScorerConfig, get_group

    g = get_group("speaker", ScorerConfig().speaker)
    g.load()
    return g


@pytest.fixture(scope="session")
def mos_group():
    from cbx.eval.scorer import ScorerConfig, get_group

    g = get_group("mos", ScorerConfig().mos)
    g.load()
    return g
