"""ZipVLCache: a transformers ``Cache`` holding each full-attention layer's K/V packed at mixed precision.

Per layer (:class:`ZipVLLayer`), static-shape buffers allocated at the prefill (the prompt length fixes the
capacity): two quantised segments, ``hi`` (the prefill's kept set T at ``hi_bits``) and ``lo`` (the other
tokens at ``lo_bits``), and a model-dtype ``tail`` of decode tokens not yet quantised (layout:
:mod:`zipvl_compile.runtime.layout`).

How much each buffer gets is one policy, :class:`Plan` with :func:`size_class` (docs/method.md, "Capacity
and compaction"). The prefill writes into segments sized for its worst case (every prompt token in either
one) plus a reserve of one group-rounded block per recompression still to come; once the kept set is known
each segment is compacted to the slots its fullest row filled plus that reserve, so after the prefill a layer
holds its tokens' packed bytes plus the empty slots up to its fullest row's last 64-slot group, the reserve,
and a tail of at most ``recompress_interval`` tokens in the model dtype. A pooled layer (the caches of
``zipvl_compile.compile``'s pool) compacts the same way into the segments of its class's earlier calls when
they have room, else into new ones of :meth:`Plan.pooled_slots` (the need in whole groups, at most 12.5%
more from 1024 slots on): the calls of a class then decode from the same tensors. Its cost: each segment
holds the most any call of its class has needed so far (so a small call after a large one holds more than
its own need, at most the larger call's), and during a prefill the new segments exist next to the kept ones
(compiled: worst case for two layers at a time, compacted for the others) until they move in after the
forward (:meth:`ZipVLLayer.compact`).

Writes go through zipvl ops, so eager and compiled models both work:
- prefill (the layer is empty): ``zipvl.kv_write_`` quantises the prompt's K/V; ``update`` returns them
  unchanged for the prefill attention. Uncompiled, there is no kept set, so every prompt token is stored at
  ``hi_bits``; the zipvl backend rewires the write after ``zipvl.sparse_attention`` and feeds it ``keep``.
- decode: ``zipvl.kv_recompress_`` quantises the tail block once it holds ``recompress_interval`` tokens
  (scored by the current query when the backend wires it in; all kept otherwise), ``zipvl.kv_append_`` adds the
  new token, and ``update`` returns ``zipvl.kv_dense_view`` (position order, ``max_cache_len`` long, like a
  static cache) for HF's attention. The backend replaces that attention by ``zipvl.decode_attention`` reading
  the packed buffers directly; the dense view then disappears from the graph.
Sliding-window layers keep transformers' static sliding-window layer (bf16 ring buffer: window semantics
unchanged); cross-attention layers (Mllama) keep a dynamic bf16 layer (their keys come from the image, not the
sequence). ``hi_bits == lo_bits == 16`` stores unquantised static buffers (exact).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer, StaticSlidingWindowLayer

from zipvl_compile.runtime import ops
from zipvl_compile.runtime.layout import GROUP, QUANT_BITS, Segment, Tail, clear_, nbytes, round_up
from zipvl_compile.runtime.packed import copy_slots_, shrunk_slots
from zipvl_compile.runtime.sparse import Selection

STORED_BITS = (*QUANT_BITS, 16)  # 16 = unquantised (model dtype), only as hi_bits = lo_bits = 16
CLASS_STEP = 256  # size classes: multiples of 256 slots below 4096 ...
CLASS_FRACTION = 16  # ... then multiples of 1/16 of the next power of two (at most 12.5% more than asked)
TAIL_STEP = 16  # the tail's slots: the tokens still to come rounded up to 16, at most the interval


def _rounded(n: int, step: int) -> int:
    """``n`` rounded up to a multiple of ``step``, or of 1/:data:`CLASS_FRACTION` of the next power of two when
    that is larger (so at most 12.5% more than ``n`` above ``CLASS_FRACTION * step``)."""
    return round_up(n, max(step, (1 << max(n - 1, 0).bit_length()) // CLASS_FRACTION))


def size_class(n: int) -> int:
    """The capacity class of a cache asked to hold ``n`` tokens (``n >= 1``): ``n`` rounded up to a multiple of
    :data:`CLASS_STEP` below 4096, else to a multiple of 1/:data:`CLASS_FRACTION` of the next power of two.

    Every length of a class gives the same guarded shapes (the dense view of a packed layer, the buffers of a
    static or sliding layer), so a compiled decode graph serves the whole class. Cost: at most 255 slots of
    a static layer below 4096 tokens, at most 12.5% above; nothing for packed layers (their view is not
    allocated in a compiled decode graph). Classes: 16 up to 4096 tokens, then 8 per doubling.
    """
    if n < 1:
        raise ValueError(f"zipvl: a cache must hold at least one token, got {n}")
    return _rounded(n, CLASS_STEP)


class Plan(NamedTuple):
    """What a packed layer allocates for a prompt of ``n`` tokens when it must hold ``budget`` tokens in all.

    prompt_slots: the prefill's worst case of each segment (every token kept, or none), whole groups;
    reserve: slots each segment keeps free for decode blocks: one group-rounded block per recompression that
    can still happen (the tail holds the first ``interval`` decode tokens, so ``ceil(to_come / R) - 1``);
    tail_slots: the tail, no larger than the tokens still to come (rounded up to :data:`TAIL_STEP`) or the
    interval, whichever is smaller (a tail shorter than the interval never fills, so blocks stay ``R`` long).

    The prefill writes into segments of :attr:`segment_slots`; then each keeps the slots its rows filled plus
    the reserve (``zipvl.kv_shrink``), a pooled one that rounded up to :meth:`pooled_slots`.
    """

    prompt_slots: int
    reserve: int
    tail_slots: int

    @classmethod
    def of(cls, n: int, budget: int, interval: int) -> Plan:
        to_come = max(budget - n, 0)
        blocks = max(math.ceil(to_come / interval) - 1, 0)
        tail = min(interval, round_up(max(to_come, 1), TAIL_STEP))
        return cls(round_up(n, GROUP), blocks * round_up(interval, GROUP), tail)

    @property
    def segment_slots(self) -> int:
        """Slots of each segment during the prefill: the worst case plus the reserve."""
        return self.prompt_slots + self.reserve

    def pooled_slots(self, need: int) -> int:
        """Slots of a pooled segment that must keep ``need`` slots (filled + reserve, a multiple of GROUP):
        ``need`` rounded up to a multiple of GROUP, or of 1/:data:`CLASS_FRACTION` of the next power of two
        when that is larger (at most 12.5% more, from 1024 slots on), never more than :attr:`segment_slots`."""
        return min(_rounded(need, GROUP), self.segment_slots)

    def nbytes(self, batch: int, heads: int, d: int, hi_bits: int, lo_bits: int, dtype_size: int) -> int:
        """Bytes a layer allocates under this plan during the prefill (both segments at their worst case):
        an upper bound of what it holds afterwards (a pooled layer: of what this call needs; it may keep more
        from a larger earlier call of its class)."""
        segments = sum(_segment_nbytes(batch, heads, self.segment_slots, d, bits) for bits in (hi_bits, lo_bits))
        tail = batch * self.tail_slots * (2 * heads * d * dtype_size + 4) + 4 * batch
        return segments + tail + 8


def _segment_nbytes(batch: int, heads: int, slots: int, d: int, bits: int) -> int:
    """Bytes of :meth:`Segment.empty` with these shapes (codes, fp16 params, int32 pos and fill)."""
    per_slot = 2 * heads * d * bits // 8 + 2 * 2 * heads + 4  # k and v codes, v scale/zero, pos
    return batch * (slots * per_slot + 2 * 2 * heads * (slots // GROUP) * d + 4)


def packed_pays(
    config: object, batch: int, prompt_len: int, budget: int, hi_bits: int, lo_bits: int, interval: int, dtype
) -> bool:
    """Whether a packed layer's worst case (:meth:`Plan.nbytes`) holds fewer bytes than the model's own dense
    cache of ``budget`` tokens in ``dtype`` (a prompt of a few tokens does not pay for its 64-slot groups)."""
    heads, d = kv_shape(config)
    size = torch.empty((), dtype=dtype).element_size()
    plan = Plan.of(prompt_len, budget, interval)
    return plan.nbytes(batch, heads, d, hi_bits, lo_bits, size) < 2 * batch * heads * budget * d * size


def kv_shape(config: object) -> tuple[int, int]:
    """(KV heads, head dim) of a decoder text config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, d


def check_cache_options(hi_bits: int, lo_bits: int, recompress_interval: int, packed: bool = True) -> None:
    """Raise ``ValueError`` naming the option when these KV options are invalid, or (``packed``) when a packed
    cache cannot store the combination."""
    for name, bits in (("hi_bits", hi_bits), ("lo_bits", lo_bits)):
        if bits not in STORED_BITS or isinstance(bits, bool):
            raise ValueError(f"zipvl: invalid option {name}={bits!r}; allowed: one of {STORED_BITS}")
    if lo_bits > hi_bits:
        raise ValueError(f"zipvl: invalid option lo_bits={lo_bits!r}; allowed: a value <= hi_bits ({hi_bits})")
    if packed and hi_bits == 16 and lo_bits != 16:
        raise ValueError(
            f"zipvl: invalid option hi_bits=16 with lo_bits={lo_bits}; the packed cache stores 16 bits only as "
            "hi_bits = lo_bits = 16 (use kv_mode='simulate' to study this mix)"
        )
    if not isinstance(recompress_interval, int) or isinstance(recompress_interval, bool) or recompress_interval < 1:
        raise ValueError(f"zipvl: invalid option recompress_interval={recompress_interval!r}; allowed: an integer >= 1")


class Held(NamedTuple):
    """The two segments a pooled layer keeps from one call for the next (:meth:`ZipVLLayer.reset`)."""

    hi: Segment
    lo: Segment


def _mark_static(tensors: list[torch.Tensor]) -> None:
    """Mark each tensor not yet marked as a static address for CUDA graphs (unguarded)."""
    for tensor in tensors:
        if not hasattr(tensor, "_dynamo_static_input_type"):
            torch._dynamo.mark_static_address(tensor)


WINDOWED = ("sliding_attention", "chunked_attention")  # transformers caches both as a sliding-window layer


def layer_kinds(config: object) -> list[tuple[str, int | None]]:
    """(kind, window or None) of each cached decoder layer of a text config, read the way transformers 5.17
    reads it (``cache_utils.get_layer_types_and_kwargs``): ``layer_types`` when set (Qwen2-style configs derive
    them from ``use_sliding_window`` / ``max_window_layers``, Gemma-style ones from ``sliding_window_pattern``),
    else every layer ``sliding_attention`` when ``sliding_window`` is set (Mistral, Phi3), else every layer
    ``chunked_attention`` when ``attention_chunk_size`` is set (Llama4), else full attention; layers sharing
    another layer's KV (``num_kv_shared_layers``, Gemma3n) hold no cache. Sliding layers get
    ``sliding_window``, chunked ones ``attention_chunk_size``.

    Raises ``ValueError`` naming the kind for layers a ZipVLCache cannot hold (recurrent, convolutional,
    hybrid, indexed or compressed attention).
    """
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        default = "sliding_attention" if window is not None else "chunked_attention" if chunk is not None else None
        kinds = [default or "full_attention"] * config.num_hidden_layers
    shared = getattr(config, "num_kv_shared_layers", None) or 0
    kinds = list(kinds[: len(kinds) - shared])
    unsupported = sorted(set(kinds) - {"full_attention", *WINDOWED})
    if unsupported:
        raise ValueError(
            f"zipvl: ZipVLCache holds full-attention and sliding/chunked-window layers only; this model also has "
            f"{', '.join(map(repr, unsupported))} layers (use kv_mode='simulate' or 'off' for it)"
        )
    sizes = {"full_attention": None, "sliding_attention": window, "chunked_attention": chunk}
    for kind in WINDOWED:
        if kind in kinds and not sizes[kind]:
            name = "sliding_window" if kind == "sliding_attention" else "attention_chunk_size"
            raise ValueError(f"zipvl: the config has {kind!r} layers but no {name}")
    return [(kind, sizes[kind]) for kind in kinds]


class ZipVLLayer(CacheLayerMixin):
    """One full-attention layer of a :class:`ZipVLCache` (see the module docstring)."""

    # Not "compileable" in transformers' sense: generate then neither builds 4-D masks outside the model nor
    # compiles the forward by itself. The zipvl backend compiles what it is given and sees HF's in-graph
    # causal mask, which it turns into is_causal (sparse prefill needs it); static buffers keep one decode graph.
    is_compileable = False
    is_sliding = False

    def __init__(
        self,
        max_cache_len: int,
        hi_bits: int,
        lo_bits: int,
        recompress_interval: int,
        budget: int | None = None,
        pooled: bool = False,
        selection: Selection | None = None,
        **kwargs: object,
    ) -> None:
        """max_cache_len: the length of the dense view (a size class, a guarded shape of decode graphs);
        budget: the tokens this layer must hold (prompt + decode), default ``max_cache_len``: it sizes the
        reserves (:class:`Plan`); pooled: keep the buffers across :meth:`reset` (see :meth:`compact`);
        selection: the prefill's kept-set options when known (:meth:`allocate`)."""
        super().__init__()
        self.max_cache_len = max_cache_len
        self.budget = max_cache_len if budget is None else budget
        self.hi_bits, self.lo_bits, self.interval = hi_bits, lo_bits, recompress_interval
        self.hi: Segment | None = None
        self.lo: Segment | None = None
        self.tail: Tail | None = None
        self.length = torch.zeros((), dtype=torch.int64)
        self.prompt_len = 0
        self.compacted = True
        self.pooled = pooled
        self.selection = selection
        self.spare: Held | None = None  # pooled: the segments of the last call, kept by reset for the next one

    def plan(self, prompt_len: int) -> Plan:
        return Plan.of(prompt_len, self.budget, self.interval)

    def _keeps_prompt(self, n: int, device: torch.device | str) -> bool:
        """The layer's :attr:`selection` runs a prefill of ``n`` tokens on ``device`` dense (every token kept)."""
        return self.selection is not None and self.selection.runs_dense_at(n, torch.device(device).type)

    @property
    def exact(self) -> bool:
        """The segments were allocated at their final size for the last prefill (:meth:`allocate`): nothing to cut."""
        return self.hi is not None and self._keeps_prompt(self.prompt_len, self.hi.pos.device)

    def capacity(self, prompt_len: int) -> int:
        """Slots of one segment at the prefill: the whole prompt plus the decode reserve (:class:`Plan`)."""
        return self.plan(prompt_len).segment_slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, n, d = key_states.shape
        self.allocate(batch, heads, n, d, key_states.dtype, key_states.device)

    def allocate(self, batch: int, heads: int, n: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        """Buffers for a prefill of ``n`` tokens of K/V ``[batch, heads, n, d]`` in ``dtype`` (:class:`Plan`):
        both segments at their worst case, to be compacted once the kept set is known (:meth:`compact`), and
        the tail, which a pooled layer keeps when it fits (:meth:`prepare_tail`). A prefill that the layer's
        :attr:`selection` runs dense (every token kept, none in ``lo``) gets its final sizes at once: ``hi`` the
        prompt plus the reserve, ``lo`` the reserve; nothing is cut afterwards."""
        plan = self.plan(n)
        lo_slots = plan.reserve if self._keeps_prompt(n, device) else plan.segment_slots
        self.hi = Segment.empty(batch, heads, plan.segment_slots, d, self.hi_bits, device)
        self.lo = Segment.empty(batch, heads, lo_slots, d, self.lo_bits, device)
        if not (self.pooled and self._tail_fits(batch, heads, d, dtype, device, plan.tail_slots)):
            self.tail = Tail.empty(batch, heads, plan.tail_slots, d, dtype, device)
            self.length = self.length.to(device)
        self.prompt_len = n
        self.compacted = False
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    def prepare_tail(self, batch: int, heads: int, n: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        """Outside graphs, for a pooled layer before its prefill (arguments as :meth:`allocate`): allocate the tail
        unless the one held fits (same batch, heads, head dim, dtype and device, at least the plan's slots: a
        longer tail changes nothing, as no plan's tail shorter than the interval can fill), and mark it and the
        length static, so that the prefill graph finds the same inputs on every call of the pool."""
        plan = self.plan(n)
        if not self._tail_fits(batch, heads, d, dtype, device, plan.tail_slots):
            self.tail = Tail.empty(batch, heads, plan.tail_slots, d, dtype, device)
            self.length = self.length.to(device)
        _mark_static([*self.tail, self.length])

    def _tail_fits(self, batch: int, heads: int, d: int, dtype: torch.dtype, device: torch.device, slots: int) -> bool:
        """Whether the tail held serves a plan of ``slots`` tail slots for K/V ``[batch, heads, *, d]``."""
        if self.tail is None:
            return False
        k = self.tail.k
        same = k.shape[:2] == (batch, heads) and k.shape[3] == d and k.dtype == dtype
        return same and k.device == torch.device(device) and self.tail.slots >= slots

    def compact(self) -> None:
        """Cut each segment to the slots its rows filled plus the decode blocks' reserve, once the kept set is known.

        The prefill sizes both segments for the worst case (every token kept, or none); the kept set is known
        after its write. :class:`ZipVLCache` compacts a layer as soon as the next layer's prefill begins (inside
        the prefill graph when compiled: ``zipvl.kv_shrink``), so at most two layers hold worst-case segments at a
        time; the last layer is compacted by :meth:`ZipVLCache.compact` after the forward.

        A pooled layer ends in the segments of its last call (:attr:`spare`, kept by :meth:`reset`) whenever they
        have room, else in new ones of :meth:`Plan.pooled_slots` (a larger call of the class grows them once):
        outside graphs (inside one it is only cut; :meth:`ZipVLCache.compact` finishes after the forward). So
        the calls of a pool's class decode from the same tensors of the same shapes: no recompile, and CUDA
        graphs record once. Cost: each segment holds the most that a call of its class has needed so far.
        """
        if self.compacted or not self.is_initialized:
            return
        reserve = self.plan(self.prompt_len).reserve
        if self.pooled and not torch.compiler.is_compiling():
            spare_hi, spare_lo = self.spare or (None, None)
            self.hi = self._moved(self.hi, spare_hi, reserve, self.hi_bits)
            self.lo = self._moved(self.lo, spare_lo, reserve, self.lo_bits)
            self.spare = None
            self.compacted = True
            return
        if not self.exact:
            self.hi = Segment(*ops.kv_shrink(list(self.hi), reserve=reserve))
            self.lo = Segment(*ops.kv_shrink(list(self.lo), reserve=reserve))
        self.compacted = not self.pooled

    def _moved(self, seg: Segment, spare: Segment | None, reserve: int, bits: int) -> Segment:
        """``seg``'s filled slots plus ``reserve``, in ``spare`` when it has room for them (same batch, heads,
        head dim and device; emptied by :meth:`reset`), else in a new segment of :meth:`Plan.pooled_slots`."""
        need = shrunk_slots(seg, reserve)
        batch, heads, _, _ = seg.k_codes.shape
        d, device = seg.k_scale.shape[3], seg.pos.device
        fits = spare is not None and spare.k_scale.shape[:2] == (batch, heads) and spare.k_scale.shape[3] == d
        if not (fits and spare.pos.device == device and spare.capacity >= need):
            spare = Segment.empty(batch, heads, self.plan(self.prompt_len).pooled_slots(need), d, bits, device)
        copy_slots_(spare, seg, need)
        return spare

    def mark_static(self) -> None:
        """Mark the buffers as static addresses (outside graphs): decode graphs mutate them in place, which CUDA
        graphs allow only for static inputs (unguarded: a new cache re-records, it does not recompile). Each
        buffer once (this runs after every forward)."""
        if self.is_initialized:
            _mark_static(self.buffers())

    def buffers(self) -> list[torch.Tensor]:
        return [*self.hi, *self.lo, *self.tail, self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, t, _ = key_states.shape
        pos = torch.arange(t, device=key_states.device) + self.length.to(key_states.device)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            ops.kv_write_(
                hi=list(self.hi),
                lo=list(self.lo),
                k=key_states,
                v=value_states,
                pos=pos.expand(batch, t),
                hi_bits=self.hi_bits,
                lo_bits=self.lo_bits,
            )
            self.length.add_(t)
            return key_states, value_states
        if t != 1:
            raise NotImplementedError("ZipVLCache: after the prefill, tokens are appended one at a time")
        if not torch.compiler.is_compiling():
            if int(self.length) >= self.budget:  # eager only (a graph must not sync): the view reads it anyway
                raise ValueError(f"zipvl: the ZipVLCache is full (max_cache_len={self.budget} tokens)")
            if not self.compacted:
                self.compact()  # the last layer, uncompiled: the first decode step compacts it
        bits = {"hi_bits": self.hi_bits, "lo_bits": self.lo_bits}
        ops.kv_recompress_(hi=list(self.hi), lo=list(self.lo), tail=list(self.tail), **bits)
        ops.kv_append_(tail=list(self.tail), k=key_states, v=value_states, pos=pos.expand(batch))
        self.length.add_(1)
        return ops.kv_dense_view(
            hi=list(self.hi), lo=list(self.lo), tail=list(self.tail), length=self._view_length(), **bits
        )

    def _view_length(self, query_length: int = 0) -> int:
        """Length of the dense view: ``max_cache_len`` in a graph (static shapes), the tokens held when eager.

        Eager, a view cut at the real length means attention never sees empty slots, even when HF skips the
        mask (it does for one query and no padding mask: with a static-length view that would attend to zeros).
        """
        if torch.compiler.is_compiling():
            return self.max_cache_len
        return int(self.length) + query_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_initialized:
            return query_length, 0
        return self._view_length(query_length), 0

    def get_seq_length(self) -> torch.Tensor | int:
        return self.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget the cached tokens; the next update is a prefill. A pooled layer empties its buffers in place
        (same tensors, as a fresh allocation holds them) and keeps its segments as :attr:`spare` for the next
        prefill's to end in (:meth:`compact`); any other frees them (the prefill allocates anew)."""
        self.is_initialized = False
        if self.pooled and self.compacted and self.hi is not None:
            for part in (self.hi, self.lo, self.tail):
                clear_(part)
            self.spare = Held(self.hi, self.lo)
            self.length.zero_()
            return
        self.hi = self.lo = self.tail = None
        self.length = torch.zeros((), dtype=torch.int64, device=self.length.device)
        self.compacted = True

    def token_counts(self) -> tuple[int, int, int]:
        """(hi, lo, tail) tokens held (host read; for the report)."""
        if not self.is_initialized:
            return 0, 0, 0
        per_row = lambda seg: int((seg.pos >= 0).sum()) // max(1, seg.pos.shape[0])
        return per_row(self.hi), per_row(self.lo), int(self.tail.length.max())

    def nbytes(self) -> int:
        """Bytes of every tensor this layer allocated."""
        return nbytes(self.buffers())


class ZipVLCache(Cache):
    """Mixed-precision packed KV cache for a decoder (``generate(..., past_key_values=ZipVLCache(model, ...))``).

    model_or_config: the model (or its config); max_cache_len: prompt + generated tokens it must hold (the
    layers are built for its :func:`size_class`; the reserves follow ``max_cache_len`` itself).
    Full-attention layers become :class:`ZipVLLayer`; sliding-window and chunked layers stay transformers'
    static sliding layers; with ``hi_bits == lo_bits == 16`` every full layer is an unquantised static layer.
    ``packed=False`` keeps full layers as transformers' dynamic layers instead (model dtype, exactly the tokens
    held), with ``dense_reason`` saying why: :meth:`for_prompt` chooses it when packing would not pay.
    ``pooled=True`` (the caches of ``zipvl_compile.compile``'s pool): packed layers keep their buffers across
    :meth:`reset`, and their next prefill compacts into them when they have room (:meth:`ZipVLLayer.compact`;
    :meth:`prepare` allocates the tails ahead of the prefill). ``selection``: the prefill's kept-set options, when
    the caller knows them (``zipvl_compile.compile``'s pool does): a prompt they run dense (every token kept)
    gets segments of their final size instead of the worst case (:meth:`ZipVLLayer.allocate`). They must be the
    options the prefill runs with: a prompt they call dense that then keeps fewer tokens would not fit ``lo``.
    """

    def __init__(
        self,
        model_or_config: object,
        max_cache_len: int,
        hi_bits: int = 4,
        lo_bits: int = 2,
        recompress_interval: int = 100,
        packed: bool = True,
        dense_reason: str | None = None,
        pooled: bool = False,
        selection: Selection | None = None,
    ) -> None:
        check_cache_options(hi_bits, lo_bits, recompress_interval)
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
            raise ValueError(f"zipvl: invalid max_cache_len={max_cache_len!r}; allowed: an integer >= 1")
        config = getattr(model_or_config, "config", model_or_config).get_text_config(decoder=True)
        self.hi_bits, self.lo_bits, self.recompress_interval = hi_bits, lo_bits, recompress_interval
        self.budget, self.capacity_class = max_cache_len, size_class(max_cache_len)
        self.model_key = model_key(config)
        self.dense_reason = None if packed else dense_reason or "packed=False"
        cross = set(getattr(config, "cross_attention_layers", None) or ())
        layers = []
        for index, (_, window) in enumerate(layer_kinds(config)):
            if index in cross:  # keys of another sequence (Mllama's image states): kept as they are
                layers.append(DynamicLayer())
            elif window is not None:
                layers.append(StaticSlidingWindowLayer(max_cache_len=self.capacity_class, sliding_window=window))
            elif hi_bits == 16 and lo_bits == 16:
                layers.append(StaticLayer(max_cache_len=self.capacity_class))
            elif not packed:
                layers.append(DynamicLayer())
            else:
                layers.append(
                    ZipVLLayer(
                        self.capacity_class,
                        hi_bits,
                        lo_bits,
                        recompress_interval,
                        budget=max_cache_len,
                        pooled=pooled,
                        selection=selection,
                    )
                )
        super().__init__(layers=layers)

    @classmethod
    def for_prompt(
        cls, model: torch.nn.Module, batch: int, prompt_len: int, max_new_tokens: int, **options: Any
    ) -> ZipVLCache:
        """The cache ``generate`` gets for ``batch`` prompts of ``prompt_len`` tokens and ``max_new_tokens`` new
        ones; ``options``: the constructor's (``hi_bits``, ``lo_bits``, ``recompress_interval``, ``pooled``).
        Packed unless the packed layers' worst case (:meth:`Plan.nbytes`) would hold as many bytes as the
        model's own dense cache."""
        budget = prompt_len + max_new_tokens
        cache = cls(model, budget, **options)
        config = model.config.get_text_config(decoder=True)
        dtype = next(model.parameters()).dtype
        bits = cache.hi_bits, cache.lo_bits, cache.recompress_interval
        if cache.hi_bits == 16 or packed_pays(config, batch, prompt_len, budget, *bits, dtype):
            return cache
        reason = f"{prompt_len} + {max_new_tokens} tokens: packing would not hold fewer bytes"
        return cls(model, budget, **options, packed=False, dense_reason=reason)

    def set_budget(self, max_cache_len: int) -> None:
        """Make an empty cache (just :meth:`reset`) hold ``max_cache_len`` tokens, of the same size class."""
        if size_class(max_cache_len) != self.capacity_class:
            raise ValueError(f"zipvl: max_cache_len={max_cache_len} is not of this cache's size class")
        self.budget = max_cache_len
        for _, layer in self.packed_layers():
            layer.budget = max_cache_len

    def prepare(self, batch: int, prompt_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate (or keep, when it fits) every packed layer's tail for a prefill of ``batch`` prompts of
        ``prompt_len`` tokens with K/V in ``dtype`` on ``device``, outside graphs (:meth:`ZipVLLayer.prepare_tail`):
        a compiled prefill then finds the same inputs from the first call on (its worst-case segments it
        allocates itself), so it is traced once for every call of the pool. Stock static layers (the dense ones)
        are initialised here too, because transformers marks their buffers static only outside graphs: allocated
        inside the prefill graph, their in-place writes would keep the decode step out of CUDA graphs. Only an
        empty cache (new, or just :meth:`reset`)."""
        heads, head_dim = self.model_key.kv_heads, self.model_key.head_dim
        for _, layer in self.packed_layers():
            if layer.is_initialized:
                raise ValueError("zipvl: ZipVLCache.prepare needs an empty cache (reset it first)")
            layer.prepare_tail(batch, heads, prompt_len, head_dim, dtype, device)
        like = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
        for layer in self.layers:
            if isinstance(layer, StaticLayer) and not layer.is_initialized:
                layer.lazy_initialization(like, like)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``Cache.update``; a packed layer's prefill first compacts the packed layer before it.

        In a graph, only when Dynamo captures data-dependent output shapes (``capture_dynamic_output_shape_ops``,
        set by :func:`zipvl_compile.compile` around its calls): otherwise the compaction would break the graph,
        and every layer is compacted after the forward instead (:meth:`compact`).
        """
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"zipvl: the ZipVLCache has {len(self.layers)} layers, the model writes layer {layer_idx}: "
                "it was built for another model"
            )
        layer = self.layers[layer_idx]
        grows = isinstance(layer, DynamicLayer)  # a cross-attention layer (image keys) or a dense full layer
        if not grows and not layer.is_initialized and key_states.shape[2] > self.budget:
            raise ValueError(
                f"zipvl: the prompt is {key_states.shape[2]} tokens but the ZipVLCache was built for "
                f"max_cache_len={self.budget}"
            )
        if (
            isinstance(layer, ZipVLLayer)
            and not layer.is_initialized
            and (not torch.compiler.is_compiling() or torch._dynamo.config.capture_dynamic_output_shape_ops)
        ):
            done = [other for i, other in self.packed_layers() if i < layer_idx and other.is_initialized]
            if done:
                done[-1].compact()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self) -> None:
        """Forget every cached token: static and sliding layers zero their buffers (kept, same addresses),
        packed layers free theirs (pooled ones empty them in place), dynamic layers start anew (transformers'
        reset would keep their length)."""
        for index, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:
                self.layers[index] = DynamicLayer()
            else:
                layer.reset()

    def compact(self) -> None:
        """After a prefill, outside graphs: compact every packed layer not yet compacted (see
        :meth:`ZipVLLayer.compact`) and mark the buffers static for CUDA graphs."""
        for _, layer in self.packed_layers():
            layer.compact()
            layer.mark_static()

    def packed_layers(self) -> list[tuple[int, ZipVLLayer]]:
        return [(i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, ZipVLLayer)]

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (packed segments, params, positions, tails, static layers)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, ZipVLLayer):
                total += layer.nbytes()
            elif layer.is_initialized and layer.keys is not None:
                total += nbytes([layer.keys, layer.values])
        return total

    def nbytes_dense(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the model's own dense cache of the same tokens would hold (K and V of every cached token, every
        layer, sliding layers at most their window): in ``dtype``, by default the model's (the dtype of the K/V
        the cache was given)."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            size = torch.empty((), dtype=dtype or layer.dtype).element_size()
            if isinstance(layer, ZipVLLayer):
                batch, heads, _, d = layer.tail.k.shape
                tokens = int(layer.length)
            else:
                batch, heads, _, d = layer.keys.shape
                tokens = min(int(layer.get_seq_length()), layer.keys.shape[2])
            total += 2 * batch * heads * tokens * d * size
        return total

    def reserves(self) -> str:
        """What the packed layers hold beyond their tokens, in words (for the report)."""
        layers = self.packed_layers()
        if self.dense_reason or not layers or not layers[0][1].is_initialized:
            return ""
        layer = layers[0][1]
        plan = layer.plan(layer.prompt_len)
        return (
            f"tail {plan.tail_slots} slots in the model dtype, decode reserve {plan.reserve} slots per segment, "
            f"writes in whole {GROUP}-slot groups"
        )


class ModelKey(NamedTuple):
    """What a cache must match in a model."""

    config_class: str
    layers: int
    kv_heads: int
    head_dim: int


def model_key(config: object) -> ModelKey:
    """The :class:`ModelKey` of a decoder text config."""
    return ModelKey(type(config).__name__, config.num_hidden_layers, *kv_shape(config))
