"""The CPU bodies of the sparse prefill (runtime.cpu_attention) against the kernels' plain-torch oracles."""

from __future__ import annotations

import pytest
import torch

from zipvl_compile.runtime.cpu_attention import prefill_attention
from zipvl_compile.runtime.kernels.kept_attention import keep_to_index, kept_causal_attention_reference
from zipvl_compile.runtime.kernels.local_attention import local_attention_reference
from zipvl_compile.runtime.kernels.plan import PrefillPlan
from zipvl_compile.runtime.kernels.sink_attention import sink_attention_reference


def _oracle(q, k, v, plan):
    if plan.mode == "paper":
        return kept_causal_attention_reference(q, k, v, plan).transpose(1, 2).contiguous().transpose(1, 2)
    if plan.mode == "local":
        return local_attention_reference(q, k, v, plan)
    return sink_attention_reference(q, k, v, plan)


@pytest.mark.parametrize("mode", ["paper", "local", "sinks"])
@pytest.mark.parametrize(
    "batch,kv_heads,n_rep,n,d,window,sinks",
    [(2, 2, 3, 37, 16, 5, 3), (1, 3, 3, 150, 32, 64, 4), (3, 1, 2, 70, 8, 1, 0), (2, 2, 1, 50, 8, 64, 70)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_oracle(mode, batch, kv_heads, n_rep, n, d, window, sinks, dtype):
    g = torch.Generator().manual_seed(n + window)
    q, k, v = (torch.randn(batch, h, n, d, generator=g).to(dtype) for h in (kv_heads * n_rep, kv_heads, kv_heads))
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[-1, : n // 4] = False  # left padding in the last row
    keep = (torch.rand(batch, n, generator=g) < 0.4) & valid
    keep[:, -1] = True
    plan = PrefillPlan(mode, keep, *keep_to_index(keep), valid, window, sinks, 0.3, n_rep)
    out = prefill_attention(q, k, v, plan)
    want = _oracle(q, k, v, plan)
    assert out.dtype == dtype and out.stride() == want.stride()
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, want, **tol)
    assert out.abs().sum() > 0
