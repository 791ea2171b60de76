/* Shared pieces of the row-scaled IQK kernels (see iqks_common.h).
 *
 * The formats were created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * nearest-value searches (best_index_iq*nl) and the block scale searches of its
 * row-scaled quantizers (ggml/src/iqk/iqk_quantize.cpp).
 */
#include "iqks_common.h"

/* Total order of floats as integers (-0 and +0 both map to 0). */
static inline int64_t iqks_key(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? -(int64_t)(u & 0x7fffffffu) : (int64_t)u;
}
static inline float iqks_unkey(int64_t k) {
    uint32_t u = k < 0 ? (uint32_t)(-k) | 0x80000000u : (uint32_t)k;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The nearest-value searches (best_index_iq*nl) are monotone in t (the table
 * procedure equals the plain float32 rule, which is monotone, except for one
 * input where it answers the lower index, which keeps it monotone). So for
 * each i there is a smallest float th[i] with NI(t) > i for all t >= th[i] and
 * NI(t) <= i below it; it lies in (V[i], V[i+1]]. It is found with the
 * reference procedure itself: it sits at or within a few ulps of the
 * midpoint, so a short walk from there finds it (bisection over the float
 * order is the fallback, should the walk ever get long). */
void ek_iqks_ni_thresholds(int bits, const float *V, float *th) {
    const int n = 1 << bits;
    for (int i = 0; i + 1 < n; ++i) {
        int64_t k = iqks_key(0.5f * (V[i] + V[i + 1])); /* exact: integer table values */
        int steps = 0;
        if (ek_iqk_ni(bits, V, iqks_unkey(k)) > i) {
            while (steps < 64 && ek_iqk_ni(bits, V, iqks_unkey(k - 1)) > i) --k, ++steps;
        } else {
            while (steps < 64 && ek_iqk_ni(bits, V, iqks_unkey(k)) <= i) ++k, ++steps;
        }
        if (steps == 64) {
            int64_t lo = iqks_key(V[i]), hi = iqks_key(V[i + 1]); /* NI(lo) <= i < NI(hi) */
            while (hi - lo > 1) {
                const int64_t mid = lo + (hi - lo) / 2;
                if (ek_iqk_ni(bits, V, iqks_unkey(mid)) > i) hi = mid;
                else lo = mid;
            }
            k = hi;
        }
        th[i] = iqks_unkey(k);
    }
}

/* ---- block fit BF for 32-blocks (quantize_row_iq3_ks_impl, quantize_row_iq4_k_impl_bs128,
 *      quantize_row_iq5_ks_impl), candidates side by side ----
 *
 * BF evaluates 1 + 2(2*ntry + 1) candidate inverse scales (the initial one,
 * then t = -ntry..ntry for the base and the shifted half). Their sums are
 * independent of each other; only the acceptance (ACC) is sequential. On CPUs
 * with AVX2 the sums of eight candidates are computed at once, one candidate
 * per vector lane, each lane performing exactly the scalar operations of the
 * spec in the same order (GNU C vectors, no contraction); the acceptance then
 * runs in the spec's order. NI is evaluated by counting thresholds (see
 * ek_iqks_ni_thresholds; BF keeps |t| <= 135, far from the 2^31 corner), and
 * the table value is fetched with a lane permutation. Elsewhere the shared
 * scalar BF of iqk_common.c is used; both give the same bits. */

#define IQKS_CAND_MAX 32 /* ntry <= 7 */

void ek_iqks_bf_init(ek_iqks_bf *bf, int bits, int ntry, int guard) {
    const int n = 1 << bits;
    bf->bits = bits;
    bf->ntry = ntry;
    bf->guard = guard;
    bf->T0 = bits == 3 ? ek_iqk_v3f : bits == 4 ? ek_iqk_v4f : ek_iqk_v5f;
    bf->T1 = bf->T0 + n;
    bf->ncand = 1 + 2 * (2 * ntry + 1);
    bf->nvec = (bf->ncand + 7) / 8;
    bf->use_vec = 0;
#if EK_IQKS_HAVE_X86
    bf->use_vec = __builtin_cpu_supports("avx2");
#endif
    float th[2][31];
    ek_iqks_ni_thresholds(bits, bf->T0, th[0]);
    ek_iqks_ni_thresholds(bits, bf->T1, th[1]);
    /* candidate c: 0 = initial (base half), c >= 1: t = -ntry + (c-1)/2, half (c-1)%2 */
    for (int c = 0; c < 8 * bf->nvec; ++c) {
        const int v = c / 8, l = c % 8;
        const int used = c < bf->ncand;
        const int h = c == 0 || !used ? 0 : (c - 1) & 1;
        const int t = c == 0 || !used ? 0 : -ntry + (c - 1) / 2;
        for (int i = 0; i + 1 < n; ++i) bf->lth[v][i][l] = th[h][i];
        bf->lsh[v][l] = h ? bf->T1[0] - bf->T0[0] : 0.f;
        /* numerator of id = (step*t + T[0]) / m; unused lanes get 0 (id = 0) */
        bf->lnum[v][l] = used && c ? (float)t + (h ? bf->T1 : bf->T0)[0] : 0.f;
    }
    for (int k = 0; k < 32; ++k) bf->ltab[k] = k < n ? bf->T0[k] : 0.f;
}

#if EK_IQKS_HAVE_X86
/* The 8-lane helpers below are static and always inlined into the AVX2
 * function, so GCC's note about the vector ABI does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float iqks_v8f __attribute__((vector_size(32)));
typedef int32_t iqks_v8i __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) iqks_v8f iqks_ld8(const float *p) {
    iqks_v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The sums S+, Q+, S-, Q- of every candidate (EVAL of the block fit), bits fixed. */
static inline __attribute__((always_inline)) void
iqks_bf_sums(const ek_iqks_bf *bf, int bits, const float *x, const float *w, float m, float id0, float *out) {
    const int nt = (1 << bits) - 1;
    const iqks_v8f T0 = iqks_ld8(bf->ltab), T1 = iqks_ld8(bf->ltab + 8);
    const iqks_v8f T2 = iqks_ld8(bf->ltab + 16), T3 = iqks_ld8(bf->ltab + 24);
    const iqks_v8f M = {m, m, m, m, m, m, m, m};
    for (int v = 0; v < bf->nvec; ++v) {
        iqks_v8f ID = iqks_ld8(bf->lnum[v]) / M;
        if (v == 0) ID[0] = id0;
        const iqks_v8f SH = iqks_ld8(bf->lsh[v]);
        iqks_v8f sp = {0, 0, 0, 0, 0, 0, 0, 0}, qp = sp, sm = sp, qm = sp;
        for (int j = 0; j < 32; ++j) {
            const float xj = x[j], wj = w[j];
            const iqks_v8f X = {xj, xj, xj, xj, xj, xj, xj, xj};
            const iqks_v8f W = {wj, wj, wj, wj, wj, wj, wj, wj};
            const iqks_v8f A = ID * X, B = -A;
            iqks_v8i cp = {0, 0, 0, 0, 0, 0, 0, 0}, cm = cp;
            for (int i = 0; i < nt; ++i) {
                const iqks_v8f th = iqks_ld8(bf->lth[v][i]);
                cp -= A >= th;
                cm -= B >= th;
            }
            iqks_v8f a, b;
            if (bits == 3) {
                a = __builtin_shuffle(T0, cp);
                b = __builtin_shuffle(T0, cm);
            } else if (bits == 4) {
                a = __builtin_shuffle(T0, T1, cp);
                b = __builtin_shuffle(T0, T1, cm);
            } else {
                const iqks_v8i hp = (cp & 16) != 0, hm = (cm & 16) != 0;
                const iqks_v8f alo = __builtin_shuffle(T0, T1, cp), ahi = __builtin_shuffle(T2, T3, cp);
                const iqks_v8f blo = __builtin_shuffle(T0, T1, cm), bhi = __builtin_shuffle(T2, T3, cm);
                a = (iqks_v8f)((hp & (iqks_v8i)ahi) | (~hp & (iqks_v8i)alo));
                b = (iqks_v8f)((hm & (iqks_v8i)bhi) | (~hm & (iqks_v8i)blo));
            }
            a = a + SH; /* shifted half = base + constant, exactly */
            b = b + SH;
            const iqks_v8f wa = W * a, wb = W * b;
            sp = sp + wa * X;
            qp = qp + wa * a;
            sm = sm + wb * X;
            qm = qm + wb * b;
        }
        memcpy(out + 0 * IQKS_CAND_MAX + 8 * v, &sp, sizeof sp);
        memcpy(out + 1 * IQKS_CAND_MAX + 8 * v, &qp, sizeof qp);
        memcpy(out + 2 * IQKS_CAND_MAX + 8 * v, &sm, sizeof sm);
        memcpy(out + 3 * IQKS_CAND_MAX + 8 * v, &qm, sizeof qm);
    }
}

static __attribute__((target("avx2"))) void
iqks_bf_sums_avx2(const ek_iqks_bf *bf, const float *x, const float *w, float m, float id0, float *out) {
    switch (bf->bits) {
    case 3: iqks_bf_sums(bf, 3, x, w, m, id0, out); break;
    case 4: iqks_bf_sums(bf, 4, x, w, m, id0, out); break;
    default: iqks_bf_sums(bf, 5, x, w, m, id0, out); break;
    }
}
#endif

int ek_iqks_bf_fit(const ek_iqks_bf *bf, const float *x, const float *w, float *dout, int *shout) {
#if EK_IQKS_HAVE_X86
    if (bf->use_vec) {
        float m;
        if (ek_iqk_amax(x, 32, &m) < 1e-16f) {
            *dout = 0;
            *shout = 0;
            return EK_IQK_BF_EMPTY;
        }
        float d = -m / bf->T0[0];
        float sums[4 * IQKS_CAND_MAX];
        iqks_bf_sums_avx2(bf, x, w, m, 1 / d, sums);
        const float *SP = sums, *QP = sums + IQKS_CAND_MAX, *SM = sums + 2 * IQKS_CAND_MAX,
                    *QM = sums + 3 * IQKS_CAND_MAX;
        float best = 0;
        if (!bf->guard || QP[0] > 0) {
            d = SP[0] / QP[0];
            best = d * SP[0];
        }
        if (QM[0] > 0 && SM[0] * SM[0] > best * QM[0]) {
            d = SM[0] / QM[0];
            best = d * SM[0];
        }
        int shift = 0;
        for (int c = 1; c < bf->ncand; ++c) {
            const int h = (c - 1) & 1;
            if (QP[c] > 0 && SP[c] * SP[c] > best * QP[c]) { d = SP[c] / QP[c]; best = d * SP[c]; shift = h; }
            if (QM[c] > 0 && SM[c] * SM[c] > best * QM[c]) { d = SM[c] / QM[c]; best = d * SM[c]; shift = h; }
        }
        *dout = d;
        *shout = shift;
        return d == 0 ? EK_IQK_BF_ZERO : EK_IQK_BF_OK;
    }
#endif
    return ek_iqk_block_fit(bf->bits, bf->T0, bf->T1, x, w, 32, bf->ntry, 1, bf->guard, 0, dout, shout);
}

float ek_iqks_first_pass(const float *x, const float *qw, int64_t n, float sigma_scale, int wkind,
                         uint8_t *blocks, int block_bytes, ek_iqks_fit_fn fit, const void *ctx, float *scales) {
    float qbuf[QK_K], w[32];
    float amax = 0, m = 0;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *blk = blocks + block_bytes * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = ek_iqk_sumsq(xbl, QK_K) * sigma_scale;
        for (int ib = 0; ib < 8; ++ib) {
            const float *xb = xbl + 32 * ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, wkind, w);
            const float d = fit(ctx, xb, w, blk, ib);
            scales[8 * ibl + ib] = d;
            const float ad = fabsf(d);
            if (ad > amax) { amax = ad; m = d; }
        }
    }
    return m;
}

/* IQ4_KS / IQ5_KS block fit: BF without guard; the shift goes to bit 0 of scale byte ib. */
static float iqks_fit_bf_shift_bit0(const void *ctx, const float *xb, const float *w, uint8_t *blk, int ib) {
    float d;
    int shift;
    if (ek_iqks_bf_fit((const ek_iqks_bf *)ctx, xb, w, &d, &shift) == EK_IQK_BF_EMPTY) return 0;
    if (shift) blk[ib] |= 1;
    return d;
}

/* Pass 1 of IQ4_KS / IQ5_KS: BF of every 32-block with the V<bits> tables, no guard; returns
 * max |scale|. */
static float iqks_fit_block_scales(const float *x, const float *qw, int64_t n, uint8_t *blocks, int block_bytes,
                                   int bits, int ntry, float *scales) {
    ek_iqks_bf bf;
    ek_iqks_bf_init(&bf, bits, ntry, 0);
    return fabsf(ek_iqks_first_pass(x, qw, n, 2.f / QK_K, EK_IQK_W_SQUARE, blocks, block_bytes,
                                    iqks_fit_bf_shift_bit0, &bf, scales));
}

int ek_iqks_quantize_odd7_row(const float *x, uint8_t *y, int64_t n, const float *qw, int block_bytes, int bits,
                              int ntry, ek_iqks_encode_fn encode) {
    const int64_t nbl = n / QK_K;
    memset(y, 0, 4 + (size_t)nbl * block_bytes); /* header 0.0f */
    uint8_t *blocks = y + 4;

    float stack_s[EK_IQKS_STACK_BLOCKS];
    float *scales = ek_iqks_scratch(stack_s, sizeof stack_s, sizeof(float) * (size_t)(n / 32));
    if (!scales) return EK_ERR_NO_MEMORY; /* the row stays all zero */

    /* pass 1: block scales and shift bits (no guard) */
    const float amax_s = iqks_fit_block_scales(x, qw, n, blocks, block_bytes, bits, ntry, scales);
    float qbuf[QK_K], w[32];
    const float D = amax_s / 127;
    ek_wrf32(y, D);
    if (D == 0) goto done;

    /* pass 2: odd 7-bit block scales relative to D, then the type's indices */
    const float iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *blk = blocks + block_bytes * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = ek_iqk_sumsq(xbl, QK_K) * (2.f / QK_K);
        for (int ib = 0; ib < 8; ++ib) {
            const float s = scales[8 * ibl + ib];
            const int l = ek_iqks_clampi(ek_nearest_int(0.5f * (iD * s + 127.f)), 0, 127);
            blk[ib] |= (uint8_t)(2 * l);
            const int ls = 2 * l - 127; /* odd, never 0 */
            const float dl = D * (float)ls;
            const float *xb = xbl + 32 * ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, EK_IQK_W_SQUARE, w);
            encode(xb, w, ls, 1 / dl, blk[ib] & 1, blk, ib, &sumqx, &sumq2);
        }
    }
    if (sumq2 > 0) ek_wrf32(y, sumqx / sumq2);
done:
    ek_iqks_scratch_free(scales, stack_s);
    return EK_OK;
}
