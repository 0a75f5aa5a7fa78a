"""Accuracy of every quantizer side by side: output SQNR on T3-shaped layers with outliers.

Why: the leaderboard answers "what does it cost in WER", but choosing between the workbench's
own RTN/GPTQ and torchao / bitsandbytes / optimum-quanto at one bit-width starts with a cheaper
question: how close is each implementation's layer output to the float layer on T3's real
shapes? One sweep answers it, used by the test (per-method SQNR bounds) and printed by
``cbx bench quant``.

Each layer is a random ``nn.Linear`` of a real T3 shape with *planted outlier channels*: a few
input channels whose weights are 8x larger and whose activations are 20x larger (the pattern
LLM.int8() was built for). The activations are random normal rows with those channels scaled;
SQNR (dB, torchao's ``compute_error``) compares ``X @ W.T`` in float32 with the quantized
module's output on the same ``X`` (the module casts to its compute dtype, bf16 by default, as
it does in the engine). GPTQ, torchao's AWQ and quanto_w8a8's static activation scales calibrate on a separate
draw of the same distribution.

Every method goes through its registered transform (the same code the experiments run), except
GPTQ, which needs a Hessian: it is fitted here with the workbench's own ``gptq_quantize``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch import nn

from cbx.compress.primitives import sqnr_db
from cbx.errors import CbxError

# (out_features, in_features) of T3's (Llama 520M) linear layers: attention, MLP up, MLP down.
T3_SHAPES = ((1024, 1024), (4096, 1024), (1024, 4096))
OUTLIER_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class SweepMethod:
    label: str  # the transform name (+ a variant suffix)
    library: str  # cbx | torchao | bitsandbytes | optimum-quanto
    bits: str  # "8" | "4" | "fp8"
    transform: str
    params: dict = dataclasses.field(default_factory=dict)
    gptq: bool = False


SWEEP_METHODS = (
    SweepMethod("int8_weight_only", "cbx", "8", "int8_weight_only"),
    SweepMethod("int8_weight_only gptq", "cbx", "8", "int8_weight_only", gptq=True),
    SweepMethod("torchao_int8_weight_only", "torchao", "8", "torchao_int8_weight_only"),
    SweepMethod("torchao_awq_int8", "torchao", "8", "torchao_awq_int8"),
    SweepMethod("torchao_int8_dynamic", "torchao", "8", "torchao_int8_dynamic"),
    SweepMethod("bnb_int8", "bitsandbytes", "8", "bnb_int8"),
    SweepMethod("quanto_qint8", "optimum-quanto", "8", "quanto_qint8"),
    SweepMethod("quanto_w8a8", "optimum-quanto", "8", "quanto_w8a8"),
    SweepMethod("int4_weight_only g128", "cbx", "4", "int4_weight_only", {"group_size": 128}),
    SweepMethod("int4_weight_only g128 gptq", "cbx", "4", "int4_weight_only", {"group_size": 128}, gptq=True),
    SweepMethod("torchao_int4_weight_only g128", "torchao", "4", "torchao_int4_weight_only", {"group_size": 128}),
    SweepMethod("torchao_awq_int4 g128", "torchao", "4", "torchao_awq_int4", {"group_size": 128}),
    SweepMethod("bnb_nf4", "bitsandbytes", "4", "bnb_nf4"),
    SweepMethod("bnb_nf4 double_quant", "bitsandbytes", "4", "bnb_nf4", {"double_quant": True}),
    SweepMethod("bnb_fp4", "bitsandbytes", "4", "bnb_fp4"),
    SweepMethod("quanto_qint4", "optimum-quanto", "4", "quanto_qint4"),
    SweepMethod("fp8_cfm", "cbx", "fp8", "fp8_cfm"),
    SweepMethod("torchao_float8_weight_only", "torchao", "fp8", "torchao_float8_weight_only"),
    SweepMethod("torchao_float8_dynamic", "torchao", "fp8", "torchao_float8_dynamic"),
    SweepMethod("quanto_qfloat8", "optimum-quanto", "fp8", "quanto_qfloat8"),
)


@dataclasses.dataclass
class SweepRow:
    method: SweepMethod
    sqnr_db: dict  # shape "NxK" -> dB
    seconds: float = 0.0
    skipped: str = ""  # the one-line reason when the method cannot run here


def outlier_layer(out_features: int, in_features: int, seed: int = 0, tokens: int = 64):
    """``(layer, x_eval, calib)``: a float32 ``nn.Linear`` (with bias) with planted outlier
    input channels, activations that carry the same outliers, and ``calib(n)`` drawing ``n``
    more rows of them (GPTQ needs more calibration rows than inputs, or it fits a subspace;
    ``calib(n, generator)`` draws from another stream, leaving GPTQ's draws as they are)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    n_out = max(1, int(in_features * OUTLIER_FRACTION))
    idx = torch.randperm(in_features, generator=g)[:n_out]
    w[:, idx] *= 8.0
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.randn(out_features, generator=g) * 0.01)

    def acts(n, generator=None):
        x = torch.randn(n, in_features, generator=generator or g)
        x[:, idx] *= 20.0
        return x

    return layer.eval(), acts(tokens), acts


class _Holder(nn.Module):
    """One layer as a model (``targets: [layer]``). ``calib``: batches of the layer's input, run
    by ``calibration_pass()`` for transforms that calibrate on activations (quanto_w8a8, torchao AWQ)."""

    def __init__(self, layer, calib=None):
        super().__init__()
        self.layer = layer
        self.variant, self.meta = "original", {}
        if calib is not None:
            def calibration_pass():
                with torch.inference_mode():
                    for x in calib():
                        self.layer(x)
            self.calibration_pass = calibration_pass


def _quantized(method: SweepMethod, layer: nn.Linear, x_calib) -> nn.Module:
    import copy

    from cbx.compress.registry import apply_transforms, build_config

    def calib():  # activation calibration: 4 batches of 256 rows of the distribution, own stream
        gen = torch.Generator().manual_seed(1)
        return [x_calib(256, gen) for _ in range(4)]

    holder = _Holder(copy.deepcopy(layer), calib=calib)
    if method.gptq:
        return _gptq(method, holder.layer, x_calib)
    apply_transforms(holder, [(method.transform, build_config(method.transform, {**method.params,
                                                                                   "targets": ["layer"]}))])
    return holder.layer


def _gptq(method: SweepMethod, layer: nn.Linear, x_calib) -> nn.Module:
    from cbx.compress.gptq import HessianAccumulator, gptq_quantize
    from cbx.compress.modules import Int4Linear, Int8Linear

    acc = HessianAccumulator(layer.in_features)
    for _ in range(2 * layer.in_features // 1024 or 1):
        acc.add(x_calib(1024))
    if method.bits == "8":
        q, s = gptq_quantize(layer.weight.detach(), acc.h, bits=8)
        return Int8Linear(q, s, layer.bias)
    g = method.params.get("group_size", 128)
    codes, s, z = gptq_quantize(layer.weight.detach(), acc.h, bits=4, group_size=g)
    return Int4Linear(codes, s, z, g, layer.bias)


def run_sweep(shapes=T3_SHAPES, methods=SWEEP_METHODS, seed: int = 0,
              progress: Callable[[str], None] | None = None, device: str | torch.device = "cpu") -> list[SweepRow]:
    """SQNR of every method on every shape (layers and activations on ``device``); a method
    that refuses here is a skipped row."""
    rows = {m.label: SweepRow(m, {}) for m in methods}
    for k, (n, kk) in enumerate(shapes):
        layer, x, calib = outlier_layer(n, kk, seed=seed + k)
        layer, x = layer.to(device), x.to(device)

        def x_calib(rows_, generator=None, calib=calib):
            return calib(rows_, generator).to(device)

        with torch.inference_mode():
            ref = layer(x)
        for m in methods:
            row = rows[m.label]
            if row.skipped:
                continue
            if progress:
                progress(f"{m.label} {n}x{kk}")
            t0 = time.perf_counter()
            try:
                q = _quantized(m, layer, x_calib)
            except CbxError as e:
                row.skipped = str(e)
                continue
            with torch.inference_mode():
                y = q(x)
            row.seconds += time.perf_counter() - t0
            row.sqnr_db[f"{n}x{kk}"] = sqnr_db(ref, y.float())
    return list(rows.values())


def render(rows: list[SweepRow]) -> str:
    """The sweep as a fixed-width table, one row per method, grouped by bit-width."""
    shapes = sorted({s for r in rows for s in r.sqnr_db}, key=lambda s: tuple(map(int, s.split("x"))))
    head = f"{'bits':<4} {'method':<30} {'library':<15}" + "".join(f" {s:>10}" for s in shapes)
    lines = [head]
    for r in rows:
        m = r.method
        if r.skipped:
            lines.append(f"{m.bits:<4} {m.label:<30} {m.library:<15} skipped: {r.skipped}")
            continue
        lines.append(f"{m.bits:<4} {m.label:<30} {m.library:<15}"
                     + "".join(f" {r.sqnr_db.get(s, float('nan')):>10.2f}" for s in shapes))
    return "\n".join(lines)
