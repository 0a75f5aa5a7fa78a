"""Make upstream Chatterbox, s3tokenizer and perth import and run without torchaudio.

Why this exists: torchaudio has had no release since 2.11 and no torchaudio wheel loads on
torch 2.13, yet upstream imports it at module load (``chatterbox.models.s3gen``,
``s3tokenizer.utils``, ``perth``). Upstream only *calls* four things from it:
``transforms.Resample`` (sinc interpolation, Hann window), ``compliance.kaldi.fbank`` (CAMPPlus
speaker features) and, in perth, ``transforms.Spectrogram``/``InverseSpectrogram`` with
``power=None``. Those are small pieces of signal processing, so we write them here on plain
torch ops (no library provides torchaudio-exact versions: librosa's resamplers and mel filters
use different kernels and scales, and the numbers must match torchaudio 2.11 to 1e-4 so that
a model behaves as it did when it was trained). ``tests/engine/test_engine_compat.py`` checks
them against outputs recorded from torchaudio 2.11.

``install()`` registers the shim as ``torchaudio`` in ``sys.modules`` only when a real
torchaudio does not import; where one does, it is used and nothing is replaced. s3tokenizer
also imports ``onnx`` at module load, only for converting ONNX checkpoints, which this project
never does; a placeholder ``onnx`` is visible while s3tokenizer imports and removed afterwards
so that no other library mistakes it for the real package.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import math
import sys
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from cbx.errors import CbxError

_installed = False
_using_shim = False


# --------------------------------------------------------------------------- resampling


def _sinc_resample_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float):
    """Polyphase kernel of torchaudio's ``sinc_interp_hann`` (in float64, cast by the caller).

    Returns (kernel [new, 1, 2 * width + orig], width) for rates already divided by their gcd.
    Output sample j of each block of ``new`` samples sits at input time -j / new; the filter is
    a sinc at ``rolloff * min(orig, new)`` tapered by a squared cosine (a Hann window) that
    reaches zero at ``lowpass_filter_width`` zero crossings.
    """
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    phase = -torch.arange(new, dtype=torch.float64)[:, None, None] / new
    t = (phase + taps) * base_freq
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1.0, t))
    return sinc * window * (base_freq / orig), width


def resample(
    waveform: torch.Tensor,
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Resample the last axis like ``torchaudio.functional.resample`` (sinc_interp_hann)."""
    return Resample(orig_freq, new_freq, lowpass_filter_width=lowpass_filter_width, rolloff=rolloff).to(waveform.device)(waveform)


class Resample(nn.Module):
    """``torchaudio.transforms.Resample`` with its default sinc_interp_hann method."""

    def __init__(
        self,
        orig_freq: int = 16000,
        new_freq: int = 16000,
        resampling_method: str = "sinc_interp_hann",
        lowpass_filter_width: int = 6,
        rolloff: float = 0.99,
        beta: float | None = None,
        *,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if resampling_method != "sinc_interp_hann":
            raise NotImplementedError(f"cbx torchaudio shim: resampling_method={resampling_method!r}")
        self.orig_freq, self.new_freq = int(orig_freq), int(new_freq)
        gcd = math.gcd(self.orig_freq, self.new_freq)
        self._orig, self._new = self.orig_freq // gcd, self.new_freq // gcd
        if self.orig_freq != self.new_freq:
            kernel, self.width = _sinc_resample_kernel(self._orig, self._new, lowpass_filter_width, rolloff)
            self.register_buffer("kernel", kernel.to(dtype or torch.float32), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.orig_freq == self.new_freq:
            return waveform
        shape = waveform.shape
        x = waveform.reshape(-1, 1, shape[-1])
        n = shape[-1]
        x = F.pad(x, (self.width, self.width + self._orig))
        y = F.conv1d(x, self.kernel.to(x.dtype), stride=self._orig)  # [N, new, blocks]
        y = y.transpose(1, 2).reshape(x.shape[0], -1)
        target = math.ceil(self._new * n / self._orig)
        return y[:, :target].reshape(*shape[:-1], -1)


# --------------------------------------------------------------------------- spectrograms


class Spectrogram(nn.Module):
    """``torchaudio.transforms.Spectrogram`` (centered STFT; power=None gives the complex STFT)."""

    def __init__(
        self,
        n_fft: int = 400,
        win_length: int | None = None,
        hop_length: int | None = None,
        pad: int = 0,
        window_fn=torch.hann_window,
        power: float | None = 2.0,
        normalized: bool = False,
        wkwargs: dict | None = None,
        center: bool = True,
        pad_mode: str = "reflect",
        onesided: bool = True,
        return_complex: bool | None = None,
    ):
        super().__init__()
        if pad or normalized:
            raise NotImplementedError("cbx torchaudio shim: Spectrogram pad/normalized")
        self.n_fft = n_fft
        self.win_length = win_length if win_length is not None else n_fft
        self.hop_length = hop_length if hop_length is not None else self.win_length // 2
        self.power, self.center, self.pad_mode, self.onesided = power, center, pad_mode, onesided
        window = window_fn(self.win_length) if wkwargs is None else window_fn(self.win_length, **wkwargs)
        self.register_buffer("window", window)  # persistent, as torchaudio: perth checkpoints hold it

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        shape = waveform.shape
        spec = torch.stft(
            waveform.reshape(-1, shape[-1]),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window,
            center=self.center,
            pad_mode=self.pad_mode,
            normalized=False,
            onesided=self.onesided,
            return_complex=True,
        )
        spec = spec.reshape(*shape[:-1], *spec.shape[-2:])
        if self.power is None:
            return spec
        return spec.abs().pow(self.power)


class InverseSpectrogram(nn.Module):
    """``torchaudio.transforms.InverseSpectrogram`` (inverse of a centered complex STFT)."""

    def __init__(
        self,
        n_fft: int = 400,
        win_length: int | None = None,
        hop_length: int | None = None,
        pad: int = 0,
        window_fn=torch.hann_window,
        normalized: bool = False,
        wkwargs: dict | None = None,
        center: bool = True,
        pad_mode: str = "reflect",
        onesided: bool = True,
    ):
        super().__init__()
        if pad or normalized:
            raise NotImplementedError("cbx torchaudio shim: InverseSpectrogram pad/normalized")
        self.n_fft = n_fft
        self.win_length = win_length if win_length is not None else n_fft
        self.hop_length = hop_length if hop_length is not None else self.win_length // 2
        self.center, self.onesided = center, onesided
        window = window_fn(self.win_length) if wkwargs is None else window_fn(self.win_length, **wkwargs)
        self.register_buffer("window", window)  # persistent, as torchaudio: perth checkpoints hold it

    def forward(self, spectrogram: torch.Tensor, length: int | None = None) -> torch.Tensor:
        shape = spectrogram.shape
        wav = torch.istft(
            spectrogram.reshape(-1, shape[-2], shape[-1]),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.to(spectrogram.real.dtype),
            center=self.center,
            normalized=False,
            onesided=self.onesided,
            length=length,
            return_complex=False,
        )
        return wav.reshape(*shape[:-2], wav.shape[-1])


class TimeStretch(nn.Module):
    """Placeholder: perth builds one but never calls it on the watermarking path."""

    def __init__(self, hop_length: int | None = None, n_freq: int = 201, fixed_rate: float | None = None):
        super().__init__()
        n_fft = (n_freq - 1) * 2
        hop_length = hop_length if hop_length is not None else n_fft // 2
        # Registered because perth's checkpoint holds this buffer (strict state-dict load).
        self.register_buffer("phase_advance", torch.linspace(0, math.pi * hop_length, n_freq)[..., None])

    def forward(self, *args, **kwargs):
        raise NotImplementedError("cbx torchaudio shim: TimeStretch is not implemented")


# --------------------------------------------------------------------------- Kaldi fbank


def _mel(freq):
    return 1127.0 * torch.log(1.0 + freq / 700.0)


def _mel_scalar(freq: float) -> float:
    return 1127.0 * math.log(1.0 + freq / 700.0)


def _kaldi_mel_banks(num_bins: int, padded_len: int, sample_freq: float, low_freq: float, high_freq: float):
    """Triangular filters, equally spaced on Kaldi's mel scale, over the FFT bins [0, N/2)."""
    num_fft_bins = padded_len // 2
    nyquist = 0.5 * sample_freq
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad fbank frequency range low={low_freq} high={high_freq} nyquist={nyquist}")
    mel_low, mel_high = _mel_scalar(low_freq), _mel_scalar(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel((sample_freq / padded_len) * torch.arange(num_fft_bins)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def fbank(
    waveform: torch.Tensor,
    blackman_coeff: float = 0.42,
    channel: int = -1,
    dither: float = 0.0,
    energy_floor: float = 1.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    high_freq: float = 0.0,
    htk_compat: bool = False,
    low_freq: float = 20.0,
    min_duration: float = 0.0,
    num_mel_bins: int = 23,
    preemphasis_coefficient: float = 0.97,
    raw_energy: bool = True,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    sample_frequency: float = 16000.0,
    snip_edges: bool = True,
    subtract_mean: bool = False,
    use_energy: bool = False,
    use_log_fbank: bool = True,
    use_power: bool = True,
    vtln_high: float = -500.0,
    vtln_low: float = 100.0,
    vtln_warp: float = 1.0,
    window_type: str = "povey",
) -> torch.Tensor:
    """Kaldi log-mel filterbank like ``torchaudio.compliance.kaldi.fbank``.

    Implements the options CAMPPlus uses (and the neighbouring boolean switches); options that
    upstream never sets to non-defaults (dither, energy, VTLN warping, non-povey windows,
    snip_edges=False) raise NotImplementedError rather than silently differing. The float32
    operations are torchaudio's, in its order; against torchaudio 2.11 run on another CPU,
    99.5% of values agree to 1e-4 and the rest (bands holding ~1e-8 of a frame's energy, where
    an ulp of difference in the vectorised log/FFT is amplified) to 1e-5 of the frame energy.
    """
    if dither != 0.0 or use_energy or vtln_warp != 1.0 or not snip_edges or window_type != "povey":
        raise NotImplementedError("cbx torchaudio shim: fbank supports the default Kaldi options only")
    dtype, device = waveform.dtype, waveform.device
    x = waveform[max(channel, 0)] if waveform.dim() == 2 else waveform
    shift = int(sample_frequency * frame_shift * 0.001)
    size = int(sample_frequency * frame_length * 0.001)
    padded = 1 << (size - 1).bit_length() if round_to_power_of_two else size
    if x.numel() < size or x.numel() < min_duration * sample_frequency:
        return torch.empty(0, num_mel_bins, dtype=dtype, device=device)
    frames = x.unfold(0, size, shift)  # [m, size], as Kaldi with snip_edges
    if remove_dc_offset:
        frames = frames - frames.mean(dim=1, keepdim=True)
    if preemphasis_coefficient != 0.0:
        prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - preemphasis_coefficient * prev
    window = torch.hann_window(size, periodic=False, dtype=dtype, device=device).pow(0.85)
    frames = F.pad(frames * window, (0, padded - size))
    spectrum = torch.fft.rfft(frames).abs()
    if use_power:
        spectrum = spectrum.pow(2.0)
    banks = _kaldi_mel_banks(num_mel_bins, padded, sample_frequency, low_freq, high_freq)
    banks = F.pad(banks, (0, 1)).to(device=device, dtype=dtype)  # Nyquist bin gets no weight
    mel = spectrum @ banks.T
    if use_log_fbank:
        mel = torch.clamp(mel, min=torch.finfo(dtype).eps).log()
    if subtract_mean:
        mel = mel - mel.mean(dim=0, keepdim=True)
    return mel


# --------------------------------------------------------------------------- file I/O


def load(path, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True, channels_first: bool = True, **_):
    """``torchaudio.load`` on soundfile: (float32 tensor [channels, frames], sample rate)."""
    import soundfile as sf

    stop = None if num_frames < 0 else frame_offset + num_frames
    data, sr = sf.read(str(path), start=frame_offset, stop=stop, dtype="float32", always_2d=True)
    wav = torch.from_numpy(data)
    return (wav.T.contiguous() if channels_first else wav), sr


def save(path, src: torch.Tensor, sample_rate: int, channels_first: bool = True, **_):
    """``torchaudio.save`` on soundfile (format from the file suffix)."""
    import soundfile as sf

    data = src.detach().cpu().float()
    if data.dim() == 1:
        data = data[None]
    sf.write(str(path), (data.T if channels_first else data).numpy(), int(sample_rate))


# --------------------------------------------------------------------------- installation


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    # A real spec keeps importlib.util.find_spec() from raising on the shim.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    mod.__path__ = []
    mod.__cbx_shim__ = True
    mod.__dict__.update(attrs)
    return mod


def _build_shim() -> dict[str, types.ModuleType]:
    transforms = _module(
        "torchaudio.transforms",
        Resample=Resample,
        Spectrogram=Spectrogram,
        InverseSpectrogram=InverseSpectrogram,
        TimeStretch=TimeStretch,
    )
    functional = _module("torchaudio.functional", resample=resample)
    kaldi = _module("torchaudio.compliance.kaldi", fbank=fbank)
    compliance = _module("torchaudio.compliance", kaldi=kaldi)
    root = _module(
        "torchaudio",
        transforms=transforms,
        functional=functional,
        compliance=compliance,
        load=load,
        save=save,
        __version__="0.0+cbx.shim",
    )
    return {m.__name__: m for m in (root, transforms, functional, compliance, kaldi)}


def _real_torchaudio_imports() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("torchaudio")
        return True
    except Exception:  # a broken binary raises OSError/RuntimeError, not only ImportError
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        return False


def _import_s3tokenizer() -> None:
    """Import s3tokenizer with a placeholder ``onnx`` (only its ONNX converters use it)."""
    if "s3tokenizer" in sys.modules:
        return
    try:
        importlib.import_module("onnx")
        importlib.import_module("s3tokenizer")
        return
    except ImportError:
        pass
    placeholder = _module("onnx")

    def _missing(*_a, **_k):
        raise CbxError("onnx is not installed: converting ONNX speech-tokenizer files is not supported")

    placeholder.load = _missing
    placeholder.numpy_helper = _module("onnx.numpy_helper", to_array=_missing)
    sys.modules["onnx"] = placeholder
    try:
        importlib.import_module("s3tokenizer")
    finally:
        if sys.modules.get("onnx") is placeholder:
            del sys.modules["onnx"]


def install() -> bool:
    """Make ``import chatterbox`` work here. Idempotent. Returns True when the shim is in use."""
    global _installed, _using_shim
    if _installed:
        return _using_shim
    if not _real_torchaudio_imports():
        sys.modules.update(_build_shim())
        _using_shim = True
    _import_s3tokenizer()
    _installed = True
    return _using_shim


def using_shim() -> bool:
    """True when ``torchaudio`` in this process is our shim (after :func:`install`)."""
    return _using_shim


def perth_watermarker_class():
    """Return ``perth.PerthImplicitWatermarker``, or raise CbxError saying why perth disabled it.

    perth swallows the ImportError of its watermarker (for instance ``pkg_resources`` missing
    with setuptools >= 81) and sets the class to None; upstream then fails later with an
    unrelated TypeError, or a caller might skip watermarking without noticing.
    """
    install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation notice
        import perth

        cls = getattr(perth, "PerthImplicitWatermarker", None)
        if cls is not None:
            return cls
        try:
            importlib.import_module("perth.perth_net.perth_net_implicit.perth_watermarker")
            importlib.import_module("perth.perth_net")
        except Exception as exc:  # noqa: BLE001 - report whatever perth hit
            raise CbxError(
                f"the perth watermarker did not load ({type(exc).__name__}: {exc}); "
                "install setuptools<81 (perth imports pkg_resources)"
            ) from exc
    raise CbxError("the perth watermarker did not load (perth.PerthImplicitWatermarker is None)")
