"""Leaderboard rows, grouping, ranking and renderers, from run folders written by the runner."""

from __future__ import annotations

import csv
import io
import re

import pytest

from cbx.cli import main
from cbx.lab import leaderboard as lb
from cbx.lab.runner import Runner
from cbx.lab.schema import EvalConfig, Experiment, Step
from lab_fakes import FakeBackend


class OtherMachine(FakeBackend):
    def hardware(self, device):
        return {"cpu": "another cpu", "torch_threads": 8, "device": "cpu", "torch": "x"}


def _exp(name, gain):
    steps = (Step("lab_test_gain", {"gain": gain}),) if gain is not None else ()
    return Experiment(name=name, steps=steps, synth={"batch_size": 4}, eval=EvalConfig(set="fake", samples=2))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("lb")
    r = Runner(root, backend=FakeBackend(3), progress=False)
    for name, g in (("half", 0.5), ("quarter", 0.25), ("mute", 0.0)):
        r.run(_exp(name, g))
    Runner(root, backend=OtherMachine(3), progress=False).run(_exp("half", 0.5))
    return root


def test_rows_are_baseline_relative_grouped_and_ranked_inside_groups(results):
    rows = lb.leaderboard(results)
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    assert len(groups) == 2  # two machines are never ranked together
    big = max(groups.values(), key=len)
    by = {r["name"]: r for r in big}
    base = by["baseline-tiny"]
    half = by["half"]
    # the fake's time and mean |x| scale with the gain: exact baseline-relative values
    assert half["speedup"] == pytest.approx(base["rtf"] / half["rtf"]) and half["speedup"] == pytest.approx(0.5)
    assert half["wer_delta"] == pytest.approx(half["wer"] - base["wer"])
    assert half["wer"] == pytest.approx(0.5 * base["wer"], rel=1e-5)
    assert half["sim_ratio"] == pytest.approx(half["sim"] / base["sim"]) and half["sim_ratio"] < 1
    assert half["work_mem_mib"] == pytest.approx(2000 / 2**20)  # peak minus what was in use at start
    # ranked by WER change (lower is better): quarter < half < baseline; the failed run unranked, last
    assert [r["name"] for r in big] == ["quarter", "half", "baseline-tiny", "mute"]
    assert [r["rank"] for r in big] == [1, 2, 3, None]
    assert "silent" in by["mute"]["failure"]
    small = min(groups.values(), key=len)
    assert [r["rank"] for r in small] == [1, 2]  # numbering restarts in each group
    # another ranking column, higher is better
    rows2 = lb.leaderboard(results, sort="speedup")
    assert [r["name"] for r in rows2 if r["group"] == big[0]["group"]][:3] == ["baseline-tiny", "half", "quarter"]


def test_renderers_and_files(results, tmp_path, capsys):
    rows = lb.leaderboard(results)
    md = lb.render_markdown(rows)
    assert md.count("## eval set fake") == 2 and "| quarter |" in md and "failed (not ranked)" in md
    parsed = list(csv.DictReader(io.StringIO(lb.render_csv(rows))))
    assert len(parsed) == len(rows) == 6 and {p["name"] for p in parsed} >= {"half", "mute"}
    out = tmp_path / "board"
    assert main(["leaderboard", "--results", str(results), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== eval set fake v1" in printed and "quarter" in printed and "not ranked" in printed
    page = (out / "leaderboard.html").read_text()
    srcs = re.findall(r"<audio controls preload='none' src='([^']+)'", page)
    assert len(srcs) == 2 * 5  # two samples for each done run; the failed run has none
    assert all((out / s).resolve().is_file() for s in srcs)  # relative links resolve
    assert "<script>" in page and "addEventListener('click'" in page
    for stem, *_ in lb.PLOTS:
        png = out / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["leaderboard", "--results", str(results), "--out", str(tmp_path / "e"), "--embed-audio"]) == 0
    assert "data:audio/wav;base64," in (tmp_path / "e" / "leaderboard.html").read_text()


def test_pareto_front():
    pts = [(1.0, 0.0), (2.0, 0.1), (1.5, 0.2), (2.0, 0.05), (0.5, -0.1)]
    # maximize x (speed-up), minimize y (WER change)
    assert lb.pareto_front(pts, (True, False)) == [0, 3, 4]
    assert lb.pareto_front([(1, 1), (1, 1)], (True, True)) == [0, 1]


def test_bad_sort_and_missing_folder(results, tmp_path, capsys):
    assert main(["leaderboard", "--results", str(results), "--sort", "name", "--no-files"]) == 2
    assert "not a ranking column" in capsys.readouterr().err
    assert main(["leaderboard", "--results", str(tmp_path / "nope")]) == 2
