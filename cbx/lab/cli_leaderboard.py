"""``cbx leaderboard [--results DIR]``: print the leaderboard and write its files.

Prints the terminal table (at most 120 characters wide, with the run ids, a banner on
random-weight groups, footnotes for empty cells and a legend; ``--wide`` shows every column
with full labels) and writes Markdown, CSV, JSON rows, Pareto PNGs and a self-contained HTML
page to ``<results>/leaderboard/`` (or ``--out``). The table goes to stdout, what was written
(and any plot skipped, with why) to stderr.
"""

from __future__ import annotations

import argparse
import sys

from cbx.lab.store import DEFAULT_RESULTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cbx.lab.leaderboard import DEFAULT_SORT, FIDELITY_SORT, TERMINAL_WIDTH, ranking_keys

    p.add_argument("--results", default=DEFAULT_RESULTS, help=f"results folder (default: {DEFAULT_RESULTS})")
    p.add_argument("--out", default=None, help="where to write the files (default: RESULTS/leaderboard)")
    p.add_argument("--sort", default=None, help=f"ranking column inside each group (default: {DEFAULT_SORT}; {FIDELITY_SORT} for "
                   f"random-weight groups; one of {', '.join(ranking_keys())})")
    p.add_argument("--format", choices=("terminal", "markdown", "csv"), default="terminal", help="what to print")
    p.add_argument("--wide", action="store_true", help="every column with its full label (the terminal default fits --width)")
    p.add_argument("--width", type=int, default=TERMINAL_WIDTH, help=f"terminal table width (default: {TERMINAL_WIDTH})")
    p.add_argument("--no-legend", action="store_true", help="leave the column legend out of the terminal table")
    p.add_argument("--embed-audio", action="store_true", help="embed the audio samples in the HTML page (default: relative links)")
    p.add_argument("--no-files", action="store_true", help="print only; write no files")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cbx.errors import CbxError
    from cbx.lab import leaderboard as lb

    results = Path(args.results)
    if not results.is_dir():
        raise CbxError(f"--results {results}: no such folder (run `cbx run EXP.yaml` first)")
    if args.width < 60:
        raise CbxError(f"--width {args.width}: at least 60")
    rows = lb.leaderboard(results, sort=args.sort)
    if args.format == "terminal":
        text = lb.render_terminal(rows, width=args.width, wide=args.wide, legend=not args.no_legend)
    elif args.format == "markdown":
        text = lb.render_markdown(rows)
    else:
        text = lb.render_csv(rows)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if not args.no_files and rows:
        out = Path(args.out) if args.out else results / "leaderboard"
        skipped: list[tuple[str, str]] = []
        files = lb.write_all(rows, out, embed_audio=args.embed_audio, skipped=skipped)
        print(f"wrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
        for stem, why in skipped:
            print(f"plot {stem} skipped: {why}", file=sys.stderr)
    return 0
