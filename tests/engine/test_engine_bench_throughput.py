"""cbx bench throughput: refuses the full-size model without CUDA; its figures are arithmetic
over one timed pass; the tiny model runs the whole code path on CPU."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbx.engine import bench_throughput as bt
from cbx.errors import CbxError

REPO = Path(__file__).resolve().parents[2]


def _args(*argv):
    p = argparse.ArgumentParser()
    bt.add_arguments(p)
    return p.parse_args(list(argv))


def test_plan_refuses_full_size_without_cuda_and_picks_the_decode_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(CbxError, match="CUDA GPU"):
        bt.plan(_args(), cpu)
    assert bt.plan(_args(), cuda) == {"compile": "cudagraphs", "batch": 16}
    assert bt.plan(_args("--model", "tiny"), cpu)["compile"] is None
    assert bt.plan(_args("--compile", "none"), cuda)["compile"] is None
    assert bt.plan(_args("--utterances", "3"), cuda)["batch"] == 3
    with pytest.raises(CbxError, match="need a CUDA device"):
        bt.plan(_args("--model", "tiny", "--compile", "cudagraphs"), cpu)
    for flag in ("--utterances", "--batch", "--tokens", "--cfm-steps"):
        with pytest.raises(CbxError, match=flag):
            bt.plan(_args("--model", "tiny", flag, "0"), cpu)


def test_figures():
    f = bt.figures(audio_s=8.0, wall_s=2.0, speech_tokens=200, t3_s=1.0)
    assert f == {"audio_per_wall": 4.0, "rtf": 0.25, "tokens_per_s": 100.0, "t3_tokens_per_s": 200.0}
    with pytest.raises(ValueError):
        bt.figures(1.0, 0.0, 1, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cli_full_refused_on_cpu_with_one_line():
    out = subprocess.run([sys.executable, "-m", "cbx.cli", "bench", "throughput", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2
    assert "--model full measures batched synthesis on a CUDA GPU" in out.stderr
    assert "Traceback" not in out.stderr


def test_tiny_smoke_run_on_cpu(capsys):
    assert bt.run(_args("--model", "tiny", "--device", "cpu", "--utterances", "3", "--batch", "2",
                        "--tokens", "6", "--cfm-steps", "1", "--no-watermark")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("throughput: ") and "(3 utterances, batch 2, 6 tokens each, decode: eager)" in lines[-1]
    value = float(lines[-1].split()[1])
    assert value > 0
    audio = next(line for line in lines if line.startswith("audio "))
    assert float(audio.split()[1]) == pytest.approx(3 * 6 / 25, abs=0.2)  # 6 tokens = 0.24 s each
