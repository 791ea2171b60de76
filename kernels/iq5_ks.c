/* IQ5_KS (ggml type 152): 5-bit non-linear quants with one float32 scale per
 * row and an odd 7-bit scale plus a shift bit per 32 weights, 168 bytes per
 * 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq5_ks_impl and dequantize_row_iq5_ks (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Row: d_row (float32) | blocks. Block: scales[8] (as IQ4_KS) | qs[128] (low 4
 * bits, IQ5_K placement) | qh[32] (bit 4: byte e % 32, bit e / 32).
 */
#include "iqks_common.h"

#define IQ5KS_BYTES 168

/* Block ib's 32 indices: low 4 bits in qs (IQ5_K placement), bit 4 in qh. */
static void iq5ks_encode(const float *xb, const float *w, int ls, float idl, int half, uint8_t *blk, int ib,
                         float *sumqx, float *sumq2) {
    const float *V = ek_iqk_v5f + 32 * half;
    const int8_t *Vi = ek_iqk_v5 + 32 * half;
    uint8_t *qs = blk + 8 + 32 * (ib / 2);
    uint8_t *qh = blk + 136;
    float sx = *sumqx, sq = *sumq2;
    for (int j = 0; j < 32; ++j) {
        const int k = ek_iqk_ni5(V, idl * xb[j]);
        qs[j] |= (uint8_t)((k & 0xf) << 4 * (ib % 2));
        qh[j] |= (uint8_t)((k >> 4) << ib);
        const float qv = (float)(Vi[k] * ls);
        const float wq = w[j] * qv;
        sx += wq * xb[j];
        sq += wq * qv;
    }
    *sumqx = sx;
    *sumq2 = sq;
}

int ek_quantize_row_iq5_ks(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    return ek_iqks_quantize_odd7_row(x, y, n, qw, IQ5KS_BYTES, 5, 5, iq5ks_encode);   /* V5, ntry 5 */
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
