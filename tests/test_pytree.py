"""ZipVLCache as a pytree node (torch.utils._pytree and optree) and through torch.export."""

from __future__ import annotations

import optree
import torch
import torch.utils._pytree as pytree

import zipvl_compile  # noqa: F401  (registers the pytree nodes)
from zipvl_compile import ZipVLCache
from zipvl_compile.runtime.sparse import Selection
from zipvl_compile.testing import build_text


def _filled(model, n=10, pooled=False):
    selection = Selection(dense_below=100) if pooled else None  # a pooled cache knows the selection, as the pool's
    cache = ZipVLCache(model, max_cache_len=40, recompress_interval=4, pooled=pooled, selection=selection)
    with torch.no_grad():
        model(input_ids=torch.arange(3, 3 + n)[None], past_key_values=cache)
        model(input_ids=torch.tensor([[9]]), past_key_values=cache)
    return cache


def _same(a: ZipVLCache, b: ZipVLCache) -> None:
    assert type(b) is ZipVLCache and len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert all(x is y for x, y in zip(la.buffers(), lb.buffers()))
        assert (la.hi_bits, la.lo_bits, la.prompt_len, la.is_initialized, la.pooled, la.selection, la.exact) == (
            lb.hi_bits,
            lb.lo_bits,
            lb.prompt_len,
            lb.is_initialized,
            lb.pooled,
            lb.selection,
            lb.exact,
        )
    assert int(b.get_seq_length()) == int(a.get_seq_length())


def test_torch_pytree_round_trip():
    cache = _filled(build_text("llama"))
    leaves, spec = pytree.tree_flatten(cache)
    assert leaves and all(isinstance(t, torch.Tensor) for t in leaves)
    assert len(leaves) == sum(len(layer.buffers()) for layer in cache.layers)
    _same(cache, pytree.tree_unflatten(leaves, spec))


def test_torch_pytree_round_trip_keeps_pooling():
    cache = _filled(build_text("llama"), pooled=True)
    assert all(layer.pooled for _, layer in cache.packed_layers())
    _same(cache, pytree.tree_unflatten(*pytree.tree_flatten(cache)))


def test_optree_round_trip():
    cache = _filled(build_text("llama"))
    leaves, spec = optree.tree_flatten(cache, namespace="zipvl_compile")
    assert len(leaves) == len(pytree.tree_leaves(cache))
    _same(cache, optree.tree_unflatten(spec, leaves))


class _DecodeStep(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, cache_position, cache):
        return self.model(input_ids=input_ids, cache_position=cache_position, past_key_values=cache).logits


def test_export_one_decode_step():
    """The cache's buffers are inputs of the exported program, which computes what eager computes."""
    model = build_text("llama")
    step = _DecodeStep(model)
    tok, pos = torch.tensor([[7]]), torch.tensor([11])
    ep = torch.export.export(step, (tok, pos, _filled(model)), strict=False)
    targets = {str(n.target) for n in ep.graph.nodes}
    assert {"zipvl.kv_append_.default", "zipvl.kv_dense_view.default", "zipvl.kv_recompress_.default"} <= targets
    eager, exported = _filled(model), _filled(model)
    with torch.no_grad():
        expected = step(tok, pos, eager)
        got = ep.module()(tok, pos, exported)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for layer_eager, layer_exported in zip(eager.layers, exported.layers):
        assert int(layer_eager.length) == int(layer_exported.length) == 12
        for a, b in zip(layer_eager.tail, layer_exported.tail):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
