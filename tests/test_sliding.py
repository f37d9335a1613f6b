"""Sliding windows declared without layer_types (Mistral, Phi3), and the other ways transformers 5.17 configs
declare a window or chunked attention (``runtime.cache.layer_kinds``)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from transformers.cache_utils import StaticSlidingWindowLayer

import zipvl_compile
from zipvl_compile import ZipVLCache
from zipvl_compile.runtime.cache import layer_kinds
from zipvl_compile.testing import TXT

CONFIGS = {
    "mistral": lambda w: T.MistralForCausalLM(T.MistralConfig(**TXT, sliding_window=w)),
    "phi3": lambda w: T.Phi3ForCausalLM(
        T.Phi3Config(**{k: v for k, v in TXT.items() if k != "head_dim"}, sliding_window=w)
    ),
}


def _build(name, window):
    torch.manual_seed(0)
    return CONFIGS[name](window).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("window", [8, 64])  # shorter and longer than the 24-token prompt
@pytest.mark.parametrize("bits", [(16, 16), (8, 8), (4, 2), (2, 2)])
def test_sliding_layers_stay_transformers_window(name, window, bits):
    """Every layer slides, so the cache keeps transformers' sliding layer in the model dtype: the tokens equal
    the uncompiled model's at every bit width (there is no full-attention layer to pack)."""
    torch._dynamo.reset()
    model, reference = _build(name, window), _build(name, window)
    cache = ZipVLCache(model, max_cache_len=40, hi_bits=bits[0], lo_bits=bits[1])
    assert all(isinstance(layer, StaticSlidingWindowLayer) for layer in cache.layers)
    zipvl_compile.compile(model, tau=1.0, hi_bits=bits[0], lo_bits=bits[1], inner="eager")
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(window))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(**kwargs), reference.generate(**kwargs))


def test_layer_kinds_forms():
    def kinds(config):
        return layer_kinds(config)

    assert kinds(T.LlamaConfig(**TXT)) == [("full_attention", None)] * 2
    assert kinds(T.MistralConfig(**TXT, sliding_window=8)) == [("sliding_attention", 8)] * 2
    qwen = T.Qwen2Config(**TXT, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert kinds(qwen) == [("full_attention", None), ("sliding_attention", 8)]
    assert kinds(T.Qwen2Config(**TXT, sliding_window=8)) == [("full_attention", None)] * 2  # use_sliding_window off
    gemma = T.Gemma3TextConfig(**TXT, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert kinds(gemma) == [("sliding_attention", 8), ("full_attention", None)]
    chunked = T.LlamaConfig(**TXT)
    chunked.attention_chunk_size = 16
    assert kinds(chunked) == [("chunked_attention", 16)] * 2
    shared = T.LlamaConfig(**TXT)
    shared.num_kv_shared_layers = 1
    assert kinds(shared) == [("full_attention", None)]
    bad = T.LlamaConfig(**TXT)
    bad.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="'linear_attention' layers"):
        kinds(bad)
    no_window = T.LlamaConfig(**TXT)
    no_window.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="no sliding_window"):
        kinds(no_window)
