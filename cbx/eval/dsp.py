"""Small signal helpers shared by the artifact, fidelity and spill-over metrics.

They are plain numpy/librosa functions over mono float arrays so that every metric sees the
same framing, the same level scale (dBFS: 0 dB is an RMS of 1.0, a full-scale square wave)
and the same voice-activity decision. The energy VAD is hand-written on purpose:
the artifact metrics need a decision that depends only on level (a neural VAD would call a
noise burst "not speech" in one clip and "speech" in the next for reasons nobody can state),
and its two thresholds are frozen here, versioned with the metrics that use them.
"""

from __future__ import annotations

import contextlib

import numpy as np

FRAME_S = 0.02  # analysis window of the level envelope
HOP_S = 0.01
LEVEL_FLOOR_DB = -120.0  # level given to digital silence, so logs stay finite
# A frame is speech when it is within VAD_REL_DB of the clip's loud level (95th percentile of
# frame levels) and above VAD_ABS_DBFS; to find noise in pauses, also at least
# VAD_ABOVE_QUIET_DB above the clip's quiet level (10th percentile: the noise floor when the
# clip has pauses). Measured on the Allison
# prompts and the pyannote and moonshine clips: pauses sit 35-60 dB below the loud level,
# weak consonants 20-35 dB; the quiet-level term keeps a noisy pause (say 35 dB below the
# speech) from counting as speech.
VAD_REL_DB = 40.0
VAD_ABOVE_QUIET_DB = 6.0
VAD_ABS_DBFS = -60.0
VAD_REF_PERCENTILE = 95.0
VAD_QUIET_PERCENTILE = 10.0


def as_mono(audio: np.ndarray) -> np.ndarray:
    """Float64 mono copy; multi-channel input (channels last or first) is averaged."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:
        axis = 0 if x.shape[0] < x.shape[1] else 1
        x = x.mean(axis=axis)
    return x.reshape(-1)


def finite(audio: np.ndarray) -> np.ndarray:
    """Mono float64 copy with NaN/Inf set to 0 (they are counted by their own metric)."""
    x = as_mono(audio)
    return np.where(np.isfinite(x), x, 0.0)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return np.asarray(x, dtype=np.float64)
    import librosa

    return librosa.resample(np.asarray(x, dtype=np.float64), orig_sr=sr_in, target_sr=sr_out).astype(np.float64)


def frame_signal(x: np.ndarray, sr: int, frame_s: float = FRAME_S, hop_s: float = HOP_S) -> np.ndarray:
    """Frames [n_frames, frame_len]; a clip shorter than one frame gives one zero-padded frame."""
    n = max(1, int(round(frame_s * sr)))
    h = max(1, int(round(hop_s * sr)))
    if len(x) < n:
        x = np.pad(x, (0, n - len(x)))
    count = 1 + (len(x) - n) // h
    idx = np.arange(n)[None, :] + h * np.arange(count)[:, None]
    return x[idx]


def frame_levels_db(x: np.ndarray, sr: int, frame_s: float = FRAME_S, hop_s: float = HOP_S) -> np.ndarray:
    """RMS level of each frame in dBFS (RMS 1.0 = 0 dB)."""
    frames = frame_signal(x, sr, frame_s, hop_s)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    with np.errstate(divide="ignore"):
        db = 20.0 * np.log10(rms)
    return np.maximum(db, LEVEL_FLOOR_DB)


def speech_mask(levels_db: np.ndarray, above_quiet: bool = False) -> np.ndarray:
    """Energy VAD over frame levels: True where a frame is speech (see VAD_* above).

    ``above_quiet`` adds the quiet-level term: right for finding the noise in pauses, wrong for
    measuring silence at the edges (a clip with no pause has a "quiet level" inside its
    speech, and the edges would move with how much silence surrounds the clip)."""
    if levels_db.size == 0:
        return np.zeros(0, dtype=bool)
    loud, quiet = np.percentile(levels_db, [VAD_REF_PERCENTILE, VAD_QUIET_PERCENTILE])
    threshold = max(loud - VAD_REL_DB, VAD_ABS_DBFS)
    if above_quiet:
        threshold = max(threshold, quiet + VAD_ABOVE_QUIET_DB)
    return levels_db >= threshold


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the True runs of a boolean array."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    d = np.diff(m.astype(np.int8))
    starts = np.flatnonzero(d == 1)
    stops = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), stops.tolist()))


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Run the enclosed numpy code on one BLAS thread.

    The metrics multiply small matrices (mel filters, patch correlations). A multi-threaded
    OpenBLAS spins its threads on such products: on the 2-core test machine, busy with other
    jobs, one spill-over score took 1.0 s of wall time instead of 0.13 s. Per-utterance work
    is better parallelized across utterances, if at all.
    """
    from cbx.eval.runtime import thread_pools

    return thread_pools().limit(limits=1, user_api="blas")
