"""Tensor-parallel detection: does this attention site hold only a shard of the query heads, and on which group?

Signal (per site, read from the FX graph alone): the query heads come from a linear projection whose weight is
a DTensor sharded on its output features (``Shard(0)`` of a ``[out, in]`` weight), or from a DTensor activation
sharded on its last (feature) dimension, over a 1-D device mesh of more than one rank. That is what Hugging
Face's ``tp_plan`` produces (``colwise`` q_proj: the weight parameter is a DTensor, its ``to_local()`` feeds
``F.linear``) and what ``torch.distributed.tensor.parallel.ColwiseParallel`` produces (a DTensor output
``to_local()``-ed). The search walks from q towards the graph inputs and stops at the first DTensor on each
path and at every linear (only its weight is inspected), so earlier layers never count. A gathered output
(``colwise_rep``: a replicated DTensor activation between the projection and q) means every rank holds every
head: no reduction is needed, and none is emitted. Replicated parameters (e.g. a per-head norm's weight) are
neutral. A projection that is not ``F.linear`` (e.g. GPT-2's ``addmm`` Conv1D) is not recognised: None.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F

from zipvl_compile.passes.fx_util import example, is_function

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_LINEAR = (F.linear, torch._C._nn.linear)
_MAX_VISITED = 256  # nodes between q and its projection (RoPE, norms, views): a few dozen in practice


def tensor_parallel_group(q: fx.Node) -> str | None:
    """Name of the process group over which the query heads of ``q`` are sharded, None when they are not.

    ``q``: the site's query node, [B, Hq_local, L, d]. The name is what ``torch.ops._c10d_functional``
    collectives take. None without an initialised default process group, when no DTensor is found between
    q and its projection, when the paths disagree, or when the mesh has one rank or several dimensions.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    verdicts = set(_shard_verdicts(q))
    if len(verdicts) != 1:
        return None
    mesh, sharded = verdicts.pop()
    if not sharded or mesh.ndim != 1 or mesh.size() < 2:
        return None
    return mesh.get_group().group_name


def _shard_verdicts(q: fx.Node) -> Iterator[tuple[DeviceMesh, bool]]:
    """Yield (mesh, heads sharded?) for the first DTensor on each path from ``q`` back to its projection."""
    queue: deque[tuple[fx.Node, bool]] = deque([(q, False)])
    seen: set[fx.Node] = set()
    while queue and len(seen) < _MAX_VISITED:
        node, is_weight = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        value = example(node)
        if _is_dtensor(value):
            feature_dim = value.ndim - 2 if is_weight else value.ndim - 1
            sharded = any(getattr(p, "dim", None) in (feature_dim, feature_dim - value.ndim) for p in value.placements)
            if sharded or node.op not in ("placeholder", "get_attr"):  # a replicated parameter says nothing
                yield value.device_mesh, sharded
        elif is_function(node, *_LINEAR):
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node):
                queue.append((weight, True))
        else:
            queue.extend((n, is_weight) for n in node.all_input_nodes)


def _is_dtensor(value: object) -> bool:
    from torch.distributed.tensor import DTensor  # imported late: heavy, and only needed once TP is possible

    return isinstance(value, DTensor)
