"""ZipVLCache and ZipVLLayer as pytree nodes (optree and ``torch.utils._pytree``).

Children are what a layer holds (its two Segments, its Tail, its length: layout.py's NamedTuples, themselves
pytree nodes); the context is everything static (bits, interval, view length and token budget, prompt length,
whether the layer is initialised, the selection it was told; for the cache also the model it was built for). So
``torch.export``, Dynamo guards and tree utilities see the cache's buffers, and a flatten/unflatten round trip
rebuilds an equivalent cache.
"""

from __future__ import annotations

from typing import Any

import optree
import torch.utils._pytree as pytree

from zipvl_compile.runtime.cache import ZipVLCache, ZipVLLayer

_NAMESPACE = "zipvl_compile"
_LAYER_STATIC = (
    "max_cache_len",
    "budget",
    "hi_bits",
    "lo_bits",
    "interval",
    "prompt_len",
    "is_initialized",
    "compacted",
    "pooled",
    "selection",
)
_CACHE_STATIC = ("hi_bits", "lo_bits", "recompress_interval", "budget", "capacity_class", "model_key", "dense_reason")


def _flatten_layer(layer: ZipVLLayer) -> tuple[list[Any], tuple]:
    static = tuple(getattr(layer, name) for name in _LAYER_STATIC)
    return [layer.hi, layer.lo, layer.tail, layer.length], static  # Segment / Tail are pytree nodes themselves


def _unflatten_layer(static: tuple, children: list[Any]) -> ZipVLLayer:
    layer = ZipVLLayer.__new__(ZipVLLayer)
    for name, value in zip(_LAYER_STATIC, static, strict=True):
        setattr(layer, name, value)
    layer.keys = layer.values = layer.spare = None  # a rebuilt pooled layer keeps no spare segments
    layer.hi, layer.lo, layer.tail, layer.length = children
    return layer


def _flatten_cache(cache: ZipVLCache) -> tuple[list[Any], tuple]:
    return list(cache.layers), tuple(getattr(cache, name) for name in _CACHE_STATIC)


def _unflatten_cache(context: tuple, children: list[Any]) -> ZipVLCache:
    cache = ZipVLCache.__new__(ZipVLCache)
    for name, value in zip(_CACHE_STATIC, context, strict=True):
        setattr(cache, name, value)
    cache.layers, cache.layer_class_to_replicate, cache.offloading = list(children), None, False
    return cache


def _with_keys(flatten):
    def flatten_with_keys(node: Any) -> tuple[list[tuple[Any, Any]], tuple]:
        children, context = flatten(node)
        return [(pytree.SequenceKey(i), child) for i, child in enumerate(children)], context

    return flatten_with_keys


def register() -> None:
    """Register both classes with torch's pytree and optree (idempotent)."""
    for cls, flatten, unflatten in (
        (ZipVLLayer, _flatten_layer, _unflatten_layer),
        (ZipVLCache, _flatten_cache, _unflatten_cache),
    ):
        if cls not in pytree.SUPPORTED_NODES:
            pytree.register_pytree_node(
                cls,
                flatten,
                lambda children, ctx, f=unflatten: f(ctx, children),
                serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
                flatten_with_keys_fn=_with_keys(flatten),
            )
        try:
            optree.register_pytree_node(
                cls,
                lambda x, f=flatten: (*f(x), None),
                lambda ctx, children, f=unflatten: f(ctx, children),
                namespace=_NAMESPACE,
            )
        except ValueError:  # already registered in this namespace
            pass
