/* Trellis ("KT") codebooks and their search helpers.
 *
 * The KT formats were created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification and from reading
 * the reference quantizer (class QuantizerIQKT in ggml/src/iqk/iqk_quantize.cpp); no
 * code was copied.
 *
 * Bit-exactness notes. The reference search exists only as AVX2 code, so its
 * results depend on the order in which it adds things up: the candidate scores
 * are 8-lane vectors reduced by a fixed tree, every lane keeps its own running
 * minimum, and the scale fit uses fused multiply-adds in 8 lanes. Everything
 * below reproduces those orders exactly (fmaf where the reference uses FMA), so
 * the bytes do not depend on the machine or on what the compiler vectorizes (the
 * library is built with -ffp-contract=off). The candidate scan uses SSE2 where
 * available (x86-64 baseline): the same IEEE single-precision sub/mul/add/min
 * operations as the scalar fallback, which gives identical bytes.
 *
 * Reference version: the KT code (QuantizerIQKT, quantize_row_iq*_kt_impl) is
 * identical in the copies of iqk_quantize.cpp we read (forks of ik_llama.cpp of
 * mid/late 2025); the results match the golden data of commit 8337e4cd3 and a
 * llama-quantize GGUF made from it byte for byte.
 */
#include "kt_codebook.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* For the 4-wide groups the reference scores two candidates per 256-bit vector,
 * which makes lane L of a batch of 8 hold candidate j + k_lane4[L]. */
static const int k_lane4[8] = {0, 2, 4, 6, 1, 3, 5, 7};

/* ------------------------------------------------------------------ building */

/* bin of one coordinate for the 625-cluster books (thresholds -48, -16, 16, 48) */
static inline int kt_bin5(float v) {
    return v < -48.f ? 0 : v < -16.f ? 1 : v < 16.f ? 2 : v < 48.f ? 3 : 4;
}

/* Cluster of a point (or of scaled inputs) under the book's fixed partition. */
static inline int kt_cluster_of(const ek_kt_codebook *cb, const float *v) {
    int u = 0;
    if (cb->g == 8) {
        for (int k = 0; k < 8; ++k)
            if (v[k] > cb->mid[k]) u |= 1 << k;
    } else {
        int s = 1;
        for (int k = 0; k < 4; ++k) {
            u += s * kt_bin5(v[k]);
            s *= 5;
        }
    }
    return u;
}

static inline float kt_dist2(const float *a, const float *b, int g) {
    float d2 = 0;
    for (int k = 0; k < g; ++k) {
        const float d = a[k] - b[k];
        d2 += d * d;
    }
    return d2;
}

static void kt_free(ek_kt_codebook *cb) {
    free(cb->values);
    free(cb->cl_off);
    free(cb->cl_idx);
    free(cb->cl_valt);
    memset(cb, 0, sizeof(*cb));
}

/* Build one codebook. Returns 0 on success. */
static int kt_build(ek_kt_codebook *cb, int bits, int g, int is_abs, uint32_t offset, int ncluster, int nnb) {
    memset(cb, 0, sizeof(*cb));
    const int nval = 1 << bits;
    cb->g = g;
    cb->nval = nval;
    cb->ncluster = ncluster;
    cb->is_abs = is_abs;

    float *values = malloc(sizeof(float) * (size_t)nval * g);
    float *centres = calloc((size_t)ncluster * g, sizeof(float));
    float *sump = calloc((size_t)ncluster * g, sizeof(float));
    int *counts = calloc((size_t)ncluster, sizeof(int));
    int *which = malloc(sizeof(int) * (size_t)nval * nnb);
    int *ncl = calloc((size_t)ncluster, sizeof(int));
    unsigned char *member = calloc((size_t)nval, 1);
    int ok = values && centres && sump && counts && which && ncl && member;
    if (!ok) goto done;
    cb->values = values;

    for (int i = 0; i < nval; ++i) ek_kt_gen((uint32_t)i + offset, g, is_abs, 1.0f, values + (size_t)g * i);

    /* 1. Fixed partition and its centres (means of the members; the sums are
     *    sums of small integers, hence exact). */
    if (g == 8) {
        if (is_abs) {
            /* per-dimension median of the integer values 0..126 */
            for (int k = 0; k < 8; ++k) {
                int hist[127] = {0};
                for (int i = 0; i < nval; ++i) hist[(int)values[(size_t)8 * i + k]]++;
                const int want_hi = nval / 2, want_lo = nval / 2 - 1;
                int acc = 0, p_lo = -1, p_hi = -1;
                for (int v = 0; v < 127; ++v) {
                    const int next = acc + hist[v];
                    if (p_lo < 0 && want_lo < next) p_lo = v;
                    if (p_hi < 0 && want_hi < next) p_hi = v;
                    acc = next;
                }
                /* nval is even for every book */
                cb->mid[k] = 0.5f * (float)(p_lo + p_hi);
            }
        } else {
            for (int k = 0; k < 8; ++k) {
                float lo = INFINITY, hi = -INFINITY;
                for (int i = 0; i < nval; ++i) {
                    const float v = values[(size_t)8 * i + k];
                    lo = v < lo ? v : lo;
                    hi = v > hi ? v : hi;
                }
                cb->mid[k] = 0.5f * (lo + hi);
            }
        }
    }
    for (int i = 0; i < nval; ++i) {
        const float *vp = values + (size_t)g * i;
        const int u = kt_cluster_of(cb, vp);
        counts[u]++;
        for (int k = 0; k < g; ++k) sump[(size_t)g * u + k] += vp[k];
    }
    for (int c = 0; c < ncluster; ++c) {
        /* an empty cluster keeps the centre 0 (one IQ4_KT cluster) */
        if (!counts[c]) continue;
        for (int k = 0; k < g; ++k) centres[(size_t)g * c + k] = sump[(size_t)g * c + k] / (float)counts[c];
    }

    /* 2. Every point joins its nnb nearest centres (earlier centre wins ties). */
    {
        float best[32];
        int ibest[32];
        for (int ip = 0; ip < nval; ++ip) {
            const float *vp = values + (size_t)g * ip;
            for (int j = 0; j < nnb; ++j) { best[j] = INFINITY; ibest[j] = -1; }
            for (int ic = 0; ic < ncluster; ++ic) {
                const float d2 = kt_dist2(vp, centres + (size_t)g * ic, g);
                if (!(d2 < best[nnb - 1])) continue;
                int j = nnb - 1;
                while (j > 0 && d2 < best[j - 1]) {
                    best[j] = best[j - 1];
                    ibest[j] = ibest[j - 1];
                    --j;
                }
                best[j] = d2;
                ibest[j] = ic;
            }
            for (int j = 0; j < nnb; ++j) {
                which[(size_t)nnb * ip + j] = ibest[j];
                if (ibest[j] >= 0) ncl[ibest[j]]++;
            }
        }
    }

    /* 3. Pad every non-empty cluster to a multiple of 8 with its nearest
     *    non-members, ordered by (distance, index). */
    int32_t *off = malloc(sizeof(int32_t) * (size_t)(ncluster + 1));
    if (!off) { ok = 0; goto done; }
    cb->cl_off = off;
    off[0] = 0;
    for (int c = 0; c < ncluster; ++c) off[c + 1] = off[c] + ((ncl[c] + 7) / 8) * 8;
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)(off[ncluster] > 0 ? off[ncluster] : 1));
    if (!idx) { ok = 0; goto done; }
    cb->cl_idx = idx;
    {
        int *fill = counts; /* reuse as fill pointer */
        for (int c = 0; c < ncluster; ++c) fill[c] = 0;
        for (int ip = 0; ip < nval; ++ip)
            for (int j = 0; j < nnb; ++j) {
                const int c = which[(size_t)nnb * ip + j];
                if (c >= 0) idx[off[c] + fill[c]++] = ip;
            }
        for (int c = 0; c < ncluster; ++c) {
            const int n = ncl[c];
            const int nadd = (off[c + 1] - off[c]) - n;
            if (nadd <= 0) continue;
            for (int t = 0; t < n; ++t) member[idx[off[c] + t]] = 1;
            const float *vc = centres + (size_t)g * c;
            float bd[8];
            int bi[8];
            int have = 0;
            for (int ip = 0; ip < nval; ++ip) {
                if (member[ip]) continue;
                const float d2 = kt_dist2(values + (size_t)g * ip, vc, g);
                if (have == nadd && !(d2 < bd[nadd - 1])) continue;
                int j = have < nadd ? have++ : nadd - 1;
                while (j > 0 && d2 < bd[j - 1]) {
                    bd[j] = bd[j - 1];
                    bi[j] = bi[j - 1];
                    --j;
                }
                bd[j] = d2;
                bi[j] = ip;
            }
            for (int t = 0; t < n; ++t) member[idx[off[c] + t]] = 0;
            for (int t = 0; t < have; ++t) idx[off[c] + n + t] = bi[t];
            /* (nval is far larger than any cluster, so have == nadd) */
        }
    }

    /* 4. Member values, batch by batch, lane-major in the reference's lane order. */
    {
        const size_t total = (size_t)off[ncluster];
        float *vt = malloc(sizeof(float) * (total > 0 ? total : 1) * g);
        if (!vt) { ok = 0; goto done; }
        cb->cl_valt = vt;
        for (size_t j = 0; j < total; j += 8) {
            float *dst = vt + j * g;
            for (int L = 0; L < 8; ++L) {
                const int p = idx[j + (g == 8 ? L : k_lane4[L])];
                for (int k = 0; k < g; ++k) dst[8 * k + L] = values[(size_t)g * p + k];
            }
        }
    }

done:
    free(centres);
    free(sump);
    free(counts);
    free(which);
    free(ncl);
    free(member);
    if (!ok) {
        if (!cb->values) free(values);
        kt_free(cb);
        return -1;
    }
    return 0;
}

static ek_kt_codebook g_books[EK_KT_BOOK_COUNT];
static int g_book_ok[EK_KT_BOOK_COUNT];
static pthread_once_t g_book_once[EK_KT_BOOK_COUNT] = {PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT,
                                                       PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT};

static void kt_init_iq1(void) { g_book_ok[0] = kt_build(&g_books[0], 13, 8, 0, EK_KT_OFFSET, 256, 32) == 0; }
static void kt_init_iq2(void) { g_book_ok[1] = kt_build(&g_books[1], 16, 8, 0, EK_KT_OFFSET, 256, 8) == 0; }
static void kt_init_iq3(void) { g_book_ok[2] = kt_build(&g_books[2], 16, 8, 1, EK_KT_OFFSET, 256, 8) == 0; }
static void kt_init_iq4a(void) { g_book_ok[3] = kt_build(&g_books[3], 15, 4, 0, EK_KT_OFFSET, 625, 6) == 0; }
static void kt_init_iq4b(void) {
    g_book_ok[4] = kt_build(&g_books[4], 15, 4, 0, EK_KT_OFFSET + 32768u, 625, 6) == 0;
}

const ek_kt_codebook *ek_kt_get_codebook(int book) {
    static void (*const init[EK_KT_BOOK_COUNT])(void) = {kt_init_iq1, kt_init_iq2, kt_init_iq3, kt_init_iq4a,
                                                         kt_init_iq4b};
    if (book < 0 || book >= EK_KT_BOOK_COUNT) return NULL;
    pthread_once(&g_book_once[book], init[book]);
    return g_book_ok[book] ? &g_books[book] : NULL;
}

/* ------------------------------------------------------------------ search */

/* One lane of the reference's running minimum: the index moves only on a strict
 * improvement; the value follows _mm256_min_ps(best, score) (which takes the
 * score whenever the comparison is false, NaN included). */
#define KT_LANE_UPDATE(best, bidx, sc, cand)          \
    do {                                              \
        if ((sc) < (best)) (bidx) = (cand);           \
        (best) = (best) < (sc) ? (best) : (sc);       \
    } while (0)

/* Lowest-scoring lane, lowest lane on ties; -1 when every lane is NaN/inf-only. */
static inline int kt_pick_lane(const float *best, const int *bidx) {
    float b = INFINITY;
    int j = -1;
    for (int L = 0; L < 8; ++L)
        if (best[L] < b) { b = best[L]; j = bidx[L]; }
    return j;
}

#if defined(__SSE2__)
#include <emmintrin.h>

/* x86-64 baseline SIMD: exactly the reference's IEEE single-precision
 * operations, four lanes at a time (two registers = the reference's 8 lanes). */

static inline void kt_lane_update_sse(__m128 sc, __m128i cand, __m128 *best, __m128i *bidx) {
    const __m128 m = _mm_cmplt_ps(sc, *best);
    *bidx = _mm_or_si128(_mm_and_si128(_mm_castps_si128(m), cand), _mm_andnot_si128(_mm_castps_si128(m), *bidx));
    *best = _mm_min_ps(*best, sc); /* best < sc ? best : sc, as _mm256_min_ps */
}

static int kt_finish(__m128 blo, __m128 bhi, __m128i ilo, __m128i ihi) {
    float best[8];
    int bidx[8];
    _mm_storeu_ps(best, blo);
    _mm_storeu_ps(best + 4, bhi);
    _mm_storeu_si128((__m128i *)bidx, ilo);
    _mm_storeu_si128((__m128i *)(bidx + 4), ihi);
    return kt_pick_lane(best, bidx);
}

/* a_k = w_k (q_k - x_k)^2 for 4 lanes */
#define KT_TERM(v, k) _mm_mul_ps(W[k], _mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(v), X[k]), _mm_sub_ps(_mm_loadu_ps(v), X[k])))

/* Score of 4 lanes, g = 8: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)), the tree of
 * the reference's hsum_float_8x8; v points at row 0 of the lanes. */
static inline __m128 kt_score8_sse(const float *v, const __m128 *X, const __m128 *W) {
    const __m128 t04 = _mm_add_ps(KT_TERM(v + 0, 0), KT_TERM(v + 32, 4));
    const __m128 t26 = _mm_add_ps(KT_TERM(v + 16, 2), KT_TERM(v + 48, 6));
    const __m128 t15 = _mm_add_ps(KT_TERM(v + 8, 1), KT_TERM(v + 40, 5));
    const __m128 t37 = _mm_add_ps(KT_TERM(v + 24, 3), KT_TERM(v + 56, 7));
    return _mm_add_ps(_mm_add_ps(t04, t26), _mm_add_ps(t15, t37));
}

/* g = 4: (a0+a2) + (a1+a3), the tree of hsum_float_4x8. */
static inline __m128 kt_score4_sse(const float *v, const __m128 *X, const __m128 *W) {
    const __m128 t02 = _mm_add_ps(KT_TERM(v + 0, 0), KT_TERM(v + 16, 2));
    const __m128 t13 = _mm_add_ps(KT_TERM(v + 8, 1), KT_TERM(v + 24, 3));
    return _mm_add_ps(t02, t13);
}

/* g = 8: lane L of a batch is candidate j + L. */
static int kt_search8(const float *vt, int n, const float *vx, const float *vw) {
    __m128 X[8], W[8];
    for (int k = 0; k < 8; ++k) { X[k] = _mm_set1_ps(vx[k]); W[k] = _mm_set1_ps(vw[k]); }
    __m128 blo = _mm_set1_ps(INFINITY), bhi = blo;
    __m128i ilo = _mm_set1_epi32(-1), ihi = ilo;
    __m128i clo = _mm_setr_epi32(0, 1, 2, 3), chi = _mm_setr_epi32(4, 5, 6, 7);
    const __m128i step = _mm_set1_epi32(8);
    for (int j = 0; j < n; j += 8, vt += 64) {
        kt_lane_update_sse(kt_score8_sse(vt, X, W), clo, &blo, &ilo);
        kt_lane_update_sse(kt_score8_sse(vt + 4, X, W), chi, &bhi, &ihi);
        clo = _mm_add_epi32(clo, step);
        chi = _mm_add_epi32(chi, step);
    }
    return kt_finish(blo, bhi, ilo, ihi);
}

/* g = 4: lane L holds candidate j + k_lane4[L]. */
static int kt_search4(const float *vt, int n, const float *vx, const float *vw) {
    __m128 X[4], W[4];
    for (int k = 0; k < 4; ++k) { X[k] = _mm_set1_ps(vx[k]); W[k] = _mm_set1_ps(vw[k]); }
    __m128 blo = _mm_set1_ps(INFINITY), bhi = blo;
    __m128i ilo = _mm_set1_epi32(-1), ihi = ilo;
    __m128i clo = _mm_setr_epi32(0, 2, 4, 6), chi = _mm_setr_epi32(1, 3, 5, 7);
    const __m128i step = _mm_set1_epi32(8);
    for (int j = 0; j < n; j += 8, vt += 32) {
        kt_lane_update_sse(kt_score4_sse(vt, X, W), clo, &blo, &ilo);
        kt_lane_update_sse(kt_score4_sse(vt + 4, X, W), chi, &bhi, &ihi);
        clo = _mm_add_epi32(clo, step);
        chi = _mm_add_epi32(chi, step);
    }
    return kt_finish(blo, bhi, ilo, ihi);
}
#undef KT_TERM

#else /* portable scalar version of the same arithmetic */

/* Score batches of 8 candidates stored lane-major (vt), g = 8. */
static int kt_search8(const float *vt, int n, const float *vx, const float *vw) {
    float best[8], a[8][8], sc[8];
    int bidx[8];
    for (int L = 0; L < 8; ++L) { best[L] = INFINITY; bidx[L] = -1; }
    for (int j = 0; j < n; j += 8, vt += 64) {
        for (int k = 0; k < 8; ++k)
            for (int L = 0; L < 8; ++L) {
                const float df = vt[8 * k + L] - vx[k];
                a[k][L] = vw[k] * (df * df);
            }
        /* the reference's 8x8 transpose-and-add tree (hsum_float_8x8) */
        for (int L = 0; L < 8; ++L)
            sc[L] = ((a[0][L] + a[4][L]) + (a[2][L] + a[6][L])) + ((a[1][L] + a[5][L]) + (a[3][L] + a[7][L]));
        for (int L = 0; L < 8; ++L) KT_LANE_UPDATE(best[L], bidx[L], sc[L], j + L);
    }
    return kt_pick_lane(best, bidx);
}

/* Same for g = 4 (hsum_float_4x8 tree; lane L holds candidate j + k_lane4[L]). */
static int kt_search4(const float *vt, int n, const float *vx, const float *vw) {
    float best[8], a[4][8], sc[8];
    int bidx[8];
    for (int L = 0; L < 8; ++L) { best[L] = INFINITY; bidx[L] = -1; }
    for (int j = 0; j < n; j += 8, vt += 32) {
        for (int k = 0; k < 4; ++k)
            for (int L = 0; L < 8; ++L) {
                const float df = vt[8 * k + L] - vx[k];
                a[k][L] = vw[k] * (df * df);
            }
        for (int L = 0; L < 8; ++L) sc[L] = (a[0][L] + a[2][L]) + (a[1][L] + a[3][L]);
        for (int L = 0; L < 8; ++L) KT_LANE_UPDATE(best[L], bidx[L], sc[L], j + k_lane4[L]);
    }
    return kt_pick_lane(best, bidx);
}

#endif

/* Whole-codebook search (the reference's path for an empty cluster, point-major
 * storage; consecutive points form the batches). */
static int kt_search_all(const ek_kt_codebook *cb, const float *vx, const float *vw) {
    const int g = cb->g;
    float best[8];
    int bidx[8];
    for (int L = 0; L < 8; ++L) { best[L] = INFINITY; bidx[L] = -1; }
    for (int j = 0; j + 8 <= cb->nval; j += 8) {
        for (int L = 0; L < 8; ++L) {
            const int c = j + (g == 8 ? L : k_lane4[L]);
            const float *q = cb->values + (size_t)g * c;
            float a[8];
            for (int k = 0; k < g; ++k) {
                const float df = q[k] - vx[k];
                a[k] = vw[k] * (df * df);
            }
            const float sc = g == 8 ? ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
                                    : (a[0] + a[2]) + (a[1] + a[3]);
            KT_LANE_UPDATE(best[L], bidx[L], sc, c);
        }
    }
    return kt_pick_lane(best, bidx);
}

void ek_kt_find_best_match(const ek_kt_codebook *cb, float d, const float *xb, const float *weight, int *best_idx) {
    const int g = cb->g, ng = 32 / g;
    if (d == 0) {
        for (int l = 0; l < ng; ++l) best_idx[l] = 0;
        return;
    }
    const float id = 1 / d;
    for (int l = 0; l < ng; ++l) {
        float vx[8], vw[8];
        for (int k = 0; k < g; ++k) {
            vx[k] = id * xb[g * l + k];
            vw[k] = weight[g * l + k];
        }
        const int c = kt_cluster_of(cb, vx);
        const int o = cb->cl_off[c], n = cb->cl_off[c + 1] - o;
        int j;
        if (n > 0) {
            j = g == 8 ? kt_search8(cb->cl_valt + (size_t)o * 8, n, vx, vw)
                       : kt_search4(cb->cl_valt + (size_t)o * 4, n, vx, vw);
            j = j >= 0 ? cb->cl_idx[o + j] : -1;
        } else {
            /* never happens with the reference's books after padding; the reference
             * searches the whole book here for g = 8 (and would abort for g = 4) */
            j = kt_search_all(cb, vx, vw);
        }
        /* all scores NaN (non-finite inputs): the reference would abort */
        best_idx[l] = j >= 0 ? j : 0;
    }
}

void ek_kt_find_best_scale(const ek_kt_codebook *cb, const float *xb, const float *weight, const int *best_idx,
                           float *d, float *score) {
    const int g = cb->g;
    float vqx[8] = {0}, vq2[8] = {0};
    for (int l = 0; l < 32; l += 8)
        for (int L = 0; L < 8; ++L) {
            const int e = l + L;
            const float q = cb->values[(size_t)g * best_idx[e / g] + e % g];
            const float qw = q * weight[e];
            vqx[L] = fmaf(qw, xb[e], vqx[L]);
            vq2[L] = fmaf(qw, q, vq2[L]);
        }
    /* hsum_float_8: (lo + hi), then pairs two apart, then the last two */
    const float sqx = ((vqx[0] + vqx[4]) + (vqx[2] + vqx[6])) + ((vqx[1] + vqx[5]) + (vqx[3] + vqx[7]));
    const float sq2 = ((vq2[0] + vq2[4]) + (vq2[2] + vq2[6])) + ((vq2[1] + vq2[5]) + (vq2[3] + vq2[7]));
    if (sq2 > 0) {
        *d = sqx / sq2;
        *score = sqx * sqx / sq2;
    } else {
        *d = 0;
        *score = 0;
    }
}
