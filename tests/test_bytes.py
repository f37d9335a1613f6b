"""Byte accounting of the packed cache: what it reports is what it holds, and what it holds follows its tokens.

SmolLM2-135M's KV shapes (3 KV heads, head dim 64) on two layers (a fraction does not depend on the layer
count), fp32 as the demo runs on a CPU, 4/2 bits; uncompiled, so every prompt token is stored at 4 bits (the
worst case of the bit split).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from zipvl_compile import ZipVLCache
from zipvl_compile.runtime.cache import Plan, size_class
from zipvl_compile.runtime.layout import nbytes
from zipvl_compile.testing import TXT, build_vlm

SMOL = dict(
    TXT, hidden_size=192, num_attention_heads=3, num_key_value_heads=3, head_dim=64, max_position_embeddings=4096
)


def _held(cache: ZipVLCache) -> int:
    """Bytes of every tensor the cache's layers hold, found independently of ``ZipVLCache.nbytes``."""
    tensors = []
    for layer in cache.layers:
        tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        for part in ("hi", "lo", "tail"):
            tensors += list(getattr(layer, part, None) or ())
    return nbytes(tensors)


def _fraction(model, batch: int, n: int, new: int, dtype=torch.float32) -> tuple[float, ZipVLCache]:
    model = model.to(dtype)
    ids = torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(n))
    cache = ZipVLCache.for_prompt(model, batch, n, new)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=new,
            do_sample=False,
            min_new_tokens=new,
        )
    assert cache.nbytes() == _held(cache)
    assert cache.nbytes_dense() == 2 * len(cache.layers) * batch * 3 * (n + new - 1) * 64 * dtype.itemsize
    return cache.nbytes() / cache.nbytes_dense(), cache


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**SMOL)).eval()


@pytest.mark.parametrize(("batch", "n", "bound"), [(1, 330, 0.35), (2, 330, 0.35), (1, 2048, 0.25)])
def test_packed_bytes_follow_the_tokens(smol, batch, n, bound):
    fraction, cache = _fraction(smol, batch, n, 64)
    print(f"batch {batch}, {n} + 64 tokens: {fraction:.1%} of the fp32 dense cache")
    assert fraction <= bound
    assert cache.dense_reason is None and cache.packed_layers()


@pytest.mark.parametrize("n", [1, 3, 17, 60])
def test_never_more_than_dense(smol, n):
    fraction, cache = _fraction(smol, 1, n, 8)
    assert fraction <= 1.0, (n, fraction, cache.dense_reason)


def test_tiny_vlm_never_more_than_dense():
    model, inputs = build_vlm("llava")
    cache = ZipVLCache.for_prompt(model, 1, inputs["input_ids"].shape[1], 64)
    with torch.no_grad():
        model.generate(**inputs, past_key_values=cache, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert cache.nbytes() == _held(cache) and cache.nbytes() <= cache.nbytes_dense()


def test_plan_sizes_reserves_by_need():
    assert Plan.of(330, 394, 100) == Plan(prompt_slots=384, reserve=0, tail_slots=64)  # no block will recompress
    assert Plan.of(30, 131, 100) == Plan(384 - 320, 128, 100)  # 101 tokens to come: one block of 100
    assert Plan.of(30, 130, 100).reserve == 0  # 100 to come: the tail holds them all
    assert Plan.of(5, 6, 100).tail_slots == 16


def test_size_classes():
    assert [size_class(n) for n in (1, 150, 256, 257, 4096, 4097, 9000)] == [256, 256, 256, 512, 4096, 4608, 9216]
    for n in range(1, 20000, 37):
        assert n <= size_class(n) <= max(n + 255, n * 1.125)
