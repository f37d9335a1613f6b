"""The compiled decode step on CUDA: one Inductor graph with the zipvl Triton kernels inlined, under CUDA graphs."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T

import zipvl_compile

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OPTIONS = dict(tau=0.9, dense_below=0, min_keep=4, hi_bits=4, lo_bits=2, recompress_interval=8)


def _model() -> torch.nn.Module:
    """A 2-layer GQA Llama (4 query heads, 2 KV heads, head dim 64), bf16 on CUDA, fixed random weights."""
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
    )
    return T.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def _prompt(seed: int, batch: int = 2, n: int = 160) -> dict:
    ids = torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed)).cuda()
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)


def test_decode_graph_inlines_the_zipvl_kernels():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = zipvl_compile.compile(_model(), **OPTIONS)
    with torch.no_grad():
        _, codes = run_and_get_code(model.generate, **_prompt(0))
    decode = [c for c in codes if "_decode_partial_kernel" in c]
    assert len(decode) == 1, "one decode graph, with the decode kernel in Inductor's output code"
    assert "torch.ops.zipvl" not in decode[0]  # no extern call: every zipvl op was inlined
    for kernel in ("_append_kernel", "_select_block_kernel", "_write_segment_kernel"):
        assert kernel in decode[0]  # the tail append and the recompression's selection and writes, inlined too
    assert not re.search(r"def triton_\w*(sort|searchsorted|cumsum)", decode[0])  # no generated scan or sort left
    prefill = [c for c in codes if "torch.ops.zipvl.sparse_attention" in c]
    assert len(prefill) == 1  # sparse prefill stays an extern op (library attention kernels)


def _assert_same_greedy_tokens(got: torch.Tensor, want, what: str) -> None:
    """``got`` [B, L] equals the reference's ``want.sequences``, or first differs at a step whose reference logits
    nearly tie between the two tokens (within 2^-5 of the largest logit: two separately compiled bf16 graphs may
    autotune different reduction orders, and a near-tie then flips; the sequences diverge after it)."""
    diff = (got != want.sequences).any(0).nonzero()
    if diff.numel() == 0:
        return
    t = diff[0].item()
    logits = want.scores[t - (want.sequences.shape[1] - len(want.scores))].float()
    rows = (got[:, t] != want.sequences[:, t]).nonzero()[:, 0]
    gap = logits[rows, want.sequences[rows, t]] - logits[rows, got[rows, t]]
    assert (gap <= logits[rows].abs().amax(-1) / 32).all(), f"{what}: step {t} differs by {gap.tolist()} logits"


def test_reduce_overhead_captures_decode_in_a_cuda_graph():
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    zipvl_compile.reset_report()
    counters.clear()
    plain = zipvl_compile.compile(_model(), **OPTIONS)
    graphed = zipvl_compile.compile(_model(), mode="reduce-overhead", **OPTIONS)
    graphs = zipvl_compile.report().graphs
    pointers = []
    with torch.no_grad():
        for i in range(3):
            want = plain.generate(**_prompt(i), output_scores=True, return_dict_in_generate=True)
            got = graphed.generate(**_prompt(i))
            _assert_same_greedy_tokens(got, want, f"prompt {i}")
            if i == 0:
                compiled = len(graphs)
            (cache,) = graphed.zipvl_cache_pool.caches.values()
            pointers.append([t.data_ptr() for _, layer in cache.packed_layers() for t in layer.buffers()])
    # every zipvl compile adds a report graph: none after the first prompt (the pool's buffers keep their shapes)
    reasons = [(g.graph_id, g.recompile_reason) for g in graphs]
    assert len(graphs) == compiled == 4, reasons  # prefill + decode, for each model
    assert [g.cudagraphs for g in graphs if g.cudagraphs is not None] == [False, True]  # prefill off, decode on
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert pointers[0] == pointers[1] == pointers[2]  # the pool's cache: every prompt writes the same tensors
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    recorded = sum(len(nodes) for nodes in manager.roots.values()) if manager is not None else 0
    # one recording for the class: the same addresses on every prompt, the same shapes on every step
    assert recorded == 1, recorded
    assert "CUDA graphs: graph(s)" in str(zipvl_compile.report())
