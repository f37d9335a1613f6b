"""Rewrite a decoder self-attention site into a zipvl op, all at once or not at all."""

from __future__ import annotations

import torch
import torch.fx as fx

from zipvl_compile.passes.find_attention import default_scale
from zipvl_compile.passes.site import AttentionSite
from zipvl_compile.runtime import ops


def rewrite_dense(gm: fx.GraphModule, site: AttentionSite) -> None:
    """Replace ``site.out`` by ``zipvl.attention`` on the un-expanded K/V (the old nodes become dead)."""
    scale = site.scale if site.scale is not None else default_scale(site.q)
    if scale is None:
        site.reject("head dim is not static (no default scale)")
        return
    args = (site.q, site.k, site.v, site.mask, site.is_causal, float(scale), site.n_rep, float(site.softcap))
    _replace(gm, site, ops.attention, args)
    site.op = "zipvl.attention"


def _replace(gm: fx.GraphModule, site: AttentionSite, target: object, args: tuple) -> fx.Node:
    with gm.graph.inserting_before(site.out):
        new = gm.graph.call_function(target, args)
    new.meta = {k: v for k, v in site.out.meta.items() if k in ("nn_module_stack", "stack_trace",
                                                                 "source_fn_stack")}
    value = site.out.meta.get("example_value")
    if isinstance(value, torch.Tensor):
        new.meta["example_value"] = value
    site.out.replace_all_uses_with(new)
    return new
