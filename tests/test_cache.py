"""ZipVLCache: exactness at 16/16, recompression at the interval boundary, reuse without recompiles, bytes held."""

from __future__ import annotations

import pytest
import torch

import zipvl_compile
from zipvl_compile import ZipVLCache
from zipvl_compile.testing import VLMS, build_text, build_vlm


def _ids(n=24, batch=1, seed=0):
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _reset():
    torch._dynamo.reset()
    zipvl_compile.reset_report()


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_16_16_tau_1_tokens_identical(name):
    _reset()
    model = build_text(name)
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        zipvl_compile.compile(model, tau=1.0, hi_bits=16, lo_bits=16, inner="eager")
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
    assert zipvl_compile.report().kv_mode == "packed"


def test_compiled_packed_decode_matches_eager_cache():
    """decode_attention on the packed buffers == HF attention on the cache's dequantised dense view."""
    _reset()
    eager, compiled = build_text("qwen2"), build_text("qwen2")
    ids = _ids(40, batch=2, seed=1)
    mask = torch.ones_like(ids)  # no padding: uncompiled, padding tokens enter the cache (HF masks them later)
    zipvl_compile.compile(compiled, tau=1.0, inner="eager", recompress_interval=4)
    caches = [ZipVLCache(m, max_cache_len=60, recompress_interval=4) for m in (eager, compiled)]
    with torch.no_grad():
        outs = [
            m.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=c,
                max_new_tokens=12,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            for m, c in zip((eager, compiled), caches)
        ]
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    sites = zipvl_compile.report().sites
    assert {s.op for s in sites} == {"zipvl.attention", "zipvl.decode_attention"}
    assert all(s.dense_reason == "tau = 1 keeps every token (exact)" for s in sites if s.kind == "prefill")


@pytest.mark.parametrize("steps", [99, 100, 101, 200])
def test_recompression_at_interval_boundary(steps):
    """The tail holds decode tokens until `interval` have accumulated; the next step quantises that block."""
    model = build_text("llama")
    prompt = 30
    cache = ZipVLCache(model, max_cache_len=prompt + steps + 1, recompress_interval=100)
    token = _ids(prompt)
    with torch.no_grad():
        model(input_ids=token, past_key_values=cache)
        for _ in range(steps):
            model(input_ids=token[:, -1:], past_key_values=cache)
    flushes = (steps - 1) // 100
    for _, layer in cache.packed_layers():
        hi, lo, tail = layer.token_counts()
        assert tail == steps - 100 * flushes
        assert hi + lo == prompt + 100 * flushes
        assert int(layer.length) == prompt + steps


def test_reset_and_reuse_without_recompile():
    _reset()
    model = build_text("llama")
    zipvl_compile.compile(model, tau=0.9, inner="eager", min_keep=4, dense_below=0)
    cache = ZipVLCache(model, max_cache_len=40)
    with torch.no_grad():
        for i in range(3):
            cache.reset()
            with torch._dynamo.config.patch(error_on_recompile=i >= 2):
                model.generate(input_ids=_ids(24, seed=i), past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert len({s.graph_id for s in zipvl_compile.report().sites}) == 2  # one prefill, one decode graph


def test_kv_bytes_equal_allocated_bytes():
    _reset()
    model = build_text("qwen2")
    zipvl_compile.compile(model, tau=0.8, inner="eager", min_keep=4, dense_below=0)
    with torch.no_grad():
        model.generate(input_ids=_ids(200), max_new_tokens=6, do_sample=False)
    rep = zipvl_compile.report()
    cache_layers = rep.cache.packed_layers()
    allocated = sum(t.untyped_storage().nbytes() for _, layer in cache_layers for t in layer.buffers())
    assert rep.kv_bytes == allocated
    tokens = 200 + 5
    assert rep.kv_bytes_dense == 2 * len(cache_layers) * 2 * 4 * tokens * 16  # K+V, layers, Hkv, fp32 (the model), d
    hi_lo = [(rep.layers[i].hi_tokens, rep.layers[i].lo_tokens) for i, _ in cache_layers]
    assert all(hi > 0 and lo > 0 and hi + lo == 200 for hi, lo in hi_lo), hi_lo


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VLMS))
def test_tiny_vlms_with_packed_cache(name):
    """The ten tiny VLMs through zipvl_compile.compile: 16/16 at tau=1 exact; 4/2 runs on the packed cache."""
    for bits, exact in (((16, 16), True), ((4, 2), False)):
        _reset()
        model, inputs = build_vlm(name)
        with torch.no_grad():
            expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            zipvl_compile.compile(model, tau=1.0, hi_bits=bits[0], lo_bits=bits[1], inner="eager")
            got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert got.shape == expected.shape
        if exact:
            assert torch.equal(got, expected)
        rep = zipvl_compile.report()
        assert rep.kv_mode == "packed" and rep.kv_bytes > 0
        assert all(s.rewritten for s in rep.sites if s.kind == "prefill")
        assert all(s.rewritten or s.reason for s in rep.sites)
        if name != "mllama":  # Mllama's decode graph breaks per layer (its cross-attention cache): left alone
            assert all(s.rewritten for s in rep.sites if s.kind == "decode")


def test_simulate_mode_matches_packed_cache():
    """kv_mode="simulate" on a stock DynamicCache gives the packed cache's numerics (decode tokens unquantised
    in both while fewer than recompress_interval have been generated)."""
    ids = _ids(70, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    opts = dict(inner="eager", tau=0.8, dense_below=0, min_keep=4, n_probe_recent=8, n_probe_random=8)
    logits = []
    for mode in ("simulate", "packed"):
        _reset()
        model = build_text("qwen2")
        if mode == "simulate":
            model.forward = torch.compile(model.forward, backend="zipvl", options=dict(opts, kv_mode=mode))
            cache = None
        else:
            zipvl_compile.compile(model, **opts)
            cache = ZipVLCache(model, max_cache_len=80)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                max_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        assert zipvl_compile.report().kv_mode == mode
        logits.append(torch.stack(out.logits))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    _reset()
    dense = build_text("qwen2")
    with torch.no_grad():
        plain = dense.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert not torch.allclose(torch.stack(plain.logits), logits[0], atol=1e-3)  # the quantisation is applied


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_prefill_compacts_each_layer_once_the_next_begins(inner):
    """Peak memory: inside the prefill graph a layer's worst-case segments shrink when the next layer starts."""
    import transformers as T

    from zipvl_compile.testing import TXT

    _reset()
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**TXT, "num_hidden_layers": 4})).eval()
    reference = T.LlamaForCausalLM(model.config).eval()
    reference.load_state_dict(model.state_dict())
    ids = _ids(300)
    forward = torch.compile(
        model.forward, backend="zipvl", options={"tau": 0.9, "min_keep": 4, "dense_below": 0, "inner": inner}
    )
    caches = [ZipVLCache(m, max_cache_len=310) for m in (model, reference)]
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        forward(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=caches[0])
        reference(input_ids=ids, past_key_values=caches[1])  # uncompiled: every token to hi
    assert len({s.graph_id for s in zipvl_compile.report().sites}) == 1  # one prefill graph, no break
    layers = [layer for _, layer in caches[0].packed_layers()]
    assert [layer.compacted for layer in layers] == [True, True, True, False]
    reserve = layers[0].capacity(300) - 320
    for layer in layers[:3]:
        for seg in (layer.hi, layer.lo):
            assert seg[6].shape[1] == int(seg[7].max()) + reserve and seg[1].shape[2] == seg[6].shape[1] // 64
        hi, lo, _ = layer.token_counts()
        assert 0 < hi < 300 and hi + lo == 300
    assert layers[3].hi[6].shape[1] == layers[3].capacity(300)  # the last layer: compacted after the forward
    caches[0].compact()
    assert all(layer.compacted for layer in layers)
    eager = [layer for _, layer in caches[1].packed_layers()]
    assert all(layer.compacted for layer in eager[:3]) and eager[0].token_counts()[:2] == (300, 0)
    assert all(e.lo[6].shape[1] == reserve for e in eager[:3])  # nothing in lo: reserve only


def test_prefill_compaction_with_dynamic_lengths():
    """Prompt and cache lengths vary between generates: the prefill graph turns dynamic, compaction stays in it
    (caches given by the caller: the pool's caches are never compacted)."""
    _reset()
    model = build_text("llama")
    zipvl_compile.compile(model, tau=0.9, min_keep=4, dense_below=0, inner="eager")
    with torch.no_grad():
        for n, new in ((40, 3), (57, 6), (75, 4)):
            cache = ZipVLCache(model, max_cache_len=n + new)
            out = model.generate(input_ids=_ids(n, seed=n), past_key_values=cache, max_new_tokens=new, do_sample=False)
            assert out.shape[1] == n + new
            layers = [layer for _, layer in zipvl_compile.report().cache.packed_layers()]
            assert all(layer.compacted for layer in layers)
            hi, lo, _ = layers[0].token_counts()
            assert hi + lo == n and lo > 0
    prefill_graphs = {s.graph_id for s in zipvl_compile.report().sites if s.kind == "prefill"}
    assert len(prefill_graphs) == 2  # the first lengths, then one dynamic graph: no graph break, no more compiles


@pytest.mark.slow
def test_prefill_compaction_through_inductor():
    """The data-dependent kv_shrink inside prefill graphs compiled by Inductor (static, then dynamic lengths)."""
    _reset()
    compiled, reference = build_text("llama"), build_text("llama")
    zipvl_compile.compile(compiled, tau=0.9, min_keep=4, dense_below=0, inner="inductor")
    zipvl_compile.compile(reference, tau=0.9, min_keep=4, dense_below=0, inner="eager")
    with torch.no_grad():
        for n in (40, 57):
            ids = _ids(n, seed=n)
            want = reference.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
            cache = ZipVLCache(compiled, max_cache_len=n + 4)  # given: the pool's caches are never compacted
            got = compiled.generate(input_ids=ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
            assert torch.equal(got, want)
            assert all(layer.compacted for _, layer in zipvl_compile.report().cache.packed_layers())


@pytest.mark.parametrize("tau,dense_below", [(0.9, 10_000), (1.0, 0)])
def test_dense_prefill_allocates_exact_segments(monkeypatch, tau, dense_below):
    """The pool's caches know the selection: a prompt it runs dense (shorter than dense_below, or tau = 1) gets
    hi = prompt + reserve and lo = reserve at once, nothing is cut in the prefill graph, and the tokens and the
    bytes held are those of the worst-case allocation after its cut."""
    from zipvl_compile.runtime import ops

    shrinks = []
    real = ops.kv_shrink
    monkeypatch.setattr(ops, "kv_shrink", lambda *a, **k: shrinks.append(1) or real(*a, **k))
    ids = _ids(90, batch=2)
    outs, held = [], []
    for pooled in (True, False):
        _reset()
        model = build_text("llama")
        zipvl_compile.compile(model, tau=tau, min_keep=4, dense_below=dense_below, inner="eager")
        # not pooled: the caller's cache, no selection given: the worst case and the cut as before
        kwargs = {} if pooled else {"past_key_values": ZipVLCache(model, max_cache_len=90 + 6)}
        shrinks.clear()
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, **kwargs))
        cache = zipvl_compile.report().cache
        layers = [layer for _, layer in cache.packed_layers()]
        reserve = layers[0].plan(90).reserve
        assert all(layer.exact == pooled for layer in layers)
        if pooled:
            assert not shrinks
            assert all(layer.lo.capacity == reserve and layer.token_counts()[:2] == (90, 0) for layer in layers)
            assert all(layer.hi.capacity == layers[0].plan(90).segment_slots for layer in layers)
        else:
            assert shrinks
        held.append(cache.nbytes())
    assert torch.equal(outs[0], outs[1])
    assert held[0] == held[1]  # what the cut leaves is what the exact allocation holds


def test_exact_segment_refuses_tokens_it_cannot_hold():
    """A cache told the prefill runs dense whose write then keeps fewer tokens: an error, not a write past lo."""
    from zipvl_compile.runtime import ops
    from zipvl_compile.runtime.cache import ZipVLLayer
    from zipvl_compile.runtime.sparse import Selection

    layer = ZipVLLayer(200, 4, 2, 100, budget=200, selection=Selection(dense_below=10_000))
    k, v = torch.randn(1, 2, 130, 16), torch.randn(1, 2, 130, 16)
    layer.allocate(1, 2, 130, 16, torch.float32, torch.device("cpu"))
    assert layer.exact and layer.lo.capacity < 130
    keep = torch.ones(1, 130, dtype=torch.bool)
    keep[0, ::3] = False
    pos = torch.arange(130)[None]
    args = dict(k=k, v=v, pos=pos, hi_bits=4, lo_bits=2)
    with pytest.raises(RuntimeError, match="sized for a dense prefill"):
        ops.kv_write_(hi=list(layer.hi), lo=list(layer.lo), keep=keep, **args)
    layer.allocate(1, 2, 130, 16, torch.float32, torch.device("cpu"))
    ops.kv_write_(hi=list(layer.hi), lo=list(layer.lo), keep=torch.ones_like(keep), **args)  # all kept: fits
    assert int(layer.hi.fill.max()) == 192 and int(layer.lo.fill.max()) == 0
