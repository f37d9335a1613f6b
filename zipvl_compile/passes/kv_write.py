"""Find the KV-cache write that feeds each decoder attention site.

Forms recognised (transformers 5.17):
- ``dynamic_cat``: DynamicCache, ``keys = cat([past_or_empty, k_new], dim=-2)`` (the result is a graph
  output that Dynamo writes back into the cache object);
- ``static_index_copy``: StaticCache, ``buffer.index_copy_(2, cache_position, k_new)`` on the buffer the
  attention reads (possibly through a ``[:, :, :L]`` slice);
- ``static_copy``: sliding-window layers, ``buffer.copy_(...)`` or ``buffer[..., idx] = k_new``;
- ``zipvl``: a ZipVLCache: ``zipvl.kv_write_`` of the new keys (prefill) or keys read through
  ``zipvl.kv_dense_view`` (decode); ``site.kv_node`` is that node;
- ``none``: the keys come straight from the projection (no cache).

``site.kv_layer`` is the cache layer the graph input holding the cached keys names (``...layers[i].keys``,
``...layers[i].hi[0]``); a prefill that creates its cache in the graph has none.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from zipvl_compile.passes.fx_util import cache_layer, is_function, is_getitem, is_method
from zipvl_compile.passes.op_args import op_arg
from zipvl_compile.passes.site import AttentionSite
from zipvl_compile.runtime import ops

_WRITE_METHODS = ("index_copy_", "copy_")


def find_kv_write(site: AttentionSite) -> None:
    """Set ``site.kv_write`` (and ``k_new``/``v_new`` when the new keys/values are identifiable)."""
    packed = _zipvl_node(site.k)
    if packed is not None and packed is _zipvl_node(site.v):
        site.kv_write, site.kv_node = "zipvl", packed
        site.kv_layer = _input_layer(op_arg(packed, "hi")[0])
        return
    k_kind, k_new = _write_of(site.k)
    v_kind, v_new = _write_of(site.v)
    if k_kind != v_kind:
        site.reject(f"keys and values are cached differently ({k_kind} vs {v_kind})")
        return
    site.kv_write, site.k_new, site.v_new = k_kind, k_new, v_new
    if k_kind != "none":
        base = _seq_base(site.k)
        site.kv_layer = _input_layer(base.args[0][0] if k_kind == "dynamic_cat" else base)


def _input_layer(node: object) -> int | None:
    """The cache layer of the graph input ``node`` reads (through indexing and dtype/device moves), else None."""
    while isinstance(node, fx.Node) and (is_getitem(node) or is_method(node, "to", "contiguous")):
        node = node.args[0]
    return cache_layer(node) if isinstance(node, fx.Node) else None


def is_op(node: object, op: torch._ops.OpOverload) -> bool:
    """``node`` calls ``op`` (Dynamo records custom ops as the packet or the overload: docs/architecture.md, traps)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (op, op._overloadpacket)


def _zipvl_node(node: fx.Node) -> fx.Node | None:
    """The ZipVLCache node feeding these keys/values: a kv_dense_view (decode) or the kv_write_ of them."""
    if is_getitem(node) and is_op(node.args[0], ops.kv_dense_view):
        return node.args[0]
    for user in node.users:
        if is_op(user, ops.kv_write_) and node in (op_arg(user, "k"), op_arg(user, "v")):
            return user
    return None


def _seq_base(node: fx.Node) -> fx.Node:
    """``node`` without the ``[:, :, :L]`` slices of the sequence axis."""
    while is_getitem(node) and _is_seq_slice(node.args[1]):
        node = node.args[0]
    return node


def _write_of(node: fx.Node) -> tuple[str, fx.Node | None]:
    base = _seq_base(node)
    if is_function(base, torch.cat) and _cat_dim(base) in (-2, 2) and len(base.args[0]) == 2:
        return "dynamic_cat", base.args[0][1]
    for user in base.users:
        if is_method(user, "index_copy_") and user.args[0] is base:
            return "static_index_copy", user.args[3]
        if (is_method(user, "copy_") and user.args[0] is base) or is_function(user, operator.setitem):
            return "static_copy", None
    for user in list(base.users):
        # the new keys may also feed a write of a sliding-window buffer (a slice copied into it)
        for nxt in [user, *user.users]:
            if is_method(nxt, *_WRITE_METHODS) and nxt.args[0] is not base and nxt.args[-1] in (base, user):
                return "static_copy", base
    return "none", None


def _cat_dim(node: fx.Node) -> int | None:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def _is_seq_slice(index: object) -> bool:
    full = slice(None, None, None)
    return (
        isinstance(index, tuple)
        and len(index) == 4
        and index[0] == full
        and index[1] == full
        and isinstance(index[2], slice)
        and index[3] == full
    )
