"""Quantized replacements for ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding``.

Each class holds only low-bit data (the float weight is dropped, so resident memory really
falls) and runs a real low-bit kernel where one exists:

* :class:`Int8Linear`: ``torch.ops.aten._weight_int8pack_mm`` on CPU (bf16 activations by
  default: on this CPU the bf16 path is >20x faster than the fp32 one); on CUDA ``torch._int_mm``
  (int8 x int8 -> int32 on the tensor cores) with per-token dynamic int8 activations
  (:func:`cbx.compress.primitives.int8_int_mm_linear`, the same code tested on CPU), or with
  ``cuda_kernel="dequant"`` torchao's weight-only recipe (``(x @ q.to(x.dtype).T) * scale``,
  bf16 activations, fused only under torch.compile).
* :class:`Int4Linear`: ``_weight_int4pack_mm_for_cpu`` on CPU and the tinygemm kernel
  ``_weight_int4pack_mm`` (the one torchao's int4 tensor-core layout dispatches to) on CUDA.
  The kernel layout depends on the device (and on the CPU's vector width), so it is rebuilt
  when the module moves between device types and never written to disk; the codes can be read
  back from either layout (:meth:`Int4Linear.codes`), so a CUDA model saves like a CPU one.
  Both kernels want a multiple of 16 (CPU) / 8 (CUDA) output rows: the weight is padded with
  zero-weight rows and the output cropped, so heads of any height work on every kernel.
* :class:`FP8Linear`: ``torch._scaled_mm`` with row-wise scales on sm89+ GPUs, otherwise the
  rounding-exact emulation of :func:`cbx.compress.primitives.fp8_linear_emulated`.

Every class has a pure-torch fallback (``forward_reference``) computing the same thing by
dequantizing; tests hold kernel and fallback to tight bounds, and the fallback runs wherever a
kernel is missing, never silently: each forward records the path it took and a fallback logs
one warning naming the module (:mod:`cbx.compress.kernels`; the run record counts the paths). Scales, zeros and fp8 weights are stored as *integer views* of their real
dtype, so ``model.to(torch.bfloat16)`` or ``model.half()`` cannot silently re-round them;
a zero-size float buffer follows such casts and gives the embeddings their output dtype.

All three keep ``in_features``/``out_features`` and a ``weight`` attribute (the packed data:
upstream reads ``speech_head.weight.device``), and accept and ignore extra forward arguments
(diffusers' ``LoRACompatibleLinear.forward(hidden_states, scale)``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from cbx.compress import kernels as K
from cbx.compress import primitives as P
from cbx.engine.t3_decode import compile_many_rows
from cbx.engine.t3_prefill import prefill_fp32

log = logging.getLogger("cbx.compress.modules")

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# Int8Linear on CUDA: torch._int_mm with per-token int8 activations, or dequantize-then-matmul.
CUDA_INT8_KERNELS = ("int-mm", "dequant")


def _own(t: Tensor) -> Tensor:
    """``t`` contiguous in storage of its own, aligned as torch's allocator aligns it.

    Tensors read from a safetensors file can sit at any byte offset of the mapped file, and the
    CPU int8 kernel crashed the process (SIGSEGV) on an int8 weight at offset 28 (seen here,
    torch 2.13, AVX512): kernels get freshly allocated copies."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 64 else t


def linear_weight(module: nn.Module) -> Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if _is_conv1d(module):
        return module.weight.detach().t()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so transformers stays optional here.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class _RowScaled:
    """Codes in ``qweight`` with one float32 scale per row, kept as int32 bits in
    ``_scale_bits`` (so ``model.to(dtype)`` can never round the scales)."""

    @property
    def scale(self) -> Tensor:
        return self._scale_bits.view(torch.float32)

    def qstate(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "scale": self.scale}


class _GroupScaled:
    """Int4 codes with a bf16 scale and zero per group of ``group_size`` inputs, kept as int16
    bits in ``_scale_bits``/``_zero_bits`` (so ``model.to(dtype)`` cannot change them)."""

    @property
    def scale(self) -> Tensor:
        return self._scale_bits.view(torch.bfloat16)

    @property
    def zero(self) -> Tensor:
        return self._zero_bits.view(torch.bfloat16)


class _Quantized(nn.Module):
    """Shared parts: shapes, bias, provenance and the checkpoint view of the data."""

    kind = ""
    cbx_kernel: str | None = None  # the path the last forward took (cbx.compress.kernels)
    cbx_kernel_fallback: dict | None = None

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, orig_class: str):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.orig_class = orig_class
        # Set by the transform that made this module; read by the checkpoint manifest.
        self.cbx_method: str = ""
        self.cbx_config: dict = {}

    def meta(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "orig_class": self.orig_class, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    @staticmethod
    def _fusable(mods: list, *same: str) -> bool:
        """All of ``mods`` of one class with equal ``in_features``, bias presence and the named
        attributes (``fuse`` keeps only what reads the same input the same way)."""
        first = mods[0]
        return all(type(m) is type(first) and m.in_features == first.in_features
                   and (m.bias is None) == (first.bias is None)
                   and all(getattr(m, a) == getattr(first, a) for a in same) for m in mods)

    @staticmethod
    def _share(fused: nn.Module, mods: list, names: tuple[str, ...]) -> None:
        """Point each part's buffers ``names`` (and bias) at its rows of the fused module's,
        so the weights are held once; the parts keep working on their own."""
        offsets = {n: 0 for n in (*names, "bias")}
        for m in mods:
            for n in names:
                rows = getattr(m, n).shape[0]
                setattr(m, n, getattr(fused, n)[offsets[n]: offsets[n] + rows])
                offsets[n] += rows
            if m.bias is not None:
                rows = m.bias.shape[0]
                m.bias.data = fused.bias.data[offsets["bias"]: offsets["bias"] + rows]
                offsets["bias"] += rows

    def _finish(self, y: Tensor, x: Tensor) -> Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8Linear(_RowScaled, _Quantized):
    kind = "int8"

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
                 compute_dtype: str = "bfloat16", orig_class: str = "Linear", cuda_kernel: str = "int-mm"):
        super().__init__(qweight.shape[1], qweight.shape[0], bias, orig_class)
        self.compute_dtype = compute_dtype
        if cuda_kernel not in CUDA_INT8_KERNELS:
            raise ValueError(f"cuda_kernel must be one of {', '.join(CUDA_INT8_KERNELS)}, got {cuda_kernel!r}")
        self.cuda_kernel = cuda_kernel
        self._int_mm_ok = True
        self._int_mm_error = ""
        self.register_buffer("qweight", _own(qweight.to(torch.int8)))
        self.register_buffer("_scale_bits", _own(scale.float()).view(torch.int32))
        self._kernel_ok = True

    @classmethod
    def from_float(cls, module: nn.Module, compute_dtype: str = "bfloat16", cuda_kernel: str = "int-mm") -> "Int8Linear":
        q, s = P.quantize_int8_per_channel(linear_weight(module))
        return cls(q, s, module.bias, compute_dtype, type(module).__name__, cuda_kernel)

    @property
    def weight(self) -> Tensor:
        return self.qweight

    @classmethod
    def fuse(cls, mods: list["Int8Linear"]) -> "Int8Linear | None":
        """One module for several that read the same input (q/k/v, gate/up): outputs side by
        side from one ``_weight_int8pack_mm`` call. Rows are independent in this layout, so the
        fused codes and scales are the parts' stacked; the parts then view the fused storage.
        None when the parts differ in input size, bias or compute dtype."""
        if not cls._fusable(mods, "compute_dtype"):
            return None
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        fused = cls(torch.cat([m.qweight for m in mods]), torch.cat([m.scale for m in mods]), bias,
                    mods[0].compute_dtype, mods[0].orig_class)
        fused._kernel_ok = all(m._kernel_ok for m in mods)
        cls._share(fused, mods, ("qweight", "_scale_bits"))
        return fused

    def dequantize(self) -> Tensor:
        return P.dequantize_int8(self.qweight, self.scale)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if _fp32_rows(self, x):
            K.used(self, "int8-dense-fp32")
            return self._finish(self._dense_fp32(x.reshape(-1, self.in_features)), x)
        cd = _DTYPES[self.compute_dtype]
        x2 = x.reshape(-1, self.in_features).to(cd)
        if x.device.type == "cuda":
            y = self._forward_cuda(x2)
        elif self._kernel_ok:
            try:
                y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale.to(cd))
                K.used(self, "int8pack-cpu")
            except (RuntimeError, NotImplementedError) as exc:
                # For good: a kernel that failed once for this module fails again.
                self._kernel_ok = False
                self._kernel_error = _reason(exc)
                K.fell_back(self, "int8pack-cpu", "dequant-fallback", self._kernel_error)
                y = self._reference(x2)
        else:
            K.fell_back(self, "int8pack-cpu", "dequant-fallback", getattr(self, "_kernel_error", "kernel failed"))
            y = self._reference(x2)
        return self._finish(y, x)

    def _dense_fp32(self, x2: Tensor) -> Tensor:
        """``x2 @ W.T`` in float32 with ``W`` dequantized a few output rows at a time (the fp32
        prefill, :func:`cbx.engine.t3_prefill.prefill_fp32`)."""
        rows = _fp32_chunk(self.in_features)
        scale = self.scale.float()
        parts = [(x2 @ self.qweight[i: i + rows].float().t()) * scale[i: i + rows]
                 for i in range(0, self.out_features, rows)]
        return torch.cat(parts, dim=-1)

    def _forward_cuda(self, x2: Tensor) -> Tensor:
        cd = x2.dtype
        if self.cuda_kernel == "int-mm":
            why = None
            if not self._int_mm_ok:
                why = self._int_mm_error
            elif not P.int_mm_ok(self.out_features, self.in_features):
                why = f"shape {self.out_features}x{self.in_features} is not a multiple of 8 (or <= 16)"
            else:
                try:
                    y = P.int8_int_mm_linear(x2, self.qweight, self.scale).to(cd)
                    K.used(self, "int-mm")
                    return y
                except (RuntimeError, NotImplementedError) as exc:
                    self._int_mm_ok = False
                    self._int_mm_error = why = f"torch._int_mm failed: {_reason(exc)}"
            K.fell_back(self, "int-mm", "int8-dequant", why)
        else:
            K.used(self, "int8-dequant")
        return torch.matmul(x2, self.qweight.to(cd).t()) * self.scale.to(cd)

    def _reference(self, x2: Tensor) -> Tensor:
        cd = x2.dtype
        return ((x2.float() @ self.qweight.float().t()) * self.scale.to(cd).float()).to(cd)

    def forward_reference(self, x: Tensor) -> Tensor:
        return self._finish(self._reference(x.reshape(-1, self.in_features).to(_DTYPES[self.compute_dtype])), x)


# "fn": the compiled unpacking of the CPU int4 layout (one graph per weight shape), or False once
# compiling failed in this process (no C++ compiler): the int4 kernel then serves every input.
# "native_bf16": whether this CPU multiplies bf16 natively (None: read from its flags once, as
# ``dtype: auto`` does). Without it a bf16 x bf16 GEMM falls to ATen's own single-threaded
# loop (measured on the 2-core AVX2 CPU: a compiled bench quant's int4 prefill sat minutes in
# ``cpublas_gemm_impl``), so the dense path is only taken where bf16 is native.
_DENSE: dict[str, Any] = {"fn": None, "native_bf16": None}


def _native_bf16_cpu() -> bool:
    if _DENSE["native_bf16"] is None:
        from cbx.engine.synth import auto_dtype

        _DENSE["native_bf16"] = auto_dtype("cpu") == "bf16"
    return _DENSE["native_bf16"]


def _dense_weight_t(packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor | None:
    """:func:`cbx.compress.primitives.int4_cpu_layout_dense_t` through ``torch.compile`` (eager
    it is memory-bound and slower than the kernel it replaces); None when it cannot compile."""
    if _DENSE["fn"] is None:
        _DENSE["fn"] = torch.compile(P.int4_cpu_layout_dense_t, dynamic=False, fullgraph=True)
    if _DENSE["fn"] is False:
        return None
    try:
        return _DENSE["fn"](packed, scale, zero, torch.bfloat16, P.int4_cpu_block_n())
    except Exception as exc:  # inductor needs a working C++ toolchain: say so once, keep the kernel
        _DENSE["fn"] = False
        log.warning("int4 prefill: cannot compile the weight unpacking (%s); many-row inputs run the int4 "
                    "kernel", _reason(exc))
        return None


# The fp32 prefill (:func:`cbx.engine.t3_prefill.prefill_fp32`): inputs of at least this many
# rows multiply a float32 copy of the weight made chunk by chunk for the call; fewer rows (a
# short voice prefix, decode steps) run the low-bit kernel. Measured on the 2-core AVX2 CPU
# (1024x3072 int4, eager unpacking): kernel 8.5 ms against fp32 9.5 ms + unpacking at 64 rows,
# 27.5 against 18.5 + unpacking at 194.
FP32_MIN_ROWS = 128
# Weight elements per float32 chunk (4 MiB): cache-sized, see int4_cpu_layout_dense_t_chunks.
FP32_CHUNK_ELEMS = 1 << 20


def _fp32_rows(module: nn.Module, x: Tensor) -> bool:
    """A float32 prefill input of enough rows for the dense float32 path."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and prefill_fp32() and not torch.is_grad_enabled()
            and x.numel() >= FP32_MIN_ROWS * module.in_features)


def _fp32_chunk(in_features: int) -> int:
    """Output rows per float32 weight chunk: ~FP32_CHUNK_ELEMS weights, whole row blocks of the int4 packing."""
    b = P.int4_cpu_block_n()
    return max(b, FP32_CHUNK_ELEMS // in_features // b * b)


class Int4Linear(_GroupScaled, _Quantized):
    kind = "int4"

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                 bias: Tensor | None = None, orig_class: str = "Linear"):
        n, k = codes.shape
        super().__init__(k, n, bias, orig_class)
        self.group_size = int(group_size)
        self.register_buffer("_scale_bits", _own(scale.to(torch.bfloat16)).view(torch.int16))
        self.register_buffer("_zero_bits", _own(zero.to(torch.bfloat16)).view(torch.int16))
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        self.layout = ""
        self._layout_reason = ""  # why the kernel layout could not be built (layout "canonical")
        self._sz_cache: dict = {}
        self._pack(codes, codes.device)

    @classmethod
    def from_float(cls, module: nn.Module, group_size: int = 128) -> "Int4Linear":
        codes, s, z = P.quantize_int4_groupwise(linear_weight(module), group_size)
        return cls(codes, s, z, group_size, module.bias, type(module).__name__)

    @property
    def weight(self) -> Tensor:
        return self.packed

    @classmethod
    def fuse(cls, mods: list["Int4Linear"]) -> "Int4Linear | None":
        """One module for several that read the same input (q/k/v, gate/up): their outputs side
        by side from ONE int4 kernel call, which on a 2-row decode step is mostly fixed cost.

        The packed kernel layouts block output rows (16-64 per block on CPU, 8 on CUDA), so
        when every part's row count fills whole blocks the fused packing is the parts' packings
        stacked: no repacking. That is checked, not assumed: the fused module must reproduce
        the parts' outputs exactly on a probe input, else None (parts left as they are). The
        parts then view the fused storage. None too for differing input size, group size,
        layout or bias, and for the canonical (no-kernel) layout.
        """
        first = mods[0]
        if not cls._fusable(mods, "group_size", "layout") or first.layout == "canonical":
            return None
        if any(P.padded_rows(m.out_features) != m.out_features for m in mods):
            return None
        fused = cls.__new__(cls)
        bias = torch.cat([m.bias.detach() for m in mods]) if first.bias is not None else None
        _Quantized.__init__(fused, first.in_features, sum(m.out_features for m in mods), bias, first.orig_class)
        fused.group_size = first.group_size
        fused.register_buffer("_scale_bits", torch.cat([m._scale_bits for m in mods]))
        fused.register_buffer("_zero_bits", torch.cat([m._zero_bits for m in mods]))
        fused.register_buffer("packed", torch.cat([m.packed for m in mods]))
        fused.layout, fused._sz_cache = first.layout, {}
        probe = torch.randn(2, first.in_features, generator=torch.Generator().manual_seed(0),
                            dtype=torch.bfloat16).to(first.packed.device)
        if not torch.equal(fused(probe), torch.cat([m(probe) for m in mods], dim=-1)):
            return None
        cls._share(fused, mods, ("packed", "_scale_bits", "_zero_bits"))
        return fused

    # -- layouts
    def _pack(self, codes: Tensor, device: torch.device) -> None:
        n = self.out_features
        self._layout_reason = ""
        if device.type == "cuda":
            # Padded rows hold code 8 (and get scale 1 / zero 0): weight 0, output cropped.
            c = P.pad_rows(codes.to(device=device, dtype=torch.uint8), P.int4_kernel_rows(n, "cuda"), 8)
            try:
                tiles = P.tinygemm_inner_k_tiles(self.in_features)
                self.packed = torch.ops.aten._convert_weight_to_int4pack(P.codes_to_tinygemm_input(c), tiles)
                self.layout = "cuda"
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # old GPU, odd K
                self.packed = P.pack_int4(c[:n])
                self.layout = "canonical"
                self._layout_reason = f"cannot pack for tinygemm: {_reason(exc)}"
        else:
            n_pad = P.int4_kernel_rows(n, "cpu")
            c = P.pad_rows(codes.cpu().to(torch.uint8), n_pad, 8)
            try:
                self.packed = P.codes_to_int4_cpu_layout(c).to(device)
                self.layout = "cpu"
            except (RuntimeError, NotImplementedError) as exc:
                self.packed = P.pack_int4(c[:n]).to(device)
                self.layout = "canonical"
                self._layout_reason = f"cannot pack for the CPU kernel: {_reason(exc)}"
        self._sz_cache = {}

    def codes(self) -> Tensor:
        """The uint8 ``[N, K]`` codes (on CPU), whatever the current kernel layout."""
        n, k = self.out_features, self.in_features
        if self.layout == "canonical":
            return P.unpack_int4(self.packed.cpu())
        if self.layout == "cpu":
            return P.int4_cpu_layout_to_codes(self.packed, P.int4_kernel_rows(n, "cpu"), k)[:n]
        return self._codes_cuda()

    def _apply(self, fn, recurse=True):
        target = fn(torch.zeros(1, device=self.packed.device)).device
        if target.type != self.packed.device.type:
            codes = self.codes()
            super()._apply(fn, recurse)
            self._pack(codes, target)
            return self
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def _codes_cuda(self, block: int = 1024) -> Tensor:
        # Dequantize through the kernel itself with scale 1 and zero 8: rows of the identity pick
        # out the codes exactly ((q - 8) * 1 + 8 = q, one nonzero term per sum, all exact in
        # bf16), a block of input channels at a time; the padded rows are cropped.
        k, n = self.in_features, self.out_features
        dev = self.packed.device
        n_pad = P.int4_kernel_rows(n, "cuda")
        sz = torch.ones(k // self.group_size, n_pad, 2, dtype=torch.bfloat16, device=dev)
        sz[..., 1] = 8.0
        out = torch.empty(n, k, dtype=torch.uint8)
        for i in range(0, k, block):
            j = min(i + block, k)
            eye = torch.zeros(j - i, k, dtype=torch.bfloat16, device=dev)
            eye[:, i:j] = torch.eye(j - i, dtype=torch.bfloat16, device=dev)
            cols = torch.ops.aten._weight_int4pack_mm(eye, self.packed, self.group_size, sz)  # [j-i, n_pad]
            out[:, i:j] = cols[:, :n].t().round().clamp(0, 15).to(torch.uint8).cpu()
        return out

    def qstate(self) -> dict[str, Tensor]:
        return {"qweight": P.pack_int4(self.codes()), "scale": self.scale, "zero": self.zero}

    def dequantize(self) -> Tensor:
        return P.dequantize_int4(self.codes(), self.scale, self.zero, self.group_size)

    def _scale_and_zeros(self, dtype: torch.dtype, n_rows: int) -> Tensor:
        key = (dtype, self.packed.device)
        if key not in self._sz_cache:
            s, z = self.scale, self.zero
            if n_rows != self.out_features:
                pad = n_rows - self.out_features
                s = torch.cat([s, torch.ones(pad, s.shape[1], dtype=s.dtype, device=s.device)])
                z = torch.cat([z, torch.zeros(pad, z.shape[1], dtype=z.dtype, device=z.device)])
            self._sz_cache = {key: P.scale_and_zeros(s, z, dtype)}
        return self._sz_cache[key]

    # When the caller allows compiling (a decode with ``compile`` set, see
    # :func:`cbx.engine.t3_decode.compile_many_rows`), inputs of at least this many rows (a T3
    # prefill: ~260) multiply an unpacked bf16 copy of the weight, made for the call and dropped
    # (:func:`_dense_weight_t`); otherwise, and for fewer rows (decode steps), the int4 kernel.
    # Measured on the 2-core CPU, full T3 (bf16 + int4 RTN g128), 262-row prefill: 1.27 s with
    # the kernel, 0.84 s unpacked; the unpacking compiles once per weight shape (~7 s for T3's
    # four shapes). None: always the kernel. Only on a CPU with native bf16 (:func:`_native_bf16_cpu`);
    # elsewhere the synthesizer's prefill runs in float32 (``int4-dense-fp32``) and a bf16 prefill
    # keeps the kernel.
    dense_min_rows: int | None = 128

    def _dense_ok(self, x2: Tensor) -> bool:
        return (self.layout == "cpu" and self.dense_min_rows is not None and x2.shape[0] >= self.dense_min_rows
                and self.packed.shape[0] == self.out_features and self.out_features % P.int4_cpu_block_n() == 0
                and not torch.is_grad_enabled() and _DENSE["fn"] is not False and compile_many_rows()
                and _native_bf16_cpu())

    def dense_weight_t(self) -> Tensor | None:
        """The weight as the CPU kernel dequantizes it, rounded to bf16, transposed: ``[K, N]``
        (None when the unpacking cannot be compiled here)."""
        return _dense_weight_t(self.packed, self.scale, self.zero)

    def _dense_fp32(self, x2: Tensor) -> Tensor:
        """``x2 @ W.T`` in float32 with ``W`` unpacked from the CPU kernel layout in float32 a few
        output columns at a time (the fp32 prefill, :func:`cbx.engine.t3_prefill.prefill_fp32`);
        the weights are exactly the kernel's ``(q - 8) * scale + zero``, unrounded."""
        cols = _fp32_chunk(self.in_features)
        return torch.cat([x2 @ w_t for _, w_t in P.int4_cpu_layout_dense_t_chunks(self.packed, self.scale, self.zero,
                                                                                    cols)], dim=-1)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if (_fp32_rows(self, x) and self.layout == "cpu" and self.packed.shape[0] == self.out_features
                and self.out_features % P.int4_cpu_block_n() == 0):
            K.used(self, "int4-dense-fp32")
            return self._finish(self._dense_fp32(x.reshape(-1, self.in_features)), x)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        w_t = self.dense_weight_t() if self._dense_ok(x2) else None
        if w_t is not None:
            y = x2 @ w_t
            K.used(self, "int4-dense-bf16")
        elif self.layout == "cpu":
            n_pad = P.int4_kernel_rows(self.out_features, "cpu")
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, self.group_size, self._scale_and_zeros(torch.bfloat16, n_pad))
            y = y[:, : self.out_features]
            K.used(self, "int4pack-cpu")
        elif self.layout == "cuda":
            n_pad = P.int4_kernel_rows(self.out_features, "cuda")
            y = torch.ops.aten._weight_int4pack_mm(
                x2, self.packed, self.group_size, self._scale_and_zeros(torch.bfloat16, n_pad))
            y = y[:, : self.out_features]
            K.used(self, "tinygemm")
        else:
            K.fell_back(self, "tinygemm" if x.device.type == "cuda" else "int4pack-cpu", "dequant-fallback",
                        self._layout_reason or "no int4 kernel layout")
            y = self._reference(x2)
        return self._finish(y, x)

    def _reference(self, x2: Tensor) -> Tensor:
        w = P.dequantize_int4(self.codes().to(x2.device), self.scale, self.zero, self.group_size)
        return (x2.float() @ w.t()).to(x2.dtype)

    def forward_reference(self, x: Tensor) -> Tensor:
        return self._finish(self._reference(x.reshape(-1, self.in_features).to(torch.bfloat16)), x)


def _has_fp8_gemm(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(_RowScaled, _Quantized):
    kind = "fp8"

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
                 matmul_dtype: str = "bfloat16", orig_class: str = "Linear"):
        super().__init__(qweight.shape[1], qweight.shape[0], bias, orig_class)
        self.matmul_dtype = matmul_dtype
        self._gemm_ok = True
        self.register_buffer("_w_bits", _own(qweight.to(torch.float8_e4m3fn)).view(torch.uint8))
        self.register_buffer("_scale_bits", _own(scale.float()).view(torch.int32))

    @classmethod
    def from_float(cls, module: nn.Module, matmul_dtype: str = "bfloat16") -> "FP8Linear":
        q, s = P.quantize_fp8_per_channel(linear_weight(module))
        return cls(q, s, module.bias, matmul_dtype, type(module).__name__)

    @property
    def qweight(self) -> Tensor:
        return self._w_bits.view(torch.float8_e4m3fn)

    @property
    def weight(self) -> Tensor:
        return self.qweight

    def dequantize(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if x.device.type != "cuda":
            K.used(self, "fp8-emulated")  # the designed CPU path (no FP8 GEMM on CPUs), not a fallback
            return self.forward_reference(x)
        why = self._no_gemm_reason(x.device)
        if why is None:
            x2 = x.reshape(-1, self.in_features)
            xq, xs = P.quantize_fp8_per_token(x2)
            try:
                y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.scale[None, :].contiguous(),
                                     out_dtype=torch.bfloat16)
                K.used(self, "fp8-scaled-mm")
                return self._finish(y, x)
            except (RuntimeError, NotImplementedError) as exc:
                # Row-wise scaling needs sm90+ in some builds: fall back to the emulation for good.
                self._gemm_ok = False
                self._gemm_error = f"torch._scaled_mm failed: {_reason(exc)}"
                why = self._gemm_error
        K.fell_back(self, "fp8-scaled-mm", "fp8-emulated", why)
        return self.forward_reference(x)

    def _no_gemm_reason(self, device: torch.device) -> str | None:
        if not self._gemm_ok:
            return getattr(self, "_gemm_error", "torch._scaled_mm failed")
        if not _has_fp8_gemm(device):
            major, minor = torch.cuda.get_device_capability(device)
            return f"no FP8 GEMM on sm_{major}{minor} (needs sm_89+)"
        if self.in_features % 16 or self.out_features % 16:
            return f"shape {self.out_features}x{self.in_features} is not a multiple of 16"
        return None

    def forward_reference(self, x: Tensor) -> Tensor:
        return P.fp8_linear_emulated(x, self.qweight, self.scale, self.bias, _DTYPES[self.matmul_dtype])


class LibraryLinear(_Quantized):
    """A field library's quantized linear layer (torchao, bitsandbytes, optimum-quanto) behind
    the workbench's module interface, so the checkpoint, exports and the engine treat it like
    the classes above. The library module is ``inner`` (an ``nn.Linear``-shaped layer without
    bias, computing in ``compute_dtype``); the bias stays here in floating point. The
    library-specific subclasses live in :mod:`cbx.compress.libraries`.

    Casts of the model (``model.to(torch.bfloat16)``, ``.half()``) reach only the bias: the
    library's tensors keep the layout and compute dtype their config chose (a cast would
    re-quantize or break them); inputs are cast to ``compute_dtype`` and outputs back. Device
    moves go through the library's own ``.to(device)``. Autocast is switched off around the
    library call so its kernel sees the dtype it was built for.
    """

    kind = "library"
    library = ""

    def __init__(self, inner: nn.Module, in_features: int, out_features: int, bias: Tensor | None,
                 orig_class: str, compute_dtype: str):
        super().__init__(in_features, out_features, bias, orig_class)
        self.inner = inner.eval()
        self.compute_dtype = compute_dtype

    def train(self, mode: bool = True):
        # Inference-only: bitsandbytes picks other kernels in training mode, so the library
        # layer stays in eval mode whatever the model is set to.
        super().train(mode)
        self.inner.train(False)
        return self

    @property
    def weight(self) -> Tensor:
        return self.inner.weight

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        x2 = _own(x.reshape(-1, self.in_features).to(_DTYPES[self.compute_dtype]))
        K.used(self, self.kernel_path(x2))
        with torch.autocast(x.device.type, enabled=False):
            y = self.inner(x2)
        return self._finish(y, x)

    def kernel_path(self, x2: Tensor) -> str:
        """``<library>:<kernel>``: the path the library takes for this input (kernel recording)."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        here = self.weight.device
        target = fn(torch.zeros(1, device=here)).device
        super()._apply(fn, recurse=False)
        if target != here:
            self.inner = self.inner.to(target)
        return self

    def meta(self) -> dict:
        return {**super().meta(), "library": self.library, "compute_dtype": self.compute_dtype,
                **self.library_meta()}

    def library_meta(self) -> dict:
        """JSON-plain description the library needs to rebuild its tensors (manifest entry)."""
        raise NotImplementedError

    def library_state(self) -> dict[str, Tensor]:
        """The library's own serialized tensors for this layer (no bias)."""
        raise NotImplementedError

    def qstate(self) -> dict[str, Tensor]:
        # Checkpoint keys are one level below the module name: escape the library's dotted keys.
        return {k.replace(".", ":"): v for k, v in self.library_state().items()}

    def __deepcopy__(self, memo):
        # Not every library tensor deep-copies (quanto's float8 weights do not): copy through
        # the library's own serialization, the one the checkpoint relies on.
        import copy

        state = {k: v.clone() for k, v in self.qstate().items()}
        bias = self.bias.detach().clone() if self.bias is not None else None
        new = from_qstate(self.meta(), state, bias, torch.float32, {})
        new.cbx_method, new.cbx_config = self.cbx_method, copy.deepcopy(self.cbx_config, memo)
        new.train(self.training)
        for attr in ("cbx_name", "cbx_kernel", "cbx_kernel_fallback"):
            if attr in self.__dict__:
                setattr(new, attr, copy.deepcopy(self.__dict__[attr], memo))
        if self.weight.device.type != "cpu":
            new = new.to(self.weight.device)
        memo[id(self)] = new
        return new


class _QuantEmbedding(nn.Module):
    """Row gather of low-bit codes, dequantized to the dtype the model was last cast to."""

    kind = ""
    cbx_kernel: str | None = None
    cbx_kernel_fallback: dict | None = None

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.orig_class = "Embedding"
        self.register_buffer("_dtype_anchor", torch.zeros(0, dtype=dtype))
        self.cbx_method: str = ""
        self.cbx_config: dict = {}

    @property
    def weight(self) -> Tensor:
        # Callers read ``emb.weight.device``/``.dtype`` (upstream's position embeddings, the
        # engine's decoder) to place and type their inputs: answer with the output dtype.
        return self._dtype_anchor

    def meta(self) -> dict:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "orig_class": self.orig_class,
                "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int8Embedding(_RowScaled, _QuantEmbedding):
    kind = "int8"

    def __init__(self, qweight: Tensor, scale: Tensor, padding_idx=None, dtype=torch.float32):
        super().__init__(qweight.shape[0], qweight.shape[1], padding_idx, dtype)
        self.register_buffer("qweight", _own(qweight.to(torch.int8)))
        self.register_buffer("_scale_bits", _own(scale.float()).view(torch.int32))

    @classmethod
    def from_float(cls, module: nn.Embedding) -> "Int8Embedding":
        q, s = P.quantize_int8_per_channel(module.weight.detach())
        return cls(q, s, module.padding_idx, module.weight.dtype)

    def dequantize(self) -> Tensor:
        return P.dequantize_int8(self.qweight, self.scale)

    def forward(self, idx: Tensor) -> Tensor:
        K.used(self, "gather-int8")
        rows = self.qweight[idx].float() * self.scale[idx][..., None]
        return rows.to(self._dtype_anchor.dtype)


class Int4Embedding(_GroupScaled, _QuantEmbedding):
    kind = "int4"

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                 padding_idx=None, dtype=torch.float32):
        super().__init__(codes.shape[0], codes.shape[1], padding_idx, dtype)
        self.group_size = int(group_size)
        self.register_buffer("packed", _own(P.pack_int4(codes)))
        self.register_buffer("_scale_bits", _own(scale.to(torch.bfloat16)).view(torch.int16))
        self.register_buffer("_zero_bits", _own(zero.to(torch.bfloat16)).view(torch.int16))

    @classmethod
    def from_float(cls, module: nn.Embedding, group_size: int = 128) -> "Int4Embedding":
        codes, s, z = P.quantize_int4_groupwise(module.weight.detach(), group_size)
        return cls(codes, s, z, group_size, module.padding_idx, module.weight.dtype)

    def qstate(self) -> dict[str, Tensor]:
        return {"qweight": self.packed, "scale": self.scale, "zero": self.zero}

    def dequantize(self) -> Tensor:
        return P.dequantize_int4(P.unpack_int4(self.packed), self.scale, self.zero, self.group_size)

    def forward(self, idx: Tensor) -> Tensor:
        K.used(self, "gather-int4")
        codes = P.unpack_int4(self.packed[idx]).float()
        g = self.group_size
        codes = codes.reshape(*idx.shape, self.embedding_dim // g, g)
        rows = (codes - 8.0) * self.scale[idx].float()[..., None] + self.zero[idx].float()[..., None]
        return rows.reshape(*idx.shape, self.embedding_dim).to(self._dtype_anchor.dtype)


def _reason(exc: BaseException) -> str:
    """One line saying why a kernel call failed."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


QUANT_CLASSES = (Int8Linear, Int4Linear, FP8Linear, Int8Embedding, Int4Embedding, LibraryLinear)


def from_qstate(meta: dict, tensors: dict[str, Tensor], bias: Tensor | None, dtype: torch.dtype,
                params: dict) -> nn.Module:
    """Rebuild a quantized module from its checkpoint tensors and manifest entry."""
    kind, orig = meta["kind"], meta["orig_class"]
    if kind == LibraryLinear.kind:
        from cbx.compress.libraries import library_from_qstate

        return library_from_qstate(meta, {k.replace(":", "."): _own(v) for k, v in tensors.items()}, bias)
    if orig == "Embedding":
        if kind == "int8":
            return Int8Embedding(tensors["qweight"], tensors["scale"], meta.get("padding_idx"), dtype)
        if kind == "int4":
            return Int4Embedding(P.unpack_int4(tensors["qweight"]), tensors["scale"], tensors["zero"],
                                 params["group_size"], meta.get("padding_idx"), dtype)
    elif kind == "int8":
        return Int8Linear(tensors["qweight"], tensors["scale"], bias, params.get("compute_dtype", "bfloat16"), orig,
                          params.get("cuda_kernel", "int-mm"))
    elif kind == "int4":
        return Int4Linear(P.unpack_int4(tensors["qweight"]), tensors["scale"], tensors["zero"],
                          params["group_size"], bias, orig)
    elif kind == "fp8":
        return FP8Linear(tensors["qweight"], tensors["scale"], bias, params.get("matmul_dtype", "bfloat16"), orig)
    raise ValueError(f"unknown quantized module kind {kind!r} for class {orig!r}")


def dequantized_module(mod: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A floating-point module of the original class holding the dequantized weights
    (for exports that upstream code must load)."""
    if isinstance(mod, _QuantEmbedding):
        emb = nn.Embedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx, dtype=dtype)
        emb.weight.data.copy_(mod.dequantize())
        return emb
    w = mod.dequantize().to(dtype)
    bias = mod.bias is not None
    if mod.orig_class == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        new = Conv1D(mod.out_features, mod.in_features)
        new.weight.data = w.t().contiguous()
    else:
        if mod.orig_class == "LoRACompatibleLinear":
            from diffusers.models.lora import LoRACompatibleLinear as cls
        else:
            cls = nn.Linear
        new = cls(mod.in_features, mod.out_features, bias=bias)
        new.weight.data = w
    if bias:
        new.bias.data = mod.bias.detach().to(dtype).clone()
    return new.to(dtype)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized module of ``model`` by its floating-point original (in place).

    ``dtype`` None: the dtype of the floating parameters of the same top-level part (``t3``,
    ``s3gen``), so a bf16 T3 exports bf16 weights.
    """
    def part_dtype(name: str) -> torch.dtype:
        part = model.get_submodule(name.split(".")[0])
        for p in part.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_CLASSES)]:
        model.set_submodule(name, dequantized_module(mod, dtype or part_dtype(name)))
    return model
