"""Training objectives for the few-step student, each a config dataclass plus one loss function.

Registered by name like the compression transforms (``@register_objective(name, Config)``), so
a training config names the objective and gives its parameters and unknown keys are rejected.
A loss function takes ``(student, batch, config, generator)`` and returns a scalar; all its
randomness comes from ``generator``, which the trainer seeds from (seed, step, micro-batch,
rank) so that a resumed run draws exactly what an uninterrupted one would.

The targets are the teacher's: its 10-step CFG endpoint (``batch.target``) and, for the
average-velocity objective, its Euler trajectory (``batch.states`` at ``batch.times``), both
recorded by :mod:`cbx.distill.data`. Losses are taken on the generated frames only (the prompt
region of the CFM output is cut away at inference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from cbx.distill.flow import (CFMBatch, interpolate_trajectory, masked_l1, masked_mse,
                              student_solve, student_times, student_velocity)
from cbx.errors import CbxError


@dataclass
class TrainBatch:
    inputs: CFMBatch
    noise: torch.Tensor  # (B, 80, T)
    target: torch.Tensor  # (B, 80, T) teacher endpoint
    states: torch.Tensor | None = None  # (K+1, B, 80, T) teacher trajectory, noise .. target
    times: torch.Tensor | None = None  # (K+1,)


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    config_cls: type
    fn: Callable[[torch.nn.Module, TrainBatch, Any, torch.Generator], torch.Tensor]
    needs_trajectory: bool
    doc: str


_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, config_cls: type, needs_trajectory: bool = False):
    def deco(fn):
        _OBJECTIVES[name] = ObjectiveSpec(name, config_cls, fn, needs_trajectory, (fn.__doc__ or "").strip())
        return fn

    return deco


def objectives() -> dict[str, ObjectiveSpec]:
    return dict(_OBJECTIVES)


def get_objective(name: str) -> ObjectiveSpec:
    if name not in _OBJECTIVES:
        raise CbxError(f"objective.name: unknown objective {name!r}; valid choices: {', '.join(sorted(_OBJECTIVES))}")
    return _OBJECTIVES[name]


def _distance(kind: str):
    return masked_l1 if kind == "l1" else masked_mse


def _check_steps(steps: tuple[int, ...], what: str) -> None:
    if not steps or any((not isinstance(s, int)) or s < 1 for s in steps):
        raise ValueError(f"{what}.steps must be a non-empty list of positive integers, got {list(steps)}")


# --------------------------------------------------------------------------- endpoint


@dataclass(frozen=True)
class EndpointConfig:
    """Regress the student's k-step output onto the teacher's endpoint, for each k in ``steps``."""

    steps: tuple[int, ...] = (1, 2)
    loss: Literal["l1", "mse"] = "l1"

    def __post_init__(self):
        _check_steps(self.steps, "objective.params")


@register_objective("endpoint", EndpointConfig)
def endpoint_loss(student, batch: TrainBatch, cfg: EndpointConfig, gen: torch.Generator) -> torch.Tensor:
    """Direct distillation of the sampler (Luhman & Luhman, "Knowledge distillation in iterative
    generative models", arXiv 2101.02388): the student, run for k steps from the teacher's noise,
    is trained to land on the teacher's multi-step output for that noise, back-propagating
    through all k steps. Each k in ``steps`` contributes equally, so one student serves every
    step count it is evaluated at. Needs only (noise, endpoint) pairs."""
    dist = _distance(cfg.loss)
    m = batch.inputs.out_mask
    total = 0.0
    for k in cfg.steps:
        x = student_solve(student, batch.inputs, batch.noise, k)
        total = total + dist(x, batch.target, m).mean()
    return total / len(cfg.steps)


# --------------------------------------------------------------------------- IntMeanFlow


@dataclass(frozen=True)
class IntMeanFlowConfig:
    """Average velocity over (t, r) intervals of the teacher's own trajectory."""

    steps: tuple[int, ...] = (1, 2)  # the student's inference grids, sampled with p_inference
    p_inference: float = 0.5  # share of examples whose (t, r) is an interval of those grids
    loss: Literal["l1", "mse"] = "mse"

    def __post_init__(self):
        _check_steps(self.steps, "objective.params")
        if not (0.0 <= self.p_inference <= 1.0):
            raise ValueError(f"objective.params.p_inference must be in [0, 1], got {self.p_inference}")


def sample_intervals(B: int, cfg: IntMeanFlowConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) per example with t < r: uniform pairs, or with probability ``p_inference`` one
    interval of a student inference grid (the pairs the student is actually asked about)."""
    a, b = torch.rand(B, generator=gen), torch.rand(B, generator=gen)
    t, r = torch.minimum(a, b), torch.maximum(a, b)
    grid_iv = []
    for k in cfg.steps:
        g = student_times(k)
        grid_iv += [(float(g[i]), float(g[i + 1])) for i in range(k)]
    iv = torch.tensor(grid_iv)
    pick = torch.randint(len(grid_iv), (B,), generator=gen)
    use_grid = torch.rand(B, generator=gen) < cfg.p_inference
    t = torch.where(use_grid, iv[pick, 0], t)
    r = torch.where(use_grid, iv[pick, 1], r)
    # Equal draws would give a 0/0 target; a uniform pair that close carries no signal anyway.
    r = torch.maximum(r, t + 1e-3).clamp(max=1.0)
    t = torch.minimum(t, r - 1e-3)
    return t, r


@register_objective("intmeanflow", IntMeanFlowConfig, needs_trajectory=True)
def intmeanflow_loss(student, batch: TrainBatch, cfg: IntMeanFlowConfig, gen: torch.Generator) -> torch.Tensor:
    """Integral velocity distillation (IntMeanFlow, Wang et al., arXiv 2510.07979), the MeanFlow
    objective (Geng et al., arXiv 2505.13447) with its target taken from a teacher instead of a
    Jacobian-vector product: the average velocity over ``[t, r]`` is ``(z_r - z_t) / (r - t)``
    where ``z_t -> z_r`` is the teacher's CFG solution. IntMeanFlow integrates the teacher on the
    fly; here the teacher's 10-step Euler trajectory is recorded once and read at any time by
    exact piecewise-linear interpolation (:func:`cbx.distill.flow.interpolate_trajectory`), so
    training calls no teacher and the targets are consistent with the recorded endpoint."""
    if batch.states is None:
        raise CbxError("objective intmeanflow needs the teacher trajectory: set data.trajectory: true")
    B = batch.noise.shape[0]
    t, r = sample_intervals(B, cfg, gen)
    t, r = t.to(batch.noise.device, batch.noise.dtype), r.to(batch.noise.device, batch.noise.dtype)
    z_t = interpolate_trajectory(batch.states, batch.times, t)
    z_r = interpolate_trajectory(batch.states, batch.times, r)
    target = (z_r - z_t) / (r - t).view(-1, 1, 1)
    u = student_velocity(student, z_t, t, r, batch.inputs)
    return _distance(cfg.loss)(u, target, batch.inputs.out_mask).mean()


# --------------------------------------------------------------------------- both


@dataclass(frozen=True)
class MixedConfig:
    """Weighted sum of the endpoint and IntMeanFlow losses."""

    endpoint_weight: float = 1.0
    intmeanflow_weight: float = 1.0
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    intmeanflow: IntMeanFlowConfig = field(default_factory=IntMeanFlowConfig)

    def __post_init__(self):
        if self.endpoint_weight < 0 or self.intmeanflow_weight < 0:
            raise ValueError("objective.params: weights must be >= 0")


@register_objective("mixed", MixedConfig, needs_trajectory=True)
def mixed_loss(student, batch: TrainBatch, cfg: MixedConfig, gen: torch.Generator) -> torch.Tensor:
    """Endpoint distillation (arXiv 2101.02388) plus IntMeanFlow (arXiv 2510.07979): the first
    pins the k-step outputs that are used, the second teaches average velocities over every
    interval of the teacher's path, which regularizes the first with many more targets."""
    loss = 0.0
    if cfg.endpoint_weight:
        loss = loss + cfg.endpoint_weight * endpoint_loss(student, batch, cfg.endpoint, gen)
    if cfg.intmeanflow_weight:
        loss = loss + cfg.intmeanflow_weight * intmeanflow_loss(student, batch, cfg.intmeanflow, gen)
    return loss
