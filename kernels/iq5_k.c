/* IQ5_K (ggml type 140): 5-bit non-linear quants with per-16 shift bits and
 * 6-bit signed block scales, 176 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq5_k_impl and dequantize_row_iq5_k (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Block: d (fp16) | extra (u16) | scales_h[4] | scales_l[8] | qs[128] (low
 *        4 bits) | qh[32] (bit 4).
 */
#include "iqk_common.h"

#define IQ5K_BYTES 176

static void iq5k_quantize_block(const float *xbl, const float *qw, uint8_t *blk) {
    memset(blk, 0, IQ5K_BYTES);
    const float S = ek_iqk_sumsq(xbl, QK_K);
    const float sigma2 = 2 * S / QK_K;

    float scales[16], w[16];
    uint16_t extra = 0;
    float max_abs_scale = 0, max_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
        float d;
        int shift;
        int r = ek_iqk_block_fit(5, ek_iqk_v5f, ek_iqk_v5f + 32, xb, w, 16, 5, 1, 0, 1, &d, &shift);
        if (r == EK_IQK_BF_EMPTY) {
            scales[ib] = 0;
            continue;
        }
        /* a zero d keeps the shift bit the search found */
        scales[ib] = d;
        if (shift) extra |= (uint16_t)(1u << ib);
        float as = fabsf(d);
        if (as > max_abs_scale) { max_abs_scale = as; max_scale = d; }
    }
    if (!max_abs_scale) return;

    const float D = -max_scale / 32;
    ek_wr16(blk, ek_fp32_to_fp16(D));
    ek_wr16(blk + 2, extra);
    const float iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int ib = 0; ib < 16; ++ib) {
        int ls = ek_nearest_int(iD * scales[ib]);
        ls = ls < -32 ? -32 : ls > 31 ? 31 : ls;
        const int code = ls + 32;
        blk[8 + ib / 2] |= (uint8_t)((code & 0xf) << 4 * (ib % 2));
        blk[4 + ib / 4] |= (uint8_t)((code >> 4) << 2 * (ib % 4));
        const float dl = D * (float)ls;
        if (!dl) continue;
        const int half = (extra >> ib) & 1;
        const float *V = ek_iqk_v5f + 32 * half;
        const int8_t *Vi = ek_iqk_v5 + 32 * half;
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
        const float idl = 1 / dl;
        const int ib32 = ib / 2, off = 16 * (ib % 2);
        uint8_t *qs = blk + 16 + 32 * (ib32 / 2) + off;
        uint8_t *qh = blk + 144 + off;
        for (int j = 0; j < 16; ++j) {
            const int k = ek_iqk_ni5(V, idl * xb[j]);
            qs[j] |= (uint8_t)((k & 0xf) << 4 * (ib32 % 2));
            qh[j] |= (uint8_t)((k >> 4) << ib32);
            const float q = (float)(Vi[k] * ls);
            sumqx += w[j] * q * xb[j];
            sumq2 += w[j] * q * q;
        }
    }
    if (sumq2 > 0) ek_wr16(blk, ek_fp32_to_fp16(sumqx / sumq2));
}

int ek_quantize_row_iq5_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    float wbuf[QK_K];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        const float *q = NULL;
        if (qw) {
            ek_iqk_sanitize_imatrix(xbl, qw + QK_K * ibl, wbuf, QK_K, 16);
            q = wbuf;
        }
        iq5k_quantize_block(xbl, q, y + IQ5K_BYTES * ibl);
    }
    return EK_OK;
}

void ek_dequantize_row_iq5_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant; /* to_float and the matmul kernels agree for IQ5_K */
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = y + IQ5K_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        const float d = ek_fp16_to_fp32(ek_rd16(blk));
        const unsigned extra = ek_rd16(blk + 2);
        for (int ib = 0; ib < 16; ++ib) {
            const int c = ib / 2, off = 16 * (ib % 2); /* 32-element chunk c */
            const int code = ((blk[8 + ib / 2] >> 4 * (ib % 2)) & 0xf) | (((blk[4 + ib / 4] >> 2 * (ib % 4)) & 3) << 4);
            const float dl = d * (float)(code - 32);
            const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 16 + 32 * (c / 2) + off);
            const ek_iqk_v16u8 qh = ek_iqk_load16(blk + 144 + off);
            const ek_iqk_v16u8 idx = ((qs >> (4 * (c % 2))) & 0xf) | (((qh >> c) & 1) << 4);
            ek_iqk_scale16(dl, ek_iqk_v5f + 32 * ((extra >> ib) & 1), idx, xb + 16 * ib);
        }
    }
}
