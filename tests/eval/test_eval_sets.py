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


def _manifest(tmp_path, lines):
    import json

    p = tmp_path / "set" / "my.jsonl"
    p.parent.mkdir(exist_ok=True)
    p.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines), encoding="utf-8")
    return p


def test_own_jsonl_set_paths_relative_to_it_and_versioned_by_content(tmp_path):
    import shutil

    (p1, t1), (p2, _) = assets.real_speech_clips(2)
    d = tmp_path / "set" / "voices"
    d.mkdir(parents=True)
    shutil.copy(p1, d / "a.wav")
    shutil.copy(p2, d / "b.wav")
    m = _manifest(tmp_path, [
        {"prompt": "voices/a.wav", "text": "Hello there.", "prompt_text": t1},
        "",
        {"prompt": "voices/b.wav", "text": "Second one.", "id": "second"},
    ])
    s = get_eval_set(str(m))
    assert s.name == "my.jsonl" and len(s) == 2
    assert [it.id for it in s.items] == ["line1", "second"]
    assert s.items[0].prompt_path == (d / "a.wav").resolve() and s.items[0].prompt_text == t1
    v1 = s.version
    assert get_eval_set(str(m)).version == v1  # deterministic
    shutil.copy(p1, d / "b.wav")  # same lines, another recording under the same name
    assert get_eval_set(str(m)).version != v1
    # moving the whole set elsewhere keeps its version (content, not location)
    shutil.copytree(tmp_path / "set", tmp_path / "moved")
    assert get_eval_set(str(tmp_path / "moved" / "my.jsonl")).version == get_eval_set(str(m)).version


def test_own_jsonl_set_reports_every_bad_line_by_number(tmp_path):
    (p1, _), = assets.real_speech_clips(1)
    import shutil

    (tmp_path / "set").mkdir()
    shutil.copy(p1, tmp_path / "set" / "a.wav")
    m = _manifest(tmp_path, [
        {"prompt": "a.wav", "text": "fine"},
        "{not json",
        {"prompt": "missing.wav", "text": "x"},
        {"prompt": "a.wav"},
        {"prompt": "a.wav", "text": "y", "speaker": "z"},
    ])
    with pytest.raises(CbxError) as e:
        get_eval_set(str(m))
    msg = str(e.value)
    assert "4 bad line(s)" in msg and "line 2: not valid JSON" in msg and "line 3: prompt file 'missing.wav' not found" in msg
    assert "line 4: 'text'" in msg and "and 1 more" in msg
    with pytest.raises(CbxError, match="manifest not found"):
        get_eval_set(str(tmp_path / "nope.jsonl"))


def test_librispeech_pc_reads_only_the_test_clean_files(tmp_path, monkeypatch):
    """A local stand-in in the Hub dataset's layout: test-clean is a real parquet file, every
    other split is a file that cannot be read. Loading the set succeeds, so no other split
    was opened."""
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    from cbx.eval import sets

    (p1, t1), = assets.real_speech_clips(1)
    wav, sr = read_audio(p1)
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="FLAC")
    repo = tmp_path / "librispeech_asr"
    (repo / "clean" / "test").mkdir(parents=True)
    table = pa.table({
        "id": ["1-2-0001", "1-2-0002"],
        "text": ["PROMPT ONE", "TARGET TWO"],
        "audio": [{"bytes": buf.getvalue(), "path": "a.flac"}, {"bytes": buf.getvalue(), "path": "b.flac"}],
    })
    pq.write_table(table, repo / "clean" / "test" / "0000.parquet")
    for split in ("train.100", "train.360", "validation"):
        (repo / "clean" / split).mkdir(parents=True)
        (repo / "clean" / split / "0000.parquet").write_bytes(b"not a parquet file: reading it fails")
    pairs = tmp_path / "pairs.lst"
    pairs.write_text("1-2-0001\t5.0\tPrompt one.\t1-2-0002\t6.0\tTarget two.\n")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    s = sets.get_eval_set("librispeech-pc", pair_list=str(pairs), cache=str(tmp_path / "cache"), repo=str(repo))
    assert [(it.id, it.text, it.prompt_text) for it in s.items] == [("1-2-0002", "Target two.", "Prompt one.")]
    got, gsr = read_audio(s.items[0].prompt_path)
    assert gsr == sr and np.allclose(got, wav, atol=1e-4)
    # the stand-in's other splits really are unreadable: touching one would have failed
    with pytest.raises(Exception):
        datasets.load_dataset(str(repo), data_files={"train": "clean/train.100/*.parquet"}, split="train",
                              cache_dir=str(tmp_path / "hf-cache2"))
