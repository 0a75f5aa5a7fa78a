"""CUDA kernels of the quantized modules against their CPU fallbacks, at the real head sizes,
codes read back from the CUDA layouts, checkpoints saved from a CUDA model, GPTQ on the GPU
(all skipped without a GPU; scripts/gpu_check.sh runs them)."""

import pytest
import torch
from torch import nn

from cbx.compress import kernels as K
from cbx.compress import primitives as P
from cbx.compress.modules import FP8Linear, Int4Linear, Int8Linear

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# every head height upstream has, plus a square block projection
SIZES = [(8194, 1024), (6563, 1024), (2454, 1024), (704, 1024), (4096, 1024), (1024, 4096)]


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return nn.Linear(1024, 4096), torch.randn(8, 1024)


@pytest.mark.parametrize("cls,kw", [(Int8Linear, {"cuda_kernel": "dequant"}), (Int4Linear, {"group_size": 128})])
def test_weight_only_kernels_match_cpu(layer, cls, kw):
    lin, x = layer
    m = cls.from_float(lin, **kw)
    y_cpu = m.forward_reference(x)
    m.cuda()
    if isinstance(m, Int4Linear):
        assert m.layout == "cuda"
    y = m(x.cuda()).cpu()
    assert P.sqnr_db(y_cpu, y) > 45
    m.cpu()  # and back: the codes survive both layout changes
    assert P.sqnr_db(y_cpu, m(x)) > 60


@pytest.mark.parametrize("n,k", SIZES)
def test_int4_tinygemm_any_height_and_codes_read_back(n, k):
    torch.manual_seed(n)
    lin = nn.Linear(k, n, bias=False)
    m = Int4Linear.from_float(lin, group_size=128)
    codes = m.codes()
    x = torch.randn(3, k)
    ref = m.forward_reference(x)
    m.cuda()
    assert m.layout == "cuda" and m.packed.is_cuda
    y = m(x.cuda())
    assert y.shape == (3, n) and m.cbx_kernel == "tinygemm"
    assert P.sqnr_db(ref, y.cpu()) > 40
    assert torch.equal(m.codes(), codes)  # read back from the tinygemm layout, exactly


@pytest.mark.parametrize("n,k", SIZES)
def test_int8_int_mm_matches_its_cpu_formula(n, k):
    torch.manual_seed(n)
    lin = nn.Linear(k, n, bias=False)
    m = Int8Linear.from_float(lin)
    x = torch.randn(2, k)
    want = P.int8_int_mm_reference(x.to(torch.bfloat16).float(), m.qweight, m.scale)
    m.cuda()
    y = m(x.cuda()).float().cpu()
    expect_path = "int-mm" if P.int_mm_ok(n, k) else "int8-dequant"
    assert m.cbx_kernel == expect_path
    if expect_path == "int-mm":
        assert P.sqnr_db(want, y) > 40
    assert P.sqnr_db(lin(x), y) > 30


def test_fp8_scaled_mm_matches_emulation(layer):
    lin, x = layer
    m = FP8Linear.from_float(lin)
    y_emul = m.forward_reference(x)
    m.cuda()
    y = m(x.cuda()).cpu()
    assert P.sqnr_db(y_emul, y) > 40
    assert m.cbx_kernel in ("fp8-scaled-mm", "fp8-emulated")
    if torch.cuda.get_device_capability() >= (8, 9):
        assert m.cbx_kernel == "fp8-scaled-mm", m.cbx_kernel_fallback


def test_gptq_runs_on_the_gpu_and_packs_for_it():
    from cbx.compress import gptq

    torch.manual_seed(3)
    w = torch.randn(512, 1024, device="cuda") * 0.02
    acc = gptq.HessianAccumulator(1024)
    acc.add(torch.randn(4096, 1024, device="cuda"))
    assert acc.h.is_cuda
    codes, s, z = gptq.gptq_quantize(w, acc.h, bits=4, group_size=128)
    assert codes.is_cuda and s.is_cuda
    m = Int4Linear(codes, s, z, 128)
    assert m.layout == "cuda"
    cpu = gptq.gptq_quantize(w.cpu(), acc.h.cpu(), bits=4, group_size=128)
    # same algorithm on two devices: nearly all codes agree (float64 reductions differ in order)
    assert (cpu[0] == codes.cpu()).float().mean() > 0.99


def test_save_and_reload_a_cuda_model(tiny_copy, tmp_path):
    from cbx.compress.checkpoint import load_compressed, save_compressed
    from cbx.compress.registry import apply_transforms, build_config

    model = tiny_copy("original").cuda()
    steps = [("int4_weight_only", {"group_size": 32}), ("fp8_cfm", {})]
    model = apply_transforms(model, [(n, build_config(n, p)) for n, p in steps])
    assert model.t3.speech_head.layout == "cuda"
    save_compressed(model, tmp_path / "ck")  # used to raise: codes unreadable from the CUDA layout
    back = load_compressed(tmp_path / "ck").cuda()
    assert torch.equal(back.t3.speech_head.codes(), model.t3.speech_head.codes())
    x = torch.randn(2, back.t3.speech_head.in_features, device="cuda")
    assert torch.equal(back.t3.speech_head(x), model.t3.speech_head(x))
    assert K.kernel_summary(back)["fallbacks"] == []
