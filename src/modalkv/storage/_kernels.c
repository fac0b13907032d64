/* Fused decode reads of compressed KV entries (modalkv.storage.kernels builds and loads this file).
 *
 * Every function takes a list of independent tasks (one per batch row and KV head of a layer), each a row of
 * int64 words: pointers to the task's tensors and its entry count. Codes are read and used in registers (or a
 * small per-task scratch); no dense copy of the keys or values is ever written.
 *
 * Two implementations of every read:
 *  - SIMD (x86 AVX2 + FMA + F16C; used when the compiler targets such a CPU, see FLAGS in kernels.py): codes are
 *    unpacked 8 bytes at a time into 8 int32 lanes and converted to floats in registers; the query rows of a KV
 *    head's GQA group are processed together, so each code is unpacked once for all of them;
 *  - portable C (every other CPU, or any CPU when built with -DMODALKV_SCALAR, which the tests do to check it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t half; /* fp16 bits */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(MODALKV_SCALAR)
#define SIMD 1
#endif

#if defined(__F16C__) && !defined(MODALKV_SCALAR)
#include <immintrin.h>
/* fp16 -> float with the F16C instruction (a plain _Float16 cast is a long software sequence with gcc 12) */
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

#define INLINE static inline __attribute__((always_inline))

static inline int min_int(int a, int b) { return a < b ? a : b; }

/* A code byte holds per = 8 / bits codes, channel order low bits first. */
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

#ifdef SIMD
/* The SIMD paths read 8 code bytes at a time (W = 8 * per channels, a "block"): lane l of phase m holds the code of
 * channel l * per + m of the block. Query rows (keys) and accumulators (values) are kept in that phase order:
 * position m * 8 + l of a block <-> channel l * per + m. */
INLINE __m256i load8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

INLINE __m256 phase(__m256i b, int m, int bits) {
    if (bits < 8) {
        if (m) b = _mm256_srli_epi32(b, m * bits);
        if (m < 8 / bits - 1) b = _mm256_and_si256(b, _mm256_set1_epi32((1 << bits) - 1));
    }
    return _mm256_cvtepi32_ps(b);
}

static void to_phase_order(const float *x, float *y, int d, int per) {
    for (int b = 0; b < d; b += 8 * per)
        for (int m = 0; m < per; m++)
            for (int l = 0; l < 8; l++) y[b + m * 8 + l] = x[b + l * per + m];
}

static void from_phase_order(const float *y, float *x, int d, int per) {
    for (int b = 0; b < d; b += 8 * per)
        for (int m = 0; m < per; m++)
            for (int l = 0; l < 8; l++) x[b + l * per + m] = y[b + m * 8 + l];
}

/* lane k of the result = the sum of the 8 lanes of a[k] */
INLINE __m256 hsum8x8(const __m256 *a) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 lo = _mm256_hadd_ps(s01, s23), hi = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* KIVI keys, tokens [t0, t1) of one group: out[i, t] = qp[i] . c[t] + bias[i] for nr <= 4 rows (qp in phase order),
 * two tokens per iteration (8 accumulators, one horizontal reduction for all 8 sums). */
INLINE void kivi_logits_body(const uint8_t *codes, int line, int t0, int t1, const float *qp, const float *bias,
                             float *out, int ld, int d, int bits, int nr) {
    const int per = 8 / bits;
    for (int t = t0; t < t1; t += 2) {
        const uint8_t *c0 = codes + (size_t)t * line, *c1 = t + 1 < t1 ? c0 + line : c0;
        __m256 acc[8];
        for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
        for (int b = 0; b < d; b += 8 * per) {
            __m256i x0 = load8(c0 + b / per), x1 = load8(c1 + b / per);
#pragma GCC unroll 4
            for (int m = 0; m < per; m++) {
                __m256 f0 = phase(x0, m, bits), f1 = phase(x1, m, bits);
#pragma GCC unroll 4
                for (int i = 0; i < nr; i++) {
                    __m256 q = _mm256_loadu_ps(qp + (size_t)i * d + b + 8 * m);
                    acc[i] = _mm256_fmadd_ps(q, f0, acc[i]);
                    acc[4 + i] = _mm256_fmadd_ps(q, f1, acc[4 + i]);
                }
            }
        }
        float res[8];
        _mm256_storeu_ps(res, hsum8x8(acc));
        for (int i = 0; i < nr; i++) {
            out[(size_t)i * ld + t] = res[i] + bias[i];
            if (t + 1 < t1) out[(size_t)i * ld + t + 1] = res[4 + i] + bias[i];
        }
    }
}

static void kivi_logits_rows(const uint8_t *codes, int line, int t0, int t1, const float *qp, const float *bias,
                             float *out, int ld, int d, int bits, int nr) {
#define CASE(B, N) \
    case B * 8 + N: kivi_logits_body(codes, line, t0, t1, qp, bias, out, ld, d, B, N); break;
    switch (bits * 8 + nr) {
        CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
        CASE(8, 1) CASE(8, 2) CASE(8, 3) CASE(8, 4)
    }
#undef CASE
}
#endif

#ifdef SIMD
/* KIVI keys with d a multiple of 8 * per: per group, the fp16 scales and zeros are converted 8 at a time, the bias
 * q . z is a vector dot product in channel order, and the scaled query (q * s) in phase order is the query rows put
 * in phase order once per task times the scales gathered into phase order (no scalar loop over channels). */
static void kivi_logits_simd(const uint8_t *codes, const half *scale, const half *zero, const float *q, float *out,
                             int nq, int d, int G, int bits, int r, int ld_out, float *scratch) {
    int per = 8 / bits, line = d * bits / 8;
    float *qp = scratch + r * d, *bias = qp + r * d, *sf = bias + r, *zf = sf + d, *q0 = scratch;
    int *idx = malloc(sizeof(int) * (size_t)d);
    for (int b = 0; b < d; b += 8 * per)  /* phase position -> channel */
        for (int m = 0; m < per; m++)
            for (int l = 0; l < 8; l++) idx[b + m * 8 + l] = b + l * per + m;
    for (int i = 0; i < r; i++) to_phase_order(q + (size_t)i * d, q0 + (size_t)i * d, d, per);
    for (int g = 0; g < nq / G; g++) {
        for (int j = 0; j < d; j += 8) {
            _mm256_storeu_ps(sf + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + (size_t)g * d + j))));
            _mm256_storeu_ps(zf + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zero + (size_t)g * d + j))));
        }
        for (int i = 0; i < r; i++) {
            __m256 acc = _mm256_setzero_ps();
            for (int j = 0; j < d; j += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)i * d + j), _mm256_loadu_ps(zf + j), acc);
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            bias[i] = _mm_cvtss_f32(h);
        }
        for (int j = 0; j < d; j += 8) {
            __m256 sp = _mm256_i32gather_ps(sf, _mm256_loadu_si256((const __m256i *)(idx + j)), 4);
            for (int i = 0; i < r; i++)
                _mm256_storeu_ps(qp + (size_t)i * d + j, _mm256_mul_ps(_mm256_loadu_ps(q0 + (size_t)i * d + j), sp));
        }
        for (int i0 = 0; i0 < r; i0 += 4)
            kivi_logits_rows(codes, line, g * G, (g + 1) * G, qp + (size_t)i0 * d, bias + i0,
                             out + (size_t)i0 * ld_out, ld_out, d, bits, min_int(4, r - i0));
    }
    free(idx);
}
#endif

/* KIVI keys, per channel over groups of G tokens: out[i, t] = sum_j q[i, j] (s[t/G, j] c[t, j] + z[t/G, j]),
 * computed as (q * s) . c + q . z per group. task words: codes (uint8 [nq, d*bits/8]), scale, zero (fp16 [nq/G, d]),
 * query (f32 [r, d]), out (f32, rows of ld_out), nq. */
void kivi_logits(int ntask, const int64_t *tasks, int d, int G, int bits, int r, int ld_out, int threads) {
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int k = 0; k < ntask; k++) {
        const int64_t *w = tasks + 6 * k;
        const uint8_t *codes = (const uint8_t *)w[0];
        const half *scale = (const half *)w[1], *zero = (const half *)w[2];
        const float *q = (const float *)w[3];
        float *out = (float *)w[4];
        int nq = (int)w[5], line = d * bits / 8;
        float *qs = malloc(sizeof(float) * (size_t)(2 * r * d + r + 3 * d));
        float *bias = qs + 2 * r * d, *c = bias + r, *sf = c + d, *zf = sf + d;
#ifdef SIMD
        if (d % (64 / bits) == 0) {  /* whole 8-byte blocks of codes per line: the vector path */
            kivi_logits_simd(codes, scale, zero, q, out, nq, d, G, bits, r, ld_out, qs);
            free(qs);
            continue;
        }
#endif
        for (int g = 0; g < nq / G; g++) {
            for (int j = 0; j < d; j++) {  /* the group's fp16 scales and zeros as floats, once per group */
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

#ifdef SIMD
#define MIX_CHUNK 256 /* tokens whose p * s products are formed at once (a few KB, stays in L1) */

/* KIVI values, tokens [t0, t1), nr <= 4 rows (nr * per <= 8 accumulators): acc (phase order, rows of dv) +=
 * sum_t ps[i, g, t] c[t] with ps[i, g, t] = p[i, t] s[t, g] (a plane of MIX_CHUNK tokens per (row, group); rows
 * pstride = ng * MIX_CHUNK floats apart). */
INLINE void kivi_mix_body(const uint8_t *codes, int line, int t0, int t1, const float *ps, int pstride, int ng,
                          float *acc_out, int dv, int vg, int bits, int nr) {
    const int per = 8 / bits;
    for (int b = 0; b < dv; b += 8 * per) {
        int g = b / vg;
        __m256 acc[4][4];
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++)
#pragma GCC unroll 4
            for (int m = 0; m < per; m++) acc[i][m] = _mm256_loadu_ps(acc_out + (size_t)i * dv + b + 8 * m);
        for (int t = t0; t < t1; t++) {
            __m256i x = load8(codes + (size_t)t * line + b / per);
            const float *pt = ps + (size_t)g * MIX_CHUNK + (t - t0);
#pragma GCC unroll 4
            for (int m = 0; m < per; m++) {
                __m256 f = phase(x, m, bits);
#pragma GCC unroll 4
                for (int i = 0; i < nr; i++)
                    acc[i][m] = _mm256_fmadd_ps(_mm256_broadcast_ss(pt + (size_t)i * pstride), f, acc[i][m]);
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++)
#pragma GCC unroll 4
            for (int m = 0; m < per; m++) _mm256_storeu_ps(acc_out + (size_t)i * dv + b + 8 * m, acc[i][m]);
    }
}

static void kivi_mix_rows(const uint8_t *codes, int line, int t0, int t1, const float *ps, int pstride, int ng,
                          float *acc_out, int dv, int vg, int bits, int nr) {
#define CASE(B, N) \
    case B * 8 + N: kivi_mix_body(codes, line, t0, t1, ps, pstride, ng, acc_out, dv, vg, B, N); break;
    switch (bits * 8 + nr) {
        CASE(2, 1) CASE(2, 2) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4) CASE(8, 1) CASE(8, 2) CASE(8, 3) CASE(8, 4)
    }
#undef CASE
}

static void kivi_mix_simd(const uint8_t *codes, const half *scale, const half *zero, const float *p, float *out,
                          int nq, int dv, int vg, int bits, int r, int ld_p) {
    int line = dv * bits / 8, ng = dv / vg, per = 8 / bits, rows = bits == 2 ? 2 : 4;
    float *acc = calloc((size_t)(2 * r * dv + r * ng + 2 * MIX_CHUNK * ng + MIX_CHUNK * r * ng), sizeof(float));
    float *tmp = acc + r * dv, *zsum = tmp + r * dv, *sf = zsum + r * ng, *zf = sf + MIX_CHUNK * ng,
          *ps = zf + MIX_CHUNK * ng;
    for (int t0 = 0; t0 < nq; t0 += MIX_CHUNK) {
        int tc = min_int(MIX_CHUNK, nq - t0), m = tc * ng, j = 0;
        for (; j + 8 <= m; j += 8) {  /* the chunk's fp16 scales and zeros as floats */
            _mm256_storeu_ps(sf + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + (size_t)t0 * ng + j))));
            _mm256_storeu_ps(zf + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zero + (size_t)t0 * ng + j))));
        }
        for (; j < m; j++) {
            sf[j] = h2f(scale[(size_t)t0 * ng + j]);
            zf[j] = h2f(zero[(size_t)t0 * ng + j]);
        }
        const __m256i stride = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(ng));
        for (int i = 0; i < r; i++)  /* ps[i, g, t] = p[i, t] s[t, g]; zsum[i, g] += p[i, t] z[t, g]: 8 tokens at once */
            for (int g = 0; g < ng; g++) {
                const float *pi = p + (size_t)i * ld_p + t0;
                float *dst = ps + (size_t)(i * ng + g) * MIX_CHUNK;
                __m256 zacc = _mm256_setzero_ps();
                int t = 0;
                for (; t + 8 <= tc; t += 8) {
                    __m256 p8 = _mm256_loadu_ps(pi + t);
                    _mm256_storeu_ps(dst + t, _mm256_mul_ps(p8, _mm256_i32gather_ps(sf + t * ng + g, stride, 4)));
                    zacc = _mm256_fmadd_ps(p8, _mm256_i32gather_ps(zf + t * ng + g, stride, 4), zacc);
                }
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(zacc), _mm256_extractf128_ps(zacc, 1));
                h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                float zs = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
                for (; t < tc; t++) {
                    dst[t] = pi[t] * sf[t * ng + g];
                    zs += pi[t] * zf[t * ng + g];
                }
                zsum[i * ng + g] += zs;
            }
        for (int i0 = 0; i0 < r; i0 += rows)
            kivi_mix_rows(codes, line, t0, t0 + tc, ps + (size_t)i0 * ng * MIX_CHUNK, ng * MIX_CHUNK, ng,
                          acc + (size_t)i0 * dv, dv, vg, bits, min_int(rows, r - i0));
    }
    for (int i = 0; i < r; i++) {
        from_phase_order(acc + (size_t)i * dv, tmp + (size_t)i * dv, dv, per);
        for (int j = 0; j < dv; j++) out[(size_t)i * dv + j] = tmp[(size_t)i * dv + j] + zsum[i * ng + j / vg];
    }
    free(acc);
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
#ifdef SIMD
        if (vg % (64 / bits) == 0) {  /* each 8-byte block of codes inside one value group */
            kivi_mix_simd(codes, scale, zero, p, out, nq, dv, vg, bits, r, ld_p);
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

/* Spherical KV section logits: out[i, t] = sum_j rhat[t, j] T[i, j, code[t, j]], rhat = rcode * scale[page] / 255,
 * with the per-query table T[i, j, c] = <q_i[j], C_j[c]> (q_i[j]: channels [j g, j g + g) of the grouped query row,
 * C_j[c]: codeword c of group j) formed per task in a scratch with the query rows innermost (rp >= r of them, a
 * multiple of 4, zero-padded), so that one 4-float load serves 4 rows.
 * task words: codes (uint8 bit stream [w, nbytes]), rcode (uint8 [w, G]), scale (f32 [pages, G]), query (f32 [r, G g],
 * grouped channel order), book (f32 [G, K, g]), out (f32, rows of ld_out), w. */
void spherical_logits(int ntask, const int64_t *tasks, int G, int g, int bits, int K, int page, int r, int ld_out,
                      int threads) {
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int k = 0; k < ntask; k++) {
        const int64_t *w = tasks + 7 * k;
        const uint8_t *codes = (const uint8_t *)w[0], *rcode = (const uint8_t *)w[1];
        const float *scale = (const float *)w[2], *q = (const float *)w[3], *book = (const float *)w[4];
        float *out = (float *)w[5];
        int width = (int)w[6], nbytes = (G * bits + 7) / 8, mask = (1 << bits) - 1, rp = (r + 3) / 4 * 4, d = G * g;
        float *tab = malloc(sizeof(float) * ((size_t)G * K * rp + 2 * G + 4 * (size_t)g));
        float *rs = tab + (size_t)G * K * rp, *rh = rs + G, *qv = rh + G;
        int *idx = malloc(sizeof(int) * (size_t)G);
#ifdef SIMD  /* 8 codes of a 64-bit word: shifted in 4 64-bit lanes twice, the low halves gathered into 8 lanes */
        __m256i shift_lo = _mm256_set_epi64x(3 * bits, 2 * bits, bits, 0);
        __m256i shift_hi = _mm256_set_epi64x(7 * bits, 6 * bits, 5 * bits, 4 * bits);
        __m256i even = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0), lane_k = _mm256_mullo_epi32(
            _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(K));
#endif
        for (int j = 0; j < G; j++)  /* the table */
            for (int i0 = 0; i0 < rp; i0 += 4) {
                for (int x = 0; x < g; x++)
                    for (int i = 0; i < 4; i++) qv[4 * x + i] = i0 + i < r ? q[(size_t)(i0 + i) * d + j * g + x] : 0.f;
                for (int c = 0; c < K; c++) {
                    const float *cw = book + ((size_t)j * K + c) * g;
                    float *dst = tab + ((size_t)j * K + c) * rp + i0;
#ifdef SIMD
                    __m128 v = _mm_mul_ps(_mm_broadcast_ss(cw), _mm_loadu_ps(qv));
                    for (int x = 1; x < g; x++) v = _mm_fmadd_ps(_mm_broadcast_ss(cw + x), _mm_loadu_ps(qv + 4 * x), v);
                    _mm_storeu_ps(dst, v);
#else
                    for (int i = 0; i < 4; i++) {
                        float v = 0.f;
                        for (int x = 0; x < g; x++) v += cw[x] * qv[4 * x + i];
                        dst[i] = v;
                    }
#endif
                }
            }
        for (int t = 0; t < width; t++) {
            if (t % page == 0)
                for (int j = 0; j < G; j++) rs[j] = scale[(t / page) * G + j] / 255.f;
            const uint8_t *p = codes + (size_t)t * nbytes, *rc = rcode + (size_t)t * G;
            int j = 0;
            for (; j + 8 <= G; j += 8) {  /* 8 codes are `bits` whole bytes: one 64-bit little-endian word */
                int byte = j * bits / 8;
                uint64_t word = 0;
                if (byte + 8 <= nbytes) memcpy(&word, p + byte, 8);
                else memcpy(&word, p + byte, (size_t)bits);
#ifdef __BYTE_ORDER__
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
                word = __builtin_bswap64(word);
#endif
#endif
#ifdef SIMD
                __m256i wv = _mm256_set1_epi64x((long long)word);
                __m256i lo = _mm256_srlv_epi64(wv, shift_lo), hi = _mm256_srlv_epi64(wv, shift_hi);
                __m256i c8 = _mm256_set_m128i(_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(hi, even)),
                                              _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(lo, even)));
                c8 = _mm256_and_si256(c8, _mm256_set1_epi32(mask));
                c8 = _mm256_add_epi32(c8, _mm256_add_epi32(lane_k, _mm256_set1_epi32(j * K)));
                _mm256_storeu_si256((__m256i *)(idx + j), _mm256_mullo_epi32(c8, _mm256_set1_epi32(rp)));
#else
                for (int c = 0; c < 8; c++) idx[j + c] = ((j + c) * K + (int)((word >> (c * bits)) & mask)) * rp;
#endif
            }
            for (; j < G; j++) {  /* offset of entry (j, code) in the table */
                int off = j * bits, byte = off >> 3;
                int word = p[byte] | (byte + 1 < nbytes ? p[byte + 1] << 8 : 0);
                idx[j] = (j * K + ((word >> (off & 7)) & mask)) * rp;
            }
            for (j = 0; j < G; j++) rh[j] = (float)rc[j] * rs[j];  /* radius of group j */
#ifdef SIMD
            for (int i0 = 0; i0 < r; i0 += 4) {
                __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps(), a2 = _mm_setzero_ps(), a3 = _mm_setzero_ps();
                const float *ti = tab + i0;
                j = 0;
                for (; j + 4 <= G; j += 4) {
                    a0 = _mm_fmadd_ps(_mm_loadu_ps(ti + idx[j]), _mm_broadcast_ss(rh + j), a0);
                    a1 = _mm_fmadd_ps(_mm_loadu_ps(ti + idx[j + 1]), _mm_broadcast_ss(rh + j + 1), a1);
                    a2 = _mm_fmadd_ps(_mm_loadu_ps(ti + idx[j + 2]), _mm_broadcast_ss(rh + j + 2), a2);
                    a3 = _mm_fmadd_ps(_mm_loadu_ps(ti + idx[j + 3]), _mm_broadcast_ss(rh + j + 3), a3);
                }
                for (; j < G; j++) a0 = _mm_fmadd_ps(_mm_loadu_ps(ti + idx[j]), _mm_broadcast_ss(rh + j), a0);
                float res[4];
                _mm_storeu_ps(res, _mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3)));
                for (int i = 0; i < 4 && i0 + i < r; i++) out[(size_t)(i0 + i) * ld_out + t] = res[i];
            }
#else
            for (int i = 0; i < r; i++) {
                float acc = 0.f;
                for (j = 0; j < G; j++) acc += rh[j] * tab[idx[j] + i];
                out[(size_t)i * ld_out + t] = acc;
            }
#endif
        }
        free(tab);
        free(idx);
    }
}

#ifdef SIMD
/* dense keys, nr <= 4 rows, two tokens per iteration (as kivi_logits_body) */
INLINE void dense_logits_body(const float *keys, int n, const float *q, float *out, int ld, int d, int nr) {
    for (int t = 0; t < n; t += 2) {
        const float *k0 = keys + (size_t)t * d, *k1 = t + 1 < n ? k0 + d : k0;
        __m256 acc[8];
        for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
        for (int b = 0; b < d; b += 8) {
            __m256 f0 = _mm256_loadu_ps(k0 + b), f1 = _mm256_loadu_ps(k1 + b);
#pragma GCC unroll 4
            for (int i = 0; i < nr; i++) {
                __m256 qi = _mm256_loadu_ps(q + (size_t)i * d + b);
                acc[i] = _mm256_fmadd_ps(qi, f0, acc[i]);
                acc[4 + i] = _mm256_fmadd_ps(qi, f1, acc[4 + i]);
            }
        }
        float res[8];
        _mm256_storeu_ps(res, hsum8x8(acc));
        for (int i = 0; i < nr; i++) {
            out[(size_t)i * ld + t] = res[i];
            if (t + 1 < n) out[(size_t)i * ld + t + 1] = res[4 + i];
        }
    }
}

/* dense values, nr <= 4 rows, tokens [t0, t1): 16 channels at a time, accumulators in registers over the tokens
 * (the caller walks the tokens in chunks of 32: one pass over every token per 16 channels measured slower) */
INLINE void dense_mix_body(const float *v, int t0, int t1, const float *p, int ld_p, float *out, int dv, int nr) {
    for (int b = 0; b < dv; b += 16) {
        __m256 acc[4][2];
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++) {
            acc[i][0] = _mm256_loadu_ps(out + (size_t)i * dv + b);
            acc[i][1] = _mm256_loadu_ps(out + (size_t)i * dv + b + 8);
        }
        for (int t = t0; t < t1; t++) {
            __m256 v0 = _mm256_loadu_ps(v + (size_t)t * dv + b), v1 = _mm256_loadu_ps(v + (size_t)t * dv + b + 8);
#pragma GCC unroll 4
            for (int i = 0; i < nr; i++) {
                __m256 pt = _mm256_broadcast_ss(p + (size_t)i * ld_p + t);
                acc[i][0] = _mm256_fmadd_ps(pt, v0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(pt, v1, acc[i][1]);
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++) {
            _mm256_storeu_ps(out + (size_t)i * dv + b, acc[i][0]);
            _mm256_storeu_ps(out + (size_t)i * dv + b + 8, acc[i][1]);
        }
    }
}

static void dense_logits_rows(const float *keys, int n, const float *q, float *out, int ld, int d, int nr) {
    switch (nr) {
        case 1: dense_logits_body(keys, n, q, out, ld, d, 1); break;
        case 2: dense_logits_body(keys, n, q, out, ld, d, 2); break;
        case 3: dense_logits_body(keys, n, q, out, ld, d, 3); break;
        default: dense_logits_body(keys, n, q, out, ld, d, 4); break;
    }
}

static void dense_mix_rows(const float *v, int t0, int t1, const float *p, int ld_p, float *out, int dv, int nr) {
    switch (nr) {
        case 1: dense_mix_body(v, t0, t1, p, ld_p, out, dv, 1); break;
        case 2: dense_mix_body(v, t0, t1, p, ld_p, out, dv, 2); break;
        case 3: dense_mix_body(v, t0, t1, p, ld_p, out, dv, 3); break;
        default: dense_mix_body(v, t0, t1, p, ld_p, out, dv, 4); break;
    }
}
#endif

/* Dense keys (float32): out[i, t] = sum_j q[i, j] k[t, j] for t < n.
 * task words: keys (f32 [n, d], rows of d), query (f32 [r, d]), out (f32, rows of ld_out), n. */
void dense_logits(int ntask, const int64_t *tasks, int d, int r, int ld_out, int threads) {
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int k = 0; k < ntask; k++) {
        const int64_t *w = tasks + 4 * k;
        const float *keys = (const float *)w[0], *q = (const float *)w[1];
        float *out = (float *)w[2];
        int n = (int)w[3];
#ifdef SIMD
        if (d % 8 == 0) {
            for (int i0 = 0; i0 < r; i0 += 4)
                dense_logits_rows(keys, n, q + (size_t)i0 * d, out + (size_t)i0 * ld_out, ld_out, d,
                                  min_int(4, r - i0));
            continue;
        }
#endif
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
#ifdef SIMD
        if (dv % 16 == 0) {
            for (int t0 = 0; t0 < n; t0 += 32)
                for (int i0 = 0; i0 < r; i0 += 4)
                    dense_mix_rows(v, t0, min_int(n, t0 + 32), p + (size_t)i0 * ld_p, ld_p, out + (size_t)i0 * dv, dv,
                                   min_int(4, r - i0));
            continue;
        }
#endif
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

/* Which implementation this build uses: 1 SIMD (AVX2 + FMA + F16C), 0 portable C. */
int simd_build(void) {
#ifdef SIMD
    return 1;
#else
    return 0;
#endif
}
