"""bench.peers on tiny random models: byte counting of the peers' caches, and kvpress run through press_context."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, QuantizedCache

from bench import peers
from zipvl_compile.testing import build_text


def _ids(n: int = 128) -> torch.Tensor:
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(0))


def _fill(model: torch.nn.Module, cache: object, n: int = 128) -> object:
    with torch.no_grad():
        model(input_ids=_ids(n), past_key_values=cache, logits_to_keep=1)
    return cache


def test_dense_cache_bytes_and_bf16_accounting():
    model = build_text("llama")  # 2 layers, 2 KV heads x 16, fp32
    cache = _fill(model, DynamicCache(config=model.config))
    assert peers.cache_nbytes(cache) == 2 * 2 * 2 * 128 * 16 * 4
    assert peers.cache_nbytes(cache, as_bf16=True) == 2 * 2 * 2 * 128 * 16 * 2


@pytest.mark.parametrize(
    "backend, nbits, axes",
    [("quanto", 4, {}), ("quanto", 2, {"axis_key": -1}), ("hqq", 4, {"axis_key": 1, "axis_value": 1})],
)
def test_quantized_cache_counts_packed_codes_and_scales(backend, nbits, axes):
    pytest.importorskip({"quanto": "optimum.quanto", "hqq": "hqq"}[backend])
    model = build_text("llama")
    cache = _fill(model, QuantizedCache(backend=backend, config=model.config, nbits=nbits, **axes))
    elements = 2 * 2 * 2 * 128 * 16  # K and V, layers, heads, tokens, head_dim
    codes = elements * nbits // 8
    groups = elements // 64  # one scale and one zero point (fp32 at most) per group of 64
    held = peers.cache_nbytes(cache)
    assert codes + 2 * groups * 2 <= held <= codes + 2 * groups * 4 + 1024  # packed, scales counted, no fp32 copy


def test_press_context_runs_kvpress_and_evicts():
    kvpress = pytest.importorskip("kvpress")
    model = build_text("llama")
    ids = _ids(72)
    dense = peers.run(model, ids, 64, None)
    same = peers.run(model, ids, 64, None, prefill_context=peers.press_context(kvpress.KnormPress(0.0), model))
    assert same["nll"] == pytest.approx(dense["nll"], rel=1e-5)
    half = peers.run(model, ids, 64, None, prefill_context=peers.press_context(kvpress.KnormPress(0.5), model))
    assert half["cache"].get_seq_length() == 32 + 7  # half the prompt, then the 7 decode steps


def test_press_context_leaves_sliding_layers_alone():
    kvpress = pytest.importorskip("kvpress")
    model = build_text("gemma3")  # layer 0 sliding (window 8), layer 1 full attention
    stock = _fill(model, DynamicCache(config=model.config), 64)
    cache = DynamicCache(config=model.config)
    with peers.press_context(kvpress.KnormPress(0.5), model):
        _fill(model, cache, 64)
    assert cache.layers[1].keys.shape[2] == 32
    assert torch.equal(cache.layers[0].keys, stock.layers[0].keys)
