"""Prefill attention over the kept keys plus a local window (the ``local_window`` option of the sparse prefill).

Every valid query i attends to the keys j <= i that are kept (the layer's set T) or lie in its window
i - w < j <= i; padding keys are never attended and padding query rows get exact zeros. So non-kept tokens
still get an attention output (unlike the paper's mode, which zeroes them: docs/method.md §6.1), while the work
per query is |T| + w keys instead of n.

Shapes and dtypes shared by every function here:
    q       [B, Hq, n, d]   fp16/bf16/fp32, RoPE applied; any strides.
    k, v    [B, Hkv, n, d]  un-expanded, Hq = Hkv * n_rep (query head h reads KV head h // n_rep).
    plan    :class:`~zipvl_compile.runtime.kernels.plan.PrefillPlan`; read here: the kept set T as ``keep``
            (never padding) and as the list ``idx`` / ``count``, ``valid``, the local ``window`` w >= 1 (the
            query itself included), ``scale`` and ``n_rep``.
    returns [B, Hq, n, d]   in q's dtype, memory (B, n, Hq, d) like SDPA's flash kernels return.

Triton path (:func:`local_attention_triton`), grid (query blocks, B * Hq), one online softmax over two
disjoint key ranges: (1) the kept keys far from the block, j <= i - w, read through the ascending kept-position
list ``idx`` up to the count of kept positions below the block's last query - w + 1
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

from zipvl_compile.runtime.kernels import attention_tiles as tiles
from zipvl_compile.runtime.kernels.attention_tiles import flag_bytes
from zipvl_compile.runtime.kernels.device import wants_triton
from zipvl_compile.runtime.kernels.plan import PrefillPlan

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


def local_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
    """Plain torch (fp32 SDPA with :func:`local_mask`); zeros at padding rows. Memory (B, n, Hq, d)."""
    return tiles.masked_attention_reference(q, k, v, local_mask(plan.keep, plan.valid, plan.window), plan)


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
    strides,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, i, h] = softmax attention of query (b, h, i) over its allowed keys (module docstring); ``strides``:
    those of q, k, v and out."""
    q_strides, k_strides, v_strides, out_strides = strides
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kvh = (h // n_rep).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(tiles.tile_ptrs(q_ptr, b, h.to(tl.int64), rows[:, None], d, q_strides), mask=tile_ok, other=0.0)
    state = tiles.initial_state(BLOCK_M, BLOCK_D)
    kv = tiles.kv_rows(k_ptr, v_ptr, b, kvh, d, k_strides, v_strides)
    # (1) kept keys with position <= i - window: the first n_far entries of the ascending kept list; the
    # first n_all of them (position <= m0 - window) are seen by every row of the block: whole tiles of those
    # go unmasked
    last_row = tl.minimum(m0 + BLOCK_M, n) - 1
    n_far = tl.load(before_ptr + b * (n + 1) + tl.maximum(last_row - window + 1, 0))
    n_all = tl.load(before_ptr + b * (n + 1) + tl.maximum(m0 - window + 1, 0))
    all_end = (n_all // BLOCK_N) * BLOCK_N
    for s0 in range(0, all_end, BLOCK_N):
        pos = tl.load(idx_ptr + b * n + s0 + tl.arange(0, BLOCK_N))
        state = tiles.attend_tile(q, kv, pos, None, d_ok, None, state, qk_scale)
    for s0 in range(all_end, n_far, BLOCK_N):
        slots = s0 + tl.arange(0, BLOCK_N)
        slot_ok = slots < n_far
        pos = tl.load(idx_ptr + b * n + slots, mask=slot_ok, other=0)
        allowed = slot_ok[None, :] & (pos[None, :] <= rows[:, None] - window)
        state = tiles.attend_tile(q, kv, pos, slot_ok, d_ok, allowed, state, qk_scale)
    # (2) the window: every valid key j with i - window < j <= i
    start = tl.maximum(m0 - window + 1, 0)
    state = tiles.attend_window(
        q, kv, state, rows, m0, start, last_row + 1, window, valid_ptr + b * n, None, None, d_ok, qk_scale, BLOCK_N
    )
    _, l_i, acc = state
    row_valid = tl.load(valid_ptr + b * n + rows, mask=row_ok, other=0) != 0
    out = tiles.normalised(acc, l_i, row_valid)
    dst = tiles.tile_ptrs(out_ptr, b, rows[:, None].to(tl.int64), h.to(tl.int64), d, out_strides)
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=tile_ok)


def local_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
    """Triton :func:`local_attention_reference` (same shapes; fp32 accumulation). No host sync."""
    batch, heads, n, head_dim = q.shape
    before = F.pad(plan.keep.to(torch.int32).cumsum(dim=-1, dtype=torch.int32), (1, 0))
    out = q.new_empty(batch, n, heads, head_dim)
    block_d = triton.next_power_of_2(head_dim)
    block_m = _BLOCK_M if block_d <= 128 else _BLOCK_M // 2
    grid = (triton.cdiv(n, block_m), batch * heads)
    _local_attention_kernel[grid](
        q,
        k,
        v,
        plan.idx,
        before,
        flag_bytes(plan.valid),
        out,
        n,
        heads,
        plan.n_rep,
        plan.window,
        plan.scale * math.log2(math.e),
        head_dim,
        (q.stride(), k.stride(), v.stride(), out.stride()),
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )
    return out.transpose(1, 2)


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan, use_triton: bool | None = None
) -> torch.Tensor:
    """Attention over the kept keys plus the local window (module docstring).

    use_triton: the Triton kernel (None: on CUDA; True on CPU needs TRITON_INTERPRET=1).
    """
    if wants_triton(q, use_triton):
        return local_attention_triton(q, k, v, plan)
    return local_attention_reference(q, k, v, plan)
