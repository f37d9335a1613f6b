"""Graph stability: one decode graph for every step with StaticCache; one prefill graph for many lengths."""

from __future__ import annotations

import torch
import transformers as T

import zipvl_compile
from zipvl_compile.testing import build_text


def _compile(model):
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model.forward = torch.compile(model.forward, backend="zipvl", options={"inner": "eager", "tau": 1.0})


def test_static_cache_decode_never_recompiles():
    model = build_text("llama")
    reference = build_text("llama")
    _compile(model)
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    caches = [T.StaticCache(config=model.config, max_cache_len=64) for _ in range(2)]
    with torch.no_grad():
        logits = [
            m(input_ids=ids, past_key_values=c, use_cache=True).logits[:, -1]
            for m, c in zip((model, reference), caches)
        ]
        token = logits[0].argmax(-1, keepdim=True)
        for step in range(22):
            pos = torch.tensor([7 + step])
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                got = model(input_ids=token, past_key_values=caches[0], cache_position=pos).logits[:, -1]
            want = reference(input_ids=token, past_key_values=caches[1], cache_position=pos).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            token = got.argmax(-1, keepdim=True)
    decode_graphs = {s.graph_id for s in zipvl_compile.report().sites if s.kind == "decode"}
    assert len(decode_graphs) == 1


def test_one_prefill_graph_for_many_lengths():
    model = build_text("qwen2")
    _compile(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, n in enumerate([5, 8, 11, 17, 23]):
            ids = torch.randint(3, 500, (1, n), generator=gen)
            with torch._dynamo.config.patch(error_on_recompile=i >= 2):
                model(input_ids=ids, use_cache=False)
    prefill_graphs = {s.graph_id for s in zipvl_compile.report().sites if s.kind == "prefill"}
    assert len(prefill_graphs) == 2  # the first length, then one dynamic graph for all others
