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
    # the scorer saw the baseline's wavs as references, per utterance
    last = be.scored[-1]
    assert all(m["reference_audio"] == f"../{rec['baseline_run']}/audio/{m['id']}.wav" for m in last)
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
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert len(list((run_dir / "synth").glob("*.json"))) == 2  # one full batch of 2 was written
    done_before = set(be.synthesized[:2])
    be.fail_after = None
    be.synthesized.clear()
    out = Runner(tmp_path, backend=be, progress=False).run(exp)
    assert out.record["status"] == "done" and out.run_dir == run_dir
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
    assert be.synthesized == ["utt0", "utt1", "utt0", "utt1", "utt2"]  # the first batch, twice
    assert be.resets == 1
    assert len(list((out.run_dir / "synth").glob("*.json"))) == 3
    # a resumed run with nothing left to do does not warm up
    again = Runner(tmp_path, backend=be, progress=False).run(exp, force=False)
    assert again.reused and len(be.synthesized) == 5


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
