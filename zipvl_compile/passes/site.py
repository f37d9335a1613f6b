"""AttentionSite: what the passes know about one attention computation in a Dynamo FX graph."""

from __future__ import annotations

import dataclasses

import torch.fx as fx


@dataclasses.dataclass
class AttentionSite:
    """One attention site, filled in step by step by the passes.

    ``out`` is the node whose value is the attention output [B, Hq, Lq, d] (the SDPA call, or the final
    matmul of the eager pattern); ``nodes`` are the pattern's own nodes (replaced together or not at all).
    ``skip`` holds the reason when a pass decides the site must stay as it was.
    """

    out: fx.Node
    pattern: str  # "sdpa" | "eager"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    is_causal: bool
    scale: float | None
    softcap: float = 0.0
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    # locate (first) and classify (last, from the evidence the passes between gathered)
    module_path: str = ""
    layer: int | None = None
    module_layer: int | None = None  # ``layer_idx`` of the attention module itself, when it has one
    kind: str = "unknown"  # prefill | decode | cross | encoder | unknown
    evidence: str | None = None  # what decided ``kind`` (the graph's own evidence, a module name at most a tie-break)
    # repeat_kv
    n_rep: int | None = None
    # mask
    mask_kind: str | None = None  # causal | causal+padding | causal+window | causal+mask | mask | none
    # kv write
    kv_write: str | None = None
    kv_layer: int | None = None  # the cache layer the keys are written to / read from, named by the cache input
    kv_node: fx.Node | None = None  # the ZipVLCache op node (kv_write_ in prefill, kv_dense_view in decode)
    kv_simulated: bool = False  # kv_mode="simulate" applied to this prefill's cache write
    k_new: fx.Node | None = None
    v_new: fx.Node | None = None
    # outcome
    skip: str | None = None
    op: str | None = None
    dense_reason: str | None = None

    def reject(self, reason: str) -> None:
        """Leave this site exactly as it was, for ``reason`` (the first reason wins)."""
        if self.skip is None:
            self.skip = reason
