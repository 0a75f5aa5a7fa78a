"""The field's quantization libraries as registered transforms: torchao, bitsandbytes, optimum-quanto.

Why: researchers already quantize their LLMs with these three libraries and want to know which
one's int8 / int4 / fp8 to use for Chatterbox. Each transform here calls the library's own
quantizer on each targeted layer and runs the library's own kernels, so a leaderboard row named
``torchao_...``, ``bnb_...`` or ``quanto_...`` measures that library's code, not a re-implementation.
The workbench only adds what it needs to treat the result like its own modules
(:class:`cbx.compress.modules.LibraryLinear`): the same ``targets``/``ignore`` globs (default
``methods.T3_TARGETS``), GPT-2 ``Conv1D`` layers converted to ``nn.Linear`` first (the
libraries take only ``nn.Linear``), the bias kept in floating point beside the library layer,
and a checkpoint entry holding the library's *own* serialization:

* torchao: the tensor subclass flattened by ``torchao.prototype.safetensors``
  (``flatten_tensor_state_dict``: plain tensors + JSON metadata read back through torchao's
  allow-list of classes, no pickle);
* bitsandbytes: the packed weight and its quant state as bitsandbytes' ``state_dict`` writes them
  (``absmax``, ``quant_map``, nested statistics and the ``quant_state.bitsandbytes__*`` blob;
  ``SCB`` for LLM.int8), rebuilt with ``Params4bit.from_prequantized`` / ``Int8Params``;
* optimum-quanto: the frozen ``QLinear`` state dict plus its entry of ``quantization_map``,
  rebuilt as ``requantize`` does.

``quanto_w8a8`` also quantizes the activations (int8, one static scale per layer): the scales are
calibrated with quanto's own ``Calibration`` over the teacher-forced T3 passes GPTQ uses
(:mod:`cbx.compress.calibration`), so the int8 x int8 product runs ``torch._int_mm`` on CPU too.

Library layers quantize linear layers only: token embeddings matched by the default targets stay
in floating point (logged), unlike the workbench's own ``int8/int4_weight_only``.

A library or scheme that cannot run on the model's device refuses with one line naming the
requirement, before any layer is touched (measured with torchao 0.18, bitsandbytes 0.50,
optimum-quanto 0.2.7, torch 2.13 CPU): torchao's ``Int4WeightOnlyConfig`` needs CUDA (its CPU
counterpart here is ``IntxWeightOnlyConfig`` with int4 values stored unpacked in int8),
and torchao's float8 dynamic config needs compute capability 8.9+. quanto's generic qint4 path
(fp32, or input sizes that do not give groups of 128) fails on inference tensors, so that layer
runs it on a copy of its input outside inference mode (its bf16 groups-of-128 path uses the
tinygemm kernel and needs nothing).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from cbx.compress.methods import (COMPUTE_DTYPES, _group_for, _progress, _record, _select, _swap, _targets,
                                  _tuple_of_globs)
from cbx.compress.modules import _DTYPES, LibraryLinear, linear_weight
from cbx.compress.primitives import INT4_GROUP_SIZES
from cbx.compress.registry import register_transform, select_modules
from cbx.errors import CbxError

log = logging.getLogger(__name__)

# pip name, import name, the version the project pins (pyproject.toml)
LIBRARIES = {
    "torchao": ("torchao", "torchao==0.18.0"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes==0.50.2"),
    "optimum-quanto": ("optimum.quanto", "optimum-quanto==0.2.7"),
}


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class _LibraryConfig:
    targets: Optional[tuple[str, ...]] = None
    ignore: tuple[str, ...] = ()
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        _tuple_of_globs(self, "targets")
        _tuple_of_globs(self, "ignore")
        if self.targets is not None and not self.targets:
            raise ValueError("targets must not be empty (null means the variant's default)")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")


@dataclass(frozen=True)
class TorchaoConfig(_LibraryConfig):
    pass


@dataclass(frozen=True)
class TorchaoInt4WeightOnlyConfig(_LibraryConfig):
    group_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")


@dataclass(frozen=True)
class _CalibratedLibraryConfig(_LibraryConfig):
    # the same teacher-forced T3 calibration passes GPTQ uses (cbx.compress.calibration)
    calib_texts: int = 8
    calib_max_speech_tokens: int = 150
    calib_seed: int = 0

    def __post_init__(self):
        from cbx.compress.calibration import check_calibration_params

        super().__post_init__()
        check_calibration_params(self)


@dataclass(frozen=True)
class TorchaoAWQConfig(_CalibratedLibraryConfig):
    group_size: int = 128  # int4 only
    scale_search_space_size: int = 20  # torchao's AWQ grid: scales = act_mean ** (i / n), i < n
    max_input_bytes: int = 1 << 30  # observed inputs held at one time (more layers: more passes)

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.scale_search_space_size < 1:
            raise ValueError(f"scale_search_space_size must be >= 1, got {self.scale_search_space_size}")
        if self.max_input_bytes < 1:
            raise ValueError(f"max_input_bytes must be >= 1, got {self.max_input_bytes}")


@dataclass(frozen=True)
class BnbInt8Config(_LibraryConfig):
    # LLM.int8() outlier threshold on activations (columns above it run in 16-bit); 0 disables.
    threshold: float = 6.0

    def __post_init__(self):
        super().__post_init__()
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")


@dataclass(frozen=True)
class Bnb4bitConfig(_LibraryConfig):
    blocksize: int = 64
    double_quant: bool = False  # bitsandbytes' compress_statistics: the absmax values quantized too

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {self.blocksize}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be true or false, got {self.double_quant!r}")


@dataclass(frozen=True)
class QuantoConfig(_LibraryConfig):
    pass


@dataclass(frozen=True)
class QuantoW8A8Config(_CalibratedLibraryConfig):
    momentum: float = 0.9  # quanto's Calibration: running average of the per-batch absmax scales

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


# ----------------------------------------------------------------------------- requirements


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _require(model, transform: str, library: str, *, cuda: bool = False, capability=None) -> torch.device:
    """One-line refusal naming what is missing, before any layer is touched."""
    module, pin = LIBRARIES[library]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise CbxError(f"{transform}: needs the {library} package ({pin}, installed by `make env`)")
    device = _device(model)
    if cuda and device.type != "cuda":
        need = f"a CUDA GPU with compute capability >= {capability[0]}.{capability[1]}" if capability else "a CUDA GPU"
        raise CbxError(f"{transform}: needs {need}; the model is on {device.type} "
                       f"(run with device: cuda)")
    if capability and torch.cuda.get_device_capability(device) < capability:
        have = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise CbxError(f"{transform}: needs compute capability >= {capability[0]}.{capability[1]} "
                       f"(Ada/Hopper or newer); {torch.cuda.get_device_name(device)} has {have}")
    return device


# ----------------------------------------------------------------------------- the library layers


def _plain_linear(weight: Tensor, dtype: torch.dtype) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding ``weight [out, in]`` in ``dtype`` (no initialisation)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().to(dtype).contiguous(), requires_grad=False)
    return lin


class TorchaoLinear(LibraryLinear):
    """An ``nn.Linear`` whose weight is a torchao tensor subclass (``quantize_`` on it)."""

    library = "torchao"

    def library_state(self) -> dict[str, Tensor]:
        return _torchao_flatten(self.inner.weight)[0]

    def library_meta(self) -> dict:
        return {"torchao_metadata": _torchao_flatten(self.inner.weight)[1]}

    def dequantize(self) -> Tensor:
        return self.inner.weight.dequantize().float()

    def kernel_path(self, x2: Tensor) -> str:
        w = self.inner.weight
        kind = type(w).__name__
        if kind == "Int8Tensor":
            # weight-only: mm with the int8 weight cast to the activation dtype, then the scale;
            # with activation quantization: int8 x int8 (torch._int_mm, or its CPU decomposition)
            return "torchao:int8-int-mm" if w.act_quant_kwargs is not None else "torchao:int8-weight-mm"
        if kind == "Float8Tensor":
            return "torchao:fp8-scaled-mm" if getattr(w, "act_quant_kwargs", None) is not None else "torchao:fp8-dequant"
        if kind == "Int4TilePackedTo4dTensor":
            return "torchao:tinygemm"
        return "torchao:intx-dequant"


def _torchao_flatten(weight: Tensor) -> tuple[dict[str, Tensor], dict]:
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict({"w.weight": weight.detach()})
    return tensors, metadata


def _torchao_rebuild(meta: dict, tensors: dict[str, Tensor]) -> nn.Module:
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    result, leftover = unflatten_tensor_state_dict(tensors, meta["torchao_metadata"])
    if "w.weight" not in result or leftover:
        raise ValueError(f"torchao tensors incomplete (left over: {sorted(leftover)})")
    lin = nn.Linear(meta["in_features"], meta["out_features"], bias=False, device="meta")
    lin.weight = nn.Parameter(result["w.weight"], requires_grad=False)
    return lin


def _own_state(inner: nn.Module, *drop: str) -> dict[str, Tensor]:
    """The library module's own state dict, detached, without the bias (the wrapper keeps it)
    and the keys in ``drop``."""
    sd = inner.state_dict()
    for k in ("bias", *drop):
        sd.pop(k, None)
    return {k: v.detach() for k, v in sd.items()}


class BnbLinear(LibraryLinear):
    """bitsandbytes' ``Linear4bit`` (NF4/FP4) or ``Linear8bitLt`` (LLM.int8())."""

    library = "bitsandbytes"

    def library_state(self) -> dict[str, Tensor]:
        # bitsandbytes' own state dict: for 4-bit it first undoes its CPU repacking, so the file
        # holds the portable layout.
        return _own_state(self.inner, "weight_format")

    def library_meta(self) -> dict:
        inner = self.inner
        if _is_bnb_int8(inner):
            return {"bnb_layer": "Linear8bitLt", "threshold": float(inner.state.threshold)}
        return {"bnb_layer": "Linear4bit", "quant_type": inner.weight.quant_type}

    def dequantize(self) -> Tensor:
        import bitsandbytes.functional as F

        st = self.library_state()
        if "SCB" in st:
            return st["weight"].float() * (st["SCB"].float()[:, None] / 127.0)
        w = self.inner.weight
        return F.dequantize_4bit(st["weight"], w.quant_state).float().reshape(self.out_features, self.in_features)

    def kernel_path(self, x2: Tensor) -> str:
        if _is_bnb_int8(self.inner):
            # LLM.int8(): int8 x int8 (torch._int_mm on AVX512 CPUs, cuBLASLt on CUDA) plus the
            # outlier columns in 16-bit
            return "bnb:llm-int8"
        if x2.device.type == "cuda" and x2.shape[0] == 1:
            return "bnb:gemv-4bit"
        return "bnb:dequant-4bit"  # bitsandbytes' dequantize_4bit kernel, then a matmul


def _is_bnb_int8(inner: nn.Module) -> bool:
    return type(inner).__name__ == "Linear8bitLt"


def _bnb_rebuild(meta: dict, tensors: dict[str, Tensor], compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    n, k = meta["out_features"], meta["in_features"]
    if meta["bnb_layer"] == "Linear8bitLt":
        inner = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=meta["threshold"],
                                    device="meta")
        cb = tensors["weight"]
        inner.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=tensors["SCB"])
        return inner
    inner = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=compute_dtype, quant_type=meta["quant_type"],
                              device="meta")
    stats = {key[len("weight."):]: v for key, v in tensors.items() if key.startswith("weight.")}
    inner.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False,
                                                       device="cpu", module=inner)
    _portable_cpu_path(inner)
    return inner


class QuantoLinear(LibraryLinear):
    """optimum-quanto's frozen ``QLinear``."""

    library = "optimum-quanto"

    def library_state(self) -> dict[str, Tensor]:
        return _own_state(self.inner)

    def dequantize(self) -> Tensor:
        return self.inner.weight.dequantize().float()

    def kernel_path(self, x2: Tensor) -> str:
        kind = type(self.inner.weight).__name__
        if self.inner.activation_qtype is not None:
            # int8 activations (static scale) x int8 weights: quanto's qbytes_mm takes
            # torch._int_mm on CPU (torch >= 2.6) and on CUDA for > 16 rows, multiples of 8
            n = x2.shape[0]
            if x2.device.type == "cpu" or (n > 16 and n % 8 == 0 and self.in_features % 8 == 0
                                           and self.out_features % 8 == 0):
                return "quanto:int8-int-mm"
            return "quanto:dequant-mm"
        if "TinyGemm" in kind:
            return "quanto:tinygemm"
        if "Marlin" in kind or "AWQ" in kind:
            return "quanto:marlin" if "Marlin" in kind else "quanto:awq"
        w = self.inner.weight
        if (kind == "WeightQBytesTensor" and w._data.dtype == torch.int8 and x2.dtype == torch.bfloat16
                and x2.device.type == "cpu" and self.in_features % 4 == 0):
            return "quanto:int8pack-cpu"  # aten._weight_int8pack_mm
        return "quanto:dequant-mm"

    def library_meta(self) -> dict:
        from optimum.quanto import quantization_map

        meta = {"quanto_map": quantization_map(nn.ModuleDict({"w": self.inner}))["w"]}
        if self.inner.activation_qtype is not None:
            # for reading the manifest; the checkpoint loads the tensor (``input_scale``)
            meta["input_scale"] = float(self.inner.input_scale)
        return meta

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if torch.is_inference_mode_enabled() and type(self.inner.weight).__name__ == "WeightQBitsTensor":
            # quanto 0.2.7's generic qint4 path (fp32, or groups other than 128, i.e. no tinygemm)
            # fails on inference tensors ("Cannot set version_counter"): run it on a normal copy
            # of the input with autograd off, which computes the same thing.
            with torch.inference_mode(False), torch.no_grad():
                return super().forward(x.clone(), *args, **kwargs)
        return super().forward(x, *args, **kwargs)


def _quanto_rebuild(meta: dict, tensors: dict[str, Tensor], compute_dtype: torch.dtype) -> nn.Module:
    from optimum.quanto import quantize_module

    qmap = meta["quanto_map"]
    lin = nn.Linear(meta["in_features"], meta["out_features"], bias=False, device="meta", dtype=compute_dtype)
    acts = None if qmap["activations"] == "none" else qmap["activations"]
    q = quantize_module(lin, weights=qmap["weights"], activations=acts).to_empty(device="cpu")
    q.load_state_dict(tensors, strict=True, assign=True)
    if acts is not None:
        q.disable_output_quantization()  # as quanto_w8a8 built it
    return q


def library_from_qstate(meta: dict, tensors: dict[str, Tensor], bias: Tensor | None) -> LibraryLinear:
    """Rebuild a library layer from its checkpoint tensors and manifest entry (no pickle)."""
    library = meta.get("library")
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}")
    module, pin = LIBRARIES[library]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise ValueError(f"the checkpoint needs the {library} package ({pin})")
    cd = meta["compute_dtype"]
    if library == "torchao":
        inner, cls = _torchao_rebuild(meta, tensors), TorchaoLinear
    elif library == "bitsandbytes":
        inner, cls = _bnb_rebuild(meta, tensors, _DTYPES[cd]), BnbLinear
    else:
        inner, cls = _quanto_rebuild(meta, tensors, _DTYPES[cd]), QuantoLinear
    return cls(inner, meta["in_features"], meta["out_features"], bias, meta["orig_class"], cd)


# ----------------------------------------------------------------------------- the driver


def _linears(model, config, what: str) -> list[tuple[str, nn.Module]]:
    skipped = [n for n, m in select_modules(model, _targets(model, config), config.ignore) if type(m) is nn.Embedding]
    if skipped:
        log.info("%s: embeddings %s left in floating point (library transforms quantize linear layers)",
                 what, ", ".join(skipped))
    return _select(model, config, what, embeddings=False)


def _quantize(model, name: str, config, cls: type, quantize_one, prepared: dict | None = None, **extra):
    """Replace every targeted linear layer by ``cls(quantize_one(plain nn.Linear in compute dtype))``;
    with ``prepared`` (layer name -> function of no argument): by what that returns (calibrated
    layers, quantized before any module is swapped)."""
    mods = _linears(model, config, name)
    cfg = _record(model, name, config)
    dtype = _DTYPES[config.compute_dtype]
    left: dict[str, str] = {}
    for mname, mod in _progress(mods, name):
        w = linear_weight(mod)
        try:
            inner = prepared[mname]() if prepared is not None else quantize_one(_plain_linear(w, dtype))
            why = None if inner is not None else "no supported group size divides the input size"
        except (RuntimeError, AssertionError, ValueError) as e:
            # e.g. quanto's CPU tinygemm packing needs out_features % 16 == 0 (T3's 8194-row head)
            inner, why = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if inner is None:
            log.warning("%s: %s (%d -> %d) left in floating point: %s", name, mname, w.shape[1], w.shape[0], why)
            left[mname] = why
            continue
        new = cls(inner, w.shape[1], w.shape[0], mod.bias, type(mod).__name__, config.compute_dtype)
        _swap(model, mname, new, name, cfg, **extra)
    if left:
        # in the run's record (model.meta -> run.json, checkpoint manifest): what was not quantized
        meta = getattr(model, "meta", None)
        if not isinstance(meta, dict) or not meta.get("compress"):
            meta = {"compress": [{}]}
        meta["compress"][-1]["left_in_float"] = left
        if len(left) == len(mods):
            meta["compress"].pop()
            raise CbxError(f"{name}: the library quantized none of the targeted layers "
                           f"({next(iter(left.values()))})")
    return model


def _torchao(ao_config):
    def one(lin: nn.Linear) -> nn.Module:
        from torchao.quantization import quantize_

        quantize_(lin, ao_config)
        return lin
    return one


def _torchao_with(model, name: str, config, make_ao, **require):
    """torchao's ``quantize_(layer, make_ao(torchao.quantization))`` on every targeted layer,
    after the library and device checks (``require``: ``cuda``, ``capability``)."""
    _require(model, name, "torchao", **require)
    import torchao.quantization as ao

    return _quantize(model, name, config, TorchaoLinear, _torchao(make_ao(ao)))


@register_transform("torchao_int8_weight_only", TorchaoConfig)
def torchao_int8_weight_only(model, config: TorchaoConfig):
    """torchao ``Int8WeightOnlyConfig`` (per-channel symmetric int8 weights) on linear layers."""
    return _torchao_with(model, "torchao_int8_weight_only", config, lambda ao: ao.Int8WeightOnlyConfig())


@register_transform("torchao_int8_dynamic", TorchaoConfig)
def torchao_int8_dynamic(model, config: TorchaoConfig):
    """torchao ``Int8DynamicActivationInt8WeightConfig`` (W8A8: per-token dynamic int8 activations)."""
    return _torchao_with(model, "torchao_int8_dynamic", config, lambda ao: ao.Int8DynamicActivationInt8WeightConfig())


@register_transform("torchao_int4_weight_only", TorchaoInt4WeightOnlyConfig)
def torchao_int4_weight_only(model, config: TorchaoInt4WeightOnlyConfig):
    """torchao int4 weight-only, group-wise: ``Int4WeightOnlyConfig`` (tinygemm layout) on CUDA,
    ``IntxWeightOnlyConfig(int4)`` on CPU (torchao 0.18's only CPU int4 layout: values unpacked
    in int8, dequantized per call)."""
    device = _require(model, "torchao_int4_weight_only", "torchao")
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    if device.type == "cuda" and config.compute_dtype != "bfloat16":
        raise CbxError("torchao_int4_weight_only: the CUDA tinygemm layout needs compute_dtype bfloat16")
    layout = "tile_packed_to_4d" if device.type == "cuda" else "intx_unpacked_to_int8"

    def one(lin: nn.Linear):
        # the largest supported group size up to the configured one that divides the input size
        # (tiny models), as the workbench's int4_weight_only does; none: the layer stays as is
        g = _group_for(lin.in_features, config.group_size)
        if g is None:
            return None
        if device.type == "cuda":
            ao = Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d")
        else:
            ao = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g))
        return _torchao(ao)(lin)

    return _quantize(model, "torchao_int4_weight_only", config, TorchaoLinear, one, layout=layout)


@register_transform("torchao_float8_weight_only", TorchaoConfig)
def torchao_float8_weight_only(model, config: TorchaoConfig):
    """torchao ``Float8WeightOnlyConfig`` (per-channel e4m3 weights, dequantized per call)."""
    return _torchao_with(model, "torchao_float8_weight_only", config, lambda ao: ao.Float8WeightOnlyConfig())


@register_transform("torchao_float8_dynamic", TorchaoConfig)
def torchao_float8_dynamic(model, config: TorchaoConfig):
    """torchao ``Float8DynamicActivationFloat8WeightConfig`` (row-wise e4m3 weights and dynamic
    activations, ``torch._scaled_mm``); needs compute capability 8.9+."""
    return _torchao_with(model, "torchao_float8_dynamic", config,
                         lambda ao: ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow()),
                         cuda=True, capability=(8, 9))


def _torchao_awq(model, name: str, config: TorchaoAWQConfig, base_for, **extra):
    """torchao's AWQ (``torchao.prototype.awq``) on every targeted layer: torchao's
    ``AWQObserver`` records the layer's inputs over the calibration passes, its ``convert`` step
    searches the per-input-channel scale (activation mean ** ratio) minimising the layer's output
    error and quantizes ``W * scale`` with ``base_for(layer)``'s config; the weight keeps
    ``1/scale`` as ``act_pre_scale``, applied to the input on every call.

    Observed inputs are held on the CPU in the compute dtype: layers are observed in chunks of at
    most ``max_input_bytes`` (one calibration pass per chunk, the first chunk one layer to count
    the rows), each chunk converted before the next; no module is swapped before every layer is
    converted."""
    from torchao.prototype.awq import AWQConfig, AWQObservedLinear
    from torchao.prototype.awq.core import AWQObserver
    from torchao.quantization import quantize_

    mods = _linears(model, config, name)
    run_pass = _calibration_pass(model, config, name)
    dtype = _DTYPES[config.compute_dtype]
    prepared: dict = {}
    rows, i = None, 0
    while i < len(mods):
        if rows is None:
            chunk = mods[i:i + 1]
        else:
            chunk, used = [], 0
            for mname, mod in mods[i:]:
                need = rows * linear_weight(mod).shape[1] * dtype.itemsize
                if chunk and used + need > config.max_input_bytes:
                    break
                chunk.append((mname, mod))
                used += need
        i += len(chunk)
        observed, handles = {}, []
        for mname, mod in chunk:
            plain = _plain_linear(linear_weight(mod), dtype)
            base = base_for(plain)
            if base is None:
                prepared[mname] = _raising(ValueError("no supported group size divides the input size"))
                continue
            obs = AWQObserver(plain.weight, None, base, config.scale_search_space_size)
            observed[mname] = (plain, obs, base)
            handles.append(mod.register_forward_pre_hook(_observe(obs, plain.in_features, dtype)))
        try:
            run_pass()
        finally:
            for h in handles:
                h.remove()
        for mname, (plain, obs, base) in observed.items():
            if not obs.inputs:
                raise CbxError(f"{name}: calibration never reached {mname}; leave it out with ignore")
            rows = sum(x.shape[0] for x in obs.inputs)
            holder = nn.Sequential(AWQObservedLinear.from_float(plain, obs))
            try:
                quantize_(holder, AWQConfig(base, step="convert"))
                prepared[mname] = (lambda m: lambda: m)(holder[0])
            except (RuntimeError, AssertionError, ValueError) as e:
                prepared[mname] = _raising(e)
            obs.inputs.clear()
    return _quantize(model, name, config, TorchaoLinear, None, prepared=prepared, **extra)


def _observe(obs, in_features: int, dtype: torch.dtype):
    def fn(module, args):
        obs(args[0].reshape(-1, in_features).to(dtype), None)  # torchao's observer keeps a CPU copy
    return fn


def _raising(error: Exception):
    def fn():
        raise error
    return fn


@register_transform("torchao_awq_int8", TorchaoAWQConfig)
def torchao_awq_int8(model, config: TorchaoAWQConfig):
    """torchao AWQ over ``Int8WeightOnlyConfig`` (per-channel int8 weights with AWQ's
    per-input-channel scales, calibrated on the GPTQ calibration passes); CPU and CUDA."""
    _require(model, "torchao_awq_int8", "torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return _torchao_awq(model, "torchao_awq_int8", config, lambda lin: Int8WeightOnlyConfig())


@register_transform("torchao_awq_int4", TorchaoAWQConfig)
def torchao_awq_int4(model, config: TorchaoAWQConfig):
    """torchao AWQ over ``Int4WeightOnlyConfig`` (tinygemm layout, ``group_size``): CUDA only, as
    torchao 0.18's CPU int4 layout (``IntxWeightOnlyConfig``) cannot hold AWQ's activation
    pre-scale."""
    _require(model, "torchao_awq_int4", "torchao", cuda=True)
    if config.compute_dtype != "bfloat16":
        raise CbxError("torchao_awq_int4: the CUDA tinygemm layout needs compute_dtype bfloat16")
    from torchao.quantization import Int4WeightOnlyConfig

    def base_for(lin):
        g = _group_for(lin.in_features, config.group_size)
        return None if g is None else Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d")

    return _torchao_awq(model, "torchao_awq_int4", config, base_for, layout="tile_packed_to_4d")


@register_transform("bnb_int8", BnbInt8Config)
def bnb_int8(model, config: BnbInt8Config):
    """bitsandbytes LLM.int8() (``Linear8bitLt``: int8 weights, int8 activations with 16-bit
    outlier columns above ``threshold``)."""
    device = _require(model, "bnb_int8", "bitsandbytes")

    def one(lin: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        n, k = lin.weight.shape
        inner = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=config.threshold,
                                    device="meta")
        inner.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        return inner.to(device)  # bitsandbytes quantizes on the move to a device

    return _quantize(model, "bnb_int8", config, BnbLinear, one)


def _portable_cpu_path(inner: nn.Module) -> None:
    """Keep bitsandbytes 0.50 off its AVX512-BF16 CPU repacking: on the first forward it
    repacks the weight in place and rounds ``absmax`` to bf16 (re-quantizing the double-quant
    statistics), and its inverse does not restore them, so a layer that has run would save
    different statistics than it computes with (and rows not a multiple of 32 assert). The
    portable path (bitsandbytes' ``dequantize_4bit`` + matmul) computes from the stored state."""
    inner.support_avx512bf16_for_cpu = False


def _bnb_4bit(model, name: str, quant_type: str, config: Bnb4bitConfig):
    device = _require(model, name, "bitsandbytes")

    def one(lin: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        n, k = lin.weight.shape
        inner = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=_DTYPES[config.compute_dtype],
                                  compress_statistics=config.double_quant, quant_type=quant_type, device="meta")
        inner.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=config.blocksize,
                                         compress_statistics=config.double_quant, quant_type=quant_type,
                                         module=inner)
        _portable_cpu_path(inner)
        return inner.to(device)

    return _quantize(model, name, config, BnbLinear, one)


@register_transform("bnb_nf4", Bnb4bitConfig)
def bnb_nf4(model, config: Bnb4bitConfig):
    """bitsandbytes NF4 (``Linear4bit``, 4-bit NormalFloat, absmax per ``blocksize`` weights)."""
    return _bnb_4bit(model, "bnb_nf4", "nf4", config)


@register_transform("bnb_fp4", Bnb4bitConfig)
def bnb_fp4(model, config: Bnb4bitConfig):
    """bitsandbytes FP4 (``Linear4bit``, 4-bit float e2m1, absmax per ``blocksize`` weights)."""
    return _bnb_4bit(model, "bnb_fp4", "fp4", config)


def _quanto(model, name: str, config, weights: str):
    _require(model, name, "optimum-quanto")

    def one(lin: nn.Linear) -> nn.Module:
        from optimum.quanto import quantize_module

        q = quantize_module(lin, weights=weights, activations=None)
        q.freeze()
        return q

    return _quantize(model, name, config, QuantoLinear, one)


@register_transform("quanto_qint8", QuantoConfig)
def quanto_qint8(model, config: QuantoConfig):
    """optimum-quanto ``qint8`` weights (per-channel symmetric)."""
    return _quanto(model, "quanto_qint8", config, "qint8")


@register_transform("quanto_qint4", QuantoConfig)
def quanto_qint4(model, config: QuantoConfig):
    """optimum-quanto ``qint4`` weights (group-wise: 128, or the largest multiple of 32 dividing
    the input size; bf16 with groups of 128 runs the tinygemm kernel)."""
    return _quanto(model, "quanto_qint4", config, "qint4")


@register_transform("quanto_qfloat8", QuantoConfig)
def quanto_qfloat8(model, config: QuantoConfig):
    """optimum-quanto ``qfloat8`` (e4m3) weights (per-channel)."""
    return _quanto(model, "quanto_qfloat8", config, "qfloat8")


@register_transform("quanto_w8a8", QuantoW8A8Config)
def quanto_w8a8(model, config: QuantoW8A8Config):
    """optimum-quanto ``qint8`` weights and ``qint8`` activations (W8A8 with *static* per-tensor
    input scales from ``quanto.Calibration`` over T3's teacher-forced calibration passes, the same
    sequences GPTQ calibrates on); the int8 x int8 product runs ``torch._int_mm``.

    Outputs stay in floating point (quanto's ``disable_output_quantization``: every T3 linear
    output feeds a float op, the bias add, a residual sum or attention, which is what quanto's
    own streamlined calibration decides for such layers). A model that is not a Chatterbox model
    supplies its calibration through a ``calibration_pass()`` method (the accuracy sweep and the
    bench's single layers do)."""
    name = "quanto_w8a8"
    _require(model, name, "optimum-quanto")
    from optimum.quanto import Calibration, quantize_module

    _linears(model, config, name)  # refuse bad targets before the (slow) sampling
    run_pass = _calibration_pass(model, config, name)

    def one(lin: nn.Linear) -> nn.Module:
        q = quantize_module(lin, weights="qint8", activations="qint8")
        q.disable_output_quantization()
        return q  # frozen after calibration

    originals = _linears(model, config, name)
    _quantize(model, name, config, QuantoLinear, one)
    layers = {mname: mod.inner for mname, mod in model.named_modules()
              if isinstance(mod, QuantoLinear) and getattr(mod, "cbx_method", None) == name and not mod.inner.frozen}
    seen = dict.fromkeys(layers, 0)
    handles = [inner.register_forward_pre_hook(_count_calls(seen, mname)) for mname, inner in layers.items()]
    try:
        with Calibration(momentum=config.momentum, streamline=False):
            run_pass()
    finally:
        for h in handles:
            h.remove()
    unseen = [mname for mname, n in seen.items() if n == 0]
    if unseen:
        for mname, mod in originals:  # the model as it was
            model.set_submodule(mname, mod)
        if isinstance(getattr(model, "meta", None), dict) and model.meta.get("compress"):
            model.meta["compress"].pop()
        raise CbxError(f"{name}: calibration never reached {', '.join(unseen[:3])}"
                       f"{' ...' if len(unseen) > 3 else ''}; leave it out with ignore")
    with torch.inference_mode(False), torch.no_grad():
        for inner in layers.values():
            # scales set under inference mode become ordinary tensors (saved, copied, moved)
            inner.input_scale = inner.input_scale.detach().clone()
            inner.output_scale = inner.output_scale.detach().clone()
            inner.freeze()
    return model


def _calibration_pass(model, config, name: str):
    """A function of no argument running the model over its calibration data: the teacher-forced
    T3 passes GPTQ calibrates on (speech sampled now by the unquantized T3), or, for a model that
    is not a Chatterbox model, its own ``calibration_pass()``."""
    run_pass = getattr(model, "calibration_pass", None)
    if run_pass is not None:
        return run_pass
    if getattr(model, "t3", None) is None:
        raise CbxError(f"{name}: needs calibration data: a Chatterbox model (T3 teacher-forced passes) "
                       "or a model with a calibration_pass() method")
    from cbx.compress.calibration import CALIBRATION_TEXTS, _teacher_forced_pass, generate_sequences

    seqs = generate_sequences(model, CALIBRATION_TEXTS[: config.calib_texts], config.calib_max_speech_tokens,
                              config.calib_seed)
    return lambda: _teacher_forced_pass(model, seqs)


def _count_calls(seen: dict, mname: str):
    def fn(module, args):
        seen[mname] += 1
    return fn
