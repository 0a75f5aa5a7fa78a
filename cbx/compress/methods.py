"""The registered quantization transforms and their config dataclasses.

One frozen config per method, validated in ``__post_init__`` (torchao's ``AOBaseConfig``
habit), one registered function ``model -> model`` each (no ``if method == ...`` chains over
names). Modules are chosen by ``fnmatch`` globs with an explicit ``ignore`` list
(llm-compressor's ``targets``/``ignore``); ``targets: null`` means the per-variant default
below, which is the one place those defaults are written (``T3_EXTRA_TARGETS`` beside it lists
what the default leaves in floating point and ``targets`` may add: position tables, perceiver).

* ``int8_weight_only``: symmetric per-output-channel INT8 (RTN or GPTQ) of T3's linear layers
  (``nn.Linear`` and Turbo's GPT-2 ``Conv1D``) and of the embeddings matched by ``targets``.
* ``int4_weight_only``: asymmetric group-wise INT4 (RTN or GPTQ), same targeting. Layers whose
  input size is not a multiple of ``group_size`` use the largest smaller supported group size
  that divides it (tiny models); the used size is recorded on the module.
* ``fp8_cfm``: FP8 e4m3 weights with dynamic per-token activation scales for the linear
  layers of S3Gen's CFM estimator.

Embeddings cannot use GPTQ (there is no matmul whose output error to minimise): they are
always rounded to nearest. Each quantized module records its method and resolved config
(``cbx_method``/``cbx_config``) for the checkpoint manifest, and the model's ``meta`` lists
the transforms applied in order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Optional

from torch import nn

from cbx.compress import primitives as P
from cbx.compress.modules import (
    CUDA_INT8_KERNELS,
    FP8Linear,
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    is_linear,
    linear_weight,
)
from cbx.compress.registry import register_transform, select_modules
from cbx.errors import CbxError

log = logging.getLogger(__name__)

# Per-variant defaults: every transformer block, both heads and both token embeddings. The
# conditioning encoder (perceiver, speaker projection) and the learned position embeddings stay
# in floating point unless named.
T3_TARGETS = {
    "original": ("t3.tfmr.layers.*", "t3.speech_head", "t3.text_head", "t3.speech_emb", "t3.text_emb"),
    "multilingual": ("t3.tfmr.layers.*", "t3.speech_head", "t3.text_head", "t3.speech_emb", "t3.text_emb"),
    "turbo": ("t3.tfmr.h.*", "t3.speech_head", "t3.text_head", "t3.speech_emb", "t3.text_emb"),
}
# What the default leaves in floating point and ``targets`` may add to it (``targets:
# [<T3_TARGETS>, <T3_EXTRA_TARGETS>]``; ``cbx bench prune``'s int4 row does): the learned
# position embedding tables (Turbo: GPT-2's ``wpe``) and the perceiver's four linears. In a
# full-size bf16 T3 they are 21 MB (positions 12.6, perceiver 8.4): one row per decode step and
# one pass per utterance, so no decode time, but a tenth of a depth-pruned int4 T3's bytes.
# Named, not default, so existing int4/int8 results and run ids keep their meaning. The speaker
# projection (256 inputs, 0.5 MB) and the 1-input emotion layer are left out.
T3_EXTRA_TARGETS = {
    "original": ("t3.speech_pos_emb.emb", "t3.text_pos_emb.emb", "t3.cond_enc.perceiver.*"),
    "multilingual": ("t3.speech_pos_emb.emb", "t3.text_pos_emb.emb", "t3.cond_enc.perceiver.*"),
    "turbo": ("t3.tfmr.wpe",),
}
CFM_TARGETS = ("s3gen.flow.decoder.estimator.*",)
METHODS = ("rtn", "gptq")
COMPUTE_DTYPES = ("bfloat16", "float32")


def _tuple_of_globs(obj, name: str) -> None:
    value = getattr(obj, name)
    if value is None:
        return
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{name} must be a list of non-empty glob strings, got {value!r}")
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class _WeightOnlyBase:
    targets: Optional[tuple[str, ...]] = None
    ignore: tuple[str, ...] = ()
    method: str = "rtn"
    # GPTQ calibration (ignored by rtn)
    calib_texts: int = 8
    calib_max_speech_tokens: int = 150
    calib_seed: int = 0
    gptq_damp: float = 0.01
    gptq_block_size: int = 128

    def __post_init__(self):
        _tuple_of_globs(self, "targets")
        _tuple_of_globs(self, "ignore")
        if self.targets is not None and not self.targets:
            raise ValueError("targets must not be empty (null means the variant's default)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        from cbx.compress.calibration import check_calibration_params

        check_calibration_params(self)
        if not 0 < self.gptq_damp < 1:
            raise ValueError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if self.gptq_block_size < 1:
            raise ValueError(f"gptq_block_size must be >= 1, got {self.gptq_block_size}")


@dataclass(frozen=True)
class Int8WeightOnlyConfig(_WeightOnlyBase):
    compute_dtype: str = "bfloat16"
    # CUDA kernel: "int-mm" (torch._int_mm, activations quantized per token to int8 on the fly:
    # W8A8-dynamic numerics) or "dequant" (bf16 activations, weight dequantized per call).
    cuda_kernel: str = "int-mm"

    def __post_init__(self):
        super().__post_init__()
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.cuda_kernel not in CUDA_INT8_KERNELS:
            raise ValueError(f"cuda_kernel must be one of {', '.join(CUDA_INT8_KERNELS)}, got {self.cuda_kernel!r}")


@dataclass(frozen=True)
class Int4WeightOnlyConfig(_WeightOnlyBase):
    group_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in P.INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {P.INT4_GROUP_SIZES}, got {self.group_size}")


@dataclass(frozen=True)
class FP8CFMConfig:
    targets: tuple[str, ...] = CFM_TARGETS
    ignore: tuple[str, ...] = ()
    # dtype of the emulated matmul where no FP8 GEMM exists (both are exact for e4m3 operands)
    matmul_dtype: str = "bfloat16"

    def __post_init__(self):
        _tuple_of_globs(self, "targets")
        _tuple_of_globs(self, "ignore")
        if not self.targets:
            raise ValueError("targets must not be empty")
        if self.matmul_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.matmul_dtype!r}")


# ----------------------------------------------------------------------------- helpers


def _targets(model, config) -> tuple[str, ...]:
    if config.targets is not None:
        return config.targets
    variant = getattr(model, "variant", None)
    if variant not in T3_TARGETS:
        raise CbxError(f"targets: no default for model variant {variant!r}; give targets explicitly")
    return T3_TARGETS[variant]


def _select(model, config, what: str, embeddings: bool = True):
    """``(name, module)`` of the linear layers (and token embeddings, with ``embeddings``) that
    ``config.targets`` (null: the variant's default) names and ``config.ignore`` does not."""
    targets = _targets(model, config)
    mods = [(n, m) for n, m in select_modules(model, targets, config.ignore)
            if is_linear(m) or (embeddings and type(m) is nn.Embedding)]
    if not mods:
        kinds = "linear or embedding" if embeddings else "linear"
        raise CbxError(f"{what}: targets {list(targets)} (ignore {list(config.ignore)}) "
                       f"match no {kinds} layer of the model")
    return mods


def _record(model, name: str, config) -> dict:
    # JSON-plain (tuples become lists) so the manifest and model.meta agree after a round trip.
    cfg = json.loads(json.dumps(dataclasses.asdict(config)))
    model_meta = getattr(model, "meta", None)
    if isinstance(model_meta, dict):
        model_meta.setdefault("compress", []).append({"transform": name, "params": cfg})
    return cfg


def _hessians(model, config, linears):
    if config.method != "gptq" or not linears:
        return {}
    from cbx.compress.calibration import CALIBRATION_TEXTS, collect_hessians, generate_sequences

    seqs = generate_sequences(model, CALIBRATION_TEXTS[: config.calib_texts], config.calib_max_speech_tokens,
                              config.calib_seed)
    return collect_hessians(model, linears, seqs)


def _group_for(k: int, wanted: int) -> int | None:
    for g in sorted((g for g in P.INT4_GROUP_SIZES if g <= wanted), reverse=True):
        if k % g == 0:
            return g
    return None


def _swap(model, name: str, new: nn.Module, method: str, cfg: dict, **extra) -> None:
    new.cbx_method = method
    new.cbx_config = {**cfg, **extra}
    model.set_submodule(name, new)


def _progress(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, disable=len(items) < 8)


# ----------------------------------------------------------------------------- transforms


@register_transform("int8_weight_only", Int8WeightOnlyConfig)
def int8_weight_only(model, config: Int8WeightOnlyConfig):
    """INT8 weight-only (per-channel symmetric) on T3's linear layers and embeddings."""
    from cbx.compress.gptq import gptq_quantize

    mods = _select(model, config, "int8_weight_only")
    linears = [(n, m) for n, m in mods if is_linear(m)]
    hess = _hessians(model, config, linears)
    cfg = _record(model, "int8_weight_only", config)
    for name, mod in _progress(mods, "int8_weight_only"):
        if not is_linear(mod):
            _swap(model, name, Int8Embedding.from_float(mod), "int8_weight_only", cfg, rounding="rtn")
        elif name in hess:
            q, s = gptq_quantize(linear_weight(mod), hess.pop(name), bits=8, damp=config.gptq_damp,
                                 block_size=config.gptq_block_size)
            new = Int8Linear(q, s, mod.bias, config.compute_dtype, type(mod).__name__, config.cuda_kernel)
            _swap(model, name, new, "int8_weight_only", cfg, rounding="gptq")
        else:
            _swap(model, name, Int8Linear.from_float(mod, config.compute_dtype, config.cuda_kernel), "int8_weight_only", cfg,
                  rounding="rtn")
    return model


@register_transform("int4_weight_only", Int4WeightOnlyConfig)
def int4_weight_only(model, config: Int4WeightOnlyConfig):
    """INT4 weight-only (group-wise asymmetric) on T3's linear layers and embeddings."""
    from cbx.compress.gptq import gptq_quantize

    mods = []
    for name, mod in _select(model, config, "int4_weight_only"):
        k = linear_weight(mod).shape[1] if is_linear(mod) else mod.weight.shape[1]
        g = _group_for(k, config.group_size)
        if g is None:
            log.warning("int4_weight_only: %s has input size %d, no supported group size divides it; left as is",
                        name, k)
            continue
        if g != config.group_size:
            log.info("int4_weight_only: %s uses group size %d (input size %d)", name, g, k)
        mods.append((name, mod, g))
    linears = [(n, m) for n, m, _ in mods if is_linear(m)]
    hess = _hessians(model, config, linears)
    cfg = _record(model, "int4_weight_only", config)
    for name, mod, g in _progress(mods, "int4_weight_only"):
        if not is_linear(mod):
            _swap(model, name, Int4Embedding.from_float(mod, g), "int4_weight_only", cfg, group_size=g,
                  rounding="rtn")
        elif name in hess:
            codes, s, z = gptq_quantize(linear_weight(mod), hess.pop(name), bits=4, group_size=g,
                                        damp=config.gptq_damp, block_size=config.gptq_block_size)
            new = Int4Linear(codes, s, z, g, mod.bias, type(mod).__name__)
            _swap(model, name, new, "int4_weight_only", cfg, group_size=g, rounding="gptq")
        else:
            _swap(model, name, Int4Linear.from_float(mod, g), "int4_weight_only", cfg, group_size=g,
                  rounding="rtn")
    return model


@register_transform("fp8_cfm", FP8CFMConfig)
def fp8_cfm(model, config: FP8CFMConfig):
    """FP8 e4m3 (per-channel weights, per-token dynamic activations) on the CFM estimator's linears."""
    mods = _select(model, config, "fp8_cfm", embeddings=False)
    cfg = _record(model, "fp8_cfm", config)
    for name, mod in _progress(mods, "fp8_cfm"):
        _swap(model, name, FP8Linear.from_float(mod, config.matmul_dtype), "fp8_cfm", cfg)
    return model
