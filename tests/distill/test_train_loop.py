"""The step loop, checkpoints and resume that `cbx distill` and `cbx heal` share
(:func:`cbx.distill.train.run_steps`, :func:`save_checkpoint`, :func:`resumable_checkpoint`,
:func:`resume`), driven on a toy regression so that every step is cheap: an interrupted run
resumed through them ends with the weights and loss log of an uninterrupted one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cbx.errors import CbxError

X = torch.linspace(-1, 1, 24).view(-1, 1).repeat(1, 3) * torch.tensor([1.0, -0.5, 2.0])
Y = X @ torch.tensor([[0.3], [1.2], [-0.7]]) + 0.1


def _t_cfg(**over):
    base = dict(max_steps=6, grad_accum=2, batch_size=4, seed=3, lr=0.05, grad_clip=1.0, log_every=1,
                eval_every=2, save_every=2, keep_checkpoints=2, device="cpu", mixed_precision="no")
    return SimpleNamespace(**{**base, **over})


def _run(out_dir, t_cfg, stop_after=None, fingerprint="fp-a"):
    """One invocation of a trainer on the toy model: fresh objects, resume when a checkpoint is
    there, steps to the end (or ``stop_after``). Returns (model, calls, eval steps, start)."""
    from accelerate import Accelerator

    from cbx.distill.train import resumable_checkpoint, resume, run_steps

    checkpoint = resumable_checkpoint(t_cfg, out_dir, fingerprint, "toy")
    out_dir.mkdir(parents=True, exist_ok=True)  # as start_accelerator does
    acc = Accelerator(cpu=True, project_dir=str(out_dir))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = acc.prepare(model, opt, sched)
    start = resume(acc, checkpoint, "cbx toy")
    calls, evals = [], []

    def micro_step(step, micro, rows):
        calls.append((step, micro, tuple(rows)))
        loss = (model(X[rows]) - Y[rows]).pow(2).mean()
        acc.backward(loss / t_cfg.grad_accum)
        return float(loss.detach())

    def evaluate_line(step):
        evals.append(step)
        return f"step {step}: toy"

    end = run_steps(acc, opt, sched, list(model.parameters()), t_cfg, out_dir, fingerprint, start=start,
                    stop_after=stop_after, n_rows=len(X), micro_step=micro_step, evaluate_line=evaluate_line,
                    desc="toy", progress=False)
    acc.end_training()
    return acc.unwrap_model(model), calls, evals, start, end


def _losses(out_dir):
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())]


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    t_cfg = _t_cfg()
    straight, calls, evals, start, end = _run(tmp_path / "straight", t_cfg)
    assert (start, end) == (0, 6)
    assert [c[:2] for c in calls] == [(s, m) for s in range(1, 7) for m in range(2)]
    assert all(len(c[2]) == 4 for c in calls)
    assert evals == [2, 4]  # every eval_every steps but the last
    ckpts = sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir())
    assert ckpts == ["step-000004", "step-000006"]  # keep_checkpoints: 2
    state = json.loads((tmp_path / "straight" / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state == {"step": 6, "fingerprint": "fp-a"}

    out = tmp_path / "resumed"
    _, calls1, evals1, start, end = _run(out, t_cfg, stop_after=3)
    assert (start, end) == (0, 3) and evals1 == [2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    capsys.readouterr()
    resumed, calls2, evals2, start, end = _run(out, t_cfg)
    assert (start, end) == (3, 6) and evals2 == [4]
    assert f"cbx toy: resumed from {out / 'checkpoints' / 'step-000003'} (step 3)" in capsys.readouterr().err
    assert calls1 + calls2 == calls  # the same batches, step for step

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=0), (a, b)
    torch.manual_seed(0)
    assert not torch.allclose(straight.weight, torch.nn.Linear(3, 1).weight, atol=1e-3)  # training moved it
    log_a, log_b = _losses(tmp_path / "straight"), _losses(out)
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], abs=1e-7)
    assert [r["lr"] for r in log_a] == pytest.approx([r["lr"] for r in log_b])


def test_checkpoint_of_other_settings_or_fp16_on_cpu_is_refused(tmp_path):
    from cbx.distill.train import resumable_checkpoint

    t_cfg = _t_cfg(max_steps=2)
    assert resumable_checkpoint(t_cfg, tmp_path, "fp-a") is None
    _run(tmp_path, t_cfg, stop_after=1)
    assert resumable_checkpoint(t_cfg, tmp_path, "fp-a") == tmp_path / "checkpoints" / "step-000001"
    with pytest.raises(CbxError, match=r"step-000001: checkpoint was made with other toy settings "
                                       r"\(fingerprint fp-a != fp-b\); use another train.out_dir"):
        resumable_checkpoint(t_cfg, tmp_path, "fp-b", "toy")
    with pytest.raises(CbxError, match="fp16 needs a CUDA GPU"):
        resumable_checkpoint(_t_cfg(mixed_precision="fp16"), tmp_path, "fp-a")
