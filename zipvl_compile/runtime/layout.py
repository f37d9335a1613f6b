"""The packed KV cache's data layout: one place that defines it (kernels, references, ops and the cache import it).

A full-attention layer of a :class:`~zipvl_compile.runtime.cache.ZipVLCache` holds two quantised
:class:`Segment` s, ``hi`` (the prefill's kept tokens at ``hi_bits``) and ``lo`` (the other tokens at
``lo_bits``), and a model-dtype :class:`Tail` of decode tokens not yet quantised. Notation: B batch, H KV
heads, C a segment's slot capacity (a multiple of :data:`GROUP`), d head dim, b bits in {2, 4, 8}, R the tail's
slots (the recompression interval).

- Codes: uint8 ``[B, H, C, d*b//8]``. Channel ``c`` of a token lives in byte ``c // (8//b)`` at bit shift
  ``(c % (8//b)) * b``, little end first (consecutive channels share a byte). Keys and values alike
  (:func:`pack_codes` / :func:`unpack_codes`).
- Keys: per channel over groups of ``GROUP = 64`` consecutive slots; ``k_scale``, ``k_zero``: float16
  ``[B, H, C//GROUP, d]``. Values: per token over the whole head dim; ``v_scale``, ``v_zero``: float16
  ``[B, H, C]``. A value decodes as ``code * scale + zero`` (the parameter arithmetic:
  :mod:`zipvl_compile.runtime.kernels.quant_reference`).
- ``pos``: int32 ``[B, C]``, the original position of each slot, -1 = empty; ``fill``: int32 ``[B]``, slots
  ``[0, fill)`` written. A write starts at a group boundary and takes whole groups (:func:`staging_index`,
  :func:`advance_fill_`), so a group's key parameters never mix two writes.

Bytes per token per KV head at d = 128 (codes + fp16 scale/zero; keys share their params over 64 tokens):

====  ============  ============  =====  ===============
bits  keys          values        K + V  vs bf16 (512 B)
====  ============  ============  =====  ===============
2     32 + 8 = 40   32 + 4 = 36   76     14.8%
4     64 + 8 = 72   64 + 4 = 68   140    27.3%
8     128 + 8 = 136  128 + 4 = 132  268  52.3%
====  ============  ============  =====  ===============

plus 4 B of ``pos`` per slot shared by the H heads.

The op schemas take ``Tensor[]``: a structure crosses an op boundary as ``list(seg)`` and is rebuilt with
``Segment(*tensors)`` inside the op (NamedTuples are pytree nodes, so they also cross graph boundaries).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

GROUP = 64  # key quantisation group: consecutive slots of a segment
QUANT_BITS = (2, 4, 8)  # bit widths a segment stores (16 bits = an unquantised static layer instead)


def max_code(bits: int) -> int:
    """Largest code 2^bits - 1; checks bits in :data:`QUANT_BITS`."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    return (1 << bits) - 1


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= x."""
    return -(-x // multiple) * multiple


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., d]`` (values < 2^bits) -> uint8 ``[..., d*bits//8]`` in the layout's bit order."""
    max_code(bits)
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (codes.to(torch.int32).unflatten(-1, (-1, per)) << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., nb]`` -> uint8 codes ``[..., nb * 8 // bits]``: the inverse of :func:`pack_codes`."""
    mask = max_code(bits)
    shifts = torch.arange(8 // bits, device=packed.device, dtype=torch.int32) * bits
    return ((packed.to(torch.int32)[..., None] >> shifts) & mask).flatten(-2).to(torch.uint8)


class Segment(NamedTuple):
    """One quantised segment of a layer's cache (shapes in the module docstring; C = :attr:`capacity`).

    k_codes, v_codes: uint8 [B, H, C, d*b//8]. k_scale, k_zero: float16 [B, H, C//GROUP, d].
    v_scale, v_zero: float16 [B, H, C]. pos: int32 [B, C] (-1 = empty). fill: int32 [B].
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    pos: torch.Tensor
    fill: torch.Tensor

    @staticmethod
    def dtypes() -> tuple[torch.dtype, ...]:
        """The fields' dtypes, in field order."""
        return (
            torch.uint8,
            torch.float16,
            torch.float16,
            torch.uint8,
            torch.float16,
            torch.float16,
            torch.int32,
            torch.int32,
        )

    @staticmethod
    def shapes(batch: int, heads: int, capacity: int, d: int, bits: int) -> tuple[tuple[int, ...], ...]:
        """The fields' shapes, in field order, for ``capacity`` slots (a multiple of GROUP) at ``bits``."""
        codes, groups, tokens = (
            (batch, heads, capacity, d * bits // 8),
            (batch, heads, capacity // GROUP, d),
            (batch, heads, capacity),
        )
        return codes, groups, groups, codes, tokens, tokens, (batch, capacity), (batch,)

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, d: int, bits: int, device: torch.device) -> Segment:
        """A segment with every slot empty (pos -1, fill 0); ``capacity`` a multiple of GROUP."""
        if capacity % GROUP:
            raise ValueError(f"segment capacity {capacity} is not a multiple of {GROUP}")
        max_code(bits)
        shapes, dtypes = cls.shapes(batch, heads, capacity, d, bits), cls.dtypes()
        seg = cls(*(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in zip(shapes, dtypes)))
        seg.pos.fill_(-1)
        return seg

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    def cut_shapes(self, slots: int | torch.SymInt) -> Segment:
        """The shape of each tensor of this segment cut to its first ``slots`` slots (a multiple of GROUP):
        the key scale/zero count groups, ``fill`` has no slot axis."""

        def cut(t: torch.Tensor, dim: int, size: int | torch.SymInt) -> list:
            shape = list(t.shape)
            shape[dim] = size
            return shape

        return Segment(
            k_codes=cut(self.k_codes, 2, slots),
            k_scale=cut(self.k_scale, 2, slots // GROUP),
            k_zero=cut(self.k_zero, 2, slots // GROUP),
            v_codes=cut(self.v_codes, 2, slots),
            v_scale=cut(self.v_scale, 2, slots),
            v_zero=cut(self.v_zero, 2, slots),
            pos=cut(self.pos, 1, slots),
            fill=list(self.fill.shape),
        )

    def cut(self, slots: int) -> Segment:
        """A copy holding the first ``slots`` slots (a multiple of GROUP, at most the capacity)."""
        return Segment(*(t[tuple(map(slice, shape))].clone() for t, shape in zip(self, self.cut_shapes(slots))))


class Tail(NamedTuple):
    """A layer's decode tokens not yet quantised (model dtype), R slots per row.

    k, v: [B, H, R, d] in the model's dtype. pos: int32 [B, R] (-1 = empty). length: int32 [B], slots in use.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    length: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, slots: int, d: int, dtype: torch.dtype, device: torch.device) -> Tail:
        return cls(
            k=torch.zeros(batch, heads, slots, d, dtype=dtype, device=device),
            v=torch.zeros(batch, heads, slots, d, dtype=dtype, device=device),
            pos=torch.full((batch, slots), -1, dtype=torch.int32, device=device),
            length=torch.zeros(batch, dtype=torch.int32, device=device),
        )

    @property
    def slots(self) -> int:
        return self.pos.shape[1]


def clear_(part: Segment | Tail) -> None:
    """Empty every slot of a segment or tail in place: the state :meth:`Segment.empty` / :meth:`Tail.empty`
    allocate (zeros, pos -1), in the same tensors."""
    for tensor in part:
        tensor.zero_()
    part.pos.fill_(-1)


def nbytes(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> int:
    """Bytes held by ``tensors`` (a :class:`Segment`, a :class:`Tail` or any sequence of tensors)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def valid_slots(pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """pos int ``[B, C]``, length (a segment's ``fill`` or the tail's ``length``) int ``[B]`` -> bool ``[B, C]``:
    the slots that hold a token, i.e. pos >= 0 and slot < length."""
    slot = torch.arange(pos.shape[1], device=pos.device)
    return (pos >= 0) & (slot[None, :] < length[:, None])


class Staging(NamedTuple):
    """Which tokens a segment write takes, in order: ``src`` int64 ``[B, tp]`` (tp a multiple of :data:`GROUP`),
    ``src[b, s]`` the index of row b's s-th taken token for s < ``count[b]`` (int64 ``[B]``), t - 1 beyond (padding
    staging slots: their rows are masked)."""

    src: torch.Tensor
    count: torch.Tensor


def staging_index(take: torch.Tensor) -> Staging:
    """take bool ``[B, t]`` -> its :class:`Staging`, tp = ceil(t / GROUP) * GROUP. Computed on the device (cumsum +
    searchsorted), fixed shapes, no host sync."""
    batch, t = take.shape
    tp = round_up(t, GROUP)
    cum = take.to(torch.int64).cumsum(1)
    want = torch.arange(1, tp + 1, device=take.device, dtype=torch.int64).expand(batch, tp).contiguous()
    src = torch.searchsorted(cum, want).clamp_max_(t - 1)
    return Staging(src, cum[:, -1].contiguous())


def written_slots(count: torch.Tensor) -> torch.Tensor:
    """Slots taken by a write of ``count`` tokens: ceil(count / GROUP) * GROUP (same dtype)."""
    return (count + GROUP - 1) // GROUP * GROUP


def advance_fill_(fill: torch.Tensor, count: torch.Tensor, capacity: int) -> None:
    """fill += whole groups for ``count`` new tokens, clamped to the capacity (in place, int32)."""
    fill.copy_(torch.clamp(fill + written_slots(count), max=capacity))
