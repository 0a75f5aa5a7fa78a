"""Quantized modules at the real sizes of the full models, on CPU: every head height upstream
has (speech 8194 / Turbo 6563, text 704 / 50276 / multilingual 2454) and one full-size Llama
block's projections per method; quantize, save to safetensors, reload, same outputs.

Also the pure pieces of the CUDA paths that a CPU can check: the tinygemm row padding and
nibble order, and ``torch._int_mm`` with per-token int8 activations (CPU has ``_int_mm`` too,
so the very function the CUDA path calls runs here)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cbx.compress import primitives as P
from cbx.compress.modules import FP8Linear, Int4Linear, Int8Linear, from_qstate

# (rows, in) of every T3 head upstream has
HEADS = {"speech-original": (8194, 1024), "speech-turbo": (6563, 1024), "text-original": (704, 1024),
         "text-multilingual": (2454, 1024)}
# Turbo's 50276-row text head: one int4 case (the largest head, 200 MB fp32)
BIG_HEAD = (50276, 1024)
# SQNR (dB) of the layer output against the float layer, measured ~1-3 dB above these on random
# weights: int8 per-channel ~ 38-40, int4 g128 ~ 17-18 (bf16 activations), fp8 ~ 28-30.
BOUNDS = {"int8": 35.0, "int4": 15.0, "fp8": 25.0}


def _make(kind, lin):
    if kind == "int8":
        return Int8Linear.from_float(lin)
    if kind == "int4":
        return Int4Linear.from_float(lin, group_size=128)
    return FP8Linear.from_float(lin)


def _round_trip(mod, tmp_path):
    """qstate -> safetensors file -> module, as the checkpoint format does it."""
    tensors = dict(mod.qstate())
    if mod.bias is not None:
        tensors["bias"] = mod.bias.detach()
    # a new file each time: load_file may map the file, and rewriting a mapped file under a
    # live tensor crashes the process
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    back = load_file(str(path))
    bias = back.pop("bias", None)
    params = {"group_size": getattr(mod, "group_size", None), "compute_dtype": "bfloat16", "matmul_dtype": "bfloat16"}
    return from_qstate(mod.meta(), back, bias, torch.float32, params)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("head", list(HEADS))
def test_full_size_heads_quantize_save_reload(kind, head, tmp_path):
    n, k = HEADS[head]
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=head.startswith("text"))
    x = torch.randn(3, k)
    mod = _make(kind, lin)
    y = mod(x)
    assert y.shape == (3, n)
    assert P.sqnr_db(lin(x), y) > BOUNDS[kind]
    back = _round_trip(mod, tmp_path)
    assert torch.equal(back(x), y)  # bit-exact after save and reload
    if kind == "int4":
        assert mod.layout == "cpu" and torch.equal(back.codes(), mod.codes())
        assert P.int4_kernel_rows(n, "cpu") % 16 == 0 and P.int4_kernel_rows(n, "cuda") % 8 == 0


@pytest.mark.slow
def test_turbo_text_head_int4(tmp_path):
    torch.manual_seed(1)
    lin = nn.Linear(BIG_HEAD[1], BIG_HEAD[0], bias=False)
    x = torch.randn(2, BIG_HEAD[1])
    mod = Int4Linear.from_float(lin, group_size=128)
    del lin.weight
    back = _round_trip(mod, tmp_path)
    assert torch.equal(back(x), mod(x))


def _llama_block_linears():
    from cbx.engine import upstream

    cfg = upstream.LLAMA_CONFIGS["Llama_520M"]
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    return {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d), "gate_proj": (ff, d),
            "up_proj": (ff, d), "down_proj": (d, ff)}


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_one_full_size_llama_block_per_method(kind, tmp_path):
    torch.manual_seed(2)
    for name, (n, k) in _llama_block_linears().items():
        lin = nn.Linear(k, n, bias=False)
        x = torch.randn(4, k)
        mod = _make(kind, lin)
        y = mod(x)
        assert P.sqnr_db(lin(x), y) > BOUNDS[kind], name
        assert torch.equal(_round_trip(mod, tmp_path)(x), y), name


@pytest.mark.slow
def test_gptq_on_one_full_size_projection():
    """GPTQ int4 at the largest T3 input size (down_proj, K=4096) beats RTN on correlated inputs."""
    from cbx.compress import gptq

    torch.manual_seed(3)
    n, k = 256, 4096  # full input width; fewer rows keep it quick
    w = torch.randn(n, k) * 0.02
    basis = torch.randn(64, k)
    calib = torch.randn(2048, 64) @ basis + 0.05 * torch.randn(2048, k)
    acc = gptq.HessianAccumulator(k)
    acc.add(calib)
    assert acc.h.device.type == "cpu" and acc.h.dtype == torch.float64
    codes, s, z = gptq.gptq_quantize(w, acc.h, bits=4, group_size=128)
    rtn = P.dequantize_int4(*P.quantize_int4_groupwise(w, 128), 128)
    x = torch.randn(256, 64) @ basis
    err_gptq = (x @ P.dequantize_int4(codes, s, z, 128).t() - x @ w.t()).norm()
    err_rtn = (x @ rtn.t() - x @ w.t()).norm()
    assert err_gptq < 0.8 * err_rtn
    assert codes.device == w.device and codes.dtype == torch.uint8


# ----------------------------------------------------------------------------- CUDA pieces on CPU


def test_int4_kernel_rows_pad_every_head_height():
    for n, cpu, cuda in [(8194, 8208, 8200), (6563, 6576, 6568), (50276, 50288, 50280), (2454, 2464, 2456),
                         (704, 704, 704), (1024, 1024, 1024)]:
        assert (P.int4_kernel_rows(n, "cpu"), P.int4_kernel_rows(n, "cuda")) == (cpu, cuda)
    t = torch.arange(6, dtype=torch.uint8).reshape(3, 2)
    padded = P.pad_rows(t, 8, 8)
    assert padded.shape == (8, 2) and torch.equal(padded[:3], t) and bool((padded[3:] == 8).all())
    assert P.pad_rows(t, 3, 0) is t
    with pytest.raises(ValueError):
        P.pad_rows(t, 2, 0)


def test_tinygemm_input_puts_the_even_column_in_the_high_nibble():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    u8 = P.codes_to_tinygemm_input(codes)
    assert u8.shape == (8, 32) and u8.is_contiguous()
    assert torch.equal(u8 >> 4, codes[:, 0::2]) and torch.equal(u8 & 0xF, codes[:, 1::2])
    # the canonical storage is the other way round
    assert torch.equal(P.pack_int4(codes) & 0xF, codes[:, 0::2])
    assert [P.tinygemm_inner_k_tiles(k) for k in (1024, 4096, 64, 96)] == [8, 8, 4, 2]
    with pytest.raises(ValueError):
        P.tinygemm_inner_k_tiles(80)


@pytest.mark.parametrize("m", [1, 2, 5, 17, 40])
def test_int_mm_linear_is_exact_integer_math_for_any_row_count(m):
    torch.manual_seed(m)
    lin = nn.Linear(1024, 4096, bias=False)
    q, s = P.quantize_int8_per_channel(lin.weight)
    x = torch.randn(m, 1024)
    y = P.int8_int_mm_linear(x, q, s)
    assert y.shape == (m, 4096) and y.dtype == torch.float32
    torch.testing.assert_close(y, P.int8_int_mm_reference(x, q, s), rtol=1e-6, atol=1e-6)
    # W8A8-dynamic stays close to the float layer
    assert P.sqnr_db(lin(x), y) > 30
    assert P.int_mm_ok(4096, 1024) and not P.int_mm_ok(8194, 1024) and not P.int_mm_ok(16, 1024)


def test_modules_built_from_misaligned_tensors_run():
    """Tensors from a safetensors file can start at any byte offset; the CPU int8 kernel
    crashed the process on one at offset 28. Modules keep aligned copies."""
    torch.manual_seed(4)
    lin = nn.Linear(1024, 1024, bias=False)
    q, s = P.quantize_int8_per_channel(lin.weight)
    raw = torch.empty(q.numel() + 64, dtype=torch.int8)
    odd = raw[28: 28 + q.numel()].view(1024, 1024)
    odd.copy_(q)
    assert odd.data_ptr() % 64 == 28
    mod = Int8Linear(odd, s)
    assert mod.qweight.data_ptr() % 64 == 0
    x = torch.randn(4, 1024)
    assert torch.equal(mod(x), Int8Linear(q, s)(x))
