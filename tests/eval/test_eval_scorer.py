"""The scorer end to end on real speech: rows and aggregate in the versioned schema, bad lines
reported by number while the rest is scored, order independence, exit statuses, models loaded
once."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cbx.cli import main
from cbx.errors import CbxError
from cbx.eval import assets, schema
from cbx.eval.scorer import Scorer, get_group, score_manifest

OFFLINE_METRICS = "asr,speaker,mos,artifacts"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A manifest folder with real clips copied in, addressed by relative paths."""
    d = tmp_path_factory.mktemp("score")
    (d / "wavs").mkdir()
    good = []
    prompt, _ = assets.voice_prompt("allison")
    shutil.copy(prompt, d / "wavs" / "prompt.wav")
    for i, (p, text) in enumerate(assets.real_speech_clips(3)):
        shutil.copy(p, d / "wavs" / f"u{i}.wav")
        good.append({"id": f"u{i}", "audio": f"wavs/u{i}.wav", "text": text, "prompt": "wavs/prompt.wav",
                     "timings": {"t3": 0.2 * (i + 1), "total": 0.25 * (i + 1)}, "speech_tokens": 50})
    clip, text = assets.voice_clips("dickens")[0]
    dprompt, _ = assets.voice_prompt("dickens")
    shutil.copy(clip, d / "wavs" / "d.wav")
    shutil.copy(dprompt, d / "wavs" / "dprompt.wav")
    good.append({"id": "d", "audio": "wavs/d.wav", "text": text, "prompt": "wavs/dprompt.wav"})
    import soundfile as sf

    sf.write(str(d / "wavs" / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)  # a valid wav, no samples
    (d / "wavs" / "junk.wav").write_text("not audio")
    return d, good


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")


def test_scores_good_lines_and_reports_bad_ones_by_line(workdir, capsys):
    d, good = workdir
    bad = [
        "{not json",
        {"audio": "wavs/u0.wav"},  # no text
        {"audio": "wavs/missing.wav", "text": "x", "prompt": "wavs/prompt.wav"},
        {"audio": "wavs/empty.wav", "text": "x"},
        {"audio": "wavs/junk.wav", "text": "x"},
        {"id": "u0", "audio": "wavs/u1.wav", "text": "duplicate id"},
    ]
    lines = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3], bad[5]]
    _write(d / "m.jsonl", lines)
    rc = main(["score", "--manifest", str(d / "m.jsonl"), "--out", str(d / "out"), "--metrics", OFFLINE_METRICS, "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0
    agg = schema.load_aggregate(d / "out")
    rows = schema.load_rows(d / "out")
    assert [r["id"] for r in rows] == ["u0", "u1", "u2", "d"]
    assert [r["line"] for r in rows] == [1, 3, 6, 9]
    assert [s["line"] for s in agg["skipped"]] == [2, 4, 5, 7, 8, 10]
    assert (agg["n_lines"], agg["n_scored"], agg["n_skipped"]) == (10, 4, 6)
    reasons = {s["line"]: s["reason"] for s in agg["skipped"]}
    assert "not found" in reasons[5] and "no samples" in reasons[7] and "cannot read" in reasons[8]
    assert "text" in reasons[4] and "duplicate" in reasons[10]
    for n in (2, 4, 5, 7, 8, 10):
        assert f"m.jsonl:{n}: skipped" in cap.err
    assert "skipped 6" in cap.out and "speaker_sim" in cap.out

    # every metric under its registered name, with direction, version and variant
    m = agg["metrics"]
    for name in ("wer", "cer", "wer_corpus", "speaker_sim", "mos", "loudness_lufs"):
        assert name in m and m[name]["n"] >= 4 and m[name]["version"]
    assert m["wer"]["higher_is_better"] is False and m["speaker_sim"]["higher_is_better"] is True
    assert m["wer"]["variant"].startswith("whisper:") and m["mos"]["variant"].startswith("dnsmos")
    # corpus WER is errors over words, not the mean of ratios
    errs = sum(r["details"]["wer_errors"] for r in rows)
    words = sum(r["details"]["wer_ref_words"] for r in rows)
    assert m["wer_corpus"]["value"] == pytest.approx(errs / words)
    assert m["wer"]["value"] == pytest.approx(np.mean([r["metrics"]["wer"] for r in rows]))
    lo, hi = m["mos"]["ci95"]
    assert lo <= m["mos"]["mean"] <= hi
    assert all(r["metrics"]["wer"] <= 0.2 for r in rows)  # real speech with its own transcripts
    assert all(r["metrics"]["speaker_sim"] > 0.75 for r in rows)  # each clip against its own speaker
    assert all(r["details"]["asr_text"] for r in rows)


def test_order_of_the_manifest_does_not_change_any_score(workdir):
    d, good = workdir
    _write(d / "a.jsonl", good)
    _write(d / "b.jsonl", good[::-1])
    a = score_manifest(d / "a.jsonl", d / "oa", metrics=OFFLINE_METRICS.split(","))
    b = score_manifest(d / "b.jsonl", d / "ob", metrics=OFFLINE_METRICS.split(","))
    ra = {r["id"]: {k: v for k, v in r.items() if k != "line"} for r in schema.load_rows(d / "oa")}
    rb = {r["id"]: {k: v for k, v in r.items() if k != "line"} for r in schema.load_rows(d / "ob")}
    assert ra == rb
    assert a["metrics"] == b["metrics"]  # including the seeded bootstrap intervals


def test_nothing_scorable_exits_2_and_writes_nothing(workdir, capsys):
    d, _ = workdir
    _write(d / "bad.jsonl", ["[1, 2]", {"audio": "wavs/missing.wav", "text": "x"}])
    rc = main(["score", "--manifest", str(d / "bad.jsonl"), "--out", str(d / "obad"), "--metrics", "wer", "--no-progress"])
    assert rc == 2
    assert "nothing could be scored" in capsys.readouterr().err
    assert not (d / "obad").exists()
    with pytest.raises(CbxError, match="manifest not found"):
        score_manifest(d / "nope.jsonl", d / "o2")


def test_unknown_metric_is_rejected_before_work(workdir, capsys):
    d, good = workdir
    _write(d / "one.jsonl", good[:1])
    assert main(["score", "--manifest", str(d / "one.jsonl"), "--out", str(d / "o3"), "--metrics", "wer,blah"]) == 2
    assert "unknown metric 'blah'" in capsys.readouterr().err
    assert not (d / "o3").exists()


def test_metric_subset_and_eval_set_are_recorded(workdir):
    d, good = workdir
    _write(d / "one.jsonl", good[:2])
    agg = score_manifest(d / "one.jsonl", d / "o4", metrics=["wer", "rtf_total", "speech_tokens_per_s"],
                         eval_set={"name": "offline", "version": "1"})
    assert set(agg["metrics"]) == {"wer", "rtf_total", "speech_tokens_per_s"}
    assert agg["eval_set"] == {"name": "offline", "version": "1"}
    rows = schema.load_rows(d / "o4")
    assert set(rows[0]["metrics"]) == {"wer", "rtf_total", "speech_tokens_per_s"}
    assert agg["metrics"]["speech_tokens_per_s"]["n"] == 2


def test_models_load_once_per_process():
    a, b = Scorer(["wer", "speaker_sim", "mos"]), Scorer(["asr"])
    assert a.groups["asr"] is b.groups["asr"] is get_group("asr", a.config.asr)


def test_asr_lane_beside_the_others_gives_the_same_scores(workdir):
    import dataclasses

    from cbx.eval.scorer import ManifestEntry, ScorerConfig, _AudioCache, _utterance

    d, good = workdir
    cfg = ScorerConfig()
    par = Scorer(["asr", "speaker", "mos"], cfg)
    seq = Scorer(["asr", "speaker", "mos"], dataclasses.replace(cfg, parallel_asr=False))
    for k, line in enumerate(good[:2]):
        a = par.score(_utterance(ManifestEntry(k + 1, line), d, _AudioCache()))
        b = seq.score(_utterance(ManifestEntry(k + 1, line), d, _AudioCache()))
        assert a == b and set(a[0]) == {"wer", "cer", "wer_corpus", "speaker_sim", "mos"}


def test_bad_model_choices_are_clear_errors(tmp_path):
    from cbx.eval.metrics.asr import AsrConfig, AsrGroup
    from cbx.eval.metrics.mos import MosConfig, MosGroup
    from cbx.eval.metrics.speaker import SpeakerConfig, SpeakerGroup

    with pytest.raises(CbxError, match="cannot load ASR model"):
        AsrGroup(AsrConfig(model=str(tmp_path / "no-such-model"))).load()
    with pytest.raises(CbxError, match="valid choices"):
        SpeakerGroup(SpeakerConfig(backend="ecapa"))
    with pytest.raises(CbxError, match="valid choices"):
        MosGroup(MosConfig(backend="utmos"))


def test_an_interrupted_run_resumes_without_rescoring(workdir, monkeypatch):
    """A crash on the third utterance keeps the two scored before it; the rerun scores only the
    rest, and its results equal an uninterrupted run's. A changed wav is scored again."""
    import os

    from cbx.eval.scorer import PARTIAL_FILE

    d, good = workdir
    _write(d / "r.jsonl", good)
    metrics = ["wer", "speaker_sim", "clip_ratio"]
    clean = score_manifest(d / "r.jsonl", d / "r_clean", metrics=metrics)

    group = get_group("artifacts")
    real = group.score
    seen: list[str] = []

    def crash_on_third(utt):
        seen.append(utt.id)
        if len(seen) == 3:
            raise KeyboardInterrupt  # what a ^C or a killed job looks like from here
        return real(utt)

    monkeypatch.setattr(group, "score", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        score_manifest(d / "r.jsonl", d / "r_out", metrics=metrics)
    assert not (d / "r_out" / schema.ROWS_FILE).exists()
    assert len((d / "r_out" / PARTIAL_FILE).read_text().splitlines()) == 2

    seen.clear()
    monkeypatch.setattr(group, "score", lambda utt: (seen.append(utt.id), real(utt))[1])
    said: list[str] = []
    resumed = score_manifest(d / "r.jsonl", d / "r_out", metrics=metrics, log=said.append)
    assert seen == [g["id"] for g in good[2:]]
    assert any("resuming: 2 of 4" in m for m in said)
    assert resumed["metrics"] == clean["metrics"]
    assert schema.load_rows(d / "r_out") == schema.load_rows(d / "r_clean")
    assert not (d / "r_out" / PARTIAL_FILE).exists()

    # a finished run leaves no progress file: scoring again redoes everything
    seen.clear()
    score_manifest(d / "r.jsonl", d / "r_out", metrics=metrics)
    assert len(seen) == 4

    # interrupted again, then one wav is rewritten: only that one is not reused
    seen.clear()
    monkeypatch.setattr(group, "score", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        score_manifest(d / "r.jsonl", d / "r_out", metrics=metrics)
    wav = d / good[0]["audio"]
    st = wav.stat()
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    seen.clear()
    monkeypatch.setattr(group, "score", lambda utt: (seen.append(utt.id), real(utt))[1])
    score_manifest(d / "r.jsonl", d / "r_out", metrics=metrics)
    assert seen == [good[0]["id"]] + [g["id"] for g in good[2:]]


def test_runtime_settings_change_speed_not_scores(workdir, monkeypatch):
    """The scoring run's thread and allocator settings (cbx.eval.runtime) leave every number as
    it is without them."""
    import contextlib

    from cbx.eval import scorer as scorer_mod

    d, good = workdir
    _write(d / "rt.jsonl", good)
    metrics = OFFLINE_METRICS.split(",")
    with_settings = score_manifest(d / "rt.jsonl", d / "rt_on", metrics=metrics)
    monkeypatch.setattr(scorer_mod, "scoring_runtime", contextlib.nullcontext)
    without = score_manifest(d / "rt.jsonl", d / "rt_off", metrics=metrics)
    assert schema.load_rows(d / "rt_on") == schema.load_rows(d / "rt_off")
    assert with_settings["metrics"] == without["metrics"]
