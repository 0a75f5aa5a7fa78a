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
    rows = lb.leaderboard(results, sort="wer_delta")
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
    assert half["mem_mib"] == pytest.approx(half["size_mib"] + 2000 / 2**20)  # weights + the run's own work
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
    rows = lb.leaderboard(results, sort="wer_delta")
    md = lb.render_markdown(rows)
    assert md.count("## eval set fake") == 3 - 1 and "failed (not ranked)" in md
    assert re.search(r"\| quarter-[0-9a-f]{8} \|", md) and "RANDOM WEIGHTS" in md and "## Columns" in md
    parsed = list(csv.DictReader(io.StringIO(lb.render_csv(rows))))
    assert len(parsed) == len(rows) == 6 and {p["name"] for p in parsed} >= {"half", "mute"}
    out = tmp_path / "board"
    assert main(["leaderboard", "--results", str(results), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== eval set fake v1" in printed and "quarter" in printed and "not ranked" in printed
    page = (out / "leaderboard.html").read_text()
    srcs = re.findall(r"<audio controls preload='none' title='[^']*' src='([^']+)'", page)
    # two samples for each done run, and beside each compressed one the baseline's clip; the failed run has none
    assert len(srcs) == 2 * 5 + 2 * 3
    assert all((out / s).resolve().is_file() for s in srcs)  # relative links resolve
    for m in re.finditer(r"<tr><td class='t'>(half|quarter)-.*?</tr>", page):  # same utterance side by side
        a, b = re.findall(r"src='([^']+)'", m.group(0))
        assert a.rsplit("/", 1)[1] == b.rsplit("/", 1)[1] and "baseline-tiny" in b and "sentence number" in m.group(0)
    assert "<script>" in page and "addEventListener('click'" in page
    for stem, *_ in lb.PLOTS[:2]:  # the fake scores no mel L1: that plot is skipped (tested below)
        png = out / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["leaderboard", "--results", str(results), "--out", str(tmp_path / "e"), "--embed-audio"]) == 0
    assert "data:audio/wav;base64," in (tmp_path / "e" / "leaderboard.html").read_text()


def test_pareto_front():
    pts = [(1.0, 0.0), (2.0, 0.1), (1.5, 0.2), (2.0, 0.05), (0.5, -0.1)]
    # maximize x (speed-up), minimize y (WER change)
    assert lb.pareto_front(pts, (True, False)) == [0, 3, 4]
    assert lb.pareto_front([(1, 1), (1, 1)], (True, True)) == [0, 1]


def _text_boxes(fig, texts):
    from matplotlib.text import Text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return [Text.get_window_extent(t, r) for t in texts]


@pytest.mark.parametrize("n_cluster", [6, 14])
def test_pareto_labels_never_overlap_in_a_dense_cluster(n_cluster):
    """A planted cluster (the demo's shape: many runs at mel L1 ~ 0 and similar speed, two on
    the same spot, a few spread out): no two label boxes overlap, none leaves the axes, and
    every run is named on the plot or, by number, in the key beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rng = np.random.default_rng(0)
    pts = [(1.0 + 0.02 * rng.standard_normal(), 0.001 * rng.random()) for _ in range(n_cluster)]
    pts += [pts[0], (0.7, 0.002), (1.5, 0.2), (1.85, 0.0)]
    names = [f"run-{i}-" + "x" * (i % 4 * 5) for i in range(len(pts))]
    fig = plt.figure(figsize=(7, 5), dpi=100)
    ax = fig.add_axes((0.12, 0.12, 0.83, 0.74))
    ax.scatter(*zip(*pts))
    ax.legend(["runs"], loc="upper right")
    lay = lb.place_labels(ax, pts, names)
    boxes = _text_boxes(fig, lay.texts)
    frame = ax.get_window_extent()
    for a in range(len(boxes)):
        assert frame.x0 <= boxes[a].x0 and boxes[a].x1 <= frame.x1 and frame.y0 <= boxes[a].y0 and boxes[a].y1 <= frame.y1
        for b in range(a + 1, len(boxes)):
            assert not boxes[a].overlaps(boxes[b]), (lay.texts[a].get_text(), lay.texts[b].get_text())
    shown = [t.get_text() for t in lay.texts]
    named = [n for n in names if n in shown]
    assert sorted(named + list(lay.numbered.values())) == sorted(names)  # each run once: by name or in the key
    assert all(str(k) in shown for k in lay.numbered)  # each number is on the plot
    if lay.numbered:  # the key sits outside the axes, so it covers no label
        assert _text_boxes(fig, [lay.key])[0].x0 >= frame.x1
    assert len(named) >= len(pts) // 2  # most runs keep their names even in the cluster
    plt.close(fig)


def test_terminal_table_fits_120_columns_with_run_ids_legend_banner_and_reasons(results):
    rows = lb.leaderboard(results)
    text = lb.render_terminal(rows)
    assert max(len(line) for line in text.splitlines()) <= 120
    for r in rows:
        assert r["run_id"] in text
    assert "Columns:" in text and "ΔWER:" in text and "RANDOM WEIGHTS" in text
    # every "-" carries a footnote letter, and every letter a reason
    cells = re.findall(r"(?<=\s)-([a-z])(?=\s|$)", text)
    assert cells
    for letter in set(cells):
        assert re.search(rf"^-{letter}: .+: .+", text, re.M), letter
    assert "baseline: fidelity is measured against it" in text
    assert re.search(r"^-[a-z]: [^:]*MOS[^:]*: not measured \(not in eval.metrics\)", text, re.M)
    # random-weight groups are sorted by fidelity unless asked otherwise
    assert {r["sorted_by"] for r in rows} == {"t3_top1_agreement"}
    wide = lb.render_terminal(rows, wide=True)
    assert "lab_test_gain(gain=0.25)" in wide and "T3 top-1 agreement" in wide


def _rec(run_id, wer, base=None, paired=None, status="done"):
    return {
        "run_id": run_id, "name": run_id, "status": status, "is_baseline": base is None, "baseline_run": base,
        "config": {"model": "ResembleAI/chatterbox", "steps": [] if base is None else [{"transform": "int8_weight_only", "params": {}}]},
        "eval_set": {"name": "s", "version": "1", "n_items": 10}, "hardware_id": "h", "hardware_label": "cpu",
        "eval_suite_version": "1", "metric_versions": {"wer": "1"},
        "aggregate": {"metrics": {"wer": {"value": wer, "n": 10, "ci95": [wer - 0.01, wer + 0.01]}}},
        "speed": {"rtf": 1.0, "work_mem_bytes": 2**20}, "model_bytes": 2**21, "paired": paired or {},
    }


def test_differences_within_noise_are_marked_and_ranked_level_with_the_baseline(tmp_path):
    from pathlib import Path

    base = _rec("base", 0.10)
    noisy = _rec("noisy", 0.09, "base", {"wer_delta": {"value": -0.01, "ci95": [-0.03, 0.01]}})
    better = _rec("better", 0.05, "base", {"wer_delta": {"value": -0.05, "ci95": [-0.07, -0.03]}})
    worse = _rec("worse", 0.20, "base", {"wer_delta": {"value": 0.10, "ci95": [0.05, 0.15]}})
    rows = [lb.row_of(r, base if r is not base else None, Path(tmp_path / r["run_id"])) for r in (base, noisy, better, worse)]
    ranked = lb.rank(rows, None)
    assert not ranked[0]["random_weights"] and ranked[0]["sorted_by"] == "wer_delta"
    assert [(r["name"], r["rank"]) for r in ranked] == [("better", 1), ("base", 2), ("noisy", 2), ("worse", 4)]
    by = {r["name"]: r for r in ranked}
    assert lb.fmt(by["noisy"], "wer_delta") == "-0.010±0.02≈" and lb.fmt(by["worse"], "wer_delta") == "+0.100±0.05"
    text = lb.render_terminal(ranked)
    assert "RANDOM" not in text and re.search(r"^=2 +noisy", text, re.M)
    assert lb.render_terminal(ranked, width=70).count("left out to fit 70 columns") == 1
    assert lb.render_html(ranked, tmp_path).count("'>=2</td>") == 2  # the page marks shared ranks too
    assert all(len(line) <= 70 for line in lb.render_terminal(ranked, width=70, legend=False).splitlines())


def test_html_default_table_is_the_short_one_and_the_rest_is_behind_a_toggle(results, tmp_path):
    """The page's default table has the terminal's columns with short headers and no interval
    text (so it fits a 1400 px window: scripts/html_check.py measures it in Chromium); every
    other column is in the page behind the "show every column" toggle; intervals are tooltips."""
    rows = lb.leaderboard(results)
    page = lb.render_html(rows, tmp_path)
    first = page.split("<table class='lb' id='g0'>", 1)[1].split("</table>", 1)[0]
    heads = re.findall(r"<th class='([^']*)'(?: data-d='(-?1)')? title='[^']*'>([^<]*)</th>", first)
    grp = [r for r in rows if r["group"] == lb._groups(rows)[0][1][0]["group"]]
    shown, extra = lb.html_keys(grp)
    assert [h for c, d, h in heads if "x" not in c.split()] == [lb.COLS[k].header for k in shown]
    assert [h for c, d, h in heads if "x" in c.split()] == [lb.COLS[k].label for k in extra]
    assert set(shown) | set(extra) >= set(lb.wide_keys()) and "method" in extra
    assert {h: d for c, d, h in heads}["speed"] == "1" and {h: d for c, d, h in heads}["ΔWER"] == "-1"  # best first
    assert "data-t='g0'" in page and "show every column" in page
    assert "±" not in first and "95% interval [" in first


def _first_drops(grp):
    """What the terminal leaves out first when the window is just too narrow for all columns."""
    for w in range(200, 40, -1):
        m = re.search(r"left out to fit \d+ columns: (.*); see", lb.render_terminal(grp, width=w, legend=False))
        if m and m.group(1) != "intervals":
            return m.group(1)
    return None


def test_a_column_that_is_zero_everywhere_goes_before_a_real_one(results):
    rows = [r for r in lb.leaderboard(results) if r["status"] == "done"]
    grp = [r for r in rows if r["group"] == rows[0]["group"]]
    assert all(r["n_failed"] == 0 for r in grp) and "n_failed" in lb.terminal_keys(grp) and "n_failed" in lb.IDLE_DROP
    assert _first_drops(grp) == "intervals, fail (0 in every run)"
    grp[0] = {**grp[0], "n_failed": 1}  # not idle any more: the drop order applies
    assert _first_drops(grp) == "intervals, " + lb.COLS[next(k for k in lb.drop_order(grp) if k in lb.terminal_keys(grp))].header


def test_random_weight_groups_drop_quality_columns_before_fidelity(results):
    """On random weights WER/SIM/MOS mean nothing (the banner says so): a narrow table keeps
    T3 KL and top-1 and leaves those out first; real weights keep quality and drop KL first."""
    rows = [r for r in lb.leaderboard(results) if r["status"] == "done"]
    grp = [{**r, "n_failed": 1, "random_weights": True} for r in rows if r["group"] == rows[0]["group"]]
    assert lb.drop_order(grp)[:3] == ("mos", "sim_ratio", "wer_delta")
    first = _first_drops(grp).split(", ")[1]
    assert first in {lb.COLS[k].header for k in ("mos", "sim_ratio", "wer_delta")}
    real = [{**r, "random_weights": False} for r in grp]
    assert lb.drop_order(real) == lb.DROP_ORDER
    assert _first_drops(real).split(", ")[1] == lb.COLS[next(k for k in lb.DROP_ORDER if k in lb.terminal_keys(real))].header


def test_a_registered_column_reaches_every_renderer(results, tmp_path):
    col = lb.Column("lab_test_kernel", "kern", "kernel path", "kernel each quantized module ran", "{}",
                    value=lambda rec, base: "fake-kernel" if rec.get("config", {}).get("steps") else None,
                    reason=lambda rec, base: "baseline: nothing quantized")
    lb.register_column(col, after="method_short")
    try:
        rows = lb.leaderboard(results)
        assert "fake-kernel" in lb.render_terminal(rows) and "baseline: nothing quantized" in lb.render_terminal(rows)
        assert "kernel path" in lb.render_markdown(rows) and "lab_test_kernel" in lb.render_csv(rows).splitlines()[0]
        assert "kernel each quantized module ran" in lb.render_html(rows, tmp_path)
        assert [c.key for c in lb.COLUMNS].index("lab_test_kernel") == [c.key for c in lb.COLUMNS].index("method_short") + 1
    finally:
        lb.COLUMNS.remove(col)
        del lb.COLS[col.key]


def test_a_skipped_plot_says_why(results, tmp_path):
    skipped = []
    lb.write_all(lb.leaderboard(results), tmp_path / "b", skipped=skipped)
    stems = dict(skipped)
    assert "pareto_speedup_vs_mel_l1" in stems and "mel L1" in stems["pareto_speedup_vs_mel_l1"]
    page = (tmp_path / "b" / "leaderboard.html").read_text()
    assert "Plot pareto_speedup_vs_mel_l1 skipped:" in page


def test_bad_sort_and_missing_folder(results, tmp_path, capsys):
    assert main(["leaderboard", "--results", str(results), "--sort", "name", "--no-files"]) == 2
    assert "not a ranking column" in capsys.readouterr().err
    assert main(["leaderboard", "--results", str(tmp_path / "nope")]) == 2
