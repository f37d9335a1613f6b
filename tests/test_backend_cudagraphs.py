"""Backend plumbing of CUDA graphs that runs anywhere: dead inputs dropped, the per-graph decision reported."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import zipvl_compile
from zipvl_compile.backend import _drop_unused_inputs, _use_cudagraphs
from zipvl_compile.config import ZipVLConfig
from zipvl_compile.passes.site import AttentionSite
from zipvl_compile.report import CompileReport
from zipvl_compile.testing import build_text


def test_drop_unused_inputs_keeps_the_calling_convention():
    graph = fx.Graph()
    x, _, _, y = (graph.placeholder(name) for name in ("x", "dead_mask", "dead_len", "y"))
    graph.output(graph.call_function(torch.add, (x, y)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    pruned, used = _drop_unused_inputs(gm)
    assert used == [0, 3]
    assert [node.name for node in pruned.graph.nodes if node.op == "placeholder"] == ["x", "y"]
    assert len([node for node in gm.graph.nodes if node.op == "placeholder"]) == 4  # Dynamo's graph untouched
    args = (torch.ones(2), torch.zeros(5), 5, torch.full((2,), 2.0))
    torch.testing.assert_close(pruned(*[args[i] for i in used]), torch.full((2,), 3.0))


def test_cudagraphs_decision_is_reported_per_graph():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = build_text("llama")
    zipvl_compile.compile(model, tau=0.9, min_keep=4, inner="eager", cudagraphs=True)
    with torch.no_grad():
        model.generate(input_ids=torch.randint(3, 500, (1, 200)), max_new_tokens=3, do_sample=False)
    graphs = zipvl_compile.report().graphs
    assert len(graphs) == 2 and all(g.cudagraphs is False for g in graphs)  # no CUDA device / eager inner
    assert "CUDA graphs" not in str(zipvl_compile.report())


def test_pruned_dynamo_graph_keeps_static_input_metadata():
    """AOTAutograd finds the static inputs (the cache buffers CUDA graphs may mutate) of the pruned copy."""
    from torch._functorch._aot_autograd.frontend_utils import _try_get_metadata_from_dynamo

    seen = {}

    def backend(gm, example_inputs):
        add = next(n for n in gm.graph.nodes if n.target in (torch.add, operator.add))
        total = add.args[1]  # dead.sum()
        add.replace_all_uses_with(add.args[0])  # what a rewrite does: the second input's only use goes away
        gm.graph.erase_node(add)
        gm.graph.erase_node(total)
        seen["original"] = _try_get_metadata_from_dynamo(gm, {}.keys(), len(example_inputs), [])[1]
        seen["pruned"], seen["used"] = _drop_unused_inputs(gm)
        return gm.forward

    def f(cache, dead, x):
        cache.add_(1)
        return x * 2 + dead.sum()

    torch._dynamo.reset()
    cache, dead, x = torch.zeros(4), torch.ones(3), torch.ones(4)
    torch._dynamo.mark_static_address(cache)
    torch.compile(f, backend=backend)(cache, dead, x)
    pruned, used = seen["pruned"], seen["used"]
    placeholders = [n.name for n in pruned.graph.nodes if n.op == "placeholder"]
    assert len(used) == len(placeholders) == 2 and "dead" not in " ".join(placeholders)
    static = _try_get_metadata_from_dynamo(pruned, {}.keys(), len(used), [])[1]
    assert seen["original"] == [0] and static == [0]  # the cache, still found static


def test_cudagraphs_never_for_a_cache_grown_by_concatenation(monkeypatch):
    """A DynamicCache step keeps its concatenated K/V for the next step: a replay would overwrite them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = ZipVLConfig.from_options({"cudagraphs": True, "inner": "inductor"}, None)
    node = fx.Graph().placeholder("x")
    decided = {}
    for kv_write in ("zipvl", "static_index_copy", "dynamic_cat"):
        site = AttentionSite(node, "sdpa", node, node, node, None, True, None, kind="decode", kv_write=kv_write)
        record = CompileReport().new_graph(1, {})
        decided[kv_write] = _use_cudagraphs([site], config, record), record.cudagraphs
    assert decided == {"zipvl": (True, True), "static_index_copy": (True, True), "dynamic_cat": (False, False)}
