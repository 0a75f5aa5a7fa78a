"""Batched, seeded, timed synthesis: many (text, voice) requests -> 24 kHz waveforms.

This is the pipeline every other layer calls (the runner, the eval suite, ``cbx synth``,
``cbx bench engine``). It only orchestrates; the model-specific work lives in its neighbours:

    conditioning   cbx.engine.conditioning.prepare_voice (cached per voice file)
    text           cbx.engine.text (normalisation and sentence chunking)
    t3             cbx.engine.t3_decode (ONE batched decode: CFG pairs, static KV cache)
    cfm            cbx.engine.s3gen_batch.cfm_inputs + solve_cfm (flow encoder, then ONE batched
                   flow-matching solve; the stage includes the encoder, as upstream's flow does)
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

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cbx.engine.timing import STAGES, PeakMemory, RunTiming, StageTimer, apportion
from cbx.errors import CbxError

SAMPLE_RATE = 24_000
log = logging.getLogger("cbx.engine.synth")

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
AUTO_DTYPE = "auto"


def auto_dtype(device: torch.device | str) -> str:
    """What ``dtype: auto`` means on ``device``: ``bf16`` where bf16 matrix products run natively
    (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), else ``fp32``. One answer per
    machine, so a compressed run and its baseline (same settings, same hardware) agree."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if cpu_has_native_bf16(flags) else "fp32"


def auto_prefill_dtype(dtype: str, device: torch.device | str, model: Any = None) -> str:
    """What ``prefill_dtype: auto`` means: ``fp32`` on a CPU without native bf16 (its emulated
    bf16 matrix products are 3-5x slower than fp32 when compute-bound, as T3's prefill of a few
    hundred rows is; :mod:`cbx.engine.t3_prefill`), else ``dtype`` (CUDA, AMX, AVX512-BF16
    keep the prefill in bf16). A model with a module that has no fp32 path (library quantizers,
    FP8) keeps ``dtype``, and the log says so."""
    if dtype == "fp32" or torch.device(device).type != "cpu" or auto_dtype(device) == "bf16":
        return dtype
    why = _fp32_prefill_unsupported(model) if model is not None else None
    if why:
        log.info("prefill in %s, not fp32: %s", dtype, why)
        return dtype
    return "fp32"


def _fp32_prefill_unsupported(model: Any) -> str | None:
    from cbx.engine.t3_prefill import fp32_prefill_unsupported

    t3 = getattr(model, "t3", None)
    return fp32_prefill_unsupported(t3) if t3 is not None else None


def stage_dtypes(settings: "SynthSettings") -> dict[str, str]:
    """The dtype each stage runs in under resolved ``settings``: T3's prefill (``prefill_dtype``)
    and decode steps (``dtype``; float parts: quantized weights keep their own format), the flow
    encoder and HiFT (``s3gen_bf16``), the CFM estimator (``cfm_dtype``). What
    :meth:`Synthesizer.prepare` logs and benchmarks print."""
    if AUTO_DTYPE in (settings.dtype, settings.prefill_dtype) or settings.cfm_dtype in (None, AUTO_DTYPE):
        raise CbxError("stage_dtypes needs resolved settings (SynthSettings.resolved)")
    low = "bf16" if settings.s3gen_bf16 else "fp32"
    return {"t3_prefill": settings.prefill_dtype, "t3_decode": settings.dtype, "flow_encoder": low,
            "cfm_estimator": settings.cfm_dtype, "hift": low}


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """AMX or AVX512-BF16 in ``/proc/cpuinfo``'s flags: bf16 matrix products run natively (the
    memory-bound T3 decode gains most); without them bf16 is emulated and slower than fp32."""
    flags = set(cpuinfo.split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


@dataclass
class SynthSettings:
    """How to synthesize. ``None`` = the model variant's default (see :data:`VARIANT_DEFAULTS`).

    ``temperature`` 0 means greedy decoding. ``force_tokens`` (benchmarks only) decodes exactly
    that many speech tokens per row and ignores EOS. ``batch_size`` counts rows (text chunks)
    per decode. ``crossfade_ms`` is the overlap used to join the chunks of a long text.
    ``compile`` names a ``torch.compile`` backend for T3's per-token step (``inductor``;
    ``cudagraphs`` on CUDA); the decode then runs on fixed shapes and gives the same tokens, and
    a CPU int4 T3's prefill multiplies its weights unpacked to bf16 (one compiled unpacking per
    weight shape; full T3 prefill 1.27 -> 0.84 s on the 2-core CPU; weights rounded to bf16
    instead of used in float32 by the kernel: outputs within bf16 rounding, tested).
    ``dtype``: ``fp32``, ``bf16`` or ``auto`` (:func:`auto_dtype` of the model's device, filled in
    by :meth:`resolved`); the engine's faithfulness to upstream is checked at fp32.
    ``s3gen_bf16`` runs HiFT's convolution stacks and the flow's conformer encoder in bf16
    (cached copies, :func:`cbx.engine.s3gen_batch.low_precision_hift` / ``low_precision_encoder``;
    the CFM estimator follows ``cfm_dtype``); its measured error bounds are in docs/CONTRACTS.md.
    ``prefill_dtype`` (``auto``, ``fp32``, ``bf16``): the arithmetic of T3's prefill
    (:mod:`cbx.engine.t3_prefill`); ``auto`` (:func:`auto_prefill_dtype`) is fp32 on a CPU
    without native bf16, where emulated bf16 products are slower than fp32, else ``dtype``. The
    decode steps keep ``dtype`` either way; the resolved value is what the run record shows.
    ``cfm_dtype``: the CFM estimator's dtype, ``None`` = ``dtype``'s (the default), ``auto``
    (:func:`auto_dtype`: fp32 on a CPU without native bf16, where the bf16 estimator ran 8x
    slower at full size), ``fp32`` or ``bf16``; filled in by :meth:`resolved`, so the run's
    record says what ran. :func:`stage_dtypes` names each stage's dtype (logged by
    :meth:`Synthesizer.prepare`).
    ``s3gen_prompt_s`` (off by default; trades quality for speed): S3Gen's reference prompt cut to
    its first that many seconds (:func:`cbx.engine.s3gen_batch.cap_prompt`; about what a user
    giving a shorter reference clip gets upstream). The flow runs over prompt + speech in every
    CFM solve and every streamed render, so a 10 s prompt costs more than 2 s of speech; logged
    as a warning when set.
    The first decode of each new shape pays the compilation (full T3 on the 2-core CPU: about
    48 s for compiling plus one run); on that CPU the bf16 T3 stage then ran 1.02x-1.24x faster
    in two single-repeat runs, within its noise. ``cbx bench engine --compile inductor`` prints
    what it buys on the machine at hand (CUDA graphs are where it is expected to pay).
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
    dtype: str = AUTO_DTYPE
    batch_size: int = 8
    language_id: str | None = None
    force_tokens: int | None = None
    crossfade_ms: float = 30.0
    compile: str | None = None
    s3gen_bf16: bool = False
    prefill_dtype: str = AUTO_DTYPE
    cfm_dtype: str | None = None
    s3gen_prompt_s: float | None = None

    def _bad(self, name: str, why: str) -> CbxError:
        """The refusal of setting ``name`` (its value quoted) for reason ``why``."""
        return CbxError(f"synth setting '{name}'={getattr(self, name)!r}: {why}")

    def __post_init__(self) -> None:
        bad = self._bad

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
        number("s3gen_prompt_s", 0.0, 30.0, lo_open=True)
        for name in ("watermark", "s3gen_bf16"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.dtype not in (AUTO_DTYPE, *DTYPES):
            raise bad("dtype", f"must be one of {', '.join((AUTO_DTYPE, *DTYPES))}")
        if self.prefill_dtype not in (AUTO_DTYPE, *DTYPES):
            raise bad("prefill_dtype", f"must be one of {', '.join((AUTO_DTYPE, *DTYPES))}")
        if self.prefill_dtype == "bf16" and self.dtype == "fp32":
            raise bad("prefill_dtype", "bf16 needs dtype bf16 (the prefill runs in the T3 dtype or in fp32)")
        if self.cfm_dtype is not None and self.cfm_dtype not in (AUTO_DTYPE, *DTYPES):
            raise bad("cfm_dtype", f"must be one of {', '.join((AUTO_DTYPE, *DTYPES))} (or null: dtype's)")
        if self.compile is not None:
            backends = _compile_backends()
            if self.compile not in backends:
                raise bad("compile", f"must be a torch.compile backend: one of {', '.join(backends)}")
        if self.language_id is not None and (not isinstance(self.language_id, str) or not self.language_id):
            raise bad("language_id", "must be a language code such as 'en' or 'fr'")

    def resolved(self, model_or_variant: Any, device: torch.device | str | None = None) -> "SynthSettings":
        """A copy with every ``None`` default filled in for a model (or a variant name), and
        ``dtype: auto`` resolved for ``device`` (default: the model's device; CPU for a name).

        A model's own ``meta["cfm_steps"]`` (set by the ``cfm_student`` transform) comes before
        the variant's CFM step count.
        """
        if isinstance(model_or_variant, str):
            variant, meta = model_or_variant, {}
        else:
            variant, meta = model_or_variant.variant, dict(getattr(model_or_variant, "meta", None) or {})
        if variant not in VARIANT_DEFAULTS:
            raise CbxError(f"unknown model variant '{variant}' (expected one of {sorted(VARIANT_DEFAULTS)})")
        defaults = dict(VARIANT_DEFAULTS[variant])
        # A checkpoint's own sampling defaults (Multilingual V3: repetition penalty 1.2)
        defaults.update(meta.get("sampling_defaults") or {})
        if meta.get("cfm_steps") is not None:
            defaults["cfm_steps"] = int(meta["cfm_steps"])
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if device is None:
            device = getattr(model_or_variant, "device", None) if not isinstance(model_or_variant, str) else None
        device = device if device is not None else "cpu"
        if self.dtype == AUTO_DTYPE:
            fill["dtype"] = auto_dtype(device)
        if self.prefill_dtype == AUTO_DTYPE:
            fill["prefill_dtype"] = auto_prefill_dtype(fill.get("dtype", self.dtype), device,
                                                       None if isinstance(model_or_variant, str) else model_or_variant)
        elif (self.prefill_dtype == "fp32" and fill.get("dtype", self.dtype) != "fp32"
              and not isinstance(model_or_variant, str)):
            # Only a low-precision model needs the fp32 prefill path; an fp32 model's prefill
            # is fp32 whatever its modules (so resolving resolved settings changes nothing).
            why = _fp32_prefill_unsupported(model_or_variant)
            if why:
                raise self._bad("prefill_dtype", f"fp32 cannot run on this model: {why}")
        if self.cfm_dtype == AUTO_DTYPE:
            fill["cfm_dtype"] = auto_dtype(device)
        elif self.cfm_dtype is None:
            fill["cfm_dtype"] = fill.get("dtype", self.dtype)
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
    """The output for one request: ``wav`` float32 mono at :data:`SAMPLE_RATE`; ``speech_tokens``
    the T3 tokens of all its chunks in order (``chunk_tokens`` says how many per chunk);
    ``timings`` its share of each stage's seconds (sums to the batch figures) and ``total``."""

    id: str
    text: str
    wav: np.ndarray
    speech_tokens: np.ndarray
    chunks: list[str]
    chunk_tokens: list[int]
    audio_s: float
    timings: dict[str, float]
    sample_rate: int = SAMPLE_RATE
    # Why the output is unusable, per utterance ("empty", "non-finite", "too short (...)"), as
    # data for the caller to record; None for a normal output. Degenerate outputs are not
    # watermarked (perth cannot mark them) and the rest of the batch is unaffected.
    degenerate: str | None = None


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


def row_seed(seed: int, chunk_index: int) -> int:
    """The seed of one row (text chunk): the user's seed plus the chunk's index in its request.

    It depends only on the request, never on the row's position in the batch. Each stage
    (T3 sampling, CFM noise, HiFT source) draws from its own generator seeded with it, so the
    first chunk of a request with seed ``s`` gets the CFM noise upstream draws after
    ``torch.manual_seed(s)``.
    """
    return int(seed) + int(chunk_index)


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class _Row:
    """One text chunk of one request: a row of the T3 batch."""

    request: int
    chunk: int
    text: str
    text_tokens: list[int]
    voice_key: Any
    seed: int
    tokens: torch.Tensor | None = None  # speech tokens (valid ids only)
    wav: np.ndarray | None = None
    shares: dict[str, float] = field(default_factory=dict)


class Synthesizer:
    """Synthesizes lists of :class:`SynthRequest` with one model (see the module docstring).

    Voice conditioning is cached per (voice, exaggeration) for the life of the object, on top
    of the conditioning module's own per-file cache and its disk cache across processes
    (``disk_cache``: None = the environment's folder, False = off, or a folder; see
    :mod:`cbx.engine.cond_cache`). ``device`` defaults to the model's.
    """

    def __init__(self, model: Any, device: torch.device | str | None = None, disk_cache: Any = None):
        self.model = model
        self.disk_cache = disk_cache
        self.device = torch.device(device) if device is not None else model.device
        if self.device != model.device:
            model.to(self.device)
        self._conds: dict[Any, Any] = {}
        self._casts: dict[Any, Any] = {}
        from cbx.engine.t3_prefill import PrefixCache

        # T3 voice-prefix keys/values (cbx.engine.t3_prefill), reused by every sentence and call
        # with the same voice and exaggeration.
        self.prefix_cache = PrefixCache()
        self._said: set[Any] = set()

    def clear_voices(self) -> None:
        """Forget cached voice conditioning (here, in the conditioning module and T3's voice-prefix
        keys/values), e.g. so that a benchmark pays for conditioning on every run as upstream's
        ``generate`` does."""
        from cbx.engine.conditioning import clear_cache

        self._conds.clear()
        self.prefix_cache.clear()
        clear_cache(self.model)

    # -- pieces ---------------------------------------------------------------------------

    def _voice_key(self, voice: Any, exaggeration: float) -> Any:
        if voice is None:
            return ("builtin", exaggeration)
        if isinstance(voice, (str, Path)):
            p = Path(voice)
            try:
                st = p.stat()
            except OSError:
                raise CbxError(f"voice '{voice}': no such file") from None
            return (str(p.resolve()), st.st_size, st.st_mtime_ns, exaggeration)
        if isinstance(voice, tuple) and len(voice) == 2:
            wav, sr = voice
            arr = np.ascontiguousarray(np.asarray(wav, dtype=np.float32))
            import hashlib

            return ("array", hashlib.sha1(arr.tobytes()).hexdigest(), int(sr), exaggeration)
        raise CbxError(f"voice {voice!r}: expected an audio file path, a (wav, sample_rate) pair or None")

    def _conditioning(self, voice: Any, key: Any, exaggeration: float) -> Any:
        if key in self._conds:
            return self._conds[key]
        if voice is None:
            if getattr(self.model, "builtin_conds", None) is None:
                raise CbxError(f"model '{getattr(self.model, 'source', '?')}' has no built-in voice: "
                               "give a voice prompt (an audio file)")
            conds = self.model.builtin_conds
        else:
            from cbx.engine.conditioning import prepare_voice

            conds = prepare_voice(self.model, voice, exaggeration=exaggeration, disk_cache=self.disk_cache)
        self._conds[key] = conds
        return conds

    def _watermark(self, wav: np.ndarray) -> tuple[np.ndarray, str | None]:
        from cbx.engine.watermark import watermark_each

        return watermark_each([wav], SAMPLE_RATE, device=self.device)[0]

    def _rows(self, requests: Sequence[SynthRequest], s: SynthSettings) -> list[_Row]:
        from cbx.engine.text import split_text, t3_text_tokens

        rows: list[_Row] = []
        for i, req in enumerate(requests):
            if not isinstance(req, SynthRequest):
                raise CbxError(f"request {i}: expected a SynthRequest, got {type(req).__name__}")
            if not isinstance(req.text, str) or not req.text.strip():
                raise CbxError(f"request {i} ({req.id or 'no id'}): text is empty")
            lang = req.language_id or s.language_id
            key = self._voice_key(req.voice, float(s.exaggeration))
            chunks = [ct for chunk in split_text(req.text) for ct in self._fit(chunk, lang)]
            for k, (chunk, tokens) in enumerate(chunks):
                rows.append(_Row(i, k, chunk, tokens, key, row_seed(s.seed, k)))
        return rows

    def _fit(self, chunk: str, lang: str | None) -> list[tuple[str, list[int]]]:
        """``chunk`` with its text tokens, cut further where it has more tokens than T3's
        text positions (the tiny model takes 258, fewer than 300 characters can need)."""
        from cbx.engine.text import split_text, t3_text_tokens

        tokens = t3_text_tokens(self.model, chunk, language_id=lang)
        t3 = self.model.t3
        limit = t3.text_pos_emb.emb.num_embeddings if getattr(t3.hp, "input_pos_emb", None) == "learned" else None
        if limit is None or len(tokens) <= limit or len(chunk) <= 1:
            return [(chunk, tokens)]
        chars = max(1, min(len(chunk) - 1, len(chunk) * (limit - 2) // len(tokens)))
        return [ct for part in split_text(chunk, chars) for ct in self._fit(part, lang)]

    def _decode_settings(self, s: SynthSettings):
        from cbx.engine.t3_decode import DecodeSettings

        return DecodeSettings(temperature=s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k,
                              repetition_penalty=s.repetition_penalty, cfg_weight=s.cfg_weight,
                              exaggeration=s.exaggeration, max_new_tokens=s.max_speech_tokens,
                              force_tokens=s.force_tokens, compile_backend=s.compile,
                              prefill_dtype=torch.float32 if s.prefill_dtype == "fp32" else None)

    def _low_precision(self, module: torch.nn.Module, s: SynthSettings, dtype: str | None = None) -> torch.nn.Module:
        """``module`` itself at fp32, else a cached copy cast to ``dtype`` (default ``settings.dtype``).

        A cast copy rather than autocast over fp32 weights: autocast re-casts every weight at
        every call, which for T3's memory-bound decode costs more than it saves (measured on
        this CPU: bf16 weights 3.6x faster than fp32 per decode GEMV, autocast only 1.6x).
        The copy costs the module's size in bf16 once (about 1 GB for the full T3).
        """
        want = DTYPES[dtype or s.dtype]
        if want == torch.float32 or _float_dtype(module) == want:
            return module
        key = (id(module), want)
        if key not in self._casts:
            import copy

            self._casts[key] = (module, copy.deepcopy(module).to(want).eval())
        return self._casts[key][1]

    def prepare(self, settings: SynthSettings | None = None) -> None:
        """Build the cast copies ``settings`` needs now (once per Synthesizer), so that no timed
        stage pays for them; :meth:`synthesize` calls it before its timer starts."""
        s = (settings or SynthSettings()).resolved(self.model, self.device)
        self._low_precision(self.model.t3, s)
        self._estimator(s)
        self._s3gen_low(s)
        self._say_choices(s)

    def _say_choices(self, s: SynthSettings) -> None:
        """Log, once per distinct choice, the dtype each stage runs in; warn where a compute-bound
        stage (prefill, S3Gen) runs bf16 on a CPU without native bf16 (emulated there: slower than
        fp32), and when the S3Gen prompt is capped (quality traded for speed)."""
        dt = stage_dtypes(s)
        key = ("choices", tuple(dt.items()), s.s3gen_prompt_s)
        if key in self._said:
            return
        self._said.add(key)
        if s.s3gen_prompt_s is not None:
            log.warning("S3Gen reference prompt capped to its first %g s (settings.s3gen_prompt_s: faster, less "
                        "faithful to the voice)", s.s3gen_prompt_s)
        log.info("stage dtypes: %s", ", ".join(f"{k} {v}" for k, v in dt.items()))
        # The T3 decode step is memory-bound: narrow weights pay there even with emulated bf16.
        slow = [k for k, v in dt.items() if v == "bf16" and k != "t3_decode"]
        if slow and self.device.type == "cpu" and auto_dtype(self.device) != "bf16":
            log.warning("bf16 on a CPU without native bf16 (AMX/AVX512-BF16) for %s: emulated here, slower than "
                        "fp32 (settings prefill_dtype / cfm_dtype / s3gen_bf16 choose)", ", ".join(slow))

    def _s3gen_conds(self, conds: Any, s: SynthSettings) -> dict:
        """The S3Gen half of a voice's conditioning, its prompt capped by ``s3gen_prompt_s``."""
        from cbx.engine.s3gen_batch import cap_prompt

        return cap_prompt(conds, s.s3gen_prompt_s)

    def _flow_mels(self, tokens: list, conds: list, seeds: list[int], s: SynthSettings) -> tuple[list, Any]:
        """The CFM mels (float32, cropped) of rows of S3Gen tokens in their voices' conditioning
        (prompt capped by ``s3gen_prompt_s``), each row's noise from its seed, the estimator in
        ``cfm_dtype``, and the CFM inputs (their lengths apportion the stage's time). One path for
        :meth:`synthesize` and :meth:`decode_tokens`, so fidelity measures what synthesis runs."""
        from cbx.engine import s3gen_batch as sb
        from cbx.engine.t3_decode import autocast

        s3 = self.model.s3gen
        meanflow = bool(getattr(s3, "meanflow", False))
        encoder = self._s3gen_low(s)[0]
        inputs = sb.cfm_inputs(self.model, [t.to(self.device) for t in tokens],
                               [self._s3gen_conds(c, s) for c in conds], encoder=encoder)
        noise = sb.cfm_noise(inputs, seeds, meanflow, dtype=inputs.mu.dtype)
        estimator = self._estimator(s)
        with autocast(self.device, _float_dtype(estimator)):
            mels = sb.solve_cfm(estimator, inputs, noise, int(s.cfm_steps), s3.flow.decoder.inference_cfg_rate, meanflow)
        return [m.float() for m in sb.crop_mels(mels, inputs)], inputs

    def _estimator(self, s: SynthSettings) -> torch.nn.Module:
        """The CFM estimator in ``settings.cfm_dtype`` (the model's own at fp32, else a cached copy)."""
        return self._low_precision(self.model.s3gen.flow.decoder.estimator, s, s.cfm_dtype)

    def _s3gen_low(self, s: SynthSettings) -> tuple[Any, Any]:
        """(flow encoder, HiFT) copies to run in bf16 when ``settings.s3gen_bf16``, else (None, None)."""
        if not s.s3gen_bf16:
            return None, None
        from cbx.engine import s3gen_batch as sb

        s3 = self.model.s3gen
        got = []
        for module, make in ((s3.flow.encoder, sb.low_precision_encoder), (s3.mel2wav, sb.low_precision_hift)):
            key = (id(module), "s3gen_bf16")
            if key not in self._casts:
                self._casts[key] = (module, make(module, torch.bfloat16))
            got.append(self._casts[key][1])
        return got[0], got[1]

    def cast_copies(self) -> list[torch.nn.Module]:
        """The low-precision copies that ran in place of the model's modules."""
        return [copy for _, copy in self._casts.values()]

    def _s3gen_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        from cbx.engine.t3_decode import speech_only

        tokens = speech_only(tokens.reshape(-1))
        if self.model.variant == "turbo" and tokens.numel():
            from cbx.engine.upstream import S3GEN_SIL

            # tts_turbo.generate() appends three silence tokens so the last word is not cut.
            tokens = torch.cat([tokens, torch.full((3,), S3GEN_SIL, dtype=tokens.dtype)])
        return tokens

    # -- one group of rows ------------------------------------------------------------------

    def _run_group(self, group: list[_Row], conds: dict[Any, Any], s: SynthSettings, timer: StageTimer) -> None:
        from cbx.engine import s3gen_batch as sb
        from cbx.engine.t3_decode import T3Row, autocast, generate

        # Low precision = weights cast once (see _low_precision) + autocast, which reconciles the
        # fp32 tensors upstream code creates on the way (conditioning, time embeddings). A model
        # loaded with a bf16 T3 runs under autocast too, whatever settings.dtype says.
        t3 = self._low_precision(self.model.t3, s)
        with timer.stage("t3") as lap, autocast(self.device, _float_dtype(t3)):
            out = generate(t3, [T3Row(r.text_tokens, conds[r.voice_key].t3, r.seed) for r in group],
                           self._decode_settings(s), prefix_cache=self.prefix_cache)
        for r, toks in zip(group, out.tokens):
            r.tokens = toks.reshape(-1).cpu()
        t3_shares = apportion(lap.seconds, [max(1, r.tokens.numel()) for r in group])
        for r, sh in zip(group, t3_shares):
            r.shares["t3"] = sh

        live = [r for r in group if self._s3gen_tokens(r.tokens).numel() > 0]
        for r in group:
            if r not in live:
                r.wav = np.zeros(0, np.float32)
                r.shares.update(cfm=0.0, vocoder=0.0)
        if not live:
            return
        with timer.stage("cfm") as lap:
            hift = self._s3gen_low(s)[1]
            mels, inputs = self._flow_mels([self._s3gen_tokens(r.tokens) for r in live],
                                           [conds[r.voice_key] for r in live], [r.seed for r in live], s)
        for r, sh in zip(live, apportion(lap.seconds, inputs.total_lens)):
            r.shares["cfm"] = sh
        with timer.stage("vocoder") as lap:
            wavs = sb.vocode(self.model, mels, seeds=[r.seed for r in live], hift=hift)
        for r, w, sh in zip(live, wavs, apportion(lap.seconds, [m.shape[-1] for m in mels])):
            r.wav = sb.trim_last_token(self.model, np.asarray(w, dtype=np.float32), self._s3gen_tokens(r.tokens).numel())
            r.shares["vocoder"] = sh

    # -- the decoder alone ------------------------------------------------------------------

    def decode_tokens(self, voice: Any, speech_tokens: Any, settings: SynthSettings | None = None,
                      chunk_index: int = 0) -> np.ndarray:
        """S3Gen (CFM + HiFT) of the given speech tokens, with the CFM noise and HiFT seed the
        engine uses for chunk ``chunk_index`` of a request, and no watermark.

        Fidelity of a compressed decoder is measured with it: the compressed and the baseline
        model each decode the *baseline's* tokens with the same noise, so their outputs differ
        only by what compression did to the decoder (T3 sampling is out of the picture). The
        path is the one :meth:`synthesize` runs (same precision casts, same seeding)."""
        from cbx.engine import s3gen_batch as sb

        s = (settings or SynthSettings()).resolved(self.model, self.device)
        tokens = self._s3gen_tokens(torch.as_tensor(np.asarray(speech_tokens, dtype=np.int64)))
        if tokens.numel() == 0:
            return np.zeros(0, np.float32)
        seed = row_seed(s.seed, chunk_index)
        with torch.inference_mode():
            key = self._voice_key(voice, float(s.exaggeration))
            conds = self._conditioning(voice, key, float(s.exaggeration))
            mels, _ = self._flow_mels([tokens], [conds], [seed], s)
            wav = sb.vocode(self.model, mels, seeds=[seed], hift=self._s3gen_low(s)[1])[0]
        return sb.trim_last_token(self.model, np.asarray(wav, dtype=np.float32), tokens.numel())

    # -- the call ---------------------------------------------------------------------------

    def synthesize(self, requests: Sequence[SynthRequest], settings: SynthSettings | None = None,
                   progress: bool = True) -> SynthBatch:
        """Synthesize every request; see the module docstring for batching and seeding."""
        from tqdm.auto import tqdm

        s = (settings or SynthSettings()).resolved(self.model, self.device)
        requests = list(requests)
        if not requests:
            raise CbxError("nothing to synthesize: the request list is empty")
        self.prepare(s)
        with PeakMemory(self.device) as mem, torch.inference_mode():
            # The clock starts inside and stops before PeakMemory's own entry and exit: those
            # collect garbage, trim the C heap and join a sampler thread, which is the
            # measurement's cost, not synthesis (it was ~0.5 s of "total" outside every stage).
            timer = StageTimer(self.device)
            rows = self._rows(requests, s)
            # Conditioning first for every distinct voice, timed per voice for apportioning.
            conds: dict[Any, Any] = {}
            voice_seconds: dict[Any, float] = {}
            for req in requests:
                key = self._voice_key(req.voice, float(s.exaggeration))
                if key in conds:
                    continue
                with timer.stage("conditioning") as lap:
                    conds[key] = self._conditioning(req.voice, key, float(s.exaggeration))
                voice_seconds[key] = lap.seconds
            groups = [rows[i: i + s.batch_size] for i in range(0, len(rows), s.batch_size)]
            for group in tqdm(groups, desc="synthesize", unit="batch", disable=not progress or len(groups) < 2,
                              leave=False):
                self._run_group(group, conds, s, timer)

            results = self._join(requests, rows, s, timer, voice_seconds)
            timer.stop()
        stages = timer.seconds()
        n_tok = sum(int(r.tokens.numel()) for r in rows)
        audio_s = sum(r.audio_s for r in results)
        run = RunTiming(stages=stages, speech_tokens=n_tok, audio_s=audio_s, peak_mem_bytes=int(mem.peak_bytes),
                        mem_kind=mem.kind, device=str(self.device), n_utterances=len(results),
                        extra={"rows": float(len(rows)), "groups": float(len(groups)),
                               "mem_start_bytes": float(mem.start_bytes)})
        return SynthBatch(results=results, run=run, settings=s)

    def stream(self, requests: Sequence[SynthRequest], settings: SynthSettings | None = None,
               first_tokens: int | None = None, chunk_tokens: int | None = None):
        """Yield :class:`cbx.engine.stream.StreamPiece` s: each request's audio in pieces while T3
        is still decoding (a first chunk of ``first_tokens`` speech tokens, then ``chunk_tokens``
        at a time; defaults in :mod:`cbx.engine.stream`, which documents how pieces join)."""
        from cbx.engine import stream as st

        first = st.FIRST_CHUNK_TOKENS if first_tokens is None else first_tokens
        every = st.CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
        st.chunk_boundaries(first, every, 1)  # bad sizes fail here, before any work
        return st.stream(self, requests, settings, first, every)

    def _join(self, requests: Sequence[SynthRequest], rows: list[_Row], s: SynthSettings, timer: StageTimer,
              voice_seconds: dict[Any, float]) -> list[SynthResult]:
        overlap = int(round(s.crossfade_ms * SAMPLE_RATE / 1000.0))
        users: dict[Any, int] = {}
        for req in requests:
            k = self._voice_key(req.voice, float(s.exaggeration))
            users[k] = users.get(k, 0) + 1
        results = []
        for i, req in enumerate(requests):
            mine = [r for r in rows if r.request == i]
            wav = crossfade_join([r.wav for r in mine], overlap)
            wm = 0.0
            from cbx.engine.watermark import degenerate

            why = degenerate(wav, SAMPLE_RATE)
            if s.watermark and why is None:
                with timer.stage("watermark") as lap:
                    wav, why = self._watermark(wav)
                wm = lap.seconds
            if why is not None:
                log.warning("utterance %s: output %s (not watermarked; recorded as degenerate)",
                            req.id if req.id is not None else f"utt{i}", why)
            key = self._voice_key(req.voice, float(s.exaggeration))
            t = {st: 0.0 for st in STAGES}
            t["conditioning"] = voice_seconds.get(key, 0.0) / users[key]
            for r in mine:
                for st, v in r.shares.items():
                    t[st] += v
            t["watermark"] = wm
            t["total"] = sum(t[st] for st in STAGES)
            tokens = torch.cat([r.tokens for r in mine]) if mine else torch.zeros(0, dtype=torch.long)
            results.append(SynthResult(
                id=req.id if req.id is not None else f"utt{i}", text=req.text, wav=wav.astype(np.float32),
                speech_tokens=tokens.numpy().astype(np.int64), chunks=[r.text for r in mine],
                chunk_tokens=[int(r.tokens.numel()) for r in mine],
                audio_s=len(wav) / SAMPLE_RATE, timings=t, degenerate=why))
        return results


def _compile_backends() -> list[str]:
    import torch._dynamo

    # torch's listed backends, plus the two debugging ones that check graph capture alone
    return sorted(set(torch._dynamo.list_backends()) | {"eager", "aot_eager"})


def _float_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (fp32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
