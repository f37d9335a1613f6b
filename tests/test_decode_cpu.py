"""The CPU path of the decode tail's per-step ops: the append's slice copies against the reference's scatters
(bit for bit), and the recompression's early return on a step that recompresses nothing."""

from __future__ import annotations

import pytest
import torch

from zipvl_compile.runtime.kernels.tail_reference import append_tail_cpu_, append_tail_reference_
from zipvl_compile.runtime.layout import Segment, Tail
from zipvl_compile.runtime.packed import append_tail_, recompress_


def _tail(lengths: list[int], slots: int, dtype: torch.dtype, seed: int) -> Tail:
    """A tail of random K/V (B = len(lengths), H = 2, d = 8) with positions below each row's length."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    k, v = (torch.randn(batch, 2, slots, 8, generator=gen).to(dtype) for _ in range(2))
    pos = torch.randint(0, 1000, (batch, slots), generator=gen, dtype=torch.int32)
    pos[torch.arange(slots)[None, :] >= torch.tensor(lengths)[:, None]] = -1
    return Tail(k, v, pos, torch.tensor(lengths, dtype=torch.int32))


def _clone(tail: Tail) -> Tail:
    return Tail(*(t.clone() for t in tail))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "lengths",
    [[5], [0], [11], [12], [3, 3, 3], [2, 7, 0], [12, 12]],  # 12 = a full tail: the last slot is overwritten
)
def test_append_cpu_matches_reference(dtype: torch.dtype, lengths: list[int]) -> None:
    tail = _tail(lengths, 12, dtype, seed=len(lengths) + sum(lengths))
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(len(lengths), 2, 1, 8, generator=gen) for _ in range(2))  # fp32, converted on the way in
    pos = torch.tensor([700], dtype=torch.int64).expand(len(lengths))  # one position expanded over the batch
    ref, out = _clone(tail), _clone(tail)
    append_tail_reference_(ref, k, v, pos)
    append_tail_cpu_(out, k, v, pos)
    for name, a, b in zip(Tail._fields, out, ref, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert not torch.equal(out.k, tail.k)  # the append wrote something


def test_append_dispatch_takes_cpu_path() -> None:
    tail = _tail([4, 4], 8, torch.float32, seed=0)
    ref, out = _clone(tail), _clone(tail)
    k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    pos = torch.tensor([9, 10])
    append_tail_reference_(ref, k, v, pos)
    append_tail_(out, k, v, pos, use_triton=False)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_recompress_returns_early_only_when_no_row_is_full() -> None:
    hi = Segment.empty(2, 2, 64, 8, 4, torch.device("cpu"))
    lo = Segment.empty(2, 2, 64, 8, 2, torch.device("cpu"))
    tail = _tail([3, 7], 8, torch.float32, seed=2)
    before = _clone(tail)
    recompress_(hi, lo, tail, None, 1.0, 1, 1.0, 4, 2, use_triton=False)
    assert all(torch.equal(a, b) for a, b in zip(tail, before, strict=True))
    assert int(hi.fill.max()) == 0 and int(lo.fill.max()) == 0
    tail.length[1] = 8  # row 1 full: its block goes to hi (every token kept without a query), row 0 untouched
    tail.pos[1] = torch.arange(8, dtype=torch.int32)
    recompress_(hi, lo, tail, None, 1.0, 1, 1.0, 4, 2, use_triton=False)
    assert hi.fill.tolist() == [0, 64] and tail.length.tolist() == [3, 0]
    assert torch.equal(hi.pos[1, :8], torch.arange(8, dtype=torch.int32)) and bool((tail.pos[1] < 0).all())
    assert torch.equal(tail.pos[0], before.pos[0])


@pytest.mark.parametrize("tail_len", [1, 40])
@pytest.mark.parametrize("lo_fill", [0, 64])
@pytest.mark.parametrize("native", [True, False])
def test_decode_cpu_at_demo_shapes(tail_len: int, lo_fill: int, native: bool) -> None:
    """The CPU decode path against the reference at the CPU demo's shapes (3 KV heads, n_rep 3, d 64, fp32): hi
    filled to 384 slots of which 330 hold tokens (the rest random codes and NaN value parameters), lo at 2 bits
    empty or one group, a tail of 100 slots with NaN keys and values past its length."""
    from zipvl_compile.runtime.kernels.decode_cpu import decode_attention_cpu
    from zipvl_compile.runtime.kernels.decode_reference import decode_attention_reference
    from zipvl_compile.runtime.layout import pack_codes

    gen = torch.Generator().manual_seed(tail_len + lo_fill)
    heads, d, cpu = 3, 64, torch.device("cpu")

    def segment(capacity: int, fill: int, tokens: int, bits: int) -> Segment:
        seg = Segment.empty(1, heads, capacity, d, bits, cpu)
        for codes in (seg.k_codes, seg.v_codes):
            codes.copy_(pack_codes(torch.randint(0, 1 << bits, (1, heads, capacity, d), generator=gen), bits))
        for param in (seg.k_scale, seg.k_zero, seg.v_scale, seg.v_zero):
            param.copy_(torch.rand(param.shape, generator=gen) + 0.1)
        seg.v_scale[:, :, tokens:] = float("nan")
        seg.v_zero[:, :, tokens:] = float("nan")
        seg.pos[0, :tokens] = torch.randperm(1000, generator=gen)[:tokens].to(torch.int32)
        seg.fill.fill_(fill)
        return seg

    hi, lo = segment(512, 384, 330, 4), segment(128, lo_fill, lo_fill, 2)
    tail = Tail.empty(1, heads, 100, d, torch.float32, cpu)
    tail.k.copy_(torch.randn(tail.k.shape, generator=gen))
    tail.v.copy_(torch.randn(tail.v.shape, generator=gen))
    tail.k[:, :, tail_len:] = float("nan")
    tail.v[:, :, tail_len:] = float("nan")
    tail.pos[0, :tail_len] = torch.arange(tail_len, dtype=torch.int32) + 1000
    tail.length.fill_(tail_len)
    args = dict(q=torch.randn(1, heads * 3, 1, d, generator=gen), hi=hi, lo=lo, tail=tail, scale=d**-0.5, n_rep=3)
    out = decode_attention_cpu(**args, hi_bits=4, lo_bits=2, native=native)
    ref = decode_attention_reference(**args, hi_bits=4, lo_bits=2)
    assert out.isfinite().all() and ref.abs().mean() > 0.05
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_native_kernel_builds_where_a_compiler_is() -> None:
    """Where a C compiler is on the path the CPU decode step runs the C kernel (a silent fallback would hide a
    broken build)."""
    import shutil

    from zipvl_compile.runtime.kernels import native

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert native.library() is not None


def test_native_kernel_falls_back_and_refuses_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A failed build leaves the torch body (logged); inputs the kernel does not take go to the torch body by
    default and raise a clear error when the kernel is required."""
    from zipvl_compile.runtime.kernels import native
    from zipvl_compile.runtime.kernels.decode_cpu import decode_attention_cpu

    heads, d = 2, 12  # a head dim the kernel does not take (not a multiple of 8)
    cpu = torch.device("cpu")
    hi, lo = Segment.empty(1, heads, 64, d, 4, cpu), Segment.empty(1, heads, 64, d, 2, cpu)
    tail = Tail.empty(1, heads, 8, d, torch.float32, cpu)
    tail.k.normal_()
    tail.v.normal_()
    tail.length.fill_(3)
    tail.pos[0, :3] = torch.arange(3, dtype=torch.int32)
    args = dict(q=torch.randn(1, heads, 1, d), hi=hi, lo=lo, tail=tail, scale=0.3, n_rep=1, hi_bits=4, lo_bits=2)
    assert "multiple of 8" in native.refusal(args["q"], hi, lo, tail, 1, 4, 2)
    good = dict(args, q=torch.randn(1, heads, 1, 16), tail=Tail.empty(1, heads, 8, 16, torch.float32, cpu))
    good["hi"], good["lo"] = Segment.empty(1, heads, 64, 16, 4, cpu), Segment.empty(1, heads, 64, 16, 2, cpu)
    assert native.refusal(good["q"], good["hi"], good["lo"], good["tail"], 1, 4, 2) is None
    assert "do not match" in native.refusal(good["q"], good["hi"], good["lo"], good["tail"], 2, 4, 2)
    assert "do not match" in native.refusal(good["q"], good["hi"], good["lo"], good["tail"], 1, 2, 2)
    with pytest.raises(ValueError, match="do not match"):
        native.decode_attention_native(**dict(good, n_rep=2))
    assert torch.equal(decode_attention_cpu(**args), decode_attention_cpu(**args, native=False))
    with pytest.raises(ValueError, match="multiple of 8"):
        decode_attention_cpu(**args, native=True)
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("ZIPVL_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is None
        with pytest.raises(RuntimeError, match="not available"):
            native.decode_attention_native(**args)
    finally:
        native.library.cache_clear()


def test_decode_cpu_benchmark_runs() -> None:
    """bench/decode_cpu.py runs and reports one row per lo fill, every time positive."""
    from bench import decode_cpu

    rows = decode_cpu.main(["--calls", "4"])
    assert [row["lo_tokens"] for row in rows] == [0, 64]
    assert all(row[key] > 0 for row in rows for key in ("c_kernel_us", "torch_body_us", "dense_step_us"))


def test_native_kernel_cache_falls_back_to_a_temporary_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """An unusable cache folder (here a path that is a file) leaves the build to the temporary directory."""
    import shutil

    from zipvl_compile.runtime.kernels import native

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("ZIPVL_CACHE_DIR", str(blocker))
    native.library.cache_clear()
    try:
        lib = native.library()
        assert lib is not None and not str(lib._name).startswith(str(blocker))
    finally:
        native.library.cache_clear()
