"""Sink attention (kept keys + local window + attention sinks): the reference against a per-query loop, the fast
path (kept varlen part + the Triton window/sinks/merge kernel, under the interpreter on CPU) against the
reference, and the all-kept case against causal dense attention."""

import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from zipvl_compile.runtime.kernels.kept_attention import available_backends, keep_to_index, kept_causal_attention_lse
from zipvl_compile.runtime.kernels.plan import PrefillPlan
from zipvl_compile.runtime.kernels.sink_attention import (
    SinkTiles,
    sink_attention,
    sink_attention_reference,
    sink_mask,
    sink_merge_triton,
    sink_positions,
)


def _gen(seed: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))


def _valid(padding: str, batch: int, n: int) -> torch.Tensor:
    """bool [batch, n]: "left" / "right" padding of 5 and 2 tokens on the two rows, or "none"."""
    valid = torch.ones(batch, n, dtype=torch.bool)
    for b, pad in enumerate((5, 2)[:batch]):
        if padding == "left":
            valid[b, :pad] = False
        elif padding == "right":
            valid[b, n - pad :] = False
    return valid


def _keep(pattern: str, valid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """bool [B, n]: "random" (~40 % / ~60 %, drawn over padding too: a kept padding token counts as not
    kept), "all" (every valid token), "last" (the last valid token only)."""
    batch, n = valid.shape
    if pattern == "random":
        return torch.rand(batch, n, generator=g) < torch.tensor([0.4, 0.6])[:batch, None]
    if pattern == "all":
        return valid.clone()
    last = n - 1 - valid.flip(-1).to(torch.int64).argmax(dim=-1)
    return torch.zeros_like(valid).scatter_(-1, last[:, None], True)


def _plan(keep: torch.Tensor, valid: torch.Tensor, window: int, sinks: int, scale: float, n_rep: int) -> PrefillPlan:
    """The "sinks" plan; keep may hold padding tokens, the kept list is that of keep & valid."""
    return PrefillPlan("sinks", keep, *keep_to_index(keep & valid), valid, window, sinks, scale, n_rep)


def _inputs(heads: tuple[int, int], n: int, d: int, dtype: torch.dtype, padding: str, pattern: str, g) -> tuple:
    """q, k, v [B, H, n, d] (transposed views of (B, n, H, d) memory, as the decoder's), keep, valid, scale,
    n_rep; B = 2, everything on DEVICE."""
    n_q, n_kv = heads
    q, k, v = (torch.randn(2, n, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2) for h in (n_q, n_kv, n_kv))
    valid = _valid(padding, 2, n)
    keep = _keep(pattern, valid, g)
    return q, k, v, keep.to(DEVICE), valid.to(DEVICE), d**-0.5, n_q // n_kv


def test_reference_matches_per_query_loop() -> None:
    """The O(n^2) oracle against the definition written out per (row, head, query) in fp64."""
    g = _gen("loop")
    window, sinks, n = 3, 2, 14
    q, k, v, keep, valid, scale, n_rep = _inputs((4, 2), n, 8, torch.float64, "left", "random", g)
    valid[1] = _valid("right", 2, n)[1].to(DEVICE)  # row 0 left-, row 1 right-padded
    out = sink_attention_reference(q, k, v, _plan(keep, valid, window, sinks, scale, n_rep))
    expect = torch.zeros_like(out)
    for b in range(2):
        rank = valid[b].cumsum(0) - valid[b].long()
        for i in range(n):
            if not valid[b, i]:
                continue
            allowed = [
                j
                for j in range(i + 1)
                if valid[b, j] and ((keep[b, i] and keep[b, j]) or i - j < window or rank[j] < sinks)
            ]
            for h in range(q.shape[1]):
                s = q[b, h, i] @ k[b, h // n_rep, allowed].T * scale
                expect[b, h, i] = torch.softmax(s, dim=-1) @ v[b, h // n_rep, allowed]
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)  # the reference runs SDPA in fp32
    assert out.transpose(1, 2).is_contiguous()
    mask = sink_mask(keep, valid, window, sinks)
    assert mask.shape == (2, 1, n, n) and mask.dtype == torch.bool


def test_sink_positions() -> None:
    valid = _valid("left", 2, 10)
    valid[1, 4] = False  # a hole: the sinks are the first valid tokens, not the first positions after padding
    assert sink_positions(valid, 3).tolist() == [[5, 6, 7], [2, 3, 5]]
    assert sink_positions(valid, 8).tolist() == [[5, 6, 7, 8, 9, -1, -1, -1], [2, 3, 5, 6, 7, 8, 9, -1]]
    assert sink_positions(valid, 0).tolist() == [[-1], [-1]]


# (dtype, (Hq, Hkv), n, window, sinks, padding, keep pattern, kept-part backend): a hand-picked grid (the
# interpreter costs ~0.5 s per call). n = 150 spans several query blocks (64 positions per block at n_rep 2,
# 128 at n_rep 1); sinks = 70 spans two sink tiles; n = 20 < window = 64.
CASES = [
    (torch.float32, (4, 2), 40, 8, 4, "left", "random", "reference"),
    (torch.float32, (2, 2), 40, 8, 4, "right", "random", "sdpa_padded"),
    (torch.float16, (4, 1), 40, 8, 4, "left", "random", "sdpa_padded"),
    (torch.float16, (6, 2), 40, 8, 0, "right", "random", "reference"),
    (torch.float32, (4, 2), 20, 64, 3, "left", "random", "sdpa_padded"),
    (torch.float32, (2, 2), 40, 1, 0, "right", "random", "reference"),
    (torch.float32, (4, 2), 40, 1, 4, "left", "last", "sdpa_padded"),
    (torch.float16, (4, 2), 40, 8, 2, "none", "last", "reference"),
    (torch.float32, (4, 2), 150, 16, 4, "left", "random", "sdpa_padded"),
    (torch.float32, (2, 2), 150, 40, 70, "right", "random", "reference"),
]


@pytest.mark.parametrize(("dtype", "heads", "n", "window", "sinks", "padding", "pattern", "backend"), CASES)
def test_triton_path_matches_reference(
    dtype: torch.dtype,
    heads: tuple,
    n: int,
    window: int,
    sinks: int,
    padding: str,
    pattern: str,
    backend: str,
) -> None:
    g = _gen((dtype, heads, n, window, sinks, padding, pattern, backend))
    q, k, v, keep, valid, scale, n_rep = _inputs(heads, n, 16, dtype, padding, pattern, g)
    plan = _plan(keep, valid, window, sinks, scale, n_rep)
    out = sink_attention(q, k, v, plan, backend=backend, use_triton=True)
    ref = sink_attention_reference(q.float(), k.float(), v.float(), plan)
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(out.float(), ref, **tol)
    rows = out.transpose(1, 2)
    assert (rows[~valid] == 0).all()
    assert (rows[valid] != 0).any(dim=-1).all()


@pytest.mark.parametrize(
    "tiles",
    [
        SinkTiles(rows=64, block_n=16, num_warps=2),
        SinkTiles(rows=256, block_n=64),
        SinkTiles(rows=32, block_n=16, num_warps=1),  # 16 positions: window tiles inside every row's window
    ],
)
def test_merge_tiles_match_reference(tiles: SinkTiles) -> None:
    """Other launch tiles (more query blocks and key tiles per window, or fewer) give the reference's result;
    with 16-position blocks and 16-key tiles a window of 40 has tiles that skip the position masks."""
    q, k, v, keep, valid, scale, n_rep = _inputs((4, 2), 150, 16, torch.float32, "left", "random", _gen(tiles))
    plan = _plan(keep, valid, 40, 20, scale, n_rep)._replace(keep=keep & valid)
    out = sink_merge_triton(q, k, v, plan, kept_causal_attention_lse(q, k, v, plan, "reference", True), tiles)
    torch.testing.assert_close(out, sink_attention_reference(q, k, v, plan), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="SinkTiles.block_n"):
        sink_merge_triton(q, k, v, plan, None, tiles._replace(block_n=24))


@pytest.mark.parametrize("backend", ["reference", "sdpa_padded"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_all_kept_equals_causal_dense(padding: str, backend: str) -> None:
    """Every valid token kept: the window and the sinks add nothing (all their keys are in the kept part), so
    each row's valid tokens get plain causal attention among themselves."""
    q, k, v, keep, valid, scale, n_rep = _inputs((4, 2), 40, 16, torch.float32, padding, "all", _gen(padding))
    plan = _plan(keep, valid, 8, 4, scale, n_rep)
    out = sink_attention(q, k, v, plan, backend=backend, use_triton=True)
    ref = sink_attention_reference(q, k, v, plan)
    for b in range(2):
        span = valid[b].nonzero()[:, 0]
        dense = F.scaled_dot_product_attention(
            *(x[b : b + 1, :, span] for x in (q, k, v)), is_causal=True, scale=scale, enable_gqa=True
        )[0]
        torch.testing.assert_close(out[b, :, span], dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref[b, :, span], dense, rtol=1e-5, atol=1e-5)
        assert (out[b][:, ~valid[b]] == 0).all()


def test_cpu_default_is_the_reference_and_bad_arguments_raise() -> None:
    q, k, v, keep, valid, scale, n_rep = _inputs((4, 2), 24, 16, torch.float32, "left", "random", _gen("cpu"))
    plan = _plan(keep, valid, 8, 4, scale, n_rep)
    if not q.is_cuda:
        assert torch.equal(sink_attention(q, k, v, plan), sink_attention_reference(q, k, v, plan))
    with pytest.raises(ValueError, match="window >= 1"):
        sink_attention(q, k, v, plan._replace(window=0))
    with pytest.raises(ValueError, match="sinks >= 0"):
        sink_attention(q, k, v, plan._replace(sinks=-1))
    with pytest.raises(ValueError, match="keep must be bool"):
        sink_attention(q, k, v, plan._replace(keep=keep.int()))
    with pytest.raises(ValueError, match="n_rep = 3"):
        sink_attention(q, k, v, plan._replace(n_rep=3))


# ---------------------------------------------------------------------------------------------------------
# GPU (bf16): the CUDA path with every kept-part backend against the fp32 reference


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("backend", ["fa4", "fa2", "torch_varlen", "sdpa_padded", None])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_sink_attention_matches_reference(backend: str | None, heads: tuple) -> None:
    if backend is not None and backend not in available_backends():
        pytest.skip(f"{backend} not available")
    n, d = 1000, 128  # not a multiple of any tile size
    g = _gen(("gpu", backend, heads))
    q, k, v, keep, valid, scale, n_rep = _inputs(heads, n, d, torch.bfloat16, "left", "random", g)
    plan = _plan(keep, valid, 64, 4, scale, n_rep)
    out = sink_attention(q, k, v, plan, backend=backend)
    ref = sink_attention_reference(q.float(), k.float(), v.float(), plan)
    assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
    assert (out.transpose(1, 2)[~valid] == 0).all()
    assert not out.isnan().any()
