"""The torchaudio replacements equal torchaudio 2.11 on recorded cases; upstream imports; perth loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cbx.engine import compat
from cbx.errors import CbxError

# Inputs and torchaudio 2.11 outputs of every call upstream makes (the ``cases`` metadata key
# says which call made each tensor); recorded where torchaudio still loaded, kept in the repo.
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "torchaudio-2.11-reference.safetensors"
TOL = 1e-4


def _reference():
    with safe_open(str(REFERENCE), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cases, tensors


def _case_names(prefix):
    cases, _ = _reference()
    names = [c["name"] for c in cases if c["name"].startswith(prefix)]
    assert names, f"{REFERENCE}: no {prefix}* cases"
    return names


@pytest.mark.parametrize("name", _case_names("resample_"))
def test_engine_compat_resample_matches_torchaudio(name):
    _, t = _reference()
    _, src, dst = name.split("_")
    out = compat.Resample(int(src), int(dst))(t[f"{name}_in"])
    ref = t[f"{name}_out"]
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < TOL
    # the functional form and a batch/channel axis give the same numbers
    both = compat.resample(torch.stack([t[f"{name}_in"]] * 2), int(src), int(dst))
    assert (both[1] - ref).abs().max().item() < TOL


@pytest.mark.parametrize("name", _case_names("fbank_"))
def test_engine_compat_fbank_matches_torchaudio(name):
    _, t = _reference()
    out = compat.fbank(t[f"{name}_in"], num_mel_bins=80)
    ref = t[f"{name}_out"]
    assert out.shape == ref.shape
    err = (out - ref).abs()
    # The same float32 formula run on another CPU differs by an ulp in log/FFT; that is
    # amplified in bands holding ~1e-8 of a frame's energy (log values near -12). Those few
    # entries are judged in the energy domain, relative to the frame's energy; the rest to 1e-4.
    assert (err < TOL).float().mean().item() > 0.995
    energy_err = (out.double().exp() - ref.double().exp()).abs() / ref.double().exp().sum(1, keepdim=True)
    assert energy_err.max().item() < 1e-5
    assert err.max().item() < 1e-3


def test_engine_compat_spectrogram_pair_matches_torchaudio():
    _, t = _reference()
    kw = dict(n_fft=2048, win_length=2048, hop_length=320, window_fn=torch.hann_window, normalized=False)
    spec = compat.Spectrogram(power=None, **kw)(t["spectrogram_in"])
    assert spec.is_complex()
    assert (spec.real - t["spectrogram_out_real"]).abs().max().item() < TOL
    assert (spec.imag - t["spectrogram_out_imag"]).abs().max().item() < TOL
    wav = compat.InverseSpectrogram(**kw)(spec)
    assert wav.shape == t["inverse_spectrogram_out"].shape
    assert (wav - t["inverse_spectrogram_out"]).abs().max().item() < TOL


def test_engine_compat_fbank_short_input_gives_no_frames():
    assert compat.fbank(torch.zeros(1, 399), num_mel_bins=80).shape == (0, 80)


def test_engine_compat_install_is_idempotent_and_upstream_imports():
    first = compat.install()
    assert compat.install() == first
    import cbx.engine.upstream as up

    ta = sys.modules["torchaudio"]
    if first:
        assert getattr(ta, "__cbx_shim__", False)
        assert ta.transforms.Resample is compat.Resample
        assert ta.compliance.kaldi.fbank is compat.fbank
    assert "onnx" not in sys.modules or not getattr(sys.modules["onnx"], "__cbx_shim__", False)
    assert up.S3Gen is up.S3Token2Wav
    assert up.Conditionals.__name__ == "Conditionals"
    assert "Llama_520M" in up.LLAMA_CONFIGS


def test_engine_compat_perth_watermarker_really_loads():
    cls = compat.perth_watermarker_class()
    wm = cls()
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(24000)).astype(np.float32)
    y = wm.apply_watermark(x, sample_rate=24000)
    assert np.abs(y - x).max() > 1e-4  # it changed the audio
    assert wm.get_watermark(y, sample_rate=24000) > 0.9


def test_engine_compat_perth_missing_is_a_clear_error(monkeypatch):
    import perth

    monkeypatch.setattr(perth, "PerthImplicitWatermarker", None)
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # import of it now fails
    monkeypatch.delitem(sys.modules, "perth.perth_net", raising=False)
    monkeypatch.delitem(sys.modules, "perth.perth_net.perth_net_implicit.perth_watermarker", raising=False)
    with pytest.raises(CbxError, match="perth watermarker did not load"):
        compat.perth_watermarker_class()


def test_engine_compat_watermark_module_marks_each_utterance():
    from cbx.engine import watermark

    rng = np.random.default_rng(1)
    t = np.arange(24000 * 2) / 24000
    voiced = (0.2 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2).astype(np.float32)
    wavs = [voiced, (0.05 * rng.standard_normal(30000)).astype(np.float32)]
    assert watermark.apply_watermark(wavs, 24000, enabled=False)[0] is wavs[0]
    marked = watermark.apply_watermark(wavs, 24000)
    for w, m in zip(wavs, marked):
        assert m.dtype == np.float32 and m.shape == w.shape
        assert np.abs(m - w).max() > 1e-4
    assert watermark.watermark_score(marked[0], 24000) > 0.9
    speech = Path("/usr/share/asterisk/sounds/en_US_f_Allison/activated.wav")  # real speech, if installed
    if speech.exists():
        from cbx.engine.audio import load_audio

        clean = load_audio(speech, 24000)
        assert watermark.watermark_score(clean, 24000) < 0.5
        assert watermark.watermark_score(watermark.apply_watermark([clean], 24000)[0], 24000) > 0.9
    alone = watermark.apply_watermark(wavs[1:], 24000)[0]
    assert np.array_equal(alone, marked[1])  # independent of the other utterances
    assert watermark.get_watermarker() is watermark.get_watermarker("cpu")


def test_engine_compat_real_torchaudio_wins_and_broken_one_is_replaced(tmp_path):
    """In a fresh interpreter: a torchaudio that imports is kept; one that fails to load
    (as the 2.11 wheels do on torch 2.13) is dropped, half-imported pieces included."""

    good, bad = tmp_path / "good" / "torchaudio", tmp_path / "bad" / "torchaudio"
    good.mkdir(parents=True)
    (good / "__init__.py").write_text("REAL = True\n")
    bad.mkdir(parents=True)
    (bad / "__init__.py").write_text("from . import lib\n")
    (bad / "lib.py").write_text("raise OSError('undefined symbol: fake')\n")
    script = (
        "import sys\n"
        "sys.modules['s3tokenizer'] = type(sys)('s3tokenizer')  # keep the check light\n"
        "from cbx.engine import compat\n"
        "print(compat.install(), getattr(sys.modules['torchaudio'], 'REAL', False),"
        " 'torchaudio.lib' in sys.modules, hasattr(sys.modules['torchaudio'], 'transforms'))\n"
    )
    out = {}
    for name, root in (("good", good.parent), ("bad", bad.parent)):
        env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        out[name] = res.stdout.split()
    assert out["good"] == ["False", "True", "False", "False"]  # real one kept, no shim
    assert out["bad"] == ["True", "False", "False", "True"]  # shim in, broken pieces gone
