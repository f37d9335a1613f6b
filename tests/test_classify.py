"""Classification from the graph's own evidence: toy attention modules whose names say the opposite of what
they do, and a decoder layer split by a graph break."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import zipvl_compile
from zipvl_compile.config import ZipVLConfig
from zipvl_compile.passes.pass_manager import run_passes

HEADS, HEAD_DIM = 2, 8
DIM = HEADS * HEAD_DIM


class CacheLayer:
    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        self.keys, self.values = keys, values


class Cache:
    """Keys/values per layer as ``past.layers[i].keys``: ``past`` random tokens (a graph input that names its
    layer), or none yet (``past=0``: the prefill creates them in the graph, as a DynamicCache does)."""

    def __init__(self, n_layers: int, batch: int, past: int) -> None:
        g = torch.Generator().manual_seed(3)
        shape = (batch, HEADS, past, HEAD_DIM)
        self.layers = [
            CacheLayer(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
            if past
            else CacheLayer(None, None)
            for _ in range(n_layers)
        ]


class Attention(nn.Module):
    """q/k/v projections, an optional cache read (cat of past and new keys), an optional HF-style causal mask."""

    def __init__(self, layer_idx: int | None, causal: bool, pattern: str = "sdpa") -> None:
        super().__init__()
        if layer_idx is not None:
            self.layer_idx = layer_idx
        self.causal, self.pattern = causal, pattern
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, x, past=None, other=None, cache_layer=None):
        b, n, _ = x.shape
        src = x if other is None else other
        q, k, v = (
            proj(t).view(b, -1, HEADS, HEAD_DIM).transpose(1, 2)
            for proj, t in ((self.q_proj, x), (self.k_proj, src), (self.v_proj, src))
        )
        if past is not None:
            layer = past.layers[self.layer_idx if cache_layer is None else cache_layer]
            if layer.keys is None:
                layer.keys, layer.values = k.new_zeros((b, HEADS, 0, HEAD_DIM)), v.new_zeros((b, HEADS, 0, HEAD_DIM))
            k, v = torch.cat([layer.keys, k], dim=-2), torch.cat([layer.values, v], dim=-2)
            layer.keys, layer.values = k, v
        mask = self._mask(q, k) if self.causal else None
        if self.pattern == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=HEAD_DIM**-0.5)
        w = torch.matmul(q, k.transpose(2, 3)) * HEAD_DIM**-0.5
        if mask is not None:
            w = w + torch.where(mask, torch.tensor(0.0), torch.finfo(torch.float32).min)
        return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32), v)

    @staticmethod
    def _mask(q, k):
        n, lk = q.shape[2], k.shape[2]
        q_idx = (torch.arange(n) + (lk - n))[None, None, :, None]
        kv_idx = torch.arange(lk)[None, None, None, :]
        mask = q_idx.new_ones((), dtype=torch.bool) & (kv_idx <= q_idx)
        return mask.expand(q.shape[0], -1, n, lk)


def renamed(cls: type, name: str) -> type:
    return type(name, (cls,), {})


class Nest(nn.Module):
    """Puts ``leaf`` at the dotted ``path`` (numbers become ModuleList entries) and calls it."""

    def __init__(self, path: str, leaf: nn.Module) -> None:
        super().__init__()
        self.path = path
        first, *rest = path.split(".")
        child = leaf
        for name in reversed(rest):
            if name.isdigit():
                child = nn.ModuleList([nn.Identity()] * int(name) + [child])
            else:
                holder = nn.Module()
                holder.add_module(name, child)
                child = holder
        self.add_module(first, child)

    def forward(self, *args, **kwargs):
        return self.get_submodule(self.path)(*args, **kwargs)


def compile_sites(model: nn.Module, *args, **kwargs):
    """Run ``model`` eagerly and compiled by a backend that applies the zipvl passes (outputs equal); the sites."""
    sites = []

    def backend(gm, example_inputs):
        config = ZipVLConfig.from_options({"tau": 1.0})
        sites.extend(run_passes(gm, config, zipvl_compile.report().new_graph(len(gm.graph.nodes), config.summary())))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():  # each run gets its own copy of the cache (the prefill writes into it)
        expected = model(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        got = torch.compile(model, backend=backend)(*args, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return sites


def _x(n=6, batch=1):
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(1))


def test_decoder_named_like_a_vision_module_is_rewritten():
    """Every class of the family carries '...Vision...': the causal mask and the cache write decide."""
    attn = renamed(Attention, "Granite4VisionTextAttention")(layer_idx=1, causal=True)
    model = Nest("model.vision_language_model.layers.1.self_attn", attn)
    (site,) = compile_sites(model, _x(), past=Cache(2, 1, 3), cache_layer=1)
    assert site.op is not None and site.kind == "prefill" and site.layer == 1, site.skip
    assert "causal mask" in site.evidence and "KV-cache write" in site.evidence


def test_bert_named_causal_decoder_with_cache_is_rewritten():
    attn = renamed(Attention, "GitSelfAttention")(layer_idx=None, causal=True, pattern="eager")
    model = Nest("git.encoder.layer.1.attention.self", attn)
    (site,) = compile_sites(model, _x(), past=Cache(2, 1, 4), cache_layer=1)
    assert site.op is not None and site.pattern == "eager" and site.layer == 1, site.skip
    assert "layer from the KV-cache input" in site.evidence


class SplitLayer(nn.Module):
    """A decoder layer with a graph break (``Tensor.item()``) after its attention, as in an MoE expert loop."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(layer_idx, causal=True)
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, x, past):
        h = x + self.self_attn(x, past).transpose(1, 2).reshape(x.shape)
        scale = float(h.abs().max().item())  # graph break
        return h + self.mlp(h) / scale


class SplitDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([SplitLayer(0), SplitLayer(1)])

    def forward(self, x, past):
        for layer in self.layers:
            x = layer(x, past)
        return x


def test_graph_break_inside_a_layer_keeps_its_layer_index():
    sites = compile_sites(SplitDecoder(), _x(), Cache(2, 1, 0))
    assert sorted(s.layer for s in sites) == [0, 1]
    for site in sites:
        assert site.op is not None and site.module_path == "self_attn", site.skip
        assert "layer from the module's layer_idx" in site.evidence


def test_vision_tower_named_like_a_decoder_is_left_alone():
    attn = renamed(Attention, "LlamaAttention")(layer_idx=0, causal=False)
    (site,) = compile_sites(Nest("model.language_model.layers.0.self_attn", attn), _x())
    assert site.op is None and site.kind == "encoder" and "no causal mask" in site.skip


def test_cross_attention_told_by_its_keys():
    """Keys projected from a second sequence, no 'cross' in any name: cross-attention, left alone."""
    attn = renamed(Attention, "DecoderAttention")(layer_idx=0, causal=False)
    (site,) = compile_sites(Nest("model.layers.0.attn", attn), _x(), other=_x(n=5))
    assert site.op is None and site.kind == "cross" and "inputs the queries never read" in site.evidence
