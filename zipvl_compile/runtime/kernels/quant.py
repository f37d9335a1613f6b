"""Triton twins of :mod:`zipvl_compile.runtime.kernels.quant_reference` (same signatures, ``_triton`` suffix).

The layout is :mod:`zipvl_compile.runtime.layout`, the parameter arithmetic
:mod:`zipvl_compile.runtime.kernels.quant_reference`; the kernels reproduce the references' codes and params bit
for bit (same fp32 operations: multiplication by the fp32 reciprocal of 2^b - 1, ``div_rn`` for the code division,
``floor(y + 0.5)``). Dequantisation may differ from the reference by one fp32 rounding (the GPU may fuse
``code * scale + zero`` into an FMA).

Every kernel works on tiles of ``ROWS = GROUP = 64`` slots x ``BD = next_pow2(d)`` channels (padded channels
masked; packing needs ``d * bits % 8 == 0``), one program per (batch row x head, tile):

- ``_quantize_keys_kernel``: one key group per program; min/max per channel over the valid slots.
- ``_quantize_values_kernel`` / ``_dequantize_*_kernel``: 64 tokens per program.
- ``_write_segment_kernel``: fused gather + quantise (keys and values) + pack + scatter of one 64-slot staging
  group of the taken tokens into the segment (grid ``(B * H, ceil(t / 64))``). The staging order (which
  token is the s-th taken one) comes from :func:`~zipvl_compile.runtime.layout.staging_index` on the
  device; programs whose group holds no taken token return at once; stores beyond the capacity are masked
  (dropped). The programs of head 0 also write ``pos``; torch advances ``fill`` afterwards.

Inputs may be strided (k / v as views of a ``[B, T, H, d]`` projection); outputs and segment buffers are
contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from zipvl_compile.runtime.kernels.quant_reference import KEY_SHRINK_STEPS, SCALE_FLOOR
from zipvl_compile.runtime.layout import GROUP, Segment, Staging, advance_fill_, max_code, staging_index

_ROWS = GROUP  # slots per program
_FLOOR = tl.constexpr(SCALE_FLOOR)  # globals read inside @triton.jit must be constexpr
_SHRINK_STEPS = tl.constexpr(KEY_SHRINK_STEPS)


# ----------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, rows, row_ok, stride_t, stride_d, d, BD: tl.constexpr):
    """fp32 [ROWS, BD] tile of rows ``rows`` of a strided [T, d] plane; masked rows / channels read 0."""
    chan = tl.arange(0, BD)
    ptrs = base + rows[:, None] * stride_t + chan[None, :] * stride_d
    return tl.load(ptrs, mask=row_ok[:, None] & (chan < d)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _params(x_min, x_max, LEVELS: tl.constexpr):
    """fp32 min/max (x_min > x_max marks an empty group) -> float16 (scale, zero)."""
    empty = x_min > x_max
    x_min = tl.where(empty, 0.0, x_min)
    x_max = tl.where(empty, 0.0, x_max)
    return ((x_max - x_min) * (1.0 / LEVELS)).to(tl.float16), x_min.to(tl.float16)


@triton.jit
def _codes(x, scale, zero, LEVELS: tl.constexpr):
    """int32 codes clamp(floor((x - zero) / max(scale, floor) + 0.5), 0, LEVELS) from fp16 params."""
    y = tl.math.div_rn(x - zero.to(tl.float32), tl.maximum(scale.to(tl.float32), _FLOOR))
    return tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), LEVELS).to(tl.int32)


@triton.jit
def _pack(codes, ROWS: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [ROWS, BD] -> uint8 [ROWS, BD*BITS//8]: chan c in byte c // PER, shift (c % PER)*BITS."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        packed = codes
    else:
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(tl.reshape(codes, [ROWS, BD // PER, PER]) << shifts[None, None, :], axis=2)
    return packed.to(tl.uint8)


@triton.jit
def _unpack(packed, ROWS: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
    """uint8 [ROWS, BD * BITS // 8] -> fp32 codes [ROWS, BD]: the inverse of :func:`_pack`."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        codes = packed.to(tl.int32)
    else:
        shifts = tl.arange(0, PER) * BITS
        codes = tl.reshape((packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), [ROWS, BD])
    return codes.to(tl.float32)


@triton.jit
def _store_packed(base, rows, row_ok, packed, d, BD: tl.constexpr, BITS: tl.constexpr):
    """Store uint8 [ROWS, BD * BITS // 8] into rows ``rows`` of a contiguous [*, d * BITS // 8] plane."""
    NB: tl.constexpr = BD * BITS // 8
    byte = tl.arange(0, NB)
    nb = d * BITS // 8
    tl.store(base + rows[:, None] * nb + byte[None, :], packed, mask=row_ok[:, None] & (byte < nb)[None, :])


@triton.jit
def _load_packed(base, rows, row_ok, d, BD: tl.constexpr, BITS: tl.constexpr):
    """Load uint8 [ROWS, BD * BITS // 8] from rows ``rows`` of a contiguous [*, d * BITS // 8] plane."""
    NB: tl.constexpr = BD * BITS // 8
    byte = tl.arange(0, NB)
    nb = d * BITS // 8
    return tl.load(base + rows[:, None] * nb + byte[None, :], mask=row_ok[:, None] & (byte < nb)[None, :], other=0)


@triton.jit
def _program_rows(H):
    """(bh int64, tile, b, h) of this program: grid axis 0 is batch row x head (bh = b * H + h), axis 1 the tile."""
    bh = tl.program_id(0).to(tl.int64)
    return bh, tl.program_id(1), bh // H, bh % H


@triton.jit
def _quantize_key_tile(x, row_ok, ROWS: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
    """Key group x fp32 [ROWS, BD] -> (packed uint8 [ROWS, BD*BITS//8], scale, zero fp16 [BD]).

    Per channel, over the rows with row_ok: min/max; at 2 bits the least-squared-error range among min/max
    shrunk by j/32 of it at each end (j < _SHRINK_STEPS, ties to the smaller j). Other rows get code 0.
    """
    LEVELS: tl.constexpr = (1 << BITS) - 1
    x_min = tl.min(tl.where(row_ok[:, None], x, float("inf")), axis=0)
    x_max = tl.max(tl.where(row_ok[:, None], x, float("-inf")), axis=0)
    scale, zero = _params(x_min, x_max, LEVELS)
    if BITS == 2:
        unit = tl.where(x_min <= x_max, (x_max - x_min) * (1.0 / 32.0), 0.0)
        delta = tl.zeros_like(x_min)
        best = tl.sum(_key_error(x, row_ok, scale, zero, LEVELS), axis=0)
        for _ in tl.static_range(1, _SHRINK_STEPS):
            delta = delta + unit
            s_j, z_j = _params(x_min + delta, x_max - delta, LEVELS)
            err = tl.sum(_key_error(x, row_ok, s_j, z_j, LEVELS), axis=0)
            better = err < best
            best = tl.where(better, err, best)
            scale = tl.where(better, s_j, scale)
            zero = tl.where(better, z_j, zero)
    codes = tl.where(row_ok[:, None], _codes(x, scale[None, :], zero[None, :], LEVELS), 0)
    return _pack(codes, ROWS, BD, BITS), scale, zero


@triton.jit
def _key_error(x, row_ok, scale, zero, LEVELS: tl.constexpr):
    """fp64 [ROWS, BD] squared error of x under the per-channel params (0 at rows without row_ok); codes by
    the reciprocal (see quant._best_key_params: no per-element division, no fusable multiply-add)."""
    s = scale.to(tl.float32)
    z = zero.to(tl.float32)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.maximum(s, _FLOOR))
    shifted = z - s * 0.5
    code = tl.minimum(tl.maximum(tl.floor((x - shifted[None, :]) * inv[None, :]), 0.0), LEVELS)
    e = tl.where(row_ok[:, None], code * s[None, :] + z[None, :] - x, 0.0).to(tl.float64)
    return e * e


@triton.jit
def _quantize_value_tile(x, d, ROWS: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
    """Value tokens x fp32 [ROWS, BD] -> (packed uint8 [ROWS, BD*BITS//8], scale, zero fp16 [ROWS])."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    chan_ok = (tl.arange(0, BD) < d)[None, :]
    x_min = tl.min(tl.where(chan_ok, x, float("inf")), axis=1)
    x_max = tl.max(tl.where(chan_ok, x, float("-inf")), axis=1)
    scale, zero = _params(x_min, x_max, LEVELS)
    return _pack(_codes(x, scale[:, None], zero[:, None], LEVELS), ROWS, BD, BITS), scale, zero


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _quantize_keys_kernel(
    k_ptr,
    valid_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    H,
    T,
    d,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vt,
    BD: tl.constexpr,
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
):
    bh, grp, b, h = _program_rows(H)
    rows = grp * ROWS + tl.arange(0, ROWS)
    row_ok = tl.load(valid_ptr + b * stride_vb + rows * stride_vt) != 0
    x = _load_rows(k_ptr + b * stride_kb + h * stride_kh, rows, rows < T, stride_kt, stride_kd, d, BD)
    packed, scale, zero = _quantize_key_tile(x, row_ok, ROWS, BD, BITS)
    _store_packed(codes_ptr + bh * T * (d * BITS // 8), rows, rows < T, packed, d, BD, BITS)
    chan = tl.arange(0, BD)
    param = (bh * (T // ROWS) + grp) * d + chan
    tl.store(scale_ptr + param, scale, mask=chan < d)
    tl.store(zero_ptr + param, zero, mask=chan < d)


@triton.jit
def _quantize_values_kernel(
    v_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    H,
    T,
    d,
    stride_b,
    stride_h,
    stride_t,
    stride_d,
    BD: tl.constexpr,
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    base = v_ptr + (bh // H) * stride_b + (bh % H) * stride_h
    x = _load_rows(base, rows, row_ok, stride_t, stride_d, d, BD)
    packed, scale, zero = _quantize_value_tile(x, d, ROWS, BD, BITS)
    _store_packed(codes_ptr + bh * T * (d * BITS // 8), rows, row_ok, packed, d, BD, BITS)
    tl.store(scale_ptr + bh * T + rows, scale, mask=row_ok)
    tl.store(zero_ptr + bh * T + rows, zero, mask=row_ok)


@triton.jit
def _dequantize_kernel(
    codes_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    T,
    d,
    KEYS: tl.constexpr,
    BD: tl.constexpr,
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
):
    """KEYS: params [B*H, T // ROWS, d] (one group per program); else params [B*H, T] (per token)."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    rows = blk * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    codes = _unpack(_load_packed(codes_ptr + bh * T * (d * BITS // 8), rows, row_ok, d, BD, BITS), ROWS, BD, BITS)
    chan = tl.arange(0, BD)
    chan_ok = chan < d
    if KEYS:
        param = (bh * (T // ROWS) + blk) * d + chan
        scale = tl.load(scale_ptr + param, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(zero_ptr + param, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    else:
        scale = tl.load(scale_ptr + bh * T + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(zero_ptr + bh * T + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    x = codes * scale + zero
    tl.store(
        out_ptr + (bh * T + rows[:, None]) * d + chan[None, :],
        x.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & chan_ok[None, :],
    )


@triton.jit
def _write_segment_kernel(
    k_ptr,
    v_ptr,
    src_ptr,
    count_ptr,
    src_pos_ptr,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    pos_ptr,
    fill_ptr,
    H,
    t,
    C,
    d,
    tp,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_pb,
    stride_pt,
    BD: tl.constexpr,
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
):
    bh, grp, b, h = _program_rows(H)
    count = tl.load(count_ptr + b)
    if grp * ROWS >= count:
        return  # no taken token in this group: nothing to store (a decode step's recompression, mostly)
    fill = tl.load(fill_ptr + b)
    s = grp * ROWS + tl.arange(0, ROWS)  # staging slots of this group
    row_ok = s < count
    dest = fill + s
    store_ok = dest < C
    src = tl.load(src_ptr + b * tp + s)
    k = _load_rows(k_ptr + b * stride_kb + h * stride_kh, src, row_ok, stride_kt, stride_kd, d, BD)
    v = _load_rows(v_ptr + b * stride_vb + h * stride_vh, src, row_ok, stride_vt, stride_vd, d, BD)
    k_packed, k_scale, k_zero = _quantize_key_tile(k, row_ok, ROWS, BD, BITS)
    v_packed, v_scale, v_zero = _quantize_value_tile(v, d, ROWS, BD, BITS)
    plane = bh * C
    _store_packed(kc_ptr + plane * (d * BITS // 8), dest, store_ok, k_packed, d, BD, BITS)
    _store_packed(vc_ptr + plane * (d * BITS // 8), dest, store_ok, v_packed, d, BD, BITS)
    tl.store(vs_ptr + plane + dest, v_scale, mask=store_ok)
    tl.store(vz_ptr + plane + dest, v_zero, mask=store_ok)
    chan = tl.arange(0, BD)
    dest_grp = fill // ROWS + grp
    param = (bh * (C // ROWS) + dest_grp) * d + chan
    param_ok = (dest_grp < C // ROWS) & (chan < d)
    tl.store(ks_ptr + param, k_scale, mask=param_ok)
    tl.store(kz_ptr + param, k_zero, mask=param_ok)
    pos = tl.load(src_pos_ptr + b * stride_pb + src * stride_pt, mask=row_ok, other=-1).to(tl.int32)
    tl.store(pos_ptr + b * C + dest, pos, mask=store_ok & (h == 0))


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _block_d(d: int, bits: int) -> int:
    max_code(bits)
    if d * bits % 8:
        raise ValueError(f"head dim {d} at {bits} bits does not fill whole bytes")
    return triton.next_power_of_2(d)


def quantize_keys_triton(
    k: torch.Tensor, valid: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`~zipvl_compile.runtime.kernels.quant_reference.quantize_keys_reference`."""
    batch, heads, t, d = k.shape
    if t % GROUP:
        raise ValueError(f"key length {t} is not a multiple of {GROUP}")
    codes = k.new_empty(batch, heads, t, d * bits // 8, dtype=torch.uint8)
    scale = k.new_empty(batch, heads, t // GROUP, d, dtype=torch.float16)
    zero = torch.empty_like(scale)
    wrap_triton(_quantize_keys_kernel)[(batch * heads, t // GROUP)](
        k,
        valid,
        codes,
        scale,
        zero,
        heads,
        t,
        d,
        *k.stride(),
        *valid.stride(),
        BD=_block_d(d, bits),
        BITS=bits,
        ROWS=_ROWS,
    )
    return codes, scale, zero


def quantize_values_triton(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`~zipvl_compile.runtime.kernels.quant_reference.quantize_values_reference`."""
    batch, heads, t, d = v.shape
    codes = v.new_empty(batch, heads, t, d * bits // 8, dtype=torch.uint8)
    scale = v.new_empty(batch, heads, t, dtype=torch.float16)
    zero = torch.empty_like(scale)
    wrap_triton(_quantize_values_kernel)[(batch * heads, triton.cdiv(t, _ROWS))](
        v, codes, scale, zero, heads, t, d, *v.stride(), BD=_block_d(d, bits), BITS=bits, ROWS=_ROWS
    )
    return codes, scale, zero


def _dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype, keys: bool
) -> torch.Tensor:
    batch, heads, t, nb = codes.shape
    d = nb * 8 // bits
    out = codes.new_empty(batch, heads, t, d, dtype=dtype)
    wrap_triton(_dequantize_kernel)[(batch * heads, triton.cdiv(t, _ROWS))](
        codes.contiguous(),
        scale.contiguous(),
        zero.contiguous(),
        out,
        t,
        d,
        KEYS=keys,
        BD=_block_d(d, bits),
        BITS=bits,
        ROWS=_ROWS,
    )
    return out


def dequantize_keys_triton(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Triton twin of :func:`~zipvl_compile.runtime.kernels.quant_reference.dequantize_keys_reference`."""
    return _dequantize(codes, scale, zero, bits, dtype, keys=True)


def dequantize_values_triton(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Triton twin of :func:`~zipvl_compile.runtime.kernels.quant_reference.dequantize_values_reference`."""
    return _dequantize(codes, scale, zero, bits, dtype, keys=False)


def write_segment_triton_(
    seg: Segment, k_new: torch.Tensor, v_new: torch.Tensor, take: torch.Tensor, src_pos: torch.Tensor, bits: int
) -> None:
    """Triton twin of :func:`~zipvl_compile.runtime.kernels.quant_reference.write_segment_reference_` (the
    segment's tensors must be contiguous)."""
    write_staged_triton_(seg, k_new, v_new, staging_index(take), src_pos, bits)


def write_staged_triton_(
    seg: Segment, k_new: torch.Tensor, v_new: torch.Tensor, staging: Staging, src_pos: torch.Tensor, bits: int
) -> None:
    """:func:`write_segment_triton_` of the tokens ``staging`` lists (a :class:`~zipvl_compile.runtime.layout.Staging`
    of k_new's t tokens, e.g. made by a kernel that selected them): the same write; a row with count 0 costs
    its programs one load each."""
    if not all(buf.is_contiguous() for buf in seg):
        raise ValueError("segment buffers must be contiguous")
    batch, heads, t, d = k_new.shape
    capacity = seg.capacity
    tp = staging.src.shape[1]
    wrap_triton(_write_segment_kernel)[(batch * heads, tp // GROUP)](
        k_new,
        v_new,
        staging.src,
        staging.count,
        src_pos,
        *seg,
        heads,
        t,
        capacity,
        d,
        tp,
        *k_new.stride(),
        *v_new.stride(),
        *src_pos.stride(),
        BD=_block_d(d, bits),
        BITS=bits,
        ROWS=_ROWS,
    )
    advance_fill_(seg.fill, staging.count, capacity)
