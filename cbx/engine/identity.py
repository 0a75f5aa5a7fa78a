"""What a model source is, checked without loading it, and a stable identity for it.

Two users need this before any work starts: the run planner (``cbx run`` refuses a model
source that cannot be loaded before it synthesizes anything) and train-on-demand (a trained
checkpoint is keyed by its teacher's identity, so a student trained against one set of
weights is never reused for another). Loading a full-size model to find out takes a minute and
gigabytes; the checks here only look at names and files.

Identities: a built-in tiny model is its name plus a hash of the weights it builds (a function of
the code and the seed; not of its architecture dict, which transformers mutates in place while
building a Llama: ``rope_scaling`` gains a ``rope_theta`` key); a full-size random model
(``random:VARIANT``) its name and the upstream package version; a local folder is the hash of its files' contents (names
and SHA-256, not modification times: a copy of the same weights is the same teacher); a Hub id
is the id itself (the workbench fetches a fixed file list of a known repository).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from cbx.errors import CbxError


def source_kind(source: str) -> str:
    """``"builtin"``, ``"folder"`` or ``"hub"`` for a loadable model source; :class:`CbxError`
    (the same message :func:`cbx.engine.model.load_model` gives) for anything else."""
    from cbx.engine import hub
    from cbx.engine.model import builtin_sources, detect_variant

    src = str(source)
    if src in builtin_sources():
        return "builtin"
    p = Path(src).expanduser()
    if p.is_dir():
        detect_variant(p)  # a folder without T3 weights is refused now, naming what is missing
        return "folder"
    if p.exists():
        raise CbxError(f"model source '{src}': is a file; give a folder in the upstream file layout")
    if hub.looks_like_hub_id(src):
        hub.resolve(src)
        return "hub"
    raise CbxError(f"model source '{src}': not a folder, not a known Hub id ({', '.join(hub.HUB_MODELS)}) "
                   f"and not a built-in model ({', '.join(builtin_sources())})")


def hub_cached(source: str) -> bool:
    """Whether every file the workbench needs of Hub model ``source`` is in the local cache."""
    from cbx.engine import hub

    model = hub.resolve(source)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=model.repo_id, allow_patterns=list(model.allow_patterns), local_files_only=True)
    except Exception:  # not cached (or a partial snapshot): the hub library raises several types
        return False
    return True


def model_identity(source: str) -> str:
    """A stable string naming the weights ``source`` loads (see the module docstring)."""
    from cbx.engine.model import TINY_SOURCES

    src = str(source)
    kind = source_kind(src)
    if kind == "builtin" and src in TINY_SOURCES:
        return f"{src}:{_builtin_weights_hash(TINY_SOURCES[src])}"
    if kind == "builtin":  # full-size random weights: too large to hash; upstream code + seed 0
        import importlib.metadata as md

        return f"{src}:chatterbox-tts-{md.version('chatterbox-tts')}"
    if kind == "folder":
        from cbx.files import sha256_file

        folder = Path(src).expanduser()
        h = hashlib.sha256()
        for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.is_symlink()):
            h.update(f"{p.relative_to(folder)}\0{sha256_file(p)}\n".encode())
        return f"folder:{h.hexdigest()[:16]}"
    return f"hub:{src}"


@functools.lru_cache(maxsize=None)
def _builtin_weights_hash(variant: str) -> str:
    import torch

    from cbx.engine.tiny import build_tiny

    h = hashlib.sha256()
    for k, v in sorted(build_tiny(variant, seed=0).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]
