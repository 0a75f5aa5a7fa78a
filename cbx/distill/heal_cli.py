"""``cbx heal CONFIG.yaml``: prune a model and heal it by distillation from the unpruned teacher.

Rerunning the same command resumes from the newest checkpoint in ``train.out_dir``;
``--set train.max_steps=400`` changes one config value. See :mod:`cbx.distill.heal`.
"""

from __future__ import annotations

import argparse
import sys

from cbx.distill.cli import add_training_arguments, standalone_main, training_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, "healing config (YAML), e.g. experiments/distill-heal-demo.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from cbx.distill.heal import heal, load_config

    cfg = training_config(load_config, args)
    heal(cfg, stop_after=args.stop_after, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone_main("cbx heal", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
