"""Prefill probe scoring (ZipVL Eqs. 5 and 7): column sums of the probe rows' causal softmax.

Shapes and dtypes shared by every function here:
    q_probe   [B, Hq, m, d]  any float dtype: the queries of the m probe rows (RoPE applied).
    k         [B, Hkv, n, d] un-expanded keys, Hq = Hkv * n_rep (query head h reads KV head h // n_rep).
    probe_pos int64 [B, m]   position of each probe row in the sequence; -1 = no probe (contributes nothing).
    key_valid bool [B, n]    False = padding key (never seen).
    returns   (colsum, seen), both float32 [B, n]:
        colsum[b, j] = sum over query heads h and probe rows i of softmax_j(q_{h,i} . k_j * scale), the
            softmax taken in fp32 over the keys with j <= probe_pos[b, i] and key_valid[b, j];
        seen[b, j] = number of probe rows with probe_pos >= j (0 at padding keys), the Eq. 7 denominator.
    Rows whose visible set is empty contribute 0.

The Triton path. The R = n_rep * m (query head, probe row) pairs of one KV head are its score rows, ordered
probe-major (row r = probe r // n_rep of query head kvh * n_rep + r % n_rep), so a tile of ``rows`` score rows
holds consecutive probes of every head of the GQA group and no row is padding when ``rows`` divides R. Every
program holds one such row tile of q and streams the K tiles of one key split past it, so one K tile load
serves all n_rep heads (tl.dot with M = ``rows``):
    pass 1 ``_probe_lse_kernel`` (grid = (row tiles, key splits, B * Hkv)): per score row a running max and
        exp2-sum of s = q . k over the split (scores s * scale * log2 e in one FMA with the max subtracted);
    ``_probe_merge_kernel`` merges the splits into a base-2 log-sum-exp per score row;
    pass 2 ``_probe_colsum_kernel`` (same grid shape, its own split count) recomputes the transposed tile
        s^T = k . q^T [keys, rows] and sums exp2(s * scale * log2 e - lse) over its rows: a row sum inside a warp
        (no atomics, no cross-warp reduction); each program writes the column sums of its row tile to a
        [B, Hkv, row tiles, n] buffer, which torch sums over (KV head, row tile): deterministic. The programs
        of (row tile 0, KV head 0) also count ``seen``.
Masks are applied only where needed: a key tile wholly at or below every probe position of the row tile and
past every padding key of the split runs without the causal / padding select; pass 2 applies the padding mask
once per key tile, on the column sums. Key tiles past the row tile's last probe are skipped (pass 1) or
written as zeros (pass 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from zipvl_compile.runtime.kernels.attention_tiles import dot
from zipvl_compile.runtime.kernels.device import check_power_of_two, sm_count, wants_triton

_NEG = tl.constexpr(-1.0e30)  # finite "-inf" for running maxima: exp2(m_old - m_new) stays NaN-free
_SCAN = tl.constexpr(1024)  # key-validity bytes read per step when a pass-1 program looks for padding
_MERGE_ROWS = 128  # score rows per program of the split merge
_MERGE_SPLITS = 16  # splits loaded per step by the merge


@dataclasses.dataclass(frozen=True)
class ProbeTiles:
    """Launch parameters of the probe kernels (every choice gives the same result up to fp32 rounding).

    rows: score rows per tile (the M of tl.dot; a power of two >= 16); block_n: keys per tile (>= 16);
    lse_* / colsum_*: num_warps and num_stages of pass 1 / pass 2; programs_per_sm: each pass splits the keys
    until about this many programs per SM are launched (at least ``min_tiles_per_split`` key tiles each).
    """

    rows: int = 128
    block_n: int = 128
    lse_warps: int = 4  # the defaults: the fastest matching row of the H200 sweep at 32k (BENCHMARKS.md)
    lse_stages: int = 2
    colsum_warps: int = 4
    colsum_stages: int = 2
    programs_per_sm: int = 4
    min_tiles_per_split: int = 2

    def __post_init__(self) -> None:
        for name in ("rows", "block_n"):
            check_power_of_two("ProbeTiles", name, getattr(self, name), least=16)
        for name in ("lse_warps", "lse_stages", "colsum_warps", "colsum_stages", "programs_per_sm"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProbeTiles.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_tiles_per_split < 1:
            raise ValueError(f"ProbeTiles.min_tiles_per_split must be >= 1, got {self.min_tiles_per_split}")


DEFAULT_TILES = ProbeTiles()


def probe_seen(probe_pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """float32 [B, n]: number of probe rows with probe_pos >= j at valid keys j, 0 at padding keys.

    Closed form: m minus the count of probe positions below j (a ``searchsorted`` on the sorted positions;
    the -1 entries sort first and are never >= j).
    """
    batch, n = key_valid.shape
    sorted_pos = probe_pos.to(torch.int64).sort(dim=-1).values
    keys = torch.arange(n, device=key_valid.device, dtype=torch.int64).expand(batch, n).contiguous()
    below = torch.searchsorted(sorted_pos, keys)
    return (probe_pos.shape[-1] - below).to(torch.float32) * key_valid


def probe_colsum_reference(
    q_probe: torch.Tensor, k: torch.Tensor, probe_pos: torch.Tensor, key_valid: torch.Tensor, scale: float, n_rep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference (materialises [B, Hq, m, n] fp32 scores): see the module docstring."""
    n = k.shape[2]
    keys = k.float().repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q_probe.float(), keys.transpose(-1, -2)) * scale
    j = torch.arange(n, device=k.device)
    visible = (j[None, None, :] <= probe_pos[:, :, None]) & key_valid[:, None, :]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.where(visible[:, None], torch.softmax(scores, dim=-1), 0.0)
    return probs.sum(dim=(1, 2)), probe_seen(probe_pos, key_valid)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Sizes and launch values shared by the two passes of one call (ints, or SymInts under tracing)."""

    batch: int
    n_kv: int
    n_rep: int
    n_probe: int
    n_keys: int
    head_dim: int
    score_rows: int  # R = n_rep * m per KV head
    row_tiles: int
    key_tiles: int
    qk_scale: float  # scale * log2(e)

    def splits(self, tiles: ProbeTiles, device: torch.device) -> tuple[int, int]:
        """(key tiles per split, splits) so that about ``programs_per_sm`` programs per SM are launched."""
        units = self.batch * self.n_kv * self.row_tiles
        wanted = triton.cdiv(tiles.programs_per_sm * sm_count(device), units)
        n_splits = max(1, min(triton.cdiv(self.key_tiles, tiles.min_tiles_per_split), wanted))
        per_split = triton.cdiv(self.key_tiles, n_splits)
        return per_split, triton.cdiv(self.key_tiles, per_split)


@triton.jit
def _key_valid(keys, j):
    """bool [len(j)]: key j is a valid key of the row (False past n); keys: see :func:`_key_tiles`."""
    valid_row, n_keys, stride_vn = keys[1], keys[2], keys[6]
    return tl.load(valid_row + j * stride_vn, mask=j < n_keys, other=0) != 0


@triton.jit
def _row_bounds(pos, n_keys):
    """(smallest probe position >= 0 of the tile (n_keys when none), largest position (-1 when none))."""
    return tl.min(tl.where(pos >= 0, pos, n_keys)), tl.max(pos)


@triton.jit
def _clean_end(start, end, pos_min, BLOCK_N: tl.constexpr):
    """End of the key tiles from ``start`` (in BLOCK_N steps, at most ``end``) whose every key is <= pos_min."""
    return tl.minimum(start + (tl.maximum(pos_min + 1 - start, 0) // BLOCK_N) * BLOCK_N, end)


@triton.jit
def _key_tiles(
    q,
    pos,
    m_i,
    l_i,
    out_ptr,
    lo,
    hi,
    keys,
    COLSUM: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    STAGES: tl.constexpr,
):
    """The key tiles lo, lo + BLOCK_N, .. < hi against the row tile q [ROWS, BLOCK_D] -> (m_i, l_i) [ROWS].

    keys = (k_row: K of this (b, kvh), valid_row: key_valid of this b, n_keys, qk_scale, stride_kn,
    stride_kd, stride_vn). Pass 1: the online update of the running max m_i and exp2-sum l_i (out_ptr
    unused). Pass 2 (COLSUM): m_i is the rows' lse (l_i unused, both returned as given); out_ptr[j] = sum
    over the rows of exp2(s * qk_scale - lse), 0 at padding keys. Without MASKED every key of the tiles must
    be at or below every row's position, and in pass 1 valid.
    """
    k_row, n_keys, qk_scale, stride_kn, stride_kd = keys[0], keys[2], keys[3], keys[4], keys[5]
    dd = tl.arange(0, q.shape[1])
    for j0 in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        j = j0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_row + j[:, None] * stride_kn + dd[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=(j[:, None] < n_keys) & (dd[None, :] < HEAD_DIM), other=0.0)
        if COLSUM:  # keys as the M of the dot: the column sums are row sums inside a warp
            p = tl.exp2(dot(k, tl.trans(q)) * qk_scale - m_i[None, :])  # [BLOCK_N, ROWS]
            if MASKED:
                p = tl.where(j[:, None] <= pos[None, :], p, 0.0)
            tl.store(out_ptr + j, tl.where(_key_valid(keys, j), tl.sum(p, axis=1), 0.0), mask=j < n_keys)
        else:
            s = dot(q, tl.trans(k))
            if MASKED:
                s = tl.where((j[None, :] <= pos[:, None]) & _key_valid(keys, j)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # qk_scale > 0: max(s) * c = max(s * c)
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s * qk_scale - m_new[:, None]), axis=1)
            m_i = m_new
    return m_i, l_i


@triton.jit
def _probe_pass_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    valid_ptr,
    stat_ptr,
    out_ptr,
    seen_ptr,
    n_keys,
    score_rows,
    n_kv,
    n_rep,
    n_probe,
    qk_scale,
    tiles_per_split,
    n_splits,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_pb,
    stride_pm,
    stride_vb,
    stride_vn,
    COLSUM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    STAGES: tl.constexpr,
):
    """One program = (row tile t, key split, b * Hkv + kvh); pass 1, or pass 2 with COLSUM.

    Pass 1: running max and exp2-sum (base 2, scores times qk_scale) per score row over the split; writes
    stat (max) and out (sum), float32 [B, Hkv, R, n_splits] (max = _NEG, sum = 0 where the split shows the row
    no key). The split is cut in up to three runs: tiles that may hold padding (masked), tiles below every
    probe of the row tile (unmasked), the rest (masked). seen_ptr is not read.
    Pass 2: out[b, kvh, t, j] = sum over the score rows of row tile t of exp2(s * qk_scale - lse), from
    stat = lse [B, Hkv, R] float32 (base 2, +inf for rows that see nothing); out is [B, Hkv, row tiles, n]
    float32, contiguous; keys past the tile's last probe get 0. The programs of (row tile 0, KV head 0) also
    write seen[b, j] = the number of probe rows with pos >= j at valid keys j ([B, n] float32, contiguous).
    """
    t = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2) // n_kv
    kvh = tl.program_id(2) % n_kv
    # score row r = probe r // n_rep of query head kvh * n_rep + r % n_rep
    r = t * ROWS + tl.arange(0, ROWS)
    ok = r < score_rows
    i = r // n_rep
    dd = tl.arange(0, BLOCK_D)
    q_ptrs = (
        q_ptr
        + b.to(tl.int64) * stride_qb
        + (kvh * n_rep + r % n_rep)[:, None].to(tl.int64) * stride_qh
        + i[:, None] * stride_qm
        + dd[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=ok[:, None] & (dd[None, :] < HEAD_DIM), other=0.0)
    pos = tl.load(pos_ptr + b * stride_pb + i * stride_pm, mask=ok, other=-1).to(tl.int32)  # -1: no row
    pos_min, pos_max = _row_bounds(pos, n_keys)
    start = split * tiles_per_split * BLOCK_N
    split_end = tl.minimum(start + tiles_per_split * BLOCK_N, n_keys)
    end = tl.minimum(split_end, pos_max + 1)
    qk_scale = tl.cast(qk_scale, tl.float32)  # a launcher may pass the float as fp64 (Inductor does)
    k_row = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    keys = (k_row, valid_ptr + b * stride_vb, n_keys, qk_scale, stride_kn, stride_kd, stride_vn)
    if COLSUM:
        lse = tl.load(stat_ptr + (b * n_kv + kvh) * score_rows + r, mask=ok, other=float("inf"))
        clean = _clean_end(start, end, pos_min, BLOCK_N)
        out_row = out_ptr + (tl.program_id(2) * tl.num_programs(0) + t).to(tl.int64) * n_keys
        _key_tiles(q, pos, lse, lse, out_row, start, clean, keys, True, False, BLOCK_N, HEAD_DIM, STAGES)
        _key_tiles(q, pos, lse, lse, out_row, clean, end, keys, True, True, BLOCK_N, HEAD_DIM, STAGES)
        for j0 in range(start + tl.cdiv(tl.maximum(end - start, 0), BLOCK_N) * BLOCK_N, split_end, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)  # past the tile's last probe: no row sees these keys
            tl.store(out_row + j, tl.zeros([BLOCK_N], tl.float32), mask=j < split_end)
        if (t == 0) & (kvh == 0):
            for j0 in range(start, split_end, BLOCK_N):
                j = j0 + tl.arange(0, BLOCK_N)
                seen = tl.zeros([BLOCK_N], tl.int32)
                for i0 in range(0, n_probe, ROWS):
                    i = i0 + tl.arange(0, ROWS)
                    pos_i = tl.load(pos_ptr + b * stride_pb + i * stride_pm, mask=i < n_probe, other=-1)
                    seen += tl.sum((pos_i.to(tl.int32)[:, None] >= j[None, :]).to(tl.int32), axis=0)
                valid = _key_valid(keys, j)
                tl.store(seen_ptr + b * n_keys + j, tl.where(valid, seen, 0).to(tl.float32), mask=j < split_end)
    else:
        padded_end = start  # keys [start, padded_end) may hold padding, [padded_end, end) are valid
        for j0 in range(start, end, _SCAN):
            j = j0 + tl.arange(0, _SCAN)
            valid = tl.load(valid_ptr + b * stride_vb + j * stride_vn, mask=j < end, other=1) != 0
            padded_end = tl.maximum(padded_end, tl.max(tl.where(valid, 0, j + 1)))
        clean_lo = tl.minimum(start + tl.cdiv(padded_end - start, BLOCK_N) * BLOCK_N, end)
        clean_hi = tl.maximum(clean_lo, _clean_end(start, end, pos_min, BLOCK_N))
        m_i = tl.full([ROWS], _NEG, tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        m_i, l_i = _key_tiles(q, pos, m_i, l_i, out_ptr, start, clean_lo, keys, False, True, BLOCK_N, HEAD_DIM, STAGES)
        m_i, l_i = _key_tiles(
            q, pos, m_i, l_i, out_ptr, clean_lo, clean_hi, keys, False, False, BLOCK_N, HEAD_DIM, STAGES
        )
        m_i, l_i = _key_tiles(q, pos, m_i, l_i, out_ptr, clean_hi, end, keys, False, True, BLOCK_N, HEAD_DIM, STAGES)
        seeing = pos >= 0  # rows without a probe saw the unmasked tiles too: they see nothing
        at = ((b * n_kv + kvh) * score_rows + r) * n_splits + split
        tl.store(stat_ptr + at, tl.where(seeing, m_i, _NEG), mask=ok)
        tl.store(out_ptr + at, tl.where(seeing, l_i, 0.0), mask=ok)


@triton.jit
def _probe_merge_kernel(max_ptr, sum_ptr, lse_ptr, n_rows, n_splits, ROWS: tl.constexpr, SPLITS: tl.constexpr):
    """lse[r] = log2 of the merged exp2-sums of row r's key splits (+inf where the row sees no key).

    max/sum: [n_rows, n_splits] float32 from pass 1; lse: [n_rows] float32 (n_rows = B * Hkv * R).
    """
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    s = tl.arange(0, SPLITS)
    m_i = tl.full([ROWS], _NEG, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for s0 in range(0, n_splits, SPLITS):
        ok = (r[:, None] < n_rows) & (s0 + s[None, :] < n_splits)
        at = r[:, None] * n_splits + s0 + s[None, :]
        m_s = tl.load(max_ptr + at, mask=ok, other=_NEG)
        l_s = tl.load(sum_ptr + at, mask=ok, other=0.0)
        m_new = tl.maximum(m_i, tl.max(m_s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(l_s * tl.exp2(m_s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + r, tl.where(l_i > 0, m_i + tl.log2(l_i), float("inf")), mask=r < n_rows)


def _compute_operands(q_probe: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast q/k to one dtype the kernels can multiply (fp32 operands multiply exactly in the kernels).

    fp16/bf16 pairs stay as they are (fp32 accumulation); mixed or fp32 inputs run in fp32 with IEEE
    products; bf16 off CUDA goes to fp32 (the Triton interpreter has no bf16 arithmetic).
    """
    native = (torch.float16, torch.bfloat16) if q_probe.is_cuda else (torch.float16,)
    if q_probe.dtype == k.dtype and q_probe.dtype in native:
        return q_probe, k
    return q_probe.float(), k.float()


def _geometry(q: torch.Tensor, k: torch.Tensor, n_rep: int, scale: float, tiles: ProbeTiles) -> _Geometry:
    batch, n_q_heads, n_probe, head_dim = q.shape
    n_kv, n_keys = k.shape[1], k.shape[2]
    if n_q_heads != n_kv * n_rep:
        raise ValueError(f"q_probe has {n_q_heads} heads, expected Hkv * n_rep = {n_kv} * {n_rep}")
    score_rows = n_rep * n_probe
    return _Geometry(
        batch=batch,
        n_kv=n_kv,
        n_rep=n_rep,
        n_probe=n_probe,
        n_keys=n_keys,
        head_dim=head_dim,
        score_rows=score_rows,
        row_tiles=triton.cdiv(score_rows, tiles.rows),
        key_tiles=triton.cdiv(n_keys, tiles.block_n),
        qk_scale=float(scale) * math.log2(math.e),
    )


def _launch_pass(
    q: torch.Tensor,
    kk: torch.Tensor,
    probe_pos: torch.Tensor,
    key_valid: torch.Tensor,
    geo: _Geometry,
    tiles: ProbeTiles,
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    colsum: bool,
) -> None:
    """One launch of ``_probe_pass_kernel`` (pass 2 when ``colsum``) over (row tiles, key splits, B * Hkv)."""
    valid = key_valid.view(torch.uint8)
    per_split, n_splits = geo.splits(tiles, q.device)
    wrap_triton(_probe_pass_kernel)[(geo.row_tiles, n_splits, geo.batch * geo.n_kv)](
        q,
        kk,
        probe_pos,
        valid,
        *outputs,
        geo.n_keys,
        geo.score_rows,
        geo.n_kv,
        geo.n_rep,
        geo.n_probe,
        geo.qk_scale,
        per_split,
        n_splits,
        *q.stride(),
        *kk.stride(),
        *probe_pos.stride(),
        *valid.stride(),
        COLSUM=colsum,
        ROWS=tiles.rows,
        BLOCK_N=tiles.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(geo.head_dim)),
        HEAD_DIM=geo.head_dim,
        STAGES=tiles.colsum_stages if colsum else tiles.lse_stages,
        num_warps=tiles.colsum_warps if colsum else tiles.lse_warps,
    )


class ProbeArgs(NamedTuple):
    """The inputs of one probe call (shapes and dtypes in the module docstring), for the stages apart."""

    q_probe: torch.Tensor
    k: torch.Tensor
    probe_pos: torch.Tensor
    key_valid: torch.Tensor
    scale: float
    n_rep: int


def _prepare(args: ProbeArgs, tiles: ProbeTiles) -> tuple[torch.Tensor, torch.Tensor, _Geometry]:
    q, kk = _compute_operands(args.q_probe, args.k)
    return q, kk, _geometry(q, kk, args.n_rep, args.scale, tiles)


def probe_lse(args: ProbeArgs, tiles: ProbeTiles = DEFAULT_TILES) -> torch.Tensor:
    """Pass 1 and the split merge: float32 [B, Hkv, n_rep * m] base-2 log-sum-exp of each score row (row r =
    probe r // n_rep of query head kvh * n_rep + r % n_rep; +inf where the row sees no key)."""
    q, kk, geo = _prepare(args, tiles)
    n_splits = geo.splits(tiles, q.device)[1]
    n_rows = geo.batch * geo.n_kv * geo.score_rows
    part_max = torch.empty(n_rows, n_splits, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    _launch_pass(q, kk, args.probe_pos, args.key_valid, geo, tiles, (part_max, part_sum, part_sum), colsum=False)
    lse = torch.empty(geo.batch, geo.n_kv, geo.score_rows, device=q.device, dtype=torch.float32)
    wrap_triton(_probe_merge_kernel)[(triton.cdiv(n_rows, _MERGE_ROWS),)](
        part_max, part_sum, lse, n_rows, n_splits, ROWS=_MERGE_ROWS, SPLITS=_MERGE_SPLITS
    )
    return lse


def probe_colsum_from_lse(
    args: ProbeArgs, lse: torch.Tensor, tiles: ProbeTiles = DEFAULT_TILES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2: (colsum, seen) float32 [B, n] from the row log-sum-exps of :func:`probe_lse`."""
    q, kk, geo = _prepare(args, tiles)
    if lse.shape != (geo.batch, geo.n_kv, geo.score_rows) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 {(geo.batch, geo.n_kv, geo.score_rows)}, got {lse.dtype} {lse.shape}")
    partial = torch.empty(geo.batch, geo.n_kv, geo.row_tiles, geo.n_keys, device=q.device, dtype=torch.float32)
    seen = torch.empty(geo.batch, geo.n_keys, device=q.device, dtype=torch.float32)
    outputs = (lse.contiguous(), partial, seen)
    _launch_pass(q, kk, args.probe_pos, args.key_valid, geo, tiles, outputs, colsum=True)
    return partial.sum(dim=(1, 2)), seen


def probe_colsum_tiled(args: ProbeArgs, tiles: ProbeTiles = DEFAULT_TILES) -> tuple[torch.Tensor, torch.Tensor]:
    """(colsum, seen) of the Triton path with the given launch parameters: pass 1 then pass 2."""
    return probe_colsum_from_lse(args, probe_lse(args, tiles), tiles)


def probe_colsum_triton(
    q_probe: torch.Tensor, k: torch.Tensor, probe_pos: torch.Tensor, key_valid: torch.Tensor, scale: float, n_rep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`probe_colsum_reference` (same arguments and results)."""
    return probe_colsum_tiled(ProbeArgs(q_probe, k, probe_pos, key_valid, scale, n_rep))


def probe_colsum(
    q_probe: torch.Tensor,
    k: torch.Tensor,
    probe_pos: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    n_rep: int,
    *,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(colsum, seen) float32 [B, n]: Triton when ``wants_triton(q_probe, use_triton)``, else the reference.

    ``use_triton=True`` on CPU tensors needs TRITON_INTERPRET=1 set before this module was imported.
    """
    impl = probe_colsum_triton if wants_triton(q_probe, use_triton) else probe_colsum_reference
    return impl(q_probe, k, probe_pos, key_valid, scale, n_rep)
