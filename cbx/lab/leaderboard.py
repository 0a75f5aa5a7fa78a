"""The leaderboard: one row per run, relative to its baseline, rendered from run records.

Every table and plot here is a function of the run folders' ``run.json`` records (rows are
never typed by hand, as in lm-evaluation-harness). Rows are grouped by what makes numbers
comparable: eval set and version, metric versions, and hardware. Rows are ranked only inside
a group; a failed run (NaN or silent outputs) is listed with its reason and never ranked.

Baseline-relative columns use the pairing the runner recorded (``baseline_run``): WER change
(absolute points), speaker-similarity ratio, speed-up (baseline RTF / RTF), size ratio. The
metric directions come from the metric registry, never from a column name.

Outputs: a terminal table, Markdown, CSV, a self-contained HTML page (inline CSS/JS, sortable
columns, audio players linking to the runs' samples or embedding them) and Pareto-front PNGs
(speed-up vs WER change, size vs similarity) drawn with matplotlib's Agg backend.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
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


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    fmt: str = "{:.3g}"
    higher_is_better: bool | None = None  # None: not a ranking quantity


COLUMNS: tuple[Column, ...] = (
    Column("rank", "#", "{}"),
    Column("name", "run", "{}"),
    Column("method", "method", "{}"),
    Column("status", "status", "{}"),
    Column("wer", "WER", "{:.3f}", False),
    Column("wer_delta", "ΔWER", "{:+.3f}", False),
    Column("sim", "SIM", "{:.3f}", True),
    Column("sim_ratio", "SIM×", "{:.3f}", True),
    Column("mos", "MOS", "{:.2f}", True),
    Column("artifacts", "artifacts/utt", "{:.2f}", False),
    Column("rtf", "RTF", "{:.3g}", False),
    Column("speedup", "speed-up", "{:.2f}×", True),
    Column("peak_mem_mib", "peak MiB", "{:.0f}", False),
    Column("work_mem_mib", "+mem MiB", "{:.0f}", False),
    Column("size_mib", "size MiB", "{:.1f}", False),
    Column("size_ratio", "size×", "{:.3f}", False),
    Column("t3_top1_agreement", "T3 top-1", "{:.3f}", True),
    Column("mel_l1", "mel L1", "{:.3f}", False),
    Column("run_id", "run id", "{}"),
)
COLS = {c.key: c for c in COLUMNS}


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


def _first(m: dict[str, float], keys: Sequence[str]) -> float | None:
    for k in keys:
        if k in m:
            return m[k]
    return None


def _defaults(transform: str) -> dict:
    """A transform's default parameters (so labels show only what an experiment changed)."""
    try:
        from cbx.compress.registry import registered
        from cbx.lab.schema import to_plain

        spec = registered().get(transform)
        return to_plain(spec.config_cls()) if spec else {}
    except Exception:  # a config without defaults, or a transform no longer registered
        return {}


def method_label(rec: dict) -> str:
    steps = (rec.get("config") or {}).get("steps") or []
    if not steps:
        return "baseline"
    parts = []
    for s in steps:
        params = s.get("params") or {}
        dflt = _defaults(s["transform"])
        short = ",".join(
            f"{k}={v}" for k, v in params.items()
            if (k not in dflt or dflt[k] != v) and not isinstance(v, (list, dict))
        )
        parts.append(f"{s['transform']}({short})" if short else s["transform"])
    return " + ".join(parts)


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


def row_of(rec: dict, base: dict | None, run_dir: Path) -> dict[str, Any]:
    m = _metrics_of(rec)
    bm = _metrics_of(base) if base else {}
    speed = rec.get("speed") or {}
    bspeed = (base or {}).get("speed") or {}
    wer, bwer = _first(m, WER_KEYS), _first(bm, WER_KEYS)
    sim, bsim = _first(m, SIM_KEYS), _first(bm, SIM_KEYS)
    arts = [m[k] for k in ARTIFACT_KEYS if k in m]
    size = rec.get("model_bytes")
    bsize = (base or {}).get("model_bytes")
    rtf, brtf = speed.get("rtf"), bspeed.get("rtf")
    gk, gl = group_key(rec)
    return {
        "run_id": rec.get("run_id", run_dir.name),
        "name": rec.get("name"),
        "model": (rec.get("config") or {}).get("model"),
        "method": method_label(rec),
        "status": rec.get("status"),
        "failure": rec.get("failure"),
        "is_baseline": bool(rec.get("is_baseline")),
        "baseline_run": rec.get("baseline_run"),
        "group": gk,
        "group_label": gl,
        "wer": wer,
        "wer_delta": _delta(wer, bwer) if base else (0.0 if wer is not None and rec.get("is_baseline") else None),
        "sim": sim,
        "sim_ratio": _ratio(sim, bsim) if base else (1.0 if sim is not None and rec.get("is_baseline") else None),
        "mos": _first(m, MOS_KEYS),
        "artifacts": sum(arts) if arts else None,
        "rtf": rtf,
        "speedup": _ratio(brtf, rtf) if base else (1.0 if rtf else None),
        "peak_mem_mib": (speed.get("peak_mem_bytes") or 0) / 2**20 or None,
        "work_mem_mib": speed["work_mem_bytes"] / 2**20 if speed.get("work_mem_bytes") is not None else None,
        "size_mib": size / 2**20 if size else None,
        "size_ratio": _ratio(size, bsize) if base else (1.0 if size else None),
        "t3_top1_agreement": m.get("t3_top1_agreement"),
        "mel_l1": m.get("mel_l1"),
        "samples": [str(run_dir / s) for s in rec.get("samples") or []],
        "seed": rec.get("seed"),
        "commit": (rec.get("git") or {}).get("commit"),
        "finished_at": rec.get("finished_at"),
    }


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
        if rec.get("is_baseline"):
            base = None
        elif rec.get("baseline_run"):
            base = by_id.get(rec["baseline_run"])
        rows.append(row_of(rec, base, d))
    return rank(rows)


def rank(rows: list[dict], sort: str = DEFAULT_SORT) -> list[dict]:
    """Sort and number rows inside each group; failed rows last, without a rank."""
    col = COLS.get(sort)
    if col is None or col.higher_is_better is None:
        from cbx.errors import CbxError

        valid = [c.key for c in COLUMNS if c.higher_is_better is not None]
        raise CbxError(f"--sort {sort!r}: not a ranking column; valid choices: {', '.join(valid)}")
    out = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for g in sorted(groups):
        ok = [r for r in groups[g] if r["status"] == store.STATUS_DONE]
        bad = [r for r in groups[g] if r["status"] != store.STATUS_DONE]

        def k(r):
            v = r.get(sort)
            if v is None:
                return (1, 0.0, r["name"] or "")
            return (0, -v if col.higher_is_better else v, r["name"] or "")

        ok.sort(key=k)
        for i, r in enumerate(ok, 1):
            r["rank"] = i
        for r in bad:
            r["rank"] = None
        out.extend(ok + bad)
    return out


def fmt(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "-"
    try:
        return COLS[key].fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def _groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    seen: dict[str, list[dict]] = {}
    for r in rows:
        seen.setdefault(r["group_label"], []).append(r)
    return list(seen.items())


# ---------------------------------------------------------------- text renderers

TABLE_KEYS = [c.key for c in COLUMNS if c.key != "run_id"]


def render_terminal(rows: list[dict], keys: Sequence[str] = TABLE_KEYS) -> str:
    if not rows:
        return "(no finished runs)\n"
    lines = []
    for label, grp in _groups(rows):
        cells = [[COLS[k].label for k in keys]] + [[fmt(r, k) for k in keys] for r in grp]
        widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
        lines.append(f"== {label}")
        for j, c in enumerate(cells):
            lines.append("  ".join(s.rjust(w) if j and _numeric(keys[i]) else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        for r in grp:
            if r.get("failure"):
                lines.append(f"  ! {r['name']}: failed, not ranked: {r['failure']}")
        lines.append("")
    return "\n".join(lines)


def _numeric(key: str) -> bool:
    return COLS[key].higher_is_better is not None or key in ("rank",)


def render_markdown(rows: list[dict], keys: Sequence[str] = TABLE_KEYS) -> str:
    out = ["# Leaderboard", ""]
    for label, grp in _groups(rows):
        out += [f"## {label}", ""]
        out.append("| " + " | ".join(COLS[k].label for k in keys) + " |")
        out.append("|" + "|".join("---:" if _numeric(k) else "---" for k in keys) + "|")
        for r in grp:
            out.append("| " + " | ".join(fmt(r, k).replace("|", "\\|") for k in keys) + " |")
        fails = [r for r in grp if r.get("failure")]
        if fails:
            out.append("")
            out += [f"- **{r['name']}** failed (not ranked): {r['failure']}" for r in fails]
        out.append("")
    return "\n".join(out)


CSV_KEYS = ["group_label"] + [c.key for c in COLUMNS] + ["model", "failure", "baseline_run", "seed", "commit", "finished_at"]


def render_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_KEYS)
    for r in rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k in CSV_KEYS])
    return buf.getvalue()


# ---------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
td.t,th.t{text-align:left}th{background:#eee;cursor:pointer;user-select:none}
tr.failed{color:#a00;background:#fee}audio{height:28px;width:220px}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}"""

# Sorting by the cell's data-v attribute (numbers) or its text; a click toggles the order.
_JS = """document.querySelectorAll('table.lb').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=!th.classList.contains('asc');t.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc')});
  th.classList.add(asc?'asc':'desc');var b=t.tBodies[0];var rs=Array.from(b.rows);
  rs.sort(function(a,c){var x=a.cells[i].dataset.v,y=c.cells[i].dataset.v;
   var nx=parseFloat(x),ny=parseFloat(y);if(x===''||isNaN(nx))return 1;if(y===''||isNaN(ny))return -1;
   if(!isNaN(nx)&&!isNaN(ny))return asc?nx-ny:ny-nx;return asc?x.localeCompare(y):y.localeCompare(x)});
  rs.forEach(function(r){b.appendChild(r)});});});});"""


def _audio_src(path: str, out_dir: Path, embed: bool) -> str:
    if embed:
        data = Path(path).read_bytes()
        return "data:audio/wav;base64," + base64.b64encode(data).decode()
    return os.path.relpath(path, out_dir)


def render_html(rows: list[dict], out_dir: Path, embed_audio: bool = False, keys: Sequence[str] = TABLE_KEYS, images: Sequence[str] = ()) -> str:
    out_dir = Path(out_dir)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Chatterbox compression leaderboard</title>",
        f"<style>{_CSS}</style></head><body><h1>Chatterbox compression leaderboard</h1>",
        "<p>Rows are ranked only inside a group (same eval set and version, metric versions and hardware). "
        "Click a column header to sort. Failed runs are listed in red and not ranked.</p>",
    ]
    for label, grp in _groups(rows):
        parts.append(f"<h2>{html.escape(label)}</h2><table class='lb'><thead><tr>")
        parts += [f"<th class='{'' if _numeric(k) else 't'}'>{html.escape(COLS[k].label)}</th>" for k in keys]
        parts.append("<th class='t'>samples</th></tr></thead><tbody>")
        for r in grp:
            cls = " class='failed'" if r["status"] != store.STATUS_DONE else ""
            title = f" title='{html.escape(r['failure'])}'" if r.get("failure") else ""
            parts.append(f"<tr{cls}{title}>")
            for k in keys:
                v = r.get(k)
                dv = "" if v is None else (f"{v}" if not isinstance(v, str) else html.escape(v))
                parts.append(f"<td class='{'' if _numeric(k) else 't'}' data-v='{dv}'>{html.escape(fmt(r, k))}</td>")
            players = []
            for s in r.get("samples") or []:
                if Path(s).is_file():
                    players.append(f"<audio controls preload='none' src='{html.escape(_audio_src(s, out_dir, embed_audio))}'></audio>")
            parts.append(f"<td class='t'>{''.join(players)}</td></tr>")
        parts.append("</tbody></table>")
    for img in images:
        data = base64.b64encode(Path(img).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(Path(img).stem)}</h2><img alt='{html.escape(Path(img).name)}' src='data:image/png;base64,{data}'>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "".join(parts)


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
)


def plot_pareto(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per plot, one panel per comparable group; failed runs are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = _groups([r for r in rows if r["status"] == store.STATUS_DONE])
    for stem, xk, yk, maxi in PLOTS:
        panels = [(lab, [r for r in grp if r.get(xk) is not None and r.get(yk) is not None]) for lab, grp in groups]
        panels = [(lab, grp) for lab, grp in panels if grp]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (lab, grp) in zip(axes[0], panels):
            pts = [(float(r[xk]), float(r[yk])) for r in grp]
            front = pareto_front(pts, maxi)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#888", zorder=2)
            fp = sorted((pts[i] for i in front), key=lambda p: p[0])
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "-o", color="#c33", zorder=3, label="Pareto front")
            for r, p in zip(grp, pts):
                ax.annotate(r["name"], p, fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(COLS[xk].label + (" (higher is better)" if maxi[0] else " (lower is better)"))
            ax.set_ylabel(COLS[yk].label + (" (higher is better)" if maxi[1] else " (lower is better)"))
            ax.set_title(lab, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        path = Path(out_dir) / f"{stem}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def write_all(rows: list[dict], out_dir: Path, embed_audio: bool = False, plots: bool = True) -> dict[str, Path]:
    """Markdown, CSV, JSON rows, PNGs and the HTML page (which embeds the PNGs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    images = plot_pareto(rows, out_dir) if plots else []
    for i, p in enumerate(images):
        files[f"png{i}"] = p
    for name, text in (
        ("leaderboard.md", render_markdown(rows)),
        ("leaderboard.csv", render_csv(rows)),
        ("leaderboard.json", json.dumps(rows, indent=1, default=str) + "\n"),
        ("leaderboard.html", render_html(rows, out_dir, embed_audio, images=images)),
    ):
        atomic_write_text(out_dir / name, text)
        files[name.split(".")[-1]] = out_dir / name
    return files


def leaderboard(results: str | Path, sort: str = DEFAULT_SORT, row_filter: Callable[[dict], bool] | None = None) -> list[dict]:
    rows = collect(results)
    if row_filter:
        rows = [r for r in rows if row_filter(r)]
    return rank(rows, sort)
