"""T3 prefill: the voice prefix's keys/values computed once per voice, and an fp32 prefill on
CPUs that emulate bf16.

Voice-prefix reuse. Every T3 prompt is ``cond | text | start (| BOS)``, where ``cond`` (speaker
embedding, 32 perceiver outputs, emotion: 34 positions for original and multilingual; for Turbo
the speaker embedding and up to 375 prompt speech tokens) depends only on the voice
conditioning, the exaggeration and the model. Attention is causal and each row's positions
start at 0, so the keys and values at the cond positions are the same in every row that
carries the same cond: both rows of a CFG pair (upstream expands one cond embedding over the
pair), every sentence spoken with that voice, every later call with it. :func:`prefill`:

1. keys each row's prefix by the content of the conditioning that feeds ``cond_enc`` (after the
   exaggeration override) and the compute context (KV cache dtype, autocast dtype, prefill
   dtype); a :class:`PrefixCache` (the synthesizer holds one, emptied by ``clear_voices``)
   keeps entries per T3 module and drops them when that module's weights change (another
   tensor, or an in-place edit: tensor version counters);
2. lays every row out as ``[prefix slots | left pad | suffix]`` (prefix at slots
   ``0..P_r-1``, the suffix right-aligned after the widest prefix) and copies the held prefixes'
   keys/values into their rows' prefix slots;
3. runs one backbone pass over the suffix queries of every row, with explicit positions
   (``P_r, P_r + 1, ...``: RoPE and GPT-2's absolute ``wpe`` alike) and a mask that lets them
   see their own prefix and the causal part of their suffix, and, in the same pass, over each
   prefix it does not hold (once per distinct prefix: both rows of a CFG pair and every row
   with that voice share it): per layer, the new prefixes' keys/values are computed first and
   copied into the prefix slots of the rows that carry them before those rows attend. The new
   prefixes' keys/values are then kept in the :class:`PrefixCache`.

Why one pass (step 3): the prefill's tokens of both layouts are laid end to end as one row
for everything but attention (embeddings, norms, projections, MLP work token by token), so each
weight is read, and for int4/int8 under the fp32 prefill unpacked, once for all of them; each
layout attends over its own cache (``attention`` of :func:`cbx.engine.t3_decode._backbone`).
A new prefix alone is ~34 rows, too few for the dense fp32 path of int4/int8 modules
(``FP32_MIN_ROWS``): run as a pass of its own (as before), it took the slow low-bit kernel and
the weights were unpacked a second time for the suffix pass, so a cold voice's prefill was
slower than the plain prefill (4.69 s against 4.29 s, full-size int4, fp32 prefill, this 2-core
AVX2 CPU). The keys/values of a prefix computed alongside other rows differ from a lone
prefix pass only in float summation order (matrix products over more rows): tests hold them
within 1e-5 of a lone pass (fp32 tiny models) and a warm call from either to the same tokens.

The decode loop that follows sees what it saw before: a prompt ``width`` of slots, each row's
real length ``lens`` (its next position) and which slots hold keys. With ``share_prefix`` off
every prefix is empty and the suffix is the whole prompt: exactly the former left-padded
prefill. The two differ only in float summation order (matrix products over a different number
of rows); tests hold logits within a stated bound and greedy tokens identical.

fp32 prefill. On a CPU without native bf16 (no AMX / AVX512-BF16; :func:`cbx.engine.synth.
auto_dtype` knows), bf16 matrix products are emulated and 3-5x slower than fp32 when
compute-bound, as a prefill of a few hundred rows is; the int4 kernel's (bf16 activations) ran
at ~48 GFLOP/s against fp32 GEMM's 63-111 on this 2-core AVX2 CPU at 194-262 rows. With
``DecodeSettings.prefill_dtype = float32`` the prefill runs in float32 whatever the decode's
dtype: autocast off, hidden states in fp32, bf16/fp16 weights of plain modules widened for the
call (:class:`_WidenWeights`), int4/int8 modules multiplying a dequantized fp32 copy of their
weight made chunk by chunk for the call (:func:`prefill_fp32`, read by
:mod:`cbx.compress.modules`). Keys/values are stored in the cache's dtype as before, so the
decode steps read what they always read. The decode steps stay in their own dtype: narrow
weights help the bandwidth-bound step. Where bf16 is native (CUDA, AMX) the synthesizer keeps
the prefill in bf16 (``SynthSettings.prefill_dtype: auto``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from cbx.engine import t3_decode as td

log = logging.getLogger("cbx.engine.t3_prefill")

# True while a float32 prefill runs (see the module docstring): quantized linear modules then
# multiply fp32 inputs of many rows by a dequantized fp32 copy of their weight.
_PREFILL_FP32: contextvars.ContextVar[bool] = contextvars.ContextVar("cbx_prefill_fp32", default=False)


def prefill_fp32() -> bool:
    """Whether the running forward is a float32 prefill (quantized modules: dense fp32 path)."""
    return _PREFILL_FP32.get()


# ----------------------------------------------------------------------------- prefix cache


@dataclass
class PrefixKV:
    """Keys/values of one voice prefix: per layer ``(1, kv_heads, length, head_dim)``."""

    k: list[Tensor]
    v: list[Tensor]
    length: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class PrefixCache:
    """Voice-prefix keys/values across decode calls, per T3 module (see the module docstring).

    ``hits``/``misses`` count prefixes found/computed (one per distinct prefix of a call, so a
    CFG pair counts once). At most ``max_entries`` prefixes per module are kept (least recently
    used dropped first). :meth:`clear` forgets everything; a module whose weights changed loses
    its entries on its next use.
    """

    def __init__(self, max_entries: int = 64):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = int(max_entries)
        self._models: "weakref.WeakKeyDictionary[Any, tuple[tuple, OrderedDict[str, PrefixKV]]]" = (
            weakref.WeakKeyDictionary())
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._models = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return sum(len(entries) for _, entries in self._models.values())

    def entries(self, t3: Any, signature: tuple) -> "OrderedDict[str, PrefixKV]":
        held = self._models.get(t3)
        if held is None or held[0] != signature:
            if held is not None:
                log.info("voice-prefix cache: T3 weights changed, %d prefix(es) dropped", len(held[1]))
            held = (signature, OrderedDict())
            self._models[t3] = held
        return held[1]

    def trim(self, entries: "OrderedDict[str, PrefixKV]") -> None:
        while len(entries) > self.max_entries:
            entries.popitem(last=False)


def weights_signature(t3: Any) -> tuple:
    """Identity of every parameter and buffer of ``t3``: (id, storage address, version).

    A transform swapping a module, a cast or a move changes ids/addresses; an in-place edit
    bumps the version. Tensors made under ``torch.inference_mode`` keep no version counter:
    they count as version -1 (they cannot be edited in place outside inference mode).
    """
    out = []
    for t in (*t3.parameters(), *t3.buffers()):
        out.append((id(t), t.data_ptr(), -1 if t.is_inference() else t._version))
    return tuple(out)


def prefix_key(cond: Any, context: tuple) -> str:
    """Content key of a placed ``T3Cond`` (:func:`cbx.engine.t3_decode._row_cond`) under a
    compute ``context``: every field's dtype, shape and bytes."""
    h = hashlib.blake2b(repr(context).encode(), digest_size=20)
    for f in dataclasses.fields(cond):
        v = getattr(cond, f.name)
        h.update(f.name.encode())
        if torch.is_tensor(v):
            t = v.detach().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- prompt layout


@dataclass
class Prompts:
    """The rows' prompts as the prefill lays them out: ``[prefix | pad | suffix]``.

    ``keys[r]`` names row r's prefix (None: no prefix, the suffix is its whole prompt),
    ``prefix_len[r]`` its length; ``suffix[r]`` ``(S_r, d)`` the rest of its prompt;
    ``new`` the prefix embeddings ``(P, d)`` to compute (cache misses), ``held`` the ones found.
    """

    keys: list[str | None]
    prefix_len: list[int]
    suffix: list[Tensor]
    new: dict[str, Tensor]
    held: dict[str, PrefixKV]
    store: "OrderedDict[str, PrefixKV] | None"
    cache: PrefixCache | None
    device: torch.device

    @property
    def prefix_width(self) -> int:
        return max(self.prefix_len)

    @property
    def suffix_width(self) -> int:
        return max(s.shape[0] for s in self.suffix)

    @property
    def width(self) -> int:
        """Prompt slots of the cache: widest prefix + widest suffix."""
        return self.prefix_width + self.suffix_width

    def lens(self) -> Tensor:
        """(rows,) each row's real prompt length: the position its first speech token takes."""
        return torch.tensor([p + s.shape[0] for p, s in zip(self.prefix_len, self.suffix)], device=self.device)

    def key_valid(self) -> Tensor:
        """(rows, width) bool: the slots that hold a key of the row (its prefix, its suffix)."""
        wp, ws = self.prefix_width, self.suffix_width
        plen = torch.tensor(self.prefix_len, device=self.device)
        pad = ws - torch.tensor([s.shape[0] for s in self.suffix], device=self.device)
        c = torch.arange(wp + ws, device=self.device)
        return (c[None, :] < plen[:, None]) | (c[None, :] >= wp + pad[:, None])


def compute_context(t3: Any, s: Any) -> tuple:
    """What besides the conditioning decides a prefix's keys/values: the KV dtype, the autocast
    dtype the prefill runs under, and the prefill dtype."""
    device = t3.speech_emb.weight.device
    cdtype = s.compute_dtype or t3.speech_emb.weight.dtype
    if s.compute_dtype is not None and s.compute_dtype != torch.float32:
        amp = s.compute_dtype
    else:
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return (str(cdtype), str(amp), str(s.prefill_dtype), device.type)


def build_prompts(t3: Any, rows: Sequence[Any], s: Any, group: int, cache: PrefixCache | None) -> Prompts:
    """Each row's prompt split into a voice prefix (looked up in ``cache`` and shared inside the
    call) and a suffix; rows ``group*i + g`` are utterance i's (cond, uncond) pair."""
    device = t3.speech_emb.weight.device
    n = len(rows) * group
    if not s.share_prefix:
        suffix = [td._prompt_embeds(t3, r, s.exaggeration, uncond=(g == 1)) for r in rows for g in range(group)]
        return Prompts([None] * n, [0] * n, suffix, {}, {}, None, None, device)
    context = compute_context(t3, s)
    # Fusing the projections (first decode of a model) re-points their weights: sign after it.
    td.fusion_plan(t3)
    store = cache.entries(t3, weights_signature(t3)) if cache is not None else None
    keys: list[str | None] = []
    plen: list[int] = []
    suffix: list[Tensor] = []
    new: dict[str, Tensor] = {}
    held: dict[str, PrefixKV] = {}
    by_cond: dict[int, str] = {}
    for r in rows:
        key = by_cond.get(id(r.cond))
        if key is None:
            placed = td._row_cond(t3, r.cond, s.exaggeration)
            key = prefix_key(placed, context)
            by_cond[id(r.cond)] = key
            if key not in new and key not in held:
                hit = store.get(key) if store is not None else None
                if hit is not None:
                    store.move_to_end(key)
                    held[key] = hit
                    cache.hits += 1
                else:
                    new[key] = t3.prepare_conditioning(placed)[0]
                    if cache is not None:
                        cache.misses += 1
        length = held[key].length if key in held else new[key].shape[0]
        for g in range(group):
            keys.append(key)
            plen.append(length)
            suffix.append(td._suffix_embeds(t3, r, uncond=(g == 1)))
    return Prompts(keys, plen, suffix, new, held, store, cache, device)


# ----------------------------------------------------------------------------- the prefill


def prefill(t3: Any, prompts: Prompts, cache: Any, plan: Any, s: Any) -> Tensor:
    """Fill ``cache``'s prompt slots for every row and return the next-token logits ``(rows, V)``.

    Held prefixes are copied into their rows' prefix slots; one backbone pass computes the new
    prefixes (kept in the :class:`PrefixCache`, if any) and every row's suffix (module docstring).
    """
    device = prompts.device
    with _precision(t3, s) as x_dtype:
        rows_of: dict[str, list[int]] = {}
        for r, key in enumerate(prompts.keys):
            if key is not None:
                rows_of.setdefault(key, []).append(r)
        for key, e in prompts.held.items():
            idx = torch.tensor(rows_of[key], device=device)
            for layer in range(len(cache.k)):
                cache.k[layer][idx, :, : e.length] = e.k[layer]
                cache.v[layer][idx, :, : e.length] = e.v[layer]

        wp, ws = prompts.prefix_width, prompts.suffix_width
        n = len(prompts.suffix)
        x = torch.zeros(n, ws, prompts.suffix[0].shape[1], dtype=x_dtype, device=device)
        for i, p in enumerate(prompts.suffix):
            x[i, ws - p.shape[0]:] = p
        pad = ws - torch.tensor([p.shape[0] for p in prompts.suffix], device=device)
        plen = torch.tensor(prompts.prefix_len, device=device)
        j = torch.arange(ws, device=device)
        pos_ids = (plen[:, None] + j[None, :] - pad[:, None]).clamp(min=0)
        slots = torch.arange(wp, wp + ws, device=device)
        c = torch.arange(wp + ws, device=device)
        causal = c[None, None, :] <= slots[None, :, None]
        # Pad queries may see themselves, so no softmax row is empty (no NaN); nothing real sees them.
        mask = (causal & prompts.key_valid()[:, None, :]) | (c[None, None, :] == slots[None, :, None])
        if not prompts.new:
            hidden = td._backbone(t3, x, pos_ids, slots, mask, cache, wp + ws, plan)
            return t3.speech_head(hidden[:, -1])

        new = _NewPrefixes(t3, prompts.new, {k: rows_of[k] for k in prompts.new}, x_dtype, cache)
        na, pa = new.x.shape[:2]

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
            # Tokens [new prefixes (na x pa) | rows (n x ws)]: the prefixes attend first, then
            # their keys/values fill the prefix slots of the rows that carry them.
            pre = [_unflat(t[:, :, : na * pa], na) for t in (q, k, v)]
            rest = [_unflat(t[:, :, na * pa:], n) for t in (q, k, v)]
            o_pre = td._cached_attention(new.cache, layer, *pre, new.slots, new.mask, pa, scale)
            new.copy_into(cache, layer)
            o = td._cached_attention(cache, layer, *rest, slots, mask, wp + ws, scale)
            return torch.cat([_flat(o_pre), _flat(o)], dim=2)

        d = x.shape[-1]
        hidden = td._backbone(t3, torch.cat([new.x.reshape(1, -1, d), x.reshape(1, -1, d)], 1),
                              torch.cat([new.pos_ids.reshape(1, -1), pos_ids.reshape(1, -1)], 1),
                              None, None, None, None, plan, attention=attention)
        if prompts.store is not None:
            for key, entry in new.entries().items():
                prompts.store[key] = entry
            prompts.cache.trim(prompts.store)
        return t3.speech_head(hidden[0, na * pa:].view(n, ws, -1)[:, -1])


def _unflat(t: Tensor, rows: int) -> Tensor:
    """``(1, heads, rows * q, dim)`` tokens laid end to end -> ``(rows, heads, q, dim)``."""
    _, heads, tokens, dim = t.shape
    return t[0].reshape(heads, rows, tokens // rows, dim).transpose(0, 1)


def _flat(t: Tensor) -> Tensor:
    """:func:`_unflat`'s inverse."""
    rows, heads, q, dim = t.shape
    return t.transpose(0, 1).reshape(1, heads, rows * q, dim)


class _NewPrefixes:
    """The prefixes a prefill computes (cache misses): one row each, right-padded to the widest
    (causal: a pad follows every real position, so no real query sees one), positions from 0, in
    a cache of their own; :meth:`copy_into` fills the prefix slots of the rows that carry them."""

    def __init__(self, t3: Any, new: dict[str, Tensor], rows_of: dict[str, list[int]], x_dtype: torch.dtype,
                 cache: Any):
        self.keys = list(new)
        self.lengths = [new[k].shape[0] for k in self.keys]
        first = new[self.keys[0]]
        device = first.device
        pa = max(self.lengths)
        self.x = torch.zeros(len(new), pa, first.shape[1], dtype=x_dtype, device=device)
        for i, k in enumerate(self.keys):
            self.x[i, : self.lengths[i]] = new[k]
        ar = torch.arange(pa, device=device)
        self.pos_ids = ar[None].expand(len(new), -1)
        self.slots = ar
        self.mask = (ar[:, None] >= ar[None, :])[None].expand(len(new), -1, -1)
        n_layers, kv_heads, head_dim = td._backbone_dims(t3)
        self.cache = td.StaticKVCache(n_layers, len(new), kv_heads, head_dim, pa, cache.k[0].dtype, device)
        self.targets = [torch.tensor(rows_of[k], device=device) for k in self.keys]

    def copy_into(self, cache: Any, layer: int) -> None:
        """This layer's new-prefix keys/values into the prefix slots of their rows in ``cache``."""
        for i, (length, idx) in enumerate(zip(self.lengths, self.targets)):
            cache.k[layer][idx, :, :length] = self.cache.k[layer][i: i + 1, :, :length]
            cache.v[layer][idx, :, :length] = self.cache.v[layer][i: i + 1, :, :length]

    def entries(self) -> dict[str, PrefixKV]:
        """Each new prefix's per-layer keys/values (cloned: the pass's cache is dropped)."""
        return {key: PrefixKV([k[i: i + 1, :, :length].clone() for k in self.cache.k],
                              [v[i: i + 1, :, :length].clone() for v in self.cache.v], length)
                for i, (key, length) in enumerate(zip(self.keys, self.lengths))}


# ----------------------------------------------------------------------------- fp32 prefill


class _WidenWeights(TorchFunctionMode):
    """Widen bf16/fp16 tensors to float32 in ``linear``, ``addmm`` (GPT-2 ``Conv1D``) and
    ``layer_norm`` calls that also receive a float32 tensor: a low-precision model's plain
    modules then run an fp32 prefill without a float32 copy of the model. Why a function mode:
    the backbone calls upstream's modules, whose forwards we do not edit."""

    _FUNCS = {F.linear, torch.addmm, F.layer_norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FUNCS:
            flat = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            if any(t.dtype == torch.float32 for t in flat) and any(t.dtype in _NARROW for t in flat):
                args = tuple(_widen(a) for a in args)
                kwargs = {k: _widen(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


_NARROW = (torch.bfloat16, torch.float16)


def _widen(a: Any) -> Any:
    return a.float() if torch.is_tensor(a) and a.dtype in _NARROW else a


@contextlib.contextmanager
def _precision(t3: Any, s: Any):
    """The prefill's arithmetic: float32 (yields float32) when ``s.prefill_dtype`` asks for it,
    else the decode's own (yields the KV cache dtype, under the autocast already active)."""
    device = t3.speech_emb.weight.device
    cdtype = s.compute_dtype or t3.speech_emb.weight.dtype
    if s.prefill_dtype != torch.float32:
        yield cdtype
        return
    token = _PREFILL_FP32.set(True)
    try:
        with torch.autocast(device.type, enabled=False), _WidenWeights():
            yield torch.float32
    finally:
        _PREFILL_FP32.reset(token)


def fp32_prefill_unsupported(t3: Any) -> str | None:
    """Why ``t3`` cannot run an fp32 prefill (a module class without an fp32 path: library
    quantizers, FP8), or None when it can."""
    from cbx.compress.modules import Int4Linear, Int8Linear, _Quantized

    for name, mod in t3.named_modules():
        if isinstance(mod, _Quantized) and not isinstance(mod, (Int4Linear, Int8Linear)):
            return f"{name} ({type(mod).__name__}) has no float32 path"
    return None
