"""Small timing helpers shared by the GPU benchmarks (each also runs on CPU for ``--smoke`` checks).

Times are milliseconds per call. On CUDA: median of ``triton.testing.do_bench`` (L2 flushed between
repetitions), or of ``do_bench_cudagraph`` (the calls replayed from a CUDA graph: no launch or Python
overhead). On CPU: the median of a few ``time.perf_counter`` runs, so a smoke run exercises the same code.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def median_ms(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds per ``fn()`` (the first call, e.g. a JIT compile, is never timed)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def cuda_graph_ms(fn: Callable[[], Any], rep_ms: float = 100) -> float | None:
    """Median milliseconds per ``fn()`` replayed from a CUDA graph; None off CUDA."""
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak CUDA memory one ``fn()`` allocates above what was allocated before it (MiB); None off CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_json(name: str, payload: dict) -> Path | None:
    """Write ``payload`` to $OUT/name (pretty JSON) when $OUT is set; returns the path or None."""
    out_dir = os.environ.get("OUT")
    if not out_dir:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (dicts) in the given column order; floats with 3 decimals."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
