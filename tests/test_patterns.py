"""Toy modules for each attention pattern: rewritten and equal to eager, or untouched with a reason."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_attention import ToyDecoder, Variant, inputs, visible_rows

import zipvl_compile


def compile_and_compare(v: Variant, dtype=torch.float32, batch=2, n=9, seed=0):
    """Compile ``ToyDecoder(v)``; returns the single site record after checking the outputs."""
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    model = ToyDecoder(v)
    args = inputs(v, batch, n, dtype, seed)
    expected = model(*args)
    compiled = torch.compile(model, backend="zipvl", options={"inner": "eager", "tau": 1.0}, fullgraph=True)
    got = compiled(*args)
    sites = zipvl_compile.report().sites
    assert len(sites) == 1, str(zipvl_compile.report())
    site = sites[0]
    assert site.rewritten == (site.reason is None), site
    if isinstance(expected, tuple):
        expected, got = expected[0], got[0]
    rows = visible_rows(v, args[3], n)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(torch.where(rows, got, 0), torch.where(rows, expected, 0), **tol)
    return site


@pytest.mark.parametrize("pattern", ["sdpa", "eager"])
@pytest.mark.parametrize("mask", ["causal", "causal_padding", "is_causal", "sliding", "input_float", "none"])
def test_masks(pattern, mask):
    if pattern == "eager" and mask == "is_causal":
        pytest.skip("is_causal is an SDPA argument")
    site = compile_and_compare(Variant(pattern=pattern, mask=mask, n_rep=2))
    if mask in ("causal", "is_causal"):
        assert site.rewritten and site.mask == "causal"
    elif mask == "causal_padding":
        assert site.rewritten and site.mask == "causal+padding"
    elif mask == "sliding":
        assert site.rewritten and site.mask == "causal+window"
    else:
        # no causal structure and no KV cache: an encoder-style attention, left alone
        assert not site.rewritten and site.kind == "encoder" and "encoder" in site.reason


@pytest.mark.parametrize("repeat", ["expand", "interleave", "gqa_flag"])
@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_repeat_kv_peeled(repeat, n_rep):
    site = compile_and_compare(Variant(pattern="sdpa", n_rep=n_rep, repeat=repeat, heads=4))
    assert site.rewritten and site.n_rep == n_rep


@pytest.mark.parametrize("scale", ["mul", "div"])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_eager_scale_and_softcap(scale, softcap):
    site = compile_and_compare(Variant(pattern="eager", scale=scale, softcap=softcap, n_rep=2))
    assert site.rewritten and site.pattern == "eager"


def test_sdpa_default_scale():
    assert compile_and_compare(Variant(pattern="sdpa", scale="default")).rewritten


def test_fp16():
    assert compile_and_compare(Variant(pattern="eager", n_rep=2), dtype=torch.float16).rewritten


def test_returned_weights_left_alone():
    site = compile_and_compare(Variant(pattern="eager", return_weights=True))
    assert not site.rewritten and "outside" in site.reason


def test_training_dropout_left_alone():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    v = Variant(pattern="sdpa", dropout=0.1)
    torch.compile(ToyDecoder(v), backend="zipvl", options={"inner": "eager"})(*inputs(v, 1, 5, torch.float32, 0))
    (site,) = zipvl_compile.report().sites
    assert not site.rewritten and "dropout" in site.reason


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    pattern=st.sampled_from(["sdpa", "eager"]),
    heads_kv=st.sampled_from([1, 2, 3]),
    n_rep=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16, 32]),
    mask=st.sampled_from(["causal", "causal_padding", "is_causal", "sliding", "input_float", "none"]),
    scale=st.sampled_from(["mul", "div", "default"]),
    softcap=st.sampled_from([0.0, 0.0, 20.0]),
    window=st.integers(1, 6),
    repeat=st.sampled_from(["expand", "interleave", "gqa_flag"]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    n=st.integers(2, 12),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_fuzz_rewritten_and_equal_or_untouched(
    pattern, heads_kv, n_rep, head_dim, mask, scale, softcap, window, repeat, dtype, n, batch, seed
):
    if pattern == "eager":
        mask = "causal" if mask == "is_causal" else mask
        scale = "mul" if scale == "default" else scale
        repeat = "expand" if repeat == "gqa_flag" else repeat
    else:
        softcap = 0.0
        scale = "mul" if scale == "div" else scale
    v = Variant(
        pattern=pattern,
        heads=heads_kv * n_rep,
        n_rep=n_rep,
        head_dim=head_dim,
        mask=mask,
        scale=scale,
        softcap=softcap,
        window=window,
        repeat=repeat,
    )
    site = compile_and_compare(v, dtype=dtype, batch=batch, n=n, seed=seed)
    assert site.rewritten or site.reason
