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
 *
 * Which quantizer runs (as in the reference's quantize_<type>, one row at a time):
 *   Q4_0, Q5_0   no imatrix: closed form d = max/-8 (-16); imatrix: weighted symmetric search
 *   Q4_1, Q5_1   no imatrix: closed form from min/max;      imatrix: weighted affine search
 *   Q6_0         always the weighted symmetric search (weights x^2 without an imatrix)
 *   Q8_0         always d = amax/127 (the importance matrix is ignored)
 *   IQ4_NL       always its table search (weights x^2 without an imatrix)
 * The imatrix weight of element j is qw[j]*sqrt(sigma2 + x[j]^2), sigma2 the row's mean
 * square (IQ4_NL: twice the block's mean square).
 */
#include <float.h>
#include "ek_common.h"
#include "ek_simd.h"

#define QK 32

/* The IQ4_NL code book (same values as the base half of the IQ4 tables). */
static const int8_t k_iq4nl_values[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113
};

/* Below this the symmetric searches treat a block as all zeros (ggml's GROUP_MAX_EPS). */
#define EK_GROUP_MAX_EPS 1e-15f

/* float -> int conversion as the reference's casts compile on x86-64 (cvttss2si):
 * truncation toward zero, and INT32_MIN for NaN and values outside the int32 range.
 * The reference casts straight to int8_t/uint8_t, which keeps the low byte of this.
 * Finite, well-scaled blocks never leave the small-integer range; the exact corner
 * behaviour only matters for degenerate (e.g. subnormal) block maxima. */
static inline int32_t cvtt_i32(float f) {
    if (f >= -2147483648.0f && f < 2147483648.0f) return (int32_t)f;
    return INT32_MIN;
}
static inline int low_i8(float f) { return (int8_t)(uint8_t)(uint32_t)cvtt_i32(f); }
static inline int low_u8(float f) { return (uint8_t)(uint32_t)cvtt_i32(f); }

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
 * Weighted symmetric scale search (the reference's make_qx_quants with explicit weights,
 * in the form ik_llama.cpp uses since its "quantization improvements"). Codes are
 * l in [-nmax, nmax-1], stored as l + nmax.
 *  1. Start from the reciprocal scale -nmax/max (max = signed value of largest magnitude).
 *  2. For is = -9..9 try two reciprocal scales, -(nmax + is/10)/max (the extreme element
 *     lands on -nmax) and (nmax - 1 + is/10)/max (it lands on nmax-1), keeping the codes
 *     whose least-squares scale sumlx/suml2 maximises sumlx^2/suml2.
 *  3. Greedy refinement: repeatedly move the single code with the largest weighted error
 *     gradient one step in the gradient's direction while that improves the score.
 * All sums are float, accumulated in element order.
 * ------------------------------------------------------------------------------------- */
static inline int clamp_sym(int l, int nmax) {
    if (l > nmax - 1) l = nmax - 1;
    if (l < -nmax) l = -nmax;
    return l;
}

/* Weighted sums sum w*x*l and sum w*l*l for the codes l = RNE(iscale*x) clamped to
 * [-nmax, nmax-1], in element order. (Codes are recomputed only for an accepted
 * candidate; storing them for every candidate measured slower.) */
static inline void sym_sums(int n, int nmax, const float *x, const float *w, float iscale,
                            float *psumlx, float *psuml2) {
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        int l = clamp_sym(ek_nearest_int(iscale * x[i]), nmax);
        sumlx += w[i] * x[i] * (float)l;
        suml2 += w[i] * (float)l * (float)l;
    }
    *psumlx = sumlx;
    *psuml2 = suml2;
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
    float iscale = (float)(-nmax) / max;
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        int l = clamp_sym(ek_nearest_int(iscale * x[i]), nmax);
        L[i] = (uint8_t)(l + nmax);
        sumlx += w[i] * x[i] * (float)l;
        suml2 += w[i] * (float)l * (float)l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    float best_sumlx = sumlx, best_suml2 = suml2;
    for (int is = -9; is <= 9; ++is) {
        for (int side = 0; side < 2; ++side) {
            iscale = side == 0 ? -((float)nmax + 0.1f * (float)is) / max
                               : ((float)(nmax - 1) + 0.1f * (float)is) / max;
            sym_sums(n, nmax, x, w, iscale, &sumlx, &suml2);
            /* sumlx^2/suml2 > best, compared without dividing */
            if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
                for (int i = 0; i < n; ++i)
                    L[i] = (uint8_t)(nmax + clamp_sym(ek_nearest_int(iscale * x[i]), nmax));
                scale = sumlx / suml2;
                best = scale * sumlx;
                best_sumlx = sumlx;
                best_suml2 = suml2;
            }
        }
    }
    sumlx = best_sumlx;
    suml2 = best_suml2;
    for (int iter = 0; iter < n * (2 * nmax - 1); ++iter) {
        float abs_gmax = 0.0f, gmax = 0.0f;
        int best_j = -1;
        for (int j = 0; j < n; ++j) {
            int l = L[j] - nmax;
            float g = scale * w[j] * (x[j] - scale * (float)l);
            if ((g > 0.0f && l < nmax - 1) || (g < 0.0f && l > -nmax)) {
                float ag = fabsf(g);
                if (ag > abs_gmax) { abs_gmax = ag; gmax = g; best_j = j; }
            }
        }
        if (best_j < 0) break;
        int l = L[best_j] - nmax;
        float new_sumlx = sumlx, new_suml2 = suml2;
        if (gmax > 0.0f) {
            new_sumlx += w[best_j] * x[best_j];
            new_suml2 += w[best_j] * (float)(2 * l + 1);
            l += 1;
        } else {
            new_sumlx -= w[best_j] * x[best_j];
            new_suml2 -= w[best_j] * (float)(2 * l - 1);
            l -= 1;
        }
        if (!(new_suml2 > 0.0f && new_sumlx * new_sumlx > best * new_suml2)) break;
        sumlx = new_sumlx;
        suml2 = new_suml2;
        scale = sumlx / suml2;
        best = scale * sumlx;
        L[best_j] = (uint8_t)(l + nmax);
    }
    return scale;
}

/* ---------------------------------------------------------------------------------------
 * Weighted affine search (the reference's make_qkx3_quants with explicit weights, in its
 * ik_llama.cpp form): x ~ scale*l + min with l in [0, nmax], min <= 0.
 *  1. Codes from the full range [min, max]; their weighted squared error is the baseline.
 *  2. nstep+1 reciprocal scales (rmin + rdelta*is + nmax)/(max - min); for each the 2x2
 *     weighted least-squares (scale, min) is solved and kept if its error is smaller.
 *  3. Greedy refinement: move the code with the largest residual one step while the
 *     least-squares fit of the new codes improves.
 * The statistics are accumulated in double (as the reference does); the search's
 * reciprocal scales and the residuals stay float.
 * Returns the scale; *neg_min receives -min (>= 0).
 * ------------------------------------------------------------------------------------- */
static inline int clamp_aff(int l, int nmax) { return l < 0 ? 0 : (l > nmax ? nmax : l); }

/* Weighted squared error of scale*l + min expanded in the accumulated moments. */
static inline double affine_err(double sum_x2, double sum_x, double sum_w, double sum_l, double sum_l2,
                                double sum_xl, double s, double m) {
    return sum_x2 - 2 * s * sum_xl - 2 * m * sum_x + 2 * s * m * sum_l + s * s * sum_l2 + m * m * sum_w;
}

/* Closed-form weighted least squares for (scale, min); returns the system's determinant
 * D (the fit is meaningful only for D > 0; callers test it the way the reference does). */
static inline double affine_fit(double sum_w, double sum_x, double sum_l, double sum_l2, double sum_xl,
                                double *ps, double *pm) {
    double D = sum_w * sum_l2 - sum_l * sum_l;
    double s = (sum_w * sum_xl - sum_x * sum_l) / D;
    double m = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    if (m > 0) {
        /* the model requires min <= 0: refit the scale alone */
        m = 0;
        s = sum_xl / sum_l2;
    }
    *ps = s;
    *pm = m;
    return D;
}

static float weighted_affine_scale(int n, int nmax, const float *x, const float *w, uint8_t *L,
                                   float *neg_min, float rmin, float rdelta, int nstep) {
    uint8_t Laux[QK];
    float min = x[0], max = x[0];
    double sum_w = (double)w[0];
    double sum_x = sum_w * (double)x[0];
    double sum_x2 = sum_w * (double)x[0] * (double)x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += (double)w[i];
        sum_x += (double)w[i] * (double)x[i];
        sum_x2 += (double)w[i] * (double)x[i] * (double)x[i];
    }
    if (min > 0.0f) min = 0.0f;
    if (max - min < 1e-10f) {
        memset(L, 0, (size_t)n);
        *neg_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1.0f / iscale;
    double best_err = 0;
    for (int i = 0; i < n; ++i) {
        L[i] = (uint8_t)clamp_aff(ek_nearest_int(iscale * (x[i] - min)), nmax);
        double diff = (double)scale * (double)L[i] + (double)min - (double)x[i];
        best_err += (double)w[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        double sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = clamp_aff(ek_nearest_int(iscale * (x[i] - min)), nmax);
            Laux[i] = (uint8_t)l;
            sum_l += (double)w[i] * (double)l;
            sum_l2 += (double)w[i] * (double)l * (double)l;
            sum_xl += (double)w[i] * (double)l * (double)x[i];
        }
        double s, m;
        if (!(affine_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl, &s, &m) > 0)) continue;
        double err = affine_err(sum_x2, sum_x, sum_w, sum_l, sum_l2, sum_xl, s, m);
        if (err < best_err) {
            memcpy(L, Laux, (size_t)n);
            best_err = err;
            scale = (float)s;
            min = (float)m;
        }
    }

    double sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
        double wi = (double)w[i];
        sum_l += wi * (double)L[i];
        sum_l2 += wi * (double)L[i] * (double)L[i];
        sum_xl += wi * (double)L[i] * (double)x[i];
    }
    /* score = -(error - sum_x2): larger is better */
    double best = 2 * (double)scale * sum_xl + 2 * (double)min * sum_x - 2 * (double)scale * (double)min * sum_l
                - (double)scale * (double)scale * sum_l2 - (double)min * (double)min * sum_w;
    int last_j = -1, last_dir = 0;
    for (int itry = 0; itry < nmax * n; ++itry) {
        float gmax = 0.0f;
        int best_j = -1, dir = 0;
        for (int j = 0; j < n; ++j) {
            float g = x[j] - scale * (float)L[j] - min;
            if (g > 0.0f && L[j] < nmax && g > gmax) {
                gmax = g; best_j = j; dir = 1;
            } else if (g < 0.0f && L[j] > 0 && -g > gmax) {
                gmax = -g; best_j = j; dir = -1;
            }
        }
        /* stop when nothing can move or the search would undo its previous step */
        if (best_j < 0 || (best_j == last_j && dir == -last_dir)) break;
        double wj = (double)w[best_j];
        sum_l += wj * (double)dir;
        sum_l2 += wj * (double)(2 * L[best_j] * dir + 1);
        sum_xl += wj * (double)x[best_j] * (double)dir;
        double s, m;
        if (affine_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl, &s, &m) <= 0) break;
        if (s < 0) break;
        double score = 2 * s * sum_xl + 2 * m * sum_x - 2 * s * m * sum_l - s * s * sum_l2 - m * m * sum_w;
        if (score <= best) break;
        best = score;
        scale = (float)s;
        min = (float)m;
        L[best_j] = (uint8_t)(L[best_j] + dir);
        last_j = best_j;
        last_dir = dir;
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
    ek_wr16(blk, ek_fp32_to_fp16(d));
    for (int j = 0; j < QK / 2; ++j) {
        /* MIN(15, (int8_t)v) then OR-ed unmasked, exactly like the reference */
        int v0 = low_i8(xb[j] * id + 8.5f), v1 = low_i8(xb[j + QK / 2] * id + 8.5f);
        uint8_t q0 = (uint8_t)(v0 < 15 ? v0 : 15), q1 = (uint8_t)(v1 < 15 ? v1 : 15);
        blk[2 + j] = (uint8_t)(q0 | (q1 << 4));
    }
}

int ek_quantize_row_q4_0(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q4_0_block_plain(x + ib * QK, y + ib * 18);
        return EK_OK;
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
    return EK_OK;
}

#ifdef EK_HAVE_AVX512_KERNELS
static EK_AVX512 void q4_0_row_avx512(const uint8_t *y, float *x, int64_t nb) {
    const __m128i lo = _mm_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi32(8);
    for (int64_t ib = 0; ib < nb; ++ib, y += 18, x += QK) {
        const __m512 d = _mm512_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        const __m128i qs = _mm_loadu_si128((const __m128i *)(y + 2));
        const __m512i q0 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(qs, lo)), eight);
        const __m512i q1 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), lo)), eight);
        _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d));
        _mm512_storeu_ps(x + QK / 2, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d));
    }
}
#endif

void ek_dequantize_row_q4_0(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
#ifdef EK_HAVE_AVX512_KERNELS
    if (ek_have_avx512()) {
        q4_0_row_avx512(y, x, nb);
        return;
    }
#endif
#ifdef EK_HAVE_SSE2
    /* (float)(q - 8) * d: the int subtraction, an exact conversion, one mulps */
    const __m128i eight = _mm_set1_epi8(8);
    for (int64_t ib = 0; ib < nb; ++ib, y += 18, x += QK) {
        const __m128 d = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        const __m128i qs = _mm_loadu_si128((const __m128i *)(y + 2));
        ek_sse_i8x16_mul(x, _mm_sub_epi8(ek_sse_lo_nibbles(qs), eight), d);
        ek_sse_i8x16_mul(x + QK / 2, _mm_sub_epi8(ek_sse_hi_nibbles(qs), eight), d);
    }
#else
    for (int64_t ib = 0; ib < nb; ++ib, y += 18, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        for (int j = 0; j < QK / 2; ++j) {
            x[j] = (float)((y[2 + j] & 0x0F) - 8) * d;
            x[j + QK / 2] = (float)((y[2 + j] >> 4) - 8) * d;
        }
    }
#endif
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
    ek_wr16(blk, ek_fp32_to_fp16(d));
    ek_wr16(blk + 2, ek_fp32_to_fp16(min));
    for (int j = 0; j < QK / 2; ++j) {
        int v0 = low_i8((xb[j] - min) * id + 0.5f), v1 = low_i8((xb[j + QK / 2] - min) * id + 0.5f);
        uint8_t q0 = (uint8_t)(v0 < 15 ? v0 : 15), q1 = (uint8_t)(v1 < 15 ? v1 : 15);
        blk[4 + j] = (uint8_t)(q0 | (q1 << 4));
    }
}

int ek_quantize_row_q4_1(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q4_1_block_plain(x + ib * QK, y + ib * 20);
        return EK_OK;
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
    return EK_OK;
}

#ifdef EK_HAVE_AVX512_KERNELS
static EK_AVX512 void q4_1_row_avx512(const uint8_t *y, float *x, int64_t nb) {
    const __m128i lo = _mm_set1_epi8(0x0F);
    for (int64_t ib = 0; ib < nb; ++ib, y += 20, x += QK) {
        const __m512 d = _mm512_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        const __m512 m = _mm512_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y + 2)));
        const __m128i qs = _mm_loadu_si128((const __m128i *)(y + 4));
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, lo)));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), lo)));
        _mm512_storeu_ps(x, _mm512_add_ps(_mm512_mul_ps(q0, d), m));
        _mm512_storeu_ps(x + QK / 2, _mm512_add_ps(_mm512_mul_ps(q1, d), m));
    }
}
#endif

void ek_dequantize_row_q4_1(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
#ifdef EK_HAVE_AVX512_KERNELS
    if (ek_have_avx512()) {
        q4_1_row_avx512(y, x, nb);
        return;
    }
#endif
#ifdef EK_HAVE_SSE2
    /* mulps then addps: the scalar (float)q * d + m, rounded twice, bit for bit */
    for (int64_t ib = 0; ib < nb; ++ib, y += 20, x += QK) {
        const __m128 d = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        const __m128 m = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y + 2)));
        const __m128i qs = _mm_loadu_si128((const __m128i *)(y + 4));
        ek_sse_u8x16_mul_add(x, ek_sse_lo_nibbles(qs), d, m);
        ek_sse_u8x16_mul_add(x + QK / 2, ek_sse_hi_nibbles(qs), d, m);
    }
#else
    for (int64_t ib = 0; ib < nb; ++ib, y += 20, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        const float m = ek_fp16_to_fp32(ek_rd16(y + 2));
        for (int j = 0; j < QK / 2; ++j) {
            x[j] = (float)(y[4 + j] & 0x0F) * d + m;
            x[j + QK / 2] = (float)(y[4 + j] >> 4) * d + m;
        }
    }
#endif
}

/* =========================================================================== Q5_0 */

static void q5_0_block_plain(const float *xb, uint8_t *blk) {
    const float max = signed_absmax(xb);
    const float d = max / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t L[QK];
    for (int j = 0; j < QK; ++j) {
        int v = low_i8(xb[j] * id + 16.5f);
        L[j] = (uint8_t)(v < 31 ? v : 31);
    }
    ek_wr16(blk, ek_fp32_to_fp16(d));
    pack_q5(blk + 6, blk + 2, L);
}

int ek_quantize_row_q5_0(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q5_0_block_plain(x + ib * QK, y + ib * 22);
        return EK_OK;
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
    return EK_OK;
}

void ek_dequantize_row_q5_0(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
#ifdef EK_HAVE_SSE2
    /* (float)(q - 16) * d with q = nibble | fifth bit: int ops, exact conversion, mulps */
    const __m128i sixteen = _mm_set1_epi8(16);
    for (int64_t ib = 0; ib < nb; ++ib, y += 22, x += QK) {
        const __m128 d = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        const uint32_t qh = ek_rd32(y + 2);
        const __m128i qs = _mm_loadu_si128((const __m128i *)(y + 6));
        const __m128i q0 = _mm_or_si128(ek_sse_lo_nibbles(qs), ek_sse_bits_to_0x10(qh));
        const __m128i q1 = _mm_or_si128(ek_sse_hi_nibbles(qs), ek_sse_bits_to_0x10(qh >> 16));
        ek_sse_i8x16_mul(x, _mm_sub_epi8(q0, sixteen), d);
        ek_sse_i8x16_mul(x + QK / 2, _mm_sub_epi8(q1, sixteen), d);
    }
#else
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
#endif
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
    for (int j = 0; j < QK; ++j) L[j] = (uint8_t)low_u8((xb[j] - min) * id + 0.5f);
    ek_wr16(blk, ek_fp32_to_fp16(d));
    ek_wr16(blk + 2, ek_fp32_to_fp16(min));
    pack_q5(blk + 8, blk + 4, L);
}

int ek_quantize_row_q5_1(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    if (!qw) {
        for (int64_t ib = 0; ib < nb; ++ib) q5_1_block_plain(x + ib * QK, y + ib * 24);
        return EK_OK;
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
    return EK_OK;
}

void ek_dequantize_row_q5_1(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
#ifdef EK_HAVE_SSE2
    /* mulps then addps: the scalar (float)q * d + m bit for bit */
    for (int64_t ib = 0; ib < nb; ++ib, y += 24, x += QK) {
        const __m128 d = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        const __m128 m = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y + 2)));
        const uint32_t qh = ek_rd32(y + 4);
        const __m128i qs = _mm_loadu_si128((const __m128i *)(y + 8));
        ek_sse_u8x16_mul_add(x, _mm_or_si128(ek_sse_lo_nibbles(qs), ek_sse_bits_to_0x10(qh)), d, m);
        ek_sse_u8x16_mul_add(x + QK / 2, _mm_or_si128(ek_sse_hi_nibbles(qs), ek_sse_bits_to_0x10(qh >> 16)), d, m);
    }
#else
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
#endif
}

/* =========================================================================== Q6_0 */

/* Q6_0 always goes through the weighted search: with an imatrix the weights are
 * qw*sqrt(sigma2 + x^2), without one they are x^2 (the reference has no plain max/-32
 * path in its quantize_q6_0). */
int ek_quantize_row_q6_0(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    const float sigma2 = qw ? row_sigma2(x, n) : 0.0f;
    float w[QK];
    uint8_t L[QK];
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float *xb = x + ib * QK;
        if (qw) {
            imatrix_weights(w, xb, qw + ib * QK, sigma2);
        } else {
            for (int j = 0; j < QK; ++j) w[j] = xb[j] * xb[j];
        }
        float d = weighted_sym_scale(QK, 32, xb, w, L);
        ek_wr16(y + ib * 26, ek_fp32_to_fp16(d));
        pack_q6(y + ib * 26 + 10, y + ib * 26 + 2, L);
    }
    return EK_OK;
}

void ek_dequantize_row_q6_0(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
#ifdef EK_HAVE_SSE2
    /* (float)(q - 32) * d: int ops, exact conversion, mulps */
    const __m128i c30 = _mm_set1_epi8(0x30), c32 = _mm_set1_epi8(32);
    for (int64_t ib = 0; ib < nb; ++ib, y += 26, x += QK) {
        const __m128 d = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        const __m128i qh8 = _mm_loadl_epi64((const __m128i *)(y + 2));
        const __m128i qs = _mm_loadu_si128((const __m128i *)(y + 10));
        /* h[j] = qh[j % 8] >> (4 * (j / 8)), a 4-bit value per byte */
        const __m128i h = ek_sse_lo_nibbles(_mm_unpacklo_epi64(qh8, _mm_srli_epi16(qh8, 4)));
        const __m128i h_lo = _mm_and_si128(_mm_slli_epi16(h, 4), c30); /* (h << 4) & 0x30 */
        const __m128i h_hi = _mm_and_si128(_mm_slli_epi16(h, 2), c30); /* (h << 2) & 0x30 */
        ek_sse_i8x16_mul(x, _mm_sub_epi8(_mm_or_si128(ek_sse_lo_nibbles(qs), h_lo), c32), d);
        ek_sse_i8x16_mul(x + QK / 2, _mm_sub_epi8(_mm_or_si128(ek_sse_hi_nibbles(qs), h_hi), c32), d);
    }
#else
    for (int64_t ib = 0; ib < nb; ++ib, y += 26, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        const uint8_t *qh = y + 2, *qs = y + 10;
        for (int j = 0; j < QK / 2; ++j) {
            const int h = qh[j % 8] >> (4 * (j / 8));
            x[j] = (float)(((qs[j] & 0x0F) | ((h << 4) & 0x30)) - 32) * d;
            x[j + QK / 2] = (float)(((qs[j] >> 4) | ((h << 2) & 0x30)) - 32) * d;
        }
    }
#endif
}

/* =========================================================================== Q8_0 */

/* The reference ignores the importance matrix for Q8_0: d = amax/127, codes roundf(x/d)
 * (round half away from zero). */
int ek_quantize_row_q8_0(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
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
        for (int j = 0; j < QK; ++j) blk[2 + j] = (uint8_t)low_u8(roundf(xb[j] * id));
    }
    return EK_OK;
}

#ifdef EK_HAVE_AVX512_KERNELS
static EK_AVX512 void q8_0_row_avx512(const uint8_t *y, float *x, int64_t nb) {
    for (int64_t ib = 0; ib < nb; ++ib, y += 34, x += QK) {
        const __m512 d = _mm512_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(y + 2)));
        const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(y + 18)));
        _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d));
        _mm512_storeu_ps(x + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d));
    }
}
#endif

void ek_dequantize_row_q8_0(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
#ifdef EK_HAVE_AVX512_KERNELS
    if (ek_have_avx512()) {
        q8_0_row_avx512(y, x, nb);
        return;
    }
#endif
#ifdef EK_HAVE_SSE2
    /* (float)(int8)q * d: exact sign extension and conversion, one mulps */
    for (int64_t ib = 0; ib < nb; ++ib, y += 34, x += QK) {
        const __m128 d = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        ek_sse_i8x16_mul(x, _mm_loadu_si128((const __m128i *)(y + 2)), d);
        ek_sse_i8x16_mul(x + 16, _mm_loadu_si128((const __m128i *)(y + 18)), d);
    }
#else
    for (int64_t ib = 0; ib < nb; ++ib, y += 34, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        for (int j = 0; j < QK; ++j) x[j] = (float)(int8_t)y[2 + j] * d;
    }
#endif
}

/* ========================================================================= IQ4_NL */

/* Midpoints between consecutive IQ4_NL table values. */
static const float k_iq4nl_mid[15] = {
    -115.5f, -93.5f, -74.0f, -57.0f, -42.0f, -28.5f, -16.0f, -4.5f,
    7.0f, 19.0f, 31.5f, 45.5f, 61.0f, 79.0f, 101.0f
};

/* Index of the table entry nearest to v, the upper one on an exact tie, clamped to the
 * table's ends, i.e. the number of midpoints <= v. The reference finds the candidate
 * pair through (int)v and compares v - t[k] < t[k+1] - v in float; near a midpoint both
 * differences are exact, so that equals counting midpoints. Its (int)v is cvttss2si on
 * x86, which maps NaN and |v| >= 2^31 to INT_MIN and hence to index 0: NaN and -inf
 * count no midpoint here, +inf and v >= 2^31 are special-cased. The count is a
 * branch-free binary search (data-dependent branches dominate the IQ4_NL search
 * otherwise). Checked against the reference's lookup for all 2^32 float bit patterns. */
static inline int iq4nl_best_index(float v) {
    int pos = v >= k_iq4nl_mid[7] ? 8 : 0;
    pos += v >= k_iq4nl_mid[pos + 3] ? 4 : 0;
    pos += v >= k_iq4nl_mid[pos + 1] ? 2 : 0;
    pos += v >= k_iq4nl_mid[pos] ? 1 : 0;
    return v >= 2147483648.0f ? 0 : pos;
}

/* Codes nearest to id*x for a whole block. */
static inline void iq4nl_indices(const float *xb, float id, uint8_t *L) {
    for (int j = 0; j < QK; ++j) L[j] = (uint8_t)iq4nl_best_index(id * xb[j]);
}

/* Weighted sums of q*x and q*q over the block for the codes L, in element order. */
static inline void iq4nl_sums(const float *xb, const float *w, const uint8_t *L, float *psumqx, float *psumq2) {
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < QK; ++j) {
        float q = (float)k_iq4nl_values[L[j]];
        sumqx += w[j] * q * xb[j];
        sumq2 += w[j] * q * q;
    }
    *psumqx = sumqx;
    *psumq2 = sumq2;
}

/* One 32-element block (ik_llama.cpp's quantize_row_iq4_nl_impl with one block per
 * super-block and ntry = 7):
 *  1. d = max/127 (max = signed value of largest magnitude), codes nearest to x/d.
 *  2. For k = -7..7 try the reciprocal scales (k - 127)/max and (k + 113)/max (the
 *     extreme element on either end of the table); keep the codes with the best
 *     weighted least-squares score sumqx^2/sumq2.
 *  3. Greedy refinement: among codes whose weighted error gradient points to a
 *     neighbouring table value, move the one needing the smallest step (value gap
 *     divided by gradient), one step at a time, while the score improves.
 *  4. Store the float scale as fp16 and re-derive every code from it. */
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
        float sumqx, sumq2;
        uint8_t Lc[QK];
        iq4nl_indices(xb, id, L);
        iq4nl_sums(xb, w, L, &sumqx, &sumq2);
        d = sumqx / sumq2;
        float best = d * sumqx;
        float best_sumqx = sumqx, best_sumq2 = sumq2;
        for (int itry = -ntry; itry <= ntry; ++itry) {
            for (int end = 0; end < 2; ++end) {
                id = (float)(itry + (end == 0 ? t[0] : t[15])) / max;
                iq4nl_indices(xb, id, Lc);
                iq4nl_sums(xb, w, Lc, &sumqx, &sumq2);
                if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
                    d = sumqx / sumq2;
                    best = d * sumqx;
                    best_sumqx = sumqx;
                    best_sumq2 = sumq2;
                    memcpy(L, Lc, QK);
                }
            }
        }
        sumqx = best_sumqx;
        sumq2 = best_sumq2;
        for (int iter = 0; iter < 32 * QK; ++iter) {
            float min_step = INFINITY;
            int best_j = -1, dir = 0;
            for (int j = 0; j < QK; ++j) {
                float g = d * w[j] * (xb[j] - d * (float)t[L[j]]);
                if (g > 0.0f && L[j] < 15) {
                    float step = (float)(t[L[j] + 1] - t[L[j]]) / g;
                    if (step < min_step) { min_step = step; best_j = j; dir = 1; }
                } else if (g < 0.0f && L[j] > 0) {
                    float step = (float)(t[L[j] - 1] - t[L[j]]) / g;
                    if (step < min_step) { min_step = step; best_j = j; dir = -1; }
                }
            }
            if (best_j < 0) break;
            const int qo = t[L[best_j]], qn = t[L[best_j] + dir];
            float new_sumqx = sumqx + w[best_j] * xb[best_j] * (float)(qn - qo);
            float new_sumq2 = sumq2 + w[best_j] * (float)(qn * qn - qo * qo);
            if (!(new_sumq2 > 0.0f && new_sumqx * new_sumqx > best * new_sumq2)) break;
            sumqx = new_sumqx;
            sumq2 = new_sumq2;
            d = sumqx / sumq2;
            best = d * sumqx;
            L[best_j] = (uint8_t)(L[best_j] + dir);
        }
        scale = d;
    }
    ek_wr16(blk, ek_fp32_to_fp16(scale));
    iq4nl_indices(xb, scale != 0.0f ? 1.0f / scale : 0.0f, L);
    pack_nibbles(blk + 2, L);
}

int ek_quantize_row_iq4_nl(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    const int64_t nb = n / QK;
    for (int64_t ib = 0; ib < nb; ++ib)
        iq4nl_block(x + ib * QK, qw ? qw + ib * QK : NULL, y + ib * 18);
    return EK_OK;
}

void ek_dequantize_row_iq4_nl(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    const int64_t nb = n / QK;
#ifdef EK_HAVE_SSE2
    /* d * (float)T[q]: table values gathered, widened and converted exactly, one mulps
     * (multiplication commutes bit for bit) */
    for (int64_t ib = 0; ib < nb; ++ib, y += 18, x += QK) {
        const __m128 d = _mm_set1_ps(ek_fp16_to_fp32_inl(ek_rd16(y)));
        ek_sse_iq4nl_block(x, y + 2, _mm_setzero_si128(), d, d);
    }
#else
    for (int64_t ib = 0; ib < nb; ++ib, y += 18, x += QK) {
        const float d = ek_fp16_to_fp32(ek_rd16(y));
        for (int j = 0; j < QK / 2; ++j) {
            x[j] = d * (float)k_iq4nl_values[y[2 + j] & 0x0F];
            x[j + QK / 2] = d * (float)k_iq4nl_values[y[2 + j] >> 4];
        }
    }
#endif
}
