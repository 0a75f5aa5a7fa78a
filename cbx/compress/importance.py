"""Importance of T3 layers, heads and FFN channels and of CFM transformer blocks, from data.

Why from forward passes on the conditioned model: what can be removed is what the model does
not use on its real job. The inputs are GPTQ's calibration (:mod:`cbx.compress.calibration`):
T3 samples its own speech tokens for real sentences in the calibration voices, then one
teacher-forced pass over ``[conditioning | text | speech]`` (cond and uncond CFG rows) runs
with hooks. For the CFM estimator the same speech tokens go through S3Gen's encoder and the
flow is integrated (the model's own steps and CFG) with hooks on every transformer block.

* Depth, ShortGPT's block influence (Men et al. 2024): ``1 - cos(h_in, h_out)`` of a layer's
  residual stream, averaged over tokens. Near 0: the layer hardly changes its input.
* Width, Minitron's activation importance (Muralidharan et al. 2024): an FFN channel's score
  is the L2 norm over tokens of its activation (the input of ``down_proj``); a head's score is
  the L2 norm over tokens of its attention output (its slice of the input of ``o_proj``).
  A grouped-query KV group scores the sum of its query heads.

Scores are float64 on the CPU; hooks only read activations, so importance leaves the model as
it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from cbx.compress import prune as P


@dataclass
class Importance:
    """Scores of one model on one calibration set (indices are the model's current ones)."""

    t3_layers: list[float] = field(default_factory=list)  # block influence per layer
    t3_heads: list[Tensor] = field(default_factory=list)  # per layer: score per query head
    t3_ffn: list[Tensor] = field(default_factory=list)  # per layer: score per FFN channel
    cfm_blocks: dict[str, float] = field(default_factory=dict)  # block influence per transformer block
    n_sequences: int = 0
    n_tokens: int = 0

    def kv_group_scores(self, layer: int, n_kv: int) -> Tensor:
        h = self.t3_heads[layer]
        return h.view(n_kv, -1).sum(1)


@dataclass(frozen=True)
class CalibSpec:
    texts: int = 8
    max_speech_tokens: int = 150
    seed: int = 0
    voices: tuple[str, ...] = ("builtin",)


class _Stat:
    def __init__(self) -> None:
        self.sum = None
        self.n = 0

    def add(self, v: Tensor, n: int) -> None:
        v = v.detach().double().cpu()
        self.sum = v if self.sum is None else self.sum + v
        self.n += n


def _hidden(args, kwargs, name="hidden_states"):
    return args[0] if args else kwargs[name]


def _out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def calibration_sequences(model, spec: CalibSpec):
    from cbx.compress.calibration import CALIBRATION_TEXTS, calibration_voices, generate_sequences

    voices = calibration_voices(model, spec.voices)
    return generate_sequences(model, CALIBRATION_TEXTS[: spec.texts], spec.max_speech_tokens, spec.seed, voices)


@torch.inference_mode()
def t3_importance(model, seqs) -> Importance:
    """Block influence per layer and activation importance per head and FFN channel of T3."""
    from cbx.compress.calibration import _teacher_forced_pass

    t3 = model.t3
    layers = P._layers(t3)
    hd = P.head_dim_of(t3)
    infl = [_Stat() for _ in layers]
    heads = [_Stat() for _ in layers]
    ffn = [_Stat() for _ in layers]
    handles = []

    def layer_hook(i):
        def fn(mod, args, kwargs, output):
            x_in, x_out = _hidden(args, kwargs), _out(output)
            bi = P.block_influence(x_in, x_out)
            infl[i].add(bi.sum(), bi.numel())
        return fn

    def o_hook(i):
        def fn(mod, args):
            x = args[0].double()
            sq = x.pow(2).flatten(0, -2).sum(0)  # per input column
            heads[i].add(sq.view(-1, hd).sum(1), x.flatten(0, -2).shape[0])
        return fn

    def down_hook(i):
        def fn(mod, args):
            x = args[0].double()
            ffn[i].add(x.pow(2).flatten(0, -2).sum(0), x.flatten(0, -2).shape[0])
        return fn

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
        _teacher_forced_pass(model, seqs)
    finally:
        for h in handles:
            h.remove()
    return Importance(
        t3_layers=[float(s.sum / max(s.n, 1)) for s in infl],
        t3_heads=[s.sum.sqrt() for s in heads],
        t3_ffn=[s.sum.sqrt() for s in ffn],
        n_sequences=len(seqs),
        n_tokens=sum(int(s.text_tokens.shape[1] + s.speech_tokens.shape[1]) for s in seqs),
    )


@torch.inference_mode()
def cfm_importance(model, seqs, n_steps: int | None = None, seed: int = 0) -> dict[str, float]:
    """Block influence of every CFM transformer block while the flow makes the mels of ``seqs``."""
    from cbx.engine import s3gen_batch as SB
    from cbx.engine.t3_decode import speech_only

    s3 = model.s3gen
    est = s3.flow.decoder.estimator
    meanflow = bool(getattr(s3, "meanflow", False))
    if n_steps is None:
        n_steps = int(model.meta.get("cfm_steps") or (2 if meanflow else 10))
    cfg_rate = 0.0 if meanflow else float(s3.flow.decoder.inference_cfg_rate)
    names = P.cfm_blocks(est)
    stats = {n: _Stat() for n in names}
    handles = []

    def hook(name):
        def fn(mod, args, kwargs, output):
            bi = P.block_influence(_hidden(args, kwargs), _out(output))
            stats[name].add(bi.sum(), bi.numel())
        return fn

    try:
        for n in names:
            handles.append(est.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True))
        for k, s in enumerate(seqs):
            toks = speech_only(s.speech_tokens[0, 1:])
            if toks.numel() < 2:
                continue
            conds = s.conds if s.conds is not None else model.builtin_conds
            inputs = SB.cfm_inputs(model, [toks], [conds])
            noise = SB.cfm_noise(inputs, [seed + k], meanflow, dtype=inputs.mu.dtype)
            SB.solve_cfm(est, inputs, noise, n_steps, cfg_rate, meanflow)
    finally:
        for h in handles:
            h.remove()
    return {n: float(st.sum / max(st.n, 1)) for n, st in stats.items() if st.n}


def importance(model, spec: CalibSpec = CalibSpec(), parts: Sequence[str] = ("t3", "cfm"), seqs=None) -> Importance:
    seqs = seqs if seqs is not None else calibration_sequences(model, spec)
    imp = t3_importance(model, seqs) if "t3" in parts and not model.t3.is_gpt else Importance(n_sequences=len(seqs))
    if "cfm" in parts:
        imp.cfm_blocks = cfm_importance(model, seqs, seed=spec.seed)
    return imp


def report(imp: Importance, top: int = 8) -> str:
    """The ranking as text: least important first (what pruning removes first)."""
    lines = [f"calibration: {imp.n_sequences} sequences, {imp.n_tokens} T3 positions"]
    if imp.t3_layers:
        order = sorted(range(len(imp.t3_layers)), key=lambda i: imp.t3_layers[i])
        lines.append("T3 layers by block influence (1 - cos(in, out)), least important first:")
        lines.append("  rank  layer  influence")
        for r, i in enumerate(order):
            lines.append(f"  {r + 1:>4}  {i:>5}  {imp.t3_layers[i]:.6f}")
        lines.append("T3 attention heads and FFN channels by activation importance (L2 over tokens):")
        lines.append("  layer  weakest heads (score)           FFN channels: min / median / max  (< 1% of median)")
        for i, (h, f) in enumerate(zip(imp.t3_heads, imp.t3_ffn)):
            ho = torch.argsort(h)[:3].tolist()
            hs = ", ".join(f"{j} ({float(h[j]):.3g})" for j in ho)
            med = float(f.median())
            dead = int((f < 0.01 * med).sum())
            lines.append(f"  {i:>5}  {hs:<32} {float(f.min()):.3g} / {med:.3g} / {float(f.max()):.3g}  ({dead})")
    if imp.cfm_blocks:
        order = sorted(imp.cfm_blocks, key=imp.cfm_blocks.get)
        lines.append("CFM estimator transformer blocks by block influence, least important first:")
        for r, n in enumerate(order[: max(top, 1)] if len(order) > 2 * top else order):
            lines.append(f"  {r + 1:>4}  {n:<22} {imp.cfm_blocks[n]:.6f}")
        if len(order) > 2 * top:
            lines.append(f"  ... {len(order) - top} more; most important: {order[-1]} ({imp.cfm_blocks[order[-1]]:.6f})")
    return "\n".join(lines)


def to_json(imp: Importance) -> dict:
    d = dataclasses.asdict(imp)
    d["t3_heads"] = [t.tolist() for t in imp.t3_heads]
    d["t3_ffn"] = [t.tolist() for t in imp.t3_ffn]
    return d
