/* IQ4_KS (ggml type 144): 4-bit non-linear quants with one float32 scale per
 * row and an odd 7-bit scale plus a shift bit per 32 weights, 136 bytes per
 * 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq4_k_impl_bs128 (as quantize_iq4_ks calls it) and
 * dequantize_row_iq4_ks (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Row: d_row (float32) | blocks. Block: scales[8] (bit 0 shift, bits 1..7
 * code; effective scale (byte & 0xFE) - 127) | qs[128] (block b: bytes 16b..,
 * low nibble element t, high nibble element t + 16).
 */
#include "iqks_common.h"

#define IQ4KS_BYTES 136

/* Block ib's 32 indices: byte t holds elements t (low nibble) and t + 16 (high). */
static void iq4ks_encode(const float *xb, const float *w, int ls, float idl, int half, uint8_t *blk, int ib,
                         float *sumqx, float *sumq2) {
    const float *V = ek_iqk_v4f + 16 * half;
    const int8_t *Vi = ek_iqk_v4 + 16 * half;
    uint8_t *qs = blk + 8 + 16 * ib;
    float sx = *sumqx, sq = *sumq2;
    for (int t = 0; t < 16; ++t) {
        const int k1 = ek_iqk_ni4(V, idl * xb[t]);
        const int k2 = ek_iqk_ni4(V, idl * xb[t + 16]);
        qs[t] = (uint8_t)(k1 | (k2 << 4));
        const float q1 = (float)(Vi[k1] * ls), q2 = (float)(Vi[k2] * ls);
        const float wq1 = w[t] * q1, wq2 = w[t + 16] * q2;
        /* the reference adds the two elements of a byte before accumulating */
        sx = sx + (wq1 * xb[t] + wq2 * xb[t + 16]);
        sq = sq + (wq1 * q1 + wq2 * q2);
    }
    *sumqx = sx;
    *sumq2 = sq;
}

int ek_quantize_row_iq4_ks(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    return ek_iqks_quantize_odd7_row(x, y, n, qw, IQ4KS_BYTES, 4, 7, iq4ks_encode);   /* V4, ntry 7 */
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
