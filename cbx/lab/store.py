"""Run folders in a results directory: ids, atomic writes, locks and the run record.

A run folder holds everything needed to trace one leaderboard row::

    <results>/<run_id>/
        run.json            record: resolved config, status, provenance, summary (written last)
        synth/<utt>.json    one engine output row per finished utterance (resume unit)
        audio/<utt>.wav     its waveform
        score/              the eval scorer's utterances.jsonl and aggregate.json
        checkpoint/         compressed checkpoint (compressed runs only)

The run id is the experiment name plus a hash of everything that changes the numbers (the
resolved config without name and tracking, and the hardware), so re-running an unchanged
experiment finds its folder and resumes or reuses it, and a changed one gets a new folder.

Two processes on one results folder never corrupt each other: every file is written to a
temporary name in the same folder and renamed into place (``os.replace`` is atomic on POSIX),
and work on one run id is serialised by a ``filelock`` lock file under ``<results>/.locks``.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from cbx.errors import CbxError
from cbx.files import atomic_write_audio, atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)

RUN_RECORD = "run.json"
RECORD_VERSION = "1"
DEFAULT_RESULTS = "runs"
STATUS_RUNNING, STATUS_DONE, STATUS_FAILED = "running", "done", "failed"


def stable_hash(obj: Any, n: int = 10) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def slug(s: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in s.lower()).strip("-.")
    return out or "run"


def config_key(resolved: dict[str, Any], hardware_id: str) -> str:
    """Identity of what a run measures: resolved config minus naming/logging, plus hardware."""
    body = {k: v for k, v in resolved.items() if k not in ("name", "tracking")}
    return stable_hash({"config": body, "hardware": hardware_id}, 16)


def run_id_for(name: str, key: str) -> str:
    return f"{slug(name)}-{key[:8]}"


def write_wav_atomic(path: Path, wav: Any, sr: int) -> None:
    """32-bit float WAV (exact: resumed and sharded runs compare equal to single runs)."""
    import numpy as np

    atomic_write_audio(path, np.asarray(wav, dtype=np.float32).reshape(-1), sr, subtype="FLOAT")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as e:
        raise CbxError(f"{path}: cannot read JSON ({e})") from e


class ResultsDir:
    """A results folder: where run folders live, and the locks that guard them."""

    def __init__(self, root: str | Path = DEFAULT_RESULTS):
        self.root = Path(root)

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    @contextmanager
    def lock(self, run_id: str, timeout: float = -1) -> Iterator[None]:
        """Exclusive work on ``run_id`` (or a config key; another process waits, then finds
        the run finished)."""
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        lk = FileLock(str(lock_dir / f"{run_id}.lock"), timeout=timeout)
        try:
            with lk:
                yield
        except Timeout as e:
            raise CbxError(f"run {run_id} is locked by another process ({lock_dir / (run_id + '.lock')})") from e

    def record(self, run_id: str) -> dict[str, Any] | None:
        p = self.run_dir(run_id) / RUN_RECORD
        try:
            return read_json(p)
        except FileNotFoundError:
            return None

    def records(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every run folder with a readable record, oldest first."""
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            p = d / RUN_RECORD
            if d.name.startswith(".") or not p.is_file():
                continue
            try:
                out.append((d, read_json(p)))
            except CbxError:
                continue  # a record being replaced right now, or damaged: not a finished row
        out.sort(key=lambda t: (t[1].get("finished_at") or t[1].get("started_at") or "", t[0].name))
        return out

    def find_finished(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The newest finished (done) run measuring ``key``, whatever its name."""
        found = None
        for d, rec in self.records():
            if rec.get("config_key") == key and rec.get("status") == STATUS_DONE:
                found = (d, rec)
        return found

    def resolve_run(self, ref: str | Path) -> Path:
        """A run folder from a path or a run id (or a unique id prefix) in this results folder."""
        p = Path(ref)
        if (p / RUN_RECORD).is_file():
            return p
        cand = self.run_dir(str(ref))
        if (cand / RUN_RECORD).is_file():
            return cand
        if self.root.is_dir():
            matches = [d for d in self.root.iterdir() if d.name.startswith(str(ref)) and (d / RUN_RECORD).is_file()]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise CbxError(f"run {ref!r} is ambiguous in {self.root}: {', '.join(sorted(m.name for m in matches))}")
        raise CbxError(f"run {ref!r}: no run folder with {RUN_RECORD} at {p} or in {self.root}")


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
