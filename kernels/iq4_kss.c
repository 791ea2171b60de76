/* IQ4_KSS (ggml type 146): 4-bit non-linear quants squeezed into 4.0 bpw: one
 * float32 scale per row; every 32-block is eight 16-bit words, each holding
 * four 4-bit indices of even parity in 15 bits plus one bit of the block's
 * IQ4_KS-style scale byte. 128 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq4_kss_impl and dequantize_row_iq4_kss (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Word k of 32-block b: bit 0 = bit k of the scale byte; bits 1..15 = J with
 * v = (J << 1) ^ J holding the indices of elements 2k, 2k+16, 2k+1, 2k+17 in
 * its four nibbles. Every index quadruple must have an even number of set
 * bits; the quantizer repairs odd ones by changing one index (PRUNE).
 */
#include <float.h>
#include "iqks_common.h"

#define IQ4KSS_BYTES 128

/* Element offsets (within a 32-block) of the four nibbles of word k. */
static inline int iq4kss_elem(int k, int j) { return 2 * k + (j & 1) * 16 + (j >> 1); }

/* Parity of the number of set bits of a 4-bit value (bit q of 0x6996). The
 * parity of a quadruple is that of the XOR of its four indices. */
static inline int iq4kss_par(int q) { return (0x6996 >> q) & 1; }

/* PRUNE's replacement candidates for an index q (prune_iq4ks): the q' within
 * q-2..q+2, inside 0..15, whose popcount parity differs from q's, ascending;
 * -1 pads the unused slots. */
static const int8_t iq4kss_alt[16][3] = {
    {1, 2, -1}, {0, 3, -1}, {0, 3, -1}, {1, 2, 4},   {3, 5, 6},   {4, 7, -1},  {4, 7, 8},   {5, 6, 9},
    {6, 9, 10}, {7, 8, 11}, {8, 11, -1}, {9, 10, 12}, {11, 13, 14}, {12, 15, -1}, {12, 15, -1}, {13, 14, -1},
};

/* PRUNE (the reference's prune_iq4ks) on the four indices c[] of one group: when their parity
 * is odd, change the one index whose change costs least. pT[k] = fl(delta*T[k])
 * for the group's table half, pB[k] = fl(delta*V4base[k]): the reference
 * error always uses the base half. Scores are compared without branches
 * (first strict minimum from FLT_MAX, j then q' ascending). */
static inline __attribute__((always_inline)) void
iq4kss_prune(int *c, const float *pT, const float *pB, const float *xv, const float *wv) {
    if (!iq4kss_par(c[0] ^ c[1] ^ c[2] ^ c[3])) return;
    float best = FLT_MAX;
    int bj = -1, bq = 0;
    for (int j = 0; j < 4; ++j) {
        const int q = c[j];
        const float e0 = pB[q] - xv[j];
        const float e00 = e0 * e0;
        for (int s = 0; s < 3; ++s) {
            const int a = iq4kss_alt[q][s];
            const int q1 = a < 0 ? q : a;
            const float e1 = pT[q1] - xv[j];
            float sc = wv[j] * (e1 * e1 - e00);
            sc = a < 0 ? INFINITY : sc;
            const int lt = sc < best;
            best = lt ? sc : best;
            bj = lt ? j : bj;
            bq = lt ? q1 : bq;
        }
    }
    if (bj >= 0) c[bj] = bq; /* bj < 0 only with non-finite scores */
}

/* NI4 (best_index_iq4nl) of the plus and minus arguments fl(id*xv[j]) and
 * -fl(id*xv[j]) of one group at once: the index is the number of thresholds
 * <= t (iqks_common.h), counted in the eight lanes of a GNU C vector. The
 * reference's INT_MIN corner (t >= 2^31 gives 0) cannot occur here: the
 * search keeps |t| <= 135. */
typedef float iq4kss_v4f __attribute__((vector_size(16)));
typedef int32_t iq4kss_v4i __attribute__((vector_size(16)));
static inline __attribute__((always_inline)) void iq4kss_ni8(float id, const float *xv, const float *th, int *c) {
    iq4kss_v4f A;
    memcpy(&A, xv, sizeof A);
    A = id * A;
    const iq4kss_v4f B = -A;
    iq4kss_v4i cp = {0, 0, 0, 0}, cm = {0, 0, 0, 0};
#pragma GCC unroll 15
    for (int i = 0; i < 15; ++i) {
        const iq4kss_v4f t = {th[i], th[i], th[i], th[i]};
        cp -= A >= t;
        cm -= B >= t;
    }
    memcpy(c, &cp, sizeof cp);
    memcpy(c + 4, &cm, sizeof cm);
}

/* 15-bit code J of an even-parity v: bit i of J = XOR of bits 0..i of v. */
static inline uint16_t iq4kss_encode(uint16_t v) {
    uint16_t J = v;
    J ^= (uint16_t)(J << 1);
    J ^= (uint16_t)(J << 2);
    J ^= (uint16_t)(J << 4);
    J ^= (uint16_t)(J << 8);
    return J & 0x7fff;
}

/* Step 1 for one non-empty 32-block: the block scale search. th[h] are the
 * NI4 thresholds of table half h (iqks_common.h); xg, wg hold the block's
 * inputs and weights in group order (2k, 2k+16, 2k+1, 2k+17). */
static float iq4kss_block_scale(const float *xg, const float *wg, float m, const float th[2][15]) {
    float d = -m / -127.f, best = 0;
    for (int t = -7; t <= 7; ++t) {
        for (int h = 0; h < 2; ++h) {
            const float *T = ek_iqk_v4f + 16 * h;
            const float id = ((float)t + T[0]) / m;
            const float delta = 1 / id;
            float pT[16], pB[16];
            for (int k = 0; k < 16; ++k) {
                pT[k] = delta * T[k];
                pB[k] = delta * ek_iqk_v4f[k];
            }
            float sp = 0, qp = 0, sm = 0, qm = 0;
            for (int k = 0; k < 8; ++k) {
                const float *xv = xg + 4 * k, *wv = wg + 4 * k;
                int c[8], *cp = c, *cm = c + 4;
                iq4kss_ni8(id, xv, th[h], c);
                iq4kss_prune(cp, pT, pB, xv, wv);
                iq4kss_prune(cm, pT, pB, xv, wv);
                for (int j = 0; j < 4; ++j) {
                    const float q1 = T[cp[j]], q2 = T[cm[j]];
                    const float a1 = wv[j] * q1, a2 = wv[j] * q2;
                    sp += a1 * xv[j];
                    qp += a1 * q1;
                    sm += a2 * xv[j];
                    qm += a2 * q2;
                }
            }
            if (qp > 0 && sp * sp > best * qp) { d = sp / qp; best = d * sp; }
            if (qm > 0 && sm * sm > best * qm) { d = sm / qm; best = d * sm; }
        }
    }
    return d;
}

/* Pass 1 block fit (ek_iqks_first_pass): the block scale of a non-empty block, 0 otherwise. */
static float iq4kss_fit_block(const void *th, const float *xb, const float *w, uint8_t *blk, int ib) {
    (void)blk; (void)ib;
    float m, xg[32], wg[32];
    if (ek_iqk_amax(xb, 32, &m) < 1e-16f) return 0;
    for (int k = 0; k < 8; ++k)
        for (int j = 0; j < 4; ++j) {
            xg[4 * k + j] = xb[iq4kss_elem(k, j)];
            wg[4 * k + j] = w[iq4kss_elem(k, j)];
        }
    return iq4kss_block_scale(xg, wg, m, (const float (*)[15])th);
}

/* Pass 2 of one 32-block at odd block scale l: indices for both table halves, parity-
 * repaired (PRUNE), the half with the smaller weighted error kept; writes the block's
 * eight words to out and adds its weighted sums to *sumqx, *sumq2 (element order). */
static void iq4kss_encode_block(const float *xb, const float *w, float D, int l, uint8_t *out, float *sumqx,
                                float *sumq2) {
    const float *T0 = ek_iqk_v4f, *T1 = ek_iqk_v4f + 16;
    const float dl = D * (float)l, idl = 1 / dl;
    float p0[16], p1[16];
    for (int k = 0; k < 16; ++k) {
        p0[k] = dl * T0[k];
        p1[k] = dl * T1[k];
    }
    /* both table halves, parity-repaired; keep the one with less error */
    int cp[8][4], cm[8][4];
    float ep = 0, em = 0;
    for (int k = 0; k < 8; ++k) {
        float xv[4], wv[4];
        for (int j = 0; j < 4; ++j) {
            const int e = iq4kss_elem(k, j);
            xv[j] = xb[e];
            wv[j] = w[e];
            const float t = idl * xv[j];
            cp[k][j] = ek_iqk_ni4(T0, t);
            cm[k][j] = ek_iqk_ni4(T1, t);
        }
        iq4kss_prune(cp[k], p0, p0, xv, wv);
        iq4kss_prune(cm[k], p1, p0, xv, wv);
        for (int j = 0; j < 4; ++j) {
            const float rp = xv[j] - p0[cp[k][j]];
            const float rm = xv[j] - p1[cm[k][j]];
            ep += wv[j] * rp * rp;
            em += wv[j] * rm * rm;
        }
    }
    const int shift = em < ep;
    const int8_t *Vi = ek_iqk_v4 + 16 * shift;
    const int sbyte = (l + 127) | shift;
    for (int k = 0; k < 8; ++k) {
        const int *c = shift ? cm[k] : cp[k];
        uint16_t v = 0;
        for (int j = 0; j < 4; ++j) {
            const int e = iq4kss_elem(k, j);
            v |= (uint16_t)(c[j] << 4 * j);
            const float qv = (float)(Vi[c[j]] * l);
            const float wq = w[e] * qv;
            *sumqx += wq * xb[e];
            *sumq2 += wq * qv;
        }
        const uint16_t word = (uint16_t)((iq4kss_encode(v) << 1) | ((sbyte >> k) & 1));
        ek_wr16(out + 2 * k, word);
    }
}

int ek_quantize_row_iq4_kss(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nbl = n / QK_K;
    memset(y, 0, 4 + (size_t)nbl * IQ4KSS_BYTES); /* header 0.0f */
    uint8_t *blocks = y + 4;

    float stack_s[EK_IQKS_STACK_BLOCKS];
    float *scales = ek_iqks_scratch(stack_s, sizeof stack_s, sizeof(float) * (size_t)(n / 32));
    if (!scales) return EK_ERR_NO_MEMORY; /* the row stays all zero */

    float th[2][15];
    ek_iqks_ni_thresholds(4, ek_iqk_v4f, th[0]);
    ek_iqks_ni_thresholds(4, ek_iqk_v4f + 16, th[1]);

    float qbuf[QK_K], w[32];
    const float amax_s = fabsf(ek_iqks_first_pass(x, qw, n, 2.f / QK_K, EK_IQK_W_SQUARE, blocks, IQ4KSS_BYTES,
                                                  iq4kss_fit_block, th, scales));
    const float D = amax_s / 127;
    ek_wrf32(y, D);
    if (D == 0) goto done;

    const float iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *blk = blocks + IQ4KSS_BYTES * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = ek_iqk_sumsq(xbl, QK_K) * (2.f / QK_K);
        for (int ib = 0; ib < 8; ++ib) {
            const float *xb = xbl + 32 * ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, EK_IQK_W_SQUARE, w);
            const int l = 2 * ek_iqks_clampi(ek_nearest_int(0.5f * (iD * scales[8 * ibl + ib] + 127.f)), 0, 127)
                          - 127;
            iq4kss_encode_block(xb, w, D, l, blk + 16 * ib, &sumqx, &sumq2);
        }
    }
    if (sumq2 > 0) ek_wrf32(y, sumqx / sumq2 * 1.01f);
done:
    ek_iqks_scratch_free(scales, stack_s);
    return EK_OK;
}

void ek_dequantize_row_iq4_kss(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const float d = ek_rdf32(y);
    const uint8_t *blocks = y + 4;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = blocks + IQ4KSS_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        for (int ib = 0; ib < 8; ++ib) {
            uint16_t words[8];
            int sbyte = 0;
            for (int k = 0; k < 8; ++k) {
                words[k] = ek_rd16(blk + 16 * ib + 2 * k);
                sbyte |= (words[k] & 1) << k;
            }
            const float dl = d * (float)((sbyte & 0xFE) - 127);
            const float *V = ek_iqk_v4f + 16 * (sbyte & 1);
            for (int k = 0; k < 8; ++k) {
                const uint16_t J = words[k] >> 1;
                const uint16_t v = (uint16_t)((J << 1) ^ J);
                for (int j = 0; j < 4; ++j) xb[32 * ib + iq4kss_elem(k, j)] = dl * V[(v >> 4 * j) & 0xf];
            }
        }
    }
}
