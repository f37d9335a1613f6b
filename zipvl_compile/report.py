"""CompileReport: every attention site the backend saw, what it did with it and why, and runtime stats.

The backend opens one :class:`GraphRecord` per Dynamo graph and hands it to the passes, which add one
:class:`SiteRecord` per attention site and say how the graph's KV cache is handled. Prefill sites rewritten into
``zipvl.sparse_attention`` get a runtime stats slot per layer (a small device tensor that the op fills with the
kept ratio of each run); it is read (one device->host copy) only when the report is rendered or queried.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from zipvl_compile.runtime import stats


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
    evidence: str | None = None  # what decided the kind and the layer (mask, cache write, module layer_idx, path)


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


@dataclasses.dataclass
class GraphRecord:
    """One compiled graph: its options, its sites, and what ran it (written by the backend and its passes)."""

    graph_id: int
    nodes: int
    options: dict
    report: CompileReport = dataclasses.field(repr=False, compare=False)
    sites: list[SiteRecord] = dataclasses.field(default_factory=list)
    cudagraphs: bool | None = None  # None: not asked for

    def add_site(self, record: SiteRecord) -> None:
        self.sites.append(record)
        self.report.add_site(record)

    def ratio_slot(self, layer: int, device: torch.device) -> int:
        """The runtime stats slot of decoder ``layer`` on ``device`` (shared by the graphs of one report)."""
        stats_of = self.report.layer(layer)
        if stats_of.slot is None or stats_of.stats.device != device:
            stats_of.slot, stats_of.stats = stats.new_slot(device)
        return stats_of.slot

    def set_kv_mode(self, mode: str, reason: str) -> None:
        """How this graph's KV cache is handled; the report shows the last graph's (a decode graph keeps the
        "simulate" of its prefill: decode writes are never quantised in that mode)."""
        if mode == "off" and self.report.kv_mode == "simulate":
            return
        self.report.kv_mode, self.report.kv_mode_reason = mode, reason


class CompileReport:
    """What the zipvl backend matched, rewrote and left alone, per graph and per attention site."""

    def __init__(self, layers: dict[int, LayerStats] | None = None) -> None:
        self._lock = threading.Lock()
        self.sites: list[SiteRecord] = []
        self.graphs: list[GraphRecord] = []
        self.layers: dict[int, LayerStats] = layers or {}
        self.kv_mode: str | None = None
        self.kv_mode_reason: str | None = None
        self.kv_bytes: int | None = None
        self.kv_bytes_dense: int | None = None
        self.cache: object | None = None  # the last ZipVLCache recorded

    # -- recording (passes and runtime) -------------------------------------------------------------
    def new_graph(self, n_nodes: int, options: dict) -> GraphRecord:
        with self._lock:
            record = GraphRecord(len(self.graphs), n_nodes, options, self)
            self.graphs.append(record)
            return record

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
        modes = sorted({g.options["prefill_mode"] for g in self.graphs if any(_is_sparse(s) for s in g.sites)})
        if modes:
            lines.append(f"sparse prefill mode: {', '.join(modes)}")
        ratios, flops = self.kept_ratios(), self.flop_reduction()
        if ratios:
            lines.append("kept ratio of the last prefill, per layer (attention-FLOP reduction):")
            lines.append("  " + ", ".join(f"L{i}: {r:.3f} ({flops[i]:.1%})" for i, r in ratios.items()))
            mean = sum(ratios.values()) / len(ratios)
            lines.append(f"  mean kept ratio {mean:.3f}, mean FLOP reduction {sum(flops.values()) / len(flops):.1%}")
        captured = [str(g.graph_id) for g in self.graphs if g.cudagraphs]
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


def _is_sparse(site: SiteRecord) -> bool:
    return site.op in ("zipvl.sparse_attention", "zipvl.sparse_attention_scored")


def _outcome(site: SiteRecord) -> str:
    if not site.rewritten:
        return site.reason or "-"
    return f"{site.op} (dense: {site.dense_reason})" if site.dense_reason else site.op


_REPORT = CompileReport()


def report() -> CompileReport:
    """The process-wide compile report."""
    return _REPORT


def reset_report() -> CompileReport:
    """Start a new process-wide compile report and return it.

    Graphs compiled earlier keep running and keep writing their layers' ratio slots: the new report takes over
    those slots, cleared (set to -1), so the next prefill of an already compiled graph shows up in it.
    """
    global _REPORT
    carried = {}
    for index, old in _REPORT.layers.items():
        if old.stats is not None:
            old.stats.fill_(-1.0)
            carried[index] = LayerStats(index, old.slot, old.stats)
    _REPORT = CompileReport(carried)
    return _REPORT
