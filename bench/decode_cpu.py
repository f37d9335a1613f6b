"""Microbenchmark: one CPU decode step over the packed cache at the CPU demo's shapes, against the dense step.

Shapes of SmolLM2-135M (the demo's model): B = 1, 3 KV heads, n_rep 3, d 64, fp32; ``hi`` 512 slots filled to
384 of which 330 hold tokens (4 bits), ``lo`` empty or one 64-slot group (2 bits), a tail of 100 slots holding 20.
Rows: the C kernel (``decode_attention_cpu`` as the model calls it, input checks included), the torch body
(``native=False``), and the dense model's step on the same number of tokens (``torch.cat`` of the new token's K and V
onto a cache, then SDPA with grouped heads). Best of 9 runs of ``--calls`` calls each, in microseconds per call.

    python bench/decode_cpu.py [--threads 1] [--calls 200]
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable

import torch

from zipvl_compile.runtime.kernels.decode_cpu import decode_attention_cpu
from zipvl_compile.runtime.layout import Segment, Tail, pack_codes

HEADS, N_REP, D, TOKENS, TAIL = 3, 3, 64, 330, 20


def _segment(gen: torch.Generator, capacity: int, fill: int, tokens: int, bits: int) -> Segment:
    seg = Segment.empty(1, HEADS, capacity, D, bits, torch.device("cpu"))
    for codes in (seg.k_codes, seg.v_codes):
        codes.copy_(pack_codes(torch.randint(0, 1 << bits, (1, HEADS, capacity, D), generator=gen), bits))
    for param in (seg.k_scale, seg.k_zero, seg.v_scale, seg.v_zero):
        param.copy_(torch.rand(param.shape, generator=gen) + 0.1)
    seg.pos[0, :tokens] = torch.randperm(4 * capacity, generator=gen)[:tokens].to(torch.int32)
    seg.fill.fill_(fill)
    return seg


def _best_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    runs = []
    for _ in range(9):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return min(runs)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark (arguments as on the command line); returns the table's rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for lo_tokens in (0, 64):
        hi, lo = _segment(gen, 512, 384, TOKENS, 4), _segment(gen, 128, lo_tokens, lo_tokens, 2)
        tail = Tail.empty(1, HEADS, 100, D, torch.float32, torch.device("cpu"))
        tail.k.normal_(generator=gen)
        tail.v.normal_(generator=gen)
        tail.pos[0, :TAIL] = torch.arange(TAIL, dtype=torch.int32) + 4096
        tail.length.fill_(TAIL)
        q = torch.randn(1, HEADS * N_REP, 1, D, generator=gen)
        step = (q, hi, lo, tail, D**-0.5, N_REP, 4, 2)
        n = TOKENS + lo_tokens + TAIL
        k, v = (torch.randn(1, HEADS, n - 1, D, generator=gen) for _ in range(2))
        new = torch.randn(1, HEADS, 1, D, generator=gen)

        def dense(q: torch.Tensor = q, kv: tuple = (k, v, new)) -> torch.Tensor:
            keys, values = torch.cat([kv[0], kv[2]], 2), torch.cat([kv[1], kv[2]], 2)
            return torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)

        rows.append(
            dict(
                tokens=n,
                lo_tokens=lo_tokens,
                c_kernel_us=_best_us(lambda step=step: decode_attention_cpu(*step), args.calls),
                torch_body_us=_best_us(lambda step=step: decode_attention_cpu(*step, native=False), args.calls // 4),
                dense_step_us=_best_us(dense, args.calls),
            )
        )
    print(f"## CPU decode step, {args.threads} thread(s), torch {torch.__version__}, {datetime.date.today()}\n")
    print("| tokens | lo tokens | C kernel µs | torch body µs | dense cat + SDPA µs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['lo_tokens']} | {r['c_kernel_us']:.1f} | {r['torch_body_us']:.1f} "
            f"| {r['dense_step_us']:.1f} |"
        )
    return rows


if __name__ == "__main__":
    main()
