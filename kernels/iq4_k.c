/* IQ4_K (ggml type 139): 4-bit non-linear quants with per-16 shift bits and
 * 6-bit signed block scales, 144 bytes per 256 weights.
 *
 * The format was created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * quantize_row_iq4_k_impl_bs16 and dequantize_row_iq4_k (ggml/src/iqk/iqk_quantize.cpp).
 *
 * Block: d (fp16) | extra (u16) | scales_h[4] (2 bits each) | scales_l[8] | qs[128].
 */
#include "iqk_common.h"
#include "ek_simd.h"

#define IQ4K_BYTES 144

static void iq4k_quantize_block(const float *xbl, const float *qw, uint8_t *blk) {
    memset(blk, 0, IQ4K_BYTES);
    const float S = ek_iqk_sumsq(xbl, QK_K);
    const float sigma2 = S * (2.f / QK_K);

    float scales[16], w[16];
    uint16_t extra = 0;
    float amax_scale = 0, max_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_SQUARE, w);
        float d;
        int shift;
        int r = ek_iqk_block_fit(4, ek_iqk_v4f, ek_iqk_v4f + 16, xb, w, 16, 7, 1, 0, 0, &d, &shift);
        if (r == EK_IQK_BF_EMPTY) {
            scales[ib] = 0;
            continue;
        }
        if (shift) extra |= (uint16_t)(1u << ib);
        scales[ib] = d;
        float ad = fabsf(d);
        if (ad > amax_scale) { amax_scale = ad; max_scale = d; }
    }
    /* an all-empty super-block gives D = -0.0, stored as 0x8000 */
    const float D = -max_scale / 32;
    ek_wr16(blk, ek_fp32_to_fp16(D));
    ek_wr16(blk + 2, extra);
    const float iD = D ? 1 / D : 0.f;
    uint32_t scales_h = 0;
    float sumqx = 0, sumq2 = 0;
    uint8_t L[QK_K];
    for (int ib = 0; ib < 16; ++ib) {
        const int half = (extra >> ib) & 1;
        const float *V = ek_iqk_v4f + 16 * half;
        const int8_t *Vi = ek_iqk_v4 + 16 * half;
        int l = ek_nearest_int(iD * scales[ib]);
        l = l < -32 ? -32 : l > 31 ? 31 : l;
        const float dl = D * (float)l;
        const float idl = dl ? 1 / dl : 0.f; /* l = 0 blocks quantize to index 8 (value 1) */
        const float *xb = xbl + 16 * ib;
        ek_iqk_weights(xb, qw ? qw + 16 * ib : NULL, 16, sigma2, EK_IQK_W_SQUARE, w);
        for (int j = 0; j < 16; ++j) {
            const int k = ek_iqk_ni4(V, idl * xb[j]);
            L[16 * ib + j] = (uint8_t)k;
            const float q = (float)(Vi[k] * l);
            sumqx += w[j] * q * xb[j];
            sumq2 += w[j] * q * q;
        }
        const int code = l + 32;
        blk[8 + ib / 2] |= (uint8_t)((code & 0xf) << 4 * (ib % 2));
        scales_h |= (uint32_t)(code >> 4) << (2 * ib);
    }
    ek_wr32(blk + 4, scales_h);
    if (sumq2 > 0) ek_wr16(blk, ek_fp32_to_fp16(sumqx / sumq2));
    for (int g = 0; g < 8; ++g)
        for (int t = 0; t < 16; ++t)
            blk[16 + 16 * g + t] = (uint8_t)(L[32 * g + t] | (L[32 * g + 16 + t] << 4));
}

int ek_quantize_row_iq4_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    float wbuf[QK_K];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        const float *q = NULL;
        if (qw) {
            ek_iqk_sanitize_imatrix(xbl, qw + QK_K * ibl, wbuf, QK_K, 16);
            q = wbuf;
        }
        iq4k_quantize_block(xbl, q, y + IQ4K_BYTES * ibl);
    }
    return EK_OK;
}

void ek_dequantize_row_iq4_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant; /* to_float and the matmul kernels agree for IQ4_K */
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const uint8_t *blk = y + IQ4K_BYTES * ibl;
        float *xb = x + QK_K * ibl;
        const float d = ek_fp16_to_fp32(ek_rd16(blk));
        const unsigned extra = ek_rd16(blk + 2);
        const uint32_t sh = ek_rd32(blk + 4);
#ifdef EK_HAVE_SSE2
        /* V4's shifted half is its base half (= the IQ4_NL table) + 4: the base values are
         * gathered, 4 is added for shifted sub-blocks, the sum converted exactly; dl * V[k]
         * is then one mulps per 4 values (multiplication commutes bit for bit). */
        uint32_t shg = sh, exg = extra; /* consumed 4 / 2 bits per group (no variable shifts) */
        for (int g = 0; g < 8; ++g, shg >>= 4, exg >>= 2) {
            const int code0 = (blk[8 + g] & 0xf) | (int)((shg & 3) << 4);
            const int code1 = (blk[8 + g] >> 4) | (int)((shg & 0xc) << 2);
            const __m128 dl0 = _mm_set1_ps(d * (float)(code0 - 32));
            const __m128 dl1 = _mm_set1_ps(d * (float)(code1 - 32));
            const int add = (int)((exg & 1) << 2 | (exg & 2) << 9); /* +4 per shifted half */
            ek_sse_iq4nl_block(xb + 32 * g, blk + 16 + 16 * g, _mm_set1_epi16((short)add), dl0, dl1);
        }
#else
        for (int g = 0; g < 8; ++g) {
            const ek_iqk_v16u8 qs = ek_iqk_load16(blk + 16 + 16 * g);
            for (int h = 0; h < 2; ++h) {
                const int ib = 2 * g + h;
                const int code = ((blk[8 + g] >> 4 * h) & 0xf) | (((sh >> (2 * ib)) & 3) << 4);
                const float dl = d * (float)(code - 32);
                ek_iqk_scale16(dl, ek_iqk_v4f + 16 * ((extra >> ib) & 1), (qs >> (4 * h)) & 0xf, xb + 16 * ib);
            }
        }
#endif
    }
}
