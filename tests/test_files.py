"""cbx.files: atomic folders appear whole or not at all, replace an old folder only when asked,
leave no temporary folders behind and get a plain mkdir's permissions; the file hash is SHA-256."""

from __future__ import annotations

import hashlib
import os

import pytest

from cbx.errors import CbxError
from cbx.files import atomic_dir, sha256_file


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_dir_appears_whole_with_plain_permissions(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "a.bin").write_bytes(b"abc")
        assert not out.exists()  # nothing visible until the block succeeds
    assert _listing(out) == ["a.bin"]
    assert _listing(tmp_path) == ["ckpt"]  # no temporary folder left
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_a_failed_write_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "old.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out, replace=True, is_ours=lambda d: True) as tmp:
            (tmp / "new.bin").write_bytes(b"new")
            raise RuntimeError("boom")
    assert _listing(out) == ["old.bin"]
    assert _listing(tmp_path) == ["ckpt"]


def test_replace_only_when_asked(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "old.bin").write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_dir(out) as tmp:
            (tmp / "new.bin").write_bytes(b"new")
    assert _listing(out) == ["old.bin"]
    # replacing needs the writer to recognise the old folder as its own: nothing else is deleted
    with pytest.raises(CbxError, match="holds files this command did not write"):
        with atomic_dir(out, replace=True, is_ours=lambda d: (d / "mine.bin").exists()) as tmp:
            (tmp / "new.bin").write_bytes(b"new")
    assert _listing(out) == ["old.bin"] and _listing(tmp_path) == ["ckpt"]
    with atomic_dir(out, replace=True, is_ours=lambda d: (d / "old.bin").exists()) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert _listing(out) == ["new.bin"]
    assert _listing(tmp_path) == ["ckpt"]  # the moved-aside old folder is gone too


def test_sha256_file_is_sha256_of_the_bytes(tmp_path):
    data = os.urandom(3 * (1 << 20) + 5)  # more than one read block
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
