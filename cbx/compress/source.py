"""Every kind of model source, resolved in one place: what the engine loads (built-in models,
upstream-layout folders, Hub ids) plus the workbench's own compressed folders (a run's
``checkpoint/`` or a ``cbx export`` in the compressed format).

Why here: loading a compressed folder needs the compression layer (its module classes and
manifest), and every user of a model source (``cbx run``'s ``model:``, ``cbx synth --model``,
``cbx save-model``, export loading) must accept the same sources with the same checks. The
engine stays ignorant of compression; the lab and the CLI commands call this module. A folder is
compressed when its ``manifest.json`` says ``format: cbx-compressed`` (never from its name). An
export's ``export.json`` is verified first (every file's SHA-256, no file added:
:func:`cbx.integrity.verify_export_if_present`, the same check ``cbx export`` verifies with), then the
manifest's own hashes when the checkpoint loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXPORT_INDEX = "export.json"  # written by cbx.lab.export (its EXPORT_FILE)


def compressed_folder(source: str | Path) -> Path | None:
    """The folder if ``source`` is a compressed checkpoint/export folder, else None."""
    from cbx.compress.checkpoint import FORMAT, MANIFEST

    p = Path(str(source)).expanduser()
    m = p / MANIFEST
    if not (p.is_dir() and m.is_file()):
        return None
    try:
        return p if json.loads(m.read_text()).get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def source_kind(source: str) -> str:
    """``compressed`` for a compressed folder, else :func:`cbx.engine.identity.source_kind`
    (``builtin`` | ``folder`` | ``hub``); :class:`CbxError` for a source that cannot load."""
    if compressed_folder(source) is not None:
        return "compressed"
    from cbx.engine.identity import source_kind as engine_kind

    return engine_kind(source)


def load_source(source: str | Path, device: Any = "cpu", dtype: Any = None, variant: str | None = None):
    """Load any model source (see the module docstring) as a ``ChatterboxModel``."""
    folder = compressed_folder(source)
    if folder is None:
        from cbx.engine.model import load_model

        return load_model(source, device=device, dtype=dtype, variant=variant)
    from cbx.compress.checkpoint import load_compressed
    from cbx.errors import CbxError
    from cbx.integrity import verify_export_if_present

    verify_export_if_present(folder)  # format, every hash, no links, no path outside the folder
    model = load_compressed(folder)
    if variant is not None and variant != model.variant:
        raise CbxError(f"{folder}: holds a {model.variant} model, not {variant}")
    model.to(device)
    if dtype is not None:
        model.t3.to(dtype)
    return model.eval()
