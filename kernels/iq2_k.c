/* IQ2_K (ggml type 137): 2-bit non-linear quants with per-16 shift bits and
 * 4-bit block scales, 76 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq2_k_impl and dequantize_row_iq2_k (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Block: d (fp16) | extra (u16 shift bits) | scales[8] (nibbles) | qs[64].
 */
#include "iqk_common.h"

#define IQ2K_BYTES 76

/* byte offset (inside the block) and bit shift of element e's 2-bit index */
static inline int iq2k_qs_byte(int e) { return 12 + 32 * (e / 128) + (e % 32); }
static inline int iq2k_qs_shift(int e) { return 2 * ((e % 128) / 32); }

static void iq2k_quantize_block(const float *xbl, const float *qw, uint8_t *blk) {
    memset(blk, 0, IQ2K_BYTES); /* d = fp16(+0) */
    const float S = ek_iqk_sumsq(xbl, QK_K);
    const float sigma2 = 1.5f * S / QK_K;

    float scales[16], sw[16], w[16];
    uint16_t extra = 0;
    float max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
        float c = 0;
        for (int j = 0; j < 16; ++j) c += w[j];
        sw[ib] = c;
        float m;
        if (ek_iqk_amax(xb, 16, &m) < 1e-16f) {
            scales[ib] = 0;
        } else {
            int shift;
            scales[ib] = ek_iqk_iq2_partition(xb, w, 16, 16, 0, ek_iqk_v2f, &shift);
            if (shift) extra |= (uint16_t)(1u << ib);
        }
        float as = fabsf(scales[ib]);
        if (max_abs_scale < as) max_abs_scale = as; /* std::max semantics */
    }
    if (!max_abs_scale) return;
    const float D = ek_iqk_scale_of_scales(16, 8, scales, sw, NULL);
    if (!D) return;

    ek_wr16(blk + 2, extra);
    const float iD = 1 / D;
    float sumqx = 0, sumq2 = 0;
    for (int ib = 0; ib < 16; ++ib) {
        int ls = ek_nearest_int(iD * scales[ib]);
        ls = ls < -8 ? -8 : ls > 7 ? 7 : ls;
        blk[4 + ib / 2] |= (uint8_t)((ls + 8) << 4 * (ib % 2));
        const float dl = D * (float)ls;
        if (!dl) continue; /* indices stay 0; the block decodes to exactly 0 */
        const float *V = ek_iqk_v2f + 4 * ((extra >> ib) & 1);
        const int8_t *Vi = ek_iqk_v2 + 4 * ((extra >> ib) & 1);
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_QUARTER_SIGMA, w);
        const float idl = 1 / dl;
        for (int j = 0; j < 16; ++j) {
            const int e = 16 * ib + j;
            const int k = ek_iqk_ni2(V, idl * xb[j]);
            blk[iq2k_qs_byte(e)] |= (uint8_t)(k << iq2k_qs_shift(e));
            const float q = (float)(Vi[k] * ls);
            sumqx += w[j] * q * xb[j];
            sumq2 += w[j] * q * q;
        }
    }
    ek_wr16(blk, ek_fp32_to_fp16(1.030f * (sumq2 > 0 ? sumqx / sumq2 : D)));
}

int ek_quantize_row_iq2_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    float wbuf[QK_K];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        const float *q = NULL;
        if (qw) { /* the sanitizer's 16-groups never straddle a super-block */
            ek_iqk_sanitize_imatrix(xbl, qw + QK_K * ibl, wbuf, QK_K, 16);
            q = wbuf;
        }
        iq2k_quantize_block(xbl, q, y + IQ2K_BYTES * ibl);
    }
    return EK_OK;
}

void ek_dequantize_row_iq2_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant; /* to_float and the matmul kernels agree for IQ2_K */
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = y + IQ2K_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        const float d = ek_fp16_to_fp32(ek_rd16(blk));
        const unsigned extra = ek_rd16(blk + 2);
        for (int ib = 0; ib < 16; ++ib) {
            const float dl = d * (float)(((blk[4 + ib / 2] >> 4 * (ib % 2)) & 0xf) - 8);
            const float *V = ek_iqk_v2f + 4 * ((extra >> ib) & 1);
            const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 12 + 32 * (ib / 8) + 16 * (ib % 2));
            ek_iqk_scale16(dl, V, (qs >> (2 * ((ib / 2) % 4))) & 3, xb + 16 * ib);
        }
    }
}
