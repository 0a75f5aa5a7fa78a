"""Mirror finished runs to Weights & Biases; the run folder stays the source of truth.

As in lm-evaluation-harness's W&B logger, W&B only mirrors results that are already on disk:
a run's folder (record, rows, audio, checkpoint) is complete before anything is sent, so a
network failure can lose a W&B entry but never a result. When W&B cannot start online (no
network, bad key) the logger retries in offline mode, so the entry can still be uploaded
later with ``wandb sync``; any other W&B error is reported as a warning and the run stands.

``tracking: none`` (the default) gives :class:`NullTracker`, a no-op stand-in with the same
methods (nanochat's ``DummyWandb``), so callers never branch on whether logging is on.

What a W&B project is worth opening for is the trade-off, so one run logs:

* **project**: one per results folder (``TrackingConfig.project_for``: ``cbx-<parent>-<folder>``
  unless ``tracking.project`` names one), so a study's runs share W&B's panels and two studies
  never mix; **group**: the baseline run (a baseline and everything compared with it);
  ``job_type``: baseline | compressed; tags: the transforms.
* **config**: the resolved experiment (every default filled in) plus run id, baseline run and
  provenance, so W&B's run filters work on any parameter.
* **summary**: the run's leaderboard row as flat numeric keys named like the leaderboard
  columns (``wer_delta``, ``sim_ratio``, ``speedup``, ``size_ratio``, ``t3_top1_agreement``,
  ``mel_l1``, ... and every registered column), so the parallel-coordinates and scatter
  panels plot quality against cost without any W&B-side expression; the raw metrics under
  ``metric/<name>`` and speed figures under ``speed/<name>``.
* a per-utterance **table** ``utterances``: text, voice prompt, the compressed clip and the
  baseline's clip of the same utterance side by side (``wandb.Audio``), their scores; the
  **leaderboard** table of the run's comparable group; the checkpoint as a ``model`` artifact.

:func:`read_offline_run` decodes an offline run's ``.wandb`` file (LevelDB log framing of
``wandb_internal_pb2.Record`` messages) so tests can check what was logged without a
server; wandb itself ships no Python reader for it any more.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from cbx.lab import store

AUDIO_ROWS_MAX = 64  # per-utterance audio uploaded for at most this many rows (sizes add up)


class NullTracker:
    """Logging turned off: every call does nothing."""

    enabled = False

    def start(self, name: str, config: dict, group: str | None = None, job_type: str | None = None,
              tags: Sequence[str] = ()) -> None: ...

    def summary(self, values: dict) -> None: ...

    def table(self, key: str, columns: list[str], rows: list[list], audio_cols: Sequence[str] = ()) -> None: ...

    def artifact(self, name: str, kind: str, path: Path, metadata: dict | None = None) -> None: ...

    def finish(self) -> None: ...


class WandbTracker:
    enabled = True

    def __init__(self, project: str, entity: str | None = None, mode: str | None = None):
        self.project, self.entity, self.mode = project, entity, mode
        self.run = None
        self.dir: str | None = None

    def start(self, name: str, config: dict, group: str | None = None, job_type: str | None = None,
              tags: Sequence[str] = ()) -> None:
        import wandb

        kw = dict(project=self.project, entity=self.entity, name=name, config=config, group=group, job_type=job_type,
                  tags=list(tags) or None, reinit="finish_previous")
        try:
            self.run = wandb.init(mode=self.mode, settings=wandb.Settings(init_timeout=60, silent=True), **kw)
        except Exception as e:  # no network / auth: keep an offline copy to sync later
            if self.mode == "offline":
                raise
            print(f"cbx: W&B could not start online ({type(e).__name__}: {e}); logging offline", file=sys.stderr)
            self.run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kw)
        self.dir = getattr(self.run, "dir", None)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def table(self, key: str, columns: list[str], rows: list[list], audio_cols: Sequence[str] = ()) -> None:
        """``audio_cols``: columns holding a wav path (or ``(path, caption)``), uploaded as
        ``wandb.Audio`` for the first :data:`AUDIO_ROWS_MAX` rows."""
        import wandb

        idx = [columns.index(c) for c in audio_cols]
        data = []
        for i, r in enumerate(rows):
            r = list(r)
            for ai in idx:
                p, caption = r[ai] if isinstance(r[ai], tuple) else (r[ai], None)
                ok = p and i < AUDIO_ROWS_MAX and Path(p).is_file()
                r[ai] = wandb.Audio(str(p), caption=caption) if ok else None
            data.append(r)
        self.run.log({key: wandb.Table(columns=columns, data=data, allow_mixed_types=True)})

    def artifact(self, name: str, kind: str, path: Path, metadata: dict | None = None) -> None:
        import wandb

        art = wandb.Artifact(name, type=kind, metadata=metadata or {})
        if Path(path).is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make_tracker(cfg, folder: str | Path = store.DEFAULT_RESULTS) -> NullTracker | WandbTracker:
    """The tracker of a ``TrackingConfig``; ``folder``: the results folder (names the project)."""
    if getattr(cfg, "backend", "none") == "wandb":
        return WandbTracker(cfg.project_for(folder), cfg.entity, cfg.mode)
    return NullTracker()


def _num(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return v
    return None


def _flat(prefix: str, d: Any, out: dict) -> dict:
    if isinstance(d, dict):
        for k, v in d.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif _num(d) is not None and not isinstance(d, bool):
        out[prefix] = d
    return out


def summary_of(row: dict, record: dict) -> dict[str, Any]:
    """W&B summary of one run: its leaderboard row's numeric columns as flat top-level keys
    (the names of :data:`cbx.lab.leaderboard.COLUMNS`), raw metrics as ``metric/<name>``,
    speed figures as ``speed/<name>``, plus status, method and the baseline flag."""
    from cbx.lab import leaderboard as lb

    out: dict[str, Any] = {}
    for col in lb.COLUMNS:
        v = row.get(col.key)
        if _num(v) is not None and not isinstance(v, bool):  # text columns (run id, method) are config
            out[col.key] = v
    out.update(_flat("metric", lb._metrics_of(record), {}))
    out.update(_flat("speed", {k: v for k, v in (record.get("speed") or {}).items() if k != "stage_s"}, {}))
    if record.get("model_bytes"):
        out["model_bytes"] = record["model_bytes"]
    out.update(status=record.get("status"), method=row.get("method"), is_baseline=int(bool(record.get("is_baseline"))),
               random_weights=int(bool(row.get("random_weights"))))
    return out


def _scores(run_dir: Path | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    f = run_dir / "score" / "utterances.jsonl" if run_dir else None
    if f is not None and f.is_file():
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[str(r.get("id"))] = {k: v for k, v in (r.get("metrics") or {}).items() if _num(v) is not None and not isinstance(v, bool)}
    return out


def _synth_rows(run_dir: Path | None) -> dict[str, dict]:
    if run_dir is None or not (run_dir / "synth").is_dir():
        return {}
    return {str(s["id"]): s for s in (json.loads(p.read_text()) for p in sorted((run_dir / "synth").glob("*.json")))}


def utterance_table(run_dir: Path, base_dir: Path | None) -> tuple[list[str], list[list], list[str]]:
    """(columns, rows, audio columns) of the per-utterance table: text, voice prompt, this
    run's clip beside the baseline's clip of the same utterance, then each metric of the run
    and (as ``baseline_<metric>``) of the baseline. Audio cells are ``(path, caption)``."""
    scores, bscores = _scores(run_dir), _scores(base_dir)
    synth, bsynth = _synth_rows(run_dir), _synth_rows(base_dir)
    metric_keys: list[str] = []
    for r in scores.values():
        metric_keys += [k for k in r if k not in metric_keys]
    base_keys = [k for k in metric_keys if any(k in r for r in bscores.values())]
    columns = (["id", "text", "prompt", "audio", "baseline_audio", "audio_s", "baseline_audio_s", "t_total_s", "check"]
               + metric_keys + [f"baseline_{k}" for k in base_keys])
    rows = []
    for uid, s in synth.items():
        b = bsynth.get(uid) or {}
        sc, bsc = scores.get(uid, {}), bscores.get(uid, {})
        prompt = s.get("prompt")
        rows.append([
            s["id"], s["text"],
            (prompt, f"voice prompt: {Path(prompt).name}") if prompt else None,
            (str(run_dir / s["audio"]), f"{run_dir.name}: {s['text']}") if s.get("audio") else None,
            (str(base_dir / b["audio"]), f"{base_dir.name} (baseline): {s['text']}") if base_dir and b.get("audio") else None,
            s.get("audio_s"), b.get("audio_s"), (s.get("timings") or {}).get("total"), s.get("check"),
        ] + [sc.get(k) for k in metric_keys] + [bsc.get(k) for k in base_keys])
    return columns, rows, ["prompt", "audio", "baseline_audio"]


def log_run(cfg, run_dir: Path, record: dict, results_root: Path, factory: Callable[..., Any] | None = None) -> bool:
    """Mirror one finished run; returns whether it was logged. Never raises for W&B trouble."""
    tracker = factory(cfg) if factory else make_tracker(cfg, results_root)
    if not tracker.enabled:
        return False
    try:
        from cbx.lab import leaderboard as lb

        run_dir, results_root = Path(run_dir), Path(results_root)
        rid = record["run_id"]
        base_id = None if record.get("is_baseline") else record.get("baseline_run")
        base_dir = results_root / base_id if base_id and (results_root / base_id / "run.json").is_file() else None
        config = {**record.get("config", {}), "run_id": rid, "baseline_run": record.get("baseline_run"),
                  "method": lb.method_label(record), "git": record.get("git"), "hardware": record.get("hardware"),
                  "eval_set": record.get("eval_set"), "metric_versions": record.get("metric_versions"),
                  "packages": record.get("packages")}
        group = rid if record.get("is_baseline") else (base_id or "no-baseline")
        tags = [s.get("transform") for s in (record.get("config") or {}).get("steps") or [] if s.get("transform")]
        tracker.start(rid, config, group=group, job_type="baseline" if record.get("is_baseline") else "compressed", tags=tags)
        board = lb.leaderboard(results_root)
        row = next((r for r in board if r["run_id"] == rid), None)
        if row is None:  # not in the folder's board (a failed write): the row from the record alone
            base = store.read_json(base_dir / "run.json") if base_dir else None
            row = lb.row_of(record, base, run_dir)
        tracker.summary(summary_of(row, record))
        cols, rows, audio = utterance_table(run_dir, base_dir)
        tracker.table("utterances", cols, rows, audio_cols=audio)
        keys = [c.key for c in lb.COLUMNS]
        tracker.table("leaderboard", keys, [[r.get(k) for k in keys] for r in board if r["group"] == row["group"]])
        ckpt = run_dir / "checkpoint"
        if ckpt.is_dir():
            tracker.artifact(f"ckpt-{rid}", "model", ckpt, {"run_id": rid, "method": lb.method_label(record)})
        info = {"backend": "wandb", "project": getattr(tracker, "project", None), "group": group,
                "dir": getattr(tracker, "dir", None), "run": getattr(getattr(tracker, "run", None), "id", None)}
        tracker.finish()
        store.atomic_write_json(run_dir / "tracking.json", info)
        return True
    except Exception as e:  # W&B trouble must not turn a finished run into an error
        warnings.warn(f"W&B logging of {record.get('run_id')} failed ({type(e).__name__}: {e}); local results are in {run_dir}")
        try:
            tracker.finish()
        except Exception:
            pass
        return False


def log_export(cfg, out_dir: Path, record: dict, factory: Callable[..., Any] | None = None,
               results_root: str | Path | None = None) -> str | None:
    """Log an exported checkpoint folder as a W&B ``model`` artifact of its run (in the
    project of the run's results folder); returns the W&B run's local folder (None when
    nothing was logged)."""
    tracker = factory(cfg) if factory else make_tracker(cfg, results_root or Path(out_dir).parent)
    if not tracker.enabled:
        return None
    try:
        tracker.start(f"export-{record['run_id']}", {"run_id": record["run_id"], **record.get("config", {})}, job_type="export")
        tracker.artifact(f"export-{record['run_id']}", "model", out_dir, {"run_id": record["run_id"]})
        where = getattr(tracker, "dir", None)
        tracker.finish()
        return str(where) if where else ""
    except Exception as e:
        warnings.warn(f"W&B logging of export {out_dir} failed ({type(e).__name__}: {e}); the export is on disk")
        try:
            tracker.finish()
        except Exception:
            pass
        return None


# ---------------------------------------------------------------- reading offline runs

_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte); then LevelDB log chunks


def read_offline_run(run_path: str | Path) -> list[tuple[str, dict]]:
    """``(record type, message as dict)`` for every record of an offline run's ``.wandb`` file."""
    from google.protobuf.json_format import MessageToDict
    from wandb.proto import wandb_internal_pb2 as pb

    p = Path(run_path)
    if p.is_dir():
        files = sorted(p.glob("*.wandb"))
        if not files:
            raise FileNotFoundError(f"{p}: no .wandb file")
        p = files[0]
    data = p.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{p}: not a W&B run file")
    pos, partial, chunks = _HEADER, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        body = data[pos : pos + length]
        pos += length
        if kind == 1:
            chunks.append(body)
        elif kind == 2:
            partial = body
        elif kind == 3:
            partial += body
        elif kind == 4:
            chunks.append(partial + body)
            partial = b""
        else:
            break
    out = []
    for c in chunks:
        rec = pb.Record()
        rec.ParseFromString(c)
        kind = rec.WhichOneof("record_type")
        out.append((kind, MessageToDict(getattr(rec, kind), preserving_proto_field_name=True)))
    return out
