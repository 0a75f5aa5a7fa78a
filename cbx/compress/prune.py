"""Structured pruning of T3 and the CFM estimator: the tensor math and the module surgery.

Why module surgery on the upstream classes rather than masks: a pruned model must really be
smaller and faster (fewer layers to run, narrower matrices to read), and it must stay a
Chatterbox model that upstream modules compute: a pruned Llama layer is still a
``LlamaDecoderLayer`` whose ``nn.Linear`` projections have fewer rows/columns. Hugging Face's
``LlamaAttention`` reshapes with ``view(..., -1, head_dim)``, so it computes a narrower layer
correctly once its projections are sliced along whole heads; we also set ``num_heads`` /
``num_key_value_heads`` on the module (read by the engine's static KV cache, which holds a
per-layer head count) and keep ``num_key_value_groups`` by pruning whole KV groups (a KV head
with its query heads) in grouped-query models. Dropped layers are removed from the
``ModuleList`` and the survivors renumbered (``layer_idx``, used by Hugging Face caches);
``config.num_hidden_layers`` follows, since ``LlamaModel.forward`` slices its layers by it.

CFM estimator depth pruning removes ``BasicTransformerBlock``s from the down/mid/up blocks'
``transformer_blocks`` lists (the U-Net forward loops over whatever is there; ResNet blocks
and skips stay).

Everything a skeleton needs to be rebuilt with the same shapes (layers kept, heads and FFN
width per layer, CFM blocks kept) is recorded in ``model.meta["pruned"]`` by
:func:`record_architecture`; :func:`apply_architecture` reshapes a freshly built model to it
(the compressed-checkpoint loader calls it before loading the weights).

Unstructured and 2:4 sparsity (:func:`mask_unstructured`, :func:`mask_2_4`,
:func:`sparsegpt_prune`) keep shapes and zero weights; see :mod:`cbx.compress.prune_methods`.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from cbx.errors import CbxError

PRUNED_KEY = "pruned"

# ----------------------------------------------------------------------------- pure math


def block_influence(x_in: Tensor, x_out: Tensor) -> Tensor:
    """ShortGPT's block influence per token: ``1 - cos(x_in, x_out)`` over the last axis.

    A block that leaves its residual stream's direction unchanged scores ~0 (removable); float64
    so that near-identity blocks are told apart."""
    a, b = x_in.double().flatten(0, -2), x_out.double().flatten(0, -2)
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def n_to_keep(total: int, fraction: float, multiple_of: int = 1, minimum: int = 1) -> int:
    """How many of ``total`` units stay when ``fraction`` of them is pruned, rounded to the
    nearest multiple of ``multiple_of`` (kernel-friendly widths), at least ``minimum``."""
    keep = total * (1.0 - fraction)
    if multiple_of > 1 and total >= multiple_of:
        keep = round(keep / multiple_of) * multiple_of
    return int(min(total, max(minimum, round(keep))))


def keep_top(scores: Tensor, n_keep: int) -> list[int]:
    """Indices of the ``n_keep`` highest scores, in ascending index order (stable on ties:
    the lower index wins, so equal scores give a deterministic choice)."""
    scores = scores.detach().double().cpu()
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:n_keep])


def allocate_global(scores: Sequence[Tensor], fraction: float, multiple_of: int = 1) -> list[int]:
    """Per-layer keep counts from one ranking across layers (each layer's scores normalised by
    its mean, so layers of different activation scale compete fairly); every layer keeps at
    least ``multiple_of`` units and the total kept is ``(1 - fraction)`` of all units."""
    norm = [s.double().cpu() / s.double().mean().clamp_min(1e-30) for s in scores]
    total = sum(s.numel() for s in norm)
    n_keep = int(round(total * (1.0 - fraction)))
    flat = torch.cat(norm)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(norm)])
    order = torch.argsort(flat, descending=True, stable=True)[:n_keep]
    counts = torch.bincount(owner[order], minlength=len(norm)).tolist()
    out = []
    for c, s in zip(counts, norm):
        m = max(multiple_of, 1) if s.numel() >= multiple_of else 1
        c = max(m, int(round(c / m)) * m) if m > 1 else max(1, c)
        out.append(min(int(c), s.numel()))
    return out


def mask_unstructured(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask removing the ``sparsity`` fraction of lowest scores in each output row
    (Wanda compares weights within a row: one output's inputs compete)."""
    out, k = scores.shape
    n_prune = int(k * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        idx = torch.topk(scores, n_prune, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def mask_n_m(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep-mask with ``n`` kept of every ``m`` consecutive inputs (2:4 for sparse tensor cores)."""
    out, k = scores.shape
    if k % m:
        raise ValueError(f"input size {k} is not a multiple of {m}")
    g = scores.reshape(out, k // m, m)
    idx = torch.topk(g, m - n, dim=2, largest=False).indices
    mask = torch.ones_like(g, dtype=torch.bool).scatter_(2, idx, False)
    return mask.reshape(out, k)


def mask_2_4(scores: Tensor) -> Tensor:
    return mask_n_m(scores, 2, 4)


def wanda_scores(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """Wanda: ``|W_ij| * ||X_j||_2`` (``input_sq_norm``: the per-input sum of squares, e.g. the
    diagonal of the input Hessian, which has the same ordering)."""
    return weight.abs().float() * input_sq_norm.float().clamp_min(0).sqrt()[None, :]


def sparsegpt_prune(weight: Tensor, hessian: Tensor, sparsity: float, pattern: str = "unstructured",
                    block_size: int = 128, damp: float = 0.01) -> Tensor:
    """SparseGPT (Frantar & Alistarh 2023): prune column blocks by ``w^2 / [H^-1]_jj^2`` and
    update the remaining weights with the optimal-brain-surgeon correction, so the layer's output
    on the calibration inputs changes as little as possible. Returns the new weight (zeros where
    pruned), float32. ``pattern``: ``unstructured`` (``sparsity`` per row within each block) or
    ``2:4``. Written here (no maintained library exposes it as a function on a weight and a
    Hessian); mirrors :func:`cbx.compress.gptq.gptq_quantize`'s column sweep."""
    W = weight.detach().float().clone()
    H = hessian.detach().double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as e:  # not positive definite even after damping
        raise CbxError(f"sparsegpt: input Hessian is not positive definite ({e}); raise damp") from None
    Hinv = L.float()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if pattern == "unstructured":
            keep = mask_unstructured(W1 ** 2 / torch.diag(Hinv1)[None, :] ** 2, sparsity)
        else:  # 2:4, chosen group by group on the already-updated weights, as SparseGPT does
            keep = torch.ones_like(W1, dtype=torch.bool)
        for j in range(i2 - i1):
            if pattern == "2:4" and j % 4 == 0 and j + 4 <= i2 - i1:
                score = W1[:, j:j + 4] ** 2 / torch.diag(Hinv1)[None, j:j + 4] ** 2
                keep[:, j:j + 4] = mask_2_4(score)
            w = W1[:, j]
            d = Hinv1[j, j]
            q = torch.where(keep[:, j], w, torch.zeros_like(w))
            err = (w - q) / d
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            W1[:, j] = q
            Err1[:, j] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


# ----------------------------------------------------------------------------- surgery


def _require_float_linear(mod: nn.Module, name: str) -> nn.Linear:
    if not isinstance(mod, nn.Linear):
        raise CbxError(f"prune: '{name}' is a {type(mod).__name__}, not a float nn.Linear; prune before quantizing "
                       "(put prune_* steps before int8/int4 steps)")
    return mod


def slice_linear(lin: nn.Linear, out_idx: Sequence[int] | None = None, in_idx: Sequence[int] | None = None) -> nn.Linear:
    """A new layer of the same class holding only rows ``out_idx`` and columns ``in_idx``."""
    w = lin.weight.detach()
    if out_idx is not None:
        w = w[torch.as_tensor(out_idx, dtype=torch.long, device=w.device)]
    if in_idx is not None:
        w = w[:, torch.as_tensor(in_idx, dtype=torch.long, device=w.device)]
    bias = lin.bias.detach() if lin.bias is not None else None
    if bias is not None and out_idx is not None:
        bias = bias[torch.as_tensor(out_idx, dtype=torch.long, device=bias.device)]
    new = type(lin).__new__(type(lin))
    nn.Linear.__init__(new, w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    for k, v in vars(lin).items():  # keep subclass attributes (diffusers' LoRACompatibleLinear.lora_layer)
        if not k.startswith("_") and k not in ("in_features", "out_features", "training"):
            setattr(new, k, v)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    new.requires_grad_(lin.weight.requires_grad)
    new.train(lin.training)
    return new


def _layers(t3: nn.Module) -> nn.ModuleList:
    if getattr(t3, "is_gpt", False):
        raise CbxError("prune: T3 of Turbo (GPT-2) is not supported yet; prune the original or multilingual T3, "
                       "or the CFM estimator (part: cfm)")
    return t3.tfmr.layers


def drop_t3_layers(t3: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the backbone layers ``keep`` (indices into the current layers), renumbered."""
    layers = _layers(t3)
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise CbxError(f"prune: layers to keep {keep} are not a non-empty subset of 0..{len(layers) - 1}")
    new = nn.ModuleList([layers[i] for i in keep])
    for i, layer in enumerate(new):
        layer.self_attn.layer_idx = i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
    t3.tfmr.layers = new
    t3.tfmr.config.num_hidden_layers = len(new)
    if getattr(t3.tfmr.config, "layer_types", None):
        t3.tfmr.config.layer_types = [t3.tfmr.config.layer_types[i] for i in keep]


def head_dim_of(t3: nn.Module) -> int:
    cfg = t3.cfg
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def attn_heads(attn: nn.Module, head_dim: int) -> tuple[int, int]:
    """(query heads, KV heads) of a Llama attention as it is now."""
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim


def narrow_heads(attn: nn.Module, keep_groups: Sequence[int], head_dim: int, name: str = "self_attn") -> None:
    """Keep the KV groups ``keep_groups`` (a KV head and its ``num_key_value_groups`` query heads)."""
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _require_float_linear(getattr(attn, p), f"{name}.{p}")
    n_q, n_kv = attn_heads(attn, head_dim)
    group = n_q // n_kv
    keep_groups = sorted(int(g) for g in keep_groups)
    q_heads = [g * group + j for g in keep_groups for j in range(group)]
    q_rows = [h * head_dim + d for h in q_heads for d in range(head_dim)]
    kv_rows = [g * head_dim + d for g in keep_groups for d in range(head_dim)]
    attn.q_proj = slice_linear(attn.q_proj, out_idx=q_rows)
    attn.k_proj = slice_linear(attn.k_proj, out_idx=kv_rows)
    attn.v_proj = slice_linear(attn.v_proj, out_idx=kv_rows)
    attn.o_proj = slice_linear(attn.o_proj, in_idx=q_rows)
    attn.num_heads = len(q_heads)
    attn.num_key_value_heads = len(keep_groups)


def narrow_ffn(mlp: nn.Module, keep: Sequence[int], name: str = "mlp") -> None:
    """Keep the FFN channels ``keep`` of a gated Llama MLP (rows of gate/up, columns of down)."""
    for p in ("gate_proj", "up_proj", "down_proj"):
        _require_float_linear(getattr(mlp, p), f"{name}.{p}")
    keep = sorted(int(i) for i in keep)
    mlp.gate_proj = slice_linear(mlp.gate_proj, out_idx=keep)
    mlp.up_proj = slice_linear(mlp.up_proj, out_idx=keep)
    mlp.down_proj = slice_linear(mlp.down_proj, in_idx=keep)
    mlp.intermediate_size = len(keep)


def cfm_block_lists(estimator: nn.Module) -> dict[str, nn.ModuleList]:
    """The estimator's ``transformer_blocks`` lists by name (``down_blocks.0.1``, ``mid_blocks.3.1``, ...)."""
    out = {}
    for part in ("down_blocks", "mid_blocks", "up_blocks"):
        for i, blk in enumerate(getattr(estimator, part)):
            out[f"{part}.{i}.1"] = blk[1]
    return out


def cfm_blocks(estimator: nn.Module) -> list[str]:
    """Names (relative to the estimator) of every transformer block, in forward order."""
    return [f"{lst}.{j}" for lst, blocks in cfm_block_lists(estimator).items() for j in range(len(blocks))]


def cfm_original_names(estimator: nn.Module, rec: dict | None) -> dict[str, str]:
    """Current block name -> name in the unpruned estimator (``rec``: ``meta["pruned"]["cfm"]``)."""
    dropped = set((rec or {}).get("dropped") or ())
    out = {}
    for lst, blocks in cfm_block_lists(estimator).items():
        orig = [j for j in range(len(blocks) + len(dropped)) if f"{lst}.{j}" not in dropped][: len(blocks)]
        for j, o in enumerate(orig):
            out[f"{lst}.{j}"] = f"{lst}.{o}"
    return out


def drop_cfm_blocks(estimator: nn.Module, drop: Iterable[str]) -> None:
    """Remove the named transformer blocks (names from :func:`cfm_blocks`)."""
    drop = set(drop)
    known = set(cfm_blocks(estimator))
    unknown = sorted(drop - known)
    if unknown:
        raise CbxError(f"prune: CFM estimator has no transformer block {unknown[0]!r} (blocks: {', '.join(sorted(known))})")
    for lst, blocks in cfm_block_lists(estimator).items():
        kept = [b for j, b in enumerate(blocks) if f"{lst}.{j}" not in drop]
        parent, _, idx = lst.rpartition(".")
        estimator.get_submodule(parent)[int(idx)] = nn.ModuleList(kept)


# ----------------------------------------------------------------------------- architecture record


def _original_t3_layers(model) -> list[int]:
    rec = (model.meta.get(PRUNED_KEY) or {}).get("t3") or {}
    return list(rec.get("layers") or range(len(_layers(model.t3))))


def record_architecture(model) -> dict:
    """Write the current pruned shapes into ``model.meta["pruned"]`` and return them.

    ``t3``: ``layers`` (indices of the ORIGINAL layers kept, in order), ``heads`` / ``kv_heads``
    / ``ffn`` per kept layer, ``num_layers_orig``; ``cfm``: ``blocks`` (transformer blocks kept
    per list, as original indices) and ``dropped``."""
    rec = dict(model.meta.get(PRUNED_KEY) or {})
    t3 = model.t3
    if not getattr(t3, "is_gpt", False):
        hd = head_dim_of(t3)
        layers = t3.tfmr.layers
        heads = [attn_heads(l.self_attn, hd) for l in layers]
        rec["t3"] = {
            "layers": _original_t3_layers(model),
            "num_layers_orig": (rec.get("t3") or {}).get("num_layers_orig", len(layers)),
            "heads": [h[0] for h in heads],
            "kv_heads": [h[1] for h in heads],
            "head_dim": hd,
            "ffn": [int(l.mlp.down_proj.in_features) for l in layers],
        }
    model.meta[PRUNED_KEY] = rec
    return rec


def apply_architecture(model, rec: dict | None) -> None:
    """Reshape a freshly built (unpruned) model to the pruned shapes in ``rec`` (weights are
    whatever the slices hold: the caller loads the real ones next)."""
    if not rec:
        return
    t3rec = rec.get("t3")
    if t3rec:
        layers = _layers(model.t3)
        if len(layers) != t3rec.get("num_layers_orig", len(layers)):
            raise CbxError(f"pruned architecture: recorded for {t3rec['num_layers_orig']} T3 layers, "
                           f"the model has {len(layers)}")
        drop_t3_layers(model.t3, t3rec["layers"])
        hd = t3rec.get("head_dim", head_dim_of(model.t3))
        for layer, n_kv, ffn in zip(model.t3.tfmr.layers, t3rec["kv_heads"], t3rec["ffn"]):
            if attn_heads(layer.self_attn, hd)[1] != n_kv:
                narrow_heads(layer.self_attn, range(n_kv), hd)
            if layer.mlp.down_proj.in_features != ffn:
                narrow_ffn(layer.mlp, range(ffn))
    cfmrec = rec.get("cfm")
    if cfmrec and cfmrec.get("dropped"):
        drop_cfm_blocks(model.s3gen.flow.decoder.estimator, cfmrec["dropped"])
    model.meta[PRUNED_KEY] = rec


def describe(rec: dict | None) -> str:
    """One line: ``T3 20/30 layers, heads 16..16, ffn 3072..4096; CFM 42/56 blocks``."""
    if not rec:
        return "not pruned"
    parts = []
    t = rec.get("t3")
    if t:
        parts.append(f"T3 {len(t['layers'])}/{t['num_layers_orig']} layers, heads {min(t['heads'])}..{max(t['heads'])}, "
                     f"ffn {min(t['ffn'])}..{max(t['ffn'])}")
    c = rec.get("cfm")
    if c:
        parts.append(f"CFM {c['num_blocks_orig'] - len(c['dropped'])}/{c['num_blocks_orig']} transformer blocks")
    return "; ".join(parts) or "not pruned"
