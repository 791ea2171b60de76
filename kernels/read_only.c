/* Types evalkit reads but does not quantize: IQ4_XS and Q8_KV.
 *
 * Published ik_llama.cpp models hold them as the plain side of the repacked IQ4_XS_R8 and
 * Q8_KV_R8 tensors (evalkit/formats/repack.py de-interleaves those to these layouts), so
 * only the dequantizers exist: ggml's dequantize_row_iq4_xs (ggml-quants.c) and
 * dequantize_row_q8_KV (iqk_quantize.cpp), with the same float expressions. No quantizer
 * is defined, so the format table reports them as not quantizable. */
#include "ek_common.h"

#define IQ4XS_BYTES 136 /* d | scales_h (u16) | scales_l[4] | qs[128] */

/* The 16 non-linear IQ4_NL / IQ4_XS code values (kvalues_iq4nl). */
static const int8_t k_iq4xs_values[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
};

void ek_dequantize_row_iq4_xs(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t ibl = 0; ibl < n / 256; ++ibl, y += IQ4XS_BYTES) {
        const float d = ek_f16(ek_rd16(y));
        const unsigned scales_h = ek_rd16(y + 2);
        const uint8_t *qs = y + 8;
        for (int ib = 0; ib < 8; ++ib, qs += 16, x += 32) {
            /* 6-bit scale: nibble ib%2 of scales_l[ib/2], bits 2ib..2ib+1 of scales_h on top */
            const int ls = ((y[4 + ib / 2] >> 4 * (ib % 2)) & 0xF) | (((scales_h >> 2 * ib) & 3) << 4);
            const float dl = d * (float)(ls - 32);
            for (int j = 0; j < 16; ++j) {
                x[j] = dl * (float)k_iq4xs_values[qs[j] & 0xF];
                x[j + 16] = dl * (float)k_iq4xs_values[qs[j] >> 4];
            }
        }
    }
}

/* Q8_KV row: [float d][int32 sum of the quants][n int8]; the sum is for the dot products
 * only, the values are d * q. */
void ek_dequantize_row_q8_kv(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const float d = ek_rdf32(y);
    const int8_t *q = (const int8_t *)(y + 8);
    for (int64_t j = 0; j < n; ++j) x[j] = d * (float)q[j];
}
