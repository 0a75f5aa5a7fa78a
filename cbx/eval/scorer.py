"""The scorer: a manifest of wavs in, per-utterance rows and an aggregate out.

``score_manifest(manifest, out_dir, metrics=None)`` reads a JSONL manifest (one utterance per
line: ``{"audio", "text", "prompt"}`` with paths relative to the manifest, plus optional
``id``, ``timings``, ``speech_tokens``, ``peak_mem_bytes``, ``model_bytes``,
``reference_audio`` and any precomputed metric inputs such as ``t3_kl``), scores each utterance
with the metric groups that the requested metrics need, and writes ``utterances.jsonl`` and
``aggregate.json`` in the schema of :mod:`cbx.eval.schema`.

Utterances are scored one at a time by models that are deterministic for one input, so a row
depends only on its own line: reordering or splitting a manifest cannot change a score.
Bad lines (not JSON, a missing key, a missing/unreadable/empty wav) are reported by line
number and skipped; the rest is scored. Nothing is written unless something scored, and the
two files are written atomically, so a failed run leaves no half-written results. Rows are
also appended to a hidden progress file as they are scored, so an interrupted run resumes
where it stopped (:class:`_Partial`). Metric models load once per process (:func:`get_group`
keeps them).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cbx.errors import CbxError
from cbx.eval import schema, stats
from cbx.eval.audio import read_audio
from cbx.eval.metrics.asr import ASR_SR, AsrConfig
from cbx.eval.metrics.mos import MosConfig
from cbx.eval.metrics.speaker import SpeakerConfig
from cbx.eval.registry import MetricSpec, metric_specs
from cbx.eval.runtime import scoring_runtime, thread_pools
from cbx.eval.types import Utterance
from cbx.files import atomic_write_text, jsonl_objects

KNOWN_KEYS = {"audio", "text", "prompt", "id", "timings", "reference_audio", "fidelity_audio", "prompt_text"}


@dataclass(frozen=True)
class ScorerConfig:
    """Every scorer default, in one place (the CLI reads them from here)."""

    asr: AsrConfig = field(default_factory=AsrConfig)
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)
    mos: MosConfig = field(default_factory=MosConfig)
    n_resamples: int = stats.N_RESAMPLES
    seed: int = stats.SEED
    confidence: float = stats.CONFIDENCE
    # Run the ASR group in a second thread beside the others (CTranslate2 and onnxruntime
    # release the GIL): on 2 cores two one-thread lanes beat every group on two threads in turn.
    parallel_asr: bool = True

    def group_config(self, group: str):
        return {"asr": self.asr, "speaker": self.speaker, "mos": self.mos}.get(group)


_GROUP_CACHE: dict[tuple[str, Any], Any] = {}


def get_group(name: str, config: Any = None):
    """The process-wide instance of a metric group with this config (models load once)."""
    from cbx.eval.metrics import GROUPS

    key = (name, config)
    if key not in _GROUP_CACHE:
        cls = GROUPS[name]
        _GROUP_CACHE[key] = cls(config) if config is not None else cls()
    return _GROUP_CACHE[key]


def resolve_metrics(metrics: Iterable[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    """Requested metric (or group) names -> (metric names, {group: its requested metrics})."""
    from cbx.eval.metrics import GROUPS

    specs = metric_specs()
    owner = {s.name: g for g, cls in GROUPS.items() for s in cls.specs}
    wanted: list[str] = []
    for name in metrics if metrics is not None else sorted(specs):
        name = name.strip()
        if not name:
            continue
        if name in GROUPS:
            wanted += [s.name for s in GROUPS[name].specs]
        elif name in specs and name in owner:
            wanted.append(name)
        else:
            raise CbxError(
                f"unknown metric {name!r}; valid metrics: {', '.join(sorted(owner))}; groups: {', '.join(GROUPS)}"
            )
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        raise CbxError("no metrics requested")
    groups: dict[str, list[str]] = {}
    for m in wanted:
        groups.setdefault(owner[m], []).append(m)
    return wanted, groups


@dataclass
class ManifestEntry:
    line: int
    data: dict


def read_manifest(path: Path) -> tuple[list[ManifestEntry], list[dict]]:
    """Parse a JSONL manifest; returns (good entries, [{"line", "reason"}] for bad lines)."""
    if not path.is_file():
        raise CbxError(f"{path}: manifest not found")
    entries: list[ManifestEntry] = []
    bad: list[dict] = []
    ids: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CbxError(f"{path}: manifest is not UTF-8 text ({e})") from None
    for n, d, why in jsonl_objects(lines):
        if why:
            bad.append({"line": n, "reason": why})
            continue
        missing = [k for k in ("audio", "text") if not isinstance(d.get(k), str) or not d.get(k)]
        if missing:
            bad.append({"line": n, "reason": f"missing or non-string key(s): {', '.join(missing)}"})
            continue
        for k in ("prompt", "reference_audio", "fidelity_audio"):
            if k in d and d[k] is not None and not isinstance(d[k], str):
                bad.append({"line": n, "reason": f"key {k!r} must be a path string"})
                break
        else:
            if "timings" in d and not isinstance(d["timings"], dict):
                bad.append({"line": n, "reason": "key 'timings' must be an object of stage seconds"})
                continue
            uid = str(d.get("id", f"line{n}"))
            if uid in ids:
                bad.append({"line": n, "reason": f"duplicate id {uid!r} (first on line {ids[uid]})"})
                continue
            ids[uid] = n
            entries.append(ManifestEntry(n, d))
    return entries, bad


class _AudioCache:
    """Prompts and references repeat across lines: read each file once per run."""

    def __init__(self):
        self._cache: dict[Path, tuple[np.ndarray, int]] = {}

    def get(self, p: Path) -> tuple[np.ndarray, int]:
        if p not in self._cache:
            self._cache[p] = read_audio(p)
        return self._cache[p]


# Shorter outputs than this carry nothing to score (and crash some metric models' framing).
MIN_SCORE_S = 0.03


def unusable_audio(wav: np.ndarray, sr: int) -> str | None:
    """Why audio cannot be scored (non-finite samples, too short), or None. Such a line is
    reported as failed with this reason and the other lines are scored."""
    bad = int(np.count_nonzero(~np.isfinite(wav)))
    if bad:
        return f"{bad} non-finite sample(s) (NaN/inf)"
    if wav.size < MIN_SCORE_S * sr:
        return f"too short to score ({wav.size / sr:.3f} s < {MIN_SCORE_S} s)"
    return None


def _utterance(entry: ManifestEntry, base: Path, cache: _AudioCache) -> Utterance:
    d = entry.data
    wav, sr = read_audio(base / d["audio"])
    why = unusable_audio(wav, sr)
    if why is not None:
        raise CbxError(f"{d['audio']}: {why}; scored as failed")
    uid = str(d.get("id", f"line{entry.line}"))
    utt = Utterance(uid, wav, sr, d["text"], prompt_text=d.get("prompt_text"))
    if d.get("prompt"):
        utt.prompt_audio, utt.prompt_sr = cache.get(base / d["prompt"])
    if d.get("reference_audio"):
        utt.reference_audio, utt.reference_sr = cache.get(base / d["reference_audio"])
        why = unusable_audio(utt.reference_audio, utt.reference_sr)
        if why is not None:
            raise CbxError(f"reference_audio {d['reference_audio']}: {why}")
    if d.get("fidelity_audio"):
        utt.fidelity_audio, utt.fidelity_sr = read_audio(base / d["fidelity_audio"])
    timings = d.get("timings") or {}
    utt.timings = {str(k): v for k, v in timings.items()}
    utt.extra = {k: v for k, v in d.items() if k not in KNOWN_KEYS}
    return utt


class Scorer:
    """Scores :class:`Utterance` objects with the groups the requested metrics need."""

    def __init__(self, metrics: Iterable[str] | None = None, config: ScorerConfig | None = None):
        self.config = config or ScorerConfig()
        self.metrics, self.by_group = resolve_metrics(metrics)
        self.groups = {g: get_group(g, self.config.group_config(g)) for g in self.by_group}
        self.specs: dict[str, MetricSpec] = {m: metric_specs()[m] for m in self.metrics}
        self._pool = None

    def load(self) -> None:
        for g in self.groups.values():
            g.load()

    def variant(self, metric: str) -> str | None:
        for gname, names in self.by_group.items():
            if metric in names:
                return getattr(self.groups[gname], "variant", None)
        return None

    def _lane(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbx-asr")
        return self._pool

    def score(self, utt: Utterance) -> tuple[dict[str, float], dict[str, Any]]:
        # numpy's BLAS on one thread while an utterance is scored, whatever the process set: the
        # metrics' own small products (librosa's and faster-whisper's mel filters) summed in
        # another order with more threads, which moved speaker similarity in the 9th digit and
        # once flipped a Whisper beam's word. The limit is process-wide, so it is set here, once
        # for both lanes, not inside a group.
        with thread_pools().limit(limits=1, user_api="blas"):
            return self._score(utt)

    def _score(self, utt: Utterance) -> tuple[dict[str, float], dict[str, Any]]:
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        results: dict[str, Any] = {}
        side = None
        if self.config.parallel_asr and "asr" in self.groups and len(self.groups) > 1:
            utt.audio_at(ASR_SR)  # resample once, before two threads could both want it
            side = self._lane().submit(self.groups["asr"].score, utt)
        for gname, group in self.groups.items():
            if not (side is not None and gname == "asr"):
                results[gname] = group.score(utt)
        if side is not None:
            results["asr"] = side.result()
        for gname in self.groups:  # merge in a fixed order, whichever lane finished first
            wanted = set(self.by_group[gname])
            for k, v in results[gname].items():
                if k in wanted:
                    v = float(v)
                    metrics[k] = v if math.isfinite(v) else None
                elif k not in self.specs and k not in metric_specs():
                    details[k] = v
        return metrics, details


def metric_versions(metrics: Iterable[str] | None = None, config: ScorerConfig | None = None) -> dict[str, str]:
    """``{metric: version}`` where a group's model choice (its ``variant``: ASR model and
    normalizer, speaker encoder, MOS predictor) is part of the version, so two runs carry the
    same version only when their numbers were made the same way. Loads no model."""
    scorer = Scorer(metrics, config)
    out = {}
    for name in scorer.metrics:
        v, var = scorer.specs[name].version, scorer.variant(name)
        out[name] = f"{v}+{var}" if var else str(v)
    return out


def aggregate(rows: list[dict], scorer: Scorer) -> dict[str, dict]:
    """Per-metric aggregate entries over result rows (see :mod:`cbx.eval.schema`)."""
    cfg = scorer.config
    rows = sorted(rows, key=lambda r: r["id"])  # bootstrap resamples by position: make it order-free
    out: dict[str, dict] = {}
    for name in scorer.metrics:
        spec = scorer.specs[name]
        vals = np.array([r["metrics"][name] for r in rows if r["metrics"].get(name) is not None], dtype=np.float64)
        entry: dict[str, Any] = {
            "value": None,
            "mean": None,
            "ci95": None,
            "n": int(vals.size),
            "higher_is_better": spec.higher_is_better,
            "aggregation": spec.aggregation,
            "unit": spec.unit,
            "version": spec.version,
            "variant": scorer.variant(name),
        }
        if vals.size:
            entry["mean"] = float(vals.mean())
            kw = dict(n_resamples=cfg.n_resamples, seed=cfg.seed, confidence=cfg.confidence)
            if spec.aggregation == "mean":
                entry["value"] = entry["mean"]
                entry["ci95"] = stats.mean_ci(vals, **kw)
            elif spec.aggregation == "sum":
                entry["value"] = float(vals.sum())
            elif spec.aggregation == "max":
                entry["value"] = float(vals.max())
            elif spec.aggregation == "corpus":
                num_key, den_key = spec.corpus_counts
                pairs = [
                    (r["details"][num_key], r["details"][den_key])
                    for r in rows
                    if r["metrics"].get(name) is not None and num_key in r["details"] and den_key in r["details"]
                ]
                num = np.array([p[0] for p in pairs], dtype=np.float64)
                den = np.array([p[1] for p in pairs], dtype=np.float64)
                if den.sum() > 0:
                    entry["value"] = float(num.sum() / den.sum())
                    entry["ci95"] = stats.ratio_ci(num, den, **kw)
        out[name] = entry
    return out


def _progress(iterable, total: int, show: bool):
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="scoring", unit="utt", file=sys.stderr)


def score_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    metrics: Iterable[str] | None = None,
    config: ScorerConfig | None = None,
    eval_set: dict | None = None,
    progress: bool = False,
    log=None,
) -> dict:
    """Score every line of ``manifest`` and write ``out_dir``/{utterances.jsonl, aggregate.json}.

    Returns the aggregate dict. ``eval_set`` (``{"name", "version"}``) is recorded when given.
    Raises :class:`CbxError` when nothing could be scored (nothing is written then)."""
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    scorer = Scorer(metrics, config)  # validates metric names before any work
    entries, skipped = read_manifest(manifest)
    n_lines = len(entries) + len(skipped)
    for s in skipped:
        say(f"{manifest}:{s['line']}: skipped: {s['reason']}")
    base = manifest.parent
    cache = _AudioCache()
    rows: list[dict] = []
    partial = _Partial(out_dir / PARTIAL_FILE, _run_key(scorer))
    keys = {e.line: partial.key(e, base) for e in entries}
    n_done = sum(keys[e.line] in partial.done for e in entries)
    if n_done:
        say(f"resuming: {n_done} of {len(entries)} utterance(s) already scored in {partial.path}")
    with scoring_runtime(), contextlib.closing(partial):
        if len(entries) > n_done:
            scorer.load()
        for e in _progress(entries, len(entries), progress):
            if keys[e.line] in partial.done:
                rows.append(partial.done[keys[e.line]])
                continue
            try:
                utt = _utterance(e, base, cache)
            except CbxError as err:
                skipped.append({"line": e.line, "reason": str(err)})
                say(f"{manifest}:{e.line}: skipped: {err}")
                continue
            m, det = scorer.score(utt)
            row = {
                "schema": schema.SCHEMA,
                "line": e.line,
                "id": utt.id,
                "audio": e.data["audio"],
                "text": e.data["text"],
                "prompt": e.data.get("prompt"),
                "metrics": m,
                "details": det,
            }
            partial.add(keys[e.line], row)
            rows.append(row)
    skipped.sort(key=lambda s: s["line"])
    if not rows:
        partial.remove()
        raise CbxError(f"{manifest}: nothing could be scored ({len(skipped)} line(s) skipped, see above)")
    agg = {
        "schema": schema.SCHEMA,
        "suite_version": schema.SUITE_VERSION,
        "eval_set": eval_set,
        "manifest": str(manifest),
        "n_lines": n_lines,
        "n_scored": len(rows),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "bootstrap": {"n_resamples": scorer.config.n_resamples, "confidence": scorer.config.confidence, "seed": scorer.config.seed},
        "metrics": aggregate(rows, scorer),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / schema.ROWS_FILE, "".join(schema.dumps(r) + "\n" for r in rows))
    atomic_write_text(out_dir / schema.AGGREGATE_FILE, schema.dumps(agg, indent=2) + "\n")
    partial.remove()
    return agg


PARTIAL_FILE = ".utterances.partial.jsonl"


def _run_key(scorer: Scorer) -> str:
    """What a row's numbers depend on besides its own line: schema, suite, metrics and models."""
    cfg = {g: repr(scorer.config.group_config(g)) for g in scorer.groups}
    return json.dumps([schema.SCHEMA, schema.SUITE_VERSION, scorer.metrics, cfg], sort_keys=True)


def _file_stamp(path: Path) -> list | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class _Partial:
    """Rows scored so far, appended to a hidden file in the output folder as they are made, so
    an interrupted run resumes where it stopped. A row is reused only under the same key: the
    same manifest line at the same line number, the same audio files (size and modification
    time), the same metrics and models; anything else is scored again. The file is removed once
    the results are written. Rows depend only on their own line (see the module docstring), so
    mixing reused and new rows gives what one uninterrupted run gives."""

    def __init__(self, path: Path, run_key: str):
        self.path = path
        self.run_key = run_key
        self.done: dict[str, dict] = {}
        self._fh = None
        if path.is_file():
            for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    d = json.loads(raw)
                    self.done[d["key"]] = d["row"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the interruption: scored again

    def key(self, entry: ManifestEntry, base: Path) -> str:
        import hashlib

        files = {k: _file_stamp(base / entry.data[k]) for k in ("audio", "prompt", "reference_audio", "fidelity_audio") if entry.data.get(k)}
        blob = json.dumps([self.run_key, entry.line, entry.data, files], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def add(self, key: str, row: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(schema.dumps({"key": key, "row": row}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def format_table(agg: dict) -> str:
    """A plain-text table of an aggregate (rendered from the results, never typed by hand)."""
    head = ("metric", "value", "95% CI", "n", "better", "variant")
    lines = [head]
    for name, e in agg["metrics"].items():
        if e["n"] == 0:
            continue
        ci = e.get("ci95")
        lines.append(
            (
                name,
                _fmt(e["value"] if e["value"] is not None else e["mean"]),
                f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-",
                str(e["n"]),
                {True: "higher", False: "lower"}.get(e["higher_is_better"], "-"),
                e.get("variant") or "",
            )
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)
    return f"{text}\nscored {agg['n_scored']} of {agg['n_lines']} line(s); skipped {agg['n_skipped']}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
