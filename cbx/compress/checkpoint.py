"""Compressed checkpoints: quantized tensors in safetensors plus a JSON manifest.

Follows optimum-quanto's ``quantization_map`` + ``requantize``: the weights file holds every
tensor of the model, with each quantized module stored as its *canonical* low-bit tensors
(``qweight``/``scale``/``zero``/``bias``; int4 as two codes per byte), never as a kernel's
device-specific packed layout. ``manifest.json`` says what the folder is (nothing is inferred
from file names): format and version, model variant, source and architecture metadata, the
transforms applied, each quantized module's kind, method, config and original shape, and the
SHA-256 of every file. Loading rebuilds the model skeleton from the engine (no download),
swaps in the quantized modules, then loads the remaining tensors strictly; the same tensors
give bit-identical outputs. Any disagreement between manifest, files and model is a
:class:`CbxError` that names the module, key or file.

Writes go to a temporary sibling folder that is renamed into place at the end, so a failed
save leaves nothing half-written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cbx.compress.modules import QUANT_CLASSES, from_qstate, is_linear
from cbx.engine.model import check_state
from cbx.errors import CbxError
from cbx.files import atomic_dir, read_json_file, sha256_file

FORMAT = "cbx-compressed"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONDS = "conds.pt"


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_CLASSES)]


def _anchor_dtype(mod: nn.Module) -> str | None:
    anchor = getattr(mod, "_dtype_anchor", None)
    return str(anchor.dtype).replace("torch.", "") if anchor is not None else None


def save_compressed(model, out_dir: str | Path) -> Path:
    """Write ``model`` (a :class:`ChatterboxModel`, compressed or not) to ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CbxError(f"{out_dir}: exists and is not an empty folder")
    qmods = quantized_modules(model)
    qnames = {n for n, _ in qmods}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if _under(key, qnames):
            continue
        tensors[key] = t
    modules = {}
    for name, mod in qmods:
        for k, t in mod.qstate().items():
            tensors[f"{name}.{k}"] = t
        if getattr(mod, "bias", None) is not None:
            tensors[f"{name}.bias"] = mod.bias
        entry = {**mod.meta(), "method": mod.cbx_method, "config": mod.cbx_config}
        if _anchor_dtype(mod):
            entry["dtype"] = _anchor_dtype(mod)
        modules[name] = entry
    # safetensors refuses shared storage and non-contiguous tensors.
    seen, clean = set(), {}
    for key, t in tensors.items():
        if type(t).__name__.startswith("SparseSemiStructured"):
            t = t.to_dense()  # a 2:4 semi-structured sparse weight (CUDA kernel) is stored as its dense zeros
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        if ptr is not None:
            seen.add(ptr)
        clean[key] = t

    with atomic_dir(out_dir) as tmp:
        save_file(clean, str(tmp / WEIGHTS))
        model.tokenizer.save(tmp)
        if model.builtin_conds is not None:
            model.builtin_conds.save(tmp / CONDS)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "variant": model.variant,
            "source": model.source,
            "meta": model.meta,
            "torch": torch.__version__,
            "modules": modules,
            "buffer_dtypes": _nonpersistent_dtypes(model),
            # A distilled student makes an original model's S3Gen a MeanFlow one: the skeleton
            # must be built so (its estimator has the time mixer a CFG estimator lacks).
            "s3gen_meanflow": bool(getattr(model.s3gen, "meanflow", False)),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = read_json_file(path, f"{path}: missing (not a compressed checkpoint folder)")
    if manifest.get("format") != FORMAT:
        raise CbxError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise CbxError(f"{path}: version {manifest.get('version')!r} is not supported (this code reads {VERSION})")
    for key in ("variant", "modules", "files"):
        if key not in manifest:
            raise CbxError(f"{path}: missing key {key!r}")
    return manifest


def _skeleton(manifest: dict, folder: Path):
    """The uncompressed architecture the checkpoint was made from, with throwaway weights."""
    from cbx.engine import upstream
    from cbx.engine.model import ChatterboxModel, build_s3gen, build_t3
    from cbx.engine.text import load_tokenizer

    variant = manifest["variant"]
    arch = (manifest.get("meta") or {}).get("tiny")
    from cbx.engine.model import CHECKPOINTS, checkpoint_of

    ck = CHECKPOINTS.get(checkpoint_of(manifest.get("meta") or {}, variant))
    t3 = build_t3(variant, arch, backbone=None if arch or ck is None else ck.backbone)
    if variant == "turbo" and hasattr(t3.tfmr, "wte"):
        del t3.tfmr.wte
    meta = manifest.get("meta") or {}
    meanflow = manifest.get("s3gen_meanflow", variant == "turbo" or bool(meta.get("cfm_student")))
    s3gen = build_s3gen(variant, arch["s3gen"] if arch else None, meanflow=bool(meanflow))
    ve = upstream.VoiceEncoder()
    tokenizer = load_tokenizer(variant, folder)
    conds = None
    if (folder / CONDS).exists():
        conds = upstream.Conditionals.load(folder / CONDS, map_location="cpu")
    meta = dict(manifest.get("meta") or {})
    model = ChatterboxModel(t3, s3gen, ve, variant=variant, tokenizer=tokenizer,
                            source=manifest.get("source", str(folder)), builtin_conds=conds, meta=meta)
    _reshape_pruned(model, manifest, folder)
    return model


def _reshape_pruned(model, manifest: dict, folder: Path) -> None:
    """Give an unpruned model the pruned shapes the manifest records (``meta.pruned``)."""
    from cbx.compress.prune import PRUNED_KEY, apply_architecture

    rec = (manifest.get("meta") or {}).get(PRUNED_KEY)
    try:
        apply_architecture(model, rec)
    except (CbxError, KeyError, TypeError, IndexError) as e:
        raise CbxError(f"{folder / MANIFEST}: meta.{PRUNED_KEY} does not fit the {manifest['variant']} model ({e})") from None


def _check_matches(name: str, entry: dict, mod: nn.Module | None, folder: Path) -> None:
    where = f"{folder / MANIFEST}: module '{name}'"
    if mod is None:
        raise CbxError(f"{where} does not exist in the {entry.get('orig_class', '?')} model")
    orig = entry.get("orig_class")
    if orig == "Embedding":
        if type(mod) is not nn.Embedding:
            raise CbxError(f"{where} is an embedding in the manifest but a {type(mod).__name__} in the model")
        shape = (entry["num_embeddings"], entry["embedding_dim"])
        if tuple(mod.weight.shape) != shape:
            raise CbxError(f"{where} has shape {shape} in the manifest but {tuple(mod.weight.shape)} in the model")
        return
    if not is_linear(mod) or type(mod).__name__ != orig:
        raise CbxError(f"{where} is a {orig} in the manifest but a {type(mod).__name__} in the model")
    w = mod.weight
    n, k = (w.shape[1], w.shape[0]) if orig == "Conv1D" else tuple(w.shape)
    if (n, k) != (entry["out_features"], entry["in_features"]):
        raise CbxError(f"{where} is {entry['in_features']}->{entry['out_features']} in the manifest "
                       f"but {k}->{n} in the model")


def load_compressed(folder: str | Path, base=None, verify: bool = True):
    """Load a folder written by :func:`save_compressed`.

    ``base`` (optional) is an uncompressed model of the same architecture to load into (its
    weights are replaced); by default the engine builds the skeleton from the manifest.
    """
    from safetensors import safe_open

    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        from cbx.integrity import verify_listed_files

        # no links, no paths outside the folder, every hash (other files: an export's own list)
        verify_listed_files(folder, manifest["files"], MANIFEST, allow_extra=True)
    if base is not None and getattr(base, "variant", manifest["variant"]) != manifest["variant"]:
        raise CbxError(f"{folder / MANIFEST}: checkpoint of a {manifest['variant']} model, "
                       f"given a {base.variant} model to load into")
    if base is not None and not (getattr(base, "meta", None) or {}).get("pruned"):
        _reshape_pruned(base, manifest, folder)
    model = base if base is not None else _skeleton(manifest, folder)
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        tensors = {k: _aligned(f.get_tensor(k)) for k in f.keys()}
    from cbx.engine.model import check_finite

    check_finite(tensors, folder / WEIGHTS)
    named = dict(model.named_modules())
    for name, entry in manifest["modules"].items():
        mod = named.get(name)
        _check_matches(name, entry, mod, folder)
        keys = {k[len(name) + 1:]: k for k in tensors if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
        own = {short: tensors.pop(full) for short, full in keys.items()}
        bias = own.pop("bias", None)
        dtype = getattr(torch, entry.get("dtype") or "float32")
        try:
            new = from_qstate(entry, own, bias, dtype, entry.get("config", {}))
        except (KeyError, ValueError, RuntimeError) as e:
            raise CbxError(f"{folder / WEIGHTS}: module '{name}': cannot rebuild its {entry.get('kind')} "
                           f"tensors ({e})") from None
        new.cbx_method = entry.get("method", "")
        new.cbx_config = entry.get("config", {})
        model.set_submodule(name, new)
    qnames = set(manifest["modules"])
    expected = {k: v for k, v in model.state_dict().items() if not _under(k, qnames)}
    check_state(expected, tensors, folder / WEIGHTS)
    # The quantized modules are already built from their own tensors (a library's tensor
    # subclasses must not be re-assigned through load_state_dict); everything else loads here,
    # and the check above plus the one below keep the load strict.
    result = model.load_state_dict({k: tensors[k] for k in expected}, strict=False, assign=True)
    stray = [k for k in result.missing_keys if not _under(k, qnames)] + list(result.unexpected_keys)
    if stray:
        raise CbxError(f"{folder / WEIGHTS}: tensors do not match the model: {', '.join(stray[:5])}")
    # Non-persistent buffers (rotary inv_freq, ...) are not saved, but a cast of the model cast
    # them too and outputs depend on their dtype.
    named_buffers = dict(model.named_buffers())
    for key, dt in (manifest.get("buffer_dtypes") or {}).items():
        if key in named_buffers:
            owner, _, leaf = key.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            setattr(mod, leaf, named_buffers[key].to(getattr(torch, dt)))
    model.meta = dict(manifest.get("meta") or {})
    from cbx.compress.kernels import name_modules

    name_modules(model)
    return model.eval()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # safetensors hands out views at file offsets; the CPU int8/int4 kernels read their operands
    # with aligned vector loads and crashed (SIGSEGV) on a qweight 4 bytes off a 64-byte
    # boundary (a width-pruned model's tensor sizes moved the offsets). A copy is aligned.
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _nonpersistent_dtypes(model: nn.Module) -> dict[str, str]:
    persistent = set(model.state_dict())
    return {k: str(b.dtype).replace("torch.", "") for k, b in model.named_buffers()
            if k not in persistent and b.is_floating_point()}


def _under(key: str, names: set[str]) -> bool:
    """Whether state-dict ``key`` belongs to one of the modules ``names`` (at any depth)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))
