"""Prefill attention over the kept keys plus a local window (the ``local_window`` option of the sparse prefill).

Every valid query i attends to the keys j <= i that are kept (the layer's set T) or lie in its window
i - w < j <= i; padding keys are never attended and padding query rows get exact zeros. So non-kept tokens
still get an attention output (unlike the paper's mode, which zeroes them: docs/method.md §6.1), while the work
per query is |T| + w keys instead of n.

Shapes and dtypes shared by every function here:
    q       [B, Hq, n, d]   fp16/bf16/fp32, RoPE applied; any strides.
    k, v    [B, Hkv, n, d]  un-expanded, Hq = Hkv * n_rep (query head h reads KV head h // n_rep).
    keep    bool [B, n]     the kept set T (never padding).
    valid   bool [B, n]     False = padding token.
    window  int >= 1        w, the local window (the query itself included).
    returns [B, Hq, n, d]   in q's dtype, memory (B, n, Hq, d) like SDPA's flash kernels return.

Triton path (:func:`local_attention_triton`), grid (query blocks, B * Hq), one online softmax over two
disjoint key ranges: (1) the kept keys far from the block, j <= i - w, read through the ascending kept-position
list ``idx`` (:func:`keep_to_index`) up to the count of kept positions below the block's last query - w + 1
(``kept_before``, a prefix count on the device: no host sync); whole tiles that every row of the block may see
skip the mask; (2) the dense window [block start - w + 1, block end]. Plain-torch reference:
:func:`local_attention_reference` (O(n^2) memory).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zipvl_compile.runtime.kernels.kept_attention import keep_to_index

# Tiles, from a sweep of 33 configurations on an H100 (bf16, d = 128, n = 32k, r = 0.3 / 0.5, 28/4 and 32/32
# heads): 128 queries x 32 keys, 4 warps, 3 stages was fastest in all four cases (6.3 ms at 28/4 heads,
# r = 0.3; 64 x 64: 6.5 ms; 128 x 64, 8 warps: 6.8 ms). d > 128 halves the query block (the fp32 accumulator
# lives in registers).
_BLOCK_M = 128
_BLOCK_N = 32
_NUM_WARPS = 4
_NUM_STAGES = 3


def local_mask(keep: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """bool [B, 1, n, n]: query i may see key j (kept or within the window, causal, valid key)."""
    n = keep.shape[-1]
    pos = torch.arange(n, device=keep.device)
    gap = pos[:, None] - pos[None, :]
    near = (gap >= 0) & (gap < window)
    far = (gap >= 0) & keep[:, None, None, :]
    return (near | far) & valid[:, None, None, :]


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    scale: float,
    n_rep: int,
) -> torch.Tensor:
    """Plain torch (fp32 SDPA with :func:`local_mask`); zeros at padding rows. Memory (B, n, Hq, d)."""
    k, v = (x.float().repeat_interleave(n_rep, dim=1) for x in (k, v))
    mask = local_mask(keep, valid, window)
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale)
    out = torch.where(valid[:, None, :, None], out, 0.0).to(q.dtype)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@triton.jit
def _online_update(q, k_ptrs, v_ptrs, allowed, m_i, l_i, acc, qk_scale, load_mask, MASKED: tl.constexpr):
    """One key tile of the online softmax (base 2). MASKED: only ``allowed`` keys count, and rows with no
    allowed key so far keep m_i = -inf; else every key of the tile counts (``allowed`` is ignored)."""
    k = tl.load(k_ptrs, mask=load_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    v = tl.load(v_ptrs, mask=load_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _local_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    before_ptr,
    valid_ptr,
    out_ptr,
    n,
    n_heads,
    n_rep,
    window,
    qk_scale,
    head_dim,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    svb,
    svh,
    svs,
    svd,
    sob,
    sos,
    soh,
    sod,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, i, h] = softmax attention of query (b, h, i) over its allowed keys (module docstring)."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kvh = (h // n_rep).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(
        q_ptr + b * sqb + h.to(tl.int64) * sqh + rows[:, None] * sqs + d[None, :] * sqd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * skb + kvh * skh + d[None, :] * skd
    v_base = v_ptr + b * svb + kvh * svh + d[None, :] * svd
    # (1) kept keys with position <= i - window: the first n_far entries of the ascending kept list; the
    # first n_all of them (position <= m0 - window) are seen by every row of the block: whole tiles of those
    # go unmasked
    last_row = tl.minimum(m0 + BLOCK_M, n) - 1
    n_far = tl.load(before_ptr + b * (n + 1) + tl.maximum(last_row - window + 1, 0))
    n_all = tl.load(before_ptr + b * (n + 1) + tl.maximum(m0 - window + 1, 0))
    all_end = (n_all // BLOCK_N) * BLOCK_N
    for s0 in range(0, all_end, BLOCK_N):
        pos = tl.load(idx_ptr + b * n + s0 + tl.arange(0, BLOCK_N))
        m_i, l_i, acc = _online_update(
            q,
            k_base + pos[:, None] * sks,
            v_base + pos[:, None] * svs,
            None,
            m_i,
            l_i,
            acc,
            qk_scale,
            d_ok[None, :],
            MASKED=False,
        )
    for s0 in range(all_end, n_far, BLOCK_N):
        slots = s0 + tl.arange(0, BLOCK_N)
        slot_ok = slots < n_far
        pos = tl.load(idx_ptr + b * n + slots, mask=slot_ok, other=0)
        allowed = slot_ok[None, :] & (pos[None, :] <= rows[:, None] - window)
        m_i, l_i, acc = _online_update(
            q,
            k_base + pos[:, None] * sks,
            v_base + pos[:, None] * svs,
            allowed,
            m_i,
            l_i,
            acc,
            qk_scale,
            slot_ok[:, None] & d_ok[None, :],
            MASKED=True,
        )
    # (2) the window: every valid key j with i - window < j <= i
    start = tl.maximum(m0 - window + 1, 0)
    for j0 in range(start, last_row + 1, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols <= last_row
        key_ok = tl.load(valid_ptr + b * n + cols, mask=col_ok, other=0) != 0
        gap = rows[:, None] - cols[None, :]
        allowed = key_ok[None, :] & (gap >= 0) & (gap < window)
        m_i, l_i, acc = _online_update(
            q,
            k_base + cols[:, None] * sks,
            v_base + cols[:, None] * svs,
            allowed,
            m_i,
            l_i,
            acc,
            qk_scale,
            col_ok[:, None] & d_ok[None, :],
            MASKED=True,
        )
    row_valid = tl.load(valid_ptr + b * n + rows, mask=row_ok, other=0) != 0
    out = tl.where((row_valid & (l_i > 0))[:, None], acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    dst = out_ptr + b * sob + rows[:, None].to(tl.int64) * sos + h.to(tl.int64) * soh + d[None, :] * sod
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def local_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    scale: float,
    n_rep: int,
) -> torch.Tensor:
    """Triton :func:`local_attention_reference` (same shapes; fp32 accumulation). No host sync."""
    batch, heads, n, head_dim = q.shape
    idx, _ = keep_to_index(keep)
    before = F.pad(keep.to(torch.int32).cumsum(dim=-1, dtype=torch.int32), (1, 0))
    out = q.new_empty(batch, n, heads, head_dim)
    block_d = triton.next_power_of_2(head_dim)
    block_m = _BLOCK_M if block_d <= 128 else _BLOCK_M // 2
    grid = (triton.cdiv(n, block_m), batch * heads)
    _local_attention_kernel[grid](
        q,
        k,
        v,
        idx,
        before,
        valid.to(torch.int8),
        out,
        n,
        heads,
        n_rep,
        window,
        scale * math.log2(math.e),
        head_dim,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )
    return out.transpose(1, 2)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    scale: float,
    n_rep: int,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Attention over the kept keys plus the local window (module docstring).

    use_triton: the Triton kernel (None: on CUDA; True on CPU needs TRITON_INTERPRET=1).
    """
    if q.is_cuda if use_triton is None else use_triton:
        return local_attention_triton(q, k, v, keep, valid, window, scale, n_rep)
    return local_attention_reference(q, k, v, keep, valid, window, scale, n_rep)
