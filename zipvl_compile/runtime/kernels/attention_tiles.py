"""Pieces shared by the prefill attention kernels of :mod:`local_attention` and :mod:`sink_attention` (and
:func:`dot`, by :mod:`probe` too): the ``@triton.jit`` tile helpers below and :func:`masked_attention_reference`,
the plain-torch core of both references.

Both kernels run one online softmax in base 2 (scores pre-scaled by ``qk_scale = scale * log2(e)``) over key
tiles gathered from rows of K and V, then divide by the running sum. These ``@triton.jit`` helpers are inlined
into each kernel: sharing them costs nothing at run time. Names used below:

    strides   a tensor's four strides as a tuple, in its dimension order (the kernels take ``x.stride()``).
    kv        (k_base, v_base, k_stride, v_stride): pointers [1, BLOCK_D] to channel d of sequence row 0 of the
              program's KV head in K and V, and the sequence strides; key j of a tile is at k_base + j * k_stride.
    state     (m_i fp32 [M], l_i fp32 [M], acc fp32 [M, BLOCK_D]): the running max (base 2), the running sum of
              exponentials and the unnormalised output of the M tile rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zipvl_compile.runtime.kernels.plan import PrefillPlan


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, plan: PrefillPlan
) -> torch.Tensor:
    """fp32 SDPA of q [B, Hq, n, d] over k, v [B, Hkv, n, d] (Hq = Hkv * plan.n_rep, logits times
    ``plan.scale``) under the bool ``mask`` [B, 1, n, n]; zeros at the rows where ``plan.valid`` [B, n] is False
    (also dropping the NaN of rows without an allowed key). Returns [B, Hq, n, d] in q's dtype, memory
    (B, n, Hq, d)."""
    k, v = (x.float().repeat_interleave(plan.n_rep, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=plan.scale)
    out = torch.where(plan.valid[:, None, :, None], out, 0.0).to(q.dtype)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def flag_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool [B, n] mask as the tile kernels read per-token flags: uint8, contiguous (a view, no copy, when
    the mask already is contiguous)."""
    return mask.contiguous().view(torch.uint8)


@triton.jit
def dot(a, b):
    """a [M, K] @ b [K, N] with fp32 accumulation; fp32 operands multiply exactly (tl.dot alone would round
    them to tf32 on the GPU), 16-bit ones on the tensor cores as they are."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def tile_ptrs(ptr, b, i1, i2, d, strides):
    """Pointers ptr + b * s0 + i1 * s1 + i2 * s2 + d * s3 (``strides`` = (s0, s1, s2, s3)), d a channel
    vector [BLOCK_D]; i1 / i2 scalars or [M, 1] columns."""
    return ptr + b * strides[0] + i1 * strides[1] + i2 * strides[2] + d[None, :] * strides[3]


@triton.jit
def kv_rows(k_ptr, v_ptr, b, kvh, d, k_strides, v_strides):
    """The ``kv`` tuple of batch row b (int64) and KV head kvh (int64) of [B, Hkv, n, d] K and V."""
    k_base = k_ptr + b * k_strides[0] + kvh * k_strides[1] + d[None, :] * k_strides[3]
    v_base = v_ptr + b * v_strides[0] + kvh * v_strides[1] + d[None, :] * v_strides[3]
    return k_base, v_base, k_strides[2], v_strides[2]


@triton.jit
def initial_state(M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The ``state`` before any key: m_i = -inf, l_i = 0, acc = 0."""
    return tl.full([M], float("-inf"), tl.float32), tl.zeros([M], tl.float32), tl.zeros([M, BLOCK_D], tl.float32)


@triton.jit
def attend_tile(q, kv, keys, key_ok, d_ok, allowed, state, qk_scale):
    """One key tile of the online softmax: q [M, BLOCK_D] against the key rows ``keys`` [BLOCK_N] of ``kv``
    -> the new ``state``. Rows where ``key_ok`` [BLOCK_N] (None: every row) and channels where ``d_ok``
    [BLOCK_D] are loaded, the rest reads 0. Only the ``allowed`` [M, BLOCK_N] keys count, and rows with no
    allowed key so far keep m_i = -inf; ``allowed`` None: every key of the tile counts."""
    k_base, v_base, k_stride, v_stride = kv
    m_i, l_i, acc = state
    k_ptrs = k_base + keys[:, None] * k_stride
    v_ptrs = v_base + keys[:, None] * v_stride
    if key_ok is None:
        load_mask = d_ok[None, :]
    else:
        load_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptrs, mask=load_mask, other=0.0)
    s = dot(q, tl.trans(k)) * qk_scale
    if allowed is not None:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if allowed is not None:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    v = tl.load(v_ptrs, mask=load_mask, other=0.0)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _window_tile(
    q,
    kv,
    state,
    pos,
    j0,
    end,
    window,
    valid_row,
    keep_row,
    row_keep,
    d_ok,
    qk_scale,
    INTERIOR: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One tile of :func:`attend_window` at keys [j0, j0 + BLOCK_N); INTERIOR: every key of it is inside every
    row's window (no position masks)."""
    cols = j0 + tl.arange(0, BLOCK_N)
    if INTERIOR:
        allowed = (tl.load(valid_row + cols) != 0)[None, :]
        if keep_row is not None:
            allowed = allowed & ~(row_keep[:, None] & (tl.load(keep_row + cols) != 0)[None, :])
        return attend_tile(q, kv, cols, None, d_ok, allowed, state, qk_scale)
    col_ok = cols < end
    gap = pos[:, None] - cols[None, :]
    allowed = (tl.load(valid_row + cols, mask=col_ok, other=0) != 0)[None, :] & (gap >= 0) & (gap < window)
    if keep_row is not None:
        allowed = allowed & ~(row_keep[:, None] & (tl.load(keep_row + cols, mask=col_ok, other=0) != 0)[None, :])
    return attend_tile(q, kv, cols, col_ok, d_ok, allowed, state, qk_scale)


@triton.jit
def attend_window(
    q,
    kv,
    state,
    pos,
    first,
    start,
    end,
    window,
    valid_row,
    keep_row,
    row_keep,
    d_ok,
    qk_scale,
    BLOCK_N: tl.constexpr,
):
    """The dense window of the query rows at positions ``pos`` [M] (all in [first, end)): the keys j in
    [start, end) with 0 <= pos - j < window and valid_row[j] != 0 (valid_row, keep_row: byte pointers to the
    batch row's flags, :func:`flag_bytes`), in tiles of BLOCK_N from ``start`` -> the new ``state``. keep_row not
    None: minus the kept keys of the kept rows (``row_keep`` bool [M]). The tiles inside every row's window (keys >
    end - 1 - window and <= first) skip the position masks."""
    # interior tiles: k in [k_lo, k_mid), k-th tile at start + k * BLOCK_N
    k_lo = (tl.maximum(end - window - start, 0) + BLOCK_N - 1) // BLOCK_N
    k_mid = tl.maximum(tl.maximum(first + 1 - start, 0) // BLOCK_N, k_lo)
    for j0 in range(start, tl.minimum(start + k_lo * BLOCK_N, end), BLOCK_N):
        state = _window_tile(
            q, kv, state, pos, j0, end, window, valid_row, keep_row, row_keep, d_ok, qk_scale, False, BLOCK_N
        )
    for j0 in range(start + k_lo * BLOCK_N, start + k_mid * BLOCK_N, BLOCK_N):
        state = _window_tile(
            q, kv, state, pos, j0, end, window, valid_row, keep_row, row_keep, d_ok, qk_scale, True, BLOCK_N
        )
    for j0 in range(start + k_mid * BLOCK_N, end, BLOCK_N):
        state = _window_tile(
            q, kv, state, pos, j0, end, window, valid_row, keep_row, row_keep, d_ok, qk_scale, False, BLOCK_N
        )
    return state


@triton.jit
def normalised(num, den, row_valid):
    """fp32 [M, BLOCK_D]: num / den (num [M, BLOCK_D], den [M]); zeros at rows that are not ``row_valid`` or
    have den = 0."""
    return tl.where((row_valid & (den > 0))[:, None], num / tl.maximum(den, 1e-30)[:, None], 0.0)
