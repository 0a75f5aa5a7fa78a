"""``cbx export``: a run's model as a self-describing, verifiable folder.

Two forms:

* compressed (default): the workbench's compressed checkpoint (``cbx.compress.checkpoint``:
  safetensors + ``manifest.json`` naming each quantized module's method and config), which
  loads back into the engine bit-exactly;
* ``--dequantize``: every quantized module turned back into the float layer it replaced and
  the model written in the upstream file layout (``t3_cfg.safetensors``, ``s3gen.safetensors``,
  ...), which ``chatterbox.ChatterboxTTS.from_local`` loads. Its numbers are those of the
  quantized model (same rounded weights), its size is not.

Either way the folder gets ``export.json``: where it came from (run id, resolved config,
aggregate scores, commit) and the SHA-256 of every other file, checked by :func:`load_export`
so a corrupted or edited export is refused with the file named (:mod:`cbx.integrity`, which
every loader of exports goes through: links and paths outside the folder are refused too).

Nothing but a previous export is ever replaced: ``--out`` must not be the run folder, inside it,
or hold it (a results folder); an existing ``--out`` is replaced only with ``force`` and only
when it is an export this command made (its ``export.json`` lists every file it holds), so
``--force`` can never delete runs or anyone's files. The new folder is built beside it and
renamed into place; the old one is removed only after that.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbx.errors import CbxError
from cbx.files import sha256_file
from cbx.integrity import EXPORT_FILE, EXPORT_FORMAT, folder_files, read_export_info, refuse_symlinks, verify_export_folder
from cbx.lab import store

EXPORT_VERSION = 1
KINDS = ("compressed", "upstream")


def _file_hashes(folder: Path) -> dict[str, str]:
    refuse_symlinks(folder, "export")
    return {rel: sha256_file(folder / rel) for rel in folder_files(folder, skip=(EXPORT_FILE,))}


def check_out_folder(out: Path, run_dir: Path, force: bool) -> None:
    """Refuse an ``--out`` whose replacement could delete anything but a previous export."""
    o, r = out.resolve(), run_dir.resolve()
    if o == r or r in o.parents:
        raise CbxError(f"--out {out}: must not be inside the run folder")
    if o in r.parents:
        raise CbxError(f"--out {out}: holds the run folder {run_dir}; give a new folder for the export")
    if out.is_symlink():
        raise CbxError(f"--out {out}: is a symbolic link; give a real folder")
    if not out.exists():
        return
    if not force:
        raise CbxError(f"--out {out}: already exists; pass --force to replace it")
    if not out.is_dir():
        raise CbxError(f"--out {out}: is a file, not a previous export; --force replaces only an export folder")
    try:
        info = read_export_info(out)
    except CbxError:
        raise CbxError(f"--out {out}: is not a previous export (no valid {EXPORT_FILE}); --force replaces "
                       "only a folder made by cbx export, nothing else") from None
    refuse_symlinks(out, "previous export")
    unlisted = sorted(set(folder_files(out, skip=(EXPORT_FILE,))) - set(info.get("files") or {}))
    if unlisted or any(p.is_dir() and not any(p.iterdir()) for p in out.rglob("*")):
        what = unlisted[0] if unlisted else "an empty folder"
        raise CbxError(f"--out {out}: holds {what}, which its {EXPORT_FILE} does not list; not replacing it "
                       "(move your files out, or choose another --out)")


# ---------------------------------------------------------------- dequantization


def _float_layer(orig_class: str, weight: torch.Tensor, bias: torch.Tensor | None, meta: dict) -> nn.Module:
    """The float module a quantized one replaced, holding its dequantized weight."""
    w = weight.detach().float()
    if orig_class == "Embedding":
        m = nn.Embedding(w.shape[0], w.shape[1], padding_idx=meta.get("padding_idx"))
        m.weight.data.copy_(w)
        return m
    out_f, in_f = w.shape
    if orig_class == "Conv1D":  # transformers GPT-2 layer: weight stored [in, out]
        from transformers.pytorch_utils import Conv1D

        m = Conv1D(out_f, in_f)
        m.weight.data.copy_(w.t())
        if bias is not None:
            m.bias.data.copy_(bias.float())
        else:
            m.bias.data.zero_()
        return m
    if orig_class == "LoRACompatibleLinear":
        from diffusers.models.lora import LoRACompatibleLinear

        m = LoRACompatibleLinear(in_f, out_f, bias=bias is not None)
    elif orig_class == "Linear":
        m = nn.Linear(in_f, out_f, bias=bias is not None)
    else:
        raise CbxError(f"cannot dequantize a module that replaced a {orig_class!r} (no float layer known)")
    m.weight.data.copy_(w)
    if bias is not None:
        m.bias.data.copy_(bias.float())
    return m


def dequantize_model(model) -> Any:
    """Replace every quantized module of ``model`` (in place) by its float equivalent."""
    from cbx.compress.checkpoint import quantized_modules

    for name, mod in quantized_modules(model):
        meta = mod.meta() if hasattr(mod, "meta") else {}
        orig = meta.get("orig_class") or getattr(mod, "orig_class", None)
        new = _float_layer(orig, mod.dequantize(), getattr(mod, "bias", None), meta)
        model.set_submodule(name, new)
    return model


# ---------------------------------------------------------------- export


def _run_model(run_dir: Path, record: dict):
    ckpt = run_dir / "checkpoint"
    if ckpt.is_dir():
        from cbx.compress.checkpoint import load_compressed

        return load_compressed(ckpt)
    if record.get("config", {}).get("steps"):
        raise CbxError(f"{run_dir}: compressed run without a checkpoint folder (was it deleted?)")
    from cbx.compress.source import load_source

    return load_source(record["config"]["model"])


def export_run(run_dir: Path, out: Path, dequantize: bool = False, force: bool = False) -> Path:
    """Write the export of the run in ``run_dir`` to ``out``; returns ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    record = store.ResultsDir(run_dir.parent).record(run_dir.name) or {}
    if record.get("status") != store.STATUS_DONE:
        raise CbxError(f"{run_dir}: run status is {record.get('status')!r}; only finished (done) runs can be exported")
    check_out_folder(out, run_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        target = work / "export"
        ckpt = run_dir / "checkpoint"
        if dequantize:
            from cbx.engine.model import save_upstream_layout

            model = dequantize_model(_run_model(run_dir, record))
            save_upstream_layout(model, target)
            kind = "upstream"
        elif ckpt.is_dir():
            from cbx.compress.checkpoint import load_compressed

            load_compressed(ckpt)  # refuses a damaged checkpoint before it is copied
            refuse_symlinks(ckpt, "checkpoint")
            shutil.copytree(ckpt, target, symlinks=True)
            kind = "compressed"
        else:
            from cbx.compress.checkpoint import save_compressed

            save_compressed(_run_model(run_dir, record), target)
            kind = "compressed"
        info = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "kind": kind,
            "run_id": record.get("run_id"),
            "name": record.get("name"),
            "config": record.get("config"),
            "aggregate": record.get("aggregate"),
            "git": record.get("git"),
            "eval_set": record.get("eval_set"),
            "hardware": record.get("hardware"),
            # how any trained checkpoint of its steps was made (train-on-demand provenance)
            "trained": record.get("trained") or {},
            "files": _file_hashes(target),
        }
        store.atomic_write_json(target / EXPORT_FILE, info)
        old = None
        if out.exists():
            old = work / "old"
            out.rename(old)
        target.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def verify_export(folder: Path) -> dict:
    """``export.json`` of ``folder`` after checking every file's hash (CbxError names the file)."""
    return verify_export_folder(Path(folder))


def load_export(folder: Path):
    """The model of an export folder, after verifying it (bit-exact for compressed exports)."""
    from cbx.compress.source import load_source

    verify_export(folder)
    return load_source(str(folder))
