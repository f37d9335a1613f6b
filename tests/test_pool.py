"""The compiled model's cache pool: generate calls of one class write into the same buffers, without recompiling,
and produce the tokens of a fresh cache (4/2 bits) or of the uncompiled model (16/16 bits, tau = 1)."""

from __future__ import annotations

import pytest
import torch

import zipvl_compile
from zipvl_compile import ZipVLCache
from zipvl_compile.runtime.cache import Plan
from zipvl_compile.runtime.layout import GROUP, Segment, Tail, round_up
from zipvl_compile.testing import build_text

OPTIONS = dict(tau=0.9, dense_below=0, min_keep=4, inner="eager", recompress_interval=8)
NEW = 12


def _ids(n: int, seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _generate(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, **kwargs
        )


def _pointers(model: torch.nn.Module) -> dict:
    """data_ptr of every buffer of every pooled cache, by pool key and layer."""
    return {
        key: [[t.data_ptr() for t in layer.buffers()] for _, layer in cache.packed_layers()]
        for key, cache in model.zipvl_cache_pool.caches.items()
    }


def test_calls_of_a_class_reuse_the_buffers_without_recompiling():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = zipvl_compile.compile(build_text("llama"), **OPTIONS)
    reference = build_text("llama")
    lengths = (60, 40, 52)  # one class (256 slots), the longest first: its buffers serve the others
    seen = []
    for i, n in enumerate(lengths):
        ids = _ids(n, seed=i)
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            got = _generate(model, ids)
        seen.append(_pointers(model))
        # a fresh cache of the same call (compiled reference model, the same options): same tokens
        zipvl_compile.compile(reference, **OPTIONS)
        fresh = ZipVLCache.for_prompt(reference, ids.shape[0], n, NEW, recompress_interval=8)
        assert torch.equal(got, _generate(reference, ids, past_key_values=fresh)), n
    assert len(seen[0]) == 1 and seen[0] == seen[1] == seen[2]
    decode = [g for g in model.zipvl_report.graphs if g.graph_id != model.zipvl_report.graphs[0].graph_id]
    assert all(g.recompile_reason is None or "input_ids" in g.recompile_reason for g in decode), [
        (g.graph_id, g.recompile_reason) for g in model.zipvl_report.graphs
    ]


def _prefill_need(seg: Segment, n: int, reserve: int) -> int:
    """Slots the prefill of ``n`` tokens filled in the fullest row of ``seg``, plus ``reserve``."""
    return round_up(int(((seg.pos >= 0) & (seg.pos < n)).sum(1).max()), GROUP) + reserve


def test_a_larger_call_of_the_class_grows_the_buffers_once():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = zipvl_compile.compile(build_text("llama"), **OPTIONS)
    _generate(model, _ids(40, seed=0))
    small = _pointers(model)
    _generate(model, _ids(130, seed=1))
    grown = _pointers(model)
    cache = next(iter(model.zipvl_cache_pool.caches.values()))
    plan = Plan.of(130, 130 + NEW, 8)
    for _, layer in cache.packed_layers():  # hi outgrew the first call's: sized by this call's need
        assert layer.hi.capacity == plan.pooled_slots(_prefill_need(layer.hi, 130, plan.reserve)) < plan.segment_slots
        assert _prefill_need(layer.lo, 130, plan.reserve) <= layer.lo.capacity < plan.segment_slots
    _generate(model, _ids(70, seed=2))
    assert small.keys() == grown.keys() and small != grown and _pointers(model) == grown


def test_pooled_reset_empties_the_buffers_in_place():
    model = build_text("llama")
    cache = ZipVLCache(model, max_cache_len=80, pooled=True)
    cache.prepare(1, 30, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model(input_ids=_ids(30, seed=0, batch=1), past_key_values=cache)
        model(input_ids=_ids(1, seed=1, batch=1), past_key_values=cache)  # the first decode step compacts
    layer = cache.packed_layers()[-1][1]
    before = [t.data_ptr() for t in layer.buffers()]
    cache.reset()
    assert [t.data_ptr() for t in layer.buffers()] == before and layer.spare == (layer.hi, layer.lo)
    batch, heads, _, d = layer.tail.k.shape
    empty = [
        *Segment.empty(batch, heads, layer.hi.capacity, d, 4, torch.device("cpu")),
        *Segment.empty(batch, heads, layer.lo.capacity, d, 2, torch.device("cpu")),
        *Tail.empty(batch, heads, layer.tail.slots, d, torch.float32, torch.device("cpu")),
        torch.zeros((), dtype=torch.int64),
    ]
    for held, new in zip(layer.buffers(), empty, strict=True):
        assert torch.equal(held, new)
    cache.prepare(1, 30, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model(input_ids=_ids(30, seed=0, batch=1), past_key_values=cache)
        model(input_ids=_ids(1, seed=1, batch=1), past_key_values=cache)
    assert [t.data_ptr() for t in layer.buffers()] == before and layer.spare is None  # the same call: room
    with pytest.raises(ValueError, match="empty cache"):
        cache.prepare(1, 30, torch.float32, torch.device("cpu"))


def test_16_16_tau_1_pool_reuse_matches_the_uncompiled_model():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model, plain = build_text("llama"), build_text("llama")
    zipvl_compile.compile(model, tau=1.0, hi_bits=16, lo_bits=16, inner="eager")
    for i, n in enumerate((50, 36)):
        ids = _ids(n, seed=10 + i)
        assert torch.equal(_generate(model, ids), _generate(plain, ids)), n


def test_pooled_dense_layers_are_static_before_the_prefill():
    """16/16 bits keeps every layer a stock static one: the pool initialises them outside graphs, so transformers
    marks their buffers static (a CUDA graph of the decode step may then write them in place)."""
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = zipvl_compile.compile(build_text("llama"), **dict(OPTIONS, tau=1.0, hi_bits=16, lo_bits=16))
    cache = model.zipvl_cache_pool.take(2, 30, NEW)
    assert not cache.packed_layers() and cache.layers
    for layer in cache.layers:
        assert layer.is_initialized and layer.keys.shape[:2] == (2, model.config.num_key_value_heads)
        for tensor in (layer.keys, layer.values, layer.cumulative_length):
            assert getattr(tensor, "_dynamo_static_input_type", None) is not None
    _generate(model, _ids(30, 0))  # the prefill writes into them
