"""Batched S3Gen: speech tokens of B utterances (each with its own voice) -> mels -> waveforms.

Upstream ``S3Gen.inference`` asserts batch 1, so a batch of utterances costs B encoder passes
and B x steps x 2 (CFG) estimator calls. Here the same upstream modules run once per batch:

* :func:`cfm_inputs` does what ``CausalMaskedDiffWithXvec.inference`` does before the CFM
  solve (prompt tokens + new tokens through ``input_embedding``/``encoder``/``encoder_proj``,
  speaker projection, prompt mels as the condition) for B right-padded sequences. Padding is
  made invisible: attention masks hide padded keys, the estimator's convolutions are causal,
  and the one place upstream lets padding leak forward (the encoder's 3-token *look-ahead*
  convolution reads the embedded pad frames, which are not zero after the embedding's bias and
  norm) gets the pad frames zeroed, which is exactly what a lone utterance sees past its end.
* :func:`solve_cfm` is upstream's ``solve_euler`` (cosine t-schedule, CFG pair with zeroed
  conditions) or, for Turbo, ``basic_euler`` (MeanFlow, uniform schedule, no CFG), over the
  padded batch, with the noise passed in.
* :func:`cfm_noise` draws each utterance's noise from its own generator in upstream's order,
  so one utterance's result does not depend on what else is in the batch, and a lone
  utterance with seed s equals upstream run after ``torch.manual_seed(s)``.
* :func:`vocode` runs HiFT per utterance (its sine source draws random numbers and its
  non-causal convolutions would see padding), each under its own seed, then upstream's
  ``trim_fade``. HiFT is ~5% of S3Gen time, so little is lost by not batching it.

Tests: ``tests/engine/test_engine_s3gen_batch.py`` (batch vs alone vs upstream, 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MEL_BINS = 80
TOKEN_RATE = 25  # S3 speech tokens per second
TOKEN_MEL_RATIO = 2


@dataclass
class CFMInputs:
    """Padded inputs of the CFM estimator for B utterances (mel frames along the last axis).

    ``mu`` [B, 80, T] encoder output; ``mask`` [B, 1, T]; ``spks`` [B, 80] projected speaker
    embedding; ``cond`` [B, 80, T] prompt mels (zeros after each prompt); ``prompt_lens`` and
    ``out_lens`` (mel frames of prompt and of new speech per utterance, ints);
    ``token_lens`` (new speech tokens per utterance).
    """

    mu: torch.Tensor
    mask: torch.Tensor
    spks: torch.Tensor
    cond: torch.Tensor
    prompt_lens: list[int]
    out_lens: list[int]
    token_lens: list[int]

    @property
    def total_lens(self) -> list[int]:
        return [p + o for p, o in zip(self.prompt_lens, self.out_lens)]


def _s3gen(model):
    """Accept a ChatterboxModel (``.s3gen``) or an upstream S3Gen itself."""
    return model.s3gen if hasattr(model, "s3gen") else model


def _gen_dict(c) -> dict:
    """Accept upstream ``Conditionals`` (``.gen``) or its ``gen`` dict."""
    return c.gen if hasattr(c, "gen") else c


def cap_prompt(c, seconds: float | None) -> dict:
    """The S3Gen prompt of ``c`` (upstream ``Conditionals`` or its ``gen`` dict) cut to its first
    ``seconds``: ``TOKEN_RATE * seconds`` prompt tokens (rounded down, at least 1) and twice as many
    mel frames; the speaker embedding stays the whole reference's. ``None`` or a cap at least as
    long as the prompt returns it unchanged.

    Opt-in speed for quality (``SynthSettings.s3gen_prompt_s``): the flow attends over the prompt
    in every render, so its cost grows with the prompt. It is close to what a user giving a
    shorter reference clip gets upstream (whose mels are the same frames; its tokens and
    x-vector come from the shorter clip), not equal to it."""
    gen = _gen_dict(c)
    if seconds is None:
        return gen
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"prompt cap must be a positive number of seconds, got {seconds!r}")
    plen = int(torch.as_tensor(gen["prompt_token_len"]).reshape(-1)[0])
    n = max(1, int(seconds * TOKEN_RATE))
    if n >= plen:
        return gen
    out = dict(gen)
    out["prompt_token"] = torch.as_tensor(gen["prompt_token"])[..., :n]
    out["prompt_token_len"] = torch.full_like(torch.as_tensor(gen["prompt_token_len"]), n)
    feat = torch.as_tensor(gen["prompt_feat"])
    out["prompt_feat"] = feat[..., : TOKEN_MEL_RATIO * n, :]
    if out.get("prompt_feat_len") is not None:
        out["prompt_feat_len"] = torch.full_like(torch.as_tensor(gen["prompt_feat_len"]), TOKEN_MEL_RATIO * n)
    return out


def _encode(encoder, xs: torch.Tensor, xs_lens: torch.Tensor):
    """``UpsampleConformerEncoder.forward`` with pad frames zeroed before the look-ahead conv."""
    from cbx.engine.upstream import make_pad_mask
    from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask

    T = xs.size(1)
    masks = ~make_pad_mask(xs_lens, T).unsqueeze(1)
    xs, pos_emb, masks = encoder.embed(xs, masks)
    xs = xs * masks.transpose(1, 2).to(xs.dtype)
    chunk = add_optional_chunk_mask(xs, masks, False, False, 0, encoder.static_chunk_size, -1)
    xs = encoder.pre_lookahead_layer(xs)
    xs = encoder.forward_layers(xs, chunk, pos_emb, masks)
    xs = xs.transpose(1, 2).contiguous()
    xs, xs_lens = encoder.up_layer(xs, xs_lens)
    xs = xs.transpose(1, 2).contiguous()
    T = xs.size(1)
    masks = ~make_pad_mask(xs_lens, T).unsqueeze(1)
    xs, pos_emb, masks = encoder.up_embed(xs, masks)
    chunk = add_optional_chunk_mask(xs, masks, False, False, 0, encoder.static_chunk_size * encoder.up_layer.stride, -1)
    xs = encoder.forward_up_layers(xs, chunk, pos_emb, masks)
    if encoder.normalize_before:
        xs = encoder.after_norm(xs)
    return xs, masks


@torch.inference_mode()
def cfm_inputs(model, speech_tokens_list, conds_list, encoder=None) -> CFMInputs:
    """Encoder pass for B utterances: ``speech_tokens_list[i]`` (1-D LongTensor of valid speech
    tokens) spoken in the voice ``conds_list[i]`` (upstream ``Conditionals`` or its ``gen`` dict).
    ``encoder``: a low-precision copy of the flow's encoder (:func:`low_precision_encoder`) to
    run in its place under autocast; its output comes back as float32.
    """
    s3 = _s3gen(model)
    flow = s3.flow
    if len(speech_tokens_list) != len(conds_list) or not speech_tokens_list:
        raise ValueError("cfm_inputs needs one voice per utterance and at least one utterance")
    p0 = next(flow.parameters())
    device, dtype = p0.device, p0.dtype
    seqs, prompt_lens, token_lens, embs, feats = [], [], [], [], []
    for tokens, c in zip(speech_tokens_list, conds_list):
        gen = _gen_dict(c)
        tokens = torch.as_tensor(tokens).reshape(-1).to(device=device, dtype=torch.long)
        if tokens.numel() == 0:
            raise ValueError("an utterance has no speech tokens")
        ptok = torch.as_tensor(gen["prompt_token"]).reshape(-1).to(device=device, dtype=torch.long)
        plen = int(torch.as_tensor(gen["prompt_token_len"]).reshape(-1)[0])
        seqs.append(torch.cat([ptok[:plen], tokens]))
        token_lens.append(tokens.numel())
        feat = torch.as_tensor(gen["prompt_feat"]).to(device=device, dtype=dtype)
        feats.append(feat.reshape(-1, feat.shape[-1]))  # [mel_len1, 80]
        prompt_lens.append(feats[-1].shape[0])
        embs.append(torch.as_tensor(gen["embedding"]).reshape(1, -1).to(device=device, dtype=dtype))
    B = len(seqs)
    lens = torch.tensor([s.numel() for s in seqs], device=device)
    tok = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    in_mask = (torch.arange(tok.shape[1], device=device)[None] < lens[:, None]).unsqueeze(-1).to(dtype)
    x = flow.input_embedding(tok) * in_mask
    if encoder is None:
        h, h_masks = _encode(flow.encoder, x, lens)
    else:
        from cbx.engine.t3_decode import autocast

        with autocast(device, next(encoder.parameters()).dtype):
            h, h_masks = _encode(encoder, x, lens)
        h = h.to(dtype)
    h_lens = h_masks.sum(dim=-1).reshape(-1)
    h = flow.encoder_proj(h)  # [B, T, 80]
    T = h.shape[1]
    spks = flow.spk_embed_affine_layer(F.normalize(torch.cat(embs), dim=1))
    cond = torch.zeros(B, T, flow.output_size, device=device, dtype=h.dtype)
    out_lens = []
    for i, feat in enumerate(feats):
        cond[i, : feat.shape[0]] = feat
        out_lens.append(int(h_lens[i]) - feat.shape[0])
    mask = (torch.arange(T, device=device)[None] < h_lens[:, None]).unsqueeze(1).to(h.dtype)
    return CFMInputs(
        mu=h.transpose(1, 2).contiguous(),
        mask=mask,
        spks=spks,
        cond=cond.transpose(1, 2).contiguous(),
        prompt_lens=prompt_lens,
        out_lens=out_lens,
        token_lens=token_lens,
    )


def cfm_noise(inputs: CFMInputs, generators, meanflow: bool, device=None, dtype=torch.float32) -> torch.Tensor:
    """Padded noise [B, 80, T]: utterance i drawn from ``generators[i]`` (a ``torch.Generator``
    or an int seed) in upstream's order, so it equals upstream's noise after
    ``torch.manual_seed(seed)`` (MeanFlow: ``flow_inference`` first draws the new-speech part,
    then ``randn_like`` the whole; the first draw overwrites the tail of the second)."""
    device = device if device is not None else inputs.mu.device
    B, T = inputs.mu.shape[0], inputs.mu.shape[2]
    noise = torch.zeros(B, MEL_BINS, T, dtype=dtype, device=device)
    for i, g in enumerate(generators):
        if not isinstance(g, torch.Generator):
            g = torch.Generator(device="cpu").manual_seed(int(g))
        total = inputs.total_lens[i]
        gdev = g.device
        if meanflow:
            tail = torch.randn(1, MEL_BINS, TOKEN_MEL_RATIO * inputs.token_lens[i], generator=g, device=gdev)
            z = torch.randn(1, MEL_BINS, total, generator=g, device=gdev)
            z[..., total - tail.shape[-1]:] = tail
        else:
            z = torch.randn(1, MEL_BINS, total, generator=g, device=gdev)
        noise[i, :, :total] = z[0].to(device=device, dtype=dtype)
    return noise


@torch.inference_mode()
def solve_cfm(estimator, inputs: CFMInputs, noise: torch.Tensor, n_steps: int, cfg_rate: float, meanflow: bool):
    """Integrate the flow from ``noise`` to mels [B, 80, T] (padded; crop with :func:`crop_mels`).

    Original: Euler over the cosine schedule 1 - cos(pi/2 t), each step a CFG pair (conditions
    zeroed in the second half) mixed as (1 + cfg) * cond - cfg * uncond; upstream's
    ``solve_euler``. MeanFlow (Turbo): Euler over a uniform schedule with the interval end ``r``
    given to the estimator and no CFG; upstream's ``basic_euler``. Runs in the estimator's dtype.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    est_dtype = estimator.dtype if hasattr(estimator, "dtype") else next(estimator.parameters()).dtype
    in_dtype = noise.dtype
    x, mu, mask, spks, cond = (t.to(est_dtype) for t in (noise, inputs.mu, inputs.mask, inputs.spks, inputs.cond))
    B = x.shape[0]
    t_span = torch.linspace(0, 1, n_steps + 1, device=x.device, dtype=inputs.mu.dtype)
    if not meanflow:
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
    t_span = t_span.to(est_dtype)
    use_cfg = (not meanflow) and cfg_rate != 0.0
    if use_cfg:
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        mask_in = torch.cat([mask, mask])
    for t, r in zip(t_span[:-1], t_span[1:]):
        if use_cfg:
            tt = t.expand(2 * B)
            d = estimator(x=torch.cat([x, x]), mask=mask_in, mu=mu_in, t=tt, spks=spks_in, cond=cond_in,
                          r=r.expand(2 * B) if meanflow else None)
            d, d_uncond = d[:B], d[B:]
            d = (1.0 + cfg_rate) * d - cfg_rate * d_uncond
        else:
            d = estimator(x=x, mask=mask, mu=mu, t=t.expand(B), spks=spks, cond=cond,
                          r=r.expand(B) if meanflow else None)
        x = x + (r - t) * d
    return x.to(in_dtype)


def crop_mels(mels: torch.Tensor, inputs: CFMInputs) -> list[torch.Tensor]:
    """Per-utterance new-speech mels [80, out_len] (the prompt part and padding removed)."""
    return [mels[i, :, p : p + o] for i, (p, o) in enumerate(zip(inputs.prompt_lens, inputs.out_lens))]


SAMPLES_PER_TOKEN = 960  # 24 kHz / 25 speech tokens per second


def trim_last_token(model: Any, wav: np.ndarray, n_tokens: int) -> np.ndarray:
    """The waveform of ``n_tokens`` S3Gen tokens without the last token's audio, for a model
    whose checkpoint asks for it (``meta["trim_last_token"]``: Multilingual V3, whose final
    token before EOS decodes to noise); unchanged otherwise. At least one token is kept."""
    if not (getattr(model, "meta", None) or {}).get("trim_last_token") or n_tokens <= 0:
        return wav
    return wav[: max(1, int(n_tokens) - 1) * SAMPLES_PER_TOKEN]


# HiFT's convolution stacks: what a low-precision HiFT runs in bf16 (see low_precision_hift).
HIFT_LOW_PRECISION = ("conv_pre", "ups", "resblocks", "source_downs", "source_resblocks", "conv_post")


class CastIO(torch.nn.Module):
    """``inner`` (weights in ``dtype``) run on its input cast to ``dtype``; output float32."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


def _bake_weight_norm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (a copy) with every weight-normed convolution replaced by a plain one holding
    the weight it computes (same values; computed once instead of at every call).

    Not ``parametrize.remove_parametrizations``: on a deep copy it deletes the property from the
    parametrized class the copy shares with the original, which breaks the original module."""
    from torch.nn.utils import parametrize

    def plain(sub: torch.nn.Module) -> torch.nn.Module:
        base = type(sub).__bases__[0]
        out = base.__new__(base)
        out.__dict__.update(sub.__dict__)
        out._modules = {k: v for k, v in sub._modules.items() if k != "parametrizations"}
        out._parameters = dict(sub._parameters)
        out._parameters["weight"] = torch.nn.Parameter(sub.weight.detach().clone(), requires_grad=False)
        return out

    if parametrize.is_parametrized(module):
        return plain(module)
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and parametrize.is_parametrized(child):
                parent._modules[name] = plain(child)
    return module


def low_precision_hift(hift: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A copy of HiFT whose convolution stacks (:data:`HIFT_LOW_PRECISION`: ~all of its time)
    run in ``dtype`` while the F0 predictor, the sine source (phase accumulation over 24 kHz
    samples: bf16 would detune it), the STFT/iSTFT and the magnitude/phase maths stay float32.
    Each stack sits in :class:`CastIO`, so the tensors between them are float32 exactly where
    upstream's code runs its own elementwise operations. Error bounds: docs/CONTRACTS.md."""
    import copy

    h = copy.deepcopy(hift)
    for name in HIFT_LOW_PRECISION:
        mod = getattr(h, name)
        if isinstance(mod, torch.nn.ModuleList):
            for i in range(len(mod)):
                mod[i] = CastIO(_bake_weight_norm(mod[i]).to(dtype), dtype)
        else:
            setattr(h, name, CastIO(_bake_weight_norm(mod).to(dtype), dtype))
    return h.eval()


def low_precision_encoder(encoder: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A copy of the flow's conformer encoder cast to ``dtype`` (run under autocast by
    :func:`cfm_inputs`, as the engine runs its bf16 CFM estimator)."""
    import copy

    return copy.deepcopy(encoder).to(dtype).eval()


@torch.inference_mode()
def vocode(model, mels, lens=None, seeds=None, trim_fade: bool = True, hift=None) -> list[np.ndarray]:
    """HiFT per utterance -> list of float32 waveforms at 24 kHz.

    ``mels`` is a list of [80, L_i] tensors, or a padded [B, 80, L] tensor with ``lens``.
    ``seeds[i]`` seeds the sine source's random phase and noise for utterance i (None: the
    global RNG, as upstream). The global RNG state is restored afterwards when seeds are given.
    ``hift``: a stand-in for the model's HiFT (:func:`low_precision_hift`).
    """
    s3 = _s3gen(model)
    if torch.is_tensor(mels) and mels.dim() == 3:
        lens = [mels.shape[-1]] * mels.shape[0] if lens is None else [int(n) for n in lens]
        mels = [mels[i, :, :n] for i, n in enumerate(lens)]
    hift = s3.mel2wav if hift is None else hift
    p0 = next(hift.f0_predictor.parameters()) if hasattr(hift, "f0_predictor") else next(hift.parameters())
    out = []
    for i, mel in enumerate(mels):
        mel = mel.to(device=p0.device, dtype=p0.dtype).reshape(1, MEL_BINS, -1)
        cache = torch.zeros(1, 1, 0, device=p0.device, dtype=p0.dtype)
        if seeds is not None:
            devices = [p0.device] if p0.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(seeds[i]))
                wav, _ = hift.inference(speech_feat=mel, cache_source=cache)
        else:
            wav, _ = hift.inference(speech_feat=mel, cache_source=cache)
        if trim_fade:
            fade = s3.trim_fade.to(wav.dtype)
            n = min(fade.numel(), wav.shape[-1])
            wav[:, :n] *= fade[:n]
        out.append(wav[0].float().cpu().numpy())
    return out


@torch.inference_mode()
def synthesize_mels(model, speech_tokens_list, conds_list, generators, n_steps=None, cfg_rate=None, meanflow=None):
    """Convenience: cfm_inputs -> cfm_noise -> solve_cfm -> crop. Defaults are upstream's
    (10 steps and CFG 0.7; MeanFlow: 2 steps, no CFG)."""
    s3 = _s3gen(model)
    meanflow = bool(getattr(s3, "meanflow", False)) if meanflow is None else meanflow
    n_steps = (2 if meanflow else 10) if n_steps is None else n_steps
    cfg_rate = s3.flow.decoder.inference_cfg_rate if cfg_rate is None else cfg_rate
    inputs = cfm_inputs(s3, speech_tokens_list, conds_list)
    noise = cfm_noise(inputs, generators, meanflow, dtype=inputs.mu.dtype)
    mels = solve_cfm(s3.flow.decoder.estimator, inputs, noise, n_steps, cfg_rate, meanflow)
    return crop_mels(mels, inputs)
