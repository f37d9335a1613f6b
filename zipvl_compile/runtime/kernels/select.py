"""Kept-set selection (ZipVL Eqs. 6-8) without a sort: a radix threshold search per batch row.

:func:`select_kept` computes what :func:`~zipvl_compile.runtime.kernels.select_reference.select_tokens` followed by
:func:`~zipvl_compile.runtime.kernels.kept_attention.keep_to_index` compute (those two stay the plain-torch
reference), with no host sync and fixed output shapes (with ``force_ratio`` > 0, a benchmark-only mode, p is
rounded by two small torch ops beside it). Two launches compute the same result (:func:`select_launch_for`
picks): one program per batch row (:class:`SelectTiles`), or for long rows the split launch
(:class:`SelectSplit`): several programs per row, each over a slice of it, one launch per pass below and per
search step, handing their partial counts and sums to the next launch (the split section below).

Shapes and dtypes:
    colsum, seen  float32 [B, n]  from ``probe_colsum``; colsum >= 0 and finite (a sum of probabilities).
    valid         bool [B, n]     False = padding key.
    returns :class:`SelectResult`: keep bool [B, n], ratio float32 [B], idx int64 [B, n] (the kept positions
    ascending, then the others ascending), count int64 [B] (the kept count).

How a row is processed (every pass is a loop over tiles of ``block`` positions; each lane keeps its own partial
counts and sums over the tiles, reduced across the program once per pass, so a pass costs one cross-warp
reduction however long the row):
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

from zipvl_compile.runtime.kernels.device import check_power_of_two, sm_count, wants_triton
from zipvl_compile.runtime.kernels.kept_attention import keep_to_index
from zipvl_compile.runtime.kernels.select_reference import select_tokens

_PADDING_KEY = tl.constexpr(-(2**31))  # the smallest int32: below every search candidate

# how p (the Eq. 6 count) is found; a kernel constexpr
_P_ALL = 0  # tau >= 1: every valid key
_P_MASS = 1  # Eq. 6 by the threshold search
_P_GIVEN = 2  # force_ratio > 0: p computed beside the kernel


def _check_digits(owner: str, block: int, digit_bits: int, num_warps: int) -> None:
    """Raise ValueError naming ``owner``'s first bad field (the fields both launch kinds share)."""
    check_power_of_two(owner, "block", block, least=16)
    if digit_bits not in (1, 2, 4, 8):
        raise ValueError(f"{owner}.digit_bits must divide 32 (1, 2, 4 or 8), got {digit_bits}")
    check_power_of_two(owner, "num_warps", num_warps)


class SelectTiles(NamedTuple):
    """Launch parameters of the one-program selection (every choice selects the same set): ``block`` positions
    per tile (a power of two), ``digit_bits`` bits decided per search pass (a divisor of 32: 2**digit_bits - 1
    candidates per pass, 32 / digit_bits passes), ``num_warps`` of the one program per batch row, ``prefetch``:
    the search passes load each tile one tile ahead. The defaults: the fastest of the H200 sweep at 8k and 32k
    (BENCHMARKS.md)."""

    block: int = 4096
    digit_bits: int = 2
    num_warps: int = 16
    prefetch: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        _check_digits("SelectTiles", self.block, self.digit_bits, self.num_warps)


class SelectSplit(NamedTuple):
    """Launch parameters of the split selection (same set as :class:`SelectTiles`): ``programs`` programs per
    batch row, each over a slice of it (at most :data:`MAX_SPLIT_PROGRAMS`; fewer when the row has fewer
    tiles), one launch per pass: 2 * 32 / ``digit_bits`` + 4 launches with Eq. 6's search (2 fewer per
    search digit without it). ``block``, ``digit_bits``, ``num_warps`` as in :class:`SelectTiles`, per program."""

    programs: int = 64
    block: int = 512
    digit_bits: int = 4
    num_warps: int = 4

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        _check_digits("SelectSplit", self.block, self.digit_bits, self.num_warps)
        if not 1 <= self.programs <= MAX_SPLIT_PROGRAMS:
            raise ValueError(f"SelectSplit.programs must be in [1, {MAX_SPLIT_PROGRAMS}], got {self.programs}")


DEFAULT_SELECT_TILES = SelectTiles()
MAX_SPLIT_PROGRAMS = 256
SPLIT_FROM = 8192  # rows at least this long take the split launch where the GPU has SMs to spare


def select_launch_for(batch: int, n: int, sms: int) -> SelectTiles | SelectSplit:
    """The policy's launch for ``batch`` rows of ``n`` keys on a device of ``sms`` SMs: one program per row,
    or for long rows the split launch, one tile per program while the SMs shared out between the rows allow
    (two programs per row at least). On the H200 (B = 1) the split launch took 0.074 / 0.082 / 0.088 ms at
    8k / 32k / 64k keys, one program per row 0.089 / 0.275 ms at 8k / 32k (BENCHMARKS.md)."""
    programs = min(MAX_SPLIT_PROGRAMS, sms // max(batch, 1), triton.cdiv(n, SelectSplit().block))
    if n < SPLIT_FROM or programs < 2:
        return DEFAULT_SELECT_TILES
    return SelectSplit(programs=programs)


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


# ---------------------------------------------------------------------------------------------------------
# Pieces of one row's work, shared by the one-program kernel and the split kernels. ``pos`` [BLOCK] are
# positions of a tile, pointers are offset to the start of the row.


@triton.jit
def _keys_tile(colsum_ptr, seen_ptr, valid_ptr, mass_key_ptr, score_key_ptr, pos, n, acc, P_MODE: tl.constexpr):
    """Step 1 on one tile: store the order keys; ``acc`` = per-lane (valid count, last valid position, fp64 total
    of the valid colsum), returned updated."""
    lane_valid, lane_last, lane_total = acc
    ok = tl.load(valid_ptr + pos, mask=pos < n, other=0) != 0
    colsum = tl.load(colsum_ptr + pos, mask=ok, other=0.0)
    seen = tl.load(seen_ptr + pos, mask=ok, other=0.0)
    score = tl.where(seen > 0, tl.math.div_rn(colsum, tl.maximum(seen, 1.0)), 0.0)
    tl.store(score_key_ptr + pos, tl.where(ok, _order_key(score), _PADDING_KEY), mask=pos < n)
    lane_valid += ok.to(tl.int32)
    lane_last = tl.maximum(lane_last, tl.where(ok, pos, -1))
    if P_MODE == 1:
        tl.store(mass_key_ptr + pos, tl.where(ok, _order_key(colsum), _PADDING_KEY), mask=pos < n)
        lane_total += colsum.to(tl.float64)
    return lane_valid, lane_last, lane_total


@triton.jit
def _step_width(step, DIGIT_BITS: tl.constexpr):
    """int64: the spacing of search step ``step``'s candidates (the value of its digit's lowest bit)."""
    return tl.full([], 1, tl.int64) << (32 - DIGIT_BITS * (step + 1))


@triton.jit
def _candidates(low, step, DIGIT_BITS: tl.constexpr):
    """int32 [2**DIGIT_BITS]: the keys tested by search step ``step`` from ``low`` (int64, unsigned order);
    candidate 0 is ``low`` itself, known to pass."""
    digit = tl.arange(0, 1 << DIGIT_BITS)
    return (low + digit.to(tl.int64) * _step_width(step, DIGIT_BITS) - (1 << 31)).to(tl.int32)


@triton.jit
def _hits(key, cand, lane_agg, BY_MASS: tl.constexpr):
    """lane_agg [BLOCK, 2**DIGIT_BITS] plus, per candidate, the keys [BLOCK] >= it: counted, or with BY_MASS
    their fp64 values summed (padding keys never reach a candidate)."""
    hit = key[:, None] >= cand[None, :]
    if BY_MASS:
        return lane_agg + tl.where(hit, _key_value(key).to(tl.float64)[:, None], 0.0)
    return lane_agg + hit.to(lane_agg.dtype)


@triton.jit
def _decide(agg, low, step, above, target, DIGIT_BITS: tl.constexpr):
    """Search step ``step``'s decision from agg [2**DIGIT_BITS] (the aggregate of the keys >= each candidate):
    the new (low, above). agg falls as the candidate rises, so the passing candidates are a prefix; ``above``
    becomes the aggregate of the first failing one (unchanged when every candidate passes)."""
    digit = tl.arange(0, 1 << DIGIT_BITS)
    passing = (agg >= target) | (digit == 0)
    d = tl.sum(passing.to(tl.int32)) - 1
    above = tl.where(d + 1 < (1 << DIGIT_BITS), tl.sum(tl.where(digit == d + 1, agg, 0)), above)
    return low + d.to(tl.int64) * _step_width(step, DIGIT_BITS), above


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
    lanes = tl.arange(0, BLOCK)
    low = tl.full([], 0, tl.int64)  # every key >= low: the invariant agg(keys >= low) >= target
    if BY_MASS:
        above = tl.full([], 0.0, tl.float64)  # agg over the keys >= the smallest candidate known to fail
    else:
        above = tl.full([], 0, tl.int32)
    for step in range(n_steps):
        cand = _candidates(low, step, DIGIT_BITS)
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
            lane_agg = _hits(key, cand, lane_agg, BY_MASS)
        low, above = _decide(tl.sum(lane_agg, axis=0), low, step, above, target, DIGIT_BITS)
    return (low - (1 << 31)).to(tl.int32), above


@triton.jit
def _rank_tile(score_key_ptr, mass_key_ptr, pos, n, last, last_key, mass_t, acc, P_MODE: tl.constexpr):
    """Step 3 on one tile; ``acc`` = per-lane (keys before the last valid token in score order, colsum keys
    >= the Eq. 6 threshold, colsum keys above it), returned updated."""
    lane_rank, lane_ge, lane_gt = acc
    key = tl.load(score_key_ptr + pos, mask=pos < n, other=_PADDING_KEY)
    before = (key > last_key) | ((key == last_key) & (pos < last))
    lane_rank += (before & (key != _PADDING_KEY)).to(tl.int32)
    if P_MODE == 1:
        mkey = tl.load(mass_key_ptr + pos, mask=pos < n, other=_PADDING_KEY)
        lane_ge += ((mkey >= mass_t) & (mkey != _PADDING_KEY)).to(tl.int32)
        lane_gt += ((mkey > mass_t) & (mkey != _PADDING_KEY)).to(tl.int32)
    return lane_rank, lane_ge, lane_gt


@triton.jit
def _kept_size(
    n_valid, rank_last, target, mass_t, mass_above, mass_ge, mass_gt, given_p_ptr, b, min_keep, P_MODE: tl.constexpr
):
    """(q, count): the size of the score-ordered prefix to keep besides the forced last token, and the kept
    count, from Eq. 6's p (P_MODE), the rank of the last valid token in score order and ``min_keep``."""
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
    return q, tl.where(n_valid > 0, q + (rank_last >= q).to(tl.int32), 0)


@triton.jit
def _write_tile(valid_ptr, score_key_ptr, keep_ptr, idx_ptr, pos, n, last, score_t, ties_wanted, count, before):
    """Step 5 on one tile: keep and idx; ``before`` = (kept positions, ties at score_t) before the tile,
    returned updated."""
    kept_before, ties_before = before
    ok = tl.load(valid_ptr + pos, mask=pos < n, other=0) != 0
    key = tl.load(score_key_ptr + pos, mask=pos < n, other=_PADDING_KEY)
    tie = (ok & (key == score_t)).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
    keep = ok & ((key > score_t) | ((tie != 0) & (tie_rank < ties_wanted)) | (pos == last))
    kept = keep.to(tl.int32)
    kept_rank = kept_before + tl.cumsum(kept, axis=0) - kept
    dest = tl.where(keep, kept_rank, count + pos - kept_rank)
    tl.store(keep_ptr + pos, kept.to(tl.uint8), mask=pos < n)
    tl.store(idx_ptr + dest, pos.to(tl.int64), mask=pos < n)
    return kept_before + tl.sum(kept), ties_before + tl.sum(tie)


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

    valid_ptr / keep_ptr: uint8 views of bool [B, n]; given_p_ptr: int64 [B] (read with P_MODE == _P_GIVEN only,
    any pointer otherwise); mass_key_ptr, score_key_ptr: int32 [B, n] scratch; idx_ptr int64 [B, n]; count_ptr
    int64 [B]; ratio_ptr float32 [B].
    """
    b = tl.program_id(0).to(tl.int64)
    row = b * n
    lanes = tl.arange(0, BLOCK)
    n_steps: tl.constexpr = 32 // DIGIT_BITS
    colsum_ptr, seen_ptr, valid_ptr = colsum_ptr + row, seen_ptr + row, valid_ptr + row
    keep_ptr, idx_ptr = keep_ptr + row, idx_ptr + row
    mass_key_ptr, score_key_ptr = mass_key_ptr + row, score_key_ptr + row

    # 1. order keys, valid count, last valid position, total mass (per lane, reduced once after the pass)
    acc = tl.zeros([BLOCK], tl.int32), tl.full([BLOCK], -1, tl.int32), tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        acc = _keys_tile(colsum_ptr, seen_ptr, valid_ptr, mass_key_ptr, score_key_ptr, start + lanes, n, acc, P_MODE)
    n_valid, last, total = tl.sum(acc[0]), tl.max(acc[1]), tl.sum(acc[2])
    tl.debug_barrier()  # the scratch rows written above are read by other threads of this program below

    # 2. Eq. 6 threshold: the largest t with sum(colsum >= t) >= tau * total (tau as float32, like the reference)
    target = tl.cast(tau, tl.float32).to(tl.float64) * total  # a launcher may pass tau as fp64
    mass_t = tl.full([], 0, tl.int32)
    mass_above = tl.full([], 0.0, tl.float64)
    if P_MODE == 1:
        mass_t, mass_above = _radix_search(mass_key_ptr, n, n_steps, target, True, BLOCK, DIGIT_BITS, PREFETCH)

    # 3. rank of the last valid token in score order; counts of colsum above / at the Eq. 6 threshold
    last_key = tl.load(score_key_ptr + tl.maximum(last, 0))
    acc = tl.zeros([BLOCK], tl.int32), tl.zeros([BLOCK], tl.int32), tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        acc = _rank_tile(score_key_ptr, mass_key_ptr, start + lanes, n, last, last_key, mass_t, acc, P_MODE)
    q, count = _kept_size(
        n_valid,
        tl.sum(acc[0]),
        target,
        mass_t,
        mass_above,
        tl.sum(acc[1]),
        tl.sum(acc[2]),
        given_p_ptr,
        b,
        min_keep,
        P_MODE,
    )

    # 4. the q-th largest score (all valid keys when q >= n_valid: no search)
    score_t, score_above = _radix_search(
        score_key_ptr, n, tl.where(q < n_valid, n_steps, 0), q, False, BLOCK, DIGIT_BITS, PREFETCH
    )

    # 5. keep mask and index list
    before = tl.full([], 0, tl.int32), tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK):
        before = _write_tile(
            valid_ptr,
            score_key_ptr,
            keep_ptr,
            idx_ptr,
            start + lanes,
            n,
            last,
            score_t,
            q - score_above,
            count,
            before,
        )
    tl.store(count_ptr + b, count.to(tl.int64))
    tl.store(ratio_ptr + b, tl.math.div_rn(count.to(tl.float32), tl.maximum(n_valid, 1).to(tl.float32)))


# ---------------------------------------------------------------------------------------------------------
# The split path: ``programs`` programs per row, each over one slice of it, one launch per pass. A pass hands
# the next one what it found through small buffers: per-program fields ``stats`` int64 [B, P, _FIELDS] and
# ``total`` fp64 [B, P]; a search step's per-program aggregates ``part`` fp64 [2, B, P, radix] and the row's
# search state ``low`` int64 / ``above`` fp64 [2, B] (slot step % 2: a launch reads the slot of the step
# before and writes its own); the row's results ``row`` int64 [B, _ROW_FIELDS] and ``row_above`` fp64 [B].
# Every program of a launch reduces the fields it needs over all programs in program order, so each computes
# the same values (deterministic); program 0 stores the row's.

_N_VALID, _LAST, _RANK, _MASS_GE, _MASS_GT, _SCORE_GT, _TIES, _TIES_BEFORE_LAST = (tl.constexpr(i) for i in range(8))
_FIELDS = tl.constexpr(8)
_ROW_MASS_T, _ROW_SCORE_T, _ROW_WANTED, _ROW_COUNT = (tl.constexpr(i) for i in range(4))
_ROW_FIELDS = tl.constexpr(4)
_MAX_PROGRAMS = tl.constexpr(MAX_SPLIT_PROGRAMS)  # the fields of a row are read as one vector of this size


@triton.jit
def _slice():
    """(program p, batch row b as int64, programs per row, batch rows) of a split launch, grid (P, B)."""
    return tl.program_id(0), tl.program_id(1).to(tl.int64), tl.num_programs(0), tl.num_programs(1)


@triton.jit
def _field(stats_ptr, b, n_prog, field, other):
    """int64 [_MAX_PROGRAMS]: ``field`` of every program of row b, ``other`` past them."""
    p = tl.arange(0, _MAX_PROGRAMS)
    return tl.load(stats_ptr + (b * n_prog + p) * _FIELDS + field, mask=p < n_prog, other=other)


@triton.jit
def _mass_target(total_ptr, b, n_prog, tau):
    """Eq. 6's fp64 target tau * total, the row's total summed over its programs in order."""
    p = tl.arange(0, _MAX_PROGRAMS)
    total = tl.sum(tl.load(total_ptr + b * n_prog + p, mask=p < n_prog, other=0.0))
    return tl.cast(tau, tl.float32).to(tl.float64) * total


@triton.jit
def _search_state(part_ptr, low_ptr, above_ptr, b, n_batch, n_prog, step, target, DIGIT_BITS: tl.constexpr):
    """(low, above) when split search step ``step`` starts: (0, 0) at step 0; else step - 1 decided from its
    aggregates summed over the programs and the state its launch stored. step = the number of steps: the
    search's result."""
    radix: tl.constexpr = 1 << DIGIT_BITS
    prev = (step + 1) % 2
    later = step > 0
    p = tl.arange(0, _MAX_PROGRAMS)
    digit = tl.arange(0, radix)
    part = tl.load(
        part_ptr + ((prev * n_batch + b) * n_prog + p[:, None]) * radix + digit[None, :],
        mask=(p[:, None] < n_prog) & later,
        other=0.0,
    )
    low = tl.load(low_ptr + prev * n_batch + b, mask=later, other=0)
    above = tl.load(above_ptr + prev * n_batch + b, mask=later, other=0.0)
    low_next, above_next = _decide(tl.sum(part, axis=0), low, step - 1, above, target, DIGIT_BITS)
    return tl.where(later, low_next, low), tl.where(later, above_next, above)


@triton.jit
def _split_kept_size(stats_ptr, total_ptr, row_ptr, row_above_ptr, given_p_ptr, b, n_prog, tau, min_keep, P_MODE):
    """(q, count, n_valid) of row b (see :func:`_kept_size`) from the fields of the passes before the score
    search."""
    n_valid = tl.sum(_field(stats_ptr, b, n_prog, _N_VALID, 0)).to(tl.int32)
    rank_last = tl.sum(_field(stats_ptr, b, n_prog, _RANK, 0)).to(tl.int32)
    mass_ge = tl.sum(_field(stats_ptr, b, n_prog, _MASS_GE, 0)).to(tl.int32)
    mass_gt = tl.sum(_field(stats_ptr, b, n_prog, _MASS_GT, 0)).to(tl.int32)
    mass_t = tl.load(row_ptr + b * _ROW_FIELDS + _ROW_MASS_T).to(tl.int32)
    target = _mass_target(total_ptr, b, n_prog, tau)
    q, count = _kept_size(
        n_valid,
        rank_last,
        target,
        mass_t,
        tl.load(row_above_ptr + b),
        mass_ge,
        mass_gt,
        given_p_ptr,
        b,
        min_keep,
        P_MODE,
    )
    return q, count, n_valid


@triton.jit
def _split_keys_kernel(
    colsum_ptr,
    seen_ptr,
    valid_ptr,
    mass_key_ptr,
    score_key_ptr,
    stats_ptr,
    total_ptr,
    n,
    chunk,
    P_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1 (step 1 of the module docstring) on each slice: the order keys; fields _N_VALID, _LAST, total."""
    p, b, n_prog, _ = _slice()
    row = b * n
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32), tl.full([BLOCK], -1, tl.int32), tl.zeros([BLOCK], tl.float64)
    for start in range(p * chunk, tl.minimum(p * chunk + chunk, n), BLOCK):
        acc = _keys_tile(
            colsum_ptr + row,
            seen_ptr + row,
            valid_ptr + row,
            mass_key_ptr + row,
            score_key_ptr + row,
            start + lanes,
            n,
            acc,
            P_MODE,
        )
    out = stats_ptr + (b * n_prog + p) * _FIELDS
    tl.store(out + _N_VALID, tl.sum(acc[0]).to(tl.int64))
    tl.store(out + _LAST, tl.max(acc[1]).to(tl.int64))
    tl.store(total_ptr + b * n_prog + p, tl.sum(acc[2]))


@triton.jit
def _split_search_kernel(
    key_ptr,
    stats_ptr,
    total_ptr,
    row_ptr,
    row_above_ptr,
    given_p_ptr,
    part_ptr,
    low_ptr,
    above_ptr,
    n,
    chunk,
    step,
    tau,
    min_keep,
    BY_MASS: tl.constexpr,
    P_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
):
    """Step ``step`` of a radix search (Eq. 6's on the colsum keys with BY_MASS, else the q-th score): decide
    the step before, then aggregate this step's candidates over the slice."""
    p, b, n_prog, n_batch = _slice()
    if BY_MASS:
        target = _mass_target(total_ptr, b, n_prog, tau)
    else:
        q, _, _ = _split_kept_size(
            stats_ptr, total_ptr, row_ptr, row_above_ptr, given_p_ptr, b, n_prog, tau, min_keep, P_MODE
        )
        target = q.to(tl.float64)
    low, above = _search_state(part_ptr, low_ptr, above_ptr, b, n_batch, n_prog, step, target, DIGIT_BITS)
    slot = step % 2
    tl.store(low_ptr + slot * n_batch + b, low, mask=p == 0)
    tl.store(above_ptr + slot * n_batch + b, above, mask=p == 0)
    cand = _candidates(low, step, DIGIT_BITS)
    lanes = tl.arange(0, BLOCK)
    lane_agg = tl.zeros([BLOCK, 1 << DIGIT_BITS], tl.float64)
    for start in range(p * chunk, tl.minimum(p * chunk + chunk, n), BLOCK):
        pos = start + lanes
        key = tl.load(key_ptr + b * n + pos, mask=pos < n, other=_PADDING_KEY)
        lane_agg = _hits(key, cand, lane_agg, BY_MASS)
    digit = tl.arange(0, 1 << DIGIT_BITS)
    tl.store(part_ptr + ((slot * n_batch + b) * n_prog + p) * (1 << DIGIT_BITS) + digit, tl.sum(lane_agg, axis=0))


@triton.jit
def _split_rank_kernel(
    score_key_ptr,
    mass_key_ptr,
    stats_ptr,
    total_ptr,
    row_ptr,
    row_above_ptr,
    part_ptr,
    low_ptr,
    above_ptr,
    n,
    chunk,
    n_steps,
    tau,
    P_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
):
    """Eq. 6's threshold from the last mass step; pass 3 on each slice: fields _RANK, _MASS_GE, _MASS_GT."""
    p, b, n_prog, n_batch = _slice()
    mass_t = tl.full([], 0, tl.int32)
    mass_above = tl.full([], 0.0, tl.float64)
    if P_MODE == 1:
        target = _mass_target(total_ptr, b, n_prog, tau)
        low, mass_above = _search_state(part_ptr, low_ptr, above_ptr, b, n_batch, n_prog, n_steps, target, DIGIT_BITS)
        mass_t = (low - (1 << 31)).to(tl.int32)
    last = tl.max(_field(stats_ptr, b, n_prog, _LAST, -1)).to(tl.int32)
    last_key = tl.load(score_key_ptr + b * n + tl.maximum(last, 0))
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32), tl.zeros([BLOCK], tl.int32), tl.zeros([BLOCK], tl.int32)
    for start in range(p * chunk, tl.minimum(p * chunk + chunk, n), BLOCK):
        acc = _rank_tile(
            score_key_ptr + b * n, mass_key_ptr + b * n, start + lanes, n, last, last_key, mass_t, acc, P_MODE
        )
    out = stats_ptr + (b * n_prog + p) * _FIELDS
    tl.store(out + _RANK, tl.sum(acc[0]).to(tl.int64))
    tl.store(out + _MASS_GE, tl.sum(acc[1]).to(tl.int64))
    tl.store(out + _MASS_GT, tl.sum(acc[2]).to(tl.int64))
    tl.store(row_ptr + b * _ROW_FIELDS + _ROW_MASS_T, mass_t.to(tl.int64), mask=p == 0)
    tl.store(row_above_ptr + b, mass_above, mask=p == 0)


@triton.jit
def _split_ties_kernel(
    valid_ptr,
    score_key_ptr,
    stats_ptr,
    total_ptr,
    row_ptr,
    row_above_ptr,
    given_p_ptr,
    part_ptr,
    low_ptr,
    above_ptr,
    n,
    chunk,
    n_steps,
    tau,
    min_keep,
    P_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
):
    """The q-th score from the last score step; per slice the keys above it, the ties at it and the ties
    before the last valid token: fields _SCORE_GT, _TIES, _TIES_BEFORE_LAST; the row's threshold, wanted
    ties and count."""
    p, b, n_prog, n_batch = _slice()
    q, count, _ = _split_kept_size(
        stats_ptr, total_ptr, row_ptr, row_above_ptr, given_p_ptr, b, n_prog, tau, min_keep, P_MODE
    )
    low, above = _search_state(part_ptr, low_ptr, above_ptr, b, n_batch, n_prog, n_steps, q.to(tl.float64), DIGIT_BITS)
    score_t = (low - (1 << 31)).to(tl.int32)
    last = tl.max(_field(stats_ptr, b, n_prog, _LAST, -1)).to(tl.int32)
    lanes = tl.arange(0, BLOCK)
    lane_gt = tl.zeros([BLOCK], tl.int32)
    lane_ties = tl.zeros([BLOCK], tl.int32)
    lane_before = tl.zeros([BLOCK], tl.int32)
    for start in range(p * chunk, tl.minimum(p * chunk + chunk, n), BLOCK):
        pos = start + lanes
        ok = tl.load(valid_ptr + b * n + pos, mask=pos < n, other=0) != 0
        key = tl.load(score_key_ptr + b * n + pos, mask=pos < n, other=_PADDING_KEY)
        tie = ok & (key == score_t)
        lane_gt += (ok & (key > score_t)).to(tl.int32)
        lane_ties += tie.to(tl.int32)
        lane_before += (tie & (pos < last)).to(tl.int32)
    out = stats_ptr + (b * n_prog + p) * _FIELDS
    tl.store(out + _SCORE_GT, tl.sum(lane_gt).to(tl.int64))
    tl.store(out + _TIES, tl.sum(lane_ties).to(tl.int64))
    tl.store(out + _TIES_BEFORE_LAST, tl.sum(lane_before).to(tl.int64))
    row = row_ptr + b * _ROW_FIELDS
    tl.store(row + _ROW_SCORE_T, score_t.to(tl.int64), mask=p == 0)
    tl.store(row + _ROW_WANTED, (q - above.to(tl.int32)).to(tl.int64), mask=p == 0)
    tl.store(row + _ROW_COUNT, count.to(tl.int64), mask=p == 0)


@triton.jit
def _split_write_kernel(
    valid_ptr,
    score_key_ptr,
    keep_ptr,
    idx_ptr,
    count_ptr,
    ratio_ptr,
    stats_ptr,
    row_ptr,
    n,
    chunk,
    BLOCK: tl.constexpr,
):
    """Pass 5 on each slice, starting from the kept positions and ties of the slices before it (from their
    fields: the ties at the threshold go to the lowest positions, the last valid token is kept)."""
    p, b, n_prog, _ = _slice()
    row = row_ptr + b * _ROW_FIELDS
    score_t = tl.load(row + _ROW_SCORE_T).to(tl.int32)
    wanted = tl.load(row + _ROW_WANTED)
    count = tl.load(row + _ROW_COUNT).to(tl.int32)
    last = tl.max(_field(stats_ptr, b, n_prog, _LAST, -1))
    ties = _field(stats_ptr, b, n_prog, _TIES, 0)
    ties_before = tl.cumsum(ties, axis=0) - ties  # per program: ties at the threshold in the slices before it
    kept = _field(stats_ptr, b, n_prog, _SCORE_GT, 0) + tl.minimum(tl.maximum(wanted - ties_before, 0), ties)
    # the last valid token is kept whatever its score: one more in its slice when its score did not keep it
    progs = tl.arange(0, _MAX_PROGRAMS)
    in_last = (progs == last // chunk) & (last >= 0)
    last_rank = tl.sum(tl.where(in_last, ties_before + _field(stats_ptr, b, n_prog, _TIES_BEFORE_LAST, 0), 0))
    last_key = tl.load(score_key_ptr + b * n + tl.maximum(last, 0))
    by_score = (last_key > score_t) | ((last_key == score_t) & (last_rank < wanted))
    kept += (in_last & ~by_score).to(tl.int64)
    before = tl.sum(tl.where(progs < p, kept, 0)).to(tl.int32), tl.sum(tl.where(progs < p, ties, 0)).to(tl.int32)
    lanes = tl.arange(0, BLOCK)
    for start in range(p * chunk, tl.minimum(p * chunk + chunk, n), BLOCK):
        before = _write_tile(
            valid_ptr + b * n,
            score_key_ptr + b * n,
            keep_ptr + b * n,
            idx_ptr + b * n,
            start + lanes,
            n,
            last.to(tl.int32),
            score_t,
            wanted.to(tl.int32),
            count,
            before,
        )
    n_valid = tl.sum(_field(stats_ptr, b, n_prog, _N_VALID, 0)).to(tl.int32)
    tl.store(count_ptr + b, count.to(tl.int64), mask=p == 0)
    ratio = tl.math.div_rn(count.to(tl.float32), tl.maximum(n_valid, 1).to(tl.float32))
    tl.store(ratio_ptr + b, ratio, mask=p == 0)


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


class _Rows(NamedTuple):
    """What a selection launch writes, allocated by :func:`select_kept_triton`: keep uint8 [B, n], idx int64
    [B, n], count int64 [B], ratio float32 [B], and the int32 [B, n] order-key scratch rows (mass_key is a
    one-element stand-in unless Eq. 6's search runs)."""

    keep: torch.Tensor
    idx: torch.Tensor
    count: torch.Tensor
    ratio: torch.Tensor
    score_key: torch.Tensor
    mass_key: torch.Tensor


def _launch_split(
    colsum: torch.Tensor,
    seen: torch.Tensor,
    valid: torch.Tensor,
    given_p: torch.Tensor,
    p_mode: int,
    tau: float,
    min_keep: int,
    split: SelectSplit,
    out: _Rows,
) -> None:
    """The split selection's launches (grid: programs per row, B) into ``out``; ``given_p``: int64 [B], read
    with _P_GIVEN only (a stand-in otherwise)."""
    batch, n = colsum.shape
    chunk = triton.cdiv(triton.cdiv(n, split.programs), split.block) * split.block  # a slice: whole tiles
    n_prog = triton.cdiv(n, chunk)
    radix, n_steps = 1 << split.digit_bits, 32 // split.digit_bits
    f64 = dict(device=colsum.device, dtype=torch.float64)
    i64 = dict(device=colsum.device, dtype=torch.int64)
    stats, total = torch.empty(batch, n_prog, _FIELDS.value, **i64), torch.empty(batch, n_prog, **f64)
    part = torch.empty(2, batch, n_prog, radix, **f64)
    low, above = torch.empty(2, batch, **i64), torch.empty(2, batch, **f64)
    row, row_above = torch.empty(batch, _ROW_FIELDS.value, **i64), torch.empty(batch, **f64)
    grid = (n_prog, batch)
    launch = dict(BLOCK=split.block, num_warps=split.num_warps)
    search_launch = dict(DIGIT_BITS=split.digit_bits, **launch)
    mass_key, score_key = out.mass_key, out.score_key
    wrap_triton(_split_keys_kernel)[grid](
        colsum, seen, valid, mass_key, score_key, stats, total, n, chunk, P_MODE=p_mode, **launch
    )

    def search(key: torch.Tensor, by_mass: bool) -> None:
        for step in range(n_steps):
            wrap_triton(_split_search_kernel)[grid](
                key,
                stats,
                total,
                row,
                row_above,
                given_p,
                part,
                low,
                above,
                n,
                chunk,
                step,
                float(tau),
                int(min_keep),
                BY_MASS=by_mass,
                P_MODE=p_mode,
                **search_launch,
            )

    if p_mode == _P_MASS:
        search(mass_key, by_mass=True)
    wrap_triton(_split_rank_kernel)[grid](
        score_key,
        mass_key,
        stats,
        total,
        row,
        row_above,
        part,
        low,
        above,
        n,
        chunk,
        n_steps,
        float(tau),
        P_MODE=p_mode,
        **search_launch,
    )
    search(score_key, by_mass=False)
    wrap_triton(_split_ties_kernel)[grid](
        valid,
        score_key,
        stats,
        total,
        row,
        row_above,
        given_p,
        part,
        low,
        above,
        n,
        chunk,
        n_steps,
        float(tau),
        int(min_keep),
        P_MODE=p_mode,
        **search_launch,
    )
    wrap_triton(_split_write_kernel)[grid](
        valid, score_key, out.keep, out.idx, out.count, out.ratio, stats, row, n, chunk, **launch
    )


def _stand_in(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for a kernel argument the launch's mode never reads. Never another argument: no
    tensor reaches a launch under two names, because Inductor's mutation analysis takes every pointer of these
    kernels as written (their stores sit in loops) and clones one of two aliased written arguments, a clone
    whose decomposition failed under dynamic shapes on the GPU (test_compiled_dynamic_shapes_gpu)."""
    return torch.empty(1, device=like.device, dtype=dtype)


def select_kept_triton(
    colsum: torch.Tensor,
    seen: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
    min_keep: int,
    force_ratio: float = 0.0,
    tiles: SelectTiles | SelectSplit | None = None,
) -> SelectResult:
    """Triton implementation of :func:`select_kept` (same arguments and result; ``tiles``: its launch, None:
    :func:`select_launch_for`)."""
    batch, n = colsum.shape
    tiles = tiles or select_launch_for(batch, n, sm_count(colsum.device))
    tiles.check()
    colsum, seen, valid = colsum.contiguous(), seen.contiguous(), valid.contiguous()
    if force_ratio > 0:
        p_mode = _P_GIVEN
        # the reference's float64 rounding, done beside the kernel (a Triton float argument is float32)
        given_p = torch.round(force_ratio * valid.sum(dim=-1, dtype=torch.float64)).to(torch.int64).clamp(min=1)
    else:
        p_mode = _P_ALL if tau >= 1.0 else _P_MASS
        given_p = None
    score_key = torch.empty(batch, n, device=colsum.device, dtype=torch.int32)
    out = _Rows(
        # bool tensors travel as uint8 (a dtype view of bool cannot be lowered by Inductor: copies of n bytes)
        keep=torch.empty(batch, n, device=colsum.device, dtype=torch.uint8),
        idx=torch.empty(batch, n, device=colsum.device, dtype=torch.int64),
        count=torch.empty(batch, device=colsum.device, dtype=torch.int64),
        ratio=torch.empty(batch, device=colsum.device, dtype=torch.float32),
        score_key=score_key,
        mass_key=torch.empty_like(score_key) if p_mode == _P_MASS else _stand_in(colsum, torch.int32),  # _P_MASS only
    )
    given_p = _stand_in(colsum, torch.int64) if given_p is None else given_p  # read with _P_GIVEN only
    valid_u8 = valid.to(torch.uint8)
    if isinstance(tiles, SelectSplit):
        _launch_split(colsum, seen, valid_u8, given_p, p_mode, tau, min_keep, tiles, out)
    else:
        wrap_triton(_select_kernel)[(batch,)](
            colsum,
            seen,
            valid_u8,
            given_p,
            out.mass_key,
            score_key,
            out.keep,
            out.idx,
            out.count,
            out.ratio,
            n,
            float(tau),
            int(min_keep),
            P_MODE=p_mode,
            BLOCK=tiles.block,
            DIGIT_BITS=tiles.digit_bits,
            PREFETCH=tiles.prefetch,
            num_warps=tiles.num_warps,
        )
    return SelectResult(out.keep.to(torch.bool), out.ratio, out.idx, out.count)


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
