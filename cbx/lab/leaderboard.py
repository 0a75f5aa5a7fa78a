"""The leaderboard: one row per run, relative to its baseline, rendered from run records.

Every table and plot here is a function of the run folders' ``run.json`` records (rows are
never typed by hand, as in lm-evaluation-harness). Rows are grouped by what makes numbers
comparable: eval set and version, metric versions, and hardware. Rows are ranked only inside
a group; a failed run (NaN or silent outputs) is listed with its reason and never ranked.

What a reader sees is decided in one place, :data:`COLUMNS`: each :class:`Column` declares its
short header (the terminal's default table fits 120 characters), its full header (``--wide``,
CSV, HTML), a one-line legend, its direction, where its interval comes from and why a cell
may be empty. Other parts of the workbench add columns with :func:`register_column` (a
``value`` function reading the run record), so the terminal, Markdown, CSV, HTML and W&B
tables all gain them at once. Why it is built so:

* **Nothing unexplained.** Every "-" carries a reason (a footnote letter in text tables, a
  tooltip in HTML): the metric was not requested, no utterance gave a value (with the metric's
  known cause), the baseline lacks it, the run failed.
* **Noise is not a result.** A baseline-relative value with an interval (the paired statistics
  in ``run.json``'s ``paired`` section) that contains "no change" is marked ``≈`` and ranked
  level with its baseline rather than above or below it.
* **Random weights are said out loud.** Built-in tiny / ``random:`` models make noise, not
  speech: their WER, SIM and MOS mean nothing. Such groups get a banner and are sorted by
  fidelity to the baseline (mel L1) unless another sort is asked for.

Baseline-relative columns use the pairing the runner recorded (``baseline_run``): WER change
(absolute points), speaker-similarity ratio, speed-up (baseline RTF / RTF), size ratio. The
metric directions come from the metric registry, never from a column name.

Outputs: a terminal table, Markdown, CSV, a self-contained HTML page (inline CSS/JS, sortable
columns, sticky run column, per-utterance players of the compressed clip beside its
baseline's) and Pareto-front PNGs drawn with matplotlib's Agg backend.
"""

from __future__ import annotations

import base64
import collections
import csv
import html
import io
import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cbx.lab import store
from cbx.lab.store import ResultsDir, atomic_write_bytes, atomic_write_text

# Metric names as the eval suite registers them; the first present one is shown.
WER_KEYS = ("wer",)
SIM_KEYS = ("speaker_sim", "sim", "speaker_similarity")
MOS_KEYS = ("mos", "distillmos", "dnsmos")
ARTIFACT_KEYS = ("click_count", "clip_events", "pause_noise_count", "spillover_flag", "dc_flag", "nonfinite_count")
DEFAULT_SORT = "wer_delta"
FIDELITY_SORT = "t3_top1_agreement"  # groups of random-weight models (quality metrics mean nothing there)
# Ties on a sort column (equal, or both within noise of the baseline) are broken by these: T3
# agreement says nothing about a decoder-only change, mel L1 nothing about a T3-only one.
TIE_BREAK = {"t3_top1_agreement": ("mel_l1",), "mel_l1": ("t3_top1_agreement",)}
TERMINAL_WIDTH = 120

# Known causes of a metric with no value (the eval suite's own thresholds, said in words).
MISSING_CAUSES = {
    "speaker_sim": "the speaker encoder found under 0.3 s of speech in the outputs",
    "t3_top1_agreement": "long texts split into chunks are not teacher-forced",
    "t3_kl": "long texts split into chunks are not teacher-forced",
}


@dataclass(frozen=True)
class Column:
    """One leaderboard column.

    ``header`` is the short form (terminal default), ``wide`` the full one; ``legend`` is one
    line for the legend and tooltips. ``null`` is the value meaning "no change" for a
    baseline-relative column (0 for a difference, 1 for a ratio): an interval that contains it
    is within noise. ``value(record, baseline_record)`` computes the cell for columns added
    by :func:`register_column`; ``reason(record, baseline_record)`` says why it may be empty.
    ``terminal``: in the default terminal table; ``width``: longest text shown there (cut with
    "…"); ``kind``: id | fidelity | quality | cost | info (orders the default table).
    """

    key: str
    header: str
    wide: str = ""
    legend: str = ""
    fmt: str = "{:#.3g}"
    higher_is_better: bool | None = None  # None: not a ranking quantity
    null: float | None = None
    terminal: bool = True
    width: int | None = None
    kind: str = "info"
    value: Callable[[dict, dict | None], Any] | None = None
    reason: Callable[[dict, dict | None], str | None] | None = None

    @property
    def label(self) -> str:  # the full header (kept for callers of the earlier API)
        return self.wide or self.header

    @property
    def numeric(self) -> bool:
        return self.higher_is_better is not None or self.key in ("rank",)


_MEM_LEGEND = ("weights + peak working memory of the run's own synthesis, MiB (tensor memory: CUDA max_memory_allocated "
               "reset per run; CPU: the profiler's allocation events of an untimed pass after the warm-up)")

COLUMNS: list[Column] = [
    Column("rank", "#", "rank", "rank inside the group by the sort column (=: tied, equal or both within noise of the baseline)", "{}", kind="id"),
    Column("run_id", "run id", "run id", "run folder name under the results folder (experiment name + config hash)", "{}", kind="id"),
    Column("name", "run", "experiment", "experiment name", "{}", terminal=False, kind="id"),
    Column("method_short", "method", "method (short)", "compression steps, short form (full label: --wide, CSV, HTML)", "{}",
           width=20, kind="id"),
    Column("method", "method", "method", "compression steps with every non-default parameter", "{}", terminal=False, kind="id"),
    Column("status", "status", "status", "done, or failed (not ranked; reason below the table)", "{}", terminal=False, kind="id"),
    Column("n_failed", "fail", "failed utterances", "utterances left out with a reason (prompt refused; empty, silent or non-finite output): run.json 'failures'",
           "{}", kind="id", value=lambda rec, base: (rec.get("failures") or {}).get("n"),
           reason=lambda rec, base: "not recorded by this run (older record)"),
    Column("t3_top1_agreement", "top1", "T3 top-1 agreement", "T3 next-token top-1 agreement with the baseline, teacher-forced on its tokens (1 = same)",
           "{:.3f}", True, 1.0, kind="fidelity"),
    Column("t3_kl", "KL", "T3 KL (nats)", "KL(baseline || run) of T3's next-token distributions, nats per token (0 = same)", "{:#.3g}", False, 0.0,
           kind="fidelity"),
    Column("mel_l1", "melL1", "mel L1", "mean |log-mel difference| between this model's and the baseline's decoder on the baseline's tokens, same noise (0 = same)",
           "{:.3f}", False, 0.0, kind="fidelity"),
    Column("mcd_db", "MCD", "mel cepstral distortion (dB)", "MCD of the aligned decoder outputs (baseline's tokens, same noise), dB (0 = same)",
           "{:.2f}", False, 0.0, terminal=False, kind="fidelity", value=lambda rec, base: _metrics_of(rec).get("mcd_db"),
           reason=lambda rec, base: "baseline: fidelity is measured against it" if rec.get("is_baseline") else "not in this run's scores"),
    Column("wer", "WER", "WER", "word error rate of the ASR transcript (0-1+)", "{:.3f}", False, terminal=False, kind="quality"),
    Column("wer_delta", "ΔWER", "ΔWER (points vs baseline)", "WER minus the baseline's WER (negative is better)", "{:+.3f}", False, 0.0,
           kind="quality"),
    Column("sim", "SIM", "speaker similarity", "cosine similarity of speaker embeddings, output vs voice prompt", "{:.3f}", True,
           terminal=False, kind="quality"),
    Column("sim_ratio", "SIM×", "SIM ratio vs baseline", "speaker similarity / the baseline's (1 = same)", "{:.3f}", True, 1.0, kind="quality"),
    Column("mos", "MOS", "MOS (predicted)", "predicted mean opinion score, 1-5", "{:.2f}", True, kind="quality"),
    Column("mos_delta", "ΔMOS", "ΔMOS vs baseline", "predicted MOS minus the baseline's, paired per utterance", "{:+.2f}", True, 0.0,
           terminal=False, kind="quality", reason=lambda rec, base: _paired_reason(rec, "mos_delta")),
    Column("artifacts", "art", "artifacts / utt", "artifact events per utterance (clicks, clipping, noisy pauses, ...)", "{:.2f}", False,
           terminal=False, kind="quality"),
    Column("rtf", "RTF", "real-time factor", "synthesis seconds per second of audio (below 1: faster than real time)", "{:#.3g}", False,
           terminal=False, kind="cost"),
    Column("speedup", "speed", "speed-up vs baseline", "baseline RTF / RTF (above 1: faster)", "{:.2f}×", True, 1.0, kind="cost"),
    Column("size_mib", "MiB", "weights MiB", "bytes of weights the model holds in memory, MiB", "{:.1f}", False, terminal=False, kind="cost"),
    Column("size_ratio", "size×", "size ratio vs baseline", "weight bytes / the baseline's", "{:.3f}", False, 1.0, kind="cost"),
    Column("mem_mib", "memMiB", "memory MiB (weights + work)", _MEM_LEGEND, "{:.0f}", False, kind="cost"),
    Column("first_audio_s", "1st", "first audio s", "seconds from a streamed synthesis call to its first audio "
           "(first utterance, voice conditioned)", "{:.2f}", False, terminal=False, kind="cost"),
    Column("work_mem_mib", "work", "working memory MiB", "peak tensor memory of the run's own synthesis above what was in use at its start, MiB",
           "{:.0f}", False, terminal=False, kind="cost"),
]
COLS: dict[str, Column] = {c.key: c for c in COLUMNS}


def register_column(col: Column, after: str | None = None) -> Column:
    """Add (or replace) a column; ``after``: the key it follows (default: the end).

    Its cells come from ``col.value(record, baseline_record)`` (None shows "-" with
    ``col.reason(...)`` as the reason). Idempotent, so a module may register at import time."""
    if col.key in COLS:
        COLUMNS[[c.key for c in COLUMNS].index(col.key)] = col
    elif after is not None and after in COLS:
        COLUMNS.insert([c.key for c in COLUMNS].index(after) + 1, col)
    else:
        COLUMNS.append(col)
    COLS[col.key] = col
    return col


def ranking_keys() -> list[str]:
    return [c.key for c in COLUMNS if c.higher_is_better is not None]


# ---------------------------------------------------------------- rows


def _metrics_of(rec: dict) -> dict[str, float]:
    agg = rec.get("aggregate") or {}
    src = agg.get("metrics", agg) if isinstance(agg, dict) else {}
    out = {}
    for k, v in src.items():
        if isinstance(v, dict):
            v = v.get("value", v.get("mean"))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def _metric_entries(rec: dict) -> dict[str, dict]:
    agg = rec.get("aggregate") or {}
    src = agg.get("metrics", {}) if isinstance(agg, dict) else {}
    return {k: v for k, v in src.items() if isinstance(v, dict)}


def _first(m: dict[str, float], keys: Sequence[str]) -> float | None:
    for k in keys:
        if k in m:
            return m[k]
    return None


def _first_key(m: dict, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in m), None)


def _defaults(transform: str) -> dict:
    """A transform's default parameters (so labels show only what an experiment changed),
    read from the config dataclass's fields: a config that refuses to build without some
    parameter (``prune_depth`` needs one of count/fraction/drop) still has defaults."""
    import dataclasses

    try:
        from cbx.compress.registry import registered
        from cbx.lab.schema import to_plain

        spec = registered().get(transform)
        out = {}
        for f in dataclasses.fields(spec.config_cls) if spec else ():
            if f.default is not dataclasses.MISSING:
                out[f.name] = to_plain(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = to_plain(f.default_factory())
        return out
    except Exception:  # not a dataclass, or a transform no longer registered
        return {}


def _changed(step: dict) -> dict:
    params = step.get("params") or {}
    dflt = _defaults(step["transform"])
    return {k: v for k, v in params.items() if (k not in dflt or dflt[k] != v) and not isinstance(v, (list, dict))}


def method_label(rec: dict) -> str:
    steps = (rec.get("config") or {}).get("steps") or []
    if not steps:
        return "baseline"
    parts = []
    for s in steps:
        short = ",".join(f"{k}={v}" for k, v in _changed(s).items())
        parts.append(f"{s['transform']}({short})" if short else s["transform"])
    return " + ".join(parts)


# Short names for transforms and parameters in the terminal's method column.
SHORT_TRANSFORMS = {"int8_weight_only": "int8", "int4_weight_only": "int4", "fp8_cfm": "fp8cfm", "cfm_student": "student",
                    "prune_depth": "depth", "prune_width": "width", "sparsify": "sparse", "healed_checkpoint": "healed"}
SHORT_PARAMS = {"group_size": "g", "method": "", "steps": "s", "checkpoint": None, "targets": None, "ignore": None,
                "count": "-", "fraction": "-", "ffn_fraction": "ffn", "head_fraction": "heads", "pattern": "", "score": "",
                "calib_texts": None, "calib_max_speech_tokens": None, "calib_seed": None, "gptq_damp": None,
                "gptq_block_size": None}


def method_short(rec: dict) -> str:
    """``int4 g32 gptq + fp8cfm``: transform abbreviations and changed parameters, no paths."""
    steps = (rec.get("config") or {}).get("steps") or []
    if not steps:
        return "baseline"
    parts = []
    for s in steps:
        name = SHORT_TRANSFORMS.get(s["transform"], s["transform"].replace("_weight_only", ""))
        bits = []
        for k, v in _changed(s).items():
            tag = SHORT_PARAMS.get(k, k + "=")
            if tag is None or (isinstance(v, str) and ("/" in v or len(v) > 12)):
                continue
            bits.append(f"{tag}{v}" if tag != "s" else f"{v}s")
        parts.append(" ".join([name] + bits))
    return "+".join(parts)


def is_random_weights(rec: dict) -> bool:
    """Built-in tiny models and ``random:`` sources have random weights (noise, not speech)."""
    if rec.get("random_weights") is not None:
        return bool(rec["random_weights"])
    model = str((rec.get("config") or {}).get("model") or "")
    return model.startswith("tiny") or model.startswith("random:")


def group_key(rec: dict) -> tuple[str, str]:
    """(machine key, human label): runs are comparable only inside one group."""
    es = rec.get("eval_set") or {}
    mv = store.stable_hash(rec.get("metric_versions") or {}, 6)
    suite = rec.get("eval_suite_version")
    key = f"{es.get('name')}@{es.get('version')}|{rec.get('hardware_id')}|s{suite}|m{mv}|n{es.get('n_items')}"
    label = f"eval set {es.get('name')} v{es.get('version')} ({es.get('n_items')} utt), suite v{suite} metrics {mv}, {rec.get('hardware_label')}"
    return key, label


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ci(entry: Any) -> tuple[float, float] | None:
    ci = entry.get("ci95") if isinstance(entry, dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in ci):
        return float(ci[0]), float(ci[1])
    return None


def _metric_reason(rec: dict, names: Sequence[str], label: str) -> str:
    """Why a run has no value for a metric."""
    if rec.get("status") == store.STATUS_FAILED:
        return "run failed (not scored)"
    requested = rec.get("metric_versions")
    entries = _metric_entries(rec)
    name = _first_key(entries, names) or (names[0] if names else label)
    if requested is not None and not any(n in requested for n in names):
        return "not measured (not in eval.metrics)"
    e = entries.get(name)
    if e is not None and not e.get("n"):
        cause = MISSING_CAUSES.get(name)
        return "no utterance gave a value" + (f" ({cause})" if cause else "")
    return f"{label} is not in this run's scores"


def _memory(rec: dict, speed: dict, size: int | None) -> tuple[float | None, float | None]:
    """(weights + working memory, working memory) in MiB: the run's own figures only."""
    mem = rec.get("memory") or {}
    if mem.get("work_bytes") is not None:
        return (int(mem.get("weights_bytes") or size or 0) + int(mem["work_bytes"])) / 2**20, int(mem["work_bytes"]) / 2**20
    work = speed.get("work_mem_bytes")
    if work is None:
        return None, None
    return ((size or 0) + work) / 2**20, work / 2**20


def _samples(rec: dict, base: dict | None, run_dir: Path, results_root: Path) -> list[dict]:
    """Listed samples with their text, prompt and the baseline's clip of the same utterance."""
    out = []
    base_dir = results_root / base["run_id"] if base and base.get("run_id") else None
    for s in rec.get("samples") or []:
        uid = Path(s).stem
        info: dict[str, Any] = {"id": uid, "audio": str(run_dir / s), "text": None, "prompt": None, "baseline_audio": None}
        try:
            row = json.loads((run_dir / "synth" / f"{uid}.json").read_text())
            info.update(id=row.get("id", uid), text=row.get("text"), prompt=row.get("prompt"))
        except (OSError, ValueError):
            pass
        if base_dir is not None and (base_dir / s).is_file():
            info["baseline_audio"] = str(base_dir / s)
        out.append(info)
    return out


def row_of(rec: dict, base: dict | None, run_dir: Path) -> dict[str, Any]:
    """The leaderboard row of one run record (and its baseline's record, when paired)."""
    m = _metrics_of(rec)
    bm = _metrics_of(base) if base else {}
    entries = _metric_entries(rec)
    speed = rec.get("speed") or {}
    bspeed = (base or {}).get("speed") or {}
    wer, bwer = _first(m, WER_KEYS), _first(bm, WER_KEYS)
    sim, bsim = _first(m, SIM_KEYS), _first(bm, SIM_KEYS)
    arts = [m[k] for k in ARTIFACT_KEYS if k in m]
    size = rec.get("model_bytes")
    bsize = (base or {}).get("model_bytes")
    rtf, brtf = speed.get("rtf"), bspeed.get("rtf")
    mem, work = _memory(rec, speed, size)
    is_base = bool(rec.get("is_baseline"))
    gk, gl = group_key(rec)
    row: dict[str, Any] = {
        "run_id": rec.get("run_id", run_dir.name),
        "name": rec.get("name"),
        "model": (rec.get("config") or {}).get("model"),
        "method": method_label(rec),
        "method_short": method_short(rec),
        "status": rec.get("status"),
        "failure": rec.get("failure"),
        "is_baseline": is_base,
        "random_weights": is_random_weights(rec),
        "baseline_run": rec.get("baseline_run"),
        "group": gk,
        "group_label": gl,
        "wer": wer,
        "wer_delta": _delta(wer, bwer) if base else (0.0 if wer is not None and is_base else None),
        "sim": sim,
        "sim_ratio": _ratio(sim, bsim) if base else (1.0 if sim is not None and is_base else None),
        "mos": _first(m, MOS_KEYS),
        "artifacts": sum(arts) if arts else None,
        "rtf": rtf,
        "speedup": _ratio(brtf, rtf) if base else (1.0 if rtf and is_base else None),
        "peak_mem_mib": (speed.get("peak_mem_bytes") or 0) / 2**20 or None,
        "mem_mib": mem,
        "work_mem_mib": work,
        "first_audio_s": speed.get("first_audio_s"),
        "size_mib": size / 2**20 if size else None,
        "size_ratio": _ratio(size, bsize) if base else (1.0 if size and is_base else None),
        "t3_top1_agreement": m.get("t3_top1_agreement"),
        "t3_kl": m.get("t3_kl"),
        "mel_l1": m.get("mel_l1"),
        "samples": [str(run_dir / s) for s in rec.get("samples") or []],
        "sample_info": _samples(rec, base, run_dir, run_dir.parent),
        "seed": rec.get("seed"),
        "commit": (rec.get("git") or {}).get("commit"),
        "finished_at": rec.get("finished_at"),
    }
    # Intervals: absolute metrics from the scorer's bootstrap, baseline-relative ones from the
    # paired statistics (record["paired"][column key] = {"value", "ci95": [lo, hi]}).
    for key, names in (("wer", WER_KEYS), ("sim", SIM_KEYS), ("mos", MOS_KEYS)):
        k = _first_key(entries, names)
        if k and _ci(entries[k]):
            row[f"{key}_ci"] = _ci(entries[k])
    for k in ("t3_top1_agreement", "t3_kl", "mel_l1"):
        if k in entries and _ci(entries[k]):
            row[f"{k}_ci"] = _ci(entries[k])
    for key, entry in (rec.get("paired") or {}).items():
        if isinstance(entry, dict):
            v = entry.get("value")
            if isinstance(v, (int, float)) and math.isfinite(v):
                row[key] = float(v)
            if _ci(entry):
                row[f"{key}_ci"] = _ci(entry)
    for col in COLUMNS:
        if col.value is not None:
            try:
                row[col.key] = col.value(rec, base)
            except Exception as e:  # one bad record must not take the board down; say so in the cell's reason
                row[col.key] = None
                row.setdefault("why", {})[col.key] = f"cannot read ({type(e).__name__}: {e})"
    row["why"] = {**_reasons(rec, base, row), **row.get("why", {})}
    row["noise"] = {c.key: True for c in COLUMNS if c.null is not None and _within_noise(row, c)}
    return row


def _paired_reason(rec: dict, key: str) -> str:
    if rec.get("is_baseline"):
        return "baseline: compared against itself"
    if rec.get("status") != store.STATUS_DONE:
        return "run failed (not scored)"
    return "no paired value in this run's record (metric not scored in both runs)"


def _within_noise(row: dict, col: Column) -> bool:
    ci = row.get(f"{col.key}_ci")
    return bool(ci and not row.get("is_baseline") and ci[0] <= col.null <= ci[1])


def _reasons(rec: dict, base: dict | None, row: dict) -> dict[str, str]:
    """A reason for every empty cell of the row."""
    why: dict[str, str] = {}
    failed = rec.get("status") == store.STATUS_FAILED
    paired = base is not None or row["is_baseline"]
    no_base = "no finished baseline paired with this run" if rec.get("baseline_run") else "run has no baseline (baseline: false)"
    metric_cols = {"wer": (WER_KEYS, "WER"), "sim": (SIM_KEYS, "SIM"), "mos": (MOS_KEYS, "MOS")}
    for key, (names, label) in metric_cols.items():
        if row.get(key) is None:
            why[key] = _metric_reason(rec, names, label)
    for key, src in (("wer_delta", "wer"), ("sim_ratio", "sim")):
        if row.get(key) is None:
            if row.get(src) is None:
                why[key] = why[src]
            elif not paired:
                why[key] = no_base
            else:
                why[key] = f"the baseline has no {COLS[src].header} ({_metric_reason(base, metric_cols[src][0], COLS[src].header)})"
    for key in ("t3_top1_agreement", "t3_kl", "mel_l1"):
        if row.get(key) is None:
            if row["is_baseline"]:
                why[key] = "baseline: fidelity is measured against it"
            elif failed:
                why[key] = "run failed (not scored)"
            elif not paired:
                why[key] = no_base
            else:
                why[key] = _metric_reason(rec, (key,), COLS[key].header)
    if row.get("artifacts") is None:
        why["artifacts"] = "run failed (not scored)" if failed else "artifact metrics not in this run's scores"
    cost_missing = "run failed before timing" if failed else "not recorded by this run"
    for key in ("rtf", "size_mib"):
        if row.get(key) is None:
            why[key] = cost_missing
    if row.get("mem_mib") is None:
        why["mem_mib"] = why["work_mem_mib"] = "no per-run working memory in this run's record (older record)" if not failed else cost_missing
    for key, src in (("speedup", "rtf"), ("size_ratio", "size_mib")):
        if row.get(key) is None:
            why[key] = why.get(src) or (no_base if not paired else "the baseline has no value")
    if row.get("rank") is None and row.get("status") != store.STATUS_DONE:
        why["rank"] = "failed runs are not ranked"
    for col in COLUMNS:
        if col.reason is not None and row.get(col.key) is None:
            try:
                r = col.reason(rec, base)
            except Exception:
                r = None
            if r:
                why[col.key] = r
    return why


def collect(results: str | Path) -> list[dict[str, Any]]:
    """Rows of every finished or failed run, each with its group; ranked inside groups."""
    rd = ResultsDir(results)
    recs = rd.records()
    by_id = {r.get("run_id", d.name): r for d, r in recs}
    rows = []
    for d, rec in recs:
        if rec.get("status") not in (store.STATUS_DONE, store.STATUS_FAILED):
            continue
        base = None
        if not rec.get("is_baseline") and rec.get("baseline_run"):
            base = by_id.get(rec["baseline_run"])
        rows.append(row_of(rec, base, d))
    return rank(rows, None)


def sort_for(rows: list[dict], sort: str | None) -> str:
    """The sort column of a group: the one asked for, else fidelity for random weights."""
    if sort:
        return sort
    return FIDELITY_SORT if rows and all(r.get("random_weights") for r in rows) else DEFAULT_SORT


def rank(rows: list[dict], sort: str | None = None) -> list[dict]:
    """Sort and number rows inside each group; failed rows last, without a rank.

    ``sort=None``: :data:`DEFAULT_SORT`, or :data:`FIDELITY_SORT` in a group whose rows all
    come from random-weight models. A value whose interval contains "no change" (``row["noise"]``)
    is ranked as if it were the baseline's, and shares the baseline's rank."""
    if sort is not None:
        col = COLS.get(sort)
        if col is None or col.higher_is_better is None:
            from cbx.errors import CbxError

            raise CbxError(f"--sort {sort!r}: not a ranking column; valid choices: {', '.join(ranking_keys())}")
    out = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for g in sorted(groups):
        key = sort_for(groups[g], sort)
        col = COLS[key]
        ok = [r for r in groups[g] if r["status"] == store.STATUS_DONE]
        bad = [r for r in groups[g] if r["status"] != store.STATUS_DONE]

        def one(r, kk):
            c = COLS[kk]
            v = r.get(kk)
            if v is None and r.get("is_baseline") and c.null is not None:
                v = c.null  # the baseline is the reference of a relative/fidelity column
            if v is None:
                return (1, 0.0)
            if c.null is not None and (r.get("noise") or {}).get(kk):
                v = c.null  # within noise: level with the baseline
            return (0, -v if c.higher_is_better else v)

        def k(r):
            return (*one(r, key), *(x for kk in TIE_BREAK.get(key, ()) for x in one(r, kk)), r["name"] or "")

        ok.sort(key=k)
        prev, prev_rank = None, 0
        for i, r in enumerate(ok, 1):
            v = k(r)[:-1]
            r["rank"] = prev_rank if v == prev and v[0] == 0 else i
            prev, prev_rank = v, r["rank"]
            r["sorted_by"] = key
        counts = collections.Counter(r["rank"] for r in ok)
        for r in ok:
            r["tied"] = counts[r["rank"]] > 1
        for r in bad:
            r["rank"] = None
            r["sorted_by"] = key
        out.extend(ok + bad)
    return out


def fmt(row: dict, key: str, interval: bool = True) -> str:
    """A cell as text: value, ``±half-width`` of its interval, ``≈`` when within noise."""
    v = row.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    col = COLS.get(key)
    try:
        s = col.fmt.format(v) if col else str(v)
    except (ValueError, TypeError):
        s = str(v)
    ci = row.get(f"{key}_ci")
    if interval and ci and col is not None:
        half = (ci[1] - ci[0]) / 2
        s += "±" + _short(half)
    if (row.get("noise") or {}).get(key):
        s += "≈"
    return s


def _short(x: float) -> str:
    return f"{x:.2g}" if abs(x) < 1 else f"{x:.3g}"


def _groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    seen: dict[str, list[dict]] = {}
    for r in rows:
        seen.setdefault(r["group_label"], []).append(r)
    return list(seen.items())


def banner(grp: list[dict]) -> str | None:
    """The warning a group of random-weight rows carries, or None."""
    rnd = [r for r in grp if r.get("random_weights")]
    if not rnd:
        return None
    which = "all rows" if len(rnd) == len(grp) else f"{len(rnd)} of {len(grp)} rows"
    return (f"RANDOM WEIGHTS ({which}): WER, SIM and MOS of a random-weight model are not meaningful; "
            "fidelity to the baseline (top-1, KL, mel L1) and cost are.")


# ---------------------------------------------------------------- column sets

KIND_ORDER = ("id", "fidelity", "quality", "cost", "info")


def terminal_keys(rows: Sequence[dict] = ()) -> list[str]:
    """The default table's columns: short forms, fidelity before quality when weights are random."""
    keys = [c for c in COLUMNS if c.terminal and c.key != "method"]
    order = KIND_ORDER if rows and all(r.get("random_weights") for r in rows) else ("id", "quality", "fidelity", "cost", "info")
    keys.sort(key=lambda c: order.index(c.kind) if c.kind in order else len(order))
    return [c.key for c in keys]


def wide_keys() -> list[str]:
    return [c.key for c in COLUMNS if c.key not in ("method_short",)]


# Columns left out first when a terminal table is still too wide (then it says so): a column
# that is 0 in every row of the group says nothing there (IDLE_DROP), then DROP_ORDER.
IDLE_DROP = ("n_failed",)
DROP_ORDER = ("t3_kl", "mos", "size_ratio", "top1")
# Random weights: the quality columns mean nothing there (see banner), so they go before fidelity.
RANDOM_DROP_ORDER = ("mos", "sim_ratio", "wer_delta", "size_ratio", "t3_kl", "top1")


def drop_order(grp: Sequence[dict]) -> tuple[str, ...]:
    """The order in which a too-wide terminal table leaves columns out for this group."""
    return RANDOM_DROP_ORDER if grp and all(r.get("random_weights") for r in grp) else DROP_ORDER


# ---------------------------------------------------------------- text renderers


class _Footnotes:
    """Letters for the reasons of "-" cells, one letter per distinct reason."""

    def __init__(self):
        self.by_reason: dict[str, str] = {}
        self.cols: dict[str, list[str]] = {}

    def mark(self, reason: str, header: str) -> str:
        if reason not in self.by_reason:
            n = len(self.by_reason)
            self.by_reason[reason] = chr(ord("a") + n) if n < 26 else f"z{n - 25}"
        hs = self.cols.setdefault(reason, [])
        if header not in hs:
            hs.append(header)
        return self.by_reason[reason]

    def lines(self, width: int) -> list[str]:
        out = []
        for reason, letter in self.by_reason.items():
            out += textwrap.wrap(f"-{letter}: {', '.join(self.cols[reason])}: {reason}", width, subsequent_indent="     ")
        return out


def _cell(row: dict, key: str, notes: _Footnotes, wide: bool, interval: bool = True) -> str:
    s = fmt(row, key, interval)
    col = COLS[key]
    if key == "rank" and row.get("rank") is not None and row.get("tied"):
        s = f"={s}"
    if s == "-":
        reason = (row.get("why") or {}).get(key)
        if reason and key not in ("rank",):
            s += notes.mark(reason, col.header if not wide else col.label)
    elif not wide and col.width and len(s) > col.width:
        s = s[: col.width - 1] + "…"
    return s


def _table(keys: Sequence[str], grp: list[dict], wide: bool, interval: bool, notes: _Footnotes) -> list[list[str]]:
    head = [COLS[k].label if wide else COLS[k].header for k in keys]
    return [head] + [[_cell(r, k, notes, wide, interval) for k in keys] for r in grp]


def _layout(cells: list[list[str]], keys: Sequence[str]) -> list[str]:
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(s.rjust(w) if j and COLS[keys[i]].numeric else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def legend_lines(keys: Sequence[str], width: int = TERMINAL_WIDTH, wide: bool = False) -> list[str]:
    out = ["Columns:"]
    for k in keys:
        c = COLS[k]
        out += textwrap.wrap(f"{c.label if wide else c.header}: {c.legend}", width, initial_indent="  ", subsequent_indent="    ")
    out += textwrap.wrap("±: half-width of the 95% interval; ≈: the interval contains 'no change' (within noise, ranked level "
                         "with the baseline); -x: no value, reason x below the table.", width, initial_indent="  ", subsequent_indent="    ")
    return out


def render_terminal(rows: list[dict], keys: Sequence[str] | None = None, width: int = TERMINAL_WIDTH, wide: bool = False,
                    legend: bool = True) -> str:
    """The terminal table: at most ``width`` characters (``wide``: every column, full headers).

    Too wide a default table first drops intervals (the ``≈`` marks stay), then the columns in
    :func:`drop_order` (quality before fidelity when the weights are random), and says which
    ones ``--wide`` shows."""
    if not rows:
        return "(no finished runs)\n"
    lines: list[str] = []
    shown: list[str] = []
    for label, grp in _groups(rows):
        ks = list(keys) if keys is not None else (wide_keys() if wide else terminal_keys(grp))
        notes = _Footnotes()
        interval = True
        dropped: list[str] = []
        while True:
            notes = _Footnotes()
            table = _layout(_table(ks, grp, wide, interval, notes), ks)
            if wide or keys is not None or max(len(t) for t in table) <= width:
                break
            if interval:
                interval = False
                continue
            idle = next((k for k in IDLE_DROP if k in ks and all(r.get(k) == 0 for r in grp)), None)
            victim = idle or next((k for k in drop_order(grp) if k in ks), None)
            if victim is None:
                break
            ks.remove(victim)
            dropped.append(COLS[victim].header + (" (0 in every run)" if idle else ""))
        lines.append(f"== {label}")
        b = banner(grp)
        if b:
            lines += textwrap.wrap("!! " + b, width, subsequent_indent="   ")
        sort = grp[0].get("sorted_by")
        if sort:
            lines.append(f"   sorted by {COLS[sort].label} ({'higher' if COLS[sort].higher_is_better else 'lower'} is better)")
        lines += table
        for r in grp:
            if r.get("failure"):
                lines += textwrap.wrap(f"  ! {r['run_id']}: failed, not ranked: {r['failure']}", width, subsequent_indent="    ")
        lines += notes.lines(width)
        if dropped or not interval:
            what = (["intervals"] if not interval else []) + dropped
            lines.append(f"  (left out to fit {width} columns: {', '.join(what)}; see --wide)")
        lines.append("")
        shown += [k for k in ks if k not in shown]
    if legend:
        lines += legend_lines(shown, width, wide)
    return "\n".join(lines) + "\n"


def render_markdown(rows: list[dict], keys: Sequence[str] | None = None) -> str:
    out = ["# Leaderboard", ""]
    ks_all: list[str] = []
    for label, grp in _groups(rows):
        ks = list(keys) if keys is not None else terminal_keys(grp)
        ks = [k for k in ks if k != "method_short"]
        if "method" not in ks:
            ks.insert(2, "method")
        notes = _Footnotes()
        out += [f"## {label}", ""]
        b = banner(grp)
        if b:
            out += [f"> **{b}**", ""]
        sort = grp[0].get("sorted_by")
        if sort:
            out += [f"Sorted by {COLS[sort].label}.", ""]
        out.append("| " + " | ".join(COLS[k].label for k in ks) + " |")
        out.append("|" + "|".join("---:" if COLS[k].numeric else "---" for k in ks) + "|")
        for r in grp:
            out.append("| " + " | ".join(_cell(r, k, notes, True).replace("|", "\\|") for k in ks) + " |")
        fails = [r for r in grp if r.get("failure")]
        if fails:
            out.append("")
            out += [f"- **{r['run_id']}** failed (not ranked): {r['failure']}" for r in fails]
        if notes.by_reason:
            out.append("")
            out += [f"- {line.strip()}" for line in notes.lines(10_000)]
        out.append("")
        ks_all += [k for k in ks if k not in ks_all]
    out += ["## Columns", ""] + [f"- **{COLS[k].label}**: {COLS[k].legend}" for k in ks_all]
    out += ["- **±**: half-width of the 95% interval; **≈**: the interval contains 'no change' (within noise)", ""]
    return "\n".join(out)


def csv_keys() -> list[str]:
    keys = ["group_label"] + [c.key for c in COLUMNS]
    keys += [f"{c.key}_ci_lo" for c in COLUMNS if c.numeric] + [f"{c.key}_ci_hi" for c in COLUMNS if c.numeric]
    return keys + ["model", "random_weights", "peak_mem_mib", "failure", "baseline_run", "seed", "commit", "finished_at"]


CSV_KEYS = csv_keys()  # at import; render_csv recomputes (registered columns)


def render_csv(rows: list[dict]) -> str:
    keys = csv_keys()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in rows:
        vals = []
        for k in keys:
            if k.endswith("_ci_lo") or k.endswith("_ci_hi"):
                ci = r.get(k[:-6] + "_ci")
                v = (ci[0] if k.endswith("lo") else ci[1]) if ci else None
            else:
                v = r.get(k)
            vals.append("" if v is None else v)
        w.writerow(vals)
    return buf.getvalue()


# ---------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1360px}
.wrap{overflow-x:auto;max-width:100%;margin-bottom:1em}
table{border-collapse:separate;border-spacing:0;font-size:13px}
th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap;background:#fff}
td.t,th.t{text-align:left}th{background:#eee;cursor:pointer;user-select:none;position:sticky;top:0}
th.s1,td.s1{position:sticky;left:0;z-index:1}th.s2,td.s2{position:sticky;left:var(--s2,2.2em);z-index:1;border-right:2px solid #bbb}
th.s1,th.s2{z-index:2;background:#eee}
tr.failed td{color:#a00;background:#fee}td.m{max-width:14em;overflow:hidden;text-overflow:ellipsis}
table.lb .x{display:none}table.lb.all .x{display:table-cell}label.tog{font-size:13px;color:#555;display:block;margin:.3em 0}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}
.banner{background:#fff3cd;border:1px solid #e0b400;padding:.5em .8em;margin:.5em 0;font-weight:600}
.noise{color:#777}.miss{color:#999;cursor:help;border-bottom:1px dotted #999}
table.samples td{vertical-align:middle}table.samples td.txt{white-space:normal;min-width:12em;max-width:24em;text-align:left}
table.samples td.run{white-space:normal;max-width:15em;overflow-wrap:anywhere}
table.samples td.pr{max-width:12em;overflow:hidden;text-overflow:ellipsis}
audio{height:28px;width:190px;vertical-align:middle}.lab{font-size:11px;color:#555;display:block}
dl.legend dt{font-weight:600;float:left;clear:left;width:13em}dl.legend dd{margin-left:14em}.skip{color:#a60}"""

# Sorting by the cell's data-v: numbers when both cells hold one, text otherwise (locale order);
# empty cells go last either way. The first click puts the best first (the header's data-d:
# 1 higher is better, -1 lower), text ascending; a click again reverses.
_JS = """document.querySelectorAll('input[data-t]').forEach(function(c){c.addEventListener('change',function(){
 document.getElementById(c.dataset.t).classList.toggle('all',c.checked);});});
document.querySelectorAll('table.lb').forEach(function(t){
 var first=t.querySelector('th.s1');if(first){t.style.setProperty('--s2',first.getBoundingClientRect().width+'px');}
 t.querySelectorAll('thead th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=th.classList.contains('asc')||th.classList.contains('desc')?!th.classList.contains('asc'):th.dataset.d!=='1';t.querySelectorAll('thead th').forEach(function(h){h.classList.remove('asc','desc')});
  th.classList.add(asc?'asc':'desc');var b=t.tBodies[0];var rs=Array.from(b.rows);
  rs.sort(function(a,c){var x=a.cells[i].dataset.v,y=c.cells[i].dataset.v;
   if(x===''&&y==='')return 0;if(x==='')return 1;if(y==='')return -1;
   var nx=Number(x),ny=Number(y);
   if(!isNaN(nx)&&!isNaN(ny))return asc?nx-ny:ny-nx;
   return asc?x.localeCompare(y):y.localeCompare(x);});
  rs.forEach(function(r){b.appendChild(r)});});});});"""


def _audio_src(path: str, out_dir: Path, embed: bool) -> str:
    if embed:
        data = Path(path).read_bytes()
        return "data:audio/wav;base64," + base64.b64encode(data).decode()
    return os.path.relpath(path, out_dir)


def _player(path: str | None, label: str, out_dir: Path, embed: bool) -> str:
    if not path or not Path(path).is_file():
        return f"<span class='lab'>{html.escape(label)}: no clip</span>"
    src = html.escape(_audio_src(path, out_dir, embed))
    return f"<span class='lab'>{html.escape(label)}</span><audio controls preload='none' title='{html.escape(label)}' src='{src}'></audio>"


def html_keys(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(shown, behind the "every column" toggle): the page's default table has the terminal's
    columns with short headers and no interval text (in the cell's tooltip), so it fits a
    1400 px window; the rest (full method label, absolute metrics, RTF, ...) follow when asked."""
    shown = terminal_keys(rows)
    return shown, [k for k in wide_keys() if k not in shown]


def _cell_title(r: dict, k: str) -> str:
    """Tooltip of a value cell: its 95% interval and whether it is within noise."""
    bits = []
    ci = r.get(f"{k}_ci")
    if ci:
        bits.append(f"95% interval [{_short(ci[0])}, {_short(ci[1])}]")
    if (r.get("noise") or {}).get(k):
        bits.append("contains no change: within noise, ranked level with the baseline")
    if k == "method_short":
        bits.append(r.get("method") or "")
    return "; ".join(b for b in bits if b)


def render_html(rows: list[dict], out_dir: Path, embed_audio: bool = False, keys: Sequence[str] | None = None,
                images: Sequence[str] = (), skipped: Sequence[tuple[str, str]] = ()) -> str:
    """Self-contained page: one sortable table per group (rank and run id stay in view when it
    scrolls sideways), the samples of each group (compressed clip beside the baseline's clip of
    the same utterance, with its text and prompt), the Pareto plots, the legend."""
    out_dir = Path(out_dir)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Chatterbox compression leaderboard</title>",
        f"<style>{_CSS}</style></head><body><h1>Chatterbox compression leaderboard</h1>",
        "<p>Rows are ranked only inside a group (same eval set and version, metric versions and hardware). "
        "Click a column header to sort; hover a header for its meaning, a value for its 95% interval and a “-” for why it is empty; ≈: within noise of the baseline. "
        "Failed runs are listed in red and not ranked.</p>",
    ]
    used: list[str] = []
    for gi, (label, grp) in enumerate(_groups(rows)):
        shown, extra = (list(keys), []) if keys is not None else html_keys(grp)
        ks = shown + extra
        used += [k for k in ks if k not in used]
        parts.append(f"<h2>{html.escape(label)}</h2>")
        b = banner(grp)
        if b:
            parts.append(f"<div class='banner'>{html.escape(b)}</div>")
        sort = grp[0].get("sorted_by")
        if sort:
            parts.append(f"<p>Sorted by {html.escape(COLS[sort].label)}.</p>")
        if extra:
            parts.append(f"<label class='tog' title='{html.escape(', '.join(COLS[k].label for k in extra))}'>"
                         f"<input type='checkbox' data-t='g{gi}'> show every column ({len(extra)} more)</label>")
        parts.append(f"<div class='wrap'><table class='lb' id='g{gi}'><thead><tr>")
        for i, k in enumerate(ks):
            cls = ("" if COLS[k].numeric else "t") + (" s1" if i == 0 else " s2" if i == 1 else "") + (" x" if k in extra else "")
            head = COLS[k].label if k in extra else COLS[k].header
            d = "" if COLS[k].higher_is_better is None else f" data-d='{1 if COLS[k].higher_is_better else -1}'"
            parts.append(f"<th class='{cls.strip()}'{d} title='{html.escape(COLS[k].label + ': ' + COLS[k].legend)}'>{html.escape(head)}</th>")
        parts.append("</tr></thead><tbody>")
        for r in grp:
            cls = " class='failed'" if r["status"] != store.STATUS_DONE else ""
            title = f" title='{html.escape(r['failure'])}'" if r.get("failure") else ""
            parts.append(f"<tr{cls}{title}>")
            for i, k in enumerate(ks):
                v = r.get(k)
                dv = "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else html.escape(str(v))
                text = fmt(r, k, interval=False)
                if k == "rank" and r.get("rank") is not None and r.get("tied"):
                    text = f"={text}"  # as in the terminal: shared rank
                c = (("" if COLS[k].numeric else "t") + (" s1" if i == 0 else " s2" if i == 1 else "")
                     + (" m" if k in ("method", "method_short") else "") + (" x" if k in extra else ""))
                tip = ""
                if text == "-":
                    why = (r.get("why") or {}).get(k, "")
                    inner = f"<span class='miss' title='{html.escape(why)}'>-</span>" if why else "-"
                else:
                    inner = html.escape(text)
                    if (r.get("noise") or {}).get(k):
                        inner = f"<span class='noise'>{inner}</span>"
                    t = _cell_title(r, k) or (text if k == "method" else "")
                    if t:
                        tip = f" title='{html.escape(t)}'"
                parts.append(f"<td class='{c.strip()}' data-v='{dv}'{tip}>{inner}</td>")
            parts.append("</tr>")
        parts.append("</tbody></table></div>")
        parts += _samples_html(grp, out_dir, embed_audio)
    for img in images:
        data = base64.b64encode(Path(img).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(Path(img).stem.replace('_', ' '))}</h2>"
                     f"<img style='max-width:100%' alt='{html.escape(Path(img).name)}' src='data:image/png;base64,{data}'>")
    for stem, why in skipped:
        parts.append(f"<p class='skip'>Plot {html.escape(stem)} skipped: {html.escape(why)}</p>")
    parts.append("<h2>Columns</h2><dl class='legend'>")
    for k in used:
        parts.append(f"<dt>{html.escape(COLS[k].label)}</dt><dd>{html.escape(COLS[k].legend)}</dd>")
    parts.append("<dt>± / ≈</dt><dd>half-width of the 95% interval / interval contains no change (within noise; ranked level with "
                 "the baseline)</dd></dl>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "".join(parts)


def _samples_html(grp: list[dict], out_dir: Path, embed: bool) -> list[str]:
    rows = [(r, s) for r in grp for s in r.get("sample_info") or [] if Path(s["audio"]).is_file()]
    if not rows:
        return []
    out = ["<details open><summary>Samples: each run's clip beside its baseline's clip of the same utterance</summary>",
           "<div class='wrap'><table class='samples'><thead><tr><th class='t'>run</th><th class='t'>text</th>"
           "<th class='t'>prompt</th><th class='t'>this run</th><th class='t'>baseline</th></tr></thead><tbody>"]
    for r, s in rows:
        prompt = Path(s["prompt"]).name if s.get("prompt") else "built-in voice"
        base = s.get("baseline_audio") if not r.get("is_baseline") else None
        out.append(
            f"<tr><td class='t run'>{html.escape(r['run_id'])}<span class='lab' title='{html.escape(r['method'])}'>"
            f"{html.escape(r.get('method_short') or r['method'])}</span></td>"
            f"<td class='txt'>{html.escape(s.get('text') or s['id'])}</td>"
            f"<td class='t pr' title='{html.escape(s.get('prompt') or '')}'>{html.escape(prompt)}</td>"
            f"<td class='t'>{_player(s['audio'], r['name'] or r['run_id'], out_dir, embed)}</td>"
            f"<td class='t'>{_player(base, 'baseline', out_dir, embed) if not r.get('is_baseline') else '(this is the baseline)'}</td></tr>"
        )
    out.append("</tbody></table></div></details>")
    return out


# ---------------------------------------------------------------- column documentation

COLUMNS_DOC_BEGIN = "<!-- leaderboard-columns: generated from cbx.lab.leaderboard.COLUMNS by scripts/readme_columns.py; do not edit -->"
COLUMNS_DOC_END = "<!-- /leaderboard-columns -->"


def columns_markdown() -> str:
    """The user documentation of every registered column (README's column table): generated,
    so that a column added with :func:`register_column` cannot go undocumented."""
    def cell(x: str) -> str:
        return x.replace("|", "\\|").replace("\n", " ")

    lines = ["| column | header (terminal) | full name (--wide, CSV, HTML) | meaning | better | in the default table |",
             "|---|---|---|---|---|---|"]
    for c in COLUMNS:
        better = {True: "higher", False: "lower", None: ""}[c.higher_is_better]
        if c.null is not None:
            better += f" (no change: {c.null:g})"
        lines.append(f"| `{c.key}` | {cell(c.header)} | {cell(c.label)} | {cell(c.legend)} | {better} | {'yes' if c.terminal else ''} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Pareto plots


def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool]) -> list[int]:
    """Indices of the points no other point beats on both axes (ties do not dominate)."""
    sx = 1 if maximize[0] else -1
    sy = 1 if maximize[1] else -1
    idx = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (u, v) in enumerate(points):
            if j == i:
                continue
            better_eq = sx * u >= sx * x and sy * v >= sy * y
            strictly = sx * u > sx * x or sy * v > sy * y
            if better_eq and strictly:
                dominated = True
                break
        if not dominated:
            idx.append(i)
    return idx


PLOTS: tuple[tuple[str, str, str, tuple[bool, bool]], ...] = (
    # (file stem, x key, y key, (maximize x, maximize y))
    ("pareto_speedup_vs_wer_delta", "speedup", "wer_delta", (True, False)),
    ("pareto_size_vs_sim", "size_mib", "sim", (False, True)),
    ("pareto_speedup_vs_mel_l1", "speedup", "mel_l1", (True, False)),
)


# Label placement: candidate offsets (points) around a marker, nearest first, 12 directions.
_LABEL_OFFSETS = tuple((round(r * math.cos(a * math.pi / 6), 1), round(r * math.sin(a * math.pi / 6), 1))
                       for r in (5, 12, 20, 30, 42, 56) for a in (1, 11, 5, 7, 0, 6, 2, 10, 4, 8, 3, 9))


@dataclass
class LabelLayout:
    """What :func:`place_labels` drew: the text artists on the axes (full names, or numbers
    for points whose name found no free spot) and the key (``number -> name``) beside it."""

    texts: list
    numbered: dict[int, str]
    key: Any = None


def _box(t, renderer):
    """The text's own box (an annotation's extent would include its leader line)."""
    from matplotlib.text import Text

    t.update_positions(renderer)
    return Text.get_window_extent(t, renderer).expanded(1.02, 1.06)


def place_labels(ax, pts: Sequence[tuple[float, float]], names: Sequence[str], fontsize: float = 8) -> LabelLayout:
    """Label every point so that no two label boxes overlap, none covers a marker and all stay
    inside the axes; a name with no free spot is replaced by a number and listed in a key
    beside the axes (the figure is widened for it by the caller).

    Hand-written because adjustText, the field's usual tool, only reduces overlaps iteratively
    (labels in a dense cluster can still collide, and it gives no way to know); here each label
    takes the nearest free candidate position (greedy, 72 candidates on rings up to 56 pt,
    a leader line beyond the first ring), which is checkable. Call it after the axes' limits and
    position are final: offsets are in points, so a later resize moves points, not offsets."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    ax.set_xlim(ax.get_xlim())  # freeze autoscaling: labels must not move the points
    ax.set_ylim(ax.get_ylim())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = []
    leg = ax.get_legend()
    if leg is not None:
        taken.append(leg.get_window_extent(renderer))
    r = 3.5 * fig.dpi / 72  # marker half-size in pixels (scatter's default 6 pt marker)
    disp = [ax.transData.transform(p) for p in pts]
    markers = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in disp]
    # Dense spots first: they have the fewest free positions.
    crowd = [sum(1 for u, v in disp if abs(u - x) < 60 and abs(v - y) < 30) for x, y in disp]
    order = sorted(range(len(pts)), key=lambda i: (-crowd[i], disp[i][0], disp[i][1]))

    def put(i: int, text: str):
        for dx, dy in _LABEL_OFFSETS:
            far = math.hypot(dx, dy) > 8
            t = ax.annotate(text, pts[i], fontsize=fontsize, xytext=(dx, dy), textcoords="offset points",
                            ha="left" if dx > 0.5 else "right" if dx < -0.5 else "center",
                            va="bottom" if dy > 0.5 else "top" if dy < -0.5 else "center",
                            arrowprops=dict(arrowstyle="-", color="#999", lw=0.5, shrinkA=0, shrinkB=3) if far else None,
                            annotation_clip=False)
            bb = _box(t, renderer)
            inside = frame.x0 <= bb.x0 and bb.x1 <= frame.x1 and frame.y0 <= bb.y0 and bb.y1 <= frame.y1
            if inside and not any(bb.overlaps(o) for o in taken) and not any(
                    bb.overlaps(m) for k, m in enumerate(markers) if k != i or far):
                taken.append(bb)
                return t
            t.remove()
        return None

    texts, numbered = [], {}
    for i in order:
        t = put(i, names[i])
        if t is None:
            numbered[i] = names[i]
        else:
            texts.append(t)
    layout = LabelLayout(texts, {})
    for n, i in enumerate(sorted(numbered, key=lambda i: (disp[i][0], disp[i][1])), start=1):
        t = put(i, str(n))
        layout.numbered[n] = names[i] + ("" if t is not None else " (no room for its number)")
        if t is not None:
            texts.append(t)
    if layout.numbered:
        lines = [f"{n:>2}  {name}" for n, name in layout.numbered.items()]
        layout.key = ax.annotate("\n".join(lines), (1, 1), xycoords="axes fraction", xytext=(10, 0), textcoords="offset points",
                                 va="top", ha="left", fontsize=fontsize - 1, family="monospace", annotation_clip=False,
                                 bbox=dict(boxstyle="round", fc="#f7f7f7", ec="#ccc"))
    return layout


# Panel geometry in inches (fixed, so that label offsets computed once stay valid).
_AX_W, _AX_H, _PAD_L, _PAD_R, _PAD_B, _PAD_T, _KEY_W = 5.8, 3.7, 0.85, 0.3, 0.6, 0.7, 2.6


def plot_pareto(rows: list[dict], out_dir: Path, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """One PNG per plot, one panel per comparable group; failed runs are left out. A plot with
    no points is not drawn; its reason is appended to ``skipped`` as ``(stem, reason)``.
    Labels never overlap (:func:`place_labels`); crowded names become numbers with a key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = _groups([r for r in rows if r["status"] == store.STATUS_DONE])
    for stem, xk, yk, maxi in PLOTS:
        panels = [(lab, [r for r in grp if r.get(xk) is not None and r.get(yk) is not None]) for lab, grp in groups]
        panels = [(lab, grp) for lab, grp in panels if len(grp) >= 2]
        if not panels:
            if skipped is not None:
                have = sum(1 for _, g in groups for r in g if r.get(xk) is not None and r.get(yk) is not None)
                why = next((r["why"].get(yk) or r["why"].get(xk) for _, g in groups for r in g
                            if (r.get("why") or {}).get(yk) or (r.get("why") or {}).get(xk)), None)
                skipped.append((stem, f"{have} finished run(s) have both {COLS[xk].label} and {COLS[yk].label} "
                                      f"(2 needed in one group)" + (f"; e.g. {why}" if why else "")))
            continue
        pw, ph = _PAD_L + _AX_W + _PAD_R, _PAD_B + _AX_H + _PAD_T
        fig = plt.figure(figsize=(pw * len(panels), ph), dpi=100)
        axes = [fig.add_axes(((k * pw + _PAD_L) / (pw * len(panels)), _PAD_B / ph, _AX_W / (pw * len(panels)), _AX_H / ph))
                for k in range(len(panels))]
        layouts = []
        for ax, (lab, grp) in zip(axes, panels):
            pts = [(float(r[xk]), float(r[yk])) for r in grp]
            front = pareto_front(pts, maxi)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#888", s=36, zorder=2)
            fp = sorted((pts[i] for i in front), key=lambda p: p[0])
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "-o", color="#c33", zorder=3, label="Pareto front")
            ax.set_xlabel(COLS[xk].label + (" (higher is better)" if maxi[0] else " (lower is better)"))
            ax.set_ylabel(COLS[yk].label + (" (higher is better)" if maxi[1] else " (lower is better)"))
            title = textwrap.fill(lab, 90)
            if all(r.get("random_weights") for r in grp) and COLS[yk].kind == "quality":
                title += "\nrandom weights: this quality axis is not meaningful"
            ax.set_title(title, fontsize=8)
            ax.grid(alpha=0.3)
            ax.margins(0.12)
            fig.canvas.draw()
            leg = ax.legend(fontsize=7, loc="best")
            fig.canvas.draw()
            corner = leg.get_window_extent().transformed(ax.transAxes.inverted())
            leg.remove()
            ax.legend(fontsize=7, loc=(corner.x0, corner.y0))  # frozen: labels placed later must not move it
            layouts.append(place_labels(ax, pts, [r["name"] or r["run_id"] for r in grp]))
        if any(lay.key is not None for lay in layouts):  # widen the panels that carry a key; axes keep their size
            widths = [pw + (_KEY_W if lay.key is not None else 0) for lay in layouts]
            total = sum(widths)
            fig.set_size_inches(total, ph)
            x = 0.0
            for ax, w in zip(axes, widths):
                ax.set_position(((x + _PAD_L) / total, _PAD_B / ph, _AX_W / total, _AX_H / ph))
                x += w
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        path = Path(out_dir) / f"{stem}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def write_all(rows: list[dict], out_dir: Path, embed_audio: bool = False, plots: bool = True,
              skipped: list[tuple[str, str]] | None = None) -> dict[str, Path]:
    """Markdown, CSV, JSON rows, PNGs and the HTML page (which embeds the PNGs and says which
    plots were skipped and why; pass a list as ``skipped`` to receive those reasons too)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    skipped = [] if skipped is None else skipped
    images = plot_pareto(rows, out_dir, skipped) if plots else []
    for i, p in enumerate(images):
        files[f"png{i}"] = p
    for name, text in (
        ("leaderboard.md", render_markdown(rows)),
        ("leaderboard.csv", render_csv(rows)),
        ("leaderboard.json", json.dumps(rows, indent=1, default=str) + "\n"),
        ("leaderboard.html", render_html(rows, out_dir, embed_audio, images=images, skipped=skipped)),
    ):
        atomic_write_text(out_dir / name, text)
        files[name.split(".")[-1]] = out_dir / name
    return files


def leaderboard(results: str | Path, sort: str | None = None, row_filter: Callable[[dict], bool] | None = None) -> list[dict]:
    """Rows of a results folder, ranked inside groups (``sort=None``: see :func:`rank`)."""
    rows = collect(results)
    if row_filter:
        rows = [r for r in rows if row_filter(r)]
    return rank(rows, sort)


__all__ = [
    "Column", "COLUMNS", "COLS", "register_column", "ranking_keys", "leaderboard", "collect", "rank", "row_of",
    "method_label", "method_short", "group_key", "is_random_weights", "render_terminal", "render_markdown",
    "render_csv", "render_html", "plot_pareto", "pareto_front", "place_labels", "LabelLayout", "columns_markdown", "write_all", "legend_lines", "banner",
]
