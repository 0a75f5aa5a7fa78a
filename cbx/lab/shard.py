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


def merge_scores(parts: Sequence[Path], out_dir: Path, order: Sequence[str]) -> dict:
    """Join shard score folders into one ``utterances.jsonl`` (in ``order``) and aggregate it."""
    import json

    from cbx.eval.scorer import aggregate_rows, write_scores

    rows: dict[str, dict] = {}
    for p in parts:
        f = Path(p) / "utterances.jsonl"
        if not f.is_file():
            raise CbxError(f"{f}: missing (a shard did not finish scoring)")
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[str(r["id"])] = r
    missing = [i for i in order if i not in rows]
    if missing:
        raise CbxError(f"{out_dir}: shards scored no row for {', '.join(missing[:5])}")
    ordered = [rows[i] for i in order]
    agg = aggregate_rows(ordered)
    write_scores(ordered, agg, out_dir)
    return agg
