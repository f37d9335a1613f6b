"""The ``zipvl`` Dynamo backend: options -> passes on the FX graph -> the inner compiler."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from zipvl_compile.config import ZipVLConfig
from zipvl_compile.passes.pass_manager import run_passes

log = logging.getLogger("zipvl_compile")

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def zipvl_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                  options: Mapping[str, Any] | None = None) -> Callable:
    """Dynamo backend entry point (``torch.compile(..., backend="zipvl", options={...})``)."""
    if mode not in _MODES:
        raise ValueError(f"zipvl: invalid mode {mode!r}; allowed: {_MODES}")
    config = ZipVLConfig.from_options(options)
    if mode == "reduce-overhead":
        config = config.replace(cudagraphs=True)
    run_passes(gm, config)
    return _inner_compile(gm, list(example_inputs), config)


def _inner_compile(gm: fx.GraphModule, example_inputs: list, config: ZipVLConfig) -> Callable:
    if config.inner == "eager":
        return gm.forward
    if config.inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = {"triton.cudagraphs": True} if config.cudagraphs and torch.cuda.is_available() else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def register() -> None:
    """Register ``zipvl`` with Dynamo unless the entry point already did (design.md §8.4)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "zipvl" not in _BACKENDS:
        register_backend(zipvl_backend, name="zipvl")
