"""The few-step student: upstream's CFM estimator with the MeanFlow time mixer, and its checkpoint.

The student is the teacher's own ``ConditionalDecoder`` turned into a MeanFlow estimator the
way Chatterbox Turbo's is built (``ConditionalDecoder(meanflow=True)``): same weights, plus the
``time_embed_mixer`` that maps ``[emb(t), emb(r)]`` to one time embedding, initialized
diagonally (upstream ``get_intmeanflow_time_mixer``, IntMeanFlow arXiv 2510.07979 sec. 3.3) so
that at step 0 the student *is* the conditional teacher. Keeping upstream's class and parameter
names means a student checkpoint loads with ``strict=True`` into upstream
``S3Gen(meanflow=True)`` (see :func:`s3gen_state_dict`) and runs in upstream's
``basic_euler`` without code of ours.

A checkpoint is a folder: ``student.safetensors`` (the estimator's state dict, keys relative to
``flow.decoder.estimator``) and ``student.json`` (format, version, default number of steps, the
step counts it was trained for, a fingerprint of the teacher architecture, training metadata).
What a checkpoint is comes from ``student.json``, never from its file name.

A pruned student (a distill config's ``prune:`` steps, :func:`pruned_estimator`) is made from the
teacher's estimator with some transformer blocks dropped; ``student.json`` lists them under
``dropped_blocks`` (names in the unpruned estimator) and :func:`load_student` drops the same
blocks from the teacher's estimator before it loads the weights. Such a checkpoint does not fit
upstream's ``S3Gen(meanflow=True)``, whose block counts are fixed.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cbx.errors import CbxError
from cbx.files import atomic_dir, read_json_file

FORMAT = "cbx-cfm-student"
VERSION = 1
WEIGHTS = "student.safetensors"
MANIFEST = "student.json"
ESTIMATOR_PREFIX = "flow.decoder.estimator."


def _intmeanflow_time_mixer(dims: int) -> torch.nn.Module:
    from cbx.engine import upstream

    # upstream decoder.py imports get_intmeanflow_time_mixer into its module namespace; reaching
    # it through the gateway's ConditionalDecoder keeps every upstream import behind one door.
    return inspect.getmodule(upstream.ConditionalDecoder).get_intmeanflow_time_mixer(dims)


def time_embed_dim(estimator: torch.nn.Module) -> int:
    return estimator.time_mlp.linear_2.out_features


def make_student(teacher_estimator: torch.nn.Module) -> torch.nn.Module:
    """A MeanFlow copy of ``teacher_estimator`` (left untouched); diagonal time mixer."""
    if getattr(teacher_estimator, "meanflow", False):
        raise CbxError("teacher estimator is already a MeanFlow estimator (meanflow=True); "
                       "distill from a CFG teacher such as the original model's S3Gen")
    student = copy.deepcopy(teacher_estimator)
    student.meanflow = True
    mixer = _intmeanflow_time_mixer(time_embed_dim(student))
    p = next(student.parameters())
    student.time_embed_mixer = mixer.to(device=p.device, dtype=p.dtype)
    student.requires_grad_(True)
    return student


def pruned_estimator(model, steps) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The CFM estimator of a copy of ``model`` after the pruning ``steps`` (``PruneStep``s of
    ``prune_depth`` with ``part: cfm``; importance from the model's own calibration passes) and
    the pruning record ``{"num_blocks_orig", "dropped"}``. ``model`` is left untouched."""
    from cbx.compress.prune import PRUNED_KEY
    from cbx.compress.registry import apply_transforms, build_config

    if (model.meta.get(PRUNED_KEY) or {}).get("cfm"):
        raise CbxError("prune: the teacher's CFM estimator is already pruned; prune the student from an unpruned teacher")
    work = copy.deepcopy(model)
    work = apply_transforms(work, [(s.transform, build_config(s.transform, s.params, f"prune[{i}].params"))
                                   for i, s in enumerate(steps)])
    rec = dict((work.meta.get(PRUNED_KEY) or {}).get("cfm") or {})
    if not rec.get("dropped"):
        raise CbxError("prune: the steps dropped no CFM transformer block")
    est = work.s3gen.flow.decoder.estimator
    del work
    return est, {"num_blocks_orig": int(rec["num_blocks_orig"]), "dropped": list(rec["dropped"])}


def _drop_blocks(estimator: torch.nn.Module, dropped: list[str]) -> torch.nn.Module:
    from cbx.compress.prune import drop_cfm_blocks

    est = copy.deepcopy(estimator)
    drop_cfm_blocks(est, dropped)
    return est


def architecture_fingerprint(estimator: torch.nn.Module) -> str:
    """Hash of parameter names and shapes (not values): which teachers a student fits."""
    h = hashlib.sha256()
    for k, v in sorted(estimator.state_dict().items()):
        if k.startswith("time_embed_mixer."):
            continue
        h.update(f"{k}:{tuple(v.shape)};".encode())
    return h.hexdigest()[:16]


def save_student(student: torch.nn.Module, out_dir: str | Path, *, n_steps: int,
                 trained_steps: list[int], meta: dict[str, Any] | None = None,
                 pruned: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint folder atomically (temp folder, then rename over any previous one)."""
    out_dir = Path(out_dir)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items()}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "meanflow": True,
        "n_steps": int(n_steps),
        "trained_steps": [int(s) for s in trained_steps],
        "architecture": architecture_fingerprint(student),
        "dtype": str(next(iter(sd.values())).dtype).replace("torch.", ""),
        "meta": meta or {},
    }
    if pruned:  # {"num_blocks_orig", "dropped"} of pruned_estimator
        manifest["dropped_blocks"] = list(pruned["dropped"])
        manifest["num_blocks_orig"] = int(pruned["num_blocks_orig"])
    with atomic_dir(out_dir, replace=True, is_ours=_is_student_folder) as tmp:
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def _is_student_folder(folder: Path) -> bool:
    """A previous student checkpoint and nothing else (the only folder save_student replaces)."""
    names = {p.name for p in folder.iterdir()}
    if not names <= {WEIGHTS, MANIFEST} or any(p.is_symlink() or p.is_dir() for p in folder.iterdir()):
        return False
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / MANIFEST
    m = read_json_file(path, f"{ckpt_dir}: not a student checkpoint (no {MANIFEST})")
    if m.get("format") != FORMAT:
        raise CbxError(f"{path}: format {m.get('format')!r} is not {FORMAT!r}")
    if m.get("version") != VERSION:
        raise CbxError(f"{path}: version {m.get('version')!r} not supported (expected {VERSION})")
    if not (ckpt_dir / WEIGHTS).is_file():
        raise CbxError(f"{ckpt_dir}: {WEIGHTS} is missing")
    return m


def load_student(ckpt_dir: str | Path, teacher_estimator: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """Student module shaped like ``teacher_estimator`` with the checkpoint's weights (strict)."""
    manifest = read_manifest(ckpt_dir)
    if manifest.get("dropped_blocks"):
        from cbx.compress.prune import cfm_blocks

        n = len(cfm_blocks(teacher_estimator))
        if n != manifest.get("num_blocks_orig"):
            raise CbxError(f"{ckpt_dir}: a pruned student of an estimator with {manifest.get('num_blocks_orig')} "
                           f"transformer blocks; this model's has {n}")
        teacher_estimator = _drop_blocks(teacher_estimator, manifest["dropped_blocks"])
    fp = architecture_fingerprint(teacher_estimator)
    if manifest["architecture"] != fp:
        raise CbxError(
            f"{ckpt_dir}: student architecture {manifest['architecture']} does not match this "
            f"model's CFM estimator ({fp}); it was trained for another teacher"
        )
    student = make_student(teacher_estimator) if not getattr(teacher_estimator, "meanflow", False) \
        else copy.deepcopy(teacher_estimator)
    from cbx.engine.model import check_finite
    from cbx.integrity import refuse_symlinks

    refuse_symlinks(Path(ckpt_dir), "student checkpoint")
    try:
        sd = load_file(str(Path(ckpt_dir) / WEIGHTS))
    except Exception as exc:  # safetensors raises several types for truncated or corrupt files
        raise CbxError(f"{Path(ckpt_dir) / WEIGHTS}: cannot read weights (truncated or corrupt file?): {exc}") from None
    check_finite(sd, Path(ckpt_dir) / WEIGHTS)
    want = student.state_dict()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        raise CbxError(f"{ckpt_dir}/{WEIGHTS}: keys do not match the estimator "
                       f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CbxError(f"{ckpt_dir}/{WEIGHTS}: {k} has shape {tuple(v.shape)}, expected {tuple(want[k].shape)}")
    p = next(teacher_estimator.parameters())
    student.load_state_dict(sd, strict=True)
    student.to(device=p.device)
    student.eval()
    return student, manifest


def s3gen_state_dict(s3gen: torch.nn.Module, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The teacher S3Gen's state dict with the student estimator in place: the weights of an
    upstream ``S3Gen(meanflow=True)`` (e.g. ``s3gen_meanflow.safetensors`` of Turbo's layout)."""
    sd = {k: v for k, v in s3gen.state_dict().items() if not k.startswith(ESTIMATOR_PREFIX)}
    for k, v in student.state_dict().items():
        sd[ESTIMATOR_PREFIX + k] = v
    return sd
