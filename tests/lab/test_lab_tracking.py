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


def test_offline_run_logs_config_summary_tables_audio_and_checkpoint(tmp_path, wandb_env):
    out = Runner(tmp_path / "runs", backend=FakeBackend(3), progress=False).run(_exp(TrackingConfig(backend="wandb", project="cbx-test", mode="offline")))
    assert out.record["status"] == "done"
    info = json.loads((out.run_dir / "tracking.json").read_text())
    run_dir = Path(info["dir"]).parent  # <wandb dir>/offline-run-<time>-<id>/files
    assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(info["run"])
    base_info = json.loads((out.run_dir.parent / out.record["baseline_run"] / "tracking.json").read_text())
    assert base_info["run"] != info["run"]  # the baseline it ran is mirrored too
    recs = _records(run_dir, n_artifacts=3)  # two tables and the checkpoint
    kinds = [k for k, _ in recs]
    run = next(v for k, v in recs if k == "run")
    config = {u["key"]: json.loads(u["value_json"]) for u in run["config"]["update"]}
    assert config["run_id"] == out.run_id and config["steps"][0]["transform"] == "lab_test_gain"
    assert config["baseline_run"] == out.record["baseline_run"] and info["run"] == run["run_id"]
    summary = {}
    for k, v in recs:
        if k == "summary":
            for u in v.get("update", []):
                summary[u.get("key") or "/".join(u.get("nested_key", []))] = json.loads(u["value_json"])
    assert summary["wer"] == pytest.approx(out.record["aggregate"]["metrics"]["wer"]["value"])
    assert summary["speed/rtf"] == pytest.approx(out.record["speed"]["rtf"]) and summary["status"] == "done"
    arts = [v for k, v in recs if k == "artifact"]
    tables = {a["name"].rsplit("-", 1)[-1]: a for a in arts if a["type"] == "run_table"}
    assert set(tables) == {"utterances", "leaderboard"}
    wavs = [c["path"] for c in tables["utterances"]["manifest"]["contents"] if c["path"].endswith(".wav")]
    assert len(wavs) == 3  # one audio clip per utterance
    (model,) = [a for a in arts if a["type"] == "model"]
    assert model["name"] == f"ckpt-{out.run_id}" and any(c["path"] == "manifest.json" for c in model["manifest"]["contents"])
    assert "exit" in kinds


def test_tracking_none_logs_nothing(tmp_path, wandb_env):
    out = Runner(tmp_path / "runs", backend=FakeBackend(2), progress=False).run(_exp(TrackingConfig()))
    assert out.record["status"] == "done" and not (out.run_dir / "tracking.json").exists()
    assert not (wandb_env / "wandb").exists() and not list(out.run_dir.parent.glob("*/tracking.json"))


class BrokenTracker(NullTracker):
    enabled = True

    def start(self, name, config, group=None):
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
