"""File helpers shared by every layer: atomic writes, and the JSON-lines reader of manifests.

A run that is interrupted must never leave a truncated wav, JSON or checkpoint that looks
valid: each file is written beside its target (``mkstemp`` in the same folder), flushed and
renamed over it, so it appears complete or not at all. ``mkstemp`` creates files readable by
the owner only; the final file gets the permissions a plain ``open()`` would have given it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file the caller asked for, not a temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_file(path: str | os.PathLike, missing: str) -> Any:
    """The JSON in ``path``; CbxError ``missing`` when it is not a file, and one naming the file
    when it is not valid JSON (checkpoint, student and export manifests all start this way)."""
    from cbx.errors import CbxError

    path = Path(path)
    if not path.is_file():
        raise CbxError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CbxError(f"{path}: not valid JSON ({e})") from None


def audio_file(path: str | os.PathLike) -> Path:
    """``path`` as an audio file to read; CbxError naming it when it is a folder, missing or
    empty (0 bytes), before a decoder gets the chance to fail less clearly (the engine's and
    the eval suite's audio readers both start this way)."""
    from cbx.errors import CbxError

    path = Path(path)
    if path.is_dir():
        raise CbxError(f"{path}: is a folder, not an audio file")
    if not path.is_file():
        raise CbxError(f"{path}: audio file not found")
    if path.stat().st_size == 0:
        raise CbxError(f"{path}: audio file is empty (0 bytes)")
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


_AUDIO_FORMATS = {".wav": "WAV", ".flac": "FLAC"}


def atomic_write_audio(path: str | os.PathLike, wav: np.ndarray, sr: int, subtype: str = "PCM_16") -> Path:
    """``wav`` (mono, or [frames, channels]) as WAV or FLAC (from the suffix) of ``subtype``."""
    import soundfile as sf

    fmt = _AUDIO_FORMATS.get(Path(path).suffix.lower(), "WAV")
    buf = io.BytesIO()
    sf.write(buf, wav, int(sr), format=fmt, subtype=subtype)
    return atomic_write_bytes(path, buf.getvalue())


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, replace: bool = False, is_ours=None) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` to write into; when the block succeeds it is renamed
    to ``out_dir``, when it fails it is removed. ``out_dir`` must be absent or an empty folder,
    unless ``replace``: then a previous folder is moved aside, the new one renamed in, and the
    old one deleted (a reader sees the old folder or the new one, never a mix). ``is_ours(path)``
    must say True for a non-empty previous folder before it is replaced: nothing that the
    writer did not make is ever deleted (CbxError before any work)."""
    out_dir = Path(out_dir)
    if replace and out_dir.exists():
        from cbx.errors import CbxError

        if out_dir.is_symlink() or not out_dir.is_dir():
            raise CbxError(f"{out_dir}: exists and is not a folder; not replacing it")
        if any(out_dir.iterdir()) and (is_ours is None or not is_ours(out_dir)):
            raise CbxError(f"{out_dir}: exists and holds files this command did not write; not replacing it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is owner-only; give a plain mkdir's mode
    try:
        yield tmp
        old = None
        if out_dir.exists():
            if replace:
                old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
                os.replace(out_dir, old)
            else:
                out_dir.rmdir()
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_hash_index(folder: str | os.PathLike, index_name: str, listed: dict[str, str],
                      allow_extra: bool = False) -> None:
    """Check that ``folder`` holds exactly the files ``listed`` (relative path -> SHA-256; the
    index file ``index_name`` itself excepted) with those hashes, no symbolic links and no
    listed path outside the folder. The one check behind every "this folder is what was
    written" promise (exports, compressed checkpoints); the :class:`CbxError` names the file.
    Implemented in :func:`cbx.integrity.verify_listed_files`."""
    from cbx.integrity import verify_listed_files

    verify_listed_files(Path(folder), listed, index_name, allow_extra=allow_extra)


def jsonl_objects(lines: Iterable[str]) -> Iterator[tuple[int, dict | None, str]]:
    """``(line number, object, "")`` for each non-blank line of a JSON-lines text that holds a
    JSON object, ``(line number, None, reason)`` for the others (``not valid JSON (...)``, ``not a
    JSON object``): the callers' manifests report bad lines by number instead of stopping."""
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            yield n, None, f"not valid JSON ({e.msg})"
            continue
        if not isinstance(d, dict):
            yield n, None, "not a JSON object"
            continue
        yield n, d, ""
