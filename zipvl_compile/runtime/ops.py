"""The zipvl op set, registered once through ``torch.library`` (namespace ``zipvl``).

Each op's schema is written once, as the signature of its body below: tensors first (positional or keyword;
optional ones default to None), options keyword-only with defaults. A keyword-only parameter annotated with an
option structure (a NamedTuple with a default for every field, such as :class:`~zipvl_compile.runtime.sparse.Prefill`)
stands for its fields, nested structures spread in turn: they are the op's keyword options, and the body (and the
fake) receives them built into the structure. Callers and the FX passes address every argument by name. Layout
structures cross an op boundary as tensor lists (``list(segment)``) and are rebuilt by name inside
(:mod:`zipvl_compile.runtime.layout`). Fakes state the output contract only.

Ops whose CUDA body calls a library kernel (SDPA, FlashAttention) are ``custom_op`` everywhere; ops made only of
our own Triton kernels are defined with ``triton=True``, which registers a ``triton_op`` on CUDA machines (so
Inductor inlines the kernels) and a ``custom_op`` elsewhere (the Triton interpreter cannot be traced through
``triton_op``). Importing this module registers the ops; it is idempotent per process.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence

import torch
from torch._library.triton import set_wrap_triton_enabled

from zipvl_compile.runtime import packed, stats
from zipvl_compile.runtime import sparse as sparse_impl
from zipvl_compile.runtime.kernels.decode import DecodeCall
from zipvl_compile.runtime.kernels.decode import decode_attention as decode_attention_impl
from zipvl_compile.runtime.layout import GROUP, Segment, Tail
from zipvl_compile.runtime.packed import KV, Bits
from zipvl_compile.runtime.reference import dense_attention
from zipvl_compile.runtime.sparse import QKV, Geometry, Prefill, Probes

NAMESPACE = "zipvl"


BODIES: dict[torch._ops.OpOverload, Callable] = {}
"""Each op's Python body, called with the op's own arguments: what an eager graph may call without the dispatcher
(a custom op's dispatch costs ~0.1 ms per call on a CPU, several times the body of the per-step cache ops)."""


def define_op(
    name: str, impl: Callable, fake: Callable, mutates_args: Sequence[str] = (), triton: bool = False
) -> torch._ops.OpOverload:
    """Register ``zipvl::name`` from ``impl`` (its type hints are the schema, structures spread into their fields;
    ``fake`` is called as ``impl`` is); returns the ``.default`` overload."""
    qualname = f"{NAMESPACE}::{name}"
    body = inspect.signature(impl)
    hints = typing.get_type_hints(impl)
    flat = inspect.Signature(
        [field for param in body.parameters.values() for field in _spread(param, hints[param.name])],
        return_annotation=body.return_annotation,
    )
    names = list(flat.parameters)
    if len(set(names)) != len(names):
        raise TypeError(f"zipvl: {name} spreads into repeated argument names {names}")
    impl, fake = (_gathering(fn, body, hints, flat) for fn in (impl, fake))
    eager = _direct_launches(impl)
    if triton and torch.cuda.is_available():  # traced by Inductor: its launches must stay wrapped
        op = torch.library.triton_op(qualname, mutates_args=tuple(mutates_args))(impl)
    else:
        op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(eager)
    op.register_fake(fake)
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    BODIES[overload] = eager
    return overload


def _direct_launches(fn: Callable) -> Callable:
    """``fn`` with its ``wrap_triton`` launches going straight to the kernels. A custom op's body, and a body
    called eagerly from ``BODIES``, only ever sees real tensors, where the dispatch of ``wrap_triton`` (a
    higher-order op, there for tracing) costs up to ~1 ms of host time per launch: several per layer in the
    sparse prefill (``triton_op`` does the same for its own eager calls)."""

    @functools.wraps(fn)
    def call(*args: object, **kwargs: object) -> object:
        with set_wrap_triton_enabled(False):
            return fn(*args, **kwargs)

    return call


def _is_structure(hint: object) -> bool:
    return isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_field_defaults")


@functools.cache
def _fields(hint: type) -> dict[str, object]:
    """A structure's field hints, resolved once (``typing.get_type_hints`` costs tens of microseconds a call)."""
    return typing.get_type_hints(hint)


def _spread(param: inspect.Parameter, hint: object) -> list[inspect.Parameter]:
    """The op arguments a body parameter stands for: itself, or a structure's fields (nested ones in turn), of
    the parameter's kind; keyword-only fields need defaults."""
    if not _is_structure(hint):
        return [param.replace(annotation=hint)]
    fields = _fields(hint)
    if param.kind is param.KEYWORD_ONLY and set(hint._field_defaults) != set(fields):
        raise TypeError(f"zipvl: option structure {hint.__name__} needs a default for every field")
    return [
        spread
        for field, field_hint in fields.items()
        for spread in _spread(
            inspect.Parameter(field, param.kind, default=hint._field_defaults.get(field, param.empty)), field_hint
        )
    ]


def _build(hint: object, name: str, values: dict[str, object]) -> object:
    """Argument ``name`` of type ``hint`` of a body, from the op's flat arguments ``values``."""
    if not _is_structure(hint):
        return values[name]
    return hint(*(_build(field_hint, field, values) for field, field_hint in _fields(hint).items()))


def _binder(sig: inspect.Signature) -> Callable[[tuple, dict], dict[str, object]]:
    """``sig.bind(*args, **kwargs)`` with its defaults applied, as a dict: the same arguments and the same
    TypeErrors, at a small fraction of the cost (``Signature.bind`` takes ~30 µs for an op's ~40 arguments, paid
    by every eager call: three per layer and decode step)."""
    params = list(sig.parameters.values())
    if any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TypeError("zipvl: op bodies take positional-or-keyword and keyword-only parameters only")
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    required = [p.name for p in params if p.default is p.empty]

    def bind(args: tuple, kwargs: dict) -> dict[str, object]:
        if len(args) > len(positional):
            raise TypeError(f"too many positional arguments: {len(args)} for {len(positional)}")
        arguments = dict(zip(positional, args))
        for name, value in kwargs.items():
            if name in arguments or name not in sig.parameters:
                raise TypeError(f"{'multiple values for' if name in arguments else 'unexpected'} argument {name!r}")
            arguments[name] = value
        if missing := [name for name in required if name not in arguments]:
            raise TypeError(f"missing required argument(s): {', '.join(missing)}")
        return {name: arguments[name] if name in arguments else defaults[name] for name in sig.parameters}

    return bind


def _gathering(fn: Callable, body: inspect.Signature, hints: dict, flat: inspect.Signature) -> Callable:
    """``fn`` called with the op's flat arguments (signature ``flat``), gathered into the parameters of ``body``."""
    if not any(_is_structure(hints[name]) for name in body.parameters):
        return fn

    bind = _binder(flat)
    keyword = {p.name for p in body.parameters.values() if p.kind is p.KEYWORD_ONLY}

    @functools.wraps(fn)
    def call(*args: object, **kwargs: object) -> object:
        arguments = bind(args, kwargs)
        values = {name: _build(hints[name], name, arguments) for name in body.parameters}
        return fn(*(v for n, v in values.items() if n not in keyword), **{n: values[n] for n in keyword})

    call.__signature__ = flat
    return call


def _no_result(*args: object, **kwargs: object) -> None:
    return None


# -- attention ----------------------------------------------------------------------------------------------


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float = 1.0,
    n_rep: int = 1,
    softcap: float = 0.0,
) -> torch.Tensor:
    return dense_attention(q, k, v, attn_mask, is_causal, scale, n_rep, softcap).contiguous()


def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


attention = define_op("attention", _attention, _attention_fake)
"""zipvl::attention(q [B,Hq,Lq,d], k/v [B,Hkv,Lk,d], attn_mask?, *, is_causal, scale, n_rep, softcap=0)
-> [B,Hq,Lq,d]: dense attention, exact (see runtime.reference for the mask convention)."""


def _bshd(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, d] with (B, S, H, d) memory: the layout HF's ``transpose(1, 2).reshape`` reads for free."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _outputs(outputs: sparse_impl.Outputs, prefill: Prefill, stats_slot: int) -> sparse_impl.Outputs:
    """(out, keep, ratio) of a sparse prefill as the ops return them; the ratio (known to be 1 when the prefill ran
    dense, ``prefill.selection.runs_dense``), and whether the prompt was too short for the sparse path
    (``prefill.selection.too_short``), are stored in ``stats_slot``."""
    out, keep, ratio = outputs
    selection = prefill.selection
    stats.record_ratio(stats_slot, None if selection.runs_dense(out) else ratio, selection.too_short(out))
    return _bshd(out), keep, ratio


def _sparse_fake(qkv: QKV, *args: object, **kwargs: object) -> sparse_impl.Outputs:
    q = qkv.q
    batch, heads, n, _ = q.shape
    out = q.new_empty(batch, n, heads, qkv.v.shape[-1]).transpose(1, 2)
    return out, q.new_empty(batch, n, dtype=torch.bool), q.new_empty(batch, dtype=torch.float32)


def _probe_rows(
    q: torch.Tensor, attn_mask: torch.Tensor | None = None, *, is_causal: bool = True, probes: Probes
) -> torch.Tensor:
    return sparse_impl.probe_rows(q, attn_mask, is_causal, probes)


def _probe_rows_fake(q: torch.Tensor, *args: object, probes: Probes, **kwargs: object) -> torch.Tensor:
    m = min(q.shape[2], probes.n_probe_recent + probes.n_probe_random)
    return q.new_empty(q.shape[0], m, dtype=torch.int64)


probe_rows = define_op("probe_rows", _probe_rows, _probe_rows_fake)
"""zipvl::probe_rows(q [B,H,n,d], attn_mask?, *, is_causal, n_probe_recent, n_probe_random, seed) -> int64 [B,m]:
the probe positions (m = min(n, recent + random), ascending, -1 in unused slots); one node per graph and mask
feeds every sparse site (they depend only on the validity mask and the seed)."""


def _sparse_attention(
    qkv: QKV,
    attn_mask: torch.Tensor | None = None,
    probe_rows: torch.Tensor | None = None,
    *,
    prefill: Prefill,
    probes: Probes,
    stats_slot: int = -1,
) -> sparse_impl.Outputs:
    return _outputs(sparse_impl.sparse_attention(qkv, attn_mask, probe_rows, probes, prefill), prefill, stats_slot)


sparse_attention = define_op("sparse_attention", _sparse_attention, _sparse_fake)
"""zipvl::sparse_attention(q, k, v, attn_mask?, probe_rows?, *, Probes (n_probe_recent, n_probe_random, seed),
Prefill (Geometry: is_causal, scale, n_rep; Selection: tau, min_keep, force_ratio, dense_below, score_norm; Attend:
prefill_mode, local_window, sink_tokens), stats_slot) -> (out [B,Hq,n,d], keep bool [B,n], ratio float32 [B]):
ZipVL prefill (runtime.sparse; the structures' fields are the keyword options); with a stats slot (runtime.stats)
it also stores the batch's kept-ratio moments there."""


def _probe_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    probe_rows: torch.Tensor | None = None,
    *,
    geometry: Geometry,
    probes: Probes,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_impl.probe_scores(q, k, attn_mask, geometry, probes, probe_rows)


def _probe_scores_fake(q: torch.Tensor, k: torch.Tensor, *args: object, **kwargs: object):
    shape = (q.shape[0], k.shape[2])
    return q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.float32)


probe_scores = define_op("probe_scores", _probe_scores, _probe_scores_fake)
"""zipvl::probe_scores(q, k, attn_mask?, probe_rows?, *, Geometry, Probes) -> (colsum, seen) float32 [B,n]: the
probe stage of sparse_attention over the heads of q (runtime.sparse). Under tensor parallelism the graph
all-reduces colsum (sum over ranks) before zipvl.sparse_attention_scored; seen counts probe rows, the same on
every rank."""


def _sparse_attention_scored(
    qkv: QKV,
    colsum: torch.Tensor,
    seen: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    prefill: Prefill,
    stats_slot: int = -1,
) -> sparse_impl.Outputs:
    return _outputs(sparse_impl.sparse_attention_scored(qkv, colsum, seen, attn_mask, prefill), prefill, stats_slot)


sparse_attention_scored = define_op("sparse_attention_scored", _sparse_attention_scored, _sparse_fake)
"""zipvl::sparse_attention_scored(q, k, v, colsum, seen, attn_mask?, *, Prefill, stats_slot)
-> (out, keep, ratio) as sparse_attention: the selection (Eqs. 6-8 on colsum / seen of zipvl.probe_scores, summed
over all heads) and kept-token attention stages."""


# -- packed KV cache ----------------------------------------------------------------------------------------


def _kv_write(
    hi: list[torch.Tensor],
    lo: list[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    keep: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    *,
    bits: Bits,
) -> None:
    packed.write_tokens_(Segment(*hi), Segment(*lo), k, v, pos, keep, valid, bits.hi_bits, bits.lo_bits)


kv_write_ = define_op("kv_write_", _kv_write, _no_result, mutates_args=("hi", "lo"), triton=True)
"""zipvl::kv_write_(hi (mutated), lo (mutated), k, v [B,H,t,d], pos int [B,t], keep bool [B,t]?, valid bool
[B,t]?, *, Bits (hi_bits, lo_bits)): quantise a prefill's tokens into the packed segments (runtime.packed.write_tokens_;
keep None = every valid token kept)."""


def _kv_append(tail: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    packed.append_tail_(Tail(*tail), k, v, pos)


kv_append_ = define_op("kv_append_", _kv_append, _no_result, mutates_args=("tail",), triton=True)
"""zipvl::kv_append_(tail (mutated), k, v [B,H,1,d], pos int [B]): one decode token into the model-dtype tail."""


def _kv_recompress(
    hi: list[torch.Tensor],
    lo: list[torch.Tensor],
    tail: list[torch.Tensor],
    q: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    n_rep: int = 1,
    tau: float = 1.0,
    hi_bits: int = 4,
    lo_bits: int = 2,
) -> None:
    packed.recompress_(Segment(*hi), Segment(*lo), Tail(*tail), q, scale, n_rep, tau, hi_bits, lo_bits)


kv_recompress_ = define_op("kv_recompress_", _kv_recompress, _no_result, mutates_args=("hi", "lo", "tail"), triton=True)
"""zipvl::kv_recompress_(hi, lo, tail (all mutated), q [B,Hq,1,d]?, *, scale, n_rep, tau, hi_bits, lo_bits):
quantise the tail block of rows whose tail is full, scored with q (None: every token kept;
runtime.packed.recompress_)."""


def _kv_shrink(seg: list[torch.Tensor], *, reserve: int = 0) -> list[torch.Tensor]:
    return list(packed.shrink(Segment(*seg), reserve))


def _kv_shrink_fake(seg: list[torch.Tensor], *, reserve: int = 0) -> list[torch.Tensor]:
    segment = Segment(*seg)
    shapes = segment.cut_shapes(torch.library.get_ctx().new_dynamic_size() * GROUP)
    return [t.new_empty(shape) for t, shape in zip(segment, shapes, strict=True)]


kv_shrink = define_op("kv_shrink", _kv_shrink, _kv_shrink_fake)
"""zipvl::kv_shrink(seg, *, reserve) -> seg': a copy of a packed segment cut to its filled slots plus ``reserve``
(runtime.packed.shrink; the size is data-dependent: one host read of ``fill``)."""


def _kv_dense_view(
    hi: list[torch.Tensor],
    lo: list[torch.Tensor],
    tail: list[torch.Tensor],
    *,
    length: int = 0,
    bits: Bits,
) -> tuple[torch.Tensor, torch.Tensor]:
    return packed.dense_view(Segment(*hi), Segment(*lo), Tail(*tail), length, bits.hi_bits, bits.lo_bits)


def _kv_dense_view_fake(hi: list, lo: list, tail: list[torch.Tensor], *, length: int = 0, **kwargs: object):
    k_tail = Tail(*tail).k
    out = k_tail.new_empty(k_tail.shape[0], k_tail.shape[1], length, k_tail.shape[3])
    return out, torch.empty_like(out)


kv_dense_view = define_op("kv_dense_view", _kv_dense_view, _kv_dense_view_fake, triton=True)
"""zipvl::kv_dense_view(hi, lo, tail, *, length, hi_bits, lo_bits) -> (k, v) [B,H,length,d]: the dequantised
cache in position order (the eager path's K/V; compiled decode graphs read the packed buffers instead)."""


def _decode_attention(
    q: torch.Tensor,
    hi: list[torch.Tensor],
    lo: list[torch.Tensor],
    tail: list[torch.Tensor],
    *,
    scale: float = 1.0,
    n_rep: int = 1,
    hi_bits: int = 4,
    lo_bits: int = 2,
) -> torch.Tensor:
    return decode_attention_impl(q, DecodeCall(Segment(*hi), Segment(*lo), Tail(*tail), scale, n_rep, hi_bits, lo_bits))


def _decode_attention_fake(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return torch.empty_like(q)


decode_attention = define_op("decode_attention", _decode_attention, _decode_attention_fake, triton=True)
"""zipvl::decode_attention(q [B,Hq,1,d], hi, lo, tail, *, scale, n_rep, hi_bits, lo_bits) -> [B,Hq,1,d]: attention
of one query over every valid slot of the packed cache, dequantising in the kernel (runtime.kernels.decode)."""


def _kv_simulate(
    kv: KV, keep: torch.Tensor | None = None, valid: torch.Tensor | None = None, *, bits: Bits
) -> tuple[torch.Tensor, torch.Tensor]:
    return packed.simulate(kv.k, kv.v, keep, valid, bits.hi_bits, bits.lo_bits)


def _kv_simulate_fake(kv: KV, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(kv.k), torch.empty_like(kv.v)


kv_simulate = define_op("kv_simulate", _kv_simulate, _kv_simulate_fake, triton=True)
"""zipvl::kv_simulate(k, v [B,H,t,d], keep?, valid?, *, Bits (hi_bits, lo_bits)) -> (k', v'): the prefill K/V as the
packed cache would hold them (quantised and dequantised), for kv_mode="simulate" on a stock cache."""
