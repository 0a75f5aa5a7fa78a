"""Train-on-demand: steps whose checkpoint is made by a training config (``train:``).

An experiment is a whole recipe, as llm-compressor's recipes carry their training stages: a
step that loads a trained checkpoint (``cfm_student``; any transform with a registered
:class:`cbx.compress.registry.Trainer`) may name the training config instead of a folder::

    steps:
      - transform: cfm_student
        params: {steps: 2}
        train: experiments/distill-demo.yaml          # or {config: ..., set: {train.max_steps: 80}}

``cbx run`` trains it on first use and stores it under the results folder::

    <results>/trained/<transform>-<key>/     the training's own output folder (resumable)
        trained.json                         written last: provenance (config, hash, metrics)

``key`` hashes the training config as resolved (every default filled in, without output
folder, logging cadence or tracking, which do not change the weights) and the teacher's
identity (:func:`cbx.engine.identity.model_identity`: the built-in model's architecture, a
folder's file contents, a Hub id). Every later run, and every experiment naming the same
config, finds ``trained.json`` and reuses the checkpoint; a changed config or teacher trains
anew into another folder. An interrupted training resumes from the training's own
checkpoints (``cbx distill`` semantics). Concurrent ``cbx run`` processes serialise on a lock
per key, so a checkpoint is trained once.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbx.errors import CbxError
from cbx.lab import store
from cbx.lab.schema import PENDING_CHECKPOINT, Experiment, content_hash

TRAINED_DIR = "trained"
TRAINED_RECORD = "trained.json"
FORMAT = "cbx-trained"


@dataclass
class Training:
    """One trained input of one step: where it lives, whether it is there, what it costs."""

    step: int  # index in the experiment's steps
    transform: str
    config_file: str
    overrides: dict[str, Any]
    config: Any  # the trainer's typed config
    resolved: dict[str, Any]  # what determines the weights
    config_hash: str
    teacher: str  # model source
    teacher_identity: str
    key: str
    folder: Path
    trainer: Any

    @property
    def checkpoint(self) -> Path:
        return self.folder / _checkpoint_name(self)

    @property
    def ready(self) -> bool:
        return (self.folder / TRAINED_RECORD).is_file()

    def estimate_seconds(self, device: str) -> float | None:
        try:
            return self.trainer.estimate_seconds(self.config, device)
        except Exception:  # an estimate is a courtesy; a trainer that cannot give one says None
            return None

    def record(self) -> dict[str, Any] | None:
        """``trained.json`` (None until the training has finished)."""
        try:
            return store.read_json(self.folder / TRAINED_RECORD)
        except FileNotFoundError:
            return None


def _checkpoint_name(t: Training) -> str:
    rec = t.record()
    return rec["checkpoint"] if rec and rec.get("checkpoint") else t.trainer.checkpoint_dir


def trainings(exp: Experiment, results: str | Path) -> list[Training]:
    """The trained inputs ``exp`` needs (none when no step says ``train:``); bad configs,
    unreadable files and unknown teachers are :class:`CbxError` naming the step."""
    from cbx.compress.registry import get_trainer
    from cbx.engine.identity import model_identity

    out = []
    for i, s in enumerate(exp.steps):
        if s.train is None:
            continue
        where = f"{exp.name}: steps[{i}].train"
        trainer = get_trainer(s.transform)
        if trainer is None:
            raise CbxError(f"{where}: transform {s.transform!r} loads no trained checkpoint")
        path = Path(s.train.config)
        if not path.is_file():
            raise CbxError(f"{where}: {path}: no such training config"
                           + ("" if path.is_absolute() else f" (relative paths are from {Path.cwd()})"))
        try:
            cfg = trainer.load_config(path, dict(s.train.set))
        except CbxError as e:
            raise CbxError(f"{where}: {e}") from None
        resolved = trainer.resolved(cfg)
        teacher = trainer.teacher(cfg)
        try:
            ident = model_identity(teacher)
        except CbxError as e:
            raise CbxError(f"{where}: teacher: {e}") from None
        cfg_hash = store.stable_hash(resolved, 16)
        key = store.stable_hash({"config": cfg_hash, "teacher": ident, "transform": s.transform}, 12)
        folder = Path(results) / TRAINED_DIR / f"{store.slug(s.transform)}-{key}"
        out.append(Training(i, s.transform, str(path), dict(s.train.set), cfg, resolved, cfg_hash, teacher,
                            ident, key, folder, trainer))
    return out


def with_checkpoints(exp: Experiment, done: list[Training]) -> Experiment:
    """``exp`` with each trained step's checkpoint parameter naming its trained folder."""
    steps = list(exp.steps)
    for t in done:
        s = steps[t.step]
        steps[t.step] = dataclasses.replace(s, params={**s.params, t.trainer.param: str(t.checkpoint)})
    return dataclasses.replace(exp, steps=tuple(steps))


def is_prepared(exp: Experiment) -> bool:
    """Whether every ``train:`` step already names its checkpoint (the runner's input)."""
    from cbx.compress.registry import get_trainer

    for s in exp.steps:
        if s.train is not None:
            trainer = get_trainer(s.transform)
            if trainer is None or s.params.get(trainer.param) in (None, PENDING_CHECKPOINT):
                return False
    return True


def ensure_trained(t: Training, results: store.ResultsDir, progress: bool = True, device: str = "cpu",
                   log=print, shard=None) -> dict[str, Any] | None:
    """Train ``t`` unless it is already there (under a lock per key); returns ``trained.json``.

    Under a shard group (``accelerate launch``) every process trains together (the trainer is
    itself an accelerate script), the main process writes the record, and the others get None."""
    rec = t.record()
    if rec is not None:
        return rec
    if shard is not None and shard.world > 1:
        return _train(t, progress and shard.is_main, device, log, write=shard.is_main)
    with results.lock(f"train-{t.key}"):
        rec = t.record()  # another process may have trained it while we waited
        if rec is not None:
            return rec
        return _train(t, progress, device, log, write=True)


def _train(t: Training, progress: bool, device: str, log, write: bool) -> dict[str, Any] | None:
    est = t.estimate_seconds(device)
    resumed = (t.folder / "checkpoints").is_dir()
    log(f"training {t.transform} checkpoint from {t.config_file} (teacher {t.teacher}; "
        f"{'resuming; ' if resumed else ''}{describe_seconds(est)}) -> {t.folder}")
    t.folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = t.trainer.train(t.config, t.folder, progress)
    if not write:
        return None
    ckpt = Path(out["checkpoint"])
    t.trainer.check_checkpoint(ckpt)
    from cbx.lab.runner import git_info

    rec = {
        "format": FORMAT,
        "version": 1,
        "transform": t.transform,
        "config_file": t.config_file,
        "overrides": t.overrides,
        "config": t.resolved,
        "config_hash": t.config_hash,
        "teacher": t.teacher,
        "teacher_identity": t.teacher_identity,
        "key": t.key,
        "checkpoint": ckpt.relative_to(t.folder).as_posix(),
        "checkpoint_hash": content_hash(ckpt),
        "metrics": out.get("metrics") or {},
        "train_seconds": round(time.time() - t0, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_info(),
    }
    store.atomic_write_json(t.folder / TRAINED_RECORD, rec)
    log(f"trained {t.transform} checkpoint in {rec['train_seconds']:.0f} s -> {ckpt}")
    return rec


def provenance(exp: Experiment, results: str | Path) -> dict[str, Any]:
    """``{"steps[i]": trained.json + its folder}`` for a run record and an export."""
    out = {}
    for t in trainings(exp, results):
        rec = t.record()
        if rec is not None:
            out[f"steps[{t.step}]"] = {**rec, "folder": str(t.folder)}
    return out


def describe_seconds(s: float | None) -> str:
    if s is None:
        return "time unknown"
    if s < 90:
        return "about a minute or less"
    if s < 3600:
        return f"about {round(s / 60)} min"
    return f"about {s / 3600:.1f} h"
