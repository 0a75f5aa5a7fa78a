"""The ``cbx`` command line.

Each sub-command lives next to the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only maps names to those modules, importing a module when its
command is used so that ``cbx --help`` stays fast and nothing heavy loads at import time.
A :class:`cbx.errors.CbxError` becomes a one-line reason and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cbx.errors import CbxError

# name -> (module, one-line help). Bench modes are dispatched by cbx.bench.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("cbx.engine.cli_synth", "synthesize text with a voice prompt to a 24 kHz wav"),
    "bench": ("cbx.bench", "print speed/memory benchmarks (engine, quant, student, prune)"),
    "demo": ("cbx.demo", "run the offline demo (built-in tiny model, real offline voices)"),
    "score": ("cbx.eval.cli", "score a manifest of wavs with the eval suite"),
    "run": ("cbx.lab.cli_run", "run experiment files and write run folders"),
    "leaderboard": ("cbx.lab.cli_leaderboard", "render the leaderboard of a results folder"),
    "export": ("cbx.lab.cli_export", "export a run's checkpoint"),
    "save-model": ("cbx.lab.cli_save_model", "write a model source (e.g. random:original) in the upstream file layout"),
    "distill": ("cbx.distill.cli", "train a few-step CFM student from a config"),
    "prune-report": ("cbx.compress.cli_prune", "rank T3 layers/heads/FFN channels and CFM blocks by importance"),
}


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make a bad argument print one line and exit 2 (argparse would print its usage block too)."""

    def error(message: str) -> None:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = one_line_errors(argparse.ArgumentParser(prog="cbx", description=__doc__.splitlines()[0]))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (modname, help_) in COMMANDS.items():
        p = one_line_errors(sub.add_parser(name, help=help_))
        if name == wanted:
            try:
                module = importlib.import_module(modname)
            except ModuleNotFoundError as e:
                if e.name and (e.name == modname or modname.startswith(e.name + ".")):
                    parser.exit(2, f"cbx: command '{name}' is not available yet ({modname} missing)\n")
                raise
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = _build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except CbxError as e:
        print(f"cbx {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"cbx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
