/* Fused decode reads of compressed KV entries (modalkv.storage.kernels builds and loads this file).
 *
 * Every function takes a list of independent tasks (one per batch row and KV head of a layer), each a row of
 * int64 words: pointers to the task's tensors and its entry count. Codes are read and used in registers / a
 * d-float scratch line; no dense copy of the keys or values is ever written.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef _Float16 half;

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
        float *qs = malloc(sizeof(float) * (size_t)(r * d + r + d));
        float *bias = qs + r * d, *c = bias + r;
        for (int g = 0; g < nq / G; g++) {
            for (int i = 0; i < r; i++) {
                float b = 0.f;
                for (int j = 0; j < d; j++) {
                    float s = (float)scale[g * d + j], z = (float)zero[g * d + j];
                    qs[i * d + j] = q[i * d + j] * s;
                    b += q[i * d + j] * z;
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
        float *c = malloc(sizeof(float) * (size_t)dv);
        memset(out, 0, sizeof(float) * (size_t)r * dv);
        for (int t = 0; t < nq; t++) {
            unpack_line(codes + (size_t)t * line, dv, bits, c);
            for (int i = 0; i < r; i++) {
                float pt = p[(size_t)i * ld_p + t];
                if (pt == 0.f) continue;
                float *o = out + (size_t)i * dv;
                for (int g = 0; g < ng; g++) {
                    float a = pt * (float)scale[t * ng + g], b = pt * (float)zero[t * ng + g];
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
