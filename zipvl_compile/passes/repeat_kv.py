"""Peel repeat_kv (GQA/MQA): give the op un-expanded K/V and ``n_rep``.

HF's repeat_kv in torch IR: ``x[:, :, None, :, :].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)``;
``repeat_interleave(n_rep, dim=1)`` is accepted too, and SDPA's ``enable_gqa`` with un-expanded K/V.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from zipvl_compile.passes.fx_util import arg, is_function, is_getitem, is_method, shape, static_int
from zipvl_compile.passes.site import AttentionSite


def peel_repeat_kv(site: AttentionSite) -> None:
    """Replace ``site.k``/``site.v`` by their un-expanded sources and set ``site.n_rep``."""
    k, k_rep = _unexpand(site.k)
    v, v_rep = _unexpand(site.v)
    if k_rep != v_rep:
        site.reject(f"keys and values are repeated differently (n_rep {k_rep} vs {v_rep})")
        return
    site.k, site.v = k, v
    q_shape, k_shape = shape(site.q), shape(k)
    if q_shape is None or k_shape is None or len(k_shape) != 4:
        site.reject("key is not a 4-D [B, H, L, d] tensor")
        return
    hq, hkv = static_int(q_shape[1]), static_int(k_shape[1])
    if hq is None or hkv is None or hkv == 0 or hq % hkv:
        site.reject(f"query heads {q_shape[1]} not a multiple of key heads {k_shape[1]}")
        return
    n_rep = hq // hkv
    if k_rep is not None and n_rep != k_rep:
        site.reject("head counts do not match the repeat factor")
        return
    if n_rep > 1 and k_rep is None and site.n_rep != -1:
        site.reject("key/value heads differ from query heads without repeat_kv or enable_gqa")
        return
    site.n_rep = n_rep


def _unexpand(node: fx.Node) -> tuple[fx.Node, int | None]:
    """(source, n_rep) if ``node`` is a repeat of the KV heads, else (node, None)."""
    if is_method(node, "repeat_interleave") and arg(node, 2, "dim") == 1:
        rep = static_int(node.args[1])
        if rep is not None:
            return node.args[0], rep
    if (is_method(node, "reshape") or is_function(node, torch.reshape)) and len(node.users) >= 1:
        expand = node.args[0]
        if is_method(expand, "expand") and len(expand.users) == 1:
            unsq = expand.args[0]
            sizes = expand.args[1:] if len(expand.args) > 2 else expand.args[1]
            if len(sizes) == 5 and is_getitem(unsq) and _is_head_unsqueeze(unsq.args[1]):
                rep = static_int(sizes[2])
                if rep is not None:
                    return unsq.args[0], rep
    return node, None


def _is_head_unsqueeze(index: object) -> bool:
    """``(:, :, None, :, :)`` or ``(:, :, None)``: a new axis after the head dim."""
    if not isinstance(index, tuple) or len(index) < 3 or index[2] is not None:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and all(i == full or i is Ellipsis for i in index[3:])
