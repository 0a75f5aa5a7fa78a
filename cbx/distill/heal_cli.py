"""``cbx heal CONFIG.yaml``: prune a model and heal it by distillation from the unpruned teacher.

Rerunning the same command resumes from the newest checkpoint in ``train.out_dir``;
``--set train.max_steps=400`` changes one config value. See :mod:`cbx.distill.heal`.
"""

from __future__ import annotations

import argparse
import sys

from cbx.errors import CbxError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="healing config (YAML), e.g. experiments/distill-heal-demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.out_dir=runs/x (repeatable)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="save a checkpoint after N steps and stop (rerun to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from cbx.distill.cli import parse_overrides
    from cbx.distill.heal import heal, load_config

    cfg = load_config(args.config, parse_overrides(args.set))
    if args.stop_after is not None and args.stop_after < 1:
        raise CbxError(f"--stop-after: expected a positive number of steps, got {args.stop_after}")
    heal(cfg, stop_after=args.stop_after, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cbx heal", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except CbxError as e:
        print(f"cbx heal: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
