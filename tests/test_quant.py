"""Quantise + pack / unpack + dequantise of the packed KV cache: references, Triton twins, segment append.

Data: fresh Gaussian keys with a few outlier channels (x20) and values with a few outlier tokens (x20).
Error bounds are derived from each group's true min/max, independently of the params under test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from zipvl_compile.runtime import layout as L
from zipvl_compile.runtime import quant as Q
from zipvl_compile.runtime.kernels import quant as K
from zipvl_compile.runtime.kernels import quant_cpu as C
from zipvl_compile.runtime.kernels import quant_reference as R
from zipvl_compile.runtime.layout import Segment

G = L.GROUP
BITS = (2, 4, 8)
FP16_EPS = 2.0**-11  # relative rounding of a float16 parameter


def _keys(
    gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> torch.Tensor:
    """Gaussian [B, H, T, d] with 3 outlier channels (x20) per head and an offset per channel."""
    x = torch.randn(shape, generator=gen) + torch.randn(shape[:2] + (1, shape[3]), generator=gen)
    for h in range(shape[1]):
        x[:, h, :, torch.randperm(shape[3], generator=gen)[:3]] *= 20.0
    return x.to(device=device, dtype=dtype)


def _values(
    gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> torch.Tensor:
    """Gaussian [B, H, T, d] with 5 outlier tokens (x20)."""
    x = torch.randn(shape, generator=gen)
    x[:, :, torch.randperm(shape[2], generator=gen)[:5]] *= 20.0
    return x.to(device=device, dtype=dtype)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a [B, H, T, d] view of a [B, T, H, d] tensor (as after an HF projection)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _bound(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest |x - deq(q(x))| for x in [lo, hi]: half a step plus the fp16 rounding of zero and scale."""
    step = (hi - lo) / (2**bits - 1)
    return step / 2 * (1 + 2 * FP16_EPS) + FP16_EPS * (lo.abs() + (hi - lo)) + 1e-6 * (lo.abs() + hi.abs())


def _key_bound(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest key error: :func:`_bound`, at 2 bits plus the clip of a range shrunk by (KEY_SHRINK_STEPS - 1) / 32
    of it."""
    return _bound(lo, hi, bits) + (R.KEY_SHRINK_STEPS - 1) / 32 * (hi - lo) * (bits == 2)


def _minmax_dequant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """x quantised with plain min/max params (fp16-rounded as the cache stores them) and dequantised."""
    scale = ((hi - lo) / (2**bits - 1)).half().float()
    zero = lo.half().float()
    codes = torch.floor((x - zero) / scale.clamp_min(R.SCALE_FLOOR) + 0.5).clamp(0, 2**bits - 1)
    return codes * scale + zero


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN poison included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 128), generator=gen, dtype=torch.uint8)
    packed = L.pack_codes(codes, bits)
    assert packed.shape == (3, 5, 128 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(L.unpack_codes(packed, bits), codes)


def test_pack_bit_order() -> None:
    """Channel c in byte c // (8//b) at shift (c % (8//b)) * b, little end first."""
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 0, 1], dtype=torch.uint8)
    assert L.pack_codes(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4, 3 | 3 << 2 | 1 << 6]
    assert L.pack_codes(torch.tensor([5, 12], dtype=torch.uint8), 4).tolist() == [5 | 12 << 4]
    assert L.pack_codes(torch.tensor([200, 7], dtype=torch.uint8), 8).tolist() == [200, 7]


def test_round_trip_error() -> None:
    """Per element within half a step (+ fp16 slack); relative Frobenius error small and ordered by bits."""
    gen = torch.Generator().manual_seed(1)
    shape = (2, 2, 256, 64)
    k, v = _keys(gen, shape), _values(gen, shape)
    valid = torch.rand(2, 256, generator=gen) > 0.25
    kg, ok = k.unflatten(2, (4, G)), valid.view(2, 1, 4, G, 1)
    k_lo = kg.masked_fill(~ok, float("inf")).amin(3, keepdim=True)
    k_hi = kg.masked_fill(~ok, float("-inf")).amax(3, keepdim=True)
    v_lo, v_hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    rel = {}
    for bits in BITS:
        k_hat = Q.dequantize(*Q.quantize_keys(k, valid, bits), bits, torch.float32, keys=True).unflatten(2, (4, G))
        v_hat = Q.dequantize(*Q.quantize_values(v, bits), bits, torch.float32, keys=False)
        k_err = ((kg - k_hat).abs() - _key_bound(k_lo, k_hi, bits)).masked_fill(~ok, float("-inf"))
        assert k_err.max() <= 0, (bits, k_err.max())
        # ... and per group and channel never more squared error than plain min/max params would give
        minmax = _minmax_dequant(kg, k_lo, k_hi, bits)
        sq = lambda y: ((kg - y) * ok).double().square().sum(3)  # noqa: E731
        assert (sq(k_hat) <= sq(minmax) * (1 + 1e-9)).all(), bits
        if bits == 2:
            assert sq(k_hat).sum() < 0.9 * sq(minmax).sum(), "clipping should pay off at 2 bits"
        assert ((v - v_hat).abs() - _bound(v_lo, v_hi, bits)).max() <= 0, bits
        k_rel = torch.linalg.norm((kg - k_hat) * ok) / torch.linalg.norm(kg * ok)
        rel[bits] = (k_rel.item(), (torch.linalg.norm(v - v_hat) / torch.linalg.norm(v)).item())
    limits = {2: (0.35, 0.5), 4: (0.07, 0.1), 8: (0.0045, 0.006)}  # (keys, values)
    for bits in BITS:
        assert all(r < lim for r, lim in zip(rel[bits], limits[bits], strict=True)), rel
    assert all(rel[8][i] < rel[4][i] < rel[2][i] for i in range(2)), rel


@pytest.mark.parametrize("use_triton", [False, True])
def test_two_bit_key_range_search(use_triton: bool) -> None:
    """2-bit key params are those of one candidate range (min/max shrunk by j/32 of it at each end, j <
    KEY_SHRINK_STEPS, built as the module documents), and some groups do clip (j > 0)."""
    gen = torch.Generator().manual_seed(8)
    k = _keys(gen, (1, 2, 128, 32))
    valid = torch.rand(1, 128, generator=gen) > 0.2
    _, scale, zero = Q.quantize_keys(k, valid, 2, use_triton=use_triton)
    kg, ok = k.unflatten(2, (2, G)), valid.view(1, 1, 2, G, 1)
    lo = kg.masked_fill(~ok, float("inf")).amin(3)
    hi = kg.masked_fill(~ok, float("-inf")).amax(3)
    chosen, delta = torch.full(lo.shape, -1), torch.zeros_like(lo)
    for j in range(R.KEY_SHRINK_STEPS):
        delta = delta + (hi - lo) / 32 if j else delta
        low, high = lo + delta, hi - delta
        hit = (zero == low.half()) & (scale == ((high - low) * (1 / 3)).half()) & (chosen < 0)
        chosen[hit] = j
    assert (chosen >= 0).all()
    assert (chosen > 0).any()


CASES = [((2, 2, 128, 64), False), ((1, 3, 64, 80), True)]  # (shape, strided input); d = 80 pads to 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape,strided", CASES)
def test_triton_matches_reference(shape: tuple[int, ...], strided: bool, bits: int, dtype: torch.dtype) -> None:
    """Triton codes and params bit-identical to the reference's (no tie tolerance); dequantisation close."""
    gen = torch.Generator().manual_seed(bits + 10 * len(shape))
    k, v = _keys(gen, shape, dtype), _values(gen, shape, dtype)
    if strided:
        k, v = _strided(k), _strided(v)
    valid = torch.rand(shape[0], shape[2], generator=gen) > 0.3
    valid[0, :G] = False  # one whole group without a valid slot
    for ref, tri in (
        (R.quantize_keys_reference(k, valid, bits), K.quantize_keys_triton(k, valid, bits)),
        (R.quantize_values_reference(v, bits), K.quantize_values_triton(v, bits)),
    ):
        for a, b in zip(ref, tri, strict=True):
            assert _same_bits(a, b)
    k_q, v_q = R.quantize_keys_reference(k, valid, bits), R.quantize_values_reference(v, bits)
    for out_dtype in (torch.float32, torch.float16):
        torch.testing.assert_close(
            K.dequantize_keys_triton(*k_q, bits, out_dtype),
            R.dequantize_keys_reference(*k_q, bits, out_dtype),
            rtol=1e-6,
            atol=1e-6,
        )
        torch.testing.assert_close(
            K.dequantize_values_triton(*v_q, bits, out_dtype),
            R.dequantize_values_reference(*v_q, bits, out_dtype),
            rtol=1e-6,
            atol=1e-6,
        )


@pytest.mark.parametrize("use_triton", [False, True])
def test_invalid_slots_and_constant_groups(use_triton: bool) -> None:
    """Invalid slots never move a group's min/max and get code 0; empty and constant groups store scale 0
    and decode to their zero exactly."""
    gen = torch.Generator().manual_seed(3)
    k = _keys(gen, (2, 2, 192, 64))
    valid = torch.rand(2, 192, generator=gen) > 0.5
    valid[1, 64:128] = False  # an empty group
    bits = 4
    codes, scale, zero = Q.quantize_keys(k, valid, bits, use_triton=use_triton)
    poisoned = k.masked_fill(~valid[:, None, :, None], 1e4)
    poisoned[0, 0, :, 0].masked_fill_(~valid[0], -1e4)
    p_codes, p_scale, p_zero = Q.quantize_keys(poisoned, valid, bits, use_triton=use_triton)
    assert torch.equal(scale, p_scale) and torch.equal(zero, p_zero)
    slot_ok = valid[:, None].expand(2, 2, 192)
    assert torch.equal(L.unpack_codes(codes, bits)[slot_ok], L.unpack_codes(p_codes, bits)[slot_ok])
    assert not L.unpack_codes(p_codes, bits)[~slot_ok].any()
    ok = valid.view(2, 1, 3, G, 1)
    kg = k.unflatten(2, (3, G))
    lo = kg.masked_fill(~ok, float("inf")).amin(3)
    hi = kg.masked_fill(~ok, float("-inf")).amax(3)
    empty = ~ok.any(3).expand_as(lo)
    assert torch.equal(zero[~empty], lo[~empty].half())
    assert torch.equal(scale[~empty], ((hi - lo)[~empty] * (1 / 15)).half())
    assert not scale[empty].any() and not zero[empty].any() and empty.sum() == 2 * 64

    const = k.clone()
    const[:, :, :G, 5] = 0.75  # exactly representable in fp16
    const[:, :, G : 2 * G, :] = -3.5
    c_codes, c_scale, c_zero = Q.quantize_keys(const, torch.ones_like(valid), bits, use_triton=use_triton)
    assert not c_scale[:, :, 0, 5].any() and not c_scale[:, :, 1].any()
    deq = Q.dequantize(c_codes, c_scale, c_zero, bits, torch.float32, keys=True, use_triton=use_triton)
    assert torch.equal(deq[:, :, :G, 5], const[:, :, :G, 5])
    assert torch.equal(deq[:, :, G : 2 * G], const[:, :, G : 2 * G])
    v = _values(gen, (1, 2, 64, 32))
    v[0, 1, 7] = -1.25
    v_q = Q.quantize_values(v, bits, use_triton=use_triton)
    assert v_q[1][0, 1, 7] == 0
    v_hat = Q.dequantize(*v_q, bits, torch.float32, keys=False, use_triton=use_triton)
    assert torch.equal(v_hat[0, 1, 7], v[0, 1, 7])


# ----------------------------------------------------------------------------------------------------
# write_segment_
# ----------------------------------------------------------------------------------------------------


def _segment(
    gen: torch.Generator, batch: int, heads: int, capacity: int, d: int, bits: int, fill: list[int], device: str = "cpu"
) -> list[torch.Tensor]:
    """Poisoned segment buffers (random codes, NaN params, random pos) in write_segment_ argument order."""
    nb = d * bits // 8
    bufs = [
        torch.randint(0, 256, (batch, heads, capacity, nb), generator=gen, dtype=torch.uint8),
        torch.full((batch, heads, capacity // G, d), float("nan"), dtype=torch.float16),
        torch.full((batch, heads, capacity // G, d), float("nan"), dtype=torch.float16),
        torch.randint(0, 256, (batch, heads, capacity, nb), generator=gen, dtype=torch.uint8),
        torch.full((batch, heads, capacity), float("nan"), dtype=torch.float16),
        torch.full((batch, heads, capacity), float("nan"), dtype=torch.float16),
        torch.randint(1000, 2000, (batch, capacity), generator=gen, dtype=torch.int32),
        torch.tensor(fill, dtype=torch.int32),
    ]
    return [b.to(device) for b in bufs]


def _write(
    bufs: list[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    take: torch.Tensor,
    src_pos: torch.Tensor,
    bits: int,
    use_triton: bool,
) -> list[torch.Tensor]:
    """write_segment_ on clones of bufs; returns the new buffers."""
    out = [b.clone() for b in bufs]
    Q.write_segment_(Segment(*out), k, v, take, src_pos, bits, use_triton=use_triton)
    return out


SLOT_AXES = ((2, 1), (2, G), (2, G), (2, 1), (2, 1), (2, 1), (1, 1))  # (slot dim, slots per index) per buffer


def _outside(buf: torch.Tensor, dim: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    return buf.narrow(dim, 0, lo), buf.narrow(dim, hi, buf.shape[dim] - hi)


def _check_write(
    before: list[torch.Tensor],
    after: list[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    take: torch.Tensor,
    src_pos: torch.Tensor,
    bits: int,
) -> None:
    """Independent check of one append: per row, the taken tokens quantised as one block at the old fill,
    pos -1 on the padding slots, fill advanced by whole groups (clamped), everything else untouched."""
    capacity = before[6].shape[1]
    for b in range(take.shape[0]):
        idx = take[b].nonzero()[:, 0]
        n, start = len(idx), int(before[7][b])
        n_slots = -(-n // G) * G
        stop = min(start + n_slots, capacity)
        assert int(after[7][b]) == stop
        for (dim, unit), old, new in zip(SLOT_AXES, before[:7], after[:7], strict=True):
            for x, y in zip(
                _outside(old[b : b + 1], dim, start // unit, stop // unit),
                _outside(new[b : b + 1], dim, start // unit, stop // unit),
                strict=True,
            ):
                assert _same_bits(x, y)
        expect_pos = torch.full((n_slots,), -1, dtype=torch.int32, device=take.device)
        expect_pos[:n] = src_pos[b, idx].to(torch.int32)
        assert torch.equal(after[6][b, start:stop], expect_pos[: stop - start])
        if n == 0:
            continue
        k_st = torch.cat([k[b : b + 1, :, idx], k.new_zeros(1, k.shape[1], n_slots - n, k.shape[3])], dim=2)
        v_st = torch.cat([v[b : b + 1, :, idx], v.new_zeros(1, v.shape[1], n_slots - n, v.shape[3])], dim=2)
        ok = (torch.arange(n_slots, device=take.device) < n)[None]
        expect = R.quantize_keys_reference(k_st, ok, bits) + R.quantize_values_reference(v_st, bits)
        for (_, unit), new, staged in zip(SLOT_AXES[:6], after[:6], expect, strict=True):
            m = (stop - start) // unit
            assert torch.equal(new[b, :, start // unit : stop // unit], staged[0, :, :m])


def _take(gen: torch.Generator, t: int, fractions: list[float]) -> torch.Tensor:
    """bool [len(fractions), t]: row r takes about fractions[r] of the tokens at random."""
    return torch.stack([torch.rand(t, generator=gen) < f for f in fractions])


@pytest.mark.parametrize("bits", BITS)
def test_write_segment(bits: int) -> None:
    """Batch 2, three appends with different take patterns (one empty, one overflowing the capacity);
    reference and Triton agree bit for bit, and both pass the independent check."""
    gen = torch.Generator().manual_seed(20 + bits)
    batch, heads, d, capacity = 2, 2, 64, 256
    state = _segment(gen, batch, heads, capacity, d, bits, fill=[0, 64])
    writes = [(100, [0.7, 0.3]), (40, [0.0, 1.0]), (150, [0.9, 0.5])]  # the last one overflows row 0
    for step, (t, fractions) in enumerate(writes):
        k = _keys(gen, (batch, heads, t, d), torch.float16 if step == 1 else torch.float32)
        k = _strided(k) if step == 2 else k
        v = _values(gen, (batch, heads, t, d), k.dtype)
        take = _take(gen, t, fractions)
        src_pos = torch.randperm(4 * t, generator=gen)[: 2 * t].view(2, t)
        src_pos = src_pos.to(torch.int64 if step else torch.int32)
        ref = _write(state, k, v, take, src_pos, bits, use_triton=False)
        tri = _write(state, k, v, take, src_pos, bits, use_triton=True)
        for a, b in zip(ref, tri, strict=True):
            assert _same_bits(a, b)
        _check_write(state, ref, k, v, take, src_pos, bits)
        state = ref
    assert state[7].tolist() == [256, 256]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("native", [None, False])
def test_cpu_write_matches_reference(bits: int, native: bool | None) -> None:
    """The CPU path of write_segment_ (staging cut to the written slots, padding by repeated tokens, word
    packing, per-row copies) writes the reference's bytes: batch 3, fills at, inside and past the capacity's
    end, one row taking nothing, fp16 and strided inputs."""
    gen = torch.Generator().manual_seed(40 + bits)
    batch, heads, d, capacity = 3, 2, 64, 256
    for fill, t, fractions, dtype in (
        ([0, 64, 192], 150, [0.8, 0.0, 0.5], torch.float32),
        ([128, 0, 256], 200, [0.3, 1.0, 0.6], torch.float16),
        ([64, 64, 0], 70, [1.0, 0.1, 0.9], torch.float32),
    ):
        state = _segment(gen, batch, heads, capacity, d, bits, fill=fill)
        k = _strided(_keys(gen, (batch, heads, t, d), dtype))
        v = _values(gen, (batch, heads, t, d), dtype)
        take = _take(gen, t, fractions)
        src_pos = torch.randperm(4 * t, generator=gen)[: batch * t].view(batch, t)
        ref = [b.clone() for b in state]
        R.write_segment_reference_(Segment(*ref), k, v, take, src_pos, bits)
        cpu = [b.clone() for b in state]
        C.write_segment_cpu_(Segment(*cpu), k, v, take, src_pos, bits, native=native)
        for a, b in zip(ref, cpu, strict=True):
            assert _same_bits(a, b)


def test_write_segment_round_trip() -> None:
    """Tokens written by write_segment_ decode back to themselves within their group's error bound."""
    gen = torch.Generator().manual_seed(5)
    bits, t, start = 4, 130, [64, 0]
    bufs = _segment(gen, 2, 2, 256, 32, bits, fill=start)
    k, v = _keys(gen, (2, 2, t, 32)), _values(gen, (2, 2, t, 32))
    take = _take(gen, t, [0.8, 0.6])
    Q.write_segment_(Segment(*bufs), k, v, take, torch.arange(t).expand(2, t), bits)
    k_hat = Q.dequantize(bufs[0], bufs[1], bufs[2], bits, torch.float32, keys=True)
    v_hat = Q.dequantize(bufs[3], bufs[4], bufs[5], bits, torch.float32, keys=False)
    for b in range(2):
        idx = take[b].nonzero()[:, 0]
        assert torch.equal(bufs[6][b, start[b] : start[b] + len(idx)].long(), idx)
        for g in range(0, len(idx), G):
            x = k[b][:, idx[g : g + G]]
            slots = slice(start[b] + g, start[b] + g + x.shape[1])
            bound = _key_bound(x.amin(1, keepdim=True), x.amax(1, keepdim=True), bits)
            assert ((k_hat[b, :, slots] - x).abs() <= bound).all()
        x = v[b][:, idx]
        v_err = (v_hat[b, :, start[b] : start[b] + len(idx)] - x).abs()
        assert (v_err <= _bound(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits)).all()


# ----------------------------------------------------------------------------------------------------
# Traceability
# ----------------------------------------------------------------------------------------------------

_SEG_ARGS = (
    "seg_codes_k",
    "seg_scale_k",
    "seg_zero_k",
    "seg_codes_v",
    "seg_scale_v",
    "seg_zero_v",
    "seg_pos",
    "seg_fill",
)


@torch.library.custom_op("zipvl_test::write_segment", mutates_args=_SEG_ARGS)
def _write_segment_op(
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
    use_triton: bool,
) -> None:
    Q.write_segment_(
        Segment(seg_codes_k, seg_scale_k, seg_zero_k, seg_codes_v, seg_scale_v, seg_zero_v, seg_pos, seg_fill),
        k_new,
        v_new,
        take,
        src_pos,
        bits,
        use_triton=use_triton,
    )


@_write_segment_op.register_fake
def _(
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
    use_triton,
) -> None:
    return None


@pytest.mark.parametrize("use_triton", [False, True])
def test_write_segment_compiles(use_triton: bool) -> None:
    """A custom op around write_segment_ traces with fullgraph (take computed inside the graph)."""
    gen = torch.Generator().manual_seed(7)
    bits, t = 2, 70
    bufs = _segment(gen, 2, 2, 192, 32, bits, fill=[0, 64])
    k, v = _keys(gen, (2, 2, t, 32)), _values(gen, (2, 2, t, 32))
    score = torch.rand(2, t, generator=gen)
    src_pos = torch.arange(t).expand(2, t)

    def step(bufs: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        torch.ops.zipvl_test.write_segment(*bufs, k * 1.0, v, score > 0.4, src_pos, bits, use_triton)
        return bufs[7] + 0

    eager = [b.clone() for b in bufs]
    step(eager, k, v, score)
    compiled = [b.clone() for b in bufs]
    fill = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled, k, v, score)
    assert torch.equal(fill, eager[7])
    for a, b in zip(eager, compiled, strict=True):
        assert _same_bits(a, b)


# ----------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", BITS)
def test_bf16_gpu(bits: int) -> None:
    """bf16 on the GPU: the dispatcher's (Triton) codes/params equal the reference's; the append agrees."""
    gen = torch.Generator().manual_seed(30 + bits)
    shape = (2, 4, 512, 128)
    k = _strided(_keys(gen, shape, torch.bfloat16, DEVICE))
    v = _values(gen, shape, torch.bfloat16, DEVICE)
    valid = (torch.rand(2, 512, generator=gen) > 0.2).to(DEVICE)
    k_q, v_q = Q.quantize_keys(k, valid, bits), Q.quantize_values(v, bits)
    expect = R.quantize_keys_reference(k, valid, bits) + R.quantize_values_reference(v, bits)
    for a, b in zip(k_q + v_q, expect, strict=True):
        assert _same_bits(a, b)
    for keys, deq_ref, q in ((True, R.dequantize_keys_reference, k_q), (False, R.dequantize_values_reference, v_q)):
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            got = Q.dequantize(*q, bits, dtype, keys=keys)
            torch.testing.assert_close(got, deq_ref(*q, bits, dtype), rtol=tol, atol=tol)
    state = _segment(gen, 2, 4, 1024, 128, bits, fill=[0, 64], device=DEVICE)
    take = _take(gen, 512, [0.6, 0.3]).to(DEVICE)
    src_pos = torch.arange(512, device=DEVICE).expand(2, 512)
    ref = _write(state, k, v, take, src_pos, bits, use_triton=False)
    tri = _write(state, k, v, take, src_pos, bits, use_triton=True)
    for a, b in zip(ref, tri, strict=True):
        assert _same_bits(a, b)
    _check_write(state, tri, k, v, take, src_pos, bits)
