"""scripts/gpu_check.sh: without CUDA it says so and exits 0; the experiment and training files
it writes for the GPU machine are valid (checked here, so the GPU run cannot die on a typo)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _heredoc(name: str, work: Path) -> str:
    text = SCRIPT.read_text()
    m = re.search(r'cat > "\$WORK/' + re.escape(name) + r'" <<EOF\n(.*?)\nEOF\n', text, re.S)
    assert m, f"{name} heredoc not found"
    return m.group(1).replace("$WORK", str(work))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    report = tmp_path / "r.txt"
    out = subprocess.run(["bash", str(SCRIPT), str(report)], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU" in out.stdout and not report.exists()


def test_the_files_it_writes_are_valid(tmp_path):
    from cbx.distill.config import load_config
    from cbx.lab.schema import load_experiments

    (tmp_path / "distill" / "student").mkdir(parents=True)
    runs, distill = tmp_path / "runs.yaml", tmp_path / "distill.yaml"
    runs.write_text(_heredoc("runs.yaml", tmp_path))
    distill.write_text(_heredoc("distill.yaml", tmp_path))
    exps = load_experiments(runs)
    assert {e.name for e in exps} == {"int8", "int4-rtn", "int4-gptq", "fp8", "student"}
    for e in exps:
        assert e.model == "random:original" and e.device == "cuda"
        e.transform_configs()
    assert load_config(distill).teacher.model == "random:original"
    steps = re.findall(r'^    "([^"|]+)\|(\d+)\|', SCRIPT.read_text(), re.M)
    assert len(steps) >= 9 and sum(int(t) for _, t in steps) <= 9 * 60  # step timeouts: the 9-minute budget
    assert any("bench throughput" in n for n, _ in steps)
