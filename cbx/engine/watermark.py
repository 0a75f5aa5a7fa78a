"""The Perth watermark on synthesized audio, as upstream applies it, for a list of utterances.

Upstream builds ``perth.PerthImplicitWatermarker()`` in every model constructor and marks each
output. Two things here: the watermarker is loaded once per device and reused (loading its
network costs ~0.5 s), and it is never silently missing: perth hides its own import failure by
setting the class to None (see :func:`cbx.engine.compat.perth_watermarker_class`), which here
becomes a CbxError naming the cause.

Utterances are marked one at a time: perth's encoder is convolutional over the whole
spectrogram, so padding a batch would change the tails, and a watermark that depends on what
else was synthesized with it would break "same seed, same audio".

Degenerate outputs are data, not a crash: perth fails on clips shorter than about 0.03 s and
on NaN/inf samples, and marking an empty clip means nothing. Such an output is returned
unmarked with the reason (:func:`degenerate`, :func:`watermark_each`), so the caller records it
per utterance and the others of the batch are marked as usual.
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
        # perth prints "loaded PerthNet (Implicit) at step ..." on stdout, where a command's
        # result goes (`cbx leaderboard --format csv > f`): its constructor's prints go to the
        # debug log instead.
        import contextlib
        import io
        import logging

        buf = io.StringIO()
        with torch.inference_mode(False), contextlib.redirect_stdout(buf):
            _WATERMARKERS[key] = perth_watermarker_class()(device=key)
        if buf.getvalue().strip():
            logging.getLogger("cbx.engine.watermark").debug("perth: %s", buf.getvalue().strip())
    return _WATERMARKERS[key]


# Shortest clip perth's encoder takes (its STFT frames): measured to fail below about 0.03 s.
MIN_WATERMARK_S = 0.03


def degenerate(wav, sr: int) -> str | None:
    """Why ``wav`` cannot be watermarked (``empty``, ``non-finite``, ``too short``), or None."""
    wav = np.asarray(wav)
    if wav.size == 0:
        return "empty"
    if not np.all(np.isfinite(wav)):
        return "non-finite"
    if wav.shape[-1] < MIN_WATERMARK_S * sr:
        return f"too short ({wav.shape[-1] / sr:.3f} s < {MIN_WATERMARK_S} s)"
    return None


def apply_watermark(wavs, sr: int, enabled: bool = True, device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Watermarked float32 copies of ``wavs`` (a list of 1-D arrays at ``sr`` Hz); with
    ``enabled=False`` the inputs are returned unchanged (same objects), so callers need one path.
    Degenerate clips come back unmarked (:func:`watermark_each` also says why)."""
    wavs = list(wavs)
    if not enabled:
        return wavs
    return [w for w, _ in watermark_each(wavs, sr, device)]


def watermark_each(wavs, sr: int, device: str | torch.device = "cpu") -> list[tuple[np.ndarray, str | None]]:
    """``(watermarked copy, None)`` per clip, or ``(unmarked copy, reason)`` for a degenerate one."""
    wavs = [np.asarray(w, dtype=np.float32) for w in wavs]
    if all(degenerate(w, sr) for w in wavs):
        return [(w.copy(), degenerate(w, sr)) for w in wavs]  # no need to load perth at all
    wm = get_watermarker(device)
    with torch.inference_mode():
        return _mark_each(wm, wavs, sr)


def _mark_each(wm, wavs, sr: int) -> list[tuple[np.ndarray, str | None]]:
    out = []
    for wav in wavs:
        why = degenerate(wav, sr)
        if why is not None:
            out.append((wav.copy(), why))
            continue
        marked = wm.apply_watermark(wav, sample_rate=int(sr))
        out.append((np.asarray(marked, dtype=np.float32)[: wav.shape[0]], None))
    return out


def watermark_score(wav, sr: int, device: str | torch.device = "cpu") -> float:
    """Fraction of Perth's watermark bits detected in ``wav`` (about 1.0 when marked)."""
    wm = get_watermarker(device)
    with torch.inference_mode():
        bits = wm.get_watermark(np.asarray(wav, dtype=np.float32), sample_rate=int(sr))
    return float(np.mean(bits))
