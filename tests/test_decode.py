"""Decode attention over the packed cache: Triton kernel and CPU path vs reference vs an independent dense softmax.

Data come from a test-local quantiser of the layout (keys per channel over 64-slot groups of valid slots,
values per token), with holes (pos = -1), different fill / tail_len per row and garbage (NaN params,
random codes, stale positions) wherever the layout says a slot is empty.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from zipvl_compile.runtime.kernels import decode
from zipvl_compile.runtime.kernels.decode import (
    PATHS,
    DecodeCall,
    decode_attention,
    decode_attention_triton,
    launch_warps,
    num_splits_for,
    tuning,
)
from zipvl_compile.runtime.kernels.decode_cpu import decode_attention_cpu
from zipvl_compile.runtime.kernels.decode_reference import decode_attention_reference
from zipvl_compile.runtime.layout import Segment, Tail

G = 64
NAN = float("nan")


def _pack(code: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [..., d] -> uint8 [..., d*bits//8], channel c at byte c // per, shift (c % per) * bits."""
    per = 8 // bits
    code = code.to(torch.int32).unflatten(-1, (-1, per))
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (code << shifts).sum(-1).to(torch.uint8)


def _minmax_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Asymmetric quantisation with fp16 params; returns (codes, scale fp16, zero fp16, x_hat fp32)."""
    scale, zero = ((hi - lo) / (2**bits - 1)).half(), lo.half()
    code = ((x - zero.float()) / scale.float().clamp_min(1e-8)).round().clamp(0, 2**bits - 1)
    return code, scale, zero, code * scale.float() + zero.float()


def quantize_segment(
    k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, fill: torch.Tensor, bits: int, gen: torch.Generator
):
    """k, v fp32 [B, H, C, d]; pos int32 [B, C]; fill int32 [B] -> (Segment, k_hat, v_hat, valid [B, C]).

    Empty slots (pos < 0 or >= fill) get random codes, NaN value params, a stale pos beyond fill and NaN
    key params where a whole group is empty: the kernel must mask all of it.
    """
    B, H, C, d = k.shape
    valid = (pos >= 0) & (torch.arange(C)[None, :] < fill[:, None])
    vg = valid[:, None, :, None].unflatten(2, (C // G, G))
    kg = k.unflatten(2, (C // G, G))
    empty = ~vg.any(3)
    k_lo = torch.where(empty, 0.0, torch.where(vg, kg, math.inf).amin(3))
    k_hi = torch.where(empty, 0.0, torch.where(vg, kg, -math.inf).amax(3))
    code, k_scale, k_zero, k_hat = _minmax_quant(kg, k_lo[:, :, :, None], k_hi[:, :, :, None], bits)
    k_code, k_hat = code.flatten(2, 3), k_hat.flatten(2, 3)
    k_scale, k_zero = k_scale[:, :, :, 0], k_zero[:, :, :, 0]
    v_code, v_scale, v_zero, v_hat = _minmax_quant(v, v.amin(-1, keepdim=True), v.amax(-1, keepdim=True), bits)
    v_scale, v_zero = v_scale[..., 0], v_zero[..., 0]

    rand_codes = torch.randint(0, 2**bits, k_code.shape, generator=gen)
    hole = ~valid[:, None, :, None]
    k_code, v_code = torch.where(hole, rand_codes, k_code), torch.where(hole, rand_codes.flip(-1), v_code)
    k_scale = k_scale.masked_fill(empty, NAN)
    v_scale, v_zero = v_scale.masked_fill(hole[..., 0], NAN), v_zero.masked_fill(hole[..., 0], NAN)
    pos = torch.where(torch.arange(C)[None, :] < fill[:, None], pos, 5)  # stale positions past fill
    seg = Segment(
        _pack(k_code, bits),
        k_scale,
        k_zero,
        _pack(v_code, bits),
        v_scale,
        v_zero,
        pos.to(torch.int32),
        fill.to(torch.int32),
    )
    return seg, k_hat, v_hat, valid


def make_case(
    *,
    B=2,
    H=2,
    n_rep=2,
    d=32,
    bits=(4, 2),
    caps=(192, 128),
    R=24,
    fills=((192, 64), (128, 128)),
    tail_lens=(17, 24),
    dtype=torch.float32,
    seed=0,
):
    """Random decode case. fills[i] = (hi fill, lo fill) of row i. Returns (args dict, dense pieces)."""
    gen = torch.Generator().manual_seed(seed)
    n_tok = sum(caps) + R
    perm = torch.stack([torch.randperm(n_tok, generator=gen) for _ in range(B)]).to(torch.int32)
    srcs, ofs = [], 0
    for cap, b_bits, fill in zip(caps, bits, zip(*fills, strict=True), strict=True):
        pos = perm[:, ofs : ofs + cap].clone()
        ofs += cap
        pos[torch.rand(pos.shape, generator=gen) < 0.15] = -1  # holes
        k, v = (torch.randn(B, H, cap, d, generator=gen) * 2 for _ in range(2))
        k[:, :, :, 3] += 6.0  # an outlier channel
        srcs.append(quantize_segment(k, v, pos, torch.tensor(fill), b_bits, gen))
    tail_len = torch.tensor(tail_lens, dtype=torch.int32)
    tail_pos = perm[:, ofs:].clone()
    tail_pos[:, 1] = -1
    tail_ok = (tail_pos >= 0) & (torch.arange(R)[None, :] < tail_len[:, None])
    k_tail, v_tail = (torch.randn(B, H, R, d, generator=gen).to(dtype) for _ in range(2))
    k_tail[~tail_ok[:, None].expand(B, H, R)] = NAN
    v_tail[~tail_ok[:, None].expand(B, H, R)] = NAN
    tail_pos[torch.arange(R)[None, :] >= tail_len[:, None]] = 7  # stale
    q = torch.randn(B, H * n_rep, 1, d, generator=gen).to(dtype)
    args = dict(
        q=q,
        hi=srcs[0][0],
        lo=srcs[1][0],
        tail=Tail(k_tail, v_tail, tail_pos, tail_len),
        scale=d**-0.5,
        n_rep=n_rep,
        hi_bits=bits[0],
        lo_bits=bits[1],
    )
    dense = dict(
        k=torch.cat([srcs[0][1], srcs[1][1], k_tail.float()], 2),
        v=torch.cat([srcs[0][2], srcs[1][2], v_tail.float()], 2),
        valid=torch.cat([srcs[0][3], srcs[1][3], tail_ok], 1),
    )
    return args, dense


def dense_attention(q, dense, n_rep, scale):
    """Independent float64 softmax attention over the dequantised keys/values, per row and head."""
    B, Hq, _, d = q.shape
    out = torch.zeros(B, Hq, 1, d, dtype=torch.float64)
    for b in range(B):
        keep = dense["valid"][b]
        for hq in range(Hq):
            k = dense["k"][b, hq // n_rep, keep].double()
            v = dense["v"][b, hq // n_rep, keep].double()
            if k.shape[0]:
                out[b, hq, 0] = torch.softmax(k @ q[b, hq, 0].double() * scale, 0) @ v
    return out


def to_device(args, device=DEVICE):
    def move(value):
        if isinstance(value, Segment | Tail):
            return type(value)(*(t.to(device) for t in value))
        return value.to(device) if torch.is_tensor(value) else value

    return {k: move(v) for k, v in args.items()}


def split(args):
    """(q, DecodeCall) of a case's keyword arguments (those of the reference and the CPU path)."""
    return args["q"], DecodeCall(**{name: value for name, value in args.items() if name != "q"})


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
@pytest.mark.parametrize("n_rep", [1, 2, 4, 7])
def test_kernel_matches_reference(dtype, bits, n_rep):
    args, _ = make_case(n_rep=n_rep, bits=bits, dtype=dtype, seed=n_rep + 10 * bits[0])
    ref = decode_attention_reference(**args)
    out = decode_attention_triton(*split(to_device(args)), num_splits=(2, 3, 1))
    assert out.dtype == dtype and out.shape == args["q"].shape
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
@pytest.mark.parametrize("n_rep,d", [(1, 64), (4, 64), (7, 32), (2, 16)])
def test_swap_path_matches_reference(dtype, bits, n_rep, d):
    """The tensor-core path with the codes as the big operand (d = 16 at 2 bits: 4-byte rows, below tl.dot's
    16, through the multiply-sum fallback)."""
    args, _ = make_case(n_rep=n_rep, bits=bits, dtype=dtype, d=d, seed=n_rep + 10 * bits[0] + d)
    ref = decode_attention_reference(**args)
    out = decode_attention_triton(*split(to_device(args)), num_splits=(2, 3, 1), path="swap")
    assert out.dtype == dtype and out.shape == args["q"].shape
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
@pytest.mark.parametrize("n_rep", [1, 7])
def test_reference_matches_dense(bits, n_rep):
    args, dense = make_case(n_rep=n_rep, bits=bits, seed=3)
    ref = decode_attention_reference(**args)
    exp = dense_attention(args["q"], dense, n_rep, args["scale"])
    torch.testing.assert_close(ref.double(), exp, atol=1e-5, rtol=1e-5)


CPU_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
CPU_TOL[torch.bfloat16] = dict(atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
@pytest.mark.parametrize("n_rep", [1, 4, 7])
@pytest.mark.parametrize("native", [True, False])
def test_cpu_path_matches_reference(dtype, bits, n_rep, native):
    """Both CPU bodies: the C kernel and the torch ops."""
    args, _ = make_case(n_rep=n_rep, bits=bits, dtype=dtype, seed=n_rep + 10 * bits[0] + 1)
    ref = decode_attention_reference(**args)
    out = decode_attention_cpu(**args, native=native)
    assert out.dtype == dtype and out.shape == args["q"].shape
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out.float(), ref.float(), **CPU_TOL[dtype])  # both in fp32, one rounding to dtype


CASES = {
    "empty_tail": dict(tail_lens=(0, 0)),
    "empty_lo": dict(fills=((192, 0), (64, 0))),
    "only_tail": dict(fills=((0, 0), (0, 0))),
    "one_row_empty": dict(fills=((0, 0), (192, 128)), tail_lens=(0, 24)),
    "d16": dict(d=16, n_rep=4),
    "d64": dict(d=64),
    "d128": dict(d=128, n_rep=1),
    "d256": dict(d=256, n_rep=1),
    "long_tail": dict(R=150, tail_lens=(150, 80)),
    "no_lo_capacity": dict(caps=(192, 0), fills=((192, 0), (64, 0)), n_rep=1),
    "no_lo_capacity_gqa": dict(caps=(192, 0), fills=((192, 0), (64, 0)), n_rep=4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_edge_cases(name):
    args, dense = make_case(dtype=torch.float32, seed=7, **CASES[name])
    ref = decode_attention_reference(**args)
    exp = dense_attention(args["q"], dense, args["n_rep"], args["scale"])
    torch.testing.assert_close(ref.double(), exp, atol=1e-5, rtol=1e-5)
    for native in (True, False):
        torch.testing.assert_close(decode_attention_cpu(**args, native=native).double(), exp, atol=1e-5, rtol=1e-5)
    out = decode_attention_triton(*split(to_device(args)), num_splits=(2, 1, 2))
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@triton.jit
def _planes_kernel(x_ptr, out_ptr, N: tl.constexpr, BITS: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr):
    """out fp32 [4, N]: the four tensors decode._planes returns for the N bytes x."""
    offs = tl.arange(0, N)
    p0, p1, p2, p3 = decode._planes(tl.load(x_ptr + offs), BITS, F32, ASM)
    tl.store(out_ptr + offs, p0.to(tl.float32))
    tl.store(out_ptr + N + offs, p1.to(tl.float32))
    tl.store(out_ptr + 2 * N + offs, p2.to(tl.float32))
    tl.store(out_ptr + 3 * N + offs, p3.to(tl.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("f32,asm", [(True, False), (False, False), (False, True)])
def test_planes_exact(bits, f32, asm):
    """The tensor-core path's unpacking of every byte value (in a shuffled order): sub-plane J holds the code at bit
    shift J*bits exactly, plus 2^(10 - J*bits) for fp16 codes; planes past 8 // bits repeat plane 0. The PTX
    branch needs a GPU."""
    if asm and DEVICE != "cuda":
        pytest.skip("inline PTX needs a GPU")
    x = torch.randperm(256, generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    out = torch.empty(4, 256, device=DEVICE)
    _planes_kernel[(1,)](x.to(DEVICE), out, N=256, BITS=bits, F32=f32, ASM=asm)
    per, mask = 8 // bits, (1 << bits) - 1
    exp = torch.stack(
        [(x.long() >> j * bits & mask).float() + (0 if f32 else 2.0 ** (10 - j * bits)) for j in range(per)]
    )
    exp = torch.cat([exp, exp[:1].expand(4 - per, -1)]) if per < 4 else exp
    assert torch.equal(out.cpu(), exp)


@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
def test_folded_codes_lose_nothing_a_half_float_keeps(bits):
    """16-bit inputs on the CUDA-core path leave 2^23 in every unpacked code and take it out of the sums once
    (``decode._codes_f32``, FOLD); fp32 inputs take the exact path. On the same fp16 data the two agree to one
    fp16 rounding at the output's scale (the tail, which rounds p to fp16 on both, is left out)."""
    shape = dict(d=128, caps=(512, 1024), fills=((512, 960), (320, 1024)), tail_lens=(0, 0))  # segments only
    args, _ = make_case(n_rep=1, bits=bits, dtype=torch.float16, seed=bits[1], **shape)
    tail = args["tail"]
    wide = {**args, "q": args["q"].float(), "tail": tail._replace(k=tail.k.float(), v=tail.v.float())}
    folded = decode_attention_triton(*split(to_device(args)), path="fma")
    exact = decode_attention_triton(*split(to_device(wide)), path="fma")
    assert folded.dtype == torch.float16
    ulp = 2**-11 * exact.abs().max().item()
    torch.testing.assert_close(folded.float(), exact.half().float(), atol=ulp, rtol=2**-10)


@pytest.mark.parametrize("num_splits", [(1, 1, 1), (6, 5, 2), (40, 30, 2), (150, 120, 2), None])
def test_splits_agree(num_splits):
    """Any split counts give the reference's result: 72 splits (most with no block) merge in one chunk, 272 in two
    (``decode._MERGE_CHUNK``)."""
    args, _ = make_case(n_rep=4, seed=5)
    ref = decode_attention_reference(**args)
    out = decode_attention_triton(*split(to_device(args)), num_splits=num_splits)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 2)])
@pytest.mark.parametrize("channels", [16, 32, 64])
@pytest.mark.parametrize("d,num_warps", [(16, 4), (64, 4), (128, 1), (128, 4), (256, 8)])
def test_fma_thread_layouts(dtype, bits, channels, d, num_warps):
    """The CUDA-core path at every width of a thread's share of a slot (channels per thread, hence words per load,
    slots per thread: 1, 2, 4 or 8 with one warp, the plain-sum fallback) gives the reference's result."""
    args, _ = make_case(n_rep=1, bits=bits, dtype=dtype, d=d, seed=d + channels + num_warps + bits[0])
    ref = decode_attention_reference(**args)
    out = decode_attention_triton(
        *split(to_device(args)), num_splits=(2, 3, 1), path="fma", num_warps=num_warps, channels_per_thread=channels
    )
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("maxnreg", [0, 96, 168])
def test_register_cap(path, maxnreg):
    """A register cap (0: uncapped) leaves the result the reference's (on a GPU the capped kernels compile with
    spills; the interpreter ignores the cap)."""
    n_rep = 1 if path == "fma" else 4
    args, _ = make_case(n_rep=n_rep, seed=8)
    ref = decode_attention_reference(**args)
    out = decode_attention_triton(*split(to_device(args)), path=path, maxnreg=maxnreg)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "batch,heads,slots", [(1, 32, 4096), (1, 32, 65536), (8, 32, 16384), (1, 4, 65536), (64, 8, 512)]
)
def test_split_bounds(path, batch, heads, slots):
    """The policy's splits: enough programs for the SMs where the segments allow it, never more than the path's
    max_splits per segment, never a split shorter than its min_blocks of a full segment (one at the least)."""
    policy = tuning(path)
    s_hi, s_lo, s_tail = num_splits_for(batch, heads, slots, slots, 100, 132, policy)
    for s in (s_hi, s_lo):
        assert 1 <= s <= policy.max_splits
        assert s == 1 or slots // s >= policy.min_blocks * 64
    want = -(-policy.programs_per_sm * 132 // (batch * heads))
    cap = min(policy.max_splits, slots // (policy.min_blocks * 64))
    assert s_hi + s_lo == max(2, min(want, 2 * cap))
    assert s_tail == 1


def test_launch_warps():
    """A grid with fewer than two programs per SM takes the path's sparse_warps, any other its num_warps; d = 256 at
    least 8."""
    policy = tuning("swap")._replace(num_warps=2, sparse_warps=4)
    assert launch_warps(policy, programs=4 * 65, sms=132, d=128) == 4
    assert launch_warps(policy, programs=2 * 132, sms=132, d=128) == 2
    assert launch_warps(policy, programs=10, sms=132, d=256) == 8


def test_dispatcher():
    args, _ = make_case(seed=2)
    ref = decode_attention_reference(**args)
    assert torch.equal(decode_attention(*split(args), use_triton=False), decode_attention_cpu(**args))
    out = decode_attention(*split(to_device(args)), use_triton=True)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("channels", [24, -8, 512])
def test_bad_channels_per_thread(channels):
    """A thread's share of a slot that no load layout has is refused by name, before any kernel."""
    args, _ = make_case(n_rep=1, seed=2)
    with pytest.raises(ValueError, match="channels_per_thread"):
        decode_attention_triton(*split(to_device(args)), path="fma", channels_per_thread=channels)


def test_bad_shapes():
    args, _ = make_case()
    with pytest.raises(ValueError, match="Hq = H\\*n_rep"):
        decode_attention_triton(*split({**args, "n_rep": 3}))
    with pytest.raises(ValueError, match="CUDA-core path serves n_rep = 1"):
        decode_attention_triton(*split(args), path="fma")
    with pytest.raises(ValueError, match="path must be one of"):
        decode_attention_triton(*split(args), path="mma")


@pytest.mark.parametrize("path", PATHS)
def test_every_path_serves_one_head(path):
    """n_rep = 1 runs the CUDA-core path by default; the tensor-core paths must give the same result there."""
    args, _ = make_case(n_rep=1, seed=5)
    ref = decode_attention_reference(**args)
    out = decode_attention_triton(*split(to_device(args)), num_splits=(2, 1, 1), path=path)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", [None, "swap"])
@pytest.mark.parametrize("n_rep,d", [(1, 128), (7, 128), (4, 64), (2, 256)])
def test_bf16_gpu(n_rep, d, path):
    args, dense = make_case(
        dtype=torch.bfloat16,
        n_rep=n_rep,
        d=d,
        B=3,
        H=4,
        caps=(1024, 2048),
        fills=((1024, 1984), (576, 0), (0, 128)),
        R=100,
        tail_lens=(100, 3, 0),
        seed=d,
    )
    exp = dense_attention(args["q"], dense, n_rep, args["scale"]).float()
    ref = decode_attention_reference(**args)
    q, call = split(to_device(args, "cuda"))
    out = decode_attention(q, call) if path is None else decode_attention_triton(q, call, path=path)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().float(), exp, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cpu_codes_match_layout(bits):
    """The CPU path's word-shift unpacking gives the layout's codes, for every byte value and random bytes."""
    from zipvl_compile.runtime.kernels.decode_cpu import _codes
    from zipvl_compile.runtime.layout import unpack_codes

    gen = torch.Generator().manual_seed(bits)
    packed = torch.cat(
        [
            torch.arange(256, dtype=torch.uint8).view(2, 2, 8, 8),
            torch.randint(0, 256, (2, 2, 8, 8), generator=gen, dtype=torch.uint8),
        ],
        2,
    )
    out = _codes(packed, bits)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 16, 8 * 8 // bits)
    assert torch.equal(out, unpack_codes(packed, bits).float())
