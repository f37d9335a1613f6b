"""Quantise + pack and unpack + dequantise for the packed KV cache (plain-torch references and dispatchers).

Layout (one quantised segment of a layer; B batch, H KV heads, C slot capacity (a multiple of G), d head dim,
b bits in {2, 4, 8}):

- Codes: uint8 ``[B, H, C, d*b//8]``. Channel ``c`` of a token lives in byte ``c // (8//b)`` at bit shift
  ``(c % (8//b)) * b``, little end first (consecutive channels share a byte). Keys and values alike.
- Keys: per channel over groups of ``GROUP = 64`` consecutive slots; ``k_scale``, ``k_zero``: float16
  ``[B, H, C//G, d]``. Values: per token over the whole head dim; ``v_scale``, ``v_zero``: float16
  ``[B, H, C]``.
- Parameters (asymmetric, from a range [lo, hi]): ``zero = fp16(lo)``, ``scale = fp16((hi - lo) * fp32(1 /
  (2^b - 1)))``, ``code = clamp(floor((x - zero) / max(scale, 1e-8) + 0.5), 0, 2^b - 1)`` computed in fp32
  from the fp16-rounded parameters, and ``x ~ code * scale + zero``. Values: [lo, hi] = the token's min/max.
  Keys: per channel and group, the min/max of the valid slots; at 2 bits, the range among min/max shrunk
  about its centre by ``j * (max - min) / 32`` at each end, j in 0..``KEY_SHRINK_STEPS - 1`` (j = 0 is plain
  min/max), that gives the least squared error over the group's valid slots (summed in fp64; ties to the
  smaller j): it clips the few outlying slots of a group to give the bulk finer steps (measured on SmolLM2:
  +6.4% -> +1.8% continuation perplexity at tau = 0.975 4/2, BENCHMARKS.md). The search costs ~2.7x the
  write time (H100, 32k tokens x 32 heads: 3.5 ms vs 1.3 ms per segment write), so 4 and 8 bits skip it.
  Invalid slots get code 0; a group with no valid slot stores scale = zero = 0. A zero-range group stores
  scale 0 and decodes to its ``zero`` exactly. The arithmetic is spelled out (shrinks built from exact
  power-of-two products and plain adds, a multiplication by the fp32 reciprocal, a correctly rounded
  division, floor(y + 0.5), code * scale exact in fp32) so that the Triton kernels reproduce the codes bit for
  bit whether or not the GPU fuses a multiply-add.
  Magnitudes beyond the fp16 range are not supported (the params would overflow).
- ``pos``: int32 ``[B, C]``, the original position of each slot, -1 = empty; ``fill``: int32 ``[B]``, slots
  ``[0, fill)`` written. Writes start at a group boundary and take whole groups (see :func:`write_segment_`).

Bytes per token per KV head at d = 128 (codes + fp16 scale/zero; keys share their params over 64 tokens):

==========  ==============  ==============  =======  =================
bits        keys            values          K + V    vs bf16 (512 B)
==========  ==============  ==============  =======  =================
2           32 + 8 = 40     32 + 4 = 36     76       14.8%
4           64 + 8 = 72     64 + 4 = 68     140      27.3%
8           128 + 8 = 136   128 + 4 = 132   268      52.3%
==========  ==============  ==============  =======  =================

plus 4 B of ``pos`` per slot shared by the H heads. Key params: 2 tensors x d x 2 B / 64 tokens = 8 B.

Each public operation has a plain-torch reference (``*_reference``), a Triton twin with the same signature
in :mod:`zipvl_compile.runtime.kernels.quant` (``*_triton``) and a dispatcher without suffix that takes the
Triton path on CUDA tensors and the reference elsewhere (``use_triton`` overrides, for tests).
"""

from __future__ import annotations

from types import ModuleType

import torch

GROUP = 64  # key quantisation group: consecutive slots of a segment
KEY_SHRINK_STEPS = 7  # 2-bit key ranges tried per group and channel: min/max shrunk by j/32 of it at each end
SCALE_FLOOR = 1e-8  # divisor floor for zero-range groups (below the smallest fp16 subnormal, 6e-8)


def max_code(bits: int) -> int:
    """Largest code 2^bits - 1; checks bits in {2, 4, 8}."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    return (1 << bits) - 1


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


def _params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 min/max (lo > hi marks an empty group) -> float16 (scale, zero)."""
    empty = lo > hi
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    return ((hi - lo) * (1.0 / max_code(bits))).to(torch.float16), lo.to(torch.float16)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 x and broadcastable fp16 params -> uint8 codes (see the module docstring for the rounding)."""
    y = (x - zero.float()) / scale.float().clamp_min(SCALE_FLOOR)
    return torch.floor(y + 0.5).clamp_(0, max_code(bits)).to(torch.uint8)


def quantize_keys_reference(
    k: torch.Tensor, valid: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k float ``[B, H, T, d]`` (T a multiple of GROUP), valid bool ``[B, T]`` (shared by heads) ->
    (codes uint8 ``[B, H, T, d*bits//8]``, scale, zero float16 ``[B, H, T//GROUP, d]``).

    Per channel over each group of GROUP slots; min/max over valid slots only; invalid slots get code 0.
    """
    batch, heads, t, d = k.shape
    if t % GROUP:
        raise ValueError(f"key length {t} is not a multiple of {GROUP}")
    x = k.float().unflatten(2, (t // GROUP, GROUP))
    ok = valid.view(batch, 1, t // GROUP, GROUP, 1)
    lo = x.masked_fill(~ok, float("inf")).amin(3)
    hi = x.masked_fill(~ok, float("-inf")).amax(3)
    scale, zero = _best_key_params(x, ok, lo, hi, bits) if bits == 2 else _params(lo, hi, bits)
    codes = _codes(x, scale[:, :, :, None], zero[:, :, :, None], bits).masked_fill_(~ok, 0)
    return pack_codes(codes.flatten(2, 3), bits), scale, zero


def _best_key_params(
    x: torch.Tensor, ok: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (scale, zero) ``[..., d]`` of the least-squared-error shrunk range (module docstring; 2 bits).

    x fp32 ``[..., G, d]``, ok bool broadcastable to it; lo / hi fp32 ``[..., d]`` the valid min/max.
    """

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        # codes by the reciprocal and a zero shifted by half a step: floor((x - (z - s/2)) * (1/s)), so the
        # Triton twin computes the same bits without a per-element division and with nothing a GPU could
        # fuse into a multiply-add (s/2 and code * s are exact); the stored codes still use the division
        s, z = scale.float(), zero.float()
        inv = 1.0 / s.clamp_min(SCALE_FLOOR)
        shifted = z - s * 0.5
        codes = torch.floor((x - shifted[..., None, :]) * inv[..., None, :]).clamp_(0, max_code(bits))
        y = codes * s[..., None, :] + z[..., None, :]
        return (y - x).masked_fill(~ok, 0.0).double().square().sum(-2)

    unit = torch.where(lo <= hi, (hi - lo) * (1.0 / 32.0), 0.0)
    delta = torch.zeros_like(lo)
    scale, zero = _params(lo, hi, bits)
    best = (error(scale, zero), scale, zero)
    for _ in range(1, KEY_SHRINK_STEPS):
        delta = delta + unit
        scale, zero = _params(lo + delta, hi - delta, bits)
        err = error(scale, zero)
        better = err < best[0]
        best = tuple(torch.where(better, new, old) for new, old in zip((err, scale, zero), best, strict=True))
    return best[1], best[2]


def quantize_values_reference(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v float ``[B, H, T, d]`` -> (codes uint8 ``[B, H, T, d*bits//8]``, scale, zero float16 ``[B, H, T]``).

    Per token over the whole head dim.
    """
    x = v.float()
    scale, zero = _params(x.amin(-1), x.amax(-1), bits)
    return pack_codes(_codes(x, scale[..., None], zero[..., None], bits), bits), scale, zero


def dequantize_keys_reference(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_keys_reference`: ``[B, H, T, d]`` in ``dtype`` (computed in fp32)."""
    x = unpack_codes(codes, bits).float().unflatten(2, (scale.shape[2], GROUP))
    return (x * scale.float()[:, :, :, None] + zero.float()[:, :, :, None]).flatten(2, 3).to(dtype)


def dequantize_values_reference(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_values_reference`: ``[B, H, T, d]`` in ``dtype`` (computed in fp32)."""
    x = unpack_codes(codes, bits).float()
    return (x * scale.float()[..., None] + zero.float()[..., None]).to(dtype)


# ----------------------------------------------------------------------------------------------------
# Segment append
# ----------------------------------------------------------------------------------------------------


def staging_index(take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """take bool ``[B, t]`` -> (src int64 ``[B, tp]``, count int64 ``[B]``), tp = ceil(t / GROUP) * GROUP.

    ``src[b, s]`` is the index of the s-th taken token of row b (in order) for s < count[b], and is
    clamped to t - 1 beyond (those staging slots are padding). Computed on the device (cumsum +
    searchsorted), fixed shapes, no host sync.
    """
    batch, t = take.shape
    tp = -(-t // GROUP) * GROUP
    cum = take.to(torch.int64).cumsum(1)
    want = torch.arange(1, tp + 1, device=take.device, dtype=torch.int64).expand(batch, tp).contiguous()
    src = torch.searchsorted(cum, want).clamp_max_(t - 1)
    return src, cum[:, -1].contiguous()


def written_slots(count: torch.Tensor) -> torch.Tensor:
    """Slots taken by a write of ``count`` tokens: ceil(count / GROUP) * GROUP (same dtype)."""
    return (count + GROUP - 1) // GROUP * GROUP


def advance_fill_(seg_fill: torch.Tensor, count: torch.Tensor, capacity: int) -> None:
    """seg_fill += whole groups for ``count`` new tokens, clamped to the capacity (in place, int32)."""
    seg_fill.copy_(torch.clamp(seg_fill + written_slots(count), max=capacity))


def _place_(buf: torch.Tensor, staged: torch.Tensor, start: torch.Tensor, length: torch.Tensor, dim: int) -> None:
    """buf[b, ..., start[b] + s, ...] = staged[b, ..., s, ...] for 0 <= s < length[b] and start[b] + s within
    buf (along ``dim``); every other entry of buf is kept. Fixed shapes: a masked blend over all of buf."""
    shape = [buf.shape[0]] + [1] * (buf.dim() - 1)
    shape[dim] = buf.shape[dim]
    rel = torch.arange(buf.shape[dim], device=buf.device)[None, :] - start[:, None].to(torch.int64)
    hit = ((rel >= 0) & (rel < length[:, None])).view(shape)
    index = rel.clamp(0, staged.shape[dim] - 1).view(shape).expand(buf.shape)
    buf.copy_(torch.where(hit, staged.gather(dim, index), buf))


def write_segment_reference_(
    seg_codes_k: torch.Tensor,
    seg_scale_k: torch.Tensor,
    seg_zero_k: torch.Tensor,
    seg_codes_v: torch.Tensor,
    seg_scale_v: torch.Tensor,
    seg_zero_v: torch.Tensor,
    seg_pos: torch.Tensor,
    seg_fill: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    take: torch.Tensor,
    src_pos: torch.Tensor,
    bits: int,
) -> None:
    """Append the taken tokens of k_new / v_new to a segment, in place.

    seg_*: the segment's tensors (layout above; capacity C = seg_pos.shape[1]); seg_fill int32 ``[B]``,
    a multiple of GROUP. k_new, v_new float ``[B, H, t, d]``; take bool ``[B, t]`` (which tokens go into
    this segment); src_pos int32/int64 ``[B, t]`` their positions.
    Row b's taken tokens, in order, land in slots ``seg_fill[b] + 0, 1, ...``, quantised as one staging block
    (keys per channel over each group of GROUP slots, values per token); the rest of the last group gets
    pos -1 (its codes decode to anything); ``seg_fill[b]`` advances by ceil(count / GROUP) * GROUP, clamped
    to C. Slots that would land at or beyond C are dropped (the cache sizes C so that this never happens).
    Slots outside the written groups are untouched.

    Compositional torch: gather the taken tokens into a ``[B, H, tp, d]`` staging block, quantise it, then a
    masked blend of the whole buffers (O(C) per call: a reference, not a fast path).
    """
    batch, heads, t, d = k_new.shape
    src, count = staging_index(take)
    tp = src.shape[1]
    ok = torch.arange(tp, device=take.device)[None, :] < count[:, None]
    gather = src[:, None, :, None].expand(batch, heads, tp, d)
    dead = ~ok[:, None, :, None]
    k_st = k_new.gather(2, gather).masked_fill(dead, 0.0)
    v_st = v_new.gather(2, gather).masked_fill(dead, 0.0)
    pos_st = src_pos.gather(1, src).to(torch.int32).masked_fill(~ok, -1)
    k_codes, k_scale, k_zero = quantize_keys_reference(k_st, ok, bits)
    v_codes, v_scale, v_zero = quantize_values_reference(v_st, bits)
    n_write = written_slots(count)
    for buf, staged in ((seg_codes_k, k_codes), (seg_codes_v, v_codes), (seg_scale_v, v_scale), (seg_zero_v, v_zero)):
        _place_(buf, staged, seg_fill, n_write, dim=2)
    for buf, staged in ((seg_scale_k, k_scale), (seg_zero_k, k_zero)):
        _place_(buf, staged, seg_fill // GROUP, n_write // GROUP, dim=2)
    _place_(seg_pos, pos_st, seg_fill, n_write, dim=1)
    advance_fill_(seg_fill, count, seg_pos.shape[1])


# ----------------------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------------------


def _triton_module(x: torch.Tensor, use_triton: bool | None) -> ModuleType | None:
    """The Triton kernel module when the Triton path is chosen (default: CUDA tensors), else None.

    Imported lazily: the kernel module imports this one.
    """
    if not (x.is_cuda if use_triton is None else use_triton):
        return None
    from zipvl_compile.runtime.kernels import quant as kernels

    return kernels


def quantize_keys(
    k: torch.Tensor, valid: torch.Tensor, bits: int, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`quantize_keys_reference`."""
    kernels = _triton_module(k, use_triton)
    return (kernels.quantize_keys_triton if kernels else quantize_keys_reference)(k, valid, bits)


def quantize_values(
    v: torch.Tensor, bits: int, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`quantize_values_reference`."""
    kernels = _triton_module(v, use_triton)
    return (kernels.quantize_values_triton if kernels else quantize_values_reference)(v, bits)


def dequantize_keys(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """See :func:`dequantize_keys_reference`."""
    kernels = _triton_module(codes, use_triton)
    return (kernels.dequantize_keys_triton if kernels else dequantize_keys_reference)(codes, scale, zero, bits, dtype)


def dequantize_values(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """See :func:`dequantize_values_reference`."""
    kernels = _triton_module(codes, use_triton)
    return (kernels.dequantize_values_triton if kernels else dequantize_values_reference)(
        codes, scale, zero, bits, dtype
    )


def write_segment_(
    seg_codes_k: torch.Tensor,
    seg_scale_k: torch.Tensor,
    seg_zero_k: torch.Tensor,
    seg_codes_v: torch.Tensor,
    seg_scale_v: torch.Tensor,
    seg_zero_v: torch.Tensor,
    seg_pos: torch.Tensor,
    seg_fill: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    take: torch.Tensor,
    src_pos: torch.Tensor,
    bits: int,
    use_triton: bool | None = None,
) -> None:
    """See :func:`write_segment_reference_`."""
    kernels = _triton_module(k_new, use_triton)
    (kernels.write_segment_triton_ if kernels else write_segment_reference_)(
        seg_codes_k,
        seg_scale_k,
        seg_zero_k,
        seg_codes_v,
        seg_scale_v,
        seg_zero_v,
        seg_pos,
        seg_fill,
        k_new,
        v_new,
        take,
        src_pos,
        bits,
    )
