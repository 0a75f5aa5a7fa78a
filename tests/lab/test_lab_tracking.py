"""W&B mirroring: offline runs read back from their .wandb file; `tracking: none` logs
nothing; W&B failures never lose the run's local results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbx.lab.runner import Runner
from cbx.lab.schema import EvalConfig, Experiment, Step, TrackingConfig
from cbx.lab.tracking import NullTracker, read_offline_run
from lab_fakes import FakeBackend


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var, sub in (("WANDB_DIR", "wb"), ("WANDB_DATA_DIR", "wbdata"), ("WANDB_CACHE_DIR", "wbcache"),
                     ("WANDB_ARTIFACT_DIR", "wbart"), ("WANDB_CONFIG_DIR", "wbcfg")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    wandb.teardown()  # wandb keeps the first run's settings (its directory) process-wide
    yield tmp_path / "wb"
    wandb.teardown()


def _records(run_dir, n_artifacts=1, timeout_s=30.0):
    """The offline run's records once ``want`` kinds are there: after ``finish()`` returns,
    wandb's service process may still be appending (artifact records come last, seen flaky)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        recs = read_offline_run(run_dir)
        kinds = [k for k, _ in recs]
        if (kinds.count("artifact") >= n_artifacts and "exit" in kinds) or time.monotonic() > deadline:
            return recs
        time.sleep(0.25)


def _exp(tracking, gain=0.5):
    return Experiment(name="tracked", steps=(Step("lab_test_gain", {"gain": gain}),), synth={"batch_size": 3},
                      eval=EvalConfig(set="fake"), tracking=tracking)


def _summary(recs) -> dict:
    out = {}
    for k, v in recs:
        if k == "summary":
            for u in v.get("update", []):
                out[u.get("key") or "/".join(u.get("nested_key", []))] = json.loads(u["value_json"])
    return out


def _staged_table(recs, key: str) -> tuple[dict, dict[str, Path]]:
    """A logged table as W&B stored it (its artifact's ``<key>.table.json``) and where each of
    the artifact's files (the clips) was staged on disk."""
    (art,) = [v for k, v in recs if k == "artifact" and v["type"] == "run_table" and v["name"].endswith(f"-{key}")]
    files = {c["path"]: Path(c["local_path"]) for c in art["manifest"]["contents"]}
    return json.loads(files[f"{key}.table.json"].read_text()), files


def test_offline_run_logs_project_group_config_summary_and_side_by_side_audio(tmp_path, wandb_env):
    import numpy as np
    import soundfile as sf

    prompt = tmp_path / "voice.wav"
    sf.write(prompt, (0.1 * np.sin(np.arange(8000) / 5)).astype("float32"), 8000)
    results = tmp_path / "study" / "runs"
    out = Runner(results, backend=FakeBackend(3, prompts={0: str(prompt)}), progress=False).run(
        _exp(TrackingConfig(backend="wandb", mode="offline")))
    rec = out.record
    assert rec["status"] == "done"
    base_dir = results / rec["baseline_run"]
    base = json.loads((base_dir / "run.json").read_text())
    info = json.loads((out.run_dir / "tracking.json").read_text())
    base_info = json.loads((base_dir / "tracking.json").read_text())
    # One project per results folder (derived from its path), runs grouped by their baseline
    assert info["project"] == base_info["project"] == "cbx-study-runs"
    assert info["group"] == base_info["group"] == rec["baseline_run"] and base_info["run"] != info["run"]
    run_dir = Path(info["dir"]).parent  # <wandb dir>/offline-run-<time>-<id>/files
    assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(info["run"])
    recs = _records(run_dir, n_artifacts=3)  # two tables and the checkpoint
    run = next(v for k, v in recs if k == "run")
    assert run["project"] == "cbx-study-runs" and run["run_group"] == rec["baseline_run"] and run["job_type"] == "compressed"
    assert run["display_name"] == out.run_id and run["tags"] == ["lab_test_gain"]
    (base_run,) = [v for k, v in _records(Path(base_info["dir"]).parent, n_artifacts=2) if k == "run"]
    assert base_run["run_group"] == rec["baseline_run"] and base_run["job_type"] == "baseline"
    # config = the resolved experiment (every default filled in), plus the pairing
    config = {u["key"]: json.loads(u["value_json"]) for u in run["config"]["update"]}
    for k in ("steps", "synth", "eval", "seed", "model"):
        assert config[k] == rec["config"][k], k
    assert config["steps"][0]["params"]["gain"] == 0.5 and config["run_id"] == out.run_id
    assert config["baseline_run"] == rec["baseline_run"]
    # summary: baseline-relative figures as flat numeric keys, computed here from the two records
    summary = _summary(recs)
    wer, bwer = (r["aggregate"]["metrics"]["wer"]["value"] for r in (rec, base))
    sim, bsim = (r["aggregate"]["metrics"]["speaker_sim"]["value"] for r in (rec, base))
    assert summary["wer_delta"] == pytest.approx(wer - bwer) and summary["wer_delta"] != 0
    assert summary["sim_ratio"] == pytest.approx(sim / bsim)
    assert summary["speedup"] == pytest.approx(base["speed"]["rtf"] / rec["speed"]["rtf"])
    assert summary["size_ratio"] == pytest.approx(rec["model_bytes"] / base["model_bytes"])
    assert summary["t3_top1_agreement"] == pytest.approx(rec["aggregate"]["metrics"]["t3_top1_agreement"]["value"])
    assert summary["metric/wer"] == pytest.approx(wer) and summary["speed/rtf"] == pytest.approx(rec["speed"]["rtf"])
    assert summary["status"] == "done" and summary["is_baseline"] == 0 and summary["rank"] >= 1
    numeric = {k for k, v in summary.items() if isinstance(v, (int, float)) and not k.startswith("_")}
    assert {"wer_delta", "sim_ratio", "speedup", "size_ratio", "t3_top1_agreement", "mem_mib"} <= numeric
    assert not any(isinstance(v, dict) for k, v in summary.items() if not k.startswith("_") and k not in ("utterances", "leaderboard"))
    # per-utterance table: text, prompt, this run's clip and the baseline's clip side by side
    table, files = _staged_table(recs, "utterances")
    cols = table["columns"]
    assert cols[:5] == ["id", "text", "prompt", "audio", "baseline_audio"] and "baseline_wer" in cols
    rows = {r[0]: dict(zip(cols, r)) for r in table["data"]}
    assert sorted(rows) == ["utt0", "utt1", "utt2"]
    scores = {json.loads(l)["id"]: json.loads(l)["metrics"] for l in (base_dir / "score" / "utterances.jsonl").read_text().splitlines() if l}
    for uid, r in rows.items():
        assert r["text"] == f"sentence number {uid[-1]}" and r["baseline_wer"] == pytest.approx(scores[uid]["wer"])
        mine, theirs = (files[r[c]["path"]].read_bytes() for c in ("audio", "baseline_audio"))
        assert mine == (out.run_dir / "audio" / f"{uid}.wav").read_bytes()
        assert theirs == (base_dir / "audio" / f"{uid}.wav").read_bytes() and mine != theirs
        assert r["audio"]["_type"] == r["baseline_audio"]["_type"] == "audio-file"
        assert "(baseline)" in r["baseline_audio"]["caption"]
    assert files[rows["utt0"]["prompt"]["path"]].read_bytes() == prompt.read_bytes()
    assert rows["utt1"]["prompt"] is None
    lb_table, _ = _staged_table(recs, "leaderboard")
    assert {r[lb_table["columns"].index("run_id")] for r in lb_table["data"]} == {out.run_id, rec["baseline_run"]}
    arts = [v for k, v in recs if k == "artifact"]
    (model,) = [a for a in arts if a["type"] == "model"]
    assert model["name"] == f"ckpt-{out.run_id}" and any(c["path"] == "manifest.json" for c in model["manifest"]["contents"])


def test_the_project_is_named_after_the_results_folder_unless_configured(tmp_path):
    assert TrackingConfig().project_for(tmp_path / "my study" / "runs") == "cbx-my-study-runs"
    assert TrackingConfig(project="mine").project_for(tmp_path / "runs") == "mine"
    assert TrackingConfig().project_for(tmp_path / "a" / "runs") != TrackingConfig().project_for(tmp_path / "b" / "runs")


def test_tracking_none_logs_nothing(tmp_path, wandb_env):
    out = Runner(tmp_path / "runs", backend=FakeBackend(2), progress=False).run(_exp(TrackingConfig()))
    assert out.record["status"] == "done" and not (out.run_dir / "tracking.json").exists()
    assert not (wandb_env / "wandb").exists() and not list(out.run_dir.parent.glob("*/tracking.json"))


class BrokenTracker(NullTracker):
    enabled = True

    def start(self, name, config, **kw):
        raise ConnectionError("network is unreachable")


def test_wandb_failure_keeps_the_local_results(tmp_path, wandb_env):
    r = Runner(tmp_path / "runs", backend=FakeBackend(2), progress=False, tracker_factory=lambda cfg: BrokenTracker())
    with pytest.warns(UserWarning, match="network is unreachable.*local results are in"):
        out = r.run(_exp(TrackingConfig(backend="wandb")))
    rec = json.loads((out.run_dir / "run.json").read_text())
    assert rec["status"] == "done" and rec["aggregate"]["metrics"]["wer"]["value"] > 0


def test_an_export_is_logged_as_a_model_artifact(tmp_path, wandb_env):
    from cbx.lab.tracking import log_export

    out = tmp_path / "export"
    out.mkdir()
    (out / "export.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"\0" * 64)
    rec = {"run_id": "int8-abc", "config": {"model": "tiny"}}
    where = log_export(TrackingConfig(backend="wandb", project="cbx-test", mode="offline"), out, rec)
    run_dir = Path(where).parent
    (art,) = [v for k, v in _records(run_dir) if k == "artifact"]
    assert art["type"] == "model" and art["name"] == "export-int8-abc"
    assert sorted(c["path"] for c in art["manifest"]["contents"]) == ["export.json", "model.safetensors"]
    assert log_export(TrackingConfig(), out, rec) is None  # tracking: none
