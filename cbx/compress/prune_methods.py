"""The registered pruning transforms: ``prune_depth``, ``prune_width``, ``sparsify``.

Same habits as :mod:`cbx.compress.methods`: one frozen config per method validated in
``__post_init__``, one registered function ``model -> model``, calibration parameters named
as GPTQ's (``calib_*``). Scores come from :mod:`cbx.compress.importance` (forward passes of the
conditioned model on calibration text in real voices, ``calib_voices``); the surgery from
:mod:`cbx.compress.prune`.

* ``prune_depth``: drop T3 backbone layers (``part: t3``) or CFM estimator transformer blocks
  (``part: cfm``), by ``count``, ``fraction`` or an explicit ``drop`` list, lowest block
  influence first.
* ``prune_width``: remove ``ffn_fraction`` of T3's FFN channels and ``head_fraction`` of its
  attention heads (whole KV groups), lowest activation importance first; ``allocation:
  uniform`` takes the same fraction from every layer, ``global`` ranks all layers together so
  each layer keeps what it needs.
* ``sparsify``: zero ``sparsity`` of the weights of the targeted linear layers, unstructured
  (per output row) or 2:4, by magnitude, Wanda (``|W| * ||X||``) or SparseGPT (OBS update of the
  kept weights). The model keeps dense shapes; on CUDA, 2:4 layers in fp16/bf16 get torchao's
  semi-structured sparse kernel (``kernel: auto``); elsewhere they run dense with the zeros
  (the "masked dense" path: exact, not faster). Which one ran is recorded in ``model.meta``
  and on each module (``cbx_kernel``), and the masked path says so in the log.

Pruning works on float layers: put ``prune_*`` / ``sparsify`` steps before quantization steps
(a quantized layer is refused with that advice). ``model.meta["pruned"]`` records the shapes
(:func:`cbx.compress.prune.record_architecture`), which the compressed checkpoint uses to
rebuild the skeleton.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from cbx.compress import prune as P
from cbx.compress.importance import CalibSpec, calibration_sequences, cfm_importance, t3_importance
from cbx.compress.methods import _record, _tuple_of_globs
from cbx.compress.registry import register_transform, select_modules
from cbx.errors import CbxError

log = logging.getLogger(__name__)

# Real recorded voices of the offline eval set (cbx.eval.assets): pruning decisions are made
# on real speech conditioning, not only on the model's built-in voice.
DEFAULT_CALIB_VOICES = ("allison", "diane")
PARTS = ("t3", "cfm")
ALLOCATIONS = ("uniform", "global")
PATTERNS = ("unstructured", "2:4")
SCORES = ("magnitude", "wanda", "sparsegpt")
KERNELS = ("auto", "dense")
SPARSE_TARGETS = ("t3.tfmr.layers.*",)


@dataclass(frozen=True)
class _CalibBase:
    calib_texts: int = 8
    calib_max_speech_tokens: int = 150
    calib_seed: int = 0
    calib_voices: tuple[str, ...] = DEFAULT_CALIB_VOICES

    def __post_init__(self):
        from cbx.compress.calibration import check_calibration_params

        _tuple_of_globs(self, "calib_voices")
        if not self.calib_voices:
            raise ValueError("calib_voices must name at least one voice (builtin, an offline voice or a file)")
        check_calibration_params(self)

    def calib(self) -> CalibSpec:
        return CalibSpec(self.calib_texts, self.calib_max_speech_tokens, self.calib_seed, tuple(self.calib_voices))


@dataclass(frozen=True)
class PruneDepthConfig(_CalibBase):
    part: str = "t3"
    count: Optional[int] = None  # how many layers/blocks to drop
    fraction: Optional[float] = None  # or which fraction of them (rounded to nearest)
    drop: Optional[tuple[Union[int, str], ...]] = None  # or exactly these (T3: layer indices; CFM: block names)

    def __post_init__(self):
        super().__post_init__()
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {self.part!r}")
        given = [k for k in ("count", "fraction", "drop") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of count, fraction, drop (got {', '.join(given) or 'none'})")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"count must be a positive integer, got {self.count!r}")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if self.drop is not None:
            object.__setattr__(self, "drop", tuple(self.drop))
            if not self.drop:
                raise ValueError("drop must not be empty")


@dataclass(frozen=True)
class PruneWidthConfig(_CalibBase):
    ffn_fraction: float = 0.0  # fraction of FFN channels removed
    head_fraction: float = 0.0  # fraction of attention heads (KV groups) removed
    allocation: str = "uniform"
    multiple_of: int = 8  # FFN widths kept as multiples of this (kernel-friendly)

    def __post_init__(self):
        super().__post_init__()
        for k in ("ffn_fraction", "head_fraction"):
            if not 0 <= getattr(self, k) < 1:
                raise ValueError(f"{k} must be in [0, 1), got {getattr(self, k)}")
        if self.ffn_fraction == 0 and self.head_fraction == 0:
            raise ValueError("nothing to prune: set ffn_fraction and/or head_fraction above 0")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {self.multiple_of}")


@dataclass(frozen=True)
class SparsifyConfig(_CalibBase):
    sparsity: float = 0.5
    pattern: str = "2:4"
    score: str = "wanda"
    targets: tuple[str, ...] = SPARSE_TARGETS
    ignore: tuple[str, ...] = ()
    kernel: str = "auto"
    sparsegpt_damp: float = 0.01
    sparsegpt_block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        _tuple_of_globs(self, "targets")
        _tuple_of_globs(self, "ignore")
        if not self.targets:
            raise ValueError("targets must not be empty")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"pattern 2:4 means sparsity 0.5, got {self.sparsity}")
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not 0 < self.sparsegpt_damp < 1:
            raise ValueError(f"sparsegpt_damp must be in (0, 1), got {self.sparsegpt_damp}")


# ----------------------------------------------------------------------------- depth


def _n_drop(total: int, config: PruneDepthConfig, what: str) -> int:
    n = config.count if config.count is not None else int(round(total * config.fraction))
    if not 1 <= n < total:
        raise CbxError(f"prune_depth: dropping {n} of {total} {what} leaves nothing or drops nothing "
                       "(count/fraction must leave at least one and drop at least one)")
    return n


@register_transform("prune_depth", PruneDepthConfig)
def prune_depth(model, config: PruneDepthConfig):
    """Drop the T3 layers or CFM transformer blocks with the lowest block influence."""
    cfg = _record(model, "prune_depth", config)
    rec = model.meta.get(P.PRUNED_KEY) or {}
    if config.part == "t3":
        layers = P._layers(model.t3)
        if config.drop is not None:
            drop = sorted({int(i) for i in config.drop})
            if drop[0] < 0 or drop[-1] >= len(layers) or len(drop) >= len(layers):
                raise CbxError(f"prune_depth: drop {list(config.drop)} must be indices 0..{len(layers) - 1}, "
                               "leaving at least one layer")
            scores = None
        else:
            n = _n_drop(len(layers), config, "T3 layers")
            scores = t3_importance(model, calibration_sequences(model, config.calib())).t3_layers
            drop = sorted(sorted(range(len(layers)), key=lambda i: (scores[i], i))[:n])
        orig = P._original_t3_layers(model)
        n_orig = (rec.get("t3") or {}).get("num_layers_orig", len(layers))
        P.drop_t3_layers(model.t3, [i for i in range(len(layers)) if i not in drop])
        model.meta[P.PRUNED_KEY] = {**rec, "t3": {"layers": [orig[i] for i in range(len(orig)) if i not in drop],
                                                   "num_layers_orig": n_orig}}
        P.record_architecture(model)
        log.info("prune_depth: dropped T3 layers %s (original indices %s)%s", drop, [orig[i] for i in drop],
                 f", block influence {[round(scores[i], 5) for i in drop]}" if scores else "")
        cfg["dropped"] = [orig[i] for i in drop]
        return model
    est = model.s3gen.flow.decoder.estimator
    names = P.cfm_blocks(est)
    if config.drop is not None:
        drop = [str(d) for d in config.drop]
        unknown = [d for d in drop if d not in names]
        if unknown:
            raise CbxError(f"prune_depth: CFM estimator has no transformer block {unknown[0]!r} "
                           f"(blocks: {', '.join(names)})")
        if len(set(drop)) >= len(names):
            raise CbxError("prune_depth: drop must leave at least one CFM transformer block")
    else:
        n = _n_drop(len(names), config, "CFM transformer blocks")
        scores = cfm_importance(model, calibration_sequences(model, config.calib()), seed=config.calib_seed)
        drop = sorted(names, key=lambda k: (scores.get(k, 0.0), names.index(k)))[:n]
    to_orig = P.cfm_original_names(est, rec.get("cfm"))
    cfm_rec = dict(rec.get("cfm") or {"num_blocks_orig": len(names), "dropped": []})
    cfm_rec["dropped"] = sorted(set(cfm_rec["dropped"]) | {to_orig[d] for d in drop})
    P.drop_cfm_blocks(est, drop)
    model.meta[P.PRUNED_KEY] = {**rec, "cfm": cfm_rec}
    P.record_architecture(model)
    log.info("prune_depth: dropped CFM transformer blocks %s", drop)
    cfg["dropped"] = [to_orig[d] for d in drop]
    return model


# ----------------------------------------------------------------------------- width


@register_transform("prune_width", PruneWidthConfig)
def prune_width(model, config: PruneWidthConfig):
    """Remove the T3 FFN channels and attention heads with the lowest activation importance."""
    t3 = model.t3
    layers = P._layers(t3)
    hd = P.head_dim_of(t3)
    imp = t3_importance(model, calibration_sequences(model, config.calib()))
    _record(model, "prune_width", config)
    if config.ffn_fraction > 0:
        if config.allocation == "global":
            counts = P.allocate_global(imp.t3_ffn, config.ffn_fraction, config.multiple_of)
        else:
            counts = [P.n_to_keep(len(s), config.ffn_fraction, config.multiple_of) for s in imp.t3_ffn]
        for i, (layer, scores, n) in enumerate(zip(layers, imp.t3_ffn, counts)):
            P.narrow_ffn(layer.mlp, P.keep_top(scores, n), name=f"t3.tfmr.layers.{i}.mlp")
    if config.head_fraction > 0:
        groups = [imp.kv_group_scores(i, P.attn_heads(l.self_attn, hd)[1]) for i, l in enumerate(layers)]
        if config.allocation == "global":
            counts = P.allocate_global(groups, config.head_fraction)
        else:
            counts = [P.n_to_keep(len(g), config.head_fraction) for g in groups]
        for i, (layer, scores, n) in enumerate(zip(layers, groups, counts)):
            if n < len(scores):
                P.narrow_heads(layer.self_attn, P.keep_top(scores, n), hd, name=f"t3.tfmr.layers.{i}.self_attn")
    rec = P.record_architecture(model)
    log.info("prune_width: %s", P.describe(rec))
    return model


# ----------------------------------------------------------------------------- sparsity


def _semi_structured_ok(mod: nn.Linear) -> bool:
    return mod.weight.is_cuda and mod.weight.dtype in (torch.float16, torch.bfloat16)


@register_transform("sparsify", SparsifyConfig)
def sparsify(model, config: SparsifyConfig):
    """Zero weights (unstructured or 2:4) by magnitude, Wanda or SparseGPT scores."""
    mods = [(n, m) for n, m in select_modules(model, config.targets, config.ignore) if type(m) is nn.Linear
            or isinstance(m, nn.Linear) and type(m).__name__ == "LoRACompatibleLinear"]
    if not mods:
        quant = [n for n, m in select_modules(model, config.targets, config.ignore) if hasattr(m, "qstate")]
        hint = "; sparsify before quantizing" if quant else ""
        raise CbxError(f"sparsify: targets {list(config.targets)} (ignore {list(config.ignore)}) match no float "
                       f"linear layer{hint}")
    if config.pattern == "2:4":
        bad = [n for n, m in mods if m.in_features % 4]
        if bad:
            raise CbxError(f"sparsify: '{bad[0]}' has {dict(mods)[bad[0]].in_features} inputs, not a multiple of 4 "
                           "(2:4 needs groups of 4); leave it out with ignore")
    hess = {}
    if config.score != "magnitude":
        from cbx.compress.calibration import collect_hessians

        hess = collect_hessians(model, mods, calibration_sequences(model, config.calib()))
    cfg = _record(model, "sparsify", config)
    kernels: dict[str, int] = {}
    for name, mod in mods:
        w = mod.weight.detach()
        if config.score == "sparsegpt":
            new_w = P.sparsegpt_prune(w, hess.pop(name), config.sparsity, config.pattern,
                                      config.sparsegpt_block_size, config.sparsegpt_damp)
        else:
            scores = w.abs().float() if config.score == "magnitude" else P.wanda_scores(w, torch.diag(hess.pop(name)))
            mask = P.mask_2_4(scores) if config.pattern == "2:4" else P.mask_unstructured(scores, config.sparsity)
            new_w = w.float() * mask
        with torch.no_grad():
            mod.weight.copy_(new_w.to(w.dtype))
        kernel = "masked-dense"
        if config.pattern == "2:4" and config.kernel == "auto" and _semi_structured_ok(mod):
            kernel = _to_semi_structured(model, name, mod)
        mod.cbx_kernel = kernel
        kernels[kernel] = kernels.get(kernel, 0) + 1
    if "masked-dense" in kernels:
        log.warning("sparsify: %d layer(s) run dense with zeroed weights (masked dense path: same numbers, no speed-up)%s",
                    kernels["masked-dense"], "" if config.pattern == "2:4" else "; unstructured sparsity has no kernel here")
    cfg["kernels"] = kernels
    model.meta.setdefault("sparsity", {})[config.pattern] = {"layers": len(mods), "kernels": kernels}
    return model


def _to_semi_structured(model, name: str, mod: nn.Linear) -> str:
    """torchao's 2:4 semi-structured sparse weight (cuSPARSELt/CUTLASS) on CUDA; on failure the
    layer stays dense and the log says why."""
    try:
        from torchao.sparsity import semi_sparse_weight, sparsify_

        sparsify_(mod, semi_sparse_weight())
        return "semi-structured-cuda"
    except (RuntimeError, ImportError, ValueError, TypeError, AssertionError) as e:
        log.warning("sparsify: %s: semi-structured sparse kernel unavailable (%s); masked dense path", name, e)
        return "masked-dense"
