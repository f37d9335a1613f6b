"""Plain-torch references of the decode tail's kernels (the oracles of :mod:`zipvl_compile.runtime.kernels.tail`).

A layer's :class:`~zipvl_compile.runtime.layout.Tail` holds the decode tokens not yet quantised, R slots per row.
Each decode step appends one token per row (:func:`append_tail_reference_`); once a row's tail is full its block
is scored with the step's query and split into the tokens for the ``hi`` segment (kept) and for ``lo`` (the
others) (:func:`select_block_reference`, Eqs. 6-8 on the block: one query, so every column is seen once and Eq. 7
is the plain probability). Softmax is taken over the block per head (the full-cache normaliser differs per
head; the block's ranking within a head does not).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zipvl_compile.runtime.kernels.select_reference import select_tokens
from zipvl_compile.runtime.layout import Staging, Tail, staging_index


class BlockTake(NamedTuple):
    """The tokens of a tail block each segment takes: bool ``[B, R]``, all False in rows whose tail is not full."""

    hi: torch.Tensor
    lo: torch.Tensor


class BlockStaging(NamedTuple):
    """:class:`BlockTake` as the segment writes read it (one :class:`~zipvl_compile.runtime.layout.Staging` per
    segment, tp = R rounded up to a group), and the block's column sums ``colsum`` float32 ``[B, R]`` (Eq. 5 summed
    over the query heads; defined in the rows being recompressed when the block is scored)."""

    hi: Staging
    lo: Staging
    colsum: torch.Tensor


def append_tail_reference_(tail: Tail, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    """Append one decode token per row (k/v ``[B, H, 1, d]``, pos int ``[B]``) at slot ``tail.length`` (the last
    slot when the tail is full: the caller recompresses a full tail first), and count it."""
    slot = tail.length.long().clamp(max=tail.slots - 1)
    index = slot[:, None, None, None].expand(-1, tail.k.shape[1], 1, tail.k.shape[3])
    tail.k.scatter_(2, index, k.to(tail.k.dtype))
    tail.v.scatter_(2, index, v.to(tail.v.dtype))
    tail.pos.scatter_(1, slot[:, None], pos.to(tail.pos.dtype)[:, None])
    tail.length.add_(1)


def append_tail_cpu_(tail: Tail, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    """:func:`append_tail_reference_` (same arguments, same bits) for CPU tensors, with fewer ops per step: the
    slot is read on the host (which syncs nothing there), so where every row appends at the same slot (always at
    batch 1) the token is copied into that slot of k, v and pos instead of scattered; the reference otherwise."""
    rows = tail.length.tolist()
    if not rows or rows.count(rows[0]) != len(rows):
        append_tail_reference_(tail, k, v, pos)
        return
    slot = min(rows[0], tail.slots - 1)
    tail.k.narrow(2, slot, 1).copy_(k)
    tail.v.narrow(2, slot, 1).copy_(v)
    tail.pos.narrow(1, slot, 1).copy_(pos[:, None])
    tail.length.add_(1)


def block_colsum(tail: Tail, q: torch.Tensor, valid: torch.Tensor, scale: float, n_rep: int) -> torch.Tensor:
    """float32 ``[B, R]``: the probabilities of q ``[B, H*n_rep, 1, d]`` over the block's valid slots (bool ``[B,
    R]``), per head in fp32, summed over the heads (0 in rows without a valid slot)."""
    keys = tail.k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else tail.k
    logits = torch.matmul(q.float(), keys.float().transpose(-1, -2))[:, :, 0] * scale  # [B, Hq, R]
    probs = torch.softmax(logits.masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=1)


def block_take(
    tail: Tail, q: torch.Tensor | None, scale: float, n_rep: int, tau: float
) -> tuple[BlockTake, torch.Tensor]:
    """Which tokens of each full tail go to ``hi`` and ``lo``, and the block's column sums (zeros unscored).

    q ``[B, H*n_rep, 1, d]`` or None (every token kept, as with tau >= 1). Eq. 6 on the column sums gives the
    count p, Eqs. 7-8 the p largest (ties to the lower slot), the last valid slot always kept
    (:func:`~zipvl_compile.runtime.kernels.select_reference.select_tokens` with min_keep 0)."""
    full = tail.length >= tail.slots
    valid = full[:, None] & (tail.pos >= 0)
    colsum = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    if q is None or tau >= 1.0:
        return BlockTake(valid, torch.zeros_like(valid)), colsum
    colsum = block_colsum(tail, q, valid, scale, n_rep)
    keep, _ = select_tokens(colsum, valid.to(torch.float32), valid, tau, 0)
    return BlockTake(valid & keep, valid & ~keep), colsum


def select_block_reference(tail: Tail, q: torch.Tensor | None, scale: float, n_rep: int, tau: float) -> BlockStaging:
    """:func:`block_take` as a :class:`BlockStaging` (the Triton kernel's contract)."""
    take, colsum = block_take(tail, q, scale, n_rep, tau)
    return BlockStaging(staging_index(take.hi), staging_index(take.lo), colsum)
