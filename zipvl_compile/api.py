"""``zipvl_compile.compile``: one call that compiles a model's language model with the zipvl backend and makes
``generate`` use a :class:`ZipVLCache` (kv_mode="packed"), without touching transformers' internals.

The compiled model owns a pool of caches (:class:`CachePool`), one per batch size and size class
(:func:`~zipvl_compile.runtime.cache.size_class`), so that ``generate`` calls of one class reuse the same
buffers and the same compiled graphs; and its own compile report (``model.zipvl_report``).
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import torch

from zipvl_compile.backend import zipvl_backend
from zipvl_compile.config import ZipVLConfig
from zipvl_compile.model_parts import language_model
from zipvl_compile.report import CompileReport, recording_to
from zipvl_compile.runtime.cache import ZipVLCache, model_key, size_class

POOL_SIZE = 4  # caches a compiled model keeps between generate calls (least recently used dropped first)


def compile(model: torch.nn.Module, **options: Any) -> torch.nn.Module:  # noqa: A001 - the public name
    """Compile ``model``'s language model with the zipvl backend; ``generate`` then uses a ZipVLCache.

    options: the ``ZipVLConfig`` options (validated here: a bad one raises ``ValueError`` at once), plus
    ``mode`` (e.g. "reduce-overhead" for CUDA graphs) and ``dynamic`` passed to ``torch.compile``.
    Returns the same model object, with its compile report as ``model.zipvl_report``. Compiling a model again
    with the same options does nothing; with other options it raises ``ValueError``.
    """
    dynamic = options.pop("dynamic", None)
    config = ZipVLConfig.from_options(options, options.pop("mode", None))
    bound = getattr(model, "_zipvl_options", None)
    if bound is not None:
        if bound == (config, dynamic):
            return model
        raise ValueError(f"zipvl: this model is already compiled with other options ({_changed(bound[0], config)})")
    target = language_model(model)
    text = model.config.get_text_config(decoder=True)
    layers = getattr(text, "num_hidden_layers", None)
    outside = [i for i in config.dense_layers if layers is not None and i >= layers]
    if outside:
        raise ValueError(
            f"zipvl: invalid option dense_layers={list(config.dense_layers)!r}; the model has {layers} decoder "
            f"layers (0..{layers - 1}), not {outside}"
        )
    own = CompileReport(model=type(model).__name__)
    backend = functools.partial(zipvl_backend, config=config)
    compiled = torch.compile(target.forward, backend=backend, dynamic=dynamic)
    target.forward = _compacting(target.forward, compiled, own)
    if config.kv_mode == "packed" and hasattr(model, "generate"):
        model.zipvl_cache_pool = CachePool(model, config)
        model.generate = _generate_with_packed_cache(model.generate, model, model.zipvl_cache_pool, own)
    model.zipvl_report = own
    model._zipvl_options = (config, dynamic)
    return model


def _changed(old: ZipVLConfig, new: ZipVLConfig) -> str:
    diff = [f"{k}: {getattr(old, k)!r} -> {getattr(new, k)!r}" for k in vars(old) if getattr(old, k) != getattr(new, k)]
    return ", ".join(diff) or "dynamic"


def _compacting(original: Any, compiled: Any, own: CompileReport) -> Any:
    """``compiled``, recording into ``own``, followed by :meth:`ZipVLCache.compact` once a prefill has filled a
    ZipVLCache. Dynamo captures data-dependent output shapes during the call, so that a ZipVLCache compacts
    each layer inside the prefill graph as soon as the next one starts (peak memory: two layers at worst-case
    size, not all of them)."""

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with recording_to(own), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            out = compiled(*args, **kwargs)
        cache = kwargs.get("past_key_values")
        if isinstance(cache, ZipVLCache):
            cache.compact()
        return out

    return forward


class CachePool:
    """The caches ``generate`` gets when the caller gives none: one per (batch, size class of prompt + new
    tokens, packed or not), reset and reused by later calls of the same key, at most :data:`POOL_SIZE` kept.

    Reuse keeps every buffer: static and sliding layers zero theirs, packed layers (``pooled=True``) empty theirs
    in place and compact the next prefill into them when they have room (:meth:`ZipVLLayer.compact`), else
    reallocate once, larger. So calls of a key decode from the same tensors: no recompile, and CUDA graphs
    record once per key and buffer size. Cost: a packed segment holds the most any call of its key has needed
    (:meth:`~zipvl_compile.runtime.cache.Plan.pooled_slots`), and each prefill allocates its worst-case
    segments for the time of the forward.
    """

    def __init__(self, model: torch.nn.Module, config: ZipVLConfig) -> None:
        self.model, self.options = model, config.cache_kwargs()
        self.caches: collections.OrderedDict[tuple, ZipVLCache] = collections.OrderedDict()

    def take(self, batch: int, prompt_len: int, max_new_tokens: int) -> ZipVLCache:
        fresh = ZipVLCache.for_prompt(self.model, batch, prompt_len, max_new_tokens, **self.options, pooled=True)
        key = (batch, size_class(prompt_len + max_new_tokens), fresh.dense_reason is None)
        cache = self.caches.pop(key, None)
        if cache is None:
            cache = fresh
        else:
            cache.reset()
            cache.set_budget(prompt_len + max_new_tokens)
        weight = next(language_model(self.model).parameters())
        cache.prepare(batch, prompt_len, weight.dtype, weight.device)
        self.caches[key] = cache
        while len(self.caches) > POOL_SIZE:
            self.caches.popitem(last=False)
        return cache


def _generate_with_packed_cache(generate: Any, model: torch.nn.Module, pool: CachePool, own: CompileReport) -> Any:
    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        gen = kwargs.get("generation_config") or model.generation_config
        new = kwargs.get("max_new_tokens") or gen.max_new_tokens or 20
        cache = kwargs.get("past_key_values")
        if ids is not None:
            check_inputs(model, ids, kwargs.get("attention_mask"), new, cache)
        if cache is None and kwargs.get("use_cache", True) and ids is not None:
            cache = kwargs["past_key_values"] = pool.take(ids.shape[0], ids.shape[1], new)
        out = generate(*args, **kwargs)
        if cache is not None:
            own.record_cache(cache)
        return out

    return wrapper


def check_inputs(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int, cache: object
) -> None:
    """Raise ``ValueError`` naming the problem for inputs ``generate`` cannot serve correctly: an empty prompt, a
    row that is all padding, prompt + new tokens beyond the model's context, a ZipVLCache built for another
    model or too short for the prompt and the new tokens. ids: int64 ``[B, n]`` (or embeddings ``[B, n, h]``)."""
    batch, n = ids.shape[:2]
    if batch == 0 or n == 0:
        raise ValueError(f"zipvl: empty prompt (input shape {tuple(ids.shape)}): give at least one token per row")
    if mask is not None:
        empty = (mask.reshape(batch, -1).sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"zipvl: prompt row(s) {empty} are all padding (attention_mask is 0 everywhere)")
    text = model.config.get_text_config(decoder=True)
    context = getattr(text, "max_position_embeddings", None)
    if context is not None and n + max_new_tokens > context:
        raise ValueError(
            f"zipvl: the prompt is {n} tokens; with max_new_tokens={max_new_tokens} that is more than the "
            f"model's context of {context} tokens"
        )
    if isinstance(cache, ZipVLCache):
        if cache.model_key != model_key(text):
            raise ValueError(
                f"zipvl: the ZipVLCache was built for another model ({cache.model_key}, this one is {model_key(text)})"
            )
        if n + max_new_tokens > cache.budget:
            raise ValueError(
                f"zipvl: the ZipVLCache holds max_cache_len={cache.budget} tokens, the prompt ({n}) and "
                f"max_new_tokens ({max_new_tokens}) need {n + max_new_tokens}"
            )
