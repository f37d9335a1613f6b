"""Causal attention among the kept tokens of a sparse prefill (ZipVL Alg. 1: FlashAttention(Q[T],K[T],V[T])).

Shapes and dtypes shared by every function here:
    q       [B, Hq, n, d]   fp16/bf16 (fp32 too off the varlen kernels), RoPE applied.
    k, v    [B, Hkv, n, d]  un-expanded, Hq = Hkv * n_rep (query head h reads KV head h // n_rep).
    plan    :class:`~zipvl_compile.runtime.kernels.plan.PrefillPlan`; read here: ``scale``, ``n_rep`` and the
            kept list ``idx`` int64 [B, n] (idx[b, :count[b]] = the kept positions of row b, ascending; the rest
            of the row is arbitrary but in [0, n)) with ``count`` int [B] (0 <= count <= n, on q's device).
    returns [B, Hq, n, d]   in q's dtype: for a kept query i, softmax attention over the kept keys j <= i;
                            exact zeros at non-kept positions. Memory layout (B, n, Hq, d), i.e. the
                            ``transpose(1, 2)`` of a contiguous [B, n, Hq, d] tensor, on every backend:
                            what SDPA's flash/cuDNN kernels and FlashAttention return, so the decoder's
                            ``out.transpose(1, 2).reshape(B, n, Hq * d)`` is free (``.contiguous()`` copies).

Because idx is ascending, "causal among kept tokens" is plain causal attention on the gathered sequence, and
RoPE was applied before the gather, so positions stay right. Nothing here syncs with the host or takes a
shape from data: the packed buffers have the static size B * n.

Pipeline (:func:`kept_causal_attention` = pack -> varlen attention -> unpack):
1. :func:`pack_kept`: the plan (:class:`KeptPlan`: cu_seqlens = [0, c0, c0 + c1, ...], int32, built on the
   device, and per output position its packed row or -1) and the kept tokens of q, k, v gathered into
   [B * n, H, d] buffers, rows of all batch rows one after the other (only the first sum(count) rows valid);
   on CUDA one Triton launch writes all of it (a program per slot block, batch row and head of q, k or v).
   The gather runs on the (B, S, H, D) view ``x.transpose(1, 2)`` along S: the varlen kernels want (total, H,
   D), so this writes their layout directly, with one index per token for all heads (a (B, H, S, D) gather
   needs one per (head, token) and a transpose copy after it); when the memory already is (B, S, H, D), as the
   decoder's q/k after RoPE and v are, each kept token is one contiguous H * d run. Measured on an H100: 2x
   cheaper than gathering in (B, H, S, D).
2. the varlen causal kernel, backend chosen once per process: FlashAttention-4 ``fa4``
   (``flash_attn.cute.flash_attn_varlen_func``), FlashAttention-2 ``fa2``, torch's ``torch_varlen``
   (``torch.nn.attention.varlen.varlen_attn``), else ``sdpa_padded`` (causal SDPA on each batch row's
   window of the packed buffer; exact, but costs dense n^2 work). All take max_seqlen = n (static) and GQA
   natively (torch 2.11's varlen_attn has no enable_gqa argument and no head check; the FlashAttention-2
   varlen kernel under it takes Hkv | Hq heads; 2.13 asks for enable_gqa=True).
3. :func:`unpack_kept`: write every output row once: the packed row of a kept position, zeros elsewhere.

:func:`kept_causal_attention_lse` stops after step 2 and returns the packed output with the log-sum-exp of
each packed row (:class:`KeptPart`), for callers that merge it with attention over other keys.

On CUDA steps 1 and 3 are Triton kernels that touch only the valid rows (a torch gather of the static B * n
rows would read and write the whole of q once more); their plain-torch references are :func:`make_plan` +
:func:`pack_rows_reference` and :func:`unpack_rows_reference`. On CPU the default backend is
:func:`kept_causal_attention_reference`; ``backend="sdpa_padded"`` runs the packing path there.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from zipvl_compile.runtime.kernels.device import wants_triton
from zipvl_compile.runtime.kernels.plan import PrefillPlan

_BLOCK_ROWS = 32  # packed / output rows per Triton program (one head per program)
# Rows after the last valid packed row that the pack kernel zeroes: TMA-based kernels (FA4) load whole key
# tiles, and a masked score times a NaN value row is still NaN, so the rows a tile can run into past the
# last sequence must be finite (all other garbage rows are never read).
_TAIL_ZERO_ROWS = 256
_COUNT_BLOCK = 64  # batch rows' counts a pack program sums per step to find where its row's packed rows begin
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


class KeptPlan(NamedTuple):
    """Index plan of one call; both tensors live on the device, sizes are static (R = B * n rows).

    cu_seqlens int32 [B + 1]: [0, c0, c0 + c1, ...]; packed rows >= cu_seqlens[-1] are padding.
    inv int64 [R]: packed row of output position b * n + s, or -1 when s is not kept in row b.
    """

    cu_seqlens: torch.Tensor
    inv: torch.Tensor


class PackedRows(NamedTuple):
    """Where each packed row r (of R = B * n) comes from, int64 [R] each: its batch row, its index in
    idx[batch] and its sequence position (clamped into range for padding rows). Built in torch by
    :func:`packed_rows` for the reference paths; the Triton pack derives them per program instead."""

    batch: torch.Tensor
    slot: torch.Tensor
    pos: torch.Tensor


class PackedAttention(NamedTuple):
    """What a varlen backend returns (R = B * n packed rows; rows >= cu_seqlens[-1] are garbage).

    out [R, Hq, d] in q's dtype.
    lse fp32 [R, Hq] (any strides): natural-log log-sum-exp of the scaled scores of each packed row and head
        (-inf for a row without keys), or None when it was not asked for.
    """

    out: torch.Tensor
    lse: torch.Tensor | None


class KeptPart(NamedTuple):
    """Result of :func:`kept_causal_attention_lse`: its :class:`KeptPlan`, the packed output [B*n, Hq, d] and its
    lse fp32 [B*n, Hq] (natural log, any strides); the kept query at position s of row b is packed row
    inv[b * n + s]."""

    plan: KeptPlan
    out: torch.Tensor
    lse: torch.Tensor


def keep_to_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, n] kept mask -> (idx int64 [B, n], count int64 [B]) in this module's convention.

    idx[b] lists the kept positions ascending, then the others ascending (a permutation of 0..n-1); no sort.
    """
    batch, n = keep.shape
    kept = keep.to(torch.int64)
    count = kept.sum(dim=-1)
    dest = torch.where(keep, kept.cumsum(dim=-1) - 1, count[:, None] + (1 - kept).cumsum(dim=-1) - 1)
    positions = torch.arange(n, device=keep.device, dtype=torch.int64).expand(batch, n)
    return torch.empty_like(dest).scatter_(-1, dest, positions), count


def kept_mask(idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """bool [B, n]: True at the positions idx[b, :count[b]] (the arbitrary tail of idx is ignored)."""
    n = idx.shape[-1]
    listed = (torch.arange(n, device=idx.device) < count[:, None]).to(torch.int32)
    return torch.zeros_like(idx, dtype=torch.int32).scatter_add_(-1, idx, listed) > 0


def _kept_causal_mask(idx: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool [B, n], mask bool [B, 1, n, n] = keep_i & keep_j & (j <= i))."""
    n = idx.shape[-1]
    keep = kept_mask(idx, count)
    causal = torch.ones(n, n, dtype=torch.bool, device=idx.device).tril()
    return keep, keep[:, None, :, None] & keep[:, None, None, :] & causal


def kept_causal_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan
) -> torch.Tensor:
    """Plain torch, O(n^2) memory (CPU / tests): SDPA in fp32 with the mask keep_i & keep_j & (j <= i).

    Returns a contiguous [B, Hq, n, d] tensor in q's dtype, zeros at non-kept rows.
    """
    keep, mask = _kept_causal_mask(plan.idx, plan.count)
    k, v = (x.float().repeat_interleave(plan.n_rep, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=plan.scale)
    return torch.where(keep[:, None, :, None], out, 0.0).to(q.dtype)


def kept_lse_reference(q: torch.Tensor, k: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
    """Plain torch, O(n^2) memory: fp32 [B, Hq, n], natural-log log-sum-exp of the scaled scores of each kept
    query over the kept keys j <= i; -inf at non-kept rows."""
    _, mask = _kept_causal_mask(plan.idx, plan.count)
    scores = q.float() @ k.float().repeat_interleave(plan.n_rep, dim=1).transpose(-1, -2) * plan.scale
    return scores.masked_fill(~mask, float("-inf")).logsumexp(dim=-1)


def _batch_and_slot(cu_seqlens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch row, slot) int64 [B * n] of every packed row given cu_seqlens [B + 1], clamped into range for the
    padding rows."""
    batch = cu_seqlens.shape[0] - 1
    rows = torch.arange(batch * n, device=cu_seqlens.device, dtype=torch.int64)
    ends = cu_seqlens[1:].to(torch.int64)
    row_batch = torch.searchsorted(ends, rows, right=True).clamp_(max=batch - 1)
    return row_batch, (rows - cu_seqlens[row_batch].to(torch.int64)).clamp_(0, n - 1)


def _cu_seqlens(count: torch.Tensor) -> torch.Tensor:
    return F.pad(count.to(torch.int64).cumsum(dim=0), (1, 0)).to(torch.int32)


def packed_rows(idx: torch.Tensor, count: torch.Tensor) -> PackedRows:
    """The :class:`PackedRows` of idx int64 [B, n] and count int [B] (plain torch)."""
    return _packed_rows(idx, _cu_seqlens(count))


def _packed_rows(idx: torch.Tensor, cu_seqlens: torch.Tensor) -> PackedRows:
    row_batch, slot = _batch_and_slot(cu_seqlens, idx.shape[1])
    return PackedRows(row_batch, slot, idx[row_batch, slot])


def make_plan(idx: torch.Tensor, count: torch.Tensor) -> KeptPlan:
    """The :class:`KeptPlan` of idx int64 [B, n] and count int [B], in plain torch (the reference of what
    :func:`pack_kept_triton` writes beside the packed rows)."""
    batch, n = idx.shape
    cu = _cu_seqlens(count)
    rows = _packed_rows(idx, cu)
    packed = torch.arange(batch * n, device=idx.device, dtype=torch.int64)
    dest = torch.where(packed < cu[-1], rows.batch * n + rows.pos, batch * n)  # padding rows -> a spare slot
    inv = torch.full((batch * n + 1,), -1, device=idx.device, dtype=torch.int64).index_copy_(0, dest, packed)
    return KeptPlan(cu, inv[:-1])


# ---------------------------------------------------------------------------------------------------------
# Gather / scatter: Triton kernels and their plain-torch references


@triton.jit
def _pack_row_block(
    x_ptr,
    out_ptr,
    b,
    head,
    pos,
    dest,
    kept,
    written,
    stride_x,
    HEADS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[dest, head] = x[b, pos, head] where ``kept``, zeros where only ``written`` (one head of a row block;
    x strides (batch, sequence, head, channel) in ``stride_x``; out contiguous [R, HEADS, D])."""
    sb, ss, sh, sd = stride_x
    d = tl.arange(0, BLOCK_D)
    d_ok = d[None, :] < D
    src = x_ptr + b * sb + pos[:, None] * ss + head * sh + d[None, :] * sd
    vals = tl.load(src, mask=kept[:, None] & d_ok, other=0.0)
    tl.store(out_ptr + (dest[:, None] * HEADS + head) * D + d[None, :], vals, mask=written[:, None] & d_ok)


@triton.jit
def _pack_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    count_ptr,
    qp_ptr,
    kp_ptr,
    vp_ptr,
    cu_ptr,
    inv_ptr,
    n,
    n_batch,
    stride_q,
    stride_k,
    stride_v,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ZERO_ROWS: tl.constexpr,
):
    """Gather the kept rows of q, k and v into their packed buffers, write cu_seqlens and inv (one launch).

    Grid (slot blocks, B, HQ + 2 * HKV): program (blk, b, h) copies slots [blk * BLOCK_R, +BLOCK_R) of batch
    row b's kept list (positions idx[b, slot], slot < count[b]) to packed rows cu[b] + slot of one head: q
    head h, else k head h - HQ, else v head h - HQ - HKV. The last batch row also zeroes the ZERO_ROWS rows
    after the last kept one (within the buffer). The q-head-0 programs write inv[b * n + pos] = packed row
    (inv holds -1 beforehand), the (0, b, 0) programs cu[b + 1] (and cu[0] = 0).
    """
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    start = tl.zeros([], tl.int64)  # cu[b]: the counts of the batch rows before b
    for first in range(0, b, BLOCK_B):
        rows = first + tl.arange(0, BLOCK_B)
        start += tl.sum(tl.load(count_ptr + rows, mask=rows < b, other=0).to(tl.int64))
    count = tl.load(count_ptr + b).to(tl.int64)
    if blk == 0 and h == 0:
        tl.store(cu_ptr + b + 1, (start + count).to(tl.int32))
        if b == 0:
            tl.store(cu_ptr, 0)
    end = count + tl.where(b == n_batch - 1, ZERO_ROWS, 0)  # slots this batch row writes
    if blk * BLOCK_R < end:
        slot = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        kept = slot < count
        dest = start + slot
        written = (slot < end) & (dest < n_batch * n)
        pos = tl.load(idx_ptr + b * n + slot, mask=kept, other=0)
        if h < HQ:
            _pack_row_block(q_ptr, qp_ptr, b, h, pos, dest, kept, written, stride_q, HQ, D, BLOCK_D)
            if h == 0:
                tl.store(inv_ptr + b * n + pos, dest, mask=kept)
        elif h < HQ + HKV:
            _pack_row_block(k_ptr, kp_ptr, b, h - HQ, pos, dest, kept, written, stride_k, HKV, D, BLOCK_D)
        else:
            _pack_row_block(v_ptr, vp_ptr, b, h - HQ - HKV, pos, dest, kept, written, stride_v, HKV, D, BLOCK_D)


@triton.jit
def _unpack_rows_kernel(
    packed_ptr,
    inv_ptr,
    out_ptr,
    n_rows,
    head_dim,
    stride_pr,
    stride_ph,
    stride_pd,
    stride_or,
    stride_oh,
    stride_od,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[r, h] = packed[inv[r], h] where inv[r] >= 0, else 0.

    Grid (row blocks, heads); reads the kept rows only, writes every row once.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = tl.program_id(1).to(tl.int64)
    in_range = rows < n_rows
    src_row = tl.load(inv_ptr + rows, mask=in_range, other=-1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d[None, :] < head_dim
    src = packed_ptr + src_row[:, None] * stride_pr + head * stride_ph + d[None, :] * stride_pd
    vals = tl.load(src, mask=(src_row[:, None] >= 0) & d_ok, other=0.0)
    dst = out_ptr + rows[:, None].to(tl.int64) * stride_or + head * stride_oh + d[None, :] * stride_od
    tl.store(dst, vals, mask=in_range[:, None] & d_ok)


def pack_rows_reference(x_bshd: torch.Tensor, rows: PackedRows) -> torch.Tensor:
    """[B * n, H, d] contiguous: row r = x_bshd[batch[r], pos[r]] for every r (padding rows: real tokens)."""
    return x_bshd[rows.batch, rows.pos]


def unpack_rows_reference(packed: torch.Tensor, plan: KeptPlan) -> torch.Tensor:
    """[B * n, H, d] contiguous: row b * n + s = packed[inv] where kept, else 0."""
    return torch.where((plan.inv >= 0)[:, None, None], packed[plan.inv.clamp(min=0)], 0.0)


def unpack_rows_triton(packed: torch.Tensor, plan: KeptPlan) -> torch.Tensor:
    """Triton :func:`unpack_rows_reference` (same result; reads only the kept rows of ``packed``)."""
    n_rows = plan.inv.shape[0]
    heads, head_dim = packed.shape[1:]
    out = packed.new_empty(n_rows, heads, head_dim)
    grid = (triton.cdiv(n_rows, _BLOCK_ROWS), heads)
    _unpack_rows_kernel[grid](
        packed,
        plan.inv,
        out,
        n_rows,
        head_dim,
        *packed.stride(),
        *out.stride(),
        BLOCK_R=_BLOCK_ROWS,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out


Packed = tuple[KeptPlan, torch.Tensor, torch.Tensor, torch.Tensor]  # (plan, q_packed, k_packed, v_packed)


def pack_kept_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, count: torch.Tensor
) -> Packed:
    """Triton :func:`pack_kept`, one launch of :func:`_pack_kernel` after the fill of ``inv``: the plan equals
    :func:`make_plan`'s, the packed rows equal :func:`pack_rows_reference`'s on the valid rows, the next
    _TAIL_ZERO_ROWS rows are 0 and the rows after those are left uninitialised (no varlen kernel reads them)."""
    batch, n_q, n, d = q.shape
    n_kv = k.shape[1]
    packed = [x.new_empty(batch * n, x.shape[1], d) for x in (q, k, v)]
    cu = torch.empty(batch + 1, device=q.device, dtype=torch.int32)
    inv = torch.full((batch * n,), -1, device=q.device, dtype=torch.int64)
    grid = (triton.cdiv(n + _TAIL_ZERO_ROWS, _BLOCK_ROWS), batch, n_q + 2 * n_kv)
    strides = [(x.stride(0), x.stride(2), x.stride(1), x.stride(3)) for x in (q, k, v)]  # (B, S, H, D) order
    _pack_kernel[grid](
        q,
        k,
        v,
        idx,
        count,
        *packed,
        cu,
        inv,
        n,
        batch,
        *strides,
        HQ=n_q,
        HKV=n_kv,
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_R=_BLOCK_ROWS,
        BLOCK_B=_COUNT_BLOCK,
        ZERO_ROWS=_TAIL_ZERO_ROWS,
    )
    return (KeptPlan(cu, inv), *packed)


def pack_kept(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    use_triton: bool | None = None,
) -> Packed:
    """(plan, q_packed [B*n, Hq, d], k_packed [B*n, Hkv, d], v_packed [B*n, Hkv, d]) from [B, H, n, d] inputs.

    ``use_triton``: the Triton gather (None: on CUDA); True on CPU tensors needs TRITON_INTERPRET=1.
    """
    if wants_triton(q, use_triton):
        return pack_kept_triton(q, k, v, idx, count)
    rows = packed_rows(idx, count)
    return (make_plan(idx, count), *(pack_rows_reference(x.transpose(1, 2), rows) for x in (q, k, v)))


def unpack_kept(out_packed: torch.Tensor, plan: KeptPlan, use_triton: bool | None = None) -> torch.Tensor:
    """[B, Hq, n, d] (memory (B, n, Hq, d)) from the packed output [B*n, Hq, d]; zeros where not kept."""
    batch = plan.cu_seqlens.shape[0] - 1
    unpack = unpack_rows_triton if wants_triton(out_packed, use_triton) else unpack_rows_reference
    return unpack(out_packed, plan).view(batch, -1, *out_packed.shape[1:]).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Varlen causal attention backends:
# (q_packed, k_packed, v_packed, plan, max_seqlen, scale, n_rep, with_lse) -> PackedAttention


@functools.cache
def _fa4_varlen() -> Callable | None:
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception:  # optional dependency: absent, or its CUDA DSL fails to load
        return None
    return flash_attn_varlen_func


@functools.cache
def _fa2_varlen() -> Callable | None:
    try:
        import flash_attn
    except Exception:  # optional dependency
        return None
    return getattr(flash_attn, "flash_attn_varlen_func", None)  # absent when only FA4's namespace is there


@functools.cache
def _torch_varlen() -> tuple[Callable, frozenset[str]] | None:
    """(varlen_attn, its keyword names): the signature changed between torch releases (2.11: window_size
    only, no head-count check; 2.13: enable_gqa required for Hq != Hkv; earlier: is_causal)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _keyword_names(fn: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _lse_rows(lse: torch.Tensor | None, q_packed: torch.Tensor, backend: str) -> torch.Tensor:
    """A varlen kernel's lse as an fp32 [total, H] view. FlashAttention-2/-4 and torch's varlen_attn return it
    as [H, total] (torch's docstring says (total, H); its flash kernel returns (H, total)); both are taken."""
    total, heads = q_packed.shape[:2]
    if lse is None:
        raise RuntimeError(f"kept attention backend {backend!r} returned no log-sum-exp (a release without it?)")
    if lse.shape == (heads, total):
        return lse.float().t()
    if lse.shape == (total, heads):
        return lse.float()
    raise RuntimeError(
        f"kept attention backend {backend!r} returned an lse of shape {tuple(lse.shape)}; "
        f"expected ({heads}, {total}) or ({total}, {heads})"
    )


def _run_fa4(qp, kp, vp, plan: KeptPlan, max_seqlen: int, scale: float, n_rep: int, with_lse: bool) -> PackedAttention:
    """FlashAttention-4 returns (out, lse); its lse (natural log, [Hq, total]) is only computed when asked for
    with return_lse (releases before that keyword compute it only under autograd)."""
    fn = _fa4_varlen()
    extra = {"return_lse": True} if with_lse and "return_lse" in _keyword_names(fn) else {}
    out, lse = fn(
        qp,
        kp,
        vp,
        cu_seqlens_q=plan.cu_seqlens,
        cu_seqlens_k=plan.cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        softmax_scale=scale,
        causal=True,
        **extra,
    )
    return PackedAttention(out, _lse_rows(lse, qp, "fa4") if with_lse else None)


def _run_fa2(qp, kp, vp, plan: KeptPlan, max_seqlen: int, scale: float, n_rep: int, with_lse: bool) -> PackedAttention:
    """FlashAttention-2: return_attn_probs=True adds softmax_lse (natural log, [Hq, total]) and S_dmask."""
    cu = plan.cu_seqlens
    result = _fa2_varlen()(
        qp, kp, vp, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True, return_attn_probs=with_lse
    )
    if not with_lse:
        return PackedAttention(result, None)
    return PackedAttention(result[0], _lse_rows(result[1], qp, "fa2"))


def _run_torch_varlen(
    qp, kp, vp, plan: KeptPlan, max_seqlen: int, scale: float, n_rep: int, with_lse: bool
) -> PackedAttention:
    """torch's varlen_attn; return_aux=AuxRequest(lse=True) adds the lse (natural log, [Hq, total])."""
    varlen_attn, params = _torch_varlen()
    extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:  # without it (2.11) the flash kernel below takes Hkv | Hq heads as they are
        extra["enable_gqa"] = n_rep > 1
    if with_lse:
        if "return_aux" not in params:
            raise RuntimeError("this torch's varlen_attn has no return_aux: it cannot return the log-sum-exp")
        from torch.nn.attention.varlen import AuxRequest

        extra["return_aux"] = AuxRequest(lse=True)
    cu = plan.cu_seqlens
    result = varlen_attn(qp, kp, vp, cu, cu, max_seqlen, max_seqlen, scale=scale, **extra)
    if not with_lse:
        return PackedAttention(result, None)
    return PackedAttention(result[0], _lse_rows(result[1], qp, "torch_varlen"))


# The lse of "sdpa_padded" is computed by query chunks of at most this many fp32 scores (256 MiB)
_LSE_CHUNK_SCORES = 2**26


def _padded_lse(q: torch.Tensor, k: torch.Tensor, scale: float, n_rep: int) -> torch.Tensor:
    """fp32 [B, Hq, n]: causal log-sum-exp of q [B, Hq, n, d] against k [B, Hkv, n, d], natural log.

    Query chunks of a static size bound the memory (one [B, Hq, chunk, n] score block at a time)."""
    batch, heads, n, _ = q.shape
    q_groups = q.unflatten(1, (-1, n_rep))  # [B, Hkv, n_rep, n, d]: query head h reads KV head h // n_rep
    keys_t = k.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, d, n]
    pos = torch.arange(n, device=q.device)
    chunk = max(1, _LSE_CHUNK_SCORES // (batch * heads * n))
    parts = []
    for start in range(0, n, chunk):
        rows = pos[start : start + chunk]
        scores = q_groups[..., start : start + chunk, :].float() @ keys_t * scale
        parts.append(scores.masked_fill(pos > rows[:, None], float("-inf")).logsumexp(dim=-1))
    return torch.cat(parts, dim=-1).flatten(1, 2)


def _run_sdpa_padded(
    qp, kp, vp, plan: KeptPlan, max_seqlen: int, scale: float, n_rep: int, with_lse: bool
) -> PackedAttention:
    """One causal SDPA over B padded windows [B, H, n, d] of the packed buffer (window b starts at
    cu_seqlens[b]). No key-padding mask is needed: under the causal mask a kept query (slot < count) only
    sees slots below it, all kept; the rows past count are dropped. Window rows past the last valid row
    point at it, so no uninitialised (possibly NaN) row enters a softmax or a P @ V product. The lse (SDPA
    does not return it) comes from :func:`_padded_lse` on the same windows."""
    starts = plan.cu_seqlens[:-1].to(torch.int64)
    row_batch, slot = _batch_and_slot(plan.cu_seqlens, max_seqlen)
    last = (plan.cu_seqlens[-1].to(torch.int64) - 1).clamp(min=0)
    rows = torch.minimum(starts[:, None] + torch.arange(max_seqlen, device=qp.device), last)
    q, k, v = (x[rows].transpose(1, 2) for x in (qp, kp, vp))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=n_rep > 1)
    lse = _padded_lse(q, k, scale, n_rep).transpose(1, 2)[row_batch, slot] if with_lse else None
    return PackedAttention(out.transpose(1, 2)[row_batch, slot], lse)


_VARLEN = {"fa4": _run_fa4, "fa2": _run_fa2, "torch_varlen": _run_torch_varlen, "sdpa_padded": _run_sdpa_padded}


@functools.cache
def _find_backends() -> tuple[str, ...]:
    names = []
    if torch.cuda.is_available():
        names += [name for name, found in (("fa4", _fa4_varlen), ("fa2", _fa2_varlen)) if found() is not None]
        if _torch_varlen() is not None and torch.backends.cuda.is_flash_attention_available():
            names.append("torch_varlen")
    return (*names, "sdpa_padded", "reference")


@torch.compiler.assume_constant_result  # torch.compile calls it at trace time instead of tracing imports
def available_backends() -> tuple[str, ...]:
    """Backends usable in this process, fastest first (decided once; importing FA4 takes seconds).

    The varlen kernels ("fa4", "fa2", "torch_varlen") need CUDA and fp16/bf16; "sdpa_padded" and "reference"
    (:func:`kept_causal_attention_reference`) run anywhere.
    """
    return _find_backends()


def default_backend(q: torch.Tensor) -> str:
    """ "reference" off CUDA; on CUDA the fastest varlen kernel for fp16/bf16, else "sdpa_padded"."""
    if not q.is_cuda:
        return "reference"
    return available_backends()[0] if q.dtype in _VARLEN_DTYPES else "sdpa_padded"


def _varlen_backend(backend: str) -> Callable[..., PackedAttention]:
    if backend not in _VARLEN or backend not in available_backends():
        raise ValueError(
            f"kept attention backend {backend!r} is not available here; "
            f"varlen backends available: {[b for b in available_backends() if b in _VARLEN]}"
        )
    return _VARLEN[backend]


def varlen_attention(
    q_packed: torch.Tensor,
    k_packed: torch.Tensor,
    v_packed: torch.Tensor,
    plan: KeptPlan,
    max_seqlen: int,
    scale: float,
    n_rep: int,
    backend: str,
) -> torch.Tensor:
    """Causal attention within each packed sequence -> [B*n, Hq, d]; rows past cu_seqlens[-1] are garbage."""
    run = _varlen_backend(backend)
    return run(q_packed, k_packed, v_packed, plan, max_seqlen, scale, n_rep, with_lse=False).out


def kept_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: PrefillPlan, backend: str | None = None, use_triton: bool | None = None
) -> Tensor:
    """Causal attention among the kept tokens (module docstring: shapes, output layout, pipeline).

    backend: one of :func:`available_backends` (None: :func:`default_backend`). use_triton: the Triton
    gather/scatter (None: on CUDA; True on CPU needs TRITON_INTERPRET=1). No host sync.
    """
    backend = backend or default_backend(q)
    if backend == "reference":
        out = kept_causal_attention_reference(q, k, v, plan)
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    packing, qp, kp, vp = pack_kept(q, k, v, plan.idx, plan.count, use_triton)
    out = varlen_attention(qp, kp, vp, packing, q.shape[2], plan.scale, plan.n_rep, backend)
    return unpack_kept(out, packing, use_triton)


def kept_causal_attention_lse(
    q: Tensor, k: Tensor, v: Tensor, plan: PrefillPlan, backend: str | None = None, use_triton: bool | None = None
) -> KeptPart:
    """:func:`kept_causal_attention` without the unpack: the packed output and its log-sum-exp (:class:`KeptPart`).

    Same arguments. The "reference" backend computes both in plain torch (O(n^2) memory) and packs them.
    """
    backend = backend or default_backend(q)
    if backend == "reference":
        packing = make_plan(plan.idx, plan.count)
        where = packed_rows(plan.idx, plan.count)
        rows = where.batch, where.pos
        out = kept_causal_attention_reference(q, k, v, plan).transpose(1, 2)[rows]
        return KeptPart(packing, out, kept_lse_reference(q, k, plan).transpose(1, 2)[rows])
    packing, qp, kp, vp = pack_kept(q, k, v, plan.idx, plan.count, use_triton)
    part = _varlen_backend(backend)(qp, kp, vp, packing, q.shape[2], plan.scale, plan.n_rep, with_lse=True)
    return KeptPart(packing, part.out, part.lse)
