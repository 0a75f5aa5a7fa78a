"""Fused q/k/v and gate/up projections and the decode-step attention of the T3 decoder.

What must hold: a fused module computes exactly its parts' outputs side by side; the parts keep
working and their weights are not held twice (views of the fused storage, the model's weight
count unchanged); a layout whose rows cannot be stacked is refused, not garbled; decoding with
the fusion gives the tokens decoding without it gives; the decode attention equals SDPA.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbx.compress.modules import Int4Linear, Int8Linear
from cbx.compress.registry import apply_transforms, build_config
from cbx.compress.size import weight_bytes
from cbx.engine import t3_decode as td


def _linears(outs, k=128, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for n in outs:
        lin = nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
            if bias:
                lin.bias.copy_(torch.randn(n, generator=g))
        mods.append(lin)
    return mods


def _shares_storage(part: torch.Tensor, whole: torch.Tensor) -> bool:
    return part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["linear-fp32", "linear-bf16", "int8", "int4"])
def test_fused_module_equals_its_parts_and_holds_the_weights_once(kind):
    outs = (128, 64, 64) if kind != "int4" else (128, 128, 128)
    floats = _linears(outs, bias=kind == "int8")
    if kind == "linear-bf16":
        floats = [m.to(torch.bfloat16) for m in floats]
    mods = {"int8": lambda m: Int8Linear.from_float(m), "int4": lambda m: Int4Linear.from_float(m, 32)}.get(
        kind, lambda m: m)
    parts = [mods(m) for m in floats]
    holder = nn.ModuleList(parts)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    if kind == "linear-bf16":
        x = x.to(torch.bfloat16)
    with torch.no_grad():
        before = [p(x) for p in parts]
        bytes_before = weight_bytes(holder)
        fused = td.fuse_linears(parts)
        assert fused is not None
        y = fused(x)
        after = [p(x) for p in parts]
    assert y.shape == (3, sum(outs))
    exact = kind in ("int8", "int4")  # same kernel, rows independent: bit-identical
    ref = torch.cat(before, dim=-1)
    if exact:
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-2 if kind == "linear-bf16" else 1e-5, atol=1e-5)
    for a, b in zip(before, after):  # the parts still compute what they did
        assert torch.equal(a, b)
    whole = fused.weight
    assert all(_shares_storage(p.weight, whole) for p in parts)
    assert weight_bytes(holder) == bytes_before  # nothing held twice


def test_int4_rows_that_do_not_fill_kernel_blocks_are_not_fused():
    # The tiny model's k/v projections (32 rows) do not fill the CPU kernel's row blocks: stacking
    # the packed layouts would mix rows. The probe check must refuse, leaving the parts intact.
    parts = [Int4Linear.from_float(m, 32) for m in _linears((64, 32, 32))]
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = torch.cat([p(x) for p in parts], -1)
        fused = td.fuse_linears(parts)
        after = torch.cat([p(x) for p in parts], -1)
    if fused is not None:  # a CPU whose kernel blocks are 16 rows fuses these legitimately
        assert torch.equal(fused(x), before)
    assert torch.equal(before, after)


def test_mixed_or_mismatched_parts_are_not_fused():
    a, b = _linears((64, 64))
    assert td.fuse_linears([a, Int8Linear.from_float(b)]) is None
    c = nn.Linear(96, 64)
    assert td.fuse_linears([a, c]) is None  # different inputs
    assert td.fuse_linears([Int8Linear.from_float(a), Int8Linear.from_float(b, compute_dtype="float32")]) is None


@pytest.mark.parametrize("transform", [None, "int8_weight_only", "int4_weight_only"])
def test_decoding_with_fused_projections_gives_the_same_tokens(tiny_model, transform, monkeypatch):
    model = copy.deepcopy(tiny_model)
    if transform:
        apply_transforms(model, [(transform, build_config(transform, {}))])
    t3 = model.t3 if transform is None else model.t3.to(torch.bfloat16)
    rows = [td.T3Row([1, 5, 9, 14, 2], model.builtin_conds.t3, 0), td.T3Row([1, 7, 2], model.builtin_conds.t3, 1)]
    settings = td.DecodeSettings(force_tokens=24, temperature=0)
    fused = td.generate(t3, rows, settings)
    plan = td.fusion_plan(t3)
    assert plan is not None and all(layer.gate_up is not None for layer in plan)
    n_fused = sum((layer.qkv is not None) + (layer.gate_up is not None) for layer in plan)
    monkeypatch.setattr(td, "fusion_plan", lambda t3: None)
    plain = td.generate(t3, rows, settings)
    for a, b in zip(fused.tokens, plain.tokens):
        assert torch.equal(a, b)
    assert n_fused >= len(plan)
    if transform:
        # the parts report the kernel their fused module ran (kernel-path recording)
        gate = t3.tfmr.layers[0].mlp.gate_proj
        assert getattr(gate, "cbx_kernel", None) in ("int8pack-cpu", "int4pack-cpu")


@pytest.mark.parametrize("under_autocast", [False, True])
def test_float32_kv_cache_gives_the_bf16_cache_tokens(tiny_model, monkeypatch, under_autocast):
    # A bf16 T3 on CPU keeps its KV cache in float32 (td.kv_cache_dtype): the same values as a
    # bf16 cache, read without widening, so sampling draws the same tokens.
    model = copy.deepcopy(tiny_model)
    apply_transforms(model, [("int4_weight_only", build_config("int4_weight_only", {}))])
    t3 = model.t3.to(torch.bfloat16)
    cond = model.builtin_conds.t3
    rows = [td.T3Row([1, 5, 9, 14, 2], cond, 3), td.T3Row([1, 7, 2], cond, 4)]
    settings = td.DecodeSettings(force_tokens=24)
    made = []

    class Spy(td.StaticKVCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self.k[0].dtype)

    monkeypatch.setattr(td, "StaticKVCache", Spy)

    def run():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if under_autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            return td.generate(t3, rows, settings)

    wide = run()
    made_wide = set(made)
    made.clear()
    monkeypatch.setattr(td, "kv_cache_dtype", lambda dtype, device: dtype)
    narrow = run()
    assert made_wide == {torch.float32} and set(made) == {torch.bfloat16}
    for a, b in zip(wide.tokens, narrow.tokens):
        assert torch.equal(a, b)


def test_fusion_plan_is_rebuilt_when_a_projection_changes(tiny_model):
    model = copy.deepcopy(tiny_model)
    first = td.fusion_plan(model.t3)
    assert td.fusion_plan(model.t3) is first  # cached while nothing changed
    layer = model.t3.tfmr.layers[0]
    layer.mlp.up_proj = copy.deepcopy(layer.mlp.up_proj)  # a transform swapped a module
    assert td.fusion_plan(model.t3) is not first


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_attention_equals_sdpa(kv_heads):
    g = torch.Generator().manual_seed(0)
    n, heads, d, kv = 3, 4, 16, 37
    q = torch.randn(n, heads, 1, d, generator=g)
    k = torch.randn(n, kv_heads, kv, d, generator=g)
    v = torch.randn(n, kv_heads, kv, d, generator=g)
    mask = torch.ones(n, 1, kv, dtype=torch.bool)
    mask[1, :, :9] = False  # a left-padded row
    mask[2, :, -3:] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=0.25,
                                         enable_gqa=kv_heads != heads)
    out = td._decode_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_decode_attention_in_bf16_is_float32_attention_rounded_once():
    # bf16 query and cache: the products and softmax run in float32 and only the output is
    # rounded, so the result is the float32 attention of the same bf16 values to within one
    # bf16 rounding (the bf16-arithmetic version, scores rounded before the softmax, is not).
    g = torch.Generator().manual_seed(1)
    n, heads, d, kv = 2, 16, 64, 180
    q = (torch.randn(n, heads, 1, d, generator=g) * 2).bfloat16()
    k = (torch.randn(n, heads, kv, d, generator=g) * 2).bfloat16()
    v = torch.randn(n, heads, kv, d, generator=g).bfloat16()
    mask = torch.ones(n, 1, kv, dtype=torch.bool)
    mask[1, :, :20] = False
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None], scale=0.125)
    out = td._decode_attention(q, k, v, mask, 0.125)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.bfloat16()) or (out.float() - ref).abs().max() <= ref.abs().max() * 2 ** -8
    scores = (q @ k.transpose(-1, -2)).float() * 0.125  # bf16 products: rounded scores
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    bf16_way = (torch.softmax(scores, -1).bfloat16() @ v).float()
    assert (out.float() - ref).abs().max() < (bf16_way - ref).abs().max()


def test_decode_attention_under_bf16_autocast_is_the_float32_attention():
    # The synthesizer decodes a bf16 T3 under torch.autocast(bf16), where matmul is cast to
    # bf16: the attention must still be the float32 one, bit for bit what it is without autocast.
    g = torch.Generator().manual_seed(2)
    n, heads, d, kv = 2, 16, 64, 150
    q = (torch.randn(n, heads, 1, d, generator=g) * 2).bfloat16()
    k = (torch.randn(n, 8, kv, d, generator=g) * 2).bfloat16()
    v = torch.randn(n, 8, kv, d, generator=g).bfloat16()
    mask = torch.ones(n, 1, kv, dtype=torch.bool)
    mask[0, :, :11] = False
    plain = td._decode_attention(q, k, v, mask, 0.125)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = td._decode_attention(q, k, v, mask, 0.125)
    assert torch.equal(under, plain)


@pytest.mark.parametrize("temperature", [0.8, 1.0])
def test_top_p_one_after_min_p_is_left_out_without_changing_the_logits(temperature):
    from transformers.generation.logits_process import TopPLogitsWarper

    s = td.DecodeSettings(temperature=temperature, top_p=1.0, min_p=0.05)
    warpers = td._warpers(False, s)
    assert not any(isinstance(w, TopPLogitsWarper) for w in warpers)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 8194, generator=g) * torch.tensor([[1.0], [5.0], [20.0], [80.0]])  # flat to peaked
    seen = torch.rand(4, 8194, generator=g) < 0.01
    upstream = warpers + [TopPLogitsWarper(top_p=1.0)]  # what upstream's T3.inference applies
    ours = td.process_logits(False, logits, seen, s, warpers)
    theirs = td.process_logits(False, logits, seen, s, upstream)
    assert torch.equal(ours, theirs)
    # still applied where it acts: top_p < 1, or min_p 0 (underflowing tokens would be masked)
    assert any(isinstance(w, TopPLogitsWarper) for w in td._warpers(False, td.DecodeSettings(top_p=0.9)))
    assert any(isinstance(w, TopPLogitsWarper) for w in td._warpers(False, td.DecodeSettings(min_p=0.0)))
