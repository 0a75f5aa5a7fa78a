"""Cost metrics: what an utterance cost to synthesize, from the figures the engine reported.

The eval layer does not time anything itself (it does not know how the audio was made); it
turns the engine's per-utterance stage seconds (``utt.timings``: conditioning, t3, cfm,
vocoder, watermark, total) and the counts in ``utt.extra`` (``speech_tokens``,
``peak_mem_bytes``, ``model_bytes``) into comparable rates. A missing input omits its metric
rather than reporting 0, so a run that did not measure memory never looks free.

Real-time factors divide by the length of the audio actually scored (lower is better: 0.1
means ten seconds of speech per second of compute).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from cbx.eval.registry import MetricSpec, register_metric
from cbx.eval.types import Utterance

VERSION = "1"
STAGES = ("conditioning", "t3", "cfm", "vocoder", "watermark", "total")
MIB = 1024.0**2


def _spec(name, higher, unit, desc, aggregation="mean"):
    return register_metric(MetricSpec(name, higher, VERSION, unit, aggregation, desc))


SPECS = [
    *[_spec(f"rtf_{s}", False, "x", f"{s} seconds per second of audio") for s in STAGES],
    _spec("speech_tokens_per_s", True, "tok/s", "speech tokens generated per second of T3 time"),
    _spec("peak_mem_mib", False, "MiB", "peak accelerator (or host) memory while synthesizing", "max"),
    _spec("model_mib", False, "MiB", "size of the model's weights", "max"),
]


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _token_count(value: Any) -> float | None:
    """``speech_tokens`` may be a count or the tokens themselves (list, array, tensor)."""
    if value is None:
        return None
    if hasattr(value, "numel"):
        return float(value.numel())
    if isinstance(value, (list, tuple, np.ndarray)):
        return float(np.asarray(value).size)
    return _number(value)


def cost_scores(timings: dict, extra: dict, audio_s: float) -> dict[str, float]:
    out: dict[str, float] = {}
    if audio_s > 0:
        for stage in STAGES:
            t = _number(timings.get(stage)) if timings else None
            if t is not None and t >= 0:
                out[f"rtf_{stage}"] = t / audio_s
    tokens = _token_count(extra.get("speech_tokens")) if extra else None
    t3 = _number(timings.get("t3")) if timings else None
    if tokens is not None and t3 is not None and t3 > 0:
        out["speech_tokens_per_s"] = tokens / t3
    for key, name in (("peak_mem_bytes", "peak_mem_mib"), ("model_bytes", "model_mib")):
        v = _number(extra.get(key)) if extra else None
        if v is not None and v >= 0:
            out[name] = v / MIB
    return out


class CostGroup:
    """Metric group over the engine's timings and counters."""

    specs: ClassVar[list[MetricSpec]] = SPECS

    def load(self) -> None:
        """Nothing to load."""

    def score(self, utt: Utterance) -> dict[str, float]:
        n = np.asarray(utt.audio).reshape(-1).size
        return cost_scores(utt.timings or {}, utt.extra or {}, n / utt.sr if utt.sr else 0.0)
