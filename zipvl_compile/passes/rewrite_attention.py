"""Rewrite a decoder self-attention site into a zipvl op, all at once or not at all.

Prefill sites become ``zipvl.sparse_attention`` (its kept ratio recorded in the layer's stats slot of the
graph's report record) unless the site cannot take it or the options keep every token, in which case they get
the dense ``zipvl.attention`` and the reason is recorded; decode sites get ``zipvl.attention``, or
``zipvl.decode_attention`` over a ZipVLCache.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from zipvl_compile.config import ZipVLConfig
from zipvl_compile.passes.find_attention import default_scale
from zipvl_compile.passes.fx_util import example, shape
from zipvl_compile.passes.packed_cache import rewrite_packed_decode, simulate_prefill_write, wire_prefill_write
from zipvl_compile.passes.site import AttentionSite
from zipvl_compile.passes.tensor_parallel import tensor_parallel_group
from zipvl_compile.report import GraphRecord
from zipvl_compile.runtime import ops


class SharedProbes:
    """The probe rows of a graph's sparse sites: one ``zipvl.probe_rows`` node per (mask, causality, length),
    inserted before the first site that needs it (probes depend only on the validity mask and the seed)."""

    def __init__(self, gm: fx.GraphModule, config: ZipVLConfig) -> None:
        self.gm, self.config = gm, config
        self.nodes: dict[tuple, fx.Node] = {}

    def rows_for(self, site: AttentionSite) -> fx.Node:
        key = (site.mask, site.is_causal, str(shape(site.q)[2]))
        if key not in self.nodes:
            kwargs = {"q": site.q, "attn_mask": site.mask, "is_causal": site.is_causal, **self.config.probe_kwargs()}
            with self.gm.graph.inserting_before(site.out):
                self.nodes[key] = self.gm.graph.call_function(ops.probe_rows, (), kwargs)
        return self.nodes[key]


def rewrite_site(
    gm: fx.GraphModule, site: AttentionSite, config: ZipVLConfig, record: GraphRecord, probes: SharedProbes
) -> None:
    """Rewrite ``site`` in place (``site.op`` set), or reject it with a reason (graph untouched)."""
    scale = site.scale if site.scale is not None else default_scale(site.q)
    if scale is None:
        site.reject("head dim is not static (no default scale)")
        return
    site.scale = float(scale)
    site.dense_reason = _why_not_sparse(site, config) if site.kind == "prefill" else None
    packed = site.kv_write == "zipvl"
    if site.kind == "decode" and packed:
        new = rewrite_packed_decode(gm, site, config)
        _route_uses(site, new)
        site.op = "zipvl.decode_attention"
        return
    if site.kind == "prefill" and site.dense_reason is None:
        new = _rewrite_sparse(gm, site, config, record, probes.rows_for(site))
    else:
        kwargs = {**_geometry(site), "softcap": float(site.softcap)}
        new = _replace(gm, site, ops.attention, kwargs)
        site.op = "zipvl.attention"
    if packed:
        wire_prefill_write(gm, site, new)
    elif site.kind == "prefill" and config.kv_mode == "simulate" and site.kv_write == "dynamic_cat":
        site.kv_simulated = simulate_prefill_write(gm, site, new, config)


def _geometry(site: AttentionSite) -> dict[str, object]:
    """The arguments every attention op takes from the site itself, by name."""
    return {
        "q": site.q,
        "k": site.k,
        "v": site.v,
        "attn_mask": site.mask,
        "is_causal": site.is_causal,
        "scale": site.scale,
        "n_rep": site.n_rep,
    }


def _why_not_sparse(site: AttentionSite, config: ZipVLConfig) -> str | None:
    q_shape, k_shape = shape(site.q), shape(site.k)
    if site.layer in config.dense_layers:
        return "layer listed in dense_layers"
    if config.keeps_all:
        return "tau = 1 keeps every token (exact)"
    if site.softcap:
        return "logit softcap (not in the sparse kernel)"
    if q_shape[2] is not k_shape[2] and q_shape[2] != k_shape[2]:
        return "keys are longer than the prompt (a static cache buffer or a chunked prefill)"
    if site.mask_kind == "causal+window":
        return "sliding-window layer (attention already O(n·window); sparse prefill there costs accuracy)"
    mask = example(site.mask) if site.mask is not None else None
    if mask is not None and mask.dtype != torch.bool:
        return "additive float mask (values unknown at compile time)"
    if site.mask_kind not in ("causal", "causal+padding", "causal+mask"):
        return f"mask kind {site.mask_kind} (no causal structure)"
    return None


def _rewrite_sparse(
    gm: fx.GraphModule, site: AttentionSite, config: ZipVLConfig, record: GraphRecord, rows: fx.Node
) -> fx.Node:
    """Insert the sparse prefill; returns the op node whose outputs are (out, keep, ratio).

    When the site's query heads are sharded over a tensor-parallel group (passes.tensor_parallel), the op is
    split so the kept set is computed from all heads on every rank: ``zipvl.probe_scores`` ->
    ``_c10d_functional.all_reduce(colsum, "sum", group)`` -> ``wait_tensor`` -> ``zipvl.sparse_attention_scored``
    (seen counts probe rows, the same on every rank: not reduced).
    """
    geometry = _geometry(site)
    selection = {**config.selection_kwargs(), "stats_slot": record.ratio_slot(site.layer, example(site.q).device)}
    group = tensor_parallel_group(site.q)
    if group is None:
        kwargs = {**geometry, "probe_rows": rows, **config.probe_kwargs(), **selection}
        new = _replace(gm, site, ops.sparse_attention, kwargs, output_index=0)
        site.op = "zipvl.sparse_attention"
        return new
    graph = gm.graph
    probe = {name: geometry[name] for name in ("q", "k", "attn_mask", "is_causal", "scale", "n_rep")}
    with graph.inserting_before(site.out):
        scores = graph.call_function(ops.probe_scores, (), {**probe, "probe_rows": rows, **config.probe_kwargs()})
        scores.meta["nn_module_stack"] = site.out.meta.get("nn_module_stack")
        colsum, seen = (graph.call_function(operator.getitem, (scores, i)) for i in (0, 1))
        reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (colsum, "sum", group))
        colsum = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
    kwargs = {**geometry, "colsum": colsum, "seen": seen, **selection}
    new = _replace(gm, site, ops.sparse_attention_scored, kwargs, output_index=0)
    site.op = "zipvl.sparse_attention_scored"
    return new


def _replace(
    gm: fx.GraphModule, site: AttentionSite, target: object, kwargs: dict, output_index: int | None = None
) -> fx.Node:
    """Insert ``target(**kwargs)`` before ``site.out`` and route every use of the old output to it."""
    with gm.graph.inserting_before(site.out):
        new = gm.graph.call_function(target, (), kwargs)
        out = new if output_index is None else gm.graph.call_function(operator.getitem, (new, output_index))
    _route_uses(site, out)
    new.meta.setdefault("nn_module_stack", site.out.meta.get("nn_module_stack"))
    return new


def _route_uses(site: AttentionSite, out: fx.Node) -> None:
    """Every use of the site's old output now reads ``out`` (the old pattern becomes dead code)."""
    out.meta = {
        k: v
        for k, v in site.out.meta.items()
        if k in ("nn_module_stack", "stack_trace", "source_fn_stack", "example_value")
    }
    site.out.replace_all_uses_with(out)
