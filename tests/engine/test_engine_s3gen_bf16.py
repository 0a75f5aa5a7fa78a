"""HiFT and the flow encoder in bf16 (settings.s3gen_bf16): error against fp32 within the bounds
docs/CONTRACTS.md states, on the tiny and the full-size random S3Gen, with the same noise and seed.

Bounds (measured with scripts/s3gen_bf16_error.py, see docs/CONTRACTS.md):
  flow encoder in bf16 -> CFM output mel L1 <= ENC_MEL_L1 (nats; the bf16 estimator's own is ~0.1)
  HiFT in bf16         -> waveform log-mel L1 <= HIFT_MEL_L1 and SNR >= HIFT_SNR_DB
Each bound is checked to be discriminating: another HiFT seed (a difference nobody would call
faithful) breaks it.
"""

import numpy as np
import pytest
import torch

from cbx.engine import s3gen_batch as sb
from cbx.eval.fidelity import mel_l1, waveform_distance

ENC_MEL_L1 = 0.01
HIFT_MEL_L1 = 0.06
HIFT_SNR_DB = 35.0


def _gen(s3, n_prompt_tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_token": torch.randint(0, 6561, (1, n_prompt_tokens), generator=g),
        "prompt_token_len": torch.tensor([n_prompt_tokens]),
        "prompt_feat": torch.randn(1, 2 * n_prompt_tokens, 80, generator=g) * 2 - 5,
        "prompt_feat_len": None,
        "embedding": torch.randn(1, 192, generator=g),
    }


def _errors(s3, n_tokens=30, steps=2, seed=0):
    """(encoder-bf16 CFM mel L1, hift-bf16 (mel L1, SNR), other-seed (mel L1, SNR))."""
    g = torch.Generator().manual_seed(seed + 7)
    tokens = torch.randint(0, 6561, (n_tokens,), generator=g)
    gen = _gen(s3, seed=seed)
    est = s3.flow.decoder.estimator
    with torch.inference_mode():
        def mel(encoder):
            inputs = sb.cfm_inputs(s3, [tokens], [gen], encoder=encoder)
            noise = sb.cfm_noise(inputs, [seed], False)
            out = sb.solve_cfm(est, inputs, noise, steps, s3.flow.decoder.inference_cfg_rate, False)
            return sb.crop_mels(out, inputs)[0].float()

        ref = mel(None)
        enc_err = float((mel(sb.low_precision_encoder(s3.flow.encoder)) - ref).abs().mean())
        wav32 = sb.vocode(s3, [ref], seeds=[seed])[0]
        wav16 = sb.vocode(s3, [ref], seeds=[seed], hift=sb.low_precision_hift(s3.mel2wav))[0]
        other = sb.vocode(s3, [ref], seeds=[seed + 1])[0]
    d16 = (mel_l1(wav32, wav16), waveform_distance(wav32, wav16)["snr_db"])
    dseed = (mel_l1(wav32, other), waveform_distance(wav32, other)["snr_db"])
    return enc_err, d16, dseed


def _check(enc_err, d16, dseed):
    assert enc_err <= ENC_MEL_L1
    assert d16[0] <= HIFT_MEL_L1 and d16[1] >= HIFT_SNR_DB
    assert dseed[0] > HIFT_MEL_L1 and dseed[1] < HIFT_SNR_DB  # the bounds tell a real difference


def test_s3gen_bf16_within_bounds_tiny(tiny_model):
    _check(*_errors(tiny_model.s3gen))


@pytest.mark.slow
def test_s3gen_bf16_within_bounds_full_size():
    from cbx.engine.model import build_s3gen

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        s3 = build_s3gen("original", None).eval()
    _check(*_errors(s3, n_tokens=25, steps=1))


def test_low_precision_hift_leaves_the_original_alone(tiny_model):
    hift = tiny_model.s3gen.mel2wav
    mel = torch.randn(1, 80, 12, generator=torch.Generator().manual_seed(0)) - 4
    with torch.inference_mode():
        torch.manual_seed(0)
        before = hift.inference(mel)[0]
        h16 = sb.low_precision_hift(hift)
        torch.manual_seed(0)
        after = hift.inference(mel)[0]
    assert torch.equal(before, after)
    assert next(hift.parameters()).dtype == torch.float32
    assert type(hift.conv_pre).__name__.startswith("Parametrized")  # the original keeps its weight norm
    for name in sb.HIFT_LOW_PRECISION:
        mod = getattr(h16, name)
        for m in (mod if isinstance(mod, torch.nn.ModuleList) else [mod]):
            assert isinstance(m, sb.CastIO)
            assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in h16.f0_predictor.parameters())
    assert all(p.dtype == torch.float32 for p in h16.m_source.parameters())
    enc16 = sb.low_precision_encoder(tiny_model.s3gen.flow.encoder)
    assert next(enc16.parameters()).dtype == torch.bfloat16
    assert next(tiny_model.s3gen.flow.encoder.parameters()).dtype == torch.float32


def test_synth_setting_s3gen_bf16(tiny_model):
    from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer
    from cbx.errors import CbxError

    with pytest.raises(CbxError, match="s3gen_bf16"):
        SynthSettings(s3gen_bf16="yes")
    base = dict(temperature=0.0, max_speech_tokens=20, cfm_steps=2, watermark=False, dtype="fp32")
    syn = Synthesizer(tiny_model)
    req = [SynthRequest("A bf16 check.", None)]
    a = syn.synthesize(req, SynthSettings(**base), progress=False)
    b = syn.synthesize(req, SynthSettings(s3gen_bf16=True, **base), progress=False)
    assert b.settings.to_dict()["s3gen_bf16"] is True and a.settings.s3gen_bf16 is False
    np.testing.assert_array_equal(a.results[0].speech_tokens, b.results[0].speech_tokens)
    wa, wb = a.results[0].wav, b.results[0].wav
    assert not np.array_equal(wa, wb)  # it really ran in bf16
    assert mel_l1(wa, wb) <= HIFT_MEL_L1 + ENC_MEL_L1
    assert len(syn.cast_copies()) == 2  # encoder and HiFT copies, built once
    syn.synthesize(req, SynthSettings(s3gen_bf16=True, **base), progress=False)
    assert len(syn.cast_copies()) == 2
    # decode_tokens (the runner's aligned fidelity) and streaming take the same copies
    wd = syn.decode_tokens(None, b.results[0].speech_tokens, SynthSettings(s3gen_bf16=True, **base))
    assert wd.size > 0
    pieces = list(syn.stream(req, SynthSettings(s3gen_bf16=True, **base)))
    assert sum(p.wav.size for p in pieces) > 0


def test_cli_flag_s3gen_bf16():
    import argparse

    from cbx.engine.cli_synth import add_settings_arguments, settings_from_args

    ap = argparse.ArgumentParser()
    add_settings_arguments(ap)
    assert settings_from_args(ap.parse_args(["--s3gen-bf16"])).s3gen_bf16 is True
    assert settings_from_args(ap.parse_args([])).s3gen_bf16 is False


@pytest.mark.cuda
def test_s3gen_bf16_on_cuda_within_bounds(tiny_copy, tmp_path):
    """The bf16 copies on CUDA (nothing made on the CPU inside the path), and the conditioning
    disk cache keyed by the device type: a CUDA entry is not served to the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import soundfile as sf

    from cbx.engine import conditioning

    s3 = tiny_copy("original").s3gen.to("cuda")
    _check(*_errors(s3))
    model = tiny_copy("original").to("cuda")
    voice = tmp_path / "v.wav"
    t = np.arange(24000) / 24000
    sf.write(voice, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 24000)
    conditioning.prepare_voice(model, voice, disk_cache=tmp_path / "c")
    cpu_model = tiny_copy("original")
    conditioning.prepare_voice(cpu_model, voice, disk_cache=tmp_path / "c")
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(names) == 2  # one entry per device type
