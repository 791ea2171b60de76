/* IQ2_KS (ggml type 145): 2-bit non-linear quants with one fp16 scale per row,
 * 5-bit block scales and shift bits per 32 weights, 70 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq2_ks_fast_impl, quantize_row_iq2_ks_impl and
 * dequantize_row_iq2_ks (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Row: d_row (fp16) | blocks. Block: extra (u16: bits 0..7 shift flags, bits
 * 8..15 high bit of the scale code) | scales[4] (low nibbles, byte b/2) |
 * qs[64] (IQ2_K placement).
 *
 * Two quantizers exist in the reference: the AVX2 "fast" path that
 * llama-quantize uses by default on x86 (and that the golden data hold), and
 * the portable "slow" path (EK_QFLAG_IQ2KS_SLOW). The fast path accumulates in
 * eight lanes with fused multiply-adds; we reproduce that with fmaf (a
 * correctly rounded fused operation on every machine), so the bytes never
 * depend on the host. It exists twice here: a plain portable form, and an
 * 8-lane vector form for x86-64 CPUs with AVX2 and FMA (picked at run time),
 * which performs the same operations in the same order.
 */
#include "iqks_common.h"

#define IQ2KS_BYTES 70

static inline void iq2ks_put_index(uint8_t *blk, int e, int k) {
    blk[6 + ek_iqks_qs2_byte(e)] |= (uint8_t)(k << ek_iqks_qs2_shift(e));
}

static inline void iq2ks_put_code(uint8_t *blk, int ib, int code) {
    blk[2 + ib / 2] |= (uint8_t)((code & 0xf) << 4 * (ib % 2));
    blk[1] |= (uint8_t)((code >> 4) << ib); /* extra bit 8 + ib */
}

/* ------------------------------------- slow path (quantize_row_iq2_ks_impl) */

static void iq2ks_quantize_slow(const float *x, uint8_t *y, int64_t n, const float *qw, float *s, float *c,
                                int8_t *L) {
    const int64_t nbl = n / QK_K;
    const int G = (int)(n / 32);
    uint8_t *blocks = y + 2;
    float qbuf[QK_K], w[32];
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = 1.5f * ek_iqk_sumsq(xbl, QK_K) / QK_K;
        uint8_t shifts = 0;
        for (int ib = 0; ib < 8; ++ib) {
            const float *xb = xbl + 32 * ib;
            const int64_t g = 8 * ibl + ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
            float sw = 0;
            for (int j = 0; j < 32; ++j) sw += w[j];
            c[g] = sw;
            float m;
            if (ek_iqk_amax(xb, 32, &m) < 1e-16f) { s[g] = 0; continue; }
            int shift;
            s[g] = ek_iqk_iq2_partition(xb, w, 32, 24, 8, ek_iqk_v2f, &shift);
            if (shift) shifts |= (uint8_t)(1u << ib);
        }
        blocks[IQ2KS_BYTES * ibl] = shifts;
    }
    const float D = ek_iqk_scale_of_scales(G, 16, s, c, L);
    if (D == 0) return; /* header stays fp16(0) */

    float sumqx = 0, sumq2 = 0;
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *blk = blocks + IQ2KS_BYTES * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = 1.5f * ek_iqk_sumsq(xbl, QK_K) / QK_K;
        for (int ib = 0; ib < 8; ++ib) {
            const int code = L[8 * ibl + ib];
            iq2ks_put_code(blk, ib, code);
            const int ls = code - 16;
            const float dl = D * (float)ls;
            if (dl == 0) continue; /* indices stay 0 */
            const int half = (blk[0] >> ib) & 1;
            const float *V = ek_iqk_v2f + 4 * half;
            const int8_t *Vi = ek_iqk_v2 + 4 * half;
            const float *xb = xbl + 32 * ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
            const float idl = 1 / dl;
            for (int j = 0; j < 32; ++j) {
                const int k = ek_iqk_ni2(V, idl * xb[j]);
                iq2ks_put_index(blk, 32 * ib + j, k);
                const float qv = (float)(Vi[k] * ls);
                const float wq = w[j] * qv;
                sumqx += wq * xb[j];
                sumq2 += wq * qv;
            }
        }
    }
    ek_wr16(y, ek_fp32_to_fp16(1.030f * (sumq2 > 0 ? sumqx / sumq2 : D)));
}

/* -------------------------------- fast path (quantize_row_iq2_ks_fast_impl) */

/* The reference's fast path accumulates in eight AVX2 lanes: element j of a
 * 32-block goes to lane j % 8, lanes accumulate with fused multiply-adds, and
 * an 8-lane sum is reduced as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)). */
static inline float iq2ks_hsum8(const float *a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* Portable form of the reference's AVX2 compute_1block_iq2ks, lane by lane (used on
 * every CPU and compiler without the AVX2 form below): fmaf is a correctly rounded
 * fused operation everywhere, so the bytes do not depend on the machine. */

/* Index of the table value nearest to x at scale delta: p[k] = fl(delta*T[k]),
 * rounded squares of x - p[k] ("plus") or x + p[k] ("minus"), strict '<' so
 * the lowest index wins ties. */
static inline int iq2ks_nearest(float xj, const float *p, int minus) {
    float e = minus ? xj + p[0] : xj - p[0];
    float best = e * e;
    int k = 0;
    for (int i = 1; i < 4; ++i) {
        e = minus ? xj + p[i] : xj - p[i];
        const float e2 = e * e;
        if (e2 < best) { best = e2; k = i; }
    }
    return k;
}

/* CAND(delta, T): returns 1 and the refitted scale and its score when either
 * assignment has SQ > 0. */
static int iq2ks_cand_scalar(const float *xb, const float *w, float delta, const float *T, float *dout,
                             float *score) {
    const float p[4] = {delta * T[0], delta * T[1], delta * T[2], delta * T[3]};
    float sxp[8] = {0}, sqp[8] = {0}, sxm[8] = {0}, sqm[8] = {0};
    for (int j = 0; j < 32; ++j) {
        const int l = j % 8;
        const float qp = T[iq2ks_nearest(xb[j], p, 0)], qm = T[iq2ks_nearest(xb[j], p, 1)];
        const float wqp = w[j] * qp, wqm = w[j] * qm;
        sxp[l] = fmaf(wqp, xb[j], sxp[l]);
        sqp[l] = fmaf(wqp, qp, sqp[l]);
        sxm[l] = fmaf(wqm, xb[j], sxm[l]);
        sqm[l] = fmaf(wqm, qm, sqm[l]);
    }
    const float SXp = iq2ks_hsum8(sxp), SQp = iq2ks_hsum8(sqp), SXm = iq2ks_hsum8(sxm), SQm = iq2ks_hsum8(sqm);
    int have = 0;
    float d = 0, sc = 0;
    if (SQp > 0) { d = SXp / SQp; sc = SXp * d; have = 1; }
    if (SQm > 0 && (!have || SXm * SXm > sc * SQm)) { d = SXm / SQm; sc = SXm * d; have = 1; }
    *dout = d;
    *score = sc;
    return have;
}

/* ERR(delta): nearest indices and the weighted squared error with the fused
 * residual fma(-delta, T[k], x). */
static float iq2ks_err_scalar(const float *xb, const float *w, float delta, const float *T, uint8_t *idx) {
    const float p[4] = {delta * T[0], delta * T[1], delta * T[2], delta * T[3]};
    float e[8] = {0};
    for (int j = 0; j < 32; ++j) {
        const int k = iq2ks_nearest(xb[j], p, 0);
        idx[j] = (uint8_t)k;
        const float r = fmaf(-delta, T[k], xb[j]);
        e[j % 8] = fmaf(w[j] * r, r, e[j % 8]);
    }
    return iq2ks_hsum8(e);
}

/* Step 1 for one non-empty 32-block: the scale search. */
static float iq2ks_search_scalar(const float *xb, const float *w, float m, int *shift) {
    const float *T0 = ek_iqk_v2f, *T1 = ek_iqk_v2f + 4;
    float d = m / 22, best = 0, dc, sc;
    if (iq2ks_cand_scalar(xb, w, d, T0, &dc, &sc)) { best = sc; d = dc; }
    for (int t = -13; t <= 13; ++t)
        if (iq2ks_cand_scalar(xb, w, m / (-31.f + 0.5f * (float)t), T0, &dc, &sc) && sc > best) { best = sc; d = dc; }
    int sh = 0;
    for (int t = -13; t <= 13; ++t)
        if (iq2ks_cand_scalar(xb, w, m / (-26.f + 0.5f * (float)t), T1, &dc, &sc) && sc > best) {
            best = sc; d = dc; sh = 1;
        }
    *shift = sh;
    return d;
}

/* Step 3 for one block: move the code by one step if that lowers the error,
 * return the indices and feed the row-wide lane accumulators. Returns the code. */
static int iq2ks_final_scalar(const float *xb, const float *w, const float *T, float D, int L, float s,
                              uint8_t *idx, float *ax, float *aq) {
    uint8_t idx2[32];
    const float dl = D * (float)(L - 16);
    const float e1 = iq2ks_err_scalar(xb, w, dl, T, idx);
    if (L > 0 && dl > s) {
        if (iq2ks_err_scalar(xb, w, D * (float)(L - 17), T, idx2) < e1) { --L; memcpy(idx, idx2, 32); }
    } else if (L < 15 && dl < s) { /* 15, not 31: the reference's limit */
        if (iq2ks_err_scalar(xb, w, D * (float)(L - 15), T, idx2) < e1) { ++L; memcpy(idx, idx2, 32); }
    }
    const float ls = (float)(L - 16);
    for (int j = 0; j < 32; ++j) {
        const float v = ls * T[idx[j]];
        const float wv = w[j] * v;
        ax[j % 8] = fmaf(wv, xb[j], ax[j % 8]);
        aq[j % 8] = fmaf(wv, v, aq[j % 8]);
    }
    return L;
}

/* AVX2 form (GCC on x86-64, chosen at run time when the CPU has AVX2 and FMA;
 * define EK_IQ2KS_PORTABLE_ONLY to leave it out). The eight lanes map onto
 * GNU C vectors of eight floats (element j in lane j % 8 of row j / 8); every
 * lane performs the IEEE operations of the portable form in the same order
 * (no contraction: -ffp-contract=off), and the fused multiply-adds are fmaf
 * lane by lane, which GCC emits as one vector FMA in this target. Hence both
 * forms write the same bytes. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(EK_IQ2KS_PORTABLE_ONLY)
#define IQ2KS_HAVE_AVX2 1
/* All 8-lane helpers are static and inlined into the AVX2 functions, so GCC's
 * note about the vector calling convention does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float iq2ks_v8f __attribute__((vector_size(32)));
typedef int32_t iq2ks_v8i __attribute__((vector_size(32)));
typedef float iq2ks_v4f __attribute__((vector_size(16)));
typedef int32_t iq2ks_v4i __attribute__((vector_size(16)));

#define EK_FMA8(a, b, c)                                                            \
    ({                                                                              \
        iq2ks_v8f r_, a_ = (a), b_ = (b), c_ = (c);                                 \
        for (int l_ = 0; l_ < 8; ++l_) r_[l_] = fmaf(a_[l_], b_[l_], c_[l_]);       \
        r_;                                                                         \
    })
#define EK_SPLAT8(v) ((iq2ks_v8f){(v), (v), (v), (v), (v), (v), (v), (v)})
/* lanes of m (all ones / all zeros) pick a, the others b */
#define EK_SEL8(m, a, b) ((iq2ks_v8f)(((m) & (iq2ks_v8i)(a)) | (~(m) & (iq2ks_v8i)(b))))

static inline __attribute__((always_inline)) iq2ks_v8f iq2ks_load8(const float *p) {
    iq2ks_v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* iq2ks_hsum8 of four accumulators at once (lane i of the result reduces the
 * i-th argument); every lane performs the same scalar additions. */
static inline __attribute__((always_inline)) iq2ks_v4f
iq2ks_hsum8x4(const iq2ks_v8f *pa, const iq2ks_v8f *pb, const iq2ks_v8f *pc, const iq2ks_v8f *pd) {
    iq2ks_v4f h[4][2];
    memcpy(h[0], pa, 32);
    memcpy(h[1], pb, 32);
    memcpy(h[2], pc, 32);
    memcpy(h[3], pd, 32);
    /* u = (l0+l4, l1+l5, l2+l6, l3+l7) */
    const iq2ks_v4f ua = h[0][0] + h[0][1], ub = h[1][0] + h[1][1];
    const iq2ks_v4f uc = h[2][0] + h[2][1], ud = h[3][0] + h[3][1];
    /* (u0+u2, u1+u3) of two accumulators side by side */
    const iq2ks_v4f sab = __builtin_shuffle(ua, ub, (iq2ks_v4i){0, 1, 4, 5}) +
                          __builtin_shuffle(ua, ub, (iq2ks_v4i){2, 3, 6, 7});
    const iq2ks_v4f scd = __builtin_shuffle(uc, ud, (iq2ks_v4i){0, 1, 4, 5}) +
                          __builtin_shuffle(uc, ud, (iq2ks_v4i){2, 3, 6, 7});
    return __builtin_shuffle(sab, scd, (iq2ks_v4i){0, 2, 4, 6}) + __builtin_shuffle(sab, scd, (iq2ks_v4i){1, 3, 5, 7});
}

/* Splats of T[k] and of fl(delta*T[k]); TP serves IQ2KS_NEAREST_CAND. */
#define IQ2KS_SPLATS(delta, T)                                                                   \
    const iq2ks_v8f T0v = EK_SPLAT8(T[0]), T1v = EK_SPLAT8(T[1]), T2v = EK_SPLAT8(T[2]),         \
                    T3v = EK_SPLAT8(T[3]);                                                       \
    const iq2ks_v8f TP = {T[0], 0, 0, 0, 0, T[3], T[2], T[1]};                                   \
    const float p0_ = (delta) * T[0], p1_ = (delta) * T[1], p2_ = (delta) * T[2],                \
                p3_ = (delta) * T[3];                                                            \
    const iq2ks_v8f P0 = EK_SPLAT8(p0_), P1 = EK_SPLAT8(p1_), P2 = EK_SPLAT8(p2_),               \
                    P3 = EK_SPLAT8(p3_);                                                         \
    (void)T0v; (void)T1v; (void)T2v; (void)T3v; (void)TP

/* iq2ks_nearest for 8 elements, returning T[k] in q and k in K: a running
 * minimum of the rounded squares with strict '<'. OP is '-' ("plus") or '+'. */
#define IQ2KS_NEAREST_EXACT(x, OP, q, K)                        \
    do {                                                        \
        iq2ks_v8f e_ = (x) OP P0, b_ = e_ * e_, e2_;            \
        iq2ks_v8i m_, k_ = {0, 0, 0, 0, 0, 0, 0, 0};            \
        q = T0v;                                                \
        e_ = (x) OP P1; e2_ = e_ * e_; m_ = e2_ < b_;           \
        b_ = EK_SEL8(m_, e2_, b_); q = EK_SEL8(m_, T1v, q);     \
        k_ = (m_ & 1) | (~m_ & k_);                             \
        e_ = (x) OP P2; e2_ = e_ * e_; m_ = e2_ < b_;           \
        b_ = EK_SEL8(m_, e2_, b_); q = EK_SEL8(m_, T2v, q);     \
        k_ = (m_ & 2) | (~m_ & k_);                             \
        e_ = (x) OP P3; e2_ = e_ * e_; m_ = e2_ < b_;           \
        q = EK_SEL8(m_, T3v, q);                                \
        K = (m_ & 3) | (~m_ & k_);                              \
    } while (0)

/* The same value (not the index) in the cheaper form valid inside CAND. There
 * delta = m/c with 19.5 <= |c| <= 37.5 and |x| <= |m|, so |e_k| <= 68.5|delta|
 * while consecutive e_k differ by at least 14|delta| (the smallest gap of
 * V2): two e_k of the same sign have clearly distinct rounded squares, and
 * only the pair straddling zero can compare either way. The comparisons
 * c_k = (s_k < s_{k-1}) therefore read 1..1 [c] 0..0, and their count is
 * exactly the running minimum's index. It is summed as -1 masks (-k mod 8)
 * and selects T[k] from TP = {T0, ., ., ., ., T3, T2, T1} by a lane
 * permutation. The squares are non-negative, so comparing their bit patterns
 * as integers orders them exactly as float comparison does (and keeps the
 * comparisons off the floating-point ports). */
#define IQ2KS_NEAREST_CAND(x, OP, q)                                                            \
    do {                                                                                        \
        iq2ks_v8f e0_ = (x) OP P0, e1_ = (x) OP P1, e2_ = (x) OP P2, e3_ = (x) OP P3;           \
        e0_ = e0_ * e0_; e1_ = e1_ * e1_; e2_ = e2_ * e2_; e3_ = e3_ * e3_;                     \
        const iq2ks_v8i i0_ = (iq2ks_v8i)e0_, i1_ = (iq2ks_v8i)e1_, i2_ = (iq2ks_v8i)e2_,       \
                        i3_ = (iq2ks_v8i)e3_;                                                   \
        q = __builtin_shuffle(TP, (i1_ < i0_) + (i2_ < i1_) + (i3_ < i2_));                     \
    } while (0)

/* c ? a : b for floats, as a bit select (the acceptance is data dependent and
 * would be mispredicted often as a branch) */
static inline float iq2ks_self(int c, float a, float b) {
    uint32_t ua, ub, m = -(uint32_t)(c != 0);
    memcpy(&ua, &a, 4);
    memcpy(&ub, &b, 4);
    ua = (ua & m) | (ub & ~m);
    memcpy(&a, &ua, 4);
    return a;
}

static inline __attribute__((always_inline)) int
iq2ks_cand_v(const float *xb, const float *w, float delta, const float *T, float *dout, float *score) {
    IQ2KS_SPLATS(delta, T);
    iq2ks_v8f sxp = {0, 0, 0, 0, 0, 0, 0, 0}, sqp = sxp, sxm = sxp, sqm = sxp;
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
        const iq2ks_v8f x = iq2ks_load8(xb + 8 * r), wr = iq2ks_load8(w + 8 * r);
        iq2ks_v8f qp, qm;
        IQ2KS_NEAREST_CAND(x, -, qp);
        IQ2KS_NEAREST_CAND(x, +, qm);
        const iq2ks_v8f wqp = wr * qp, wqm = wr * qm;
        sxp = EK_FMA8(wqp, x, sxp);
        sqp = EK_FMA8(wqp, qp, sqp);
        sxm = EK_FMA8(wqm, x, sxm);
        sqm = EK_FMA8(wqm, qm, sqm);
    }
    const iq2ks_v4f sums = iq2ks_hsum8x4(&sxp, &sqp, &sxm, &sqm);
    const float SXp = sums[0], SQp = sums[1], SXm = sums[2], SQm = sums[3];
    int have = 0;
    float d = 0, sc = 0;
    if (SQp > 0) { d = SXp / SQp; sc = SXp * d; have = 1; }
    if (SQm > 0 && (!have || SXm * SXm > sc * SQm)) { d = SXm / SQm; sc = SXm * d; have = 1; }
    *dout = d;
    *score = sc;
    return have;
}

static inline __attribute__((always_inline)) float
iq2ks_err_v(const float *xb, const float *w, float delta, const float *T, iq2ks_v8i *K, iq2ks_v8f *Q) {
    IQ2KS_SPLATS(delta, T);
    const iq2ks_v8f nd = EK_SPLAT8(-delta);
    iq2ks_v8f e = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
        const iq2ks_v8f x = iq2ks_load8(xb + 8 * r), wr = iq2ks_load8(w + 8 * r);
        iq2ks_v8f q;
        IQ2KS_NEAREST_EXACT(x, -, q, K[r]);
        Q[r] = q;
        const iq2ks_v8f res = EK_FMA8(nd, q, x);
        e = EK_FMA8(wr * res, res, e);
    }
    float el[8];
    memcpy(el, &e, sizeof el);
    return iq2ks_hsum8(el);
}

static __attribute__((target("avx2,fma"))) float iq2ks_search_avx2(const float *xb, const float *w, float m,
                                                                   int *shift) {
    const float *T0 = ek_iqk_v2f, *T1 = ek_iqk_v2f + 4;
    float d = m / 22, best = 0, dc, sc;
    if (iq2ks_cand_v(xb, w, d, T0, &dc, &sc)) { best = sc; d = dc; }
    for (int t = -13; t <= 13; ++t) {
        const int acc = iq2ks_cand_v(xb, w, m / (-31.f + 0.5f * (float)t), T0, &dc, &sc) & (sc > best);
        best = iq2ks_self(acc, sc, best);
        d = iq2ks_self(acc, dc, d);
    }
    int sh = 0;
    for (int t = -13; t <= 13; ++t) {
        const int acc = iq2ks_cand_v(xb, w, m / (-26.f + 0.5f * (float)t), T1, &dc, &sc) & (sc > best);
        best = iq2ks_self(acc, sc, best);
        d = iq2ks_self(acc, dc, d);
        sh |= acc;
    }
    *shift = sh;
    return d;
}

static __attribute__((target("avx2,fma"))) int iq2ks_final_avx2(const float *xb, const float *w, const float *T,
                                                                 float D, int L, float s, uint8_t *idx,
                                                                 float *ax, float *aq) {
    iq2ks_v8f Q[4], Q2[4];
    iq2ks_v8i K[4], K2[4];
    const float dl = D * (float)(L - 16);
    const float e1 = iq2ks_err_v(xb, w, dl, T, K, Q);
    int move = 0;
    if (L > 0 && dl > s) {
        if (iq2ks_err_v(xb, w, D * (float)(L - 17), T, K2, Q2) < e1) move = -1;
    } else if (L < 15 && dl < s) { /* 15, not 31: the reference's limit */
        if (iq2ks_err_v(xb, w, D * (float)(L - 15), T, K2, Q2) < e1) move = 1;
    }
    if (move) {
        L += move;
        memcpy(K, K2, sizeof K);
        memcpy(Q, Q2, sizeof Q);
    }
    iq2ks_v8f AX, AQ;
    memcpy(&AX, ax, sizeof AX);
    memcpy(&AQ, aq, sizeof AQ);
    const float ls = (float)(L - 16);
    for (int r = 0; r < 4; ++r) {
        const iq2ks_v8f v = ls * Q[r];
        const iq2ks_v8f x = iq2ks_load8(xb + 8 * r);
        const iq2ks_v8f wv = iq2ks_load8(w + 8 * r) * v;
        AX = EK_FMA8(wv, x, AX);
        AQ = EK_FMA8(wv, v, AQ);
        for (int l = 0; l < 8; ++l) idx[8 * r + l] = (uint8_t)K[r][l];
    }
    memcpy(ax, &AX, sizeof AX);
    memcpy(aq, &AQ, sizeof AQ);
    return L;
}
#endif

static void iq2ks_quantize_fast(const float *x, uint8_t *y, int64_t n, const float *qw, float *s, float *c,
                                int8_t *L, float *wrow) {
    float (*search)(const float *, const float *, float, int *) = iq2ks_search_scalar;
    int (*final)(const float *, const float *, const float *, float, int, float, uint8_t *, float *, float *) =
        iq2ks_final_scalar;
#ifdef IQ2KS_HAVE_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        search = iq2ks_search_avx2;
        final = iq2ks_final_avx2;
    }
#endif
    const int64_t nbl = n / QK_K;
    const int G = (int)(n / 32);
    uint8_t *blocks = y + 2;
    float qbuf[QK_K];
    /* pass 1: weights (kept for pass 3, which would recompute the same
     * values), weight sums and the per-block scale search */
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = 1.5f * ek_iqk_sumsq(xbl, QK_K) / QK_K;
        ek_iqk_weights(xbl, q, QK_K, sigma2, EK_IQK_W_QUARTER_SIGMA, wrow + QK_K * ibl);
        uint8_t shifts = 0;
        for (int ib = 0; ib < 8; ++ib) {
            const float *xb = xbl + 32 * ib;
            const float *w = wrow + QK_K * ibl + 32 * ib;
            const int64_t g = 8 * ibl + ib;
            float sw = 0;
            for (int j = 0; j < 32; ++j) sw += w[j];
            c[g] = sw;
            float m;
            if (ek_iqk_amax(xb, 32, &m) < 1e-14f) { s[g] = 0; continue; } /* 1e-14, not 1e-16 */
            int shift;
            s[g] = search(xb, w, m, &shift);
            if (shift) shifts |= (uint8_t)(1u << ib);
        }
        blocks[IQ2KS_BYTES * ibl] = shifts;
    }
    const float D = ek_iqk_scale_of_scales(G, 16, s, c, L);
    if (D == 0) return; /* header stays fp16(0) */

    float ax[8] = {0}, aq[8] = {0};
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        uint8_t *blk = blocks + IQ2KS_BYTES * ibl;
        for (int ib = 0; ib < 8; ++ib) {
            const int64_t g = 8 * ibl + ib;
            const float *T = ek_iqk_v2f + 4 * ((blk[0] >> ib) & 1);
            const float *xb = x + QK_K * ibl + 32 * ib;
            uint8_t idx[32];
            const int code = final(xb, wrow + 32 * g, T, D, L[g], s[g], idx, ax, aq);
            iq2ks_put_code(blk, ib, code);
            for (int j = 0; j < 32; ++j) iq2ks_put_index(blk, 32 * ib + j, idx[j]);
        }
    }
    const float SX = iq2ks_hsum8(ax), SQ = iq2ks_hsum8(aq);
    ek_wr16(y, ek_fp32_to_fp16(1.0f * (SQ > 0 ? SX / SQ : D)));
}

int ek_quantize_row_iq2_ks(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    const int64_t nbl = n / QK_K;
    memset(y, 0, 2 + (size_t)nbl * IQ2KS_BYTES);
    const int slow = flags & EK_QFLAG_IQ2KS_SLOW;
    const size_t G = (size_t)(n / 32);
    /* scratch: per 32-block scale s, weight sum c, code L; the fast path also
     * keeps the row's weights */
    const size_t bytes = G * (2 * sizeof(float) + 1) + (slow ? 0 : sizeof(float) * (size_t)n) + sizeof(float);
    float stack_buf[4096];
    float *buf = ek_iqks_scratch(stack_buf, sizeof stack_buf, bytes);
    if (!buf) return EK_ERR_NO_MEMORY; /* the row stays all zero */
    float *s = buf, *c = s + G, *wrow = c + G;
    int8_t *L = (int8_t *)(wrow + (slow ? 0 : n));
    if (slow) iq2ks_quantize_slow(x, y, n, qw, s, c, L);
    else iq2ks_quantize_fast(x, y, n, qw, s, c, L, wrow);
    ek_iqks_scratch_free(buf, stack_buf);
    return EK_OK;
}

void ek_dequantize_row_iq2_ks(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const float d = ek_fp16_to_fp32(ek_rd16(y));
    const uint8_t *blocks = y + 2;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = blocks + IQ2KS_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        const unsigned extra = ek_rd16(blk);
        for (int ib = 0; ib < 8; ++ib) {
            const int code = ((blk[2 + ib / 2] >> 4 * (ib % 2)) & 0xf) | (((extra >> (8 + ib)) & 1) << 4);
            const float dl = d * (float)(code - 16);
            const float *V = ek_iqk_v2f + 4 * ((extra >> ib) & 1);
            for (int h = 0; h < 2; ++h) {
                const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 6 + 32 * (ib / 4) + 16 * h);
                ek_iqk_scale16(dl, V, (qs >> (2 * (ib % 4))) & 3, xb + 32 * ib + 16 * h);
            }
        }
    }
}
