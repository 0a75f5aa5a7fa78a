"""``cbx run EXP.yaml... [--results DIR]``: run experiment files into run folders.

Every file is loaded and validated, and every input of every experiment resolved (model
source, device, checkpoints to load or to train, eval set files: :func:`cbx.lab.plan.plan_runs`),
before any work starts, so a typo in the third file of a list or a missing checkpoint fails at
once with exit status 2 and nothing written. Checkpoints that steps name by their training
config (``train:``) are trained on first use and reused afterwards (:mod:`cbx.lab.recipes`).
Exit status: 0 when every run is done, 1 when any run failed (its folder says why), 2 for bad
input. Under ``accelerate launch`` the same command shards each run across the launched
processes (see :mod:`cbx.lab.shard`).
"""

from __future__ import annotations

import argparse
import sys

from cbx.lab.store import DEFAULT_RESULTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiments", nargs="+", metavar="EXP.yaml", help="experiment or sweep files")
    p.add_argument("--results", default=DEFAULT_RESULTS, help=f"results folder (default: {DEFAULT_RESULTS})")
    p.add_argument("--force", action="store_true", help="re-run experiments that already have a finished run")
    p.add_argument("--only", action="append", default=None, metavar="NAME", help="run only experiments with this name (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# OpenMP threads that spin while waiting (the default "active" policy) are starved when cores
# are shared, and a scoring library can flip the policy mid-process: measured here, the same
# tiny-model batch took 23-68 s before the eval suite first ran and 1-1.5 s after it, and 2 s
# throughout with PASSIVE. One policy from the start keeps every run of a process comparable.
# It must be set before torch loads OpenMP; a user's own setting wins.
OMP_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault(*OMP_POLICY)
    from cbx.errors import CbxError
    from cbx.lab.plan import plan_runs
    from cbx.lab.runner import BaselineFailed, Runner
    from cbx.lab.schema import load_experiments
    from cbx.lab.shard import from_environment

    exps = []
    for f in args.experiments:
        exps.extend(load_experiments(f))
    if args.only:
        names = {e.name for e in exps}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise CbxError(f"--only {unknown[0]!r}: no such experiment; valid choices: {', '.join(sorted(names))}")
        exps = [e for e in exps if e.name in set(args.only)]
    shard = from_environment()
    runner = Runner(args.results, shard=shard, progress=not args.quiet)
    plan = plan_runs(exps, args.results, runner.backend)
    plan.check()
    if shard.is_main and not args.quiet:
        for line in plan.training_lines():
            print(f"cbx run: {line}", file=sys.stderr)
    failed = 0
    try:
        for exp in exps:
            try:
                out = runner.run(exp, force=args.force)
            except BaselineFailed as e:
                # its baseline failed (that run's line said why): this one cannot be compared
                failed += 1
                if shard.is_main:
                    print(f"{exp.name}: not run: {e}")
                continue
            except Exception as e:  # noqa: BLE001
                from cbx.errors import resource_fault

                if resource_fault(e) is not None or shard.world > 1:
                    raise  # disk full / read-only: the next run would fail the same way
                # A bug or a broken model in one run: its record says failed (resumable); go on.
                from cbx.lab.runner import failure_reason

                failed += 1
                if shard.is_main:
                    if os.environ.get("CBX_DEBUG", "") not in ("", "0"):
                        import traceback

                        traceback.print_exc()
                    print(f"{exp.name}: failed: {failure_reason(e)}")
                continue
            rec = out.record
            if shard.is_main:
                status = rec.get("status")
                note = " (reused)" if out.reused else ""
                extra = f": {rec.get('failure')}" if status == "failed" else ""
                print(f"{exp.name}: {status}{note} -> {out.run_dir}{extra}")
            failed += rec.get("status") != "done"
    finally:
        shard.close()
    if shard.is_main and failed:
        print(f"cbx run: {failed} run(s) failed (listed on the leaderboard, not ranked)", file=sys.stderr)
    return 1 if failed else 0
