/* IQ5_KS (ggml type 152): 5-bit non-linear quants with one float32 scale per
 * row and an odd 7-bit scale plus a shift bit per 32 weights, 168 bytes per
 * 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification
 * (shared/spec/iqk-formats.md, section 11).
 *
 * Row: d_row (float32) | blocks. Block: scales[8] (as IQ4_KS) | qs[128] (low 4
 * bits, IQ5_K placement) | qh[32] (bit 4: byte e % 32, bit e / 32).
 */
#include "iqks_common.h"

#define IQ5KS_BYTES 168

void ek_quantize_row_iq5_ks(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nbl = n / QK_K;
    memset(y, 0, 4 + (size_t)nbl * IQ5KS_BYTES); /* header 0.0f */
    uint8_t *blocks = y + 4;

    float stack_s[EK_IQKS_STACK_BLOCKS];
    float *scales = ek_iqks_scratch(stack_s, sizeof stack_s, sizeof(float) * (size_t)(n / 32));
    if (!scales) return; /* no memory: an all-zero row decodes to zeros */

    /* pass 1: block scales and shift bits (V5, ntry 5, no guard) */
    const float amax_s = ek_iqks_fit_block_scales(x, qw, n, blocks, IQ5KS_BYTES, 5, 5, scales);
    float qbuf[QK_K], w[32];
    const float D = amax_s / 127;
    ek_wrf32(y, D);
    if (D == 0) goto done;

    const float iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *blk = blocks + IQ5KS_BYTES * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = ek_iqk_sumsq(xbl, QK_K) * (2.f / QK_K);
        for (int ib = 0; ib < 8; ++ib) {
            const float s = scales[8 * ibl + ib];
            const int l = ek_iqks_clampi(ek_nearest_int(0.5f * (iD * s + 127.f)), 0, 127);
            blk[ib] |= (uint8_t)(2 * l);
            const int ls = 2 * l - 127; /* odd, never 0 */
            const float dl = D * (float)ls;
            const float idl = 1 / dl;
            const int half = blk[ib] & 1;
            const float *V = ek_iqk_v5f + 32 * half;
            const int8_t *Vi = ek_iqk_v5 + 32 * half;
            const float *xb = xbl + 32 * ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, EK_IQK_W_SQUARE, w);
            uint8_t *qs = blk + 8 + 32 * (ib / 2);
            uint8_t *qh = blk + 136;
            for (int j = 0; j < 32; ++j) {
                const int k = ek_iqk_ni5(V, idl * xb[j]);
                qs[j] |= (uint8_t)((k & 0xf) << 4 * (ib % 2));
                qh[j] |= (uint8_t)((k >> 4) << ib);
                const float qv = (float)(Vi[k] * ls);
                const float wq = w[j] * qv;
                sumqx += wq * xb[j];
                sumq2 += wq * qv;
            }
        }
    }
    if (sumq2 > 0) ek_wrf32(y, sumqx / sumq2);
done:
    ek_iqks_scratch_free(scales, stack_s);
}

void ek_dequantize_row_iq5_ks(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const float d = ek_rdf32(y);
    const uint8_t *blocks = y + 4;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = blocks + IQ5KS_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        for (int ib = 0; ib < 8; ++ib) {
            const float dl = d * (float)((blk[ib] & 0xFE) - 127);
            const float *V = ek_iqk_v5f + 32 * (blk[ib] & 1);
            for (int h = 0; h < 2; ++h) {
                const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 8 + 32 * (ib / 2) + 16 * h);
                const ek_iqk_v16u8 qh = ek_iqk_load16(blk + 136 + 16 * h);
                const ek_iqk_v16u8 idx = ((qs >> (4 * (ib % 2))) & 0xf) | (((qh >> ib) & 1) << 4);
                ek_iqk_scale16(dl, V, idx, xb + 32 * ib + 16 * h);
            }
        }
    }
}
