"""Streaming synthesis (:mod:`cbx.engine.stream`) on the tiny model.

Bounds (mean |log-mel difference|, ``cbx.eval.fidelity.mel_l1``), measured here:

* the vocoder joins alone (the same mel vocoded in 5 pieces vs whole, HiFT's random source
  switched off so that only the joins differ): 0.023; planted fault (no left context, no hold
  back, no crossfade): 0.126. Bound 0.05.
* the whole stream vs the whole path given the same tokens and noise: 0.26 (the tiny random
  flow is chaotic: early frames rendered before later tokens existed differ about as much as
  two noise draws, 0.23). Bound 0.35. A stream of one chunk equals the whole path exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cbx.engine import s3gen_batch as sb
from cbx.engine import stream as st
from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer
from cbx.eval.fidelity import mel_l1
from cbx.eval.metrics.artifacts import click_positions

SR = 24_000
TEXT = "Hello there, this is a test."


@pytest.fixture(scope="module")
def quiet_model():
    """The tiny model with HiFT's sine/noise source switched off: the vocoder is deterministic,
    so streamed and whole audio differ only where streaming makes them differ."""
    from cbx.engine.tiny import build_tiny

    model = build_tiny("original", 0)
    src = model.s3gen.mel2wav.m_source
    src.sine_amp = src.l_sin_gen.sine_amp = src.l_sin_gen.noise_std = 0.0
    return model


def _settings(**kw):
    return SynthSettings(**{**dict(force_tokens=60, max_speech_tokens=60, watermark=False, seed=3, cfm_steps=2), **kw})


def _gaps(wav: np.ndarray, ms: float = 5.0) -> int:
    """Runs of exact zeros at least ``ms`` long (a dropped piece would leave one)."""
    n = int(ms * SR / 1000)
    zero = np.concatenate([[0], (wav == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    return int(sum((b - a) >= n for a, b in zip(edges[::2], edges[1::2])))


def _vocode_in_pieces(model, mel, cuts):
    state = st._RowState(torch.zeros(80, 1), seed=3)
    pieces = [st._vocode_new(model, state, mel[:, :c], final=False) for c in cuts]
    pieces.append(st._vocode_new(model, state, mel, final=True))
    return np.concatenate(pieces)


def test_vocoder_pieces_join_like_the_whole(quiet_model, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6561, (60,), generator=g)
    with torch.inference_mode():
        mel = sb.synthesize_mels(quiet_model, [tokens], [quiet_model.builtin_conds], [3], n_steps=2)[0]
        whole = sb.vocode(quiet_model, [mel], seeds=[3])[0]
        cuts = [20, 50, 80, 110]
        streamed = _vocode_in_pieces(quiet_model, mel, cuts)
        assert streamed.shape == whole.shape
        assert mel_l1(whole, streamed, SR) < 0.05
        assert len(click_positions(streamed, SR)) <= len(click_positions(whole, SR))
        assert _gaps(streamed) <= _gaps(whole)  # (upstream silences the first 20 ms of both)
        # planted fault: pieces vocoded without context, hold-back or crossfade
        monkeypatch.setattr(st, "CONTEXT_FRAMES", 0)
        monkeypatch.setattr(st, "HOLD_FRAMES", 0)
        monkeypatch.setattr(st, "CROSSFADE_SAMPLES", 0)
        assert mel_l1(whole, _vocode_in_pieces(quiet_model, mel, cuts), SR) > 0.05


def test_stream_against_the_whole_path_with_the_same_tokens_and_noise(quiet_model):
    syn = Synthesizer(quiet_model)
    s = _settings()
    req = [SynthRequest(TEXT, None, id="a")]
    pieces = list(syn.stream(req, s, first_tokens=8, chunk_tokens=16))
    assert len(pieces) >= 3 and pieces[-1].final and not any(p.final for p in pieces[:-1])
    assert pieces[0].t <= pieces[-1].t
    streamed = np.concatenate([p.wav for p in pieces])
    whole = syn.synthesize(req, s, progress=False).results[0]
    tokens = syn._s3gen_tokens(torch.as_tensor(whole.speech_tokens))
    with torch.inference_mode():  # the whole path, given the stream's noise
        inputs = sb.cfm_inputs(quiet_model, [tokens], [quiet_model.builtin_conds])
        noise = st.row_noise(3, inputs.prompt_lens[0], 60)[None, :, : inputs.total_lens[0]]
        mel = sb.solve_cfm(quiet_model.s3gen.flow.decoder.estimator, inputs, noise, 2,
                           quiet_model.s3gen.flow.decoder.inference_cfg_rate, False)
        reference = sb.vocode(quiet_model, sb.crop_mels(mel, inputs), seeds=[3])[0]
    assert streamed.shape == reference.shape == whole.wav.shape
    assert mel_l1(reference, streamed, SR) < 0.35
    assert len(click_positions(streamed, SR)) <= len(click_positions(reference, SR))
    assert _gaps(streamed) <= _gaps(reference)
    # one chunk (no pause before the end): exactly the whole path with that noise
    one = np.concatenate([p.wav for p in syn.stream(req, s, first_tokens=1000, chunk_tokens=1000)])
    np.testing.assert_allclose(one, reference, atol=1e-4)


def test_batched_stream_gives_each_request_its_own_pieces(tiny_model):
    syn = Synthesizer(tiny_model)
    s = _settings(force_tokens=30, max_speech_tokens=30)
    reqs = [SynthRequest(TEXT, None, id="a"), SynthRequest("Two sentences here. And another one!", None, id="b")]
    pieces = list(syn.stream(reqs, s, first_tokens=6, chunk_tokens=12))
    for i, req in enumerate(reqs):
        mine = [p for p in pieces if p.request == i]
        assert all(p.id == req.id for p in mine)
        assert len(mine) >= 2 and mine[-1].final and not any(p.final for p in mine[:-1])
        alone = list(syn.stream([req], s, first_tokens=6, chunk_tokens=12))
        np.testing.assert_allclose(np.concatenate([p.wav for p in mine]), np.concatenate([p.wav for p in alone]),
                                   atol=1e-5)
    # the two-sentence request plays its sentences one after the other (30 tokens = 1.2 s each)
    assert sum(p.wav.size for p in pieces if p.request == 1) == 2 * 30 * 2 * st.SAMPLES_PER_FRAME


def test_generate_stream_ends_with_what_generate_returns(tiny_model):
    from cbx.engine import t3_decode as td

    rows = [td.T3Row([1, 5, 9, 2], tiny_model.builtin_conds.t3, 0), td.T3Row([1, 7, 2], tiny_model.builtin_conds.t3, 1)]
    ds = td.DecodeSettings(max_new_tokens=40)
    parts = list(td.generate_stream(tiny_model, rows, ds, chunk_steps=[5, 15]))
    whole = td.generate(tiny_model, rows, ds)
    assert [p.final for p in parts][-1] and not any(p.final for p in parts[:-1])
    for a, b in zip(parts[-1].tokens, whole.tokens):
        assert torch.equal(a, b)
    for part in parts[:-1]:  # each partial yield is a prefix of the final tokens
        for a, b in zip(part.tokens, whole.tokens):
            assert torch.equal(a, b[: a.numel()])


def test_first_piece_holds_what_the_first_chunk_determines(quiet_model):
    """The first pause emits first_piece_samples(first) samples (60 ms at the default 8 tokens,
    20 ms at 7); below 7 it emits nothing and the first audio comes with the next pause."""
    syn = Synthesizer(quiet_model)
    s = _settings(force_tokens=40, max_speech_tokens=40)
    req = [SynthRequest(TEXT, None, id="a")]
    assert st.FIRST_CHUNK_TOKENS == 8 and st.first_piece_samples(8) == 3 * st.SAMPLES_PER_FRAME
    assert st.first_piece_samples(7) == st.SAMPLES_PER_FRAME and st.first_piece_samples(6) == 0
    for first in (8, 7):
        pieces = [p for p in syn.stream(req, s, first_tokens=first, chunk_tokens=100)]
        assert len(pieces) == 2 and not pieces[0].final
        assert pieces[0].wav.size == st.first_piece_samples(first)
    late = [p for p in syn.stream(req, s, first_tokens=6, chunk_tokens=100)]
    assert len(late) == 1 and late[0].final  # nothing at the first pause: one piece, at the end


def test_bad_chunk_sizes_are_refused(tiny_model):
    from cbx.errors import CbxError

    with pytest.raises(CbxError, match="chunk"):
        Synthesizer(tiny_model).stream([SynthRequest(TEXT, None)], _settings(), first_tokens=0)


def test_streamed_pieces_are_watermarked_when_asked(tiny_model):
    s = _settings(force_tokens=30, max_speech_tokens=30, watermark=True)
    marked = list(Synthesizer(tiny_model).stream([SynthRequest(TEXT, None)], s, first_tokens=6, chunk_tokens=12))
    plain = list(Synthesizer(tiny_model).stream([SynthRequest(TEXT, None)], _settings(force_tokens=30, max_speech_tokens=30),
                                                first_tokens=6, chunk_tokens=12))
    a, b = np.concatenate([p.wav for p in marked]), np.concatenate([p.wav for p in plain])
    assert a.shape == b.shape and a.dtype == np.float32 and not np.array_equal(a, b)


def test_multilingual_v3_cuts_the_last_tokens_audio_whole_streamed_and_decoded():
    """Upstream's V3 (mtl_tts.py on main) drops the audio of the token emitted just before EOS:
    the whole path, the stream and the decoder alone all end one token (960 samples) early,
    and are otherwise what the same model without the cut makes."""
    from cbx.engine.tiny import build_tiny

    v3 = build_tiny("multilingual-v3", 0)
    assert v3.meta["trim_last_token"] is True and "trim_last_token" not in build_tiny("multilingual", 0).meta
    plain = copy.copy(v3)
    plain.meta = {k: v for k, v in v3.meta.items() if k != "trim_last_token"}
    s = _settings(force_tokens=30, max_speech_tokens=30, language_id="fr")
    req = [SynthRequest("Bonjour, ceci est un essai.", None, id="a")]
    cut = Synthesizer(v3).synthesize(req, s, progress=False).results[0]
    full = Synthesizer(plain).synthesize(req, s, progress=False).results[0]
    n = len(cut.speech_tokens)
    assert n == 30 and len(full.wav) == n * sb.SAMPLES_PER_TOKEN
    assert len(cut.wav) == (n - 1) * sb.SAMPLES_PER_TOKEN
    np.testing.assert_array_equal(cut.wav, full.wav[: len(cut.wav)])
    streamed = np.concatenate([p.wav for p in Synthesizer(v3).stream(req, s, first_tokens=8, chunk_tokens=16)])
    assert len(streamed) == len(cut.wav)
    decoded = Synthesizer(v3).decode_tokens(None, cut.speech_tokens, s)
    assert len(decoded) == len(cut.wav)
    np.testing.assert_array_equal(sb.trim_last_token(v3, np.ones(960, np.float32), 1), np.ones(960, np.float32))
