"""Seed-TTS-eval's SIM model (WavLM + ECAPA-TDNN) from a checkpoint in UniSpeech's layout: the
real file cannot be downloaded here, so a small model of the same architecture is written in
that layout (tensor names of fairseq's WavLM under ``feature_extract.model.``, the ECAPA head
beside it) and must load strictly and embed exactly what the modules it was made from embed."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cbx.errors import CbxError
from cbx.eval.metrics import wavlm_ecapa as W
from cbx.eval.metrics.speaker import SpeakerConfig, SpeakerGroup


def _to_unispeech(name: str) -> str | None:
    """transformers WavLMModel name -> UniSpeech name (the inverse of the module's mapping)."""
    rules = [
        (r"masked_spec_embed", "mask_emb"),
        (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(\w+)", r"feature_extractor.conv_layers.\1.0.\2"),
        (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)", r"feature_extractor.conv_layers.\1.2.1.\2"),
        (r"feature_projection\.layer_norm\.(\w+)", r"layer_norm.\1"),
        (r"feature_projection\.projection\.(\w+)", r"post_extract_proj.\1"),
        (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),
        (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),
        (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const", r"encoder.layers.\1.self_attn.grep_a"),
        (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(\w+)", r"encoder.layers.\1.self_attn.grep_linear.\2"),
        (r"encoder\.layers\.(\d+)\.attention\.rel_attn_embed\.(\w+)", r"encoder.layers.\1.self_attn.relative_attention_bias.\2"),
        (r"encoder\.layers\.(\d+)\.attention\.(\w+_proj)\.(\w+)", r"encoder.layers.\1.self_attn.\2.\3"),
        (r"encoder\.layers\.(\d+)\.layer_norm\.(\w+)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
        (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(\w+)", r"encoder.layers.\1.fc1.\2"),
        (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(\w+)", r"encoder.layers.\1.fc2.\2"),
        (r"(encoder\.layers\.\d+\.final_layer_norm\.\w+)", r"\1"),
        (r"(encoder\.layer_norm\.\w+)", r"\1"),
    ]
    for pat, rep in rules:
        if re.fullmatch(pat, name):
            return re.sub(pat, rep, name)
    raise AssertionError(f"no rule for {name}")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                      conv_bias=False, feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=8,
                      num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                      feat_proj_dropout=0.0, layerdrop=0.0, apply_spec_augment=False)
    trunk = WavLMModel(cfg).eval()
    head = W._build_head(32, 3, channels=64, emb_dim=24).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {f"feature_extract.model.{_to_unispeech(k)}": v.clone() for k, v in trunk.state_dict().items()}
    state.update({k: v.clone() for k, v in head.state_dict().items()})
    state["projection.weight"] = torch.zeros(10, 24)  # the training classifier: carried, never used
    path = tmp_path_factory.mktemp("ecapa") / "wavlm_small_finetune.pth"
    torch.save({"model": state}, path)
    return trunk, head, path, state


def test_unispeech_names_map_onto_transformers_wavlm():
    assert W.unispeech_to_transformers("encoder.layers.5.self_attn.grep_a") == "encoder.layers.5.attention.gru_rel_pos_const"
    assert W.unispeech_to_transformers("encoder.layers.0.self_attn.relative_attention_bias.weight") == "encoder.layers.0.attention.rel_attn_embed.weight"
    assert W.unispeech_to_transformers("encoder.layers.3.self_attn_layer_norm.bias") == "encoder.layers.3.layer_norm.bias"
    assert W.unispeech_to_transformers("feature_extractor.conv_layers.3.2.1.bias") == "feature_extractor.conv_layers.3.layer_norm.bias"
    assert W.unispeech_to_transformers("encoder.pos_conv.0.weight_g") == "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
    assert W.unispeech_to_transformers("final_proj.weight") is None
    with pytest.raises(CbxError, match="no counterpart"):
        W.unispeech_to_transformers("something.else")


def test_checkpoint_in_unispeech_layout_loads_strictly_and_embeds_like_its_modules(small):
    trunk, head, path, _ = small
    model = W.load(str(path))
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.do_stable_layer_norm) == (32, 2, 4, True)
    wav = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    got = model.embed(wav)
    x = torch.from_numpy(wav)[None]
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)
    with torch.no_grad():
        want = head(torch.stack(trunk(x, output_hidden_states=True).hidden_states))[0].numpy()
    assert got.shape == (24,) and np.allclose(got, want, atol=1e-5)
    # the speaker group uses it through the config
    g = SpeakerGroup(SpeakerConfig(backend="wavlm-ecapa", ecapa_checkpoint=str(path)))
    assert g.variant == "wavlm-large-ecapa-tdnn" and np.allclose(g.embed(wav), want, atol=1e-5)


def test_a_wrong_checkpoint_is_refused_naming_the_tensor(small, tmp_path, monkeypatch):
    _, _, _, state = small
    bad = dict(state)
    bad.pop("layer2.SE_Connect.linear1.weight")
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CbxError, match="ECAPA head does not match.*SE_Connect"):
        W.load(str(tmp_path / "bad.pth"))
    odd = dict(state)
    odd["feature_extract.model.encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    torch.save({"model": odd}, tmp_path / "odd.pth")
    with pytest.raises(CbxError, match="k_proj.weight.*shape"):
        W.load(str(tmp_path / "odd.pth"))
    monkeypatch.delenv(W.CHECKPOINT_ENV, raising=False)
    with pytest.raises(CbxError, match="wavlm_large_finetune.pth"):
        SpeakerGroup(SpeakerConfig(backend="wavlm-ecapa")).load()
    with pytest.raises(CbxError, match="not found"):
        W.load(str(tmp_path / "nope.pth"))
