"""prepare_voice equals upstream prepare_conditionals on the same file; cache; bad prompts."""

import types

import numpy as np
import pytest
import soundfile as sf
import torch

from cbx.engine import conditioning
from cbx.errors import CbxError


def _voice(path, seconds, sr=22050, stereo=False, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sr) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.shape)
    x = x.astype(np.float32)
    sf.write(path, np.stack([x, 0.5 * x], 1) if stereo else x, sr)
    return path


@pytest.fixture(scope="module")
def models():
    from cbx.engine.tiny import build_tiny

    return {v: build_tiny(v, seed=0) for v in ("original", "turbo")}


def _upstream_conds(model, path, exaggeration):
    """Run upstream's own prepare_conditionals on our modules (no watermarker needed)."""
    from cbx.engine import upstream as up

    cls = up.ChatterboxTurboTTS if model.variant == "turbo" else up.ChatterboxTTS
    me = types.SimpleNamespace(
        t3=model.t3, s3gen=model.s3gen, ve=model.ve, device="cpu",
        ENC_COND_LEN=cls.ENC_COND_LEN, DEC_COND_LEN=cls.DEC_COND_LEN,
    )
    # Upstream's gain is a NumPy float64 scalar: under NumPy 1 the float32 wav stayed float32,
    # under NumPy 2 it becomes float64 and upstream's tokenizer then fails on a dtype mismatch.
    # The cast reproduces the NumPy 1 behaviour upstream was written for.
    me.norm_loudness = lambda wav, sr, target_lufs=-27: np.asarray(
        cls.norm_loudness(me, wav, sr, target_lufs), dtype=np.float32)
    cls.prepare_conditionals(me, str(path), exaggeration=exaggeration)
    return me.conds


def _assert_same(ours, ref):
    assert torch.allclose(ours.t3.speaker_emb, ref.t3.speaker_emb, atol=1e-4, rtol=0)
    if ref.t3.cond_prompt_speech_tokens is None:
        assert ours.t3.cond_prompt_speech_tokens is None
    else:
        assert torch.equal(ours.t3.cond_prompt_speech_tokens, ref.t3.cond_prompt_speech_tokens)
    assert torch.equal(ours.t3.emotion_adv, ref.t3.emotion_adv)
    for k in ("prompt_token", "prompt_token_len"):
        assert torch.equal(ours.gen[k], ref.gen[k])
    for k in ("prompt_feat", "embedding"):
        assert (ours.gen[k] - ref.gen[k]).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant,seconds", [("original", 2.3), ("turbo", 5.4)])
def test_engine_conditioning_equals_upstream(models, tmp_path, variant, seconds):
    model = models[variant]
    path = _voice(tmp_path / "voice.wav", seconds, stereo=True)
    ours = conditioning.prepare_voice(model, path, exaggeration=0.3)
    ref = _upstream_conds(model, path, 0.3)
    _assert_same(ours, ref)
    if variant == "turbo":
        # loudness normalisation really happened: the prompt mels differ from an un-normalised run
        raw = conditioning._compute(model, conditioning.audio.load_audio(path, 24000),
                                    conditioning.VARIANTS["original"], "x")[1]
        assert (raw["prompt_feat"] - ours.gen["prompt_feat"]).abs().max().item() > 1e-2


def test_engine_conditioning_cache_and_fresh_tensors(models, tmp_path, monkeypatch):
    model = models["original"]
    path = _voice(tmp_path / "v.flac", 1.5, sr=16000, seed=1)
    conditioning.clear_cache()
    calls = []
    real = conditioning._compute
    monkeypatch.setattr(conditioning, "_compute", lambda *a: calls.append(1) or real(*a))
    a = conditioning.prepare_voice(model, path, 0.5)
    b = conditioning.prepare_voice(model, path, 0.9)  # exaggeration does not recompute
    assert len(calls) == 1
    assert b.t3.emotion_adv.item() == pytest.approx(0.9)
    assert torch.equal(a.gen["prompt_feat"], b.gen["prompt_feat"])
    a.gen["prompt_token"] = a.gen["prompt_token"].float()  # what upstream S3Gen does in place
    a.gen["prompt_feat"].zero_()
    c = conditioning.prepare_voice(model, path, 0.5)
    assert c.gen["prompt_token"].dtype == torch.long and c.gen["prompt_feat"].abs().sum() > 0
    same_bytes = tmp_path / "copy.flac"
    same_bytes.write_bytes(path.read_bytes())
    conditioning.prepare_voice(model, same_bytes, 0.5)  # keyed by content, not by name
    assert len(calls) == 1
    _voice(path, 1.5, sr=16000, seed=2)  # same name, new content
    conditioning.prepare_voice(model, path, 0.5)
    assert len(calls) == 2
    stand_in = types.SimpleNamespace(t3=model.t3, s3gen=model.s3gen, ve=model.ve, variant="original")
    conditioning.prepare_voice(stand_in, path, 0.5)  # anything with the four attributes works
    conditioning.prepare_voice(stand_in, path, 0.5)
    assert len(calls) == 3
    wav, sr = sf.read(path, dtype="float32")
    arr = conditioning.prepare_voice(model, (wav, sr), 0.5)  # an array works too
    assert len(calls) == 4
    assert torch.equal(arr.gen["prompt_token"], conditioning.prepare_voice(model, path, 0.5).gen["prompt_token"])


def test_engine_conditioning_bad_prompts(models, tmp_path):
    short = _voice(tmp_path / "short.wav", 3.0)
    with pytest.raises(CbxError, match=r"short.wav: audio is too short \(3.00 s; the minimum is 5 s\)"):
        conditioning.prepare_voice(models["turbo"], short)
    tiny = _voice(tmp_path / "tiny.wav", 0.4)
    with pytest.raises(CbxError, match="tiny.wav: audio is too short"):
        conditioning.prepare_voice(models["original"], tiny)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(48000, np.float32), 24000)
    with pytest.raises(CbxError, match="silent.wav: audio is silent"):
        conditioning.prepare_voice(models["original"], silent)
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"\xff\xfb" + b"\x00" * 50)
    with pytest.raises(CbxError, match="broken.mp3"):
        conditioning.prepare_voice(models["original"], broken)
    with pytest.raises(CbxError, match="not_there.wav"):
        conditioning.prepare_voice(models["original"], tmp_path / "not_there.wav")
    with pytest.raises(CbxError, match="voice must be"):
        conditioning.prepare_voice(models["original"], 42)


def test_engine_conditioning_constants_are_upstreams():
    from cbx.engine import upstream as up

    for variant, cls in (("original", up.ChatterboxTTS), ("turbo", up.ChatterboxTurboTTS),
                         ("multilingual", up.ChatterboxMultilingualTTS)):
        cfg = conditioning.VARIANTS[variant]
        assert cls.ENC_COND_LEN == cfg.enc_cond_seconds * conditioning.S3_SR
        assert cls.DEC_COND_LEN == conditioning.DEC_COND_SECONDS * conditioning.S3GEN_SR
    assert conditioning.VARIANTS["turbo"].norm_loudness_lufs == -27.0
    assert conditioning.VARIANTS["original"].norm_loudness_lufs is None
