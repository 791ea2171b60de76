/* IQ2_KL (ggml type 157): pairs of weights coded as one of 32 grid points built
 * from the IQ3 non-linear values, one fp16 scale per row and a 6-bit scale per
 * 32 weights, 86 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq2_kl_impl and dequantize_row_iq2_kl (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Row: d_row (fp16) | blocks. Block: scales_h (u16, 2 bits per 32-block) |
 * scales_l[4] (byte b%4, high nibble for b >= 4) | qs[64] (low 4 bits of the
 * 5-bit pair index; byte 16*(b/2) + t, high nibble for odd b) | qh[16] (bit 4:
 * byte t, bit b).
 */
#include <float.h>
#include "iqks_common.h"

#define IQ2KL_BYTES 86

/* Grid point i = (first, second), both V3 base values (the reference's iq2kl_values,
 * low byte first). */
static const int8_t iq2kl_grid[32][2] = {
    {-63, -23}, {-63, 13}, {-40, -63}, {-40, -10}, {-40, 13}, {-40, 47}, {-23, -40}, {-23, -23},
    {-23, 1},   {-23, 13}, {-23, 28},  {-10, -63}, {-10, 1},  {-10, 13}, {-10, 47},  {1, -23},
    {1, -10},   {1, 1},    {1, 13},    {1, 28},    {13, -40}, {13, -23}, {13, -10},  {13, 1},
    {13, 13},   {28, -63}, {28, -23},  {28, 1},    {28, 28},  {28, 47},  {47, -23},  {47, 13},
};

/* Pair map M (A.2): index 8*l1 + l2 of the nearest V3 values of the two
 * elements; m >= 0 is the grid point, m < 0 names neighbour list -m-1. */
static const int8_t iq2kl_map[64] = {
    -1,  -2,  0,   -3,  -4,  1,   -5,  -6,  2,   -7,  -8,  3,   -9,  4,   -10, 5,
    -11, 6,   7,   -12, 8,   9,   10,  -13, 11,  -14, -15, -16, 12,  13,  -17, 14,
    -18, -19, 15,  16,  17,  18,  19,  -20, -21, 20,  21,  22,  23,  24,  -22, -23,
    25,  -24, 26,  -25, 27,  -26, 28,  29,  -27, -28, 30,  -29, -30, 31,  -31, -32,
};

static const uint8_t iq2kl_neighbours[32][8] = {
    {2, 0, 6, 11, 7, 3, 8, 15},      {0, 2, 3, 6, 7, 1, 8, 4},        {0, 1, 3, 4, 8, 7, 9, 6},
    {1, 0, 3, 4, 8, 9, 7, 10},       {1, 4, 5, 10, 9, 3, 8, 0},       {5, 1, 4, 10, 9, 14, 8, 3},
    {6, 2, 7, 0, 3, 11, 8, 15},      {3, 7, 0, 6, 8, 4, 12, 9},       {3, 4, 8, 9, 1, 7, 12, 10},
    {4, 10, 5, 9, 1, 8, 13, 14},     {11, 2, 6, 7, 20, 15, 25, 21},   {8, 7, 3, 12, 9, 16, 17, 13},
    {14, 5, 10, 19, 9, 13, 4, 18},   {6, 15, 7, 11, 20, 21, 16, 2},   {15, 7, 16, 6, 21, 12, 17, 22},
    {12, 16, 17, 8, 15, 7, 13, 22},  {19, 10, 13, 18, 14, 9, 12, 24}, {11, 20, 25, 6, 15, 2, 21, 7},
    {20, 15, 21, 6, 11, 7, 16, 26},  {14, 19, 29, 10, 28, 18, 13, 24}, {25, 11, 20, 21, 15, 6, 26, 30},
    {19, 24, 28, 18, 29, 23, 13, 17}, {29, 19, 14, 28, 24, 18, 10, 13}, {20, 26, 21, 25, 30, 15, 22, 16},
    {27, 26, 22, 23, 21, 30, 16, 24}, {27, 24, 28, 31, 23, 18, 22, 17}, {25, 30, 20, 26, 21, 11, 15, 22},
    {30, 26, 25, 20, 21, 27, 22, 15}, {30, 27, 31, 26, 22, 23, 21, 24}, {31, 27, 30, 26, 28, 23, 22, 24},
    {31, 28, 29, 27, 24, 23, 19, 18}, {29, 28, 31, 24, 19, 27, 14, 18},
};

/* The grid coordinates of each neighbour list above, as floats
 * ([list][first/second][position]), so the eight scores of a list can be
 * computed without indirection. */
static const float iq2kl_nbf[32][2][8] = {
    {{-40, -63, -23, -10, -23, -40, -23, 1}, {-63, -23, -40, -63, -23, -10, 1, -23}},
    {{-63, -40, -40, -23, -23, -63, -23, -40}, {-23, -63, -10, -40, -23, 13, 1, 13}},
    {{-63, -63, -40, -40, -23, -23, -23, -23}, {-23, 13, -10, 13, 1, -23, 13, -40}},
    {{-63, -63, -40, -40, -23, -23, -23, -23}, {13, -23, -10, 13, 1, 13, -23, 28}},
    {{-63, -40, -40, -23, -23, -40, -23, -63}, {13, 13, 47, 28, 13, -10, 1, -23}},
    {{-40, -63, -40, -23, -23, -10, -23, -40}, {47, 13, 13, 28, 13, 47, 1, -10}},
    {{-23, -40, -23, -63, -40, -10, -23, 1}, {-40, -63, -23, -23, -10, -63, 1, -23}},
    {{-40, -23, -63, -23, -23, -40, -10, -23}, {-10, -23, -23, -40, 1, 13, 1, 13}},
    {{-40, -40, -23, -23, -63, -23, -10, -23}, {-10, 13, 1, 13, 13, -23, 1, 28}},
    {{-40, -23, -40, -23, -63, -23, -10, -10}, {13, 28, 47, 13, 13, 1, 13, 47}},
    {{-10, -40, -23, -23, 13, 1, 28, 13}, {-63, -63, -40, -23, -40, -23, -63, -23}},
    {{-23, -23, -40, -10, -23, 1, 1, -10}, {1, -23, -10, 1, 13, -10, 1, 13}},
    {{-10, -40, -23, 1, -23, -10, -40, 1}, {47, 47, 28, 28, 13, 13, 13, 13}},
    {{-23, 1, -23, -10, 13, 13, 1, -40}, {-40, -23, -23, -63, -40, -23, -10, -63}},
    {{1, -23, 1, -23, 13, -10, 1, 13}, {-23, -23, -10, -40, -23, 1, 1, -10}},
    {{-10, 1, 1, -23, 1, -23, -10, 13}, {1, -10, 1, 1, -23, -23, 13, -10}},
    {{1, -23, -10, 1, -10, -23, -10, 13}, {28, 28, 13, 13, 47, 13, 1, 13}},
    {{-10, 13, 28, -23, 1, -40, 13, -23}, {-63, -40, -63, -40, -23, -63, -23, -23}},
    {{13, 1, 13, -23, -10, -23, 1, 28}, {-40, -23, -23, -40, -63, -23, -10, -23}},
    {{-10, 1, 28, -23, 28, 1, -10, 13}, {47, 28, 47, 28, 28, 13, 13, 13}},
    {{28, -10, 13, 13, 1, -23, 28, 47}, {-63, -63, -40, -23, -23, -40, -23, -23}},
    {{1, 13, 28, 1, 28, 13, -10, 1}, {28, 13, 28, 13, 47, 1, 13, 1}},
    {{28, 1, -10, 28, 13, 1, -23, -10}, {47, 28, 47, 28, 13, 13, 28, 13}},
    {{13, 28, 13, 28, 47, 1, 13, 1}, {-40, -23, -23, -63, -23, -23, -10, -10}},
    {{28, 28, 13, 13, 13, 47, 1, 13}, {1, -23, -10, 1, -23, -23, -10, 13}},
    {{28, 13, 28, 47, 13, 1, 13, 1}, {1, 13, 28, 13, 1, 13, -10, 1}},
    {{28, 47, 13, 28, 13, -10, 1, 13}, {-63, -23, -40, -23, -23, -63, -23, -10}},
    {{47, 28, 28, 13, 13, 28, 13, 1}, {-23, -23, -63, -40, -23, 1, -10, -23}},
    {{47, 28, 47, 28, 13, 13, 13, 13}, {-23, 1, 13, -23, -10, 1, -23, 13}},
    {{47, 28, 47, 28, 28, 13, 13, 13}, {13, 1, -23, -23, 28, 1, -10, 13}},
    {{47, 28, 28, 28, 13, 13, 1, 1}, {13, 28, 47, 1, 13, 1, 28, 13}},
    {{28, 28, 47, 13, 1, 28, -10, 1}, {47, 28, 13, 13, 28, 1, 47, 13}},
};

/* The end of IDX (the `index` lambda of quantize_row_iq2_kl_impl): the grid point for
 * the scaled pair (s1, s2)
 * whose two NI3 indices gave the map entry m. */
static inline int iq2kl_pick(int m, float s1, float s2, float w1, float w2) {
    if (m >= 0) return m;
    const uint8_t *nb = iq2kl_neighbours[-m - 1];
    const float(*f)[8] = iq2kl_nbf[-m - 1];
    float sc[8];
    for (int i = 0; i < 8; ++i) {
        const float e1 = f[0][i] - s1;
        const float e2 = f[1][i] - s2;
        sc[i] = w1 * e1 * e1 + w2 * e2 * e2;
    }
    /* first strict minimum starting from FLT_MAX, without branches */
    float best = FLT_MAX;
    int bi = 0; /* position nb[0] is only kept with non-finite scores */
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
        const int lt = sc[i] < best;
        best = lt ? sc[i] : best;
        bi = lt ? i : bi;
    }
    return nb[bi];
}

/* IDX (the `index` lambda of quantize_row_iq2_kl_impl): grid index for the pair
 * (x1, x2) at inverse scale id; th
 * are the NI3 thresholds of the V3 base half (iqks_common.h). */
static inline int iq2kl_idx(const float *th, float id, float x1, float x2, float w1, float w2) {
    const float s1 = id * x1, s2 = id * x2;
    return iq2kl_pick(iq2kl_map[8 * ek_iqks_ni_th(th, 8, s1) + ek_iqks_ni_th(th, 8, s2)], s1, s2, w1, w2);
}

/* Plus and minus assignments at inverse scale id, accumulated pair-wise. */
typedef float iq2kl_v4f __attribute__((vector_size(16)));
typedef int32_t iq2kl_v4i __attribute__((vector_size(16)));

static inline void iq2kl_eval(const float *th, const float *xb, const float *w, float id, float *sp, float *qp,
                              float *sm, float *qm) {
    float SP = 0, QP = 0, SM = 0, QM = 0;
    const iq2kl_v4f ids = {id, id, -id, -id};
    for (int t = 0; t < 16; ++t) {
        const float x1 = xb[2 * t], x2 = xb[2 * t + 1], w1 = w[2 * t], w2 = w[2 * t + 1];
        /* s1, s2 of IDX(id) and of IDX(-id) (fl(-id*x) = -fl(id*x)); their NI3
         * indices count the thresholds below them, four lanes at once (here
         * |s| <= 68, far from the 2^31 corner ek_iqks_ni_th also handles) */
        const iq2kl_v4f S = ids * (iq2kl_v4f){x1, x2, x1, x2};
        iq2kl_v4i c = {0, 0, 0, 0};
#pragma GCC unroll 7
        for (int i = 0; i < 7; ++i) c -= S >= (iq2kl_v4f){th[i], th[i], th[i], th[i]};
        int k = iq2kl_pick(iq2kl_map[8 * c[0] + c[1]], S[0], S[1], w1, w2);
        float q1 = iq2kl_grid[k][0], q2 = iq2kl_grid[k][1];
        float a1 = w1 * q1, a2 = w2 * q2;
        SP = SP + (a1 * x1 + a2 * x2);
        QP = QP + (a1 * q1 + a2 * q2);
        k = iq2kl_pick(iq2kl_map[8 * c[2] + c[3]], S[2], S[3], w1, w2);
        q1 = iq2kl_grid[k][0];
        q2 = iq2kl_grid[k][1];
        a1 = w1 * q1;
        a2 = w2 * q2;
        SM = SM + (a1 * x1 + a2 * x2);
        QM = QM + (a1 * q1 + a2 * q2);
    }
    *sp = SP; *qp = QP; *sm = SM; *qm = QM;
}

/* Step 1 for one non-empty 32-block: the block scale. */
static float iq2kl_block_scale(const float *th, const float *xb, const float *w, float m) {
    float d = -m / -63.f;
    float sp, qp, sm, qm;
    iq2kl_eval(th, xb, w, 1 / d, &sp, &qp, &sm, &qm);
    d = sp / qp;
    float best = d * sp;
    if (qm > 0 && sm * sm > best * qm) { d = sm / qm; best = d * sm; }
    for (int t = -5; t <= 5; ++t) {
        iq2kl_eval(th, xb, w, (float)(t - 63) / m, &sp, &qp, &sm, &qm);
        if (qp > 0 && sp * sp > best * qp) { d = sp / qp; best = d * sp; }
        if (qm > 0 && sm * sm > best * qm) { d = sm / qm; best = d * sm; }
    }
    return d;
}

/* Weighted error of the block at scale dl (indices from IDX at idl). */
static float iq2kl_error(const float *th, const float *xb, const float *w, float dl, float idl) {
    float E = 0;
    for (int t = 0; t < 16; ++t) {
        const float x1 = xb[2 * t], x2 = xb[2 * t + 1], w1 = w[2 * t], w2 = w[2 * t + 1];
        const int k = iq2kl_idx(th, idl, x1, x2, w1, w2);
        const float r1 = dl * (float)iq2kl_grid[k][0] - x1;
        const float r2 = dl * (float)iq2kl_grid[k][1] - x2;
        E = E + (w1 * r1 * r1 + w2 * r2 * r2);
    }
    return E;
}

/* Pass 1 block fit (ek_iqks_first_pass): the block scale of a non-empty block, 0 otherwise. */
static float iq2kl_fit_block(const void *th, const float *xb, const float *w, uint8_t *blk, int ib) {
    (void)blk; (void)ib;
    float m;
    if (ek_iqk_amax(xb, 32, &m) < 1e-16f) return 0;
    return iq2kl_block_scale((const float *)th, xb, w, m);
}

int ek_quantize_row_iq2_kl(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nbl = n / QK_K;
    memset(y, 0, 2 + (size_t)nbl * IQ2KL_BYTES); /* header fp16(0) */
    uint8_t *blocks = y + 2;

    float stack_s[EK_IQKS_STACK_BLOCKS];
    float *scales = ek_iqks_scratch(stack_s, sizeof stack_s, sizeof(float) * (size_t)(n / 32));
    if (!scales) return EK_ERR_NO_MEMORY; /* the row stays all zero */

    float th[7];
    ek_iqks_ni_thresholds(3, ek_iqk_v3f, th);
    float qbuf[QK_K], w[32];
    const float m_s = ek_iqks_first_pass(x, qw, n, 2.25f / QK_K, EK_IQK_W_ABS, blocks, IQ2KL_BYTES,
                                         iq2kl_fit_block, th, scales);
    if (m_s == 0) goto done;

    const float D = -m_s / 32, iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *blk = blocks + IQ2KL_BYTES * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = ek_iqk_sumsq(xbl, QK_K) * (2.25f / QK_K);
        uint16_t scales_h = 0;
        for (int ib = 0; ib < 8; ++ib) {
            const float *xb = xbl + 32 * ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, EK_IQK_W_ABS, w);
            const int l0 = ek_iqks_clampi(ek_nearest_int(iD * scales[8 * ibl + ib]), -32, 31);
            const int lo = l0 - 1 < -32 ? -32 : l0 - 1, hi = l0 + 1 > 31 ? 31 : l0 + 1;
            float best = FLT_MAX;
            int lb = l0; /* only kept when every error is non-finite */
            for (int l = lo; l <= hi; ++l) {
                const float dl = D * (float)l;
                const float E = iq2kl_error(th, xb, w, dl, dl ? 1 / dl : 0.f);
                if (E < best) { best = E; lb = l; }
            }
            const int code = lb + 32;
            blk[2 + ib % 4] |= (uint8_t)((code & 0xf) << 4 * (ib / 4));
            scales_h |= (uint16_t)((code >> 4) << (2 * ib));
            if (lb == 0) continue; /* indices stay 0 */
            const float idl = 1 / (D * (float)lb);
            for (int t = 0; t < 16; ++t) {
                const float x1 = xb[2 * t], x2 = xb[2 * t + 1], w1 = w[2 * t], w2 = w[2 * t + 1];
                const int k = iq2kl_idx(th, idl, x1, x2, w1, w2);
                blk[6 + 16 * (ib / 2) + t] |= (uint8_t)((k & 0xf) << 4 * (ib % 2));
                blk[70 + t] |= (uint8_t)((k >> 4) << ib);
                const float q1 = (float)(lb * iq2kl_grid[k][0]), q2 = (float)(lb * iq2kl_grid[k][1]);
                const float a1 = w1 * q1, a2 = w2 * q2;
                sumqx = sumqx + (a1 * x1 + a2 * x2);
                sumq2 = sumq2 + (a1 * q1 + a2 * q2);
            }
        }
        ek_wr16(blk, scales_h);
    }
    ek_wr16(y, ek_fp32_to_fp16(1.025f * (sumq2 > 0 ? sumqx / sumq2 : D)));
done:
    ek_iqks_scratch_free(scales, stack_s);
    return EK_OK;
}

void ek_dequantize_row_iq2_kl(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const float d = ek_fp16_to_fp32(ek_rd16(y));
    const uint8_t *blocks = y + 2;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = blocks + IQ2KL_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        const unsigned scales_h = ek_rd16(blk);
        for (int ib = 0; ib < 8; ++ib) {
            const int code = ((blk[2 + ib % 4] >> 4 * (ib / 4)) & 0xf) | (((scales_h >> (2 * ib)) & 3) << 4);
            const float dl = d * (float)(code - 32);
            for (int t = 0; t < 16; ++t) {
                const int k = ((blk[6 + 16 * (ib / 2) + t] >> 4 * (ib % 2)) & 0xf) | (((blk[70 + t] >> ib) & 1) << 4);
                xb[32 * ib + 2 * t] = dl * (float)iq2kl_grid[k][0];
                xb[32 * ib + 2 * t + 1] = dl * (float)iq2kl_grid[k][1];
            }
        }
    }
}
