"""Mirror finished runs to Weights & Biases; the run folder stays the source of truth.

As in lm-evaluation-harness's W&B logger, W&B only mirrors results that are already on disk:
a run's folder (record, rows, audio, checkpoint) is complete before anything is sent, so a
network failure can lose a W&B entry but never a result. When W&B cannot start online (no
network, bad key) the logger retries in offline mode, so the entry can still be uploaded
later with ``wandb sync``; any other W&B error is reported as a warning and the run stands.

``tracking: none`` (the default) gives :class:`NullTracker`, a no-op stand-in with the same
methods (nanochat's ``DummyWandb``), so callers never branch on whether logging is on.

What one run logs: the resolved config plus provenance (config), the aggregate metrics and
speed figures (summary), a per-utterance table with each output's audio, the leaderboard
rows of the run's comparable group, and the compressed checkpoint as a ``model`` artifact.

:func:`read_offline_run` decodes an offline run's ``.wandb`` file (LevelDB log framing of
``wandb_internal_pb2.Record`` messages) so tests can check what was logged without a
server; wandb itself ships no Python reader for it any more.
"""

from __future__ import annotations

import json
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from cbx.lab import store

AUDIO_ROWS_MAX = 64  # per-utterance audio uploaded for at most this many rows (sizes add up)


class NullTracker:
    """Logging turned off: every call does nothing."""

    enabled = False

    def start(self, name: str, config: dict, group: str | None = None) -> None: ...

    def summary(self, values: dict) -> None: ...

    def table(self, key: str, columns: list[str], rows: list[list], audio_col: str | None = None) -> None: ...

    def artifact(self, name: str, kind: str, path: Path, metadata: dict | None = None) -> None: ...

    def finish(self) -> None: ...


class WandbTracker:
    enabled = True

    def __init__(self, project: str, entity: str | None = None, mode: str | None = None):
        self.project, self.entity, self.mode = project, entity, mode
        self.run = None
        self.dir: str | None = None

    def start(self, name: str, config: dict, group: str | None = None) -> None:
        import wandb

        kw = dict(project=self.project, entity=self.entity, name=name, config=config, group=group, reinit="finish_previous")
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

    def table(self, key: str, columns: list[str], rows: list[list], audio_col: str | None = None) -> None:
        import wandb

        data = []
        ai = columns.index(audio_col) if audio_col else None
        for i, r in enumerate(rows):
            r = list(r)
            if ai is not None:
                p = r[ai]
                r[ai] = wandb.Audio(str(p)) if p and i < AUDIO_ROWS_MAX and Path(p).is_file() else None
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


def make_tracker(cfg) -> NullTracker | WandbTracker:
    if getattr(cfg, "backend", "none") == "wandb":
        return WandbTracker(cfg.project, cfg.entity, cfg.mode)
    return NullTracker()


def _flat(prefix: str, d: Any, out: dict) -> dict:
    if isinstance(d, dict):
        for k, v in d.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix] = d
    return out


def _utterance_rows(run_dir: Path) -> tuple[list[str], list[list]]:
    """Per-utterance scores joined with the engine row (text, audio path, timings)."""
    scores = {}
    f = run_dir / "score" / "utterances.jsonl"
    if f.is_file():
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                scores[str(r.get("id"))] = r.get("metrics") or {}
    synth = sorted((run_dir / "synth").glob("*.json"))
    metric_keys: list[str] = []
    for r in scores.values():
        for k, v in r.items():
            if k not in metric_keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                metric_keys.append(k)
    columns = ["id", "text", "audio", "audio_s", "t_total_s", "check"] + metric_keys
    rows = []
    for p in synth:
        s = json.loads(p.read_text())
        sc = scores.get(str(s["id"]), {})
        rows.append([s["id"], s["text"], str(run_dir / s["audio"]), s["audio_s"], s["timings"].get("total"), s.get("check")] + [sc.get(k) for k in metric_keys])
    return columns, rows


def log_run(cfg, run_dir: Path, record: dict, results_root: Path, factory: Callable[..., Any] | None = None) -> bool:
    """Mirror one finished run; returns whether it was logged. Never raises for W&B trouble."""
    tracker = (factory or make_tracker)(cfg)
    if not tracker.enabled:
        return False
    try:
        from cbx.lab import leaderboard as lb

        config = {**record.get("config", {}), "run_id": record.get("run_id"), "baseline_run": record.get("baseline_run"),
                  "git": record.get("git"), "hardware": record.get("hardware"), "eval_set": record.get("eval_set"),
                  "metric_versions": record.get("metric_versions"), "packages": record.get("packages")}
        tracker.start(record["run_id"], config, group=lb.group_key(record)[0])
        summ = _flat("", (lb._metrics_of(record)), {})
        summ.update(_flat("speed", {k: v for k, v in (record.get("speed") or {}).items() if k != "stage_s"}, {}))
        summ["status"] = record.get("status")
        if record.get("model_bytes"):
            summ["model_bytes"] = record["model_bytes"]
        tracker.summary(summ)
        cols, rows = _utterance_rows(Path(run_dir))
        tracker.table("utterances", cols, rows, audio_col="audio")
        board = [r for r in lb.leaderboard(results_root) if r["group"] == lb.group_key(record)[0]]
        keys = [c.key for c in lb.COLUMNS]
        tracker.table("leaderboard", keys, [[r.get(k) for k in keys] for r in board])
        ckpt = Path(run_dir) / "checkpoint"
        if ckpt.is_dir():
            tracker.artifact(f"ckpt-{record['run_id']}", "model", ckpt, {"run_id": record["run_id"], "method": lb.method_label(record)})
        info = {"backend": "wandb", "dir": getattr(tracker, "dir", None), "run": getattr(getattr(tracker, "run", None), "id", None)}
        tracker.finish()
        store.atomic_write_json(Path(run_dir) / "tracking.json", info)
        return True
    except Exception as e:  # W&B trouble must not turn a finished run into an error
        warnings.warn(f"W&B logging of {record.get('run_id')} failed ({type(e).__name__}: {e}); local results are in {run_dir}")
        try:
            tracker.finish()
        except Exception:
            pass
        return False


def log_export(cfg, out_dir: Path, record: dict, factory: Callable[..., Any] | None = None) -> str | None:
    """Log an exported checkpoint folder as a W&B ``model`` artifact of its run; returns the
    W&B run's local folder (None when nothing was logged)."""
    tracker = (factory or make_tracker)(cfg)
    if not tracker.enabled:
        return None
    try:
        tracker.start(f"export-{record['run_id']}", {"run_id": record["run_id"], **record.get("config", {})})
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
