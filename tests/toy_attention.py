"""Toy decoder layers exercising each attention pattern the passes must recognise (or refuse)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Variant:
    pattern: str = "sdpa"  # sdpa | eager
    heads: int = 4
    n_rep: int = 1
    head_dim: int = 16
    mask: str = "causal"  # causal | causal_padding | is_causal | sliding | input_float | none
    scale: str = "mul"  # mul | div | default (sdpa only)
    softcap: float = 0.0  # eager only
    window: int = 3
    repeat: str = "expand"  # expand | interleave | gqa_flag (sdpa only)
    dropout: float = 0.0
    return_weights: bool = False


class SelfAttn(nn.Module):
    def __init__(self, v: Variant) -> None:
        super().__init__()
        self.v = v

    def forward(self, q, k, v, mask):
        cfg = self.v
        if cfg.n_rep > 1 and cfg.repeat != "gqa_flag":
            k, v = _repeat(k, cfg), _repeat(v, cfg)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        if cfg.pattern == "sdpa":
            kw = {} if cfg.scale == "default" else {"scale": scale}
            if cfg.repeat == "gqa_flag" and cfg.n_rep > 1:
                kw["enable_gqa"] = True
            if mask is None:
                return F.scaled_dot_product_attention(
                    q, k, v, is_causal=cfg.mask == "is_causal", dropout_p=cfg.dropout, **kw
                ), None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=cfg.dropout, **kw), None
        if cfg.scale == "div":
            w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(cfg.head_dim)
        else:
            w = torch.matmul(q, k.transpose(2, 3)) * scale
        if cfg.softcap:
            w = w / cfg.softcap
            w = torch.tanh(w)
            w = w * cfg.softcap
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=cfg.dropout, training=cfg.dropout > 0)
        return torch.matmul(w, v), (w if cfg.return_weights else None)


def _repeat(x: torch.Tensor, cfg: Variant) -> torch.Tensor:
    if cfg.repeat == "interleave":
        return x.repeat_interleave(cfg.n_rep, dim=1)
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, cfg.n_rep, s, d).reshape(b, h * cfg.n_rep, s, d)


class Layer(nn.Module):
    def __init__(self, v: Variant) -> None:
        super().__init__()
        self.self_attn = SelfAttn(v)


class ToyDecoder(nn.Module):
    """``layers.0.self_attn``: attention over given q/k/v with an in-graph HF-style mask."""

    def __init__(self, v: Variant) -> None:
        super().__init__()
        self.v = v
        self.layers = nn.ModuleList([Layer(v)])

    def forward(self, q, k, v, padding, float_mask):
        mask = self._mask(q, padding, float_mask)
        out, weights = self.layers[0].self_attn(q, k, v, mask)
        return (out, weights) if weights is not None else out

    def _mask(self, q, padding, float_mask):
        kind = self.v.mask
        if kind in ("is_causal", "none"):
            return None
        if kind == "input_float":
            return float_mask
        n = q.shape[2]
        q_idx = (torch.arange(n, device=q.device) + 0)[None, None, :, None]
        kv_idx = (torch.arange(n, device=q.device) + 0)[None, None, None, :]
        batch_idx = torch.arange(q.shape[0], device=q.device)[:, None, None, None]
        mask = q_idx.new_ones((), dtype=torch.bool)
        mask = mask & (kv_idx <= q_idx)
        if kind == "sliding":
            mask = mask & (kv_idx > q_idx - self.v.window)
        if kind in ("causal_padding", "sliding"):
            mask = mask & padding.to(torch.bool)[batch_idx, kv_idx]
        mask = mask.expand(q.shape[0], -1, n, n)
        if self.v.pattern == "eager":
            mask = torch.where(mask, torch.tensor(0.0, dtype=q.dtype), torch.finfo(q.dtype).min)
        return mask


def inputs(v: Variant, batch: int, n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hkv = v.heads // v.n_rep
    q = torch.randn(batch, v.heads, n, v.head_dim, generator=g).to(dtype)
    k = torch.randn(batch, hkv, n, v.head_dim, generator=g).to(dtype)
    val = torch.randn(batch, hkv, n, v.head_dim, generator=g).to(dtype)
    padding = torch.ones(batch, n, dtype=torch.long)
    if batch > 1:
        padding[1, : n // 3] = 0  # left padding on the second row
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    float_mask = torch.zeros(batch, 1, n, n, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
    return q, k, val, padding, float_mask


def visible_rows(v: Variant, padding: torch.Tensor, n: int) -> torch.Tensor:
    """bool [B, 1, n, 1]: query rows that see at least one key (others are undefined in eager too)."""
    if v.mask in ("causal_padding", "sliding"):
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        seen = (causal[None] & padding.bool()[:, None, :]).any(-1)
        return seen[:, None, :, None]
    return torch.ones(padding.shape[0], 1, n, 1, dtype=torch.bool)
