"""Fidelity of a compressed model to the uncompressed one: pure functions over two outputs.

Compression should change the model's behaviour as little as possible; these functions say
how much it did, given the same inputs (tokens, noise, seed) to both models:

- ``mel_l1``: mean absolute difference of 80-bin log-mel spectrograms computed exactly as
  Chatterbox's S3Gen computes its mel targets (Matcha-TTS settings at 24 kHz: n_fft 1920,
  hop 480, window 1920 (periodic Hann), fmin 0, fmax 8000, Slaney mel filters, magnitude
  (not power) spectrum, reflect padding of (n_fft - hop) / 2 and no centring, natural log
  clamped at 1e-5). So a distance here is in the units the CFM decoder is trained in.
- ``mel_cepstral_distortion``: MCD in dB over the frames both have, from cepstra taken as
  the orthonormal DCT of the same log-mel (coefficients 1..``MCD_ORDER``; c0, the level, left
  out): ``10 / ln 10 * sqrt(2 * sum_d (c_d - c'_d)^2)`` averaged over frames. Frames are aligned
  by construction (the runner feeds both decoders the same tokens and noise), so no DTW. It is
  an MFCC-style MCD: comparable between runs here, not equal to WORLD/SPTK mel-cepstrum MCDs
  in papers (pymcd), which need a vocoder analysis this layer does not carry.
- ``waveform_distance``: SNR of the compressed waveform against the baseline in dB, and the
  largest absolute sample error; lengths are cropped to the shorter output.
- ``top1_agreement`` and ``mean_kl``: next-token agreement and KL(base || compressed) of two
  logit tensors [T, V] taken under teacher forcing (the engine produces them; see
  ``cbx.engine.t3_decode.teacher_forced_logits``). Logits masked to -inf (suppressed tokens)
  are handled exactly: a token impossible under the baseline adds nothing to the KL; a token
  possible under the baseline but masked in the compressed model makes the KL infinite,
  which is the truth and is reported as such.

They are written here with numpy, librosa and torch rather than imported from upstream, so
the eval layer stays independent of how the audio was made; a test checks ``log_mel``
against upstream's own ``mel_spectrogram``.
"""

from __future__ import annotations

import math

import numpy as np

from cbx.errors import CbxError

MEL_SR = 24000
MEL_N_FFT = 1920
MEL_HOP = 480
MEL_WIN = 1920
MEL_BINS = 80
MEL_FMIN = 0.0
MEL_FMAX = 8000.0
MEL_LOG_FLOOR = 1e-5
MCD_ORDER = 13


def log_mel(wav: np.ndarray, sr: int = MEL_SR) -> np.ndarray:
    """Log-mel spectrogram [80, frames] of a mono waveform, resampled to 24 kHz if needed."""
    import librosa

    from cbx.eval import dsp

    y = dsp.resample(dsp.finite(wav), sr, MEL_SR)
    pad = (MEL_N_FFT - MEL_HOP) // 2
    if y.size <= pad:
        raise CbxError(f"audio of {y.size} samples at {MEL_SR} Hz is too short for a mel spectrogram")
    y = np.pad(y, (pad, pad), mode="reflect")
    if y.size < MEL_N_FFT:
        y = np.pad(y, (0, MEL_N_FFT - y.size))
    spec = librosa.stft(y, n_fft=MEL_N_FFT, hop_length=MEL_HOP, win_length=MEL_WIN, window="hann", center=False)
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    basis = librosa.filters.mel(sr=MEL_SR, n_fft=MEL_N_FFT, n_mels=MEL_BINS, fmin=MEL_FMIN, fmax=MEL_FMAX)
    return np.log(np.maximum(basis @ mag, MEL_LOG_FLOOR))


def mel_l1(reference: np.ndarray, test: np.ndarray, sr: int = MEL_SR, test_sr: int | None = None) -> float:
    """Mean |log-mel(reference) - log-mel(test)| over the frames both have (nats)."""
    a = log_mel(reference, sr)
    b = log_mel(test, test_sr or sr)
    n = min(a.shape[1], b.shape[1])
    return float(np.mean(np.abs(a[:, :n] - b[:, :n])))


def mel_cepstral_distortion(reference: np.ndarray, test: np.ndarray, sr: int = MEL_SR, test_sr: int | None = None,
                            order: int = MCD_ORDER) -> float:
    """Mean MCD (dB) of two outputs over the frames both have (see the module docstring)."""
    from scipy.fft import dct

    a = dct(log_mel(reference, sr), type=2, norm="ortho", axis=0)[1 : order + 1]
    b = dct(log_mel(test, test_sr or sr), type=2, norm="ortho", axis=0)[1 : order + 1]
    n = min(a.shape[1], b.shape[1])
    d = a[:, :n] - b[:, :n]
    return float(np.mean(10.0 / math.log(10.0) * np.sqrt(2.0 * np.sum(d * d, axis=0))))


def waveform_distance(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """``{"snr_db", "max_abs_err"}`` of ``test`` against ``reference`` (same rate), cropped to
    the shorter; identical signals give SNR +inf, a silent reference with any error -inf."""
    a = np.asarray(reference, dtype=np.float64).reshape(-1)
    b = np.asarray(test, dtype=np.float64).reshape(-1)
    n = min(a.size, b.size)
    if n == 0:
        raise CbxError("waveform distance of an empty signal")
    a, b = a[:n], b[:n]
    err = a - b
    noise = float(np.sum(err**2))
    signal = float(np.sum(a**2))
    if noise == 0.0:
        snr = math.inf
    elif signal == 0.0:
        snr = -math.inf
    else:
        snr = 10.0 * math.log10(signal / noise)
    return {"snr_db": snr, "max_abs_err": float(np.max(np.abs(err)))}


def _logits_pair(base, comp):
    import torch

    a = torch.as_tensor(base).detach().to("cpu", torch.float64)
    b = torch.as_tensor(comp).detach().to("cpu", torch.float64)
    if a.shape != b.shape or a.dim() != 2:
        raise CbxError(f"logit tensors must both be [T, V]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise CbxError("logit tensors have no steps")
    for name, t in (("base", a), ("compressed", b)):
        if torch.isnan(t).any() or torch.isposinf(t).any():
            raise CbxError(f"{name} logits contain NaN or +inf")
        dead = torch.isneginf(t).all(dim=1)
        if dead.any():
            raise CbxError(f"{name} logits are -inf for every token at step {int(dead.nonzero()[0])}")
    return a, b


def top1_agreement(base_logits, comp_logits) -> float:
    """Share of steps at which both models' most likely next token is the same."""
    a, b = _logits_pair(base_logits, comp_logits)
    return float((a.argmax(dim=1) == b.argmax(dim=1)).double().mean())


def kl_per_step(base_logits, comp_logits) -> np.ndarray:
    """KL(softmax(base) || softmax(comp)) at each step, in nats."""
    import torch

    a, b = _logits_pair(base_logits, comp_logits)
    logp = torch.log_softmax(a, dim=1)
    logq = torch.log_softmax(b, dim=1)
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    terms = torch.where(p > 0, p * diff, torch.zeros_like(p))
    return terms.sum(dim=1).clamp_min(0.0).numpy()


def mean_kl(base_logits, comp_logits) -> float:
    """Mean over steps of KL(base || compressed), nats; +inf if the compressed model masks a
    token the baseline gives probability."""
    return float(np.mean(kl_per_step(base_logits, comp_logits)))
