"""Memory per run is the run's own: its weights plus the peak working memory of its own
synthesis, the same whichever experiment ran before it in the process."""

from __future__ import annotations

import pytest
import torch

from cbx.engine.timing import WorkMemory
from cbx.lab.runner import Runner
from cbx.lab.schema import EvalConfig, Experiment, Step


def test_work_memory_counts_the_peak_of_tensors_allocated_inside_only():
    keep = torch.ones(4 * 2**20 // 4)  # allocated before: not counted
    with WorkMemory("cpu") as wm:
        a = torch.empty(2 * 2**20, dtype=torch.uint8).fill_(1)
        b = torch.empty(3 * 2**20, dtype=torch.uint8).fill_(1)
        del a, b
        c = torch.empty(2**20, dtype=torch.uint8).fill_(1)
        del c
    assert wm.kind == "cpu_torch_alloc_peak"
    assert wm.work_bytes == 5 * 2**20  # a and b were alive together; c came after they were freed
    del keep


def _exp(name, steps):
    return Experiment(name=name, model="tiny", steps=steps, baseline=False,
                      synth={"max_speech_tokens": 16, "cfm_steps": 2, "batch_size": 2},
                      eval=EvalConfig(set="offline", limit=2, metrics=("click_count",), samples=0, t3_fidelity=False))


@pytest.mark.slow
def test_two_experiments_in_one_process_give_the_same_memory_in_either_order(tmp_path):
    a, b = _exp("base", ()), _exp("int8", (Step("int8_weight_only", {}),))
    figures = {}
    for order in ((a, b), (b, a)):
        runner = Runner(tmp_path / "".join(e.name for e in order), progress=False)
        for e in order:
            mem = runner.run(e).record["memory"]
            figures.setdefault(e.name, []).append(mem)
    for name, (first, second) in figures.items():
        assert first["kind"] == second["kind"] == "cpu_torch_alloc_peak"
        assert first["weights_bytes"] == second["weights_bytes"] > 0 and first["work_bytes"] > 0
        assert second["total_bytes"] == pytest.approx(first["total_bytes"], rel=0.05), (name, first, second)
        assert first["total_bytes"] == first["weights_bytes"] + first["work_bytes"]
    assert figures["int8"][0]["weights_bytes"] < figures["base"][0]["weights_bytes"]
