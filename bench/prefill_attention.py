"""Prefill attention: the fastest dense causal kernel vs ZipVL's attention among the kept tokens.

    python -m bench.prefill_attention            # GPU, one invocation (a few minutes on an H100), bf16
    python -m bench.prefill_attention --smoke    # CPU check of the same code at tiny sizes, fp32
    TRITON_INTERPRET=1 python -m bench.prefill_attention --smoke   # ... with the Triton stages interpreted
    python -m bench.prefill_attention --sweep-probe   # probe / select / sinks-merge launch parameters only

For each shape (Qwen2-7B: 28 query / 4 KV heads; LLaVA-Next-7B: 32 / 32; d = 128) and length n, B = 1:
- dense causal attention with every dense backend present: FlashAttention-4
  ``flash_attn.cute.flash_attn_func`` (native GQA), SDPA forced to cuDNN (it needs as many K/V heads as
  query heads: K/V are expanded once before timing, the expansion is not timed), SDPA forced to its flash
  backend (``enable_gqa``);
- for each kept ratio r, a random sorted kept set of round(r * n) tokens: ``kept_causal_attention`` (gather
  -> varlen causal kernel -> scatter) for every varlen backend, eager and replayed from a CUDA graph, plus
  its stages alone (pack, varlen kernel on packed buffers, unpack) and its peak extra memory;
- probe + select (choose_probes, probe_colsum, select_tokens, keep_to_index) at the project's defaults,
  when those modules are importable;
- the ``local_window`` prefill (every query over the same kept keys plus its ``--local-window`` most recent
  keys, one Triton kernel): ``local_ms`` and ``local_vs_dense`` (its ideal is (r + (1 - r) * w / n) x dense);
- the ``sinks`` prefill (kept queries over the kept keys, every query over its ``--sink-window`` most recent
  keys and the first ``--sinks`` tokens): ``sink_attention`` for every varlen backend of its kept part, its
  stages alone (``sinks_kept_ms``: pack + varlen kernel with lse; ``sinks_merge_ms``: the window + sinks +
  merge Triton kernel) and ``sinks_ratio`` = sinks_ms / (r^2 x dense).
``--modes`` picks among paper (kept_causal_attention), local and sinks; dense is always timed.
Reported: best dense time, sparse time, ideal = r^2 x dense, sparse / ideal (target <= 1.18 at 32k), and
probe + select as % of dense. Prints a markdown table; writes $OUT/prefill_attention.json when $OUT is set.
Every measurement is guarded: a backend that fails records its error and the run goes on.

``--sweep-probe`` times instead, per shape and n (default 32k and 64k), each stage of the probe and the
selection apart (pass 1 = ``probe_lse``: the row log-sum-exps and their split merge; pass 2 =
``probe_colsum_from_lse``: the column sums and seen) for a small grid of ``ProbeTiles``; select =
``select_kept_triton`` for a grid of ``SelectTiles``; merge = ``sink_merge_triton`` (the sinks mode's window +
sinks + merge kernel, at r = 0.3, ``--sink-window`` and ``--sinks``) for a grid of ``SinkTiles``; each eager
and from a CUDA graph (``graph_ms``: the GPU time without the launch overhead), against the best dense backend
of the same run; each configuration's output is checked against the default configuration's (select: against
the plain-torch reference). Prints a table; writes $OUT/prefill_probe_sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench._timing import cuda_graph_ms, device_name, markdown_table, median_ms, peak_memory_mb, write_json
from zipvl_compile.runtime.kernels.kept_attention import (
    available_backends,
    keep_to_index,
    kept_causal_attention,
    kept_causal_attention_lse,
    pack_kept,
    unpack_kept,
    varlen_attention,
)
from zipvl_compile.runtime.kernels.local_attention import local_attention
from zipvl_compile.runtime.kernels.plan import PrefillPlan
from zipvl_compile.runtime.kernels.sink_attention import sink_attention, sink_merge_triton

SHAPES = {"qwen2-7b": (28, 4, 128), "llava-next-7b": (32, 32, 128)}  # (Hq, Hkv, d)
SWEEP_LENGTHS = (32768, 65536)
LENGTHS = (8192, 16384, 32768, 65536)
RATIOS = (0.3, 0.5)
SMOKE_SHAPES = {"tiny-gqa": (4, 2, 16), "tiny-mha": (2, 2, 16)}
SMOKE_LENGTHS = (64, 256)
TARGET_N, TARGET_RATIO = 32768, 1.18
_VARLEN_KERNELS = ("fa4", "fa2", "torch_varlen")
MODES = ("paper", "local", "sinks")


@dataclasses.dataclass
class Inputs:
    """q/k/v in (B, n, H, d) memory; k_rep/v_rep expanded to Hq heads (the same tensors when Hq == Hkv)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_rep: torch.Tensor
    v_rep: torch.Tensor
    scale: float
    n_rep: int

    @classmethod
    def random(cls, heads: tuple[int, int, int], n: int, dtype: torch.dtype, device: str) -> Inputs:
        n_q, n_kv, d = heads
        q, k, v = (torch.randn(1, n, h, d, dtype=dtype, device=device) for h in (n_q, n_kv, n_kv))
        n_rep = n_q // n_kv
        k_rep, v_rep = (x.repeat_interleave(n_rep, dim=2) if n_rep > 1 else x for x in (k, v))
        return cls(q, k, v, k_rep, v_rep, d**-0.5, n_rep)

    def bhsd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, H, n, d] views, as the decoder hands them to attention."""
        return self.q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2)


def _sdpa(backend: SDPBackend | None, expanded: bool) -> Callable[[Inputs], torch.Tensor]:
    def run(t: Inputs) -> torch.Tensor:
        k, v = (t.k_rep, t.v_rep) if expanded else (t.k, t.v)
        args = (t.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        gqa = not expanded and t.n_rep > 1
        if backend is None:
            return F.scaled_dot_product_attention(*args, is_causal=True, scale=t.scale, enable_gqa=gqa)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(*args, is_causal=True, scale=t.scale, enable_gqa=gqa)

    return run


def dense_backends() -> dict[str, Callable[[Inputs], torch.Tensor]]:
    """Dense causal attention backends present here (CPU: plain SDPA only)."""
    if not torch.cuda.is_available():
        return {"sdpa": _sdpa(None, expanded=False)}
    found: dict[str, Callable[[Inputs], torch.Tensor]] = {}
    try:
        from flash_attn.cute import flash_attn_func

        found["fa4"] = lambda t: flash_attn_func(t.q, t.k, t.v, softmax_scale=t.scale, causal=True)[0]
    except Exception as exc:  # optional dependency
        print(f"FlashAttention-4 not available: {exc!r}")
    found["sdpa_cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION, expanded=True)
    found["sdpa_flash"] = _sdpa(SDPBackend.FLASH_ATTENTION, expanded=False)
    return found


def random_kept(t: Inputs, ratio: float, seed: int) -> PrefillPlan:
    """The "paper" plan of ``t`` (no padding) keeping round(ratio * n) uniformly random positions of its row."""
    n = t.q.shape[1]
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(1, n, dtype=torch.bool)
    keep[0, torch.randperm(n, generator=g)[: round(ratio * n)]] = True
    idx, count = keep_to_index(keep)
    keep, idx, count = (x.to(t.q.device) for x in (keep, idx, count))
    return PrefillPlan("paper", keep, idx, count, torch.ones_like(keep), 0, 0, t.scale, t.n_rep)


def probe_select_fn(t: Inputs) -> tuple[Callable[[], Any], dict[str, Callable[[], Any]]]:
    """(probe + select of one layer at the project's default options, its stages one by one), as
    zipvl.sparse_attention runs them; choose_probes runs once per forward in a compiled graph (zipvl.probe_rows),
    so it is timed but not part of the per-layer total."""
    from zipvl_compile.config import ZipVLConfig
    from zipvl_compile.runtime.kernels.probe import probe_colsum
    from zipvl_compile.runtime.kernels.select import select_kept
    from zipvl_compile.runtime.kernels.select_reference import choose_probes

    cfg = ZipVLConfig()
    q, k, _ = t.bhsd()
    batch, n_q, n, d = q.shape
    valid = torch.ones(batch, n, dtype=torch.bool, device=q.device)
    probes = choose_probes(valid, cfg.n_probe_recent, cfg.n_probe_random, cfg.seed)
    q_probe = q.gather(2, probes.clamp(min=0)[:, None, :, None].expand(batch, n_q, -1, d))
    colsum, seen = probe_colsum(q_probe, k, probes, valid, t.scale, t.n_rep)
    per_layer = {
        "probe_gather": lambda: q.gather(2, probes.clamp(min=0)[:, None, :, None].expand(batch, n_q, -1, d)),
        "probe_colsum": lambda: probe_colsum(q_probe, k, probes, valid, t.scale, t.n_rep),
        "select_kept": lambda: select_kept(colsum, seen, valid, cfg.tau, cfg.min_keep),
    }

    def run() -> Any:
        for stage in per_layer.values():
            stage()

    choose = lambda: choose_probes(valid, cfg.n_probe_recent, cfg.n_probe_random, cfg.seed)
    once = {"choose_probes (once per forward)": choose}
    return run, {**per_layer, **once}


def planted(heads: tuple[int, int, int], n: int, ratio: float, dtype: torch.dtype, device: str) -> Inputs:
    """Inputs whose attention mass sits on a random set of round(ratio * n) keys: every query leans along one
    direction u, the planted keys carry u strongly (their logits ~ 10 above the others'), the rest is noise."""
    hq, hkv, d = heads
    g = torch.Generator(device).manual_seed(n + round(ratio * 1000))
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, device=device), dim=0)
    q = 0.3 * torch.randn(1, n, hq, d, generator=g, device=device) + 4.0 * u
    k = 0.3 * torch.randn(1, n, hkv, d, generator=g, device=device)
    hot = torch.randperm(n, generator=g, device=device)[: round(ratio * n)]
    k[:, hot] += 2.5 * d**0.5 * u  # q . k * scale = 4 * 2.5 = 10 above the noise keys
    v = torch.randn(1, n, hkv, d, generator=g, device=device)
    n_rep = hq // hkv
    k_rep, v_rep = (x.repeat_interleave(n_rep, dim=2) if n_rep > 1 else x for x in (k, v))
    return Inputs(*(x.to(dtype) for x in (q, k, v, k_rep, v_rep)), scale=d**-0.5, n_rep=n_rep)


def time_whole_op(t: Inputs, modes: tuple[str, ...], errors: dict[str, str]) -> dict[str, Any]:
    """The whole ``zipvl.sparse_attention`` (tau = 0.975, default options, probe rows given as a compiled graph
    gives them) per mode: ms, the kept ratio it chose, and its speedup as a share of the ideal 1 / r^2."""
    from zipvl_compile.config import ZipVLConfig
    from zipvl_compile.runtime import ops

    cfg = ZipVLConfig()
    q, k, v = t.bhsd()
    geometry = dict(is_causal=True, scale=t.scale, n_rep=t.n_rep)
    rows = ops.probe_rows(q, is_causal=True, **cfg.probe_kwargs())
    res: dict[str, Any] = {}
    for mode in modes:
        kwargs = {**geometry, **cfg.probe_kwargs(), **cfg.selection_kwargs(), "prefill_mode": mode}
        call = lambda kwargs=kwargs: ops.sparse_attention(q, k, v, probe_rows=rows, **kwargs)
        out = _guard(call, errors, f"op/{mode}")
        if out is None:
            continue
        res[f"op_{mode}_ms"] = _guard(lambda call=call: median_ms(call), errors, f"op_time/{mode}")
        res[f"op_{mode}_graph_ms"] = _guard(lambda call=call: cuda_graph_ms(call), errors, f"op_graph/{mode}")
        res["op_kept_ratio"] = float(out[2].mean())
    return res


def _guard(fn: Callable[[], Any], errors: dict[str, str], key: str) -> Any:
    """fn() or None, recording the exception under ``key``."""
    try:
        return fn()
    except Exception as exc:  # a failing backend must not end a one-shot GPU run
        errors[key] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"  {key} failed: {errors[key]}")
        return None


def _best(times: dict[str, float | None]) -> str | None:
    done = {b: ms for b, ms in times.items() if ms is not None}
    return min(done, key=done.get) if done else None


def _div(num: float | None, den: float | None, factor: float = 1.0) -> float | None:
    return None if num is None or not den else factor * num / den


def _time_kept_backend(
    b: str, t: Inputs, plan: PrefillPlan, packed: tuple, errors: dict[str, str], no_graph: set[str]
) -> tuple[float | None, ...]:
    """(eager ms, CUDA-graph ms, varlen-kernel-alone ms) of backend ``b``; a failed capture is not retried."""
    q, k, v = t.bhsd()
    packing, qp, kp, vp = packed
    call = lambda: kept_causal_attention(q, k, v, plan, backend=b)
    kernel = lambda: varlen_attention(qp, kp, vp, packing, q.shape[2], t.scale, t.n_rep, b)
    eager = _guard(lambda: median_ms(call), errors, f"sparse/{b}")
    graph = None if b in no_graph else _guard(lambda: cuda_graph_ms(call), errors, f"graph/{b}")
    if f"graph/{b}" in errors:
        no_graph.add(b)
    return eager, graph, _guard(lambda: median_ms(kernel), errors, f"kernel/{b}")


def time_sparse(
    t: Inputs, plan: PrefillPlan, kernels: list[str], errors: dict[str, str], no_graph: set[str]
) -> dict[str, Any]:
    """Timings of kept_causal_attention per backend (eager, CUDA graph, varlen kernel alone) and of its
    pack / unpack stages, with the best backend's peak extra memory and an output sanity check."""
    q, k, v = t.bhsd()
    packed = pack_kept(q, k, v, plan.idx, plan.count)
    times = {b: _time_kept_backend(b, t, plan, packed, errors, no_graph) for b in kernels}
    res: dict[str, Any] = {
        f"{key}_all_ms": {b: times[b][i] for b in kernels} for i, key in enumerate(("sparse", "sparse_graph", "kernel"))
    }
    best = res["sparse_backend"] = _best(res["sparse_all_ms"])
    res["pack_ms"] = _guard(lambda: median_ms(lambda: pack_kept(q, k, v, plan.idx, plan.count)), errors, "pack")
    if best is None:
        return res
    for key in ("sparse", "sparse_graph", "kernel"):
        res[f"{key}_ms"] = res[f"{key}_all_ms"][best]
    packing, qp, kp, vp = packed
    out_packed = varlen_attention(qp, kp, vp, packing, q.shape[2], t.scale, t.n_rep, best)
    res["unpack_ms"] = _guard(lambda: median_ms(lambda: unpack_kept(out_packed, packing)), errors, "unpack")
    call = lambda: kept_causal_attention(q, k, v, plan, backend=best)
    res["output_finite"] = bool(call().isfinite().all())
    res["peak_extra_mb"] = _guard(lambda: peak_memory_mb(call), errors, "peak")
    return res


def time_local(t: Inputs, plan: PrefillPlan, window: int, errors: dict[str, str]) -> float | None:
    """ms of the local_window prefill attention on the kept set of ``plan``; None when window is 0."""
    if window <= 0:
        return None
    q, k, v = t.bhsd()
    plan = plan._replace(mode="local", window=window)
    return _guard(lambda: median_ms(lambda: local_attention(q, k, v, plan)), errors, "local")


@dataclasses.dataclass(frozen=True)
class SinkOptions:
    """The sinks-mode settings: local window and number of sink tokens."""

    window: int
    sinks: int


def time_sinks(
    t: Inputs, plan: PrefillPlan, opts: SinkOptions, kernels: list[str], errors: dict[str, str]
) -> dict[str, Any]:
    """Timings of sink_attention per kept-part backend (eager), the best one from a CUDA graph, and its two
    stages alone. Its Triton stages run on CUDA, or on CPU under TRITON_INTERPRET=1 (else the reference)."""
    q, k, v = t.bhsd()
    fast = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    args = (q, k, v, plan._replace(mode="sinks", window=opts.window, sinks=opts.sinks))
    calls = {b: (lambda b=b: sink_attention(*args, backend=b, use_triton=fast)) for b in kernels}
    res: dict[str, Any] = {
        "sinks_all_ms": {b: _guard(lambda fn=fn: median_ms(fn), errors, f"sinks/{b}") for b, fn in calls.items()}
    }
    best = res["sinks_backend"] = _best(res["sinks_all_ms"])
    if best is None:
        return res
    res["sinks_ms"] = res["sinks_all_ms"][best]
    res["sinks_graph_ms"] = _guard(lambda: cuda_graph_ms(calls[best]), errors, "sinks_graph")
    res["sinks_output_finite"] = bool(calls[best]().isfinite().all())
    if not fast:
        return res
    kept_part = lambda: kept_causal_attention_lse(*args, backend=best)
    res["sinks_kept_ms"] = _guard(lambda: median_ms(kept_part), errors, "sinks_kept")
    part = kept_part()
    merge = lambda: sink_merge_triton(*args, part)
    res["sinks_merge_ms"] = _guard(lambda: median_ms(merge), errors, "sinks_merge")
    return res


def bench_length(
    name: str,
    heads: tuple[int, int, int],
    n: int,
    ratios: tuple[float, ...],
    dtype: torch.dtype,
    device: str,
    no_graph: set[str],
    window: int,
    modes: tuple[str, ...],
    sink_opts: SinkOptions,
    planted_op: bool = True,
) -> list[dict]:
    """All measurements of one (shape, n) in the given modes; returns one result dict per kept ratio."""
    t = Inputs.random(heads, n, dtype, device)
    errors: dict[str, str] = {}
    dense = {
        b: _guard(lambda fn=fn: median_ms(lambda: fn(t)), errors, f"dense/{b}") for b, fn in dense_backends().items()
    }
    dense_backend = _best(dense)
    dense_ms = dense.get(dense_backend)
    probe = probe_select_fn(t)
    probe_ms = _guard(lambda: median_ms(probe[0]), errors, "probe_select")
    stage_ms = {name: _guard(lambda fn=fn: median_ms(fn), errors, name) for name, fn in probe[1].items()}
    kernels = [b for b in available_backends() if b in _VARLEN_KERNELS] or ["sdpa_padded"]
    rows = []
    for ratio in ratios:
        plan = random_kept(t, ratio, seed=n + round(ratio * 1000))
        r = round(ratio * n) / n
        sparse = time_sparse(t, plan, kernels, errors, no_graph) if "paper" in modes else {}
        local_ms = time_local(t, plan, window, errors) if "local" in modes else None
        sinks = time_sinks(t, plan, sink_opts, kernels, errors) if "sinks" in modes else {}
        ideal = r * r * dense_ms if dense_ms else None
        whole = time_whole_op(planted(heads, n, ratio, dtype, device), modes, errors) if planted_op else {}
        r_op = whole.get("op_kept_ratio")
        for mode in modes:
            op_ms = whole.get(f"op_{mode}_ms")
            whole[f"op_{mode}_speedup"] = _div(dense_ms, op_ms)
            # achieved speedup dense / op as a share of the ideal 1 / r^2
            whole[f"op_{mode}_share_of_ideal"] = _div(dense_ms * r_op * r_op, op_ms) if op_ms and r_op else None
            graph_ms = whole.get(f"op_{mode}_graph_ms")  # the op's GPU time, as inside a model the GPU keeps busy
            whole[f"op_{mode}_graph_share_of_ideal"] = _div(dense_ms * r_op * r_op, graph_ms) if r_op else None
        rows.append(
            dict(
                shape=name,
                heads=f"{heads[0]}/{heads[1]}",
                n=n,
                r=round(r, 4),
                dense_backend=dense_backend,
                dense_ms=dense_ms,
                dense_all_ms=dense,
                ideal_ms=ideal,
                **sparse,
                ratio=_div(sparse.get("sparse_ms"), ideal),
                ratio_graph=_div(sparse.get("sparse_graph_ms"), ideal),
                kernel_ratio=_div(sparse.get("kernel_ms"), ideal),
                probe_select_ms=probe_ms,
                probe_stage_ms=stage_ms,
                probe_pct_of_dense=_div(probe_ms, dense_ms, 100.0),
                local_window=window,
                local_ms=local_ms,
                local_vs_dense=_div(local_ms, dense_ms),
                sink_window=sink_opts.window,
                sinks=sink_opts.sinks,
                **sinks,
                sinks_ratio=_div(sinks.get("sinks_ms"), ideal),
                sinks_vs_dense=_div(sinks.get("sinks_ms"), dense_ms),
                **whole,
                errors=dict(errors),
            )
        )
        print(
            f"  {name} n={n} r={r:.2f}: dense {dense_ms} ms ({dense_backend}), sparse "
            f"{sparse.get('sparse_ms')} ms ({sparse.get('sparse_backend')}), ratio {rows[-1]['ratio']}, "
            f"sinks {sinks.get('sinks_ms')} ms (ratio {rows[-1]['sinks_ratio']}), probe stages {stage_ms}",
            flush=True,
        )
    return rows


def _run_fields(bench: str, dtype: torch.dtype) -> dict[str, str]:
    """The fields every JSON payload of this module starts with."""
    return dict(
        bench=bench,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        device=device_name(),
        torch=torch.__version__,
        dtype=str(dtype),
    )


def _probe_grid() -> dict[str, Any]:
    """The ProbeTiles of the sweep by name (the first is the default)."""
    from zipvl_compile.runtime.kernels.probe import DEFAULT_TILES, ProbeTiles

    return {
        "default": DEFAULT_TILES,
        "bn64_w4": ProbeTiles(block_n=64, lse_warps=4, colsum_warps=4),
        "w8_s3": ProbeTiles(lse_warps=8, lse_stages=3, colsum_warps=8, colsum_stages=3),
        "s2_pps2": ProbeTiles(lse_stages=2, colsum_stages=2, programs_per_sm=2),
        "pps8": ProbeTiles(programs_per_sm=8),
        "rows64_w4": ProbeTiles(rows=64, lse_warps=4, colsum_warps=4),
        "rows256_bn64_s2": ProbeTiles(rows=256, block_n=64, lse_stages=2, colsum_stages=2),
    }


def _select_grid(batch: int, n: int, device: str) -> dict[str, Any]:
    """The selection launches of the sweep by name (the first is the policy's for ``batch`` rows of ``n``)."""
    from zipvl_compile.runtime.kernels.device import sm_count
    from zipvl_compile.runtime.kernels.select import DEFAULT_SELECT_TILES, SelectSplit, SelectTiles, select_launch_for

    grid = {
        "policy": select_launch_for(batch, n, sm_count(torch.device(device))),
        "one_program": DEFAULT_SELECT_TILES,
        "one_program_prefetch": SelectTiles(prefetch=True),
        "b2048_w8_prefetch": SelectTiles(block=2048, num_warps=8, prefetch=True),
    }
    for programs in (16, 32, 64, 128):
        for block, digits, warps in ((256, 4, 4), (512, 4, 4), (256, 2, 4), (256, 8, 8), (1024, 4, 8)):
            name = f"split_p{programs}_b{block}_d{digits}_w{warps}"
            grid[name] = SelectSplit(programs=programs, block=block, digit_bits=digits, num_warps=warps)
    return grid


def _sink_grid() -> dict[str, Any]:
    """The SinkTiles of the sweep by name (the first is the default)."""
    from zipvl_compile.runtime.kernels.sink_attention import DEFAULT_SINK_TILES, SinkTiles

    return {
        "default": DEFAULT_SINK_TILES,
        "bn64": SinkTiles(block_n=64),
        "bn64_s2": SinkTiles(block_n=64, num_stages=2),
        "r256_w8": SinkTiles(rows=256, num_warps=8),
        "r256_bn64_w8_s2": SinkTiles(rows=256, block_n=64, num_warps=8, num_stages=2),
        "r128_w8": SinkTiles(num_warps=8),
        "r64_bn64": SinkTiles(rows=64, block_n=64),
        "bn128_w8_s2": SinkTiles(block_n=128, num_warps=8, num_stages=2),
    }


def _sweep_row(base: dict[str, Any], stage: str, config: str, fn: Callable[[], Any], errors: dict[str, str]) -> dict:
    """One sweep row: the stage's eager ms (and its % of dense), guarded; on CUDA also from a CUDA graph."""
    ms = _guard(lambda: median_ms(fn), errors, f"{stage}/{config}")
    row = dict(base, stage=stage, config=config, ms=ms, pct_of_dense=_div(ms, base["dense_ms"], 100.0))
    if torch.cuda.is_available() and ms is not None:
        row["graph_ms"] = _guard(lambda: cuda_graph_ms(fn), errors, f"{stage}_graph/{config}")
    return row


def _sweep_merge(t: Inputs, base: dict[str, Any], sinks: SinkOptions, errors: dict[str, str]) -> list[dict]:
    """The merge stage at every configuration of :func:`_sink_grid`, r = 0.3, checked against the default."""
    q, k, v = t.bhsd()
    plan = random_kept(t, 0.3, seed=1)._replace(mode="sinks", window=sinks.window, sinks=sinks.sinks)
    part = kept_causal_attention_lse(q, k, v, plan)
    rows, expected = [], None
    for config, tiles in _sink_grid().items():
        merge = lambda tiles=tiles: sink_merge_triton(q, k, v, plan, part, tiles)
        out = _guard(merge, errors, f"merge/{config}")
        if out is None:
            continue
        expected = out if expected is None else expected
        diff = float((out.float() - expected.float()).abs().max())
        row = _sweep_row(base, "merge", config, merge, errors)
        rows.append(dict(row, max_abs_diff=diff, matches_default=diff <= 2e-2))
    return rows


def sweep_length(
    name: str, heads: tuple[int, int, int], n: int, dtype: torch.dtype, device: str, sinks: SinkOptions
) -> list[dict]:
    """The probe / select / merge stages at every configuration of the grids for one (shape, n)."""
    from zipvl_compile.config import ZipVLConfig
    from zipvl_compile.runtime.kernels.probe import ProbeArgs, probe_colsum_from_lse, probe_lse
    from zipvl_compile.runtime.kernels.select import select_kept, select_kept_triton
    from zipvl_compile.runtime.kernels.select_reference import choose_probes

    cfg = ZipVLConfig()
    t = Inputs.random(heads, n, dtype, device)
    errors: dict[str, str] = {}
    dense = {
        b: _guard(lambda fn=fn: median_ms(lambda: fn(t)), errors, f"dense/{b}") for b, fn in dense_backends().items()
    }
    dense_backend = _best(dense)
    base = dict(shape=name, heads=f"{heads[0]}/{heads[1]}", n=n, dense_backend=dense_backend)
    base["dense_ms"] = dense.get(dense_backend)
    q, k, _ = t.bhsd()
    batch, n_q, _, d = q.shape
    valid = torch.ones(batch, n, dtype=torch.bool, device=q.device)
    probes = choose_probes(valid, cfg.n_probe_recent, cfg.n_probe_random, cfg.seed)
    q_probe = q.gather(2, probes.clamp(min=0)[:, None, :, None].expand(batch, n_q, -1, d)).contiguous()
    args = ProbeArgs(q_probe, k, probes, valid, t.scale, t.n_rep)
    rows: list[dict] = []
    expected = None
    for config, tiles in _probe_grid().items():
        lse = _guard(lambda tiles=tiles: probe_lse(args, tiles), errors, f"probe/{config}")
        if lse is None:
            continue
        out = probe_colsum_from_lse(args, lse, tiles)
        expected = expected or out
        diff = float((out[0] - expected[0]).abs().max())
        check = dict(
            max_abs_diff=diff,
            matches_default=diff <= 1e-3 * float(expected[0].max()) and bool(torch.equal(out[1], expected[1])),
        )
        rows.append(
            dict(_sweep_row(base, "probe_pass1", config, lambda tiles=tiles: probe_lse(args, tiles), errors), **check)
        )
        pass2 = lambda lse=lse, tiles=tiles: probe_colsum_from_lse(args, lse, tiles)
        rows.append(dict(_sweep_row(base, "probe_pass2", config, pass2, errors), **check))
    if expected is None:
        return rows
    colsum, seen = expected
    reference = select_kept(colsum, seen, valid, cfg.tau, cfg.min_keep, use_triton=False)
    for config, tiles in _select_grid(batch, n, device).items():
        call = lambda tiles=tiles: select_kept_triton(colsum, seen, valid, cfg.tau, cfg.min_keep, tiles=tiles)
        row = _sweep_row(base, "select", config, call, errors)
        kept = _guard(call, errors, f"select_check/{config}")
        row["keep_diff_vs_reference"] = None if kept is None else int((kept.keep ^ reference.keep).sum())
        row["matches_default"] = row["keep_diff_vs_reference"] == 0
        rows.append(row)
    rows += _sweep_merge(t, base, sinks, errors)
    for row in rows:
        row["errors"] = dict(errors)
    print(f"  {name} n={n}: dense {base['dense_ms']} ms ({dense_backend}), {len(rows)} sweep rows", flush=True)
    return rows


SWEEP_COLUMNS = [
    "shape",
    "n",
    "stage",
    "config",
    "ms",
    "graph_ms",
    "pct_of_dense",
    "matches_default",
    "max_abs_diff",
    "keep_diff_vs_reference",
    "dense_ms",
]


def run_sweep(
    shapes: dict[str, tuple[int, int, int]],
    lengths: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    sinks: SinkOptions,
) -> list[dict]:
    """--sweep-probe: the sweep rows of every shape and length; prints the table, writes the JSON."""
    start = time.time()
    rows: list[dict] = []
    for name, heads in shapes.items():
        for n in lengths:
            rows += sweep_length(name, heads, n, dtype, device, sinks)
            if device == "cuda":
                torch.cuda.empty_cache()
    best: dict[tuple, dict] = {}
    gpu_ms = lambda row: row.get("graph_ms") or row["ms"]  # the GPU time where a CUDA graph measured it
    for row in rows:
        key = (row["shape"], row["n"], row["stage"])
        if (
            row["ms"] is not None
            and row.get("matches_default")
            and (key not in best or gpu_ms(row) < gpu_ms(best[key]))
        ):
            best[key] = row
    payload = dict(
        **_run_fields("prefill_probe_sweep", dtype),
        seconds=round(time.time() - start, 1),
        best={"/".join(map(str, key)): row["config"] for key, row in best.items()},
        rows=rows,
    )
    path = write_json("prefill_probe_sweep.json", payload)
    print()
    print(markdown_table(rows, SWEEP_COLUMNS))
    print("\nfastest matching configuration per stage:")
    for key, row in best.items():
        pct = 100.0 * gpu_ms(row) / row["dense_ms"] if row["dense_ms"] else 0.0
        print(f"  {'/'.join(map(str, key))}: {row['config']} {gpu_ms(row):.4f} ms ({pct:.2f}% of dense)")
    print(f"\n{len(rows)} rows in {time.time() - start:.0f} s" + (f"; wrote {path}" if path else ""))
    return rows


COLUMNS = [
    "shape",
    "n",
    "r",
    "dense_backend",
    "dense_ms",
    "sparse_backend",
    "sparse_ms",
    "sparse_graph_ms",
    "ideal_ms",
    "ratio",
    "ratio_graph",
    "kernel_ratio",
    "pack_ms",
    "unpack_ms",
    "probe_select_ms",
    "probe_pct_of_dense",
    "local_ms",
    "local_vs_dense",
    "sinks_backend",
    "sinks_ms",
    "sinks_graph_ms",
    "sinks_kept_ms",
    "sinks_merge_ms",
    "sinks_ratio",
    "op_kept_ratio",
    "op_sinks_ms",
    "op_sinks_share_of_ideal",
    "op_sinks_graph_ms",
    "op_sinks_graph_share_of_ideal",
    "op_paper_ms",
    "op_paper_share_of_ideal",
    "op_paper_graph_ms",
    "op_paper_graph_share_of_ideal",
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on CPU)")
    parser.add_argument("--lengths", type=int, nargs="+", help="override the sequence lengths")
    parser.add_argument("--shapes", nargs="+", help="subset of the shape names")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--local-window", type=int, default=64, help="window of the local_window timing (0: off)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--sink-window", type=int, default=128, help="local window of the sinks mode (>= 1)")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens of the sinks mode (>= 0)")
    parser.add_argument(
        "--sweep-probe", action="store_true", help="time the probe / select / sinks-merge launch parameters only"
    )
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes {args.modes!r}: choose among {','.join(MODES)}")
    if args.sink_window < 1 or args.sinks < 0:
        parser.error("--sink-window must be >= 1 and --sinks >= 0")
    sink_opts = SinkOptions(args.sink_window, args.sinks)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    shapes = {k: v for k, v in shapes.items() if not args.shapes or k in args.shapes}
    print(f"device {device_name()}, torch {torch.__version__}, {dtype}, kept backends {available_backends()}")
    if args.sweep_probe:
        lengths = tuple(args.lengths or (SMOKE_LENGTHS if args.smoke else SWEEP_LENGTHS))
        return run_sweep(shapes, lengths, dtype, device, sink_opts)
    lengths = args.lengths or (SMOKE_LENGTHS if args.smoke else LENGTHS)

    start = time.time()
    rows: list[dict] = []
    no_graph: set[str] = set()
    for name, heads in shapes.items():
        for n in lengths:
            rows += bench_length(
                name, heads, n, tuple(args.ratios), dtype, device, no_graph, args.local_window, modes, sink_opts
            )
            if device == "cuda":
                torch.cuda.empty_cache()
    elapsed = time.time() - start

    print()
    print(markdown_table(rows, COLUMNS))
    at_target = [row["ratio"] for row in rows if row["n"] == TARGET_N and row["ratio"] is not None]
    if at_target:
        print(f"\nsparse / (r^2 x dense) at n = {TARGET_N}: max {max(at_target):.3f} (target <= {TARGET_RATIO})")
    payload = dict(
        **_run_fields("prefill_attention", dtype),
        batch=1,
        kept_backends=list(available_backends()),
        smoke=args.smoke,
        modes=list(modes),
        sink_window=sink_opts.window,
        sinks=sink_opts.sinks,
        seconds=round(elapsed, 1),
        notes="sdpa_cudnn runs on K/V expanded to the query head count before timing; "
        "ratio = sparse_ms / (r^2 x dense_ms) with the best dense backend",
        target=dict(n=TARGET_N, max_ratio=TARGET_RATIO),
        rows=rows,
    )
    path = write_json("prefill_attention.json", payload)
    print(f"\n{len(rows)} rows in {elapsed:.0f} s" + (f"; wrote {path}" if path else ""))
    return rows


if __name__ == "__main__":
    main()
