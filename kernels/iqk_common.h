/* Shared building blocks of the IQ*_K / IQ*_KS quantizers.
 *
 * The IQK formats were created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of the pieces
 * ik_llama.cpp's quantize_row_iq*_k_impl functions share (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Everything here is pure (no mutable globals) and works on caller-provided
 * buffers, so it is thread-safe. Floating-point expressions are written in the
 * exact order the spec gives: with -ffp-contract=off they reproduce the
 * reference byte for byte; do not "simplify" them.
 */
#ifndef EK_IQK_COMMON_H
#define EK_IQK_COMMON_H

#include <stdint.h>
#include "ek_common.h"

/* ---- value tables (iq2nl_values ... iq6nl_values): base half, then shifted half ---- */
extern const int8_t ek_iqk_v2[8];     /* IQ2_K, IQ2_KS           (shift +5) */
extern const int8_t ek_iqk_v3[16];    /* IQ3_K, IQ3_KS, IQ2_KL   (shift +4) */
extern const int8_t ek_iqk_v4[32];    /* IQ4_K, IQ4_KS, IQ4_KSS  (shift +4) */
extern const int8_t ek_iqk_v5[64];    /* IQ5_K, IQ5_KS           (shift +2) */
extern const int8_t ek_iqk_v6[128];   /* IQ6_K                   (shift +1) */
/* The same values as floats (exact); the searches below take these. */
extern const float ek_iqk_v2f[8];
extern const float ek_iqk_v3f[16];
extern const float ek_iqk_v4f[32];
extern const float ek_iqk_v5f[64];
extern const float ek_iqk_v6f[128];
/* IQ6_K CPU to_float values P(q) (+1 for the shifted half), unfused (dequantize_row_iq6_k). */
extern const float ek_iqk_iq6k_cubic[128];

/* ---- nearest-value search NI (best_index_iq*nl, acceleration tables iq*nl_index) ---- */
extern const uint8_t ek_iqk_ni3_tab[111];
extern const uint8_t ek_iqk_ni4_tab[241];
extern const uint8_t ek_iqk_ni5_tab[248];
extern const uint8_t ek_iqk_ni6_tab[249];

/* The reference truncates with a C float->int cast; on x86 an out-of-range or
 * NaN operand yields INT_MIN, which every NI turns into index 0. We reproduce
 * that without invoking undefined behaviour. */
static inline int ek_iqk_trunc_ok(float t) { return t >= -2147483648.0f && t < 2147483648.0f; }

/* NI2: 4-entry table (V points at the chosen half). */
static inline int ek_iqk_ni2(const float *V, float t) {
    int k = t < V[1] ? 0 : t > V[2] ? 2 : 1;
    return t - V[k] < V[k + 1] - t ? k : k + 1;
}

/* Table lookup shared by NI3..NI6; k is the table index before range checks.
 * An entry e >= n means "compare neighbours e-n and e-n+1". (Plain branches:
 * most inputs hit a direct entry, so they predict well and beat a
 * branch-free formulation.) */
static inline int ek_iqk_ni_lookup(const float *V, float t, int k, const uint8_t *tab, int L, int n) {
    if ((unsigned)k >= (unsigned)L) return k < 0 ? 0 : n - 1;
    const int e = tab[k];
    if (e < n) return e;
    const int i = e - n;
    return t - V[i] < V[i + 1] - t ? i : i + 1;
}

/* The same search returning the value V[NI] instead of the index. */
static inline float ek_iqk_nv_lookup(const float *V, float t, int k, const uint8_t *tab, int L, int n) {
    if (__builtin_expect((unsigned)k >= (unsigned)L, 0)) return k < 0 ? V[0] : V[n - 1];
    const int e = tab[k];
    if (__builtin_expect(e < n, 1)) return V[e];
    const int i = e - n;
    return t - V[i] < V[i + 1] - t ? V[i] : V[i + 1];
}

/* Branch-free variant of ek_iqk_nv_lookup for the 32- and 64-entry tables,
 * where "compare neighbours" entries are frequent and scattered enough that
 * mispredictions cost more than the extra load. */
static inline float ek_iqk_nv_lookup_nb(const float *V, float t, int k, const uint8_t *tab, int L, int n) {
    if ((unsigned)k >= (unsigned)L) return k < 0 ? V[0] : V[n - 1];
    const int e = tab[k];
    const int far = e >= n;
    const int i = e - (n & -far);
    const int up = far & !(t - V[i] < V[i + far] - t);
    return V[i + up];
}

/* NI3, NI4, NI5: k = trunc(t) - V[0] (integer subtraction). */
static inline int ek_iqk_ni_int(const float *V, float t, const uint8_t *tab, int L, int n) {
    if (!ek_iqk_trunc_ok(t)) return 0;
    return ek_iqk_ni_lookup(V, t, (int)t - (int)V[0], tab, L, n);
}
static inline int ek_iqk_ni3(const float *V, float t) { return ek_iqk_ni_int(V, t, ek_iqk_ni3_tab, 111, 8); }
static inline int ek_iqk_ni4(const float *V, float t) { return ek_iqk_ni_int(V, t, ek_iqk_ni4_tab, 241, 16); }
static inline int ek_iqk_ni5(const float *V, float t) { return ek_iqk_ni_int(V, t, ek_iqk_ni5_tab, 247, 32); }
/* NI6 subtracts in float before truncating (best_index_iq6nl). */
static inline int ek_iqk_ni6(const float *V, float t) {
    const float u = t - V[0];
    if (!ek_iqk_trunc_ok(u)) return 0;
    return ek_iqk_ni_lookup(V, t, (int)u, ek_iqk_ni6_tab, 249, 64);
}

/* Select an NI by table size in bits (2..6); for callers that are generic. */
static inline int ek_iqk_ni(int bits, const float *V, float t) {
    switch (bits) {
    case 2: return ek_iqk_ni2(V, t);
    case 3: return ek_iqk_ni3(V, t);
    case 4: return ek_iqk_ni4(V, t);
    case 5: return ek_iqk_ni5(V, t);
    default: return ek_iqk_ni6(V, t);
    }
}

/* ---- importance weights (QHelper::row_weights; the weights of quantize_row_*_impl) ---- */

/* Sanitizer S(bs) for one span of n columns (n a multiple of bs; the span must
 * start on a bs-aligned column). x: the row's inputs for those columns, qw: the
 * raw importance entries for the same columns, out: the sanitized weights.
 * Groups are independent, so a caller may sanitize one super-block at a time. */
void ek_iqk_sanitize_imatrix(const float *x, const float *qw, float *out, int n, int bs);

/* S = sum of x^2 in index order (float accumulation from 0). */
float ek_iqk_sumsq(const float *x, int n);

/* How weights are formed when there is no imatrix. */
enum ek_iqk_wmode {
    EK_IQK_W_QUARTER_SIGMA = 0, /* 0.25*sigma2 + x^2 (IQ2_K, IQ3_K, IQ5_K, IQ6_K, IQ2_KS) */
    EK_IQK_W_SQUARE = 1,        /* x^2 (IQ4_K, IQ3_KS, IQ4_KS, IQ5_KS, IQ4_KSS) */
    EK_IQK_W_ABS = 2            /* |x| (IQ2_KL) */
};
/* w_j for j < n: qw_j*sqrt(sigma2 + x_j^2) when qw (sanitized) is given, else per mode. */
void ek_iqk_weights(const float *x, const float *qw, int n, float sigma2, int mode, float *w);

/* ---- shared procedures (make_qx_quants and the block scale searches) ---- */

/* Scale-of-scales SS(n, nmax, s, c): returns D; when L is not NULL it receives
 * the codes L_i = l_i + nmax (0..2*nmax-1). */
float ek_iqk_scale_of_scales(int n, int nmax, const float *s, const float *c, int8_t *L);

/* Block fit BF. bits selects the table/NI (3: V3/NI3, 4: V4/NI4, 5: V5/NI5,
 * 6: V6/NI6); T0/T1 are the base and shifted halves as floats (e.g. ek_iqk_v4f
 * and ek_iqk_v4f + 16); B the block length (16 and 32 have specialised code);
 * step the integer step between tries; guard/refit as in the spec's table
 * (IQ3_K: 3,2,1,1; IQ4_K: 7,1,0,0; IQ5_K/IQ6_K: 5,1,0,1; IQ3_KS: 5,1,1,0;
 * IQ4_KS: 7,1,0,0; IQ5_KS: 5,1,0,0 for ntry,step,guard,refit). Outcome: */
enum ek_iqk_bf_result {
    EK_IQK_BF_EMPTY = 0, /* max|x| < 1e-16f: scale 0, shift 0 */
    EK_IQK_BF_ZERO = 1,  /* the search ended with d == 0 (exactly); *shift as found, no refit done */
    EK_IQK_BF_OK = 2     /* *d is the (refitted, if asked) scale, *shift the table half */
};
int ek_iqk_block_fit(int bits, const float *T0, const float *T1, const float *x, const float *w, int B,
                     int ntry, int step, int guard, int refit, float *d, int *shift);

/* IQ2 partition search (quantize_row_iq2_k_impl; quantize_row_iq2_ks_impl with B = 32,
 * max_i1 = 24, min_i3 = 8). B <= 32. The caller has checked that the block is
 * not empty. Tries i1 < max_i1, i2 in [i1, B), i3 in [max(i2, min_i3), B), the
 * four value assignments per partition, ACC with best = 0, d = 0. V is the
 * 8-entry V2 table (base then shifted) as floats. Returns d and *shift. */
float ek_iqk_iq2_partition(const float *x, const float *w, int B, int max_i1, int min_i3, const float *V,
                           int *shift);

/* max |x_j| over n values; *m receives the signed value at the first index
 * attaining it (strict '>' scan), 0 when all are zero. */
static inline float ek_iqk_amax(const float *x, int n, float *m) {
    float amax = 0, mx = 0;
    for (int j = 0; j < n; ++j) {
        float ax = fabsf(x[j]);
        if (ax > amax) { amax = ax; mx = x[j]; }
    }
    *m = mx;
    return amax;
}

/* ---- dequantization helpers ----
 * Index extraction works on 16 bytes at a time with GNU C vector types
 * (integer operations only; float results are computed one by one). */
typedef uint8_t ek_iqk_v16u8 __attribute__((vector_size(16)));
static inline ek_iqk_v16u8 ek_iqk_load16(const uint8_t *p) {
    ek_iqk_v16u8 v;
    memcpy(&v, p, 16);
    return v;
}
/* out[t] = fl(dl * V[idx[t]]) for t < 16. */
static inline void ek_iqk_scale16(float dl, const float *V, ek_iqk_v16u8 idx, float *out) {
    uint8_t k[16];
    float v[16];
    memcpy(k, &idx, 16);
    for (int t = 0; t < 16; ++t) v[t] = V[k[t]];
    for (int t = 0; t < 16; ++t) out[t] = dl * v[t]; /* element-wise, vectorizable */
}

#endif
