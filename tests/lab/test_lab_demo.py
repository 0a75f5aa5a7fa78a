"""The README's first command from a fresh folder: ``cbx run experiments/demo.yaml`` trains the
demo's student on first use, runs every row, and a second call reuses everything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cbx(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "cbx.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_demo_runs_every_row_from_a_clean_folder_then_reuses(tmp_path):
    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    from cbx.lab.schema import load_experiments

    names = {e.name for e in load_experiments(ROOT / "experiments" / "demo.yaml")}
    cold = _cbx(["run", "experiments/demo.yaml", "--quiet"], tmp_path)
    assert cold.returncode == 0, cold.stderr[-3000:]
    runs = tmp_path / "runs"
    records = {}
    for p in runs.glob("*/run.json"):
        rec = json.loads(p.read_text())
        records[rec["name"]] = rec
    assert names <= set(records), f"missing rows: {names - set(records)}"
    assert all(records[n]["status"] == "done" for n in names), {n: records[n].get("failure") for n in names}
    # the student row says how its student was made
    (student,) = [r for r in records.values() if any(s["transform"] == "cfm_student" for s in r["config"]["steps"])]
    (prov,) = student["trained"].values()
    assert prov["config_file"] == "experiments/distill-demo.yaml" and prov["metrics"]["steps"] == 40
    assert (runs / "trained" / Path(prov["folder"]).name / "student" / "student.json").is_file()

    warm = _cbx(["run", "experiments/demo.yaml", "--quiet"], tmp_path)
    assert warm.returncode == 0, warm.stderr[-3000:]
    lines = [ln for ln in warm.stdout.splitlines() if ": done" in ln]
    assert len(lines) == len(names) and all("(reused)" in ln for ln in lines)
    assert "training" not in warm.stderr
    board = _cbx(["leaderboard"], tmp_path)
    assert board.returncode == 0, board.stderr[-2000:]
    assert "cfm-student-2step" in board.stdout
