"""Attention among the kept tokens: the pack -> varlen -> unpack path and the Triton gather/scatter kernels
against the plain-torch references (CPU: "sdpa_padded" backend, Triton under the interpreter; GPU: every
varlen backend in bf16)."""

import zlib

import pytest
import torch
from conftest import DEVICE

from zipvl_compile.runtime.kernels import kept_attention
from zipvl_compile.runtime.kernels.kept_attention import (
    _TAIL_ZERO_ROWS,
    available_backends,
    default_backend,
    keep_to_index,
    kept_causal_attention,
    kept_causal_attention_lse,
    kept_causal_attention_reference,
    kept_lse_reference,
    kept_mask,
    make_plan,
    pack_kept_triton,
    pack_rows_reference,
    packed_rows,
    unpack_rows_reference,
    unpack_rows_triton,
)
from zipvl_compile.runtime.kernels.plan import PrefillPlan

HEADS = [(4, 4), (4, 2), (4, 1)]  # (Hq, Hkv): MHA, GQA, MQA
# kept sets of the two batch rows: random masks with ~40 % / ~70 % kept, or explicit edge cases
PATTERNS = ["random", "one_and_all", "last_and_first", "none_and_random"]


def _gen(seed: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))


def _keep(pattern: str, batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """bool [batch, n] kept masks (fresh random draws; the last position is kept like select_tokens does)."""
    keep = torch.rand(batch, n, generator=g) < torch.tensor([0.4, 0.7])[:batch, None]
    keep[:, -1] = True
    if pattern == "one_and_all":  # count = 1 (the last token only) and count = n
        keep[0] = False
        keep[0, -1] = True
        keep[1] = True
    elif pattern == "last_and_first":  # count = 1 at either end of the sequence
        keep[:] = False
        keep[0, -1] = True
        keep[1, 0] = True
    elif pattern == "none_and_random":  # count = 0: the row is all zeros
        keep[0] = False
    return keep


def _scramble_tail(idx: torch.Tensor, count: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """idx with everything past count replaced by arbitrary in-range positions (duplicates of kept ones)."""
    n = idx.shape[-1]
    junk = torch.randint(0, n, idx.shape, generator=g)
    return torch.where(torch.arange(n) < count[:, None], idx, junk)


def _inputs(
    heads: tuple[int, int],
    n: int,
    d: int,
    dtype: torch.dtype,
    pattern: str,
    g: torch.Generator,
    bshd_memory: bool = True,
) -> tuple:
    """q, k, v as [B, H, n, d] (transposed views of (B, n, H, d) memory, as the decoder's q/k after RoPE are,
    or contiguous) and the "paper" plan: keep, idx with a scrambled tail, count (int32), scale d^-0.5, n_rep."""
    n_q, n_kv = heads
    batch = 2
    tensors = []
    for n_heads in (n_q, n_kv, n_kv):
        x = torch.randn(batch, n, n_heads, d, generator=g).to(dtype).to(DEVICE)
        tensors.append(x.transpose(1, 2) if bshd_memory else x.transpose(1, 2).contiguous())
    keep = _keep(pattern, batch, n, g)
    idx, count = keep_to_index(keep)
    idx = _scramble_tail(idx, count, g)
    count = count.to(torch.int32)  # any integer dtype is accepted
    return (*tensors, _paper_plan(keep.to(DEVICE), idx.to(DEVICE), count.to(DEVICE), d**-0.5, n_q // n_kv))


def _paper_plan(keep: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, scale: float, n_rep: int) -> PrefillPlan:
    """The plan of the kept-only attention (no padding; window and sinks unused)."""
    return PrefillPlan("paper", keep, idx, count, torch.ones_like(keep), 0, 0, scale, n_rep)


def test_keep_to_index_and_kept_mask() -> None:
    g = _gen("index")
    keep = torch.rand(3, 50, generator=g) < 0.3
    keep[2] = True
    idx, count = keep_to_index(keep)
    assert count.tolist() == keep.sum(dim=-1).tolist()
    for b in range(3):
        assert sorted(idx[b].tolist()) == list(range(50))
        kept = idx[b, : count[b]]
        assert (kept.diff() > 0).all() and keep[b, kept].all()
    assert torch.equal(kept_mask(_scramble_tail(idx, count, g), count), keep)


def test_reference_matches_per_row_loop() -> None:
    """The O(n^2) reference against gather -> causal softmax -> scatter written out per row and head."""
    q, k, v, plan = _inputs((4, 2), 40, 16, torch.float64, "random", _gen("loop"))
    out = kept_causal_attention_reference(q, k, v, plan)
    expect = torch.zeros_like(out)
    idx, count, scale, n_rep = plan.idx, plan.count, plan.scale, plan.n_rep
    for b in range(q.shape[0]):
        t = idx[b, : count[b]]
        for h in range(q.shape[1]):
            s = q[b, h, t] @ k[b, h // n_rep, t].T * scale
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
            expect[b, h, t] = torch.softmax(s, dim=-1) @ v[b, h // n_rep, t]
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)  # the reference runs SDPA in fp32


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_path_matches_reference(dtype: torch.dtype, heads: tuple, pattern: str, use_triton: bool) -> None:
    g = _gen((dtype, heads, pattern, use_triton))
    q, k, v, plan = _inputs(heads, 24, 16, dtype, pattern, g, bshd_memory=not use_triton)
    out = kept_causal_attention(q, k, v, plan, backend="sdpa_padded", use_triton=use_triton)
    ref = kept_causal_attention_reference(q.float(), k.float(), v.float(), plan)
    keep = plan.keep
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(out.float(), ref, **tol)
    assert (out.transpose(1, 2)[~keep] == 0).all()
    assert (out.transpose(1, 2)[keep] != 0).any(dim=-1).all()


def _check_kept_part(q, k, v, plan: PrefillPlan, backend: str, use_triton: bool | None, tol: dict) -> None:
    """kept_causal_attention_lse: packed output and lse of every kept position (read through part.plan.inv)
    match the references."""
    part = kept_causal_attention_lse(q, k, v, plan, backend=backend, use_triton=use_triton)
    keep = plan.keep
    rows = part.plan.inv.view(keep.shape)[keep]
    ref_out = kept_causal_attention_reference(q.float(), k.float(), v.float(), plan)
    ref_lse = kept_lse_reference(q.float(), k.float(), plan)
    assert part.out.dtype == q.dtype and part.lse.dtype == torch.float32
    torch.testing.assert_close(part.out[rows].float(), ref_out.transpose(1, 2)[keep], **tol)
    torch.testing.assert_close(part.lse[rows], ref_lse.transpose(1, 2)[keep], **tol)


def test_kept_lse_reference_matches_per_row_loop() -> None:
    q, k, _, plan = _inputs((4, 2), 30, 16, torch.float64, "random", _gen("lse loop"))
    lse = kept_lse_reference(q, k, plan)
    assert lse[~plan.keep[:, None].expand_as(lse)].eq(float("-inf")).all()
    idx, count, scale, n_rep = plan.idx, plan.count, plan.scale, plan.n_rep
    for b in range(q.shape[0]):
        t = idx[b, : count[b]]
        for h in range(q.shape[1]):
            s = q[b, h, t] @ k[b, h // n_rep, t].T * scale
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
            torch.testing.assert_close(lse[b, h, t], s.logsumexp(dim=-1).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kept_part_with_lse_matches_reference(dtype: torch.dtype, use_triton: bool, monkeypatch) -> None:
    """The "sdpa_padded" lse by query chunks (forced small here) and the "reference" backend's packed form."""
    monkeypatch.setattr(kept_attention, "_LSE_CHUNK_SCORES", 2 * 4 * 24 * 5)  # 5 queries per chunk
    g = _gen(("lse", dtype, use_triton))
    q, k, v, plan = _inputs((4, 2), 24, 16, dtype, "none_and_random", g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    for backend in ("sdpa_padded", "reference"):
        _check_kept_part(q, k, v, plan, backend, use_triton, tol)


def _check_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> tuple:
    """The one-launch Triton pack against make_plan + pack_rows_reference: equal plan, equal valid rows, zeros in
    the _TAIL_ZERO_ROWS rows after them (within the buffer). Returns (plan, q_packed, total)."""
    plan, *packed = pack_kept_triton(q, k, v, idx, count)
    expect_plan, rows = make_plan(idx, count), packed_rows(idx, count)
    assert torch.equal(plan.cu_seqlens, expect_plan.cu_seqlens) and torch.equal(plan.inv, expect_plan.inv)
    total = int(count.sum())
    for x, got in zip((q, k, v), packed, strict=True):
        assert got.shape == (q.shape[0] * q.shape[2], x.shape[1], x.shape[3])
        assert torch.equal(got[:total], pack_rows_reference(x.transpose(1, 2), rows)[:total])
        assert (got[total : total + _TAIL_ZERO_ROWS] == 0).all()
    return plan, packed[0], total


@pytest.mark.parametrize("bshd_memory", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_pack_unpack_match_reference(dtype: torch.dtype, bshd_memory: bool) -> None:
    g = _gen(("pack", dtype, bshd_memory))
    q, k, v, prefill = _inputs((6, 2), 37, 24, dtype, "random", g, bshd_memory)
    plan, packed, total = _check_pack(q, k, v, prefill.idx, prefill.count)
    # attention output stand-in: any values in the valid rows, NaN in the padding rows (never read)
    values = torch.randn(packed.shape, generator=g).to(dtype).to(DEVICE)
    out_packed = torch.where(torch.arange(packed.shape[0], device=DEVICE)[:, None, None] < total, values, float("nan"))
    unpacked = unpack_rows_triton(out_packed, plan)
    assert torch.equal(unpacked, unpack_rows_reference(out_packed, plan))
    assert not unpacked.isnan().any()


def test_triton_pack_edge_counts() -> None:
    """Empty batch rows, a full row, the last row ending near the buffer's end (the zeroed tail is cut there),
    head dim 24 (not a power of two) and more batch rows than one count block of the kernel."""
    g = _gen("pack_edges")
    batch, n, d = 70, 9, 24
    q, k, v = (torch.randn(batch, h, n, d, generator=g).to(DEVICE) for h in (4, 2, 2))
    keep = torch.rand(batch, n, generator=g) < 0.5
    keep[0], keep[1], keep[-1] = False, True, True
    idx, count = keep_to_index(keep.to(DEVICE))
    _check_pack(q, k, v, idx, count)


def test_plan_layout() -> None:
    """cu_seqlens, and packed row r of batch row b at slot j holds position idx[b, j]."""
    keep = _keep("random", 2, 30, _gen("plan"))
    idx, count = keep_to_index(keep)
    plan, rows = make_plan(idx, count), packed_rows(idx, count)
    c0, c1 = count.tolist()
    assert plan.cu_seqlens.dtype == torch.int32 and plan.cu_seqlens.tolist() == [0, c0, c0 + c1]
    assert torch.equal(rows.pos[:c0], idx[0, :c0]) and torch.equal(rows.pos[c0 : c0 + c1], idx[1, :c1])
    assert rows.batch[: c0 + c1].tolist() == [0] * c0 + [1] * c1
    inv = plan.inv.view(2, 30)
    assert torch.equal(inv >= 0, keep)
    assert torch.equal(rows.pos[inv[keep]], keep.nonzero()[:, 1])


def test_default_backend_and_validation() -> None:
    q = torch.randn(1, 2, 8, 16)
    if not torch.cuda.is_available():
        assert available_backends() == ("sdpa_padded", "reference")
    assert default_backend(q) == "reference"
    keep = torch.rand(1, 8, generator=_gen("default")) < 0.5
    plan = _paper_plan(keep, *keep_to_index(keep), 0.25, 2)
    out = kept_causal_attention(q, q[:, :1], q[:, :1], plan)
    ref = kept_causal_attention_reference(q, q[:, :1], q[:, :1], plan)
    assert torch.equal(out, ref) and out.transpose(1, 2).is_contiguous()
    with pytest.raises(ValueError, match="not available"):
        kept_causal_attention(q, q, q, plan._replace(n_rep=1), backend="no_such_backend")


def test_traces_fullgraph_without_host_sync() -> None:
    """The packing path (torch gather/scatter + SDPA) compiles with fullgraph=True: no .item(), no
    data-dependent shapes; a second kept set of another size reuses the graph."""
    torch._dynamo.reset()
    fn = torch.compile(kept_causal_attention, fullgraph=True, backend="eager")
    for pattern in ("random", "one_and_all"):
        q, k, v, plan = _inputs((4, 2), 24, 16, torch.float32, pattern, _gen(pattern))
        out = fn(q, k, v, plan, backend="sdpa_padded", use_triton=False)
        ref = kept_causal_attention_reference(q, k, v, plan)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# GPU (bf16): every backend against the fp32 reference


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("backend", ["fa4", "fa2", "torch_varlen", "sdpa_padded"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backend_matches_reference(backend: str, heads: tuple, pattern: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    n, d = 1000, 128  # not a multiple of any tile size
    q, k, v, plan = _inputs(heads, n, d, torch.bfloat16, pattern, _gen(("gpu", backend, heads, pattern)))
    out = kept_causal_attention(q, k, v, plan, backend=backend)
    ref = kept_causal_attention_reference(q.float(), k.float(), v.float(), plan)
    keep = plan.keep
    assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    assert _rel_err(out, ref) < 1e-2
    assert (out.transpose(1, 2)[~keep] == 0).all()
    assert not out.isnan().any()


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("backend", ["fa4", "fa2", "torch_varlen", "sdpa_padded"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backend_lse_matches_reference(backend: str, heads: tuple) -> None:
    """Every varlen backend's log-sum-exp (layout, natural log) against the fp32 reference."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    q, k, v, plan = _inputs(heads, 1000, 128, torch.bfloat16, "random", _gen(("lse", backend)))
    _check_kept_part(q, k, v, plan, backend, None, dict(rtol=2e-2, atol=2e-2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_default_backend_and_pack_kernels() -> None:
    q, k, v, prefill = _inputs((8, 2), 3000, 128, torch.bfloat16, "random", _gen("dflt"))
    assert default_backend(q) == available_backends()[0]
    _check_pack(q, k, v, prefill.idx, prefill.count)
    out = kept_causal_attention(q, k, v, prefill)
    ref = kept_causal_attention_reference(q.float(), k.float(), v.float(), prefill)
    assert _rel_err(out, ref) < 1e-2
