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

The Triton path runs three kernels over all heads of the layer: ``_probe_lse_kernel`` (pass 1, grid =
(B * Hkv, probe-row blocks, key splits)) computes per (query head, probe row) a running max and exp-sum over
its key split; ``_probe_merge_kernel`` merges the splits into a base-2 log-sum-exp per row;
``_probe_colsum_kernel`` (pass 2, grid = (key blocks, B * Hkv)) recomputes exp2(s - lse) per key tile and
sums it over every probe row and the n_rep query heads of its KV head (its KV-head-0 programs also count
``seen``); torch sums the Hkv partial vectors. No atomics: results are deterministic. One program serves all
n_rep query heads of a KV head from one K tile load (rows of a tile = n_rep heads x probe rows); no
[m, n] score matrix is stored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from zipvl_compile.runtime.kernels.device import sm_count, wants_triton

# Tiles: the fastest of BLOCK_N, ROWS in {64, 128} and 4 or 8 warps on an H100 (bf16, 28/4 heads, d = 128,
# 128 probes, n = 32k: 308 us for both passes, against 360 us at 64/64).
_BLOCK_N = 128  # keys per tile
_ROWS = 128  # (query head, probe row) pairs per tile; tl.dot needs >= 16
_PROGRAMS_PER_SM = 2  # pass 1: split the keys until about this many programs per SM run
_MIN_TILES_PER_SPLIT = 2
_MERGE_ROWS = 128  # (query head, probe row) pairs per program of the split merge
_NUM_WARPS = 4
_NEG = tl.constexpr(-1.0e30)  # finite "-inf" for running maxima: exp2(m_old - m_new) stays NaN-free


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


@triton.jit
def _load_rows(
    q_ptr,
    pos_ptr,
    b,
    kvh,
    row0,
    n_probe,
    n_rep,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_pb,
    stride_pm,
    BLOCK_M: tl.constexpr,
    NREP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Row r of the tile = (query head kvh * n_rep + r // BLOCK_M, probe row row0 + r % BLOCK_M).

    Returns (q [NREP*BLOCK_M, BLOCK_D], pos [NREP*BLOCK_M] (-1 for rows outside), head, probe row, row ok).
    """
    r = tl.arange(0, NREP * BLOCK_M)
    head_local = r // BLOCK_M
    i = row0 + r % BLOCK_M
    row_ok = (head_local < n_rep) & (i < n_probe)
    head = kvh * n_rep + head_local
    dd = tl.arange(0, BLOCK_D)
    q_ptrs = (
        q_ptr
        + b.to(tl.int64) * stride_qb
        + head[:, None].to(tl.int64) * stride_qh
        + i[:, None] * stride_qm
        + dd[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (dd[None, :] < HEAD_DIM), other=0.0)
    pos = tl.load(pos_ptr + b * stride_pb + i * stride_pm, mask=row_ok, other=-1).to(tl.int32)
    return q, pos, head, i, row_ok


@triton.jit
def _load_keys(
    k_ptr,
    valid_ptr,
    b,
    kvh,
    j0,
    n_keys,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vn,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Key tile at j0: (k [BLOCK_N, BLOCK_D], key index j [BLOCK_N], valid [BLOCK_N] (False past n))."""
    j = j0 + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    in_range = j < n_keys
    k_ptrs = (
        k_ptr
        + b.to(tl.int64) * stride_kb
        + kvh.to(tl.int64) * stride_kh
        + j[:, None] * stride_kn
        + dd[None, :] * stride_kd
    )
    k = tl.load(k_ptrs, mask=in_range[:, None] & (dd[None, :] < HEAD_DIM), other=0.0)
    valid = tl.load(valid_ptr + b * stride_vb + j * stride_vn, mask=in_range, other=0) != 0
    return k, j, valid


@triton.jit
def _masked_scores(q, k, j, valid, pos, qk_scale, DOT_IEEE: tl.constexpr):
    """Base-2 logits [rows, BLOCK_N] (q.k * scale * log2 e), -inf where the key is not visible."""
    if DOT_IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    visible = (j[None, :] <= pos[:, None]) & valid[None, :]
    # a launcher may pass the float scale as fp64 (Inductor does): keep the tile in fp32
    return tl.where(visible, s * tl.cast(qk_scale, tl.float32), float("-inf"))


@triton.jit
def _probe_lse_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    valid_ptr,
    max_ptr,
    sum_ptr,
    n_keys,
    n_probe,
    n_kv,
    n_rep,
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
    BLOCK_M: tl.constexpr,
    NREP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    """Pass 1: running max and exp2-sum per (query head, probe row) over one key split.

    Writes max/sum [B, Hq, m, n_splits] float32 (max = _NEG, sum = 0 where the split sees no key).
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // n_kv
    kvh = pid_bh % n_kv
    split = tl.program_id(2)
    q, pos, head, i, row_ok = _load_rows(
        q_ptr,
        pos_ptr,
        b,
        kvh,
        tl.program_id(1) * BLOCK_M,
        n_probe,
        n_rep,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_pb,
        stride_pm,
        BLOCK_M,
        NREP,
        BLOCK_D,
        HEAD_DIM,
    )
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(tl.minimum(start + tiles_per_split * BLOCK_N, n_keys), tl.max(pos) + 1)
    m_i = tl.full([NREP * BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([NREP * BLOCK_M], tl.float32)
    for j0 in range(start, end, BLOCK_N):
        k, j, valid = _load_keys(
            k_ptr,
            valid_ptr,
            b,
            kvh,
            j0,
            n_keys,
            stride_kb,
            stride_kh,
            stride_kn,
            stride_kd,
            stride_vb,
            stride_vn,
            BLOCK_N,
            BLOCK_D,
            HEAD_DIM,
        )
        s = _masked_scores(q, k, j, valid, pos, qk_scale, DOT_IEEE)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    out = ((b * n_kv * n_rep + head) * n_probe + i) * n_splits + split
    tl.store(max_ptr + out, m_i, mask=row_ok)
    tl.store(sum_ptr + out, l_i, mask=row_ok)


@triton.jit
def _probe_merge_kernel(max_ptr, sum_ptr, lse_ptr, n_rows, n_splits, ROWS: tl.constexpr):
    """lse[r] = log2 of the merged exp2-sums of row r's key splits (+inf where the row sees no key).

    max/sum: [n_rows, n_splits] float32 from pass 1; lse: [n_rows] float32 (n_rows = B * Hq * m).
    """
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = r < n_rows
    m_i = tl.full([ROWS], _NEG, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for split in range(n_splits):
        m_s = tl.load(max_ptr + r * n_splits + split, mask=ok, other=_NEG)
        m_new = tl.maximum(m_i, m_s)
        l_s = tl.load(sum_ptr + r * n_splits + split, mask=ok, other=0.0)
        l_i = l_i * tl.exp2(m_i - m_new) + l_s * tl.exp2(m_s - m_new)
        m_i = m_new
    tl.store(lse_ptr + r, tl.where(l_i > 0, m_i + tl.log2(l_i), float("inf")), mask=ok)


@triton.jit
def _probe_colsum_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    valid_ptr,
    lse_ptr,
    out_ptr,
    seen_ptr,
    n_keys,
    n_probe,
    n_kv,
    n_rep,
    qk_scale,
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
    BLOCK_M: tl.constexpr,
    NREP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    """Pass 2: out[b, kvh, j] = sum over probe rows and the n_rep heads of kvh of exp2(s - lse).

    lse is [B, Hq, m] float32 (base 2, +inf for rows that see nothing); out is [B, Hkv, n] float32. The
    programs of KV head 0 also write seen[b, j] = the number of probe rows with pos >= j at valid keys j
    (seen is [B, n] float32, contiguous).
    """
    j0 = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv
    kvh = pid_bh % n_kv
    k, j, valid = _load_keys(
        k_ptr,
        valid_ptr,
        b,
        kvh,
        j0,
        n_keys,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vn,
        BLOCK_N,
        BLOCK_D,
        HEAD_DIM,
    )
    acc = tl.zeros([BLOCK_N], tl.float32)
    for row0 in range(0, n_probe, BLOCK_M):
        q, pos, head, i, row_ok = _load_rows(
            q_ptr,
            pos_ptr,
            b,
            kvh,
            row0,
            n_probe,
            n_rep,
            stride_qb,
            stride_qh,
            stride_qm,
            stride_qd,
            stride_pb,
            stride_pm,
            BLOCK_M,
            NREP,
            BLOCK_D,
            HEAD_DIM,
        )
        if j0 <= tl.max(pos):
            lse = tl.load(lse_ptr + (b * n_kv * n_rep + head) * n_probe + i, mask=row_ok, other=float("inf"))
            s = _masked_scores(q, k, j, valid, pos, qk_scale, DOT_IEEE)
            acc += tl.sum(tl.exp2(s - lse[:, None]), axis=0)
    tl.store(out_ptr + pid_bh * n_keys + j, acc, mask=j < n_keys)
    if kvh == 0:  # a loop of its own: no registers taken from the score tile above
        seen = tl.zeros([BLOCK_N], tl.int32)
        for i0 in range(0, n_probe, NREP * BLOCK_M):
            i = i0 + tl.arange(0, NREP * BLOCK_M)
            pos = tl.load(pos_ptr + b * stride_pb + i * stride_pm, mask=i < n_probe, other=-1).to(tl.int32)
            seen += tl.sum((pos[:, None] >= j[None, :]).to(tl.int32), axis=0)
        tl.store(seen_ptr + b * n_keys + j, tl.where(valid, seen, 0).to(tl.float32), mask=j < n_keys)


def _compute_operands(q_probe: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Cast q/k to one dtype the kernels can multiply; returns (q, k, dot in exact fp32).

    fp16/bf16 pairs stay as they are (fp32 accumulation); mixed or fp32 inputs run in fp32 with IEEE
    products; bf16 off CUDA goes to fp32 (the Triton interpreter has no bf16 arithmetic).
    """
    native = (torch.float16, torch.bfloat16) if q_probe.is_cuda else (torch.float16,)
    if q_probe.dtype == k.dtype and q_probe.dtype in native:
        return q_probe, k, False
    return q_probe.float(), k.float(), True


def probe_colsum_triton(
    q_probe: torch.Tensor, k: torch.Tensor, probe_pos: torch.Tensor, key_valid: torch.Tensor, scale: float, n_rep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`probe_colsum_reference` (same arguments and results)."""
    batch, n_q_heads, n_probe, head_dim = q_probe.shape
    n_kv, n_keys = k.shape[1], k.shape[2]
    q, kk, dot_ieee = _compute_operands(q_probe, k)
    valid = key_valid.view(torch.uint8)
    nrep_p2 = triton.next_power_of_2(n_rep)
    meta = dict(
        BLOCK_M=max(1, _ROWS // nrep_p2),
        NREP=nrep_p2,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HEAD_DIM=head_dim,
        DOT_IEEE=dot_ieee,
        num_warps=_NUM_WARPS,
    )
    qk_scale = float(scale) * math.log2(math.e)
    strides = (*q.stride(), *kk.stride(), *probe_pos.stride(), *valid.stride())
    row_blocks = triton.cdiv(n_probe, meta["BLOCK_M"])
    n_tiles = triton.cdiv(n_keys, _BLOCK_N)
    target_programs = _PROGRAMS_PER_SM * sm_count(q.device)
    n_splits = max(
        1, min(triton.cdiv(n_tiles, _MIN_TILES_PER_SPLIT), triton.cdiv(target_programs, batch * n_kv * row_blocks))
    )
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)

    part_max = torch.empty(batch, n_q_heads, n_probe, n_splits, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    wrap_triton(_probe_lse_kernel)[(batch * n_kv, row_blocks, n_splits)](
        q,
        kk,
        probe_pos,
        valid,
        part_max,
        part_sum,
        n_keys,
        n_probe,
        n_kv,
        n_rep,
        qk_scale,
        tiles_per_split,
        n_splits,
        *strides,
        **meta,
    )
    n_rows = batch * n_q_heads * n_probe
    lse = torch.empty(batch, n_q_heads, n_probe, device=q.device, dtype=torch.float32)
    wrap_triton(_probe_merge_kernel)[(triton.cdiv(n_rows, _MERGE_ROWS),)](
        part_max, part_sum, lse, n_rows, n_splits, ROWS=_MERGE_ROWS
    )

    partial = torch.empty(batch, n_kv, n_keys, device=q.device, dtype=torch.float32)
    seen = torch.empty(batch, n_keys, device=q.device, dtype=torch.float32)
    wrap_triton(_probe_colsum_kernel)[(n_tiles, batch * n_kv)](
        q,
        kk,
        probe_pos,
        valid,
        lse,
        partial,
        seen,
        n_keys,
        n_probe,
        n_kv,
        n_rep,
        qk_scale,
        *strides,
        **meta,
    )
    return partial.sum(dim=1), seen


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
