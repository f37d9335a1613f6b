"""The C segment copy (``native.copy_slots_native_``) against its torch body (``packed.copy_slots_`` without the
library): the same bytes in every field, the destination's other slots untouched; bad segments refused clearly."""

from __future__ import annotations

import pytest
import torch

from zipvl_compile.runtime import packed
from zipvl_compile.runtime.kernels import native
from zipvl_compile.runtime.layout import GROUP, Segment

BATCH, HEADS, D = 2, 3, 16


@pytest.fixture(autouse=True)
def _needs_the_library() -> None:
    if native.library() is None:
        pytest.skip("no C compiler here: the C copy is not built")


def _random(gen: torch.Generator, capacity: int, bits: int) -> Segment:
    """A segment of random bytes in every field (codes, parameters, positions, fill)."""
    seg = Segment.empty(BATCH, HEADS, capacity, D, bits, torch.device("cpu"))
    for t in seg:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, generator=gen, dtype=torch.uint8))
    return seg


def _torch_copy(into: Segment, seg: Segment, slots: int, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(native, "library", lambda: None)
        packed.copy_slots_(into, seg, slots)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("into_slots", "slots"), [(3 * GROUP, 2 * GROUP), (5 * GROUP, 4 * GROUP), (GROUP, 0)])
def test_native_copy_is_the_torch_copy(bits: int, into_slots: int, slots: int, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + slots)
    seg = _random(gen, 4 * GROUP, bits)
    into = _random(gen, into_slots, bits)
    expected = Segment(*(t.clone() for t in into))
    _torch_copy(expected, seg, slots, monkeypatch)
    native.copy_slots_native_(into, seg, slots)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(into, expected, strict=True))
    assert torch.equal(into.k_codes[:, :, :slots], seg.k_codes[:, :, :slots])  # the oracle copies what it should
    assert torch.equal(into.fill, seg.fill)
    if into_slots > slots:  # the rest of the destination is left as it was
        assert not torch.equal(into.pos[:, slots:], seg.pos[:, slots:into_slots])


def test_shrink_is_the_cut() -> None:
    """packed.shrink: Segment.cut's tensors, whichever way it copies (C, or a whole clone at full capacity)."""
    gen = torch.Generator().manual_seed(3)
    seg = _random(gen, 4 * GROUP, 4)
    for fill, reserve in ((2 * GROUP, 0), (GROUP, GROUP), (4 * GROUP, 0), (3 * GROUP, 2 * GROUP), (0, 0)):
        seg.fill.fill_(fill)
        cut = packed.shrink(seg, reserve)
        want = seg.cut(min(fill + reserve, seg.capacity))
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(cut, want, strict=True))
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(cut, seg) if a.numel())


def test_native_copy_refuses_clearly() -> None:
    gen = torch.Generator().manual_seed(4)
    seg, into = _random(gen, 2 * GROUP, 4), _random(gen, GROUP, 4)
    assert native.copy_refusal(into, seg, GROUP) is None
    assert "multiple of" in native.copy_refusal(into, seg, GROUP // 2)
    assert "within both capacities" in native.copy_refusal(into, seg, 2 * GROUP)
    assert "do not match" in native.copy_refusal(_random(gen, GROUP, 2), seg, GROUP)
    with pytest.raises(ValueError, match="not in the layout's dtypes"):
        native.copy_slots_native_(into._replace(pos=into.pos.long()), seg, GROUP)
