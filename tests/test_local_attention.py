"""The ``local_window`` prefill: every query over the kept keys plus its window. The Triton kernel against its
plain-torch reference (CPU: interpreter, fp32/fp16; GPU: bf16), the reference against an independent per-query
loop, and the option end to end (op, backend, validation)."""

import zlib

import pytest
import torch
from conftest import DEVICE

import zipvl_compile
from zipvl_compile import ZipVLConfig
from zipvl_compile.runtime.kernels.kept_attention import keep_to_index
from zipvl_compile.runtime.kernels.local_attention import local_attention_reference, local_attention_triton
from zipvl_compile.runtime.kernels.plan import PrefillPlan
from zipvl_compile.runtime.reference import dense_attention
from zipvl_compile.testing import build_text

OP = torch.ops.zipvl.sparse_attention
HEADS = [(4, 4), (4, 2), (3, 1)]  # MHA, GQA, MQA


def _gen(seed: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))


def _inputs(heads, n, d, dtype, g, pad=13, device="cpu"):
    """q, k, v with outlier rows, keep ~35 % (last token kept, padding never), valid with row 1 left-padded."""
    hq, hkv = heads
    q, k, v = (torch.randn(2, h, n, d, generator=g) for h in (hq, hkv, hkv))
    k[:, :, 3] *= 6.0  # a sink-like key
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :pad] = False
    keep = (torch.rand(2, n, generator=g) < 0.35) & valid
    keep[:, -1] = True
    return *(x.to(dtype).to(device) for x in (q, k, v)), keep.to(device), valid.to(device)


def _plan(keep, valid, window, scale, n_rep) -> PrefillPlan:
    return PrefillPlan("local", keep, *keep_to_index(keep), valid, window, 0, scale, n_rep)


def _loop_reference(q, k, v, keep, valid, window, scale, n_rep):
    """One query at a time: softmax over {j <= i : valid_j and (keep_j or i - j < window)}; 0 at padding rows."""
    batch, hq, n, _ = q.shape
    out = torch.zeros(batch, hq, n, v.shape[-1])
    for b in range(batch):
        for i in range(n):
            j = torch.arange(i + 1)
            cols = j[valid[b, : i + 1] & (keep[b, : i + 1] | (i - j < window))]
            if not valid[b, i] or cols.numel() == 0:
                continue
            for h in range(hq):
                s = (q[b, h, i].float() @ k[b, h // n_rep, cols].float().T) * scale
                out[b, h, i] = torch.softmax(s, -1) @ v[b, h // n_rep, cols].float()
    return out


@pytest.mark.parametrize("window", [1, 5, 64])
def test_reference_matches_per_query_loop(window: int) -> None:
    q, k, v, keep, valid = _inputs((4, 2), 40, 8, torch.float32, _gen(("loop", window)))
    out = local_attention_reference(q, k, v, _plan(keep, valid, window, 0.3, 2))
    torch.testing.assert_close(out, _loop_reference(q, k, v, keep, valid, window, 0.3, 2), atol=1e-5, rtol=1e-5)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("window", [1, 16, 70, 400])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype,d", [(torch.float32, 24), (torch.float16, 64)])
def test_triton_matches_reference(dtype: torch.dtype, d: int, heads: tuple, window: int) -> None:
    """n = 150 is not a multiple of the 64-row blocks; windows smaller than, across and beyond a block."""
    g = _gen(("triton", dtype, heads, window))
    q, k, v, keep, valid = _inputs(heads, 150, d, dtype, g, device=DEVICE)
    n_rep = heads[0] // heads[1]
    plan = _plan(keep, valid, window, d**-0.5, n_rep)
    out = local_attention_triton(q, k, v, plan)
    want = local_attention_reference(q, k, v, plan)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, want, **tol)
    assert (out[1, :, :13] == 0).all() and (out[0] != 0).any(dim=-1).all()
    assert out.transpose(1, 2).is_contiguous()


def test_op_window_keeps_selection_and_fills_every_valid_row() -> None:
    """Same kept set and ratio as the paper's mode; non-kept valid rows get an output, padding rows stay zero."""
    q, k, v, _, valid = _inputs((4, 2), 60, 16, torch.float32, _gen("op"))
    mask = valid[:, None, None, :]
    args = dict(is_causal=True, scale=0.25, n_rep=2, tau=0.8, n_probe_recent=4, n_probe_random=4, min_keep=0)
    zero_out, keep, ratio = OP(q, k, v, mask, **args)
    out, keep_w, ratio_w = OP(q, k, v, mask, **args, prefill_mode="local", local_window=8)
    assert torch.equal(keep, keep_w) and torch.equal(ratio, ratio_w)
    assert not keep[valid].all(), "the test needs non-kept tokens"
    want = local_attention_reference(q, k, v, _plan(keep, valid, 8, 0.25, 2))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    rows = out.abs().sum(dim=(1, 3)) > 0
    assert torch.equal(rows, valid)
    assert torch.equal(zero_out.abs().sum(dim=(1, 3)) > 0, keep)


def test_window_covering_the_prompt_is_dense_attention() -> None:
    """local_window >= n: every earlier key is in every window, whatever tau keeps."""
    q, k, v, _, _ = _inputs((4, 1), 33, 16, torch.float32, _gen("dense"))
    options = dict(tau=0.5, n_probe_recent=4, n_probe_random=4, min_keep=0, prefill_mode="local", local_window=33)
    out, keep, _ = OP(q, k, v, None, is_causal=True, scale=0.25, n_rep=4, **options)
    assert not keep.all()
    torch.testing.assert_close(out, dense_attention(q, k, v, None, True, 0.25, 4), atol=1e-5, rtol=1e-5)


def test_full_mask_form_matches_key_padding_form() -> None:
    q, k, v, _, valid = _inputs((2, 2), 26, 8, torch.float32, _gen("full"), pad=5)
    i = torch.arange(26)
    full = (i[None, :] <= i[:, None])[None, None] & valid[:, None, None, :]
    options = dict(
        scale=0.3,
        n_rep=1,
        tau=0.85,
        n_probe_recent=4,
        n_probe_random=4,
        min_keep=0,
        prefill_mode="local",
        local_window=6,
    )
    a = OP(q, k, v, valid[:, None, None, :], is_causal=True, **options)
    b = OP(q, k, v, full, is_causal=False, **options)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_bad_local_window_names_the_option(value: object) -> None:
    with pytest.raises(ValueError, match=r"local_window=.*>= 1"):
        ZipVLConfig.from_options({"local_window": value})
    with pytest.raises(ValueError, match=r"local_window=0.*prefill_mode='local'"):
        ZipVLConfig.from_options({"local_window": 0, "prefill_mode": "local"})
    assert ZipVLConfig.from_options({"local_window": 0, "prefill_mode": "paper"}).local_window == 0


def test_backend_passes_local_window_to_the_op() -> None:
    """Through torch.compile: the option changes the prefill (non-kept tokens attend), tau=1 stays exact."""
    model = build_text("llama", "sdpa")
    ids = torch.randint(3, 500, (1, 48), generator=_gen("backend"))
    logits = {}
    for window in (0, 4, 48):
        torch._dynamo.reset()
        zipvl_compile.reset_report()
        mode = dict(prefill_mode="local", local_window=window) if window else dict(prefill_mode="paper")
        options = dict(
            inner="eager", dense_below=0, tau=0.6, min_keep=2, n_probe_recent=4, n_probe_random=4, kv_mode="off", **mode
        )
        forward = torch.compile(model.forward, backend="zipvl", options=options)
        with torch.no_grad():
            logits[window] = forward(input_ids=ids).logits
        assert all(s.op == "zipvl.sparse_attention" for s in zipvl_compile.report().sites if s.kind == "prefill")
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    assert not torch.allclose(logits[0], logits[4], atol=1e-3)
    torch.testing.assert_close(logits[48], dense, atol=1e-4, rtol=1e-4)  # the window covers the prompt


@pytest.mark.gpu
@pytest.mark.parametrize("heads", HEADS)
def test_gpu_bf16_matches_reference(heads: tuple) -> None:
    g = _gen(("gpu", heads))
    q, k, v, keep, valid = _inputs(heads, 1000, 128, torch.bfloat16, g, pad=77, device="cuda")
    n_rep = heads[0] // heads[1]
    plan = _plan(keep, valid, 64, 128**-0.5, n_rep)
    out = local_attention_triton(q, k, v, plan)
    want = local_attention_reference(q, k, v, plan)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
