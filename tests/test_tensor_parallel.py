"""The zipvl backend under Hugging Face tensor parallelism (issue 8): every rank keeps the same tokens.

Two CPU processes (gloo) load a tiny random Llama with transformers' ``tp_plan="auto"`` (2 query heads and 1 KV
head per rank) and compare with the single-process compiled model at the same options.
"""

from __future__ import annotations

import operator
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zipvl_compile
from zipvl_compile.runtime import ops, sparse
from zipvl_compile.testing import build_text

WORLD = 2
N_NEW = 2  # prefill + one decode step: two compiled graphs per process
OPTIONS = dict(inner="eager", dense_below=0, tau=0.8, min_keep=4, n_probe_recent=8, n_probe_random=8, kv_mode="off")
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


def _qkv(hq, hkv, n=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, d, generator=g) for h in (hq, hkv, hkv)]


def _padding_mask(n):
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :7] = False
    return mask


@pytest.mark.parametrize("full_mask", [False, True])
def test_split_op_equals_fused_and_head_shards_sum(full_mask):
    """sparse_attention == sparse_attention_scored(probe_scores); colsum of head shards sums to the full one."""
    q, k, v = _qkv(4, 2)
    n = q.shape[2]
    mask = _padding_mask(n)
    if full_mask:  # an arbitrary [B, 1, n, n] mask: the masked (non fast-path) probe and attention
        mask = mask & (torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(1)) > 0.2)
    geometry = dict(attn_mask=mask, is_causal=True, scale=0.25, n_rep=2)
    probe = dict(n_probe_recent=8, n_probe_random=8, seed=0)
    colsum, seen = ops.probe_scores(q, k, **geometry, **probe)
    fused = ops.sparse_attention(q, k, v, **geometry, **probe, tau=0.8, min_keep=4)
    split = ops.sparse_attention_scored(q, k, v, colsum, seen, **geometry, tau=0.8, min_keep=4)
    for a, b in zip(fused, split):
        assert torch.equal(a, b)
    assert 0 < split[2].min() and split[2].max() < 1
    shards = [ops.probe_scores(q[:, 2 * r : 2 * r + 2], k[:, r : r + 1], **geometry, **probe) for r in range(2)]
    torch.testing.assert_close(shards[0][0] + shards[1][0], colsum, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(s[1], seen) for s in shards)


def _prompt():
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask


def _generate(model) -> dict:
    """Greedy tokens, the kept set of every sparse prefill (a hook on select_kept), the rewritten graphs."""
    kept, graphs = [], []
    select = sparse.select_kept

    def recording_select(*args, **kwargs):
        result = select(*args, **kwargs)
        kept.append(result.keep.clone())
        return result

    def backend(gm, example_inputs):
        compiled = zipvl_compile.zipvl_backend(gm, example_inputs, options=OPTIONS)
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    zipvl_compile.reset_report()
    sparse.select_kept = recording_select
    try:
        model.forward = torch.compile(model.forward, backend=backend)
        ids, mask = _prompt()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False)
    finally:
        sparse.select_kept = select
    ops_seen = sorted({s.op for s in zipvl_compile.report().sites if s.kind == "prefill"})
    return dict(tokens=out, kept=kept, ops=ops_seen, collectives=[_collectives(gm) for gm in graphs])


def _collectives(gm) -> list[tuple]:
    """Per collective node of a rewritten graph: (target, producer of its input, reduce op, group, consumer)."""
    rows = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and "_c10d_functional" in str(node.target) and node.target is not WAIT:
            source = node.args[0]
            producer = source.args[0].target if source.target is operator.getitem else source.target
            consumers = {u.target for w in node.users for u in w.users} if node.target is ALL_REDUCE else set()
            rows.append((str(node.target), str(producer), *node.args[1:3], sorted(map(str, consumers))))
    return rows


def _tp_worker(rank: int, tmp: str) -> None:
    import transformers as T
    from transformers.distributed.configuration_utils import DistributedConfig

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        mesh = dist.init_device_mesh("cpu", (WORLD,))
        model = T.LlamaForCausalLM.from_pretrained(
            f"{tmp}/model", distributed_config=DistributedConfig(tp_plan="auto", tp_size=WORLD), device_mesh=mesh
        ).eval()
        model.set_attn_implementation("sdpa")
        result = _generate(model)
        result["group"] = mesh.get_group().group_name
        result["local_heads"] = model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0] // 16
        torch.save(result, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_matches_single_process(tmp_path):
    model = build_text("llama")
    model.save_pretrained(tmp_path / "model")
    single = _generate(model)
    assert single["ops"] == ["zipvl.sparse_attention"]
    assert single["collectives"] == [[], []], "no TP group: no collective in any graph"
    assert len(single["kept"]) == 2 and all(0 < k.float().mean() < 1 for k in single["kept"])

    mp.spawn(_tp_worker, args=(str(tmp_path),), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for result in ranks:
        assert result["local_heads"] == 2
        assert result["ops"] == ["zipvl.sparse_attention_scored"]
        prefill, decode = result["collectives"]
        reduce = (str(ALL_REDUCE), str(ops.probe_scores), "sum", result["group"], [str(ops.sparse_attention_scored)])
        assert prefill.count(reduce) == 2, prefill  # one per layer, straight into the selection
        assert reduce not in decode
        assert torch.equal(result["tokens"], single["tokens"])
        assert len(result["kept"]) == 2
    for layer in range(2):
        assert torch.equal(ranks[0]["kept"][layer], ranks[1]["kept"][layer])
        assert torch.equal(ranks[0]["kept"][layer], single["kept"][layer])
