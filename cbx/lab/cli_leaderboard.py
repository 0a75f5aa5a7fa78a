"""``cbx leaderboard [--results DIR]``: print the leaderboard and write its files.

Prints the terminal table and writes Markdown, CSV, JSON rows, Pareto PNGs and a
self-contained HTML page to ``<results>/leaderboard/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys

from cbx.lab.store import DEFAULT_RESULTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cbx.lab.leaderboard import COLUMNS, DEFAULT_SORT

    ranking = [c.key for c in COLUMNS if c.higher_is_better is not None]
    p.add_argument("--results", default=DEFAULT_RESULTS, help=f"results folder (default: {DEFAULT_RESULTS})")
    p.add_argument("--out", default=None, help="where to write the files (default: RESULTS/leaderboard)")
    p.add_argument("--sort", default=DEFAULT_SORT, help=f"ranking column inside each group (default: {DEFAULT_SORT}; one of {', '.join(ranking)})")
    p.add_argument("--format", choices=("terminal", "markdown", "csv"), default="terminal", help="what to print")
    p.add_argument("--embed-audio", action="store_true", help="embed the audio samples in the HTML page (default: relative links)")
    p.add_argument("--no-files", action="store_true", help="print only; write no files")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cbx.errors import CbxError
    from cbx.lab import leaderboard as lb

    results = Path(args.results)
    if not results.is_dir():
        raise CbxError(f"--results {results}: no such folder (run `cbx run EXP.yaml` first)")
    rows = lb.leaderboard(results, sort=args.sort)
    text = {"terminal": lb.render_terminal, "markdown": lb.render_markdown, "csv": lambda r: lb.render_csv(r)}[args.format](rows)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if not args.no_files and rows:
        out = Path(args.out) if args.out else results / "leaderboard"
        files = lb.write_all(rows, out, embed_audio=args.embed_audio)
        print(f"wrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    return 0
