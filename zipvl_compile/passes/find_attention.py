"""Find attention sites: SDPA calls and HF's eager softmax pattern.

Eager attention in torch IR: matmul(q, k^T) -> [mul by scale | div by scale] -> [tanh softcap:
div(c) -> tanh -> mul(c)] -> [add additive mask] -> softmax(dim=-1[, dtype=float32]) -> [.to(dtype)] ->
[dropout(p=0)] -> matmul(probs, v). The matcher anchors on softmax and walks both ways; any step it does
not recognise, or an intermediate used outside the pattern (e.g. returned attention weights), leaves the
site as it was with a reason.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from zipvl_compile.passes.fx_util import arg, is_function, is_method, shape
from zipvl_compile.passes.site import AttentionSite

SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_MATMUL = (torch.matmul, operator.matmul)
_SOFTMAX_FN = (F.softmax, torch.softmax)


def find_attention_sites(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[tuple[fx.Node, str]]]:
    """All attention sites of ``gm`` and the softmax nodes that looked like attention but did not match."""
    sites, unmatched = [], []
    for node in gm.graph.nodes:
        if is_function(node, *SDPA):
            sites.append(_sdpa_site(node))
        elif is_function(node, *_SOFTMAX_FN) or is_method(node, "softmax"):
            site = _eager_site(node)
            if isinstance(site, AttentionSite):
                sites.append(site)
            elif site is not None:
                unmatched.append((node, site))
    return sites, unmatched


def _sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = node.args[:3]
    site = AttentionSite(
        out=node,
        pattern="sdpa",
        q=q,
        k=k,
        v=v,
        mask=arg(node, 3, "attn_mask"),
        is_causal=bool(arg(node, 5, "is_causal", False)),
        scale=node.kwargs.get("scale"),
        nodes=[node],
    )
    if len(node.args) > 6:
        site.scale = node.args[6]
    if node.kwargs.get("enable_gqa"):
        site.n_rep = -1  # resolved from shapes by the repeat_kv pass
    dropout = arg(node, 4, "dropout_p", 0.0)
    if not isinstance(dropout, (int, float)) or dropout != 0.0:
        site.reject(f"dropout_p={dropout} (only inference attention, dropout 0, is rewritten)")
    if not isinstance(site.scale, (int, float, type(None))):
        site.reject("scale is not a constant")
    return site


def _eager_site(softmax: fx.Node) -> AttentionSite | str | None:
    """Match the eager pattern around ``softmax``: a site, a reason string, or None if not attention."""
    if arg(softmax, 1, "dim", None) not in (-1, 3):
        return None
    nodes = [softmax]
    # forward: softmax -> [to] -> [dropout] -> matmul(., v)
    cur = softmax
    while True:
        if len(cur.users) != 1:
            return "attention probabilities are used outside the attention (e.g. returned weights)"
        nxt = next(iter(cur.users))
        if is_method(nxt, "to", "type") or is_method(nxt, "contiguous"):
            cur = nxt
        elif is_function(nxt, F.dropout) or is_method(nxt, "dropout"):
            p = arg(nxt, 1, "p", 0.5)
            if p != 0.0 and arg(nxt, 2, "training", True):
                return f"dropout p={p} in training mode"
            cur = nxt
        elif is_function(nxt, *_MATMUL) and nxt.args[0] is cur:
            out, v = nxt, nxt.args[1]
            nodes += [cur, out] if cur is not softmax else [out]
            break
        else:
            return None
        nodes.append(cur)
    # backward: softmax <- [add mask] <- [softcap] <- [scale] <- matmul(q, k^T)
    cur, mask = softmax.args[0], None
    logits = _logits(cur)
    if isinstance(logits, str) and _is_add(cur):
        for a, b in (cur.args, cur.args[::-1]):
            if isinstance(a, fx.Node) and not isinstance(_logits(a), str):
                logits, mask = _logits(a), b
                nodes.append(cur)
                break
    if isinstance(logits, str):
        return logits
    q, k, scale, softcap, logit_nodes = logits
    nodes += logit_nodes
    for inner in nodes:
        if inner is not out and any(u not in nodes for u in inner.users):
            return "an intermediate of the attention is used outside it"
    return AttentionSite(
        out=out, pattern="eager", q=q, k=k, v=v, mask=mask, is_causal=False, scale=scale, softcap=softcap, nodes=nodes
    )


def _logits(cur: fx.Node) -> tuple[fx.Node, fx.Node, float, float, list[fx.Node]] | str:
    """Match ``[softcap](matmul(q, k^T) [* s | / s])``: (q, k, scale, softcap, nodes) or a reason."""
    nodes, softcap, scale = [], 0.0, 1.0
    cap = _softcap(cur)
    if cap is not None:
        softcap, cur, cap_nodes = cap
        nodes += cap_nodes
    if is_function(cur, operator.mul, torch.mul) and _const(cur.args[1]) is not None:
        scale = _const(cur.args[1])
        nodes.append(cur)
        cur = cur.args[0]
    elif is_function(cur, operator.truediv, torch.div) and _const(cur.args[1]) is not None:
        scale = 1.0 / _const(cur.args[1])
        nodes.append(cur)
        cur = cur.args[0]
    if not isinstance(cur, fx.Node) or not is_function(cur, *_MATMUL):
        return "softmax input is not matmul(q, k^T) [* scale] [softcap] [+ mask]"
    q, kt = cur.args[:2]
    k = _untranspose(kt)
    if k is None:
        return "matmul's second operand is not a transposed key"
    return q, k, scale, softcap, nodes + [cur, kt]


def _is_add(node: fx.Node) -> bool:
    return is_function(node, operator.add, torch.add) or is_method(node, "add")


def _softcap(node: fx.Node) -> tuple[float, fx.Node, list[fx.Node]] | None:
    """Match ``tanh(x / c) * c``: (c, x, nodes)."""
    if not is_function(node, operator.mul, torch.mul) or len(node.args) != 2:
        return None
    tanh, cap = node.args
    if not (is_function(tanh, torch.tanh) or is_method(tanh, "tanh")) or _const(cap) is None:
        return None
    div = tanh.args[0]
    if not is_function(div, operator.truediv, torch.div) or _const(div.args[1]) != _const(cap):
        return None
    return float(_const(cap)), div.args[0], [node, tanh, div]


def _untranspose(node: fx.Node) -> fx.Node | None:
    if is_method(node, "transpose") or is_function(node, torch.transpose):
        dims = sorted(d % 4 for d in node.args[1:3])
        return node.args[0] if dims == [2, 3] else None
    if is_method(node, "mT"):
        return node.args[0]
    return None


def _const(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def default_scale(q: fx.Node) -> float | None:
    """SDPA's default scale 1/sqrt(d) from q's static head dim."""
    s = shape(q)
    return None if s is None or not isinstance(s[-1], int) else 1.0 / math.sqrt(s[-1])
