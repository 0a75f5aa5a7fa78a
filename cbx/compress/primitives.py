"""Pure tensor math of quantization: quantize, dequantize, pack, error measure.

Everything here is a small function of tensors with no module state, following gpt-fast's
``quantize.py`` (``group_quantize_tensor`` below small module swaps): the module swaps in
:mod:`cbx.compress.modules` and the checkpoint format call these, and the tests check them
directly. Conventions, chosen to match the kernels that consume the results:

* INT8 weight-only: symmetric, one scale per output channel, ``w ~= q * scale`` with
  ``q`` in [-127, 127] (the -128 code is left unused so that the grid is symmetric).
  ``torch.ops.aten._weight_int8pack_mm(x, q[N, K], scale[N])`` computes ``x @ (q * scale).T``.
* INT4 weight-only: asymmetric, one (scale, zero) pair per group of ``group_size`` input
  channels, in tinygemm's "float zero point" convention ``w ~= (q - 8) * scale + zero`` with
  ``q`` in [0, 15]. This is what ``_weight_int4pack_mm_for_cpu`` (and the CUDA tinygemm
  kernel that torchao's int4 layout uses) read from ``scale_and_zeros[K/G, N, 2]``.
  Scales and zeros are rounded to bfloat16 *before* ``q`` is chosen, so ``q`` is the nearest
  code for the parameters that are really stored and the kernel, the fallback and the
  checkpoint agree exactly.
* Canonical INT4 storage is two codes per byte, low nibble = even input channel. The CPU
  kernel's packed layout depends on the CPU's vector width (AVX512 vs AVX2 blocking), so it is
  never written to disk; :func:`int4_cpu_layout_to_codes` recovers codes from it by probing
  the packing function with index patterns instead of hard-coding one torch version's layout.
* FP8 e4m3: per-output-channel weight scales ``amax / 448`` and dynamic per-token activation
  scales, the recipe of ``torch._scaled_mm`` with row-wise scaling. Every e4m3 value is
  exactly representable in bfloat16, so the CPU emulation (cast to ``float8_e4m3fn`` and back,
  then a bf16/fp32 matmul with fp32 accumulation) rounds the operands exactly as the GPU does.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

INT4_GROUP_SIZES = (32, 64, 128)
FP8_E4M3_MAX = 448.0
# The CPU int4 kernel needs the output dimension to be a multiple of this; tinygemm (CUDA) of 8.
INT4_CPU_N_MULTIPLE = 16
INT4_CUDA_N_MULTIPLE = 8
# torch._int_mm (cuBLASLt) wants both matrix dimensions it contracts/returns in multiples of 8.
INT_MM_MULTIPLE = 8
_EPS = 1e-8


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, as torchao's ``compute_error``."""
    ref = reference.detach().double()
    err = ref - approx.detach().double()
    num, den = torch.linalg.vector_norm(ref), torch.linalg.vector_norm(err)
    if den == 0:
        return math.inf
    return float(20 * torch.log10(num / den))


# --------------------------------------------------------------------------- INT8


def quantize_int8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric activation quantization: ``x[M, K]`` -> ``(q int8[M, K], scale
    float32[M, 1])``, ``x ~= q * scale`` (the activation side of ``torch._int_mm``)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / 127.0
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


def int8_int_mm_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """``x[M, K] @ (q * scale)[N, K].T`` through ``torch._int_mm`` with per-token int8 activations;
    float32 ``[M, N]``. Any device (CPU has ``_int_mm`` too, so this exact code is tested there).

    The weight is the kernel's *first* operand (``q @ xq.T``, then transposed): ``q`` stays as
    stored (``[N, K]`` contiguous, no per-call transpose copy, which cuBLAS would need for a
    transposed second operand), and the short activation side is padded to a multiple of 8 rows.
    Needs ``K % 8 == 0`` and ``N > 16`` on CUDA (see :func:`int_mm_ok`).
    """
    m = x.shape[0]
    xq, xs = quantize_int8_per_token(x)
    m_pad = max(INT_MM_MULTIPLE, -(-m // INT_MM_MULTIPLE) * INT_MM_MULTIPLE)
    xt = pad_rows(xq, m_pad, 0).t().contiguous()
    acc = torch._int_mm(q, xt)  # int32 [N, m_pad]; exact integer accumulation
    return acc[:, :m].t().float() * xs * scale.float()[None, :]


def int_mm_ok(n: int, k: int) -> bool:
    """Shapes ``torch._int_mm`` takes as :func:`int8_int_mm_linear` calls it on CUDA."""
    return k % INT_MM_MULTIPLE == 0 and n % INT_MM_MULTIPLE == 0 and n > 16 and k > 16


def int8_int_mm_reference(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """What :func:`int8_int_mm_linear` computes, in float64 (exact for the integer part)."""
    xq, xs = quantize_int8_per_token(x)
    acc = xq.double() @ q.double().t()
    return (acc * xs.double() * scale.double()[None, :]).float()


def pad_rows(t: Tensor, n_rows: int, fill: int | float) -> Tensor:
    """``t[N, ...]`` with rows of ``fill`` appended up to ``n_rows`` (kernels that need a multiple
    of 8/16 rows); the padded rows' outputs are cropped by the caller. Same device and dtype."""
    n = t.shape[0]
    if n_rows < n:
        raise ValueError(f"cannot pad {n} rows down to {n_rows}")
    if n_rows == n:
        return t
    return torch.cat([t, torch.full((n_rows - n, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])


def quantize_int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w[N, K]`` -> ``(q int8[N, K], scale float32[N])`` with ``w ~= q * scale[:, None]``."""
    _check_2d(w)
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=_EPS) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


# --------------------------------------------------------------------------- INT4


def quantize_int4_groupwise(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``w[N, K]`` -> ``(codes uint8[N, K] in 0..15, scale bf16[N, K/G], zero bf16[N, K/G])``.

    ``w ~= (codes - 8) * scale + zero`` per group; min/max of each group map to codes 0/15.
    """
    _check_2d(w)
    n, k = w.shape
    _check_group(k, group_size)
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo).clamp(min=_EPS) / 15.0).to(torch.bfloat16)
    zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)
    codes = int4_codes_for(w, scale, zero, group_size)
    return codes, scale, zero


def int4_codes_for(w: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """Nearest int4 codes of ``w[N, K]`` (or of one group's columns) for given scale/zero."""
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    s, z = scale.float()[..., None], zero.float()[..., None]
    codes = torch.round((wg - z) / s + 8.0).clamp_(0, 15)
    return codes.reshape(n, k).to(torch.uint8)


def dequantize_int4(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    n, k = codes.shape
    cg = codes.float().reshape(n, k // group_size, group_size)
    return ((cg - 8.0) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def pack_int4(codes: Tensor) -> Tensor:
    """Canonical storage: ``uint8[N, K] (0..15)`` -> ``uint8[N, K/2]``, low nibble = even column."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def scale_and_zeros(scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``scale/zero[N, K/G]`` -> the kernels' ``[K/G, N, 2]`` tensor."""
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


def padded_rows(n: int, multiple: int = INT4_CPU_N_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def int4_kernel_rows(n: int, device_type: str) -> int:
    """Rows the int4 kernel of ``device_type`` is given for an ``n``-row weight: padded to its
    multiple (CPU 16, CUDA tinygemm 8) so heads of any size (8194, 6563, 50276, 2454 rows) run."""
    return padded_rows(n, INT4_CUDA_N_MULTIPLE if device_type == "cuda" else INT4_CPU_N_MULTIPLE)


def codes_to_tinygemm_input(codes: Tensor) -> Tensor:
    """Codes ``uint8[N, K]`` -> what ``aten._convert_weight_to_int4pack`` (CUDA) takes: ``uint8[N,
    K/2]`` with the *high* nibble holding the even column (the reverse of :func:`pack_int4`)."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] << 4 | c[:, 1::2]).contiguous()


def tinygemm_inner_k_tiles(k: int) -> int:
    """The largest inner-K tiling (8, 4, 2) tinygemm accepts for input size ``k``."""
    for t in (8, 4, 2):
        if k % (16 * t) == 0:
            return t
    raise ValueError(f"tinygemm needs the input size to be a multiple of 32, got {k}")


def codes_to_int4_cpu_layout(codes: Tensor) -> Tensor:
    """Codes ``uint8[N, K]`` (N a multiple of 16) -> ``_weight_int4pack_mm_for_cpu`` layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


@functools.lru_cache(maxsize=8)
def _int4_cpu_layout_sources(n: int, k: int) -> tuple[Tensor, Tensor]:
    # The packing is a permutation of nibbles. Pack patterns whose codes spell out each
    # element's flat index four bits at a time; reading the packed nibbles back gives, for every
    # packed nibble, the index of the element it came from.
    total = n * k
    idx = torch.arange(total, dtype=torch.int64).reshape(n, k)
    lo_src = torch.zeros(n * k // 2, dtype=torch.int64)
    hi_src = torch.zeros(n * k // 2, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log2(max(total, 2)) / 4))):
        pattern = ((idx >> (4 * digit)) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(pattern, 1).reshape(-1)
        lo_src |= (packed & 0xF).to(torch.int64) << (4 * digit)
        hi_src |= (packed >> 4).to(torch.int64) << (4 * digit)
    if not torch.equal(torch.sort(torch.cat([lo_src, hi_src])).values, torch.arange(total)):
        raise RuntimeError("int4 CPU packing is not a nibble permutation; cannot unpack it")
    return lo_src, hi_src


def int4_cpu_layout_to_codes(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`codes_to_int4_cpu_layout` (used when saving, never in forward)."""
    lo_src, hi_src = _int4_cpu_layout_sources(n, k)
    flat = packed.reshape(-1).cpu()
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[lo_src] = flat & 0xF
    codes[hi_src] = flat >> 4
    return codes.reshape(n, k)


@functools.lru_cache(maxsize=1)
def int4_cpu_block_n() -> int:
    """Output rows per block of the CPU kernel's packing on this machine: each block of ``B`` rows
    is stored as ``[K, B/2]`` bytes, the low nibble of byte ``d`` holding row ``d`` and the high
    nibble row ``d + B/2``. ``B`` follows the CPU's vector width (64 with AVX512, 32 with AVX2,
    seen on torch 2.13), so it is found by packing a probe and reading it back, not assumed."""
    probe = (torch.arange(128 * 64, dtype=torch.int64).reshape(128, 64) * 7 % 16).to(torch.uint8)
    packed = codes_to_int4_cpu_layout(probe)
    for b in (64, 32, 16):
        view = packed.view(128 // b, 64, b // 2)
        got = torch.cat([view & 0xF, view >> 4], dim=-1).permute(0, 2, 1).reshape(128, 64)
        if torch.equal(got, probe):
            return b
    raise RuntimeError("int4 CPU packing has no row-block layout this code knows; cannot unpack it densely")


def int4_cpu_layout_dense_t(packed: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.bfloat16,
                            block: int | None = None) -> Tensor:
    """The dequantized weight, transposed (``[K, N]`` bf16), straight from the CPU kernel's
    packing, for a weight whose ``N`` is a whole number of row blocks.

    That packing stores each block of ``B`` output rows (:func:`int4_cpu_block_n`: 64 with
    AVX512, 32 with AVX2) as ``[K, B/2]`` bytes, the low nibble of byte ``d`` holding row ``d``
    and the high nibble row ``d + B/2`` (checked against the generic permutation
    :func:`int4_cpu_layout_to_codes` in the tests). Each weight is computed as the
    kernel does, ``(q - 8) * scale + zero`` in float32, and rounded once to bf16. The group size
    is ``K / scale.shape[1]``. Written as whole-tensor ops so that ``torch.compile`` fuses them
    into one pass (:class:`cbx.compress.modules.Int4Linear` compiles it): eagerly the float32
    temporaries make it memory-bound, ~24 ms for a full T3 layer against ~4.5 ms compiled.
    ``dtype`` float32 keeps the float32 values (no rounding): the fp32 prefill's weights, which
    :func:`int4_cpu_layout_dense_t_chunks` makes a few output columns at a time.
    """
    n, kg = scale.shape
    k = packed.shape[1] * 2
    block = block or int4_cpu_block_n()  # given by compiled callers: the probe does not trace
    if n % block or packed.shape[0] != n or k % kg:
        raise ValueError(f"dense unpacking needs whole {block}-row blocks, got packed "
                         f"{tuple(packed.shape)} for {n} rows")
    b = packed.view(n // block, k, block // 2).transpose(0, 1)  # [K, blocks, B/2]
    codes = torch.cat([b & 0xF, b >> 4], dim=-1).reshape(kg, k // kg, n)
    s = scale.float().t()[:, None, :]
    z = zero.float().t()[:, None, :]
    return ((codes.float() - 8.0) * s + z).to(dtype).reshape(k, n)


def int4_cpu_layout_dense_t_chunks(packed: Tensor, scale: Tensor, zero: Tensor, cols: int):
    """Yield ``(start, w_t)``: :func:`int4_cpu_layout_dense_t` in float32 for output columns
    ``start .. start + w_t.shape[1]``, ``cols`` (a multiple of 64) at a time.

    Why chunks: the whole float32 weight of a T3 gate/up projection is 32 MiB; made at once, each
    temporary is a fresh allocation the C heap maps and the kernel zero-fills (100 ms for that
    layer on the 2-core CPU, more than the matrix product); a chunk of a few MiB stays in cache
    and is multiplied while there.
    """
    n = scale.shape[0]
    block = int4_cpu_block_n()
    if cols % block or cols <= 0:
        raise ValueError(f"cols must be a positive multiple of {block}, got {cols}")
    if n % block or packed.shape[0] != n:
        raise ValueError(f"dense unpacking needs whole {block}-row blocks, got packed {tuple(packed.shape)} for {n} rows")
    for start in range(0, n, cols):
        stop = min(n, start + cols)
        yield start, _int4_cpu_layout_dense_t_fp32(packed[start:stop], scale[start:stop], zero[start:stop], block)


def _int4_cpu_layout_dense_t_fp32(packed: Tensor, scale: Tensor, zero: Tensor, block: int) -> Tensor:
    """:func:`int4_cpu_layout_dense_t` in float32 in three passes instead of seven: the nibbles
    are converted straight into their places of the output, then one ``addcmul`` computes
    ``q * scale + (zero - 8 * scale)`` in place (the kernel's ``(q - 8) * scale + zero`` up to
    float32 rounding). Eagerly 25 -> 16 ms for a 1024x8192 weight in 1M-element chunks here."""
    n, kg = scale.shape
    k = packed.shape[1] * 2
    b = packed.view(n // block, k, block // 2).transpose(0, 1)  # [K, blocks, B/2]
    out = torch.empty(k, n // block, block, dtype=torch.float32, device=packed.device)
    out[..., : block // 2].copy_(b & 0xF)
    out[..., block // 2:].copy_(b >> 4)
    w = out.view(kg, k // kg, n)
    s = scale.float().t()[:, None, :]
    torch.addcmul(zero.float().t()[:, None, :] - 8.0 * s, w, s, out=w)
    return out.view(k, n)


# --------------------------------------------------------------------------- FP8


def quantize_fp8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w[N, K]`` -> ``(float8_e4m3fn[N, K], scale float32[N])``, ``w ~= q * scale[:, None]``."""
    _check_2d(w)
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=_EPS) / FP8_E4M3_MAX
    q = (w / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic activation scaling: ``x[..., K]`` -> ``(float8 x, float32 scale[..., 1])``."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / FP8_E4M3_MAX
    q = (xf / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_linear_emulated(
    x: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    matmul_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """What ``torch._scaled_mm`` with row-wise scales computes, on any device.

    Both fp8 operands are exact in bf16, and CPU bf16 GEMMs accumulate in fp32, so with
    ``matmul_dtype=bfloat16`` only the rounding of the unscaled product to bf16 differs from the
    GPU kernel (which scales in fp32 first); ``float32`` removes even that.
    """
    shape = x.shape
    xq, xs = quantize_fp8_per_token(x.reshape(-1, shape[-1]))
    acc = torch.matmul(xq.to(matmul_dtype), w_fp8.to(matmul_dtype).t()).float()
    y = acc * xs * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], w_fp8.shape[0])


# --------------------------------------------------------------------------- checks


def _check_2d(w: Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")


def _check_group(k: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"input size {k} is not a multiple of group_size {group_size}")
