"""``cbx bench quant`` through ``cbx.cli.main`` on the tiny model: every T3 and CFM row, the
memory-floor table and line (CPU), the kernel each quantized row ran, and the last line the
closing note quotes."""

from __future__ import annotations

import re

from cbx.cli import main


def test_bench_quant_prints_every_row_the_floor_and_the_int4_line_last(capsys):
    rc = main(["bench", "quant", "--model", "tiny", "--tokens", "2", "6", "--repeats", "1", "--prompt", "8",
               "--cfm-frames", "24", "--cfm-steps", "1", "--group-size", "32", "--no-libraries"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "T3 decode step, batch 2 (CFG), KV cache 8 + 2..5" in out
    assert "CFM estimator" in out
    floor_rows = {ln.split()[0]: ln.split() for ln in out.split("against the memory floor")[1].splitlines()[2:6]}
    assert set(floor_rows) == {"fp32", "bf16", "int8", "int4"}, floor_rows
    # bytes a step reads (weights + KV cache): fewer with narrower weights; floors follow the bytes
    mb = {k: float(v[-1]) for k, v in floor_rows.items()}
    assert mb["fp32"] > mb["bf16"] > mb["int8"] > mb["int4"] > 0, mb
    assert all(float(v[1]) > 0 and float(v[2]) > 0 for v in floor_rows.values()), floor_rows
    m = re.search(r"t3 int4 step (\d+\.\d\d) ms, memory floor (\d+\.\d\d\d) ms \((\d+\.\d\d)x floor\)", out)
    assert m, out
    assert float(m.group(1)) == float(floor_rows["int4"][1]) and float(m.group(2)) == float(floor_rows["int4"][2])
    # the int4 row ran the int4 kernel (not a silent dequantize fallback)
    kernels = next(ln for ln in out.splitlines() if ln.startswith("kernel paths:"))
    assert "int4pack-cpu" in kernels and "int8pack-cpu" in kernels, kernels
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"t3 int4 decode speed-up vs fp32: \d+\.\d\dx, weights \d+\.\d\d GB", last), last


def test_bench_quant_rejects_bad_numbers(capsys):
    assert main(["bench", "quant", "--tokens", "5", "5"]) == 2
    assert "--tokens" in capsys.readouterr().err
    # the timing window runs from step N1 to step N2 - 1: it must hold a step
    assert main(["bench", "quant", "--tokens", "5", "6"]) == 2
    assert "N1 < N2 - 1" in capsys.readouterr().err


def test_decode_windows_prefill_as_the_synthesizer_would(tiny_model, monkeypatch):
    """A bf16 T3's prefill runs in float32 where bf16 is emulated (outside the timed window, but
    seconds per run there), in bf16 where it is native; an fp32 T3 stays fp32."""
    import torch

    from cbx.compress.bench import _prefill_dtype
    from cbx.engine import synth

    monkeypatch.setattr(synth, "auto_dtype", lambda device: "fp32")
    assert _prefill_dtype(tiny_model.t3, torch.bfloat16) == torch.float32
    assert _prefill_dtype(tiny_model.t3, torch.float32) == torch.float32
    monkeypatch.setattr(synth, "auto_dtype", lambda device: "bf16")
    assert _prefill_dtype(tiny_model.t3, torch.bfloat16) == torch.bfloat16
