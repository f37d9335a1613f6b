"""Kept-set selection (ZipVL Eqs. 6-8) without a sort: radix threshold searches spread over many programs.

:func:`select_kept` computes what :func:`~zipvl_compile.runtime.selection.select_tokens` followed by
:func:`~zipvl_compile.runtime.kernels.kept_attention.keep_to_index` compute (those two stay the plain-torch
reference) with no host sync and fixed output shapes (with ``force_ratio`` > 0, a benchmark-only mode, p is
rounded by two small torch ops beside the kernels).

Shapes and dtypes:
    colsum, seen  float32 [B, n]  from ``probe_colsum``; colsum >= 0 and finite (a sum of probabilities).
    valid         bool [B, n]     False = padding key.
    returns :class:`SelectResult`: keep bool [B, n], ratio float32 [B], idx int64 [B, n] (the kept positions
    ascending, then the others ascending), count int64 [B] (the kept count).

Every launch has the grid (chunks of ``SelectTiles.chunk`` positions, B), so one row spreads over many SMs.
Per-chunk results go to small buffers; the last program of a row to finish (an atomic arrival counter per
launch and row elects it) combines them in chunk order, so the result is deterministic, and leaves the row
state (counts, prefixes, p, q) for the next launch. Keys are float32 bit patterns made monotone under signed
int32 comparison; padding gets the smallest int32, below every valid key.
    1. prep: the order keys of the score s = colsum / seen (0 where seen == 0) and, for Eq. 6, of colsum to
       int32 scratch rows; the valid count, the last valid position, the fp64 total of the valid colsum.
    2. Eq. 6 (32 / digit_bits launches): a most-significant-digit-first radix search over the colsum keys:
       each launch histograms the next digit (counts and fp64 mass) of the keys matching the prefix found so
       far; the combining program keeps the largest digit whose "sum of values >= candidate" reaches
       tau * total. The result t is the largest key with sum(colsum >= t) >= tau * total; then p = count(> t)
       + the number of values equal to t needed to reach tau * total on top of sum(> t). Sums are fp64, so p
       is the exact smallest p whose p largest values hold tau of the mass (the reference's float32 prefix
       sums can differ from it by one key where a prefix sum lies within float32 rounding of tau * total).
    3. the same search with counts on the score keys finds the q-th largest score; its first launch also
       counts the rank of the last valid token in score order (higher scores plus equal scores at lower
       positions), from which, with p and ``min_keep``, follows q: the size of the score-ordered prefix to
       keep besides the forced last token. Ties at the threshold go to the lower positions, the stable
       descending sort's order. The last launch's combining program turns the per-chunk histograms of every
       level into each chunk's count of kept tokens and of tied keys before it.
    4. compact: keep, and idx by the chunk's offsets plus a running count inside the chunk.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from zipvl_compile.runtime.kernels.device import wants_triton
from zipvl_compile.runtime.kernels.kept_attention import keep_to_index
from zipvl_compile.runtime.selection import select_tokens

_PADDING_KEY = tl.constexpr(-(2**31))  # the smallest int32: below every valid key (valid keys are >= 0)

# how p (the Eq. 6 count) is found; a kernel constexpr
_P_ALL = 0  # tau >= 1: every valid key
_P_MASS = 1  # Eq. 6 by the threshold search
_P_GIVEN = 2  # force_ratio > 0: p computed beside the kernel

# slots of the int64 row state [B, _SLOTS] that each launch leaves for the next ones
_N_VALID = tl.constexpr(0)
_LAST = tl.constexpr(1)  # last valid position (-1: none)
_P = tl.constexpr(2)
_Q = tl.constexpr(3)  # score-ordered keys to keep besides the forced last token
_COUNT = tl.constexpr(4)
_RANK_LAST = tl.constexpr(5)
_MASS_PREFIX = tl.constexpr(6)  # the colsum threshold's leading bits found so far (unsigned order, key + 2**31)
_MASS_GT = tl.constexpr(7)  # count of colsum keys above that prefix
_SCORE_PREFIX = tl.constexpr(8)  # the same for the score search
_SCORE_GT = tl.constexpr(9)
_SLOTS = tl.constexpr(10)
# slots of the float64 row state [B, 2]
_TOTAL = tl.constexpr(0)  # fp64 sum of the valid colsum
_MASS_ABOVE = tl.constexpr(1)  # fp64 sum of the colsum keys above the mass prefix


@dataclasses.dataclass(frozen=True)
class SelectTiles:
    """Launch parameters of the selection kernels (every choice gives the same result).

    chunk: positions per program (a power of two >= 16); digit_bits: bits of the threshold decided per launch
    (1, 2, 4 or 8: 32 / digit_bits launches per search, histograms of 2**digit_bits bins); num_warps.
    """

    chunk: int = 1024
    digit_bits: int = 8
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise ValueError(f"SelectTiles.chunk must be a power of two >= 16, got {self.chunk}")
        if self.digit_bits not in (1, 2, 4, 8):
            raise ValueError(f"SelectTiles.digit_bits must be 1, 2, 4 or 8, got {self.digit_bits}")
        if self.num_warps < 1:
            raise ValueError(f"SelectTiles.num_warps must be >= 1, got {self.num_warps}")


DEFAULT_TILES = SelectTiles()
_COMBINE = 16  # chunks read per step by the program that combines a launch's per-chunk results


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
def _arrive(counter_ptr, n_programs):
    """True in the program that arrives last at this launch's counter; what every program stored before its
    arrival is then visible to it (read it with cache_modifier=".cg")."""
    tl.debug_barrier()  # this program's stores are done before its arrival is counted
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel") == n_programs - 1


@triton.jit
def _chunk_sum(ptr, b, n_chunks, COMBINE: tl.constexpr):
    """Sum over c of ptr[b * n_chunks + c] (a [B, n_chunks] buffer of this launch), in chunk order."""
    c = tl.arange(0, COMBINE)
    acc = tl.load(ptr + b * n_chunks + c, mask=c < n_chunks, other=0, cache_modifier=".cg")
    for c0 in range(COMBINE, n_chunks, COMBINE):
        acc += tl.load(ptr + b * n_chunks + c0 + c, mask=c0 + c < n_chunks, other=0, cache_modifier=".cg")
    return tl.sum(acc)


@triton.jit
def _select_prep_kernel(
    colsum_ptr,
    seen_ptr,
    valid_ptr,
    given_p_ptr,
    mass_key_ptr,
    score_key_ptr,
    part_valid_ptr,
    part_last_ptr,
    part_total_ptr,
    state_ptr,
    fstate_ptr,
    counter_ptr,
    n,
    n_chunks,
    P_MODE: tl.constexpr,
    CHUNK: tl.constexpr,
    COMBINE: tl.constexpr,
):
    """Program (chunk c, row b): order keys of the score (and with P_MODE == _P_MASS of colsum) to the int32
    scratch rows, the chunk's valid count, last valid position and fp64 colsum total; the last program of a
    row combines them into the row state (and p unless P_MODE == _P_MASS)."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = c * CHUNK + tl.arange(0, CHUNK)
    at = b * n + pos
    ok = tl.load(valid_ptr + at, mask=pos < n, other=0) != 0
    colsum = tl.load(colsum_ptr + at, mask=ok, other=0.0)
    seen = tl.load(seen_ptr + at, mask=ok, other=0.0)
    score = tl.where(seen > 0, tl.math.div_rn(colsum, tl.maximum(seen, 1.0)), 0.0)
    tl.store(score_key_ptr + at, tl.where(ok, _order_key(score), _PADDING_KEY), mask=pos < n)
    part = b * n_chunks + c
    tl.store(part_valid_ptr + part, tl.sum(ok.to(tl.int32)))
    tl.store(part_last_ptr + part, tl.max(tl.where(ok, pos, -1)))
    if P_MODE == 1:
        tl.store(mass_key_ptr + at, tl.where(ok, _order_key(colsum), _PADDING_KEY), mask=pos < n)
        tl.store(part_total_ptr + part, tl.sum(colsum.to(tl.float64)))
    if _arrive(counter_ptr + b, n_chunks):
        n_valid = _chunk_sum(part_valid_ptr, b, n_chunks, COMBINE)
        last = tl.full([], -1, tl.int32)
        for c0 in range(0, n_chunks, COMBINE):
            cc = c0 + tl.arange(0, COMBINE)
            part_last = tl.load(part_last_ptr + b * n_chunks + cc, mask=cc < n_chunks, other=-1, cache_modifier=".cg")
            last = tl.maximum(last, tl.max(part_last))
        tl.store(state_ptr + b * _SLOTS + _N_VALID, n_valid.to(tl.int64))
        tl.store(state_ptr + b * _SLOTS + _LAST, last.to(tl.int64))
        if P_MODE == 0:
            tl.store(state_ptr + b * _SLOTS + _P, n_valid.to(tl.int64))
        elif P_MODE == 1:
            tl.store(fstate_ptr + b * 2 + _TOTAL, _chunk_sum(part_total_ptr, b, n_chunks, COMBINE))
        else:
            tl.store(state_ptr + b * _SLOTS + _P, tl.minimum(tl.load(given_p_ptr + b), n_valid.to(tl.int64)))


@triton.jit
def _kept_count(p, n_valid, rank_last, min_keep):
    """(q, count): keep the q best scores plus the last valid token; q >= p is the least that reaches
    min(min_keep, n_valid) kept tokens."""
    floor = tl.minimum(min_keep, n_valid)
    with_last = p + (rank_last >= p).to(tl.int64)
    q = tl.where(with_last >= floor, p, tl.where(rank_last >= floor - 1, floor - 1, floor))
    return q, tl.where(n_valid > 0, q + (rank_last >= q).to(tl.int64), 0)


@triton.jit
def _chunk_offsets(
    hist_ptr, offsets_ptr, b, n_chunks, n_levels, prefix, ties_wanted, last, extra_last, COMBINE, DIGIT_BITS, CHUNK
):
    """Per chunk c of row b: offsets[b, c] = (kept tokens before the chunk, tied keys before the chunk), from
    the score histograms of every level [levels, B, n_chunks, 2**DIGIT_BITS] and the final prefix (the
    threshold); extra_last: the forced last token is kept beyond the score-ordered ones."""
    radix: tl.constexpr = 1 << DIGIT_BITS
    bins = tl.arange(0, radix)
    kept_run = tl.full([], 0, tl.int64)
    ties_run = tl.full([], 0, tl.int64)
    for c0 in range(0, n_chunks, COMBINE):
        cc = c0 + tl.arange(0, COMBINE)
        in_row = cc < n_chunks
        above = tl.zeros([COMBINE], tl.int64)
        ties = tl.zeros([COMBINE], tl.int64)
        for level in range(n_levels):
            shift = 32 - DIGIT_BITS * (level + 1)
            d = ((prefix >> shift) & (radix - 1)).to(tl.int32)
            at = ((level * tl.num_programs(1) + b) * n_chunks + cc)[:, None] * radix + bins[None, :]
            h = tl.load(hist_ptr + at, mask=in_row[:, None], other=0, cache_modifier=".cg").to(tl.int64)
            above += tl.sum(tl.where(bins[None, :] > d, h, 0), axis=1)
            if level == n_levels - 1:
                ties = tl.sum(tl.where(bins[None, :] == d, h, 0), axis=1)
        ties_before = ties_run + tl.cumsum(ties, axis=0) - ties
        kept = above + tl.minimum(tl.maximum(ties_wanted - ties_before, 0), ties)
        kept_before = kept_run + tl.cumsum(kept, axis=0) - kept + (extra_last & (cc * CHUNK > last)).to(tl.int64)
        tl.store(offsets_ptr + (b * n_chunks + cc) * 2, kept_before, mask=in_row)
        tl.store(offsets_ptr + (b * n_chunks + cc) * 2 + 1, ties_before, mask=in_row)
        kept_run += tl.sum(kept)
        ties_run += tl.sum(ties)


@triton.jit
def _next_digit(key, prefix, shift, DIGIT_BITS: tl.constexpr):
    """(the DIGIT_BITS-bit digit of the int32 keys at bit ``shift`` as int32, whether the key is valid and its
    bits above the digit equal those of ``prefix``: int64 in unsigned order, key + 2**31)."""
    ukey = key.to(tl.int64) + (1 << 31)
    match = (key != _PADDING_KEY) & ((ukey >> (shift + DIGIT_BITS)) == (prefix >> (shift + DIGIT_BITS)))
    return ((ukey >> shift) & ((1 << DIGIT_BITS) - 1)).to(tl.int32), match


@triton.jit
def _select_level_kernel(
    key_ptr,
    hist_ptr,
    mass_hist_ptr,
    part_rank_ptr,
    state_ptr,
    fstate_ptr,
    offsets_ptr,
    counter_ptr,
    n,
    n_chunks,
    level,
    n_levels,
    tau,
    min_keep,
    BY_MASS: tl.constexpr,
    CHUNK: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    COMBINE: tl.constexpr,
    SLICE: tl.constexpr,
):
    """One level of a threshold search, program (chunk c, row b); see the module docstring.

    Every program: the histogram over 2**DIGIT_BITS bins of the next digit of the keys (key_ptr: int32
    [B, n]) that match the prefix found so far -> hist [levels, B, n_chunks, bins] int32 counts, with BY_MASS
    also mass_hist (same shape, fp64 sums of the values); at level 0 of the score search also the chunk's
    count of keys before the last valid token in score order (part_rank [B, n_chunks]). The row's last
    program combines the histograms in chunk order and extends the prefix by the largest digit whose
    "aggregate of keys >= candidate" reaches the target (tau * total mass, or q); after the last mass level
    it sets p, at score level 0 q and the count, after the last score level the chunk offsets.
    """
    radix: tl.constexpr = 1 << DIGIT_BITS
    bins = tl.arange(0, radix)
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    shift = 32 - DIGIT_BITS * (level + 1)
    row = state_ptr + b * _SLOTS
    prefix_slot: tl.constexpr = _MASS_PREFIX if BY_MASS else _SCORE_PREFIX
    gt_slot: tl.constexpr = _MASS_GT if BY_MASS else _SCORE_GT
    prefix = tl.load(row + prefix_slot)

    pos = c * CHUNK + tl.arange(0, CHUNK)
    key = tl.load(key_ptr + b * n + pos, mask=pos < n, other=_PADDING_KEY)
    digit, match = _next_digit(key, prefix, shift, DIGIT_BITS)
    hist_at = ((level * tl.num_programs(1) + b) * n_chunks + c) * radix + bins
    tl.store(hist_ptr + hist_at, tl.histogram(digit, radix, mask=match))
    if BY_MASS:  # a weighted histogram: one-hot slices of SLICE positions
        mass = tl.zeros([radix], tl.float64)
        for s0 in range(0, CHUNK, SLICE):
            sp = c * CHUNK + s0 + tl.arange(0, SLICE)
            skey = tl.load(key_ptr + b * n + sp, mask=sp < n, other=_PADDING_KEY)
            sdigit, smatch = _next_digit(skey, prefix, shift, DIGIT_BITS)
            hit = (sdigit[:, None] == bins[None, :]) & smatch[:, None]
            mass += tl.sum(tl.where(hit, _key_value(skey).to(tl.float64)[:, None], 0.0), axis=0)
        tl.store(mass_hist_ptr + hist_at, mass)
    elif level == 0:
        last = tl.load(row + _LAST).to(tl.int32)
        last_key = tl.load(key_ptr + b * n + tl.maximum(last, 0))
        before = (key > last_key) | ((key == last_key) & (pos < last))
        tl.store(part_rank_ptr + b * n_chunks + c, tl.sum((before & (key != _PADDING_KEY)).to(tl.int32)))

    if _arrive(counter_ptr + b, n_chunks):
        count = tl.zeros([radix], tl.int64)
        agg = tl.zeros([radix], tl.float64)
        for c0 in range(0, n_chunks, COMBINE):
            cc = c0 + tl.arange(0, COMBINE)
            at = ((level * tl.num_programs(1) + b) * n_chunks + cc)[:, None] * radix + bins[None, :]
            in_row = (cc < n_chunks)[:, None]
            count += tl.sum(tl.load(hist_ptr + at, mask=in_row, other=0, cache_modifier=".cg").to(tl.int64), axis=0)
            if BY_MASS:
                agg += tl.sum(tl.load(mass_hist_ptr + at, mask=in_row, other=0.0, cache_modifier=".cg"), axis=0)
        n_valid = tl.load(row + _N_VALID)
        if BY_MASS:
            target = tl.cast(tau, tl.float32).to(tl.float64) * tl.load(fstate_ptr + b * 2 + _TOTAL)
            above = tl.load(fstate_ptr + b * 2 + _MASS_ABOVE)
        else:
            q = tl.load(row + _Q)  # set at level 0 (below), read by the later launches
            if level == 0:  # no reads of what this program stores: its stores are not ordered before them
                rank_last = _chunk_sum(part_rank_ptr, b, n_chunks, COMBINE).to(tl.int64)
                q, kept = _kept_count(tl.load(row + _P), n_valid, rank_last, min_keep)
                tl.store(row + _RANK_LAST, rank_last)
                tl.store(row + _Q, q)
                tl.store(row + _COUNT, kept)
            target = q.to(tl.float64)
            agg = count.to(tl.float64)  # counts below 2**53: exact
            above = tl.load(row + gt_slot).to(tl.float64)
        # agg(keys >= candidate) falls as the candidate's digit rises: the passing digits are a prefix
        at_least = above + tl.cumsum(agg, axis=0, reverse=True)
        d = tl.sum(((at_least >= target) | (bins == 0)).to(tl.int32)) - 1
        higher = bins > d
        prefix += d.to(tl.int64) << shift
        gt = tl.load(row + gt_slot) + tl.sum(tl.where(higher, count, 0))
        tl.store(row + prefix_slot, prefix)
        tl.store(row + gt_slot, gt)
        if BY_MASS:
            above += tl.sum(tl.where(higher, agg, 0.0))
            tl.store(fstate_ptr + b * 2 + _MASS_ABOVE, above)
            if level == n_levels - 1:
                # values equal to t, each worth t, fill the gap between sum(> t) and tau * total
                t = _key_value((prefix - (1 << 31)).to(tl.int32)).to(tl.float64)
                gap = target - above
                fill = tl.where(gap > 0, gap / tl.where(t > 0, t, 1.0), 0.0)
                ties = fill.to(tl.int64)
                ties = tl.minimum(
                    ties + (ties.to(tl.float64) < fill).to(tl.int64), tl.sum(tl.where(bins == d, count, 0))
                )
                tl.store(row + _P, tl.minimum(tl.maximum(gt + ties, 1), n_valid))
        elif level == n_levels - 1:
            q = tl.load(row + _Q)
            last = tl.load(row + _LAST)
            extra_last = (tl.load(row + _RANK_LAST) >= q) & (last >= 0)  # the forced last token, if any
            _chunk_offsets(
                hist_ptr,
                offsets_ptr,
                b,
                n_chunks,
                n_levels,
                prefix,
                q - gt,
                last,
                extra_last,
                COMBINE,
                DIGIT_BITS,
                CHUNK,
            )


@triton.jit
def _select_compact_kernel(
    score_key_ptr,
    valid_ptr,
    state_ptr,
    offsets_ptr,
    keep_ptr,
    idx_ptr,
    count_ptr,
    ratio_ptr,
    n,
    n_chunks,
    CHUNK: tl.constexpr,
):
    """Program (chunk c, row b): keep and idx of the chunk's positions from the score threshold and the
    chunk's offsets (a kept position -> its rank among the kept, another -> count + its rank among the
    others); chunk 0 writes count and ratio."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = state_ptr + b * _SLOTS
    t = (tl.load(row + _SCORE_PREFIX) - (1 << 31)).to(tl.int32)
    ties_wanted = tl.load(row + _Q) - tl.load(row + _SCORE_GT)
    last = tl.load(row + _LAST)
    count = tl.load(row + _COUNT)
    kept_before = tl.load(offsets_ptr + (b * n_chunks + c) * 2)
    ties_before = tl.load(offsets_ptr + (b * n_chunks + c) * 2 + 1)
    pos = c * CHUNK + tl.arange(0, CHUNK)
    at = b * n + pos
    ok = tl.load(valid_ptr + at, mask=pos < n, other=0) != 0
    key = tl.load(score_key_ptr + at, mask=pos < n, other=_PADDING_KEY)
    tie = (ok & (key == t)).to(tl.int64)
    tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
    keep = ok & ((key > t) | ((tie != 0) & (tie_rank < ties_wanted)) | (pos == last))
    kept = keep.to(tl.int64)
    kept_rank = kept_before + tl.cumsum(kept, axis=0) - kept
    dest = tl.where(keep, kept_rank, count + pos - kept_rank)
    tl.store(keep_ptr + at, kept.to(tl.uint8), mask=pos < n)
    tl.store(idx_ptr + b * n + dest, pos.to(tl.int64), mask=pos < n)
    if c == 0:
        n_valid = tl.load(row + _N_VALID)
        tl.store(count_ptr + b, count)
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
    colsum: Tensor,
    seen: Tensor,
    valid: Tensor,
    tau: float,
    min_keep: int,
    force_ratio: float = 0.0,
    tiles: SelectTiles = DEFAULT_TILES,
) -> SelectResult:
    """Triton implementation of :func:`select_kept` (same arguments and result; ``tiles``: launch parameters)."""
    batch, n = colsum.shape
    device = colsum.device
    colsum, seen, valid = colsum.contiguous(), seen.contiguous(), valid.contiguous()
    if force_ratio > 0:
        p_mode = _P_GIVEN
        # the reference's float64 rounding, done beside the kernel (a Triton float argument is float32)
        given_p = torch.round(force_ratio * valid.sum(dim=-1, dtype=torch.float64)).to(torch.int64).clamp(min=1)
    else:
        p_mode = _P_ALL if tau >= 1.0 else _P_MASS
        given_p = None
    n_chunks = triton.cdiv(n, tiles.chunk)
    n_levels = 32 // tiles.digit_bits
    searches = 2 if p_mode == _P_MASS else 1
    radix = 1 << tiles.digit_bits
    # int64 row state and an arrival counter per launch and row in one zeroed buffer; float64 row state
    zeroed = torch.zeros(batch * _SLOTS.value + (1 + searches * n_levels) * batch, device=device, dtype=torch.int64)
    state, counters = zeroed[: batch * _SLOTS.value], zeroed[batch * _SLOTS.value :]
    fstate = torch.zeros(batch, 2, device=device, dtype=torch.float64)
    score_key = torch.empty(batch, n, device=device, dtype=torch.int32)
    mass_key = torch.empty_like(score_key) if p_mode == _P_MASS else score_key  # unused unless _P_MASS
    part = torch.empty(3, batch, n_chunks, device=device, dtype=torch.int32)  # valid count, last valid, rank
    part_total = torch.empty(batch, n_chunks, device=device, dtype=torch.float64)
    hist = torch.empty(searches, n_levels, batch, n_chunks, radix, device=device, dtype=torch.int32)
    mass_hist = torch.empty(
        n_levels if p_mode == _P_MASS else 1, batch, n_chunks, radix, device=device, dtype=torch.float64
    )
    offsets = torch.empty(batch, n_chunks, 2, device=device, dtype=torch.int64)
    # bool tensors travel as uint8 (a dtype view of bool cannot be lowered by Inductor: copies of n bytes)
    keep = torch.empty(batch, n, device=device, dtype=torch.uint8)
    idx = torch.empty(batch, n, device=device, dtype=torch.int64)
    count = torch.empty(batch, device=device, dtype=torch.int64)
    ratio = torch.empty(batch, device=device, dtype=torch.float32)
    valid8 = valid.to(torch.uint8)
    grid = (n_chunks, batch)
    meta = dict(CHUNK=tiles.chunk, num_warps=tiles.num_warps)
    wrap_triton(_select_prep_kernel)[grid](
        colsum,
        seen,
        valid8,
        count if given_p is None else given_p,  # unused unless _P_GIVEN
        mass_key,
        score_key,
        part[0],
        part[1],
        part_total,
        state,
        fstate,
        counters,
        n,
        n_chunks,
        P_MODE=p_mode,
        COMBINE=_COMBINE,
        **meta,
    )
    launch = 1
    for search in range(searches):
        by_mass = search == 0 and p_mode == _P_MASS
        for level in range(n_levels):
            wrap_triton(_select_level_kernel)[grid](
                mass_key if by_mass else score_key,
                hist[search],
                mass_hist,
                part[2],
                state,
                fstate,
                offsets,
                counters[launch * batch :],
                n,
                n_chunks,
                level,
                n_levels,
                float(tau),
                int(min_keep),
                BY_MASS=by_mass,
                DIGIT_BITS=tiles.digit_bits,
                COMBINE=_COMBINE,
                SLICE=min(tiles.chunk, max(16, 4096 // radix)),
                **meta,
            )
            launch += 1
    wrap_triton(_select_compact_kernel)[grid](
        score_key, valid8, state, offsets, keep, idx, count, ratio, n, n_chunks, **meta
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

    Same selection as :func:`~zipvl_compile.runtime.selection.select_tokens` (its docstring defines it),
    with Eq. 6's p computed from exact (fp64) sums; ``use_triton`` as in ``kernels/device.py`` (None: Triton
    on CUDA tensors, else ``select_tokens`` + ``keep_to_index``).
    """
    _check(colsum, seen, valid, min_keep, force_ratio)
    if wants_triton(colsum, use_triton):
        return select_kept_triton(colsum, seen, valid, tau, min_keep, force_ratio)
    keep, ratio = select_tokens(colsum, seen, valid, tau, min_keep, force_ratio)
    idx, count = keep_to_index(keep)
    return SelectResult(keep, ratio, idx, count)
