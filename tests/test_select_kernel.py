"""Kept-set selection: the Triton radix-search kernel against select_tokens + keep_to_index (interpreter on CPU).

The kernel computes Eq. 6's p from exact (fp64) sums; the reference from float32 prefix sums. So the oracle
here is the reference run with the exact p (handed to it per row as a force ratio p / n_valid, which its
float64 rounding turns back into p), and the kernel must match it exactly. Separately, the reference itself
must agree with that oracle except on rows where a prefix sum lies within float32 rounding of tau * total
(found explicitly by :func:`_rounding_boundary`), where p may differ by one.
"""

import zlib

import numpy as np
import pytest
import torch
from conftest import DEVICE

from zipvl_compile.runtime.kernels.kept_attention import keep_to_index
from zipvl_compile.runtime.kernels.select import (
    DEFAULT_SELECT_TILES,
    MAX_SPLIT_PROGRAMS,
    SPLIT_FROM,
    SelectResult,
    SelectSplit,
    SelectTiles,
    select_kept,
    select_kept_triton,
    select_launch_for,
)
from zipvl_compile.runtime.kernels.select_reference import select_tokens

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# how far (relative to the total mass) the reference's float32 prefix sums and tau * total may lie from the
# exact values: a few float32 ulps on CPU (float64 accumulation, float32 results); on CUDA the scan also
# accumulates in float32
_REFERENCE_ROUNDING = 2**-21 if DEVICE == "cpu" else 2**-14


def _valid(n: int, pads: list[tuple[int, int]]) -> torch.Tensor:
    """bool [len(pads), n]; row b is valid on [pads[b][0], n - pads[b][1])."""
    valid = torch.zeros(len(pads), n, dtype=torch.bool)
    for row, (left, right) in enumerate(pads):
        valid[row, left : n - right] = True
    return valid


def _inputs(kind: str, n: int, pads: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, ...]:
    """(colsum, seen, valid) on DEVICE; padding positions hold large colsum (never kept).

    kind: "skewed" (rand**4), "integer" (colsum in {0..3}: ties in colsum and in the score), "score_ties"
    (colsum = seen * {0, 1, 2}: distinct colsum, tied scores) or "zero" (row 0 all zero: every score 0).
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(pads)
    seen = torch.randint(0, 9, (batch, n), generator=g).float()
    if kind == "skewed":
        colsum = torch.rand(batch, n, generator=g) ** 4
    elif kind == "integer":
        colsum = torch.randint(0, 4, (batch, n), generator=g).float()
    elif kind == "score_ties":
        colsum = seen * torch.randint(0, 3, (batch, n), generator=g)
    else:
        colsum = torch.rand(batch, n, generator=g)
        colsum[0] = 0.0
    valid = _valid(n, pads)
    colsum = torch.where(valid, colsum, 100.0)
    return colsum.to(DEVICE), seen.to(DEVICE), valid.to(DEVICE)


def _exact_p(colsum: torch.Tensor, valid: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 from float64 prefix sums -> (p int64 [B], prefix float64 [B, n], target float64 [B, 1])."""
    mass = torch.where(valid, colsum, 0.0).double().sort(dim=-1, descending=True).values
    prefix = mass.cumsum(dim=-1)
    target = float(np.float32(tau)) * prefix[:, -1:]  # tau as float32, like the reference
    p = torch.minimum((prefix < target).sum(dim=-1) + 1, valid.sum(dim=-1))
    return p, prefix, target


def _rounding_boundary(colsum: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """bool [B]: rows with mass where some exact prefix sum lies within float32 rounding of tau * total."""
    _, prefix, target = _exact_p(colsum, valid, tau)
    total = prefix[:, -1:]
    return ((prefix - target).abs() <= _REFERENCE_ROUNDING * total).any(dim=-1) & (total[:, 0] > 0)


def _oracle(
    colsum: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor, tau: float, min_keep: int, force_ratio: float
) -> SelectResult:
    """select_tokens + keep_to_index, with Eq. 6's p from exact sums (see the module docstring)."""
    if force_ratio > 0 or tau >= 1.0:
        return select_kept(colsum, seen, valid, tau, min_keep, force_ratio, use_triton=False)
    p, _, _ = _exact_p(colsum, valid, tau)
    n_valid = valid.sum(dim=-1)
    rows = [
        select_tokens(colsum[b : b + 1], seen[b : b + 1], valid[b : b + 1], tau, min_keep, p[b].item() / max(nv, 1))
        for b, nv in enumerate(n_valid.tolist())
    ]
    keep = torch.cat([row[0] for row in rows])
    idx, count = keep_to_index(keep)
    return SelectResult(keep, torch.cat([row[1] for row in rows]), idx, count)


def _check(
    colsum: torch.Tensor,
    seen: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
    min_keep: int,
    force_ratio: float = 0.0,
    tiles: SelectTiles = DEFAULT_SELECT_TILES,
) -> SelectResult:
    """The kernel (launched with ``tiles``) equals the exact oracle; the float32 reference equals it off the
    rounding boundary."""
    if tiles == DEFAULT_SELECT_TILES:
        out = select_kept(colsum, seen, valid, tau, min_keep, force_ratio, use_triton=True)
    else:
        out = select_kept_triton(colsum, seen, valid, tau, min_keep, force_ratio, tiles)
    expected = _oracle(colsum, seen, valid, tau, min_keep, force_ratio)
    batch, n = valid.shape
    assert out.keep.shape == out.idx.shape == (batch, n) and out.ratio.shape == out.count.shape == (batch,)
    assert (out.keep.dtype, out.ratio.dtype, out.idx.dtype, out.count.dtype) == (
        torch.bool,
        torch.float32,
        torch.int64,
        torch.int64,
    )
    assert torch.equal(out.keep, expected.keep)
    assert torch.equal(out.idx, expected.idx) and torch.equal(out.count, expected.count)
    torch.testing.assert_close(out.ratio, expected.ratio, rtol=0, atol=1e-6)

    reference = select_kept(colsum, seen, valid, tau, min_keep, force_ratio, use_triton=False)
    boundary = _rounding_boundary(colsum, valid, tau) & (force_ratio == 0 and tau < 1.0)
    for b in range(batch):
        if boundary[b]:
            assert (reference.keep[b] ^ expected.keep[b]).sum() <= 1
        else:
            assert torch.equal(reference.keep[b], expected.keep[b])
    return out


PADS = [(23, 0), (0, 17)]  # row 0 left padding, row 1 right padding


@pytest.mark.parametrize("min_keep", [0, 64, 1000])
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.975, 1.0])
@pytest.mark.parametrize("kind", ["skewed", "integer", "score_ties", "zero"])
def test_matches_reference(kind: str, tau: float, min_keep: int) -> None:
    seed = zlib.crc32(repr((kind, tau, min_keep)).encode())
    _check(*_inputs(kind, 130, PADS, seed), tau, min_keep)


@pytest.mark.parametrize("force_ratio", [1e-3, 0.3, 0.75, 2.0])
@pytest.mark.parametrize("min_keep", [0, 64])
def test_force_ratio(force_ratio: float, min_keep: int) -> None:
    out = _check(*_inputs("skewed", 130, PADS, seed=int(force_ratio * 1000) + min_keep), 0.9, min_keep, force_ratio)
    n_valid = torch.tensor([107, 113])
    p = torch.round(force_ratio * n_valid.double()).long().clamp(1, None).clamp(None, n_valid)
    assert (out.count.cpu() >= torch.maximum(p, torch.clamp(n_valid, max=min_keep))).all()


@pytest.mark.parametrize("n", [1, 2, 37])
def test_short_rows(n: int) -> None:
    """Rows shorter than a probe set (n below the probe count), a single token, a row without valid tokens."""
    colsum, seen, _ = _inputs("skewed", n, [(0, 0)] * 3, seed=n)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, : n // 2] = False
    valid[2] = False
    valid = valid.to(DEVICE)
    out = _check(colsum, seen, valid, 0.9, 0)
    assert out.count[2] == 0 and out.ratio[2] == 0 and torch.equal(out.idx[2].cpu(), torch.arange(n))
    _check(colsum, seen, valid, 0.5, 64)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("kind", ["skewed", "integer"])
def test_many_tiles(kind: str, prefetch: bool) -> None:
    """64-position tiles: running counts and tie ranks carried across tile boundaries (and, with prefetch, each
    search pass's tile loaded one tile ahead, the last load past n masked)."""
    tiles = SelectTiles(block=64, num_warps=2, prefetch=prefetch)
    _check(*_inputs(kind, 300, [(41, 0), (0, 0)], seed=5), 0.9, 20, tiles=tiles)
    _check(*_inputs(kind, 256, [(0, 0)], seed=6), 0.975, 0, tiles=tiles)  # n a multiple of the tile


def test_long_row() -> None:
    """n = 5000: the default tile loop runs several iterations per pass."""
    _check(*_inputs("skewed", 5000, [(300, 0)], seed=8), 0.9, 64)


@pytest.mark.parametrize("digit_bits", [1, 4])
def test_digit_widths(digit_bits: int) -> None:
    tiles = SelectTiles(digit_bits=digit_bits, prefetch=digit_bits == 4)
    _check(*_inputs("integer", 90, PADS[:1], seed=digit_bits), 0.9, 10, tiles=tiles)
    _check(*_inputs("skewed", 90, PADS[1:], seed=digit_bits), 0.975, 0, tiles=tiles)


# the split launch over several programs per row: 300 keys in 16-position tiles, 5 programs of 64 keys (the
# last one short), so ties, the tie ranks, the kept ranks and the last valid token cross program boundaries
_SPLIT = SelectSplit(programs=5, block=16, num_warps=1)


@pytest.mark.parametrize("tau", [0.5, 0.975, 1.0])
@pytest.mark.parametrize("kind", ["skewed", "integer", "score_ties", "zero"])
def test_split_matches_reference(kind: str, tau: float) -> None:
    seed = zlib.crc32(repr(("split", kind, tau)).encode())
    _check(*_inputs(kind, 300, [(41, 0), (0, 77)], seed), tau, 20, tiles=_SPLIT)


@pytest.mark.parametrize("force_ratio", [0.3, 2.0])
def test_split_force_ratio(force_ratio: float) -> None:
    _check(*_inputs("integer", 300, PADS, seed=11), 0.9, 64, force_ratio, tiles=_SPLIT)


@pytest.mark.parametrize("digit_bits", [2, 8])
def test_split_digit_widths(digit_bits: int) -> None:
    tiles = _SPLIT._replace(digit_bits=digit_bits)
    _check(*_inputs("integer", 300, PADS[:1], seed=digit_bits), 0.9, 10, tiles=tiles)
    _check(*_inputs("skewed", 200, PADS[1:], seed=digit_bits), 0.975, 0, tiles=tiles)


@pytest.mark.parametrize("n", [1, 37])
def test_split_short_rows(n: int) -> None:
    """Fewer tiles than programs (one program per tile is launched), a row without valid tokens."""
    colsum, seen, _ = _inputs("skewed", n, [(0, 0)] * 3, seed=n)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, : n // 2] = False
    valid[2] = False
    out = _check(colsum, seen, valid.to(DEVICE), 0.9, 0, tiles=_SPLIT)
    assert out.count[2] == 0 and out.ratio[2] == 0 and torch.equal(out.idx[2].cpu(), torch.arange(n))


def test_split_is_the_policy_for_long_rows() -> None:
    """Long rows take the split launch while the SMs outnumber the rows; short rows and large batches do not."""
    assert select_launch_for(1, 32768, 132) == SelectSplit(programs=64)
    assert select_launch_for(8, 65536, 132) == SelectSplit(programs=16)
    assert select_launch_for(1, SPLIT_FROM - 1, 132) == DEFAULT_SELECT_TILES
    assert select_launch_for(100, 32768, 132) == DEFAULT_SELECT_TILES
    assert select_launch_for(1, 10**6, 1000).programs == MAX_SPLIT_PROGRAMS


@pytest.mark.parametrize(
    "bad",
    [
        SelectTiles(block=96),
        SelectTiles(digit_bits=3),
        SelectTiles(num_warps=3),
        SelectSplit(programs=0),
        SelectSplit(programs=MAX_SPLIT_PROGRAMS + 1),
        SelectSplit(digit_bits=3),
    ],
)
def test_bad_tiles(bad: SelectTiles | SelectSplit) -> None:
    colsum, seen, valid = _inputs("skewed", 64, PADS[:1], seed=1)
    with pytest.raises(ValueError, match=type(bad).__name__):
        select_kept_triton(colsum, seen, valid, 0.9, 0, tiles=bad)


@pytest.mark.parametrize("tau", [0.5, 0.75])
def test_mass_exactly_at_tau(tau: float) -> None:
    """Dyadic masses whose prefix sums hit tau * total exactly: p is the first prefix that reaches it."""
    colsum = torch.tensor([[1.0] * 12, [4.0, 4.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]], device=DEVICE)
    seen = torch.ones_like(colsum)
    valid = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    out = _check(colsum, seen, valid, tau, 0)
    # tau 0.5: 6 of 12 ones; 4 + 4 + 2 = 10 = 20 / 2. tau 0.75: 9 ones; 4 + 4 + 2 + 2 + 2 + 1 = 15. Plus the last.
    assert out.count.tolist() == ([7, 4] if tau == 0.5 else [10, 7])


def test_rounding_boundary_is_detected() -> None:
    """Three keys of mass 1, tau = 2/3: float32(2/3) * 3 = 2 + 6e-8, which float32 rounds to 2.

    The reference keeps 2 keys by Eq. 6 (its prefix sum 2 reaches the rounded target); the exact p is 3.
    The last token scores highest (seen 4, 2, 1), so the two results differ by one key.
    """
    colsum = torch.ones(1, 3, device=DEVICE)
    seen = torch.tensor([[4.0, 2.0, 1.0]], device=DEVICE)
    valid = torch.ones(1, 3, dtype=torch.bool, device=DEVICE)
    tau = 2 / 3
    assert _rounding_boundary(colsum, valid, tau).item()
    out = _check(colsum, seen, valid, tau, 0)
    reference = select_kept(colsum, seen, valid, tau, 0, use_triton=False)
    assert out.count.item() == 3 and reference.count.item() == 2


def test_dispatcher() -> None:
    colsum, seen, valid = _inputs("skewed", 60, PADS, seed=4)
    keep, ratio = select_tokens(colsum, seen, valid, 0.9, 8)
    idx, count = keep_to_index(keep)
    for use_triton in [False] + ([None] if DEVICE == "cpu" else []):
        out = select_kept(colsum, seen, valid, 0.9, 8, use_triton=use_triton)
        assert torch.equal(out.keep, keep) and torch.equal(out.ratio, ratio)
        assert torch.equal(out.idx, idx) and torch.equal(out.count, count)


def test_bad_inputs() -> None:
    colsum, seen, valid = _inputs("skewed", 20, PADS, seed=1)
    with pytest.raises(ValueError, match="shape"):
        select_kept(colsum, seen[:, 1:], valid, 0.9, 0)
    with pytest.raises(ValueError, match="float32"):
        select_kept(colsum.double(), seen, valid, 0.9, 0)
    with pytest.raises(ValueError, match="min_keep"):
        select_kept(colsum, seen, valid, 0.9, -1)
    with pytest.raises(ValueError, match="force_ratio"):
        select_kept(colsum, seen, valid, 0.9, 0, force_ratio=-0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tau", [0.9, 0.975])
def test_long_rows_gpu(tau: float) -> None:
    n = 128 * 1024
    _check(*_inputs("skewed", n, [(5000, 0), (0, 0)], seed=3), tau, 64)
    _check(*_inputs("integer", n, [(0, 1000)], seed=4), tau, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_dynamic_shapes_gpu() -> None:
    """Inside torch.compile with dynamic shapes the kernel is traced once for several batch sizes and lengths."""
    torch._dynamo.reset()
    compiled = torch.compile(select_kept, fullgraph=True, dynamic=True)
    for batch, n in ((1, 3000), (2, 5000), (3, 4097)):
        colsum, seen, valid = _inputs("skewed", n, [(batch * 7, 0)] * batch, seed=n)
        out = compiled(colsum, seen, valid, 0.9, 64)
        eager = select_kept(colsum, seen, valid, 0.9, 64)
        assert all(torch.equal(a, b) for a, b in zip(out, eager))


def test_sm_count_traces_as_a_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split policy asks the device's SM count inside torch.compile (fullgraph): Dynamo takes it as a
    constant (CUDA's device query stubbed, so the check runs on any machine)."""
    from zipvl_compile.runtime.kernels import device

    class Properties:
        multi_processor_count = 77

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    monkeypatch.setattr(device, "_SM_COUNTS", {})
    torch._dynamo.reset()
    policy = torch.compile(
        lambda x: x + select_launch_for(1, 32768, device.sm_count(torch.device("cuda"))).programs,
        fullgraph=True,
        backend="eager",
    )
    assert policy(torch.zeros(2)).tolist() == [64.0, 64.0]
    assert device._SM_COUNTS == {0: 77}


def test_bench_select_smoke(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """bench/selection.py runs (tiny rows on the interpreter): every launch gives the same result, times positive."""
    from bench import selection as bench

    monkeypatch.setenv("OUT", str(tmp_path))
    rows = bench.main(["--smoke"])
    assert len(rows) == 1 and all(row["same"] and row["policy_ms"] > 0 for row in rows)
    assert (tmp_path / "select.json").exists()
