"""zipvl.sparse_attention against its contract (docs/architecture.md §5, docs/method.md §3-§6)."""

from __future__ import annotations

import pytest
import torch

import zipvl_compile  # noqa: F401  (registers the ops)
from zipvl_compile.runtime.kernels.select_reference import select_tokens
from zipvl_compile.runtime.reference import causal_mask, dense_attention

OP = torch.ops.zipvl.sparse_attention


def _qkv(batch, hq, hkv, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]


def _reference(q, k, v, keep, key_valid, scale, n_rep):
    """Causal attention among kept tokens, computed independently with a dense mask; zeros elsewhere."""
    n = q.shape[2]
    mask = keep[:, None, :, None] & keep[:, None, None, :] & causal_mask(n, n, q.device) & key_valid[:, None, None, :]
    out = dense_attention(q, k, v, mask, False, scale, n_rep)
    return torch.where(keep[:, None, :, None], out, 0)


def _args(tau=0.9, recent=4, random=4, min_keep=0, seed=0, **more):
    """The op's options by keyword (its geometry is passed as attn_mask / is_causal / scale / n_rep)."""
    return dict(tau=tau, n_probe_recent=recent, n_probe_random=random, min_keep=min_keep, seed=seed, **more)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_planted_structure_kept_set_exact(hq, hkv, dtype):
    """Five 'sink' keys take almost all the attention of every probe: the kept set is them + the last token."""
    n, d, scale = 48, 16, 0.25
    q, k, v = _qkv(1, hq, hkv, n, d, dtype)
    sinks = torch.tensor([0, 7, 19, 30, 41])
    direction = torch.randn(d, generator=torch.Generator().manual_seed(5))
    q = (0.05 * q + direction.to(dtype)).to(dtype)
    k = 0.05 * k
    k[:, :, sinks] = (4.0 * direction).to(dtype)
    out, keep, ratio = OP(
        q, k, v, None, is_causal=True, scale=scale, n_rep=hq // hkv, **_args(tau=0.95, recent=8, random=8)
    )
    expected = torch.zeros(n, dtype=torch.bool)
    expected[sinks] = True
    expected[-1] = True
    # probe rows before the first sink see only non-sink keys: early keys score high through Eq. 7's mean
    assert torch.equal(keep[0, 8:], expected[8:]), keep.nonzero().flatten().tolist()
    assert ratio[0].item() == pytest.approx(keep.sum().item() / n)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(
        out, _reference(q, k, v, keep, torch.ones(1, n, dtype=torch.bool), scale, hq // hkv), **tol
    )


@pytest.mark.parametrize(("dense_below", "dense"), [(41, True), (40, False), (0, False), (-1, True)])
def test_prompts_shorter_than_dense_below_run_dense(dense_below, dense):
    """n = 40 below the limit: exact dense attention, every valid token kept, and the stats slot says so (-1 is
    the device's default, 4096 on a CPU); at or above it the sparse path selects."""
    from zipvl_compile.runtime import stats

    q, k, v = _qkv(2, 4, 2, 40, 16)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., :6] = False
    slot, moments = stats.new_slot(q.device)
    out, keep, ratio = OP(
        q, k, v, mask, is_causal=True, scale=0.25, n_rep=2, stats_slot=slot, **_args(tau=0.5, dense_below=dense_below)
    )
    assert torch.equal(keep, mask[:, 0, 0]) is dense  # every valid token kept iff dense
    assert moments[2].item() == float(dense)
    assert torch.equal(moments[:2], torch.stack([ratio.mean(), (ratio * ratio).mean()]))  # (1, 1) when dense
    if dense:
        want = dense_attention(q, k, v, mask, True, 0.25, 2).masked_fill(~mask[:, 0, 0, None, :, None], 0)
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        assert torch.equal(ratio, torch.ones(2))
    else:
        assert (ratio < 1).all()


@pytest.mark.parametrize("n", [5, 12, 40])
def test_tau_one_equals_dense(n):
    q, k, v = _qkv(2, 4, 2, n, 16)
    out, keep, ratio = OP(q, k, v, None, is_causal=True, scale=0.25, n_rep=2, **_args(tau=1.0))
    torch.testing.assert_close(out, dense_attention(q, k, v, None, True, 0.25, 2), atol=0, rtol=0)
    assert keep.all() and torch.equal(ratio, torch.ones(2))


def test_batch_left_padding_key_mask():
    n, pad = 30, 9
    q, k, v = _qkv(2, 4, 2, n, 16, seed=3)
    padding = torch.ones(2, n, dtype=torch.bool)
    padding[1, :pad] = False
    out, keep, ratio = OP(
        q, k, v, padding[:, None, None, :], is_causal=True, scale=0.25, n_rep=2, **_args(tau=0.8, min_keep=3)
    )
    assert not keep[1, :pad].any(), "a padding token was kept"
    assert keep[:, -1].all(), "the last valid token must be kept"
    assert (keep.sum(-1) >= 3).all()
    torch.testing.assert_close(ratio, keep.sum(-1).float() / padding.sum(-1).float())
    torch.testing.assert_close(out, _reference(q, k, v, keep, padding, 0.25, 2), atol=1e-5, rtol=1e-5)
    assert (out[~keep[:, None, :, None].expand_as(out)] == 0).all()


def test_full_mask_matches_key_padding_form():
    """The [B,1,n,n] bool form of the contract gives the same result as causal + key padding."""
    n = 26
    q, k, v = _qkv(2, 4, 4, n, 8, seed=4)
    padding = torch.ones(2, n, dtype=torch.bool)
    padding[0, :5] = False
    full = causal_mask(n, n, q.device)[None, None] & padding[:, None, None, :]
    a = OP(q, k, v, padding[:, None, None, :], is_causal=True, scale=0.3, n_rep=1, **_args(tau=0.85))
    b = OP(q, k, v, full, is_causal=False, scale=0.3, n_rep=1, **_args(tau=0.85))
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


def test_sliding_window_mask_honoured():
    n, window = 20, 4
    q, k, v = _qkv(1, 2, 2, n, 8, seed=6)
    i = torch.arange(n)
    mask = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))[None, None]
    out, keep, _ = OP(q, k, v, mask, is_causal=False, scale=0.3, n_rep=1, **_args(tau=0.7))
    pair = keep[:, None, :, None] & keep[:, None, None, :]
    want = torch.where(keep[:, None, :, None], dense_attention(q, k, v, mask & pair, False, 0.3, 1), 0)
    torch.testing.assert_close(out, want.nan_to_num(0.0), atol=1e-5, rtol=1e-5)


def test_n_below_probe_count_and_seed_determinism():
    q, k, v = _qkv(1, 2, 1, 6, 8, seed=7)
    first = OP(q, k, v, None, is_causal=True, scale=0.3, n_rep=2, **_args(tau=0.5, recent=64, random=64, seed=1))
    again = OP(q, k, v, None, is_causal=True, scale=0.3, n_rep=2, **_args(tau=0.5, recent=64, random=64, seed=1))
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    assert first[1][0, -1]


def test_fullgraph_traceable():
    q, k, v = _qkv(2, 4, 2, 24, 16, seed=8)
    fn = torch.compile(
        lambda q, k, v: OP(q, k, v, None, is_causal=True, scale=0.25, n_rep=2, **_args()),
        fullgraph=True,
        backend="aot_eager",
    )
    eager = OP(q, k, v, None, is_causal=True, scale=0.25, n_rep=2, **_args())
    for a, b in zip(fn(q, k, v), eager):
        torch.testing.assert_close(a, b)


def test_force_ratio_fixes_the_kept_count():
    q, k, v = _qkv(2, 4, 2, 50, 16, seed=9)
    _, keep, ratio = OP(
        q, k, v, None, is_causal=True, scale=0.25, n_rep=2, **_args(tau=0.5, min_keep=0, force_ratio=0.4)
    )
    counts = keep.sum(-1)
    assert ((counts == 20) | (counts == 21)).all(), counts  # p = 20, plus the forced last token if not in it
    torch.testing.assert_close(ratio, counts.float() / 50)


def test_n_minus_j_normaliser():
    """score_norm="n_minus_j": the kept set is Eqs. 6-8 with each key's probe sum divided by the number of valid
    positions at or after it (ZipCache), instead of the probe rows that see it; padding stays out."""
    n, pad = 40, 7
    q, k, v = _qkv(2, 4, 2, n, 16, seed=10)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :pad] = False
    mask = valid[:, None, None, :]
    colsum, seen = torch.ops.zipvl.probe_scores(
        q, k, mask, is_causal=True, scale=0.25, n_rep=2, n_probe_recent=4, n_probe_random=4, seed=0
    )
    after = torch.stack([valid[b].flip(0).cumsum(0).flip(0) for b in range(2)]).float()
    assert torch.equal(after[0], torch.arange(n, 0, -1).float())
    want, _ = select_tokens(colsum, after, valid, 0.8, 3)
    _, keep, ratio = OP(
        q, k, v, mask, is_causal=True, scale=0.25, n_rep=2, **_args(tau=0.8, min_keep=3, score_norm="n_minus_j")
    )
    assert torch.equal(keep, want) and not keep[1, :pad].any()
    _, keep_probes, _ = OP(q, k, v, mask, is_causal=True, scale=0.25, n_rep=2, **_args(tau=0.8, min_keep=3))
    assert torch.equal(keep_probes, select_tokens(colsum, seen, valid, 0.8, 3)[0])
    assert not torch.equal(keep, keep_probes), "the normaliser should change the kept set on these inputs"
