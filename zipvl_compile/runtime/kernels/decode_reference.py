"""Plain-PyTorch decode attention over the packed cache: the oracle of the Triton kernel and the CPU path.

Same contract as :func:`zipvl_compile.runtime.kernels.decode.decode_attention`: q ``[B, H*n_rep, 1, d]``;
``hi`` / ``lo``: :class:`~zipvl_compile.runtime.layout.Segment` at ``hi_bits`` / ``lo_bits``; ``tail``:
:class:`~zipvl_compile.runtime.layout.Tail` in q's dtype. A slot is valid iff its position is >= 0 and it lies
below the segment's ``fill`` (the tail's ``length``). Returns ``[B, H*n_rep, 1, d]`` in q's dtype.
"""

from __future__ import annotations

import torch

from zipvl_compile.runtime.kernels.quant_reference import dequantize_keys_reference, dequantize_values_reference
from zipvl_compile.runtime.layout import Segment, Tail, valid_slots


def _dequant_segment(seg: Segment, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment -> fp32 keys and values [B, H, C, d] (every slot, valid or not)."""
    return (
        dequantize_keys_reference(seg.k_codes, seg.k_scale, seg.k_zero, bits, torch.float32),
        dequantize_values_reference(seg.v_codes, seg.v_scale, seg.v_zero, bits, torch.float32),
    )


def decode_attention_reference(
    q: torch.Tensor, hi: Segment, lo: Segment, tail: Tail, scale: float, n_rep: int, hi_bits: int, lo_bits: int
) -> torch.Tensor:
    """Plain-PyTorch decode attention over hi + lo + tail; see the module docstring for the arguments.

    Returns [B, Hq, 1, d] in q's dtype; a row with no valid key returns zeros.
    """
    k_hi, v_hi = _dequant_segment(hi, hi_bits)
    k_lo, v_lo = _dequant_segment(lo, lo_bits)
    k = torch.cat([k_hi, k_lo, tail.k.float()], dim=2).repeat_interleave(n_rep, dim=1)
    v = torch.cat([v_hi, v_lo, tail.v.float()], dim=2).repeat_interleave(n_rep, dim=1)
    valid = torch.cat(
        [valid_slots(hi.pos, hi.fill), valid_slots(lo.pos, lo.fill), valid_slots(tail.pos, tail.length)], dim=1
    )
    # empty slots may hold any bytes (NaN included): zero them so that 0-probability * NaN cannot leak
    k = k.masked_fill(~valid[:, None, :, None], 0.0)
    v = v.masked_fill(~valid[:, None, :, None], 0.0)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).to(q.dtype)
