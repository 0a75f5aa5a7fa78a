"""Audio reading for the eval layer: any wav/flac/ogg file to a mono float32 array.

The eval layer scores audio from any source, so it has its own reader instead of the engine's
(it must not import ``cbx.engine``). Reading goes through soundfile (libsndfile) and resampling
through librosa's soxr backend, the same high-quality resampler for every metric, so a metric
that needs 16 kHz sees the same samples whichever group asked first. Problems a user can fix (a
missing, unreadable or empty file) raise :class:`CbxError` naming the file.
"""

from __future__ import annotations

import os

import numpy as np

from cbx.errors import CbxError
from cbx.files import atomic_write_audio, audio_file


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Return ``(mono float32 samples, sample rate)``; channels are averaged."""
    import soundfile as sf

    p = audio_file(path)
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports every format problem as a plain RuntimeError
        raise CbxError(f"{p}: cannot read audio ({e})") from None
    if data.shape[0] == 0:
        raise CbxError(f"{p}: audio file has no samples")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr)


def resample(wav: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Resample mono float audio; a no-op (same array) when the rates agree."""
    if sr == target_sr:
        return np.asarray(wav, dtype=np.float32)
    import librosa

    out = librosa.resample(np.asarray(wav, dtype=np.float32), orig_sr=sr, target_sr=target_sr, res_type="soxr_hq")
    return np.ascontiguousarray(out, dtype=np.float32)


def write_wav(path: str | os.PathLike, wav: np.ndarray, sr: int) -> None:
    """Write 16-bit PCM atomically (a temporary file renamed into place): no half-written wavs."""
    atomic_write_audio(path, np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0), sr, subtype="PCM_16")
