"""Read and write audio files for the engine: any common format and rate in, mono float32 out.

Reading goes through soundfile (libsndfile reads wav, flac, ogg and mp3); other containers fall
back to librosa/audioread. Stereo is mixed down by averaging channels and resampling uses
librosa's default ``soxr_hq``: together this is exactly what upstream's ``librosa.load(path,
sr=...)`` does, so voice conditioning computed from our loader equals upstream's.

Every problem a user can fix raises :class:`CbxError` naming the file: unreadable or corrupt,
empty, shorter than the caller's minimum, or silent. The silence thresholds below are written
here once.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from cbx.errors import CbxError
from cbx.files import atomic_write_audio, audio_file

# A file whose peak stays below -60 dBFS, or whose RMS stays below -70 dBFS, carries no usable
# voice (real speech prompts peak well above -30 dBFS).
SILENCE_PEAK = 10 ** (-60 / 20)
SILENCE_RMS = 10 ** (-70 / 20)


def _read(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return data.T, int(sr)  # [channels, frames]
    except Exception as sf_exc:  # noqa: BLE001 - libsndfile raises several types
        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # librosa announces its audioread fallback
                data, sr = librosa.load(str(path), sr=None, mono=False)
        except Exception as exc:  # noqa: BLE001
            raise CbxError(f"{path}: cannot read audio ({sf_exc}; {type(exc).__name__}: {exc})") from exc
        data = np.atleast_2d(np.asarray(data, dtype=np.float32))
        return data, int(sr)


def resample(wav: np.ndarray, orig_sr: int, sr: int) -> np.ndarray:
    """Resample a mono float32 signal as ``librosa.load(..., sr=sr)`` does (soxr_hq)."""
    if int(orig_sr) == int(sr):
        return wav
    import librosa

    return librosa.resample(wav, orig_sr=int(orig_sr), target_sr=int(sr)).astype(np.float32, copy=False)


def check_audio(wav: np.ndarray, sr: int, name: str, min_seconds: float = 0.0) -> np.ndarray:
    """Validate a mono signal; ``name`` (the file) goes into the error message."""
    if wav.size == 0:
        raise CbxError(f"{name}: audio is empty")
    if not np.all(np.isfinite(wav)):
        raise CbxError(f"{name}: audio contains NaN or infinite samples")
    seconds = wav.shape[-1] / sr
    if seconds < min_seconds:
        raise CbxError(f"{name}: audio is too short ({seconds:.2f} s; the minimum is {min_seconds:g} s)")
    peak = float(np.max(np.abs(wav)))
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if peak < SILENCE_PEAK or rms < SILENCE_RMS:
        raise CbxError(
            f"{name}: audio is silent (peak {20 * np.log10(max(peak, 1e-12)):.1f} dBFS, "
            f"RMS {20 * np.log10(max(rms, 1e-12)):.1f} dBFS)"
        )
    return wav


def load_audio(path: str | os.PathLike, sr: int | None = None, *, min_seconds: float = 0.0) -> np.ndarray:
    """Read ``path`` as mono float32 at ``sr`` Hz (None keeps the file's rate).

    Raises CbxError naming the file when it is missing, unreadable, empty, shorter than
    ``min_seconds`` (checked at the file's own rate) or silent.
    """
    wav, file_sr = load_audio_native(path, min_seconds=min_seconds)
    return wav if sr is None else resample(wav, file_sr, sr)


def load_audio_native(path: str | os.PathLike, *, min_seconds: float = 0.0) -> tuple[np.ndarray, int]:
    """Read ``path`` as mono float32 at its own rate: ``(wav, sr)``; validated as :func:`load_audio`."""
    path = audio_file(path)
    data, file_sr = _read(path)
    if file_sr <= 0:
        raise CbxError(f"{path}: bad sample rate {file_sr}")
    wav = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    return check_audio(wav, file_sr, str(path), min_seconds), file_sr


def write_wav(path: str | os.PathLike, wav, sr: int) -> Path:
    """Write mono (or [channels, frames]) float audio as 16-bit PCM wav (flac for a .flac path), atomically.

    The file appears complete or not at all (written beside the target, then renamed), so an
    interrupted run never leaves a truncated wav that looks valid.
    """
    path = Path(path)
    data = np.asarray(wav.detach().cpu().float().numpy() if hasattr(wav, "detach") else wav, dtype=np.float32)
    if data.ndim == 2:
        data = data.T if data.shape[0] < data.shape[1] else data
    elif data.ndim != 1:
        raise CbxError(f"{path}: cannot write audio of shape {tuple(data.shape)}")
    if not np.all(np.isfinite(data)):
        raise CbxError(f"{path}: refusing to write audio with NaN or infinite samples")
    atomic_write_audio(path, np.clip(data, -1.0, 1.0), sr, subtype="PCM_16")
    return path
