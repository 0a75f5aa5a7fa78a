"""The int4 module's many-row path: the CPU kernel's packing unpacked to a bf16 weight for one
dense GEMM (a T3 prefill), used only when the decode was asked to compile.

What must hold: the unpacked weight is exactly the kernel's dequantization rounded once to bf16
(for the packing the kernel really makes, checked against the generic nibble permutation);
a many-row forward then equals the kernel's to bf16 rounding and says which path ran; without
the caller's permission, for few rows, or for weights whose rows do not fill 64-row blocks the
kernel runs; a failed compile is said once and leaves the kernel in charge.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from cbx.compress import modules as M
from cbx.compress import primitives as P
from cbx.compress.modules import Int4Linear
from cbx.engine import t3_decode as td


def _int4(n, k, group=128, seed=0, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, 1) * 4)  # rows of different scales
    return Int4Linear.from_float(lin, group)


@pytest.mark.parametrize("n,k,group", [(64, 256, 128), (192, 512, 64), (128, 384, 32)])
def test_unpacked_weight_is_the_kernels_dequantization_rounded_once(n, k, group):
    q = _int4(n, k, group)
    codes = P.int4_cpu_layout_to_codes(q.packed, n, k)  # generic permutation: the packing as it is
    want = P.dequantize_int4(codes, q.scale, q.zero, group).to(torch.bfloat16).t()
    got = P.int4_cpu_layout_dense_t(q.packed, q.scale, q.zero)
    assert got.dtype == torch.bfloat16 and got.shape == (k, n)
    assert torch.equal(got, want)
    # the kernel multiplies by exactly these weights (in float32): identity rows read them back
    eye = torch.eye(k, dtype=torch.bfloat16)
    sz = P.scale_and_zeros(q.scale, q.zero, torch.bfloat16)
    kernel_w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.packed, group, sz)
    assert torch.equal(kernel_w, want)


def test_unpacking_refuses_rows_that_do_not_fill_blocks():
    q = _int4(80, 256)  # padded to 80 rows: the packing's last block is laid out differently
    with pytest.raises(ValueError, match=f"{P.int4_cpu_block_n()}-row blocks"):
        P.int4_cpu_layout_dense_t(q.packed, q.scale, q.zero)


@pytest.fixture
def eager_unpacking(monkeypatch):
    """The unpacking without torch.compile (the same function; compiling is tested apart), on a
    CPU taken to have native bf16 (the dense bf16 path is only chosen there; tested apart)."""
    monkeypatch.setitem(M._DENSE, "fn", P.int4_cpu_layout_dense_t)
    monkeypatch.setitem(M._DENSE, "native_bf16", True)


def _with_permission(fn):
    token = td._COMPILE_MANY_ROWS.set(True)
    try:
        return fn()
    finally:
        td._COMPILE_MANY_ROWS.reset(token)


def test_many_rows_take_the_dense_path_only_when_allowed(eager_unpacking):
    q = _int4(128, 256, bias=True)
    x = torch.randn(160, 256)
    with torch.inference_mode():
        kernel = q(x)
        assert q.cbx_kernel == "int4pack-cpu"  # not allowed: the kernel
        dense = _with_permission(lambda: q(x))
        assert q.cbx_kernel == "int4-dense-bf16"
        _with_permission(lambda: q(x[:8]))  # few rows: the kernel even when allowed
        assert q.cbx_kernel == "int4pack-cpu"
    assert dense.shape == kernel.shape and dense.dtype == kernel.dtype
    # same weights (bf16-rounded here, float32 in the kernel) and a bf16 output: one rounding apart
    assert (dense.float() - kernel.float()).abs().max() <= kernel.float().abs().max() * 2 ** -6
    # padded rows keep the kernel
    odd = _int4(80, 256)
    with torch.inference_mode():
        _with_permission(lambda: odd(x))
    assert odd.cbx_kernel == "int4pack-cpu"


def test_no_dense_bf16_path_without_native_bf16(eager_unpacking, monkeypatch):
    """Where bf16 is emulated a bf16 GEMM is ATen's single-threaded loop: many rows keep the kernel."""
    monkeypatch.setitem(M._DENSE, "native_bf16", False)
    q = _int4(128, 256)
    with torch.inference_mode():
        _with_permission(lambda: q(torch.randn(160, 256)))
    assert q.cbx_kernel == "int4pack-cpu"


def test_native_bf16_is_read_from_the_cpu_flags_once(monkeypatch):
    from cbx.engine import synth

    monkeypatch.setitem(M._DENSE, "native_bf16", None)
    calls = []
    monkeypatch.setattr(synth, "auto_dtype", lambda device: calls.append(device) or "bf16")
    assert M._native_bf16_cpu() and M._native_bf16_cpu()
    assert calls == ["cpu"]


@pytest.mark.parametrize("backend", [None, "inductor"])
def test_decode_allows_the_dense_path_in_its_prefill_only_when_compiling(tiny_model, monkeypatch, backend):
    seen = []
    backbone = td._backbone

    def recording(t3, x, *args, **kwargs):
        seen.append((x.shape[1], td.compile_many_rows()))
        return backbone(t3, x, *args, **kwargs)

    monkeypatch.setattr(td, "_backbone", recording)
    monkeypatch.setattr(td, "_step_function", lambda b: recording)  # the step itself not compiled here
    row = td.T3Row([1, 5, 9, 14, 2], tiny_model.builtin_conds.t3, 0)
    td.generate(tiny_model.t3, [row], td.DecodeSettings(force_tokens=3, temperature=0, compile_backend=backend))
    # one prefill pass (the new voice prefix and both CFG rows' 7 other prompt tokens, laid end to
    # end: cbx.engine.t3_prefill), then two steps
    assert [q for q, _ in seen] == [seen[0][0], 1, 1] and seen[0][0] > 2 * 7
    assert [allowed for _, allowed in seen] == [backend is not None] + [False, False]
    assert not td.compile_many_rows()


def test_a_failed_compile_is_said_once_and_the_kernel_serves(monkeypatch, caplog):
    def broken(*a):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(M._DENSE, "fn", broken)
    monkeypatch.setitem(M._DENSE, "native_bf16", True)
    q = _int4(128, 256)
    x = torch.randn(160, 256)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        y1 = _with_permission(lambda: q(x))
        y2 = _with_permission(lambda: q(x))
    assert q.cbx_kernel == "int4pack-cpu" and M._DENSE["fn"] is False
    assert caplog.text.count("cannot compile the weight unpacking") == 1
    assert torch.equal(y1, y2)


@pytest.mark.slow
def test_compiled_unpacking_equals_the_eager_one(monkeypatch):
    monkeypatch.setitem(M._DENSE, "fn", None)
    q = _int4(128, 256)
    with torch.inference_mode():
        got = q.dense_weight_t()
    assert got is not None and torch.equal(got, P.int4_cpu_layout_dense_t(q.packed, q.scale, q.zero))
