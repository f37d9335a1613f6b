"""Soak: many generate calls of random shapes on one compiled model; exact tokens, bounded compiles, flat memory.

Compiles are bounded by (prefill, decode) x (batch 1, batch >= 2) x (first shapes static, then dynamic) x
(ZipVLCache, DynamicCache) plus the kwargs variants transformers passes: :data:`MAX_GRAPHS`.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

import zipvl_compile
from zipvl_compile.testing import build_text

CALLS = 104
MAX_GRAPHS = 12  # measured: 8, none after the first few calls


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_soak_exact_tokens_bounded_compiles_flat_memory():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model, reference = build_text("llama"), build_text("llama")
    zipvl_compile.compile(model, tau=1.0, hi_bits=16, lo_bits=16, recompress_interval=50, inner="eager")
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    graphs_after_warmup = memory_after_warmup = None
    for call in range(CALLS):
        batch, n, new = rng.randint(1, 4), rng.randint(2, 60), rng.randint(1, 40)
        ids = torch.randint(3, 500, (batch, n), generator=gen)
        mask = torch.ones_like(ids)
        for row in range(batch):
            pad = rng.randint(0, n - 1)
            if rng.random() < 0.5:
                mask[row, :pad] = 0
            else:
                mask[row, n - pad :] = 0
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        dynamic = call % 3 == 2
        with torch.no_grad():
            want = reference.generate(**kwargs)
            got = model.generate(**kwargs, past_key_values=DynamicCache() if dynamic else None)
        assert torch.equal(got, want), (call, batch, n, new, mask.tolist())
        if call == CALLS // 2:
            graphs_after_warmup, memory_after_warmup = len(model.zipvl_report.graphs), _rss_mib()
    rep = model.zipvl_report
    print(f"{len(rep.graphs)} graphs ({graphs_after_warmup} after {CALLS // 2} calls)")
    for g in rep.recompiles():
        print(f"  graph {g.graph_id} {g.kind}: {g.recompile_reason.splitlines()[0]}")
    assert len(rep.graphs) <= MAX_GRAPHS
    assert _rss_mib() - memory_after_warmup < 64
