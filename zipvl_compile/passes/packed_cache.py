"""Wire attention sites to a ZipVLCache's ops (docs/architecture.md, the packed cache section).

Prefill: HF writes the cache before attention, but the bit assignment needs the kept set computed by the
attention. The ``zipvl.kv_write_`` of the prompt's K/V is moved after the site's op and given its ``keep``
(sparse sites) and the key-padding ``valid`` mask, so padding never enters the cache.
kv_mode="simulate" (a stock DynamicCache): the prefill's attention keeps full-precision K/V while the cache is
written ``zipvl.kv_simulate``'s quantised-and-dequantised copy (same numerics as the packed cache, no saving).
Decode: the attention over ``zipvl.kv_dense_view`` becomes ``zipvl.decode_attention`` on the packed buffers
(the dense view then dies), and the layer's ``zipvl.kv_recompress_`` is given the query that scores the block
(unless the options keep every token).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from zipvl_compile.config import ZipVLConfig
from zipvl_compile.passes.fx_util import example, is_function
from zipvl_compile.passes.kv_write import is_op
from zipvl_compile.passes.op_args import op_arg, set_op_args
from zipvl_compile.passes.site import AttentionSite
from zipvl_compile.runtime import ops


def wire_prefill_write(gm: fx.GraphModule, site: AttentionSite, op_node: fx.Node) -> None:
    """Move the site's ``kv_write_`` after ``op_node`` (the attention op) with keep / valid wired in."""
    write = site.kv_node
    keep = _keep_of(gm, op_node)
    anchor = keep or op_node
    valid = None
    if site.mask is not None:
        with gm.graph.inserting_before(anchor.next):
            valid = _key_valid(gm, site.mask)
    set_op_args(write, keep=keep, valid=valid)
    (valid or anchor).append(write)


def _keep_of(gm: fx.GraphModule, op_node: fx.Node) -> fx.Node | None:
    """The ``keep`` output (index 1) of a sparse attention op node, None for the dense op."""
    if not (is_op(op_node, ops.sparse_attention) or is_op(op_node, ops.sparse_attention_scored)):
        return None
    keep = next((u for u in op_node.users if u.target is operator.getitem and u.args[1] == 1), None)
    if keep is None:
        with gm.graph.inserting_after(op_node):
            keep = gm.graph.call_function(operator.getitem, (op_node, 1))
    return keep


def _key_valid(gm: fx.GraphModule, mask: fx.Node) -> fx.Node:
    """bool [B, n] node: keys some query may see under ``mask`` (bool, or additive float: > dtype min / 2)."""
    value = example(mask)
    graph = gm.graph
    if value.dtype != torch.bool:
        mask = graph.call_function(torch.gt, (mask, torch.finfo(value.dtype).min / 2))
    seen = graph.call_function(torch.any, (mask,), {"dim": -2})
    return graph.call_function(operator.getitem, (seen, (slice(None), 0)))


def rewrite_packed_decode(gm: fx.GraphModule, site: AttentionSite, config: ZipVLConfig) -> fx.Node:
    """Replace the decode attention by ``decode_attention`` on the packed buffers; returns the new node."""
    view = site.kv_node
    buffers = {name: op_arg(view, name) for name in ("hi", "lo", "tail", "hi_bits", "lo_bits")}
    with gm.graph.inserting_before(site.out):
        new = gm.graph.call_function(
            ops.decode_attention, (), {"q": site.q, **buffers, "scale": site.scale, "n_rep": site.n_rep}
        )
    recompress = _recompress_of(view, buffers["tail"])
    if recompress is not None and not config.keeps_all:
        set_op_args(recompress, q=site.q, scale=site.scale, n_rep=site.n_rep, tau=float(config.tau))
    return new


def _recompress_of(view: fx.Node, tail: list) -> fx.Node | None:
    """The layer's ``kv_recompress_`` node: it mutates the same tail list and precedes the dense view."""
    node = view.prev
    while node.op != "root":
        if is_op(node, ops.kv_recompress_) and list(op_arg(node, "tail")) == list(tail):
            return node
        node = node.prev
    return None


def simulate_prefill_write(gm: fx.GraphModule, site: AttentionSite, op_node: fx.Node, config: ZipVLConfig) -> bool:
    """kv_mode="simulate" on a DynamicCache prefill: the attention keeps the full-precision K/V, the cache gets
    them as the packed cache would hold them (``zipvl.kv_simulate``). True when applied.

    Applies only when the keys are ``cat([empty past, k_new])`` (a prefill); decode tokens are left as they are.
    """
    cats = (site.k, site.v)
    if not all(is_function(c, torch.cat) and _empty(c.args[0][0]) for c in cats):
        return False
    k_new, v_new = (c.args[0][1] for c in cats)
    keep = _keep_of(gm, op_node)
    anchor = keep or op_node
    graph = gm.graph
    with graph.inserting_before(anchor.next):
        valid = _key_valid(gm, site.mask) if site.mask is not None else None
        bits = {"hi_bits": config.hi_bits, "lo_bits": config.lo_bits}
        sim = graph.call_function(ops.kv_simulate, (), {"k": k_new, "v": v_new, "keep": keep, "valid": valid, **bits})
        for index, old in enumerate(cats):
            quantised = graph.call_function(operator.getitem, (sim, index))
            new_cat = graph.call_function(torch.cat, ([old.args[0][0], quantised],), {"dim": -2})
            old.replace_all_uses_with(new_cat, delete_user_cb=lambda user: user.op == "output")
    set_op_args(op_node, k=k_new, v=v_new)
    return True


def _empty(node: object) -> bool:
    value = example(node) if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.numel() == 0
