"""The pass manager: runs the FX passes on one Dynamo graph, logs what each matched, fills the report.

Order: find sites -> locate (module path, layer) -> peel repeat_kv -> analyse the mask -> find the KV write
-> classify (from that evidence) -> rewrite -> safe DCE. A pass that rejects a site records why; a rejected
site is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.fx as fx

from zipvl_compile.config import ZipVLConfig
from zipvl_compile.logs import LOG_NAME
from zipvl_compile.passes.causal_mask import analyse_mask
from zipvl_compile.passes.classify import classify_site, locate_site
from zipvl_compile.passes.dce import safe_dce
from zipvl_compile.passes.find_attention import find_attention_sites
from zipvl_compile.passes.fx_util import layer_index, module_path
from zipvl_compile.passes.kv_write import find_kv_write
from zipvl_compile.passes.repeat_kv import peel_repeat_kv
from zipvl_compile.passes.rewrite_attention import SharedProbes, rewrite_site
from zipvl_compile.passes.site import AttentionSite
from zipvl_compile.report import GraphRecord, SiteRecord

log = logging.getLogger(LOG_NAME)

SITE_PASSES: list[tuple[str, Callable[[AttentionSite], None]]] = [
    ("locate", locate_site),
    ("repeat_kv", peel_repeat_kv),
    ("causal_mask", analyse_mask),
    ("kv_write", find_kv_write),
    ("classify", classify_site),
]


def run_passes(gm: fx.GraphModule, config: ZipVLConfig, record: GraphRecord) -> list[AttentionSite]:
    """Rewrite every decoder self-attention site of ``gm`` in place, recording each in ``record``; returns all
    sites seen."""
    graph_id = record.graph_id
    sites, unmatched = find_attention_sites(gm)
    log.info(
        "graph %d: find_attention matched %d site(s) (%d sdpa, %d eager), %d softmax left alone",
        graph_id,
        len(sites),
        sum(s.pattern == "sdpa" for s in sites),
        sum(s.pattern == "eager" for s in sites),
        len(unmatched),
    )
    for name, site_pass in SITE_PASSES:
        before = sum(s.skip is None for s in sites)
        for site in sites:
            if site.skip is None:
                site_pass(site)
        log.debug(
            "graph %d: %s kept %d of %d candidate site(s)", graph_id, name, sum(s.skip is None for s in sites), before
        )
    probes = SharedProbes(gm, config)
    for site in sites:
        if site.skip is None:
            rewrite_site(gm, site, config, record, probes)
    removed = safe_dce(gm)
    gm.graph.lint()
    gm.recompile()
    log.info(
        "graph %d: rewrote %d site(s), left %d, removed %d dead node(s)",
        graph_id,
        sum(s.op is not None for s in sites),
        sum(s.op is None for s in sites),
        removed,
    )
    for site in sites:
        _record(record, site)
    _record_kv_mode(record, sites, config)
    for node, reason in unmatched:
        path, _ = module_path(node)
        record.add_site(
            SiteRecord(
                graph_id=graph_id,
                module_path=path,
                layer=layer_index(path),
                kind="unknown",
                rewritten=False,
                reason=reason,
                op=None,
                pattern="eager",
            )
        )
        log.info("graph %d: softmax at %s left alone: %s", graph_id, path or node.name, reason)
    return sites


_STOCK_CACHE_REASON = {
    "packed": "the model runs a stock HF cache: pass a ZipVLCache or use zipvl_compile.compile for the packed cache",
    "simulate": "kv_mode=simulate quantises only DynamicCache prefill writes; this cache write is left as is",
    "off": "kv_mode=off",
}


def _record_kv_mode(record: GraphRecord, sites: list[AttentionSite], config: ZipVLConfig) -> None:
    """Say in the report how this graph's KV cache is handled, and why."""
    writes = {s.kv_write for s in sites if s.op is not None and s.kv_write not in (None, "none")}
    if "zipvl" in writes:
        record.set_kv_mode("packed", "ZipVLCache ops in the graph")
    elif any(s.kv_simulated for s in sites):
        reason = (
            f"{config.hi_bits}/{config.lo_bits}-bit numerics applied to the prefill's writes "
            "into the stock DynamicCache (no memory saved; decode tokens stay unquantised)"
        )
        record.set_kv_mode("simulate", reason)
    elif writes:
        record.set_kv_mode("off", f"{_STOCK_CACHE_REASON[config.kv_mode]} ({', '.join(sorted(writes))})")


def _record(record: GraphRecord, site: AttentionSite) -> None:
    graph_id = record.graph_id
    rewritten = site.op is not None
    record.add_site(
        SiteRecord(
            graph_id=graph_id,
            module_path=site.module_path,
            layer=site.layer,
            kind=site.kind,
            rewritten=rewritten,
            reason=None if rewritten else site.skip,
            op=site.op,
            pattern=site.pattern,
            n_rep=site.n_rep,
            mask=site.mask_kind,
            kv_write=site.kv_write,
            dense_reason=site.dense_reason,
            evidence=site.evidence,
        )
    )
    if rewritten:
        log.info(
            "graph %d: layer %s %s site %s -> %s (n_rep %s, mask %s, kv %s)",
            graph_id,
            site.layer,
            site.kind,
            site.module_path,
            site.op,
            site.n_rep,
            site.mask_kind,
            site.kv_write,
        )
    else:
        log.info("graph %d: %s site %s left as it was: %s", graph_id, site.kind, site.module_path, site.skip)
