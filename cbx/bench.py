"""``cbx bench MODE``: benchmarks that print their figures (never tests).

Each mode lives with the code it measures and exposes ``add_arguments(parser)`` and
``run(args)``. Every mode measures its baseline and its candidates in one process, one run,
and prints ratios against the baseline, so figures from a noisy machine stay comparable.
"""

from __future__ import annotations

import argparse
import importlib

MODES = {
    "engine": "cbx.engine.bench",
    "quant": "cbx.compress.bench",
    "prune": "cbx.compress.bench_prune",
    "student": "cbx.distill.bench",
    "scorer": "cbx.eval.bench",
    "stack": "cbx.lab.bench_stack",
    "throughput": "cbx.engine.bench_throughput",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=sorted(MODES), help="what to benchmark")
    # Mode-specific flags are parsed by the mode itself from the remaining arguments.
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from cbx.cli import one_line_errors

    module = importlib.import_module(MODES[args.mode])
    p = one_line_errors(argparse.ArgumentParser(prog=f"cbx bench {args.mode}"))
    module.add_arguments(p)
    return int(module.run(p.parse_args(args.rest)) or 0)
