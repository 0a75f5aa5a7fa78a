"""Student construction, checkpoint round trip, upstream loading and the cfm_student transform."""

from __future__ import annotations

import json

import pytest
import torch

from cbx.distill.flow import CFMBatch, student_solve, student_velocity, teacher_velocity
from cbx.distill.student import load_student, make_student, s3gen_state_dict, save_student
from cbx.errors import CbxError


def _batch(B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.zeros(B, 80, T)
    cond[:, :, :8] = torch.randn(B, 80, 8, generator=g)
    return CFMBatch(torch.randn(B, 80, T, generator=g), torch.ones(B, 1, T), torch.randn(B, 80, generator=g),
                    cond, torch.full((B,), 8), torch.full((B,), T)), torch.randn(B, 80, T, generator=g)


def _perturbed_student(tiny_model, seed=3):
    student = make_student(tiny_model.s3gen.flow.decoder.estimator)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g))
    return student


def test_fresh_student_is_the_conditional_teacher_for_any_end_time(tiny_model):
    est = tiny_model.s3gen.flow.decoder.estimator
    student = make_student(est)
    assert student.meanflow and not est.meanflow and student is not est
    b, x = _batch()
    with torch.no_grad():
        v = teacher_velocity(est, x, 0.3, b, cfg_rate=0.0)
        for r in (0.3, 0.7, 1.0):  # diagonal mixer: r is ignored until training changes it
            torch.testing.assert_close(student_velocity(student, x, 0.3, r, b), v, atol=1e-6, rtol=0)
        # and it differs from the CFG velocity the teacher integrates
        assert (teacher_velocity(est, x, 0.3, b, cfg_rate=0.7) - v).abs().max() > 1e-4


def test_checkpoint_round_trip_is_bit_exact(tiny_model, tmp_path):
    student = _perturbed_student(tiny_model)
    out = save_student(student, tmp_path / "student", n_steps=2, trained_steps=[1, 2], meta={"note": "x"})
    manifest = json.loads((out / "student.json").read_text())
    assert manifest["n_steps"] == 2 and manifest["meanflow"] is True
    loaded, m = load_student(out, tiny_model.s3gen.flow.decoder.estimator)
    for (k, a), (k2, b) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    b, z = _batch(seed=4)
    with torch.no_grad():
        assert torch.equal(student_solve(student, b, z, 2), student_solve(loaded, b, z, 2))


def test_student_weights_load_strictly_into_upstream_meanflow_s3gen(tiny_model):
    from cbx.engine.tiny_s3gen import build_tiny_s3gen

    student = _perturbed_student(tiny_model)
    turbo_like = build_tiny_s3gen(meanflow=True, seed=5)
    sd = s3gen_state_dict(tiny_model.s3gen, student)
    result = turbo_like.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(turbo_like.flow.decoder.estimator.time_embed_mixer.weight,
                               student.time_embed_mixer.weight, atol=0, rtol=0)


def test_load_rejects_bad_checkpoints(tiny_model, tmp_path):
    est = tiny_model.s3gen.flow.decoder.estimator
    with pytest.raises(CbxError, match="student.json"):
        load_student(tmp_path, est)
    out = save_student(make_student(est), tmp_path / "s", n_steps=1, trained_steps=[1])
    m = json.loads((out / "student.json").read_text())
    m["architecture"] = "0" * 16
    (out / "student.json").write_text(json.dumps(m))
    with pytest.raises(CbxError, match="another teacher"):
        load_student(out, est)
    m["format"] = "something-else"
    (out / "student.json").write_text(json.dumps(m))
    with pytest.raises(CbxError, match="format"):
        load_student(out, est)


def test_cfm_student_transform_swaps_the_estimator(tmp_path):
    from cbx.compress.registry import apply_transforms, build_config
    from cbx.engine import s3gen_batch as sb
    from cbx.engine.tiny import build_tiny

    model = build_tiny("original", seed=0)
    student = _perturbed_student(model)
    ckpt = save_student(student, tmp_path / "student", n_steps=2, trained_steps=[1, 2])
    with pytest.raises(CbxError, match="unknown key"):
        build_config("cfm_student", {"checkpoint": str(ckpt), "stepz": 1})
    with pytest.raises(CbxError, match="steps"):
        build_config("cfm_student", {"checkpoint": str(ckpt), "steps": 0})
    cfg = build_config("cfm_student", {"checkpoint": str(ckpt), "steps": 1})
    model = apply_transforms(model, [("cfm_student", cfg)])
    assert model.s3gen.meanflow is True and model.meta["cfm_steps"] == 1
    est = model.s3gen.flow.decoder.estimator
    assert est.meanflow and not est.training
    # The engine's batched solver, in MeanFlow mode, now runs the student: same numbers as ours.
    b, z = _batch(seed=6)
    inputs = sb.CFMInputs(b.mu, b.mask, b.spks, b.cond, [8, 8], [16, 16], [8, 8])
    got = sb.solve_cfm(est, inputs, z, 1, 0.7, meanflow=True)
    with torch.no_grad():
        torch.testing.assert_close(got, student_solve(student, b, z, 1), atol=1e-5, rtol=0)
    with pytest.raises(CbxError, match="MeanFlow"):  # a student cannot replace a student
        apply_transforms(model, [("cfm_student", cfg)])
