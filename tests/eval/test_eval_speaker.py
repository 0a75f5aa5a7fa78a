"""Speaker similarity ranks every same-speaker pair above every different-speaker pair among the
offline set's real voices (prompts and held-out clips)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cbx.eval import assets
from cbx.eval.audio import read_audio
from cbx.eval.metrics.speaker import SPK_SR, cosine
from cbx.eval.types import Utterance


@pytest.fixture(scope="module")
def embeddings(speaker_group):
    out = []
    for voice in assets.VOICES:
        clips = [assets.voice_prompt(voice)] + assets.voice_clips(voice)
        for path, _ in clips:
            w, sr = read_audio(path)
            e = speaker_group.embed(Utterance("x", w, sr, "").audio_at(SPK_SR))
            assert e is not None, path
            out.append((voice, e))
    return out


def test_every_same_speaker_pair_beats_every_different_speaker_pair(embeddings):
    assert len({v for v, _ in embeddings}) >= 3
    same, diff = [], []
    for (va, ea), (vb, eb) in itertools.combinations(embeddings, 2):
        (same if va == vb else diff).append(cosine(ea, eb))
    print(f"speaker_sim same speaker {min(same):.3f}-{max(same):.3f} ({len(same)} pairs), "
          f"different {min(diff):.3f}-{max(diff):.3f} ({len(diff)} pairs)")
    assert min(same) > max(diff)


def test_score_uses_the_prompt_and_skips_without_one(speaker_group):
    p, _ = assets.voice_prompt("dickens")
    c, _ = assets.voice_clips("dickens")[0]
    o, _ = assets.voice_clips("sheila")[0]
    (pw, psr), (cw, csr), (ow, osr) = read_audio(p), read_audio(c), read_audio(o)
    same = speaker_group.score(Utterance("a", cw, csr, "", pw, psr))["speaker_sim"]
    other = speaker_group.score(Utterance("b", ow, osr, "", pw, psr))["speaker_sim"]
    assert same > other
    assert speaker_group.score(Utterance("c", cw, csr, "")) == {}
    silent = np.zeros(SPK_SR, dtype=np.float32)
    assert speaker_group.score(Utterance("d", silent, SPK_SR, "", pw, psr)) == {}


def test_one_thread_is_used_only_inside_the_encoder(speaker_group):
    import torch

    before = torch.get_num_threads()
    speaker_group.embed(np.random.default_rng(0).normal(0, 0.1, SPK_SR * 2).astype(np.float32))
    assert torch.get_num_threads() == before
