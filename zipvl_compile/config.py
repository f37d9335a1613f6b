"""ZipVLConfig: every option of the ``zipvl`` backend, its default and its validation.

Options arrive as the ``options=`` dict of ``torch.compile`` (or keyword arguments of
``zipvl_compile.compile``). An unknown key or a bad value raises ``ValueError`` naming the key, the value
given and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from zipvl_compile.runtime.cache import check_cache_options
from zipvl_compile.runtime.sparse import PREFILL_MODES, Selection

_KV_MODES = ("packed", "simulate", "off")
_INNER = ("inductor", "aot_eager", "eager")
_SCORE_NORMS = ("probes", "n_minus_j")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class ZipVLConfig:
    """Validated options (see the README's options table).

    tau: fraction of the probe attention mass the kept set must hold, 0 < tau <= 1 (>= 1 keeps all).
    hi_bits / lo_bits: KV bit widths of kept / other tokens, each in {2, 4, 8, 16}, lo_bits <= hi_bits;
        16 means stored unquantised in the model's dtype.
    n_probe_recent / n_probe_random: probe queries per layer (last rows + seeded random rows).
    min_keep: floor on the kept count per sequence and layer.
    dense_layers: decoder layer indices that keep dense prefill attention.
    prefill_mode: who attends to what in a sparse prefill (docs/method.md §7): "sinks" (kept queries attend to
        the kept keys; every query to its ``local_window`` most recent keys and the first ``sink_tokens`` tokens),
        "local" (every query to the kept keys and its window) or "paper" (Algorithm 1: kept queries to the kept
        keys, zero output at every other token).
    local_window: the window w of the "sinks" and "local" modes (keys i - w < j <= i), >= 1 there.
    sink_tokens: the sink count of the "sinks" mode (the first valid tokens of each sequence).
    score_norm: the Eq. 7 denominator of a key's probe attention: "probes" (the probe rows that see it) or
        "n_minus_j" (ZipCache's: every query that sees it in the full causal matrix; favours recent keys).
    recompress_interval: decode tokens held unquantised before their block is scored and quantised.
    kv_mode: "packed" (ZipVLCache), "simulate" (quantise on write into a stock cache) or "off".
    inner: the compiler run on the rewritten graph; None: by the graph's device (:meth:`inner_for`).
    seed: seed of the random probes.
    cudagraphs: capture the compiled graphs in CUDA graphs (also set by ``mode="reduce-overhead"``).
    dense_below: prompts shorter than this many tokens take dense prefill attention, every token kept (and
        stored at hi_bits); None: the crossover measured for the device (runtime.sparse.DENSE_BELOW); 0: never.
    force_ratio: BENCHMARK-ONLY. 0 = off; 0 < r <= 1 keeps round(r * n) tokens per layer instead of Eq. 6
        (probing and selection still run): random weights have no sparse structure for tau to find.
    """

    tau: float = 0.975
    hi_bits: int = 4
    lo_bits: int = 2
    n_probe_recent: int = 64
    n_probe_random: int = 64
    min_keep: int = 64
    dense_layers: tuple[int, ...] = ()
    prefill_mode: str = "sinks"
    local_window: int = 128
    sink_tokens: int = 4
    score_norm: str = "probes"
    recompress_interval: int = 100
    kv_mode: str = "packed"
    inner: str | None = None
    seed: int = 0
    cudagraphs: bool = False
    force_ratio: float = 0.0
    dense_below: int | None = None

    def __post_init__(self) -> None:
        _check(
            isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool) and 0 < self.tau <= 1,
            "tau",
            self.tau,
            "a number with 0 < tau <= 1 (tau = 1 keeps every token)",
        )
        check_cache_options(self.hi_bits, self.lo_bits, self.recompress_interval, packed=self.kv_mode == "packed")
        _check(self.prefill_mode in PREFILL_MODES, "prefill_mode", self.prefill_mode, f"one of {PREFILL_MODES}")
        _check(
            self.prefill_mode == "paper" or (_is_int(self.local_window) and self.local_window >= 1),
            "local_window",
            self.local_window,
            f"an integer >= 1 with prefill_mode={self.prefill_mode!r}",
        )
        for key in ("n_probe_recent", "n_probe_random", "min_keep", "local_window", "sink_tokens"):
            _check(_is_int(getattr(self, key)) and getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        _check(
            self.n_probe_recent + self.n_probe_random > 0,
            "n_probe_recent",
            self.n_probe_recent,
            "n_probe_recent + n_probe_random >= 1",
        )
        _check(self.kv_mode in _KV_MODES, "kv_mode", self.kv_mode, f"one of {_KV_MODES}")
        _check(self.score_norm in _SCORE_NORMS, "score_norm", self.score_norm, f"one of {_SCORE_NORMS}")
        _check(self.inner is None or self.inner in _INNER, "inner", self.inner, f"None (by device) or one of {_INNER}")
        _check(_is_int(self.seed), "seed", self.seed, "an integer")
        _check(
            isinstance(self.force_ratio, (int, float))
            and not isinstance(self.force_ratio, bool)
            and 0 <= self.force_ratio <= 1,
            "force_ratio",
            self.force_ratio,
            "0 (off) or 0 < r <= 1",
        )
        _check(
            self.dense_below is None or (_is_int(self.dense_below) and self.dense_below >= 0),
            "dense_below",
            self.dense_below,
            "None (the device's measured crossover) or an integer >= 0",
        )
        _check(isinstance(self.cudagraphs, bool), "cudagraphs", self.cudagraphs, "True or False")
        _check(
            isinstance(self.dense_layers, tuple) and all(_is_int(i) and i >= 0 for i in self.dense_layers),
            "dense_layers",
            self.dense_layers,
            "a sequence of layer indices >= 0",
        )

    def inner_for(self, device_type: str) -> str:
        """The inner compiler of a graph whose tensors live on ``device_type``: the ``inner`` option, or (None)
        Inductor on CUDA and eager elsewhere. On a CPU Inductor calls every zipvl op through the dispatcher
        (170-375 µs a call), and the demo's 40 decode tokens took 4.1-4.4 s there against 3.4-3.5 s eager
        (BENCHMARKS.md, "The CPU decode path, again"), with a fraction of the compile time."""
        return self.inner or ("inductor" if device_type == "cuda" else "eager")

    @property
    def keeps_all(self) -> bool:
        """Prefill keeps every valid token whatever the scores (tau >= 1, no forced ratio): dense and exact,
        and decode blocks are recompressed without scoring (every token at hi_bits)."""
        return self.tau >= 1.0 and self.force_ratio <= 0

    def probe_kwargs(self) -> dict[str, Any]:
        """The probe options of ``zipvl.sparse_attention`` / ``zipvl.probe_scores``, by keyword."""
        return {"n_probe_recent": self.n_probe_recent, "n_probe_random": self.n_probe_random, "seed": self.seed}

    def selection_kwargs(self) -> dict[str, Any]:
        """The kept-set and prefill-semantics options of ``zipvl.sparse_attention(_scored)``, by keyword."""
        return {
            "tau": float(self.tau),
            "min_keep": self.min_keep,
            "force_ratio": float(self.force_ratio),
            "dense_below": -1 if self.dense_below is None else self.dense_below,
            "score_norm": self.score_norm,
            "prefill_mode": self.prefill_mode,
            "local_window": self.local_window,
            "sink_tokens": self.sink_tokens,
        }

    def selection(self) -> Selection:
        """The kept-set options as the sparse op holds them (:class:`~zipvl_compile.runtime.sparse.Selection`)."""
        options = self.selection_kwargs()
        return Selection(**{name: options[name] for name in Selection._fields})

    def cache_kwargs(self) -> dict[str, Any]:
        """The :class:`~zipvl_compile.runtime.cache.ZipVLCache` arguments these options ask for (with the
        selection, so that a prefill that runs dense gets segments of its exact size)."""
        return {
            "hi_bits": self.hi_bits,
            "lo_bits": self.lo_bits,
            "recompress_interval": self.recompress_interval,
            "selection": self.selection(),
        }

    def summary(self) -> dict[str, Any]:
        """The options the compile report shows per graph."""
        prefill = {"paper": "paper", "local": f"local(w={self.local_window})"}.get(
            self.prefill_mode, f"sinks(w={self.local_window}, s={self.sink_tokens})"
        )
        return {
            "tau": self.tau,
            "prefill_mode": prefill,
            "hi_bits": self.hi_bits,
            "lo_bits": self.lo_bits,
            "kv_mode": self.kv_mode,
        }

    def replace(self, **changes: Any) -> ZipVLConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, mode: str | None = None) -> ZipVLConfig:
        """Build from a user options dict and ``torch.compile``'s ``mode``; unknown keys raise ``ValueError``
        naming them. ``mode="reduce-overhead"`` means ``cudagraphs=True``."""
        if mode not in MODES:
            raise ValueError(f"zipvl: invalid mode {mode!r}; allowed: {MODES}")
        options = dict(options or {})
        if mode == "reduce-overhead":
            options["cudagraphs"] = True
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                raise ValueError(
                    f"zipvl: unknown option {key!r} (value {options[key]!r}); "
                    f"allowed options: {', '.join(sorted(known))}"
                )
        if "dense_layers" in options:
            layers = options["dense_layers"]
            _check(
                isinstance(layers, (list, tuple, set, frozenset, range)) and all(_is_int(i) and i >= 0 for i in layers),
                "dense_layers",
                layers,
                "a sequence of layer indices >= 0",
            )
            options["dense_layers"] = tuple(sorted(layers))
        return cls(**options)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"zipvl: invalid option {key}={value!r}; allowed: {allowed}")
