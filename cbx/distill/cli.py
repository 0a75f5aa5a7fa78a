"""``cbx distill CONFIG.yaml``: record teacher data and train a few-step CFM student.

The same module runs under ``accelerate launch -m cbx.distill.cli CONFIG.yaml`` for several
GPUs. Rerunning the same command resumes from the newest checkpoint in ``train.out_dir``.
``--set train.max_steps=400`` changes one config value without editing the file (values are
parsed as YAML scalars).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import yaml

from cbx.errors import CbxError
from cbx.config import load_yaml


def add_training_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """The arguments every training command (``cbx distill``, ``cbx heal``) starts with: the
    config file, ``--set`` overrides and ``--stop-after`` (read by :func:`training_config`)."""
    parser.add_argument("config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.out_dir=runs/x (repeatable)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="save a checkpoint after N steps and stop (rerun to resume)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, "distillation config (YAML), e.g. experiments/distill-tiny.yaml")
    parser.add_argument("--record-only", action="store_true",
                        help="only record the teacher data (resumable), then stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise CbxError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=400")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = load_yaml(v)
        except yaml.YAMLError as e:
            raise CbxError(f"--set {item!r}: value is not a YAML scalar ({e})") from e
    return out


def training_config(load_config: Callable[..., Any], args: argparse.Namespace):
    """A training command's config: ``load_config(args.config, overrides)`` with the ``--set``
    overrides, once ``--stop-after`` was checked."""
    cfg = load_config(args.config, parse_overrides(args.set))
    if args.stop_after is not None and args.stop_after < 1:
        raise CbxError(f"--stop-after: expected a positive number of steps, got {args.stop_after}")
    return cfg


def run(args: argparse.Namespace) -> int:
    from cbx.distill.config import load_config
    from cbx.distill.train import train

    cfg = training_config(load_config, args)
    train(cfg, stop_after=args.stop_after, progress=not args.no_progress, record_only=args.record_only)
    return 0


def standalone_main(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                    run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """A training command run as a module (``accelerate launch -m cbx.distill.cli CONFIG``),
    not through ``cbx``: its own parser (``prog``, the first line of ``doc`` as description),
    and a :class:`CbxError` printed as ``<prog>: error: ...`` with its exit status, as ``cbx``
    does."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except CbxError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code


def main(argv: list[str] | None = None) -> int:
    return standalone_main("cbx distill", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
