"""Bodies of the packed-KV-cache ops: prefill write, tail append, block recompression, shrink, dense view.

A layer's packed state is two :class:`~zipvl_compile.runtime.layout.Segment` s (``hi``, ``lo``) and a
:class:`~zipvl_compile.runtime.layout.Tail` (layout: :mod:`zipvl_compile.runtime.layout`). Everything is
fixed-shape and free of host syncs (except :func:`shrink`): a block is recompressed under a per-row predicate
(``tail.length == R``), the write taking no token in rows where it is false.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zipvl_compile.runtime.kernels import native, tail_reference
from zipvl_compile.runtime.kernels import tail as tail_kernels
from zipvl_compile.runtime.kernels.device import host_reads_are_free, wants_triton
from zipvl_compile.runtime.kernels.quant import write_staged_triton_
from zipvl_compile.runtime.layout import GROUP, Segment, Tail, round_up, written_slots
from zipvl_compile.runtime.quant import dequantize, write_segment_


class Bits(NamedTuple):
    """The bit widths of a layer's segments, ``hi`` (kept tokens) and ``lo`` (the others): the ``hi_bits`` /
    ``lo_bits`` options of ``zipvl.kv_write_``, ``zipvl.kv_simulate`` and ``zipvl.kv_dense_view`` (the eager path's
    view). The ops a compiled decode step runs take them flat: gathering a structure costs ~15 µs per call on the
    CPU."""

    hi_bits: int = 4
    lo_bits: int = 2


class KV(NamedTuple):
    """A prefill's keys and values, each [B, H, t, d] in the model's dtype."""

    k: torch.Tensor
    v: torch.Tensor


def write_tokens_(
    hi: Segment,
    lo: Segment,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    keep: torch.Tensor | None,
    valid: torch.Tensor | None,
    hi_bits: int,
    lo_bits: int,
) -> None:
    """Quantise tokens k/v [B, H, t, d] into the segments: kept -> ``hi``, other valid -> ``lo``.

    pos: int [B, t] token positions. keep, valid: bool [B, t] or None (None keep: every valid token is kept;
    None valid: all valid).
    """
    batch, _, t, _ = k.shape
    if valid is None:
        valid = torch.ones(batch, t, dtype=torch.bool, device=k.device)
    take_hi = valid if keep is None else valid & keep
    take_lo = valid & ~take_hi
    for seg, take in ((hi, take_hi), (lo, take_lo)):
        _assert_fits(seg, take)
    write_segment_(hi, k, v, take_hi, pos, hi_bits)
    write_segment_(lo, k, v, take_lo, pos, lo_bits)


def _assert_fits(seg: Segment, take: torch.Tensor) -> None:
    """A segment smaller than a write's worst case (one of a dense prefill's exact segments,
    :meth:`~zipvl_compile.runtime.cache.ZipVLLayer.allocate`) is checked to take no more than it holds: an assertion
    on the device (no host sync), never a write past its end. Segments of the worst case cost nothing here."""
    if round_up(take.shape[1], GROUP) <= seg.capacity:
        return
    held = seg.fill + written_slots(take.sum(1, dtype=torch.int32))
    torch._assert_async(
        (held <= seg.capacity).all(),
        "zipvl: a packed segment sized for a dense prefill was given more tokens than it holds "
        "(the cache was built with other selection options than the prefill ran with)",
    )


def append_tail_(
    tail: Tail, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, use_triton: bool | None = None
) -> None:
    """Append one decode token per row (k/v [B, H, 1, d], pos int [B]) at slot ``tail.length``
    (:func:`~zipvl_compile.runtime.kernels.tail_reference.append_tail_reference_`; one Triton launch on CUDA;
    ``use_triton`` as in :mod:`~zipvl_compile.runtime.kernels.device`)."""
    if wants_triton(tail.k, use_triton):
        impl = tail_kernels.append_tail_triton_
    elif host_reads_are_free(tail.k):
        impl = tail_reference.append_tail_cpu_  # same bits, fewer ops per step
    else:
        impl = tail_reference.append_tail_reference_
    impl(tail, k, v, pos)


def recompress_(
    hi: Segment,
    lo: Segment,
    tail: Tail,
    q: torch.Tensor | None,
    scale: float,
    n_rep: int,
    tau: float,
    hi_bits: int,
    lo_bits: int,
    use_triton: bool | None = None,
) -> None:
    """Quantise a full tail block (rows with ``tail.length == R``) and empty it; other rows are untouched.

    With a query ``q`` [B, Hq, 1, d] the block is scored and split into the kept tokens (``hi``) and the rest
    (``lo``); without one (or tau >= 1) every token of the block is kept
    (:mod:`~zipvl_compile.runtime.kernels.tail_reference`). On CUDA the selection is one Triton launch and the
    segment writes return at once in rows with nothing to take, so a step that recompresses nothing does
    next to no work; on the CPU such a step returns before any (the predicate is read on the host, which syncs
    nothing there). ``use_triton`` as in :mod:`~zipvl_compile.runtime.kernels.device`.
    """
    triton = wants_triton(tail.k, use_triton) and tail.slots <= tail_kernels.MAX_SLOTS
    if not triton and host_reads_are_free(tail.k) and max(tail.length.tolist(), default=0) < tail.slots:
        return  # nothing to recompress: one host read, no device op
    full = tail.length >= tail.slots
    if triton:
        staged = tail_kernels.select_block_triton(tail, q, scale, n_rep, tau)
        write_staged_triton_(hi, tail.k, tail.v, staged.hi, tail.pos, hi_bits)
        write_staged_triton_(lo, tail.k, tail.v, staged.lo, tail.pos, lo_bits)
    else:
        take, _ = tail_reference.block_take(tail, q, scale, n_rep, tau)
        write_segment_(hi, tail.k, tail.v, take.hi, tail.pos, hi_bits)
        write_segment_(lo, tail.k, tail.v, take.lo, tail.pos, lo_bits)
    tail.pos.masked_fill_(full[:, None], -1)
    tail.length.masked_fill_(full, 0)


def shrunk_slots(seg: Segment, reserve: int) -> int:
    """Slots a shrunk copy of ``seg`` keeps: those its rows filled (the largest ``fill``) plus ``reserve``, at
    most its capacity. Reads ``fill`` on the host (one sync): a prefill's kept set is known only on the device."""
    return min(int(seg.fill.max()) + reserve, seg.capacity)


def shrink(seg: Segment, reserve: int) -> Segment:
    """A copy of ``seg`` cut to :func:`shrunk_slots` (``reserve`` a multiple of GROUP, so the cut falls on a key
    group boundary): :meth:`Segment.cut`'s tensors, filled by :func:`copy_slots_`; a segment that keeps every
    slot (a dense prefill's ``hi``) is cloned whole (a third of the host time)."""
    slots = shrunk_slots(seg, reserve)
    if slots == seg.capacity:
        return Segment(*(t.clone() for t in seg))
    cut = Segment(*(t.new_empty(shape) for t, shape in zip(seg, seg.cut_shapes(slots), strict=True)))
    copy_slots_(cut, seg, slots)
    return cut


def copy_slots_(into: Segment, seg: Segment, slots: int) -> None:
    """Copy the first ``slots`` slots of ``seg`` (a multiple of GROUP, within both capacities) and its ``fill`` into
    ``into``, a segment of the same batch, heads, head dim and bits; ``into``'s other slots are left as they are.
    One C call on the CPU where the library is built (:func:`~zipvl_compile.runtime.kernels.native.copy_slots_native_`),
    else a copy per field (its oracle). No slots (an empty segment and no reserve): the fill only."""
    if slots == 0:
        into.fill.copy_(seg.fill)
        return
    lib = native.library() if seg.pos.is_cpu else None
    if lib is not None and native.copy_refusal(into, seg, slots) is None:
        native.launch_copy(lib, into, seg, slots)
        return
    for target, tensor, shape in zip(into, seg, seg.cut_shapes(slots), strict=True):
        window = tuple(map(slice, shape))
        target[window].copy_(tensor[window])


def dense_view(
    hi: Segment, lo: Segment, tail: Tail, length: int, hi_bits: int, lo_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised K/V ``[B, H, length, d]`` in position order (zeros where nothing is cached).

    The eager path's view of the cache: HF's attention and masks then work as with a static cache. A
    compiled decode graph replaces the attention reading it by ``decode_attention`` on the packed buffers.
    """
    batch, heads, _, d = tail.k.shape
    k_out = tail.k.new_zeros(batch, heads, length + 1, d)
    v_out = torch.zeros_like(k_out)
    sources = [
        (*_dequantized(hi, hi_bits, tail.k.dtype), hi.pos, hi.fill),
        (*_dequantized(lo, lo_bits, tail.k.dtype), lo.pos, lo.fill),
        (tail.k, tail.v, tail.pos, tail.length),
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
        dequantize(seg.k_codes, seg.k_scale, seg.k_zero, bits, dtype, keys=True),
        dequantize(seg.v_codes, seg.v_scale, seg.v_zero, bits, dtype, keys=False),
    )


def simulate(
    k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, valid: torch.Tensor | None, hi_bits: int, lo_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k/v [B, H, t, d] as the packed cache would return them after the prefill write (kv_mode="simulate"):
    quantised and dequantised with the same segments, groups and parameters, in position order.
    Tokens that are not valid (padding) come back as zeros."""
    batch, heads, t, d = k.shape
    cap = round_up(t, GROUP)
    hi = Segment.empty(batch, heads, cap, d, hi_bits, k.device)
    lo = Segment.empty(batch, heads, cap, d, lo_bits, k.device)
    pos = torch.arange(t, device=k.device).expand(batch, t)
    write_tokens_(hi, lo, k, v, pos, keep, valid, hi_bits, lo_bits)
    return dense_view(hi, lo, Tail.empty(batch, heads, 1, d, k.dtype, k.device), t, hi_bits, lo_bits)
