"""A pruned CFM estimator healed by the flow objectives: `prune:` in a distill config drops
transformer blocks from the student's copy of the teacher's estimator, the endpoint objective
trains it against the unpruned teacher, and `cfm_student` loads the pruned student."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cbx.errors import CbxError

CAL = {"calib_texts": 2, "calib_max_speech_tokens": 24, "calib_voices": ["builtin"]}


def _cfg(tmp_path, **over):
    from cbx.distill.config import from_dict

    d = {
        "teacher": {"model": "tiny", "steps": 10, "cfg_rate": 0.7},
        "prune": [{"transform": "prune_depth", "params": {"part": "cfm", "fraction": 0.5, **CAL}}],
        "data": {"voices": ["synthetic"], "prompt_seconds": 0.24, "tokens": "random", "min_tokens": 16,
                 "max_tokens": 24, "n_train": 96, "n_heldout": 16, "shard_size": 48, "batch_size": 32,
                 "trajectory": False},
        "student": {"eval_steps": [1, 2], "default_steps": 2},
        "objective": {"name": "endpoint", "params": {"steps": [1, 2], "loss": "l1"}},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 40, "batch_size": 8, "lr": 0.001,
                  "lr_schedule": "cosine", "warmup_steps": 10, "device": "cpu", "eval_every": 0, "save_every": 0},
        **over,
    }
    return from_dict(d)


def test_prune_steps_of_a_distill_config_are_checked():
    from cbx.distill.config import from_dict

    with pytest.raises(CbxError, match=r"prune\[0\]: a student is pruned in its CFM estimator only"):
        from_dict({"prune": [{"transform": "prune_depth", "params": {"count": 1}}]})
    with pytest.raises(CbxError, match=r"prune\[0\].params: unknown key"):
        from_dict({"prune": [{"transform": "prune_depth", "params": {"part": "cfm", "cnt": 1}}]})
    # no prune: the resolved record (and every hash of it) is what it was before the key existed
    assert "prune" not in from_dict({}).resolved()


def test_pruned_cfm_student_heals_and_loads_as_a_step(tmp_path, tiny_model, capsys):
    from cbx.compress import prune as P
    from cbx.compress.checkpoint import load_compressed, save_compressed
    from cbx.compress.registry import apply_transforms, build_config
    from cbx.distill.train import train

    cfg = _cfg(tmp_path)
    out = train(cfg, progress=False, model=copy.deepcopy(tiny_model))
    capsys.readouterr()
    n_orig = len(P.cfm_blocks(tiny_model.s3gen.flow.decoder.estimator))
    assert out["pruned"]["num_blocks_orig"] == n_orig and len(out["pruned"]["dropped"]) == round(n_orig * 0.5)
    before, after = out["eval_untrained"], out["eval"]
    # healing: the pruned 2-step student's held-out mel L1 to the unpruned 10-step teacher falls
    assert after["student_2"] <= 0.7 * before["student_2"], (before, after)
    assert after["student_1"] <= 0.7 * before["student_1"], (before, after)
    manifest = json.loads((tmp_path / "run" / "student" / "student.json").read_text())
    assert manifest["dropped_blocks"] == out["pruned"]["dropped"]

    m = apply_transforms(copy.deepcopy(tiny_model), [("cfm_student", build_config(
        "cfm_student", {"checkpoint": out["student_dir"]}))])
    est = m.s3gen.flow.decoder.estimator
    assert len(P.cfm_blocks(est)) == n_orig - len(out["pruned"]["dropped"])
    assert m.meta["pruned"]["cfm"]["dropped"] == out["pruned"]["dropped"]
    # the pruned student saves and loads back bit-exactly in a compressed checkpoint
    save_compressed(m, tmp_path / "ckpt")
    back = load_compressed(tmp_path / "ckpt")
    a, b = est.state_dict(), back.s3gen.flow.decoder.estimator.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
