"""Dead-code elimination that never removes in-place or mutating ops (design.md §8.1).

``Graph.eliminate_dead_code()`` on Dynamo IR deletes in-place KV writes (``index_copy_``, ``add_``) and
mutating custom ops recorded as ``OpOverloadPacket`` targets; this one asks :func:`fx_util.is_impure`.
"""

from __future__ import annotations

import torch.fx as fx

from zipvl_compile.passes.fx_util import is_impure


def safe_dce(gm: fx.GraphModule) -> int:
    """Remove pure nodes without users, last to first; returns how many were removed."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not is_impure(node):
            gm.graph.erase_node(node)
            removed += 1
    return removed
