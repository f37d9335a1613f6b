"""ZipVLCache: a transformers ``Cache`` holding each full-attention layer's K/V packed at mixed precision.

Per layer (:class:`ZipVLLayer`), static-shape buffers allocated at the prefill (the prompt length fixes the
capacity): two quantised segments, ``hi`` (the prefill's kept set T at ``hi_bits``) and ``lo`` (the other
tokens at ``lo_bits``), and a model-dtype ``tail`` of decode tokens not yet quantised (layout:
:mod:`zipvl_compile.runtime.quant` and :mod:`zipvl_compile.runtime.packed`). Segment capacity is sized for the
worst case of each (every prompt token kept, or none), plus the decode blocks, so no write can overflow.

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

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer, StaticSlidingWindowLayer

from zipvl_compile.runtime import ops
from zipvl_compile.runtime.layout import GROUP, QUANT_BITS, Segment, Tail, nbytes, round_up

STORED_BITS = (*QUANT_BITS, 16)  # 16 = unquantised (model dtype), only as hi_bits = lo_bits = 16


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


def layer_kinds(config: object) -> tuple[list[str], int | None]:
    """(kind of each decoder layer, sliding window or None) of a text config: its ``layer_types`` when it has
    them, else every layer sliding when it declares a ``sliding_window`` (Mistral and Phi3 style configs leave
    ``layer_types`` None), else every layer full attention."""
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        layer_types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    return list(layer_types), window


class ZipVLLayer(CacheLayerMixin):
    """One full-attention layer of a :class:`ZipVLCache` (see the module docstring)."""

    # Not "compileable" in transformers' sense: generate then neither builds 4-D masks outside the model nor
    # compiles the forward by itself. The zipvl backend compiles what it is given and sees HF's in-graph
    # causal mask, which it turns into is_causal (sparse prefill needs it); static buffers keep one decode graph.
    is_compileable = False
    is_sliding = False

    def __init__(
        self, max_cache_len: int, hi_bits: int, lo_bits: int, recompress_interval: int, **kwargs: object
    ) -> None:
        super().__init__()
        self.max_cache_len = max_cache_len
        self.hi_bits, self.lo_bits, self.interval = hi_bits, lo_bits, recompress_interval
        self.hi: Segment | None = None
        self.lo: Segment | None = None
        self.tail: Tail | None = None
        self.length = torch.zeros((), dtype=torch.int64)
        self.prompt_len = 0
        self.compacted = True

    def capacity(self, prompt_len: int) -> int:
        """Slots of one segment: the whole prompt, plus every decode block rounded to whole groups."""
        blocks = math.ceil(max(self.max_cache_len - prompt_len, 0) / self.interval)
        return round_up(prompt_len, GROUP) + blocks * round_up(self.interval, GROUP)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, n, d = key_states.shape
        dev, dtype = key_states.device, key_states.dtype
        cap = self.capacity(n)
        self.hi = Segment.empty(batch, heads, cap, d, self.hi_bits, dev)
        self.lo = Segment.empty(batch, heads, cap, d, self.lo_bits, dev)
        self.tail = Tail.empty(batch, heads, self.interval, d, dtype, dev)
        self.length = self.length.to(dev)
        self.prompt_len = n
        self.compacted = False
        self.dtype, self.device = dtype, dev
        self.is_initialized = True

    def compact(self) -> None:
        """Shrink each segment to the slots the prefill filled plus the decode blocks' reserve (``zipvl.kv_shrink``).

        The prefill sizes both segments for the worst case (every token kept, or none); the kept set is known
        after its write. :class:`ZipVLCache` compacts a layer as soon as the next layer's prefill begins (inside
        the prefill graph when compiled), so at most two layers hold worst-case segments at a time; the last
        layer is compacted by :meth:`ZipVLCache.compact` after the forward.
        """
        if self.compacted or not self.is_initialized:
            return
        reserve = self.capacity(self.prompt_len) - round_up(self.prompt_len, GROUP)
        self.hi = Segment(*ops.kv_shrink(list(self.hi), reserve=reserve))
        self.lo = Segment(*ops.kv_shrink(list(self.lo), reserve=reserve))
        self.compacted = True

    def mark_static(self) -> None:
        """Mark the buffers as static addresses (outside graphs): decode graphs mutate them in place, which CUDA
        graphs allow only for static inputs (unguarded: a new cache re-records, it does not recompile).

        Once per set of buffers: every allocation (prefill, compaction) replaces ``hi``, and all buffers are
        marked together, so a marked ``hi[0]`` means nothing is left to mark (this runs after every forward).
        """
        if not self.is_initialized or hasattr(self.hi.k_codes, "_dynamo_static_input_type"):
            return
        for buf in self.buffers():
            torch._dynamo.mark_static_address(buf)

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
        if not self.compacted and not torch.compiler.is_compiling():
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
        """Forget the cached tokens; the next update is a prefill (buffers are reallocated for its length)."""
        self.hi = self.lo = self.tail = None
        self.length = torch.zeros((), dtype=torch.int64, device=self.length.device)
        self.is_initialized = False

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

    model_or_config: the model (or its config); max_cache_len: prompt + generated tokens it must hold.
    Full-attention layers become :class:`ZipVLLayer`; sliding-window layers stay transformers' static sliding
    layers; with ``hi_bits == lo_bits == 16`` every layer is an unquantised static layer.
    """

    def __init__(
        self,
        model_or_config: object,
        max_cache_len: int,
        hi_bits: int = 4,
        lo_bits: int = 2,
        recompress_interval: int = 100,
    ) -> None:
        check_cache_options(hi_bits, lo_bits, recompress_interval)
        config = getattr(model_or_config, "config", model_or_config).get_text_config(decoder=True)
        self.hi_bits, self.lo_bits, self.recompress_interval = hi_bits, lo_bits, recompress_interval
        layer_types, window = layer_kinds(config)
        cross = set(getattr(config, "cross_attention_layers", None) or ())
        layers = []
        for index, kind in enumerate(layer_types):
            if index in cross:  # keys of another sequence (Mllama's image states): kept as they are, bf16
                layers.append(DynamicLayer())
            elif kind == "sliding_attention" and window:
                layers.append(StaticSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=window))
            elif hi_bits == 16 and lo_bits == 16:
                layers.append(StaticLayer(max_cache_len=max_cache_len))
            else:
                layers.append(ZipVLLayer(max_cache_len, hi_bits, lo_bits, recompress_interval))
        super().__init__(layers=layers)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``Cache.update``; a packed layer's prefill first compacts the packed layer before it.

        In a graph, only when Dynamo captures data-dependent output shapes (``capture_dynamic_output_shape_ops``,
        set by :func:`zipvl_compile.compile` around its calls): otherwise the compaction would break the graph,
        and every layer is compacted after the forward instead (:meth:`compact`).
        """
        layer = self.layers[layer_idx]
        if (
            isinstance(layer, ZipVLLayer)
            and not layer.is_initialized
            and (not torch.compiler.is_compiling() or torch._dynamo.config.capture_dynamic_output_shape_ops)
        ):
            done = [other for i, other in self.packed_layers() if i < layer_idx and other.is_initialized]
            if done:
                done[-1].compact()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

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
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total

    def nbytes_dense(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes a ``dtype`` cache of the same tokens would hold (K and V of every cached token, every layer)."""
        total = 0
        size = torch.empty((), dtype=dtype).element_size()
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if isinstance(layer, ZipVLLayer):
                batch, heads, _, d = layer.tail.k.shape
                tokens = int(layer.length)
            else:
                batch, heads, _, d = layer.keys.shape
                tokens = min(int(layer.get_seq_length()), layer.keys.shape[2])
            total += 2 * batch * heads * tokens * d * size
        return total
