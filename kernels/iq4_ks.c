/* IQ4_KS (ggml type 144): 4-bit non-linear quants with one float32 scale per
 * row and an odd 7-bit scale plus a shift bit per 32 weights, 136 bytes per
 * 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification
 * (shared/spec/iqk-formats.md, section 10).
 *
 * Row: d_row (float32) | blocks. Block: scales[8] (bit 0 shift, bits 1..7
 * code; effective scale (byte & 0xFE) - 127) | qs[128] (block b: bytes 16b..,
 * low nibble element t, high nibble element t + 16).
 */
#include "iqks_common.h"

#define IQ4KS_BYTES 136

void ek_quantize_row_iq4_ks(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nbl = n / QK_K;
    memset(y, 0, 4 + (size_t)nbl * IQ4KS_BYTES); /* header 0.0f */
    uint8_t *blocks = y + 4;

    float stack_s[EK_IQKS_STACK_BLOCKS];
    float *scales = ek_iqks_scratch(stack_s, sizeof stack_s, sizeof(float) * (size_t)(n / 32));
    if (!scales) return; /* no memory: an all-zero row decodes to zeros */

    /* pass 1: block scales and shift bits (V4, ntry 7, no guard) */
    const float amax_s = ek_iqks_fit_block_scales(x, qw, n, blocks, IQ4KS_BYTES, 4, 7, scales);
    float qbuf[QK_K], w[32];
    const float D = amax_s / 127;
    ek_wrf32(y, D);
    if (D == 0) goto done;

    const float iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *blk = blocks + IQ4KS_BYTES * ibl;
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
            const float *V = ek_iqk_v4f + 16 * half;
            const int8_t *Vi = ek_iqk_v4 + 16 * half;
            const float *xb = xbl + 32 * ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, EK_IQK_W_SQUARE, w);
            uint8_t *qs = blk + 8 + 16 * ib;
            for (int t = 0; t < 16; ++t) {
                const int k1 = ek_iqk_ni4(V, idl * xb[t]);
                const int k2 = ek_iqk_ni4(V, idl * xb[t + 16]);
                qs[t] = (uint8_t)(k1 | (k2 << 4));
                const float q1 = (float)(Vi[k1] * ls), q2 = (float)(Vi[k2] * ls);
                const float wq1 = w[t] * q1, wq2 = w[t + 16] * q2;
                /* the reference adds the two elements of a byte before accumulating */
                sumqx = sumqx + (wq1 * xb[t] + wq2 * xb[t + 16]);
                sumq2 = sumq2 + (wq1 * q1 + wq2 * q2);
            }
        }
    }
    if (sumq2 > 0) ek_wrf32(y, sumqx / sumq2);
done:
    ek_iqks_scratch_free(scales, stack_s);
}

void ek_dequantize_row_iq4_ks(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const float d = ek_rdf32(y);
    const uint8_t *blocks = y + 4;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = blocks + IQ4KS_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        for (int ib = 0; ib < 8; ++ib) {
            const float dl = d * (float)((blk[ib] & 0xFE) - 127);
            const float *V = ek_iqk_v4f + 16 * (blk[ib] & 1);
            const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 8 + 16 * ib);
            ek_iqk_scale16(dl, V, qs & 0xf, xb + 32 * ib);
            ek_iqk_scale16(dl, V, qs >> 4, xb + 32 * ib + 16);
        }
    }
}
