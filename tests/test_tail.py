"""The decode tail's Triton kernels (append, block selection + staging) against their plain-torch references,
and a whole recompression through either path writing the same bytes."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from zipvl_compile.runtime import packed
from zipvl_compile.runtime.kernels import tail as K
from zipvl_compile.runtime.kernels import tail_reference as R
from zipvl_compile.runtime.layout import GROUP, Segment, Tail

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter has no bf16 arithmetic


def _tail(gen: torch.Generator, batch: int, heads: int, slots: int, d: int, lengths: list[int]) -> Tail:
    """A tail with random K/V in every slot, distinct random positions, and the given lengths."""
    rand = lambda: torch.randn(batch, heads, slots, d, generator=gen).to(DEVICE, DTYPE)
    pos = torch.stack([torch.randperm(4 * slots, generator=gen)[:slots] for _ in range(batch)]).to(torch.int32)
    return Tail(rand(), rand(), pos.to(DEVICE), torch.tensor(lengths, dtype=torch.int32, device=DEVICE))


def _clone(part):
    return type(part)(*(t.clone() for t in part))


@pytest.mark.parametrize("strided", [False, True])
def test_append_matches_reference(strided: bool) -> None:
    """Rows at an empty, a partly filled and a full tail (the last slot is overwritten); strided k/v and a position
    expanded over the batch, or contiguous ones."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, slots, d = 3, 3, 20, 64
    tail = _tail(gen, batch, heads, slots, d, [0, 7, slots])
    kv = torch.randn(batch, 1, 2 * heads, d, generator=gen).to(DEVICE)  # a projection's [B, t, 2H, d]
    k, v = (kv[:, :, :heads], kv[:, :, heads:]) if strided else (kv[:, :, :heads].clone(), kv[:, :, heads:].clone())
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    # one position expanded over the batch (stride 0), as ZipVLCache.update passes it, or one per row
    pos = torch.tensor([900], device=DEVICE).expand(batch) if strided else torch.tensor([5, 900, 77], device=DEVICE)
    ref, tri = _clone(tail), _clone(tail)
    R.append_tail_reference_(ref, k, v, pos)
    K.append_tail_triton_(tri, k, v, pos)
    for a, b in zip(ref, tri, strict=True):
        assert torch.equal(a, b)
    assert tri.length.tolist() == [1, 8, slots + 1]
    assert tri.pos[torch.arange(batch), [0, 7, slots - 1]].tolist() == pos.tolist()


def _check_selection(tail: Tail, q: torch.Tensor | None, n_rep: int, tau: float) -> R.BlockStaging:
    ref = R.select_block_reference(tail, q, 0.125, n_rep, tau)
    tri = K.select_block_triton(tail, q, 0.125, n_rep, tau)
    for a, b in ((ref.hi, tri.hi), (ref.lo, tri.lo)):
        assert torch.equal(a.count, b.count)
        assert torch.equal(a.src, b.src)
    if q is not None and tau < 1:
        full = tail.length >= tail.slots
        torch.testing.assert_close(tri.colsum[full], ref.colsum[full], rtol=1e-5, atol=1e-6)
    return tri


@pytest.mark.parametrize(("slots", "n_rep", "tau"), [(100, 1, 0.9), (100, 4, 0.5), (64, 2, 0.975), (1, 1, 0.9)])
def test_select_block_matches_reference(slots: int, n_rep: int, tau: float) -> None:
    """Batch 3 (full, partly filled, full with two empty slots), GQA, strided q; staging equal, sums close."""
    gen = torch.Generator().manual_seed(slots + n_rep)
    heads, d = 2, 64
    tail = _tail(gen, 3, heads, slots, d, [slots, slots // 2, slots])
    tail.pos[2, : min(2, slots - 1)] = -1
    q = torch.randn(3, 1, heads * n_rep, d, generator=gen).to(DEVICE, DTYPE).transpose(1, 2)
    staged = _check_selection(tail, q, n_rep, tau)
    assert staged.hi.count[1] == staged.lo.count[1] == 0  # a tail that is not full takes nothing
    counts = staged.hi.count + staged.lo.count
    assert counts[0] == slots and counts[2] == slots - min(2, slots - 1)
    if slots > 1:
        assert 0 < staged.lo.count[0] and 0 < staged.hi.count[0]


def test_select_block_ties_and_unscored() -> None:
    """Equal keys give equal column sums (ties go to the lower slot); no query or tau 1 keeps every token."""
    gen = torch.Generator().manual_seed(9)
    tail = _tail(gen, 2, 2, 100, 64, [100, 100])
    tail.k[0] = tail.k[0, :, :1]  # every key of row 0 alike: all 100 sums tie
    q = torch.randn(2, 2, 1, 64, generator=gen).to(DEVICE, DTYPE)
    staged = _check_selection(tail, q, 1, 0.5)
    kept = staged.hi.src[0, : staged.hi.count[0]]
    assert staged.hi.count[0] < 100 and torch.equal(kept[:-1], torch.arange(len(kept) - 1, device=DEVICE))
    assert kept[-1] == 99  # the last token is always kept
    for query, tau in ((None, 0.5), (q, 1.0)):
        staged = _check_selection(tail, query, 1, tau)
        assert staged.hi.count.tolist() == [100, 100] and staged.lo.count.tolist() == [0, 0]


def test_recompress_paths_write_the_same_bytes() -> None:
    """A whole recompression (selection, both segment writes, the tail emptied) through the Triton path and the
    reference path: identical buffers; rows whose tail is not full are untouched."""
    gen = torch.Generator().manual_seed(11)
    batch, heads, slots, d, n_rep = 3, 2, 100, 64, 2
    tail = _tail(gen, batch, heads, slots, d, [slots, 40, slots])
    hi, lo = (Segment.empty(batch, heads, 4 * GROUP, d, bits, DEVICE) for bits in (4, 2))
    for seg in (hi, lo):
        seg.fill.copy_(torch.tensor([GROUP, 0, 2 * GROUP]))
    q = torch.randn(batch, heads * n_rep, 1, d, generator=gen).to(DEVICE, DTYPE)
    results = []
    for use_triton in (False, True):
        state = [_clone(part) for part in (hi, lo, tail)]
        packed.recompress_(*state, q, 0.125, n_rep, 0.9, 4, 2, use_triton=use_triton)
        results.append(state)
    for a, b in zip(*results, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    new_hi, new_lo, new_tail = results[1]
    assert new_tail.length.tolist() == [0, 40, 0] and torch.equal(new_tail.pos[1], tail.pos[1])
    assert new_hi.fill[1] == new_lo.fill[1] == 0 and new_hi.fill[0] > GROUP and new_lo.fill[2] > 2 * GROUP


def test_kernels_refuse_a_strided_tail() -> None:
    tail = _tail(torch.Generator().manual_seed(1), 2, 2, 8, 64, [8, 8])
    strided = tail._replace(k=tail.k.transpose(2, 3).contiguous().transpose(2, 3))
    kv = torch.zeros(2, 2, 1, 64, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="contiguous"):
        K.append_tail_triton_(strided, kv, kv, torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        K.select_block_triton(strided, None, 0.125, 1, 0.9)
