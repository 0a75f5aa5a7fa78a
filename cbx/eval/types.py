"""What the scorer hands to metrics, and what a metric group must provide.

A metric group loads its models once per process (``load``) and scores one utterance at a
time (``score``), returning ``{metric_name: value}`` for the metrics it registered. Scores
must not depend on which other utterances are scored, their order or the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from cbx.eval.registry import MetricSpec


@dataclass
class Utterance:
    id: str
    audio: np.ndarray  # mono float32
    sr: int
    text: str  # target text
    prompt_audio: np.ndarray | None = None  # voice prompt, mono float32
    prompt_sr: int | None = None
    prompt_text: str | None = None
    reference_audio: np.ndarray | None = None  # the uncompressed model's output, for fidelity
    reference_sr: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # engine stage seconds
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. speech_tokens, peak_mem_bytes


class MetricGroup(Protocol):
    specs: ClassVar[list[MetricSpec]]

    def load(self) -> None: ...

    def score(self, utt: Utterance) -> dict[str, float]: ...
