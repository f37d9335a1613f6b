"""Backend plumbing of CUDA graphs that runs anywhere: dead inputs dropped, the per-graph decision reported."""

from __future__ import annotations

import torch
import torch.fx as fx
from tiny_models import build_text

import zipvl_compile
from zipvl_compile.backend import _drop_unused_inputs


def test_drop_unused_inputs_keeps_the_calling_convention():
    graph = fx.Graph()
    x, _, _, y = (graph.placeholder(name) for name in ("x", "dead_mask", "dead_len", "y"))
    graph.output(graph.call_function(torch.add, (x, y)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    used = _drop_unused_inputs(gm)
    assert used == [0, 3]
    assert [node.name for node in gm.graph.nodes if node.op == "placeholder"] == ["x", "y"]
    args = (torch.ones(2), torch.zeros(5), 5, torch.full((2,), 2.0))
    torch.testing.assert_close(gm(*[args[i] for i in used]), torch.full((2,), 3.0))


def test_cudagraphs_decision_is_reported_per_graph():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = build_text("llama")
    zipvl_compile.compile(model, tau=0.9, min_keep=4, inner="eager", cudagraphs=True)
    with torch.no_grad():
        model.generate(input_ids=torch.randint(3, 500, (1, 30)), max_new_tokens=3, do_sample=False)
    graphs = zipvl_compile.report().graphs
    assert len(graphs) == 2 and all(g["cudagraphs"] is False for g in graphs)  # no CUDA device / eager inner
    assert "CUDA graphs" not in str(zipvl_compile.report())
