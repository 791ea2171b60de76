/* Causal grouped-query attention in float32, for the reference forward pass.
 *
 *   out[b, t, h] = sum_{s <= t} softmax_s(scale * q[b, t, h] . k[b, s, h / G]) v[b, s, h / G]
 *
 * q, out: (B, T, H, D) and k, v: (B, T, Hkv, D), contiguous float32, G = H / Hkv.
 * Only query positions t >= q_from are computed; out then holds T - q_from positions
 * (the last layer of a perplexity run needs only the scored half).
 *
 * Why a kernel: torch's chain of bmm, mask, softmax and layout copies spends most of its
 * time moving a scores tensor that does not fit in L2. Here one work item is
 * (sequence b, kv head j, a block of QB query positions): its G * QB query rows are
 * packed transposed (scaled), so one fused pass computes their scores for every key
 * s < t1 into an L2-resident buffer laid out key-major (16 rows per vector lane group);
 * the softmax then runs down the keys with the rows in the lanes, and P V accumulates
 * PR = 6 rows x 64 columns in registers. The keys above the diagonal within a block are
 * computed and then given weight exactly 0; keys past the block are never touched.
 *
 * Arithmetic: float32 throughout, FMA accumulation over d (dot products) and over s
 * (P V), in that fixed order, so results do not depend on the thread count. exp is a
 * Cephes-style polynomial accurate to about 1 ulp (rounded-to-nearest range reduction,
 * degree-6 polynomial, exact scaling by 2^n). NaN scores propagate to the output.
 *
 * The vector path needs AVX-512F (checked at run time) and D % 16 == 0; otherwise
 * ek_causal_attention returns EK_ERR_NOT_IMPLEMENTED and the caller uses its own path. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ek_avx512.h"
#include "ek_team.h"

#define QB 32   /* query positions per work item */
#define RT 32   /* rows per QK tile: two 16-lane vectors */
#define KG 8    /* keys per QK micro-tile */
#define PR 6    /* rows per P V micro-tile */

typedef struct {
    const float *q, *k, *v;
    float *out;
    int64_t B, T, H, Hkv, D, G, q_from, n_qb;
    int64_t rp;           /* padded rows per item (multiple of RT) */
    int64_t nkp;          /* padded keys (multiple of KG) */
    int64_t slot_floats;  /* scratch floats per thread slot */
    float scale;
    float *scratch;
} attn_ctx;

#ifdef EK_HAVE_AVX512_KERNELS
/* S[s][r0 .. r0+31] = sum_d qt[d][r0 ..] * k_s[d] for KG keys at stride ks. */
static EK_AVX512 inline __attribute__((always_inline)) void qk_tile8(const float *qt, int64_t rp, int64_t r0, const float *k0, int64_t ks,
                                      int64_t D, float *st) {
    __m512 lo[KG], hi[KG];
#pragma GCC unroll 8
    for (int u = 0; u < KG; ++u) lo[u] = hi[u] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const __m512 qa = _mm512_load_ps(qt + d * rp + r0), qb = _mm512_load_ps(qt + d * rp + r0 + 16);
#pragma GCC unroll 8
        for (int u = 0; u < KG; ++u) {
            const __m512 kd = _mm512_set1_ps(k0[u * ks + d]);
            lo[u] = _mm512_fmadd_ps(kd, qa, lo[u]);
            hi[u] = _mm512_fmadd_ps(kd, qb, hi[u]);
        }
    }
#pragma GCC unroll 8
    for (int u = 0; u < KG; ++u) {
        _mm512_store_ps(st + u * rp + r0, lo[u]);
        _mm512_store_ps(st + u * rp + r0 + 16, hi[u]);
    }
}

static EK_AVX512 inline __attribute__((always_inline)) void qk_tile1(const float *qt, int64_t rp, int64_t r0, const float *k0, int64_t D,
                                      float *st) {
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const __m512 kd = _mm512_set1_ps(k0[d]);
        lo = _mm512_fmadd_ps(kd, _mm512_load_ps(qt + d * rp + r0), lo);
        hi = _mm512_fmadd_ps(kd, _mm512_load_ps(qt + d * rp + r0 + 16), hi);
    }
    _mm512_store_ps(st + r0, lo);
    _mm512_store_ps(st + r0 + 16, hi);
}

/* acc[u][c] = sum_{s < s_end} P[s][r0 + u] * v_s[c0 + 16c .. +16], NC vectors of columns,
 * stored as out row u (when u < n_rows) times inv[r0 + u]. */
static EK_AVX512 inline __attribute__((always_inline)) void pv_tile(const float *pt, int64_t rp, int64_t r0, const float *v0, int64_t vs,
                                     int64_t s_end, int64_t c0, const int NC, float *const *orow,
                                     const float *inv, int n_rows) {
    __m512 acc[PR][4];
#pragma GCC unroll 8
    for (int u = 0; u < PR; ++u)
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) acc[u][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < s_end; ++s) {
        const float *vr = v0 + s * vs + c0;
        __m512 vv[4];
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) vv[c] = _mm512_loadu_ps(vr + 16 * c);
        const float *p = pt + s * rp + r0;
#pragma GCC unroll 8
        for (int u = 0; u < PR; ++u) {
            const __m512 pu = _mm512_set1_ps(p[u]);
#pragma GCC unroll 8
            for (int c = 0; c < NC; ++c) acc[u][c] = _mm512_fmadd_ps(pu, vv[c], acc[u][c]);
        }
    }
#pragma GCC unroll 8
    for (int u = 0; u < PR; ++u) {
        if (u >= n_rows) break;
        const __m512 iu = _mm512_set1_ps(inv[r0 + u]);
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) _mm512_storeu_ps(orow[u] + c0 + 16 * c, _mm512_mul_ps(acc[u][c], iu));
    }
}

static EK_AVX512 void attn_item_avx512(void *vctx, int64_t item, int slot) {
    const attn_ctx *c = (const attn_ctx *)vctx;
    const int64_t D = c->D, G = c->G, H = c->H, Hkv = c->Hkv, T = c->T, rp = c->rp;
    /* largest blocks first: they cost the most, so the tail of the schedule is cheap */
    const int64_t qb = c->n_qb - 1 - item / (c->B * Hkv);
    const int64_t b = (item % (c->B * Hkv)) / Hkv, j = item % Hkv;
    const int64_t t0 = c->q_from + qb * QB, t1 = t0 + QB < T ? t0 + QB : T;
    const int64_t rows = (t1 - t0) * G, nk = t1;
    float *qt = c->scratch + (int64_t)slot * c->slot_floats;     /* D x rp, 64-byte aligned */
    float *st = qt + D * rp;                                       /* nkp x rp: scores, then P */
    float *inv = st + c->nkp * rp;                                 /* rp */
    int32_t *tpos = (int32_t *)(inv + rp);                         /* rp: each row's position */

    /* 1. rows r = (t - t0) * G + g, packed transposed and scaled (as q * scale first) */
    for (int64_t r = 0; r < rp; ++r) {
        const int64_t rr = r < rows ? r : rows - 1;               /* padding repeats the last row */
        const int64_t t = t0 + rr / G, h = j * G + rr % G;
        const float *src = c->q + ((b * T + t) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) qt[d * rp + r] = src[d] * c->scale;
        tpos[r] = (int32_t)t;
    }

    /* 2. scores for keys 0 .. nk-1 */
    const int64_t ks = Hkv * D;
    const float *kb = c->k + (b * T * Hkv + j) * D;
    int64_t s = 0;
    for (; s + KG <= nk; s += KG)
        for (int64_t r0 = 0; r0 < rp; r0 += RT) qk_tile8(qt, rp, r0, kb + s * ks, ks, D, st + s * rp);
    for (; s < nk; ++s)
        for (int64_t r0 = 0; r0 < rp; r0 += RT) qk_tile1(qt, rp, r0, kb + s * ks, D, st + s * rp);

    /* 3. softmax down the keys, 16 rows per vector; keys after a row's position get 0 */
    for (int64_t r0 = 0; r0 < rp; r0 += 16) {
        const __m512i tv = _mm512_load_si512((const void *)(tpos + r0));
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (s = 0; s < t0; ++s) m = _mm512_max_ps(m, _mm512_load_ps(st + s * rp + r0));
        for (; s < nk; ++s) {
            const __mmask16 ok = _mm512_cmpge_epi32_mask(tv, _mm512_set1_epi32((int)s));
            m = _mm512_mask_max_ps(m, ok, m, _mm512_load_ps(st + s * rp + r0));
        }
        __m512 sum = _mm512_setzero_ps();
        for (s = 0; s < t0; ++s) {
            const __m512 p = ek_exp512(_mm512_sub_ps(_mm512_load_ps(st + s * rp + r0), m));
            sum = _mm512_add_ps(sum, p);
            _mm512_store_ps(st + s * rp + r0, p);
        }
        for (; s < nk; ++s) {
            const __mmask16 ok = _mm512_cmpge_epi32_mask(tv, _mm512_set1_epi32((int)s));
            const __m512 p = _mm512_maskz_mov_ps(ok, ek_exp512(_mm512_sub_ps(_mm512_load_ps(st + s * rp + r0), m)));
            sum = _mm512_add_ps(sum, p);
            _mm512_store_ps(st + s * rp + r0, p);
        }
        _mm512_store_ps(inv + r0, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
    }

    /* 4. out rows = P V / sum, PR rows x up to 64 columns per register tile */
    const int64_t Tout = T - c->q_from;
    const float *vb = c->v + (b * T * Hkv + j) * D;
    for (int64_t r0 = 0; r0 < rows; r0 += PR) {
        float *orow[PR];
        const int n_rows = rows - r0 < PR ? (int)(rows - r0) : PR;
        for (int u = 0; u < PR; ++u) {
            const int64_t rr = r0 + (u < n_rows ? u : 0);
            const int64_t t = t0 + rr / G, h = j * G + rr % G;
            orow[u] = c->out + ((b * Tout + (t - c->q_from)) * H + h) * D;
        }
        const int64_t s_end = (int64_t)tpos[r0 + n_rows - 1] + 1;     /* keys the tile's last row sees */
        int64_t c0 = 0;
        for (; c0 + 64 <= D; c0 += 64) pv_tile(st, rp, r0, vb, ks, s_end, c0, 4, orow, inv, n_rows);
        switch ((D - c0) / 16) {
            case 3: pv_tile(st, rp, r0, vb, ks, s_end, c0, 3, orow, inv, n_rows); break;
            case 2: pv_tile(st, rp, r0, vb, ks, s_end, c0, 2, orow, inv, n_rows); break;
            case 1: pv_tile(st, rp, r0, vb, ks, s_end, c0, 1, orow, inv, n_rows); break;
            default: break;
        }
    }
}

#endif

int ek_has_causal_attention(int64_t head_dim) {
    return head_dim > 0 && head_dim % 16 == 0 && ek_have_avx512();
}

int ek_causal_attention(const float *q, const float *k, const float *v, float *out, int64_t B, int64_t T,
                        int64_t H, int64_t Hkv, int64_t D, int64_t q_from, float scale, int nthreads,
                        ek_team_runner runner) {
    if (B < 0 || T <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || q_from < 0 || q_from >= T)
        return EK_ERR_BAD_ARGUMENT;
    if (B > 0 && (!q || !k || !v || !out)) return EK_ERR_BAD_ARGUMENT;
    if (!ek_has_causal_attention(D)) return EK_ERR_NOT_IMPLEMENTED;
    if (B == 0) return EK_OK;
#ifdef EK_HAVE_AVX512_KERNELS
    if (nthreads < 1) nthreads = 1;
    attn_ctx c;
    c.q = q; c.k = k; c.v = v; c.out = out;
    c.B = B; c.T = T; c.H = H; c.Hkv = Hkv; c.D = D; c.G = H / Hkv; c.q_from = q_from;
    c.n_qb = (T - q_from + QB - 1) / QB;
    c.rp = (QB * c.G + RT - 1) / RT * RT;
    c.nkp = (T + KG - 1) / KG * KG;
    /* + PR: a P V tile reads up to PR - 1 rows past the last real row (never stored) */
    c.slot_floats = (D * c.rp + c.nkp * c.rp + 2 * c.rp + PR + 15) / 16 * 16;   /* 64-byte aligned slots */
    c.scale = scale;
    c.scratch = (float *)aligned_alloc(64, (size_t)(nthreads * c.slot_floats) * sizeof(float));
    if (!c.scratch) return EK_ERR_NO_MEMORY;
    ek_run_items(attn_item_avx512, &c, B * Hkv * c.n_qb, nthreads, runner);
    free(c.scratch);
    return EK_OK;
#else
    (void)nthreads; (void)runner; (void)scale;
    return EK_ERR_NOT_IMPLEMENTED;
#endif
}
