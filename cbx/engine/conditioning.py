"""Voice conditioning: a reference recording -> upstream ``Conditionals`` for one model.

This is upstream's ``prepare_conditionals`` (tts.py, tts_turbo.py, mtl_tts.py of 0.1.7)
written once for the three variants, with three differences that matter to a workbench:

* audio comes through :mod:`cbx.engine.audio` (any format, stereo mixed down, clear errors for
  unreadable, too short or silent prompts instead of asserts or garbage voices). Its resampling
  is librosa's ``soxr_hq``, the one upstream's ``librosa.load`` uses, so the numbers are
  upstream's; inside ``embed_ref`` upstream resamples with torchaudio, i.e. our exact shim.
* the expensive part (speech tokenizer, CAMPPlus, voice encoder) is cached per (model, file
  content hash, variant, loudness flag); exaggeration is applied on the way out, so changing
  it does not recompute anything. Every call returns fresh tensors: upstream's S3Gen casts the
  ``gen`` dict it is given in place, which must not corrupt the cache.
* the per-variant constants below are written here once.
* Turbo's loudness gain keeps the prompt float32. Upstream multiplies by a NumPy float64
  scalar, which under NumPy 2 promotes the prompt to float64, and its speech tokenizer then
  stops with "expected scalar type Double but found Float".

Variants (upstream): original and multilingual use 6 s of 16 kHz audio for T3's speech prompt
tokens; Turbo uses 15 s, normalises loudness to -27 LUFS first and requires more than 5 s.
All use the first 10 s at 24 kHz for S3Gen's reference (``embed_ref``).
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from cbx.engine import audio
from cbx.errors import CbxError

S3_SR = 16000  # speech tokenizer, CAMPPlus and voice encoder rate
S3GEN_SR = 24000  # S3Gen mel / output rate
DEC_COND_SECONDS = 10


@dataclass(frozen=True)
class VariantConditioning:
    enc_cond_seconds: int  # audio for T3's speech prompt tokens
    min_seconds: float  # shortest prompt accepted
    norm_loudness_lufs: float | None


VARIANTS = {
    # Upstream has no minimum for these; under a second the speech tokenizer and voice encoder
    # have almost nothing to work with.
    "original": VariantConditioning(6, 1.0, None),
    "multilingual": VariantConditioning(6, 1.0, None),
    # Upstream asserts "Audio prompt must be longer than 5 seconds!".
    "turbo": VariantConditioning(15, 5.0, -27.0),
}

# model -> {(content hash, variant, normalise): (t3 parts, gen dict)}; dies with the model.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _variant_of(model) -> VariantConditioning:
    variant = getattr(model, "variant", None)
    if variant not in VARIANTS:
        raise CbxError(f"model variant {variant!r} has no voice conditioning (expected one of {sorted(VARIANTS)})")
    return VARIANTS[variant]


def _file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise CbxError(f"{path}: cannot read voice prompt ({exc.strerror or exc})") from exc
    return h.hexdigest()


def _array_hash(wav: np.ndarray, sr: int) -> str:
    h = hashlib.sha256(np.ascontiguousarray(wav, dtype=np.float32).tobytes())
    h.update(str(int(sr)).encode())
    return h.hexdigest()


def norm_loudness(wav: np.ndarray, sr: int, target_lufs: float) -> np.ndarray:
    """Scale to ``target_lufs`` integrated loudness (ITU-R BS.1770 via pyloudnorm), as Turbo does.

    Like upstream, a signal whose loudness cannot be measured (too short for one 400 ms block,
    or digital silence) is left unchanged.
    """
    import pyloudnorm

    try:
        loudness = pyloudnorm.Meter(sr).integrated_loudness(wav)
    except ValueError:
        return wav
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    if math.isfinite(gain) and gain > 0.0:
        wav = wav * gain
    return wav


def _load(voice, cfg: VariantConditioning) -> tuple[np.ndarray, str, str]:
    """(wav at 24 kHz, content hash, name for messages) from a path or (wav, sr)."""
    if isinstance(voice, (str, os.PathLike)):
        name = str(voice)
        key = _file_hash(voice)
        wav = audio.load_audio(voice, S3GEN_SR, min_seconds=cfg.min_seconds)
        return wav, key, name
    if isinstance(voice, tuple) and len(voice) == 2:
        wav, sr = voice
        wav = wav.detach().cpu().numpy() if torch.is_tensor(wav) else np.asarray(wav)
        wav = wav.astype(np.float32, copy=False)
        if wav.ndim == 2:
            wav = wav.mean(axis=0) if wav.shape[0] < wav.shape[1] else wav.mean(axis=1)
        name = f"voice array ({wav.shape[-1]} samples at {sr} Hz)"
        if not isinstance(sr, (int, np.integer)) or sr <= 0:
            raise CbxError(f"{name}: bad sample rate {sr!r}")
        audio.check_audio(wav, int(sr), name, cfg.min_seconds)
        return audio.resample(wav, int(sr), S3GEN_SR), _array_hash(wav, int(sr)), name
    raise CbxError(f"voice must be an audio file path or a (wav, sample_rate) pair, got {type(voice).__name__}")


def _device(model) -> torch.device:
    return next(model.s3gen.parameters()).device


@torch.inference_mode()
def _compute(model, wav24: np.ndarray, cfg: VariantConditioning, name: str):
    s3gen = model.s3gen
    device = _device(model)
    if cfg.norm_loudness_lufs is not None:
        wav24 = norm_loudness(wav24, S3GEN_SR, cfg.norm_loudness_lufs).astype(np.float32, copy=False)
    ref16 = audio.resample(wav24, S3GEN_SR, S3_SR)
    gen = s3gen.embed_ref(wav24[: DEC_COND_SECONDS * S3GEN_SR], S3GEN_SR, device=device)
    prompt_tokens = None
    plen = getattr(model.t3.hp, "speech_cond_prompt_len", None)
    if plen:
        prompt_tokens, _ = s3gen.tokenizer.forward([ref16[: cfg.enc_cond_seconds * S3_SR]], max_len=plen)
        prompt_tokens = torch.atleast_2d(prompt_tokens).to(device)
    ve_embed = torch.from_numpy(model.ve.embeds_from_wavs([ref16], sample_rate=S3_SR))
    ve_embed = ve_embed.mean(axis=0, keepdim=True).to(device)
    if not torch.isfinite(ve_embed).all():
        raise CbxError(f"{name}: the voice encoder produced no usable embedding for this prompt")
    return {"speaker_emb": ve_embed, "cond_prompt_speech_tokens": prompt_tokens}, gen


def _model_cache(model) -> dict:
    """This model's cache: weakly keyed by the model; objects that cannot be weakly referenced
    (a SimpleNamespace standing in for a model) keep it as an attribute."""
    try:
        return _CACHE.setdefault(model, {})
    except TypeError:
        try:
            return vars(model).setdefault("_cbx_voice_cache", {})
        except TypeError:
            return {}


def _clone(x):
    return x.clone() if torch.is_tensor(x) else x


def _settings(model, cfg: VariantConditioning) -> dict:
    """What the conditioning result depends on besides the audio and the weights."""
    return {"enc_cond_seconds": cfg.enc_cond_seconds, "norm_loudness_lufs": cfg.norm_loudness_lufs,
            "dec_cond_seconds": DEC_COND_SECONDS,
            "speech_cond_prompt_len": getattr(model.t3.hp, "speech_cond_prompt_len", None)}


def prepare_voice(model, voice, exaggeration: float = 0.5, *, use_cache: bool = True, disk_cache=None):
    """Upstream ``Conditionals`` (``.t3`` a T3Cond, ``.gen`` S3Gen's reference dict) for ``voice``.

    ``model``: anything with ``t3``, ``s3gen``, ``ve`` and ``variant`` (a ChatterboxModel).
    ``voice``: an audio file (wav/flac/mp3/..., any rate, mono or stereo) or ``(wav, sr)``.
    Bad prompts raise CbxError naming the file: unreadable, too short for the variant, silent.
    ``disk_cache``: the on-disk cache across processes (:mod:`cbx.engine.cond_cache`): None =
    the environment's folder (default ``~/.cache/cbx/conds``), False = off, or a folder.
    ``use_cache=False`` bypasses both caches.
    """
    from cbx.engine.upstream import Conditionals, T3Cond

    cfg = _variant_of(model)
    if not isinstance(exaggeration, (int, float)) or not math.isfinite(exaggeration):
        raise CbxError(f"exaggeration must be a number, got {exaggeration!r}")
    wav24 = None
    if isinstance(voice, (str, os.PathLike)):
        key = (_file_hash(voice), model.variant, cfg.norm_loudness_lufs, str(_device(model)))
        name = str(voice)
    else:
        wav24, digest, name = _load(voice, cfg)
        key = (digest, model.variant, cfg.norm_loudness_lufs, str(_device(model)))
    per_model = _model_cache(model) if use_cache else {}
    if key not in per_model:
        from cbx.engine import cond_cache

        folder = cond_cache.resolve(disk_cache) if use_cache else None
        disk_key = cond_cache.entry_key(model, key[0], _settings(model, cfg), _device(model)) if folder else None
        got = cond_cache.load(folder, disk_key, _device(model), name) if folder else None
        if got is None:
            if wav24 is None:
                wav24, _, name = _load(voice, cfg)
            got = _compute(model, wav24, cfg, name)
            if folder:
                cond_cache.store(folder, disk_key, *got)
        per_model[key] = got
    t3_parts, gen = per_model[key]
    device = _device(model)
    t3 = T3Cond(
        speaker_emb=t3_parts["speaker_emb"].clone(),
        cond_prompt_speech_tokens=_clone(t3_parts["cond_prompt_speech_tokens"]),
        emotion_adv=float(exaggeration) * torch.ones(1, 1, 1),
    ).to(device=device)
    return Conditionals(t3, {k: _clone(v) for k, v in gen.items()})


def clear_cache(model=None) -> None:
    """Forget cached conditioning (of one model, or of all)."""
    if model is None:
        _CACHE.clear()
        return
    try:
        _CACHE.pop(model, None)
    except TypeError:
        getattr(model, "__dict__", {}).pop("_cbx_voice_cache", None)
