"""safe_dce keeps in-place and mutating ops that Graph.eliminate_dead_code would drop
(docs/architecture.md §11, trap 1)."""

import operator

import torch
import torch.fx as fx

from zipvl_compile.passes.dce import safe_dce
from zipvl_compile.passes.fx_util import is_impure


@torch.library.custom_op("zipvl_test::bump_", mutates_args=("buf",))
def bump_(buf: torch.Tensor) -> None:
    buf.add_(1)


def _graph():
    g = fx.Graph()
    buf, k, pos = g.placeholder("buf"), g.placeholder("k"), g.placeholder("pos")
    nodes = {
        "index_copy_": g.call_method("index_copy_", (buf, 2, pos, k)),
        "add_": g.call_method("add_", (buf, 1)),
        "setitem": g.call_function(operator.setitem, (buf, 0, k)),
        "packet": g.call_function(torch.ops.zipvl_test.bump_, (buf,)),
        "overload": g.call_function(torch.ops.zipvl_test.bump_.default, (buf,)),
        "dead_pure": g.call_function(torch.sin, (k,)),
        "dead_and": g.call_function(operator.and_, (k, k)),  # a mask term HF builds: pure, despite its name
        "dead_or": g.call_function(operator.or_, (k, k)),
        "dead_iand": g.call_function(operator.iand, (buf, k)),  # in place: kept
    }
    g.output(k)
    return fx.GraphModule(torch.nn.Module(), g), nodes


def test_safe_dce_keeps_mutations_and_drops_pure_dead_code():
    gm, nodes = _graph()
    assert safe_dce(gm) == 3
    left = set(gm.graph.nodes)
    assert not {nodes["dead_pure"], nodes["dead_and"], nodes["dead_or"]} & left
    for name in ("index_copy_", "add_", "setitem", "packet", "overload", "dead_iand"):
        assert nodes[name] in left, name
        assert is_impure(nodes[name]), name
