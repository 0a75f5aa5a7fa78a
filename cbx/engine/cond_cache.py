"""Voice conditioning kept on disk, so that a second process on the same voice does not repay it.

Conditioning a voice (speech tokenizer, CAMPPlus speaker encoder, voice encoder over up to 15 s
of audio) costs about 0.8 s on the full-size model on a 2-core CPU, every time a process starts
(``cbx synth`` per sentence, every ``cbx run``). Its result is a handful of small tensors.

Why it is built this way:

* **Key = what the result depends on, nothing else**: the voice's content hash (file bytes or
  array samples, computed by :mod:`cbx.engine.conditioning`), the variant's conditioning
  settings (prompt seconds, loudness target, T3 prompt length), the *weights* of the three
  modules that compute it (a compressed T3 or CFM shares the entries of its original; a changed
  tokenizer does not), the device type (CPU and CUDA kernels give different bits; the cache
  promises bit-identical conditionals) and a format number. Exaggeration is applied on the way
  out by the conditioning module, so it is not part of the key.
* **Every weight byte, hashed fast**: SHA-256 over the speech tokenizer alone (0.5 GB) took
  1.0 s here, and float64 sums 3.3 s, more than conditioning itself (1.2 s on the full-size
  model); xxh3-128 (the ``xxhash`` package, non-cryptographic: the cache guards against
  mistakes, not attackers) reads every byte of the three modules in a fraction of that. It is
  computed once per model object and again only when a tensor of those modules is replaced or
  written in place (``Tensor._version``).
* **safetensors, never pickle**; the full key and a SHA-256 of the tensor bytes sit in the
  header metadata. A file whose header, key or checksum disagrees is rejected with a logged
  reason and recomputed (and overwritten); it never crashes a run. Writes go to a temporary
  file in the same folder and are renamed into place (atomic: a concurrent reader sees the old
  file or the new one, never half of one).
* **Where**: ``$CBX_COND_CACHE`` (a folder, or ``off`` to disable), else
  ``$CBX_CACHE_DIR/conds``, else ``~/.cache/cbx/conds``. Hits, misses and rejections are logged
  (``cbx.engine.cond_cache``) and counted in :data:`STATS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("cbx.engine.cond_cache")

FORMAT = 1
OFF_VALUES = {"off", "0", "false", "no", "none"}

# Counts for this process (tests and logs read them): "hit", "miss", "rejected", "write_failed".
STATS: dict[str, int] = {"hit": 0, "miss": 0, "rejected": 0, "write_failed": 0}

# model -> (fingerprint of (name, data_ptr, _version) per tensor, weights hash)
_FP: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_dir() -> Path | None:
    """The cache folder the environment asks for (see the module docstring); None when off."""
    env = os.environ.get("CBX_COND_CACHE")
    if env is not None and env.strip().lower() in OFF_VALUES:
        return None
    if env:
        return Path(env).expanduser()
    root = os.environ.get("CBX_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "cbx") / "conds"


def resolve(disk_cache: Any) -> Path | None:
    """``None`` -> :func:`default_dir`; ``False`` -> off; a path -> that folder."""
    if disk_cache is None or disk_cache is True:
        return default_dir()
    if disk_cache is False:
        return None
    return Path(disk_cache).expanduser()


def _modules(model) -> list[tuple[str, torch.nn.Module]]:
    s3 = model.s3gen
    return [("ve", model.ve), ("tokenizer", s3.tokenizer), ("speaker_encoder", s3.speaker_encoder)]


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    out = []
    for prefix, mod in _modules(model):
        if not isinstance(mod, torch.nn.Module):
            continue
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            out.append((f"{prefix}.{name}", t))
    return out


def tensor_fingerprint(t: torch.Tensor) -> bytes:
    """Hash of one tensor's shape, dtype and every byte (xxh3-128: see the module docstring)."""
    import xxhash

    h = xxhash.xxh3_128(f"{tuple(t.shape)}|{t.dtype}".encode())
    if t.numel():
        flat = t.detach().reshape(-1).contiguous().cpu()
        if flat.dtype in (torch.bfloat16, torch.float16):
            flat = flat.view(torch.int16)
        elif flat.dtype.is_floating_point and flat.element_size() == 1:  # float8
            flat = flat.view(torch.uint8)
        h.update(memoryview(flat.numpy()).cast("B"))
    return h.digest()


def weights_id(model) -> str:
    """Fingerprint of the weights conditioning is computed with (cached per model object)."""
    tensors = _tensors(model)
    state = tuple((n, t.data_ptr(), t._version) for n, t in tensors)
    try:
        held = _FP.get(model)
    except TypeError:
        held = None
    if held is not None and held[0] == state:
        return held[1]
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(tensor_fingerprint(t))
    digest = h.hexdigest()
    try:
        _FP[model] = (state, digest)
    except TypeError:
        pass
    return digest


def entry_key(model, voice_digest: str, settings: dict[str, Any], device: torch.device) -> dict[str, str]:
    """The full key of one entry (all strings: it goes into the safetensors header)."""
    import importlib.metadata as md

    try:
        upstream = md.version("chatterbox-tts")
    except md.PackageNotFoundError:
        upstream = "?"
    return {
        "format": str(FORMAT),
        "voice": voice_digest,
        "variant": str(model.variant),
        "settings": json.dumps(settings, sort_keys=True),
        "weights": weights_id(model),
        "device_type": torch.device(device).type,
        "upstream": upstream,
    }


def _file_name(key: dict[str, str]) -> str:
    whole = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{key['variant']}-{key['voice'][:16]}-{whole}.safetensors"


def _flatten(t3_parts: dict, gen: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    tensors, nones = {}, []
    for prefix, d in (("t3", t3_parts), ("gen", gen)):
        for k, v in d.items():
            name = f"{prefix}.{k}"
            if v is None:
                nones.append(name)
            elif torch.is_tensor(v):
                tensors[name] = v.detach().to("cpu").contiguous()
            else:
                raise TypeError(f"conditioning part {name} is a {type(v).__name__}, not a tensor")
    return tensors, nones


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def load(folder: Path, key: dict[str, str], device: torch.device, name: str):
    """(t3 parts, gen dict) on ``device`` from the cache, or None (a miss or a rejected file,
    logged with its reason)."""
    from safetensors import safe_open

    path = folder / _file_name(key)
    if not path.is_file():
        STATS["miss"] += 1
        log.info("voice conditioning: disk cache miss for %s (%s)", name, path.name)
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        stored = json.loads(meta.get("key", "null"))
        if stored != key:
            diff = sorted(k for k in set(key) | set(stored or {}) if (stored or {}).get(k) != key.get(k))
            raise ValueError(f"key mismatch in {', '.join(diff)}")
        if meta.get("sha256") != _checksum(tensors):
            raise ValueError("tensor checksum mismatch (file corrupted)")
        nones = json.loads(meta.get("none", "[]"))
        parts: dict[str, dict] = {"t3": {}, "gen": {}}
        for full, v in list(tensors.items()) + [(n, None) for n in nones]:
            prefix, k = full.split(".", 1)
            parts[prefix][k] = v.to(device) if v is not None else None
        for need in ("speaker_emb", "cond_prompt_speech_tokens"):
            if need not in parts["t3"]:
                raise ValueError(f"t3.{need} missing")
        for need in ("prompt_token", "prompt_feat", "embedding"):
            if parts["gen"].get(need) is None:
                raise ValueError(f"gen.{need} missing")
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is a rejected entry, never a crash
        STATS["rejected"] += 1
        log.warning("voice conditioning: disk cache entry %s rejected (%s); recomputing", path, exc)
        return None
    STATS["hit"] += 1
    log.info("voice conditioning: disk cache hit for %s (%s)", name, path.name)
    return parts["t3"], parts["gen"]


def store(folder: Path, key: dict[str, str], t3_parts: dict, gen: dict) -> Path | None:
    """Write one entry atomically; a failure (read-only folder, full disk) is logged, not raised."""
    from safetensors.torch import save_file

    path = folder / _file_name(key)
    tmp = None
    try:
        tensors, nones = _flatten(t3_parts, gen)
        meta = {"key": json.dumps(key, sort_keys=True), "sha256": _checksum(tensors), "none": json.dumps(nones)}
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        tmp = None
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: say so and go on
        STATS["write_failed"] += 1
        log.warning("voice conditioning: could not write disk cache entry %s (%s)", path, exc)
        return None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path
