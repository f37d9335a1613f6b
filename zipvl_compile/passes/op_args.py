"""Arguments of the project's op nodes, addressed by name.

The passes create every zipvl op node with keyword arguments only, and the ZipVLCache calls its ops by keyword,
so a node's ``kwargs`` hold its arguments; an argument left out has its schema default.
"""

from __future__ import annotations

import torch
import torch.fx as fx


def _schema(node: fx.Node) -> torch.FunctionSchema:
    target = node.target
    return (target.default if isinstance(target, torch._ops.OpOverloadPacket) else target)._schema


def op_arg(node: fx.Node, name: str) -> object:
    """Argument ``name`` of op node ``node`` (its schema default when the call left it out)."""
    if name in node.kwargs:
        return node.kwargs[name]
    for index, arg in enumerate(_schema(node).arguments):
        if arg.name == name:
            if index < len(node.args):
                raise ValueError(f"zipvl: {node.target} called with {name!r} by position; the passes need names")
            return arg.default_value
    raise KeyError(f"{node.target} has no argument {name!r}")


def set_op_args(node: fx.Node, **values: object) -> None:
    """Set arguments of op node ``node`` by name (each must be a known argument of its schema)."""
    names = {arg.name for arg in _schema(node).arguments}
    unknown = set(values) - names
    if unknown:
        raise KeyError(f"{node.target} has no argument(s) {sorted(unknown)}")
    node.kwargs = {**node.kwargs, **values}
