"""Runner logic with fake engine/eval: baseline pairing and reuse, resume, failure marking,
two processes on one results folder."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from cbx.lab import store
from cbx.lab.runner import Runner
from cbx.lab.schema import Experiment, Step, EvalConfig
from lab_fakes import FakeBackend


def _exp(name="int", gain=0.5, nan=False, **kw):
    steps = (Step("lab_test_gain", {"gain": gain, "nan": nan}),) if gain is not None else ()
    return Experiment(name=name, model="tiny", steps=steps, synth={"batch_size": 2}, eval=EvalConfig(set="fake", samples=2, warmup=0), **kw)


def test_compressed_run_is_paired_with_a_baseline_it_runs_once(tmp_path):
    be = FakeBackend(n_items=4)
    r = Runner(tmp_path, backend=be, progress=False)
    out = r.run(_exp())
    rec = out.record
    assert rec["status"] == "done" and not out.reused
    base = store.ResultsDir(tmp_path).record(rec["baseline_run"])
    assert base["status"] == "done" and base["is_baseline"] and base["config"]["steps"] == []
    # baseline + compressed: each utterance synthesized exactly once per run
    assert sorted(be.synthesized) == sorted([f"utt{i}" for i in range(4)] * 2)
    # the scorer saw both decoders' outputs on the baseline's tokens (aligned fidelity), per utterance
    last = be.scored[-1]
    assert all(m["reference_audio"] == f"aligned_ref/{m['id']}.wav" and m["fidelity_audio"] == f"aligned/{m['id']}.wav" for m in last)
    scored = [json.loads(x) for x in (out.run_dir / "score" / "utterances.jsonl").read_text().splitlines()]
    assert all(r["details"]["ref_corr"] == pytest.approx(1.0, abs=1e-5) for r in scored)  # gain only: same shape
    assert all(0 <= m["t3_top1_agreement"] <= 1 for m in last)
    for k in ("git", "packages", "hardware", "hardware_id", "eval_set", "metric_versions", "seed", "config"):
        assert k in rec
    assert rec["config"]["steps"] == [{"transform": "lab_test_gain", "params": {"gain": 0.5, "nan": False}}]
    assert (out.run_dir / "checkpoint" / "manifest.json").is_file()
    assert len(rec["samples"]) == 2 and all((out.run_dir / s).is_file() for s in rec["samples"])

    # a second compressed experiment reuses the baseline; re-running reuses everything
    n = len(be.synthesized)
    out2 = r.run(_exp(name="int-b", gain=0.25))
    assert out2.record["baseline_run"] == rec["baseline_run"] and len(be.synthesized) == n + 4
    again = r.run(_exp())
    assert again.reused and len(be.synthesized) == n + 4


def test_interrupted_run_resumes_without_redoing_finished_utterances(tmp_path):
    be = FakeBackend(n_items=5, fail_after=3)
    exp = _exp(gain=None, name="base")
    with pytest.raises(RuntimeError, match="simulated crash"):
        Runner(tmp_path, backend=be, progress=False).run(exp)
    (run_dir,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    rec = json.loads((run_dir / "run.json").read_text())
    # the record tells the truth: failed, why, and that the next start resumes it
    assert rec["status"] == "failed" and rec["resumable"] and rec["failure"] == "RuntimeError: simulated crash"
    assert rec["failure_kind"] == "error" and rec["attempts"] == 1
    assert len(list((run_dir / "synth").glob("*.json"))) == 2  # one full batch of 2 was written
    done_before = set(be.synthesized[:2])
    be.fail_after = None
    be.synthesized.clear()
    out = Runner(tmp_path, backend=be, progress=False).run(exp)
    assert out.record["status"] == "done" and out.run_dir == run_dir and out.record["attempts"] == 2
    assert "failure" not in out.record and "resumable" not in out.record
    assert set(be.synthesized) == {f"utt{i}" for i in range(5)} - done_before


@pytest.mark.parametrize("gain,nan,kind", [(0.0, False, "silent"), (1.0, True, "nan")])
def test_nan_or_silent_outputs_mark_the_run_failed_and_unscored(tmp_path, gain, nan, kind):
    be = FakeBackend(n_items=3)
    out = Runner(tmp_path, backend=be, progress=False).run(_exp(gain=gain, nan=nan))
    rec = out.record
    assert rec["status"] == "failed" and kind in rec["failure"] and "3 of 3" in rec["failure"]
    assert "aggregate" not in rec and len(be.scored) == 1  # only the baseline was scored
    assert store.ResultsDir(tmp_path).find_finished(rec["config_key"]) is None


def _worker(path, q, explicit_baseline):
    be = FakeBackend(n_items=4)
    r = Runner(path, backend=be, progress=False)
    if explicit_baseline:  # same measurement as the other process's automatic baseline
        r.run(_exp(name="my-baseline", gain=None))
    out = r.run(_exp())
    q.put((out.run_id, out.reused, len(be.synthesized)))


def test_two_processes_on_one_results_folder_do_not_corrupt_it(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tmp_path, q, i == 0)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    res = [q.get(timeout=5) for _ in procs]
    assert res[0][0] == res[1][0]
    # the work was done once in total: 8 syntheses (baseline + compressed) across both processes
    assert sum(n for _, _, n in res) == 8
    recs = store.ResultsDir(tmp_path).records()
    assert len(recs) == 2 and all(r["status"] == "done" for _, r in recs)
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_explicit_baseline_is_the_one_compressed_runs_pair_with(tmp_path):
    be = FakeBackend(n_items=2)
    r = Runner(tmp_path, backend=be, progress=False)
    base = r.run(_exp(name="my-baseline", gain=None))
    out = r.run(_exp())
    assert out.record["baseline_run"] == base.run_id
    assert len(be.synthesized) == 4  # the baseline was not synthesized a second time
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted([base.run_id, out.run_id])


def test_warmup_utterances_are_synthesized_first_and_discarded(tmp_path):
    be = FakeBackend(n_items=3)
    exp = Experiment(name="w", synth={"batch_size": 2}, eval=EvalConfig(set="fake", warmup=1))
    out = Runner(tmp_path, backend=be, progress=False).run(exp)
    # the first batch as warm-up, again under the working-memory measurement, then every batch timed
    assert be.synthesized == ["utt0", "utt1", "utt0", "utt1", "utt0", "utt1", "utt2"]
    assert be.resets == 2 and out.record["memory"] == {"weights_bytes": 1024, "work_bytes": 2000, "total_bytes": 3024, "kind": "fake"}
    assert len(list((out.run_dir / "synth").glob("*.json"))) == 3
    # a resumed run with nothing left to do does not warm up
    again = Runner(tmp_path, backend=be, progress=False).run(exp, force=False)
    assert again.reused and len(be.synthesized) == 7


def test_backend_builds_one_synthesizer_per_model_with_its_casts_outside_timed_stages(tiny_copy, monkeypatch):
    """Real engine, tiny model: the bf16 cast copies are made once, before any timed stage."""
    import copy as copy_mod

    from cbx.engine import synth as S
    from cbx.engine.timing import StageTimer
    from cbx.lab.runner import Backend, EvalItemView

    model = tiny_copy("original")
    b = Backend()
    settings = S.SynthSettings(dtype="bf16", max_speech_tokens=6, cfm_steps=1, watermark=False, batch_size=1)
    items = [EvalItemView("a", "First one.", None), EvalItemView("b", "Second one.", None)]
    copies_in_stage = []
    real_deepcopy, real_stage = copy_mod.deepcopy, StageTimer.stage
    in_stage = []

    def stage(self, name):
        in_stage.append(name)
        cm = real_stage(self, name)

        class Wrap:
            def __enter__(s):
                return cm.__enter__()

            def __exit__(s, *exc):
                in_stage.pop()
                return cm.__exit__(*exc)
        return Wrap()

    def deepcopy(obj, *a, **k):
        if in_stage:
            copies_in_stage.append(in_stage[-1])
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(StageTimer, "stage", stage)
    monkeypatch.setattr(copy_mod, "deepcopy", deepcopy)
    out1 = b.synthesize(model, items[:1], settings)
    syn = b._synth
    out2 = b.synthesize(model, items[1:], settings)
    assert b._synth is syn and len(syn._casts) == 2  # T3 and the estimator, cast once
    assert copies_in_stage == []
    assert out1.utterances[0].id == "a" and out2.utterances[0].id == "b"
    b.release(model)
    assert b._synth is None

def _exp_f(name="int", gain=0.5, **ev):
    steps = (Step("lab_test_gain", {"gain": gain}),) if gain is not None else ()
    return Experiment(name=name, model="tiny", steps=steps, synth={"batch_size": 2},
                      eval=EvalConfig(set="fake", samples=2, warmup=0, **ev))


def test_a_refused_prompt_is_one_failed_utterance_and_the_rest_is_scored(tmp_path):
    be = FakeBackend(n_items=6, prompts={i: f"voices/v{i}.wav" for i in range(6)} | {1: "voices/silent.wav"})
    out = Runner(tmp_path, backend=be, progress=False).run(_exp_f(max_failed=0.5))
    rec = out.record
    assert rec["status"] == "done"
    f = rec["failures"]
    assert f["n"] == 1 and f["ids"] == ["utt1"] and f["reasons"] == {"prompt refused": 1}
    assert "silent" in f["utterances"][0]["reason"] and f["max_failed"] == 0.5
    assert "utt1" not in be.synthesized  # never sent to the engine
    assert [m["id"] for m in be.scored[-1]] == ["utt0", "utt2", "utt3", "utt4", "utt5"]
    base = store.ResultsDir(tmp_path).record(rec["baseline_run"])
    assert base["status"] == "done" and base["failures"]["ids"] == ["utt1"]
    assert rec["paired"]["n_common"] == 5 and len(rec["samples"]) == 2


def test_output_failures_mark_the_run_failed_only_above_max_failed(tmp_path):
    be = FakeBackend(n_items=4, bad_outputs={"utt2"})
    r = Runner(tmp_path, backend=be, progress=False)
    strict = r.run(_exp_f(name="strict")).record  # default max_failed 0.05: 1 of 4 is too many
    assert strict["status"] == "failed" and "1 of 4 utterances failed" in strict["failure"] and "output silent" in strict["failure"]
    lenient = r.run(_exp_f(name="lenient", max_failed=0.3)).record
    assert lenient["status"] == "done" and lenient["failures"]["reasons"] == {"output silent": 1}
    assert [m["id"] for m in be.scored[-1]] == ["utt0", "utt1", "utt3"]
    # the baseline scored all four; the paired comparison covers the three both runs have
    p = lenient["paired"]
    assert p["n_common"] == 3 and p["metrics"]["wer"]["n"] == 3
    base_rows = [json.loads(x) for x in (store.ResultsDir(tmp_path).run_dir(lenient["baseline_run"]) / "score" / "utterances.jsonl").read_text().splitlines()]
    common = [r["metrics"]["wer"] for r in base_rows if r["id"] != "utt2"]
    assert p["metrics"]["wer"]["base"] == pytest.approx(sum(common) / 3)
    # gain 0.5 halves every sample: the change is systematic, so the paired interval excludes 0
    assert p["metrics"]["wer"]["delta"] < 0 and p["metrics"]["wer"]["significant"] is True
    lo, hi = p["metrics"]["wer"]["delta_ci95"]
    assert lo <= p["metrics"]["wer"]["delta"] <= hi < 0


def test_utterances_the_baseline_lost_are_left_out_of_the_compressed_run_too(tmp_path):
    be = FakeBackend(n_items=4, bad_outputs={"utt3": "baseline"})
    rec = Runner(tmp_path, backend=be, progress=False).run(_exp_f(max_failed=0.3)).record
    assert rec["status"] == "done" and rec["failures"]["n"] == 0
    assert rec["failures"]["excluded_for_baseline"] == ["utt3"]
    assert [m["id"] for m in be.scored[-1]] == ["utt0", "utt1", "utt2"]


def test_timing_repeats_give_the_speedup_an_interval(tmp_path):
    be = FakeBackend(n_items=2)
    rec = Runner(tmp_path, backend=be, progress=False).run(_exp_f(timing_repeats=3)).record
    assert len(rec["speed"]["rtf_repeats"]) == 3
    sp = rec["speed"]["speedup"]
    assert sp["value"] == pytest.approx(0.5) and sp["repeats"] == [3, 3]  # the fake gain 0.5 run is 2x slower
    assert sp["ci95"] == pytest.approx([0.5, 0.5]) and sp["within_noise"] is False
    assert sp["ci95"][0] <= sp["value"] <= sp["ci95"][1]  # the value is the statistic of its interval
    # each item synthesized once for the audio and twice more for timing, in both runs
    assert sorted(be.synthesized) == sorted(["utt0", "utt1"] * 6)
    one = Runner(tmp_path / "one", backend=FakeBackend(n_items=2), progress=False).run(_exp_f()).record
    assert one["speed"]["speedup"]["ci95"] is None and one["speed"]["speedup"]["within_noise"] is None


def test_the_leaderboard_shows_failure_counts_and_paired_intervals(tmp_path):
    from cbx.lab import leaderboard as lb

    be = FakeBackend(n_items=4, bad_outputs={"utt2"})
    rec = Runner(tmp_path, backend=be, progress=False).run(_exp_f(max_failed=0.3)).record
    rows = {r["run_id"]: r for r in lb.leaderboard(tmp_path)}
    mine, base = rows[rec["run_id"]], rows[rec["baseline_run"]]
    assert mine["n_failed"] == 1 and base["n_failed"] == 0
    p = rec["paired"]["wer_delta"]
    assert mine["wer_delta"] == pytest.approx(p["value"]) and mine["wer_delta_ci"] == pytest.approx(tuple(p["ci95"]))
    assert p["n"] == 3 and p["significant"] is True and not (mine.get("noise") or {}).get("wer_delta")
    text = lb.render_terminal(lb.leaderboard(tmp_path))
    assert "fail" in text and "±" in text


def test_check_output_names_each_kind_of_unusable_output():
    """An output shorter than the engine's watermark bound (which the engine leaves unmarked) is
    an unusable output like an empty, NaN or silent one, each with its own reason."""
    import numpy as np

    from cbx.engine.watermark import MIN_WATERMARK_S
    from cbx.lab.runner import check_output

    sr = 24000
    rng = np.random.default_rng(0)
    ok = 0.1 * rng.standard_normal(sr // 2).astype(np.float32)
    assert check_output(ok, sr) is None
    assert check_output(np.zeros(0, np.float32), sr).startswith("output empty")
    assert check_output(np.array([0.1, np.nan], np.float32), sr).startswith("output nan")
    short = ok[: int(MIN_WATERMARK_S * sr) - 1]
    assert check_output(short, sr).startswith("output too short")
    assert check_output(ok[: int(MIN_WATERMARK_S * sr)], sr) is None
    assert check_output(np.zeros(sr, np.float32), sr).startswith("output silent")


def test_the_run_records_time_to_first_audio_and_the_leaderboard_shows_it(tmp_path):
    from pathlib import Path

    from cbx.lab import leaderboard as lb

    be = FakeBackend(n_items=3)
    out = Runner(tmp_path, backend=be, progress=False).run(_exp_f())
    rec = out.record
    assert rec["speed"]["first_audio_s"] == pytest.approx(0.25 * 0.5)  # the fake: 0.25 s x gain
    assert be.first_audio_items == ["utt0", "utt0"]  # the first item, once per run (baseline too)
    row = lb.row_of(rec, None, Path(tmp_path))
    assert row["first_audio_s"] == pytest.approx(0.125)
    assert lb.COLS["first_audio_s"].kind == "cost" and lb.COLS["first_audio_s"].higher_is_better is False
