"""Small helpers to read Dynamo FX graphs (torch IR: torch functions, Tensor methods, operators)."""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx

_LAYER_RE = re.compile(r"(?:layers|layer|blocks|block|h)(?:\.|\[|_)(\d+)")
_CACHE_LAYER_RE = re.compile(r"(?:layers|key_cache|value_cache)\[(\d+)\]")
_SOURCE_STEP_RE = re.compile(r"\.(\w+)|\[(\d+)\]|\['([^']*)'\]")


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
    """The decoder layer index a module path names (``model.layers.3.self_attn`` -> 3), else None."""
    matches = _LAYER_RE.findall(path)
    return int(matches[-1]) if matches else None


def input_source(node: fx.Node) -> str | None:
    """Where Dynamo read a graph input from (``L['past_key_values'].layers[0].keys``), None for other nodes."""
    grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
    source = getattr(grapharg, "source", None)
    return None if source is None else source.name


def is_parameter_input(node: fx.Node) -> bool:
    """A graph input that is a module's parameter or buffer (not an activation)."""
    name = input_source(node) or ""
    return "._parameters[" in name or "._buffers[" in name


def cache_layer(node: fx.Node) -> int | None:
    """The cache layer a graph input belongs to (``...layers[2].keys`` -> 2), else None."""
    matches = _CACHE_LAYER_RE.findall(input_source(node) or "")
    return int(matches[-1]) if matches else None


def live_module(node: fx.Node) -> Any:
    """The module object of ``node``'s innermost ``nn_module_stack`` entry, found in the frame Dynamo is
    compiling (only while a backend runs inside ``torch.compile``), else None."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        frame_locals = InstructionTranslator.current_tx().f_locals
    except (AttributeError, AssertionError, ImportError):
        return None
    path = list(stack.values())[-1][0]
    root = re.match(r"L\['([^']+)'\]", path)
    steps = "" if root is None else path[root.end() :]
    if root is None or root.group(1) not in frame_locals or _SOURCE_STEP_RE.sub("", steps):
        return None  # not a path of locals, attributes and indices
    obj = frame_locals[root.group(1)]
    for attr, index, key in _SOURCE_STEP_RE.findall(steps):
        try:
            obj = getattr(obj, attr) if attr else obj[int(index)] if index else obj[key]
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return obj


def is_getitem(node: fx.Node) -> bool:
    return is_function(node, operator.getitem)


_AUGMENTED = "iadd isub imul imatmul itruediv ifloordiv imod ipow ilshift irshift iand ior ixor".split()
INPLACE_FUNCTIONS = {operator.setitem, torch.Tensor.copy_, torch.Tensor.index_copy_} | {
    getattr(operator, name) for name in _AUGMENTED
}  # ``x op= y`` on a tensor mutates x; the rest of ``operator`` is pure (``and_`` / ``or_`` included)


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
        if name.endswith("_") and not name.startswith("_") and getattr(operator, name, None) is not target:
            return True  # torch's in-place convention; ``operator.and_`` / ``or_`` only avoid Python keywords
    return node.is_impure()


def _mutating_packet(packet: torch._ops.OpOverloadPacket) -> bool:
    for name in packet.overloads():
        if getattr(packet, name)._schema.is_mutable:
            return True
    return False
