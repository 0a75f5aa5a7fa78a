"""The fixed, versioned result schema of the scorer (``utterances.jsonl``, ``aggregate.json``).

One row per scored utterance::

    {"schema": "cbx.eval/1", "line": 3, "id": "003-...", "audio": "wavs/3.wav", "text": "...",
     "prompt": "voices/a.wav", "metrics": {"wer": 0.0, "speaker_sim": 0.81, ...},
     "details": {"asr_text": "...", "wer_errors": 0, "wer_ref_words": 9}}

``metrics`` holds registered metric names only (a metric that could not be computed is absent,
never 0); ``details`` holds what explains them. ``line`` is where the utterance was in the
manifest (the only field that changes when the manifest is reordered).

``aggregate.json``::

    {"schema": "cbx.eval/1", "suite_version": "1", "eval_set": {"name", "version"} | null,
     "manifest": "...", "n_lines": 30, "n_scored": 29, "n_skipped": 1,
     "skipped": [{"line": 7, "reason": "..."}],
     "bootstrap": {"n_resamples": 1000, "confidence": 0.95, "seed": 0},
     "metrics": {"wer": {"value", "mean", "ci95": [lo, hi] | null, "n", "higher_is_better",
                         "aggregation", "unit", "version", "variant"}, ...}}

``value`` is the headline number of the metric's aggregation (the mean; the corpus ratio for
``corpus``; the sum or max for those), ``ci95`` its bootstrap interval where one is defined.
Readers check ``schema`` with :func:`load_aggregate` / :func:`load_rows` and refuse others, so a
format change can never be read as the old one. JSON is strict: non-finite numbers are null.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cbx.errors import CbxError

SCHEMA = "cbx.eval/1"
# Bumped when a default of the suite changes what a number means (models, normalizer, sets).
SUITE_VERSION = "1"
ROWS_FILE = "utterances.jsonl"
AGGREGATE_FILE = "aggregate.json"


def clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(clean(obj), allow_nan=False, ensure_ascii=False, **kw)


def load_aggregate(path: str | os.PathLike) -> dict:
    """Read an ``aggregate.json`` (or the folder holding it) of this schema."""
    p = Path(path)
    if p.is_dir():
        p = p / AGGREGATE_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CbxError(f"{p}: no aggregate.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CbxError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else None
        raise CbxError(f"{p}: schema {got!r}, this version reads {SCHEMA!r}")
    return data


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Read ``utterances.jsonl`` (or the folder holding it) of this schema."""
    p = Path(path)
    if p.is_dir():
        p = p / ROWS_FILE
    if not p.is_file():
        raise CbxError(f"{p}: no utterances.jsonl")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CbxError(f"{p}:{n}: not valid JSON ({e})") from None
        if row.get("schema") != SCHEMA:
            raise CbxError(f"{p}:{n}: schema {row.get('schema')!r}, this version reads {SCHEMA!r}")
        rows.append(row)
    return rows
