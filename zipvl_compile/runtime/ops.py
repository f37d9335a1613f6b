"""The zipvl op set, registered once through ``torch.library`` (namespace ``zipvl``).

Each op has one schema and one plain-torch reference. Ops whose CUDA body calls a library kernel
(SDPA, FlashAttention) are ``custom_op`` everywhere; ops made only of our own Triton kernels are defined
with :func:`define_op` ``(triton=True)``, which registers a ``triton_op`` on CUDA machines (so Inductor inlines
the kernels) and a ``custom_op`` with a fake elsewhere (the Triton interpreter cannot be traced through
``triton_op``). Importing this module registers the ops; it is idempotent per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zipvl_compile.runtime import stats
from zipvl_compile.runtime.reference import dense_attention
from zipvl_compile.runtime.sparse import sparse_attention as sparse_attention_impl

NAMESPACE = "zipvl"


def define_op(name: str, impl: Callable, fake: Callable, mutates_args: Sequence[str] = (),
              triton: bool = False) -> torch._ops.OpOverload:
    """Register ``zipvl::name`` from a Python function with type hints; returns its ``.default`` overload."""
    qualname = f"{NAMESPACE}::{name}"
    if triton and torch.cuda.is_available():
        op = torch.library.triton_op(qualname, mutates_args=tuple(mutates_args))(impl)
    else:
        op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(impl)
    op.register_fake(fake)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               is_causal: bool, scale: float, n_rep: int, softcap: float = 0.0) -> torch.Tensor:
    return dense_attention(q, k, v, attn_mask, is_causal, scale, n_rep, softcap).contiguous()


def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    is_causal: bool, scale: float, n_rep: int, softcap: float = 0.0) -> torch.Tensor:
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


attention = define_op("attention", _attention, _attention_fake)
"""zipvl::attention(q [B,Hq,Lq,d], k/v [B,Hkv,Lk,d], attn_mask?, is_causal, scale, n_rep, softcap=0)
-> [B,Hq,Lq,d]: dense attention, exact (see runtime.reference for the mask convention)."""


def _bshd(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, d] with (B, S, H, d) memory: the layout HF's ``transpose(1, 2).reshape`` reads for free."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                      is_causal: bool, scale: float, n_rep: int, tau: float, n_probe_recent: int,
                      n_probe_random: int, min_keep: int, seed: int, stats_slot: int = -1,
                      force_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, keep, ratio = sparse_attention_impl(q, k, v, attn_mask, is_causal, scale, n_rep, tau, n_probe_recent,
                                             n_probe_random, min_keep, seed, force_ratio)
    stats.record_ratio(stats_slot, ratio)
    return _bshd(out), keep, ratio


def _sparse_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                           is_causal: bool, scale: float, n_rep: int, tau: float, n_probe_recent: int,
                           n_probe_random: int, min_keep: int, seed: int, stats_slot: int = -1,
                           force_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, n, _ = q.shape
    out = q.new_empty(batch, n, heads, v.shape[-1]).transpose(1, 2)
    return out, q.new_empty(batch, n, dtype=torch.bool), q.new_empty(batch, dtype=torch.float32)


sparse_attention = define_op("sparse_attention", _sparse_attention, _sparse_attention_fake)
"""zipvl::sparse_attention(q, k, v, attn_mask?, is_causal, scale, n_rep, tau, n_probe_recent, n_probe_random,
min_keep, seed, stats_slot=-1, force_ratio=0) -> (out [B,Hq,n,d], keep bool [B,n], ratio float32 [B]): ZipVL
prefill (runtime.sparse); with a stats slot (runtime.stats) it also stores the batch's kept-ratio moments there;
force_ratio > 0 is the benchmark-only fixed kept ratio."""
