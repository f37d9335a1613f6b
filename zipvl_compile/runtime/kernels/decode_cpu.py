"""Decode attention over the packed cache on the CPU: the reference's result with far less work per step.

Same contract as :func:`zipvl_compile.runtime.kernels.decode_reference.decode_attention_reference` (its oracle):
q ``[B, H*n_rep, 1, d]``; ``hi`` / ``lo``: :class:`~zipvl_compile.runtime.layout.Segment` at ``hi_bits`` /
``lo_bits``; ``tail``: :class:`~zipvl_compile.runtime.layout.Tail`. Returns ``[B, H*n_rep, 1, d]`` in q's dtype,
computed in fp32. What it saves, against the reference:

- only slots below the largest ``fill`` (``tail.length``) of the batch are read: a host read, free on the CPU;
- query heads are grouped per KV head (``[B, H, n_rep, d]``), so keys and values are never repeated;
- codes become floats through one uint8 shift-and-mask per bit plane (no int32 temporaries), at 2 bits through
  one table lookup per byte;
- keys are dequantised by one fused multiply-add per group; values are not dequantised at all: with
  ``v = code * scale + zero`` per token, ``p @ v = (p * scale) @ code + p @ zero``;
- empty slots are masked in the scores and their (possibly NaN) value parameters zeroed, never the codes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from zipvl_compile.runtime.layout import GROUP, Segment, Tail, max_code, unpack_codes, valid_slots


def _codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[B, H, n, d*bits//8]`` -> float32 codes ``[B, H, n, d]``, fewer passes than the layout's generic
    :func:`~zipvl_compile.runtime.layout.unpack_codes`: at 4 bits one uint8 mask per bit plane and one interleaving
    copy; at 2 bits one lookup per byte in a table of its four codes (a quarter of the plane passes' cost)."""
    mask = max_code(bits)
    if bits == 8:
        return packed.float()
    if bits == 2:
        table = _byte_codes(packed.device)
        return table.index_select(0, packed.flatten().int()).view(*packed.shape[:-1], -1)
    planes = [packed & mask] + [(packed >> (j * bits)) & mask for j in range(1, 8 // bits - 1)] + [packed >> 8 - bits]
    return torch.stack(planes, dim=-1).flatten(-2).float()


@functools.cache
def _byte_codes(device: torch.device) -> torch.Tensor:
    """float32 ``[256, 4]``: the four 2-bit codes of each byte value, in the layout's channel order."""
    return unpack_codes(torch.arange(256, dtype=torch.uint8, device=device)[:, None], 2).float()


class _Part(NamedTuple):
    """One part of the cache (a segment or the tail) cut to its used slots ``n``."""

    valid: torch.Tensor  # bool [B, n]
    scores: torch.Tensor  # float32 [B, H, n_rep, n]: the grouped queries against its keys
    weigh: Callable[[torch.Tensor], torch.Tensor]  # probs float32 [B, H, n_rep, n] -> [B, H, n_rep, d]


def _segment_part(qg: torch.Tensor, seg: Segment, bits: int, n: int) -> _Part:
    batch, heads, _, d = qg.shape
    groups = slice(0, n // GROUP)
    codes = _codes(seg.k_codes[:, :, :n], bits).unflatten(2, (n // GROUP, GROUP))
    scale, zero = (p[:, :, groups, None].float() for p in (seg.k_scale, seg.k_zero))
    keys = torch.addcmul(zero, codes, scale).view(batch, heads, n, d)
    valid = valid_slots(seg.pos[:, :n], seg.fill)
    v_codes = _codes(seg.v_codes[:, :, :n], bits)
    v_scale, v_zero = (torch.where(valid[:, None, :], p[:, :, :n].float(), 0.0) for p in (seg.v_scale, seg.v_zero))

    def weigh(probs: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(probs * v_scale[:, :, None, :], v_codes)
        return out.add_(torch.matmul(probs, v_zero[..., None]))

    return _Part(valid, torch.matmul(qg, keys.mT), weigh)


def _tail_part(qg: torch.Tensor, tail: Tail, n: int) -> _Part:
    valid = valid_slots(tail.pos[:, :n], tail.length)
    values = torch.where(valid[:, None, :, None], tail.v[:, :, :n].float(), 0.0)
    return _Part(valid, torch.matmul(qg, tail.k[:, :, :n].float().mT), lambda probs: torch.matmul(probs, values))


def decode_attention_cpu(
    q: torch.Tensor, hi: Segment, lo: Segment, tail: Tail, scale: float, n_rep: int, hi_bits: int, lo_bits: int
) -> torch.Tensor:
    """Decode attention over hi + lo + tail; see the module docstring for the arguments.

    Returns [B, Hq, 1, d] in q's dtype; a row with no valid key returns zeros.
    """
    batch, hq, _, d = q.shape
    heads = tail.k.shape[1]
    if hq != heads * n_rep:
        raise ValueError(f"decode_attention: q has {hq} heads, the cache {heads} KV heads; need Hq = H*n_rep")
    qg = (q.float() * scale).reshape(batch, heads, n_rep, d)
    sources = [
        _segment_part(qg, seg, bits, n) for seg, bits in ((hi, hi_bits), (lo, lo_bits)) if (n := int(seg.fill.max()))
    ]
    if n_tail := int(tail.length.max()):
        sources.append(_tail_part(qg, tail, n_tail))
    if not sources:
        return torch.zeros_like(q)
    valid = torch.cat([s.valid for s in sources], dim=1)
    scores = torch.cat([s.scores for s in sources], dim=-1).masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # all-masked rows -> zeros
    parts = probs.split([s.valid.shape[1] for s in sources], dim=-1)
    out = sum(s.weigh(p) for s, p in zip(sources, parts, strict=True))
    return out.view(batch, hq, 1, d).to(q.dtype)
