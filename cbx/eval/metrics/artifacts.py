"""Artifact metrics: the defects a compressed TTS model adds that WER and MOS can miss.

Each detector reports a *value* (how much) and, where it is a detector, a *count or flag*
with a frozen threshold. Thresholds were chosen by measuring real speech (the Allison prompts
from Debian's asterisk-core-sounds-en-wav, resampled to 24 kHz, and the pyannote and
moonshine sample clips) with and without planted artifacts; tests/eval/test_eval_artifacts*.py
re-measure recall and false positives on real clips. Changing a threshold changes the
numbers: bump ``VERSION`` with it.

The detectors are hand-written numpy because no maintained library offers them as
per-utterance measures (pyloudnorm is used for loudness, librosa for mel features):

- clipping: samples at or above ``CLIP_LEVEL`` of full scale, and runs of ``CLIP_RUN`` of them
  (one sample at full scale is a peak; a run of them is a flattened, clipped top);
- DC offset: the mean sample value;
- clicks: peaks of the signal high-passed at 4.5 kHz that stand far above the peaks around
  them and whose energy is concentrated in a fraction of a millisecond, so that glottal
  pulses, fricatives and plosive releases are not counted while an impulse or a jump is;
- noise in pauses: the level of the frames the energy VAD calls non-speech, and bursts of
  noise-like frames (spectral flatness in 0-8 kHz of at least ``NOISE_FLATNESS``, louder than
  -55 dBFS and than 50 dB under the speech), which an energy VAD alone would call speech;
- leading/trailing silence from the same VAD;
- spill-over of the voice prompt (what upstream's ``trim_fade`` hides): the best correlation
  of a log-mel patch at the start of the output with any patch of the prompt's last seconds
  (measured: different sentences of one voice at most 0.73 for 24 Allison pairs and 0.80 for
  90 pairs of piper TTS outputs; a pasted prompt end at least 0.97, resynthesized from its
  spectrogram by Griffin-Lim at least 0.95; time-stretched by 0.9 / 1.15 (phase vocoder) it
  is flagged in 92-96% / 79% of cases at the flag level, 0.85. The same words said again by
  the same voice can score as high, so an output that starts with the words the prompt ended
  on is flagged too);
- NaN/Inf samples (counted; every other metric sees them as zeros);
- integrated loudness (ITU-R BS.1770, pyloudnorm), a value with no preferred direction.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np

from cbx.eval import dsp
from cbx.eval.registry import MetricSpec, register_metric
from cbx.eval.types import Utterance

VERSION = "1"

CLIP_LEVEL = 0.99
CLIP_RUN = 3

DC_FLAG_LEVEL = 0.01

CLICK_HP_HZ = 4500.0
CLICK_BLOCK_S = 0.0025
CLICK_NEIGHBOURS = 8  # blocks each side (20 ms)
# Swept on 109 clean real clips (84 Allison prompts, 25 five-second chunks of full-band read
# speech) and the same clips with one planted impulse or 2 ms jump at peak 0.7: with these
# values no clean clip was flagged and recall was 0.98 at amplitude 0.2, 0.99 at 0.3.
CLICK_QUANTILE = 0.5
CLICK_RATIO = 8.0
CLICK_REF_FLOOR = 0.003  # high-band level below which a neighbourhood counts as silent
CLICK_MIN_ABS = 0.03  # high-band peak of a click worth reporting (about -30 dBFS)
CLICK_CONCENTRATION = 0.8

# 0-8 kHz: the band Chatterbox's mel (fmax 8 kHz) describes. Measured block flatness above the
# level gate: real speech at most 0.51 (0.73 over 0-4 kHz, where the tail of a fricative looks
# flat), piper TTS fricatives 0.75, planted 120 ms white-noise bursts at least 0.86.
FLAT_BAND_HZ = 8000.0
FLAT_NFFT_S = 0.016
FLAT_AVG_FRAMES = 4  # Welch-style averaging: noise stays flat, speech keeps its structure
NOISE_FLATNESS = 0.8
NOISE_BELOW_SPEECH_DB = 50.0  # quieter than this under the speech's loud level is not counted
NOISE_MIN_DBFS = -55.0

SPILL_SR = 16000
SPILL_FMAX = 4000.0
SPILL_NMELS = 40
SPILL_HEAD_S = 1.0  # where in the output spill-over is looked for
SPILL_TAIL_S = 3.0  # how much of the prompt's end is compared
SPILL_PATCH_S = 0.6  # 0.4 s patches let any two fricative-vowel transitions of one TTS voice reach 0.9
SPILL_HOP = 160  # 10 ms at SPILL_SR (20 ms frames lost 0.05 of correlation to misalignment)
SPILL_NFFT = 512
SPILL_VAD_DB = 40.0
SPILL_MIN_SPEECH = 0.8  # share of a patch's frames that must be speech
# the output's head is also compared time-warped by these factors (a spilled fragment is
# regenerated, at its own tempo)
SPILL_WARPS = (0.87, 0.93, 1.0, 1.07, 1.15)
SPILL_FLAG = 0.85

LUFS_MIN_S = 0.4  # BS.1770 gating blocks are 400 ms


def _spec(name, higher, unit, desc, aggregation="mean"):
    return register_metric(MetricSpec(name, higher, VERSION, unit, aggregation, desc))


SPECS = [
    _spec("nonfinite_count", False, "samples", "NaN or Inf samples in the output"),
    _spec("clip_ratio", False, "fraction", f"share of samples with |x| >= {CLIP_LEVEL}"),
    _spec("clip_events", False, "count", f"runs of >= {CLIP_RUN} samples with |x| >= {CLIP_LEVEL}"),
    _spec("dc_offset", False, "FS", "absolute mean sample value"),
    _spec("dc_flag", False, "flag", f"1 when the DC offset exceeds {DC_FLAG_LEVEL}"),
    _spec("click_count", False, "count", "isolated impulses or jumps (high-band spikes above their neighbourhood)"),
    _spec("noise_floor_dbfs", False, "dBFS", "median level of the frames the energy VAD calls non-speech"),
    _spec("pause_noise_count", False, "count", "stretches of white-noise-like sound loud enough to hear"),
    _spec("leading_silence_s", False, "s", "silence before the first speech frame"),
    _spec("trailing_silence_s", False, "s", "silence after the last speech frame"),
    _spec("spillover_score", False, "corr", "best log-mel correlation of the output's start with the prompt's end"),
    _spec("spillover_flag", False, "flag", f"1 when spillover_score >= {SPILL_FLAG}"),
    _spec("loudness_lufs", None, "LUFS", "integrated loudness (BS.1770); informational, no preferred direction"),
]


def clipping(x: np.ndarray) -> tuple[float, int]:
    """(share of samples at or above CLIP_LEVEL, number of runs of CLIP_RUN such samples)."""
    hot = np.abs(x) >= CLIP_LEVEL
    events = sum(1 for a, b in dsp.runs(hot) if b - a >= CLIP_RUN)
    return float(hot.mean()) if x.size else 0.0, events


def _highpass(x: np.ndarray, sr: int) -> np.ndarray:
    from scipy.signal import butter, sosfiltfilt

    sos = butter(4, min(CLICK_HP_HZ, 0.4 * sr), btype="high", fs=sr, output="sos")
    return sosfiltfilt(sos, x) if x.size > 30 else np.zeros_like(x)


def click_positions(x: np.ndarray, sr: int) -> np.ndarray:
    """Sample indices of the clicks found (one per click).

    A click is broadband and short, so it stands out above CLICK_HP_HZ where speech is weak:
    the high-passed signal is cut into CLICK_BLOCK_S blocks and a block is a click when its
    peak is CLICK_RATIO times the CLICK_QUANTILE of the peaks of the blocks around it (skipping
    the adjacent ones, which the click's own ringing reaches), is at least CLICK_MIN_ABS, and
    CLICK_CONCENTRATION of the high-band energy above that reference within +-2.5 ms lies
    within +-0.25 ms of the peak. The quantile of the neighbours makes periodic glottal pulses and fricative noise
    their own reference; the concentration test separates an impulse or a jump from a
    plosive release, whose high-band burst lasts milliseconds.
    """
    e = np.abs(_highpass(x, sr))
    b = max(1, int(CLICK_BLOCK_S * sr))
    n = e.size // b
    if n < 3:
        return np.zeros(0, dtype=np.int64)
    blocks = e[: n * b].reshape(n, b)
    peak = blocks.max(axis=1)
    where = blocks.argmax(axis=1) + np.arange(n) * b
    k = CLICK_NEIGHBOURS
    padded = np.pad(peak, k, mode="reflect" if n > k else "edge")
    offsets = [o for o in range(-k, k + 1) if abs(o) > 1]
    neigh = np.stack([padded[k + o : k + o + n] for o in offsets], axis=1)
    ref = np.maximum(np.quantile(neigh, CLICK_QUANTILE, axis=1), CLICK_REF_FLOOR)
    cand = np.flatnonzero((peak >= CLICK_RATIO * ref) & (peak >= CLICK_MIN_ABS))
    inner, outer = max(1, int(0.00025 * sr)), max(2, int(0.0025 * sr))
    found = []
    for i in cand:
        p = where[i]
        # energy above the neighbourhood's level only, so that fricative noise under a click
        # does not dilute it
        e2 = np.maximum(e[max(0, p - outer) : p + outer + 1] - ref[i], 0.0) ** 2
        c = min(p, outer)
        near = e2[max(0, c - inner) : c + inner + 1].sum()
        wide = e2.sum()
        if near >= CLICK_CONCENTRATION * wide and (not found or p - found[-1] > outer):
            found.append(p)
    return np.asarray(found, dtype=np.int64)


def band_flatness(x: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(spectral flatness in 0..FLAT_BAND_HZ, level in dBFS) per analysis block.

    Blocks are FLAT_AVG_FRAMES STFT frames long (hop one frame), power-averaged before the
    flatness is taken, so white noise scores near 1 and voiced or fricative speech well below.
    """
    import librosa

    n_fft = 1 << int(np.ceil(np.log2(FLAT_NFFT_S * sr)))
    if x.size < n_fft * FLAT_AVG_FRAMES:
        return np.zeros(0), np.zeros(0)
    spec = np.abs(librosa.stft(x, n_fft=n_fft, hop_length=n_fft, center=False, window="hann")) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    band = spec[(freqs > 50.0) & (freqs <= min(FLAT_BAND_HZ, sr / 2)), :]
    k = FLAT_AVG_FRAMES
    kernel = np.ones(k) / k
    from numpy.lib.stride_tricks import sliding_window_view

    avg = np.maximum(sliding_window_view(band, k, axis=1).mean(axis=-1), 1e-20)
    flat = np.exp(np.mean(np.log(avg), axis=0)) / np.mean(avg, axis=0)
    frames = dsp.frame_signal(x, sr, n_fft / sr, n_fft / sr)[: spec.shape[1]]
    pw = np.mean(frames**2, axis=1)
    lvl = 10 * np.log10(np.maximum(np.convolve(pw, kernel, mode="valid"), 1e-12))
    return flat, lvl


def pause_noise_bursts(x: np.ndarray, sr: int) -> int:
    flat, lvl = band_flatness(x, sr)
    if flat.size == 0:
        return 0
    loud = np.percentile(dsp.frame_levels_db(x, sr), dsp.VAD_REF_PERCENTILE)
    hot = (flat >= NOISE_FLATNESS) & (lvl >= max(loud - NOISE_BELOW_SPEECH_DB, NOISE_MIN_DBFS))
    return len(dsp.runs(hot))


def silence_edges(levels_db: np.ndarray, duration_s: float) -> tuple[float, float]:
    speech = dsp.speech_mask(levels_db)
    idx = np.flatnonzero(speech)
    if idx.size == 0:
        return duration_s, duration_s
    lead = idx[0] * dsp.HOP_S
    trail = max(0.0, duration_s - (idx[-1] * dsp.HOP_S + dsp.FRAME_S))
    return float(lead), float(trail)


@functools.lru_cache(maxsize=2)
def _spill_mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=SPILL_SR, n_fft=SPILL_NFFT, n_mels=SPILL_NMELS, fmin=0.0, fmax=SPILL_FMAX)


def _logmel_speech(x: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(log-mel frames [T, bands] at SPILL_SR, speech mask [T] from the frames' energy)."""
    import librosa

    y = dsp.resample(x, sr, SPILL_SR)
    if y.size < SPILL_NFFT:
        return np.zeros((0, SPILL_NMELS)), np.zeros(0, dtype=bool)
    spec = np.abs(librosa.stft(y, n_fft=SPILL_NFFT, hop_length=SPILL_HOP, win_length=400, center=False)) ** 2
    mel = _spill_mel_basis() @ spec
    energy_db = 10.0 * np.log10(np.maximum(mel.sum(axis=0), 1e-20))
    speech = energy_db >= np.percentile(energy_db, dsp.VAD_REF_PERCENTILE) - SPILL_VAD_DB
    # floor relative to the clip's peak, so that digital silence does not dominate a patch
    lm = np.log(np.maximum(mel, max(float(mel.max()), 1e-20) * 1e-8)).T
    return lm, speech


def _patches(m: np.ndarray, speech: np.ndarray, p: int) -> np.ndarray:
    """Unit-norm patches of p frames that are mostly speech, each band's mean over the patch
    removed: what is left is how the spectrum moves, not the voice's or channel's tilt that
    any two clips of one speaker share."""
    from numpy.lib.stride_tricks import sliding_window_view

    w = sliding_window_view(m, (p, m.shape[1]))[:, 0]
    w = w[sliding_window_view(speech, p).mean(axis=1) >= SPILL_MIN_SPEECH]
    w = (w - w.mean(axis=1, keepdims=True)).reshape(len(w), -1)
    w = w - w.mean(axis=1, keepdims=True)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-9)


def _speech_span(x: np.ndarray, sr: int, head: bool) -> np.ndarray | None:
    """The part of ``x`` that spill-over can involve: from its first speech frame on (head) or
    up to its last (tail), SPILL_HEAD_S / SPILL_TAIL_S plus a patch and a second of margin;
    None when the energy VAD finds no speech at all."""
    speech = np.flatnonzero(dsp.speech_mask(dsp.frame_levels_db(x, sr)))
    if speech.size == 0:
        return None
    keep = int((SPILL_PATCH_S + 1.0 + (SPILL_HEAD_S if head else SPILL_TAIL_S)) * sr)
    if head:
        start = max(0, int(speech[0] * dsp.HOP_S * sr) - int(0.1 * sr))
        return x[start : start + keep]
    stop = min(x.size, int((speech[-1] * dsp.HOP_S + dsp.FRAME_S) * sr) + int(0.1 * sr))
    return x[max(0, stop - keep) : stop]


def spillover_score(out: np.ndarray, sr: int, prompt: np.ndarray, prompt_sr: int) -> float | None:
    with dsp.one_blas_thread():
        return _spillover_score(out, sr, prompt, prompt_sr)


def _spillover_score(out: np.ndarray, sr: int, prompt: np.ndarray, prompt_sr: int) -> float | None:
    """Best Pearson correlation between a SPILL_PATCH_S log-mel patch of the output's first
    SPILL_HEAD_S of speech and any such patch of the prompt's last SPILL_TAIL_S of speech.

    Leading silence of the output and trailing silence of the prompt are skipped, and patches
    that are mostly pause are not compared (two stretches of room noise correlate without
    meaning anything), and the head is also tried time-warped by each of SPILL_WARPS. The
    same words spoken again by the same voice also score high. None if either side has no
    full patch of speech."""
    hop_s = SPILL_HOP / SPILL_SR
    p = int(round(SPILL_PATCH_S / hop_s))
    n_head = int(round(SPILL_HEAD_S / hop_s)) + p
    # only the output's head and the prompt's tail are compared: cut them out first (with a
    # second of context, so the VAD below still sees some loud speech) to keep this cheap
    out, prompt = _speech_span(out, sr, head=True), _speech_span(prompt, prompt_sr, head=False)
    if out is None or prompt is None:
        return None
    head, head_sp = _logmel_speech(out, sr)
    tail, tail_sp = _logmel_speech(prompt, prompt_sr)
    if not head_sp.any() or not tail_sp.any():
        return None
    first = int(np.argmax(head_sp))
    keep = first + int(n_head * max(SPILL_WARPS)) + 1
    head, head_sp = head[first:keep], head_sp[first:keep]
    last = len(tail_sp) - int(np.argmax(tail_sp[::-1]))
    start = max(0, last - int(round(SPILL_TAIL_S / hop_s)))
    tail, tail_sp = tail[start:last], tail_sp[start:last]
    if len(tail) < p:
        return None
    b = _patches(tail, tail_sp, p)
    best = None
    for factor in SPILL_WARPS:
        h, h_sp = _time_warp(head, head_sp, factor)
        h, h_sp = h[:n_head], h_sp[:n_head]
        if len(h) < p:
            continue
        a = _patches(h, h_sp, p)
        if len(a) and len(b):
            score = float(np.max(a @ b.T))
            best = score if best is None else max(best, score)
    return best


def _time_warp(m: np.ndarray, speech: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Frames resampled in time by ``factor`` (>1 speeds up), linear between frames: a spilled
    fragment is regenerated speech, not a copy, and its tempo differs from the prompt's."""
    if factor == 1.0 or len(m) < 2:
        return m, speech
    t = np.arange(0.0, len(m) - 1, factor)
    i = np.floor(t).astype(int)
    w = (t - i)[:, None]
    return m[i] * (1.0 - w) + m[i + 1] * w, speech[np.round(t).astype(int)]


def loudness_lufs(x: np.ndarray, sr: int) -> float | None:
    if x.size < LUFS_MIN_S * sr:
        return None
    import pyloudnorm

    value = pyloudnorm.Meter(sr).integrated_loudness(x)
    return float(value) if np.isfinite(value) else None


def artifact_scores(audio: np.ndarray, sr: int, prompt: np.ndarray | None = None, prompt_sr: int | None = None) -> dict:
    """All artifact metrics of one clip (mono float, full scale 1.0; the voice prompt, if
    given, for spill-over); a metric that cannot be measured is omitted."""
    with dsp.one_blas_thread():
        return _artifact_scores(audio, sr, prompt, prompt_sr)


def _artifact_scores(audio, sr, prompt, prompt_sr) -> dict:
    raw = dsp.as_mono(audio)
    x = dsp.finite(raw)
    out: dict[str, float] = {"nonfinite_count": int(np.count_nonzero(~np.isfinite(raw)))}
    ratio, events = clipping(x)
    out["clip_ratio"] = ratio
    out["clip_events"] = events
    dc = abs(float(x.mean())) if x.size else 0.0
    out["dc_offset"] = dc
    out["dc_flag"] = int(dc > DC_FLAG_LEVEL)
    # the high-pass detectors and the VAD look at the signal around its mean, so a DC shift is
    # reported once (above), not again as clicks or a raised noise floor
    xc = x - x.mean() if x.size else x
    out["click_count"] = int(click_positions(xc, sr).size)
    levels = dsp.frame_levels_db(xc, sr)
    pause = levels[~dsp.speech_mask(levels, above_quiet=True)]
    if pause.size >= 5:
        out["noise_floor_dbfs"] = float(np.median(pause))
    out["pause_noise_count"] = pause_noise_bursts(xc, sr)
    lead, trail = silence_edges(levels, x.size / sr)
    out["leading_silence_s"] = lead
    out["trailing_silence_s"] = trail
    if prompt is not None and prompt_sr:
        score = _spillover_score(xc, sr, dsp.finite(prompt), prompt_sr)
        if score is not None:
            out["spillover_score"] = score
            out["spillover_flag"] = int(score >= SPILL_FLAG)
    lufs = loudness_lufs(xc, sr)
    if lufs is not None:
        out["loudness_lufs"] = lufs
    return out


class ArtifactGroup:
    """Metric group over the output audio (and the voice prompt, for spill-over)."""

    specs: ClassVar[list[MetricSpec]] = SPECS

    def load(self) -> None:
        """Nothing to load: the detectors are signal processing only."""

    def score(self, utt: Utterance) -> dict[str, float]:
        return artifact_scores(utt.audio, utt.sr, utt.prompt_audio, utt.prompt_sr)
