"""Batched T3 decoding: many utterances in ONE decode loop, faithful to upstream's sampling.

Upstream's ``T3.inference`` / ``inference_turbo`` decode one utterance at a time (plus its CFG
pair), grow a Hugging Face dynamic cache, and stop with a host sync on every token. This module
decodes B utterances together on the same upstream modules (``t3.tfmr`` layers, ``cond_enc``,
embeddings, ``speech_head``), following gpt-fast's ``generate.py``:

* Each utterance contributes a (cond, uncond) row pair when classifier-free guidance is on
  (original / multilingual with ``cfg_weight > 0``): rows ``2i`` and ``2i+1``. Prompts of
  different lengths are LEFT-padded; every row carries its own position ids (RoPE for Llama,
  absolute ``wpe`` for GPT-2) and a key-padding mask, so each row computes what its unpadded
  single run computes (up to floating-point summation order).
* The prefill (:mod:`cbx.engine.t3_prefill`) computes each voice's conditioning prefix once
  (for both CFG rows, every row with that voice, and across calls through a ``PrefixCache``)
  and prefills only the rest of each prompt; rows are laid out ``[prefix | pad | suffix]``.
* The KV cache is preallocated (:class:`StaticKVCache`) and written with ``index_copy_`` at a
  position tensor; the per-token function :func:`_backbone` has fixed shapes when called with
  ``kv_len=None`` and no data-dependent Python control flow, so it can be wrapped by
  ``torch.compile``/CUDA graphs (``static_shapes``/``compile_backend``: the cache is then
  allocated for the full length up front, rounded up to whole 256-slot chunks so that texts of
  different lengths share one compiled graph). In eager mode (the default) attention reads only the
  filled part of the cache, which starts at prompt + 256 slots and doubles when full, so short
  utterances never pay for ``max_new_tokens`` of memory.
* Finished rows keep computing (masked); the "all done?" test syncs with the host only every
  ``check_every`` tokens. There is no per-token ``.item()``.
* Pruned backbones (:mod:`cbx.compress.prune`) decode as they are: the layers present are run
  (fewer than the config was built with), and the cache holds each layer's own KV-head count
  (width pruning keeps different numbers of heads per layer).
* Every utterance samples from its own ``torch.Generator`` seeded by the caller, so its tokens
  do not depend on what else is in the batch.
* Logit processing replicates upstream exactly, using the same Hugging Face warpers:
  original/multilingual ``T3.inference``: CFG ``cond + w*(cond-uncond)``, repetition penalty
  (BOS counts as generated), temperature, min_p, top_p; Turbo ``inference_turbo``: temperature,
  top_k, top_p, repetition penalty (step 0 penalises the start token only, later steps the
  generated tokens only). The repetition penalty uses a "seen" mask instead of a growing id
  list: same arithmetic, fixed shape.

Deliberate differences from upstream (documented, tested where it matters):

* ``temperature == 0`` means greedy: the processed logits (temperature 1) are arg-maxed.
  Upstream has no greedy mode (it would divide by zero).
* ``cfg_weight == 0`` on the original model decodes without the uncond row (upstream crashes:
  its BOS batch is always 2). The result is what CFG weight 0 means: the cond logits.
* The multilingual model's ``AlignmentStreamAnalyzer`` (which may force EOS early when the
  attention wanders, and registers hooks it never removes) is left out.
* ``force_tokens`` (benchmarks) decodes exactly that many tokens: ids >= 6561 (EOS and the
  other special ids) are masked out, so every row yields that many real speech tokens.
* Fused projections (Llama T3s): each layer's q/k/v and gate/up projections run as ONE matrix
  product each (:func:`fusion_plan`, :func:`fuse_linears`; quantized modules fuse through their
  own ``fuse``), and the parts' weights become views of the fused storage, so nothing is held
  twice. Same weights, same arithmetic per output; only the float summation order of a wider
  GEMM may differ. Why: a decode step is 2 rows, where each kernel call is mostly fixed cost
  (int4 step: 211 -> 121 kernel calls).
* ``compile_backend="cudagraphs"`` on a CUDA device captures the decode step (backbone and
  speech head) in a ``torch.cuda.CUDAGraph`` ourselves (:class:`CUDAGraphStep`) instead of
  handing it to ``torch.compile``: dynamo's cudagraphs backend skips graphs whose inputs are
  mutated, and the KV cache is written in place on every step, so it silently ran eager. The
  static cache is allocated before capture and never reallocated (static shapes), so the graph
  owns fixed addresses; each step copies its four small inputs into the graph's buffers and
  replays. Same kernels, same order: the same tokens as eager (CUDA test).
* Decode steps (<= :data:`DECODE_ATTENTION_MAX_Q` queries) attend with three plain ops in
  float32 (:func:`_decode_attention`: Hugging Face's eager arithmetic, which upstream's
  inference runs, without rounding scores and probabilities to bf16 in between); prefill keeps
  SDPA. CPU SDPA's flash kernel was 2-5x slower for one query, bf16 GEMV ~2x slower.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cbx.errors import CbxError

SPEECH_VOCAB = 6561  # real S3 tokens are 0..6560; the rest are start/stop/unused ids
CACHE_CHUNK = 256
# Query lengths up to this use :func:`_decode_attention`; longer ones (prefill) use SDPA.
DECODE_ATTENTION_MAX_Q = 4


# True while the prefill of a decode asked to compile (``compile_backend``) runs: modules may
# then trade a one-off ``torch.compile`` for a faster path on many-row inputs (the CPU int4
# module's unpacked bf16 GEMM, :class:`cbx.compress.modules.Int4Linear`). Off otherwise: a
# one-shot synthesis would pay more compiling (seconds per weight shape) than it saves.
_COMPILE_MANY_ROWS: contextvars.ContextVar[bool] = contextvars.ContextVar("cbx_compile_many_rows", default=False)


def compile_many_rows() -> bool:
    """Whether the running forward may compile a faster many-row path (see above)."""
    return _COMPILE_MANY_ROWS.get()


@dataclass
class DecodeSettings:
    """Sampling settings shared by all rows of one decode.

    Turbo ignores ``cfg_weight`` and ``min_p`` (as upstream does); the original model ignores
    ``top_k``. ``exaggeration`` None keeps each condition's own ``emotion_adv``.
    """

    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    top_k: int = 0
    repetition_penalty: float = 1.2
    cfg_weight: float = 0.5
    exaggeration: float | None = None
    max_new_tokens: int = 1000
    force_tokens: int | None = None
    check_every: int = 16
    compute_dtype: torch.dtype | None = None
    static_shapes: bool = False
    compile_backend: str | None = None
    # Prefill (cbx.engine.t3_prefill): compute each voice prefix's keys/values once and prefill
    # only the rest of each prompt; run the prefill in this dtype (None: the decode's own).
    share_prefix: bool = True
    prefill_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature)),
            ("top_p", 0 < self.top_p <= 1),
            ("min_p", 0 <= self.min_p <= 1),
            ("top_k", self.top_k >= 0),
            ("repetition_penalty", self.repetition_penalty > 0),
            ("cfg_weight", self.cfg_weight >= 0),
            ("max_new_tokens", self.max_new_tokens >= 1),
            ("force_tokens", self.force_tokens is None or self.force_tokens >= 1),
            ("check_every", self.check_every >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise CbxError(f"decode setting '{name}'={getattr(self, name)!r} is out of range")
        if self.prefill_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise CbxError(f"decode setting 'prefill_dtype'={self.prefill_dtype!r}: must be None, float32, "
                           "bfloat16 or float16")

    @property
    def greedy(self) -> bool:
        """``temperature == 0``: arg-max of the processed logits (upstream has no greedy mode)."""
        return self.temperature == 0


@dataclass
class T3Row:
    """One utterance: its T3 text token ids (with start/stop tokens where the variant has them,
    see :func:`cbx.engine.text.t3_text_tokens`), its upstream ``T3Cond`` (batch 1) and its seed."""

    text_tokens: Sequence[int] | Tensor
    cond: Any
    seed: int = 0


@dataclass
class DecodeOutput:
    """Per row: generated speech token ids before EOS (raw ids: may include ids >= 6561, which
    upstream filters before S3Gen, see :func:`speech_only`), and whether the row ended by EOS."""

    tokens: list[Tensor]
    finished: list[bool]
    steps: int
    final: bool = True  # False on the partial yields of generate_stream


def speech_only(tokens: Tensor) -> Tensor:
    """Drop non-speech ids (>= 6561) as upstream's ``generate()`` does before S3Gen."""
    return tokens[tokens < SPEECH_VOCAB]


# ----------------------------------------------------------------------------- KV cache


class StaticKVCache:
    """Preallocated keys/values ``[layers][rows, kv_heads, capacity, head_dim]``.

    Written at explicit positions with ``index_copy_`` (gpt-fast style) so a compiled step sees
    the same tensors every call. :meth:`ensure` grows the capacity by whole chunks in eager mode.
    ``kv_heads`` is one count for every layer or one per layer (width-pruned models keep
    different numbers of heads in different layers).
    """

    def __init__(self, n_layers: int, rows: int, kv_heads: int | Sequence[int], head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        heads = [kv_heads] * n_layers if isinstance(kv_heads, int) else list(kv_heads)
        if len(heads) != n_layers:
            raise ValueError(f"{len(heads)} KV head counts for {n_layers} layers")
        self.k = [torch.zeros((rows, h, capacity, head_dim), dtype=dtype, device=device) for h in heads]
        self.v = [torch.zeros((rows, h, capacity, head_dim), dtype=dtype, device=device) for h in heads]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def ensure(self, length: int, limit: int | None = None) -> None:
        """Grow to hold ``length`` positions: double (at most ``limit``), copying what is there."""
        if length <= self.capacity:
            return
        new_cap = max(length, min(2 * self.capacity, limit or 2 * self.capacity))
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = t.new_zeros(*t.shape[:2], new_cap, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                store[i] = grown


# ----------------------------------------------------------------------------- backbone


def _backbone_dims(t3: Any) -> tuple[int, list[int], int]:
    """(layers, KV heads of each layer, head dim) of the backbone as it is now.

    Counted from the modules, not the config: a pruned backbone has fewer layers than its
    config was built with, and may keep different numbers of heads per layer
    (:mod:`cbx.compress.prune` sets ``num_key_value_heads`` on each attention it narrows).
    """
    cfg = t3.cfg
    if t3.is_gpt:
        heads = cfg.n_head
        return len(t3.tfmr.h), [heads] * len(t3.tfmr.h), cfg.hidden_size // heads
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    default = cfg.num_key_value_heads or heads
    per_layer = [int(getattr(layer.self_attn, "num_key_value_heads", default)) for layer in t3.tfmr.layers]
    return len(per_layer), per_layer, head_dim


def _attend(q: Tensor, k_all: Tensor, v_all: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention of ``q`` over the cache ``k_all``/``v_all``, which may be wider than ``q``
    (:func:`kv_cache_dtype`): decode steps widen to float32 anyway, SDPA gets ``q``'s dtype."""
    if q.shape[2] <= DECODE_ATTENTION_MAX_Q:
        return _decode_attention(q, k_all, v_all, mask, scale)
    k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
    # enable_gqa: grouped-query attention (fewer KV heads) without materialising repeated keys.
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None], scale=scale,
                                          enable_gqa=k_all.shape[1] != q.shape[1])


def _decode_attention(q: Tensor, k_all: Tensor, v_all: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention of a few queries over the cache as three plain ops in float32: ``q @ k^T``,
    softmax, ``p @ v``, rounded to ``q``'s dtype once at the end.

    Hugging Face's ``eager_attention_forward`` (the path upstream's ``T3.inference`` runs, since
    it asks for attentions) does the two products in the model dtype and the softmax in float32.
    Here the bf16 query and cache are widened to float32 first: bf16 x bf16 products are exact
    in float32, so the only difference is that the scores and probabilities are not rounded to
    bf16 between the ops (closer to the float32 result, tested against SDPA in float32). Why:
    CPU bf16 batched GEMV is slow for one query (q@k^T at 150 cached positions, 2 rows x 16
    heads: 129 us in bf16 against 47 us widening then multiplying in float32; whole attention
    177 -> 99 us per layer-step, 420 -> 211 us at 400 positions, this 2-core CPU), and CPU
    SDPA's flash kernel was slower still (0.36 ms at 190 positions). Grouped-query attention
    folds each KV head's query group into the query axis instead of repeating keys.
    ``mask`` (rows, q, kv) bool.

    Autocast is switched off inside: under ``torch.autocast(..., bfloat16)`` (how the synthesizer
    runs a bf16 T3) ``matmul`` is on autocast's low-precision list, so the two float32 products
    were silently cast back to bf16, which is both a different result from the same step without
    autocast and the slow path above (CPU bf16 ``bmm`` loops over the 32 row-heads: 26.8 of
    49.9 ms per token in a profile of the int4 stack decode, 2-core AVX2 CPU, loaded machine).
    """
    n, heads, q_len, d = q.shape
    kv_heads = k_all.shape[1]
    group = heads // kv_heads
    with torch.autocast(q.device.type, enabled=False):
        qg = q.reshape(n, kv_heads, group * q_len, d).float()
        scores = torch.matmul(qg, k_all.float().transpose(-1, -2))
        scores = scores.view(n, kv_heads, group, q_len, -1).mul_(scale)
        scores = scores.masked_fill_(~mask[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(n, kv_heads, group * q_len, -1)
        return torch.matmul(probs, v_all.float()).view(n, heads, q_len, d).to(q.dtype)


def _backbone(t3: Any, x: Tensor, pos_ids: Tensor, cache_pos: Tensor | None, mask: Tensor | None,
              cache: StaticKVCache | None, kv_len: int | None, plan: list[Any] | None = None,
              attention: Callable[[int, Tensor, Tensor, Tensor, float], Tensor] | None = None) -> Tensor:
    """Run the upstream backbone layers on ``x`` (rows, q, d); returns the final-norm hidden states.

    ``pos_ids`` (rows, q): each row's own positions; ``cache_pos`` (q,): cache slots to write;
    ``mask`` (rows, q, kv) bool: which cache slots each query may attend to; ``kv_len``: how
    much of the cache to read (None: all of it, fixed shapes for compiled steps); ``plan``:
    :func:`fusion_plan` (Llama), one matrix product for q/k/v and one for gate/up per layer.
    ``attention``: ``(layer, q, k, v, scale) -> out`` (each ``(rows, heads, q, head_dim)``) in
    place of the cached attention over ``cache`` (``cache_pos``, ``mask``, ``cache`` and
    ``kv_len`` then unused): the prefill runs two row layouts in one pass this way
    (:func:`cbx.engine.t3_prefill.prefill`).
    """
    n, q_len, _ = x.shape
    tf = t3.tfmr
    if t3.is_gpt:
        x = x + tf.wpe(pos_ids)
        for i, block in enumerate(tf.h):
            attn = block.attn
            h = block.ln_1(x)
            q, k, v = attn.c_attn(h).split(attn.split_size, dim=2)
            q, k, v = (t.view(n, q_len, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
            o = (attention(i, q, k, v, attn.scaling) if attention is not None
                 else _cached_attention(cache, i, q, k, v, cache_pos, mask, kv_len, attn.scaling))
            x = x + attn.c_proj(o.transpose(1, 2).reshape(n, q_len, -1))
            x = x + block.mlp(block.ln_2(x))
        return tf.ln_f(x)

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = tf.rotary_emb(x, pos_ids)
    for i, layer in enumerate(tf.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        fused = plan[i] if plan is not None else None
        if fused is not None and fused.qkv is not None:
            q, k, v = fused.qkv(h).split(fused.qkv_sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = (t.reshape(n, q_len, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = (attention(i, q, k, v, attn.scaling) if attention is not None
             else _cached_attention(cache, i, q, k, v, cache_pos, mask, kv_len, attn.scaling))
        x = x + attn.o_proj(o.transpose(1, 2).reshape(n, q_len, -1))
        h = layer.post_attention_layernorm(x)
        if fused is not None and fused.gate_up is not None:
            mlp = layer.mlp
            gate, up = fused.gate_up(h).split(fused.gate_up_sizes, dim=-1)
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        else:
            x = x + layer.mlp(h)
    return tf.norm(x)


# ----------------------------------------------------------------------------- fused projections


@dataclass
class _FusedLayer:
    """One Llama layer's fused projections (None where the layer's projections could not be
    fused) and the output widths to split them back into."""

    qkv: Any
    qkv_sizes: list[int]
    gate_up: Any
    gate_up_sizes: list[int]
    parts: list[tuple[Any, tuple[Any, ...]]] = dataclasses.field(default_factory=list)

    def report_kernels(self) -> None:
        """Copy the kernel path a fused module recorded (``cbx_kernel``, see
        :mod:`cbx.compress.kernels`) onto the modules it stands for, which did not run."""
        for fused, mods in self.parts:
            for attr in ("cbx_kernel", "cbx_kernel_fallback"):
                value = getattr(fused, attr, None)
                if value is not None:
                    for m in mods:
                        if getattr(m, attr, None) != value:
                            setattr(m, attr, value)


# t3 -> (signature of the projections it was built from, [_FusedLayer per layer]); held outside
# the module tree so that state dicts, weight counts and checkpoints never see it.
_FUSION: "weakref.WeakKeyDictionary[Any, tuple[tuple, list[_FusedLayer]]]" = weakref.WeakKeyDictionary()


def fuse_linears(mods: Sequence[torch.nn.Module]) -> torch.nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)`` with a single matrix product, or
    None when these modules cannot be fused.

    ``nn.Linear`` is fused here; any other class fuses through its own ``fuse(mods)``
    classmethod (the quantized modules of :mod:`cbx.compress.modules` have one). After a
    successful fusion the parts' weights are views into the fused module's storage: the
    weights exist once, and the parts still work on their own (state dicts, exports).
    """
    first = mods[0]
    if any(type(m) is not type(first) for m in mods):
        return None
    if type(first) is torch.nn.Linear:
        if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
               or m.weight.device != first.weight.device or (m.bias is None) != (first.bias is None) for m in mods):
            return None
        fused = torch.nn.Linear(first.in_features, sum(m.out_features for m in mods), bias=first.bias is not None,
                                device=first.weight.device, dtype=first.weight.dtype)
        fused.weight.data = torch.cat([m.weight.detach() for m in mods])
        if first.bias is not None:
            fused.bias.data = torch.cat([m.bias.detach() for m in mods])
        fused.requires_grad_(False)
        start = 0
        for m in mods:
            stop = start + m.out_features
            m.weight.data = fused.weight.data[start:stop]
            if m.bias is not None:
                m.bias.data = fused.bias.data[start:stop]
            start = stop
        return fused
    fuse = getattr(type(first), "fuse", None)
    return fuse(list(mods)) if callable(fuse) else None


def _signature(mods: Sequence[Any]) -> tuple:
    out = []
    for m in mods:
        w = getattr(m, "weight", None)
        out.append((id(m), w.data_ptr() if torch.is_tensor(w) else None, str(getattr(w, "dtype", None))))
    return tuple(out)


def fusion_plan(t3: Any) -> list[_FusedLayer] | None:
    """The fused q/k/v and gate/up projections of every Llama layer of ``t3`` (None for GPT-2
    T3s, whose ``c_attn`` is fused already). Built on first use and rebuilt whenever a
    projection module or its weight changed (a transform swapped it, a cast or a move)."""
    if t3.is_gpt:
        return None
    layers = list(t3.tfmr.layers)
    parts = [((l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj), (l.mlp.gate_proj, l.mlp.up_proj))
             for l in layers]
    sig = _signature([m for qkv, gu in parts for m in (*qkv, *gu)])
    cached = _FUSION.get(t3)
    if cached is not None and cached[0] == sig:
        return cached[1]
    plan = []
    # Ordinary tensors even when called under inference_mode: the parts' weights become views
    # of the fused ones, and a model trained later (healing) must not hold inference tensors.
    with torch.inference_mode(False), torch.no_grad():
        for qkv, gu in parts:
            f_qkv, f_gu = fuse_linears(qkv), fuse_linears(gu)
            done = [(f, mods) for f, mods in ((f_qkv, qkv), (f_gu, gu)) if f is not None]
            for f, mods in done:
                if any(getattr(m, "cbx_name", None) for m in mods):  # names in kernel warnings
                    f.cbx_name = "+".join(str(getattr(m, "cbx_name", "?")) for m in mods)
            plan.append(_FusedLayer(f_qkv, [m.out_features for m in qkv], f_gu, [m.out_features for m in gu], done))
    # Fusing re-pointed the parts' weights into the fused storage: sign what is there now.
    sig = _signature([m for qkv, gu in parts for m in (*qkv, *gu)])
    _FUSION[t3] = (sig, plan)
    return plan


def kv_cache_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype :func:`generate_stream` keeps its KV cache in: float32 on CPU, else the compute dtype.

    Decode steps attend in float32 (:func:`_decode_attention`), so a bf16 cache was widened to
    float32 whole, in every layer, at every step (the cache of 2 rows x 480 heads at 190
    positions is 23M values a step). A float32 cache holds the same values (a bf16 key or value
    widens exactly) and is read as it is: the same attention, bit for bit, without the
    widening pass, for twice the cache memory. CPU only: on CUDA the widening costs little
    beside the GPU's bandwidth, while the cache of a large batch is what limits throughput.
    """
    if device.type == "cpu" and compute_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return compute_dtype


def _cached_attention(cache: StaticKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, cache_pos: Tensor,
                      mask: Tensor, kv_len: int | None, scale: float) -> Tensor:
    kc, vc = cache.k[layer], cache.v[layer]
    kc.index_copy_(2, cache_pos, k.to(kc.dtype))
    vc.index_copy_(2, cache_pos, v.to(vc.dtype))
    if kv_len is not None:
        kc, vc = kc[:, :, :kv_len], vc[:, :, :kv_len]
    return _attend(q, kc, vc, mask, scale)


# ----------------------------------------------------------------------------- prompts


def _row_cond(t3: Any, cond: Any, exaggeration: float | None) -> Any:
    """A private copy of a ``T3Cond`` on the model's device and float dtype (upstream caches the
    prompt speech embedding inside the object; we recompute it so a changed model never sees a
    stale one)."""
    # The conditioning encoder's own float dtype: embeddings may be quantized (no float weight).
    ref = next(p for p in t3.cond_enc.parameters() if p.is_floating_point())
    device, dtype = ref.device, ref.dtype

    def place(v: Any) -> Any:
        if not torch.is_tensor(v):
            return v
        return v.to(device=device, dtype=dtype if v.is_floating_point() else None)

    fields = {f.name: place(getattr(cond, f.name)) for f in dataclasses.fields(cond)}
    if cond.cond_prompt_speech_tokens is not None:
        fields["cond_prompt_speech_emb"] = None
    if exaggeration is not None:
        fields["emotion_adv"] = torch.full((1, 1, 1), float(exaggeration), device=device, dtype=dtype)
    elif not torch.is_tensor(fields.get("emotion_adv")):
        fields["emotion_adv"] = torch.full((1, 1, 1), float(fields["emotion_adv"]), device=device, dtype=dtype)
    return type(cond)(**fields)


def _prompt_embeds(t3: Any, row: T3Row, exaggeration: float | None, uncond: bool) -> Tensor:
    """The prompt of one row exactly as upstream builds it: (L, d).

    original/multilingual: cond | text (+pos; zeros before pos for the uncond row) | start
    speech (+pos 0) | BOS (+pos 0, the extra BOS of ``T3.inference``). Turbo: cond | text | start.
    """
    cond_emb = t3.prepare_conditioning(_row_cond(t3, row.cond, exaggeration))[:1]
    return torch.cat([cond_emb[0], _suffix_embeds(t3, row, uncond)], dim=0)


def _checked_text(t3: Any, row: T3Row) -> Tensor:
    """A row's text token ids as a ``(1, T)`` tensor on the model's device, checked."""
    hp = t3.hp
    device = t3.speech_emb.weight.device
    text = torch.as_tensor(row.text_tokens, dtype=torch.long, device=device).view(1, -1)
    if hp.input_pos_emb == "learned" and text.shape[1] > t3.text_pos_emb.emb.num_embeddings:
        raise CbxError(f"text of {text.shape[1]} tokens is longer than the model takes "
                       f"({t3.text_pos_emb.emb.num_embeddings}); use shorter sentences (the synthesizer splits "
                       "long text at sentence and clause ends)")
    if text.numel() and (int(text.min()) < 0 or int(text.max()) >= hp.text_tokens_dict_size):
        raise CbxError(f"text token ids must lie in [0, {hp.text_tokens_dict_size})")
    return text


def _suffix_embeds(t3: Any, row: T3Row, uncond: bool) -> Tensor:
    """The part of a row's prompt after the voice prefix (:func:`_prompt_embeds`): text | start
    (| BOS), ``(S, d)``; it does not depend on the voice."""
    hp = t3.hp
    device = t3.speech_emb.weight.device
    text = _checked_text(t3, row)
    text_emb = t3.text_emb(text)
    if uncond:
        text_emb = torch.zeros_like(text_emb)
    start = torch.full((1, 1), hp.start_speech_token, dtype=torch.long, device=device)
    speech_emb = t3.speech_emb(start)
    if hp.input_pos_emb == "learned":
        text_emb = text_emb + t3.text_pos_emb(text)
        speech_emb = speech_emb + t3.speech_pos_emb(start)
    parts = [text_emb[0], speech_emb[0]]
    if not t3.is_gpt:
        parts.append(speech_emb[0])  # T3.inference appends BOS + pos 0 once more
    return torch.cat(parts, dim=0)


def _speech_input(t3: Any, tokens: Tensor, step: int, positions: Tensor | None = None) -> Tensor:
    """Embedding of the token generated at ``step - 1`` fed at decode ``step`` (>= 1): (rows, 1, d).

    ``positions`` is a device-side ``arange`` made once per decode, so the speech position is
    looked up without the host-to-device index copy ``get_fixed_embedding(step)`` makes; the
    lookup calls the embedding module (which a compression transform may have replaced).
    """
    emb = t3.speech_emb(tokens.view(-1, 1))
    if t3.hp.input_pos_emb == "learned":
        if positions is None:
            positions = torch.arange(step + 1, device=emb.device)
        emb = emb + t3.speech_pos_emb.emb(positions[step: step + 1])
    return emb


# ----------------------------------------------------------------------------- logits


def _warpers(variant_is_gpt: bool, s: DecodeSettings) -> list[Any]:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    temp = 1.0 if s.greedy else s.temperature
    if variant_is_gpt:  # inference_turbo: temperature, top_k, top_p (then repetition penalty)
        out: list[Any] = []
        if temp > 0 and temp != 1.0:
            out.append(TemperatureLogitsWarper(temp))
        if s.top_k > 0:
            out.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            out.append(TopPLogitsWarper(s.top_p))
        return out
    out = []
    if temp != 1.0:
        out.append(TemperatureLogitsWarper(temp))
    out.append(MinPLogitsWarper(min_p=s.min_p))
    # top_p 1.0 after min_p > 0 changes nothing: it masks the tokens whose ascending cumulative
    # probability is 0, and min_p has left only -inf ones (every kept token has probability
    # >= min_p x the top one). Upstream applies it anyway; left out, it saves a sort of the
    # 8194 logits per step (~0.7 ms on the 2-core CPU). Same logits: tested.
    if s.top_p < 1.0 or s.min_p <= 0:
        out.append(TopPLogitsWarper(top_p=s.top_p))
    return out


def _repetition(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def process_logits(is_gpt: bool, logits: Tensor, seen: Tensor, s: DecodeSettings, warpers: list[Any]) -> Tensor:
    """Upstream's processing of next-token logits (rows, V) after CFG; ``seen`` (rows, V) marks
    the ids the repetition penalty applies to."""
    logits = logits.float()
    if s.force_tokens is not None:
        logits = logits.clone()
        logits[:, SPEECH_VOCAB:] = float("-inf")
    if not is_gpt:
        logits = _repetition(logits, seen, s.repetition_penalty)
    for w in warpers:
        logits = w(None, logits)
    if is_gpt:
        logits = _repetition(logits, seen, s.repetition_penalty)
    return logits


def _use_cfg(t3: Any, s: DecodeSettings) -> bool:
    return (not t3.is_gpt) and s.cfg_weight > 0


# ----------------------------------------------------------------------------- decoding


def _t3_of(model: Any) -> Any:
    return model.t3 if hasattr(model, "t3") else model


def generate(model: Any, rows: Sequence[T3Row], settings: DecodeSettings | None = None,
             prefix_cache: Any = None) -> DecodeOutput:
    """Decode speech tokens for every row in one loop (see the module docstring).
    ``prefix_cache``: a :class:`cbx.engine.t3_prefill.PrefixCache` keeping voice-prefix
    keys/values across calls (None: shared inside this call only)."""
    out = DecodeOutput([], [], 0)
    for out in generate_stream(model, rows, settings, prefix_cache=prefix_cache):
        pass
    return out


@torch.inference_mode()
def generate_stream(model: Any, rows: Sequence[T3Row], settings: DecodeSettings | None = None,
                    chunk_steps: Sequence[int] = (), prefix_cache: Any = None) -> Iterator[DecodeOutput]:
    """:func:`generate` that also yields what is decoded so far after each step count in
    ``chunk_steps`` (streaming: S3Gen renders those tokens while T3 waits). Every yield is a
    :class:`DecodeOutput` (``finished[i]``: row i has met EOS); the last one has ``final=True``
    and equals what :func:`generate` returns. A partial yield costs one host sync."""
    from cbx.engine import t3_prefill

    s = settings or DecodeSettings()
    t3 = _t3_of(model)
    if not rows:
        return
    hp = t3.hp
    device = t3.speech_emb.weight.device
    param_dtype = t3.speech_emb.weight.dtype
    cdtype = s.compute_dtype or param_dtype
    cfg = _use_cfg(t3, s)
    group = 2 if cfg else 1
    n_utt = len(rows)
    n_rows = n_utt * group
    max_new = min(s.force_tokens or s.max_new_tokens, hp.max_speech_tokens)
    eos = hp.stop_speech_token

    # Voice prefixes looked up / shared, the rest of each prompt embedded (cbx.engine.t3_prefill):
    # row r's prompt sits in slots [0, P_r) and, right-aligned, [width - S_r, width).
    prompts = t3_prefill.build_prompts(t3, rows, s, group, prefix_cache)
    lens = prompts.lens()
    p_max = prompts.width
    if t3.is_gpt and p_max + max_new > t3.cfg.n_positions:
        # GPT-2 has absolute positions: prompt + speech must fit its position table.
        max_new = t3.cfg.n_positions - p_max
        if max_new < 1:
            raise CbxError(f"prompt of {p_max} positions leaves no room in the model's {t3.cfg.n_positions}")

    n_layers, kv_heads, head_dim = _backbone_dims(t3)
    static = s.static_shapes or s.compile_backend is not None
    if static:
        # Whole length up front, rounded up to a whole chunk: prompts of different lengths then
        # share one shape, so a compiled step is not recompiled for every new text length.
        capacity = -(-(p_max + max_new) // CACHE_CHUNK) * CACHE_CHUNK
    else:
        capacity = min(p_max + max_new, p_max + CACHE_CHUNK)
    cache = StaticKVCache(n_layers, n_rows, kv_heads, head_dim, capacity, kv_cache_dtype(cdtype, device), device)
    kv_mask = torch.zeros(n_rows, capacity, dtype=torch.bool, device=device)
    kv_mask[:, :p_max] = prompts.key_valid()
    # Device-side slot indices, made once: a per-step torch.tensor(...) would be a host copy.
    slots = torch.arange(p_max, p_max + max_new, device=device)
    speech_positions = torch.arange(max_new + 1, device=device)
    graphed = s.compile_backend == "cudagraphs" and device.type == "cuda"
    step_fn = _step_function(None if graphed else s.compile_backend)
    plan = fusion_plan(t3)
    graph_step = CUDAGraphStep(t3, cache, plan) if graphed else None

    gens = [torch.Generator(device=device).manual_seed(int(r.seed)) for r in rows]
    warpers = _warpers(t3.is_gpt, s)
    seen = torch.zeros(n_utt, hp.speech_tokens_dict_size, dtype=torch.bool, device=device)
    seen[:, hp.start_speech_token] = True
    done = torch.zeros(n_utt, dtype=torch.bool, device=device)
    out = torch.full((n_utt, max_new), eos, dtype=torch.long, device=device)

    chunk_at = {int(c) for c in chunk_steps if 0 < int(c) < max_new}
    many_rows = _COMPILE_MANY_ROWS.set(s.compile_backend is not None)
    try:
        with autocast(device, s.compute_dtype):
            logits = t3_prefill.prefill(t3, prompts, cache, plan, s)
    finally:
        _COMPILE_MANY_ROWS.reset(many_rows)
    steps = 0
    for step in range(max_new):
        if step in chunk_at:  # outside autocast: the consumer runs its own work meanwhile
            for layer in plan or ():  # a consumer may stop here (first audio only)
                layer.report_kernels()
            yield _collect(out[:, :step], eos, s.force_tokens is not None, final=False)
        with autocast(device, s.compute_dtype):
            nxt = _pick(t3, logits, seen, s, warpers, gens, cfg, group)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            out[:, step] = nxt
            if t3.is_gpt and step == 0:
                seen[:, hp.start_speech_token] = False
            seen.scatter_(1, nxt[:, None], True)
            if s.force_tokens is None:
                done |= nxt == eos
            steps = step + 1
            if steps == max_new:
                break
            if s.force_tokens is None and steps % s.check_every == 0 and bool(done.all()):
                break
            # Feed the new token: cache slot p_max + step, each row at its own position.
            slot = p_max + step
            if slot >= cache.capacity:
                cache.ensure(slot + 1, limit=p_max + max_new)
                kv_mask = torch.cat([kv_mask, kv_mask.new_zeros(n_rows, cache.capacity - kv_mask.shape[1])], 1)
            kv_mask[:, slot] = True
            feed = _speech_input(t3, nxt.repeat_interleave(group), step + 1, speech_positions).to(cdtype)
            pos = (lens + step)[:, None]
            if graph_step is not None:
                logits = graph_step(feed, pos, slots[step: step + 1], kv_mask[:, None, :])
                continue
            if static:
                hidden = step_fn(t3, feed, pos, slots[step: step + 1], kv_mask[:, None, :], cache, None, plan)
            else:
                hidden = step_fn(t3, feed, pos, slots[step: step + 1], kv_mask[:, None, : slot + 1], cache, slot + 1,
                                 plan)
            logits = t3.speech_head(hidden[:, -1])

    for layer in plan or ():
        layer.report_kernels()
    yield _collect(out[:, :steps], eos, s.force_tokens is not None, final=True)


def _collect(out: Tensor, eos: int, forced: bool, final: bool) -> DecodeOutput:
    """Per row: the tokens before its first EOS (all of them when forced), and whether it met one."""
    out_cpu = out.cpu()
    tokens, finished = [], []
    for r in range(out_cpu.shape[0]):
        seq = out_cpu[r]
        hits = (seq == eos).nonzero()
        if not forced and len(hits):
            end = int(hits[0, 0])
            tokens.append(seq[:end].clone())
            finished.append(True)
        else:
            tokens.append(seq.clone())
            finished.append(False)
    return DecodeOutput(tokens, finished, out_cpu.shape[1], final)


_COMPILED: dict[str, Any] = {}


class CUDAGraphStep:
    """One decode step (static-shape backbone + speech head) captured in a ``torch.cuda.CUDAGraph``.

    Built per :func:`generate` call around its static KV cache (allocated before capture, never
    grown: the graph's writes go to fixed addresses). The first call copies the step's inputs
    into buffers the graph owns, runs the step twice eagerly on a side stream (lazy
    initialisation, cached scale tensors of the quantized modules; the cache writes are
    idempotent, the same values into the same slot), captures it, then replays; later calls copy
    their inputs in and replay. The returned logits live in the graph's output buffer: read them
    before the next call (the decode loop samples from them at once).
    """

    def __init__(self, t3: Any, cache: StaticKVCache, plan: Any):
        self.t3, self.cache, self.plan = t3, cache, plan
        self.graph: Any = None
        self.inputs: list[Tensor] = []
        self.out: Tensor | None = None

    def _run(self) -> Tensor:
        feed, pos, slot, mask = self.inputs
        hidden = _backbone(self.t3, feed, pos, slot, mask, self.cache, None, self.plan)
        return self.t3.speech_head(hidden[:, -1])

    def __call__(self, feed: Tensor, pos: Tensor, slot: Tensor, mask: Tensor) -> Tensor:
        if self.graph is None:
            self.inputs = [t.clone() for t in (feed, pos, slot, mask)]
            side = torch.cuda.Stream(device=feed.device)
            side.wait_stream(torch.cuda.current_stream(feed.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream(feed.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._run()
        else:
            for dst, src in zip(self.inputs, (feed, pos, slot, mask)):
                dst.copy_(src)
        self.graph.replay()
        return self.out


def _step_function(backend: str | None) -> Any:
    """The per-token backbone call, optionally ``torch.compile``d (full graph, static shapes).

    With ``static_shapes`` every decode step has the same shapes (whole cache, whole mask) and
    the position/slot arguments are tensors, so one compiled graph serves every step.
    """
    if backend is None:
        return _backbone
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_backbone, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED[backend]


def _pick(t3: Any, logits: Tensor, seen: Tensor, s: DecodeSettings, warpers: list[Any], gens: list[torch.Generator],
          cfg: bool, group: int) -> Tensor:
    logits = logits.float()
    if cfg:
        pair = logits.view(-1, group, logits.shape[-1])
        cond, uncond = pair[:, 0], pair[:, 1]
        logits = cond + s.cfg_weight * (cond - uncond)
    processed = process_logits(t3.is_gpt, logits, seen, s, warpers)
    if s.greedy:
        return processed.argmax(dim=-1)
    probs = torch.softmax(processed, dim=-1)
    return torch.cat([torch.multinomial(probs[i: i + 1], 1, generator=g)[0] for i, g in enumerate(gens)])


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (the engine's low-precision paths); a no-op for None
    or fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- teacher forcing


@torch.inference_mode()
def teacher_forced_logits(model: Any, conds: Any, text: str | Sequence[int], speech_tokens: Sequence[int] | Tensor,
                          settings: DecodeSettings | None = None, language_id: str | None = None,
                          processed: bool = True) -> Tensor:
    """Next-token logits at every step while feeding ``speech_tokens``: (T, V) float32.

    Row ``t`` is what the decoder would sample ``speech_tokens[t]`` from, after CFG and (with
    ``processed``) upstream's repetition penalty / temperature / min_p / top_p / top_k with the
    tokens before ``t`` as history. ``conds`` is an upstream ``Conditionals`` or ``T3Cond``;
    ``text`` a string (normalised and tokenised as upstream does) or T3 text token ids.
    One parallel forward pass over prompt + tokens, not a loop.
    """
    s = settings or DecodeSettings()
    t3 = _t3_of(model)
    hp = t3.hp
    device = t3.speech_emb.weight.device
    if isinstance(text, str):
        from cbx.engine.text import t3_text_tokens

        text = t3_text_tokens(model, text, language_id=language_id)
    cond = getattr(conds, "t3", conds)
    row = T3Row(text, cond, 0)
    toks = torch.as_tensor(speech_tokens, dtype=torch.long, device=device).view(-1)
    n_tok = toks.numel()
    if n_tok == 0:
        raise CbxError("teacher_forced_logits: speech_tokens is empty")
    if n_tok > hp.max_speech_tokens:
        raise CbxError(f"teacher_forced_logits: {n_tok} speech tokens exceed the model's maximum {hp.max_speech_tokens}")
    cfg = _use_cfg(t3, s)
    group = 2 if cfg else 1
    seqs = []
    for g in range(group):
        prompt = _prompt_embeds(t3, row, s.exaggeration, uncond=(g == 1))
        # Token i is fed at decode step i + 1 (speech position i + 1), as in generate().
        fed = t3.speech_emb(toks[:-1])
        if hp.input_pos_emb == "learned":
            fed = fed + t3.speech_pos_emb.emb(torch.arange(1, n_tok, device=device))
        seqs.append(torch.cat([prompt, fed], dim=0))
    x = torch.stack(seqs)
    length, p_len = x.shape[1], seqs[0].shape[0] - (n_tok - 1)
    n_layers, kv_heads, head_dim = _backbone_dims(t3)
    cache = StaticKVCache(n_layers, group, kv_heads, head_dim, length, x.dtype, device)
    ar = torch.arange(length, device=device)
    mask = (ar[:, None] >= ar[None, :])[None].expand(group, -1, -1)
    hidden = _backbone(t3, x, ar[None].expand(group, -1), ar, mask, cache, length)
    logits = t3.speech_head(hidden[:, p_len - 1:]).float()  # (group, T, V)
    if cfg:
        logits = logits[0] + s.cfg_weight * (logits[0] - logits[1])
    else:
        logits = logits[0]
    if not processed:
        return logits
    # History of step t: BOS/start + tokens[:t] (Turbo: start only at step 0, tokens[:t] after).
    seen = torch.zeros(n_tok, logits.shape[-1], dtype=torch.bool, device=device)
    seen[0, hp.start_speech_token] = True
    if not t3.is_gpt:
        seen[:, hp.start_speech_token] = True
    if n_tok > 1:
        hist = torch.zeros(n_tok, logits.shape[-1], dtype=torch.bool, device=device)
        hist[torch.arange(1, n_tok, device=device), toks[:-1]] = True
        seen |= hist.cumsum(0).bool()
    return process_logits(t3.is_gpt, logits, seen, s, _warpers(t3.is_gpt, s))
