"""``cbx bench prune`` through ``cbx.cli.main`` on the tiny model: every row, the ratios against
the unpruned row, and the last line the closing note quotes."""

from __future__ import annotations

import re

from cbx.cli import main


def test_bench_prune_prints_every_row_and_the_depth_line_last(capsys):
    rc = main(["bench", "prune", "--model", "tiny", "--tokens", "2", "6", "--repeats", "1", "--prompt", "8",
               "--cfm-frames", "24", "--cfm-steps", "1", "--group-size", "32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for row in ("unpruned (2L)", "depth 25% (2L)", "depth 33% (1L)", "ffn 25% (2L)", "d33%+int4 (1L)"):
        assert row in out, row
    assert "CFM estimator" in out and "T3 decode step" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"t3 pruned 33% depth: decode speed-up \d+\.\d\dx, weights \d+\.\d\d GB", last), last
    # the unpruned row is its own reference; the 1-layer rows hold fewer weight bytes
    table = {ln.split(" (")[0]: ln.split() for ln in out.splitlines() if re.match(r"(unpruned|depth 33%|d33%\+int4) \(", ln)}
    assert float(table["d33%+int4"][-1].rstrip("x")) < float(table["depth 33%"][-1].rstrip("x")) < 1.0


def test_bench_prune_rejects_bad_numbers(capsys):
    assert main(["bench", "prune", "--tokens", "5", "5"]) == 2
    assert "--tokens" in capsys.readouterr().err
    # the timing window runs from step N1 to step N2 - 1: it must hold a step
    assert main(["bench", "prune", "--tokens", "5", "6"]) == 2
    assert "N1 < N2 - 1" in capsys.readouterr().err
