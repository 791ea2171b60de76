/* Legacy 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q6_0, Q8_0 and IQ4_NL.
 *
 * The formats come from ggml / llama.cpp (Q4_0 .. Q8_0, IQ4_NL); Q6_0 and the details
 * of the importance-matrix (imatrix) quantizers follow ik_llama.cpp. This file is an
 * independent implementation written to reproduce, byte for byte, what that reference's
 * ggml_quantize_chunk writes when built with -ffp-contract=off. Every float expression is
 * therefore spelled out in the reference's evaluation order (single float operations,
 * left to right, no fused multiply-add); reordering any of them changes bytes.
 *
 * Block layouts (little-endian, fp16 = IEEE binary16):
 *   Q4_0   {d; qs[16]}            18 B   x = d*(q-8)
 *   Q4_1   {d; m; qs[16]}         20 B   x = d*q + m
 *   Q5_0   {d; qh[4]; qs[16]}     22 B   x = d*(q-16), 5th bits in a 32-bit mask
 *   Q5_1   {d; m; qh[4]; qs[16]}  24 B   x = d*q + m
 *   Q6_0   {d; qh[8]; qs[16]}     26 B   x = d*(q-32), bits 4-5 packed two per nibble
 *   Q8_0   {d; qs[32] int8}       34 B   x = d*q
 *   IQ4_NL {d; qs[16]}            18 B   x = d*T[q], T the 16-entry non-linear table
 * In every 4-bit array byte j holds element j (low nibble) and element j+16 (high).
 */
#include <float.h>
#include "ek_common.h"

#define QK 32

/* The IQ4_NL code book (same values as the base half of the IQ4 tables). */
static const int8_t k_iq4nl_values[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113
};

/* Below this the symmetric searches treat a block as all zeros (ggml's GROUP_MAX_EPS). */
#define EK_GROUP_MAX_EPS 1e-15f

/* Pack 32 codes (each < 16) as two nibbles per byte: element j low, j+16 high. */
static void pack_nibbles(uint8_t *qs, const uint8_t *L) {
    for (int j = 0; j < QK / 2; ++j) qs[j] = (uint8_t)((L[j] & 0x0F) | ((L[j + QK / 2] & 0x0F) << 4));
}

/* Q5_*: low nibbles as above, bit 4 of element e goes to bit e of a 32-bit mask. */
static void pack_q5(uint8_t *qs, uint8_t *qh, const uint8_t *L) {
    uint32_t mask = 0;
    pack_nibbles(qs, L);
    for (int j = 0; j < QK; ++j) mask |= (uint32_t)((L[j] >> 4) & 1) << j;
    ek_wr32(qh, mask);
}

/* Q6_0: bits 4-5 of elements j and j+16 form a 4-bit group (j's bits low); groups of
 * j < 8 go to the low nibble of qh[j], groups of 8 <= j < 16 to the high nibble of qh[j-8]. */
static void pack_q6(uint8_t *qs, uint8_t *qh, const uint8_t *L) {
    pack_nibbles(qs, L);
    memset(qh, 0, 8);
    for (int j = 0; j < QK / 2; ++j) {
        uint8_t h = (uint8_t)(((L[j] >> 4) & 3) | (((L[j + QK / 2] >> 4) & 3) << 2));
        qh[j % 8] |= (uint8_t)(h << (4 * (j / 8)));
    }
}

/* Sum of squares of the whole row, then divided by its length: the row-level variance
 * term the imatrix weights use (sequential float accumulation, as the reference). */
static float row_sigma2(const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t j = 0; j < n; ++j) s += x[j] * x[j];
    return s / (float)n;
}

/* imatrix weight of one element: qw * sqrt(sigma2 + x^2). */
static void imatrix_weights(float *w, const float *xb, const float *qw, float sigma2) {
    for (int j = 0; j < QK; ++j) w[j] = qw[j] * sqrtf(sigma2 + xb[j] * xb[j]);
}

/* ---------------------------------------------------------------------------------------
 * Weighted symmetric scale search (the reference's make_qx_quants with explicit weights).
 * Codes are l in [-nmax, nmax-1], stored as l + nmax. The scale starts from -nmax/max
 * (max = signed value of largest magnitude) and 18 nearby reciprocal scales are tried;
 * the least-squares optimal scale of the best candidate is returned.
 * ------------------------------------------------------------------------------------- */
static inline int clamp_sym(int l, int nmax) {
    if (l > nmax - 1) l = nmax - 1;
    if (l < -nmax) l = -nmax;
    return l;
}

static float weighted_sym_scale(int n, int nmax, const float *x, const float *w, uint8_t *L) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < EK_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = -(float)nmax / max;
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        int l = clamp_sym(ek_nearest_int(iscale * x[i]), nmax);
        L[i] = (uint8_t)(l + nmax);
        sumlx += w[i] * x[i] * (float)l;
        suml2 += w[i] * (float)l * (float)l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = 0.0f; suml2 = 0.0f;
        for (int i = 0; i < n; ++i) {
            int l = clamp_sym(ek_nearest_int(iscale * x[i]), nmax);
            sumlx += w[i] * x[i] * (float)l;
            suml2 += w[i] * (float)l * (float)l;
        }
        /* compare sumlx^2/suml2 > best without dividing */
        if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i)
                L[i] = (uint8_t)(nmax + clamp_sym(ek_nearest_int(iscale * x[i]), nmax));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* ---------------------------------------------------------------------------------------
 * Weighted affine search (the reference's make_qkx3_quants with explicit weights):
 * x ~ scale*l + min with l in [0, nmax], min <= 0. Tries nstep+1 reciprocal scales
 * (rmin + rdelta*is + nmax)/(max - min), solving the 2x2 weighted least-squares problem
 * for each and keeping the one with the smallest weighted squared error.
 * Returns the scale; *neg_min receives -min (>= 0).
 * ------------------------------------------------------------------------------------- */
static inline int clamp_aff(int l, int nmax) { return l < 0 ? 0 : (l > nmax ? nmax : l); }

static float weighted_affine_scale(int n, int nmax, const float *x, const float *w, uint8_t *L,
                                   float *neg_min, float rmin, float rdelta, int nstep) {
    uint8_t Laux[QK];
    float min = x[0], max = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0.0f) min = 0.0f;
    if (max <= min) {
        memset(L, 0, (size_t)n);
        *neg_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1.0f / iscale;
    float best_err = 0.0f;
    for (int i = 0; i < n; ++i) {
        int l = clamp_aff(ek_nearest_int(iscale * (x[i] - min)), nmax);
        L[i] = (uint8_t)l;
        float diff = scale * (float)L[i] + min - x[i];
        best_err += w[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < n; ++i) {
            int l = clamp_aff(ek_nearest_int(iscale * (x[i] - min)), nmax);
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * (float)l;
            sum_l2 += w[i] * (float)l * (float)l;
            sum_xl += w[i] * (float)l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0.0f) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0.0f) {
                /* the model requires min <= 0: refit the scale alone */
                this_min = 0.0f;
                this_scale = sum_xl / sum_l2;
            }
            float err = 0.0f;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if (err < best_err) {
                memcpy(L, Laux, (size_t)n);
                best_err = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *neg_min = -min;
    return scale;
}

/* Signed value of the element with the largest magnitude (first one on ties). */
static float signed_absmax(const float *xb) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; ++j) {
        if (amax < fabsf(xb[j])) {
            amax = fabsf(xb[j]);
            max = xb[j];
        }
    }
    return max;
}

/* =========================================================================== Q4_0 */

/* No imatrix: d = max/-8 so that the extreme element maps to code 0; codes by
 * truncation of x/d + 8.5 (which rounds half up), clamped to 15. */
static void q4_0_block_plain(const float *xb, uint8_t *blk) {
    const float max = signed_absmax(xb);
    const float d = max / -8.0f; /* an all-zero block gives -0.0 (fp16 0x8000) */
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t L[QK];
    for (int j = 0; j < QK; ++j) {
        int v = (int)(xb[j] * id + 8.5f);
        L[j] = (uint8_t)(v > 15 ? 15 : v);
    }
    ek_wr16(blk, ek_fp32_to_fp16(d));
    pack_nibbles(blk + 2, L);
}

void ek_quantize_row_q4_0(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q4_0_block_plain(x + ib * QK, y + ib * 18);
        return;
    }
    const float sigma2 = row_sigma2(x, n);
    float w[QK];
    uint8_t L[QK];
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float *xb = x + ib * QK;
        imatrix_weights(w, xb, qw + ib * QK, sigma2);
        float d = weighted_sym_scale(QK, 8, xb, w, L);
        ek_wr16(y + ib * 18, ek_fp32_to_fp16(d));
        pack_nibbles(y + ib * 18 + 2, L);
    }
}

void ek_dequantize_row_q4_0(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib, y += 18, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        for (int j = 0; j < QK / 2; ++j) {
            x[j] = (float)((y[2 + j] & 0x0F) - 8) * d;
            x[j + QK / 2] = (float)((y[2 + j] >> 4) - 8) * d;
        }
    }
}

/* =========================================================================== Q4_1 */

static void min_max(const float *xb, float *pmin, float *pmax) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < QK; ++j) {
        if (xb[j] < min) min = xb[j];
        if (xb[j] > max) max = xb[j];
    }
    *pmin = min;
    *pmax = max;
}

static void q4_1_block_plain(const float *xb, uint8_t *blk) {
    float min, max;
    min_max(xb, &min, &max);
    const float d = (max - min) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t L[QK];
    for (int j = 0; j < QK; ++j) {
        int v = (int)((xb[j] - min) * id + 0.5f);
        L[j] = (uint8_t)(v > 15 ? 15 : v);
    }
    ek_wr16(blk, ek_fp32_to_fp16(d));
    ek_wr16(blk + 2, ek_fp32_to_fp16(min));
    pack_nibbles(blk + 4, L);
}

void ek_quantize_row_q4_1(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q4_1_block_plain(x + ib * QK, y + ib * 20);
        return;
    }
    const float sigma2 = row_sigma2(x, n);
    float w[QK];
    uint8_t L[QK];
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float *xb = x + ib * QK;
        float neg_min;
        imatrix_weights(w, xb, qw + ib * QK, sigma2);
        float d = weighted_affine_scale(QK, 15, xb, w, L, &neg_min, -0.9f, 0.05f, 36);
        ek_wr16(y + ib * 20, ek_fp32_to_fp16(d));
        ek_wr16(y + ib * 20 + 2, ek_fp32_to_fp16(-neg_min));
        pack_nibbles(y + ib * 20 + 4, L);
    }
}

void ek_dequantize_row_q4_1(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib, y += 20, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        const float m = ek_fp16_to_fp32(ek_rd16(y + 2));
        for (int j = 0; j < QK / 2; ++j) {
            x[j] = (float)(y[4 + j] & 0x0F) * d + m;
            x[j + QK / 2] = (float)(y[4 + j] >> 4) * d + m;
        }
    }
}

/* =========================================================================== Q5_0 */

static void q5_0_block_plain(const float *xb, uint8_t *blk) {
    const float max = signed_absmax(xb);
    const float d = max / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t L[QK];
    for (int j = 0; j < QK; ++j) {
        int v = (int)(xb[j] * id + 16.5f);
        L[j] = (uint8_t)(v > 31 ? 31 : v);
    }
    ek_wr16(blk, ek_fp32_to_fp16(d));
    pack_q5(blk + 6, blk + 2, L);
}

void ek_quantize_row_q5_0(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q5_0_block_plain(x + ib * QK, y + ib * 22);
        return;
    }
    const float sigma2 = row_sigma2(x, n);
    float w[QK];
    uint8_t L[QK];
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float *xb = x + ib * QK;
        imatrix_weights(w, xb, qw + ib * QK, sigma2);
        float d = weighted_sym_scale(QK, 16, xb, w, L);
        ek_wr16(y + ib * 22, ek_fp32_to_fp16(d));
        pack_q5(y + ib * 22 + 6, y + ib * 22 + 2, L);
    }
}

void ek_dequantize_row_q5_0(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib, y += 22, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        const uint32_t qh = ek_rd32(y + 2);
        for (int j = 0; j < QK / 2; ++j) {
            int h0 = (int)((qh >> j) & 1) << 4;
            int h1 = (int)((qh >> (j + 16)) & 1) << 4;
            x[j] = (float)(((y[6 + j] & 0x0F) | h0) - 16) * d;
            x[j + QK / 2] = (float)(((y[6 + j] >> 4) | h1) - 16) * d;
        }
    }
}

/* =========================================================================== Q5_1 */

static void q5_1_block_plain(const float *xb, uint8_t *blk) {
    float min, max;
    min_max(xb, &min, &max);
    const float d = (max - min) / 31.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t L[QK];
    /* no clamp here in the reference: (x-min)*id + 0.5 stays below 32 for finite input,
     * and the uint8 conversion keeps the low bits of the truncated value */
    for (int j = 0; j < QK; ++j) L[j] = (uint8_t)(int)((xb[j] - min) * id + 0.5f);
    ek_wr16(blk, ek_fp32_to_fp16(d));
    ek_wr16(blk + 2, ek_fp32_to_fp16(min));
    pack_q5(blk + 8, blk + 4, L);
}

void ek_quantize_row_q5_1(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q5_1_block_plain(x + ib * QK, y + ib * 24);
        return;
    }
    const float sigma2 = row_sigma2(x, n);
    float w[QK];
    uint8_t L[QK];
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float *xb = x + ib * QK;
        float neg_min;
        imatrix_weights(w, xb, qw + ib * QK, sigma2);
        float d = weighted_affine_scale(QK, 31, xb, w, L, &neg_min, -0.9f, 0.05f, 36);
        ek_wr16(y + ib * 24, ek_fp32_to_fp16(d));
        ek_wr16(y + ib * 24 + 2, ek_fp32_to_fp16(-neg_min));
        pack_q5(y + ib * 24 + 8, y + ib * 24 + 4, L);
    }
}

void ek_dequantize_row_q5_1(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib, y += 24, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        const float m = ek_fp16_to_fp32(ek_rd16(y + 2));
        const uint32_t qh = ek_rd32(y + 4);
        for (int j = 0; j < QK / 2; ++j) {
            int h0 = (int)((qh >> j) & 1) << 4;
            int h1 = (int)((qh >> (j + 16)) & 1) << 4;
            x[j] = (float)((y[8 + j] & 0x0F) | h0) * d + m;
            x[j + QK / 2] = (float)((y[8 + j] >> 4) | h1) * d + m;
        }
    }
}

/* =========================================================================== Q6_0 */

static void q6_0_block_plain(const float *xb, uint8_t *blk) {
    const float max = signed_absmax(xb);
    const float d = max / -32.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t L[QK];
    for (int j = 0; j < QK; ++j) {
        int v = (int)(xb[j] * id + 32.5f);
        L[j] = (uint8_t)(v > 63 ? 63 : v);
    }
    ek_wr16(blk, ek_fp32_to_fp16(d));
    pack_q6(blk + 10, blk + 2, L);
}

void ek_quantize_row_q6_0(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q6_0_block_plain(x + ib * QK, y + ib * 26);
        return;
    }
    const float sigma2 = row_sigma2(x, n);
    float w[QK];
    uint8_t L[QK];
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float *xb = x + ib * QK;
        imatrix_weights(w, xb, qw + ib * QK, sigma2);
        float d = weighted_sym_scale(QK, 32, xb, w, L);
        ek_wr16(y + ib * 26, ek_fp32_to_fp16(d));
        pack_q6(y + ib * 26 + 10, y + ib * 26 + 2, L);
    }
}

void ek_dequantize_row_q6_0(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib, y += 26, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        const uint8_t *qh = y + 2, *qs = y + 10;
        for (int j = 0; j < QK / 2; ++j) {
            const int h = qh[j % 8] >> (4 * (j / 8));
            x[j] = (float)(((qs[j] & 0x0F) | ((h << 4) & 0x30)) - 32) * d;
            x[j + QK / 2] = (float)(((qs[j] >> 4) | ((h << 2) & 0x30)) - 32) * d;
        }
    }
}

/* =========================================================================== Q8_0 */

/* The reference ignores the importance matrix for Q8_0: d = amax/127, codes roundf(x/d)
 * (round half away from zero). */
void ek_quantize_row_q8_0(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags; (void)qw;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float *xb = x + ib * QK;
        uint8_t *blk = y + ib * 34;
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) {
            float a = fabsf(xb[j]);
            amax = amax > a ? amax : a;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        ek_wr16(blk, ek_fp32_to_fp16(d));
        for (int j = 0; j < QK; ++j) blk[2 + j] = (uint8_t)(int8_t)(int)roundf(xb[j] * id);
    }
}

void ek_dequantize_row_q8_0(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib, y += 34, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        for (int j = 0; j < QK; ++j) x[j] = (float)(int8_t)y[2 + j] * d;
    }
}

/* ========================================================================= IQ4_NL */

/* Index of the table entry nearest to v; on an exact tie the upper entry wins. Out of
 * range values clamp to the ends. The reference looks the candidate pair up through
 * (int)v, which on x86 turns NaN and |v| >= 2^31 into INT_MIN and thus index 0; that
 * corner is kept so degenerate blocks encode the same. */
static inline int iq4nl_best_index(float v) {
    const int8_t *t = k_iq4nl_values;
    if (!(v > -2147483648.0f && v < 2147483648.0f)) return 0;
    if (v <= (float)t[0]) return 0;
    if (v >= (float)t[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (v < (float)t[mid]) hi = mid; else lo = mid;
    }
    return v - (float)t[lo] < (float)t[hi] - v ? lo : hi;
}

/* One 32-element block: start from d = max/127 (the largest magnitude lands on -127 or
 * +113 side as its sign dictates), then try the 15 reciprocal scales (k-127)/max,
 * k = -7..7, keeping the weighted least-squares scale with the best score; the codes are
 * re-derived from the final float scale. */
static void iq4nl_block(const float *xb, const float *qw, uint8_t *blk) {
    const int ntry = 7;
    const int8_t *t = k_iq4nl_values;
    float w[QK];
    uint8_t L[QK];

    float sigma2 = 0.0f;
    for (int j = 0; j < QK; ++j) sigma2 += xb[j] * xb[j];
    sigma2 *= 2.0f / (float)QK;
    if (qw) {
        for (int j = 0; j < QK; ++j) w[j] = qw[j] * sqrtf(sigma2 + xb[j] * xb[j]);
    } else {
        for (int j = 0; j < QK; ++j) w[j] = xb[j] * xb[j];
    }
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; ++j) {
        float ax = fabsf(xb[j]);
        if (ax > amax) { amax = ax; max = xb[j]; }
    }
    float scale = 0.0f;
    if (!(amax < EK_GROUP_MAX_EPS)) {
        float d = -max / (float)t[0];
        float id = 1.0f / d;
        float sumqx = 0.0f, sumq2 = 0.0f;
        for (int j = 0; j < QK; ++j) {
            int l = iq4nl_best_index(id * xb[j]);
            float q = (float)t[l];
            sumqx += w[j] * q * xb[j];
            sumq2 += w[j] * q * q;
        }
        d = sumqx / sumq2;
        float best = d * sumqx;
        for (int itry = -ntry; itry <= ntry; ++itry) {
            id = (float)(itry + t[0]) / max;
            sumqx = 0.0f; sumq2 = 0.0f;
            for (int j = 0; j < QK; ++j) {
                int l = iq4nl_best_index(id * xb[j]);
                float q = (float)t[l];
                sumqx += w[j] * q * xb[j];
                sumq2 += w[j] * q * q;
            }
            if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scale = d;
    }
    ek_wr16(blk, ek_fp32_to_fp16(scale));
    const float id = scale != 0.0f ? 1.0f / scale : 0.0f;
    for (int j = 0; j < QK; ++j) L[j] = (uint8_t)iq4nl_best_index(id * xb[j]);
    pack_nibbles(blk + 2, L);
}

void ek_quantize_row_iq4_nl(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib)
        iq4nl_block(x + ib * QK, qw ? qw + ib * QK : NULL, y + ib * 18);
}

void ek_dequantize_row_iq4_nl(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib, y += 18, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        for (int j = 0; j < QK / 2; ++j) {
            x[j] = d * (float)k_iq4nl_values[y[2 + j] & 0x0F];
            x[j + QK / 2] = d * (float)k_iq4nl_values[y[2 + j] >> 4];
        }
    }
}
