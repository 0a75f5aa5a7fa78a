"""Split a run's synthesis and scoring across processes (one per GPU) with accelerate.

``accelerate launch --multi_gpu --num_processes N -m cbx.cli run EXP.yaml`` starts N copies of
the same command; each takes every N-th eval item (``items[rank::N]``), synthesizes and scores
it into the shared run folder (per-utterance files, so shards never write the same file), and
the main process merges the scorer's rows in eval-set order and aggregates them once. Because
the engine seeds each utterance from the seed alone (not from its batch position) and the
scorer's per-utterance scores do not depend on their neighbours, the merged result equals a
single-process run.

accelerate is used for what it does well (process discovery from the launcher's environment,
a gloo/NCCL process group, barriers, object broadcast/gather); on a machine without CUDA the
state is created with ``cpu=True`` so the same launch line gives a gloo group of CPU processes,
which is how the tests run it. A plain ``cbx run`` never touches torch.distributed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from cbx.errors import CbxError
from cbx.files import atomic_write_text


@dataclass
class Shard:
    rank: int = 0
    world: int = 1
    state: Any = None  # accelerate.PartialState when world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, seq: Sequence) -> list:
        return list(seq)[self.rank :: self.world]

    def wait(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather_dict(self, d: dict) -> dict:
        """Union of every process's dict, on every process."""
        if self.world == 1:
            return dict(d)
        from accelerate.utils import gather_object

        out: dict = {}
        for part in gather_object([d]):
            out.update(part)
        return out

    def close(self) -> None:
        """End the process group (a process exiting with it open can abort at teardown)."""
        if self.world > 1:
            self.wait()
            self.state.destroy_process_group()

    @contextmanager
    def group_lock(self, results, run_id: str) -> Iterator[None]:
        """The results folder's lock on ``run_id``, held by the main process for the group.

        Peers do not take it themselves: they would wait on their own main process.
        """
        if self.world == 1:
            with results.lock(run_id):
                yield
            return
        if self.is_main:
            with results.lock(run_id):
                self.wait()
                try:
                    yield
                finally:
                    self.wait()
        else:
            self.wait()
            try:
                yield
            finally:
                self.wait()


def single_process() -> Shard:
    return Shard()


def launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def from_environment() -> Shard:
    """The shard this process is, from the launcher's environment (1 of 1 without one)."""
    if launched_world_size() <= 1:
        return single_process()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes <= 1:
        return single_process()
    return Shard(state.process_index, state.num_processes, state)


def merge_scores(parts: Sequence[Path], out_dir: Path, order: Sequence[str], metrics: Sequence[str] | None = None,
                 config=None) -> dict:
    """Join shard score folders into the scorer's ``utterances.jsonl`` + ``aggregate.json``.

    Rows are put back in manifest order with their manifest line numbers (shard ``r`` of
    ``w`` held lines ``r+1, r+1+w, ...``) and aggregated once by the scorer's own
    :func:`cbx.eval.scorer.aggregate`, so the files equal those of a single-process run.
    """
    import json

    from cbx.eval import schema
    from cbx.eval.scorer import Scorer, aggregate

    out_dir = Path(out_dir)
    world = len(parts)
    rows: dict[str, dict] = {}
    aggs, skipped = [], []
    for rank, p in enumerate(parts):
        f, a = Path(p) / schema.ROWS_FILE, Path(p) / schema.AGGREGATE_FILE
        if not f.is_file() or not a.is_file():
            raise CbxError(f"{p}: missing {schema.ROWS_FILE} or {schema.AGGREGATE_FILE} (a shard did not finish scoring)")
        aggs.append(json.loads(a.read_text()))
        for s in aggs[-1].get("skipped") or []:
            skipped.append({**s, "line": (int(s["line"]) - 1) * world + rank + 1})
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[str(r["id"])] = r
    index = {uid: n for n, uid in enumerate(order, 1)}
    ordered = [dict(rows[i], line=index[i]) for i in order if i in rows]
    skipped.sort(key=lambda s: s["line"])
    agg = {
        **aggs[0],
        "manifest": str(out_dir.parent / "manifest.jsonl"),
        "n_lines": len(order),
        "n_scored": len(ordered),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "metrics": aggregate(ordered, Scorer(metrics, config)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / schema.ROWS_FILE, "".join(schema.dumps(r) + "\n" for r in ordered))
    atomic_write_text(out_dir / schema.AGGREGATE_FILE, schema.dumps(agg, indent=2) + "\n")
    return agg
