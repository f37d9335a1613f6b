"""The CPU paths' C functions, compiled at first use: decode attention over the packed cache, and the segment
write (2, 4 and 8 bits).

:func:`decode_attention_native`: the contract of
:func:`~zipvl_compile.runtime.kernels.decode_reference.decode_attention_reference` (its oracle), called by
:func:`~zipvl_compile.runtime.kernels.decode_cpu.decode_attention_cpu` where it applies: q ``[B, H*n_rep, 1, d]``;
``hi`` / ``lo``: :class:`~zipvl_compile.runtime.layout.Segment` at ``hi_bits`` / ``lo_bits``; ``tail``:
:class:`~zipvl_compile.runtime.layout.Tail` in q's dtype (fp32, bf16 or fp16). Returns ``[B, H*n_rep, 1, d]`` in
q's dtype, computed in fp32. :func:`write_segment_native_`: the bytes of
:func:`~zipvl_compile.runtime.kernels.quant_reference.write_segment_reference_` exactly (its arithmetic, written
out in C, the 2-bit range search included), called by
:func:`~zipvl_compile.runtime.kernels.quant_cpu.write_segment_cpu_`. :func:`copy_slots_native_`: a segment's first
slots into another segment (the cache's compaction, :func:`zipvl_compile.runtime.packed.copy_slots_`, its torch
body the oracle): one call instead of a slice and a copy per field (~8 µs against ~60 µs of torch overhead).

Why C: a decode step on the CPU is small (a few hundred slots per head at the demo's prompt), so a torch body
pays for its ~45 ops' dispatch (~10 µs each inside a step on a 2-core machine) far more than for arithmetic; a
dense model reads its cache with one SDPA call. Here each (sequence, KV head) is one pass over the codes: the key
scale is folded into the query per 64-slot group (``q·k = (q*k_scale)·code + q·k_zero``), scores of the
``n_rep`` query heads are kept for the valid slots only, one softmax, then one pass over the value codes
(``p·v = (p*v_scale)·code + p·v_zero``). Empty slots (pos < 0, or at or past the fill / length) are skipped, so
their parameters (possibly NaN) and codes are never read. The write runs the reference's arithmetic per (sequence,
KV head, 64-slot group), the 2-bit range search in place. Inner loops over channels are vectorised by the C
compiler (``-O3 -march=native``; ``-fno-trapping-math`` lets it vectorise ``floorf``; no fast-math: nothing is
reassociated, and the write's only multiply-adds the compiler may fuse have exact products, so its bits stay the
reference's). The C functions trust their inputs: every
call is checked first (:func:`refusal`, :func:`write_refusal`: dtypes, shapes, plain contiguous CPU tensors).

The library is built with the C compiler of ``$CC`` (else ``cc`` / ``gcc`` on the path) into
``$ZIPVL_CACHE_DIR`` (default ``~/.cache/zipvl_compile``), named by a hash of the source, the compiler and the
machine, and loaded with ``ctypes``. Without a compiler (or if the build fails) :func:`library` returns None
and the CPU path keeps its torch body; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import operator
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from zipvl_compile.logs import LOG_NAME
from zipvl_compile.runtime.kernels.quant_reference import KEY_SHRINK_STEPS, SCALE_FLOOR
from zipvl_compile.runtime.layout import GROUP, QUANT_BITS, Segment, Tail

log = logging.getLogger(LOG_NAME)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };

static float half_to_float(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}

static void load_row(const void *base, int64_t index, int64_t d, int dtype, float *out) {
    if (dtype == F32) {
        memcpy(out, (const float *)base + index * d, (size_t)d * sizeof(float));
    } else if (dtype == BF16) {
        const uint16_t *row = (const uint16_t *)base + index * d;
        for (int64_t c = 0; c < d; c++) {
            uint32_t bits = (uint32_t)row[c] << 16;
            memcpy(out + c, &bits, 4);
        }
    } else {
        const uint16_t *row = (const uint16_t *)base + index * d;
        for (int64_t c = 0; c < d; c++) out[c] = half_to_float(row[c]);
    }
}

static void store_row(void *base, int64_t index, int64_t d, int dtype, const float *row) {
    if (dtype == F32) {
        memcpy((float *)base + index * d, row, (size_t)d * sizeof(float));
        return;
    }
    uint16_t *out = (uint16_t *)base + index * d;
    for (int64_t c = 0; c < d; c++) {
        uint32_t bits;
        memcpy(&bits, row + c, 4);
        if (dtype == BF16) {
            /* round to nearest even (a NaN stays a NaN) */
            out[c] = (bits & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((bits >> 16) | 0x40u)
                                                       : (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
        } else {
            _Float16 h = (_Float16)row[c];
            memcpy(out + c, &h, 2);
        }
    }
}

/* codes of one slot -> floats, channel c at byte c / (8 / bits), shift (c % (8 / bits)) * bits */
static void unpack(const uint8_t *bytes, int64_t d, int bits, float *out) {
    if (bits == 8) {
        for (int64_t c = 0; c < d; c++) out[c] = (float)bytes[c];
    } else if (bits == 4) {
        for (int64_t i = 0; i < d / 2; i++) {
            out[2 * i] = (float)(bytes[i] & 15);
            out[2 * i + 1] = (float)(bytes[i] >> 4);
        }
    } else {
        for (int64_t i = 0; i < d / 4; i++) {
            out[4 * i] = (float)(bytes[i] & 3);
            out[4 * i + 1] = (float)((bytes[i] >> 2) & 3);
            out[4 * i + 2] = (float)((bytes[i] >> 4) & 3);
            out[4 * i + 3] = (float)(bytes[i] >> 6);
        }
    }
}

typedef float v8 __attribute__((vector_size(32))); /* GCC / clang vector extension: 8 fp32 lanes */

static v8 load8(const float *x) {
    v8 v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* d a multiple of 8; two accumulators, the lanes summed in registers */
static float dot(const float *a, const float *b, int64_t d) {
    v8 s0 = {0}, s1 = {0};
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) {
        s0 += load8(a + c) * load8(b + c);
        s1 += load8(a + c + 8) * load8(b + c + 8);
    }
    if (c < d) s0 += load8(a + c) * load8(b + c);
    s0 += s1;
    return ((s0[0] + s0[4]) + (s0[1] + s0[5])) + ((s0[2] + s0[6]) + (s0[3] + s0[7]));
}

static void axpy(float *acc, float w, const float *x, int64_t d) {
    for (int64_t c = 0; c < d; c += 8) {
        v8 y = load8(acc + c) + w * load8(x + c);
        memcpy(acc + c, &y, sizeof y);
    }
}

typedef struct {
    const uint8_t *k_codes, *v_codes;
    const uint16_t *k_scale, *k_zero, *v_scale, *v_zero;
    const int32_t *pos, *fill;
    int64_t capacity, bits;
} segment_t;

/* ptrs: q, out, hi (8 fields in Segment order), lo (8), tail k, v, pos, length.
   ints: B, H, n_rep, d, dtype, hi capacity, hi bits, lo capacity, lo bits, tail slots, key group size.
   Returns 0, or -1 when scratch memory cannot be allocated. */
int zipvl_decode(void **ptrs, const int64_t *ints, double scale) {
    const int64_t B = ints[0], H = ints[1], n_rep = ints[2], d = ints[3], R = ints[9], GROUP = ints[10];
    const int dtype = (int)ints[4];
    segment_t seg[2];
    for (int s = 0; s < 2; s++) {
        void **p = ptrs + 2 + 8 * s;
        seg[s] = (segment_t){p[0], p[3], p[1], p[2], p[4], p[5], p[6], p[7], ints[5 + 2 * s], ints[6 + 2 * s]};
    }
    const void *tk = ptrs[18], *tv = ptrs[19];
    const int32_t *tpos = ptrs[20], *tlen = ptrs[21];
    const int64_t slots = seg[0].capacity + seg[1].capacity + R;
    /* scratch: q rows, q*k_scale rows, k constant, one slot's floats, accumulators, scores, slot sources */
    float *mem = malloc(sizeof(float) * (size_t)(n_rep * (3 * d + 3 + slots) + d));
    int64_t *where = malloc(sizeof(int64_t) * (size_t)(slots > 0 ? slots : 1));
    if (!mem || !where) {
        free(mem);
        free(where);
        return -1;
    }
    float *qs = mem, *qk = qs + n_rep * d, *acc = qk + n_rep * d, *row = acc + n_rep * d;
    float *kconst = row + d, *vconst = kconst + n_rep, *den = vconst + n_rep, *score = den + n_rep;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t bh = b * H + h;
            for (int64_t r = 0; r < n_rep; r++) {
                load_row(ptrs[0], bh * n_rep + r, d, dtype, qs + r * d);
                for (int64_t c = 0; c < d; c++) qs[r * d + c] *= (float)scale;
            }
            int64_t n = 0; /* valid slots seen; where[i] = source * 2^40 + slot */
            for (int s = 0; s < 2; s++) {
                const segment_t *g = &seg[s];
                const int64_t cap = g->capacity, kb = d * g->bits / 8;
                int64_t fill = g->fill[b] < cap ? g->fill[b] : cap, group = -1;
                for (int64_t t = 0; t < fill; t++) {
                    if (g->pos[b * cap + t] < 0) continue;
                    if (t / GROUP != group) { /* the key parameters of this slot's group, folded into q */
                        group = t / GROUP;
                        const int64_t prow = (bh * (cap / GROUP) + group) * d;
                        for (int64_t c = 0; c < d; c++) row[c] = half_to_float(g->k_zero[prow + c]);
                        for (int64_t r = 0; r < n_rep; r++) {
                            kconst[r] = dot(qs + r * d, row, d);
                            for (int64_t c = 0; c < d; c++)
                                qk[r * d + c] = qs[r * d + c] * half_to_float(g->k_scale[prow + c]);
                        }
                    }
                    unpack(g->k_codes + (bh * cap + t) * kb, d, (int)g->bits, row);
                    for (int64_t r = 0; r < n_rep; r++) score[r * slots + n] = dot(qk + r * d, row, d) + kconst[r];
                    where[n++] = ((int64_t)s << 40) | t;
                }
            }
            const int64_t len = tlen[b] < R ? tlen[b] : R;
            for (int64_t t = 0; t < len; t++) {
                if (tpos[b * R + t] < 0) continue;
                load_row(tk, bh * R + t, d, dtype, row);
                for (int64_t r = 0; r < n_rep; r++) score[r * slots + n] = dot(qs + r * d, row, d);
                where[n++] = ((int64_t)2 << 40) | t;
            }
            for (int64_t r = 0; r < n_rep; r++) { /* softmax over the valid slots */
                float *sc = score + r * slots, top = -INFINITY, sum = 0.0f;
                for (int64_t i = 0; i < n; i++) top = sc[i] > top ? sc[i] : top;
                for (int64_t i = 0; i < n; i++) sc[i] = expf(sc[i] - top);
                for (int64_t i = 0; i < n; i++) sum += sc[i];
                den[r] = sum;
                vconst[r] = 0.0f;
            }
            memset(acc, 0, sizeof(float) * (size_t)(n_rep * d));
            for (int64_t i = 0; i < n; i++) {
                const int s = (int)(where[i] >> 40);
                const int64_t t = where[i] & (((int64_t)1 << 40) - 1);
                if (s == 2) {
                    load_row(tv, bh * R + t, d, dtype, row);
                    for (int64_t r = 0; r < n_rep; r++) axpy(acc + r * d, score[r * slots + i], row, d);
                    continue;
                }
                const segment_t *g = &seg[s];
                const int64_t slot = bh * g->capacity + t;
                const float v_scale = half_to_float(g->v_scale[slot]), v_zero = half_to_float(g->v_zero[slot]);
                unpack(g->v_codes + slot * (d * g->bits / 8), d, (int)g->bits, row);
                for (int64_t r = 0; r < n_rep; r++) {
                    const float p = score[r * slots + i];
                    axpy(acc + r * d, p * v_scale, row, d);
                    vconst[r] += p * v_zero;
                }
            }
            for (int64_t r = 0; r < n_rep; r++) {
                const float inv = den[r] > 0.0f ? 1.0f / den[r] : 0.0f, add = den[r] > 0.0f ? vconst[r] : 0.0f;
                for (int64_t c = 0; c < d; c++) row[c] = (acc[r * d + c] + add) * inv;
                store_row(ptrs[1], bh * n_rep + r, d, dtype, row);
            }
        }
    }
    free(mem);
    free(where);
    return 0;
}

/* x[i * d + c] = the row src[i] (i < n) of a strided [t, d] plane at base + offset (element strides rs, cs) */
static void gather_rows(const void *base, int64_t offset, const int64_t *src, int64_t n, int64_t rs, int64_t cs,
                        int64_t d, int dtype, float *restrict x) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t row = offset + src[i] * rs;
        float *restrict out = x + i * d;
        if (dtype == F32 && cs == 1) {
            memcpy(out, (const float *)base + row, (size_t)d * sizeof(float));
        } else if (dtype == F32) {
            const float *in = (const float *)base + row;
            for (int64_t c = 0; c < d; c++) out[c] = in[c * cs];
        } else if (dtype == BF16) {
            const uint16_t *in = (const uint16_t *)base + row;
            for (int64_t c = 0; c < d; c++) {
                uint32_t bits = (uint32_t)in[c * cs] << 16;
                memcpy(out + c, &bits, 4);
            }
        } else {
            const uint16_t *in = (const uint16_t *)base + row;
            for (int64_t c = 0; c < d; c++) out[c] = half_to_float(in[c * cs]);
        }
    }
}

static uint16_t to_half_bits(float x) {
    _Float16 h = (_Float16)x;
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
}

/* The reference's arithmetic (kernels/quant_reference.py), in fp32: range parameters zero = fp16(lo), scale =
   fp16((hi - lo) * fp32(1 / (2^bits - 1))), both 0 for an empty range (lo > hi); codes clamp(floor((x - zero) /
   max(scale, floor) + 0.5), 0, 2^bits - 1). The only multiply-adds the compiler may fuse in the write (the
   search's code * s + z, z - s * 0.5, delta + (hi - lo) / 32 and its fp64 squares) have exact products, so
   contraction does not change the bits. */
static void range_params(float lo, float hi, float inv_top, uint16_t *scale, uint16_t *zero) {
    if (lo > hi) lo = hi = 0.0f;
    *scale = to_half_bits((hi - lo) * inv_top);
    *zero = to_half_bits(lo);
}

static inline uint8_t range_code(float x, float zero, float divisor, float top) {
    float code = floorf((x - zero) / divisor + 0.5f);
    code = code < 0.0f ? 0.0f : code;
    return (uint8_t)(code > top ? top : code);
}

/* codes[c] of x[c] (c < d) under per-channel zero z[c] and divisor s[c] (the scale floored) */
static void range_codes(const float *restrict x, const float *restrict z, const float *restrict s, int64_t d,
                        float top, uint8_t *restrict codes) {
    for (int64_t c = 0; c < d; c++) codes[c] = range_code(x[c], z[c], s[c], top);
}

typedef int32_t i8 __attribute__((vector_size(32)));

static v8 select8(i8 mask, v8 a, v8 b) { return (v8)((mask & (i8)a) | (~mask & (i8)b)); }

/* *lo, *hi = the min and max of x[0..d), d >= 1 (8 lanes at once, the lanes reduced at the end) */
static void row_range(const float *x, int64_t d, float *lo, float *hi) {
    float l = x[0], h = x[0];
    int64_t c = 0;
    if (d >= 8) {
        v8 vl = load8(x), vh = vl;
        for (c = 8; c + 8 <= d; c += 8) {
            const v8 y = load8(x + c);
            vl = select8(y < vl, y, vl);
            vh = select8(y > vh, y, vh);
        }
        for (int i = 0; i < 8; i++) {
            l = vl[i] < l ? vl[i] : l;
            h = vh[i] > h ? vh[i] : h;
        }
    }
    for (; c < d; c++) {
        l = x[c] < l ? x[c] : l;
        h = x[c] > h ? x[c] : h;
    }
    *lo = l;
    *hi = h;
}

/* 2 bits: of the ranges [lo + j u, hi - j u] (u = (hi - lo) / 32, j u built by repeated adds, j < steps), the
   parameters with the least squared error over the m rows of x [m, d] (the first least wins). Codes of the search
   by the reciprocal and a zero shifted by half a step: clamp(floor((x - (z - s/2)) * (1 / max(s, floor))), 0, 3).
   The error is summed in fp64 as torch's CPU sum over a group's rows adds (partial sums of 16 rows, added in
   order), so that even a near tie picks the reference's candidate. work: 4 d floats, 3 d doubles, 2 d halves. */
static void best_key_params(const float *restrict x, int64_t m, int64_t d, const float *restrict lo,
                            const float *restrict hi, int steps, float floor_, uint16_t *restrict scale,
                            uint16_t *restrict zero, float *restrict work, double *restrict sums,
                            uint16_t *restrict cand) {
    float *restrict delta = work, *restrict zf = work + d, *restrict sf = work + 2 * d, *restrict rf = work + 3 * d;
    double *restrict err = sums, *restrict part = sums + d, *restrict best = sums + 2 * d;
    uint16_t *restrict s_bits = cand, *restrict z_bits = cand + d;
    for (int j = 0; j < steps; j++) {
        for (int64_t c = 0; c < d; c++) {
            delta[c] = j == 0 ? 0.0f : delta[c] + (hi[c] - lo[c]) * (1.0f / 32.0f);
            range_params(lo[c] + delta[c], hi[c] - delta[c], 1.0f / 3.0f, s_bits + c, z_bits + c);
            sf[c] = half_to_float(s_bits[c]);
            zf[c] = half_to_float(z_bits[c]);
            rf[c] = 1.0f / (sf[c] > floor_ ? sf[c] : floor_);
            err[c] = part[c] = 0.0;
        }
        for (int64_t i = 0; i < m; i++) {
            const float *restrict row = x + i * d;
            for (int64_t c = 0; c < d; c++) {
                float code = floorf((row[c] - (zf[c] - sf[c] * 0.5f)) * rf[c]);
                code = code < 0.0f ? 0.0f : (code > 3.0f ? 3.0f : code);
                const double e = (double)((code * sf[c] + zf[c]) - row[c]);
                part[c] += e * e;
            }
            if (i % 16 == 15 || i == m - 1)
                for (int64_t c = 0; c < d; c++) {
                    err[c] += part[c];
                    part[c] = 0.0;
                }
        }
        for (int64_t c = 0; c < d; c++)
            if (j == 0 || err[c] < best[c]) {
                best[c] = err[c];
                scale[c] = s_bits[c];
                zero[c] = z_bits[c];
            }
    }
}

static void pack(uint8_t *restrict dst, const uint8_t *restrict codes, int64_t d, int bits) {
    if (bits == 8) {
        memcpy(dst, codes, (size_t)d);
    } else if (bits == 4) {
        for (int64_t i = 0; i < d / 2; i++) dst[i] = (uint8_t)(codes[2 * i] | codes[2 * i + 1] << 4);
    } else {
        for (int64_t i = 0; i < d / 4; i++)
            dst[i] = (uint8_t)(codes[4 * i] | codes[4 * i + 1] << 2 | codes[4 * i + 2] << 4 | codes[4 * i + 3] << 6);
    }
}

/* Append the taken tokens of k_new / v_new [B, H, t, d] (any strides) to a segment at 2, 4 or 8 bits.
   ptrs: k_new, v_new, take (uint8 [B, t]), src_pos (int64 [B, t]), the segment's 8 fields.
   ints: B, H, t, d, dtype, capacity, bits, GROUP, 2-bit search steps, then k_new's 4 strides and v_new's 4
   strides (elements). scale_floor: the divisor floor of zero-range groups. Returns 0, or -1 when scratch memory
   cannot be allocated. */
int zipvl_write(void **ptrs, const int64_t *ints, double scale_floor) {
    const int64_t B = ints[0], H = ints[1], T = ints[2], d = ints[3], cap = ints[5], bits = ints[6], G = ints[7];
    const int dtype = (int)ints[4], steps = (int)ints[8];
    const int64_t *ks = ints + 9, *vs = ints + 13, kb = d * bits / 8;
    const float floor_ = (float)scale_floor, top = (float)((1 << bits) - 1), inv_top = (float)(1.0 / top);
    const uint8_t *take = ptrs[2];
    const int64_t *src_pos = ptrs[3];
    uint8_t *k_codes = ptrs[4], *v_codes = ptrs[7];
    uint16_t *k_scale = ptrs[5], *k_zero = ptrs[6], *v_scale = ptrs[8], *v_zero = ptrs[9];
    int32_t *pos = ptrs[10], *fill = ptrs[11];
    /* scratch: taken indices; a group's rows, then min, max, zero, divisor and the search's floats; the search's
       doubles and halves; codes */
    int64_t *src = malloc(sizeof(int64_t) * (size_t)(T > 0 ? T : 1));
    float *x = malloc(sizeof(float) * (size_t)((G + 8) * d + 1));
    double *sums = malloc(sizeof(double) * (size_t)(3 * d + 1));
    uint16_t *cand = malloc(sizeof(uint16_t) * (size_t)(2 * d + 1));
    uint8_t *codes = malloc((size_t)(G * d + 1));
    if (!src || !x || !sums || !cand || !codes) {
        free(src), free(x), free(sums), free(cand), free(codes);
        return -1;
    }
    float *lo = x + G * d, *hi = lo + d, *zf = hi + d, *sf = zf + d, *work = sf + d;
    for (int64_t b = 0; b < B; b++) {
        int64_t count = 0;
        for (int64_t i = 0; i < T; i++)
            if (take[b * T + i]) src[count++] = i;
        const int64_t written = (count + G - 1) / G * G, start = fill[b];
        const int64_t n = start >= cap ? 0 : (written < cap - start ? written : cap - start);
        for (int64_t s = 0; s < n; s++) pos[b * cap + start + s] = s < count ? (int32_t)src_pos[b * T + src[s]] : -1;
        for (int64_t h = 0; h < H; h++) {
            const int64_t bh = b * H + h;
            for (int64_t g0 = 0; g0 < n; g0 += G) {
                const int64_t m = count - g0 < G ? count - g0 : G; /* the group's taken tokens (>= 1) */
                gather_rows(ptrs[0], b * ks[0] + h * ks[1], src + g0, m, ks[2], ks[3], d, dtype, x);
                memcpy(lo, x, sizeof(float) * (size_t)d);
                memcpy(hi, x, sizeof(float) * (size_t)d);
                for (int64_t s = 1; s < m; s++)
                    for (int64_t c = 0; c < d; c++) {
                        lo[c] = x[s * d + c] < lo[c] ? x[s * d + c] : lo[c];
                        hi[c] = x[s * d + c] > hi[c] ? x[s * d + c] : hi[c];
                    }
                uint16_t *scale = k_scale + (bh * (cap / G) + (start + g0) / G) * d;
                uint16_t *zero = k_zero + (scale - k_scale);
                if (bits == 2) {
                    best_key_params(x, m, d, lo, hi, steps, floor_, scale, zero, work, sums, cand);
                } else {
                    for (int64_t c = 0; c < d; c++) range_params(lo[c], hi[c], inv_top, scale + c, zero + c);
                }
                for (int64_t c = 0; c < d; c++) {
                    const float s = half_to_float(scale[c]);
                    zf[c] = half_to_float(zero[c]);
                    sf[c] = s > floor_ ? s : floor_;
                }
                memset(codes, 0, (size_t)(G * d));
                for (int64_t s = 0; s < m; s++) range_codes(x + s * d, zf, sf, d, top, codes + s * d);
                for (int64_t s = 0; s < G; s++)
                    pack(k_codes + (bh * cap + start + g0 + s) * kb, codes + s * d, d, (int)bits);
            }
            for (int64_t s = 0; s < n; s++) {
                const int64_t slot = bh * cap + start + s;
                memset(codes, 0, (size_t)d);
                v_scale[slot] = v_zero[slot] = 0;
                if (s < count) {
                    gather_rows(ptrs[1], b * vs[0] + h * vs[1], src + s, 1, vs[2], vs[3], d, dtype, x);
                    float v_lo, v_hi;
                    row_range(x, d, &v_lo, &v_hi);
                    range_params(v_lo, v_hi, inv_top, v_scale + slot, v_zero + slot);
                    const float s_v = half_to_float(v_scale[slot]), z_v = half_to_float(v_zero[slot]);
                    const float divisor = s_v > floor_ ? s_v : floor_;
                    for (int64_t c = 0; c < d; c++) codes[c] = range_code(x[c], z_v, divisor, top);
                }
                pack(v_codes + slot * kb, codes, d, (int)bits);
            }
        }
        fill[b] = (int32_t)(start + written < cap ? start + written : cap);
    }
    free(src), free(x), free(sums), free(cand), free(codes);
    return 0;
}

/* outer blocks of n bytes from src (one every src_stride bytes) to dst (one every dst_stride bytes) */
static void copy_blocks(void *dst, const void *src, int64_t outer, int64_t dst_stride, int64_t src_stride,
                        int64_t n) {
    for (int64_t o = 0; o < outer; o++)
        memcpy((char *)dst + o * dst_stride, (const char *)src + o * src_stride, (size_t)n);
}

/* The first `slots` slots of a segment and its fill into another segment of the same batch, heads, head dim and
   bits (its other slots untouched). ptrs: the destination's 8 fields, then the source's. ints: B, H, d, code bytes
   per slot, the destination's capacity, the source's, slots, GROUP. */
void zipvl_copy(void **ptrs, const int64_t *ints) {
    const int64_t B = ints[0], H = ints[1], d = ints[2], kb = ints[3], to = ints[4], from = ints[5];
    const int64_t slots = ints[6], G = ints[7], half = 2, word = 4;
    const int64_t rows[8] = {kb, half * d, half * d, kb, half, half, word, 0}; /* bytes per slot (group) */
    for (int f = 0; f < 6; f++) {
        const int64_t per = f == 1 || f == 2 ? G : 1; /* the key parameters: one row per group */
        copy_blocks(ptrs[f], ptrs[8 + f], B * H, to / per * rows[f], from / per * rows[f], slots / per * rows[f]);
    }
    copy_blocks(ptrs[6], ptrs[14], B, to * word, from * word, slots * word);
    memcpy(ptrs[7], ptrs[15], (size_t)(B * word));
}
"""

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # q / tail / output dtypes, the C enum's order
# a Segment's fields in order (the layout): codes, key scale / zero, codes, value scale / zero, pos, fill
_POS = (torch.int32, torch.int32)  # the tail's pos and length


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _machine() -> str:
    """What ``-march=native`` depends on: the architecture and, on Linux, the CPU's model and flags."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return text
    return text + "".join(line for line in info if line.startswith(("model name", "flags")))[:4096]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled C functions (built once per source, compiler and machine; cached on disk), or None when they
    cannot be built here (logged). The cache folder is ``$ZIPVL_CACHE_DIR``, else ``~/.cache/zipvl_compile``, else
    (a read-only home) a folder of the system's temporary directory."""
    cc = _compiler()
    if cc is None:
        log.info("zipvl: no C compiler found ($CC, cc, gcc): the CPU paths run their torch bodies")
        return None
    flags = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-std=gnu11"]
    key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _machine()]).encode()).hexdigest()[:16]
    configured = os.environ.get("ZIPVL_CACHE_DIR")
    folders = [Path(configured)] if configured else [Path.home() / ".cache" / "zipvl_compile"]
    folders.append(Path(tempfile.gettempdir()) / f"zipvl_compile-{os.getuid() if hasattr(os, 'getuid') else 0}")
    errors = []
    for folder in folders:
        try:
            lib = _build(cc, flags, folder / f"native_{key}.so")
        except subprocess.CalledProcessError as err:
            errors.append(err.stderr.decode(errors="replace")[-500:])
            break  # the compiler failed: another folder would not help
        except OSError as err:  # the folder is not writable, or the library does not load
            errors.append(str(err))
            continue
        for fn in (lib.zipvl_decode, lib.zipvl_write):
            fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64), ctypes.c_double]
            fn.restype = ctypes.c_int
        lib.zipvl_copy.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)]
        lib.zipvl_copy.restype = None
        return lib
    log.info("zipvl: the C kernels did not build (%s): the CPU paths run their torch bodies", "; ".join(errors))
    return None


def _build(cc: str, flags: list[str], target: Path) -> ctypes.CDLL:
    """Compile the source to ``target`` unless it is there (published by an atomic rename, so that concurrent
    builders each install a whole file), then load it."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "native.c", Path(tmp) / "native.so"
            src.write_text(_SOURCE)
            subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], check=True, capture_output=True)
            os.replace(out, target)
    return ctypes.CDLL(str(target))


def refusal(
    q: torch.Tensor, hi: Segment, lo: Segment, tail: Tail, n_rep: int, hi_bits: int, lo_bits: int
) -> str | None:
    """Why :func:`decode_attention_native` cannot take these inputs, or None when it can: plain contiguous CPU
    tensors (no subclass, no autograd) of the layout's dtypes and shapes (the C function trusts them), q and the
    tail in one of fp32 / bf16 / fp16, bits in the layout's widths, a head dim that is a multiple of 8 (the
    kernel's vector width)."""
    tensors = (q, *hi, *lo, *tail)
    if q.dtype not in _DTYPES or q.dim() != 4:
        return f"q must be [B, Hq, 1, d] in fp32 / bf16 / fp16, got {q.dtype} {tuple(q.shape)}"
    if tuple(map(_DTYPE, tensors)) != (q.dtype, *Segment.dtypes(), *Segment.dtypes(), q.dtype, q.dtype, *_POS):
        return "the cache tensors are not in the layout's dtypes (or the tail not in q's)"
    if hi_bits not in QUANT_BITS or lo_bits not in QUANT_BITS:
        return f"bits must be in {QUANT_BITS}, got {hi_bits} / {lo_bits}"
    batch, hq, _, d = q.shape
    heads, c_hi, c_lo, slots = hq // max(n_rep, 1), hi.pos.shape[-1], lo.pos.shape[-1], tail.pos.shape[-1]
    shapes = (
        (batch, heads * n_rep, 1, d),
        *Segment.shapes(batch, heads, c_hi, d, hi_bits),
        *Segment.shapes(batch, heads, c_lo, d, lo_bits),
        *((batch, heads, slots, d),) * 2,
        (batch, slots),
        (batch,),
    )
    if d % 8 or c_hi % GROUP or c_lo % GROUP or n_rep < 1 or tuple(map(_SHAPE, tensors)) != shapes:
        return (
            f"q {tuple(q.shape)} with n_rep {n_rep} and the cache's shapes do not match the layout (head dim a "
            f"multiple of 8, segment capacities multiples of {GROUP})"
        )
    if not (_plain(tensors) and all(map(torch.Tensor.is_contiguous, tensors))):
        return "the C decode kernel takes contiguous CPU tensors that do not require grad (no tensor subclass)"
    return None


_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")


def _plain(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Plain CPU tensors (no subclass) that do not require grad: what a C function may read through data_ptr.
    (``map`` over attribute getters: these checks run on every call, ~20 tensors.)"""
    return (
        set(map(type, tensors)) == {torch.Tensor}
        and all(map(operator.attrgetter("is_cpu"), tensors))
        and not any(map(operator.attrgetter("requires_grad"), tensors))
    )


def decode_attention_native(
    q: torch.Tensor, hi: Segment, lo: Segment, tail: Tail, scale: float, n_rep: int, hi_bits: int, lo_bits: int
) -> torch.Tensor:
    """Decode attention over hi + lo + tail with the C kernel (module docstring). Raises RuntimeError where
    :func:`library` could not build it, ValueError with :func:`refusal`'s reason for inputs it does not take.
    Returns [B, Hq, 1, d] in q's dtype; a row with no valid key returns zeros."""
    lib = library()
    if lib is None:
        raise RuntimeError("zipvl: the C decode kernel is not available here (no C compiler, or its build failed)")
    reason = refusal(q, hi, lo, tail, n_rep, hi_bits, lo_bits)
    if reason is not None:
        raise ValueError(f"zipvl: decode_attention_native: {reason}")
    return launch(lib, q, hi, lo, tail, scale, n_rep, hi_bits, lo_bits)


def launch(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    hi: Segment,
    lo: Segment,
    tail: Tail,
    scale: float,
    n_rep: int,
    hi_bits: int,
    lo_bits: int,
) -> torch.Tensor:
    """The C call itself, on inputs :func:`refusal` accepted (unchecked: the C function trusts them)."""
    batch, hq, _, d = q.shape
    out = torch.empty_like(q)
    ptrs = [q, out, *hi, *lo, *tail]
    ints = [
        batch,
        hq // n_rep,
        n_rep,
        d,
        _DTYPES[q.dtype],
        hi.capacity,
        hi_bits,
        lo.capacity,
        lo_bits,
        tail.slots,
        GROUP,
    ]
    status = lib.zipvl_decode(
        (ctypes.c_void_p * len(ptrs))(*(t.data_ptr() for t in ptrs)),
        (ctypes.c_int64 * len(ints))(*ints),
        scale,
    )
    if status:
        raise MemoryError("zipvl: the C decode kernel could not allocate its scratch memory")
    return out


def write_refusal(
    seg: Segment, k_new: torch.Tensor, v_new: torch.Tensor, take: torch.Tensor, src_pos: torch.Tensor, bits: int
) -> str | None:
    """Why :func:`write_segment_native_` cannot take these inputs, or None when it can: bits in the layout's
    widths, k_new / v_new ``[B, H, t, d]`` of one of fp32 / bf16 / fp16 (any strides), take bool and src_pos int
    ``[B, t]``, a segment of the layout's dtypes and shapes, all plain CPU tensors that do not require grad."""
    if bits not in QUANT_BITS:
        return f"bits must be in {QUANT_BITS}, got {bits}"
    if k_new.dim() != 4 or v_new.shape != k_new.shape or k_new.dtype not in _DTYPES or v_new.dtype != k_new.dtype:
        return f"k_new / v_new must be one [B, H, t, d] in fp32 / bf16 / fp16, got {k_new.dtype} {tuple(k_new.shape)}"
    batch, heads, t, d = k_new.shape
    if (
        take.dtype != torch.bool
        or take.shape != (batch, t)
        or src_pos.shape != (batch, t)
        or src_pos.is_floating_point()
    ):
        return (
            f"take must be bool and src_pos int [{batch}, {t}], got {take.dtype} {tuple(take.shape)}, {src_pos.dtype}"
        )
    if tuple(map(_DTYPE, seg)) != Segment.dtypes():
        return "the segment's tensors are not in the layout's dtypes"
    capacity = seg.pos.shape[-1]
    if capacity % GROUP or tuple(map(_SHAPE, seg)) != Segment.shapes(batch, heads, capacity, d, bits):
        return f"the segment's shapes do not match the layout for k_new {tuple(k_new.shape)} at {bits} bits"
    if not _plain((*seg, k_new, v_new, take, src_pos)):
        return "the C write takes CPU tensors that do not require grad (no tensor subclass)"
    if not all(map(torch.Tensor.is_contiguous, seg)):
        return "the C write takes a contiguous segment"
    return None


def write_segment_native_(
    seg: Segment, k_new: torch.Tensor, v_new: torch.Tensor, take: torch.Tensor, src_pos: torch.Tensor, bits: int
) -> None:
    """The segment write of :func:`~zipvl_compile.runtime.kernels.quant_reference.write_segment_reference_` (its
    bits exactly) as one C function, at 2, 4 or 8 bits. Raises RuntimeError where :func:`library` could not build it,
    ValueError with :func:`write_refusal`'s reason for inputs it does not take."""
    lib = library()
    if lib is None:
        raise RuntimeError("zipvl: the C kernels are not available here (no C compiler, or their build failed)")
    reason = write_refusal(seg, k_new, v_new, take, src_pos, bits)
    if reason is not None:
        raise ValueError(f"zipvl: write_segment_native_: {reason}")
    launch_write(lib, seg, k_new, v_new, take, src_pos, bits)


def launch_write(
    lib: ctypes.CDLL,
    seg: Segment,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    take: torch.Tensor,
    src_pos: torch.Tensor,
    bits: int,
) -> None:
    """The C write itself, on inputs :func:`write_refusal` accepted (unchecked: the C function trusts them)."""
    batch, heads, t, d = k_new.shape
    take, src_pos = take.contiguous().view(torch.uint8), src_pos.to(torch.int64).contiguous()
    ptrs = [k_new, v_new, take, src_pos, *seg]
    ints = [
        batch,
        heads,
        t,
        d,
        _DTYPES[k_new.dtype],
        seg.capacity,
        bits,
        GROUP,
        KEY_SHRINK_STEPS,
        *k_new.stride(),
        *v_new.stride(),
    ]
    status = lib.zipvl_write(
        (ctypes.c_void_p * len(ptrs))(*(x.data_ptr() for x in ptrs)), (ctypes.c_int64 * len(ints))(*ints), SCALE_FLOOR
    )
    if status:
        raise MemoryError("zipvl: the C write could not allocate its scratch memory")


def copy_refusal(into: Segment, seg: Segment, slots: int) -> str | None:
    """Why :func:`copy_slots_native_` cannot take these segments, or None when it can: plain contiguous CPU tensors
    of the layout's dtypes and shapes, ``into`` of ``seg``'s batch, heads, head dim and bits, ``slots`` a multiple of
    GROUP within both capacities."""
    tensors = (*into, *seg)
    if tuple(map(_DTYPE, tensors)) != _SEGMENT_PAIR_DTYPES:
        return "the segments' tensors are not in the layout's dtypes"
    batch, heads, capacity, kb = seg.k_codes.shape
    d = seg.k_scale.shape[-1]
    bits = 8 * kb // max(d, 1)
    if bits not in QUANT_BITS or tuple(map(_SHAPE, tensors)) != (
        *Segment.shapes(batch, heads, into.pos.shape[-1], d, bits),
        *Segment.shapes(batch, heads, capacity, d, bits),
    ):
        return "the segments' shapes do not match the layout, or one another's (batch, heads, head dim, bits)"
    if slots % GROUP or not 0 <= slots <= min(capacity, into.pos.shape[-1]):
        return f"slots must be a multiple of {GROUP} within both capacities, got {slots}"
    if not (_plain(tensors) and all(map(torch.Tensor.is_contiguous, tensors))):
        return "the C copy takes contiguous CPU tensors that do not require grad (no tensor subclass)"
    return None


_SEGMENT_PAIR_DTYPES = Segment.dtypes() * 2


def copy_slots_native_(into: Segment, seg: Segment, slots: int) -> None:
    """The first ``slots`` slots of ``seg`` (every field, key groups included) and its ``fill`` into ``into``, in
    place, as one C call; ``into``'s other slots are left as they are. Raises RuntimeError where :func:`library`
    could not build it, ValueError with :func:`copy_refusal`'s reason for segments it does not take."""
    lib = library()
    if lib is None:
        raise RuntimeError("zipvl: the C kernels are not available here (no C compiler, or their build failed)")
    reason = copy_refusal(into, seg, slots)
    if reason is not None:
        raise ValueError(f"zipvl: copy_slots_native_: {reason}")
    launch_copy(lib, into, seg, slots)


def launch_copy(lib: ctypes.CDLL, into: Segment, seg: Segment, slots: int) -> None:
    """The C copy itself, on segments :func:`copy_refusal` accepted (unchecked: the C function trusts them)."""
    batch, heads, capacity, kb = seg.k_codes.shape
    ints = (batch, heads, seg.k_scale.shape[3], kb, into.pos.shape[-1], capacity, slots, GROUP)
    lib.zipvl_copy((ctypes.c_void_p * 16)(*(t.data_ptr() for t in (*into, *seg))), (ctypes.c_int64 * 8)(*ints))
