"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, so the *output* error on calibration data is what gets minimised.

Written from the paper's algorithm (with the lazy block updates and the Cholesky form of the
inverse Hessian), in the shape of gpt-fast's ``GPTQ.py``. Two details differ from the widely
copied reference code, on purpose:

* group parameters (int4 scale/zero) are fitted on the weights *as updated so far*, including
  updates made earlier inside the same block (the reference code reads stale columns when the
  group is smaller than the block);
* int4 scale and zero are rounded to bfloat16 before any code is chosen, as in
  :mod:`cbx.compress.primitives`, so the stored parameters are the ones the error feedback saw.

The Hessian ``H = 2/n * sum(x x^T)`` comes from :class:`HessianAccumulator`, filled by forward
hooks during calibration (see :mod:`cbx.compress.calibration`).

Device: everything runs where the layer's inputs and weight live (the Hessian is allocated on
the device of the first activations it sees, the solve runs on the weight's device) and the
codes come back on the weight's device, so a CUDA model is quantized on the GPU and its int4
module packs them for the GPU kernel; no tensor crosses devices inside the loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cbx.compress import primitives as P


class HessianAccumulator:
    """Running ``2/n * X^T X`` of a layer's inputs (rows = tokens), in float64 for stability."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = int(in_features)
        # Allocated on the device of the first inputs unless given (a CUDA layer's Hessian stays on its GPU).
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if device else None
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.h is None:
            self.h = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        x = x.to(device=self.h.device, dtype=torch.float64)
        m = x.shape[0]
        if m == 0:
            return
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.t() @ x


def _inverse_hessian_factor(h: Tensor, w: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w = w.clone()
    w[:, dead] = 0.0
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    h += damp * torch.mean(torch.diag(h)) * eye
    # Raise damping until the Cholesky factorisation succeeds (near-singular Hessians from
    # few calibration tokens).
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h)
            break
        except RuntimeError:
            h += (10**attempt) * damp * torch.mean(torch.diag(h)) * eye
    else:
        raise RuntimeError("GPTQ: Hessian is not positive definite even with heavy damping")
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True), w


def gptq_quantize(
    w: Tensor,
    h: Tensor,
    *,
    bits: int,
    group_size: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[Tensor, ...]:
    """GPTQ of ``w[N, K]`` given the input Hessian ``h[K, K]``.

    ``bits=4`` returns ``(codes uint8[N, K], scale bf16[N, K/G], zero bf16[N, K/G])`` in the
    int4 convention of :mod:`cbx.compress.primitives`; ``bits=8`` returns
    ``(q int8[N, K], scale float32[N])`` (per-channel symmetric; scales from the original rows).
    """
    if bits not in (4, 8):
        raise ValueError(f"GPTQ supports 4 or 8 bits, got {bits}")
    n, k = w.shape
    if bits == 4:
        P._check_group(k, group_size)
        block_size = max(block_size // group_size, 1) * group_size
    device = w.device
    if h is None:
        raise ValueError("GPTQ: the Hessian saw no inputs (was the layer run during calibration?)")
    hinv, wf = _inverse_hessian_factor(h.to(device), w.detach().double(), damp)
    q_out = torch.zeros(n, k, dtype=torch.float64, device=device)
    if bits == 8:
        _, scale8 = P.quantize_int8_per_channel(w)
        s8 = scale8.double()[:, None]
    else:
        scales = torch.zeros(n, k // group_size, dtype=torch.bfloat16, device=device)
        zeros = torch.zeros_like(scales)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wf[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if bits == 4 and col % group_size == 0:
                g = col // group_size
                _, s, z = P.quantize_int4_groupwise(w1[:, i : i + group_size].float(), group_size)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                sf, zf = s[:, 0].double(), z[:, 0].double()
            x = w1[:, i]
            if bits == 4:
                code = torch.round((x - zf) / sf + 8.0).clamp_(0, 15)
                deq = (code - 8.0) * sf + zf
                q_out[:, col] = code
            else:
                code = torch.round(x / s8[:, 0]).clamp_(-127, 127)
                deq = code * s8[:, 0]
                q_out[:, col] = code
            e = (x - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        wf[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if bits == 8:
        return q_out.to(torch.int8), scale8
    return q_out.to(torch.uint8), scales, zeros
