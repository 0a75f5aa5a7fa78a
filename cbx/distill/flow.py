"""The math of teacher and student sampling for S3Gen's conditional flow matching (CFM).

Why this is written here rather than called from upstream: upstream's ``solve_euler`` and
``basic_euler`` run under ``torch.inference_mode`` (no gradients, so a student cannot be
trained through them), draw their own noise, and keep no intermediate states. Distillation
needs the same arithmetic with a given noise, optional intermediate states (the teacher's
trajectory) and gradients through the student's steps. ``tests/distill`` checks that
:func:`teacher_solve` reproduces upstream ``CausalConditionalCFM.solve_euler`` and that
:func:`student_solve` reproduces upstream ``basic_euler``, so the two stay interchangeable.

Conventions (upstream's): time runs from noise (t=0) to mel (t=1); tensors are ``(B, 80, T)``,
the mask ``(B, 1, T)``, speaker embeddings ``(B, 80)``. The teacher uses the cosine time grid
and classifier-free guidance (CFG): each step evaluates the estimator on the conditional and
the unconditional (mu, spks and cond zeroed) inputs and mixes them as
``(1 + cfg) * v_cond - cfg * v_uncond``. The student is a MeanFlow estimator
(``ConditionalDecoder(meanflow=True)``): it takes a start time ``t`` and an end time ``r`` and
predicts the average velocity over ``[t, r]``; it runs on the linear grid, one forward per
step, no CFG, exactly as upstream runs Chatterbox Turbo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class CFMBatch:
    """Padded inputs of the CFM decoder for a batch of utterances (prompt + new frames).

    ``prompt_lens``/``lens`` count mel frames; the prompt region is conditioning only and is
    cut from the output, so losses and errors are taken on ``[prompt_len, len)``.
    """

    mu: torch.Tensor  # (B, 80, T) encoder output
    mask: torch.Tensor  # (B, 1, T) 1 on valid frames
    spks: torch.Tensor  # (B, 80) projected speaker embedding
    cond: torch.Tensor  # (B, 80, T) prompt mel, zero after the prompt
    prompt_lens: torch.Tensor  # (B,) long
    lens: torch.Tensor  # (B,) long

    def to(self, device=None, dtype=None) -> "CFMBatch":
        def mv(x):
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

        return CFMBatch(mv(self.mu), mv(self.mask), mv(self.spks), mv(self.cond),
                        self.prompt_lens.to(device), self.lens.to(device))

    @property
    def out_mask(self) -> torch.Tensor:
        """(B, 1, T) mask of the generated frames (valid and after the prompt)."""
        T = self.mu.shape[-1]
        idx = torch.arange(T, device=self.mu.device)[None, :]
        m = (idx >= self.prompt_lens[:, None]) & (idx < self.lens[:, None])
        return m[:, None, :].to(self.mu.dtype)


def teacher_times(n_steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Upstream's cosine grid for the original (non-MeanFlow) CFM: ``1 - cos(pi/2 * i/n)``."""
    t = torch.linspace(0, 1, n_steps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * math.pi)


def student_times(n_steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Upstream's linear grid for MeanFlow estimators (``meanflow=True`` skips the cosine)."""
    return torch.linspace(0, 1, n_steps + 1, device=device, dtype=dtype)


def _time_vec(t, B: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    return t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)


def teacher_velocity(estimator, x: torch.Tensor, t, b: CFMBatch, cfg_rate: float) -> torch.Tensor:
    """CFG velocity of a (non-MeanFlow) estimator at state ``x`` and time ``t``.

    The conditional and unconditional halves run as one batch of 2B, as upstream does, so the
    numbers match upstream's ``solve_euler`` to float rounding.
    """
    B = x.shape[0]
    tt = _time_vec(t, B, x)
    if cfg_rate == 0:
        return estimator(x, b.mask, b.mu, tt, b.spks, b.cond)
    v = estimator(
        torch.cat([x, x]), torch.cat([b.mask, b.mask]),
        torch.cat([b.mu, torch.zeros_like(b.mu)]), torch.cat([tt, tt]),
        torch.cat([b.spks, torch.zeros_like(b.spks)]), torch.cat([b.cond, torch.zeros_like(b.cond)]),
    )
    v_c, v_u = v[:B], v[B:]
    return (1.0 + cfg_rate) * v_c - cfg_rate * v_u


def teacher_solve(estimator, b: CFMBatch, noise: torch.Tensor, n_steps: int, cfg_rate: float,
                  trajectory: bool = False):
    """Euler on the cosine grid with CFG. Returns the endpoint, or (states, times) with
    ``states`` of shape ``(n_steps + 1, B, 80, T)`` (noise first, endpoint last)."""
    times = teacher_times(n_steps, device=noise.device, dtype=noise.dtype)
    x = noise
    states = [x]
    for i in range(n_steps):
        t, r = times[i], times[i + 1]
        x = x + (r - t) * teacher_velocity(estimator, x, t, b, cfg_rate)
        if trajectory:
            states.append(x)
    return (torch.stack(states), times) if trajectory else x


def student_velocity(student, x: torch.Tensor, t, r, b: CFMBatch) -> torch.Tensor:
    """Average velocity over ``[t, r]`` predicted by a MeanFlow estimator (one forward)."""
    B = x.shape[0]
    return student(x, b.mask, b.mu, _time_vec(t, B, x), b.spks, b.cond, r=_time_vec(r, B, x))


def student_solve(student, b: CFMBatch, noise: torch.Tensor, n_steps: int) -> torch.Tensor:
    """``n_steps`` MeanFlow steps on the linear grid (differentiable unless under no_grad)."""
    times = student_times(n_steps, device=noise.device, dtype=noise.dtype)
    x = noise
    for i in range(n_steps):
        t, r = times[i], times[i + 1]
        x = x + (r - t) * student_velocity(student, x, t, r, b)
    return x


def interpolate_trajectory(states: torch.Tensor, times: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """State of the teacher's Euler trajectory at per-example times ``t`` (shape (B,)).

    An Euler solution is exactly piecewise linear in time between its grid points, so linear
    interpolation of the stored states *is* the teacher's path at any ``t`` (no extra teacher
    calls). ``states``: (K+1, B, C, T) with ``times`` (K+1,) increasing from 0 to 1.
    """
    K = times.numel() - 1
    t = t.to(times.dtype).clamp(0, 1)
    i = torch.searchsorted(times, t, right=True).clamp(1, K) - 1  # segment index
    t0, t1 = times[i], times[i + 1]
    w = ((t - t0) / (t1 - t0)).view(-1, 1, 1)
    bidx = torch.arange(t.numel(), device=states.device)
    return states[i, bidx] * (1 - w) + states[i + 1, bidx] * w


def masked_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example mean absolute difference over the frames where ``mask`` is 1: (B,)."""
    num = ((a - b).abs() * mask).sum(dim=(1, 2))
    den = mask.sum(dim=(1, 2)).clamp_min(1) * a.shape[1]
    return num / den


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared difference over the frames where ``mask`` is 1: (B,)."""
    num = ((a - b).pow(2) * mask).sum(dim=(1, 2))
    den = mask.sum(dim=(1, 2)).clamp_min(1) * a.shape[1]
    return num / den
