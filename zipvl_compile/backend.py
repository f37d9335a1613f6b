"""The ``zipvl`` Dynamo backend: options -> passes on the FX graph -> the inner compiler."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from zipvl_compile.config import ZipVLConfig
from zipvl_compile.logs import LOG_NAME
from zipvl_compile.passes.pass_manager import run_passes
from zipvl_compile.passes.site import AttentionSite
from zipvl_compile.report import GraphRecord, report
from zipvl_compile.runtime import ops

log = logging.getLogger(LOG_NAME)


def zipvl_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
    config: ZipVLConfig | None = None,
) -> Callable:
    """Dynamo backend entry point (``torch.compile(..., backend="zipvl", options={...})``).

    ``config``: options already validated (``zipvl_compile.compile`` binds it); otherwise ``options`` and
    ``mode`` are validated here.
    """
    config = config or ZipVLConfig.from_options(options, mode)
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    config = dataclasses.replace(config, inner=config.inner_for("cuda" if on_cuda else "cpu"))
    record = report().new_graph(len(gm.graph.nodes), config.summary())
    sites = run_passes(gm, config, record)
    return _inner_compile(gm, list(example_inputs), config, _use_cudagraphs(sites, config, record))


def _use_cudagraphs(sites: Sequence[AttentionSite], config: ZipVLConfig, record: GraphRecord) -> bool:
    """Whether this graph runs under CUDA graphs (option ``cudagraphs`` / mode="reduce-overhead"); recorded per
    graph in the report. Never for a prefill graph: it runs once per prompt at a new length, its kept-token
    attention calls library kernels on data-dependent sizes, and a capture would pin its activations. Nor for a
    step whose KV cache grows by concatenation (a DynamicCache): the grown K/V are outputs the cache keeps for the
    next step, which the next replay would overwrite in the graph's memory pool."""
    if not config.cudagraphs:
        return False
    reason = (
        "no CUDA device"
        if not torch.cuda.is_available()
        else f"inner compiler {config.inner!r}"
        if config.inner != "inductor"
        else "prefill graph"
        if any(s.kind == "prefill" for s in sites)
        else "KV cache grown by concatenation (DynamicCache)"
        if any(s.kv_write == "dynamic_cat" for s in sites)
        else None
    )
    record.cudagraphs = reason is None
    if reason is not None:
        log.info("graph %d: CUDA graphs off: %s", record.graph_id, reason)
    return reason is None


def _inner_compile(gm: fx.GraphModule, example_inputs: list, config: ZipVLConfig, cudagraphs: bool) -> Callable:
    if config.inner == "eager":
        return _call_bodies(gm).forward
    if config.inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    if not cudagraphs:
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": False})
    pruned, used = _drop_unused_inputs(gm)
    compiled = compile_fx(pruned, [example_inputs[i] for i in used], config_patches={"triton.cudagraphs": True})
    return compiled if pruned is gm else lambda *args: compiled(*[args[i] for i in used])


def _call_bodies(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (same submodules, own graph) that calls every zipvl op as its Python body
    (``ops.BODIES``), for the eager inner compiler: the same computation without the dispatcher's round trip
    (~0.1 ms per call on a CPU, three calls per layer and decode step). Dynamo's graph keeps the ops (what the
    report and its readers see); other inner compilers keep them too: Inductor lowers or calls them itself."""
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in ops.BODIES:
            node.target = ops.BODIES[node.target]
    return fx.GraphModule(gm, graph)


def _drop_unused_inputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int]]:
    """A copy of ``gm`` (same submodules, own graph) without the placeholders nothing reads (after the rewrite,
    e.g. a decode step's padding mask and its length), and the indices of the inputs it keeps. CUDA graph trees
    record one graph per distinct value of the integer inputs: a dead, growing mask length would otherwise
    record a new graph at every decode step. Dynamo's own graph keeps its calling convention; when every input
    is read, ``gm`` itself is returned."""
    if all(node.users for node in gm.graph.find_nodes(op="placeholder")):
        return gm, list(range(len(gm.graph.find_nodes(op="placeholder"))))
    graph = copy.deepcopy(gm.graph)
    used = []
    for i, (old, node) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder"))):
        if node.users:
            used.append(i)
            if hasattr(old, "_dynamo_source"):  # what AOTAutograd reads to find static inputs (cache buffers)
                node._dynamo_source = old._dynamo_source
        else:
            graph.erase_node(node)
    pruned = fx.GraphModule(gm, graph)
    pruned.meta.update(gm.meta)  # "dynamo_compile_id": marks a Dynamo graph
    if hasattr(gm, "_param_name_to_source"):
        pruned._param_name_to_source = gm._param_name_to_source
    return pruned, used


def register() -> None:
    """Register ``zipvl`` with Dynamo unless the entry point already did (registering twice fails:
    docs/architecture.md, traps)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "zipvl" not in _BACKENDS:
        register_backend(zipvl_backend, name="zipvl")
