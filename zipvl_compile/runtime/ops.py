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

from zipvl_compile.runtime.reference import dense_attention

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
