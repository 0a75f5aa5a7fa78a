"""``cbx export RUN --out DIR [--dequantize] [--force]``: export a run's model.

RUN is a run folder, a run id or a unique prefix of one in ``--results``. See
:mod:`cbx.lab.export` for the two formats and how an export is verified on load.
"""

from __future__ import annotations

import argparse

from cbx.lab.store import DEFAULT_RESULTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_ref", metavar="RUN", help="run folder, run id or unique id prefix")
    p.add_argument("--out", required=True, help="folder to write (refused if it exists, unless --force)")
    p.add_argument("--results", default=DEFAULT_RESULTS, help=f"results folder for run ids (default: {DEFAULT_RESULTS})")
    p.add_argument("--dequantize", action="store_true", help="write float weights in the upstream file layout (ChatterboxTTS.from_local)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--wandb", action="store_true", help="also log the export as a W&B model artifact (uses the run's tracking settings)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cbx.lab.export import export_run, verify_export
    from cbx.lab.store import ResultsDir

    run_dir = ResultsDir(args.results).resolve_run(args.run_ref)
    out = export_run(run_dir, Path(args.out), dequantize=args.dequantize, force=args.force)
    info = verify_export(out)
    print(f"exported {info['run_id']} ({info['kind']}, {len(info['files'])} files) -> {out}")
    if args.wandb:
        from cbx.lab.schema import TrackingConfig, from_mapping
        from cbx.lab.store import read_json
        from cbx.lab.tracking import log_export

        record = read_json(run_dir / "run.json")
        cfg = from_mapping(TrackingConfig, {**(record.get("config", {}).get("tracking") or {}), "backend": "wandb"}, "tracking")
        log_export(cfg, out, record, results_root=run_dir.parent)
    return 0
