"""The distill sampling math equals upstream's solvers; trajectory reads and batch order."""

from __future__ import annotations

import torch

from cbx.distill.flow import (CFMBatch, interpolate_trajectory, masked_l1, student_solve, teacher_solve,
                              teacher_times)
from cbx.distill.student import make_student
from cbx.distill.train import batch_indices


def _batch(B=2, T=30, P=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.zeros(B, 80, T)
    cond[:, :, :P] = torch.randn(B, 80, P, generator=g)
    return CFMBatch(torch.randn(B, 80, T, generator=g), torch.ones(B, 1, T), torch.randn(B, 80, generator=g),
                    cond, torch.full((B,), P), torch.full((B,), T)), torch.randn(B, 80, T, generator=g)


def test_teacher_solve_equals_upstream_solve_euler(tiny_model):
    cfm = tiny_model.s3gen.flow.decoder
    b, z = _batch()
    ours, times = teacher_solve(cfm.estimator, b, z, 10, 0.7, trajectory=True)
    with torch.inference_mode():
        ref = cfm.solve_euler(z.clone(), t_span=teacher_times(10), mu=b.mu, mask=b.mask, spks=b.spks, cond=b.cond)
    assert cfm.inference_cfg_rate == 0.7
    assert ours.shape == (11, 2, 80, 30)
    assert torch.equal(ours[0], z)
    torch.testing.assert_close(ours[-1], ref, atol=1e-5, rtol=0)
    assert (ours[-1] - z).abs().mean() > 1e-3  # the teacher moved: the comparison is not vacuous


def test_student_solve_equals_upstream_basic_euler(tiny_model, capsys):
    cfm = tiny_model.s3gen.flow.decoder
    student = make_student(cfm.estimator)
    b, z = _batch(seed=1)
    ours = student_solve(student, b, z, 2)
    teacher_est = cfm.estimator
    try:
        cfm.estimator = student
        with torch.inference_mode():
            ref = cfm.basic_euler(z.clone(), t_span=torch.linspace(0, 1, 3), mu=b.mu, mask=b.mask, spks=b.spks,
                                  cond=b.cond)
    finally:
        cfm.estimator = teacher_est
    capsys.readouterr()
    torch.testing.assert_close(ours.detach(), ref, atol=1e-5, rtol=0)


def test_interpolated_trajectory_is_the_euler_path(tiny_model):
    cfm = tiny_model.s3gen.flow.decoder
    b, z = _batch(seed=2)
    states, times = teacher_solve(cfm.estimator, b, z, 10, 0.7, trajectory=True)
    for i in (0, 3, 10):  # grid points are returned exactly
        got = interpolate_trajectory(states, times, torch.full((2,), float(times[i])))
        torch.testing.assert_close(got, states[i], atol=1e-6, rtol=0)
    # Between grid points the Euler path is linear: x(t) = x_i + (t - t_i) * v_i.
    t = torch.tensor([0.5, 0.05])
    got = interpolate_trajectory(states, times, t)
    for j in range(2):
        i = int(torch.searchsorted(times, t[j], right=True)) - 1
        v = (states[i + 1, j] - states[i, j]) / (times[i + 1] - times[i])
        torch.testing.assert_close(got[j], states[i, j] + (t[j] - times[i]) * v, atol=1e-6, rtol=0)


def test_masked_l1_counts_only_masked_frames():
    a, b = torch.zeros(1, 80, 10), torch.zeros(1, 80, 10)
    b[..., 5:] = 3.0
    m = torch.zeros(1, 1, 10)
    m[..., :5] = 1
    assert masked_l1(a, b, m).item() == 0.0
    m[..., 5:] = 1
    assert abs(masked_l1(a, b, m).item() - 1.5) < 1e-6


def test_batch_order_is_a_per_epoch_permutation_split_across_ranks():
    n, bs = 10, 3
    seen = [i for step in range(1, 4) for micro in range(1) for i in batch_indices(n, 7, step, micro, 1, bs)]
    assert sorted(seen[:9]) == sorted(set(seen[:9]))  # no repeat inside the first epoch
    assert batch_indices(n, 7, 2, 0, 1, bs) == batch_indices(n, 7, 2, 0, 1, bs)
    assert batch_indices(n, 7, 2, 0, 1, bs) != batch_indices(n, 8, 2, 0, 1, bs)
    r0 = batch_indices(n, 7, 1, 0, 1, 2, rank=0, world=2)
    r1 = batch_indices(n, 7, 1, 0, 1, 2, rank=1, world=2)
    assert not set(r0) & set(r1)
    assert r0 + r1 == batch_indices(n, 7, 1, 0, 1, 4)  # two ranks of 2 = one rank of 4


def test_bench_student_runs_on_the_tiny_model(capsys):
    """Smoke test of `cbx bench student` (the figures themselves are not asserted: no timings in tests)."""
    from cbx.cli import main

    assert main(["bench", "student", "--model", "tiny", "--tokens", "4", "--ref-seconds", "0.4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("student S3Gen speed-up vs teacher: 2 steps ") and "1 step " in lines[-1]
    assert [ln.split()[:3] for ln in lines[2:5]] == [["teacher", "10", "20"], ["student", "2", "2"], ["student", "1", "1"]]


def test_intmeanflow_intervals():
    from cbx.distill.objectives import IntMeanFlowConfig, sample_intervals

    g = torch.Generator().manual_seed(0)
    t, r = sample_intervals(4000, IntMeanFlowConfig(p_inference=0.0), g)
    assert torch.all(t < r) and t.min() >= 0 and r.max() <= 1
    assert 0.3 < t.mean() < 0.37 and 0.63 < r.mean() < 0.7  # min/max of two uniforms: 1/3, 2/3
    t, r = sample_intervals(600, IntMeanFlowConfig(steps=(1, 2), p_inference=1.0), g)
    pairs = {(round(float(a), 3), round(float(b), 3)) for a, b in zip(t, r)}
    assert pairs == {(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)}


def test_intmeanflow_target_is_the_teacher_average_velocity(tiny_model):
    """Planted check: a 'student' that returns the exact average velocity of the recorded
    trajectory has zero IntMeanFlow loss; the fresh student does not."""
    from cbx.distill.objectives import IntMeanFlowConfig, TrainBatch, intmeanflow_loss

    cfm = tiny_model.s3gen.flow.decoder
    b, z = _batch(seed=3)
    states, times = teacher_solve(cfm.estimator, b, z, 10, 0.7, trajectory=True)
    batch = TrainBatch(b, z, states[-1], states, times)

    class Oracle(torch.nn.Module):
        def forward(self, x, mask, mu, t, spks, cond, r):
            z_r = interpolate_trajectory(states, times, r)
            return (z_r - x) / (r - t).view(-1, 1, 1)

    cfg = IntMeanFlowConfig(loss="mse")
    assert intmeanflow_loss(Oracle(), batch, cfg, torch.Generator().manual_seed(1)).item() < 1e-8
    fresh = make_student(cfm.estimator)
    assert intmeanflow_loss(fresh, batch, cfg, torch.Generator().manual_seed(1)).item() > 1e-5
