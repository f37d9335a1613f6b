"""Prefill attention over the kept tokens, a local window and attention sinks (the "sinks" prefill semantics).

For a valid query i (padding query rows get exact zeros) a key j is allowed iff

    valid[j] and j <= i and ((keep[i] and keep[j]) or i - j < window or rank[j] < sinks)

with rank[j] the number of valid positions before j in its row: the sinks are the first ``sinks`` valid tokens
(after any left padding). Kept queries see the kept keys, every query sees its ``window`` most recent keys
(itself included) and the sinks; the result is the softmax over the allowed keys. Its cost stays near r^2 of
dense attention: the kept-among-kept part is the gathered varlen kernel of :mod:`kept_attention`, the rest is
O(window + sinks) keys per query.

Shapes and dtypes shared by every function here:
    q       [B, Hq, n, d]   fp16/bf16 (fp32 too off the varlen kernels), RoPE applied; any strides.
    k, v    [B, Hkv, n, d]  un-expanded, Hq = Hkv * n_rep (query head h reads KV head h // n_rep).
    plan    :class:`~zipvl_compile.runtime.kernels.plan.PrefillPlan`; read here: the kept set T as ``keep`` (a
            kept padding token counts as not kept) and as the list ``idx`` / ``count`` of keep & valid,
            ``valid``, the local ``window`` >= 1 (the query itself included), the ``sinks`` count >= 0 (how many
            leading valid tokens every query sees), ``scale`` and ``n_rep``.
    returns [B, Hq, n, d]   in q's dtype, memory (B, n, Hq, d) (as :func:`kept_causal_attention` returns).

Fast path (:func:`sink_attention`):
1. the kept part, :func:`kept_causal_attention_lse`: gather the kept rows, varlen causal attention over them,
   keeping the packed output and the log-sum-exp of each packed row (no unpack);
2. one Triton kernel (:func:`sink_merge_triton`), grid (query blocks, B * Hkv): a program serves the n_rep
   query heads of one KV head, stacked as the rows of its tiles, so each K/V tile is loaded once for all of
   them. It runs one online softmax over the extra keys E_i = window keys [i - window + 1, i] and sink keys
   outside the window, minus, for a kept query, every kept key (those are in the kept part: no key is counted
   twice), then merges with the kept part of kept rows by log-sum-exp,
   o = (o_T e^{lse_T} + o_E e^{lse_E}) / (e^{lse_T} + e^{lse_E}), reading o_T / lse_T through
   ``kept.plan.inv`` (packed row of each position), and writes every output row once.
No n x n tensor, no host sync, static shapes. Plain-torch reference: :func:`sink_attention_reference`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zipvl_compile.runtime.kernels import attention_tiles as tiles
from zipvl_compile.runtime.kernels.attention_tiles import flag_bytes
from zipvl_compile.runtime.kernels.device import check_power_of_two, wants_triton
from zipvl_compile.runtime.kernels.kept_attention import KeptPart, kept_causal_attention_lse
from zipvl_compile.runtime.kernels.plan import PrefillPlan

_MAX_SINK_BLOCK = 64  # the sinks are read in tiles of up to this many keys (at least 16, the smallest tl.dot)


class SinkTiles(NamedTuple):
    """Launch parameters of the merge kernel (every choice gives the same result up to fp32 rounding).

    A program's tile has ``rows`` stacked rows (n_rep heads, padded to a power of two, times BLOCK_M positions;
    half as many rows for d > 128: the fp32 accumulator lives in registers). A block of BLOCK_M queries reads
    its window, BLOCK_M + window - 1 keys, in tiles of ``block_n`` keys; ``num_warps`` / ``num_stages`` of the
    launch. The defaults (128 x 32, 4 warps, 3 stages) were the fastest of the H200 sweep for GQA 28/4 at 8k and
    32k; for one query head per KV head see :func:`sink_tiles_for`.
    """

    rows: int = 128
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 3

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("rows", "block_n"):
            check_power_of_two("SinkTiles", name, getattr(self, name), least=16)
        check_power_of_two("SinkTiles", "num_warps", self.num_warps)
        if self.num_stages < 1:
            raise ValueError(f"SinkTiles.num_stages must be >= 1, got {self.num_stages}")


DEFAULT_SINK_TILES = SinkTiles()
_ONE_HEAD_TILES = SinkTiles(rows=64, block_n=64)  # n_rep = 1: 8-9% faster than the default (H200 sweep, 32/32)


def sink_tiles_for(n_rep: int) -> SinkTiles:
    """The policy's merge tiles for ``n_rep`` query heads per KV head."""
    return _ONE_HEAD_TILES if n_rep == 1 else DEFAULT_SINK_TILES


def _check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> None:
    """Raise ValueError naming the first bad argument."""
    n_rep, window, sinks = plan.n_rep, plan.window, plan.sinks
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"sink attention wants q [B, Hq, n, d], k = v [B, Hkv, n, d]; got {q.shape}, {k.shape}, {v.shape}"
        )
    batch, heads, n, head_dim = q.shape
    if k.shape != (batch, heads // max(n_rep, 1), n, head_dim) or n_rep < 1 or heads % n_rep:
        raise ValueError(f"sink attention: q {tuple(q.shape)} and k {tuple(k.shape)} do not match n_rep = {n_rep}")
    for name, mask in (("keep", plan.keep), ("valid", plan.valid)):
        if mask.dtype != torch.bool or mask.shape != (batch, n):
            raise ValueError(
                f"sink attention: {name} must be bool [{batch}, {n}], got {mask.dtype} {tuple(mask.shape)}"
            )
    if window < 1 or sinks < 0:
        raise ValueError(f"sink attention needs window >= 1 and sinks >= 0, got window = {window}, sinks = {sinks}")


def _sink_keys(valid: torch.Tensor, sinks: int) -> torch.Tensor:
    """bool [B, n]: the first ``sinks`` valid positions of each row (rank[j] < sinks, valid[j])."""
    before = valid.to(torch.int64).cumsum(dim=-1) - valid.to(torch.int64)
    return valid & (before < sinks)


def sink_mask(keep: torch.Tensor, valid: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """bool [B, 1, n, n]: query i may see key j (module docstring). Rows of padding queries are not cleared."""
    n = keep.shape[-1]
    pos = torch.arange(n, device=keep.device)
    gap = pos[:, None] - pos[None, :]
    both_kept = keep[:, None, :, None] & keep[:, None, None, :]
    sink = _sink_keys(valid, sinks)[:, None, None, :]
    return valid[:, None, None, :] & (gap >= 0) & (both_kept | (gap < window) | sink)


def sink_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
    """Plain torch, O(n^2) memory: fp32 SDPA with :func:`sink_mask`; zeros at padding rows. Memory (B, n, Hq, d)."""
    _check_args(q, k, v, plan)
    return tiles.masked_attention_reference(q, k, v, sink_mask(plan.keep, plan.valid, plan.window, plan.sinks), plan)


@triton.jit
def _sink_merge_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    keep_ptr,
    valid_ptr,
    sink_ptr,
    inv_ptr,
    kept_out_ptr,
    kept_lse_ptr,
    out_ptr,
    n,
    n_kv_heads,
    n_rep,
    window,
    sinks,
    qk_scale,
    head_dim,
    strides,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, i, h]: attention of query (b, h, i) over its extra keys merged with its kept part (module
    docstring); ``strides``: those of q, k, v, out, kept_out and kept_lse. Tile row r is query head
    kvh * n_rep + r // BLOCK_M at position m0 + r % BLOCK_M."""
    q_strides, k_strides, v_strides, out_strides, kept_out_strides, kept_lse_strides = strides
    LOG2E: tl.constexpr = 1.4426950408889634
    m0 = tl.program_id(0) * BLOCK_M
    b = (tl.program_id(1) // n_kv_heads).to(tl.int64)
    kvh = (tl.program_id(1) % n_kv_heads).to(tl.int64)
    r = tl.arange(0, HEADS * BLOCK_M)
    group = r // BLOCK_M
    pos = m0 + r % BLOCK_M
    pos64 = pos.to(tl.int64)
    head = kvh * n_rep + group
    row_ok = (pos < n) & (group < n_rep)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(tiles.tile_ptrs(q_ptr, b, head[:, None], pos64[:, None], d, q_strides), mask=tile_ok, other=0.0)
    row_valid = tl.load(valid_ptr + b * n + pos, mask=row_ok, other=0) != 0
    row_keep = tl.load(keep_ptr + b * n + pos, mask=row_ok, other=0) != 0
    state = tiles.initial_state(HEADS * BLOCK_M, BLOCK_D)
    kv = tiles.kv_rows(k_ptr, v_ptr, b, kvh, d, k_strides, v_strides)
    # (1) the window keys i - window < j <= i, less the kept keys of kept queries
    end = tl.minimum(m0 + BLOCK_M, n)
    start = tl.maximum(m0 - window + 1, 0)
    state = tiles.attend_window(
        q,
        kv,
        state,
        pos,
        m0,
        start,
        end,
        window,
        valid_ptr + b * n,
        keep_ptr + b * n,
        row_keep,
        d_ok,
        qk_scale,
        BLOCK_N,
    )
    # (2) the sink keys before the window (i - j >= window), less the kept keys of kept queries
    for s0 in range(0, sinks, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        sink_pos = tl.load(sink_ptr + b * sinks + slots, mask=slots < sinks, other=-1)
        present = sink_pos >= 0
        sink_pos = tl.maximum(sink_pos, 0)
        key_keep = tl.load(keep_ptr + b * n + sink_pos, mask=present, other=0) != 0
        gap = pos[:, None] - sink_pos[None, :]
        allowed = present[None, :] & (gap >= window) & ~(row_keep[:, None] & key_keep[None, :])
        state = tiles.attend_tile(q, kv, sink_pos, present, d_ok, allowed, state, qk_scale)
    m_i, l_i, acc = state
    # (3) merge with the kept part (base 2): weights 2^(lse_T - top) and l_i 2^(m_i - top), top the larger
    # exponent; a kept valid query sees itself in the kept part, any other valid query in its window, so top
    # is finite on valid rows
    packed = tl.load(inv_ptr + b * n + pos, mask=row_ok, other=-1)
    has_kept = packed >= 0
    lse_ptrs = kept_lse_ptr + packed * kept_lse_strides[0] + head * kept_lse_strides[1]
    lse_kept = tl.load(lse_ptrs, mask=has_kept, other=float("-inf")) * LOG2E
    out_kept = tl.load(
        kept_out_ptr
        + packed[:, None] * kept_out_strides[0]
        + head[:, None] * kept_out_strides[1]
        + d[None, :] * kept_out_strides[2],
        mask=has_kept[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    top = tl.maximum(lse_kept, m_i)
    top = tl.where(top == float("-inf"), 0.0, top)
    w_kept = tl.math.exp2(lse_kept - top)
    w_extra = tl.math.exp2(m_i - top)
    num = out_kept * w_kept[:, None] + acc * w_extra[:, None]
    den = w_kept + l_i * w_extra
    out = tiles.normalised(num, den, row_valid)
    dst = tiles.tile_ptrs(out_ptr, b, pos64[:, None], head[:, None], d, out_strides)
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=tile_ok)


def sink_positions(valid: torch.Tensor, sinks: int) -> torch.Tensor:
    """int64 [B, max(sinks, 1)]: the positions of the first ``sinks`` valid tokens of each row, ascending, -1
    where a row has fewer valid tokens (and in the one column of sinks = 0)."""
    batch, n = valid.shape
    seen = valid.to(torch.int64).cumsum(dim=-1)  # valid tokens at or before each position: non-decreasing
    rank = torch.arange(1, max(sinks, 1) + 1, device=valid.device).expand(batch, -1)
    pos = torch.searchsorted(seen, rank)  # the first position holding the rank-th valid token (n: none)
    return torch.where((pos < n) & (rank <= sinks), pos, -1)


def sink_merge_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: PrefillPlan,
    kept: KeptPart,
    tiles: SinkTiles | None = None,
) -> torch.Tensor:
    """The window + sinks + merge kernel (module docstring, step 2) -> [B, Hq, n, d], memory (B, n, Hq, d).

    ``plan.keep`` must already exclude padding and match ``kept`` (:func:`kept_causal_attention_lse` of the
    same plan); the kept part of a kept query is read from ``kept.out`` / ``kept.lse`` at row ``kept.plan.inv``.
    ``tiles``: the launch (:class:`SinkTiles`; None: :func:`sink_tiles_for` ``plan.n_rep``).
    """
    tiles = tiles or sink_tiles_for(plan.n_rep)
    tiles.check()
    batch, heads, n, head_dim = q.shape
    n_rep, sinks = plan.n_rep, plan.sinks
    block_d = triton.next_power_of_2(head_dim)
    group = triton.next_power_of_2(n_rep)
    rows = tiles.rows if block_d <= 128 else tiles.rows // 2
    block_m = max(1, rows // group)
    sink_pos = sink_positions(plan.valid, sinks)
    out = q.new_empty(batch, n, heads, head_dim)
    grid = (triton.cdiv(n, block_m), batch * (heads // n_rep))
    _sink_merge_kernel[grid](
        q,
        k,
        v,
        flag_bytes(plan.keep),
        flag_bytes(plan.valid),
        sink_pos,
        kept.plan.inv,
        kept.out,
        kept.lse,
        out,
        n,
        heads // n_rep,
        n_rep,
        plan.window,
        sinks,
        plan.scale * math.log2(math.e),
        head_dim,
        (q.stride(), k.stride(), v.stride(), out.stride(), kept.out.stride(), kept.lse.stride()),
        BLOCK_M=block_m,
        HEADS=group,
        BLOCK_N=tiles.block_n,
        BLOCK_S=min(_MAX_SINK_BLOCK, max(16, triton.next_power_of_2(max(sinks, 1)))),
        BLOCK_D=block_d,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out.transpose(1, 2)


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: PrefillPlan,
    backend: str | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Attention over the kept keys, the local window and the sinks (module docstring). No host sync.

    backend: the kept part's backend (:func:`kept_causal_attention_lse`; None: its default). use_triton: the
    fast path (None: on CUDA; True on CPU needs TRITON_INTERPRET=1); otherwise :func:`sink_attention_reference`.
    """
    _check_args(q, k, v, plan)
    if not wants_triton(q, use_triton):
        return sink_attention_reference(q, k, v, plan)
    plan = plan._replace(keep=plan.keep & plan.valid)
    kept = kept_causal_attention_lse(q, k, v, plan, backend, use_triton)
    return sink_merge_triton(q, k, v, plan, kept)
