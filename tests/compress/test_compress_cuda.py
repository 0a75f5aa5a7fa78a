"""CUDA kernels of the quantized modules against their CPU fallbacks (skipped without a GPU)."""

import pytest
import torch
from torch import nn

from cbx.compress import primitives as P
from cbx.compress.modules import FP8Linear, Int4Linear, Int8Linear

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return nn.Linear(1024, 4096), torch.randn(8, 1024)


@pytest.mark.parametrize("cls,kw", [(Int8Linear, {}), (Int4Linear, {"group_size": 128})])
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


def test_fp8_scaled_mm_matches_emulation(layer):
    lin, x = layer
    m = FP8Linear.from_float(lin)
    y_emul = m.forward_reference(x)
    m.cuda()
    y = m(x.cuda()).cpu()
    assert P.sqnr_db(y_emul, y) > 40
