"""Cost metrics: rates computed from the engine's timings, and omitted (never 0) when an input
is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbx.eval.metrics.cost import MIB, STAGES, CostGroup, cost_scores
from cbx.eval.registry import metric_specs
from cbx.eval.types import Utterance

SR = 24000


def _utt(seconds: float, timings: dict, extra: dict) -> Utterance:
    audio = np.zeros(int(seconds * SR), np.float32)
    return Utterance(id="u", audio=audio, sr=SR, text="", timings=timings, extra=extra)


def test_rates_from_engine_figures():
    timings = {"conditioning": 0.5, "t3": 2.0, "cfm": 1.5, "vocoder": 0.25, "watermark": 0.05, "total": 4.3}
    extra = {"speech_tokens": list(range(100)), "peak_mem_bytes": 3 * MIB, "model_bytes": 1024 * MIB}
    s = CostGroup().score(_utt(4.0, timings, extra))
    for stage in STAGES:
        assert s[f"rtf_{stage}"] == pytest.approx(timings[stage] / 4.0)
    assert s["speech_tokens_per_s"] == pytest.approx(50.0)
    assert s["peak_mem_mib"] == pytest.approx(3.0)
    assert s["model_mib"] == pytest.approx(1024.0)
    assert set(s) == {spec.name for spec in CostGroup.specs}


def test_token_count_from_any_container():
    for tokens in (100, list(range(100)), np.arange(100), torch.arange(100)):
        assert cost_scores({"t3": 4.0}, {"speech_tokens": tokens}, 1.0)["speech_tokens_per_s"] == pytest.approx(25.0)


def test_missing_or_bad_inputs_omit_the_metric():
    s = CostGroup().score(_utt(2.0, {"t3": 1.0}, {}))
    assert s == {"rtf_t3": 0.5}
    bad = {"total": None, "t3": "n/a", "cfm": float("nan"), "vocoder": -1.0}
    assert cost_scores(bad, {"peak_mem_bytes": None}, 2.0) == {}
    assert cost_scores({"total": 1.0}, {}, 0.0) == {}  # no audio: no real-time factor
    assert "speech_tokens_per_s" not in cost_scores({"t3": 0.0}, {"speech_tokens": 10}, 1.0)


def test_directions_are_registered():
    specs = metric_specs()
    assert specs["rtf_total"].higher_is_better is False
    assert specs["speech_tokens_per_s"].higher_is_better is True
    assert specs["peak_mem_mib"].aggregation == "max"
