"""Soak: many generate calls of random shapes on one compiled model; exact tokens, bounded compiles, flat memory.

Compiles are bounded by (prefill, decode) x (batch 1, batch >= 2) x (first shapes static, then dynamic) x
(ZipVLCache, DynamicCache) plus the kwargs variants transformers passes: :data:`MAX_GRAPHS`. The GPU version runs
the same calls under CUDA graphs (``mode="reduce-overhead"``, Inductor) and also bounds the recordings: one per
(cache class, batch) of the packed cache's pool, whatever the prompt and output lengths inside a class.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest
import torch
from transformers import DynamicCache

import zipvl_compile
from zipvl_compile.testing import build_text

CALLS = 104
MAX_GRAPHS = 12  # measured: 8, none after the first few calls


class Soak(NamedTuple):
    """What a soak measured: report graphs at the end and after the first half of the calls, and the memory the
    process (CPU: resident MiB) or the device (CUDA: allocated MiB) gained over the second half."""

    graphs: int
    graphs_after_warmup: int
    memory_growth_mib: float
    pool_keys: int  # distinct keys of the packed-cache pool the calls used


def _memory_mib(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _soak(model: torch.nn.Module, reference: torch.nn.Module, calls: int, device: str) -> Soak:
    """``calls`` greedy generate calls of random batch (1-4), left/right padding, prompt (2-60) and output (1-40)
    lengths, every third on a DynamicCache, the rest on the packed cache; tokens must equal ``reference``'s."""
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    warm, keys = None, set()
    for call in range(calls):
        batch, n, new = rng.randint(1, 4), rng.randint(2, 60), rng.randint(1, 40)
        ids = torch.randint(3, 500, (batch, n), generator=gen)
        mask = torch.ones_like(ids)
        for row in range(batch):
            pad = rng.randint(0, n - 1)
            if rng.random() < 0.5:
                mask[row, :pad] = 0
            else:
                mask[row, n - pad :] = 0
        kwargs = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )
        dynamic = call % 3 == 2
        with torch.no_grad():
            want = reference.generate(**kwargs)
            got = model.generate(**kwargs, past_key_values=DynamicCache() if dynamic else None)
        assert torch.equal(got, want), (call, batch, n, new, mask.tolist())
        keys |= set(model.zipvl_cache_pool.caches)
        if call == calls // 2:
            warm = len(model.zipvl_report.graphs), _memory_mib(device)
    rep = model.zipvl_report
    print(f"{len(rep.graphs)} graphs ({warm[0]} after {calls // 2} calls)")
    for g in rep.recompiles():
        print(f"  graph {g.graph_id} {g.kind}: {g.recompile_reason.splitlines()[0]}")
    return Soak(len(rep.graphs), warm[0], _memory_mib(device) - warm[1], len(keys))


@pytest.mark.slow
def test_soak_exact_tokens_bounded_compiles_flat_memory():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model, reference = build_text("llama"), build_text("llama")
    zipvl_compile.compile(model, tau=1.0, hi_bits=16, lo_bits=16, recompress_interval=50, inner="eager")
    soak = _soak(model, reference, CALLS, "cpu")
    assert soak.graphs <= MAX_GRAPHS
    assert soak.memory_growth_mib < 64


GPU_CALLS = 48
MAX_RECORDINGS = 16  # (cache class, batch) pairs the calls can reach, bounded well above what they do reach


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_soak_gpu_cuda_graphs():
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    zipvl_compile.reset_report()
    counters.clear()
    model, reference = build_text("llama").cuda(), build_text("llama").cuda()
    zipvl_compile.compile(model, tau=1.0, hi_bits=16, lo_bits=16, recompress_interval=50, mode="reduce-overhead")
    soak = _soak(model, reference, GPU_CALLS, "cuda")
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    recorded = sum(len(nodes) for nodes in manager.roots.values()) if manager is not None else 0
    graphs = [(g.graph_id, g.kind, g.cudagraphs) for g in model.zipvl_report.graphs]
    print(f"CUDA graph recordings: {recorded}; {soak}; graphs {graphs}; skips {dict(counters['inductor'])}")
    assert soak.graphs <= MAX_GRAPHS
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert 1 <= recorded <= min(MAX_RECORDINGS, soak.pool_keys)
    assert soak.memory_growth_mib < 16
