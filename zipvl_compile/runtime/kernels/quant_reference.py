"""Plain-torch references of the KV quantiser (the oracles of :mod:`zipvl_compile.runtime.kernels.quant`).

The layout the codes and parameters are stored in is :mod:`zipvl_compile.runtime.layout`; this module owns
the arithmetic that produces them:

- Parameters (asymmetric, from a range [x_min, x_max]): ``zero = fp16(x_min)``, ``scale = fp16((x_max - x_min) *
  fp32(1 / (2^b - 1)))``, ``code = clamp(floor((x - zero) / max(scale, SCALE_FLOOR) + 0.5), 0, 2^b - 1)``
  computed in fp32 from the fp16-rounded parameters, and ``x ~ code * scale + zero``. Values: [x_min, x_max] =
  the token's min/max. Keys: per channel and group, the min/max of the valid slots; at 2 bits, the range among
  min/max shrunk about its centre by ``j * (max - min) / 32`` at each end, j in 0..``KEY_SHRINK_STEPS - 1`` (j =
  0 is plain min/max), that gives the least squared error over the group's valid slots (summed in fp64; ties to
  the smaller j): it clips the few outlying slots of a group to give the bulk finer steps (docs/method.md, the
  KV cache section, has the measured effect). The search costs ~2.7x the write time (H100, 32k tokens x 32
  heads: 3.5 ms vs 1.3 ms per segment write), so 4 and 8 bits skip it. Invalid slots get code 0; a group with no
  valid slot stores scale = zero = 0. A zero-range group stores scale 0 and decodes to its ``zero`` exactly. The
  arithmetic is spelled out (shrinks built from exact power-of-two products and plain adds, a multiplication by
  the fp32 reciprocal, a correctly rounded division, floor(y + 0.5), code * scale exact in fp32) so that the
  Triton kernels reproduce the codes bit for bit whether or not the GPU fuses a multiply-add. Magnitudes beyond
  the fp16 range are not supported (the params would overflow).
"""

from __future__ import annotations

import torch

from zipvl_compile.runtime.layout import (
    GROUP,
    Segment,
    advance_fill_,
    max_code,
    pack_codes,
    staging_index,
    unpack_codes,
    written_slots,
)

KEY_SHRINK_STEPS = 7  # 2-bit key ranges tried per group and channel: min/max shrunk by j/32 of it at each end
SCALE_FLOOR = 1e-8  # divisor floor for zero-range groups (below the smallest fp16 subnormal, 6e-8)
SEARCH_BLOCK = 1 << 20  # elements of x scored per candidate at once by the 2-bit range search


def range_params(x_min: torch.Tensor, x_max: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 min/max (x_min > x_max marks an empty group) -> float16 (scale, zero)."""
    empty = x_min > x_max
    x_min, x_max = x_min.masked_fill(empty, 0.0), x_max.masked_fill(empty, 0.0)
    return ((x_max - x_min) * (1.0 / max_code(bits))).to(torch.float16), x_min.to(torch.float16)


def range_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
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
    x_min = x.masked_fill(~ok, float("inf")).amin(3)
    x_max = x.masked_fill(~ok, float("-inf")).amax(3)
    if bits == 2:
        scale, zero = best_key_params(x.masked_fill(~ok, 0.0), ok, x_min, x_max, bits)
    else:
        scale, zero = range_params(x_min, x_max, bits)
    codes = range_codes(x, scale[:, :, :, None], zero[:, :, :, None], bits).masked_fill_(~ok, 0)
    return pack_codes(codes.flatten(2, 3), bits), scale, zero


def best_key_params(
    x: torch.Tensor, ok: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (scale, zero) ``[..., n, d]`` of the least-squared-error shrunk range (module docstring; 2 bits).

    x fp32 ``[..., n, G, d]`` (n groups), finite everywhere (its invalid slots count for nothing but must be
    finite: zeros, or copies of valid slots); ok bool broadcastable to it; x_min / x_max fp32 ``[..., n, d]`` the
    valid min/max. The KEY_SHRINK_STEPS candidates are scored together (stacked on a new leading axis, over
    blocks of groups of at most :data:`SEARCH_BLOCK` elements per candidate); the first least error wins, as a
    scan keeping strict improvements picks.
    """
    unit = torch.where(x_min <= x_max, (x_max - x_min) * (1.0 / 32.0), 0.0)
    lows, highs, delta = [x_min], [x_max], torch.zeros_like(x_min)
    for _ in range(1, KEY_SHRINK_STEPS):
        delta = delta + unit  # repeated adds, as the Triton twin builds them (not j * unit)
        lows.append(x_min + delta)
        highs.append(x_max - delta)
    scales, zeros = range_params(torch.stack(lows), torch.stack(highs), bits)  # [S, ..., n, d]
    per_group = x[..., 0, :, :].numel()
    block = max(1, SEARCH_BLOCK // per_group)
    ok = ok.expand(*ok.shape[:-3], x.shape[-3], *ok.shape[-2:])
    err = torch.cat(
        [
            _range_error(*parts, bits)
            for parts in zip(x.split(block, -3), ok.split(block, -3), scales.split(block, -2), zeros.split(block, -2))
        ],
        dim=-2,
    )
    best = err.argmin(0, keepdim=True)  # the first of equal errors
    return scales.gather(0, best)[0], zeros.gather(0, best)[0]


def _range_error(x: torch.Tensor, ok: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """fp64 ``[S, ..., d]``: the squared error over the valid slots of x ``[..., G, d]`` of each candidate's
    (scale, zero) float16 ``[S, ..., d]``.

    Codes by the reciprocal and a zero shifted by half a step, ``floor((x - (z - s/2)) * (1/s))``, so that the
    Triton twin computes the same bits without a per-element division and with nothing a GPU could fuse into a
    multiply-add (s/2 and code * s are exact); the stored codes still use the division.
    """
    s, z = scale.float()[..., None, :], zero.float()[..., None, :]
    err = torch.sub(x, z - s * 0.5).mul_(1.0 / s.clamp_min(SCALE_FLOOR)).floor_().clamp_(0, max_code(bits))
    err = err.mul_(s).add_(z).sub_(x).mul_(ok).double()
    return err.mul_(err).sum(-2)


def quantize_values_reference(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v float ``[B, H, T, d]`` -> (codes uint8 ``[B, H, T, d*bits//8]``, scale, zero float16 ``[B, H, T]``).

    Per token over the whole head dim.
    """
    x = v.float()
    scale, zero = range_params(x.amin(-1), x.amax(-1), bits)
    return pack_codes(range_codes(x, scale[..., None], zero[..., None], bits), bits), scale, zero


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
    seg: Segment, k_new: torch.Tensor, v_new: torch.Tensor, take: torch.Tensor, src_pos: torch.Tensor, bits: int
) -> None:
    """Append the taken tokens of k_new / v_new to ``seg`` (a :class:`Segment` at ``bits``), in place.

    k_new, v_new float ``[B, H, t, d]``; take bool ``[B, t]`` (which tokens go into this segment); src_pos
    int32/int64 ``[B, t]`` their positions. Row b's taken tokens, in order, land in slots ``fill[b] + 0, 1, ...``,
    quantised as one staging block (keys per channel over each group of GROUP slots, values per token); the
    rest of the last group gets pos -1 (its codes decode to anything); ``fill[b]`` advances by
    ceil(count / GROUP) * GROUP, clamped to the capacity. Slots that would land at or beyond the capacity are
    dropped (the cache sizes segments so that this never happens). Slots outside the written groups are
    untouched.

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
    for buf, staged in ((seg.k_codes, k_codes), (seg.v_codes, v_codes), (seg.v_scale, v_scale), (seg.v_zero, v_zero)):
        _place_(buf, staged, seg.fill, n_write, dim=2)
    for buf, staged in ((seg.k_scale, k_scale), (seg.k_zero, k_zero)):
        _place_(buf, staged, seg.fill // GROUP, n_write // GROUP, dim=2)
    _place_(seg.pos, pos_st, seg.fill, n_write, dim=1)
    advance_fill_(seg.fill, count, seg.capacity)
