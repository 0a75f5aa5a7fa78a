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
"""

from __future__ import annotations

from dataclasses import dataclass

from cbx.compress.registry import register_transform
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
    s3.flow.decoder.estimator = student
    s3.meanflow = True
    n = config.steps if config.steps is not None else int(manifest["n_steps"])
    model.meta["cfm_steps"] = n
    model.meta["cfm_student"] = {"checkpoint": str(config.checkpoint), "steps": n,
                                 "trained_steps": manifest.get("trained_steps"),
                                 "architecture": manifest.get("architecture")}
    return model
