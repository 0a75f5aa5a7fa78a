"""Kernel-path recording: each quantized module says which kernel it ran, a fallback is
logged once naming the module and recorded, and the summary counts paths per model."""

import logging

import pytest
import torch
from torch import nn

from cbx.compress import kernels as K
from cbx.compress import primitives as P
from cbx.compress.modules import FP8Linear, Int4Linear, Int8Linear
from cbx.compress.registry import apply_transforms, build_config


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(256, 96)
        self.b = nn.Linear(96, 40)
        self.unused = nn.Linear(96, 32)

    def forward(self, x):
        return self.b(self.a(x))


def _swap(model, cls, **kw):
    for name in ("a", "b", "unused"):
        setattr(model, name, cls.from_float(getattr(model, name), **kw))
    K.name_modules(model)
    return model


@pytest.mark.parametrize("cls, kw, path", [(Int8Linear, {}, "int8pack-cpu"),
                                           (Int4Linear, {"group_size": 32}, "int4pack-cpu"),
                                           (FP8Linear, {}, "fp8-emulated")])
def test_each_module_records_its_cpu_kernel(cls, kw, path, caplog):
    m = _swap(Two(), cls, **kw)
    assert K.kernel_summary(m) == {"paths": {K.NOT_RUN: 3}, "fallbacks": []}
    with caplog.at_level(logging.WARNING, logger="cbx.kernels"):
        m(torch.randn(3, 256))
    assert K.kernel_summary(m) == {"paths": {path: 2, K.NOT_RUN: 1}, "fallbacks": []}
    assert not caplog.records  # the designed path is not a fallback
    K.reset(m)
    assert K.kernel_summary(m)["paths"] == {K.NOT_RUN: 3}


def test_a_failing_int8_kernel_warns_once_naming_the_module_and_is_recorded(monkeypatch, caplog):
    m = _swap(Two(), Int8Linear)
    x = torch.randn(3, 256)
    want = m(x)

    def broken(*a, **k):
        raise RuntimeError("planted kernel failure\nsecond line")

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", broken)
    fresh = _swap(Two(), Int8Linear)
    with caplog.at_level(logging.WARNING, logger="cbx.kernels"):
        for _ in range(3):
            got = fresh(x)
    # the fallback computes the same thing (bf16 rounding apart)
    assert P.sqnr_db(want, got) > 35
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned  # one per module (a and b), not one per call
    assert warned[0].startswith("a: kernel int8pack-cpu unavailable (RuntimeError: planted kernel failure)")
    s = K.kernel_summary(fresh)
    assert s["paths"] == {"dequant-fallback": 2, K.NOT_RUN: 1}
    assert s["fallbacks"][0] == {"module": "a", "wanted": "int8pack-cpu", "used": "dequant-fallback",
                                 "reason": "RuntimeError: planted kernel failure"}


def test_an_int4_layout_that_cannot_be_built_is_a_recorded_fallback(monkeypatch, caplog):
    def broken(codes):
        raise NotImplementedError("no int4 CPU packing here")

    monkeypatch.setattr(P, "codes_to_int4_cpu_layout", broken)
    m = _swap(Two(), Int4Linear, group_size=32)
    assert m.a.layout == "canonical"
    x = torch.randn(2, 256)
    with caplog.at_level(logging.WARNING, logger="cbx.kernels"):
        y = m(x)
    assert torch.equal(y, m.b.forward_reference(m.a.forward_reference(x)))
    s = K.kernel_summary(m)
    assert s["paths"]["dequant-fallback"] == 2
    assert "no int4 CPU packing here" in s["fallbacks"][1]["reason"] and s["fallbacks"][1]["module"] == "b"
    assert "b: kernel int4pack-cpu unavailable" in caplog.text


def test_transforms_name_their_modules_and_the_engine_run_records_paths(tiny_copy):
    from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer

    model = apply_transforms(tiny_copy("original"), [("int8_weight_only", build_config("int8_weight_only", {}))])
    assert model.t3.speech_head.cbx_name == "t3.speech_head"
    syn = Synthesizer(model)
    # bf16: the engine runs cast copies of T3; their modules report under the original names
    syn.synthesize([SynthRequest("Kernel paths.", None)],
                   SynthSettings(max_speech_tokens=6, cfm_steps=1, watermark=False, dtype="bf16"), progress=False)
    assert K.kernel_summary(model)["paths"] == {K.NOT_RUN: 18}  # the originals did not run
    s = K.kernel_summary(model, syn.cast_copies())
    assert s["fallbacks"] == []
    assert s["paths"]["int8pack-cpu"] > 0 and s["paths"]["gather-int8"] == 2
    assert s["paths"][K.NOT_RUN] == 1  # the text head is never used to synthesize
