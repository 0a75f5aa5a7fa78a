"""The ``cbx`` command line.

Each sub-command lives next to the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only maps names to those modules, importing a module when its
command is used so that ``cbx --help`` stays fast and nothing heavy loads at import time.
A :class:`cbx.errors.CbxError` becomes a one-line reason and exit status 2, and so does a
resource fault (disk full, read-only folder, permission denied: an ``OSError`` naming the file).
Anything else is an internal error: one line saying so and where the full traceback was logged
(``--debug``, anywhere on the command line, prints it instead), exit status 1. SIGTERM (and
SIGHUP) are turned into an exception like Ctrl-C, so a run being stopped marks its record
``failed`` (resumable) on the way out; exit status 128 + the signal number.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from cbx.errors import CbxError, Terminated, os_error_message, resource_fault

# name -> (module, one-line help). Bench modes are dispatched by cbx.bench.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("cbx.engine.cli_synth", "synthesize text with a voice prompt to a 24 kHz wav"),
    "bench": ("cbx.bench", "print speed/memory benchmarks (engine, quant, student, scorer, prune)"),
    "score": ("cbx.eval.cli", "score a manifest of wavs with the eval suite"),
    "run": ("cbx.lab.cli_run", "run experiment files and write run folders"),
    "leaderboard": ("cbx.lab.cli_leaderboard", "render the leaderboard of a results folder"),
    "export": ("cbx.lab.cli_export", "export a run's checkpoint"),
    "save-model": ("cbx.lab.cli_save_model", "write a model source (e.g. random:original) in the upstream file layout"),
    "distill": ("cbx.distill.cli", "train a few-step CFM student from a config"),
    "prune-report": ("cbx.compress.cli_prune", "rank T3 layers/heads/FFN channels and CFM blocks by importance"),
    "list": ("cbx.lab.cli_list", "list transforms, metrics, eval sets or models (with parameters and defaults)"),
    "heal": ("cbx.distill.heal_cli", "heal a pruned model by distillation from the unpruned teacher"),
}


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make a bad argument print one line and exit 2 (argparse would print its usage block too)."""

    def error(message: str) -> None:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    from cbx import __version__

    parser = one_line_errors(argparse.ArgumentParser(prog="cbx", description="Chatterbox compression workbench: "
                                                     "compress, synthesize, score and rank (`make demo` shows it all)."))
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an internal error (accepted anywhere on the line)")
    parser.add_argument("--version", action="version", version=f"cbx {__version__}")
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
    debug = "--debug" in argv or os.environ.get("CBX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ["CBX_DEBUG"] = "1"  # commands that go on after a failure print its traceback
    parser, module = _build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    restore = _terminate_on_signals()
    try:
        return int(module.run(args) or 0)
    except CbxError as e:
        print(f"cbx {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"cbx {args.command}: stopped by {signal.Signals(e.signal).name}", file=sys.stderr)
        return 128 + e.signal
    except KeyboardInterrupt:
        print(f"cbx {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if resource_fault(e) is None:
            return _internal_error(args.command, e, debug)
        if debug:
            traceback.print_exc()
        print(f"cbx {args.command}: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 (the one place that turns bugs into one line)
        return _internal_error(args.command, e, debug)
    finally:
        restore()


def _internal_error(command: str, exc: BaseException, debug: bool) -> int:
    """One line (the traceback goes to a log file, or to stderr with ``--debug``); exit 1."""
    text = traceback.format_exc()
    first = (str(exc).splitlines() or [""])[0][:300]
    if debug:
        sys.stderr.write(text)
        where = "traceback above"
    else:
        log = _write_log(command, text)
        where = f"traceback in {log}; --debug prints it" if log else "rerun with --debug for the traceback"
    print(f"cbx {command}: internal error: {type(exc).__name__}: {first} ({where})", file=sys.stderr)
    return 1


def _write_log(command: str, text: str) -> Path | None:
    root = Path(os.environ.get("CBX_CACHE_DIR") or Path.home() / ".cache" / "cbx") / "logs"
    path = root / f"cbx-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(f"cbx {' '.join(sys.argv[1:])}\n{text}")
    except OSError:
        return None
    return path


def _terminate_on_signals():
    """SIGTERM/SIGHUP raise :class:`Terminated` in the main thread; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {}

    def handler(signum, frame):
        raise Terminated(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass

    def restore():
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore


if __name__ == "__main__":
    sys.exit(main())
