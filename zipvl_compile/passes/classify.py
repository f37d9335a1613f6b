"""Classify attention sites: decoder self-attention prefill / decode, cross-attention, encoder (vision tower).

Uses ``nn_module_stack`` (module path and class names) and shapes. Only decoder self-attention is
rewritten; every other kind is recorded with the reason it was left alone.
"""

from __future__ import annotations

import re

import torch.fx as fx

from zipvl_compile.passes.fx_util import layer_index, module_classes, module_path, shape, static_int
from zipvl_compile.passes.site import AttentionSite

_VISION = re.compile(r"vision|visual|image|siglip|clip|vit|patch|pixel|encoder|tower", re.IGNORECASE)
_CROSS = re.compile(r"cross", re.IGNORECASE)


def classify_site(site: AttentionSite) -> None:
    """Set ``kind``, ``module_path`` and ``layer`` of ``site``; reject sites that are not decoder self-attn."""
    path, cls = module_path(site.out)
    site.module_path, site.layer = path, layer_index(path)
    if not path:
        site.reject(
            "no module path (attention outside a traced module, e.g. after a graph break): "
            "decoder and encoder cannot be told apart"
        )
        return
    classes = " ".join(module_classes(site.out))
    if _CROSS.search(path) or _CROSS.search(classes):
        site.kind = "cross"
        site.reject("cross-attention (keys come from another sequence: its cache stays as it is)")
        return
    if _VISION.search(path) or _VISION.search(classes):
        site.kind = "encoder"
        site.reject("encoder / vision-tower attention (bidirectional, no KV cache)")
        return
    q_shape = shape(site.q)
    if q_shape is None or len(q_shape) != 4:
        site.reject("query is not a 4-D [B, H, L, d] tensor")
        return
    lq = static_int(q_shape[2])
    site.kind = "decode" if lq == 1 else "prefill"
    if site.layer is None:
        site.reject(f"no decoder layer index in module path {path!r} ({cls})")


def mark_non_causal(site: AttentionSite) -> None:
    """After the mask and KV-write passes: a site with neither causality nor a KV cache is an encoder."""
    if site.skip is None and site.kv_write == "none" and site.mask_kind in ("mask", "none") and not site.is_causal:
        site.kind = "encoder"
        site.reject("no causal mask and no KV cache: encoder-style attention")


def site_nodes(sites: list[AttentionSite]) -> set[fx.Node]:
    return {n for s in sites for n in s.nodes}
