"""Stage timer, peak-memory sampler, apportioning and the JSON form of a run's timing."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from cbx.engine.timing import STAGES, PeakMemory, RunTiming, StageTimer, apportion, machine_description


def test_stage_timer_accumulates_and_total_bounds_stages():
    timer = StageTimer("cpu")
    with timer.stage("t3"):
        time.sleep(0.02)
    with timer.stage("t3"):
        time.sleep(0.02)
    with timer.stage("cfm"):
        time.sleep(0.01)
    timer.stop()
    s = timer.seconds()
    assert set(STAGES) <= set(s) and "total" in s
    assert s["t3"] >= 0.04 - 1e-3
    assert s["cfm"] >= 0.01 - 1e-3
    assert s["watermark"] == 0.0  # a stage that did not run is present as zero
    assert s["total"] >= s["t3"] + s["cfm"]
    # total is frozen by stop()
    time.sleep(0.01)
    assert timer.seconds()["total"] == s["total"]


def test_stage_timer_records_time_when_the_stage_raises():
    timer = StageTimer()
    with pytest.raises(RuntimeError):
        with timer.stage("vocoder"):
            time.sleep(0.01)
            raise RuntimeError("boom")
    assert timer.seconds()["vocoder"] >= 0.01 - 1e-3


def test_peak_rss_sees_a_large_temporary_allocation():
    n = 200 * 2**20  # 200 MiB, touched so it is resident
    with PeakMemory("cpu", interval_s=0.002) as pm:
        base = pm.peak_bytes
        a = np.ones(n // 8, dtype=np.float64)
        time.sleep(0.05)
        del a
    assert pm.kind == "cpu_peak_rss"
    assert pm.start_bytes == base
    assert pm.peak_bytes - base > 0.8 * n


def test_apportion_sums_to_total_and_follows_weights():
    parts = apportion(6.0, [1, 2, 3])
    assert parts == pytest.approx([1.0, 2.0, 3.0])
    assert sum(apportion(1.0, [0.3, 0.3, 0.4])) == pytest.approx(1.0)
    assert apportion(3.0, [0, 0, 0]) == pytest.approx([1.0, 1.0, 1.0])
    assert apportion(1.0, []) == []
    with pytest.raises(ValueError):
        apportion(1.0, [1, -1])


def test_run_timing_derived_figures_and_json():
    stages = {s: 0.0 for s in STAGES}
    stages.update(t3=2.0, cfm=1.0, total=4.0)
    rt = RunTiming(stages=stages, speech_tokens=50, audio_s=2.0, peak_mem_bytes=123, mem_kind="cpu_peak_rss",
                   device="cpu", n_utterances=1)
    assert rt.speech_tokens_per_s == pytest.approx(25.0)
    assert rt.rtf == pytest.approx(2.0)
    d = json.loads(json.dumps(rt.to_dict()))
    assert d["total_s"] == 4.0 and d["rtf"] == 2.0 and d["speech_tokens_per_s"] == 25.0
    assert d["stages"]["cfm"] == 1.0


def test_machine_description_names_torch_and_threads():
    info = machine_description("cpu")
    assert info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_counts_an_allocation():
    with PeakMemory("cuda") as pm:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    assert pm.kind == "cuda_max_allocated"
    assert pm.peak_bytes >= 64 * 2**20
