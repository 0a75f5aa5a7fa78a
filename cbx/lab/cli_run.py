"""``cbx run EXP.yaml... [--results DIR]``: run experiment files into run folders.

Every file is loaded and validated, and every input of every experiment resolved (model
source, device, checkpoints to load or to train, eval set files: :func:`cbx.lab.plan.plan_runs`),
before any work starts, so a typo in the third file of a list or a missing checkpoint fails at
once with exit status 2 and nothing written. Checkpoints that steps name by their training
config (``train:``) are trained on first use and reused afterwards (:mod:`cbx.lab.recipes`).
Every error of every file, and every problem of the plan, is reported at once (one line each).
``--set KEY=VALUE`` overrides any key of every experiment (``--set synth.dtype=bf16``; values
are YAML), ``--limit``/``--device`` are shorthands for ``eval.limit``/``device``. ``--dry-run``
prints the plan, each resolved experiment, its baseline and their run ids, and writes nothing.
A run ends with the leaderboard rows of the runs it made (stdout; progress goes to stderr).
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a key of every experiment (dotted path, YAML value; repeatable), e.g. synth.dtype=bf16")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N utterances of the eval set (eval.limit)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N] for every experiment (device)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the resolved experiments with their baselines; "
                   "run, train and write nothing")


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

    from cbx.lab.schema import parse_override

    overrides = [parse_override(o) for o in args.overrides]
    if args.limit is not None:
        if args.limit < 1:
            raise CbxError(f"--limit {args.limit}: expected a positive number of utterances")
        overrides.append(("eval.limit", args.limit))
    if args.device is not None:
        overrides.append(("device", args.device))
    exps, errors = [], []
    for f in args.experiments:
        try:
            exps.extend(load_experiments(f, overrides))
        except CbxError as e:
            errors.extend(str(e).splitlines())
    if errors:
        raise CbxError(errors[0] if len(errors) == 1 else f"{len(errors)} problems:\n  " + "\n  ".join(errors))
    if args.only:
        names = {e.name for e in exps}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise CbxError(f"--only {unknown[0]!r}: no such experiment; valid choices: {', '.join(sorted(names))}")
        exps = [e for e in exps if e.name in set(args.only)]
    shard = from_environment()
    runner = Runner(args.results, shard=shard, progress=not args.quiet)
    plan = plan_runs(exps, args.results, runner.backend)
    if args.dry_run:
        return dry_run(exps, runner, plan)
    if len(plan.problems) > 1:
        raise CbxError(f"{len(plan.problems)} problems:\n  " + "\n  ".join(plan.problems))
    plan.check()
    if shard.is_main and not args.quiet:
        for line in plan.training_lines():
            print(f"cbx run: {line}", file=sys.stderr)
    failed = 0
    made: list[str] = []
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
                made += [i for i in (rec.get("baseline_run"), out.run_id) if i and i not in made]
            failed += rec.get("status") != "done"
    finally:
        shard.close()
    if shard.is_main and made:
        from cbx.lab import leaderboard as lb

        rows = [r for r in lb.leaderboard(args.results) if r["run_id"] in made]
        sys.stdout.write(lb.render_terminal(rows, legend=False))
        more = f" --results {args.results}" if args.results != DEFAULT_RESULTS else ""
        print(f"(legend, every run and the HTML page: cbx leaderboard{more})", file=sys.stderr)
    if shard.is_main and failed:
        print(f"cbx run: {failed} run(s) failed (listed on the leaderboard, not ranked)", file=sys.stderr)
    return 1 if failed else 0


def dry_run(exps, runner, plan) -> int:
    """Print the plan (inputs resolved, trainings, problems), then each experiment as it would
    run: run id, baseline (to run or reused) and the resolved config. Writes nothing."""
    import json

    for line in plan.lines():
        print(f"# {line}")
    for exp in exps:
        run_id, key, resolved, hw, device = runner.identify(exp)
        print(f"# {exp.name}: run id {run_id} on {device} ({hw.get('gpu') or hw.get('cpu')}); "
              f"{'finished, would be reused' if runner._finished(run_id, key) else 'to run'}")
        if not exp.is_baseline and exp.baseline:
            base = exp.baseline_experiment()
            bid, bkey = runner.identify(base)[:2]
            print(f"#   baseline: {base.name} ({bid}, {'finished, reused' if runner._finished(bid, bkey) else 'to run first'})")
        else:
            print("#   baseline: this is a baseline" if exp.is_baseline else "#   baseline: none (baseline: false)")
        print(json.dumps(resolved, indent=1, default=str))
    return 2 if plan.problems else 0
