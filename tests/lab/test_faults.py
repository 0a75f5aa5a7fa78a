"""Fault injection: every broken input is written by the test itself (truncated and bit-flipped
weights, NaN weights and audio, links and ``..`` paths, a full disk, a read-only folder, a
signal mid-run), and each case checks the exit status, the one-line message and that nothing
was lost or half-written.

Resource faults are injected two ways: by the kernel where this machine allows it (a 64 KiB
tmpfs for "disk full", a read-only bind mount for "read-only folder"; both need root, and root
ignores file permissions, so chmod cannot make a read-only folder) and by an injected writer
error (``OSError`` with ENOSPC / EROFS from the one atomic writer every layer uses), which runs
everywhere. ``MOUNTS`` says which the kernel cases used.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import lab_fakes  # noqa: F401 (registers lab_test_gain)
from cbx.cli import main
from cbx.errors import CbxError
from cbx.lab import store
from lab_fakes import FakeBackend

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links not followed) with its bytes: "nothing lost" is equality."""
    out = {}
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes() if not p.is_symlink() else b"->" + os.readlink(p).encode()
    return out


def one_line(err: str) -> str:
    # progress bars (tqdm redraws with carriage returns) are not messages
    # and third-party Python warnings (a "...Warning: ..." line and its indented source line),
    # nor are cbx synth's notices of which model speaks ("model: ...", "cbx synth: warning: ...")
    lines = [ln for ln in err.replace("\r", "\n").strip().splitlines()
             if ln.strip() and "%|" not in ln and "Warning: " not in ln and not ln.startswith((" ", "\t"))
             and not ln.startswith("model: ") and not re.match(r"cbx [a-z-]+: warning: ", ln)]
    assert len(lines) == 1, err
    return lines[0]


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


@contextlib.contextmanager
def mounted(kind: str, path: Path):
    """A 64 KiB tmpfs (``small``) or a read-only bind mount (``ro``) at ``path``; yields False
    (and mounts nothing) where the kernel refuses."""
    path.mkdir(parents=True, exist_ok=True)
    if kind == "small":
        cmds = [["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)]]
    else:
        cmds = [["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]]
    ok = os.geteuid() == 0
    done = 0
    for c in cmds if ok else []:
        if subprocess.run(c, capture_output=True).returncode != 0:
            ok = False
            break
        done += 1
    try:
        yield ok
    finally:
        if done:
            subprocess.run(["umount", str(path)], capture_output=True)


MOUNTS: dict[str, bool] = {}


@pytest.fixture
def fake_engine(monkeypatch):
    """``cbx run`` with the fake engine/eval (milliseconds per run)."""
    from cbx.lab import runner

    monkeypatch.setattr(runner, "Backend", FakeBackend)


def _exp_file(tmp_path: Path, gain: float = 0.5, nan: bool = False, name="exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"name: faulty\nmodel: tiny\nsynth: {{batch_size: 2}}\neval: {{set: fake, warmup: 0, samples: 1}}\n"
                 f"steps: [{{transform: lab_test_gain, params: {{gain: {gain}, nan: {str(nan).lower()}}}}}]\n")
    return p


# ------------------------------------------------------------------ destructive paths (export --force)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder with two finished runs (baseline records of the tiny model) and a note."""
    root = tmp_path_factory.mktemp("res") / "runs"
    for rid in ("base-a", "base-b"):
        store.atomic_write_json(root / rid / "run.json", {"run_id": rid, "status": "done",
                                                          "config": {"model": "tiny", "steps": []}})
        (root / rid / "audio").mkdir()
        (root / rid / "audio" / "u.wav").write_bytes(b"RIFF-not-really")
    (root / "NOTES.txt").write_text("my notes\n")
    return root


@pytest.mark.parametrize("case", ["results-folder", "other-run", "the-run", "inside-run", "user-folder",
                                  "export-plus-user-file", "symlink"])
def test_export_force_never_deletes_what_it_did_not_make(results, tmp_path, capsys, case):
    from cbx.lab.export import export_run

    prev = tmp_path / "prev"
    export_run(results / "base-a", prev)
    target = {
        "results-folder": results, "other-run": results / "base-b", "the-run": results / "base-a",
        "inside-run": results / "base-a" / "audio", "user-folder": tmp_path / "mine",
        "export-plus-user-file": prev, "symlink": tmp_path / "link",
    }[case]
    if case == "user-folder":
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
    if case == "export-plus-user-file":
        (prev / "README-mine.txt").write_text("keep me")
    if case == "symlink":
        target.symlink_to(prev, target_is_directory=True)
    before_results, before_tmp = snapshot(results), snapshot(tmp_path)
    rc = main(["export", str(results / "base-a"), "--out", str(target), "--force"])
    msg = one_line(capsys.readouterr().err)
    assert rc == 2 and "--out" in msg, msg
    assert snapshot(results) == before_results and snapshot(tmp_path) == before_tmp


def test_export_force_replaces_a_previous_export(results, tmp_path, capsys):
    from cbx.lab.export import verify_export

    out = tmp_path / "exp"
    assert main(["export", str(results / "base-a"), "--out", str(out)]) == 0
    first = json.loads((out / "export.json").read_text())
    assert main(["export", str(results / "base-b"), "--out", str(out), "--force"]) == 0
    assert verify_export(out)["run_id"] == "base-b" != first["run_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no leftovers beside it


def test_student_save_never_replaces_a_folder_it_did_not_write(tmp_path, tiny_model):
    from cbx.distill.student import make_student, save_student

    target = tmp_path / "student"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    before = snapshot(tmp_path)
    with pytest.raises(CbxError, match="holds files this command did not write"):
        save_student(make_student(tiny_model.s3gen.flow.decoder.estimator), target, n_steps=2, trained_steps=[2])
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ integrity


@pytest.fixture(scope="module")
def upstream_export(results, tmp_path_factory):
    from cbx.lab.export import export_run

    return export_run(results / "base-a", tmp_path_factory.mktemp("up") / "export", dequantize=True)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_a_flipped_byte_in_an_export_is_refused_by_cbx_synth(upstream_export, tmp_path, capsys):
    ex = _copy(upstream_export, tmp_path / "ex")
    w = ex / "t3_cfg.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    out = tmp_path / "o.wav"
    rc = main(["synth", "--text", "Hi.", "--model", str(ex), "--out", str(out)])
    msg = one_line(capsys.readouterr().err)
    assert rc == 2 and "t3_cfg.safetensors: content does not match its hash" in msg and not out.exists()


@pytest.mark.parametrize("case", ["truncated", "nan", "bitflip-no-manifest"])
def test_broken_weights_in_a_model_folder_are_refused_naming_the_file(upstream_export, tmp_path, case):
    from safetensors.torch import load_file, save_file

    from cbx.engine.model import load_model

    folder = _copy(upstream_export, tmp_path / "m")
    (folder / "export.json").unlink()  # a plain model folder: nothing to check hashes against
    w = folder / "s3gen.safetensors"
    if case == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
        want = "s3gen.safetensors: cannot read weights"
    elif case == "nan":
        sd = load_file(str(w))
        k = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
        sd[k] = sd[k].clone().fill_(float("nan"))
        save_file(sd, str(w))
        want = f"s3gen.safetensors: tensor '{k}' holds"
    else:  # flip the exponent's top bit of one float: inf or a huge value; either is caught or loads
        sd = load_file(str(w))
        k = sorted(k for k, v in sd.items() if v.dtype == torch.float32 and v.numel() > 4)[0]
        t = sd[k].clone().view(torch.int32)
        t.view(-1)[0] = 0x7F800000  # +inf
        sd[k] = t.view(torch.float32)
        save_file(sd, str(w))
        want = "non-finite"
    with pytest.raises(CbxError, match=want):
        load_model(str(folder))


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-inside", "extra-file"])
def test_export_verifier_refuses_paths_outside_and_links(upstream_export, tmp_path, case):
    from cbx.lab.export import load_export, verify_export

    ex = _copy(upstream_export, tmp_path / "ex")
    (tmp_path / "outside.bin").write_bytes(b"secret")
    info = json.loads((ex / "export.json").read_text())
    if case in ("dotdot", "absolute"):
        rel = "../outside.bin" if case == "dotdot" else str(tmp_path / "outside.bin")
        info["files"][rel] = __import__("hashlib").sha256(b"secret").hexdigest()
        (ex / "export.json").write_text(json.dumps(info))
        want = "not a plain path inside the folder"
    elif case == "symlink-inside":
        (ex / "ve.safetensors").unlink()
        (ex / "ve.safetensors").symlink_to(tmp_path / "outside.bin")
        want = "symbolic link inside"
    else:
        (ex / "extra.bin").write_bytes(b"x")
        want = "extra.bin: not listed"
    with pytest.raises(CbxError, match=want):
        verify_export(ex)
    with pytest.raises(CbxError, match=want):
        load_export(ex)


@pytest.mark.parametrize("case", ["truncated", "nan", "symlink"])
def test_broken_student_checkpoints_are_refused(tiny_model, tmp_path, case):
    from safetensors.torch import load_file, save_file

    from cbx.distill.student import WEIGHTS, load_student, make_student, save_student

    est = tiny_model.s3gen.flow.decoder.estimator
    ck = save_student(make_student(est), tmp_path / "student", n_steps=2, trained_steps=[2])
    w = ck / WEIGHTS
    if case == "truncated":
        w.write_bytes(w.read_bytes()[:1000])
        want = "cannot read weights"
    elif case == "nan":
        sd = load_file(str(w))
        k = sorted(sd)[0]
        sd[k] = torch.full_like(sd[k], float("nan"))
        save_file(sd, str(w))
        want = "non-finite"
    else:
        real = tmp_path / "elsewhere.safetensors"
        w.rename(real)
        w.symlink_to(real)
        want = "symbolic link"
    with pytest.raises(CbxError, match=want):
        load_student(ck, est)


# ------------------------------------------------------------------ records tell the truth


def test_a_crash_marks_the_run_failed_and_cbx_run_exits_1_then_resumes(fake_engine, tmp_path, capsys, monkeypatch):
    exp = _exp_file(tmp_path)
    res = tmp_path / "runs"
    calls = {"n": 0}
    real = FakeBackend.synthesize

    def flaky(self, model, items, settings):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("engine bug")
        return real(self, model, items, settings)

    monkeypatch.setattr(FakeBackend, "synthesize", flaky)
    assert main(["run", str(exp), "--results", str(res), "--quiet"]) == 1
    out = capsys.readouterr()
    assert "faulty: failed: RuntimeError: engine bug" in out.out
    (rec,) = [r for _, r in store.ResultsDir(res).records() if r["name"] == "faulty"]
    assert rec["status"] == "failed" and rec["resumable"] and rec["failure_kind"] == "error"
    assert no_temp_files(res)
    assert main(["run", str(exp), "--results", str(res), "--quiet"]) == 0
    (rec,) = [r for _, r in store.ResultsDir(res).records() if r["name"] == "faulty"]
    assert rec["status"] == "done" and rec["attempts"] == 2


def test_ctrl_c_marks_the_run_failed_interrupted(fake_engine, tmp_path, capsys, monkeypatch):
    def interrupt(self, model, items, settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeBackend, "synthesize", interrupt)
    assert main(["run", str(_exp_file(tmp_path)), "--results", str(tmp_path / "runs"), "--quiet"]) == 130
    assert one_line(capsys.readouterr().err) == "cbx run: interrupted"
    (rec,) = [r for _, r in store.ResultsDir(tmp_path / "runs").records()]
    assert rec["status"] == "failed" and rec["failure"] == "interrupted (Ctrl-C)" and rec["resumable"]


def test_nan_outputs_fail_the_run_and_cbx_run_exits_1(fake_engine, tmp_path, capsys):
    assert main(["run", str(_exp_file(tmp_path, gain=1.0, nan=True)), "--results", str(tmp_path / "runs"), "--quiet"]) == 1
    assert "faulty: failed" in capsys.readouterr().out
    (rec,) = [r for _, r in store.ResultsDir(tmp_path / "runs").records() if r["name"] == "faulty"]
    assert rec["status"] == "failed" and "nan" in rec["failure"] and not rec.get("resumable")


def _check_resource_fault(rc, err, res: Path, kind: str):
    msg = one_line(err)
    assert rc == 2 and msg.startswith("cbx ") and kind in msg, msg
    if res.exists():
        assert no_temp_files(res)
        for p in res.rglob("*.json"):  # whatever was written is whole
            json.loads(p.read_text())


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_disk_full_during_cbx_run_is_reported_as_such(fake_engine, tmp_path, capsys, monkeypatch, how):
    res = tmp_path / "small" / "runs"
    if how == "injected" or not _try_small(tmp_path / "small", res, capsys, monkeypatch):
        import cbx.files

        real = cbx.files.atomic_write_bytes
        n = {"k": 0}

        def full(path, data):
            n["k"] += 1
            if n["k"] > 5:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, data)

        monkeypatch.setattr(cbx.files, "atomic_write_bytes", full)
        rc = main(["run", str(_exp_file(tmp_path)), "--results", str(res), "--quiet"])
        _check_resource_fault(rc, capsys.readouterr().err, res, "disk full: cannot write")


def _try_small(mnt: Path, res: Path, capsys, monkeypatch) -> bool:
    with mounted("small", mnt) as ok:
        MOUNTS["tmpfs"] = ok
        if not ok:
            return False
        import lab_fakes as lf

        monkeypatch.setattr(lf, "SR", 48000)  # bigger wavs: 64 KiB fill up within the first runs
        rc = main(["run", str(_exp_file(mnt.parent)), "--results", str(res), "--quiet"])
        _check_resource_fault(rc, capsys.readouterr().err, res, "disk full: cannot write")
        return True


@pytest.mark.parametrize("how", ["bind-ro", "injected"])
def test_a_read_only_results_folder_is_reported_as_such(fake_engine, tmp_path, capsys, monkeypatch, how):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("x")
    if how == "bind-ro":
        with mounted("ro", ro) as ok:
            MOUNTS["ro"] = ok
            if ok:
                rc = main(["run", str(_exp_file(tmp_path)), "--results", str(ro / "runs"), "--quiet"])
                _check_resource_fault(rc, capsys.readouterr().err, ro, "read-only file system")
                return
    import cbx.lab.store as st

    def ro_mkdir(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", ro_mkdir)
    rc = main(["run", str(_exp_file(tmp_path)), "--results", str(ro / "runs"), "--quiet"])
    monkeypatch.undo()
    _check_resource_fault(rc, capsys.readouterr().err, ro, "read-only file system")
    assert st is not None and (ro / "keep.txt").read_text() == "x"


def _wav(path: Path, wav, sr=16000) -> str:
    sf.write(str(path), np.asarray(wav, np.float32), sr, subtype="FLOAT")
    return path.name


def test_cbx_score_into_a_read_only_folder_is_one_line(tmp_path, capsys):
    t = np.arange(16000) / 16000
    line = {"audio": _wav(tmp_path / "a.wav", 0.3 * np.sin(2 * np.pi * 220 * t)), "text": "a"}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "ro"
    out.mkdir()
    with mounted("ro", out) as ok:
        if ok:
            rc = main(["score", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(out), "--metrics", "artifacts"])
            _check_resource_fault(rc, capsys.readouterr().err, out, "read-only file system")
            assert list(out.iterdir()) == []
            return
    import cbx.files

    def ro(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cbx.files, "atomic_write_bytes", ro)
        rc = main(["score", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(out), "--metrics", "artifacts"])
    _check_resource_fault(rc, capsys.readouterr().err, out, "read-only file system")


def _tiny_exp(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text("name: sig\nmodel: tiny\nsynth: {max_speech_tokens: 40, batch_size: 1}\n"
                 "eval: {set: offline, limit: 6, warmup: 0, metrics: [rtf_total]}\nbaseline: false\n")
    return p


def _start(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "cbx.cli", "run", str(_tiny_exp(tmp_path)), "--results",
                             str(tmp_path / "runs"), "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_work(proc, runs: Path, attempt: int, n_rows: int, timeout=300.0) -> dict:
    """Until the run's record says attempt ``attempt`` is running and ``n_rows`` utterances exist."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        recs = list(runs.glob("*/run.json"))
        rec = json.loads(recs[0].read_text()) if recs else {}
        if (rec.get("status") == "running" and rec.get("attempts") == attempt
                and len(list(runs.glob("*/synth/*.json"))) >= n_rows):
            return rec
        if proc.poll() is not None:
            raise AssertionError(f"finished too early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no utterance written in time")


@pytest.mark.slow
def test_sigterm_mid_run_marks_failed_and_sigkill_is_found_stale_and_resumed(tmp_path):
    runs = tmp_path / "runs"
    proc = _start(tmp_path)
    _wait_for_work(proc, runs, attempt=1, n_rows=1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert one_line([ln for ln in err.splitlines() if ln.startswith("cbx run")][-1]) == "cbx run: stopped by SIGTERM"
    (rec,) = [json.loads(p.read_text()) for p in runs.glob("*/run.json")]
    assert rec["status"] == "failed" and rec["failure"] == "interrupted (SIGTERM)" and rec["resumable"]
    done_before = {p.name for p in runs.glob("*/synth/*.json")}

    proc = _start(tmp_path)  # resumes; then SIGKILL: nothing can mark the record
    _wait_for_work(proc, runs, attempt=2, n_rows=len(done_before) + 1)
    proc.kill()
    proc.communicate(timeout=60)
    (rec,) = [json.loads(p.read_text()) for p in runs.glob("*/run.json")]
    assert rec["status"] == "running" and rec["attempts"] == 2
    assert done_before <= {p.name for p in runs.glob("*/synth/*.json")}  # finished work stayed finished

    proc = _start(tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "sig: done" in out
    (rec,) = [json.loads(p.read_text()) for p in runs.glob("*/run.json")]
    assert rec["status"] == "done" and rec["attempts"] == 3 and no_temp_files(runs)


# ------------------------------------------------------------------ one-line refusals


@pytest.mark.parametrize("text, want", [
    ("model: tiny\nsteps:\n  - transform: [int8\n", "bad.yaml:4:1: not valid YAML"),
    ("model: tiny\ndevice: gpu\n", "device: unknown device 'gpu'"),
    ("model: tiny\nsteps: [{transform: cfm_student, params: {checkpoint: nowhere/student}}]\n",
     "steps[0].params.checkpoint: nowhere/student: no such checkpoint folder"),
])
def test_cbx_run_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, text, want):
    (tmp_path / "bad.yaml").write_text(text)
    rc = main(["run", str(tmp_path / "bad.yaml"), "--results", str(tmp_path / "runs")])
    msg = one_line(capsys.readouterr().err)
    assert rc == 2 and want in msg, msg
    assert not (tmp_path / "runs").exists()


def test_a_folder_given_as_voice_is_named_as_such(tmp_path, capsys):
    rc = main(["synth", "--text", "Hi.", "--voice", str(tmp_path), "--out", str(tmp_path / "o.wav")])
    assert rc == 2 and "is a folder" in one_line(capsys.readouterr().err)


@pytest.mark.slow
def test_a_voice_that_yields_no_audio_is_reported_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    """(A voice of pure noise made T3 stop at once: a 0.00 s wav and exit 0.) The engine marks
    the empty output as degenerate; cbx synth refuses it in one line and writes nothing."""
    from cbx.engine import synth

    monkeypatch.setattr(synth, "crossfade_join", lambda wavs, overlap: np.zeros(0, np.float32))
    out = tmp_path / "o.wav"
    rc = main(["synth", "--text", "Hi.", "--out", str(out), "--max-speech-tokens", "4", "--cfm-steps", "1"])
    msg = one_line(capsys.readouterr().err)
    assert rc == 2 and "produced no usable audio" in msg and "(empty output" in msg and not out.exists()


def test_an_internal_error_is_one_line_with_a_log_and_debug_prints_the_traceback(tmp_path, capsys, monkeypatch):
    import cbx.lab.cli_leaderboard as cl

    monkeypatch.setenv("CBX_CACHE_DIR", str(tmp_path / "cache"))

    def boom(args):
        return 1 / 0

    monkeypatch.setattr(cl, "run", boom)
    assert main(["leaderboard", "--results", str(tmp_path)]) == 1
    msg = one_line(capsys.readouterr().err)
    assert msg.startswith("cbx leaderboard: internal error: ZeroDivisionError: division by zero (traceback in ")
    (log,) = (tmp_path / "cache" / "logs").glob("cbx-leaderboard-*.log")
    assert "Traceback" in log.read_text()
    assert main(["leaderboard", "--results", str(tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("cbx leaderboard: internal error")


# ------------------------------------------------------------------ degenerate audio is data


def test_watermark_skips_empty_short_and_nonfinite_outputs_with_a_reason():
    from cbx.engine.watermark import watermark_each

    sr = 24000
    t = np.arange(sr) / sr
    good = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    nan = good.copy()
    nan[100] = np.nan
    out = watermark_each([np.zeros(0, np.float32), good[: int(0.02 * sr)], nan, good], sr)
    reasons = [r for _, r in out]
    assert reasons[0] == "empty" and reasons[1].startswith("too short (0.020 s") and reasons[2] == "non-finite"
    assert reasons[3] is None and not np.array_equal(out[3][0], good)  # the good one is marked
    assert np.array_equal(out[1][0], good[: int(0.02 * sr)])


def test_scorer_scores_a_nonfinite_or_ultra_short_line_as_failed_and_goes_on(tmp_path):
    from cbx.eval.scorer import score_manifest

    t = np.arange(16000) / 16000
    good = 0.3 * np.sin(2 * np.pi * 220 * t)
    nan = good.copy()
    nan[5:9] = np.nan
    lines = [{"audio": _wav(tmp_path / "nan.wav", nan), "text": "a", "id": "nan"},
             {"audio": _wav(tmp_path / "short.wav", good[:100]), "text": "b", "id": "short"},
             {"audio": _wav(tmp_path / "good.wav", good), "text": "c", "id": "good"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    agg = score_manifest(tmp_path / "m.jsonl", tmp_path / "out", metrics=["artifacts"])
    assert agg["n_scored"] == 1 and agg["n_skipped"] == 2
    reasons = {s["line"]: s["reason"] for s in agg["skipped"]}
    assert "4 non-finite sample(s)" in reasons[1] and "too short to score" in reasons[2]


def test_text_longer_than_the_tiny_models_text_positions_is_split_not_refused(tiny_model):
    from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer

    text = ("Ab, " * 75).strip()  # 299 characters, 301 text tokens for the tiny model (takes 258)
    rows = Synthesizer(tiny_model)._rows([SynthRequest(text, None)], SynthSettings().resolved(tiny_model))
    limit = tiny_model.t3.text_pos_emb.emb.num_embeddings
    assert len(rows) >= 2 and all(len(r.text_tokens) <= limit for r in rows)
    assert " ".join(r.text for r in rows).replace("  ", " ") == text
