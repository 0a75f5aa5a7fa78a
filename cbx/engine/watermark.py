"""The Perth watermark on synthesized audio, as upstream applies it, for a list of utterances.

Upstream builds ``perth.PerthImplicitWatermarker()`` in every model constructor and marks each
output. Two things here: the watermarker is loaded once per device and reused (loading its
network costs ~0.5 s), and it is never silently missing: perth hides its own import failure by
setting the class to None (see :func:`cbx.engine.compat.perth_watermarker_class`), which here
becomes a CbxError naming the cause.

Utterances are marked one at a time: perth's encoder is convolutional over the whole
spectrogram, so padding a batch would change the tails, and a watermark that depends on what
else was synthesized with it would break "same seed, same audio".
"""

from __future__ import annotations

import numpy as np
import torch

_WATERMARKERS: dict[str, object] = {}


def get_watermarker(device: str | torch.device = "cpu"):
    """The shared ``PerthImplicitWatermarker`` on ``device`` (CbxError if perth cannot load it)."""
    from cbx.engine.compat import perth_watermarker_class

    key = str(torch.device(device))
    if key not in _WATERMARKERS:
        # Shared across calls: built outside any caller's inference_mode, or its weights would
        # be inference tensors that a later call with autograd enabled cannot use.
        with torch.inference_mode(False):
            _WATERMARKERS[key] = perth_watermarker_class()(device=key)
    return _WATERMARKERS[key]


def apply_watermark(wavs, sr: int, enabled: bool = True, device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Watermarked float32 copies of ``wavs`` (a list of 1-D arrays at ``sr`` Hz); with
    ``enabled=False`` the inputs are returned unchanged (same objects), so callers need one path."""
    wavs = list(wavs)
    if not enabled:
        return wavs
    wm = get_watermarker(device)
    out = []
    with torch.inference_mode():
        out = _mark_each(wm, wavs, sr)
    return out


def _mark_each(wm, wavs, sr: int) -> list[np.ndarray]:
    out = []
    for wav in wavs:
        wav = np.asarray(wav, dtype=np.float32)
        if wav.size == 0:
            out.append(wav)
            continue
        marked = wm.apply_watermark(wav, sample_rate=int(sr))
        out.append(np.asarray(marked, dtype=np.float32)[: wav.shape[0]])
    return out


def watermark_score(wav, sr: int, device: str | torch.device = "cpu") -> float:
    """Fraction of Perth's watermark bits detected in ``wav`` (about 1.0 when marked)."""
    wm = get_watermarker(device)
    with torch.inference_mode():
        bits = wm.get_watermark(np.asarray(wav, dtype=np.float32), sample_rate=int(sr))
    return float(np.mean(bits))
