/* Fused decode reads of compressed KV entries (modalkv.storage.kernels builds and loads this file).
 *
 * Every function takes a list of independent tasks (one per batch row and KV head of a layer), each a row of
 * int64 words: pointers to the task's tensors and its entry count. Codes are read and used in registers / a
 * d-float scratch line; no dense copy of the keys or values is ever written.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t half; /* fp16 bits */

#if defined(__F16C__)
#include <immintrin.h>
/* fp16 -> float with the F16C instruction (a plain _Float16 cast is a long software sequence with gcc 12, and
 * was most of the KIVI kernels' time) */
static inline float h2f(half x) { return _cvtsh_ss(x); }
#else
static inline float h2f(half x) {
    uint32_t sign = (uint32_t)(x >> 15) << 31, exp = (x >> 10) & 31, man = x & 1023, bits;
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man) {  /* subnormal: normalise */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 1024));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 1023) << 13);
    } else bits = sign;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

/* The AVX-512 paths were written on a machine without AVX-512 and have never run: they are compiled only with
   -DMODALKV_AVX512 (add it to FLAGS in kernels.py) until the fused-read tests have passed on an AVX-512 CPU. */
#if defined(__AVX512F__) && defined(MODALKV_AVX512)
#include <immintrin.h>
#define KIVI_AVX512 1
/* 16 packed bytes of 4-bit codes -> the low nibbles (even channels) and the high nibbles (odd channels) as floats */
static inline void nibbles16(const uint8_t *p, __m512 *lo, __m512 *hi) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#endif

static inline void unpack_line(const uint8_t *p, int d, int bits, float *out) {
    if (bits == 4) {
        for (int j = 0; j < d / 2; j++) {
            uint8_t b = p[j];
            out[2 * j] = (float)(b & 15);
            out[2 * j + 1] = (float)(b >> 4);
        }
    } else if (bits == 2) {
        for (int j = 0; j < d / 4; j++) {
            uint8_t b = p[j];
            out[4 * j] = (float)(b & 3);
            out[4 * j + 1] = (float)((b >> 2) & 3);
            out[4 * j + 2] = (float)((b >> 4) & 3);
            out[4 * j + 3] = (float)(b >> 6);
        }
    } else {
        for (int j = 0; j < d; j++) out[j] = (float)p[j];
    }
}

/* KIVI keys, per channel over groups of G tokens: out[i, t] = sum_j q[i, j] (s[t/G, j] c[t, j] + z[t/G, j]).
 * task words: codes (uint8 [nq, d*bits/8]), scale, zero (fp16 [nq/G, d]), query (f32 [r, d]), out (f32, rows of
 * ld_out), nq. */
void kivi_logits(int ntask, const int64_t *tasks, int d, int G, int bits, int r, int ld_out, int threads) {
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int k = 0; k < ntask; k++) {
        const int64_t *w = tasks + 6 * k;
        const uint8_t *codes = (const uint8_t *)w[0];
        const half *scale = (const half *)w[1], *zero = (const half *)w[2];
        const float *q = (const float *)w[3];
        float *out = (float *)w[4];
        int nq = (int)w[5], line = d * bits / 8;
        float *qs = malloc(sizeof(float) * (size_t)(r * d + r + 3 * d));
        float *bias = qs + r * d, *c = bias + r, *sf = c + d, *zf = sf + d;
        for (int g = 0; g < nq / G; g++) {
            /* the group's fp16 scales and zeros as floats first: one vectorised conversion loop (converting them
             * inside the loop over query rows, one scalar at a time, took most of the kernel's time) */
            for (int j = 0; j < d; j++) {
                sf[j] = h2f(scale[g * d + j]);
                zf[j] = h2f(zero[g * d + j]);
            }
            for (int i = 0; i < r; i++) {
                float b = 0.f;
                for (int j = 0; j < d; j++) {
                    qs[i * d + j] = q[i * d + j] * sf[j];
                    b += q[i * d + j] * zf[j];
                }
                bias[i] = b;
            }
#ifdef KIVI_AVX512
            if (bits == 4 && d % 32 == 0) {  /* even / odd channels of the scaled query against lo / hi nibbles */
                int m = d / 2;
                for (int j = 0; j < m; j++)  /* qs rows de-interleaved in place: even channels, then odd */
                    c[j] = 0.f;
                for (int i = 0; i < r; i++) {
                    float *qi = qs + i * d;
                    for (int j = 0; j < m; j++) c[j] = qi[2 * j + 1];
                    for (int j = 0; j < m; j++) qi[j] = qi[2 * j];
                    for (int j = 0; j < m; j++) qi[m + j] = c[j];
                }
                for (int t = g * G; t < (g + 1) * G; t++) {
                    const uint8_t *p = codes + (size_t)t * line;
                    for (int i0 = 0; i0 < r; i0 += 4) {
                        int nr = r - i0 < 4 ? r - i0 : 4;
                        const float *q0 = qs + (size_t)i0 * d;
                        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                                       _mm512_setzero_ps()};
                        for (int c16 = 0; c16 < m; c16 += 16) {
                            __m512 lo, hi;
                            nibbles16(p + c16, &lo, &hi);
                            for (int i = 0; i < nr; i++) {
                                a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + i * d + c16), lo, a[i]);
                                a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + i * d + m + c16), hi, a[i]);
                            }
                        }
                        for (int i = 0; i < nr; i++)
                            out[(size_t)(i0 + i) * ld_out + t] = _mm512_reduce_add_ps(a[i]) + bias[i0 + i];
                    }
                }
                continue;
            }
#endif
            for (int t = g * G; t < (g + 1) * G; t++) {
                unpack_line(codes + (size_t)t * line, d, bits, c);
                for (int i = 0; i < r; i++) {
                    const float *qi = qs + i * d;
                    float acc = 0.f;
                    for (int j = 0; j < d; j++) acc += qi[j] * c[j];
                    out[(size_t)i * ld_out + t] = acc + bias[i];
                }
            }
        }
        free(qs);
    }
}

#ifdef KIVI_AVX512
/* kivi_mix for 4-bit codes: per block of 64 channels (2 chunks of 16 code bytes: even channels in the low nibbles,
 * odd ones in the high) and group of up to 4 query rows, the accumulators stay in registers over all tokens and each
 * token's codes are converted once for the rows; the zero terms are summed per value group apart. */
static void kivi_mix4_avx512(const uint8_t *codes, const half *scale, const half *zero, const float *p, float *out,
                             int nq, int dv, int vg, int r, int ld_p) {
    int line = dv / 2, ng = dv / vg;
    float *zsum = calloc((size_t)(r * ng + ng), sizeof(float)), *zf = zsum + r * ng;
    __m512i even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512i odd = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int t = 0; t < nq; t++) {
        for (int g = 0; g < ng; g++) zf[g] = h2f(zero[(size_t)t * ng + g]);
        for (int i = 0; i < r; i++) {
            float pt = p[(size_t)i * ld_p + t];
            for (int g = 0; g < ng; g++) zsum[i * ng + g] += pt * zf[g];
        }
    }
    for (int blk = 0; blk < dv; blk += 64) {
        int g0 = blk / vg, g1 = (blk + 32) / vg;
        for (int i0 = 0; i0 < r; i0 += 4) {
            int nr = r - i0 < 4 ? r - i0 : 4;
            const float *pr[4];
            for (int i = 0; i < 4; i++) pr[i] = p + (size_t)(i0 + (i < nr ? i : 0)) * ld_p;
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
            for (int t = 0; t < nq; t++) {
                const uint8_t *ct = codes + (size_t)t * line + blk / 2;
                const half *st = scale + (size_t)t * ng;
                float s0 = h2f(st[g0]), s1 = h2f(st[g1]);
                __m512 lo0, hi0, lo1, hi1;
                nibbles16(ct, &lo0, &hi0);
                nibbles16(ct + 16, &lo1, &hi1);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    float pt = pr[i][t];
                    __m512 a0 = _mm512_set1_ps(pt * s0), a1 = _mm512_set1_ps(pt * s1);
                    acc[i][0] = _mm512_fmadd_ps(a0, lo0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(a0, hi0, acc[i][1]);
                    acc[i][2] = _mm512_fmadd_ps(a1, lo1, acc[i][2]);
                    acc[i][3] = _mm512_fmadd_ps(a1, hi1, acc[i][3]);
                }
            }
            for (int i = 0; i < nr; i++)  /* back to channel order, plus the zero terms of the channels' group */
                for (int c = 0; c < 2; c++) {
                    __m512 z = _mm512_set1_ps(zsum[(i0 + i) * ng + (c ? g1 : g0)]);
                    float *o = out + (size_t)(i0 + i) * dv + blk + 32 * c;
                    __m512 lo = acc[i][2 * c], hi = acc[i][2 * c + 1];
                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi), z));
                    _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_permutex2var_ps(lo, odd, hi), z));
                }
        }
    }
    free(zsum);
}
#endif

/* KIVI values, per token over groups of vg channels: out[i, :] = sum_t p[i, t] (s[t, j/vg] c[t, j] + z[t, j/vg]).
 * task words: codes (uint8 [nq, dv*bits/8]), scale, zero (fp16 [nq, dv/vg]), probs (f32, rows of ld_p),
 * out (f32 [r, dv], overwritten), nq. */
void kivi_mix(int ntask, const int64_t *tasks, int dv, int vg, int bits, int r, int ld_p, int threads) {
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int k = 0; k < ntask; k++) {
        const int64_t *w = tasks + 6 * k;
        const uint8_t *codes = (const uint8_t *)w[0];
        const half *scale = (const half *)w[1], *zero = (const half *)w[2];
        const float *p = (const float *)w[3];
        float *out = (float *)w[4];
        int nq = (int)w[5], line = dv * bits / 8, ng = dv / vg;
#ifdef KIVI_AVX512
        if (bits == 4 && vg % 32 == 0 && dv % 64 == 0) {
            kivi_mix4_avx512(codes, scale, zero, p, out, nq, dv, vg, r, ld_p);
            continue;
        }
#endif
        float *c = malloc(sizeof(float) * (size_t)(dv + 2 * ng)), *sf = c + dv, *zf = sf + ng;
        memset(out, 0, sizeof(float) * (size_t)r * dv);
        for (int t = 0; t < nq; t++) {
            unpack_line(codes + (size_t)t * line, dv, bits, c);
            for (int g = 0; g < ng; g++) {  /* the token's fp16 scales and zeros as floats, once for every row */
                sf[g] = h2f(scale[t * ng + g]);
                zf[g] = h2f(zero[t * ng + g]);
            }
            for (int i = 0; i < r; i++) {
                float pt = p[(size_t)i * ld_p + t];
                if (pt == 0.f) continue;
                float *o = out + (size_t)i * dv;
                for (int g = 0; g < ng; g++) {
                    float a = pt * sf[g], b = pt * zf[g];
                    for (int j = g * vg; j < (g + 1) * vg; j++) o[j] += a * c[j] + b;
                }
            }
        }
        free(c);
    }
}

/* Spherical KV section logits: out[i, t] = sum_j rhat[t, j] lut[i, j, code[t, j]], rhat = rcode * scale[page] / 255.
 * task words: codes (uint8 bit stream [w, nbytes]), rcode (uint8 [w, G]), scale (f32 [pages, G]), lut (f32
 * [r, G, K]), out (f32, rows of ld_out), w. */
void spherical_logits(int ntask, const int64_t *tasks, int G, int bits, int K, int page, int r, int ld_out,
                      int threads) {
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int k = 0; k < ntask; k++) {
        const int64_t *w = tasks + 6 * k;
        const uint8_t *codes = (const uint8_t *)w[0], *rcode = (const uint8_t *)w[1];
        const float *scale = (const float *)w[2], *lut = (const float *)w[3];
        float *out = (float *)w[4];
        int width = (int)w[5], nbytes = (G * bits + 7) / 8, mask = (1 << bits) - 1;
        float *rs = malloc(sizeof(float) * (size_t)G);
        int *code = malloc(sizeof(int) * (size_t)G);
        for (int t = 0; t < width; t++) {
            if (t % page == 0)
                for (int j = 0; j < G; j++) rs[j] = scale[(t / page) * G + j] / 255.f;
            const uint8_t *p = codes + (size_t)t * nbytes;
            for (int j = 0; j < G; j++) {
                int off = j * bits, byte = off >> 3;
                int word = p[byte] | (byte + 1 < nbytes ? p[byte + 1] << 8 : 0);
                code[j] = (word >> (off & 7)) & mask;
            }
            const uint8_t *rc = rcode + (size_t)t * G;
            for (int i = 0; i < r; i++) {
                const float *li = lut + (size_t)i * G * K;
                float acc = 0.f;
                for (int j = 0; j < G; j++) acc += (float)rc[j] * rs[j] * li[j * K + code[j]];
                out[(size_t)i * ld_out + t] = acc;
            }
        }
        free(rs);
        free(code);
    }
}

/* Dense keys (float32): out[i, t] = sum_j q[i, j] k[t, j] for t < n.
 * task words: keys (f32 [n, d], rows of d), query (f32 [r, d]), out (f32, rows of ld_out), n. */
void dense_logits(int ntask, const int64_t *tasks, int d, int r, int ld_out, int threads) {
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int k = 0; k < ntask; k++) {
        const int64_t *w = tasks + 4 * k;
        const float *keys = (const float *)w[0], *q = (const float *)w[1];
        float *out = (float *)w[2];
        int n = (int)w[3];
        for (int t = 0; t < n; t++) {
            const float *kt = keys + (size_t)t * d;
            for (int i = 0; i < r; i++) {
                const float *qi = q + (size_t)i * d;
                float acc = 0.f;
                for (int j = 0; j < d; j++) acc += qi[j] * kt[j];
                out[(size_t)i * ld_out + t] = acc;
            }
        }
    }
}

/* Dense values (float32): out[i, :] = sum_t p[i, t] v[t, :] for t < n.
 * task words: values (f32 [n, dv], rows of dv), probs (f32, rows of ld_p), out (f32 [r, dv], overwritten), n. */
void dense_mix(int ntask, const int64_t *tasks, int dv, int r, int ld_p, int threads) {
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int k = 0; k < ntask; k++) {
        const int64_t *w = tasks + 4 * k;
        const float *v = (const float *)w[0], *p = (const float *)w[1];
        float *out = (float *)w[2];
        int n = (int)w[3];
        memset(out, 0, sizeof(float) * (size_t)r * dv);
        for (int t = 0; t < n; t++) {
            const float *vt = v + (size_t)t * dv;
            for (int i = 0; i < r; i++) {
                float pt = p[(size_t)i * ld_p + t];
                if (pt == 0.f) continue;
                float *o = out + (size_t)i * dv;
                for (int j = 0; j < dv; j++) o[j] += pt * vt[j];
            }
        }
    }
}
