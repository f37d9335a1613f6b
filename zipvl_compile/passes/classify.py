"""Tell decoder self-attention (prefill / decode) from cross-attention and encoder (vision-tower) attention.

Two passes around the evidence-gathering ones (repeat_kv, causal_mask, kv_write):

- :func:`locate_site` (first) reads the module path and the layer index from the path and from the attention
  module's own ``layer_idx``, and gives a provisional kind from the module names, which stays only when a later
  pass leaves the site alone before :func:`classify_site` sees it;
- :func:`classify_site` (last) decides from what the graph does, whatever the modules are called:
  keys projected from inputs the queries never read are cross-attention; a causal mask or keys that come from a
  KV-cache write make decoder self-attention; neither (bidirectional, no cache) is an encoder site. Module names
  only break the tie left by no evidence at all (``cross`` in a name). ``site.evidence`` says what decided.

The layer index comes from the most reliable source present: the cache layer the keys are written to / read
from, then the module's ``layer_idx``, then the module path (a graph break inside a decoder layer compiles its
attention in a piece whose path is a bare ``self_attn``).
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from zipvl_compile.passes.fx_util import (
    is_parameter_input,
    layer_index,
    live_module,
    module_classes,
    module_path,
    shape,
    static_int,
)
from zipvl_compile.passes.site import AttentionSite

_VISION = re.compile(r"vision|visual|image|siglip|clip|vit|patch|pixel|encoder|tower", re.IGNORECASE)
_CROSS = re.compile(r"cross", re.IGNORECASE)
_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def locate_site(site: AttentionSite) -> None:
    """Set ``module_path``, ``layer`` (module ``layer_idx``, else the path) and a provisional ``kind``."""
    path, _ = module_path(site.out)
    site.module_path = path
    module = live_module(site.out)
    layer_idx = getattr(module, "layer_idx", None)
    site.module_layer = layer_idx if isinstance(layer_idx, int) and not isinstance(layer_idx, bool) else None
    site.layer = site.module_layer if site.module_layer is not None else layer_index(path)
    names = " ".join([path, *module_classes(site.out)])
    if _CROSS.search(names):
        site.kind, site.evidence = "cross", "module name (provisional)"
    elif _VISION.search(names):
        site.kind, site.evidence = "encoder", "module name (provisional)"


def classify_site(site: AttentionSite) -> None:
    """Set ``kind``, ``evidence`` and ``layer`` from the graph's evidence; reject every site that is not decoder
    self-attention. Runs after the mask and KV-write passes (``mask_kind``, ``is_causal``, ``kv_write``)."""
    q_shape = shape(site.q)
    if q_shape is None or len(q_shape) != 4:
        site.reject("query is not a 4-D [B, H, L, d] tensor")
        return
    if _keys_from_other_inputs(site):
        site.kind, site.evidence = "cross", "keys projected from inputs the queries never read"
        site.reject("cross-attention (keys come from another sequence: its cache stays as it is)")
        return
    evidence = []
    if site.is_causal or (site.mask_kind or "").startswith("causal"):
        evidence.append(f"causal mask ({site.mask_kind})")
    if site.kv_write not in (None, "none"):
        evidence.append(f"KV-cache write ({site.kv_write})")
    if not evidence:
        _classify_without_evidence(site)
        return
    site.evidence = ", ".join(evidence)
    site.kind = "decode" if static_int(q_shape[2]) == 1 else "prefill"
    site.layer, source = _layer(site)
    if site.layer is None:
        site.reject(
            f"no decoder layer index: the cache input names none, the attention module has no layer_idx and the "
            f"module path {site.module_path!r} none"
        )
    else:
        site.evidence += f"; layer from {source}"


def _classify_without_evidence(site: AttentionSite) -> None:
    """No causal mask and no KV-cache write: an encoder, unless a module name says cross-attention."""
    names = " ".join([site.module_path, *module_classes(site.out)])
    if _CROSS.search(names):
        site.kind, site.evidence = "cross", "module name (no causal mask, no KV-cache write)"
        site.reject("cross-attention (keys come from another sequence: its cache stays as it is)")
    elif not site.module_path:
        site.kind, site.evidence = "unknown", "no causal mask, no KV-cache write, no module path"
        site.reject(
            "no causal mask, no KV-cache write and no module path (attention outside a traced module, e.g. after "
            "a graph break): not decoder self-attention as far as the graph shows"
        )
    else:
        site.kind, site.evidence = "encoder", "no causal mask and no KV-cache write"
        site.reject("encoder / vision-tower attention (bidirectional: no causal mask, no KV-cache write)")


def _layer(site: AttentionSite) -> tuple[int | None, str]:
    """(layer index, its source): the cache write's layer, the module's ``layer_idx``, the module path."""
    if site.kv_layer is not None:
        return site.kv_layer, "the KV-cache input"
    if site.module_layer is not None:
        return site.module_layer, "the module's layer_idx"
    path_layer = layer_index(site.module_path)
    return path_layer, "the module path"


def _keys_from_other_inputs(site: AttentionSite) -> bool:
    """True when the queries are projected in the graph and the new keys read none of the queries' inputs.

    Parameters and buffers do not count as inputs. Keys read from a cache that the graph writes elsewhere (a
    static buffer, the packed cache) are not traced: that write is evidence of self-attention.
    """
    if site.kv_write == "none":
        keys = site.k
    elif site.kv_write == "dynamic_cat" and site.k_new is not None:
        keys = site.k_new
    else:
        return False
    q_inputs, q_projected = _inputs_of(site.q)
    if not q_projected:
        return False
    k_inputs, _ = _inputs_of(keys)
    return bool(k_inputs) and not (k_inputs & q_inputs)


def _inputs_of(node: fx.Node) -> tuple[set[fx.Node], bool]:
    """(the activation inputs ``node`` is computed from, whether a linear projection is on the way)."""
    inputs, projected, seen, todo = set(), False, set(), [node]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            if not is_parameter_input(cur):
                inputs.add(cur)
            continue
        projected = projected or (cur.op == "call_function" and cur.target in _LINEAR)
        todo.extend(cur.all_input_nodes)
    return inputs, projected
