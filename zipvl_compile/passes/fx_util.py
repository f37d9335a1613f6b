"""Small helpers to read Dynamo FX graphs (torch IR: torch functions, Tensor methods, operators)."""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx

_LAYER_RE = re.compile(r"(?:layers|layer|blocks|block|h)(?:\.|\[|_)(\d+)")


def is_function(node: fx.Node, *targets: Any) -> bool:
    return node.op == "call_function" and node.target in targets


def is_method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def example(node: Any) -> Any:
    """The example value (a FakeTensor for tensors) Dynamo recorded for ``node``, else None."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def shape(node: Any) -> tuple | None:
    value = example(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def static_int(value: Any) -> int | None:
    """A python int for an int or a SymInt that is known to be constant, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        node = value.node
        if node.is_constant() or node.expr.is_number:
            return int(node.expr)
    return None


def module_path(node: fx.Node) -> tuple[str, str]:
    """(innermost module path, its class name) from ``nn_module_stack``, or ("", "")."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>")
    return _clean_path(path), name


def module_classes(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for _, cls in stack.values():
        out.append(cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>"))
    return out


def _clean_path(path: str) -> str:
    path = path.replace("L['self']", "").replace("L['fn']", "")
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def layer_index(path: str) -> int | None:
    matches = _LAYER_RE.findall(path)
    return int(matches[-1]) if matches else None


def is_getitem(node: fx.Node) -> bool:
    return is_function(node, operator.getitem)


INPLACE_FUNCTIONS = {operator.setitem, torch.Tensor.copy_, torch.Tensor.index_copy_}


def is_impure(node: fx.Node) -> bool:
    """True for nodes DCE must keep: outputs, inputs, in-place and mutating ops (docs/architecture.md §11, trap 1)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_"):
        return True
    if node.op == "call_function":
        target = node.target
        if target in INPLACE_FUNCTIONS:
            return True
        if isinstance(target, torch._ops.OpOverloadPacket):
            return _mutating_packet(target)
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.is_mutable
        name = getattr(target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return True
    return node.is_impure()


def _mutating_packet(packet: torch._ops.OpOverloadPacket) -> bool:
    for name in packet.overloads():
        if getattr(packet, name)._schema.is_mutable:
            return True
    return False
