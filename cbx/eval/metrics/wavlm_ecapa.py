"""Seed-TTS-eval's speaker-similarity model: WavLM-Large features + an ECAPA-TDNN head.

Seed-TTS-eval (and F5-TTS, CosyVoice, ... after it) report SIM as the cosine similarity of
embeddings from UniSpeech's speaker-verification model: the 25 hidden states of WavLM-Large
(the input of each of its 24 layers and the final layer-normed output, as s3prl's WavLM
expert hooks them) mixed by softmax weights, instance-normalized, then an ECAPA-TDNN (channels
512, three dilated SE-Res2 blocks, attentive statistics pooling, 256-d embedding). Its weights
are one file, ``wavlm_large_finetune.pth``, linked from Seed-TTS-eval's README (a Google Drive
file, so it is not fetched here: the user downloads it once and names it with
``eval.speaker: {backend: wavlm-ecapa, ecapa_checkpoint: PATH}`` or ``$CBX_WAVLM_ECAPA_CKPT``).

Why written here: the reference code needs fairseq-era s3prl hub downloads and torchaudio; the
WavLM trunk is transformers' ``WavLMModel`` (same architecture; its configuration is read off
the checkpoint's tensor shapes), the head is the small module below, and the checkpoint's
UniSpeech tensor names are mapped onto both. Loading is strict: a tensor that does not map, or
a module tensor the file lacks, is an error naming it, never a half-loaded model. Not run
against the real checkpoint here (no network); the tests build a small checkpoint in the
UniSpeech layout and check the mapping and the forward pass end to end.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from cbx.errors import CbxError

CHECKPOINT_ENV = "CBX_WAVLM_ECAPA_CKPT"
CHECKPOINT_HINT = ("download wavlm_large_finetune.pth (the SIM model linked from "
                   "https://github.com/BytedanceSpeech/seed-tts-eval) and give its path as "
                   f"eval.speaker.ecapa_checkpoint or ${CHECKPOINT_ENV}")
# Tensors of the pre-training heads that UniSpeech checkpoints may carry; the embedding never uses them.
IGNORED_TRUNK = ("final_proj.", "label_embs_concat", "project_q.", "quantizer.")


def unispeech_to_transformers(name: str) -> str | None:
    """A UniSpeech/fairseq WavLM tensor name -> transformers' ``WavLMModel`` name (None: ignored)."""
    if name.startswith(IGNORED_TRUNK):
        return None
    if name == "mask_emb":
        return "masked_spec_embed"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", name)
    if m:
        return f"feature_extractor.conv_layers.{m[1]}.conv.{m[2]}"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", name)
    if m:  # layer-norm extractor (Large): conv, dropout, (transpose, LayerNorm, transpose), GELU
        return f"feature_extractor.conv_layers.{m[1]}.layer_norm.{m[2]}"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", name)
    if m:  # group-norm extractor (Base): GroupNorm on the first conv only
        return f"feature_extractor.conv_layers.0.layer_norm.{m[1]}"
    if name.startswith("layer_norm."):
        return "feature_projection." + name
    if name.startswith("post_extract_proj."):
        return name.replace("post_extract_proj.", "feature_projection.projection.")
    if name.startswith("encoder.pos_conv.0."):
        suffix = name.removeprefix("encoder.pos_conv.0.")
        suffix = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}.get(suffix, suffix)
        return f"encoder.pos_conv_embed.conv.{suffix}"
    if name.startswith("encoder.layer_norm."):
        return name
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
    if m:
        s = m[2]
        for a, b in (("self_attn.grep_a", "attention.gru_rel_pos_const"), ("self_attn.grep_linear", "attention.gru_rel_pos_linear"),
                     ("self_attn.relative_attention_bias", "attention.rel_attn_embed"), ("self_attn_layer_norm.", "layer_norm."),
                     ("self_attn.", "attention."), ("fc1.", "feed_forward.intermediate_dense."), ("fc2.", "feed_forward.output_dense.")):
            if s.startswith(a):
                s = b + s[len(a):]
                break
        return f"encoder.layers.{m[1]}.{s}"
    raise CbxError(f"WavLM tensor {name!r} has no counterpart in transformers' WavLMModel")


def wavlm_config_from(trunk: dict):
    """transformers ``WavLMConfig`` read off a UniSpeech WavLM state dict's shapes."""
    from transformers import WavLMConfig

    n_layers = 1 + max(int(k.split(".")[2]) for k in trunk if k.startswith("encoder.layers."))
    n_conv = 1 + max(int(k.split(".")[2]) for k in trunk if k.startswith("feature_extractor.conv_layers."))
    conv = [trunk[f"feature_extractor.conv_layers.{i}.0.weight"] for i in range(n_conv)]
    layer_norm_extractor = "feature_extractor.conv_layers.0.2.1.weight" in trunk
    hidden = trunk["post_extract_proj.weight"].shape[0]
    pos_v = trunk["encoder.pos_conv.0.weight_v"]
    rel = trunk["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    strides = (5,) + (2,) * (n_conv - 1)  # WavLM's extractor (not in the tensors; 7 layers: 320x)
    return WavLMConfig(
        hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=rel.shape[1],
        intermediate_size=trunk["encoder.layers.0.fc1.weight"].shape[0],
        conv_dim=tuple(w.shape[0] for w in conv), conv_kernel=tuple(w.shape[-1] for w in conv), conv_stride=strides,
        conv_bias="feature_extractor.conv_layers.0.0.bias" in trunk,
        feat_extract_norm="layer" if layer_norm_extractor else "group",
        # Large (layer-norm extractor) is pre-LN with a final encoder LayerNorm; Base is post-LN.
        do_stable_layer_norm=layer_norm_extractor,
        num_conv_pos_embeddings=pos_v.shape[-1], num_conv_pos_embedding_groups=hidden // pos_v.shape[1],
        num_buckets=rel.shape[0], hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0, apply_spec_augment=False,
    )


def _build_head(feat_dim: int, n_states: int, channels: int = 512, emb_dim: int = 256):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class ConvReluBn(nn.Module):
        def __init__(self, cin, cout, k=1, pad=0, dil=1):
            super().__init__()
            self.conv = nn.Conv1d(cin, cout, k, padding=pad, dilation=dil)
            self.bn = nn.BatchNorm1d(cout)

        def forward(self, x):
            return self.bn(F.relu(self.conv(x)))

    class Res2(nn.Module):  # channels split in `scale` groups, each conv sees the previous group's output
        def __init__(self, ch, k, pad, dil, scale=8):
            super().__init__()
            self.width = ch // scale
            self.convs = nn.ModuleList(nn.Conv1d(self.width, self.width, k, padding=pad, dilation=dil) for _ in range(scale - 1))
            self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(scale - 1))

        def forward(self, x):
            parts = torch.split(x, self.width, dim=1)
            out, sp = [], None
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                sp = parts[i] if i == 0 else sp + parts[i]
                sp = bn(F.relu(conv(sp)))
                out.append(sp)
            return torch.cat(out + [parts[-1]], dim=1)

    class SE(nn.Module):
        def __init__(self, ch, bottleneck=128):
            super().__init__()
            self.linear1, self.linear2 = nn.Linear(ch, bottleneck), nn.Linear(bottleneck, ch)

        def forward(self, x):
            w = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
            return x * w.unsqueeze(2)

    class Block(nn.Module):  # SE-Res2 block; attribute names are the checkpoint's
        def __init__(self, ch, dil):
            super().__init__()
            self.Conv1dReluBn1 = ConvReluBn(ch, ch)
            self.Res2Conv1dReluBn = Res2(ch, 3, dil, dil)
            self.Conv1dReluBn2 = ConvReluBn(ch, ch)
            self.SE_Connect = SE(ch)

        def forward(self, x):
            return x + self.SE_Connect(self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x))))

    class Pool(nn.Module):  # attentive statistics pooling: weighted mean and std over time
        def __init__(self, ch, att=128):
            super().__init__()
            self.linear1, self.linear2 = nn.Conv1d(ch, att, 1), nn.Conv1d(att, ch, 1)

        def forward(self, x):
            a = torch.softmax(self.linear2(torch.tanh(self.linear1(x))), dim=2)
            mean = torch.sum(a * x, dim=2)
            var = torch.sum(a * x * x, dim=2) - mean * mean
            return torch.cat([mean, torch.sqrt(var.clamp(min=1e-9))], dim=1)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.feature_weight = nn.Parameter(torch.zeros(n_states))
            self.instance_norm = nn.InstanceNorm1d(feat_dim)
            self.layer1 = ConvReluBn(feat_dim, channels, 5, 2)
            self.layer2, self.layer3, self.layer4 = Block(channels, 2), Block(channels, 3), Block(channels, 4)
            self.conv = nn.Conv1d(3 * channels, 1536, 1)
            self.pooling = Pool(1536)
            self.bn = nn.BatchNorm1d(3072)
            self.linear = nn.Linear(3072, emb_dim)

        def forward(self, states):  # states: [n_states, B, T, feat_dim]
            w = torch.softmax(self.feature_weight, dim=-1).view(-1, 1, 1, 1)
            x = self.instance_norm((w * states).sum(dim=0).transpose(1, 2) + 1e-6)
            o1 = self.layer1(x)
            o2 = self.layer2(o1)
            o3 = self.layer3(o2)
            o4 = self.layer4(o3)
            out = F.relu(self.conv(torch.cat([o2, o3, o4], dim=1)))
            return self.linear(self.bn(self.pooling(out)))

    return Head()


class WavLMEcapa:
    """The SIM model: ``embed(wav16k) -> 256-d numpy embedding``."""

    def __init__(self, state: dict, device: str = "cpu"):
        import torch
        from transformers import WavLMModel

        trunk_src = {k.removeprefix("feature_extract.model."): v for k, v in state.items() if k.startswith("feature_extract.model.")}
        if not trunk_src:
            raise CbxError("WavLM-ECAPA checkpoint: no 'feature_extract.model.*' tensors (not the UniSpeech SV layout)")
        self.config = wavlm_config_from(trunk_src)
        self.trunk = WavLMModel(self.config)
        mapped = {}
        for k, v in trunk_src.items():
            t = unispeech_to_transformers(k)
            if t is not None:
                mapped[t] = v
        _load_strict(self.trunk, mapped, "WavLM trunk")
        head_src = {k: v for k, v in state.items() if not k.startswith("feature_extract.")}
        n_states = head_src["feature_weight"].shape[0] if "feature_weight" in head_src else self.config.num_hidden_layers + 1
        self.head = _build_head(self.config.hidden_size, n_states, channels=head_src["layer1.conv.weight"].shape[0],
                                emb_dim=head_src["linear.weight"].shape[0])
        extra = sorted(k for k in head_src if k.startswith(("projection.", "loss.")))  # the training classifier
        _load_strict(self.head, {k: v for k, v in head_src.items() if k not in extra}, "ECAPA head")
        self.device = device
        self.trunk.eval().to(device)
        self.head.eval().to(device)
        self._torch = torch

    def embed(self, wav16k: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.as_tensor(np.asarray(wav16k, dtype=np.float32), device=self.device)[None]
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)  # WavLM-Large's input normalization
        with torch.inference_mode():
            states = torch.stack(self.trunk(x, output_hidden_states=True).hidden_states, dim=0)
            return self.head(states)[0].float().cpu().numpy().astype(np.float64)


def _load_strict(module, state: dict, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state) - {k for k in own if k.endswith("num_batches_tracked")})
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CbxError(f"WavLM-ECAPA checkpoint: {what} does not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CbxError(f"WavLM-ECAPA checkpoint: {what} tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    module.load_state_dict({**{k: own[k] for k in own if k.endswith("num_batches_tracked")}, **state}, strict=True)


def load(checkpoint: str | None, device: str = "cpu") -> WavLMEcapa:
    """The model from ``checkpoint`` (or ``$CBX_WAVLM_ECAPA_CKPT``); CbxError naming what is missing."""
    import torch

    path = checkpoint or os.environ.get(CHECKPOINT_ENV)
    if not path:
        raise CbxError(f"speaker backend 'wavlm-ecapa' needs its checkpoint: {CHECKPOINT_HINT}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise CbxError(f"{p}: WavLM-ECAPA checkpoint not found ({CHECKPOINT_HINT})")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise CbxError(f"{p}: cannot read the WavLM-ECAPA checkpoint ({type(e).__name__}: {e})") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise CbxError(f"{p}: expected a state dict (or {{'model': state dict}}) in the WavLM-ECAPA checkpoint")
    return WavLMEcapa(state, device)
