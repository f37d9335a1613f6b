"""CompileReport: every attention site the backend saw, what it did with it and why, and runtime stats.

The backend opens one :class:`GraphRecord` per Dynamo graph and hands it to the passes, which add one
:class:`SiteRecord` per attention site and say how the graph's KV cache is handled. Prefill sites rewritten into
``zipvl.sparse_attention`` get a runtime stats slot per layer (a small device tensor that the op fills with the
kept ratio of each run); it is read (one device->host copy) only when the report is rendered or queried.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import weakref
from collections.abc import Iterator

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
    stats: torch.Tensor | None = None  # float32 [3]: (mean r, mean r^2, ran dense as too short) of the last prefill
    hi_tokens: int | None = None
    lo_tokens: int | None = None

    def ratio_moments(self) -> tuple[float, float] | None:
        """(mean kept ratio, mean squared kept ratio) of the last sparse prefill, None before any."""
        if self.stats is None:
            return None
        mean, mean_sq, _ = self.stats.tolist()
        return None if mean < 0 else (mean, mean_sq)

    @property
    def too_short(self) -> bool:
        """The last prefill ran dense: its prompt was shorter than the ``dense_below`` option."""
        return self.stats is not None and self.stats[2].item() > 0


@dataclasses.dataclass
class GraphRecord:
    """One compiled graph: its options, its sites, and what ran it (written by the backend and its passes)."""

    graph_id: int
    nodes: int
    options: dict
    report: CompileReport = dataclasses.field(repr=False, compare=False)
    sites: list[SiteRecord] = dataclasses.field(default_factory=list)
    cudagraphs: bool | None = None  # None: not asked for
    compile_id: str | None = None  # Dynamo's "frame/attempt" id of this compile
    recompile_reason: str | None = None  # the guard that failed, when this graph is a recompile

    @property
    def kind(self) -> str:
        """prefill, decode, or "other" (no attention site): what the graph's sites are."""
        kinds = {s.kind for s in self.sites} & {"prefill", "decode"}
        return "prefill" if "prefill" in kinds else "decode" if kinds else "other"

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
        self.report.set_kv_mode(mode, reason)


class CompileReport:
    """What the zipvl backend matched, rewrote and left alone, per graph and per attention site.

    One process-wide report (:func:`report`) sees every graph; :func:`zipvl_compile.compile` also gives each
    model its own (``model.zipvl_report``, ``report(model)``), which records the graphs, layers and caches of
    that model only and passes each record on to the process-wide report (graph ids are process-wide).
    """

    def __init__(self, layers: dict[int, LayerStats] | None = None, model: str | None = None) -> None:
        self.model = model  # None: the process-wide report
        self._lock = threading.Lock()
        self.sites: list[SiteRecord] = []
        self.graphs: list[GraphRecord] = []
        self.layers: dict[int, LayerStats] = layers or {}
        self.kv_mode: str | None = None
        self.kv_mode_reason: str | None = None
        self.kv_bytes: int | None = None
        self.kv_bytes_dense: int | None = None
        self.kv_reserves: str | None = None
        self._cache: weakref.ref | None = None  # the last ZipVLCache recorded (not kept alive by the report)

    @property
    def cache(self) -> object | None:
        """The last ZipVLCache recorded, while something else keeps it alive."""
        return None if self._cache is None else self._cache()

    def _parent(self) -> CompileReport | None:
        return None if self.model is None else _REPORT

    # -- recording (passes and runtime) -------------------------------------------------------------
    def new_graph(self, n_nodes: int, options: dict) -> GraphRecord:
        """A record for the graph being compiled now, with Dynamo's compile id and, for a recompile, the guard
        that failed."""
        parent = self._parent()
        if parent is not None:
            record = parent.new_graph(n_nodes, options)
            record.report = self
        else:
            with self._lock:
                record = GraphRecord(len(self.graphs), n_nodes, options, self)
            record.compile_id, record.recompile_reason = _compile_cause()
        with self._lock:
            self.graphs.append(record)
        return record

    def add_site(self, record: SiteRecord) -> None:
        with self._lock:
            self.sites.append(record)
        if (parent := self._parent()) is not None:
            parent.add_site(record)

    def set_kv_mode(self, mode: str, reason: str) -> None:
        """How the last graph's KV cache is handled (a decode graph keeps the "simulate" of its prefill: decode
        writes are never quantised in that mode)."""
        if not (mode == "off" and self.kv_mode == "simulate"):
            self.kv_mode, self.kv_mode_reason = mode, reason
        if (parent := self._parent()) is not None:
            parent.set_kv_mode(mode, reason)

    def record_cache(self, cache: object) -> None:
        """Take the KV figures of a cache after a run: bytes held, the bytes of the model's own dense cache of the
        same tokens (its dtype), what the reserves are, per-layer hi/lo token counts.

        A :class:`ZipVLCache` reports its packed buffers (kv_mode "packed"); any other cache is recorded as
        unquantised with the reason.
        """
        if (parent := self._parent()) is not None:
            parent.record_cache(cache)
        if not hasattr(cache, "packed_layers"):
            self.kv_mode = "off"
            self.kv_mode_reason = f"{type(cache).__name__} is a stock cache: K/V stay in the model's dtype"
            return
        self._cache = weakref.ref(cache)
        self.kv_mode = "packed"
        self.kv_mode_reason = f"ZipVLCache, {cache.hi_bits}/{cache.lo_bits} bits"
        if cache.dense_reason:
            self.kv_mode_reason += f"; full layers dense: {cache.dense_reason}"
        self.kv_bytes, self.kv_bytes_dense = cache.nbytes(), cache.nbytes_dense()
        self.kv_reserves = cache.reserves() or None
        for index, layer in cache.packed_layers():
            stats = self.layer(index)
            stats.hi_tokens, stats.lo_tokens, _ = layer.token_counts()

    def layer(self, index: int) -> LayerStats:
        with self._lock:
            stats = self.layers.setdefault(index, LayerStats(index))
        if (parent := self._parent()) is not None:  # the process-wide report shows the last model's layer
            with parent._lock:
                parent.layers[index] = stats
        return stats

    # -- queries ------------------------------------------------------------------------------------
    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if not s.rewritten]

    def recompiles(self) -> list[GraphRecord]:
        """The graphs compiled because a guard of an earlier graph failed (each with its reason)."""
        return [g for g in self.graphs if g.recompile_reason]

    def kept_ratios(self) -> dict[int, float]:
        """Mean kept ratio over the batch, per layer, of the last sparse prefill that ran."""
        moments = {i: s.ratio_moments() for i, s in sorted(self.layers.items())}
        return {i: m[0] for i, m in moments.items() if m is not None}

    def dense_by_length(self) -> list[int]:
        """The layers whose last prefill ran dense because the prompt was shorter than ``dense_below``."""
        return [i for i, s in sorted(self.layers.items()) if s.too_short]

    def flop_reduction(self) -> dict[int, float]:
        """Prefill attention-FLOP reduction per layer, 1 - mean(r^2) over the batch."""
        moments = {i: s.ratio_moments() for i, s in sorted(self.layers.items())}
        return {i: 1.0 - m[1] for i, m in moments.items() if m is not None}

    def prefill_modes(self) -> list[str]:
        """The sparse prefill modes (with their window and sinks) of the graphs that ran a sparse prefill site."""
        return sorted({g.options["prefill_mode"] for g in self.graphs if any(_is_sparse(s) for s in g.sites)})

    def __str__(self) -> str:
        kinds = [g.kind for g in self.graphs]
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("prefill", "decode", "other") if k in kinds)
        lines = [
            f"zipvl compile report{'' if self.model is None else f' ({self.model})'}: {len(self.graphs)} graph(s)"
            f"{f' ({counts})' if counts else ''}, {len(self.sites)} attention site(s), {len(self.rewritten)} rewritten"
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
        modes = self.prefill_modes()
        if modes:
            lines.append(f"sparse prefill mode: {', '.join(modes)}")
        ratios, flops = self.kept_ratios(), self.flop_reduction()
        if ratios:
            lines.append("kept ratio of the last prefill, per layer (attention-FLOP reduction):")
            lines.append("  " + ", ".join(f"L{i}: {r:.3f} ({flops[i]:.1%})" for i, r in ratios.items()))
            mean = sum(ratios.values()) / len(ratios)
            lines.append(f"  mean kept ratio {mean:.3f}, mean FLOP reduction {sum(flops.values()) / len(flops):.1%}")
            short = self.dense_by_length()
            if short:
                layers = "all layers" if len(short) == len(ratios) else "L" + ", L".join(map(str, short))
                lines.append(f"  dense prefill in {layers}: the prompt is shorter than dense_below (sparse cannot win)")
        for g in self.recompiles():
            lines.append(
                f"recompiled: graph {g.graph_id} ({g.kind}, {g.compile_id}): {g.recompile_reason.splitlines()[0]}"
            )
        captured = [str(g.graph_id) for g in self.graphs if g.cudagraphs]
        if captured:
            lines.append(f"CUDA graphs: graph(s) {', '.join(captured)}")
        if self.kv_mode is not None:
            lines.append(f"kv cache: {self.kv_mode}" + (f" ({self.kv_mode_reason})" if self.kv_mode_reason else ""))
        if self.kv_bytes is not None and self.kv_bytes_dense:
            lines.append(
                f"kv bytes: {self.kv_bytes:,} held vs {self.kv_bytes_dense:,} in the model's dense cache "
                f"({self.kv_bytes / self.kv_bytes_dense:.1%})" + (f"; {self.kv_reserves}" if self.kv_reserves else "")
            )
        return "\n".join(lines)


def _is_sparse(site: SiteRecord) -> bool:
    return site.op in ("zipvl.sparse_attention", "zipvl.sparse_attention_scored")


def _outcome(site: SiteRecord) -> str:
    if not site.rewritten:
        return site.reason or "-"
    return f"{site.op} (dense: {site.dense_reason})" if site.dense_reason else site.op


def _compile_cause() -> tuple[str | None, str | None]:
    """(Dynamo's id of the compile in progress, the first guard failure that caused it, or None for a first
    compile): read from Dynamo's compile context and the metrics it records for each frame."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    try:
        reason = torch._dynamo.utils.get_metrics_context()._metrics.get("recompile_reason")
    except AttributeError:  # a torch without this metrics context: the id still tells attempts apart
        reason = None
    return (None if compile_id is None else str(compile_id)), reason


_REPORT = CompileReport()
_ACTIVE: contextvars.ContextVar[CompileReport | None] = contextvars.ContextVar("zipvl_report", default=None)


def report(model: torch.nn.Module | None = None) -> CompileReport:
    """The compile report of ``model`` (compiled by :func:`zipvl_compile.compile`), else the report of the
    model whose compiled forward is running, else the process-wide one."""
    if model is not None:
        own = getattr(model, "zipvl_report", None)
        if own is None:
            raise ValueError(f"zipvl: this {type(model).__name__} was not compiled by zipvl_compile.compile")
        return own
    return _ACTIVE.get() or _REPORT


@contextlib.contextmanager
def recording_to(target: CompileReport) -> Iterator[None]:
    """Within the block, :func:`report` (what the backend records into) is ``target``."""
    token = _ACTIVE.set(target)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


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
