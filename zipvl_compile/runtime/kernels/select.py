"""Kept-set selection (ZipVL Eqs. 6-8) without a sort: a radix threshold search per batch row.

:func:`select_kept` computes what :func:`~zipvl_compile.runtime.kernels.select_reference.select_tokens` followed by
:func:`~zipvl_compile.runtime.kernels.kept_attention.keep_to_index` compute (those two stay the plain-torch
reference), in one Triton launch with one program per batch row, no host sync and fixed output shapes (with
``force_ratio`` > 0, a benchmark-only mode, p is rounded by two small torch ops beside it).

Shapes and dtypes:
    colsum, seen  float32 [B, n]  from ``probe_colsum``; colsum >= 0 and finite (a sum of probabilities).
    valid         bool [B, n]     False = padding key.
    returns :class:`SelectResult`: keep bool [B, n], ratio float32 [B], idx int64 [B, n] (the kept positions
    ascending, then the others ascending), count int64 [B] (the kept count).

How a row is processed (every pass is a loop over tiles of :attr:`SelectTiles.block` positions; each lane keeps
its own partial counts and sums over the tiles, reduced across the program once per pass, so a pass costs one
cross-warp reduction however long the row):
    1. one pass: order keys of the score s = colsum / seen (0 where seen == 0) and, for Eq. 6, of colsum go
       to int32 scratch rows (a key is the float32 bit pattern made monotone under signed int32 comparison;
       padding gets the smallest key, which no search candidate reaches); the valid count, the last valid
       position and the fp64 total of the valid colsum are summed on the way.
    2. Eq. 6: a most-significant-digit-first radix search over the colsum keys (``digit_bits`` bits per
       pass, 32 / ``digit_bits`` passes) finds the threshold t = the p-th largest value, as the largest key
       whose "sum of values >= key" reaches tau * total; then p = count(> t) + the number of values equal
       to t needed to reach tau * total on top of sum(> t). Sums are fp64, so p is the exact smallest p
       whose p largest values hold tau of the mass (the reference's float32 prefix sums can differ from
       it by one key where a prefix sum lies within float32 rounding of tau * total).
    3. one pass: the rank of the last valid token in score order (count of higher scores plus equal scores
       at lower positions), and for Eq. 6 the counts of colsum above / equal to t. From p, that rank and
       ``min_keep`` follows q, the size of the score-ordered prefix to keep besides the forced last token.
    4. the same radix search on the score keys with counts finds the q-th largest score; ties at it go to
       the lower positions (a running count), which is the stable descending sort's order.
    5. one pass: keep, and idx by a running count of kept positions (kept position -> its rank, other
       position -> count + its rank among the others).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from zipvl_compile.runtime.kernels.device import check_power_of_two, wants_triton
from zipvl_compile.runtime.kernels.kept_attention import keep_to_index
from zipvl_compile.runtime.kernels.select_reference import select_tokens

_PADDING_KEY = tl.constexpr(-(2**31))  # the smallest int32: below every search candidate

# how p (the Eq. 6 count) is found; a kernel constexpr
_P_ALL = 0  # tau >= 1: every valid key
_P_MASS = 1  # Eq. 6 by the threshold search
_P_GIVEN = 2  # force_ratio > 0: p computed beside the kernel


class SelectTiles(NamedTuple):
    """Launch parameters of the selection kernel (every choice selects the same set): ``block`` positions per
    tile (a power of two), ``digit_bits`` bits decided per search pass (a divisor of 32: 2**digit_bits - 1
    candidates per pass, 32 / digit_bits passes), ``num_warps`` of the one program per batch row, ``prefetch``:
    the search passes load each tile one tile ahead (not yet timed: off by default). The defaults: the fastest of
    the H200 sweep at 8k and 32k (BENCHMARKS.md)."""

    block: int = 4096
    digit_bits: int = 2
    num_warps: int = 16
    prefetch: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        check_power_of_two("SelectTiles", "block", self.block, least=16)
        if self.digit_bits not in (1, 2, 4, 8):
            raise ValueError(f"SelectTiles.digit_bits must divide 32 (1, 2, 4 or 8), got {self.digit_bits}")
        check_power_of_two("SelectTiles", "num_warps", self.num_warps)


DEFAULT_SELECT_TILES = SelectTiles()


class SelectResult(NamedTuple):
    """The kept set of one layer (see the module docstring for shapes and dtypes)."""

    keep: torch.Tensor
    ratio: torch.Tensor
    idx: torch.Tensor
    count: torch.Tensor


@triton.jit
def _order_key(x):
    """int32 keys of float32 values with key(a) < key(b) iff a < b (-0.0 is taken as +0.0)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """The float32 value of an order key (the inverse of :func:`_order_key`)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _radix_search(
    key_ptr,
    n,
    n_steps,
    target,
    BY_MASS: tl.constexpr,
    BLOCK: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Threshold search over the int32 keys key_ptr[0:n] -> (t, agg(keys > t)).

    agg(S) = the number of keys in S, or with BY_MASS the fp64 sum of their values. After 32 / DIGIT_BITS
    steps t is the largest key with agg(keys >= t) >= target (the caller guarantees agg(all keys) >=
    target); after fewer steps only its leading bits are searched (0 steps: t = the smallest int32, agg 0).
    Padding keys never count. The candidates are kept as int64 in unsigned order (key + 2**31). PREFETCH:
    each tile's load is issued one tile ahead (registers), so that its latency overlaps the work on the tile
    before it.
    """
    radix: tl.constexpr = 1 << DIGIT_BITS
    digit = tl.arange(0, radix)
    lanes = tl.arange(0, BLOCK)
    low = tl.full([], 0, tl.int64)  # every key >= low: the invariant agg(keys >= low) >= target
    width = tl.full([], 1 << (32 - DIGIT_BITS), tl.int64)
    if BY_MASS:
        above = tl.full([], 0.0, tl.float64)  # agg over the keys >= the smallest candidate known to fail
    else:
        above = tl.full([], 0, tl.int32)
    for _ in range(n_steps):
        cand = (low + digit.to(tl.int64) * width - (1 << 31)).to(tl.int32)  # lane 0 = low: known to pass
        # per (lane, candidate) over the tiles, reduced across the program once per step
        if BY_MASS:
            lane_agg = tl.zeros([BLOCK, radix], tl.float64)
        else:
            lane_agg = tl.zeros([BLOCK, radix], tl.int32)
        if PREFETCH:
            ahead = tl.load(key_ptr + lanes, mask=lanes < n, other=_PADDING_KEY)
        for start in range(0, n, BLOCK):
            if PREFETCH:
                key = ahead
                pos = start + BLOCK + lanes
                ahead = tl.load(key_ptr + pos, mask=pos < n, other=_PADDING_KEY)
            else:
                pos = start + lanes
                key = tl.load(key_ptr + pos, mask=pos < n, other=_PADDING_KEY)
            hit = key[:, None] >= cand[None, :]
            if BY_MASS:
                lane_agg += tl.where(hit, _key_value(key).to(tl.float64)[:, None], 0.0)
            else:
                lane_agg += hit.to(tl.int32)
        agg = tl.sum(lane_agg, axis=0)
        passing = (agg >= target) | (digit == 0)  # agg falls as the candidate rises: a prefix of the lanes
        d = tl.sum(passing.to(tl.int32)) - 1
        above = tl.where(d + 1 < radix, tl.sum(tl.where(digit == d + 1, agg, 0)), above)
        low += d.to(tl.int64) * width
        width = width >> DIGIT_BITS
    return (low - (1 << 31)).to(tl.int32), above


@triton.jit
def _select_kernel(
    colsum_ptr,
    seen_ptr,
    valid_ptr,
    given_p_ptr,
    mass_key_ptr,
    score_key_ptr,
    keep_ptr,
    idx_ptr,
    count_ptr,
    ratio_ptr,
    n,
    tau,
    min_keep,
    P_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One program per batch row b (see the module docstring); all [B, n] tensors contiguous.

    valid_ptr / keep_ptr: uint8 views of bool [B, n]; given_p_ptr: int64 [B] (read with P_MODE == _P_GIVEN);
    mass_key_ptr, score_key_ptr: int32 [B, n] scratch; idx_ptr int64 [B, n]; count_ptr int64 [B];
    ratio_ptr float32 [B].
    """
    b = tl.program_id(0).to(tl.int64)
    row = b * n
    lanes = tl.arange(0, BLOCK)
    n_steps: tl.constexpr = 32 // DIGIT_BITS

    # 1. order keys, valid count, last valid position, total mass
    lane_valid = tl.zeros([BLOCK], tl.int32)  # per-lane partial results, reduced once after each pass
    lane_last = tl.full([BLOCK], -1, tl.int32)
    lane_total = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        pos = start + lanes
        ok = tl.load(valid_ptr + row + pos, mask=pos < n, other=0) != 0
        colsum = tl.load(colsum_ptr + row + pos, mask=ok, other=0.0)
        seen = tl.load(seen_ptr + row + pos, mask=ok, other=0.0)
        score = tl.where(seen > 0, tl.math.div_rn(colsum, tl.maximum(seen, 1.0)), 0.0)
        tl.store(score_key_ptr + row + pos, tl.where(ok, _order_key(score), _PADDING_KEY), mask=pos < n)
        lane_valid += ok.to(tl.int32)
        lane_last = tl.maximum(lane_last, tl.where(ok, pos, -1))
        if P_MODE == 1:
            tl.store(mass_key_ptr + row + pos, tl.where(ok, _order_key(colsum), _PADDING_KEY), mask=pos < n)
            lane_total += colsum.to(tl.float64)
    n_valid = tl.sum(lane_valid)
    last = tl.max(lane_last)
    total = tl.sum(lane_total)
    tl.debug_barrier()  # the scratch rows written above are read by other threads of this program below

    # 2. Eq. 6 threshold: the largest t with sum(colsum >= t) >= tau * total (tau as float32, like the reference)
    target = tl.cast(tau, tl.float32).to(tl.float64) * total  # a launcher may pass tau as fp64
    if P_MODE == 1:
        mass_t, mass_above = _radix_search(mass_key_ptr + row, n, n_steps, target, True, BLOCK, DIGIT_BITS, PREFETCH)

    # 3. rank of the last valid token in score order; counts of colsum above / at the Eq. 6 threshold
    last_key = tl.load(score_key_ptr + row + tl.maximum(last, 0))
    lane_rank = tl.zeros([BLOCK], tl.int32)
    lane_ge = tl.zeros([BLOCK], tl.int32)
    lane_gt = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        pos = start + lanes
        key = tl.load(score_key_ptr + row + pos, mask=pos < n, other=_PADDING_KEY)
        before = (key > last_key) | ((key == last_key) & (pos < last))
        lane_rank += (before & (key != _PADDING_KEY)).to(tl.int32)
        if P_MODE == 1:
            mkey = tl.load(mass_key_ptr + row + pos, mask=pos < n, other=_PADDING_KEY)
            lane_ge += ((mkey >= mass_t) & (mkey != _PADDING_KEY)).to(tl.int32)
            lane_gt += ((mkey > mass_t) & (mkey != _PADDING_KEY)).to(tl.int32)
    rank_last = tl.sum(lane_rank)
    mass_ge = tl.sum(lane_ge)
    mass_gt = tl.sum(lane_gt)

    if P_MODE == 0:
        p = n_valid
    elif P_MODE == 1:
        # values equal to t, each worth t, fill the gap between sum(> t) and tau * total
        t = _key_value(mass_t).to(tl.float64)
        gap = target - mass_above
        fill = tl.where(gap > 0, gap / tl.where(t > 0, t, 1.0), 0.0)
        ties = fill.to(tl.int64)
        ties = tl.minimum(ties + (ties.to(tl.float64) < fill).to(tl.int64), mass_ge - mass_gt).to(tl.int32)
        p = tl.maximum(mass_gt + ties, 1)
    else:
        p = tl.load(given_p_ptr + b).to(tl.int32)
    p = tl.minimum(p, n_valid)
    floor = tl.minimum(min_keep, n_valid)
    # keep the q best scores plus the last valid token; q >= p is the least that reaches the floor
    with_last = p + (rank_last >= p).to(tl.int32)
    q = tl.where(with_last >= floor, p, tl.where(rank_last >= floor - 1, floor - 1, floor))
    count = tl.where(n_valid > 0, q + (rank_last >= q).to(tl.int32), 0)

    # 4. the q-th largest score (all valid keys when q >= n_valid: no search)
    score_t, score_above = _radix_search(
        score_key_ptr + row, n, tl.where(q < n_valid, n_steps, 0), q, False, BLOCK, DIGIT_BITS, PREFETCH
    )
    ties_wanted = q - score_above

    # 5. keep mask and index list
    kept_before = tl.full([], 0, tl.int32)
    ties_before = tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK):
        pos = start + lanes
        ok = tl.load(valid_ptr + row + pos, mask=pos < n, other=0) != 0
        key = tl.load(score_key_ptr + row + pos, mask=pos < n, other=_PADDING_KEY)
        tie = (ok & (key == score_t)).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
        keep = ok & ((key > score_t) | ((tie != 0) & (tie_rank < ties_wanted)) | (pos == last))
        kept = keep.to(tl.int32)
        kept_rank = kept_before + tl.cumsum(kept, axis=0) - kept
        dest = tl.where(keep, kept_rank, count + pos - kept_rank)
        tl.store(keep_ptr + row + pos, kept.to(tl.uint8), mask=pos < n)
        tl.store(idx_ptr + row + dest, pos.to(tl.int64), mask=pos < n)
        kept_before += tl.sum(kept)
        ties_before += tl.sum(tie)
    tl.store(count_ptr + b, count.to(tl.int64))
    tl.store(ratio_ptr + b, tl.math.div_rn(count.to(tl.float32), tl.maximum(n_valid, 1).to(tl.float32)))


def _check(colsum: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor, min_keep: int, force_ratio: float) -> None:
    if colsum.dim() != 2 or colsum.shape != seen.shape or colsum.shape != valid.shape:
        raise ValueError(
            f"colsum, seen and valid must share one [B, n] shape, got {tuple(colsum.shape)}, "
            f"{tuple(seen.shape)}, {tuple(valid.shape)}"
        )
    if colsum.dtype != torch.float32 or seen.dtype != torch.float32 or valid.dtype != torch.bool:
        raise ValueError(f"need float32 colsum / seen and bool valid, got {colsum.dtype}, {seen.dtype}, {valid.dtype}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    if not force_ratio >= 0:
        raise ValueError(f"force_ratio must be >= 0, got {force_ratio}")


def select_kept_triton(
    colsum: torch.Tensor,
    seen: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
    min_keep: int,
    force_ratio: float = 0.0,
    tiles: SelectTiles = DEFAULT_SELECT_TILES,
) -> SelectResult:
    """Triton implementation of :func:`select_kept` (same arguments and result; ``tiles``: its launch)."""
    tiles.check()
    batch, n = colsum.shape
    colsum, seen, valid = colsum.contiguous(), seen.contiguous(), valid.contiguous()
    if force_ratio > 0:
        p_mode = _P_GIVEN
        # the reference's float64 rounding, done beside the kernel (a Triton float argument is float32)
        given_p = torch.round(force_ratio * valid.sum(dim=-1, dtype=torch.float64)).to(torch.int64).clamp(min=1)
    else:
        p_mode = _P_ALL if tau >= 1.0 else _P_MASS
        given_p = None
    score_key = torch.empty(batch, n, device=colsum.device, dtype=torch.int32)
    mass_key = torch.empty_like(score_key) if p_mode == _P_MASS else score_key  # unused unless _P_MASS
    # bool tensors travel as uint8 (a dtype view of bool cannot be lowered by Inductor: copies of n bytes)
    keep = torch.empty(batch, n, device=colsum.device, dtype=torch.uint8)
    idx = torch.empty(batch, n, device=colsum.device, dtype=torch.int64)
    count = torch.empty(batch, device=colsum.device, dtype=torch.int64)
    ratio = torch.empty(batch, device=colsum.device, dtype=torch.float32)
    wrap_triton(_select_kernel)[(batch,)](
        colsum,
        seen,
        valid.to(torch.uint8),
        count if given_p is None else given_p,  # unused unless _P_GIVEN
        mass_key,
        score_key,
        keep,
        idx,
        count,
        ratio,
        n,
        float(tau),
        int(min_keep),
        P_MODE=p_mode,
        BLOCK=tiles.block,
        DIGIT_BITS=tiles.digit_bits,
        PREFETCH=tiles.prefetch,
        num_warps=tiles.num_warps,
    )
    return SelectResult(keep.to(torch.bool), ratio, idx, count)


def select_kept(
    colsum: torch.Tensor,
    seen: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
    min_keep: int,
    force_ratio: float = 0.0,
    use_triton: bool | None = None,
) -> SelectResult:
    """Kept set of one layer as mask, ratio, index list and count (see the module docstring).

    Same selection as :func:`~zipvl_compile.runtime.kernels.select_reference.select_tokens` (its docstring defines it),
    with Eq. 6's p computed from exact (fp64) sums; ``use_triton`` as in ``kernels/device.py`` (None: Triton
    on CUDA tensors, else ``select_tokens`` + ``keep_to_index``).
    """
    _check(colsum, seen, valid, min_keep, force_ratio)
    if wants_triton(colsum, use_triton):
        return select_kept_triton(colsum, seen, valid, tau, min_keep, force_ratio)
    keep, ratio = select_tokens(colsum, seen, valid, tau, min_keep, force_ratio)
    idx, count = keep_to_index(keep)
    return SelectResult(keep, ratio, idx, count)
