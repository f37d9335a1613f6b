"""The backend puts sparse_attention on prefill sites, honours dense_layers, and reports kept ratios."""

from __future__ import annotations

import inspect

import torch

import zipvl_compile
from zipvl_compile.testing import build_text


def _run(options, name="llama", n=60, attn="sdpa"):
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = build_text(name, attn)
    ids = torch.randint(3, 500, (2, n), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    model.forward = torch.compile(model.forward, backend="zipvl", options=dict(inner="eager", dense_below=0, **options))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    return out, zipvl_compile.report()


def test_sparse_prefill_reports_ratios():
    _, rep = _run({"tau": 0.8, "min_keep": 4, "n_probe_recent": 8, "n_probe_random": 8})
    prefill = [s for s in rep.sites if s.kind == "prefill"]
    assert prefill and all(s.op == "zipvl.sparse_attention" for s in prefill)
    ratios, flops = rep.kept_ratios(), rep.flop_reduction()
    assert set(ratios) == {0, 1}
    for layer, r in ratios.items():
        assert 0 < r < 1
        assert flops[layer] > 0
    assert "kept ratio of the last prefill" in str(rep)


def test_dense_layers_stay_dense():
    _, rep = _run({"tau": 0.8, "dense_layers": [1]})
    by_layer = {s.layer: s for s in rep.sites if s.kind == "prefill"}
    assert by_layer[0].op == "zipvl.sparse_attention"
    assert by_layer[1].op == "zipvl.attention" and by_layer[1].dense_reason == "layer listed in dense_layers"
    assert set(rep.kept_ratios()) == {0}


def test_sliding_window_layers_stay_dense():
    _, rep = _run({"tau": 0.9}, name="gemma3", attn="eager")
    by_layer = {s.layer: s for s in rep.sites if s.kind == "prefill"}
    assert by_layer[0].mask == "causal+window" and by_layer[0].op == "zipvl.attention"
    assert by_layer[0].dense_reason.startswith("sliding-window layer")
    assert by_layer[1].op == "zipvl.sparse_attention"


def test_reset_report_keeps_live_graph_stats():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = build_text("qwen2")
    model.forward = torch.compile(
        model.forward, backend="zipvl", options={"inner": "eager", "tau": 0.7, "dense_below": 0}
    )
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
        assert zipvl_compile.report().kept_ratios()
        zipvl_compile.reset_report()
        assert not zipvl_compile.report().kept_ratios()
        model(input_ids=ids)
    assert set(zipvl_compile.report().kept_ratios()) == {0, 1}


def test_prefill_options_reach_the_op(monkeypatch):
    """prefill_mode, local_window, sink_tokens and score_norm travel from the options to every sparse prefill."""
    from zipvl_compile.runtime import sparse

    seen = []
    real = sparse.sparse_attention

    def spy(*args):
        call = inspect.signature(real).bind(*args).arguments
        assert call["rows"] is not None  # the graph's shared probe rows
        seen.append((call["prefill"].attend, call["prefill"].selection.score_norm))
        return real(*args)

    monkeypatch.setattr(sparse, "sparse_attention", spy)
    _run(
        {
            "tau": 0.8,
            "min_keep": 4,
            "n_probe_recent": 8,
            "n_probe_random": 8,
            "prefill_mode": "local",
            "local_window": 5,
            "sink_tokens": 3,
            "score_norm": "n_minus_j",
        }
    )
    assert seen and all(
        s == (sparse.Attend(prefill_mode="local", local_window=5, sink_tokens=3), "n_minus_j") for s in seen
    ), seen
