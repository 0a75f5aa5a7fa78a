"""Fidelity functions: zero at identity, the analytic value under known perturbations, monotone
in the perturbation size; the log-mel matches upstream Chatterbox's own mel extractor."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cbx.errors import CbxError
from cbx.eval import fidelity as F
from cbx.eval.metrics.fidelity import SNR_CAP_DB, FidelityGroup
from cbx.eval.types import Utterance

SR = 24000


@pytest.fixture(scope="module")
def speech():
    """Two seconds of real speech at 24 kHz (an Allison prompt), or skip without it."""
    from cbx.eval import assets, dsp
    from cbx.eval.audio import read_audio

    try:
        path, _ = assets.real_speech_clips(1)[0]
    except CbxError as e:
        pytest.skip(str(e))
    wav, sr = read_audio(path)
    return dsp.resample(wav.astype(np.float64), sr, SR)[: 2 * SR]


def test_identical_outputs_have_zero_distance(speech):
    assert F.mel_l1(speech, speech) == 0.0
    wd = F.waveform_distance(speech, speech)
    assert wd["snr_db"] == math.inf and wd["max_abs_err"] == 0.0
    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(0))
    assert F.top1_agreement(logits, logits) == 1.0
    assert F.mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)


def test_snr_of_known_noise_power(speech):
    rng = np.random.default_rng(0)
    power = float(np.mean(speech**2))
    for target in (10.0, 20.0, 40.0):
        noise = rng.standard_normal(speech.size)
        noise *= math.sqrt(power / 10 ** (target / 10) / np.mean(noise**2))  # exactly that power
        wd = F.waveform_distance(speech, speech + noise)
        assert wd["snr_db"] == pytest.approx(target, abs=0.1)
        assert wd["max_abs_err"] == pytest.approx(np.abs(noise).max())


def test_waveform_distance_crops_to_the_shorter_output(speech):
    wd = F.waveform_distance(speech, np.concatenate([speech, np.ones(1000)]))
    assert wd["snr_db"] == math.inf
    assert F.waveform_distance(np.zeros(10), np.ones(10))["snr_db"] == -math.inf
    with pytest.raises(CbxError):
        F.waveform_distance(np.zeros(0), np.zeros(5))


def test_distances_grow_with_the_perturbation(speech):
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(speech.size)
    mels, snrs = [], []
    for scale in (1e-4, 1e-3, 1e-2, 1e-1):
        y = speech + scale * noise
        mels.append(F.mel_l1(speech, y))
        snrs.append(F.waveform_distance(speech, y)["snr_db"])
    assert mels == sorted(mels) and mels[0] > 0
    assert snrs == sorted(snrs, reverse=True)
    # a pure gain g moves every log-mel bin well above the floor by log(g)
    a, b = F.log_mel(speech), F.log_mel(0.5 * speech)
    loud = a > math.log(1e-3)
    assert loud.mean() > 0.3
    assert np.max(np.abs((a - b)[loud] - math.log(2.0))) < 1e-3


def test_log_mel_matches_upstream_mel_spectrogram(speech):
    """Loads upstream's mel.py by file (it needs only torch and librosa), not the chatterbox
    package, whose import pulls torchaudio."""
    spec = importlib.util.find_spec("chatterbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("chatterbox-tts is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "s3gen" / "utils" / "mel.py"
    mod_spec = importlib.util.spec_from_file_location("_upstream_mel", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    ref = mod.mel_spectrogram(torch.from_numpy(speech.astype(np.float32)))[0].numpy()
    ours = F.log_mel(speech.astype(np.float32), SR)
    assert ours.shape == ref.shape
    # float32 (upstream) against float64 (here): logs of tiny bins differ by a little more
    assert np.max(np.abs(ours - ref)) < 5e-3
    assert np.mean(np.abs(ours - ref)) < 1e-5


def test_log_mel_resamples_other_rates(speech):
    from cbx.eval import dsp

    at16 = dsp.resample(speech, SR, 16000)
    assert F.mel_l1(speech, at16, SR, 16000) < 0.1  # only the band above 8 kHz is lost, and the mel stops at 8 kHz


def test_kl_matches_the_analytic_value():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.3, 0.5])
    expected = float(np.sum(p * np.log(p / q)))
    base = torch.tensor(np.log(p))[None].repeat(4, 1) + 3.0  # logits are shift invariant
    comp = torch.tensor(np.log(q))[None].repeat(4, 1)
    assert F.mean_kl(base, comp) == pytest.approx(expected, abs=1e-9)
    assert F.kl_per_step(base, comp) == pytest.approx([expected] * 4, abs=1e-9)
    assert F.top1_agreement(base, comp) == 0.0


def test_kl_with_masked_logits():
    inf = float("inf")
    base = torch.tensor([[0.0, 0.0, -inf, -inf]])  # baseline: tokens 0 and 1, 1/2 each
    comp = torch.tensor([[math.log(3.0), 0.0, 0.0, -inf]])  # 3/5, 1/5, 1/5
    expected = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.2)
    assert F.mean_kl(base, comp) == pytest.approx(expected, abs=1e-6)  # float32 logits
    # the compressed model forbids a token the baseline allows: infinitely far, and said so
    assert F.mean_kl(base, torch.tensor([[0.0, -inf, 0.0, 0.0]])) == math.inf
    with pytest.raises(CbxError, match="step 0"):
        F.mean_kl(torch.full((1, 4), -inf), comp)
    with pytest.raises(CbxError, match=r"\[T, V\]"):
        F.mean_kl(torch.zeros(2, 4), torch.zeros(2, 5))


def test_kl_and_agreement_degrade_monotonically_with_logit_noise():
    g = torch.Generator().manual_seed(0)
    base = 3.0 * torch.randn(200, 500, generator=g)
    noise = torch.randn(200, 500, generator=g)
    kls, agree = [], []
    for scale in (0.01, 0.1, 0.5, 2.0):
        kls.append(F.mean_kl(base, base + scale * noise))
        agree.append(F.top1_agreement(base, base + scale * noise))
    assert kls == sorted(kls) and kls[0] > 0
    assert agree == sorted(agree, reverse=True) and agree[0] >= 0.99 and agree[-1] < 0.9
    # second order: KL(p || softmax(z + s n)) ~ s^2 Var_p(n) / 2 for small s
    p = torch.softmax(base.double(), dim=1)
    n = noise.double()
    var = (p * n**2).sum(1) - (p * n).sum(1) ** 2
    assert kls[0] == pytest.approx(float(0.5 * 0.01**2 * var.mean()), rel=0.02)
    assert F.mean_kl(base.numpy(), (base + noise).numpy()) == pytest.approx(F.mean_kl(base, base + noise))


def test_group_scores_against_the_reference(speech):
    g = FidelityGroup()
    g.load()
    utt = Utterance(id="a", audio=speech.astype(np.float32), sr=SR, text="")
    assert g.score(utt) == {}  # no baseline output: nothing to compare
    utt.reference_audio, utt.reference_sr = speech, SR
    same = g.score(utt)
    assert same["wave_snr_db"] == SNR_CAP_DB and same["mel_l1"] == 0.0
    noisy = speech + 0.01 * np.random.default_rng(2).standard_normal(speech.size)
    utt.audio = noisy.astype(np.float32)
    utt.extra = {"t3_top1_agreement": 0.97, "t3_kl": 0.02}
    s = g.score(utt)
    assert 0 < s["wave_snr_db"] < 60 and s["mel_l1"] > 0
    assert s["t3_top1_agreement"] == 0.97 and s["t3_kl"] == 0.02
    assert set(s) == {spec.name for spec in FidelityGroup.specs}


def test_group_omits_the_mel_distance_of_a_too_short_output():
    x = np.random.default_rng(3).standard_normal(100) * 0.1
    s = FidelityGroup().score(Utterance(id="a", audio=x, sr=SR, text="", reference_audio=x + 0.01, reference_sr=SR))
    assert "mel_l1" not in s
    assert s["wave_snr_db"] == pytest.approx(10 * math.log10(np.sum((x + 0.01) ** 2) / (100 * 1e-4)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_logits_on_the_gpu_give_the_cpu_figures():
    g = torch.Generator().manual_seed(4)
    base, comp = torch.randn(64, 1000, generator=g), torch.randn(64, 1000, generator=g)
    comp[:, :10] = float("-inf")
    cuda = (base.cuda().half(), comp.cuda().half())
    assert F.top1_agreement(*cuda) == F.top1_agreement(base.half(), comp.half())
    assert F.mean_kl(*cuda) == pytest.approx(F.mean_kl(base.half(), comp.half()), rel=1e-9)
