"""Integrity of folders the workbench writes and reads back: exports and checkpoints.

An export (``cbx export``) or a compressed checkpoint names every file it holds with its
SHA-256 in a manifest. Every load checks them here, in one function per question, so no
command can load one without checking (the engine's folder loader calls
:func:`verify_export_if_present`, ``cbx.lab.export`` calls :func:`verify_export_folder`, the
compressed-checkpoint loader calls :func:`verify_listed_files`):

* a listed name must be a plain relative path inside the folder: no absolute path, no ``..``;
* no file or folder in it may be a symbolic link (a link would let a manifest vouch for bytes
  outside the folder, and a copy would silently take the target's content);
* every listed file exists and has its hash; a file the manifest does not list is refused
  (added after the export).

Why below every layer: the engine (which loads upstream-layout folders, including dequantized
exports) must not import the lab layer that writes exports.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from cbx.errors import CbxError
from cbx.files import read_json_file, sha256_file

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "cbx-export"
EXPORT_KINDS = ("compressed", "upstream")


def safe_relpath(rel: str, folder: Path, manifest: str) -> Path:
    """``folder / rel`` for a manifest entry that stays inside ``folder``; CbxError otherwise."""
    p = PurePosixPath(str(rel))
    if not str(rel) or p.is_absolute() or ".." in p.parts or "\\" in str(rel) or ":" in p.parts[0]:
        raise CbxError(f"{folder / manifest}: lists {rel!r}, which is not a plain path inside the folder")
    return folder / Path(*p.parts)


def refuse_symlinks(folder: Path, what: str = "folder") -> None:
    """CbxError naming the first symbolic link inside ``folder`` (or ``folder`` itself)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise CbxError(f"{folder}: is a symbolic link; a {what} must be a real folder")
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = Path(root) / name
            if p.is_symlink():
                raise CbxError(f"{p}: symbolic link inside a {what} (refused: its content is not part of the {what})")


def folder_files(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative POSIX paths of the regular files under ``folder`` (no links followed)."""
    out = []
    for root, _dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel not in skip:
                out.append(rel)
    return sorted(out)


def verify_listed_files(folder: Path, listed: dict[str, str], manifest: str, allow_extra: bool = False) -> None:
    """Every listed file inside ``folder``, no links, hashes equal, and (unless
    ``allow_extra``) no file that is not listed."""
    folder = Path(folder)
    refuse_symlinks(folder)
    if not isinstance(listed, dict):
        raise CbxError(f"{folder / manifest}: 'files' is not a mapping of file name to SHA-256")
    for rel, digest in listed.items():
        p = safe_relpath(rel, folder, manifest)
        if not p.is_file():
            raise CbxError(f"{p}: listed in {manifest} but missing")
        if sha256_file(p) != digest:
            raise CbxError(f"{p}: content does not match its hash in {manifest} (corrupt or edited)")
    if not allow_extra:
        extra = sorted(set(folder_files(folder, skip=(manifest,))) - {PurePosixPath(r).as_posix() for r in listed})
        if extra:
            raise CbxError(f"{folder / extra[0]}: not listed in {manifest} (added after it was written)")


def read_export_info(folder: Path) -> dict[str, Any]:
    """``export.json`` of ``folder`` (format and kind checked, files not yet)."""
    path = Path(folder) / EXPORT_FILE
    info = read_json_file(path, f"{path}: missing (not an export folder)")
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or info.get("kind") not in EXPORT_KINDS:
        got = (info.get("format"), info.get("kind")) if isinstance(info, dict) else (None, None)
        raise CbxError(f"{path}: not a {EXPORT_FORMAT} file (format {got[0]!r}, kind {got[1]!r})")
    return info


def verify_export_folder(folder: Path) -> dict[str, Any]:
    """``export.json`` of ``folder`` after checking every file (see the module docstring)."""
    folder = Path(folder)
    info = read_export_info(folder)
    verify_listed_files(folder, info.get("files") or {}, EXPORT_FILE)
    return info


def verify_export_if_present(folder: Path) -> dict[str, Any] | None:
    """For loaders of model folders: a folder holding ``export.json`` is an export and is
    verified before a byte of it is used; other folders pass (None)."""
    folder = Path(folder)
    if (folder / EXPORT_FILE).exists() or (folder / EXPORT_FILE).is_symlink():
        return verify_export_folder(folder)
    return None
