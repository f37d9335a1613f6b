"""Microbenchmark: packed-cache decode attention (Triton split-K) vs bf16 SDPA decode on the same tokens.

Cache: half the n tokens in ``hi`` (4-bit), half in ``lo`` (2-bit), plus a bf16 tail of 50 tokens
(capacity 100), d = 128; MHA 32x128 and GQA 28/4x128; n in {8k, 32k, 128k}; B in {1, 8}. Times are the
median of ``triton.testing.do_bench`` and of CUDA-graph replay (``do_bench_cudagraph``). ``bytes`` counts
what one call must read or write: codes + quantisation params + positions + tail + q/out (the split-K
workspace is listed apart as ``ws_bytes``). Achieved bandwidth = bytes / graph time, against the bandwidth
SDPA reaches on its (larger) bf16 cache in the same run. Replaying one call on one set of inputs leaves them in
the L2 cache where they fit (by the MB-read column against the datasheet's 50 MB: the packed cache at 8k B = 1
MHA and at every GQA shape up to 32k B = 1 and 8k B = 8, SDPA's GQA cache at 8k B = 1), unlike a decode step, whose
other layers evict them: the "cold" columns time each call over enough copies of its inputs that one replay reads
more than twice the L2 (:func:`cold_copies`), per call. ``--variants`` also times the tuning grid of
:func:`decode_attention_triton` (path, warps, programs per SM) for each shape, each checked against the policy's
output, and writes them under ``variants`` in the JSON.

    python bench/decode_attention.py            # GPU; prints a markdown table, writes $OUT/... if OUT is set
    python bench/decode_attention.py --smoke    # tiny sizes, runs on CPU under the Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

D, HI_BITS, LO_BITS, R, TAIL_LEN = 128, 4, 2, 100, 50


def make_cache(B: int, H: int, n_rep: int, n: int, d: int, device: str, gen: torch.Generator):
    """Random packed cache: n/2 tokens in hi, n/2 in lo (segments exactly full), TAIL_LEN tail tokens."""
    from zipvl_compile.runtime.layout import Segment, Tail

    def segment(cap: int, bits: int, first_pos: int) -> Segment:
        kb = d * bits // 8
        codes = lambda: torch.randint(0, 256, (B, H, cap, kb), device=device, dtype=torch.uint8, generator=gen)
        param = lambda *shape: (torch.rand(*shape, device=device, generator=gen) * 0.1).half()
        pos = torch.arange(first_pos, first_pos + cap, device=device, dtype=torch.int32).expand(B, cap)
        fill = torch.full((B,), cap, device=device, dtype=torch.int32)
        return Segment(
            codes(),
            param(B, H, cap // 64, d),
            param(B, H, cap // 64, d) - 0.05,
            codes(),
            param(B, H, cap),
            param(B, H, cap) - 0.05,
            pos.contiguous(),
            fill,
        )

    half = n // 2
    bf = dict(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    tail_pos = torch.arange(n, n + R, device=device, dtype=torch.int32).expand(B, R).contiguous()
    return dict(
        q=torch.randn(B, H * n_rep, 1, d, generator=gen, **bf),
        hi=segment(half, HI_BITS, 0),
        lo=segment(half, LO_BITS, half),
        tail=Tail(
            k=torch.randn(B, H, R, d, generator=gen, **bf),
            v=torch.randn(B, H, R, d, generator=gen, **bf),
            pos=tail_pos,
            length=torch.full((B,), TAIL_LEN, device=device, dtype=torch.int32),
        ),
        scale=d**-0.5,
        n_rep=n_rep,
        hi_bits=HI_BITS,
        lo_bits=LO_BITS,
    )


def bytes_read(B: int, H: int, n_rep: int, n: int, d: int, elt: int) -> int:
    """Bytes one decode call moves: codes, params (fp16), positions (int32), tail, q and out."""
    total = 0
    for bits in (HI_BITS, LO_BITS):
        tok = n // 2
        total += B * H * tok * 2 * d * bits // 8  # k + v codes
        total += B * H * (tok // 64) * d * 2 * 2 + B * H * tok * 2 * 2  # k scale/zero, v scale/zero
        total += B * tok * 4  # pos
    total += B * H * TAIL_LEN * d * elt * 2 + B * TAIL_LEN * 4
    return total + 2 * B * H * n_rep * d * elt


def variants_for(n_rep: int) -> list[dict]:
    """The tuning grid timed by ``--variants``: every segment path that applies, warps, programs per SM, stages,
    register cap (0: uncapped), split bounds (fewest blocks per split, most splits per segment) and the CUDA-core
    path's channels per thread; knobs not varied are the path's policy (:func:`decode.tuning`)."""
    from zipvl_compile.runtime.kernels import decode as dec

    def knobs(path: str, **varied: int) -> dict:
        return dict(path=path, **(dec.tuning(path)._asdict() | varied))

    grid = [
        knobs("swap", num_warps=w, programs_per_sm=p, num_stages=st, maxnreg=0)
        for w in (1, 2, 4)
        for p in (4, 8, 16)
        for st in (1, 2, 3)
    ]
    grid += [knobs("swap", programs_per_sm=p, maxnreg=r) for p in (8, 16) for r in (168, 128)]
    grid += [knobs("swap", min_blocks=b, max_splits=m) for b, m in ((4, 512), (8, 64), (16, 64))]
    if n_rep == 1:
        grid += [knobs("fma", programs_per_sm=p, maxnreg=r) for p in (8, 16, 32) for r in (0, 96, 128)]
        grid += [knobs("fma", min_blocks=b, max_splits=m) for b, m in ((4, 512), (8, 32), (16, 16), (4, 16))]
        grid += [knobs("fma", channels_per_thread=c) for c in (16, 64)]
    return grid


def variant_launch(q: torch.Tensor, call, shape: tuple[int, int, int], sms: int, knobs: dict):
    """A call of the Triton kernel with these knobs: the split bounds become split counts (:func:`num_splits_for`
    with the knobs' policy), the rest are launch arguments. shape: (B, KV heads, tokens)."""
    from zipvl_compile.runtime.kernels import decode as dec

    B, H, n = shape
    bounds = ("programs_per_sm", "min_blocks", "max_splits", "sparse_warps")
    policy = dec.tuning(knobs["path"])._replace(**{k: knobs[k] for k in bounds})
    splits = dec.num_splits_for(B, H, n // 2, n // 2, R, sms, policy)
    launch = {k: v for k, v in knobs.items() if k not in bounds}
    return lambda: dec.decode_attention_triton(q, call, num_splits=splits, **launch)


def cold_copies(nbytes: int, l2_bytes: int) -> int:
    """Copies of a call's inputs (each ``nbytes``) whose reads in one pass exceed twice the L2 cache, at most 16; 2
    where the cache size is unknown (CPU smoke runs), so that the path is exercised."""
    return min(16, max(1, -(-2 * l2_bytes // nbytes))) if l2_bytes else 2


def graph_time(fn) -> float:
    """CUDA-graph replay median in microseconds (one wall-clock call on the CPU)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton.testing as tt

    return tt.do_bench_cudagraph(fn, return_mode="median") * 1e3


def time_fn(fn) -> tuple[float, float]:
    """(do_bench median, CUDA-graph replay median) in microseconds; on CPU one wall-clock call and NaN."""
    if not torch.cuda.is_available():
        return graph_time(fn), float("nan")
    import triton.testing as tt

    return tt.do_bench(fn, return_mode="median") * 1e3, graph_time(fn)


def run_one(B: int, H: int, n_rep: int, n: int, d: int, device: str, variants: bool) -> dict:
    from zipvl_compile.runtime.kernels import decode as dec
    from zipvl_compile.runtime.kernels.decode_reference import decode_attention_reference

    gen = torch.Generator(device).manual_seed(0)
    args = make_cache(B, H, n_rep, n, d, device, gen)
    elt = args["q"].element_size()
    from zipvl_compile.runtime.kernels.device import sm_count

    q, call = args["q"], dec.DecodeCall(**{name: value for name, value in args.items() if name != "q"})
    fn = lambda: dec.decode_attention_triton(q, call)
    out = fn()
    policy = dec.tuning(dec.default_path(n_rep))
    splits = sum(dec.num_splits_for(B, H, n // 2, n // 2, R, sm_count(torch.device(device)), policy))
    err = None  # the fp32 reference is skipped where it would not fit comfortably
    if B * H * n_rep * n * d * 4 <= 2**30:
        err = (out.float() - decode_attention_reference(**args).float()).abs().max().item()
    t_tr, g_tr = time_fn(fn)

    kv = lambda: tuple(
        torch.randn(B, H, n + TAIL_LEN, d, device=device, dtype=args["q"].dtype, generator=gen) for _ in range(2)
    )
    k, v = kv()
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(args["q"], k, v, enable_gqa=n_rep > 1)
    t_sd, g_sd = time_fn(sdpa)
    nbytes = bytes_read(B, H, n_rep, n, d, elt)
    sdpa_bytes = 2 * B * H * (n + TAIL_LEN) * d * elt + 2 * B * H * n_rep * d * elt
    # cold: the same calls on enough copies of their inputs that one replay's reads exceed twice the L2 cache
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device == "cuda" else 0
    calls = [call] + [
        dec.DecodeCall(
            **{name: value for name, value in make_cache(B, H, n_rep, n, d, device, gen).items() if name != "q"}
        )
        for _ in range(cold_copies(nbytes, l2) - 1)
    ]
    g_tr_cold = graph_time(lambda: [dec.decode_attention_triton(q, c) for c in calls]) / len(calls)
    kvs = [(k, v)] + [kv() for _ in range(cold_copies(sdpa_bytes, l2) - 1)]
    sdpa_all = lambda: [
        torch.nn.functional.scaled_dot_product_attention(q, ki, vi, enable_gqa=n_rep > 1) for ki, vi in kvs
    ]
    g_sd_cold = graph_time(sdpa_all) / len(kvs)
    ws_bytes = 2 * B * H * n_rep * splits * (d + 2) * 4
    best = g_tr if g_tr == g_tr else t_tr
    sdpa_best = g_sd if g_sd == g_sd else t_sd
    tuned = []
    sms = sm_count(torch.device(device))
    for knobs in variants_for(n_rep) if variants else []:
        variant = variant_launch(q, call, (B, H, n), sms, knobs)
        diff = (variant().float() - out.float()).abs().max().item()
        tuned.append(dict(knobs, us=graph_time(variant), max_diff_vs_policy=diff))
    return dict(
        B=B,
        Hq=H * n_rep,
        H=H,
        d=d,
        n=n,
        splits=splits,
        bytes=nbytes,
        ws_bytes=ws_bytes,
        sdpa_bytes=sdpa_bytes,
        triton_us=t_tr,
        triton_graph_us=g_tr,
        sdpa_us=t_sd,
        sdpa_graph_us=g_sd,
        gbps=nbytes / best / 1e3,
        sdpa_gbps=sdpa_bytes / sdpa_best / 1e3,
        frac_sdpa_bw=(nbytes / best) / (sdpa_bytes / sdpa_best),
        speedup_graph=(g_sd / g_tr) if g_tr == g_tr else t_sd / t_tr,
        triton_cold_us=g_tr_cold,
        sdpa_cold_us=g_sd_cold,
        speedup_cold=g_sd_cold / g_tr_cold,
        max_abs_err=err,
        variants=tuned,
    )


def markdown(rows: list[dict]) -> str:
    head = (
        "| n | B | heads | splits | MB read | bytes vs bf16 | Triton µs | graph µs | GB/s | of SDPA's GB/s "
        "| SDPA µs | SDPA graph µs | speedup (graph) | cold µs | SDPA cold µs | speedup (cold) | max err |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['B']} | {r['Hq']}/{r['H']}x{r['d']} | {r['splits']} | "
            f"{r['bytes'] / 1e6:.1f} | {r['bytes'] / r['sdpa_bytes']:.1%} | {r['triton_us']:.1f} | "
            f"{r['triton_graph_us']:.1f} | {r['gbps']:.0f} | {r['frac_sdpa_bw']:.0%} of {r['sdpa_gbps']:.0f} | "
            f"{r['sdpa_us']:.1f} | {r['sdpa_graph_us']:.1f} | {r['speedup_graph']:.2f}x | "
            f"{r['triton_cold_us']:.1f} | {r['sdpa_cold_us']:.1f} | {r['speedup_cold']:.2f}x | "
            f"{'-' if r['max_abs_err'] is None else format(r['max_abs_err'], '.2e')} |"
        )
    tuned = [(r, v) for r in rows for v in r["variants"]]
    if tuned:
        head = (
            "| n | B | heads | path | warps | programs/SM | stages | maxnreg | min blocks | max splits | µs "
            "| vs policy | max diff |"
        )
        lines += ["", head, "|" + "---|" * 13]
        for r, v in tuned:
            lines.append(
                f"| {r['n']} | {r['B']} | {r['Hq']}/{r['H']} | {v['path']} | {v['num_warps']} | "
                f"{v['programs_per_sm']} | {v['num_stages']} | {v['maxnreg'] or '-'} | {v['min_blocks']} | "
                f"{v['max_splits']} | {v['us']:.1f} | "
                f"{r['triton_graph_us'] / v['us']:.2f}x | "
                f"{v['max_diff_vs_policy']:.1e} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; CPU via the Triton interpreter")
    parser.add_argument("--variants", action="store_true", help="also time the tuning grid of each shape")
    parser.add_argument("--heads", choices=("all", "mha", "gqa"), default="all", help="which head layouts to time")
    opts = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not opts.smoke:
        parser.error("needs a CUDA device (or --smoke)")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    device = "cuda" if cuda else "cpu"
    if opts.smoke:
        grid = [(B, H, n_rep, n, 32) for n in (256, 512) for B in (1, 2) for H, n_rep in ((2, 1), (1, 3))]
    else:
        layouts = {"all": ((32, 1), (4, 7)), "mha": ((32, 1),), "gqa": ((4, 7),)}[opts.heads]
        grid = [(B, H, n_rep, n, D) for n in (8192, 32768, 131072) for B in (1, 8) for H, n_rep in layouts]
    title = (
        f"decode attention, {torch.cuda.get_device_name() if cuda else 'CPU (interpreter)'}, "
        f"bits {HI_BITS}/{LO_BITS} at r = 0.5, tail {TAIL_LEN}, torch {torch.__version__}"
    )
    rows = []
    for cfg in grid:
        rows.append(run_one(*cfg, device, opts.variants))
        if cuda:
            torch.cuda.empty_cache()
        if os.environ.get("OUT"):  # after every shape, so that a run cut short keeps what it measured
            with open(os.path.join(os.environ["OUT"], "decode_attention.json"), "w") as f:
                json.dump(dict(title=title, rows=rows), f, indent=1)
    print(f"## {title}\n\n{markdown(rows)}")


if __name__ == "__main__":
    main()
