"""Plain-torch references of the zipvl ops' shared pieces (masks, dense attention).

Conventions shared by every op: q is [B, Hq, Lq, d]; k and v are un-expanded [B, Hkv, Lk, d] with
Hq = Hkv * n_rep; ``attn_mask`` is None, a bool mask (True = may attend) or an additive float mask,
broadcastable to [B, Hq, Lq, Lk]; ``is_causal`` ANDs the causal mask aligned bottom-right (query i sits at
position Lk - Lq + i), which is what a KV cache implies and equals SDPA's ``is_causal`` when Lq == Lk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """bool [Lq, Lk]: key j visible to query i iff j <= i + (Lk - Lq)."""
    q_pos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    return torch.arange(lk, device=device)[None, :] <= q_pos


def combined_mask(
    attn_mask: torch.Tensor | None, is_causal: bool, lq: int, lk: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """One mask in SDPA form (bool or additive float) equal to ``attn_mask`` AND the causal mask."""
    if not is_causal:
        return attn_mask
    causal = causal_mask(lq, lk, device)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.to(dtype).masked_fill(~causal, float("-inf"))


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    n_rep: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Dense attention in the zipvl convention -> [B, Hq, Lq, d] in q's dtype.

    Without softcap this is SDPA (GQA through ``enable_gqa``); with ``softcap > 0`` the logits are
    ``softcap * tanh(logits / softcap)`` before the mask, computed in the inputs' dtype like HF's eager path
    with a float32 softmax.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    if softcap == 0.0:
        if is_causal and attn_mask is None and lq == lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=n_rep > 1)
        mask = combined_mask(attn_mask, is_causal, lq, lk, q.dtype, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=n_rep > 1)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    logits = torch.tanh(logits / softcap) * softcap
    mask = combined_mask(attn_mask, is_causal, lq, lk, logits.dtype, q.device)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
