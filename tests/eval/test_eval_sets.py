"""Eval sets and real speech assets: contents, determinism, the content-hashed clip cache, and
clear errors for network sets that are not available (nothing downloads)."""

from __future__ import annotations


import numpy as np
import pytest

from cbx.errors import CbxError
from cbx.eval import assets
from cbx.eval.audio import read_audio
from cbx.eval.sets import EVAL_SETS, get_eval_set


def test_offline_set_has_real_voices_and_varied_sentences():
    s = get_eval_set("offline")
    assert (s.name, s.version) == ("offline", "1")
    assert len(s) >= 24
    assert len({it.voice for it in s.items}) >= 3
    assert len({it.id for it in s.items}) == len(s)
    kinds = {it.id.split("-")[1] for it in s.items}
    assert {"short", "long", "numbers", "abbrev", "question", "quote"} <= kinds
    for it in s.items:
        wav, sr = read_audio(it.prompt_path)
        assert 3.0 <= len(wav) / sr <= 10.0, it.prompt_path  # a usable zero-shot prompt length
        assert np.sqrt(np.mean(wav**2)) > 0.005, it.prompt_path  # not silence
        assert it.prompt_text
    assert [i.prompt_path for i in get_eval_set("offline").items] == [i.prompt_path for i in s.items]


def test_cut_cache_is_content_hashed_and_rebuilt_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CBX_CACHE_DIR", str(tmp_path))
    p, _ = assets.voice_prompt("sheila")
    assert p.parent == tmp_path / "clips"
    first = p.read_bytes()
    wav, sr = read_audio(p)
    assert abs(len(wav) / sr - (27.55 - 21.85)) < 1e-3
    assert abs(wav[0]) < 1e-3 and abs(wav[-1]) < 1e-3  # faded edges: no click at the cut
    p.unlink()
    assert assets.voice_prompt("sheila")[0] == p and p.read_bytes() == first
    other = assets.materialize(assets.Cut("pyannote:sample", "", 21.85, 27.50), "sheila-prompt")
    assert other != p  # a different cut gets a different name, never a stale file


def test_real_speech_clips_are_deterministic_and_transcribed():
    a = assets.real_speech_clips(20)
    assert a == assets.real_speech_clips(20)
    assert len(a) == 20 and len({p for p, _ in a}) == 20
    assert all(p.is_file() and t and "[" not in t for p, t in a)
    with pytest.raises(CbxError, match="only"):
        assets.real_speech_clips(10_000)


def test_unknown_names_are_clear_errors():
    with pytest.raises(CbxError, match="valid choices"):
        get_eval_set("nope")
    with pytest.raises(CbxError, match="valid choices"):
        assets.voice_prompt("nobody")
    with pytest.raises(CbxError, match="unknown speech source"):
        assets.source_path("youtube:xyz")


def test_network_sets_fail_clearly_without_their_data(monkeypatch, tmp_path):
    monkeypatch.delenv("CBX_SEED_TTS_DIR", raising=False)
    monkeypatch.delenv("CBX_LIBRISPEECH_PC_LIST", raising=False)
    with pytest.raises(CbxError, match="CBX_SEED_TTS_DIR"):
        get_eval_set("seed-tts-en")
    with pytest.raises(CbxError, match="meta.lst"):
        get_eval_set("seed-tts-en", root=tmp_path)
    with pytest.raises(CbxError, match="pair list"):
        get_eval_set("librispeech-pc")
    assert set(EVAL_SETS) == {"offline", "librispeech-pc", "seed-tts-en"}


def test_seed_tts_layout_is_read_from_a_local_folder(tmp_path):
    en = tmp_path / "en"
    en.mkdir()
    (en / "meta.lst").write_text(
        "u1|prompt one|prompt-wavs/u1.wav|Target one.\nu2|prompt two|prompt-wavs/u2.wav|Target two?\n", encoding="utf-8"
    )
    s = get_eval_set("seed-tts-en", root=tmp_path)
    assert [(i.id, i.text, i.prompt_text) for i in s.items] == [("u1", "Target one.", "prompt one"), ("u2", "Target two?", "prompt two")]
    assert s.items[0].prompt_path == en / "prompt-wavs" / "u1.wav"
    (en / "meta.lst").write_text("u1|only two fields\n", encoding="utf-8")
    with pytest.raises(CbxError, match=r"meta.lst:1"):
        get_eval_set("seed-tts-en", root=tmp_path)


def test_librispeech_pc_list_is_validated_before_any_download(tmp_path):
    lst = tmp_path / "pairs.lst"
    lst.write_text("a\tb\tc\n", encoding="utf-8")
    with pytest.raises(CbxError, match=r"pairs.lst:1"):
        get_eval_set("librispeech-pc", pair_list=lst)
