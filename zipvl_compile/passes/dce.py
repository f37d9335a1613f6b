"""Dead-code elimination that never removes in-place or mutating ops (docs/architecture.md, traps).

``Graph.eliminate_dead_code()`` with its default purity test deletes, on Dynamo IR, in-place KV writes
(``index_copy_``, ``add_``) and mutating custom ops recorded as ``OpOverloadPacket`` targets; here it is given
:func:`fx_util.is_impure` instead.
"""

from __future__ import annotations

import torch.fx as fx

from zipvl_compile.passes.fx_util import is_impure


def safe_dce(gm: fx.GraphModule) -> int:
    """Remove pure nodes without users; returns how many were removed."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    return before - len(gm.graph.nodes)
