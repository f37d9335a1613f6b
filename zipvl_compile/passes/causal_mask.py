"""Turn HF's purely causal in-graph mask into ``is_causal`` (+ the key-padding term, kept as a small mask).

transformers 5.17 builds the SDPA mask in the graph as an AND of terms, then ``expand``s it to
[B, 1, Lq, Lk]; the eager path wraps it in ``where(mask, 0, min)``. Terms recognised:
- causal: ``kv_idx <= q_idx`` with ``q_idx = arange(Lq) + a`` and ``kv_idx = arange(Lk) + b`` and
  ``a - b == Lk - Lq`` (bottom-right alignment, proven on the symbolic shapes);
- key padding: ``attention_mask[batch_idx, kv_idx]`` (a [B, 1, 1, Lk] bool), kept as the op's mask;
- the constant True that starts the AND chain.
A sliding-window term ``kv_idx > q_idx - w`` keeps the whole mask (``causal+window``); any other term
(bidirectional image spans, token types, packed sequences) keeps it too (``causal+mask`` when a causal term is
among them, ``mask`` otherwise).
Masks that arrive as graph inputs (static caches build them outside the graph) stay masks.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from zipvl_compile.passes.fx_util import example, is_function, is_getitem, is_method, shape
from zipvl_compile.passes.site import AttentionSite

_MIN_FILL = torch.finfo(torch.float16).min  # where(mask, 0, x <= this): the additive form of a bool mask


def analyse_mask(site: AttentionSite) -> None:
    """Set ``site.mask_kind`` and, for causal masks, ``site.is_causal`` and the reduced ``site.mask``."""
    if site.mask is None:
        if site.is_causal:
            q_len, k_len = shape(site.q), shape(site.k)
            if q_len is None or k_len is None or not _sym_equal(q_len[2], k_len[2]):
                site.reject("SDPA is_causal with Lq != Lk (top-left alignment) is not rewritten")
                return
        site.mask_kind = "causal" if site.is_causal else "none"
        return
    if site.is_causal:
        site.reject("SDPA with both attn_mask and is_causal")
        return
    mask = _unwrap_additive(site.mask)
    terms = _and_terms(_strip(mask))
    if terms is None:
        site.mask_kind = "mask"
        return
    causal, padding, window, other = [], [], [], []
    for term in terms:
        term = _strip(term)
        if _is_true(term):
            continue
        if _is_causal_term(term):
            causal.append(term)
        elif _is_key_padding(term):
            padding.append(term)
        elif _is_window_term(term):
            window.append(term)
        else:
            other.append(term)
    if other or window or not causal or len(padding) > 1:
        # the whole mask stays; a causal term among others still marks a decoder
        site.mask_kind = "mask" if not causal else "causal+window" if window and not other else "causal+mask"
        return
    site.is_causal = True
    if padding:
        site.mask, site.mask_kind = padding[0], "causal+padding"
    else:
        site.mask, site.mask_kind = None, "causal"


def _unwrap_additive(node: fx.Node) -> fx.Node:
    """``where(b, 0, min)`` -> b (the additive form of a bool mask), else the node itself."""
    if is_function(node, torch.where) and len(node.args) == 3:
        cond, zero, fill = node.args
        zero = _scalar(zero)
        fill = _scalar(fill)
        if zero == 0.0 and fill is not None and fill <= _MIN_FILL and isinstance(cond, fx.Node):
            return cond
    return node


def _scalar(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and is_function(value, torch.tensor) and isinstance(value.args[0], float):
        return value.args[0]
    if isinstance(value, fx.Node) and is_function(value, torch.tensor) and value.args[0] == []:
        return None
    return None


def _strip(node: object) -> object:
    """Skip ``.to(device)`` / ``.to(bool)`` / ``expand`` wrappers."""
    while isinstance(node, fx.Node) and (is_method(node, "to", "expand", "bool")):
        node = node.args[0]
    return node


def _and_terms(node: object) -> list | None:
    if isinstance(node, fx.Node) and (
        is_function(node, operator.and_, torch.logical_and) or is_method(node, "__and__", "logical_and")
    ):
        out = []
        for a in node.args[:2]:
            sub = _and_terms(_strip(a))
            out += sub if sub is not None else [a]
        return out
    return [node] if isinstance(node, fx.Node) else None


def _is_true(node: object) -> bool:
    return isinstance(node, fx.Node) and is_method(node, "new_ones") and node.kwargs.get("dtype") == torch.bool


def _is_causal_term(node: fx.Node) -> bool:
    if is_function(node, operator.le):
        kv, q = node.args
    elif is_function(node, operator.ge):
        q, kv = node.args
    else:
        return False
    q_idx, kv_idx = _arange_offset(q, axis=2), _arange_offset(kv, axis=3)
    if q_idx is None or kv_idx is None:
        return False
    (lq, a), (lk, b) = q_idx, kv_idx
    return _sym_equal(a - b, lk - lq)


def _is_window_term(node: fx.Node) -> bool:
    """``kv_idx > q_idx - w`` (sliding window of w tokens)."""
    if not is_function(node, operator.gt) or not isinstance(node.args[1], fx.Node):
        return False
    kv, shifted = node.args
    return (
        _arange_offset(kv, axis=3) is not None
        and is_function(shifted, operator.sub)
        and _arange_offset(shifted.args[0], axis=2) is not None
    )


def _arange_offset(node: object, axis: int) -> tuple[object, object] | None:
    """``arange(L)[None, None, :, None] + c`` style index on ``axis`` -> (L, c)."""
    if not isinstance(node, fx.Node) or not is_getitem(node):
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) != 4 or index[axis] != slice(None):
        return None
    src, offset = node.args[0], 0
    if is_function(src, operator.add):
        src, offset = src.args
    if not is_function(src, torch.arange) or len(src.args) != 1:
        return None
    length, offset = _symbolic(src.args[0]), _symbolic(offset)
    if length is None or offset is None:
        return None
    return length, offset


def _symbolic(value: object) -> int | torch.SymInt | None:
    """An int or SymInt argument (a SymInt appears as a node whose example value is a SymInt)."""
    if isinstance(value, fx.Node):
        value = example(value)
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return value
    return None


def _is_key_padding(node: fx.Node) -> bool:
    """``attention_mask[batch_idx, kv_idx]``: a per-key bool of shape [B, 1, 1, Lk]."""
    if not is_getitem(node) or not isinstance(node.args[1], tuple) or len(node.args[1]) != 2:
        return False
    s = shape(node)
    return s is not None and len(s) == 4 and s[1] == 1 and s[2] == 1


def _sym_equal(a: object, b: object) -> bool:
    """True when two ints/SymInts are provably equal."""
    try:
        diff = a - b
    except TypeError:
        return False
    if isinstance(diff, int):
        return diff == 0
    if isinstance(diff, torch.SymInt):
        expr = diff.node.expr
        return bool(expr.is_number and int(expr) == 0)
    return False
