"""Triton kernels of the decode tail: one launch appends a token, one selects and stages a full block.

Contracts and oracles: :mod:`zipvl_compile.runtime.kernels.tail_reference`. Both kernels run one program per
batch row; a decode step that recompresses nothing costs the selection a load of the row's R positions and
the stores of its empty staging (the segment writes that follow return at once for rows with nothing to take),
where the torch composition it replaces ran its scoring, sorts, prefix sums and searches every step (a dozen
kernels per layer).

- ``_append_kernel``: k/v ``[B, H, 1, d]`` and pos ``[B]`` (any strides) into slot ``min(length, R - 1)`` of
  every head, then ``length += 1``.
- ``_select_block_kernel``: in a row whose tail is full (``length >= R``): per KV head, the tail keys
  ``[R, d]`` against each of its n_rep query rows on the CUDA cores (fp32 products, softmax over the valid
  slots), summed over heads into the column sums; Eq. 6's count from a sort of the sums and their prefix sums,
  Eqs. 7-8's p largest from a sort of (sum bits, -slot) keys (ties to the lower slot), the last valid slot
  forced in; then both segments' staging (a prefix-sum compaction, in slot order). Unscored (``SCORE=False``):
  every valid slot to ``hi``. R is at most :data:`MAX_SLOTS` (a longer interval takes the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from zipvl_compile.runtime.kernels.tail_reference import BlockStaging
from zipvl_compile.runtime.layout import GROUP, Staging, Tail, round_up

MAX_SLOTS = 256  # tail slots a program holds in registers (keys [R, d] in fp32)


@triton.jit
def _append_kernel(
    k_ptr,
    v_ptr,
    pos_ptr,
    tk_ptr,
    tv_ptr,
    tpos_ptr,
    length_ptr,
    H,
    R,
    d,
    stride_kb,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vd,
    stride_p,
    BH: tl.constexpr,
    BD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(length_ptr + b)
    slot = tl.minimum(length, R - 1).to(tl.int64)
    head = tl.arange(0, BH)
    chan = tl.arange(0, BD)
    ok = (head < H)[:, None] & (chan < d)[None, :]
    k = tl.load(k_ptr + b * stride_kb + head[:, None] * stride_kh + chan[None, :] * stride_kd, mask=ok)
    v = tl.load(v_ptr + b * stride_vb + head[:, None] * stride_vh + chan[None, :] * stride_vd, mask=ok)
    dest = ((b * H + head[:, None]) * R + slot) * d + chan[None, :]
    tl.store(tk_ptr + dest, k.to(tk_ptr.dtype.element_ty), mask=ok)
    tl.store(tv_ptr + dest, v.to(tv_ptr.dtype.element_ty), mask=ok)
    tl.store(tpos_ptr + b * R + slot, tl.load(pos_ptr + b * stride_p).to(tl.int32))
    tl.store(length_ptr + b, length + 1)


@triton.jit
def _block_colsum(q_ptr, k_ptr, b, slot_ok, scale, H, R, d, n_rep, sqb, sqh, sqd, RP: tl.constexpr, BD: tl.constexpr):
    """fp32 [RP]: the block's probabilities per query head over the ``slot_ok`` slots, summed over the heads."""
    slot = tl.arange(0, RP)
    chan = tl.arange(0, BD)
    colsum = tl.zeros([RP], dtype=tl.float32)
    for g in range(H):
        keys = tl.load(
            k_ptr + ((b * H + g) * R + slot[:, None]) * d + chan[None, :],
            mask=(slot < R)[:, None] & (chan < d)[None, :],
            other=0.0,
        ).to(tl.float32)
        for i in range(n_rep):
            q = tl.load(q_ptr + b * sqb + (g * n_rep + i) * sqh + chan * sqd, mask=chan < d, other=0.0)
            dots = (tl.sum(keys * q.to(tl.float32)[None, :], axis=1) * scale).to(tl.float32)  # Inductor: fp64 scale
            logits = tl.where(slot_ok, dots, float("-inf"))
            p = tl.where(slot_ok, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
            colsum += p / tl.sum(p, axis=0)
    return colsum


@triton.jit
def _select_top(mass, slot_ok, tau, R, RP: tl.constexpr):
    """bool [RP]: Eq. 6's count p of the smallest set holding tau of ``mass`` (fp32 >= 0), then the p slots of
    largest mass, ties to the lower slot, and the last valid slot."""
    slot = tl.arange(0, RP)
    prefix = tl.cumsum(tl.sort(mass, descending=True), axis=0)
    bound = (tau * tl.max(prefix, axis=0)).to(tl.float32)  # as the reference: fp32 (Inductor passes tau as fp64)
    below = tl.sum(((prefix < bound) & (slot < R)).to(tl.int32), axis=0)
    p = tl.minimum(below + 1, tl.sum(slot_ok.to(tl.int32), axis=0))
    key = tl.where(slot_ok, (mass.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (RP - 1 - slot), -1)
    cut = tl.sum(tl.where(slot == p - 1, tl.sort(key, descending=True), 0), axis=0)
    last = tl.max(tl.where(slot_ok, slot, -1), axis=0)
    return slot_ok & ((key >= cut) | (slot == last))


@triton.jit
def _store_staging(src_ptr, count_ptr, b, take, TP, TPP: tl.constexpr, R, RP: tl.constexpr):
    """Row b's staging of the ``take`` slots: src[s] = the s-th taken slot, R - 1 beyond the count."""
    slot = tl.arange(0, RP)
    count = tl.sum(take.to(tl.int32), axis=0)
    at = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(src_ptr + b * TP + at, slot.to(tl.int64), mask=take)
    s = tl.arange(0, TPP)
    tl.store(src_ptr + b * TP + s, tl.full([TPP], R - 1, tl.int64), mask=(s >= count) & (s < TP))
    tl.store(count_ptr + b, count.to(tl.int64))


@triton.jit
def _select_block_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    length_ptr,
    hi_src_ptr,
    hi_count_ptr,
    lo_src_ptr,
    lo_count_ptr,
    colsum_ptr,
    scale,
    tau,
    H,
    R,
    d,
    n_rep,
    TP,
    sqb,
    sqh,
    sqd,
    SCORE: tl.constexpr,
    RP: tl.constexpr,
    TPP: tl.constexpr,
    BD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, RP)
    full = tl.load(length_ptr + b) >= R
    slot_ok = full & (tl.load(pos_ptr + b * R + slot, mask=slot < R, other=-1) >= 0)
    keep = slot_ok
    if SCORE:
        if full:
            colsum = _block_colsum(q_ptr, k_ptr, b, slot_ok, scale, H, R, d, n_rep, sqb, sqh, sqd, RP, BD)
            tl.store(colsum_ptr + b * R + slot, colsum, mask=slot < R)
            keep = _select_top(colsum, slot_ok, tau, R, RP)
    _store_staging(hi_src_ptr, hi_count_ptr, b, keep, TP, TPP, R, RP)
    _store_staging(lo_src_ptr, lo_count_ptr, b, slot_ok & ~keep, TP, TPP, R, RP)


def _check_contiguous(tail: Tail) -> None:
    if not all(t.is_contiguous() for t in tail):
        raise ValueError("the tail's buffers must be contiguous (the kernels address them as [B, H, R, d])")


def append_tail_triton_(tail: Tail, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    """Triton twin of :func:`~zipvl_compile.runtime.kernels.tail_reference.append_tail_reference_` (the tail's
    tensors contiguous)."""
    _check_contiguous(tail)
    batch, heads, _, d = k.shape
    wrap_triton(_append_kernel)[(batch,)](
        k,
        v,
        pos,
        *tail,
        heads,
        tail.slots,
        d,
        k.stride(0),
        k.stride(1),
        k.stride(3),
        v.stride(0),
        v.stride(1),
        v.stride(3),
        pos.stride(0),  # 0 where the cache passes one position expanded over the batch
        BH=triton.next_power_of_2(heads),
        BD=triton.next_power_of_2(d),
    )


def select_block_triton(tail: Tail, q: torch.Tensor | None, scale: float, n_rep: int, tau: float) -> BlockStaging:
    """Triton twin of :func:`~zipvl_compile.runtime.kernels.tail_reference.select_block_reference` (R at most
    :data:`MAX_SLOTS`; the tail's tensors contiguous)."""
    _check_contiguous(tail)
    batch, heads, slots, d = tail.k.shape
    if slots > MAX_SLOTS:
        raise ValueError(f"select_block_triton: a tail of {slots} slots exceeds {MAX_SLOTS}")
    tp = round_up(slots, GROUP)
    new = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=tail.k.device)
    hi = Staging(new(batch, tp, dtype=torch.int64), new(batch, dtype=torch.int64))
    lo = Staging(new(batch, tp, dtype=torch.int64), new(batch, dtype=torch.int64))
    colsum = new(batch, slots, dtype=torch.float32)
    score = q is not None and tau < 1.0
    query = q if score else tail.k  # any tensor with strides: the kernel reads q only when it scores
    wrap_triton(_select_block_kernel)[(batch,)](
        query,
        tail.k,
        tail.pos,
        tail.length,
        *hi,
        *lo,
        colsum,
        scale,
        tau,
        heads,
        slots,
        d,
        n_rep,
        tp,
        query.stride(0),
        query.stride(1),
        query.stride(3),
        SCORE=score,
        RP=triton.next_power_of_2(slots),
        TPP=triton.next_power_of_2(tp),
        BD=triton.next_power_of_2(d),
    )
    return BlockStaging(hi, lo, colsum)
