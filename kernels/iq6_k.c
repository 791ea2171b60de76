/* IQ6_K (ggml type 141): 6-bit non-linear quants with per-16 shift bits and
 * int8 block scales, 212 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq6_k_impl and dequantize_row_iq6_k (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Block: d (fp16) | extra (u16) | scales[16] (int8) | qs[128] (low 4 bits) |
 *        qh[64] (high 2 bits).
 *
 * Two dequantizers exist in the reference: the CPU to_float evaluates a cubic
 * in the code (variant 0, dequantize_row_iq6_k's values, unfused), the matmul kernels use
 * the integer table the quantizer optimised for (variant 1).
 */
#include "iqk_common.h"

#define IQ6K_BYTES 212

static void iq6k_quantize_block(const float *xbl, const float *qw, uint8_t *blk) {
    memset(blk, 0, IQ6K_BYTES);
    const float S = ek_iqk_sumsq(xbl, QK_K);
    const float sigma2 = 2 * S / QK_K;
    const float *T0 = ek_iqk_v6f, *T1 = ek_iqk_v6f + 64;

    float scales[16], w[16];
    uint16_t extra = 0;
    float max_abs_scale = 0, max_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
        float d;
        int shift;
        int r = ek_iqk_block_fit(6, T0, T1, xb, w, 16, 5, 1, 0, 1, &d, &shift);
        if (r == EK_IQK_BF_EMPTY) {
            scales[ib] = 0;
            continue;
        }
        scales[ib] = d;
        if (shift) extra |= (uint16_t)(1u << ib);
        float as = fabsf(d);
        if (as > max_abs_scale) { max_abs_scale = as; max_scale = d; }
    }
    if (!max_abs_scale) return;

    const float D = -max_scale / 127;
    ek_wr16(blk, ek_fp32_to_fp16(D));
    ek_wr16(blk + 2, extra);
    const float iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int ib = 0; ib < 16; ++ib) {
        int ls = ek_nearest_int(iD * scales[ib]);
        ls = ls < -127 ? -127 : ls > 127 ? 127 : ls;
        blk[4 + ib] = (uint8_t)(int8_t)ls;
        const float dl = D * (float)ls;
        if (!dl) continue;
        const float *V = (extra >> ib) & 1 ? T1 : T0;
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
        const float idl = 1 / dl;
        const int ib32 = ib / 2, off = 16 * (ib % 2);
        uint8_t *qs = blk + 20 + 32 * (ib32 / 2) + off;
        uint8_t *qh = blk + 148 + 32 * (ib32 / 4) + off;
        for (int j = 0; j < 16; ++j) {
            const int k = ek_iqk_ni6(V, idl * xb[j]);
            qs[j] |= (uint8_t)((k & 0xf) << 4 * (ib32 % 2));
            qh[j] |= (uint8_t)((k >> 4) << 2 * (ib32 % 4));
            const float q = V[k] * (float)ls; /* integer-valued, exact */
            sumqx += w[j] * q * xb[j];
            sumq2 += w[j] * q * q;
        }
    }
    if (sumq2 > 0) ek_wr16(blk, ek_fp32_to_fp16(sumqx / sumq2));
}

int ek_quantize_row_iq6_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    float wbuf[QK_K];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        const float *q = NULL;
        if (qw) {
            ek_iqk_sanitize_imatrix(xbl, qw + QK_K * ibl, wbuf, QK_K, 16);
            q = wbuf;
        }
        iq6k_quantize_block(xbl, q, y + IQ6K_BYTES * ibl);
    }
    return EK_OK;
}

void ek_dequantize_row_iq6_k(const uint8_t *y, float *x, int64_t n, int variant) {
    /* variant 0: cubic values (CPU to_float); otherwise the integer table */
    const float *tab = variant == EK_DEQ_TO_FLOAT ? ek_iqk_iq6k_cubic : ek_iqk_v6f;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = y + IQ6K_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        const float d = ek_fp16_to_fp32(ek_rd16(blk));
        const unsigned extra = ek_rd16(blk + 2);
        for (int ib = 0; ib < 16; ++ib) {
            const int c = ib / 2, off = 16 * (ib % 2); /* 32-element chunk c */
            const float dl = d * (float)(int8_t)blk[4 + ib];
            const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 20 + 32 * (c / 2) + off);
            const ek_iqk_v16u8 qh = ek_iqk_load16(blk + 148 + 32 * (c / 4) + off);
            const ek_iqk_v16u8 idx = ((qs >> (4 * (c % 2))) & 0xf) | (((qh >> (2 * (c % 4))) & 3) << 4);
            ek_iqk_scale16(dl, tab + 64 * ((extra >> ib) & 1), idx, xb + 16 * ib);
        }
    }
}
