"""Microbenchmark: the kept-set selection (Eqs. 6-8), one program per row against the policy's launch.

For B in {1, 8} and n in {8k, 16k, 32k, 64k, 128k}: colsum = rand**4 and seen in {1..8} (random, tau = 0.975,
min_keep 64), ``select_kept_triton`` with one program per row (:data:`DEFAULT_SELECT_TILES`, with and without
prefetch) and with :func:`select_launch_for`'s launch (the split launch from 8k keys), median ms from CUDA-graph
replay; ``same`` = every launch returned the same keep / ratio / idx / count.

    python -m bench.selection            # GPU; prints a markdown table, writes $OUT/select.json if OUT is set
    python -m bench.selection --smoke    # tiny sizes on CPU under the Triton interpreter (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse

import torch

from bench._timing import cuda_graph_ms, device_name, markdown_table, median_ms, write_json

BATCHES, LENGTHS = (1, 8), (8192, 16384, 32768, 65536, 131072)
SMOKE_BATCHES, SMOKE_LENGTHS = (1,), (64,)


def time_row(batch: int, n: int, device: str) -> dict:
    """One row: the three launches on the same random inputs, timed and compared."""
    from zipvl_compile.runtime.kernels.device import sm_count
    from zipvl_compile.runtime.kernels.select import (
        DEFAULT_SELECT_TILES,
        SelectTiles,
        select_kept_triton,
        select_launch_for,
    )

    g = torch.Generator(device).manual_seed(n + batch)
    colsum = torch.rand(batch, n, device=device, generator=g) ** 4
    seen = torch.randint(1, 9, (batch, n), device=device, generator=g).float()
    valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    policy = select_launch_for(batch, n, sm_count(torch.device(device)))
    launches = {"one_program": DEFAULT_SELECT_TILES, "one_program_prefetch": SelectTiles(prefetch=True)}
    launches["policy"] = policy
    row: dict = dict(batch=batch, n=n, policy=repr(policy))
    results = []
    for name, tiles in launches.items():
        call = lambda tiles=tiles: select_kept_triton(colsum, seen, valid, 0.975, 64, tiles=tiles)
        results.append(call())
        row[f"{name}_ms"] = cuda_graph_ms(call) if device == "cuda" else median_ms(call)
    row["same"] = all(torch.equal(a, b) for out in results[1:] for a, b in zip(results[0], out))
    row["speedup"] = row["one_program_ms"] / row["policy_ms"]
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, Triton interpreter)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches, lengths = (SMOKE_BATCHES, SMOKE_LENGTHS) if args.smoke else (BATCHES, LENGTHS)
    rows = [time_row(batch, n, device) for batch in batches for n in lengths]
    columns = ["batch", "n", "policy", "one_program_ms", "one_program_prefetch_ms", "policy_ms", "speedup", "same"]
    print(markdown_table(rows, columns))
    write_json("select.json", dict(bench="select", device=device_name(), torch=torch.__version__, rows=rows))
    return rows


if __name__ == "__main__":
    main()
