"""Decode attention over the packed cache on the CPU: the reference's result with far less work per step.

Where a C compiler is at hand the step is one C function (:mod:`~zipvl_compile.runtime.kernels.native`,
~5x faster than the torch body below at the CPU demo's shapes); the torch body is the path without one.

Same contract as :func:`zipvl_compile.runtime.kernels.decode_reference.decode_attention_reference` (its oracle):
q ``[B, H*n_rep, 1, d]``; ``hi`` / ``lo``: :class:`~zipvl_compile.runtime.layout.Segment` at ``hi_bits`` /
``lo_bits``; ``tail``: :class:`~zipvl_compile.runtime.layout.Tail`. Returns ``[B, H*n_rep, 1, d]`` in q's dtype,
computed in fp32. A decode step is a few dozen small tensor ops, so what it saves, against the reference, is ops
as much as arithmetic:

- only slots below the largest ``fill`` (``tail.length``) of the batch are read (a host read, free on the CPU);
  the slot-below-fill test is skipped where every row has the same fill (always at batch 1);
- the used slots of hi, lo and the tail are dequantised straight into one fp32 key block and one value block
  ``[B, H, n, d]`` (per step, never held), so the scores, the mask, the softmax and the weighted sum are one op
  each, with no concatenation or split;
- query heads are grouped per KV head (``[B, H, n_rep, d]``), so keys and values are never repeated;
- the key and value codes of a segment are unpacked together (one stack), by shifts and masks over wider
  integer words (:func:`_codes`), then turned to fp32 in one pass;
- keys are dequantised by one fused multiply-add per group against the float16 parameters (read as fp32 on the
  fly); values by a multiply and an add with their per-token parameters, one broadcast operand each (so both
  passes are vectorised);
- empty slots are masked in the scores and their value parameters zeroed (they may be NaN), never the codes;
  the tail's values are masked only where it has an empty slot below its length.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from zipvl_compile.runtime.kernels import native as native_kernels
from zipvl_compile.runtime.layout import GROUP, Segment, Tail, max_code


def _codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., d*bits//8]`` -> float32 codes ``[..., d]`` (contiguous), the layout's
    :func:`~zipvl_compile.runtime.layout.unpack_codes` in a few vectorised passes.

    The 8 // bits codes of a byte are spread onto the bytes of one wider little-endian word (code j onto byte j),
    the inverse of the CPU write's packing: at 4 bits ``(w | w << 4) & 0x0F0F`` over int16, at 2 bits
    ``u = w | w << 12``, ``(u | u << 6) & 0x03030303`` over int32; the word's bytes are then the codes.
    """
    max_code(bits)
    if bits == 8:
        return packed.float()
    if sys.byteorder != "little":
        raise RuntimeError("zipvl: the CPU code unpacking reads little-endian words")
    if bits == 4:
        word = packed.to(torch.int16)
        word.bitwise_or_(word << 4).bitwise_and_(0x0F0F)
    else:
        word = packed.to(torch.int32)
        word.bitwise_or_(word << 12)
        word.bitwise_or_(word << 6).bitwise_and_(0x03030303)
    return word.view(torch.uint8).float()


def _dequantize_(keys: torch.Tensor, values: torch.Tensor, seg: Segment, bits: int, empty: torch.Tensor) -> None:
    """Write the first n slots of ``seg`` as fp32 into keys / values ``[B, H, n, d]`` (views of the blocks);
    empty bool ``[B, n]``: slots whose values are written as zeros (their parameters may be NaN)."""
    batch, heads, n, d = keys.shape
    grouped = (batch, heads, n // GROUP, GROUP, d)
    k_codes, v_codes = _codes(torch.stack([_head(seg.k_codes, 2, n), _head(seg.v_codes, 2, n)]), bits)  # [B, H, n, d]
    k_scale, k_zero = (_head(p, 2, n // GROUP).unsqueeze(3) for p in (seg.k_scale, seg.k_zero))
    torch.addcmul(k_zero, k_codes.view(grouped), k_scale, out=keys.view(grouped))
    params = torch.stack([_head(seg.v_scale, 2, n), _head(seg.v_zero, 2, n)]).masked_fill_(empty.unsqueeze(1), 0.0)
    v_scale, v_zero = params.float().unsqueeze(-1)  # [B, H, n, 1] each
    torch.mul(v_codes, v_scale, out=values).add_(v_zero)  # two passes of one broadcast operand each: vectorised


class _Used(NamedTuple):
    """A part of the cache (a segment or the tail) with used slots: its first ``n`` slots go to ``start``."""

    pos: torch.Tensor  # int32 [B, C]
    length: torch.Tensor  # int32 [B]: its fill (a segment) or length (the tail)
    lengths: list[int]  # the same, read on the host
    n: int  # the largest length of the batch
    start: int  # offset of its slots in the key / value blocks


def _head(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """The first ``n`` entries of ``t`` along ``dim`` (``t`` itself where it has no more: a view op saved)."""
    return t if t.shape[dim] == n else t.narrow(dim, 0, n)


def _slots(block: torch.Tensor, dim: int, part: _Used) -> torch.Tensor:
    """The slots of ``part`` in ``block`` along ``dim`` (the key / value blocks, dim 2; the empty mask, dim 1)."""
    return block if block.shape[dim] == part.n else block.narrow(dim, part.start, part.n)


def _empty_slots(parts: list[_Used]) -> torch.Tensor:
    """bool ``[B, n_total]``: the used slots of the parts, in order, that hold no token (pos < 0, or at or past
    the row's fill / length, which matters only where the rows' lengths differ)."""
    pos = [_head(part.pos, 1, part.n) for part in parts]
    empty = (torch.cat(pos, 1) if len(pos) > 1 else pos[0]) < 0
    for part in parts:
        if min(part.lengths) < part.n:
            slot = torch.arange(part.n, device=empty.device)
            _slots(empty, 1, part).logical_or_(slot >= part.length[:, None])
    return empty


def decode_attention_cpu(
    q: torch.Tensor,
    hi: Segment,
    lo: Segment,
    tail: Tail,
    scale: float,
    n_rep: int,
    hi_bits: int,
    lo_bits: int,
    native: bool | None = None,
) -> torch.Tensor:
    """Decode attention over hi + lo + tail; see the module docstring for the arguments.

    native: the C kernel of :mod:`~zipvl_compile.runtime.kernels.native` (None: wherever it is built and
    takes the inputs; True: required; False: the torch body below). Returns [B, Hq, 1, d] in q's dtype; a row with
    no valid key returns zeros.
    """
    if native:
        return native_kernels.decode_attention_native(q, hi, lo, tail, scale, n_rep, hi_bits, lo_bits)
    lib = native_kernels.library() if native is None else None
    if lib is not None and native_kernels.refusal(q, hi, lo, tail, n_rep, hi_bits, lo_bits) is None:
        return native_kernels.launch(lib, q, hi, lo, tail, scale, n_rep, hi_bits, lo_bits)
    batch, hq, _, d = q.shape
    heads = tail.k.shape[1]
    if hq != heads * n_rep:
        raise ValueError(f"decode_attention: q has {hq} heads, the cache {heads} KV heads; need Hq = H*n_rep")
    parts, start = [], 0
    for pos, length in ((hi.pos, hi.fill), (lo.pos, lo.fill), (tail.pos, tail.length)):
        lengths = length.tolist()
        parts.append(_Used(pos, length, lengths, max(lengths, default=0), start))
        start += parts[-1].n
    if not start:
        return torch.zeros_like(q)
    used = [part for part in parts if part.n]
    empty = _empty_slots(used)
    keys = torch.empty(batch, heads, start, d, device=q.device)
    values = torch.empty_like(keys)
    for seg, bits, part in ((hi, hi_bits, parts[0]), (lo, lo_bits, parts[1])):
        if part.n:
            _dequantize_(_slots(keys, 2, part), _slots(values, 2, part), seg, bits, _slots(empty, 1, part))
    if n := parts[2].n:
        _slots(keys, 2, parts[2]).copy_(_head(tail.k, 2, n))
        tail_values = _slots(values, 2, parts[2]).copy_(_head(tail.v, 2, n))
        tail_empty = _slots(empty, 1, parts[2])
        if tail_empty.any():  # only where batched rows' lengths differ: skip the (slow) masked pass otherwise
            tail_values.masked_fill_(tail_empty.view(batch, 1, n, 1), 0.0)
    qg = (q.float() * scale).view(batch, heads, n_rep, d)
    scores = torch.matmul(qg, keys.mT).masked_fill_(empty.view(batch, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # all-masked rows -> zeros
    return torch.matmul(probs, values).view(batch, hq, 1, d).to(q.dtype)
