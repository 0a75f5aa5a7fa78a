"""Distillation configs: strict keys with paths and choices, objective parameters, CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbx.distill.cli import parse_overrides
from cbx.distill.config import from_dict, load_config
from cbx.errors import CbxError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_tiny_config_loads_with_its_objective():
    cfg = load_config(REPO / "experiments" / "distill-tiny.yaml")
    assert cfg.teacher.model == "tiny"
    assert set(cfg.student.eval_steps) == {1, 2}
    assert cfg.objective_config() is not None
    assert cfg.resolved()["objective"]["params"]  # defaults of the objective filled in


@pytest.mark.parametrize("data, match", [
    ({"train": {"max_stepz": 3}}, r"train\.max_stepz: unknown key; valid keys: .*max_steps"),
    ({"train": {"mixed_precision": "fp8"}}, r"train\.mixed_precision: expected one of 'no', 'bf16', 'fp16'"),
    ({"objective": {"name": "magic"}}, r"unknown objective 'magic'; valid choices: endpoint, intmeanflow, mixed"),
    ({"objective": {"name": "endpoint", "params": {"stepz": [1]}}}, r"objective\.params\.stepz: unknown key"),
    ({"objective": {"name": "endpoint", "params": {"steps": [0]}}}, r"positive integers"),
    ({"data": {"max_tokens": 2, "min_tokens": 5}}, r"data\.max_tokens"),
    ({"student": {"default_steps": 4}}, r"student\.default_steps"),
    ({"wat": 1}, r"wat: unknown key; valid keys: teacher, data, student, objective, train, tracking"),
])
def test_bad_configs_name_the_key_and_the_choices(data, match):
    with pytest.raises(CbxError, match=match):
        from_dict(data)


def test_load_config_names_the_file_and_applies_overrides(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("train: {max_steps: 3}\n")
    cfg = load_config(p, parse_overrides(["train.out_dir=/tmp/x", "train.lr=0.01"]))
    assert cfg.train.out_dir == "/tmp/x" and cfg.train.lr == 0.01 and cfg.train.max_steps == 3
    p.write_text("train: [1, 2]\n")
    with pytest.raises(CbxError, match=str(p)):
        load_config(p)
    with pytest.raises(CbxError, match="KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_fingerprint_ignores_cadence_but_not_what_shapes_the_weights():
    a = from_dict({})
    assert a.training_fingerprint() == from_dict({"train": {"max_steps": 999, "eval_every": 7}}).training_fingerprint()
    assert a.training_fingerprint() != from_dict({"train": {"lr": 0.1}}).training_fingerprint()
    assert a.training_fingerprint() != from_dict({"objective": {"name": "intmeanflow"}}).training_fingerprint()


def test_cli_reports_bad_config_as_exit_status_2(tmp_path, capsys):
    from cbx.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text("train: {bogus: 1}\n")
    assert main(["distill", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.bogus: unknown key" in err and str(p) in err
