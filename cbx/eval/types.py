"""What the scorer hands to metrics, and what a metric group must provide.

A metric group loads its models once per process (``load``) and scores one utterance at a
time (``score``), returning ``{metric_name: value}`` for the metrics it registered. Scores
must not depend on which other utterances are scored, their order or the batch size. A metric
that cannot be computed for an utterance (no prompt, no reference) is left out, never 0.
Keys that are not registered metric names are kept in the row's ``details`` (JSON values: the
ASR transcript, the error counts behind corpus WER). A group may carry a ``variant`` string
(e.g. the ASR model) that results record beside the metric version, so numbers from different
models are never compared as equals.

Metrics that need one sample rate call :meth:`Utterance.audio_at` / :meth:`Utterance.prompt_at`,
which resample once per utterance and rate whichever group asks first.
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
    fidelity_audio: np.ndarray | None = None  # what fidelity compares with the reference (default: audio)
    fidelity_sr: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # engine stage seconds
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. speech_tokens, peak_mem_bytes
    _resampled: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def _at(self, which: str, wav: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
        key = (which, target_sr)
        if key not in self._resampled:
            from cbx.eval.audio import resample

            self._resampled[key] = resample(wav, sr, target_sr)
        return self._resampled[key]

    def audio_at(self, sr: int) -> np.ndarray:
        """The output audio at ``sr`` Hz (resampled once, then cached)."""
        return self._at("audio", self.audio, self.sr, sr)

    def prompt_at(self, sr: int) -> np.ndarray | None:
        """The voice prompt at ``sr`` Hz, or None when the utterance has no prompt."""
        if self.prompt_audio is None or self.prompt_sr is None:
            return None
        return self._at("prompt", self.prompt_audio, self.prompt_sr, sr)


class MetricGroup(Protocol):
    specs: ClassVar[list[MetricSpec]]  # optional instance attribute: variant: str

    def load(self) -> None: ...

    def score(self, utt: Utterance) -> dict[str, float]: ...
