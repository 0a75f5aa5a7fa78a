"""``cbx distill CONFIG.yaml``: record teacher data and train a few-step CFM student.

The same module runs under ``accelerate launch -m cbx.distill.cli CONFIG.yaml`` for several
GPUs. Rerunning the same command resumes from the newest checkpoint in ``train.out_dir``.
``--set train.max_steps=400`` changes one config value without editing the file (values are
parsed as YAML scalars).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from cbx.errors import CbxError
from cbx.config import load_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="distillation config (YAML), e.g. experiments/distill-tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.out_dir=runs/x (repeatable)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="save a checkpoint after N steps and stop (rerun to resume)")
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


def run(args: argparse.Namespace) -> int:
    from cbx.distill.config import load_config
    from cbx.distill.train import train

    cfg = load_config(args.config, parse_overrides(args.set))
    if args.stop_after is not None and args.stop_after < 1:
        raise CbxError(f"--stop-after: expected a positive number of steps, got {args.stop_after}")
    train(cfg, stop_after=args.stop_after, progress=not args.no_progress, record_only=args.record_only)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cbx distill", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except CbxError as e:
        print(f"cbx distill: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
