"""Compressed checkpoints: exact round trips and errors that name what does not match."""

import json

import pytest
import torch

from cbx.compress.checkpoint import MANIFEST, WEIGHTS, load_compressed, save_compressed
from cbx.compress.modules import FP8Linear, Int4Linear, Int8Embedding, Int8Linear
from cbx.compress.registry import apply_transforms, build_config
from cbx.errors import CbxError


def _quantize(model, steps):
    return apply_transforms(model, [(n, build_config(n, p)) for n, p in steps])


def _outputs(model):
    """T3 logits through the engine's teacher forcing and one CFM estimator call."""
    from cbx.engine.t3_decode import teacher_forced_logits

    g = torch.Generator().manual_seed(0)
    T = 24
    est_in = dict(x=torch.randn(2, 80, T, generator=g), mask=torch.ones(2, 1, T),
                  mu=torch.randn(2, 80, T, generator=g), t=torch.tensor([0.4, 0.4]),
                  spks=torch.randn(2, 80, generator=g), cond=torch.randn(2, 80, T, generator=g))
    if model.variant == "turbo":
        est_in["r"] = torch.tensor([0.9, 0.9])
    with torch.inference_mode():
        logits = teacher_forced_logits(model, model.builtin_conds, [1, 2, 3, 4], [10, 20, 30, 40, 50],
                                       processed=False) if model.variant == "turbo" else \
            teacher_forced_logits(model, model.builtin_conds, "Round trip.", [10, 20, 30, 40, 50], processed=False)
        mel = model.s3gen.flow.decoder.estimator(**est_in)
    return logits, mel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from cbx.engine.tiny import build_tiny

    model = build_tiny("original")
    model.t3.to(torch.bfloat16)  # a cast model: non-persistent buffers must come back cast too
    model = _quantize(model, [("int4_weight_only", {"group_size": 32}), ("fp8_cfm", {})])
    out = tmp_path_factory.mktemp("ckpt") / "int4-fp8"
    save_compressed(model, out)
    return model, out


def test_round_trip_is_bit_identical(saved):
    model, folder = saved
    loaded = load_compressed(folder)
    assert isinstance(loaded.t3.tfmr.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(loaded.s3gen.flow.decoder.estimator.time_mlp.linear_1, FP8Linear) or any(
        isinstance(m, FP8Linear) for m in loaded.s3gen.flow.decoder.estimator.modules())
    assert loaded.meta["compress"] == model.meta["compress"]
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_int8_cuda_kernel_choice_survives_the_checkpoint(tmp_path):
    from cbx.engine.tiny import build_tiny

    model = _quantize(build_tiny("original"), [("int8_weight_only", {"cuda_kernel": "dequant"})])
    assert model.t3.speech_head.cuda_kernel == "dequant"
    back = load_compressed(save_compressed(model, tmp_path / "ck"))
    assert back.t3.speech_head.cuda_kernel == "dequant"
    assert back.t3.speech_head.cbx_config["cuda_kernel"] == "dequant"


def test_manifest_describes_each_module(saved):
    _, folder = saved
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = manifest["modules"]["t3.tfmr.layers.0.self_attn.q_proj"]
    assert entry["kind"] == "int4" and entry["method"] == "int4_weight_only"
    assert entry["config"]["group_size"] == 32 and entry["orig_class"] == "Linear"
    assert manifest["variant"] == "original" and set(manifest["files"]) >= {WEIGHTS, "tokenizer.json"}
    assert all(len(h) == 64 for h in manifest["files"].values())
    assert (folder / WEIGHTS).stat().st_size < 100e6


def test_turbo_int8_round_trip(tmp_path):
    from cbx.engine.tiny import build_tiny

    model = _quantize(build_tiny("turbo"), [("int8_weight_only", {})])
    assert isinstance(model.t3.tfmr.h[0].attn.c_attn, Int8Linear)
    assert isinstance(model.t3.speech_emb, Int8Embedding)
    loaded = load_compressed(save_compressed(model, tmp_path / "t"))
    assert loaded.t3.tfmr.h[0].attn.c_attn.orig_class == "Conv1D"
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)


def test_manifest_not_matching_the_model_names_the_module(saved, tmp_path):
    import shutil

    _, folder = saved
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["modules"]["t3.tfmr.layers.9.mlp.up_proj"] = manifest["modules"].pop("t3.tfmr.layers.1.mlp.up_proj")
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CbxError, match=r"t3\.tfmr\.layers\.9\.mlp\.up_proj"):
        load_compressed(bad)
    manifest["modules"]["t3.tfmr.layers.1.mlp.up_proj"] = manifest["modules"].pop("t3.tfmr.layers.9.mlp.up_proj")
    manifest["modules"]["t3.tfmr.layers.1.mlp.up_proj"]["in_features"] = 999
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CbxError, match=r"t3\.tfmr\.layers\.1\.mlp\.up_proj.*999"):
        load_compressed(bad)


def test_loading_into_another_variant_is_refused(saved):
    from cbx.engine.tiny import build_tiny

    _, folder = saved
    with pytest.raises(CbxError, match="turbo"):
        load_compressed(folder, base=build_tiny("turbo"))


def test_corrupt_or_missing_files_are_named(saved, tmp_path):
    import shutil

    _, folder = saved
    bad = tmp_path / "corrupt"
    shutil.copytree(folder, bad)
    with open(bad / WEIGHTS, "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CbxError, match="model.safetensors.*hash"):
        load_compressed(bad)
    (bad / MANIFEST).unlink()
    with pytest.raises(CbxError, match="manifest.json.*missing"):
        load_compressed(bad)


def test_save_refuses_non_empty_folder_and_leaves_nothing(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "taken"
    target.mkdir()
    (target / "x").write_text("x")
    with pytest.raises(CbxError, match="not an empty folder"):
        save_compressed(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_dequantized_export_loads_as_a_plain_upstream_model(saved, tmp_path):
    import copy

    from cbx.compress.modules import QUANT_CLASSES, dequantize_model
    from cbx.engine.model import load_model, save_upstream_layout

    model, _ = saved
    plain = dequantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, QUANT_CLASSES) for m in plain.modules())
    w = plain.t3.tfmr.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16  # the cast model's dtype, not fp32
    q = model.t3.tfmr.layers[0].mlp.down_proj
    assert torch.equal(w, q.dequantize().to(torch.bfloat16))
    back = load_model(save_upstream_layout(plain, tmp_path / "export"))
    assert torch.equal(back.t3.tfmr.layers[0].mlp.down_proj.weight, w.float()) or torch.equal(
        back.t3.tfmr.layers[0].mlp.down_proj.weight, w)
