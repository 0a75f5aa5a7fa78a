"""Tensor primitives and quantized modules on real-size random layers (1024 in, 4096 out).

SQNR is torchao's ``compute_error``: 20 log10(||x|| / ||x - y||). Bounds sit 1-2 dB under
what Gaussian weights give (int8 ~41 dB, int4 ~20/21.5/23 dB for groups 128/64/32, fp8
~31 dB on weights), so a worse rounding, a wrong scale or a packing error fails them.
"""

import pytest
import torch
from torch import nn

from cbx.compress import primitives as P
from cbx.compress.modules import FP8Linear, Int4Embedding, Int4Linear, Int8Embedding, Int8Linear


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    lin = nn.Linear(1024, 4096)
    x = torch.randn(6, 1024)
    return lin, x


def test_int8_per_channel_sqnr_and_grid(layer):
    lin, _ = layer
    q, s = P.quantize_int8_per_channel(lin.weight)
    assert q.dtype == torch.int8 and s.shape == (4096,)
    assert int(q.abs().max()) == 127  # each row's max maps to the grid's end
    assert P.sqnr_db(lin.weight, P.dequantize_int8(q, s)) > 40.0


@pytest.mark.parametrize("group,bound", [(128, 19.0), (64, 20.5), (32, 22.0)])
def test_int4_groupwise_sqnr(layer, group, bound):
    lin, _ = layer
    codes, s, z = P.quantize_int4_groupwise(lin.weight, group)
    assert codes.max() <= 15 and s.shape == (4096, 1024 // group) and s.dtype == torch.bfloat16
    w_hat = P.dequantize_int4(codes, s, z, group)
    assert P.sqnr_db(lin.weight, w_hat) > bound
    # asymmetric: both ends of every group's range are used
    cg = codes.reshape(4096, -1, group)
    assert bool((cg.amin(-1) == 0).float().mean() > 0.95) and bool((cg.amax(-1) == 15).float().mean() > 0.95)


def test_int4_group_size_checked():
    with pytest.raises(ValueError, match="group_size"):
        P.quantize_int4_groupwise(torch.randn(16, 96), 48)
    with pytest.raises(ValueError, match="not a multiple"):
        P.quantize_int4_groupwise(torch.randn(16, 96), 64)


def test_constant_rows_do_not_give_nan():
    w = torch.zeros(16, 64)
    w[3] = 1.5
    for deq in (P.dequantize_int8(*P.quantize_int8_per_channel(w)),
                P.dequantize_int4(*P.quantize_int4_groupwise(w, 32), 32)):
        assert torch.isfinite(deq).all()
        torch.testing.assert_close(deq, w, atol=1e-2, rtol=0)


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (48, 64), dtype=torch.uint8)
    assert torch.equal(P.unpack_int4(P.pack_int4(codes)), codes)
    assert P.pack_int4(codes).shape == (48, 32)
    # the CPU kernel's layout is recovered exactly, for its own blocking and a padded height
    for n, k in ((64, 128), (80, 64), (4096, 1024)):
        c = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        assert torch.equal(P.int4_cpu_layout_to_codes(P.codes_to_int4_cpu_layout(c), n, k), c)


def test_fp8_weights_and_per_token_activations(layer):
    lin, x = layer
    q, s = P.quantize_fp8_per_channel(lin.weight)
    assert q.dtype == torch.float8_e4m3fn
    assert float(q.float().abs().max()) == P.FP8_E4M3_MAX
    assert P.sqnr_db(lin.weight, q.float() * s[:, None]) > 30.0
    xq, xs = P.quantize_fp8_per_token(x * torch.logspace(-2, 2, 6)[:, None])
    assert xs.shape == (6, 1)
    # every token uses the full e4m3 range whatever its magnitude
    assert torch.equal(xq.float().abs().amax(-1), torch.full((6,), P.FP8_E4M3_MAX))


def test_fp8_emulation_rounds_like_scaled_mm(layer):
    lin, x = layer
    q, s = P.quantize_fp8_per_channel(lin.weight)
    # exact reference: fp8 operands in float64, scales applied after the dot products
    xq, xs = P.quantize_fp8_per_token(x)
    exact = (xq.double() @ q.double().t()) * xs.double() * s.double()[None] + lin.bias.double()
    y32 = P.fp8_linear_emulated(x, q, s, lin.bias, matmul_dtype=torch.float32)
    assert P.sqnr_db(exact, y32) > 100  # fp32 accumulation only
    y16 = P.fp8_linear_emulated(x, q, s, lin.bias, matmul_dtype=torch.bfloat16)
    assert P.sqnr_db(exact, y16) > 45  # + one bf16 rounding of the product
    assert P.sqnr_db(lin(x), y32) > 25  # and the whole thing is close to fp32


@pytest.mark.parametrize("cls,kw,bound", [(Int8Linear, {}, 38.0), (Int4Linear, {"group_size": 128}, 18.0),
                                          (FP8Linear, {}, 25.0)])
def test_quantized_linear_kernel_matches_fallback(layer, cls, kw, bound):
    lin, x = layer
    ref = lin(x)
    m = cls.from_float(lin, **kw)
    y, y_ref = m(x), m.forward_reference(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert P.sqnr_db(ref, y) > bound
    # kernel vs dequantize-then-matmul: both round the same bf16 output, tiny accumulation-order noise
    assert P.sqnr_db(y_ref, y) > 60
    assert not any(p.is_floating_point() and p.numel() >= lin.weight.numel() for p in m.buffers())


def test_int4_kernel_on_awkward_heights():
    torch.manual_seed(1)
    lin = nn.Linear(64, 8194, bias=True)  # speech head height: not a multiple of 16
    m = Int4Linear.from_float(lin, 32)
    x = torch.randn(3, 64)
    assert m.layout == "cpu" and m(x).shape == (3, 8194)
    assert P.sqnr_db(m.forward_reference(x), m(x)) > 60
    codes, _, _ = P.quantize_int4_groupwise(lin.weight, 32)
    assert torch.equal(m.codes(), codes)


def test_weight_memory_really_drops(layer):
    lin, _ = layer
    fp = lin.weight.numel() * 4
    nbytes = lambda m: sum(b.untyped_storage().nbytes() for b in m.buffers())  # noqa: E731
    assert nbytes(Int8Linear.from_float(lin)) < 0.26 * fp
    assert nbytes(Int4Linear.from_float(lin, 128)) < 0.14 * fp
    assert nbytes(FP8Linear.from_float(lin)) < 0.26 * fp


def test_model_casts_do_not_requantize(layer):
    lin, x = layer
    for m in (Int8Linear.from_float(lin), Int4Linear.from_float(lin, 64), FP8Linear.from_float(lin)):
        before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("bias")}
        y = m(x)
        m.to(torch.float16).to(torch.float32)
        after = {k: v for k, v in m.state_dict().items() if not k.startswith("bias")}
        assert all(torch.equal(before[k], after[k]) for k in before)
        torch.testing.assert_close(m(x), y, atol=1e-2, rtol=1e-2)  # only the bias went through fp16


def test_gpt2_conv1d_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    conv = Conv1D(96, 64)  # nf=96 outputs, nx=64 inputs; weight [in, out]
    nn.init.normal_(conv.bias)
    lin = nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    x = torch.randn(2, 5, 64)
    for cls, kw in ((Int8Linear, {}), (Int4Linear, {"group_size": 32}), (FP8Linear, {})):
        a, b = cls.from_float(conv, **kw), cls.from_float(lin, **kw)
        assert a.orig_class == "Conv1D"
        assert torch.equal(a(x), b(x))
        assert P.sqnr_db(conv(x), a(x)) > 15


def test_lora_compatible_linear_signature():
    from diffusers.models.lora import LoRACompatibleLinear

    torch.manual_seed(3)
    lora = LoRACompatibleLinear(256, 64)
    x = torch.randn(4, 256)
    m = FP8Linear.from_float(lora)
    assert m.orig_class == "LoRACompatibleLinear"
    torch.testing.assert_close(m(x, scale=1.0), m(x))
    assert P.sqnr_db(lora(x), m(x)) > 25


@pytest.mark.parametrize("cls,kw,bound", [(Int8Embedding, {}, 40.0), (Int4Embedding, {"group_size": 64}, 19.0)])
def test_quantized_embeddings(cls, kw, bound):
    torch.manual_seed(4)
    emb = nn.Embedding(300, 256)
    idx = torch.randint(0, 300, (2, 17))
    m = cls.from_float(emb, **kw)
    assert P.sqnr_db(emb(idx), m(idx)) > bound
    torch.testing.assert_close(m(idx), m.dequantize()[idx])
    m.to(torch.bfloat16)
    assert m(idx).dtype == torch.bfloat16 and m.weight.dtype == torch.bfloat16  # dtype proxy
