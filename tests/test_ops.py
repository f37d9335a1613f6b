"""How the zipvl ops are registered: eager bodies launch their Triton kernels directly, not through the
``wrap_triton`` dispatch that only tracing needs."""

from __future__ import annotations

import torch
from torch._library.triton import is_wrap_triton_enabled

from zipvl_compile.runtime import ops

SEEN: list[bool] = []


def _body(x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    SEEN.append(is_wrap_triton_enabled())
    return x * scale


PROBE = ops.define_op("test_wrap_switch", _body, lambda x, *, scale=1.0: torch.empty_like(x))


def test_eager_bodies_launch_kernels_directly() -> None:
    """Called through the dispatcher (a custom op on this machine) or as ``BODIES`` (the eager inner compiler),
    the body runs with wrap_triton's dispatch off; the switch is restored afterwards."""
    SEEN.clear()
    x = torch.randn(4)
    torch.testing.assert_close(PROBE(x, scale=2.0), 2 * x)
    torch.testing.assert_close(ops.BODIES[PROBE](x, scale=3.0), 3 * x)
    assert SEEN == [False, False]
    assert is_wrap_triton_enabled()


def test_binder_matches_signature_bind() -> None:
    """The eager bodies' argument binder gives Signature.bind's arguments (defaults applied) and its errors."""
    import inspect

    import pytest

    from zipvl_compile.runtime.ops import _binder

    kind = inspect.Parameter
    sig = inspect.Signature(
        [kind("a", kind.POSITIONAL_OR_KEYWORD), kind("b", kind.POSITIONAL_OR_KEYWORD, default=2)]
        + [kind("c", kind.KEYWORD_ONLY), kind("d", kind.KEYWORD_ONLY, default=4)]
    )
    bind = _binder(sig)
    for args, kwargs in [
        ((1,), {"c": 3}),
        ((1, 5), {"c": 3, "d": 6}),
        ((), {"a": 1, "c": 3}),
        ((1,), {"b": 7, "c": 3}),
    ]:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        assert bind(args, kwargs) == dict(bound.arguments)
    for args, kwargs in [((1, 2, 3), {"c": 3}), ((1,), {}), ((1,), {"c": 3, "e": 0}), ((1,), {"a": 1, "c": 3})]:
        with pytest.raises(TypeError):
            sig.bind(*args, **kwargs)
        with pytest.raises(TypeError):
            bind(args, kwargs)
