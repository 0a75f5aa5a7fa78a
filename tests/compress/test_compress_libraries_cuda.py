"""The library transforms on a GPU: each runs its CUDA kernel, keeps its CPU accuracy, records
its kernel path, and a model quantized on the GPU saves and loads back with identical outputs
(all skipped without a GPU; scripts/gpu_check.sh runs them)."""

import pytest
import torch
from torch import nn

from cbx.compress import kernels as K
from cbx.compress.accuracy import outlier_layer
from cbx.compress.primitives import sqnr_db
from cbx.compress.registry import apply_transforms, build_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# transform -> (output SQNR floor on the 1024x4096 outlier layer, kernel path prefix on CUDA);
# floors as the CPU test's, 2 dB lower for the different kernels' accumulation
CUDA = {
    "torchao_int8_weight_only": (39.0, "torchao:int8-weight-mm"),
    "torchao_int8_dynamic": (34.5, "torchao:int8-int-mm"),
    "torchao_int4_weight_only": (29.0, "torchao:tinygemm"),
    "torchao_float8_weight_only": (28.0, "torchao:fp8-dequant"),
    "torchao_float8_dynamic": (25.0, "torchao:fp8-scaled-mm"),
    "bnb_int8": (39.0, "bnb:llm-int8"),
    "bnb_nf4": (26.5, "bnb:"),
    "bnb_fp4": (24.0, "bnb:"),
    "quanto_qint8": (38.5, "quanto:"),
    "quanto_qint4": (29.0, "quanto:"),
    "quanto_qfloat8": (28.0, "quanto:"),
}


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.variant, self.meta = "original", {}


@pytest.mark.parametrize("name", sorted(CUDA))
def test_library_transform_on_cuda(name):
    if name == "torchao_float8_dynamic" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability 8.9+")
    layer, x, _ = outlier_layer(1024, 4096)
    _check_on_cuda(name, _Holder(layer), x, *CUDA[name])


def _check_on_cuda(name, holder, x, floor, path):
    """``name`` on ``holder.layer`` moved to the GPU: output there, SQNR above ``floor`` against
    the float layer, the kernel path recorded starts with ``path``."""
    ref = holder.layer(x).detach()
    holder = holder.cuda()
    apply_transforms(holder, [(name, build_config(name, {"targets": ["layer"]}))])
    with torch.inference_mode():
        y = holder.layer(x.cuda())
    assert y.device.type == "cuda"
    assert sqnr_db(ref, y.float().cpu()) > floor
    (got,) = K.kernel_summary(holder)["paths"]
    assert got.startswith(path)


@pytest.mark.parametrize("name", ["torchao_int4_weight_only", "bnb_nf4", "quanto_qint8", "bnb_int8"])
def test_checkpoint_saved_from_cuda_round_trips(name, tiny_copy, tmp_path):
    from cbx.compress.checkpoint import load_compressed, save_compressed

    params = {"group_size": 32} if name == "torchao_int4_weight_only" else {}
    model = tiny_copy("original").eval().cuda()
    apply_transforms(model, [(name, build_config(name, params))])
    x = torch.randn(3, model.t3.speech_head.in_features, device="cuda")
    with torch.inference_mode():
        before = model.t3.speech_head(x)
    loaded = load_compressed(save_compressed(model, tmp_path / "ckpt")).cuda()
    with torch.inference_mode():
        assert torch.equal(before, loaded.t3.speech_head(x))


# calibrated transforms: calibration batches of the layer's own input distribution, on the GPU
CALIBRATED = {
    "torchao_awq_int8": (39.0, "torchao:int8-weight-mm"),
    "torchao_awq_int4": (27.0, "torchao:tinygemm"),
    "quanto_w8a8": (31.0, "quanto:"),
}


@pytest.mark.parametrize("name", sorted(CALIBRATED))
def test_calibrated_library_transform_on_cuda(name):
    from cbx.compress.accuracy import _Holder as CalibHolder

    layer, x, calib = outlier_layer(1024, 4096)
    gen = torch.Generator().manual_seed(1)
    batches = [calib(256, gen).cuda() for _ in range(4)]
    _check_on_cuda(name, CalibHolder(layer, calib=lambda: batches), x, *CALIBRATED[name])
