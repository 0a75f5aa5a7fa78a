"""The README documents what users see, and cannot drift from it: it opens with the demo's
pictures and then the two commands; every registered leaderboard column is in its column table
(generated); every file of a run folder and every key of ``run.json`` is in its run-folder
section (checked against a run the runner writes here)."""

from __future__ import annotations

import re
from pathlib import Path

from cbx.lab import leaderboard as lb
from cbx.lab.runner import Runner
from cbx.lab.schema import EvalConfig, Experiment, Step
from lab_fakes import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    body = README.split(f"\n## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def test_readme_opens_with_the_demo_pictures_then_the_two_commands():
    first_code = README.index("```")
    pictures = re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", README[:first_code])
    assert pictures == ["docs/leaderboard.png", "docs/pareto.png"]
    for pic in pictures:
        data = (ROOT / pic).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200 * 1024, pic
    block = README[first_code:].split("\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_every_registered_column_is_documented_in_the_readme():
    import cbx.cli  # noqa: F401  (every module that registers a column)

    block = README.split(lb.COLUMNS_DOC_BEGIN, 1)[1].split(lb.COLUMNS_DOC_END, 1)[0]
    assert block.strip() == lb.columns_markdown().strip(), "README column table is stale: run scripts/readme_columns.py"
    documented = re.findall(r"^\| `([^`]+)` \|", block, re.M)
    assert documented == [c.key for c in lb.COLUMNS]
    extra = lb.register_column(lb.Column("lab_test_undocumented", "undoc", legend="a column nobody documented"))
    try:  # a new column makes the README stale
        assert "lab_test_undocumented" in lb.columns_markdown() and lb.columns_markdown().strip() != block.strip()
    finally:
        lb.COLUMNS.remove(extra)
        del lb.COLS[extra.key]


def test_every_file_and_run_json_key_of_a_run_folder_is_documented(tmp_path):
    doc = _section("What a run folder holds")
    documented = set(re.findall(r"`([^`]+)`", doc))
    exp = Experiment(name="doc", steps=(Step("lab_test_gain", {"gain": 0.5}),), synth={"batch_size": 2}, eval=EvalConfig(set="fake"))
    out = Runner(tmp_path / "runs", backend=FakeBackend(2), progress=False).run(exp)
    base_dir = out.run_dir.parent / out.record["baseline_run"]
    import json

    keys = set(out.record) | set(json.loads((base_dir / "run.json").read_text()))
    missing = sorted(k for k in keys if k not in documented)
    assert not missing, f"run.json keys not in the README's run-folder section: {missing}"
    for p in out.run_dir.rglob("*"):  # files by name, per-utterance ones by pattern
        rel = p.relative_to(out.run_dir).as_posix()
        stem_pattern = re.sub(r"/[^/]+\.(wav|json)$", r"/<id>.\1", rel)
        candidates = {rel, stem_pattern, rel + "/", rel.split("/")[0] + "/"}
        assert candidates & documented or any(d.startswith(rel.split("/")[0] + "/") for d in documented), rel
