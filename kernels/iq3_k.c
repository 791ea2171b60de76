/* IQ3_K (ggml type 138): 3-bit non-linear quants with per-16 shift bits and
 * signed odd block scales, 110 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq3_k_impl and dequantize_row_iq3_k (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Block: d (fp16) | extra (u16) | scales_h (u16 sign bits) | scales_l[8] |
 *        qs[64] (low 2 bits) | qh[32] (bit 2).
 */
#include "iqk_common.h"

#define IQ3K_BYTES 110

static void iq3k_quantize_block(const float *xbl, const float *qw, uint8_t *blk) {
    memset(blk, 0, IQ3K_BYTES);
    const float S = ek_iqk_sumsq(xbl, QK_K);
    const float sigma2 = 1.5f * S / QK_K;

    float scales[16], w[16];
    uint16_t extra = 0;
    float max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
        float d;
        int shift;
        /* guard, refit; a zero d (checked before the refit) leaves the shift bit clear */
        int r = ek_iqk_block_fit(3, ek_iqk_v3f, ek_iqk_v3f + 8, xb, w, 16, 3, 2, 1, 1, &d, &shift);
        if (r != EK_IQK_BF_OK) {
            scales[ib] = 0;
            continue;
        }
        scales[ib] = d;
        if (shift) extra |= (uint16_t)(1u << ib);
        float as = fabsf(d);
        max_abs_scale = max_abs_scale > as ? max_abs_scale : as; /* MAX() semantics */
    }
    if (!max_abs_scale) return;

    const float D = max_abs_scale / 31;
    ek_wr16(blk + 2, extra);
    const float iD = 1 / D;
    uint16_t scales_h = 0;
    float sumqx = 0, sumq2 = 0;
    for (int ib = 0; ib < 16; ++ib) {
        int code = ek_nearest_int(0.5f * (iD * fabsf(scales[ib]) - 1));
        code = code < 0 ? 0 : code > 15 ? 15 : code;
        blk[6 + ib / 2] |= (uint8_t)(code << 4 * (ib % 2));
        if (scales[ib] < 0) scales_h |= (uint16_t)(1u << ib);
        const int ls = (2 * code + 1) * (scales[ib] < 0 ? -1 : 1);
        const float dl = D * (float)ls;
        if (!dl) continue;
        const int half = (extra >> ib) & 1;
        const float *V = ek_iqk_v3f + 8 * half;
        const int8_t *Vi = ek_iqk_v3 + 8 * half;
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
        const float idl = 1 / dl;
        const int ib32 = ib / 2, off = 16 * (ib % 2);
        uint8_t *qs = blk + 14 + 32 * (ib32 / 4) + off;
        uint8_t *qh = blk + 78 + off;
        for (int j = 0; j < 16; ++j) {
            const int k = ek_iqk_ni3(V, idl * xb[j]);
            qs[j] |= (uint8_t)((k & 3) << 2 * (ib32 % 4));
            qh[j] |= (uint8_t)((k >> 2) << ib32);
            const float q = (float)(Vi[k] * ls);
            sumqx += w[j] * q * xb[j];
            sumq2 += w[j] * q * q;
        }
    }
    ek_wr16(blk + 4, scales_h);
    ek_wr16(blk, ek_fp32_to_fp16(1.01f * (sumq2 > 0 ? sumqx / sumq2 : D)));
}

int ek_quantize_row_iq3_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    float wbuf[QK_K];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        const float *q = NULL;
        if (qw) {
            ek_iqk_sanitize_imatrix(xbl, qw + QK_K * ibl, wbuf, QK_K, 16);
            q = wbuf;
        }
        iq3k_quantize_block(xbl, q, y + IQ3K_BYTES * ibl);
    }
    return EK_OK;
}

void ek_dequantize_row_iq3_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant; /* to_float and the matmul kernels agree for IQ3_K */
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = y + IQ3K_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        const float d = ek_fp16_to_fp32(ek_rd16(blk));
        const unsigned extra = ek_rd16(blk + 2);
        const unsigned sh = ek_rd16(blk + 4);
        for (int ib = 0; ib < 16; ++ib) {
            const int code = (blk[6 + ib / 2] >> 4 * (ib % 2)) & 0xf;
            const float dl = d * (float)((2 * code + 1) * (((sh >> ib) & 1) ? -1 : 1));
            const int ib32 = ib / 2, off = 16 * (ib % 2);
            const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 14 + 32 * (ib32 / 4) + off);
            const ek_iqk_v16u8 qh = ek_iqk_load16(blk + 78 + off);
            const ek_iqk_v16u8 idx = ((qs >> (2 * (ib32 % 4))) & 3) | (((qh >> ib32) & 1) << 2);
            ek_iqk_scale16(dl, ek_iqk_v3f + 8 * ((extra >> ib) & 1), idx, xb + 16 * ib);
        }
    }
}
