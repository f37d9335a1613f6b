"""The CPU paths' C functions, compiled at first use: decode attention over the packed cache, and the segment
write at 4 and 8 bits.

:func:`decode_attention_native`: the contract of
:func:`~zipvl_compile.runtime.kernels.decode_reference.decode_attention_reference` (its oracle), called by
:func:`~zipvl_compile.runtime.kernels.decode_cpu.decode_attention_cpu` where it applies: q ``[B, H*n_rep, 1, d]``;
``hi`` / ``lo``: :class:`~zipvl_compile.runtime.layout.Segment` at ``hi_bits`` / ``lo_bits``; ``tail``:
:class:`~zipvl_compile.runtime.layout.Tail` in q's dtype (fp32, bf16 or fp16). Returns ``[B, H*n_rep, 1, d]`` in
q's dtype, computed in fp32. :func:`write_segment_native_`: the bytes of
:func:`~zipvl_compile.runtime.kernels.quant_reference.write_segment_reference_` exactly (its arithmetic, written
out in C), called by :func:`~zipvl_compile.runtime.kernels.quant_cpu.write_segment_cpu_` at 4 and 8 bits.

Why C: a decode step on the CPU is small (a few hundred slots per head at the demo's prompt), so a torch body
pays for its ~45 ops' dispatch (~10 µs each inside a step on a 2-core machine) far more than for arithmetic; a
dense model reads its cache with one SDPA call. Here each (sequence, KV head) is one pass over the codes: the key
scale is folded into the query per 64-slot group (``q·k = (q*k_scale)·code + q·k_zero``), scores of the
``n_rep`` query heads are kept for the valid slots only, one softmax, then one pass over the value codes
(``p·v = (p*v_scale)·code + p·v_zero``). Empty slots (pos < 0, or at or past the fill / length) are skipped, so
their parameters (possibly NaN) and codes are never read. Inner loops over channels are vectorised by the C
compiler's vector extensions (``-O3 -march=native``; no fast-math). The C functions trust their inputs: every
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

from zipvl_compile.runtime.kernels.quant_reference import SCALE_FLOOR
from zipvl_compile.runtime.layout import GROUP, QUANT_BITS, Segment, Tail

log = logging.getLogger("zipvl_compile")

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

static float load_elem(const void *base, int64_t index, int dtype) {
    if (dtype == F32) return ((const float *)base)[index];
    uint16_t h = ((const uint16_t *)base)[index];
    if (dtype == F16) return half_to_float(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t to_half_bits(float x) {
    _Float16 h = (_Float16)x;
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
}

/* the reference's arithmetic (kernels/quant_reference.py): zero = fp16(min), scale = fp16((max - min) * fp32(1 /
   (2^bits - 1))), code = clamp(floor((x - zero) / max(scale, SCALE_FLOOR) + 0.5), 0, 2^bits - 1) in fp32 */
static void range_params(float lo, float hi, int bits, uint16_t *scale, uint16_t *zero) {
    *scale = to_half_bits((hi - lo) * (float)(1.0 / ((1 << bits) - 1)));
    *zero = to_half_bits(lo);
}

static uint8_t range_code(float x, uint16_t scale, uint16_t zero, int bits, float floor_) {
    float s = half_to_float(scale), y = (x - half_to_float(zero)) / (s > floor_ ? s : floor_);
    float code = floorf(y + 0.5f), top = (float)((1 << bits) - 1);
    return (uint8_t)(code < 0.0f ? 0.0f : (code > top ? top : code));
}

static void pack(uint8_t *dst, const uint8_t *codes, int64_t d, int bits) {
    const int per = 8 / bits;
    for (int64_t i = 0; i < d / per; i++) {
        uint8_t byte = 0;
        for (int j = 0; j < per; j++) byte |= (uint8_t)(codes[i * per + j] << (j * bits));
        dst[i] = byte;
    }
}

/* Append the taken tokens of k_new / v_new [B, H, t, d] (any strides) to a segment written with range
   parameters (4 or 8 bits: no range search).
   ptrs: k_new, v_new, take (uint8 [B, t]), src_pos (int64 [B, t]), the segment's 8 fields.
   ints: B, H, t, d, dtype, capacity, bits, GROUP, then k_new's 4 strides and v_new's 4 strides (elements).
   scale_floor: the divisor floor of zero-range groups. Returns 0, or -1 when scratch memory cannot be allocated. */
int zipvl_write(void **ptrs, const int64_t *ints, double scale_floor) {
    const int64_t B = ints[0], H = ints[1], T = ints[2], d = ints[3], cap = ints[5], bits = ints[6], G = ints[7];
    const int dtype = (int)ints[4];
    const int64_t *ks = ints + 8, *vs = ints + 12, kb = d * bits / 8;
    const float floor_ = (float)scale_floor;
    const uint8_t *take = ptrs[2];
    const int64_t *src_pos = ptrs[3];
    uint8_t *k_codes = ptrs[4], *v_codes = ptrs[7];
    uint16_t *k_scale = ptrs[5], *k_zero = ptrs[6], *v_scale = ptrs[8], *v_zero = ptrs[9];
    int32_t *pos = ptrs[10], *fill = ptrs[11];
    int64_t *src = malloc(sizeof(int64_t) * (size_t)(T > 0 ? T : 1));
    float *lo = malloc(sizeof(float) * (size_t)(2 * d)), *x = malloc(sizeof(float) * (size_t)(G * d));
    uint8_t *codes = malloc((size_t)(G * d));
    if (!src || !lo || !x || !codes) {
        free(src), free(lo), free(x), free(codes);
        return -1;
    }
    float *hi = lo + d;
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
                for (int64_t s = 0; s < m; s++) {
                    const int64_t row = b * ks[0] + h * ks[1] + src[g0 + s] * ks[2];
                    for (int64_t c = 0; c < d; c++) x[s * d + c] = load_elem(ptrs[0], row + c * ks[3], dtype);
                }
                for (int64_t c = 0; c < d; c++) lo[c] = hi[c] = x[c];
                for (int64_t s = 1; s < m; s++)
                    for (int64_t c = 0; c < d; c++) {
                        lo[c] = x[s * d + c] < lo[c] ? x[s * d + c] : lo[c];
                        hi[c] = x[s * d + c] > hi[c] ? x[s * d + c] : hi[c];
                    }
                const int64_t prow = (bh * (cap / G) + (start + g0) / G) * d;
                for (int64_t c = 0; c < d; c++)
                    range_params(lo[c], hi[c], (int)bits, k_scale + prow + c, k_zero + prow + c);
                memset(codes, 0, (size_t)(G * d));
                for (int64_t s = 0; s < m; s++)
                    for (int64_t c = 0; c < d; c++)
                        codes[s * d + c] =
                            range_code(x[s * d + c], k_scale[prow + c], k_zero[prow + c], (int)bits, floor_);
                for (int64_t s = 0; s < G; s++)
                    pack(k_codes + (bh * cap + start + g0 + s) * kb, codes + s * d, d, (int)bits);
            }
            for (int64_t s = 0; s < n; s++) {
                const int64_t slot = bh * cap + start + s;
                memset(codes, 0, (size_t)d);
                if (s < count) {
                    float v_lo = INFINITY, v_hi = -INFINITY;
                    for (int64_t c = 0; c < d; c++) {
                        x[c] = load_elem(ptrs[1], b * vs[0] + h * vs[1] + src[s] * vs[2] + c * vs[3], dtype);
                        v_lo = x[c] < v_lo ? x[c] : v_lo;
                        v_hi = x[c] > v_hi ? x[c] : v_hi;
                    }
                    range_params(v_lo, v_hi, (int)bits, v_scale + slot, v_zero + slot);
                    for (int64_t c = 0; c < d; c++)
                        codes[c] = range_code(x[c], v_scale[slot], v_zero[slot], (int)bits, floor_);
                } else {
                    v_scale[slot] = v_zero[slot] = 0;
                }
                pack(v_codes + slot * kb, codes, d, (int)bits);
            }
        }
        fill[b] = (int32_t)(start + written < cap ? start + written : cap);
    }
    free(src), free(lo), free(x), free(codes);
    return 0;
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
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11"]
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
    """Why :func:`write_segment_native_` cannot take these inputs, or None when it can: 4 or 8 bits (the 2-bit
    range search stays in torch), k_new / v_new ``[B, H, t, d]`` of one of fp32 / bf16 / fp16 (any strides), take
    bool and src_pos int ``[B, t]``, a segment of the layout's dtypes and shapes, all plain CPU tensors that do not
    require grad."""
    if bits not in (4, 8):
        return f"the C write takes 4 or 8 bits (range parameters, no range search), got {bits}"
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
    bits exactly) as one C function, at 4 or 8 bits. Raises RuntimeError where :func:`library` could not build it,
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
    ints = [batch, heads, t, d, _DTYPES[k_new.dtype], seg.capacity, bits, GROUP, *k_new.stride(), *v_new.stride()]
    status = lib.zipvl_write(
        (ctypes.c_void_p * len(ptrs))(*(x.data_ptr() for x in ptrs)), (ctypes.c_int64 * len(ints))(*ints), SCALE_FLOOR
    )
    if status:
        raise MemoryError("zipvl: the C write could not allocate its scratch memory")
