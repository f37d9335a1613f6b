"""The packed-segment write on the CPU: the reference's bits with far less work per call.

Where a C compiler is at hand, the write is one C function (:mod:`~zipvl_compile.runtime.kernels.native`); the
torch body below serves a machine without one (and inputs the C function refuses).

Same contract as :func:`~zipvl_compile.runtime.kernels.quant_reference.write_segment_reference_` (its oracle,
bit for bit) and the same arithmetic (its ``range_params`` / ``range_codes`` / ``best_key_params``). What it
saves, against the reference:

- the staging block holds the written slots only (the largest row's count in whole groups, a host read, free on
  the CPU), not the whole input;
- its padding slots repeat the row's last taken token instead of zeros, so the key min/max and the 2-bit range
  search need no masks; the padding's codes and value parameters are zeroed afterwards (what the reference's
  zero padding quantises to);
- codes are packed through wider integer words (a few shifts and ORs over 2 or 4 codes at once) rather than
  the layout's generic int32 :func:`~zipvl_compile.runtime.layout.pack_codes` (same bytes, tested);
- the block is copied into the written slots of each row (host-known ranges), not blended into whole buffers
  (O(written) per call instead of O(capacity)).
"""

from __future__ import annotations

import sys

import torch

from zipvl_compile.runtime.kernels import native as native_kernels
from zipvl_compile.runtime.kernels.quant_reference import best_key_params, range_codes, range_params
from zipvl_compile.runtime.layout import GROUP, Segment, advance_fill_, max_code, written_slots


def write_segment_cpu_(
    seg: Segment,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    take: torch.Tensor,
    src_pos: torch.Tensor,
    bits: int,
    native: bool | None = None,
) -> None:
    """Append the taken tokens of k_new / v_new ``[B, H, t, d]`` (take bool ``[B, t]``, src_pos int ``[B, t]``)
    to ``seg`` in place; see :func:`~zipvl_compile.runtime.kernels.quant_reference.write_segment_reference_`.

    native: the C write of :mod:`~zipvl_compile.runtime.kernels.native` (None: wherever it is built and takes the
    inputs; True: required; False: the torch body below)."""
    if native:
        return native_kernels.write_segment_native_(seg, k_new, v_new, take, src_pos, bits)
    if not take.any():  # a write taking nothing changes nothing (the dense prefill's lo segment): one host read
        return
    lib = native_kernels.library() if native is None else None
    if lib is not None and native_kernels.write_refusal(seg, k_new, v_new, take, src_pos, bits) is None:
        return native_kernels.launch_write(lib, seg, k_new, v_new, take, src_pos, bits)
    batch, heads, t, d = k_new.shape
    count = take.sum(1)
    slots = int(written_slots(count).max())
    if slots == 0:
        return
    staged = torch.arange(slots, device=take.device)
    ok = staged[None, :] < count[:, None]  # [B, slots]: the taken tokens; the rest pads the last group
    want = torch.minimum(staged[None, :] + 1, count[:, None].clamp_min(1)).contiguous()
    src = torch.searchsorted(take.cumsum(1), want).clamp_max_(t - 1)  # the s-th taken token, the last beyond

    x = _tokens(k_new, src).float().unflatten(2, (slots // GROUP, GROUP))
    ok_k = ok.view(batch, 1, slots // GROUP, GROUP, 1)
    x_min, x_max = x.amin(3), x.amax(3)
    if bits == 2:
        k_scale, k_zero = best_key_params(x, ok_k, x_min, x_max, bits)
    else:
        k_scale, k_zero = range_params(x_min, x_max, bits)
    k_codes = range_codes(x, k_scale[:, :, :, None], k_zero[:, :, :, None], bits).mul_(ok_k)

    v = _tokens(v_new, src).float()
    v_scale, v_zero = range_params(v.amin(-1), v.amax(-1), bits)
    v_codes = range_codes(v, v_scale[..., None], v_zero[..., None], bits).mul_(ok[:, None, :, None])
    pad = ~ok[:, None]
    v_scale.masked_fill_(pad, 0.0)
    v_zero.masked_fill_(pad, 0.0)
    pos = src_pos.gather(1, src).to(torch.int32).masked_fill_(~ok, -1)

    k_codes, v_codes = _pack(k_codes.flatten(2, 3), bits), _pack(v_codes, bits)
    for row, (start, n) in enumerate(zip(seg.fill.tolist(), written_slots(count).tolist(), strict=True)):
        n = min(n, seg.capacity - start)  # slots at or beyond the capacity are dropped
        for buf, part in ((seg.k_codes, k_codes), (seg.v_codes, v_codes), (seg.v_scale, v_scale), (seg.v_zero, v_zero)):
            buf[row, :, start : start + n] = part[row, :, :n]
        for buf, part in ((seg.k_scale, k_scale), (seg.k_zero, k_zero)):
            buf[row, :, start // GROUP : (start + n) // GROUP] = part[row, :, : n // GROUP]
        seg.pos[row, start : start + n] = pos[row, :n]
    advance_fill_(seg.fill, count, seg.capacity)


def _tokens(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, t, d]``, src int64 ``[B, n]`` (indices into t) -> ``x[b, :, src[b]]`` as ``[B, H, n, d]``.

    Indexed token-major (one ``index_select`` of whole ``[H, d]`` rows; free of copies for the ``(B, t, H, d)``
    memory of a projection's output, one copy of x otherwise).
    """
    batch, heads, t, d = x.shape
    flat = src + torch.arange(batch, device=src.device)[:, None] * t
    rows = x.transpose(1, 2).reshape(batch * t, heads, d).index_select(0, flat.flatten())
    return rows.view(batch, -1, heads, d).transpose(1, 2)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., d]`` (values < 2^bits, last dim contiguous) -> the layout's packed bytes
    ``[..., d*bits//8]`` (:func:`~zipvl_compile.runtime.layout.pack_codes`).

    The 8 // bits codes of a byte are read as one little-endian word (code j at bit 8j) and shifted onto bit
    ``j * bits``: at 4 bits ``w | w >> 4``, at 2 bits ``u | u >> 12`` with ``u = w | w >> 6``; the low byte is
    the packed byte (the higher bits are dropped by the uint8 conversion).
    """
    max_code(bits)
    if bits == 8:
        return codes
    if sys.byteorder != "little":
        raise RuntimeError("zipvl: the CPU code packing reads little-endian words")
    if bits == 4:
        word = codes.view(torch.int16)
        return (word | (word >> 4)).to(torch.uint8)
    word = codes.view(torch.int32)
    word = word | (word >> 6)
    return (word | (word >> 12)).to(torch.uint8)
