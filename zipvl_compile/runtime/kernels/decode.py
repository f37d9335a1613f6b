"""Decode attention over the packed mixed-precision KV cache (one query token per sequence).

The cache of a layer holds two quantised segments, ``hi`` and ``lo`` (see :class:`Segment`), and a
model-dtype tail of recent tokens. Decode attention is a sum over cached keys, so the three sources are
attended as one set of keys: ``out = softmax(q · K^T * scale) V`` over every valid slot, where a slot is
valid iff its position is >= 0 and it lies below the segment's ``fill`` (or the tail's ``length``).

Implementations with the same contract:

- :func:`~zipvl_compile.runtime.kernels.decode_reference.decode_attention_reference`: plain PyTorch
  (dequantise, concatenate, masked softmax in fp32): the oracle.
- :func:`~zipvl_compile.runtime.kernels.decode_cpu.decode_attention_cpu`: the CPU path (used slots only,
  grouped query heads, values weighed through their codes), tested against the oracle.
- :func:`decode_attention_triton`: split-K (flash-decoding) Triton kernels. Grid ``(B, H, S_hi + S_lo +
  S_tail)``: each program walks one share of the 64-slot blocks of ONE source (hi, lo or the tail; a runtime
  branch on the program id, so one launch runs all three concurrently). Shares are computed in-kernel from
  ``fill`` / the tail's ``length`` (balanced whatever the fill, no host sync); the split counts come from
  static shapes, the device's SM count and the path's programs per SM (:func:`num_splits_for`,
  :func:`tuning`). A block is one key group, so its key scale/zero are one ``[d]`` row, and dequantisation is
  folded into the small operands: ``q·k = (q*k_scale)·code + q·k_zero`` and ``p·v = (p*v_scale)·code +
  (p·v_zero) 1``. Two segment paths (:data:`PATHS`; the policy, :func:`default_path`, picks "fma" for
  ``n_rep = 1`` and "swap" otherwise):

  - CUDA cores, for one query head per KV head (``n_rep = 1``, no padded rows): the codes are read as
    uint32 words, a thread taking 32 channels of a slot in one vector load and two slots of each 64-slot
    block; each word is repeated in registers and every code masked in place and ORed into the mantissa of
    2^23 (one ``lop3`` per code; its power-of-two place is folded into q and the output). Scores are
    multiply-sums over channels per slot; the value accumulator is kept per (slot lane, channel), a thread's
    two slots summed into it by one chain of multiply-adds, reduced once after the loop and rescaled only when
    the running max grows. Each block's loads are issued one block ahead.
  - Tensor cores, for ``n_rep > 1`` (``path="swap"``): per block the packed bytes are loaded once and serve
    all ``n_rep`` query heads. The codes are the big (M) operand, ``scores^T = codes_k @ (q * k_scale)^T`` and
    ``acc^T = codes_v^T @ (p * v_scale)``, so the code tiles go from the pipelined shared-memory copy straight
    into the dot's register operand (value codes loaded transposed) and only the small tiles, ``p`` and the
    queries scaled by the block's key scales, take a trip through shared memory; the query heads are the small
    N operand, padded to 8. Channels are handled as ``8 // bits`` sub-planes (bits ``J*bits..`` of every byte =
    channels ``i*(8//bits) + J``), so byte tiles are used as they lie and queries and outputs are permuted
    instead; codes become fp16 ``2^(10 - J*bits) + code`` by one and-or per pair (masked in place, ORed with
    an exponent J*bits below 1024's; inline PTX on the GPU, two byte-spreading permutes serving every plane of
    four bytes), and the offset and the zero points come in through one constant per block and query head on
    each side (``sum q*k_zero - offset * sum q*k_scale``, ``sum p*v_zero - offset * sum p*v_scale``).
    Two warps per program (Ampere-style MMA) beat four (the Hopper warp-group MMA) on the H200, and
    this path beat the one with the queries as the big operand (rows padded to 16, layout conversions
    through shared memory) at every GQA shape of the sweep (BENCHMARKS.md).

  Each program keeps a running max / sum / accumulator per query head (base-2 online softmax, fp32) and
  writes them to a workspace; a second kernel merges the partials, one program per query head and 32 channels.
  fp32 inputs take exact fp32 operands so that tests can be tight.

Performance (H200, bits 4/2 at r = 0.5, ``bench/decode_attention.py``, BENCHMARKS.md): the CUDA-core path runs
1.89-2.60x faster than bf16 SDPA decode on the same tokens (MHA 32x128, 8k-128k, B 1 and 8) at 41-55% of the
bandwidth SDPA reaches. With its loads one block ahead it is bound by issue (ncu at 32k B = 8: 0.70 instructions
per cycle and scheduler, long-scoreboard stalls 0.14 cycles per instruction, were 1.66 with the loads in the
block that uses them), about 2.5 instructions per code for 16-bit inputs (mask-or, FMA, a shift per byte; the
2^23 taken out of the sums once, see :func:`_codes_f32`) plus ~210 per 64-slot block and thread (offline
SASS); it runs capped at 128 registers per thread (the policy's ``maxnreg``: four programs of 4 warps per SM) and
in splits of at least 8 blocks (shorter ones cost more in fixed work and merged partials than they gain in
waves). The swapped tensor-core path (GQA 28/4) runs 1.22-1.57x faster than SDPA (1.31x at 8k B = 1, 8.9 µs
against 11.7, where the grid leaves the SMs idle: 4 warps and 65 splits, :func:`launch_warps`), at 26-34% of
SDPA's bandwidth: bound by issue at low occupancy (255 registers, about 1020 (4-bit) / 860 (2-bit) instructions
per 64-slot block and thread in offline SASS, of which the transposed value-code loads are byte-wide shared loads
and byte permutes, and the per-block key constants cross-lane sums). The merge adds 2.2-3.2 µs at B = 1 (8k-32k,
both layouts: the op timed with and without it).

Shapes: q ``[B, Hq, 1, d]`` with ``Hq = H * n_rep`` (query head ``h * n_rep + r`` reads KV head ``h``);
output ``[B, Hq, 1, d]`` in q's dtype. d in {16, 32, 64, 128, 256}; bits in {2, 4, 8}.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from zipvl_compile.runtime.kernels.decode_cpu import decode_attention_cpu
from zipvl_compile.runtime.kernels.device import sm_count, wants_triton
from zipvl_compile.runtime.layout import GROUP, Segment, Tail


class DecodeCall(NamedTuple):
    """What a decode attention call reads besides q: the packed cache of one layer, ``hi`` / ``lo``
    (:class:`Segment` at ``hi_bits`` / ``lo_bits``) and the ``tail`` (:class:`Tail`, q's dtype), the logit
    ``scale`` and ``n_rep`` query heads per KV head."""

    hi: Segment
    lo: Segment
    tail: Tail
    scale: float
    n_rep: int
    hi_bits: int
    lo_bits: int


class Tuning(NamedTuple):
    """Launch tuning of a segment path: split-K target in programs per SM (several waves even out splits of
    unequal length), warps per program, software-pipelining depth, the register cap per thread given to ptxas
    (``maxnreg``; 0: uncapped, ptxas then takes what it likes, up to 255, whatever the occupancy), and the
    bounds on a segment's splits: each walks at least ``min_blocks`` blocks of GROUP slots of a full segment, a
    segment has at most ``max_splits`` (a split's fixed costs and the merge's partials weigh more than waves).
    ``channels_per_thread``: on the CUDA-core path, the channels of a slot that one thread loads (one vector of
    words) and accumulates; ``sparse_warps``: warps per program where the grid leaves the SMs nearly idle
    (:func:`launch_warps`)."""

    programs_per_sm: int
    num_warps: int
    num_stages: int
    maxnreg: int = 0
    min_blocks: int = 4
    max_splits: int = 64
    channels_per_thread: int = 32
    sparse_warps: int = 4


# The segment paths (module docstring): "fma" (CUDA cores, n_rep = 1), "swap" (tensor cores, the codes as the big
# operand).
PATHS = ("fma", "swap")
# per path, from the H200 sweeps of bench/decode_attention.py --variants (BENCHMARKS.md)
_TUNING = {
    "fma": Tuning(programs_per_sm=16, num_warps=4, num_stages=1, maxnreg=128, min_blocks=8, max_splits=16),
    "swap": Tuning(programs_per_sm=8, num_warps=2, num_stages=2, min_blocks=2, max_splits=64),
}
# query-head rows per program, padded: on the tensor-core path the queries are the small N operand of the dots,
# whose smallest MMA size is 8 (offline sm_90 SASS at n_rep <= 8: 21-23% fewer instructions per block than 16);
# the CUDA-core path uses the rows only in its tail, where 16 compiled to fewer instructions
_MIN_ROWS = {"fma": 16, "swap": 8}
# the merge kernel: a program per query head and _MERGE_CHANNELS channels, _MERGE_CHUNK partial states at a time
# (a [_MERGE_CHUNK, _MERGE_CHANNELS] fp32 tile in registers: every split of the policy's launches in one pass).
# On the H200 the merge of one program per query head, 64 partials at a time, was 40% of the op at 8k B = 1 GQA
# (28 programs; BENCHMARKS.md).
_MERGE_CHUNK = 256
_MERGE_CHANNELS = 32


# ----------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _block_range(length, split, n_splits, BLOCK: tl.constexpr):
    """This split's share [first, last) of the ceil(length / BLOCK) blocks of a source."""
    n_blocks = tl.cdiv(length, BLOCK)
    return split * n_blocks // n_splits, (split + 1) * n_blocks // n_splits


@triton.jit
def _online_max(s, m, SLOTS: tl.constexpr):
    """Base-2 online softmax step. s: scores of NP query heads over a block, slots along axis SLOTS ([NP, BLOCK]
    for SLOTS = 1, [BLOCK, NP] for 0; -inf = masked); m [NP] running max.

    Returns (p, alpha, m_new): probabilities of this block (s's shape), rescale factor of the old state, new max.
    """
    m_new = tl.maximum(m, tl.max(s, axis=SLOTS))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp2(s - tl.expand_dims(m_use, SLOTS)), tl.exp2(m - m_use), m_new


@triton.jit
def _online_update(s, m, den, SLOTS: tl.constexpr):
    """:func:`_online_max`, and the running sum den [NP] after the block: (p, alpha, m_new, den_new)."""
    p, alpha, m_new = _online_max(s, m, SLOTS)
    return p, alpha, m_new, den * alpha + tl.sum(p, axis=SLOTS)


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    """Combine function of a three-tensor sum (one reduction, one cross-warp exchange for all three)."""
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr):
    """a [M, K] @ b [K, N] -> fp32: tl.dot, or a broadcast multiply-sum when K or N < 16 (tiny head dims)."""
    if USE_DOT:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return r


@triton.jit
def _plane_offset(J: tl.constexpr, BITS: tl.constexpr, F32: tl.constexpr):
    """The constant every code of sub-plane J carries as :func:`_planes` unpacks it: 0 for fp32 codes, else
    ``2^(10 - J*BITS)``."""
    OFFSET: tl.constexpr = 0.0 if F32 else float(1 << (10 - J * BITS))
    return OFFSET


@triton.jit
def _plane(x, J: tl.constexpr, BITS: tl.constexpr, F32: tl.constexpr):
    """Sub-plane J of bytes x (int16) as :func:`_planes` gives it, in plain operations."""
    c = x & ((1 << BITS) - 1 << J * BITS)
    if F32:
        r = (c >> J * BITS).to(tl.float32)
    else:
        r = (c | (0x6400 - J * BITS * 0x400)).to(tl.float16, bitcast=True)
    return r


@triton.jit
def _planes(byte, BITS: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr):
    """The 8//BITS sub-planes of a packed byte tile (plane J: the codes at bit shift J*BITS, i.e. channels
    i*(8//BITS) + J), as four tensors of the tile's shape (unused ones repeat plane 0).

    F32: the codes as fp32. Otherwise fp16 ``2^(10 - J*BITS) + code`` (:func:`_plane_offset`): the code is masked in
    place, at bit J*BITS of the mantissa, and ORed with an exponent J*BITS below 1024's, so that the mantissa's
    unit is 2^-(J*BITS): no shift, no conversion, exact; callers take the offset out through their zero-point
    terms. ASM (GPU): the same in PTX on four bytes at a time, every plane of them from the same two
    byte-spreading permutes, then one and-or per plane and fp16 pair. It is declared pure: Inductor's mutation
    analysis of a ``triton_op``'s kernels rejects impure inline asm (it would then treat every input, the whole
    cache included, as written).
    """
    PER: tl.constexpr = 8 // BITS
    # the plane each of the four results holds: J, or plane 0 past the byte's planes
    J1: tl.constexpr = 1 if PER > 1 else 0
    J2: tl.constexpr = 2 if PER > 2 else 0
    J3: tl.constexpr = 3 if PER > 2 else 0
    if ASM:
        # per result: mask M (the plane's bits in both fp16 halves), exponent E (2^(10 - J*BITS) in both); the
        # and-ors of results a caller does not use are dead code to ptxas
        M0: tl.constexpr = ((1 << BITS) - 1) * 0x10001
        M1: tl.constexpr = M0 << J1 * BITS
        M2: tl.constexpr = M0 << J2 * BITS
        M3: tl.constexpr = M0 << J3 * BITS
        E0: tl.constexpr = 0x6400 * 0x10001
        E1: tl.constexpr = (0x6400 - J1 * BITS * 0x400) * 0x10001
        E2: tl.constexpr = (0x6400 - J2 * BITS * 0x400) * 0x10001
        E3: tl.constexpr = (0x6400 - J3 * BITS * 0x400) * 0x10001
        planes = tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1; prmt.b32 t0, $8, 0, 0x4140; prmt.b32 t1, $8, 0, 0x4342; "
            f"lop3.b32 $0, t0, {M0}, {E0}, 0xea; lop3.b32 $1, t1, {M0}, {E0}, 0xea; "
            f"lop3.b32 $2, t0, {M1}, {E1}, 0xea; lop3.b32 $3, t1, {M1}, {E1}, 0xea; "
            f"lop3.b32 $4, t0, {M2}, {E2}, 0xea; lop3.b32 $5, t1, {M2}, {E2}, 0xea; "
            f"lop3.b32 $6, t0, {M3}, {E3}, 0xea; lop3.b32 $7, t1, {M3}, {E3}, 0xea; }}",
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [byte],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True,
            pack=4,
        )
    else:
        x = byte.to(tl.int16)
        planes = (_plane(x, 0, BITS, F32), _plane(x, J1, BITS, F32), _plane(x, J2, BITS, F32), _plane(x, J3, BITS, F32))
    return planes


@triton.jit
def _deinterleave(x, PER: tl.constexpr, KB: tl.constexpr):
    """[KB*PER] -> its PER sub-planes x[i*PER + J] (four tensors; unused ones repeat)."""
    if PER == 1:
        r = (x, x, x, x)
    elif PER == 2:
        a, b = tl.split(tl.reshape(x, [KB, 2]))
        r = (a, b, a, b)
    else:
        e, o = tl.split(tl.reshape(x, [KB, 2, 2]))  # e: J = 0, 2; o: J = 1, 3
        a, c = tl.split(e)
        b, d = tl.split(o)
        r = (a, b, c, d)
    return r


@triton.jit
def _load_q_plane(q_ptr, qh, row_ok, qk_scale, J: tl.constexpr, PER: tl.constexpr, KB: tl.constexpr, D: tl.constexpr):
    """fp32 [NP, KB]: the query rows qh at channels i*PER + J, times qk_scale."""
    chan = tl.arange(0, KB) * PER + J
    q = tl.load(q_ptr + qh[:, None] * D + chan[None, :], mask=row_ok[:, None], other=0.0)
    return (q.to(tl.float32) * qk_scale).to(tl.float32)  # Inductor passes float arguments as fp64


@triton.jit
def _store_partial(out, ws, row_ok, m, den, acc, J: tl.constexpr, PER: tl.constexpr, KB: tl.constexpr, D: tl.constexpr):
    """Write sub-plane J of acc [NP, KB] (channels i*PER + J) of workspace rows ws; m/den once (J = 0)."""
    if J == 0:
        m_ws, den_ws, acc_ws = out
        tl.store(m_ws + ws, m, mask=row_ok)
        tl.store(den_ws + ws, den, mask=row_ok)
    chan = tl.arange(0, KB) * PER + J
    tl.store(out[2] + ws[:, None] * D + chan[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _load_block(kc, vc, vs, vz, pos_ptr, fill, C, b, bh, blk, COLS: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``blk`` (GROUP slots) of a segment for the tensor-core path: (valid bool [BLOCK], key code bytes
    [BLOCK, COLS] as stored, value code bytes transposed [COLS, BLOCK], as loaded, value scale and zero fp32
    [BLOCK], masked to 0 on invalid slots so that garbage params of empty slots never reach p)."""
    slot = blk * BLOCK + tl.arange(0, BLOCK)
    slot_ok = slot < fill
    valid = tl.load(pos_ptr + b * C + slot, mask=slot_ok, other=-1) >= 0
    k_code = tl.load(kc + (bh * C + slot[:, None]) * COLS + tl.arange(0, COLS)[None, :], mask=slot_ok[:, None], other=0)
    v_code = tl.load(vc + (bh * C + slot[None, :]) * COLS + tl.arange(0, COLS)[:, None], mask=slot_ok[None, :], other=0)
    v_s = tl.load(vs + bh * C + slot, mask=valid, other=0.0).to(tl.float32)
    v_z = tl.load(vz + bh * C + slot, mask=valid, other=0.0).to(tl.float32)
    return valid, k_code, v_code, v_s, v_z


@triton.jit
def _segment_partial(
    q_ptr,
    qh,
    row_ok,
    qk_scale,
    seg,
    share,
    out,
    ws,
    BITS: tl.constexpr,
    D: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
    F32: tl.constexpr,
    ASM: tl.constexpr,
):
    """Partial state of this split's share of one quantised segment on the tensor cores, written to workspace
    rows ws.

    Channels are handled as 8//BITS sub-planes (channel i*PER + J = bits J*BITS.. of byte i), so each
    packed byte tile is loaded once and used as it lies: no reshape. Up to 4 sub-planes (2-bit codes). The
    codes are the big operand of both dots, the NP query heads the small one: scores^T [BLOCK, NP] = sum over J
    of codes_J [BLOCK, KB] @ (q_J * k_scale_J)^T plus the block's key constant (:func:`_key_update`), and acc_J^T
    [KB, NP] += codes_J^T [KB, BLOCK] @ (p * v_scale) [BLOCK, NP] plus its value constant
    (:func:`_value_update`), so the code tiles feed the dots from registers as :func:`_planes` unpacks them.
    """
    kc, ks, kz, vc, vs, vz, pos_ptr, fill_ptr = seg  # a Segment's pointers, in field order
    C, b, bh, split, n_splits = share  # capacity, sequence, (sequence, KV head), this split of n_splits
    PER: tl.constexpr = 8 // BITS
    KB: tl.constexpr = D * BITS // 8
    OP: tl.constexpr = tl.float32 if F32 else tl.float16
    DOT: tl.constexpr = KB >= 16
    q0 = tl.trans(_load_q_plane(q_ptr, qh, row_ok, qk_scale, 0, PER, KB, D))
    if PER > 1:
        q1 = tl.trans(_load_q_plane(q_ptr, qh, row_ok, qk_scale, 1, PER, KB, D))
    if PER > 2:
        q2 = tl.trans(_load_q_plane(q_ptr, qh, row_ok, qk_scale, 2, PER, KB, D))
        q3 = tl.trans(_load_q_plane(q_ptr, qh, row_ok, qk_scale, 3, PER, KB, D))
    m = tl.full([NP], float("-inf"), tl.float32)
    den = tl.zeros([NP], tl.float32)
    a0 = tl.zeros([KB, NP], tl.float32)
    a1 = tl.zeros([KB, NP], tl.float32)
    a2 = tl.zeros([KB, NP], tl.float32)
    a3 = tl.zeros([KB, NP], tl.float32)
    fill = tl.load(fill_ptr + b)
    first, last = _block_range(fill, split, n_splits, BLOCK)
    for blk in range(first, last):
        valid, kbyte, vbyte, v_s, v_z = _load_block(kc, vc, vs, vz, pos_ptr, fill, C, b, bh, blk, KB, BLOCK)
        # keys: a block is one quantisation group -> one [D] scale/zero row, folded into the queries
        row = (bh * (C // BLOCK) + blk) * D + tl.arange(0, D)
        ks0, ks1, ks2, ks3 = _deinterleave(tl.load(ks + row).to(tl.float32), PER, KB)
        kz0, kz1, kz2, kz3 = _deinterleave(tl.load(kz + row).to(tl.float32), PER, KB)
        kp0, kp1, kp2, kp3 = _planes(kbyte, BITS, F32, ASM)
        s = tl.zeros([BLOCK, NP], tl.float32)
        k_terms = tl.zeros([KB, NP], tl.float32)
        s, k_terms = _key_update(s, k_terms, kp0, q0, ks0, kz0, 0, BITS, F32, DOT)
        if PER > 1:
            s, k_terms = _key_update(s, k_terms, kp1, q1, ks1, kz1, 1, BITS, F32, DOT)
        if PER > 2:
            s, k_terms = _key_update(s, k_terms, kp2, q2, ks2, kz2, 2, BITS, F32, DOT)
            s, k_terms = _key_update(s, k_terms, kp3, q3, ks3, kz3, 3, BITS, F32, DOT)
        s = tl.where(valid[:, None], s + tl.sum(k_terms, axis=0)[None, :], float("-inf"))
        p, alpha, m = _online_max(s, m, 0)
        pv = (p * v_s[:, None]).to(OP)
        # over the block's slots: p (the running sum), p * v_zero and p * v_scale (the values' constant)
        p_sum, pz, pvs = tl.reduce((p, p * v_z[:, None], pv.to(tl.float32)), 0, _add3)
        den = den * alpha + p_sum
        vp0, vp1, vp2, vp3 = _planes(vbyte, BITS, F32, ASM)
        a0 = _value_update(a0, alpha, pv, vp0, pz, pvs, 0, BITS, F32, DOT)
        if PER > 1:
            a1 = _value_update(a1, alpha, pv, vp1, pz, pvs, 1, BITS, F32, DOT)
        if PER > 2:
            a2 = _value_update(a2, alpha, pv, vp2, pz, pvs, 2, BITS, F32, DOT)
            a3 = _value_update(a3, alpha, pv, vp3, pz, pvs, 3, BITS, F32, DOT)
    _store_partial(out, ws, row_ok, m, den, tl.trans(a0), 0, PER, KB, D)
    if PER > 1:
        _store_partial(out, ws, row_ok, m, den, tl.trans(a1), 1, PER, KB, D)
    if PER > 2:
        _store_partial(out, ws, row_ok, m, den, tl.trans(a2), 2, PER, KB, D)
        _store_partial(out, ws, row_ok, m, den, tl.trans(a3), 3, PER, KB, D)


@triton.jit
def _key_update(
    s, k_terms, code, q, k_s, k_z, J: tl.constexpr, BITS: tl.constexpr, F32: tl.constexpr, DOT: tl.constexpr
):
    """Scores and their per-block constant's terms after sub-plane J: s [BLOCK, NP] + code [BLOCK, KB] (as
    :func:`_planes` unpacks it) @ (q * k_s) [KB, NP]; k_terms [KB, NP] + q * k_z minus the codes' offset times
    q * k_s (summed over channels once per block by the caller). q fp32 [KB, NP]: the queries' plane J times
    qk_scale; k_s / k_z fp32 [KB]: this group's parameters at channels i*(8//BITS) + J. The dot's operand q * k_s
    is rounded to the codes' dtype, and the offset taken out of that rounded operand, so that it cancels exactly."""
    qs = (q * k_s[:, None]).to(code.dtype)
    return s + _mm(code, qs, DOT), k_terms + q * k_z[:, None] - _plane_offset(J, BITS, F32) * qs.to(tl.float32)


@triton.jit
def _value_update(
    acc,
    alpha,
    pv,
    code,
    pz,
    pvs,
    J: tl.constexpr,
    BITS: tl.constexpr,
    F32: tl.constexpr,
    DOT: tl.constexpr,
):
    """The accumulator of sub-plane J after one block: acc [KB, NP] rescaled by alpha [NP] plus code [KB, BLOCK]
    (the value codes transposed, as :func:`_planes` unpacks them) @ pv [BLOCK, NP] (p * v_scale), plus the zero
    points' term pz [NP] (sum of p * v_zero) minus the codes' offset times pvs [NP] (the sum of pv)."""
    v_const = pz - _plane_offset(J, BITS, F32) * pvs
    return acc * alpha[None, :] + _mm(code, pv, DOT) + v_const[None, :]


@triton.jit
def _code_place(BITS: tl.constexpr, D: tl.constexpr, FOLD: tl.constexpr):
    """Where channel c's code sits for :func:`_codes_f32`, as int32 [D] (shift, position): the word is shifted
    left by ``shift`` (right where negative) and the code then lies at bit ``position`` of a float's 23 mantissa
    bits. Exact (FOLD false): shift 0 or -16, position < 16. FOLD: position in [15, 22) (bit % 8 + 15; the codes of
    one byte share a shift), high enough that 2^23 need not be taken out code by code (:func:`_codes_f32`)."""
    bit = (tl.arange(0, D) % (32 // BITS)) * BITS
    if FOLD:
        position = bit % 8 + 15
    else:
        position = bit % 16
    return position - bit, position


@triton.jit
def _codes_f32(
    words,
    BITS: tl.constexpr,
    REPS: tl.constexpr,
    LANES: tl.constexpr,
    D: tl.constexpr,
    ASM: tl.constexpr,
    FOLD: tl.constexpr,
):
    """uint32 words [REPS, LANES, W] (W = D*BITS//32) -> fp32 [REPS, LANES, D] in channel order: ``code * 2^position``
    (:func:`_code_place`), plus 2^23 with FOLD, where channel w*CPW + t (CPW = 32 // BITS) is bits t*BITS.. of
    word w.

    Each word is repeated CPW times in the thread's registers (joins add register dimensions, the reshape
    then merges them with the word axis: no data movement between threads). The code, masked in place, is
    ORed into the mantissa of 2^23: exact, one AND-OR per code, no int->float conversion (a quarter of the
    FMA rate). Exact: 2^23 subtracted, one add per code. FOLD: 2^23 is left in, and callers take it out of
    their sums once (``sum x*(2^23 + c*2^p) - 2^23 * sum x``): with the code at bit p >= 15 each product still
    carries the code to 2^-16 of its own size. Callers fold ``2^-position`` into the other operand (an exact
    power of two). ASM (GPU): the AND-OR as one ``lop3`` (the compiler otherwise emits two instructions).
    """
    CPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    x = tl.join(words, words)
    x = tl.join(x, x)  # CPW >= 4 (BITS <= 8)
    if CPW >= 8:
        x = tl.join(x, x)
    if CPW >= 16:
        x = tl.join(x, x)
    shift, position = _code_place(BITS, D, FOLD)
    x = tl.reshape(x, [REPS, LANES, D])  # words are uint32: logical shifts
    x = (x << tl.maximum(shift, 0)[None, None, :]) >> tl.maximum(-shift, 0)[None, None, :]
    mask = tl.broadcast_to((MASK << position).to(tl.uint32)[None, None, :], [REPS, LANES, D])
    if ASM:
        x = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, 0x4b000000, 0xea;", "=r,r,r", [x, mask], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        x = (x & mask) | 0x4B000000
    x = x.to(tl.float32, bitcast=True)
    if not FOLD:
        x = x - 8388608.0
    return x


@triton.jit
def _rep_fma(acc, w, x, REPS: tl.constexpr):
    """acc [LANES, D] + sum over r of w[r, :, None] * x[r] (w [REPS, LANES], x [REPS, LANES, D]): for REPS in
    {1, 2, 4} one chain of multiply-adds per element, r in order (a tree sum would cost a multiply and an add per
    product; the reps lie in a thread's registers, so the splits move no data)."""
    y = tl.permute(x, (1, 2, 0))  # [LANES, D, REPS]
    v = tl.permute(w, (1, 0))  # [LANES, REPS]
    if REPS == 1:
        acc = acc + tl.reshape(v, [v.shape[0]])[:, None] * tl.reshape(y, [y.shape[0], y.shape[1]])
    elif REPS == 2:
        y0, y1 = tl.split(y)
        v0, v1 = tl.split(v)
        acc = acc + v0[:, None] * y0
        acc = acc + v1[:, None] * y1
    elif REPS == 4:
        ya, yb = tl.split(tl.reshape(y, [y.shape[0], y.shape[1], 2, 2]))  # reps (0, 2), (1, 3)
        va, vb = tl.split(tl.reshape(v, [v.shape[0], 2, 2]))
        y0, y2 = tl.split(ya)
        y1, y3 = tl.split(yb)
        v0, v2 = tl.split(va)
        v1, v3 = tl.split(vb)
        acc = acc + v0[:, None] * y0
        acc = acc + v1[:, None] * y1
        acc = acc + v2[:, None] * y2
        acc = acc + v3[:, None] * y3
    else:  # more reps than the chains above (few warps): a plain sum
        acc = acc + tl.sum(w[:, :, None] * x, axis=0)
    return acc


@triton.jit
def _fma_loads(
    head,
    blk,
    fill,
    W: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    REPS: tl.constexpr,
    LANES: tl.constexpr,
):
    """What the CUDA-core path reads of block ``blk`` (nothing past the fill): valid [REPS, LANES] (slot
    r * LANES + l), key / value words [REPS, LANES, W], value scale / zero fp32 [REPS, LANES] (0 on invalid slots),
    the block's key scale / zero rows fp32 [D]. head: a Segment's pointers moved to this (sequence, KV head), so
    that the offsets here are small int32 ones."""
    kc, ks, kz, vc, vs, vz, pos = head
    slot = blk * BLOCK + tl.arange(0, REPS)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    valid = tl.load(pos + slot, mask=slot < fill, other=-1) >= 0
    slot_w = blk * BLOCK + tl.arange(0, BLOCK)  # the same slots, for the word tile's own layout
    # [W // VEC, BLOCK, VEC]: word vectors first, so that the threads of a slot take its vectors (the compiler
    # orders the non-contiguous dims by their index), then permuted to the slots-major order
    tile = slot_w[None, :, None] * W + tl.arange(0, W // VEC)[:, None, None] * VEC + tl.arange(0, VEC)[None, None, :]
    ok = (slot_w < fill)[None, :, None]
    kw = tl.reshape(tl.permute(tl.load(kc + tile, mask=ok, other=0), (1, 0, 2)), [REPS, LANES, W])
    vw = tl.reshape(tl.permute(tl.load(vc + tile, mask=ok, other=0), (1, 0, 2)), [REPS, LANES, W])
    # masked by the fill, not by valid: a mask on the positions' load would make these wait for it
    v_s = tl.load(vs + slot, mask=slot < fill, other=0.0).to(tl.float32)
    v_z = tl.load(vz + slot, mask=slot < fill, other=0.0).to(tl.float32)
    row = blk * D + tl.arange(0, D)  # a block is one key group: one [D] scale/zero row
    live = blk * BLOCK < fill  # a block past the fill (a prefetch past the last) reads nothing
    k_s = tl.load(ks + row, mask=live, other=0.0).to(tl.float32)
    k_z = tl.load(kz + row, mask=live, other=0.0).to(tl.float32)
    return valid, kw, vw, tl.where(valid, v_s, 0.0), tl.where(valid, v_z, 0.0), k_s, k_z


@triton.jit
def _segment_partial_fma(
    seg,
    share,
    out,
    ws,
    q_ptr,
    qh,
    qk_scale,
    BITS: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    ASM: tl.constexpr,
    FOLD: tl.constexpr,
    CPT: tl.constexpr,
    WARPS: tl.constexpr,
):
    """One query head (n_rep = 1) over this split's share of a segment, on the CUDA cores (no padded rows).

    kc / vc: the codes as uint32 words [B, H, C, D*BITS//32] (the layout's bit order read four bytes at a
    time, see :func:`_codes_f32`). A thread loads VEC words (CPT channels, at most four words) of a slot; the
    block's GROUP slots lie as [REPS, LANES]: LANES slot lanes across the WARPS warps' threads, and REPS slots per
    thread (slot ``r * LANES + l``). Scores and the value accumulator stay in that layout: q·k is a multiply-sum
    over channels per slot; p·v accumulates per (slot lane, channel) fp32 [LANES, D], a thread's REPS slots summed
    into it by one chain of multiply-adds (:func:`_rep_fma`), reduced over lanes once after the loop; the
    accumulator is rescaled only when the running max grows. Each block's loads are issued one block ahead
    (:func:`_fma_loads`), so that their latency overlaps the previous block's arithmetic. Dequantisation is folded
    as in the tensor-core path: ``q·k = (q*k_scale)·code + q·k_zero`` and ``p·v = (p*v_scale)·code +
    p·v_zero``.
    """
    kc, ks, kz, vc, vs, vz, pos_ptr, fill_ptr = seg  # a Segment's pointers, in field order
    C, b, bh, split, n_splits = share  # capacity, sequence, (sequence, KV head), this split of n_splits
    W: tl.constexpr = D * BITS // 32
    # each thread loads VEC words (CPT channels) of a slot; LANES slots lie across the threads, and a thread holds
    # REPS slots (one every LANES), whose products it sums before they reach the accumulator
    VEC: tl.constexpr = min(max(CPT * BITS // 32, 1), 4, W)
    TW: tl.constexpr = min(W // VEC, 32)  # threads along a slot's words
    LANES: tl.constexpr = min(32 // TW * WARPS, BLOCK)
    REPS: tl.constexpr = BLOCK // LANES
    OFFSET: tl.constexpr = 8388608.0 if FOLD else 0.0  # the 2^23 each code carries (:func:`_codes_f32`)
    chan = tl.arange(0, D)
    _, position = _code_place(BITS, D, FOLD)
    unplace = tl.exp2(-position.to(tl.float32))  # exact powers of two
    q = tl.load(q_ptr + qh * D + chan).to(tl.float32) * qk_scale
    q_placed = q * unplace
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)  # the running max (a scalar)
    # per slot lane, reduced after the loop: sums of p (den), p·v_zero (v_const), p·v_scale (v_offset, FOLD only)
    den = tl.zeros([LANES], tl.float32)
    v_const = tl.zeros([LANES], tl.float32)
    v_offset = tl.zeros([LANES], tl.float32)
    acc = tl.zeros([LANES, D], tl.float32)
    fill = tl.load(fill_ptr + b)
    first, last = _block_range(fill, split, n_splits, BLOCK)
    slots = bh * C  # this (sequence, KV head)'s first slot
    head = (kc + slots * W, ks + bh * (C // BLOCK) * D, kz + bh * (C // BLOCK) * D, vc + slots * W, vs + slots)
    head += (vz + slots, pos_ptr + b * C)
    nxt = _fma_loads(head, first, fill, W, D, BLOCK, VEC, REPS, LANES)
    for blk in range(first, last):
        valid, kw, vw, v_s, v_z, k_s, k_z = nxt
        # the next block's loads go out before this block's arithmetic (a block past the split's last is read for
        # nothing; past the fill, nothing is read)
        nxt = _fma_loads(head, blk + 1, fill, W, D, BLOCK, VEC, REPS, LANES)
        qs = q_placed * k_s
        k_const = tl.sum(q * k_z - OFFSET * qs, axis=0)
        s = tl.sum(_codes_f32(kw, BITS, REPS, LANES, D, ASM, FOLD) * qs[None, None, :], axis=2) + k_const
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(tl.max(s, axis=0), axis=0))  # a thread's reps first
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use)
        if alpha < 1.0:
            acc = acc * alpha
            den = den * alpha
            v_const = v_const * alpha
            if FOLD:
                v_offset = v_offset * alpha
        den += tl.sum(p, axis=0)
        v_const += tl.sum(p * v_z, axis=0)
        pv = p * v_s
        if FOLD:
            v_offset += tl.sum(pv, axis=0)
        acc = _rep_fma(acc, pv, _codes_f32(vw, BITS, REPS, LANES, D, ASM, FOLD), REPS)
        m = m_new
    m_ws, den_ws, acc_ws = out
    tl.store(m_ws + ws, m)
    tl.store(den_ws + ws, tl.sum(den, axis=0))
    acc_c = tl.sum(acc, axis=0) - OFFSET * tl.sum(v_offset, axis=0)
    tl.store(acc_ws + ws * D + chan, acc_c * unplace + tl.sum(v_const, axis=0))


@triton.jit
def _tail_partial(
    q_ptr,
    qh,
    row_ok,
    qk_scale,
    tail,
    share,
    out,
    ws,
    D: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Partial state of this split's share of the model-dtype tail (kt/vt [B, H, R, D], tpos [B, R])."""
    kt, vt, tpos_ptr, tlen_ptr = tail  # a Tail's pointers, in field order
    R, b, bh, split, n_splits = share  # capacity, sequence, (sequence, KV head), this split of n_splits
    DT = kt.dtype.element_ty
    chan = tl.arange(0, D)
    q = tl.load(q_ptr + qh[:, None] * D + chan[None, :], mask=row_ok[:, None], other=0.0).to(DT)
    m = tl.full([NP], float("-inf"), tl.float32)
    den = tl.zeros([NP], tl.float32)
    acc = tl.zeros([NP, D], tl.float32)
    n = tl.minimum(tl.load(tlen_ptr + b), R)
    first, last = _block_range(n, split, n_splits, BLOCK)
    for blk in range(first, last):
        slot = blk * BLOCK + tl.arange(0, BLOCK)
        slot_ok = slot < n
        valid = tl.load(tpos_ptr + b * R + slot, mask=slot_ok, other=-1) >= 0
        offs = (bh * R + slot[:, None]) * D + chan[None, :]
        k = tl.load(kt + offs, mask=slot_ok[:, None], other=0.0).to(DT)
        v = tl.load(vt + offs, mask=valid[:, None], other=0.0).to(DT)  # holes may hold garbage
        s = (tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale).to(tl.float32)
        p, alpha, m, den = _online_update(tl.where(valid[None, :], s, float("-inf")), m, den, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v, input_precision="ieee")
    _store_partial(out, ws, row_ok, m, den, acc, 0, 1, D, D)


@triton.jit
def _segment_share(
    rows,
    seg,
    share,
    out,
    BITS: tl.constexpr,
    D: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
    F32: tl.constexpr,
    ASM: tl.constexpr,
    PATH: tl.constexpr,
    CPT: tl.constexpr,
    WARPS: tl.constexpr,
):
    """One split's share of a segment on PATH (see :func:`_decode_partial_kernel`); rows: the program's query
    pointer, query-head rows, their mask and workspace rows, the first head and its row, qk_scale."""
    q_ptr, qh, row_ok, ws, qh0, ws0, qk_scale = rows
    if PATH == 0:
        _segment_partial_fma(seg, share, out, ws0, q_ptr, qh0, qk_scale, BITS, D, BLOCK, ASM, not F32, CPT, WARPS)
    else:
        _segment_partial(q_ptr, qh, row_ok, qk_scale, seg, share, out, ws, BITS, D, NP, BLOCK, F32, ASM)


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    hkc,
    hks,
    hkz,
    hvc,
    hvs,
    hvz,
    hpos,
    hfill,
    C_HI,
    S_HI,
    lkc,
    lks,
    lkz,
    lvc,
    lvs,
    lvz,
    lpos,
    lfill,
    C_LO,
    S_LO,
    kt,
    vt,
    tpos,
    tlen,
    R,
    acc_ws,
    m_ws,
    den_ws,
    H,
    n_rep,
    qk_scale,
    HI_BITS: tl.constexpr,
    LO_BITS: tl.constexpr,
    D: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
    F32: tl.constexpr,
    ASM: tl.constexpr,
    PATH: tl.constexpr,
    CPT: tl.constexpr,
    WARPS: tl.constexpr,
):
    """Program (b, h, j): partial softmax state of query heads h*n_rep .. h*n_rep + n_rep - 1 over one share
    of one source: j < S_HI -> hi split j, j < S_HI + S_LO -> lo split j - S_HI, else a tail split. A segment
    share runs on PATH (an index of :data:`PATHS`): 0, the CUDA cores (one query head per KV head; codes
    passed as uint32 words); 1, the tensor cores serving the n_rep heads of the KV head at once.

    Writes acc_ws fp32 [B, Hq, S, D] (unnormalised), m_ws / den_ws fp32 [B, Hq, S] (base-2 max, sum).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    n_splits = tl.num_programs(2)
    bh = (b * H + h).to(tl.int64)
    rows = tl.arange(0, NP)
    row_ok = rows < n_rep
    qh = b * H * n_rep + h * n_rep + rows  # query-head rows of this KV head
    ws = qh.to(tl.int64) * n_splits + j
    qh0 = b * H * n_rep + h * n_rep  # FMA (n_rep = 1): the one query head, its workspace row
    ws0 = qh0.to(tl.int64) * n_splits + j
    out = (m_ws, den_ws, acc_ws)
    rows = (q_ptr, qh, row_ok, ws, qh0, ws0, qk_scale)
    if j < S_HI:
        hi = (hkc, hks, hkz, hvc, hvs, hvz, hpos, hfill)
        _segment_share(rows, hi, (C_HI, b, bh, j, S_HI), out, HI_BITS, D, NP, BLOCK, F32, ASM, PATH, CPT, WARPS)
    elif j < S_HI + S_LO:
        lo = (lkc, lks, lkz, lvc, lvs, lvz, lpos, lfill)
        _segment_share(rows, lo, (C_LO, b, bh, j - S_HI, S_LO), out, LO_BITS, D, NP, BLOCK, F32, ASM, PATH, CPT, WARPS)
    else:
        share = (R, b, bh, j - S_HI - S_LO, n_splits - S_HI - S_LO)
        _tail_partial(q_ptr, qh, row_ok, qk_scale, (kt, vt, tpos, tlen), share, out, ws, D, NP, BLOCK)


@triton.jit
def _decode_merge_kernel(acc_ws, m_ws, den_ws, out_ptr, S, D: tl.constexpr, SP: tl.constexpr, DC: tl.constexpr):
    """Program (b*Hq + head, c): merge the S partial states of one query head into channels c*DC .. c*DC + DC - 1
    of out [.., D] (out's dtype), SP partials at a time: the largest max first, then one pass of weighted sums."""
    row = tl.program_id(0).to(tl.int64)
    chan = tl.program_id(1) * DC + tl.arange(0, DC)
    m_all = tl.max(tl.full([SP], float("-inf"), tl.float32), axis=0)
    for s0 in range(0, S, SP):
        sp = s0 + tl.arange(0, SP)
        m_all = tl.maximum(m_all, tl.max(tl.load(m_ws + row * S + sp, mask=sp < S, other=float("-inf")), axis=0))
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros([SP], tl.float32)
    acc = tl.zeros([DC], tl.float32)
    for s0 in range(0, S, SP):
        sp = s0 + tl.arange(0, SP)
        sp_ok = sp < S
        w = tl.exp2(tl.load(m_ws + row * S + sp, mask=sp_ok, other=float("-inf")) - m_all)
        total += w * tl.load(den_ws + row * S + sp, mask=sp_ok, other=0.0)
        part = tl.load(acc_ws + (row * S + sp)[:, None] * D + chan[None, :], mask=sp_ok[:, None], other=0.0)
        acc += tl.sum(w[:, None] * part, axis=0)
    total = tl.sum(total, axis=0)
    tl.store(out_ptr + row * D + chan, (acc / tl.where(total > 0.0, total, 1.0)).to(out_ptr.dtype.element_ty))


@functools.cache
def _partial_launcher(num_warps: int, num_stages: int, maxnreg: int) -> triton.runtime.Autotuner:
    """:func:`_decode_partial_kernel` with one launch configuration, as an autotuner of that one config: a
    register cap reaches a kernel that torch.compile traces only through a config (it takes num_warps and
    num_stages as launch options, maxnreg not); maxnreg 0: uncapped."""
    config = triton.Config({}, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg or None)
    return triton.autotune(configs=[config], key=[])(_decode_partial_kernel)


def launch_warps(policy: Tuning, programs: int, sms: int, d: int) -> int:
    """Warps per program of a launch of ``programs`` programs: the policy's ``num_warps``, or its ``sparse_warps``
    where the grid leaves the SMs nearly idle (fewer than two programs per SM: the launch is bound by latency, and
    more warps per program hide more of it); at least 8 for d = 256."""
    warps = policy.num_warps if programs >= 2 * sms else policy.sparse_warps
    return max(warps, 8 if d == 256 else 1)


def default_path(n_rep: int) -> str:
    """The policy's segment path for ``n_rep`` query heads per KV head."""
    return "fma" if n_rep == 1 else "swap"


def tuning(path: str) -> Tuning:
    """The policy's launch tuning of a segment path (one of :data:`PATHS`)."""
    return _TUNING[path]


def num_splits_for(
    batch: int,
    kv_heads: int,
    c_hi: int,
    c_lo: int,
    tail: int,
    sms: int,
    policy: Tuning,
) -> tuple[int, int, int]:
    """Splits (hi, lo, tail) per (sequence, KV head), from static shapes and the device's SM count ``sms``.

    Together >= ``policy.programs_per_sm`` programs per SM, shared between hi and lo in proportion to their
    capacity (a block of GROUP slots costs about the same instructions at any bit width), each split getting at
    least ``policy.min_blocks`` blocks of a full segment, at most ``policy.max_splits`` per segment; the tail (a
    few hundred slots at most) gets one split per 512 slots.
    """
    per_seq = triton.cdiv(policy.programs_per_sm * sms, batch * kv_heads)
    share_hi = round(per_seq * c_hi / max(c_hi + c_lo, 1))
    cap = lambda c: max(1, min(policy.max_splits, c // (policy.min_blocks * GROUP)))
    return (
        max(1, min(share_hi, cap(c_hi))),
        max(1, min(per_seq - share_hi, cap(c_lo))),
        max(1, triton.cdiv(tail, 512)),
    )


def decode_attention_triton(
    q: torch.Tensor,
    call: DecodeCall,
    num_splits: tuple[int, int, int] | None = None,
    path: str | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
    num_stages: int | None = None,
    asm: bool | None = None,
    maxnreg: int | None = None,
    channels_per_thread: int | None = None,
) -> torch.Tensor:
    """Split-K Triton decode attention; arguments as :func:`decode_attention`.

    Tuning (defaults: the policy; the benchmark sweeps them): num_splits: splits (hi, lo, tail) per (sequence,
    KV head), default :func:`num_splits_for` with ``programs_per_sm``; path: the segment path, one of
    :data:`PATHS` (default :func:`default_path`; "fma" serves one query head per KV head); num_warps /
    num_stages: warps per program (default :func:`launch_warps`), software-pipelining depth; asm: the inline-PTX
    code unpacking of the tensor-core path (default on CUDA); maxnreg: the register cap per thread (0: uncapped);
    channels_per_thread: the CUDA-core path's channels of a slot per thread (:class:`Tuning`).
    Segment tensors are made contiguous (a no-op for cache buffers). Returns [B, Hq, 1, d] in q's dtype.
    """
    hi, lo, tail, n_rep = call.hi, call.lo, call.tail, call.n_rep
    B, Hq, q_len, d = q.shape
    H = hi.k_codes.shape[1]
    if q_len != 1 or Hq != H * n_rep or d not in (16, 32, 64, 128, 256):
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)} needs q_len 1, Hq = H*n_rep = {H}*{n_rep} "
            "and d in {16, 32, 64, 128, 256}"
        )
    c_hi, c_lo, R = hi.capacity, lo.capacity, tail.slots
    sms = sm_count(q.device)
    path = path or default_path(n_rep)
    if path not in PATHS:
        raise ValueError(f"decode_attention: path must be one of {PATHS}, got {path!r}")
    fma = path == "fma"
    if fma and n_rep != 1:
        raise ValueError(f"decode_attention: the CUDA-core path serves n_rep = 1, got {n_rep}")
    policy = tuning(path)
    policy = policy._replace(programs_per_sm=programs_per_sm or policy.programs_per_sm)
    cpt = channels_per_thread or policy.channels_per_thread
    if cpt & (cpt - 1) or not 1 <= cpt <= 256:  # more than a slot's channels: the whole slot
        raise ValueError(f"decode_attention: channels_per_thread must be a power of two in [1, 256], got {cpt}")
    s_hi, s_lo, s_tail = num_splits or num_splits_for(B, H, c_hi, c_lo, R, sms, policy)
    S = s_hi + s_lo + s_tail
    acc_ws = torch.empty(B, Hq, S, d, device=q.device, dtype=torch.float32)
    m_ws = torch.empty(B, Hq, S, device=q.device, dtype=torch.float32)
    den_ws = torch.empty_like(m_ws)
    hi, lo = (Segment(*(t.contiguous() for t in seg)) for seg in (hi, lo))
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or tail.k.dtype != q.dtype:
        raise ValueError(
            f"decode_attention: q and the tail must share one of fp32/fp16/bf16, got {q.dtype} and {tail.k.dtype}"
        )
    if fma:  # the CUDA-core path reads the codes four bytes at a time
        hi, lo = (
            seg._replace(k_codes=seg.k_codes.view(torch.uint32), v_codes=seg.v_codes.view(torch.uint32))
            for seg in (hi, lo)
        )
    warps = num_warps or launch_warps(policy, B * H * S, sms, d)
    launch = _partial_launcher(
        warps,
        num_stages or policy.num_stages,
        policy.maxnreg if maxnreg is None else maxnreg,
    )
    wrap_triton(launch)[(B, H, S)](
        q.contiguous(),
        *hi,
        c_hi,
        s_hi,
        *lo,
        c_lo,
        s_lo,
        tail.k.contiguous(),
        tail.v.contiguous(),
        tail.pos.contiguous(),
        tail.length,
        R,
        acc_ws,
        m_ws,
        den_ws,
        H,
        n_rep,
        call.scale * math.log2(math.e),
        HI_BITS=call.hi_bits,
        LO_BITS=call.lo_bits,
        D=d,
        NP=max(_MIN_ROWS[path], triton.next_power_of_2(n_rep)),
        BLOCK=GROUP,
        F32=q.dtype == torch.float32,
        ASM=(q.is_cuda if asm is None else asm) and q.dtype != torch.float32,
        PATH=PATHS.index(path),
        CPT=cpt,
        WARPS=warps,
    )
    out = torch.empty(B, Hq, 1, d, device=q.device, dtype=q.dtype)
    dc = min(d, _MERGE_CHANNELS)
    wrap_triton(_decode_merge_kernel)[(B * Hq, d // dc)](
        acc_ws, m_ws, den_ws, out, S, D=d, SP=min(triton.next_power_of_2(S), _MERGE_CHUNK), DC=dc
    )
    return out


def decode_attention(q: torch.Tensor, call: DecodeCall, use_triton: bool | None = None) -> torch.Tensor:
    """Decode attention over the packed cache: Triton on CUDA (or when ``use_triton``), else the CPU path
    (:mod:`~zipvl_compile.runtime.kernels.decode_cpu`, tested against the reference).

    q [B, H*n_rep, 1, d]; call: the cache, scale and head grouping (:class:`DecodeCall`). Returns
    [B, H*n_rep, 1, d] in q's dtype.
    """
    if wants_triton(q, use_triton):
        return decode_attention_triton(q, call)
    return decode_attention_cpu(q, call.hi, call.lo, call.tail, call.scale, call.n_rep, call.hi_bits, call.lo_bits)
