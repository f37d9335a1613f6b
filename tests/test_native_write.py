"""The C segment write (kernels/native.py) at the CPU demo's prefill shapes: the reference's bytes at 2, 4 and 8 bits
(the 2-bit range search included) for fp32 / bf16 / fp16 inputs, and its input checks.

Data: Gaussian keys with a few outlier channels (x20) and an offset per channel, values with a few outlier tokens.
"""

from __future__ import annotations

import pytest
import torch

from zipvl_compile.runtime.kernels import native
from zipvl_compile.runtime.kernels import quant_cpu as C
from zipvl_compile.runtime.kernels import quant_reference as R
from zipvl_compile.runtime.layout import GROUP, Segment

BATCH, HEADS, T, D, CAPACITY = 1, 3, 329, 64, 384  # SmolLM2-135M's KV heads and head dim, the demo's prompt


@pytest.fixture(autouse=True)
def _needs_the_library() -> None:
    if native.library() is None:
        pytest.skip("no C compiler here: the C write is not built")


def _inputs(gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """k contiguous [B, H, t, d], v a [B, H, t, d] view of a [B, t, H, d] tensor (a projection's output)."""
    k = torch.randn(BATCH, HEADS, T, D, generator=gen) + torch.randn(BATCH, HEADS, 1, D, generator=gen)
    k[:, :, :, torch.randperm(D, generator=gen)[:3]] *= 20.0
    v = torch.randn(BATCH, T, HEADS, D, generator=gen)
    v[:, torch.randperm(T, generator=gen)[:5]] *= 20.0
    return k.to(dtype), v.to(dtype).transpose(1, 2)


def _poisoned(gen: torch.Generator, bits: int, fill: int) -> Segment:
    """A segment at ``fill`` whose slots hold random codes, NaN parameters and random positions."""
    seg = Segment.empty(BATCH, HEADS, CAPACITY, D, bits, torch.device("cpu"))
    for codes in (seg.k_codes, seg.v_codes):
        codes.copy_(torch.randint(0, 256, codes.shape, generator=gen, dtype=torch.uint8))
    for params in (seg.k_scale, seg.k_zero, seg.v_scale, seg.v_zero):
        params.fill_(float("nan"))
    seg.pos.copy_(torch.randint(1000, 2000, seg.pos.shape, generator=gen, dtype=torch.int32))
    seg.fill.fill_(fill)
    return seg


def _same_bits(a: Segment, b: Segment) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_write_is_the_reference(bits: int, dtype: torch.dtype) -> None:
    """Every token (the dense prefill's hi write), about half of them from fill 64, and none: the reference's
    bytes (NaN poison outside the written slots kept); at 2 bits the search moves some groups off min/max."""
    gen = torch.Generator().manual_seed(bits * 10 + [torch.float32, torch.bfloat16, torch.float16].index(dtype))
    k, v = _inputs(gen, dtype)
    src_pos = torch.arange(T).expand(BATCH, T)
    for take, fill in (
        (torch.ones(BATCH, T, dtype=torch.bool), 0),
        (torch.rand(BATCH, T, generator=gen) < 0.5, GROUP),
        (torch.zeros(BATCH, T, dtype=torch.bool), GROUP),
    ):
        ref = _poisoned(gen, bits, fill)
        out = Segment(*(x.clone() for x in ref))
        R.write_segment_reference_(ref, k, v, take, src_pos, bits)
        C.write_segment_cpu_(out, k, v, take, src_pos, bits, native=True)
        assert _same_bits(ref, out)
    if bits == 2:  # the last non-empty write: some key groups and channels took a shrunk range
        ones = Segment.empty(BATCH, HEADS, CAPACITY, D, bits, torch.device("cpu"))
        C.write_segment_cpu_(ones, k, v, torch.ones(BATCH, T, dtype=torch.bool), src_pos, bits, native=True)
        x = k.float()[:, :, : T // GROUP * GROUP].unflatten(2, (T // GROUP, GROUP))
        plain, _ = R.range_params(x.amin(3), x.amax(3), bits)
        assert not torch.equal(ones.k_scale[:, :, : T // GROUP], plain)


def test_native_write_refuses_clearly() -> None:
    """Bits outside the layout's widths and inputs that require grad are refused with the reason; the default
    path then takes the torch body."""
    gen = torch.Generator().manual_seed(5)
    k, v = _inputs(gen, torch.float32)
    take, src_pos = torch.ones(BATCH, T, dtype=torch.bool), torch.arange(T).expand(BATCH, T)
    seg = Segment.empty(BATCH, HEADS, CAPACITY, D, 2, torch.device("cpu"))
    assert native.write_refusal(seg, k, v, take, src_pos, 2) is None
    assert "bits must be in" in native.write_refusal(seg, k, v, take, src_pos, 3)
    assert "do not match" in native.write_refusal(seg, k, v, take, src_pos, 4)
    grad = k.clone().requires_grad_()
    assert "require grad" in native.write_refusal(seg, grad, v, take, src_pos, 2)
    with pytest.raises(ValueError, match="require grad"):
        native.write_segment_native_(seg, grad, v, take, src_pos, 2)
    ref = Segment.empty(BATCH, HEADS, CAPACITY, D, 2, torch.device("cpu"))
    R.write_segment_reference_(ref, grad.detach(), v, take, src_pos, 2)
    with torch.no_grad():
        C.write_segment_cpu_(seg, grad, v, take, src_pos, 2)
    assert _same_bits(ref, seg)
