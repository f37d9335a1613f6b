"""CompileReport: every attention site the backend saw, what it did with it and why, and runtime stats.

The passes append one :class:`SiteRecord` per attention site. Prefill sites rewritten into
``zipvl.sparse_attention`` also get a runtime stats slot (a small device tensor) that the op fills with the
kept ratio of each run; it is read (one device->host copy) only when the report is rendered or queried.
"""

from __future__ import annotations

import dataclasses
import threading

import torch


@dataclasses.dataclass
class SiteRecord:
    """One attention site of one compiled graph."""

    graph_id: int
    module_path: str
    layer: int | None
    kind: str  # prefill | decode | cross | encoder | unknown
    rewritten: bool
    reason: str | None
    op: str | None
    pattern: str  # sdpa | eager
    n_rep: int | None = None
    mask: str | None = None  # causal | causal+padding | causal+window | causal+mask | mask | none
    kv_write: str | None = None  # dynamic_cat | static_index_copy | static_copy | zipvl | none
    dense_reason: str | None = None  # why a prefill site got the dense op instead of sparse_attention


@dataclasses.dataclass
class LayerStats:
    """Per decoder layer runtime figures, filled by the graph (ratio buffer) and by the KV cache."""

    layer: int
    slot: int | None = None  # runtime.stats slot written by zipvl.sparse_attention
    stats: torch.Tensor | None = None  # float32 [2]: (mean r, mean r^2) over the batch of the last prefill
    hi_tokens: int | None = None
    lo_tokens: int | None = None

    def ratio_moments(self) -> tuple[float, float] | None:
        """(mean kept ratio, mean squared kept ratio) of the last sparse prefill, None before any."""
        if self.stats is None:
            return None
        mean, mean_sq = self.stats.tolist()
        return None if mean < 0 else (mean, mean_sq)


class CompileReport:
    """What the zipvl backend matched, rewrote and left alone, per graph and per attention site."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sites: list[SiteRecord] = []
        self.graphs: list[dict] = []
        self.layers: dict[int, LayerStats] = {}
        self.kv_mode: str | None = None
        self.kv_mode_reason: str | None = None
        self.kv_bytes: int | None = None
        self.kv_bytes_dense: int | None = None
        self.cache: object | None = None  # the last ZipVLCache recorded

    # -- recording (passes and runtime) -------------------------------------------------------------
    def new_graph(self, n_nodes: int, options: dict) -> int:
        with self._lock:
            self.graphs.append({"nodes": n_nodes, "options": options})
            return len(self.graphs) - 1

    def add_site(self, record: SiteRecord) -> None:
        with self._lock:
            self.sites.append(record)

    def record_cache(self, cache: object) -> None:
        """Take the KV figures of a cache after a run: bytes held, bf16 bytes, per-layer hi/lo token counts.

        A :class:`ZipVLCache` reports its packed buffers (kv_mode "packed"); any other cache is recorded as
        unquantised with the reason.
        """
        if not hasattr(cache, "packed_layers"):
            self.kv_mode = "off"
            self.kv_mode_reason = f"{type(cache).__name__} is a stock cache: K/V stay in the model's dtype"
            return
        self.cache = cache
        self.kv_mode = "packed"
        self.kv_mode_reason = f"ZipVLCache, {cache.hi_bits}/{cache.lo_bits} bits"
        self.kv_bytes, self.kv_bytes_dense = cache.nbytes(), cache.nbytes_dense()
        for index, layer in cache.packed_layers():
            stats = self.layer(index)
            stats.hi_tokens, stats.lo_tokens, _ = layer.token_counts()

    def layer(self, index: int) -> LayerStats:
        with self._lock:
            return self.layers.setdefault(index, LayerStats(index))

    # -- queries ------------------------------------------------------------------------------------
    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if not s.rewritten]

    def kept_ratios(self) -> dict[int, float]:
        """Mean kept ratio over the batch, per layer, of the last sparse prefill that ran."""
        moments = {i: s.ratio_moments() for i, s in sorted(self.layers.items())}
        return {i: m[0] for i, m in moments.items() if m is not None}

    def flop_reduction(self) -> dict[int, float]:
        """Prefill attention-FLOP reduction per layer, 1 - mean(r^2) over the batch."""
        moments = {i: s.ratio_moments() for i, s in sorted(self.layers.items())}
        return {i: 1.0 - m[1] for i, m in moments.items() if m is not None}

    def __str__(self) -> str:
        lines = [
            f"zipvl compile report: {len(self.graphs)} graph(s), {len(self.sites)} attention site(s), "
            f"{len(self.rewritten)} rewritten"
        ]
        if not self.sites:
            lines.append("  no attention site found (nothing rewritten)")
        else:
            header = ("graph", "layer", "kind", "pattern", "mask", "kv write", "rewritten", "op / reason", "module")
            rows = [header]
            for s in self.sites:
                rows.append(
                    (
                        str(s.graph_id),
                        "-" if s.layer is None else str(s.layer),
                        s.kind,
                        s.pattern,
                        s.mask or "-",
                        s.kv_write or "-",
                        "yes" if s.rewritten else "no",
                        _outcome(s),
                        s.module_path,
                    )
                )
            widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
            for r in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
        ratios, flops = self.kept_ratios(), self.flop_reduction()
        if ratios:
            lines.append("kept ratio of the last prefill, per layer (attention-FLOP reduction):")
            lines.append("  " + ", ".join(f"L{i}: {r:.3f} ({flops[i]:.1%})" for i, r in ratios.items()))
            mean = sum(ratios.values()) / len(ratios)
            lines.append(f"  mean kept ratio {mean:.3f}, mean FLOP reduction {sum(flops.values()) / len(flops):.1%}")
        captured = [str(i) for i, g in enumerate(self.graphs) if g.get("cudagraphs")]
        if captured:
            lines.append(f"CUDA graphs: graph(s) {', '.join(captured)}")
        if self.kv_mode is not None:
            lines.append(f"kv cache: {self.kv_mode}" + (f" ({self.kv_mode_reason})" if self.kv_mode_reason else ""))
        if self.kv_bytes is not None and self.kv_bytes_dense:
            lines.append(
                f"kv bytes: {self.kv_bytes:,} held vs {self.kv_bytes_dense:,} bf16 "
                f"({self.kv_bytes / self.kv_bytes_dense:.1%})"
            )
        return "\n".join(lines)


def _outcome(site: SiteRecord) -> str:
    if not site.rewritten:
        return site.reason or "-"
    return f"{site.op} (dense: {site.dense_reason})" if site.dense_reason else site.op


_REPORT = CompileReport()


def report() -> CompileReport:
    """The process-wide compile report."""
    return _REPORT


def reset_report() -> None:
    """Clear the process-wide compile report.

    Graphs compiled earlier keep running and keep their ratio buffers: those are cleared (set to -1)
    rather than dropped, so the next prefill of an already compiled graph shows up again.
    """
    layers = _REPORT.layers
    _REPORT.__init__()
    for stats in layers.values():
        if stats.stats is not None:
            stats.stats.fill_(-1.0)
            _REPORT.layers[stats.layer] = LayerStats(stats.layer, stats.slot, stats.stats)
