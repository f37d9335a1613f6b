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


def _params(x_min: torch.Tensor, x_max: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 min/max (x_min > x_max marks an empty group) -> float16 (scale, zero)."""
    empty = x_min > x_max
    x_min, x_max = x_min.masked_fill(empty, 0.0), x_max.masked_fill(empty, 0.0)
    return ((x_max - x_min) * (1.0 / max_code(bits))).to(torch.float16), x_min.to(torch.float16)


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
    x_min = x.masked_fill(~ok, float("inf")).amin(3)
    x_max = x.masked_fill(~ok, float("-inf")).amax(3)
    scale, zero = _best_key_params(x, ok, x_min, x_max, bits) if bits == 2 else _params(x_min, x_max, bits)
    codes = _codes(x, scale[:, :, :, None], zero[:, :, :, None], bits).masked_fill_(~ok, 0)
    return pack_codes(codes.flatten(2, 3), bits), scale, zero


def _best_key_params(
    x: torch.Tensor, ok: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (scale, zero) ``[..., d]`` of the least-squared-error shrunk range (module docstring; 2 bits).

    x fp32 ``[..., G, d]``, ok bool broadcastable to it; x_min / x_max fp32 ``[..., d]`` the valid min/max.
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

    unit = torch.where(x_min <= x_max, (x_max - x_min) * (1.0 / 32.0), 0.0)
    delta = torch.zeros_like(x_min)
    scale, zero = _params(x_min, x_max, bits)
    best = (error(scale, zero), scale, zero)
    for _ in range(1, KEY_SHRINK_STEPS):
        delta = delta + unit
        scale, zero = _params(x_min + delta, x_max - delta, bits)
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
