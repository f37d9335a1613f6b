"""The sparse prefill attention of CPU tensors without n x n work: gathered SDPA over the kept tokens, banded
attention over the window and the sinks, merged exactly by log-sum-exp.

Same semantics, shapes and output layout as the plain-torch oracles of the Triton kernels
(:func:`~zipvl_compile.runtime.kernels.kept_attention.kept_causal_attention_reference`,
:func:`~zipvl_compile.runtime.kernels.local_attention.local_attention_reference`,
:func:`~zipvl_compile.runtime.kernels.sink_attention.sink_attention_reference`), which stay the definitions;
these are the CPU bodies of the sparse op. Shapes:

    q        [B, Hq, n, d]   RoPE applied; k, v [B, Hkv, n, d] un-expanded, Hq = Hkv * n_rep.
    plan     :class:`~zipvl_compile.runtime.kernels.plan.PrefillPlan`, the rule: its ``mode``, the kept set as
             ``keep`` (padding never kept) and ``idx`` / ``count``, ``valid``, ``window``, ``sinks``, ``scale``,
             ``n_rep``.
    returns  [B, Hq, n, d]   in q's dtype, memory (B, n, Hq, d); zero at padding rows (and, for the kept-only
                             attention, at rows outside the kept set).

Cost: the kept part is causal SDPA over the c = max(count) gathered tokens (c^2 / 2 per head); the window and sink
part reads, for each block of _BLOCK queries, its _BLOCK + window - 1 band keys and the sinks (n (window + _BLOCK
+ sinks) per head). The host reads ``count.max()`` once (free on a CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from zipvl_compile.runtime.kernels.plan import PrefillPlan
from zipvl_compile.runtime.kernels.sink_attention import sink_positions

# Queries per band block: each reads _BLOCK + window - 1 keys, so a smaller block wastes less of its band on keys
# outside a query's window, a larger one runs fewer, larger matmuls.
_BLOCK = 32
# The banded part costs about n * (window + _BLOCK) per head whatever the kept ratio, the masked n x n SDPA of the
# oracles n^2: measured on one core (9 query / 3 KV heads, d = 64, window 128), the oracle is faster up to n ~ 4
# windows, this path from ~8 windows at any kept ratio (between the two it depends on the ratio).
_MIN_WINDOWS = 8


class Part(NamedTuple):
    """One part of a query's attention in position order: ``out`` fp32 [B, Hq, n, d] (normalised over the part's
    keys) and ``lse`` fp32 [B, Hq, n] (natural log-sum-exp of the scaled scores; -inf where the part is empty)."""

    out: torch.Tensor
    lse: torch.Tensor


def _bshd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """k or v [B, Hkv, L, d] as [B, Hkv * n_rep, L, d] (query head h reads KV head h // n_rep)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, ...] at positions index [B, c] -> [B, H, c, ...]."""
    shape = (-1, x.shape[1], -1) + x.shape[3:]
    return x.gather(2, index.view(index.shape[0], 1, -1, *([1] * (x.dim() - 3))).expand(shape))


def _kept_keys(k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept [B, c] = idx[:, :c] with c = max(count), k and v at them as [B, Hq, c, d])."""
    kept = plan.idx[:, : max(int(plan.count.max()), 1)]
    return kept, _heads(_rows(k, kept), plan.n_rep), _heads(_rows(v, kept), plan.n_rep)


def kept_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> Part:
    """Causal attention among the kept tokens, by SDPA over the gathered kept rows, scattered to position order
    (out 0 and lse -inf at rows outside the kept set)."""
    batch, heads, n, _ = q.shape
    kept, k_kept, v_kept = _kept_keys(k, v, plan)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _rows(q, kept), k_kept, v_kept, is_causal=True, scale=plan.scale
    )
    # slots past a row's count gathered other tokens; causal order keeps them out of the real slots' keys
    real = torch.arange(kept.shape[1], device=q.device)[None, :] < plan.count[:, None]
    out = torch.where(real[:, None, :, None], out.float(), 0.0)
    lse = torch.where(real[:, None, :], lse.float(), float("-inf"))
    full_out = q.new_zeros(batch, heads, n, q.shape[3], dtype=torch.float32)
    full_lse = torch.full((batch, heads, n), float("-inf"), device=q.device)
    slots = kept[:, None, :].expand(-1, heads, -1)
    full_out.scatter_(2, slots[..., None].expand_as(out), out)
    return Part(full_out, full_lse.scatter_(2, slots, lse))


def kept_keys_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> Part:
    """Every query over the kept keys j <= i, by SDPA over the gathered kept keys (lse -inf where none)."""
    kept, k_kept, v_kept = _kept_keys(k, v, plan)
    real = torch.arange(kept.shape[1], device=q.device) < plan.count[:, None]
    seen = (kept[:, None, :] <= torch.arange(q.shape[2], device=q.device)[None, :, None]) & real[:, None, :]
    bias = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k_kept, v_kept, attn_mask=bias[:, None], scale=plan.scale
    )
    return Part(out.float(), torch.where(seen.any(dim=-1)[:, None, :], lse.float(), float("-inf")))


def banded_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> Part:
    """Attention of every query over its window keys i - window < j <= i and the first ``sinks`` valid keys
    before it (none in the local mode), valid keys only, less the kept keys the kept part holds: key j when
    keep[i] and keep[j] (sinks mode), when keep[j] (local mode)."""
    keep, valid, window, scale, n_rep = plan.keep, plan.valid, plan.window, plan.scale, plan.n_rep
    sinks = plan.sinks if plan.mode == "sinks" else 0
    batch, heads, n, d = q.shape
    kv_heads, block = heads // n_rep, min(_BLOCK, n)
    blocks = -(-n // block)
    span = block + window - 1
    pad = blocks * block - n
    # band keys of block b: positions b * block - window + 1 + t, t < span (unfold of the front-padded keys)
    k_band, v_band = (F.pad(x.float(), (0, 0, window - 1, pad)).unfold(2, span, block) for x in (k, v))
    key_pos = torch.arange(blocks, device=q.device)[:, None] * block - window + 1 + torch.arange(span, device=q.device)
    sink_pos = sink_positions(valid, sinks)[:, :sinks]
    k_sink, v_sink = (_rows(x.float(), sink_pos.clamp(min=0))[:, :, None].transpose(-1, -2) for x in (k, v))
    keys = torch.cat([k_sink.expand(-1, -1, blocks, -1, -1), k_band], dim=-1)  # [B, Hkv, blocks, d, sinks + span]
    values = torch.cat([v_sink.expand(-1, -1, blocks, -1, -1), v_band], dim=-1).transpose(-1, -2)
    # queries [B, Hkv, blocks, n_rep * block, d]: rows (head in group, position in block)
    q_blocks = F.pad(q.float(), (0, 0, 0, pad)).view(batch, kv_heads, n_rep, blocks, block, d).transpose(2, 3)
    scores = torch.matmul(q_blocks.reshape(batch, kv_heads, blocks, n_rep * block, d), keys) * scale
    # allowed [B, blocks, block, sinks + span]
    q_pos = torch.arange(blocks * block, device=q.device).view(blocks, block)
    both_pos = torch.cat([sink_pos[:, None, :].expand(-1, blocks, -1), key_pos.expand(batch, -1, -1)], dim=-1)
    gap = q_pos[None, :, :, None] - both_pos[:, :, None, :]
    in_band = torch.cat(
        [
            torch.zeros_like(sink_pos, dtype=torch.bool)[:, None, :].expand(-1, blocks, -1),
            torch.ones_like(key_pos, dtype=torch.bool).expand(batch, -1, -1),
        ],
        dim=-1,
    )
    seen = torch.where(in_band[:, :, None, :], gap < window, (gap >= window) & (both_pos >= 0)[:, :, None, :])
    flags = F.pad(torch.stack([valid, keep], dim=-1), (0, 0, 0, 1))  # row n: a false key for positions out of range
    lookup = torch.where((both_pos >= 0) & (both_pos < n), both_pos, n)
    key_valid, key_keep = (flags[torch.arange(batch)[:, None, None], lookup][..., i] for i in (0, 1))
    row_keep = F.pad(keep, (0, pad)).view(batch, blocks, block, 1)
    drop = key_keep[:, :, None, :] & (row_keep if plan.mode == "sinks" else True)
    allowed = seen & (gap >= 0) & key_valid[:, :, None, :] & ~drop
    scores = scores.view(batch, kv_heads, blocks, n_rep, block, -1).masked_fill(~allowed[:, None, :, None], -torch.inf)
    top = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    probs = (scores - top).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs.view(batch, kv_heads, blocks, n_rep * block, -1), values)
    out = out.view(batch, kv_heads, blocks, n_rep, block, d) / total.clamp(min=1e-30)
    lse = (top + total.log()).squeeze(-1)
    # back to [B, Hq, n, ...]
    out = out.transpose(2, 3).reshape(batch, heads, blocks * block, d)[:, :, :n]
    return Part(out, lse.transpose(2, 3).reshape(batch, heads, blocks * block)[:, :, :n])


def merge(parts: tuple[Part, ...], valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The softmax over the union of the parts' (disjoint) key sets, zero at padding rows, memory (B, n, Hq, d)."""
    top = torch.stack([p.lse for p in parts]).amax(dim=0).clamp(min=torch.finfo(torch.float32).min)
    weights = [(p.lse - top).exp()[..., None] for p in parts]
    out = sum(p.out * w for p, w in zip(parts, weights, strict=True)) / sum(weights).clamp(min=1e-30)
    return _bshd(torch.where(valid[:, None, :, None], out, 0.0).to(dtype))


def is_faster(mode: str, n: int, window: int) -> bool:
    """Whether :func:`prefill_attention` beats the masked oracle on CPU for ``n`` tokens (see _MIN_WINDOWS)."""
    return mode == "paper" or n >= _MIN_WINDOWS * window


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
    """The sparse prefill attention of ``plan.mode`` on CPU tensors (module docstring): "paper", kept queries
    over the kept keys j <= i; "local", every valid query over the kept keys j <= i and its window; "sinks", kept
    queries over the kept keys and every valid query over its window and the sinks (the kernels' rules)."""
    if plan.mode == "paper":
        return _bshd(kept_part(q, k, v, plan).out.to(q.dtype))
    kept = (kept_part if plan.mode == "sinks" else kept_keys_part)(q, k, v, plan)
    return merge((kept, banded_part(q, k, v, plan)), plan.valid, q.dtype)
