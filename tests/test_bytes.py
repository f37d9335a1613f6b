"""Byte accounting of the packed cache: what it reports is what it holds, and what it holds follows its tokens.

SmolLM2-135M's KV shapes (3 KV heads, head dim 64) on two layers (a fraction does not depend on the layer
count), fp32 as the demo runs on a CPU, 4/2 bits. Uncompiled, every prompt token is stored at 4 bits (the
worst case of the bit split); compiled (``zipvl_compile.compile``, the demo's tau), ``generate`` takes a pooled
cache, whose segments keep what the call needs instead of the prefill's worst case.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import zipvl_compile
from zipvl_compile import ZipVLCache
from zipvl_compile.runtime.cache import Plan, size_class
from zipvl_compile.testing import TXT, build_vlm

SMOL = dict(
    TXT, hidden_size=192, num_attention_heads=3, num_key_value_heads=3, head_dim=64, max_position_embeddings=4096
)
COMPILED = dict(tau=0.975, hi_bits=4, lo_bits=2, inner="eager")  # the demo's tau and bits
BOUNDS = [(1, 330, 0.35), (2, 330, 0.35), (1, 2048, 0.25)]  # the demo's prompt, two of them, a long one


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):  # Segment, Tail and the spare segments are tuples
        return [t for item in value for t in _tensors(item)]
    return []


def _held(cache: ZipVLCache) -> int:
    """Bytes of every storage the cache's layers hold, found independently of ``ZipVLCache.nbytes``: every
    attribute, structures included, each storage once."""
    storages = {}
    for layer in cache.layers:
        for value in vars(layer).values():
            for t in _tensors(value):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _generate(model: torch.nn.Module, batch: int, n: int, new: int, cache: ZipVLCache | None = None) -> None:
    ids = torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=new,
            do_sample=False,
            min_new_tokens=new,
        )


def _fraction(cache: ZipVLCache, batch: int, n: int, new: int, dtype: torch.dtype = torch.float32) -> float:
    assert cache.nbytes() == _held(cache)
    assert cache.nbytes_dense() == 2 * len(cache.layers) * batch * 3 * (n + new - 1) * 64 * dtype.itemsize
    return cache.nbytes() / cache.nbytes_dense()


def _uncompiled(model: torch.nn.Module, batch: int, n: int, new: int) -> tuple[float, ZipVLCache]:
    cache = ZipVLCache.for_prompt(model, batch, n, new)
    _generate(model, batch, n, new, cache)
    return _fraction(cache, batch, n, new), cache


def _compiled(batch: int, n: int, new: int) -> tuple[float, ZipVLCache]:
    """A fresh compiled SmolLM2-shaped model's first generate call: the pooled cache it took, after the call."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = zipvl_compile.compile(T.LlamaForCausalLM(T.LlamaConfig(**SMOL)).eval(), **COMPILED)
    _generate(model, batch, n, new)
    (cache,) = model.zipvl_cache_pool.caches.values()
    assert all(layer.pooled for _, layer in cache.packed_layers())
    return _fraction(cache, batch, n, new), cache


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**SMOL)).eval()


@pytest.mark.parametrize(("batch", "n", "bound"), BOUNDS)
def test_packed_bytes_follow_the_tokens(smol, batch, n, bound):
    fraction, cache = _uncompiled(smol, batch, n, 64)
    print(f"batch {batch}, {n} + 64 tokens: {fraction:.1%} of the fp32 dense cache")
    assert fraction <= bound
    assert cache.dense_reason is None and cache.packed_layers()


@pytest.mark.parametrize(("batch", "n", "bound"), BOUNDS)
def test_pooled_bytes_follow_the_tokens(batch, n, bound):
    fraction, cache = _compiled(batch, n, 64)
    print(f"compiled, batch {batch}, {n} + 64 tokens: {fraction:.1%} of the fp32 dense cache")
    assert fraction <= bound
    assert cache.dense_reason is None and cache.packed_layers()
    plan = Plan.of(n, n + 64, 100)
    for _, layer in cache.packed_layers():  # what the prefill filled, not its worst case
        hi, lo, _ = layer.token_counts()
        assert hi + lo == n and layer.hi.capacity + layer.lo.capacity < 2 * plan.segment_slots
        assert layer.spare is None


@pytest.mark.parametrize("n", [1, 3, 17, 60])
def test_never_more_than_dense(smol, n):
    fraction, cache = _uncompiled(smol, 1, n, 8)
    assert fraction <= 1.0, (n, fraction, cache.dense_reason)


@pytest.mark.parametrize("n", [1, 17, 60])
def test_pooled_never_more_than_dense(n):
    fraction, cache = _compiled(1, n, 8)
    assert fraction <= 1.0, (n, fraction, cache.dense_reason)


@pytest.mark.parametrize("compiled", [False, True])
def test_tiny_vlm_never_more_than_dense(compiled):
    torch._dynamo.reset()
    model, inputs = build_vlm("llava")
    cache = None if compiled else ZipVLCache.for_prompt(model, 1, inputs["input_ids"].shape[1], 64)
    if compiled:
        zipvl_compile.compile(model, **COMPILED)
    with torch.no_grad():
        model.generate(**inputs, past_key_values=cache, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    if compiled:
        (cache,) = model.zipvl_cache_pool.caches.values()
    assert cache.nbytes() == _held(cache) and cache.nbytes() <= cache.nbytes_dense()


def test_plan_sizes_reserves_by_need():
    assert Plan.of(330, 394, 100) == Plan(prompt_slots=384, reserve=0, tail_slots=64)  # no block will recompress
    assert Plan.of(30, 131, 100) == Plan(384 - 320, 128, 100)  # 101 tokens to come: one block of 100
    assert Plan.of(30, 130, 100).reserve == 0  # 100 to come: the tail holds them all
    assert Plan.of(5, 6, 100).tail_slots == 16


def test_pooled_slots():
    plan = Plan.of(8000, 8100, 100)  # 8000 slots per segment during the prefill
    assert [plan.pooled_slots(need) for need in (0, 64, 320, 1024, 1088, 1920, 8000)] == [
        *(0, 64, 320, 1024),  # whole groups up to 1024 slots ...
        *(1152, 1920),  # ... then multiples of 1/16 of the next power of two ...
        8000,  # ... but never more than the prefill's segments (not 8192)
    ]
    assert Plan.of(1060, 1070, 100).pooled_slots(1088) == 1088


def test_size_classes():
    assert [size_class(n) for n in (1, 150, 256, 257, 4096, 4097, 9000)] == [256, 256, 256, 512, 4096, 4608, 9216]
    for n in range(1, 20000, 37):
        assert n <= size_class(n) <= max(n + 255, n * 1.125)
