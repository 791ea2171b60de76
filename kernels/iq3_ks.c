/* IQ3_KS (ggml type 156): 3-bit non-linear quants with one fp16 scale per row,
 * 5-bit block scales and shift bits per 32 weights, 102 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq3_ks_impl and dequantize_row_iq3_ks (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Row: d_row (fp16) | blocks. Block: extra (u16: bits 0..7 high bit of the
 * scale code, bits 8..15 shift flags) | scales[4] (low nibbles: byte b%4, high
 * nibble for b >= 4) | qs[64] (low 2 bits, IQ2_K placement) | qh[32] (bit 2).
 */
#include "iqks_common.h"

#define IQ3KS_BYTES 102

/* Pass 1 block fit: BF with guard; the shift flag is bit 8 + ib of the block's extra word. */
static float iq3ks_fit_block(const void *bf, const float *xb, const float *w, uint8_t *blk, int ib) {
    float d;
    int shift;
    if (ek_iqks_bf_fit((const ek_iqks_bf *)bf, xb, w, &d, &shift) == EK_IQK_BF_EMPTY) return 0;
    if (shift) blk[1] |= (uint8_t)(1u << ib);     /* high byte of the little-endian extra */
    return d;
}

int ek_quantize_row_iq3_ks(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nbl = n / QK_K;
    memset(y, 0, 2 + (size_t)nbl * IQ3KS_BYTES);
    uint8_t *blocks = y + 2;

    float stack_s[EK_IQKS_STACK_BLOCKS];
    float *scales = ek_iqks_scratch(stack_s, sizeof stack_s, sizeof(float) * (size_t)(n / 32));
    if (!scales) return EK_ERR_NO_MEMORY; /* the row stays all zero */

    ek_iqks_bf bf; /* BF set-up: V3, ntry 5, guard */
    ek_iqks_bf_init(&bf, 3, 5, 1);
    float qbuf[QK_K], w[32];
    /* pass 1: one BF per 32-block; the signed scale of largest |s| sets the row scale */
    const float m_s = ek_iqks_first_pass(x, qw, n, 2.f / QK_K, EK_IQK_W_SQUARE, blocks, IQ3KS_BYTES,
                                         iq3ks_fit_block, &bf, scales);
    /* an all-empty row gives D = -0.0, kept as 0x8000 */
    const float D = -m_s / 16;
    ek_wr16(y, ek_fp32_to_fp16(D));
    if (D == 0) goto done;

    const float iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int64_t ibl = 0; ibl < nbl; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *blk = blocks + IQ3KS_BYTES * ibl;
        const float *q = ek_iqks_qw(xbl, qw ? qw + QK_K * ibl : NULL, qbuf);
        const float sigma2 = ek_iqk_sumsq(xbl, QK_K) * (2.f / QK_K);
        uint16_t extra = ek_rd16(blk);
        for (int ib = 0; ib < 8; ++ib) {
            const int l = ek_iqks_clampi(ek_nearest_int(iD * scales[8 * ibl + ib]), -16, 15);
            const int code = l + 16;
            blk[2 + ib % 4] |= (uint8_t)((code & 0xf) << 4 * (ib / 4));
            extra |= (uint16_t)((code >> 4) << ib);
            const float dl = D * (float)l;
            const float idl = dl ? 1 / dl : 0.f; /* l = 0: every index becomes 4 */
            const int half = (extra >> (8 + ib)) & 1;
            const float *V = ek_iqk_v3f + 8 * half;
            const int8_t *Vi = ek_iqk_v3 + 8 * half;
            const float *xb = xbl + 32 * ib;
            ek_iqk_weights(xb, q ? q + 32 * ib : NULL, 32, sigma2, EK_IQK_W_SQUARE, w);
            for (int j = 0; j < 32; ++j) {
                const int e = 32 * ib + j;
                const int k = ek_iqk_ni3(V, idl * xb[j]);
                blk[6 + ek_iqks_qs2_byte(e)] |= (uint8_t)((k & 3) << ek_iqks_qs2_shift(e));
                blk[70 + (e % 32)] |= (uint8_t)((k >> 2) << (e / 32));
                const float qv = (float)(Vi[k] * l);
                const float wq = w[j] * qv;
                sumqx += wq * xb[j];
                sumq2 += wq * qv;
            }
        }
        ek_wr16(blk, extra);
    }
    if (sumq2 > 0) ek_wr16(y, ek_fp32_to_fp16(sumqx / sumq2));
done:
    ek_iqks_scratch_free(scales, stack_s);
    return EK_OK;
}

void ek_dequantize_row_iq3_ks(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const float d = ek_fp16_to_fp32(ek_rd16(y));
    const uint8_t *blocks = y + 2;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = blocks + IQ3KS_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        const unsigned extra = ek_rd16(blk);
        for (int ib = 0; ib < 8; ++ib) {
            const int code = ((blk[2 + ib % 4] >> 4 * (ib / 4)) & 0xf) | (((extra >> ib) & 1) << 4);
            const float dl = d * (float)(code - 16);
            const float *V = ek_iqk_v3f + 8 * ((extra >> (8 + ib)) & 1);
            const int sh = 2 * (ib % 4);
            for (int h = 0; h < 2; ++h) {
                const int off = 16 * h;
                const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 6 + 32 * (ib / 4) + off);
                const ek_iqk_v16u8 qh = ek_iqk_load16(blk + 70 + off);
                const ek_iqk_v16u8 idx = ((qs >> sh) & 3) | (((qh >> ib) & 1) << 2);
                ek_iqk_scale16(dl, V, idx, xb + 32 * ib + off);
            }
        }
    }
}
