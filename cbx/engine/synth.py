"""Batched, seeded, timed synthesis: many (text, voice) requests -> 24 kHz waveforms.

This is the pipeline every other layer calls (the runner, the eval suite, ``cbx synth``,
``cbx bench engine``). It only orchestrates; the model-specific work lives in its neighbours:

    conditioning   cbx.engine.conditioning.prepare_voice (cached per voice file)
    text           cbx.engine.text (normalisation and sentence chunking)
    t3             cbx.engine.t3_decode (ONE batched decode: CFG pairs, static KV cache)
    cfm            cbx.engine.s3gen_batch.cfm_inputs + solve_cfm (ONE batched flow-matching solve)
    vocoder        cbx.engine.s3gen_batch.vocode
    watermark      perth, once per joined utterance

Why it is built this way:

* Long text is split into sentence chunks and each chunk is a *row* of the batch, so a long
  paragraph and a short sentence share the same decode loop; chunks are joined back per
  request with a short equal-power crossfade (:func:`crossfade_join`).
* Every row draws from its own random streams, seeded from ``settings.seed`` and the chunk's
  index inside its request (:func:`row_seed`), never from its position in the batch: the same
  request with the same seed gives the same audio whatever else is batched with it, as a
  per-utterance ``torch.manual_seed(seed)`` loop would.
* Defaults are written once: universal ones as dataclass defaults, the ones upstream sets per
  model variant in :data:`VARIANT_DEFAULTS` (``None`` in a field means "the variant's value").
* Stage times come from :class:`cbx.engine.timing.StageTimer`; a stage's time is shared out to
  the requests in proportion to their work (tokens, audio length) so per-utterance rows sum to
  the batch figure.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cbx.engine.timing import STAGES, SPEECH_TOKENS_PER_AUDIO_S, PeakMemory, RunTiming, StageTimer, apportion
from cbx.errors import CbxError

SAMPLE_RATE = 24_000

# Values upstream's generate() uses per variant (tts.py, tts_turbo.py, mtl_tts.py, 0.1.7).
# top_k 0 means "no top-k filter"; Turbo has no CFG, no min_p and no exaggeration.
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "original": dict(top_p=1.0, min_p=0.05, top_k=0, repetition_penalty=1.2, cfg_weight=0.5,
                     exaggeration=0.5, cfm_steps=10),
    "multilingual": dict(top_p=1.0, min_p=0.05, top_k=0, repetition_penalty=2.0, cfg_weight=0.5,
                         exaggeration=0.5, cfm_steps=10),
    "turbo": dict(top_p=0.95, min_p=0.0, top_k=1000, repetition_penalty=1.2, cfg_weight=0.0,
                  exaggeration=0.0, cfm_steps=2),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class SynthSettings:
    """How to synthesize. ``None`` = the model variant's default (see :data:`VARIANT_DEFAULTS`).

    ``temperature`` 0 means greedy decoding. ``force_tokens`` (benchmarks only) decodes exactly
    that many speech tokens per row and ignores EOS. ``batch_size`` counts rows (text chunks)
    per decode. ``crossfade_ms`` is the overlap used to join the chunks of a long text.
    """

    temperature: float = 0.8
    top_p: float | None = None
    min_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    cfg_weight: float | None = None
    exaggeration: float | None = None
    seed: int = 0
    max_speech_tokens: int = 1000
    cfm_steps: int | None = None
    watermark: bool = True
    dtype: str = "fp32"
    batch_size: int = 8
    language_id: str | None = None
    force_tokens: int | None = None
    crossfade_ms: float = 30.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> CbxError:
            return CbxError(f"synth setting '{name}'={getattr(self, name)!r}: {why}")

        def number(name: str, lo: float, hi: float, *, lo_open: bool = False, allow_none: bool = True) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            if v < lo or v > hi or (lo_open and v == lo):
                raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}]")

        def integer(name: str, lo: int, allow_none: bool = True) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
            if v < lo:
                raise bad(name, f"must be >= {lo}")

        number("temperature", 0.0, 10.0, allow_none=False)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        integer("top_k", 0)
        number("repetition_penalty", 0.0, 10.0, lo_open=True)
        number("cfg_weight", 0.0, 10.0)
        number("exaggeration", 0.0, 10.0)
        integer("seed", 0, allow_none=False)
        integer("max_speech_tokens", 1, allow_none=False)
        integer("cfm_steps", 1)
        integer("batch_size", 1, allow_none=False)
        integer("force_tokens", 1)
        number("crossfade_ms", 0.0, 1000.0, allow_none=False)
        if not isinstance(self.watermark, bool):
            raise bad("watermark", "must be true or false")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {sorted(DTYPES)}")
        if self.language_id is not None and (not isinstance(self.language_id, str) or not self.language_id):
            raise bad("language_id", "must be a language code such as 'en' or 'fr'")

    def resolved(self, variant: str) -> "SynthSettings":
        """A copy with every ``None`` default filled in for ``variant``."""
        if variant not in VARIANT_DEFAULTS:
            raise CbxError(f"unknown model variant '{variant}' (expected one of {sorted(VARIANT_DEFAULTS)})")
        fill = {k: v for k, v in VARIANT_DEFAULTS[variant].items() if getattr(self, k) is None}
        return replace(self, **fill)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class SynthRequest:
    """One utterance to synthesize. ``voice`` is an audio file, ``(wav, sr)``, or None for the
    model's built-in voice (``conds.pt``). ``language_id`` overrides the settings' one."""

    text: str
    voice: str | Path | tuple[np.ndarray, int] | None
    id: str | None = None
    language_id: str | None = None


@dataclass
class SynthResult:
    """The output for one request: ``wav`` float32 mono at :data:`SAMPLE_RATE`."""

    id: str
    text: str
    wav: np.ndarray
    speech_tokens: np.ndarray
    chunks: list[str]
    audio_s: float
    timings: dict[str, float]
    sample_rate: int = SAMPLE_RATE


@dataclass
class SynthBatch:
    """All results of one :meth:`Synthesizer.synthesize` call plus what the call cost."""

    results: list[SynthResult]
    run: RunTiming
    settings: SynthSettings = field(repr=False, default_factory=SynthSettings)

    @property
    def timings(self) -> dict[str, float]:
        return self.run.stages

    @property
    def speech_tokens_per_s(self) -> float:
        return self.run.speech_tokens_per_s

    @property
    def peak_mem_bytes(self) -> int:
        return self.run.peak_mem_bytes


# ----------------------------------------------------------------------------- pure helpers


def equal_power_fades(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fade-out and fade-in curves of ``n`` samples with ``out**2 + in**2 == 1`` everywhere.

    Equal power (cos/sin) rather than linear keeps the loudness constant across the joint for
    uncorrelated signals (two different sentences), where a linear fade dips by 3 dB.
    """
    if n <= 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.cos(0.5 * np.pi * t).astype(np.float32), np.sin(0.5 * np.pi * t).astype(np.float32)


def crossfade_join(wavs: Sequence[np.ndarray], overlap: int) -> np.ndarray:
    """Concatenate ``wavs`` overlapping each joint by ``overlap`` samples (equal-power fade).

    The overlap at a joint shrinks to the shorter of the two pieces, so the output length is
    ``sum(len) - sum(overlaps actually used)``.
    """
    if not wavs:
        return np.zeros(0, np.float32)
    out = np.asarray(wavs[0], dtype=np.float32)
    for nxt in wavs[1:]:
        nxt = np.asarray(nxt, dtype=np.float32)
        n = max(0, min(int(overlap), len(out), len(nxt)))
        fo, fi = equal_power_fades(n)
        joint = out[len(out) - n:] * fo + nxt[:n] * fi
        out = np.concatenate([out[: len(out) - n], joint, nxt[n:]])
    return out


def row_seed(seed: int, chunk_index: int, stream: str) -> int:
    """A 63-bit seed for one row's random ``stream`` ("t3" or "cfm").

    Depends only on the user's seed, the chunk's index within its request and the stream name,
    so a row's randomness is the same whatever it is batched with.
    """
    h = hashlib.blake2b(f"{seed}:{chunk_index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
