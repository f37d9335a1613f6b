"""``zipvl_compile.compile``: one call that compiles a model's language model with the zipvl backend and makes
``generate`` use a :class:`ZipVLCache` (kv_mode="packed"), without touching transformers' internals."""

from __future__ import annotations

import functools
from typing import Any

import torch

from zipvl_compile.backend import zipvl_backend
from zipvl_compile.config import ZipVLConfig
from zipvl_compile.model_parts import language_model
from zipvl_compile.report import report
from zipvl_compile.runtime.cache import ZipVLCache


def compile(model: torch.nn.Module, **options: Any) -> torch.nn.Module:  # noqa: A001 - the public name
    """Compile ``model``'s language model with the zipvl backend; ``generate`` then uses a ZipVLCache.

    options: the ``ZipVLConfig`` options (validated here: a bad one raises ``ValueError`` at once), plus
    ``mode`` (e.g. "reduce-overhead" for CUDA graphs) and ``dynamic`` passed to ``torch.compile``.
    Returns the same model object.
    """
    dynamic = options.pop("dynamic", None)
    config = ZipVLConfig.from_options(options, options.pop("mode", None))
    target = language_model(model)
    backend = functools.partial(zipvl_backend, config=config)
    target.forward = _compacting(target.forward, torch.compile(target.forward, backend=backend, dynamic=dynamic))
    if config.kv_mode == "packed" and hasattr(model, "generate"):
        model.generate = _generate_with_packed_cache(model.generate, model, config)
    return model


def _compacting(original: Any, compiled: Any) -> Any:
    """``compiled``, followed by :meth:`ZipVLCache.compact` once a prefill has filled a ZipVLCache. Dynamo captures
    data-dependent output shapes during the call, so that a ZipVLCache compacts each layer inside the prefill
    graph as soon as the next one starts (peak memory: two layers at worst-case size, not all of them)."""

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            out = compiled(*args, **kwargs)
        cache = kwargs.get("past_key_values")
        if isinstance(cache, ZipVLCache):
            cache.compact()
        return out

    return forward


def _generate_with_packed_cache(generate: Any, model: torch.nn.Module, config: ZipVLConfig) -> Any:
    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            gen = kwargs.get("generation_config") or model.generation_config
            new = kwargs.get("max_new_tokens") or gen.max_new_tokens or 20
            kwargs["past_key_values"] = ZipVLCache(model, max_cache_len=ids.shape[1] + new, **config.cache_kwargs())
        out = generate(*args, **kwargs)
        report().record_cache(kwargs["past_key_values"])
        return out

    return wrapper
