"""Train a few-step CFM student from recorded teacher data (``cbx distill CONFIG.yaml``).

One script for one CPU, one GPU or several (``accelerate launch -m cbx.distill.cli CONFIG``):
:class:`accelerate.Accelerator` places the student, wraps it for data parallelism, runs mixed
precision (``train.mixed_precision``) and saves/restores the training state. Gradient
accumulation is done here explicitly (``no_sync`` on all but the last micro-batch) so that one
"step" is always one optimizer update, whatever the accumulation, and a checkpoint always falls
on an update boundary.

Resume gives the same weights as an uninterrupted run (``tests/distill`` checks it): the batch
of (step, micro-batch, rank) is a pure function of those numbers and the seed (a seeded
permutation per epoch), the objective's random draws come from a generator seeded the same
way, and the checkpoint holds the student, the optimizer and the scheduler (accelerate's
``save_state``) plus the step and a fingerprint of the training settings
(``trainer_state.json``), which must match to resume.

The step loop, the checkpoints and the resume (:func:`run_steps`, :func:`save_checkpoint`,
:func:`resumable_checkpoint`, :func:`resume`) serve ``cbx heal`` (:mod:`cbx.distill.heal`) as
well: a trainer gives its micro-batch step (forward, backward, loss) and its evaluation line.

Evaluation compares the student with the teacher *at equal steps* on held-out examples: mel L1
(generated frames only) to the teacher's 10-step CFG output, for the student at each of
``student.eval_steps`` and the teacher at the same step counts (and at its own step count,
which must reproduce the recorded targets: a check that data and teacher agree). The run ends
with the line ``student mel L1 below teacher at equal steps: 1 step NN%, 2 steps NN%``.

Logging: a progress bar on stderr, ``metrics.jsonl`` in the output folder (always), and W&B
through accelerate's tracker when ``tracking.backend: wandb`` (``WANDB_MODE=offline`` works
without a network); with ``tracking: none`` accelerate's ``log`` is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cbx.distill.config import DistillConfig
from cbx.distill.flow import masked_l1, student_solve, teacher_solve
from cbx.errors import CbxError

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
EVAL_BATCH = 16


def _seed_of(*parts: int) -> int:
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def batch_indices(n: int, seed: int, step: int, micro: int, grad_accum: int, batch_size: int,
                  rank: int = 0, world: int = 1) -> list[int]:
    """Rows of micro-batch ``micro`` of optimizer step ``step`` (1-based) on process ``rank``.

    Global sample positions run through one seeded permutation of the rows per epoch, so the
    order is fixed by the seed alone and any step can be computed without replaying the others.
    """
    per_step = batch_size * world
    first = ((step - 1) * grad_accum + micro) * per_step + rank * batch_size
    out = []
    cache: dict[int, torch.Tensor] = {}
    for pos in range(first, first + batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, epoch)))
        out.append(int(cache[epoch][i]))
    return out


@torch.no_grad()
def evaluate(examples, student=None, teacher_estimator=None, steps=(1, 2), cfg_rate: float = 0.7,
             device=None, teacher_steps: tuple[int, ...] = ()) -> dict[str, float]:
    """Mean per-example mel L1 to the recorded teacher endpoint on ``examples``.

    Keys ``student_{k}`` for each k in ``steps`` (when a student is given) and ``teacher_{k}``
    for each k in ``steps`` and ``teacher_steps`` (when a teacher estimator is given).
    """
    sums: dict[str, float] = {}
    n = 0
    was_training = student.training if student is not None else False
    if student is not None:
        student.eval()
    for b in examples.batches(EVAL_BATCH, device=device):
        m = b.inputs.out_mask
        dtype = next((student or teacher_estimator).parameters()).dtype
        inp, noise = b.inputs.to(dtype=dtype), b.noise.to(dtype)
        if student is not None:
            for k in steps:
                x = student_solve(student, inp, noise, k).float()
                sums[f"student_{k}"] = sums.get(f"student_{k}", 0.0) + float(masked_l1(x, b.target, m).sum())
        if teacher_estimator is not None:
            for k in sorted(set(steps) | set(teacher_steps)):
                x = teacher_solve(teacher_estimator, inp, noise, k, cfg_rate).float()
                sums[f"teacher_{k}"] = sums.get(f"teacher_{k}", 0.0) + float(masked_l1(x, b.target, m).sum())
        n += b.noise.shape[0]
    if student is not None and was_training:
        student.train()
    return {k: v / max(n, 1) for k, v in sorted(sums.items())}


def improvement_line(ev: dict[str, float], steps) -> str:
    """``student mel L1 below teacher at equal steps: 1 step NN%, 2 steps NN%``."""
    parts = []
    for k in steps:
        pct = 100.0 * (1.0 - ev[f"student_{k}"] / ev[f"teacher_{k}"]) if ev[f"teacher_{k}"] > 0 else 0.0
        parts.append(f"{k} step{'s' if k != 1 else ''} {pct:.0f}%")
    return "student mel L1 below teacher at equal steps: " + ", ".join(parts)


def error_table(ev: dict[str, float], steps, teacher_steps: int) -> str:
    rows = [("teacher", k) for k in sorted(set(steps) | {teacher_steps})] + [("student", k) for k in steps]
    lines = ["model    steps  mel L1 to teacher@%d" % teacher_steps]
    for who, k in rows:
        lines.append(f"{who:<8} {k:>5}  {ev[f'{who}_{k}']:.5f}")
    return "\n".join(lines)


def _lr_lambda(cfg: DistillConfig):
    t = cfg.train

    def f(step: int) -> float:  # step counts scheduler.step() calls, 0-based
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            span = max(1, t.max_steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - t.warmup_steps) / span)))
        return 1.0

    return f


def start_accelerator(cfg: Any, t_cfg: Any, out_dir: Path):
    """The accelerate ``Accelerator`` of a training run (distill or heal): device and mixed
    precision from ``t_cfg`` (``train:``), the resolved config written to ``out_dir/config.yaml``
    by the main process, and W&B tracking when ``cfg.tracking`` asks for it (one project per
    results folder, as runs: ``tracking.project_for(out_dir.parent)``; the run is the folder)."""
    from accelerate import Accelerator

    use_wandb = cfg.tracking.backend == "wandb"
    accelerator = Accelerator(cpu=t_cfg.device == "cpu", mixed_precision=t_cfg.mixed_precision,
                              log_with="wandb" if use_wandb else None, project_dir=str(out_dir))
    if accelerator.is_main_process:
        import yaml

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    if use_wandb:
        init = {"dir": str(out_dir)}
        if cfg.tracking.entity:
            init["entity"] = cfg.tracking.entity
        if cfg.tracking.mode:
            init["mode"] = cfg.tracking.mode
        accelerator.init_trackers(cfg.tracking.project_for(out_dir.parent), config=cfg.resolved(),
                                  init_kwargs={"wandb": {**init, "name": out_dir.name}})
    return accelerator


def optimizer_step(accelerator, optimizer, scheduler, params, t_cfg: Any, step: int, end: int, window: list[float],
                   t0: float, bar, metrics_path: Path | None) -> list[float]:
    """One optimizer step of a trainer (distill or heal): gradient clipping (``train.grad_clip``),
    step, schedule, zeroed gradients; every ``train.log_every`` steps and at ``end`` the mean loss
    of ``window`` is logged (progress bar, ``metrics_path`` when given: the main process, and the
    accelerate trackers). Returns the loss window to keep filling (emptied once logged)."""
    if t_cfg.grad_clip:
        accelerator.clip_grad_norm_(params, t_cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    bar.update(1)
    if step % t_cfg.log_every and step != end:
        return window
    row = {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
           "elapsed_s": round(time.time() - t0, 3)}
    bar.set_postfix(loss=f"{row['loss']:.4g}")
    if metrics_path is not None:
        _append_jsonl(metrics_path, row)
    accelerator.log({"train/loss": row["loss"], "train/lr": row["lr"]}, step=step)
    return []


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = out_dir / CHECKPOINTS
    found = []
    if root.is_dir():
        for p in root.glob("step-*"):
            if (p / TRAINER_STATE).is_file():
                found.append((int(p.name.split("-")[1]), p))
    return sorted(found)


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def resumable_checkpoint(t_cfg: Any, out_dir: Path, fingerprint: str, settings: str = "training") -> Path | None:
    """What a trainer (distill or heal) checks before it starts: ``train.mixed_precision: fp16``
    needs a CUDA GPU, and the newest checkpoint in ``out_dir`` (returned, None when there is
    none) must have been made with the same settings (``fingerprint``; ``settings`` names them in
    the refusal)."""
    if t_cfg.mixed_precision == "fp16" and (t_cfg.device == "cpu" or not torch.cuda.is_available()):
        raise CbxError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    ckpts = _checkpoints(out_dir)
    if not ckpts:
        return None
    state = json.loads((ckpts[-1][1] / TRAINER_STATE).read_text())
    if state.get("fingerprint") != fingerprint:
        raise CbxError(
            f"{ckpts[-1][1]}: checkpoint was made with other {settings} settings "
            f"(fingerprint {state.get('fingerprint')} != {fingerprint}); use another train.out_dir"
        )
    return ckpts[-1][1]


def resume(accelerator, checkpoint: Path | None, command: str) -> int:
    """Restore the state accelerate saved in ``checkpoint`` (the prepared models, optimizer and
    scheduler, and what was registered for checkpointing) and return its step; 0 without one.
    The main process says so on stderr (``<command>: resumed from <checkpoint> (step N)``)."""
    if checkpoint is None:
        return 0
    accelerator.load_state(str(checkpoint))
    start = json.loads((checkpoint / TRAINER_STATE).read_text())["step"]
    if accelerator.is_main_process:
        print(f"{command}: resumed from {checkpoint} (step {start})", file=sys.stderr)
    return start


def save_checkpoint(accelerator, out_dir: Path, step: int, fingerprint: str, keep: int) -> None:
    """``out_dir/checkpoints/step-NNNNNN``: accelerate's state plus ``trainer_state.json`` (the
    step and the settings fingerprint) written by the main process, which then deletes all but
    the newest ``keep`` checkpoints."""
    path = out_dir / CHECKPOINTS / f"step-{step:06d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / TRAINER_STATE).write_text(json.dumps({"step": step, "fingerprint": fingerprint}) + "\n")
        for _, old in _checkpoints(out_dir)[: -keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def run_steps(accelerator, optimizer, scheduler, params: list, t_cfg: Any, out_dir: Path, fingerprint: str, *,
              start: int, stop_after: int | None, n_rows: int, micro_step: Callable[[int, int, list[int]], float],
              evaluate_line: Callable[[int], str], desc: str, progress: bool) -> int:
    """The step loop of a trainer (distill or heal): optimizer steps ``start + 1`` .. ``end``
    (``train.max_steps``, or ``stop_after`` when sooner), returns ``end``.

    Each step runs ``train.grad_accum`` micro-batches, ``micro_step(step, micro, rows)`` with
    the rows of :func:`batch_indices` for this process (it runs forward and backward and
    returns the micro-batch's loss), then :func:`optimizer_step` (loss logged to
    ``out_dir/metrics.jsonl`` by the main process). Every ``train.eval_every`` steps but the
    last, the main process writes ``evaluate_line(step)`` under the progress bar; every
    ``train.save_every`` steps and at ``end`` a checkpoint is saved (:func:`save_checkpoint`)."""
    from tqdm.auto import tqdm

    main = accelerator.is_main_process
    metrics_path = out_dir / METRICS if main else None
    end = t_cfg.max_steps if stop_after is None else min(t_cfg.max_steps, stop_after)
    bar = tqdm(total=t_cfg.max_steps, initial=start, desc=desc, unit="step",
               disable=not (progress and main), file=sys.stderr)
    rank, world = accelerator.process_index, accelerator.num_processes
    window: list[float] = []
    t0 = time.time()
    for step in range(start + 1, end + 1):
        for micro in range(t_cfg.grad_accum):
            rows = batch_indices(n_rows, t_cfg.seed, step, micro, t_cfg.grad_accum, t_cfg.batch_size, rank, world)
            window.append(micro_step(step, micro, rows))
        window = optimizer_step(accelerator, optimizer, scheduler, params, t_cfg, step, end,
                                window, t0, bar, metrics_path)
        if main and t_cfg.eval_every and step % t_cfg.eval_every == 0 and step != t_cfg.max_steps:
            bar.write(evaluate_line(step), file=sys.stderr)
        if (t_cfg.save_every and step % t_cfg.save_every == 0) or step == end:
            save_checkpoint(accelerator, out_dir, step, fingerprint, t_cfg.keep_checkpoints)
    bar.close()
    return end


def train(cfg: DistillConfig, *, stop_after: int | None = None, progress: bool = True,
          model=None, record_only: bool = False) -> dict[str, Any]:
    """Record teacher data if needed (split across processes), train (resuming from the newest
    checkpoint), evaluate, write ``<out_dir>/student``. ``stop_after``: save a checkpoint after
    that many steps and return early (what a preempted job leaves behind); ``record_only``:
    stop once the teacher data is complete. Returns a summary dict."""
    from cbx.distill.data import TeacherExamples, record_teacher_data
    from cbx.distill.objectives import get_objective
    from cbx.distill.student import architecture_fingerprint, make_student, save_student

    t_cfg = cfg.train
    out_dir = Path(t_cfg.out_dir)
    spec = get_objective(cfg.objective.name)
    ocfg = cfg.objective_config()
    if spec.needs_trajectory and not cfg.data.trajectory:
        raise CbxError(f"objective.name: {cfg.objective.name} needs the teacher trajectory; set data.trajectory: true")
    fingerprint = cfg.training_fingerprint()
    checkpoint = resumable_checkpoint(t_cfg, out_dir, fingerprint)

    accelerator = start_accelerator(cfg, t_cfg, out_dir)
    main = accelerator.is_main_process
    device = accelerator.device

    if model is None:
        from cbx.engine.model import load_model

        model = load_model(cfg.teacher.model)
    model.to(device)
    record_teacher_data(cfg, model, progress=progress and main, rank=accelerator.process_index,
                        world=accelerator.num_processes)
    accelerator.wait_for_everyone()
    if record_only:
        accelerator.end_training()
        return {"step": 0, "out_dir": str(out_dir), "finished": False, "data_dir": str(cfg.data_dir)}
    train_ex = TeacherExamples(cfg.data_dir, "train")
    held_ex = TeacherExamples(cfg.data_dir, "heldout")
    teacher_est = model.s3gen.flow.decoder.estimator.eval()
    teacher_est.requires_grad_(False)

    torch.manual_seed(t_cfg.seed)  # nothing random is drawn from it; set for library code
    pruned = None
    if cfg.prune:  # a pruned student: blocks dropped from a copy of the teacher's estimator
        from cbx.distill.student import pruned_estimator

        base_est, pruned = pruned_estimator(model, cfg.prune)
        student = make_student(base_est).train()
        del base_est
    else:
        student = make_student(teacher_est).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)

    start = resume(accelerator, checkpoint, "cbx distill")

    steps = tuple(cfg.student.eval_steps)
    metrics_path = out_dir / METRICS
    teacher_ev: dict[str, float] = {}
    if main:
        teacher_ev = evaluate(held_ex, None, teacher_est, steps, cfg.teacher.cfg_rate, device,
                              teacher_steps=(cfg.teacher.steps,))
        if teacher_ev[f"teacher_{cfg.teacher.steps}"] > 1e-3:
            raise CbxError(
                f"{cfg.data_dir}: the teacher does not reproduce its recorded endpoints "
                f"(mel L1 {teacher_ev[f'teacher_{cfg.teacher.steps}']:.4g}); the data was made by another teacher"
            )

    untrained: dict[str, float] = {}
    if main and pruned:  # what healing starts from: the pruned student before any step
        path = out_dir / "untrained_eval.json"
        if path.is_file():
            untrained = json.loads(path.read_text())
        else:
            if start:
                raise CbxError(f"{out_dir}: resumed a pruned student's training without {path.name}; use another train.out_dir")
            untrained = evaluate(held_ex, accelerator.unwrap_model(student), None, steps, device=device)
            path.write_text(json.dumps(untrained) + "\n")
            print("pruned student before training: " + ", ".join(f"{k} {v:.4f}" for k, v in untrained.items()),
                  file=sys.stderr)

    def run_eval(step: int) -> dict[str, float]:
        ev = dict(teacher_ev)
        ev.update(evaluate(held_ex, accelerator.unwrap_model(student), None, steps, device=device))
        row = {"step": step, **{f"eval/{k}": v for k, v in ev.items()}}
        _append_jsonl(metrics_path, row)
        accelerator.log({f"eval/{k}": v for k, v in ev.items()}, step=step)
        return ev

    def eval_line(step: int) -> str:
        return f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in run_eval(step).items())

    rank, world = accelerator.process_index, accelerator.num_processes

    def micro_step(step: int, micro: int, rows: list[int]) -> float:
        batch = train_ex.batch(rows, device=device, with_states=spec.needs_trajectory)
        gen = torch.Generator().manual_seed(_seed_of(t_cfg.seed, "objective", step, micro, rank))
        last = micro == t_cfg.grad_accum - 1
        ctx = accelerator.no_sync(student) if (not last and world > 1) else _null()
        with ctx:
            with accelerator.autocast():
                loss = spec.fn(student, batch, ocfg, gen)
            accelerator.backward(loss / t_cfg.grad_accum)
        return float(loss.detach())

    end = run_steps(accelerator, optimizer, scheduler, list(student.parameters()), t_cfg, out_dir, fingerprint,
                    start=start, stop_after=stop_after, n_rows=len(train_ex), micro_step=micro_step,
                    evaluate_line=eval_line, desc="distill", progress=progress)

    summary: dict[str, Any] = {"step": end, "out_dir": str(out_dir), "finished": end == t_cfg.max_steps}
    if end < t_cfg.max_steps:
        accelerator.end_training()
        return summary
    if main:
        ev = run_eval(end)
        table = error_table(ev, steps, cfg.teacher.steps)
        line = improvement_line(ev, steps)
        unwrapped = accelerator.unwrap_model(student)
        save_student(unwrapped, out_dir / "student", n_steps=cfg.student.default_steps, trained_steps=list(steps),
                     meta={"teacher": cfg.teacher.model, "teacher_architecture": architecture_fingerprint(teacher_est),
                           "objective": cfg.objective.name, "steps_trained": end, "eval": ev,
                           "config": cfg.resolved(), **({"eval_untrained": untrained} if pruned else {})},
                     pruned=pruned)
        (out_dir / "eval.json").write_text(json.dumps({"step": end, "mel_l1": ev, "line": line}, indent=2) + "\n")
        print(table)
        print(line, flush=True)
        summary.update(eval=ev, line=line, student_dir=str(out_dir / "student"))
        if pruned:
            summary.update(eval_untrained=untrained, pruned=pruned)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
