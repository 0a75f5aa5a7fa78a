"""Transform ``cfm_student``: swap a trained few-step student into a Chatterbox model.

Used like any compression step in an experiment file::

    steps:
      - transform: cfm_student
        params: {checkpoint: runs/distill-tiny/student, steps: 2}

The model's CFM estimator is replaced by the student (an upstream ``ConditionalDecoder`` with
``meanflow=True``, see :mod:`cbx.distill.student`) and ``s3gen.meanflow`` is set, which is
exactly how upstream marks Chatterbox Turbo's S3Gen: the engine then runs the flow on the
linear grid with the interval end ``r`` and no CFG pair (one estimator call per step). The
number of steps goes into ``model.meta["cfm_steps"]`` (the default the engine uses when an
experiment does not set ``synth.cfm_steps``); ``model.meta["cfm_student"]`` records which
checkpoint was swapped in. The checkpoint must have been trained for this model's estimator
architecture (checked by fingerprint, then loaded with ``strict=True``).

Instead of ``checkpoint`` a step may name the training config that makes it
(``train: experiments/distill-demo.yaml``): :data:`TRAINER` tells ``cbx run`` how to load,
identify, estimate and run that training (see :mod:`cbx.lab.recipes`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbx.compress.registry import register_trainer, register_transform
from cbx.errors import CbxError


@dataclass(frozen=True)
class CfmStudentConfig:
    checkpoint: str  # folder written by `cbx distill` (<out_dir>/student)
    steps: int | None = None  # None: the checkpoint's own default (student.json "n_steps")

    def __post_init__(self):
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError("checkpoint must name a student checkpoint folder")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive integer or null, got {self.steps!r}")


@register_transform("cfm_student", CfmStudentConfig)
def cfm_student(model, config: CfmStudentConfig):
    """Replace the CFM estimator by a distilled MeanFlow student run with ``steps`` steps."""
    from cbx.distill.student import load_student

    s3 = model.s3gen
    teacher = s3.flow.decoder.estimator
    if getattr(s3, "meanflow", False):
        raise CbxError(f"cfm_student: model {getattr(model, 'source', '?')} already has a MeanFlow decoder "
                       "(Turbo); a student replaces a CFG teacher's estimator")
    student, manifest = load_student(config.checkpoint, teacher)
    p = next(teacher.parameters())
    student.to(device=p.device, dtype=p.dtype)
    student.requires_grad_(False)
    if manifest.get("dropped_blocks"):  # a pruned student: the model's architecture record says so
        from cbx.compress.prune import PRUNED_KEY

        rec = dict(model.meta.get(PRUNED_KEY) or {})
        rec["cfm"] = {"num_blocks_orig": int(manifest["num_blocks_orig"]), "dropped": list(manifest["dropped_blocks"])}
        model.meta[PRUNED_KEY] = rec
    s3.flow.decoder.estimator = student
    s3.meanflow = True
    n = config.steps if config.steps is not None else int(manifest["n_steps"])
    model.meta["cfm_steps"] = n
    model.meta["cfm_student"] = {"checkpoint": str(config.checkpoint), "steps": n,
                                 "trained_steps": manifest.get("trained_steps"),
                                 "architecture": manifest.get("architecture")}
    return model


# Rough cost of the training, in "estimator frame-calls" (one estimator call over one mel frame
# of one example), and seconds per frame-call measured on this project's 2-core CPU for the
# built-in tiny model (`cbx distill experiments/distill-demo.yaml`: 2.7e5 frame-calls in 17 s
# wall, start-up included)
# and derived for the full-size estimator from the measured 10-step CFG solve (DESIGN.md:
# 10.5 s for 20 calls over ~600 frames). A GPU is assumed ~30x faster. It says "a minute" or
# "an hour"; nothing more precise is claimed.
_SECONDS_PER_FRAME_CALL = {"tiny": 6e-5, "full": 9e-4}
_GPU_SPEEDUP = 30.0


class CfmStudentTrainer:
    """``cbx distill``'s training, as train-on-demand for ``cfm_student`` steps."""

    param = "checkpoint"
    checkpoint_dir = "student"

    def load_config(self, path: Path, overrides: dict[str, Any]):
        from cbx.distill.config import load_config

        return load_config(path, overrides)

    def resolved(self, config) -> dict[str, Any]:
        from cbx.distill.config import without_cadence

        d = without_cadence(config.resolved())
        d["data"].pop("dir")
        return d

    def teacher(self, config) -> str:
        return config.teacher.model

    def estimate_seconds(self, config, device: str) -> float | None:
        d, t = config.data, config.train
        frames = 2 * ((d.min_tokens + d.max_tokens) / 2) + 50 * d.prompt_seconds  # mel frames per example
        record = (d.n_train + d.n_heldout) * config.teacher.steps * (2 if config.teacher.cfg_rate > 0 else 1)
        obj_steps = sum(getattr(config.objective_config(), "steps", None) or (2,))
        train = t.max_steps * t.batch_size * t.grad_accum * obj_steps * 3  # forward + backward ~ 3 calls
        size = "tiny" if config.teacher.model.startswith("tiny") else "full"
        s = (record + train) * frames * _SECONDS_PER_FRAME_CALL[size]
        return s / _GPU_SPEEDUP if str(device).startswith("cuda") else s

    def check_checkpoint(self, path: Path) -> None:
        from cbx.distill.student import read_manifest

        read_manifest(path)

    def train(self, config, out_dir: Path, progress: bool) -> dict[str, Any]:
        from cbx.distill.train import train

        cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(out_dir)))
        summary = train(cfg, progress=progress)
        metrics: dict[str, Any] = {"steps": summary.get("step"), "eval_mel_l1": summary.get("eval"),
                                   "line": summary.get("line")}
        log = Path(out_dir) / "metrics.jsonl"
        if log.is_file():
            losses = [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
            if losses:
                metrics["final_loss"] = losses[-1]["loss"]
        return {"checkpoint": Path(out_dir) / self.checkpoint_dir, "metrics": metrics}


TRAINER = register_trainer("cfm_student", CfmStudentTrainer())


@dataclass(frozen=True)
class HealedCheckpointConfig:
    checkpoint: str  # folder written by `cbx heal` (<out_dir>/healed), a compressed checkpoint

    def __post_init__(self):
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError("checkpoint must name a healed checkpoint folder (<train.out_dir>/healed)")


@register_transform("healed_checkpoint", HealedCheckpointConfig)
def healed_checkpoint(model, config: HealedCheckpointConfig):
    """Replace the model by a pruned (and healed) checkpoint of it: its manifest's pruned shapes
    are applied, then every tensor is loaded strictly (:mod:`cbx.compress.checkpoint`)."""
    from pathlib import Path

    from cbx.compress.checkpoint import load_compressed, read_manifest

    folder = Path(config.checkpoint)
    if not folder.is_dir():
        raise CbxError(f"healed_checkpoint: {folder} is not a folder (train it with `cbx heal CONFIG`)")
    manifest = read_manifest(folder)
    healed = (manifest.get("meta") or {}).get("healed")
    if not healed:
        raise CbxError(f"healed_checkpoint: {folder / 'manifest.json'} has no meta.healed (not written by cbx heal)")
    if (model.meta or {}).get("pruned") or (model.meta or {}).get("compress"):
        raise CbxError("healed_checkpoint: must be the first step (it replaces the whole model with the healed one)")
    p = next(model.t3.parameters())
    device = p.device
    model.to("cpu")
    loaded = load_compressed(folder, base=model)
    loaded.to(device)
    loaded.meta["healed_checkpoint"] = {"checkpoint": str(folder), **healed}
    return loaded


class HealTrainer:
    """``cbx heal``'s training, as train-on-demand for ``healed_checkpoint`` steps."""

    param = "checkpoint"
    checkpoint_dir = "healed"

    def load_config(self, path: Path, overrides: dict[str, Any]):
        from cbx.distill.heal import load_config

        return load_config(path, overrides)

    def resolved(self, config) -> dict[str, Any]:
        from cbx.compress.registry import build_config
        from cbx.config import to_plain
        from cbx.distill.config import without_cadence

        d = without_cadence(config.resolved())
        # the pruning steps with every default filled in (a changed default prunes otherwise)
        d["prune"] = [{"transform": s.transform, "params": to_plain(build_config(s.transform, s.params))}
                      for s in config.prune]
        return d

    def teacher(self, config) -> str:
        return config.teacher.model

    def estimate_seconds(self, config, device: str) -> float | None:
        from cbx.distill.heal import estimate_seconds

        return estimate_seconds(config, device)

    def check_checkpoint(self, path: Path) -> None:
        from cbx.compress.checkpoint import read_manifest

        if not (read_manifest(path).get("meta") or {}).get("healed"):
            raise CbxError(f"{path}: not a healed checkpoint (its manifest has no meta.healed)")

    def train(self, config, out_dir: Path, progress: bool) -> dict[str, Any]:
        from cbx.distill.heal import heal

        cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(out_dir)))
        summary = heal(cfg, progress=progress)
        metrics = {k: summary.get(k) for k in ("heldout_kl_unhealed", "heldout_kl", "heldout_kl_cfg_unhealed",
                                               "heldout_kl_cfg", "line")}
        metrics["steps"] = summary.get("step")
        return {"checkpoint": Path(out_dir) / self.checkpoint_dir, "metrics": metrics}


HEAL_TRAINER = register_trainer("healed_checkpoint", HealTrainer())
