"""The library rows of ``cbx bench quant``: torchao, bitsandbytes and optimum-quanto beside ours.

Why a per-layer measurement for T3: most library kernels on a CPU dequantize the whole weight
on every call (10-100x slower than a bf16 GEMV here), so a full forced decode of the 520M T3
per library would take many minutes each. What a decode step spends in its linear layers is
the part quantization changes, and it can be timed exactly: one layer of each distinct T3
linear shape (attention 1024x1024, MLP up 4096x1024, MLP down 1024x4096, speech head
8194x1024) is quantized by the registered transform and called on the step's two rows (the
utterance and its CFG pair), and each time is weighted by how many such layers one step runs
(30 layers x 4 / 2 / 1, and the head). bf16, our int8/int4 and every library run through the
same measurement, timed round-robin in one process, so the ratios compare like with like.

T3's resident weight bytes per method: the quantized layers measured on those same layers
(weighted the same way) plus the rest of T3 (norms, conditioning encoder, embeddings, position
embeddings) in bf16, as the engine holds it. Library transforms leave token embeddings in
floating point, ours quantize them, and the byte figure says so.

A method that cannot run here is printed as skipped with its one-line refusal.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from cbx.compress.accuracy import _Holder
from cbx.compress.size import weight_bytes
from cbx.errors import CbxError

# (label, transform, params); "bf16" and "fp32" are the unquantized layers. Labels match the
# SQNR sweep's (cbx.compress.accuracy) through SWEEP_LABEL.
T3_METHODS = (
    ("int8 (cbx)", "int8_weight_only", {}),
    ("int4 (cbx)", "int4_weight_only", {"group_size": 128}),
    ("torchao_int8_weight_only", "torchao_int8_weight_only", {}),
    ("torchao_awq_int8", "torchao_awq_int8", {}),
    ("torchao_int8_dynamic", "torchao_int8_dynamic", {}),
    ("torchao_int4_weight_only", "torchao_int4_weight_only", {"group_size": 128}),
    ("torchao_awq_int4", "torchao_awq_int4", {"group_size": 128}),
    ("torchao_float8_weight_only", "torchao_float8_weight_only", {}),
    ("torchao_float8_dynamic", "torchao_float8_dynamic", {}),
    ("bnb_int8", "bnb_int8", {}),
    ("bnb_nf4", "bnb_nf4", {}),
    ("bnb_nf4 double_quant", "bnb_nf4", {"double_quant": True}),
    ("bnb_fp4", "bnb_fp4", {}),
    ("quanto_qint8", "quanto_qint8", {}),
    ("quanto_qint4", "quanto_qint4", {}),
    ("quanto_qfloat8", "quanto_qfloat8", {}),
    ("quanto_w8a8", "quanto_w8a8", {}),
)
SWEEP_LABEL = {"int8 (cbx)": "int8_weight_only", "int4 (cbx)": "int4_weight_only g128",
               "torchao_int4_weight_only": "torchao_int4_weight_only g128",
               "torchao_awq_int4": "torchao_awq_int4 g128"}
# CFM estimator rows (joined to the bench's interleaved fp32/bf16/fp8 CFM set)
CFM_METHODS = (
    ("torchao_float8_weight_only", "torchao_float8_weight_only", {}),
    ("torchao_float8_dynamic", "torchao_float8_dynamic", {}),
    ("torchao_int8_dynamic", "torchao_int8_dynamic", {}),
    ("quanto_qfloat8", "quanto_qfloat8", {}),
)
CFM_TARGETS = ["s3gen.flow.decoder.estimator.*"]


def t3_linear_shapes(t3) -> list[tuple[str, int, int, int]]:
    """``(example name, out, in, count per decode step)`` for each distinct linear shape of T3's
    transformer blocks and speech head (the layers a decode step multiplies by)."""
    from cbx.compress.modules import is_linear, linear_weight

    counts: dict[tuple[int, int], list] = {}
    for name, mod in t3.tfmr.named_modules():
        if is_linear(mod):
            n, k = linear_weight(mod).shape
            counts.setdefault((n, k), [f"tfmr.{name}", 0])[1] += 1
    n, k = linear_weight(t3.speech_head).shape
    counts.setdefault((n, k), ["speech_head", 0])[1] += 1
    return [(ex, n, k, c) for (n, k), (ex, c) in counts.items()]


def _layer(n: int, k: int, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        lin.bias.zero_()
    return lin.eval()


def _quantize_layer(lin: nn.Linear, transform: str, params: dict) -> nn.Module:
    from cbx.compress.registry import apply_transforms, build_config

    def calib():  # for transforms calibrated on activations (quanto_w8a8, AWQ): rows like the timed inputs
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(256, lin.in_features, generator=gen).to(lin.weight.device) for _ in range(2)]

    holder = _Holder(copy.deepcopy(lin), calib=calib)
    apply_transforms(holder, [(transform, build_config(transform, {**params, "targets": ["layer"]}))])
    return holder.layer


def t3_linear_rows(model, repeats: int, log=print):
    """``(rows, skipped)``: rows ``(label, step seconds in linears, T3 resident bytes,
    kernel path)``, fp32 first; skipped ``(label, reason)``."""
    t3 = model.t3
    shapes = t3_linear_shapes(t3)
    # bytes of T3 outside the measured linears, as the engine holds it (bf16)
    lin_names = set()
    from cbx.compress.modules import is_linear

    for name, mod in t3.named_modules():
        if is_linear(mod) and (name.startswith("tfmr.") or name == "speech_head"):
            lin_names.add(name)
    # storages, not modules: after a decode the engine's fused q/k/v and gate/up projections hold
    # the weights and the parts view them, so per-module counts would count them twice
    lin_ptrs = {t.untyped_storage().data_ptr() for n in lin_names
                for t in t3.get_submodule(n).state_dict(keep_vars=True).values() if torch.is_tensor(t) and t.numel()}
    rest_bf16, seen = 0, set()  # the rest of T3 as the engine holds it: floats in bf16
    for t in t3.state_dict(keep_vars=True).values():
        if not torch.is_tensor(t) or not t.numel():
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in lin_ptrs and ptr not in seen:
            seen.add(ptr)
            nbytes = t.untyped_storage().nbytes()
            rest_bf16 += nbytes * 2 // t.element_size() if t.is_floating_point() else nbytes
    emb_bf16 = (weight_bytes(t3.speech_emb) + weight_bytes(t3.text_emb)) // 2

    device = next(t3.parameters()).device
    layers = {(n, k): _layer(n, k, seed=i).to(device) for i, (_, n, k, _) in enumerate(shapes)}
    variants: dict[str, dict] = {"fp32": layers, "bf16": {s: copy.deepcopy(m).to(torch.bfloat16)
                                                            for s, m in layers.items()}}
    extra_bytes = {"fp32": 0, "bf16": 0}
    skipped = []
    for label, transform, params in T3_METHODS:
        log(f"  preparing T3 linears {label} ...")
        mods, failed = {}, {}
        for s, m in layers.items():
            try:
                mods[s] = _quantize_layer(m, transform, params)
            except CbxError as e:
                failed[s] = str(e)
        if len(failed) == len(layers) or any("needs" in why for why in failed.values()):
            skipped.append((label, next(iter(failed.values()))))
            continue
        for s in failed:  # a shape the library cannot take stays bf16, as the transform leaves it
            log(f"  {label}: {s[0]}x{s[1]} left in bf16 ({failed[s]})")
            mods[s] = variants["bf16"][s]
        variants[label] = mods
        # ours quantize the two token embeddings too (int8/int4 row storage)
        extra_bytes[label] = -emb_bf16 // (2 if "int8" in label else 4) if label.endswith("(cbx)") else 0
    gen = torch.Generator().manual_seed(0)
    inputs = {(n, k): torch.randn(2, k, generator=gen).to(device) for (_, n, k, _) in shapes}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_call(m, x):
        if type(m) is nn.Linear:
            x = x.to(m.weight.dtype)
        with torch.inference_mode():
            m(x)

    # time each shape per variant, round-robin over variants, median over repeats
    times = {label: {s: [] for s in layers} for label in variants}
    for label, mods in variants.items():  # warm-up (first-call repacking, lazy inits)
        for s, m in mods.items():
            one_call(m, inputs[s])
    log(f"  timing {len(variants)} x {len(shapes)} T3 linear shapes x {repeats} (interleaved) ...")
    inner = 3
    for _ in range(repeats):
        for label, mods in variants.items():
            for s, m in mods.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(inner):
                    one_call(m, inputs[s])
                sync()
                times[label][s].append((time.perf_counter() - t0) / inner)
    rows = []
    for label, mods in variants.items():
        step = sum(statistics.median(times[label][(n, k)]) * c for (_, n, k, c) in shapes)
        lin_bytes = sum(weight_bytes(mods[(n, k)]) * c for (_, n, k, c) in shapes)
        rest = rest_bf16 * (2 if label == "fp32" else 1) + extra_bytes[label]
        paths = sorted({getattr(m, "cbx_kernel", None) or ("fp32" if label == "fp32" else "bf16")
                        for m in mods.values()})
        rows.append((label, step, lin_bytes + rest, ",".join(paths)))
    return rows, skipped


def cfm_library_estimators(est32, variant: str):
    """``({label: quantized estimator}, skipped)`` for :data:`CFM_METHODS`."""
    from cbx.compress.registry import apply_transforms, build_config

    out, skipped = {}, []
    for label, transform, params in CFM_METHODS:
        holder = _EstHolder(copy.deepcopy(est32), variant)
        try:
            apply_transforms(holder, [(transform, build_config(transform, {**params, "targets": CFM_TARGETS}))])
        except CbxError as e:
            skipped.append((label, str(e)))
            continue
        out[label] = holder.s3gen.flow.decoder.estimator
    return out, skipped


class _EstHolder(nn.Module):
    def __init__(self, est, variant):
        super().__init__()
        self.s3gen = nn.Module()
        self.s3gen.flow = nn.Module()
        self.s3gen.flow.decoder = nn.Module()
        self.s3gen.flow.decoder.estimator = est
        self.variant, self.meta = variant, {}


def print_linear_table(rows, skipped, sqnr: dict[str, float] | None = None) -> None:
    base_t, base_b = rows[0][1], rows[0][2]
    print("\nT3 linear layers of one decode step, batch 2 (CFG): one layer per shape, weighted by count; "
          "T3 weights = those layers + the rest of T3 in bf16")
    print(f"{'variant':<28} {'ms/step':>8} {'speed-up':>9} {'weights GB':>11} {'vs fp32':>8} {'SQNR dB':>8}  kernel")
    for label, t, b, path in rows:
        s = (sqnr or {}).get(SWEEP_LABEL.get(label, label))
        s = f"{s:>8.2f}" if s is not None else f"{'-':>8}"
        print(f"{label:<28} {t * 1e3:>8.2f} {base_t / t:>8.2f}x {b / 1e9:>11.3f} {b / base_b:>7.2f}x {s}  {path}")
    for label, why in skipped:
        print(f"{label:<28} skipped: {why}")
