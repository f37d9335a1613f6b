"""Decode attention over the packed mixed-precision KV cache (one query token per sequence).

The cache of a layer holds two quantised segments, ``hi`` and ``lo`` (see :class:`Segment`), and a
model-dtype tail of recent tokens. Decode attention is a sum over cached keys, so the three sources are
attended as one set of keys: ``out = softmax(q · K^T * scale) V`` over every valid slot, where a slot is
valid iff its position is >= 0 and it lies below the segment's ``fill`` (or the tail's ``tail_len``), and,
for sliding-window layers (``window > 0``), its position is > ``q_pos - window``.

Two implementations with the same signature:

- :func:`decode_attention_reference`: plain PyTorch (dequantise, concatenate, masked softmax in fp32).
- :func:`decode_attention_triton`: split-K (flash-decoding) Triton kernels. Grid ``(B, H, splits)``; every
  program takes the ``split``-th share of the 64-slot blocks of *each* source (hi, lo and tail, each share
  computed in-kernel from ``fill`` / ``tail_len``, so the work is balanced whatever the fill and the bit
  widths, and nothing syncs with the host). Per block it loads the packed codes once, unpacks them with
  shifts and masks, and serves all ``n_rep`` query heads of its KV head with one ``[n_rep, d] x [d, 64]``
  ``tl.dot``. ``n_rep`` is padded to 16 rows for ``tl.dot`` (always, whatever ``n_rep``): tensor cores make
  the padded rows free in this memory-bound kernel, while CUDA-core multiply-sums would be compute-bound at
  GQA ``n_rep = 7``. Dequantisation is folded into the operands instead of the ``[64, d]`` tiles (a block is
  one key group of G = 64 slots, so its key scale/zero are one ``[d]`` vector):
  ``q·k = (q*k_scale)·code + q·k_zero`` and ``p·v = (p*v_scale)·code + (p·v_zero) 1``.
  Each program keeps one running max / sum / accumulator per query head (base-2 online softmax, fp32) and
  writes them to a workspace; a second kernel merges the splits.

Shapes: q ``[B, Hq, 1, d]`` with ``Hq = H * n_rep`` (query head ``h * n_rep + r`` reads KV head ``h``);
output ``[B, Hq, 1, d]`` in q's dtype. d in {16, 32, 64, 128, 256}; bits in {2, 4, 8}.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..quant import GROUP, dequantize_keys_reference, dequantize_values_reference

_TARGET_PROGRAMS = 2 * 132  # >= 2 programs per SM on a 132-SM GPU
_MIN_BLOCKS_PER_SPLIT = 4  # a split walks at least this many blocks of GROUP slots of a full segment


class Segment(NamedTuple):
    """One quantised segment of a layer's cache (``b`` = the segment's bits, ``C`` = slot capacity).

    k_codes, v_codes: uint8 [B, H, C, d*b//8], channel c in byte c // (8//b) at shift (c % (8//b)) * b.
    k_scale, k_zero: float16 [B, H, C//64, d] (per channel over 64-slot groups; x = code*scale + zero).
    v_scale, v_zero: float16 [B, H, C] (per token over the head dim).
    pos: int32 [B, C], original position of each slot, -1 = empty.
    fill: int32 [B], slots [0, fill) have been written.
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    pos: torch.Tensor
    fill: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def _dequant_segment(seg: Segment, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment -> fp32 keys and values [B, H, C, d] (every slot, valid or not)."""
    return (dequantize_keys_reference(seg.k_codes, seg.k_scale, seg.k_zero, bits, torch.float32),
            dequantize_values_reference(seg.v_codes, seg.v_scale, seg.v_zero, bits, torch.float32))


def _slot_valid(pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """pos int [B, C], length int [B] -> bool [B, C]: pos >= 0 and slot < length."""
    slot = torch.arange(pos.shape[1], device=pos.device)
    return (pos >= 0) & (slot[None, :] < length[:, None])


def decode_attention_reference(q: torch.Tensor, hi: Segment, lo: Segment, k_tail: torch.Tensor,
                               v_tail: torch.Tensor, tail_pos: torch.Tensor, tail_len: torch.Tensor,
                               scale: float, n_rep: int, hi_bits: int, lo_bits: int, window: int = 0,
                               q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch decode attention over hi + lo + tail; see the module docstring for the arguments.

    Returns [B, Hq, 1, d] in q's dtype; a row with no valid key returns zeros.
    """
    k_hi, v_hi = _dequant_segment(hi, hi_bits)
    k_lo, v_lo = _dequant_segment(lo, lo_bits)
    k = torch.cat([k_hi, k_lo, k_tail.float()], dim=2).repeat_interleave(n_rep, dim=1)
    v = torch.cat([v_hi, v_lo, v_tail.float()], dim=2).repeat_interleave(n_rep, dim=1)
    pos = torch.cat([hi.pos, lo.pos, tail_pos], dim=1)
    valid = torch.cat([_slot_valid(hi.pos, hi.fill), _slot_valid(lo.pos, lo.fill),
                       _slot_valid(tail_pos, tail_len)], dim=1)
    if window > 0:
        valid = valid & (pos > (q_pos.to(pos.dtype) - window)[:, None])
    # empty slots may hold any bytes (NaN included): zero them so that 0-probability * NaN cannot leak
    k = k.masked_fill(~valid[:, None, :, None], 0.0)
    v = v.masked_fill(~valid[:, None, :, None], 0.0)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _block_range(length, split, n_splits, BLOCK: tl.constexpr):
    """This split's share [first, last) of the ceil(length / BLOCK) blocks of a source."""
    n_blocks = tl.cdiv(length, BLOCK)
    return split * n_blocks // n_splits, (split + 1) * n_blocks // n_splits


@triton.jit
def _online_update(s, m, den):
    """Base-2 online softmax step. s [NP, BLOCK] scores (-inf = masked); m, den [NP] running max, sum.

    Returns (p, alpha, m_new, den_new): probabilities of this block, rescale factor of the old state.
    """
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, den * alpha + tl.sum(p, axis=1)


@triton.jit
def _load_codes(base, slot, slot_ok, BITS: tl.constexpr, D: tl.constexpr):
    """Unpacked codes [BLOCK, D] (float32) of the slots ``slot`` of a uint8 [C, D*BITS//8] plane."""
    PER: tl.constexpr = 8 // BITS
    chan = tl.arange(0, D)
    byte = tl.load(base + slot[:, None] * (D * BITS // 8) + (chan // PER)[None, :], mask=slot_ok[:, None],
                   other=0).to(tl.int32)
    return ((byte >> ((chan % PER) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _attend_segment(q2, m, den, acc, kc, ks, kz, vc, vs, vz, pos_ptr, fill_ptr, b, bh, split, n_splits, C,
                    min_pos, BITS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr):
    """Walk this split's blocks of one quantised segment, updating (m, den, acc).

    q2 [NP, D] fp32: queries times scale*log2(e). kc/vc: uint8 code planes, ks/kz/vs/vz: float16 params,
    pos_ptr int32 [B, C], fill_ptr int32 [B]; bh = b*H + h (int64). Keys with pos <= min_pos are masked.
    """
    KB: tl.constexpr = D * BITS // 8
    fill = tl.load(fill_ptr + b)
    first, last = _block_range(fill, split, n_splits, BLOCK)
    chan = tl.arange(0, D)
    for blk in range(first, last):
        slot = blk * BLOCK + tl.arange(0, BLOCK)
        slot_ok = slot < fill
        valid = tl.load(pos_ptr + b * C + slot, mask=slot_ok, other=-1) > min_pos
        # keys: one 64-slot block = one quantisation group -> one [D] scale/zero vector
        g = bh * (C // BLOCK) + blk
        k_s = tl.load(ks + g * D + chan).to(tl.float32)
        k_z = tl.load(kz + g * D + chan).to(tl.float32)
        codes = _load_codes(kc + bh * C * KB, slot, slot_ok, BITS, D)
        s = tl.dot((q2 * k_s[None, :]).to(DT), tl.trans(codes.to(DT)), input_precision="ieee")
        s += tl.sum(q2 * k_z[None, :], axis=1)[:, None]
        s = tl.where(valid[None, :], s, float("-inf"))
        p, alpha, m, den = _online_update(s, m, den)
        # values: per-token scale/zero, masked so that garbage params of empty slots never reach p
        v_s = tl.load(vs + bh * C + slot, mask=valid, other=0.0).to(tl.float32)
        v_z = tl.load(vz + bh * C + slot, mask=valid, other=0.0).to(tl.float32)
        codes = _load_codes(vc + bh * C * KB, slot, slot_ok, BITS, D)
        pv = tl.dot((p * v_s[None, :]).to(DT), codes.to(DT), input_precision="ieee")
        acc = acc * alpha[:, None] + pv + tl.sum(p * v_z[None, :], axis=1)[:, None]
    return m, den, acc


@triton.jit
def _attend_tail(q, m, den, acc, kt, vt, tpos_ptr, tlen_ptr, b, bh, split, n_splits, R, min_pos, qk_scale,
                 D: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr):
    """Walk this split's blocks of the model-dtype tail (kt/vt [B, H, R, D], tpos int32 [B, R])."""
    n = tl.minimum(tl.load(tlen_ptr + b), R)
    first, last = _block_range(n, split, n_splits, BLOCK)
    chan = tl.arange(0, D)
    for blk in range(first, last):
        slot = blk * BLOCK + tl.arange(0, BLOCK)
        slot_ok = slot < n
        valid = tl.load(tpos_ptr + b * R + slot, mask=slot_ok, other=-1) > min_pos
        offs = bh * R * D + slot[:, None] * D + chan[None, :]
        k = tl.load(kt + offs, mask=slot_ok[:, None], other=0.0).to(DT)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        p, alpha, m, den = _online_update(s, m, den)
        v = tl.load(vt + offs, mask=valid[:, None], other=0.0).to(DT)  # holes may hold garbage
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v, input_precision="ieee")
    return m, den, acc


@triton.jit
def _decode_partial_kernel(
        q_ptr, qpos_ptr,
        hkc, hks, hkz, hvc, hvs, hvz, hpos, hfill, C_HI,
        lkc, lks, lkz, lvc, lvs, lvz, lpos, lfill, C_LO,
        kt, vt, tpos, tlen, R,
        acc_ws, m_ws, den_ws,
        H, n_rep, window, qk_scale,
        HI_BITS: tl.constexpr, LO_BITS: tl.constexpr, D: tl.constexpr, NP: tl.constexpr,
        BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, DT: tl.constexpr):
    """Program (b, h, split): partial softmax state of query heads h*n_rep.. over its share of all sources.

    Writes acc_ws fp32 [B, Hq, S, D] (unnormalised), m_ws / den_ws fp32 [B, Hq, S] (base-2 max, sum).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    bh = (b * H + h).to(tl.int64)
    rows = tl.arange(0, NP)
    row_ok = rows < n_rep
    chan = tl.arange(0, D)
    qh = b * H * n_rep + h * n_rep + rows  # query-head rows of this KV head
    q = tl.load(q_ptr + qh[:, None] * D + chan[None, :], mask=row_ok[:, None], other=0.0)
    q2 = q.to(tl.float32) * qk_scale
    min_pos = -1
    if HAS_WINDOW:
        min_pos = tl.maximum(tl.load(qpos_ptr + b).to(tl.int32) - window, -1)

    m = tl.full([NP], float("-inf"), tl.float32)
    den = tl.zeros([NP], tl.float32)
    acc = tl.zeros([NP, D], tl.float32)
    m, den, acc = _attend_segment(q2, m, den, acc, hkc, hks, hkz, hvc, hvs, hvz, hpos, hfill, b, bh, split,
                                  n_splits, C_HI, min_pos, HI_BITS, D, BLOCK, DT)
    m, den, acc = _attend_segment(q2, m, den, acc, lkc, lks, lkz, lvc, lvs, lvz, lpos, lfill, b, bh, split,
                                  n_splits, C_LO, min_pos, LO_BITS, D, BLOCK, DT)
    m, den, acc = _attend_tail(q.to(DT), m, den, acc, kt, vt, tpos, tlen, b, bh, split, n_splits, R,
                               min_pos, qk_scale, D, BLOCK, DT)

    ws = qh.to(tl.int64) * n_splits + split
    tl.store(m_ws + ws, m, mask=row_ok)
    tl.store(den_ws + ws, den, mask=row_ok)
    tl.store(acc_ws + ws[:, None] * D + chan[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _decode_merge_kernel(acc_ws, m_ws, den_ws, out_ptr, S, D: tl.constexpr, SP: tl.constexpr):
    """Program (b*Hq + head): merge the S partial states of one query head into out [D] (out's dtype)."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SP)
    sp_ok = sp < S
    chan = tl.arange(0, D)
    m = tl.load(m_ws + row * S + sp, mask=sp_ok, other=float("-inf"))
    den = tl.load(den_ws + row * S + sp, mask=sp_ok, other=0.0)
    acc = tl.load(acc_ws + (row * S + sp)[:, None] * D + chan[None, :], mask=sp_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    denom = tl.sum(w * den, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + row * D + chan, out.to(out_ptr.dtype.element_ty))


_DOT_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def num_splits_for(batch: int, kv_heads: int, capacity: int) -> int:
    """Splits per (sequence, KV head): enough programs for >= 2 per SM on a 132-SM GPU, but no more
    than ``capacity / (4 * 64)`` so that a full segment gives each split at least 4 blocks of 64 slots.
    A function of static shapes only (``capacity`` = the larger segment capacity)."""
    want = triton.cdiv(_TARGET_PROGRAMS, batch * kv_heads)
    return max(1, min(want, capacity // (_MIN_BLOCKS_PER_SPLIT * GROUP)))


def decode_attention_triton(q: torch.Tensor, hi: Segment, lo: Segment, k_tail: torch.Tensor,
                            v_tail: torch.Tensor, tail_pos: torch.Tensor, tail_len: torch.Tensor,
                            scale: float, n_rep: int, hi_bits: int, lo_bits: int, window: int = 0,
                            q_pos: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Split-K Triton decode attention; arguments as :func:`decode_attention_reference`.

    num_splits: splits per (sequence, KV head); default :func:`num_splits_for` of the shapes.
    Segment tensors are made contiguous (a no-op for cache buffers). Returns [B, Hq, 1, d] in q's dtype.
    """
    B, Hq, q_len, d = q.shape
    H = hi.k_codes.shape[1]
    if q_len != 1 or Hq != H * n_rep or d not in (16, 32, 64, 128, 256):
        raise ValueError(f"decode_attention: q {tuple(q.shape)} needs q_len 1, Hq = H*n_rep = {H}*{n_rep} "
                         "and d in {16, 32, 64, 128, 256}")
    if window > 0 and q_pos is None:
        raise ValueError("decode_attention: window > 0 needs q_pos")
    c_hi, c_lo, R = hi.pos.shape[1], lo.pos.shape[1], tail_pos.shape[1]
    S = num_splits or num_splits_for(B, H, max(c_hi, c_lo))
    acc_ws = torch.empty(B, Hq, S, d, device=q.device, dtype=torch.float32)
    m_ws = torch.empty(B, Hq, S, device=q.device, dtype=torch.float32)
    den_ws = torch.empty_like(m_ws)
    seg = [t.contiguous() for t in (*hi, *lo)]
    _decode_partial_kernel[(B, H, S)](
        q.contiguous(), q_pos if q_pos is not None else tail_len,
        *seg[:8], c_hi, *seg[8:], c_lo,
        k_tail.contiguous(), v_tail.contiguous(), tail_pos.contiguous(), tail_len, R,
        acc_ws, m_ws, den_ws,
        H, n_rep, window, scale * math.log2(math.e),
        HI_BITS=hi_bits, LO_BITS=lo_bits, D=d, NP=max(16, triton.next_power_of_2(n_rep)), BLOCK=GROUP,
        HAS_WINDOW=window > 0, DT=_DOT_DTYPE[q.dtype], num_warps=8 if d == 256 else 4)
    out = torch.empty(B, Hq, 1, d, device=q.device, dtype=q.dtype)
    _decode_merge_kernel[(B * Hq,)](acc_ws, m_ws, den_ws, out, S, D=d, SP=triton.next_power_of_2(S))
    return out


def decode_attention(q: torch.Tensor, hi: Segment, lo: Segment, k_tail: torch.Tensor, v_tail: torch.Tensor,
                     tail_pos: torch.Tensor, tail_len: torch.Tensor, scale: float, n_rep: int, hi_bits: int,
                     lo_bits: int, window: int = 0, q_pos: torch.Tensor | None = None,
                     use_triton: bool | None = None) -> torch.Tensor:
    """Decode attention over the packed cache: Triton on CUDA (or when ``use_triton``), else the reference.

    q [B, H*n_rep, 1, d]; hi/lo: :class:`Segment`; k_tail/v_tail [B, H, R, d] model dtype; tail_pos int32
    [B, R]; tail_len int32 [B]; q_pos int [B] (needed when window > 0). Returns [B, H*n_rep, 1, d].
    """
    if use_triton is None:
        use_triton = q.is_cuda
    impl = decode_attention_triton if use_triton else decode_attention_reference
    return impl(q, hi, lo, k_tail, v_tail, tail_pos, tail_len, scale, n_rep, hi_bits, lo_bits, window, q_pos)
