"""The real pipeline on the built-in tiny model (engine synthesis, compression, eval scorer,
T3 fidelity, leaderboard), then `cbx export` of its run: compressed exports load back
bit-exactly, corruption is caught by hashes, no silent overwrite, and the dequantized export
loads with upstream's from_local."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from cbx.cli import main
from cbx.errors import CbxError
from cbx.lab.export import dequantize_model, load_export, verify_export
from cbx.lab.runner import Runner
from cbx.lab.schema import EvalConfig, Experiment, Step

STEPS = (Step("int8_weight_only", {}), Step("fp8_cfm", {}))
METRICS = ("mel_l1", "wave_snr_db", "t3_top1_agreement", "t3_kl", "click_count", "rtf_total", "model_mib")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    exp = Experiment(name="int8-fp8", model="tiny", steps=STEPS,
                     synth={"max_speech_tokens": 16, "cfm_steps": 2, "batch_size": 1},
                     eval=EvalConfig(set="offline", limit=1, metrics=METRICS, samples=1))
    out = Runner(root / "runs", progress=False).run(exp)
    assert out.record["status"] == "done", out.record.get("failure")
    return out


def test_real_run_is_paired_scored_and_ranked(run):
    from cbx.lab import leaderboard as lb

    rec = run.record
    base = json.loads((run.run_dir.parent / rec["baseline_run"] / "run.json").read_text())
    assert base["status"] == "done" and base["is_baseline"]
    assert rec["eval_set"] == {"name": "offline", "version": base["eval_set"]["version"], "n_items": 1}
    assert rec["model_variant"] == "original" and rec["synth_resolved"]["cfm_steps"] == 2
    m = {k: v["value"] for k, v in rec["aggregate"]["metrics"].items()}
    # fidelity to the paired baseline: the compressed model is close but not identical
    assert 0.5 <= m["t3_top1_agreement"] <= 1.0 and 0 <= m["t3_kl"] < 10
    assert m["mel_l1"] > 0 and m["wave_snr_db"] < 200
    assert rec["model_bytes"] < base["model_bytes"]  # int8 T3 + fp8 CFM weights are smaller
    # which kernels the quantized modules ran (CPU: int8 pack kernel, fp8 emulated; text head unused)
    # fair baseline: both rows computed in the same (auto-resolved) dtype, recorded in both
    from cbx.engine.synth import auto_dtype

    assert rec["synth_resolved"]["dtype"] == base["synth_resolved"]["dtype"] == auto_dtype("cpu")
    assert rec["kernels"]["fallbacks"] == [] and rec["kernels"]["paths"]["int8pack-cpu"] > 0
    assert rec["kernels"]["paths"]["fp8-emulated"] > 0 and base["kernels"] == {"paths": {}, "fallbacks": []}
    rows = [json.loads(x) for x in (run.run_dir / "score" / "utterances.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [json.loads(p.read_text())["id"] for p in sorted((run.run_dir / "synth").glob("*.json"))]
    board = lb.leaderboard(run.run_dir.parent)
    mine = next(r for r in board if r["run_id"] == run.run_id)
    assert mine["size_ratio"] < 1 and mine["t3_top1_agreement"] == pytest.approx(m["t3_top1_agreement"])
    assert mine["group"] == next(r for r in board if r["run_id"] == rec["baseline_run"])["group"]


def _state(model):
    return {k: v for k, v in model.state_dict().items()}


def test_compressed_export_loads_back_bit_exactly_and_names_its_methods(run, tmp_path, capsys):
    from cbx.compress.checkpoint import load_compressed

    out = tmp_path / "export"
    assert main(["export", run.run_id[:12], "--results", str(run.run_dir.parent), "--out", str(out)]) == 0
    assert "compressed" in capsys.readouterr().out
    info = verify_export(out)
    assert info["run_id"] == run.run_id and info["config"]["steps"][0]["transform"] == "int8_weight_only"
    assert set(info["files"]) >= {"manifest.json", "model.safetensors"}
    manifest = json.loads((out / "manifest.json").read_text())
    methods = {m["method"] for m in manifest["modules"].values()}
    assert methods == {"int8_weight_only", "fp8_cfm"}
    a, b = _state(load_export(out)), _state(load_compressed(run.run_dir / "checkpoint"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # no silent overwrite; --force replaces
    assert main(["export", str(run.run_dir), "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(run.run_dir), "--out", str(out), "--force"]) == 0

    # corruption: one flipped byte in the weights, or a file slipped in afterwards
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CbxError, match=r"model\.safetensors: content does not match its hash"):
        load_export(out)
    assert main(["export", str(run.run_dir), "--out", str(out), "--force"]) == 0
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(CbxError, match="extra.bin: not listed"):
        load_export(out)


def test_dequantized_export_loads_in_upstream_from_local(run, tmp_path):
    from cbx.engine import upstream
    from cbx.engine.model import build_s3gen, build_t3

    out = tmp_path / "up"
    assert main(["export", str(run.run_dir), "--out", str(out), "--dequantize"]) == 0
    info = verify_export(out)
    assert info["kind"] == "upstream" and "t3_cfg.safetensors" in info["files"]
    expected = dequantize_model(_compressed(run))
    # Upstream's constructors build full-size modules; for the tiny model build them tiny
    # (inside this test only) and let upstream's own from_local load the files.
    arch = json.loads((out / "cbx_model.json").read_text())["tiny"]
    with mock.patch.object(upstream.tts, "T3", lambda: build_t3("original", arch)), \
            mock.patch.object(upstream.tts, "S3Gen", lambda: build_s3gen("original", arch["s3gen"])):
        tts = upstream.ChatterboxTTS.from_local(out, "cpu")
    for part in ("t3", "s3gen", "ve"):
        got, want = getattr(tts, part).state_dict(), getattr(expected, part).state_dict()
        assert got.keys() == want.keys(), part
        assert all(torch.equal(got[k].float(), want[k].float()) for k in want), part
    # the quantized layers really are dequantized (rounded) weights, not the originals
    name = "t3.tfmr.layers.0.mlp.gate_proj"
    q = _compressed(run).get_submodule(name)
    assert torch.equal(tts.t3.get_submodule(name.removeprefix("t3.")).weight, q.dequantize().float())


def _compressed(run):
    from cbx.compress.checkpoint import load_compressed

    return load_compressed(run.run_dir / "checkpoint")


def test_export_refuses_unfinished_runs_and_unknown_ids(run, tmp_path, capsys):
    assert main(["export", "nope", "--results", str(run.run_dir.parent), "--out", str(tmp_path / "x")]) == 2
    assert "no run folder" in capsys.readouterr().err
    rec = json.loads((run.run_dir / "run.json").read_text())
    broken = run.run_dir.parent / "broken-run"
    broken.mkdir()
    (broken / "run.json").write_text(json.dumps({**rec, "status": "failed", "run_id": "broken-run"}))
    assert main(["export", str(broken), "--out", str(tmp_path / "y")]) == 2
    assert "only finished (done) runs" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_resumed_run_keeps_its_kernel_record(run, tmp_path):
    """A run resumed after every utterance was done still says which kernels it ran (it used to
    count every quantized module ``not-run``)."""
    import shutil

    from cbx.lab.runner import _kernels_of_attempt

    root = tmp_path / "runs"
    shutil.copytree(run.run_dir.parent, root)
    rec_path = root / run.run_id / "run.json"
    rec = json.loads(rec_path.read_text())
    rec.update(status="failed", resumable=True, failure="planted interruption")
    rec_path.write_text(json.dumps(rec))
    exp = Experiment(name="int8-fp8", model="tiny", steps=STEPS,
                     synth={"max_speech_tokens": 16, "cfm_steps": 2, "batch_size": 1},
                     eval=EvalConfig(set="offline", limit=1, metrics=METRICS, samples=1))
    out = Runner(root, progress=False).run(exp)
    assert out.run_id == run.run_id and not out.reused and out.record["attempts"] == 2
    assert out.record["status"] == "done"
    assert out.record["kernels"]["paths"]["int8pack-cpu"] == run.record["kernels"]["paths"]["int8pack-cpu"]
    # an attempt that ran no quantized module keeps the previous attempt's record, marked as such
    idle = {"paths": {"not-run": 5}, "fallbacks": []}
    kept = _kernels_of_attempt(idle, run.record)
    assert kept["paths"] == run.record["kernels"]["paths"] and "previous attempt" in kept["recorded_in"]
    assert _kernels_of_attempt(idle, None) == idle
    assert _kernels_of_attempt(idle, {"kernels": idle}) == idle
