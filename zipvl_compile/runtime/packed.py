"""Bodies of the packed-KV-cache ops: prefill write, tail append, block recompression, dense view.

A layer's packed state is three tensor lists (the op schemas take ``Tensor[]``):
- ``hi`` / ``lo``: a :class:`~zipvl_compile.runtime.kernels.decode.Segment` as a list
  ``[k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, fill]`` (layout: :mod:`runtime.quant`);
- ``tail``: ``[k_tail, v_tail, tail_pos, tail_len]``: model-dtype K/V ``[B, H, R, d]`` of the decode tokens
  not yet quantised, their positions int32 ``[B, R]`` (-1 empty) and count int32 ``[B]``
  (R = ``recompress_interval``).
Everything is fixed-shape and free of host syncs: a block is recompressed under a per-row predicate
(``tail_len == R``), the write taking no token in rows where it is false.
"""

from __future__ import annotations

import torch

from zipvl_compile.runtime.kernels.decode import Segment
from zipvl_compile.runtime.quant import GROUP, dequantize_keys, dequantize_values, write_segment_
from zipvl_compile.runtime.selection import select_tokens


def write_tokens_(
    hi: list[torch.Tensor],
    lo: list[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    valid: torch.Tensor | None,
    pos: torch.Tensor,
    hi_bits: int,
    lo_bits: int,
) -> None:
    """Quantise tokens k/v [B, H, t, d] into the segments: kept -> ``hi``, other valid -> ``lo``.

    keep, valid: bool [B, t] or None (None keep: every valid token is kept; None valid: all valid).
    pos: int [B, t] token positions.
    """
    batch, _, t, _ = k.shape
    if valid is None:
        valid = torch.ones(batch, t, dtype=torch.bool, device=k.device)
    take_hi = valid if keep is None else valid & keep
    write_segment_(*hi, k, v, take_hi, pos, hi_bits)
    write_segment_(*lo, k, v, valid & ~take_hi, pos, lo_bits)


def append_tail_(tail: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    """Append one decode token per row (k/v [B, H, 1, d], pos int [B]) at slot ``tail_len``."""
    k_tail, v_tail, tail_pos, tail_len = tail
    slot = tail_len.long().clamp(max=k_tail.shape[2] - 1)
    index = slot[:, None, None, None].expand(-1, k_tail.shape[1], 1, k_tail.shape[3])
    k_tail.scatter_(2, index, k.to(k_tail.dtype))
    v_tail.scatter_(2, index, v.to(v_tail.dtype))
    tail_pos.scatter_(1, slot[:, None], pos.to(tail_pos.dtype)[:, None])
    tail_len.add_(1)


def recompress_(
    hi: list[torch.Tensor],
    lo: list[torch.Tensor],
    tail: list[torch.Tensor],
    q: torch.Tensor | None,
    scale: float,
    n_rep: int,
    tau: float,
    hi_bits: int,
    lo_bits: int,
) -> None:
    """Quantise a full tail block (rows with ``tail_len == R``) and empty it; other rows are untouched.

    The block is scored with the query ``q`` [B, Hq, 1, d] (Eqs. 6-8 on the block: one query, so every
    column is seen once and Eq. 7 is the plain probability); its kept tokens go to ``hi``, the rest to
    ``lo``. Softmax is taken over the block per head (the full-cache normaliser differs per head; the block's
    ranking within a head does not). Without a query every token of the block is kept.
    """
    k_tail, v_tail, tail_pos, tail_len = tail
    full = tail_len >= k_tail.shape[2]
    if not k_tail.is_cuda and not torch.compiler.is_compiling() and not bool(full.any()):
        return  # on the CPU reading the predicate syncs nothing: skip the masked no-op write
    valid = full[:, None] & (tail_pos >= 0)
    keep = None
    if q is not None and tau < 1.0:
        keys = k_tail.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k_tail
        logits = torch.matmul(q.float(), keys.float().transpose(-1, -2))[:, :, 0] * scale  # [B, Hq, R]
        probs = torch.softmax(logits.masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
        colsum = probs.sum(dim=1)
        keep, _ = select_tokens(colsum, valid.to(torch.float32), valid, tau, 0)
    write_tokens_(hi, lo, k_tail, v_tail, keep, valid, tail_pos, hi_bits, lo_bits)
    tail_pos.masked_fill_(full[:, None], -1)
    tail_len.masked_fill_(full, 0)


_SLOT_DIM = (2, 2, 2, 2, 2, 2, 1)  # the slot axis of k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos


def cut_shape(index: int, t: torch.Tensor, slots: int | torch.SymInt) -> list:
    """Shape of segment tensor ``index`` (< 7; ``fill`` has no slot axis) holding ``slots`` slots: the key
    scale/zero count groups of GROUP slots, the others slots."""
    shape = list(t.shape)
    shape[_SLOT_DIM[index]] = slots // GROUP if index in (1, 2) else slots
    return shape


def shrink(seg: list[torch.Tensor], reserve: int) -> list[torch.Tensor]:
    """A copy of a segment cut to the slots its rows filled (the largest ``fill``) plus ``reserve`` more, at most
    its capacity. Reads ``fill`` on the host (one sync): the kept set of a prefill is known only on the device.
    ``reserve`` is a multiple of GROUP, so the cut falls on a key-group boundary."""
    slots = min(int(seg[7].max()) + reserve, seg[6].shape[1])
    return [t[tuple(map(slice, cut_shape(i, t, slots)))].clone() for i, t in enumerate(seg[:7])] + [seg[7].clone()]


def dense_view(
    hi: list[torch.Tensor], lo: list[torch.Tensor], tail: list[torch.Tensor], length: int, hi_bits: int, lo_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised K/V ``[B, H, length, d]`` in position order (zeros where nothing is cached).

    The eager path's view of the cache: HF's attention and masks then work as with a static cache. A
    compiled decode graph replaces the attention reading it by ``decode_attention`` on the packed buffers.
    """
    k_tail, v_tail, tail_pos, tail_len = tail
    batch, heads, _, d = k_tail.shape
    k_out = k_tail.new_zeros(batch, heads, length + 1, d)
    v_out = torch.zeros_like(k_out)
    sources = [
        (*_dequantized(Segment(*hi), hi_bits, k_tail.dtype), hi[6], hi[7]),
        (*_dequantized(Segment(*lo), lo_bits, k_tail.dtype), lo[6], lo[7]),
        (k_tail, v_tail, tail_pos, tail_len),
    ]
    for k, v, pos, count in sources:
        slot = torch.arange(pos.shape[1], device=pos.device)
        ok = (pos >= 0) & (slot[None, :] < count[:, None]) & (pos < length)
        target = torch.where(ok, pos.long(), length)[:, None, :, None].expand(-1, heads, -1, d)
        k_out.scatter_(2, target, k)
        v_out.scatter_(2, target, v)
    return k_out[:, :, :length], v_out[:, :, :length]


def _dequantized(seg: Segment, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        dequantize_keys(seg.k_codes, seg.k_scale, seg.k_zero, bits, dtype),
        dequantize_values(seg.v_codes, seg.v_scale, seg.v_zero, bits, dtype),
    )


def simulate(
    k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, valid: torch.Tensor | None, hi_bits: int, lo_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k/v [B, H, t, d] as the packed cache would return them after the prefill write (kv_mode="simulate"):
    quantised and dequantised with the same segments, groups and parameters, in position order.
    Tokens that are not valid (padding) come back as zeros."""
    batch, heads, t, d = k.shape
    cap = -(-t // GROUP) * GROUP
    hi = empty_segment(batch, heads, cap, d, hi_bits, k.device)
    lo = empty_segment(batch, heads, cap, d, lo_bits, k.device)
    pos = torch.arange(t, device=k.device).expand(batch, t)
    write_tokens_(hi, lo, k, v, keep, valid, pos, hi_bits, lo_bits)
    tail = [
        k.new_zeros(batch, heads, 1, d),
        k.new_zeros(batch, heads, 1, d),
        torch.full((batch, 1), -1, dtype=torch.int32, device=k.device),
        torch.zeros(batch, dtype=torch.int32, device=k.device),
    ]
    return dense_view(hi, lo, tail, t, hi_bits, lo_bits)


def empty_segment(batch: int, heads: int, cap: int, d: int, bits: int, device: torch.device) -> list[torch.Tensor]:
    """A segment's tensors (layout: runtime.quant), empty: every slot -1, fill 0."""
    codes = d * bits // 8
    return [
        torch.zeros(batch, heads, cap, codes, dtype=torch.uint8, device=device),
        torch.zeros(batch, heads, cap // GROUP, d, dtype=torch.float16, device=device),
        torch.zeros(batch, heads, cap // GROUP, d, dtype=torch.float16, device=device),
        torch.zeros(batch, heads, cap, codes, dtype=torch.uint8, device=device),
        torch.zeros(batch, heads, cap, dtype=torch.float16, device=device),
        torch.zeros(batch, heads, cap, dtype=torch.float16, device=device),
        torch.full((batch, cap), -1, dtype=torch.int32, device=device),
        torch.zeros(batch, dtype=torch.int32, device=device),
    ]
