/* k-quant formats Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
 *
 * The formats and their quantization algorithms come from ggml / llama.cpp
 * ("k-quants", created by Iwan Kawrakow) as carried in ik_llama.cpp. This is an
 * independent implementation written to reproduce the reference bytes exactly: every
 * float operation is a single binary32 operation evaluated in the reference's order
 * (no FMA contraction, no reassociation), and integer/float conversions happen at the
 * same points as in the reference, because the golden data depend on each rounding.
 *
 * Super-blocks hold 256 weights. Byte layouts (little-endian fp16 fields):
 *   Q2_K  84 B: scales[16] (lo nibble scale, hi nibble min) | qs[64] | d | dmin
 *   Q3_K 110 B: hmask[32] | qs[64] | scales[12] (16 x 6-bit, biased by 32) | d
 *   Q4_K 144 B: d | dmin | scales[12] (8 x 6-bit scale + 8 x 6-bit min) | qs[128]
 *   Q5_K 176 B: d | dmin | scales[12] | qh[32] | qs[128]
 *   Q6_K 210 B: ql[128] | qh[64] | scales[16] (int8) | d
 *
 * Without an importance vector each type follows the reference's quantize_row_*_ref;
 * with one it follows quantize_row_*_impl (the imatrix is indexed per super-block of
 * the row and used as given: the k-quants apply no sanitizer). The search helpers are
 * ik_llama.cpp's improved versions (its "quantization improvements" work of 2025), which
 * differ from mainline llama.cpp: make_qx_quants adds positive-scale candidates and a
 * greedy refinement, make_qkx3_quants works in double with a greedy refinement, and
 * the Q2_K imatrix path requantizes with the float scales.
 *
 * Not reproduced: the reference's Q2_K no-imatrix entry point first checks whether the
 * whole chunk it was handed looks ternary ("TriNet" detection) and then writes a special
 * encoding. That test spans all rows of the call, which a per-row kernel cannot see; it
 * does not trigger on ordinary weights (nor on any golden case, quantized as one chunk).
 */
#include "ek_common.h"

#define KQ_MAX(a, b) ((a) > (b) ? (a) : (b))
#define KQ_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KQ_GROUP_MAX_EPS 1e-15f

/* ------------------------------------------------------------------ helpers */

/* Symmetric signed quantization with a scale search (ik_llama.cpp's make_qx_quants,
 * rmse_type 1, in its improved form). L receives l + nmax in [0, 2*nmax-1]. The weight
 * is qw[i] when given, else x[i]^2. Three stages, each only accepting a strictly
 * better weighted fit (sumlx^2/suml2):
 *   1. iscale = -nmax/max (max = the largest-magnitude element, sign kept);
 *   2. a grid of 19 negative iscales -(nmax + 0.1 is)/max and 19 positive ones
 *      (nmax - 1 + 0.1 is)/max, is = -9..9 (the positive ones let the largest
 *      element use the level nmax-1 side of the asymmetric range);
 *   3. greedy single-level moves: repeatedly take the element with the largest
 *      |gradient| that can still move in the gradient's direction and move it one
 *      level, stopping at the first move that does not improve the fit. */
static float kq_make_qx(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < KQ_GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = (float)(-nmax) / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = ek_nearest_int(iscale * x[i]);
        l = KQ_MAX(-nmax, KQ_MIN(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        float w = qw ? qw[i] : x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    float best_sumlx = sumlx, best_suml2 = suml2;
    for (int is = -9; is <= 9; ++is) {
        for (int pass = 0; pass < 2; ++pass) {
            iscale = pass == 0 ? -((float)nmax + 0.1f * (float)is) / max
                               : ((float)(nmax - 1) + 0.1f * (float)is) / max;
            sumlx = suml2 = 0;
            for (int i = 0; i < n; ++i) {
                int l = ek_nearest_int(iscale * x[i]);
                l = KQ_MAX(-nmax, KQ_MIN(nmax - 1, l));
                float w = qw ? qw[i] : x[i] * x[i];
                sumlx += w * x[i] * (float)l;
                suml2 += w * (float)l * (float)l;
            }
            if (suml2 > 0 && sumlx * sumlx > best * suml2) {
                for (int i = 0; i < n; ++i) {
                    int l = ek_nearest_int(iscale * x[i]);
                    L[i] = (int8_t)(nmax + KQ_MAX(-nmax, KQ_MIN(nmax - 1, l)));
                }
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
        float abs_gmax = 0, gmax = 0;
        int best_j = -1;
        for (int j = 0; j < n; ++j) {
            float w = qw ? qw[j] : x[j] * x[j];
            int l = L[j] - nmax;
            float g = scale * w * (x[j] - scale * (float)l);
            if ((g > 0 && l < nmax - 1) || (g < 0 && l > -nmax)) {
                float ag = fabsf(g);
                if (ag > abs_gmax) { abs_gmax = ag; gmax = g; best_j = j; }
            }
        }
        if (best_j < 0) break;
        float new_sumlx = sumlx, new_suml2 = suml2;
        float w = qw ? qw[best_j] : x[best_j] * x[best_j];
        int l = L[best_j] - nmax;
        if (gmax > 0) {
            new_sumlx += w * x[best_j];
            new_suml2 += w * (float)(2 * l + 1);
            l += 1;
        } else {
            new_sumlx -= w * x[best_j];
            new_suml2 -= w * (float)(2 * l - 1);
            l -= 1;
        }
        if (new_suml2 > 0 && new_sumlx * new_sumlx > best * new_suml2) {
            sumlx = new_sumlx;
            suml2 = new_suml2;
            scale = sumlx / suml2;
            best = scale * sumlx;
            L[best_j] = (int8_t)(l + nmax);
        } else {
            break;
        }
    }
    return scale;
}

/* Q3_K reference path (make_q3_quants with do_rmse): start from the max-based scale,
 * then up to 5 passes of per-element coordinate descent on the weighted (x^2) error. */
static float kq_make_q3(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < KQ_GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = (float)(-nmax) / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = ek_nearest_int(iscale * x[i]);
        l = KQ_MAX(-nmax, KQ_MIN(nmax - 1, l));
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * (float)L[i] * (float)L[i];
                int new_l = ek_nearest_int(x[i] * sl2 / slx);
                new_l = KQ_MAX(-nmax, KQ_MIN(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
    return sumlx / suml2;
}

/* Asymmetric (scale + min) quantization with a scale grid search, minimising the
 * weighted absolute (use_mad) or squared error: the reference's make_qkx2_quants, used
 * by the no-imatrix paths, all in float. Returns the scale; *the_min receives -min. */
static float kq_make_qkx2(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                          float *the_min, uint8_t *Laux, float rmin, float rdelta, int nstep,
                          int use_mad) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max - min < 1e-10f) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1 / iscale;
    float best_mad = 0;
    for (int i = 0; i < n; ++i) {
        int l = ek_nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)KQ_MAX(0, KQ_MIN(nmax, l));
        float diff = scale * (float)L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_mad += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = ek_nearest_int(iscale * (x[i] - min));
            l = KQ_MAX(0, KQ_MIN(nmax, l));
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * (float)l;
            sum_l2 += w * (float)l * (float)l;
            sum_xl += w * (float)l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float mad = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                mad += weights[i] * diff;
            }
            if (mad < best_mad) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* The imatrix paths' variant (the reference's make_qkx3_quants with use_mad false):
 * the same grid search, but the statistics are accumulated in double and each
 * candidate's error is evaluated from the closed-form expansion
 *   sum w (s l + m - x)^2 = Sx2 - 2 s Sxl - 2 m Sx + 2 s m Sl + s^2 Sl2 + m^2 Sw,
 * followed by greedy one-level moves of the element with the largest residual while
 * the refitted (scale, min) keeps improving. scale and min live in float between steps,
 * as in the reference. */
static float kq_make_qkx3(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                          float *the_min, uint8_t *Laux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    double sum_w = (double)weights[0];
    double sum_x = sum_w * (double)x[0];
    double sum_x2 = sum_w * (double)x[0] * (double)x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights[i];
        sum_w += (double)w;
        sum_x += (double)w * (double)x[i];
        sum_x2 += (double)w * (double)x[i] * (double)x[i];
    }
    if (min > 0) min = 0;
    if (max - min < 1e-10f) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1 / iscale;
    double best_mad = 0;
    for (int i = 0; i < n; ++i) {
        int l = ek_nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)KQ_MAX(0, KQ_MIN(nmax, l));
        double diff = (double)scale * (double)L[i] + (double)min - (double)x[i];
        diff = diff * diff;
        best_mad += (double)weights[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        double sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = ek_nearest_int(iscale * (x[i] - min));
            l = KQ_MAX(0, KQ_MIN(nmax, l));
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += (double)w * (double)l;
            sum_l2 += (double)w * (double)l * (double)l;
            sum_xl += (double)w * (double)l * (double)x[i];
        }
        double D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            double this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            double this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            double mad = sum_x2 - 2 * this_scale * sum_xl - 2 * this_min * sum_x + 2 * this_scale * this_min * sum_l
                       + this_scale * this_scale * sum_l2 + this_min * this_min * sum_w;
            if (mad < best_mad) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_mad = mad;
                scale = (float)this_scale;
                min = (float)this_min;
            }
        }
    }
    double sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
        int l = L[i];
        double w = (double)weights[i];
        sum_l += w * l;
        sum_l2 += w * l * l;
        sum_xl += w * l * (double)x[i];
    }
    double best = 2 * (double)scale * sum_xl + 2 * (double)min * sum_x - 2 * (double)scale * (double)min * sum_l
                - (double)scale * (double)scale * sum_l2 - (double)min * (double)min * sum_w;
    int last_j = -1, last_dir = 0;
    for (int itry = 0; itry < nmax * n; ++itry) {
        float gmax = 0;
        int best_j = -1, dir = 0;
        for (int j = 0; j < n; ++j) {
            float g = x[j] - scale * (float)L[j] - min;
            if (g > 0 && L[j] < nmax && g > gmax) { gmax = g; best_j = j; dir = 1; }
            else if (g < 0 && L[j] > 0 && -g > gmax) { gmax = -g; best_j = j; dir = -1; }
        }
        /* stop when nothing can move or the best move would undo the previous one */
        if (best_j < 0 || (best_j == last_j && dir == -last_dir)) break;
        double w = (double)weights[best_j];
        sum_l += w * dir;
        sum_l2 += w * (2 * L[best_j] * dir + 1);
        sum_xl += w * (double)x[best_j] * dir;
        double D = sum_w * sum_l2 - sum_l * sum_l;
        if (D <= 0) break;
        double this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        double this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (this_min > 0) {
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        if (this_scale < 0) break;
        double score = 2 * this_scale * sum_xl + 2 * this_min * sum_x - 2 * this_scale * this_min * sum_l
                     - this_scale * this_scale * sum_l2 - this_min * this_min * sum_w;
        if (score <= best) break;
        best = score;
        scale = (float)this_scale;
        min = (float)this_min;
        L[best_j] = (uint8_t)(L[best_j] + dir);
        last_j = best_j;
        last_dir = dir;
    }
    *the_min = -min;
    return scale;
}

/* Quantize non-negative values (sub-block scales or mins) to [0, nmax] with a small
 * scale search and coordinate descent (the reference's make_qp_quants). The uint8
 * truncations of L mirror the reference's storage type. */
static float kq_make_qp(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = KQ_MAX(max, x[i]);
    if (max < 1e-16f) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = (float)nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)ek_nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * (float)L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * (float)is + (float)nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = ek_nearest_int(iscale_is * x[i]);
            l = KQ_MIN(nmax, l);
            float diff = x[i] - scale_is * (float)l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = ek_nearest_int(iscale * x[i]);
        l = KQ_MIN(nmax, l);
        L[i] = (uint8_t)l;
        float w = qw[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            float sl2 = suml2 - w * (float)L[i] * (float)L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = ek_nearest_int(x[i] * sl2 / slx);
                new_l = KQ_MIN(nmax, new_l);
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return sumlx / suml2;
}

/* 6-bit scale/min pair j (0..7) of the 12-byte Q4_K/Q5_K scales field. */
static inline void kq_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static inline void kq_pack_scale_min_k4(uint8_t *s, int j, uint8_t ls, uint8_t lm) {
    if (j < 4) {
        s[j] = ls;
        s[j + 4] = lm;
    } else {
        s[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        s[j - 4] |= (uint8_t)((ls >> 4) << 6);
        s[j] |= (uint8_t)((lm >> 4) << 6);
    }
}

/* Four 2-bit values per byte: byte l of each 32-byte group holds elements l, l+32,
 * l+64, l+96 of the 128-element half. */
static void kq_pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                      (L[j + l + 96] << 6));
}

/* 16 6-bit Q3_K scales into 12 bytes: low nibbles in bytes 0..7, high 2-bit pairs in 8..11. */
static void kq_q3_pack_scale(uint8_t *s, int j, int l) {
    if (j < 8) s[j] = (uint8_t)(l & 0xF);
    else s[j - 8] |= (uint8_t)((l & 0xF) << 4);
    l >>= 4;
    s[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
}

static inline int kq_q3_scale(const uint8_t *s, int j) {
    int sc = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
    return (sc | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
}

/* ------------------------------------------------------------------ Q2_K */

enum { Q2K_SC = 0, Q2K_QS = 16, Q2K_D = 80, Q2K_DMIN = 82, Q2K_BYTES = 84 };

static void q2k_block_ref(const float *x, uint8_t *y) {
    uint8_t L[QK_K], Laux[16];
    float weights[16], mins[16], scales[16];
    uint8_t *ysc = y + Q2K_SC;
    const float q4scale = 15.f;
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
        for (int l = 0; l < 16; ++l) weights[l] = fabsf(x[16 * j + l]);
        scales[j] = kq_make_qkx2(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 1);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint16_t hd, hm;
    if (max_scale > 0) {
        float iscale = q4scale / max_scale;
        for (int j = 0; j < 16; ++j) ysc[j] = (uint8_t)ek_nearest_int(iscale * scales[j]);
        hd = ek_to_f16(max_scale / q4scale);
    } else {
        for (int j = 0; j < 16; ++j) ysc[j] = 0;
        hd = ek_to_f16(0.f);
    }
    if (max_min > 0) {
        float iscale = q4scale / max_min;
        for (int j = 0; j < 16; ++j) ysc[j] |= (uint8_t)(ek_nearest_int(iscale * mins[j]) << 4);
        hm = ek_to_f16(max_min / q4scale);
    } else {
        hm = ek_to_f16(0.f);
    }
    ek_wr16(y + Q2K_D, hd);
    ek_wr16(y + Q2K_DMIN, hm);
    /* requantize against the stored (fp16-rounded) super-block scales */
    const float fd = ek_f16(hd), fm = ek_f16(hm);
    for (int j = 0; j < 16; ++j) {
        const float d = fd * (float)(ysc[j] & 0xF);
        if (!d) continue;
        const float dm = fm * (float)(ysc[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            int l = ek_nearest_int((x[16 * j + ii] + dm) / d);
            L[16 * j + ii] = (uint8_t)KQ_MAX(0, KQ_MIN(3, l));
        }
    }
    kq_pack_2bit(L, y + Q2K_QS);
}

static void q2k_block_imatrix(const float *x, uint8_t *y, const float *qwb) {
    uint8_t L[QK_K], Laux[16], Ls[16], Lm[16];
    float mins[16], scales[16], sw[16], weight[16];
    uint8_t *ysc = y + Q2K_SC;
    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    float sigma2 = 0.75f * sumx2 / QK_K;
    for (int j = 0; j < 16; ++j) {
        const float *qw = qwb + 16 * j;
        for (int l = 0; l < 16; ++l) weight[l] = qw[l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
        sw[j] = 0;
        for (int l = 0; l < 16; ++l) sw[j] += weight[l];
        scales[j] = kq_make_qkx3(16, 3, x + 16 * j, weight, L + 16 * j, &mins[j], Laux, -0.9f, 0.05f, 36);
    }
    float dm = kq_make_qp(16, 15, scales, Ls, sw);
    float mm = kq_make_qp(16, 15, mins, Lm, sw);
    ek_wr16(y + Q2K_D, ek_to_f16(dm));
    ek_wr16(y + Q2K_DMIN, ek_to_f16(mm));
    /* requantize with the float (not fp16-rounded) scales, multiplying by the inverse;
     * a zero sub-block scale sends every level of that sub-block to 0 */
    for (int j = 0; j < 16; ++j) {
        float d = dm * (float)Ls[j];
        float m = mm * (float)Lm[j];
        float id = d ? 1 / d : 0.f;
        for (int l = 0; l < 16; ++l) {
            int q = ek_nearest_int((x[16 * j + l] + m) * id);
            L[16 * j + l] = (uint8_t)KQ_MAX(0, KQ_MIN(3, q));
        }
    }
    for (int j = 0; j < 16; ++j) ysc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    kq_pack_2bit(L, y + Q2K_QS);
}

int ek_quantize_row_q2_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    for (int64_t ib = 0; ib < n / QK_K; ++ib) {
        if (qw) q2k_block_imatrix(x + ib * QK_K, y + ib * Q2K_BYTES, qw + ib * QK_K);
        else q2k_block_ref(x + ib * QK_K, y + ib * Q2K_BYTES);
    }
    return EK_OK;
}

void ek_dequantize_row_q2_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t ib = 0; ib < n / QK_K; ++ib, y += Q2K_BYTES) {
        const float d = ek_f16(ek_rd16(y + Q2K_D));
        const float min = ek_f16(ek_rd16(y + Q2K_DMIN));
        const uint8_t *q = y + Q2K_QS;
        int is = 0;
        for (int h = 0; h < QK_K; h += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int half = 0; half < 2; ++half) {
                    uint8_t sc = y[Q2K_SC + is++];
                    const float dl = d * (float)(sc & 0xF), ml = min * (float)(sc >> 4);
                    for (int l = 0; l < 16; ++l)
                        *x++ = dl * (float)((q[16 * half + l] >> shift) & 3) - ml;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ Q3_K */

enum { Q3K_HM = 0, Q3K_QS = 32, Q3K_SC = 96, Q3K_D = 108, Q3K_BYTES = 110 };

/* Shared tail of both Q3_K paths: requantize with the stored scales, split off the
 * high bit into hmask (bit j/32 of byte j%32) and pack the low 2 bits. */
static void q3k_finish(const float *x, uint8_t *y, int8_t *L) {
    const float d_all = ek_f16(ek_rd16(y + Q3K_D));
    for (int j = 0; j < 16; ++j) {
        const float d = d_all * (float)kq_q3_scale(y + Q3K_SC, j);
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = ek_nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(KQ_MAX(-4, KQ_MIN(3, l)) + 4);
        }
    }
    uint8_t *hmask = y + Q3K_HM;
    memset(hmask, 0, 32);
    uint8_t Lu[QK_K];
    for (int j = 0; j < QK_K; ++j) {
        int l = L[j];
        if (l > 3) {
            hmask[j % 32] |= (uint8_t)(1u << (j / 32));
            l -= 4;
        }
        Lu[j] = (uint8_t)l;
    }
    kq_pack_2bit(Lu, y + Q3K_QS);
}

static void q3k_block_ref(const float *x, uint8_t *y) {
    int8_t L[QK_K];
    float scales[16];
    float max_scale = 0, amax = 0;
    for (int j = 0; j < 16; ++j) {
        scales[j] = kq_make_q3(16, 4, x + 16 * j, L + 16 * j);
        float scale = fabsf(scales[j]);
        if (scale > amax) { amax = scale; max_scale = scales[j]; }
    }
    memset(y + Q3K_SC, 0, 12);
    if (max_scale) {
        float iscale = -32.f / max_scale;
        for (int j = 0; j < 16; ++j) {
            int8_t l = (int8_t)ek_nearest_int(iscale * scales[j]);
            l = (int8_t)(KQ_MAX(-32, KQ_MIN(31, l)) + 32);
            kq_q3_pack_scale(y + Q3K_SC, j, l);
        }
        ek_wr16(y + Q3K_D, ek_to_f16(1 / iscale));
    } else {
        ek_wr16(y + Q3K_D, ek_to_f16(0.f));
    }
    q3k_finish(x, y, L);
}

static void q3k_block_imatrix(const float *x, uint8_t *y, const float *qwb) {
    int8_t L[QK_K], Ls[16];
    float scales[16], weight[16], sw[16];
    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    float sigma2 = 2 * sumx2 / QK_K;
    for (int j = 0; j < 16; ++j) {
        const float *qw = qwb + 16 * j;
        for (int l = 0; l < 16; ++l) weight[l] = qw[l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
        float sumw = 0;
        for (int l = 0; l < 16; ++l) sumw += weight[l];
        sw[j] = sumw;
        scales[j] = kq_make_qx(16, 4, x + 16 * j, L + 16 * j, weight);
    }
    memset(y + Q3K_SC, 0, 12);
    float d_block = kq_make_qx(16, 32, scales, Ls, sw);
    for (int j = 0; j < 16; ++j) kq_q3_pack_scale(y + Q3K_SC, j, Ls[j]);
    ek_wr16(y + Q3K_D, ek_to_f16(d_block));
    q3k_finish(x, y, L);
}

int ek_quantize_row_q3_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    for (int64_t ib = 0; ib < n / QK_K; ++ib) {
        if (qw) q3k_block_imatrix(x + ib * QK_K, y + ib * Q3K_BYTES, qw + ib * QK_K);
        else q3k_block_ref(x + ib * QK_K, y + ib * Q3K_BYTES);
    }
    return EK_OK;
}

void ek_dequantize_row_q3_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t ib = 0; ib < n / QK_K; ++ib, y += Q3K_BYTES) {
        const float d_all = ek_f16(ek_rd16(y + Q3K_D));
        const uint8_t *hm = y + Q3K_HM;
        for (int e = 0; e < QK_K; e += 16) {
            const float dl = d_all * (float)kq_q3_scale(y + Q3K_SC, e / 16);
            const int shift = 2 * ((e / 32) % 4);
            const uint8_t m = (uint8_t)(1u << (e / 32));
            const uint8_t *q = y + Q3K_QS + 32 * (e / 128);
            for (int l = e % 32; l < e % 32 + 16; ++l)
                *x++ = dl * (float)(((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
        }
    }
}

/* ------------------------------------------------------------------ Q4_K / Q5_K */

enum { Q45K_D = 0, Q45K_DMIN = 2, Q45K_SC = 4 };
enum { Q4K_QS = 16, Q4K_BYTES = 144 };
enum { Q5K_QH = 16, Q5K_QS = 48, Q5K_BYTES = 176 };

/* Scales + levels of one Q4_K/Q5_K super-block (nmax 15 or 31); writes d, dmin and
 * the scales field and leaves the final levels in L. */
static void q45k_block(const float *x, uint8_t *y, const float *qwb, int nmax, uint8_t *L) {
    uint8_t Laux[32];
    float weights[32], mins[8], scales[8];
    uint8_t *ysc = y + Q45K_SC;
    if (!qwb) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
            float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(x[32 * j + l]);
            if (nmax == 15)
                scales[j] = kq_make_qkx2(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20, 0);
            else
                scales[j] = kq_make_qkx2(32, 31, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 0);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            uint8_t ls = (uint8_t)ek_nearest_int(inv_scale * scales[j]);
            uint8_t lm = (uint8_t)ek_nearest_int(inv_min * mins[j]);
            kq_pack_scale_min_k4(ysc, j, KQ_MIN(63, ls), KQ_MIN(63, lm));
        }
        ek_wr16(y + Q45K_D, ek_to_f16(max_scale / 63.f));
        ek_wr16(y + Q45K_DMIN, ek_to_f16(max_min / 63.f));
    } else {
        uint8_t Ls[8], Lm[8];
        float sw[8];
        float sum_x2 = 0;
        for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
        float sigma2 = 2 * sum_x2 / QK_K;
        for (int j = 0; j < 8; ++j) {
            const float *qw = qwb + 32 * j;
            for (int l = 0; l < 32; ++l) weights[l] = qw[l] * sqrtf(sigma2 + x[32 * j + l] * x[32 * j + l]);
            float sumw = 0;
            for (int l = 0; l < 32; ++l) sumw += weights[l];
            sw[j] = sumw;
            scales[j] = kq_make_qkx3(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -0.9f, 0.05f, 36);
        }
        float d_block = kq_make_qp(8, 63, scales, Ls, sw);
        float m_block = kq_make_qp(8, 63, mins, Lm, sw);
        /* the reference clamps to 63 here for Q5_K only (matters only if a level wrapped) */
        for (int j = 0; j < 8; ++j) {
            uint8_t ls = Ls[j], lm = Lm[j];
            if (nmax == 31) { ls = KQ_MIN(63, ls); lm = KQ_MIN(63, lm); }
            kq_pack_scale_min_k4(ysc, j, ls, lm);
        }
        ek_wr16(y + Q45K_D, ek_to_f16(d_block));
        ek_wr16(y + Q45K_DMIN, ek_to_f16(m_block));
    }
    const float fd = ek_f16(ek_rd16(y + Q45K_D)), fm = ek_f16(ek_rd16(y + Q45K_DMIN));
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        kq_scale_min_k4(j, ysc, &sc, &m);
        const float d = fd * (float)sc;
        if (!d) continue;
        const float dm = fm * (float)m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = ek_nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)KQ_MAX(0, KQ_MIN(nmax, l));
        }
    }
}

int ek_quantize_row_q4_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    uint8_t L[QK_K];
    for (int64_t ib = 0; ib < n / QK_K; ++ib) {
        uint8_t *yb = y + ib * Q4K_BYTES;
        q45k_block(x + ib * QK_K, yb, qw ? qw + ib * QK_K : NULL, 15, L);
        uint8_t *q = yb + Q4K_QS;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
    return EK_OK;
}

void ek_dequantize_row_q4_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t ib = 0; ib < n / QK_K; ++ib, y += Q4K_BYTES) {
        const float d = ek_f16(ek_rd16(y + Q45K_D)), min = ek_f16(ek_rd16(y + Q45K_DMIN));
        const uint8_t *q = y + Q4K_QS;
        for (int is = 0; is < 8; is += 2, q += 32) {
            uint8_t sc, m;
            kq_scale_min_k4(is, y + Q45K_SC, &sc, &m);
            const float d1 = d * (float)sc, m1 = min * (float)m;
            kq_scale_min_k4(is + 1, y + Q45K_SC, &sc, &m);
            const float d2 = d * (float)sc, m2 = min * (float)m;
            for (int l = 0; l < 32; ++l) *x++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; ++l) *x++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

int ek_quantize_row_q5_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    uint8_t L[QK_K];
    for (int64_t ib = 0; ib < n / QK_K; ++ib) {
        uint8_t *yb = y + ib * Q5K_BYTES;
        q45k_block(x + ib * QK_K, yb, qw ? qw + ib * QK_K : NULL, 31, L);
        /* low nibbles as Q4_K; bit 4 of elements 64k+j and 64k+32+j goes to qh[j]
         * bits 2k and 2k+1 */
        uint8_t *qh = yb + Q5K_QH, *ql = yb + Q5K_QS;
        memset(qh, 0, 32);
        uint8_t m1 = 1, m2 = 2;
        for (int h = 0; h < QK_K; h += 64, ql += 32) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[h + j], l2 = L[h + j + 32];
                if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
            m1 = (uint8_t)(m1 << 2);
            m2 = (uint8_t)(m2 << 2);
        }
    }
    return EK_OK;
}

void ek_dequantize_row_q5_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t ib = 0; ib < n / QK_K; ++ib, y += Q5K_BYTES) {
        const float d = ek_f16(ek_rd16(y + Q45K_D)), min = ek_f16(ek_rd16(y + Q45K_DMIN));
        const uint8_t *ql = y + Q5K_QS, *qh = y + Q5K_QH;
        uint8_t u1 = 1, u2 = 2;
        for (int is = 0; is < 8; is += 2, ql += 32) {
            uint8_t sc, m;
            kq_scale_min_k4(is, y + Q45K_SC, &sc, &m);
            const float d1 = d * (float)sc, m1 = min * (float)m;
            kq_scale_min_k4(is + 1, y + Q45K_SC, &sc, &m);
            const float d2 = d * (float)sc, m2 = min * (float)m;
            for (int l = 0; l < 32; ++l) *x++ = d1 * (float)((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l) *x++ = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
            u1 = (uint8_t)(u1 << 2);
            u2 = (uint8_t)(u2 << 2);
        }
    }
}

/* ------------------------------------------------------------------ Q6_K */

enum { Q6K_QL = 0, Q6K_QH = 128, Q6K_SC = 192, Q6K_D = 208, Q6K_BYTES = 210 };

/* Both Q6_K paths are the same except for the weights handed to make_qx: x^2 without
 * an imatrix, the raw imatrix entries with one (no sigma2 term, unlike the others). */
static void q6k_block(const float *x, uint8_t *y, const float *qwb) {
    int8_t L[QK_K];
    float scales[16];
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float scale = kq_make_qx(16, 32, x + 16 * ib, L + 16 * ib, qwb ? qwb + 16 * ib : NULL);
        scales[ib] = scale;
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) { max_abs_scale = abs_scale; max_scale = scale; }
    }
    if (max_abs_scale < KQ_GROUP_MAX_EPS) {
        memset(y, 0, Q6K_BYTES);
        ek_wr16(y + Q6K_D, ek_to_f16(0.f));
        return;
    }
    float iscale = -128.f / max_scale;
    ek_wr16(y + Q6K_D, ek_to_f16(1 / iscale));
    int8_t *ysc = (int8_t *)(y + Q6K_SC);
    for (int ib = 0; ib < 16; ++ib) ysc[ib] = (int8_t)KQ_MIN(127, ek_nearest_int(iscale * scales[ib]));
    const float fd = ek_f16(ek_rd16(y + Q6K_D));
    for (int j = 0; j < 16; ++j) {
        float d = fd * (float)ysc[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = ek_nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(KQ_MAX(-32, KQ_MIN(31, l)) + 32);
        }
    }
    /* per 128-element half: ql[l] = lo(e=l) | lo(e=l+64)<<4, ql[l+32] = lo(l+32) | lo(l+96)<<4,
     * qh[l] = the four 2-bit high parts of l, l+32, l+64, l+96 */
    uint8_t *ql = y + Q6K_QL, *qh = y + Q6K_QH;
    const uint8_t *Lu = (const uint8_t *)L;
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = Lu[j + l] & 0xF, q2 = Lu[j + l + 32] & 0xF;
            const uint8_t q3 = Lu[j + l + 64] & 0xF, q4 = Lu[j + l + 96] & 0xF;
            ql[l] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((Lu[j + l] >> 4) | ((Lu[j + l + 32] >> 4) << 2) | ((Lu[j + l + 64] >> 4) << 4) |
                              ((Lu[j + l + 96] >> 4) << 6));
        }
    }
}

int ek_quantize_row_q6_k(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)flags;
    for (int64_t ib = 0; ib < n / QK_K; ++ib)
        q6k_block(x + ib * QK_K, y + ib * Q6K_BYTES, qw ? qw + ib * QK_K : NULL);
    return EK_OK;
}

void ek_dequantize_row_q6_k(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t ib = 0; ib < n / QK_K; ++ib, y += Q6K_BYTES, x += QK_K) {
        const float d = ek_f16(ek_rd16(y + Q6K_D));
        const uint8_t *ql = y + Q6K_QL, *qh = y + Q6K_QH;
        const int8_t *sc = (const int8_t *)(y + Q6K_SC);
        float *o = x;
        for (int h = 0; h < 2; ++h, ql += 64, qh += 32, sc += 8, o += 128) {
            for (int l = 0; l < 32; ++l) {
                int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                o[l] = d * (float)sc[is] * (float)q1;
                o[l + 32] = d * (float)sc[is + 2] * (float)q2;
                o[l + 64] = d * (float)sc[is + 4] * (float)q3;
                o[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}
