/* Weight conversions of the reference CPU backend (docs/backend-ik-cpu.md §4).
 *
 * For large batches ik_llama.cpp re-encodes quantized weight rows on the fly before the
 * GEMM (iqk_mul_mat branch B, the fused up/gate op): IQK types, Q2_K and Q3_K to Q8_K_R16
 * (Q8_K_R8 on AVX2), Q4_K/Q5_K to Q8_1_R8, Q6_K and the KT types to Q8_0_R8, the legacy
 * types to Q8_0_R8 / Q8_1_R8. ek_backend_convert writes the weights those converted rows
 * represent, as float32 (what the GEMM then multiplies with; §5), so the emulated backend
 * multiplies them like any dequantized tile. Which conversion a matmul takes (batch
 * threshold, Nx/nth >= 32, fused up/gate) is decided by the caller (evalkit/backend).
 *
 * How the integers are obtained: the reference builds q16 = (sub-block scale) x (table
 * value) from the block fields. We get the same integers from the library's own
 * dequantizer by dequantizing a copy of the row whose float scale (the super-block d or
 * the row scale) is set to 1.0: every product is then a small integer, exact in float.
 * Only the Q4_K/Q5_K 6-bit scales, the Q2_K mins and the KT block scales are read here
 * directly. Row order is preserved (the reference's 8/16-row interleave only changes the
 * memory layout).
 */
#include <stdlib.h>

#include "ek_common.h"
#include "ek_team.h"

#define CV_ITEM_ROWS 16
#define FP16_ONE 0x3C00u

typedef enum { CV_EXACT, CV_Q8K, CV_Q2K, CV_Q45K, CV_Q6K, CV_KT } cv_kind;

typedef struct {
    int type;
    cv_kind kind;
    int block_bytes;
    int header;      /* bytes of the per-row scale (2: fp16, 4: float32), 0 for a per-block d */
    int d_off;       /* offset of the fp16 d inside a block (header == 0) */
    float d0;        /* Q8_K_R16: dnew = M * d0 ... */
    int d0_divide;   /* ... or M / 127 (Q3_K: iqk_convert_q3_k_q8_k_r8 divides) */
    float kt_factor; /* KT: the inference scale factor of the row scale */
} cv_spec;

/* iqk_convert_*_q8_k_r8 pass d0 = 1/120 (IQ2_K), 1/125 (IQ2_KS, IQ2_KL), 1/127 (the others). */
static const cv_spec CV_SPECS[] = {
    {EK_Q4_0, CV_EXACT, 0, 0, 0, 0, 0, 0},     {EK_Q4_1, CV_EXACT, 0, 0, 0, 0, 0, 0},
    {EK_Q5_0, CV_EXACT, 0, 0, 0, 0, 0, 0},     {EK_Q5_1, CV_EXACT, 0, 0, 0, 0, 0, 0},
    {EK_Q6_0, CV_EXACT, 0, 0, 0, 0, 0, 0},     {EK_Q8_0, CV_EXACT, 0, 0, 0, 0, 0, 0},
    {EK_IQ4_NL, CV_EXACT, 0, 0, 0, 0, 0, 0},
    {EK_Q2_K, CV_Q2K, 84, 0, 80, 0, 0, 0},
    {EK_Q3_K, CV_Q8K, 110, 0, 108, 1.f / 127, 1, 0},
    {EK_Q4_K, CV_Q45K, 144, 0, 0, 0, 0, 0},    {EK_Q5_K, CV_Q45K, 176, 0, 0, 0, 0, 0},
    {EK_Q6_K, CV_Q6K, 210, 0, 208, 0, 0, 0},
    {EK_IQ2_K, CV_Q8K, 76, 0, 0, 1.f / 120, 0, 0},
    {EK_IQ3_K, CV_Q8K, 110, 0, 0, 1.f / 127, 0, 0},
    {EK_IQ4_K, CV_Q8K, 144, 0, 0, 1.f / 127, 0, 0},
    {EK_IQ5_K, CV_Q8K, 176, 0, 0, 1.f / 127, 0, 0},
    {EK_IQ6_K, CV_Q8K, 212, 0, 0, 1.f / 127, 0, 0},
    {EK_IQ2_KS, CV_Q8K, 70, 2, 0, 1.f / 125, 0, 0},
    {EK_IQ2_KL, CV_Q8K, 86, 2, 0, 1.f / 125, 0, 0},
    {EK_IQ3_KS, CV_Q8K, 102, 2, 0, 1.f / 127, 0, 0},
    {EK_IQ4_KS, CV_Q8K, 136, 4, 0, 1.f / 127, 0, 0},
    {EK_IQ4_KSS, CV_Q8K, 128, 4, 0, 1.f / 127, 0, 0},
    {EK_IQ5_KS, CV_Q8K, 168, 4, 0, 1.f / 127, 0, 0},
    {EK_IQ1_KT, CV_KT, 56, 4, 0, 0, 0, 1.0f},
    {EK_IQ2_KT, CV_KT, 68, 4, 0, 0, 0, 1.05f},
    {EK_IQ3_KT, CV_KT, 100, 4, 0, 0, 0, 1.01f},
    {EK_IQ4_KT, CV_KT, 128, 4, 0, 0, 0, 1.0f},
};

static const int8_t CV_IQ4K_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1, 13, 25, 38, 53, 69, 89, 113};

static const cv_spec *cv_find(int type) {
    for (size_t i = 0; i < sizeof(CV_SPECS) / sizeof(CV_SPECS[0]); ++i)
        if (CV_SPECS[i].type == type) return &CV_SPECS[i];
    return NULL;
}

static inline float cv_fp16_round(float f) { return ek_fp16_to_fp32(ek_fp32_to_fp16(f)); }

/* Round to nearest even and saturate to int8, as cvtps_epi32(round_ps(NEAREST)) + packs. */
static inline float cv_q8(float v) {
    float r = rintf(v);
    return r < -128.f ? -128.f : (r > 127.f ? 127.f : r);
}

/* The row's float scale fields set to 1 (so the dequantizer yields the integers q16). */
static void cv_unit_scales(const cv_spec *s, uint8_t *row, int64_t nb) {
    if (s->header == 2) ek_wr16(row, FP16_ONE);
    else if (s->header == 4) ek_wrf32(row, 1.0f);
    else
        for (int64_t b = 0; b < nb; ++b) ek_wr16(row + b * s->block_bytes + s->d_off, FP16_ONE);
}

/* Q8_K_R16 / Q8_K_R8 (convert_to_q8_k_r8, iqk_convert_q3_k_q8_k_r8): one scale per 256. */
static void cv_q8k(const cv_spec *s, const uint8_t *row, float *w, int64_t nb) {
    const float rowd = s->header == 2 ? ek_fp16_to_fp32(ek_rd16(row)) : (s->header == 4 ? ek_rdf32(row) : 0.f);
    for (int64_t b = 0; b < nb; ++b) {
        float *q16 = w + b * QK_K;
        const float dsup = s->header ? rowd : ek_fp16_to_fp32(ek_rd16(row + b * s->block_bytes + s->d_off));
        float m = 0.f;
        for (int j = 0; j < QK_K; ++j) m = fabsf(q16[j]) > m ? fabsf(q16[j]) : m;
        float dnew = s->d0_divide ? m / 127 : m * s->d0;
        const int scaled = !(dnew < 1.f);
        if (!scaled) dnew = 1.f;
        const float inv = 1 / dnew;
        const float D = cv_fp16_round(dsup * dnew);
        for (int j = 0; j < QK_K; ++j) q16[j] = D * (scaled ? cv_q8(q16[j] * inv) : q16[j]);
    }
}

/* Q2_K -> Q8_K_R16 (iqk_convert_q2_k_q8_k_r8): v = fma(q*sc, d, -dmin*m), re-quantized per 256. */
static void cv_q2k(const uint8_t *row, float *w, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = row + b * 84;
        const float d = ek_fp16_to_fp32(ek_rd16(blk + 80)), vm = ek_fp16_to_fp32(ek_rd16(blk + 82)) * -1.f;
        float *v = w + b * QK_K, amax = 0.f;
        for (int j = 0; j < QK_K; ++j) {
            v[j] = fmaf(v[j], d, vm * (float)(blk[j / 16] >> 4));
            amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
        }
        const float dd = amax / 127.f, id = dd != 0.0f ? 1 / dd : 0.0f, D = cv_fp16_round(dd);
        for (int j = 0; j < QK_K; ++j) v[j] = D * cv_q8(v[j] * id);
    }
}

/* 6-bit scale and min j of a Q4_K/Q5_K block (make_q4_scales / get_scale_min_k4). */
static void cv_scale_min_k4(const uint8_t *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q4_K/Q5_K -> Q8_1_R8: w = fp16(d*sc)*q + fp16(-dmin*m) per 32 (w holds sc*q on entry). */
static void cv_q45k(const cv_spec *s, const uint8_t *row, float *w, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = row + b * s->block_bytes;
        const float d = ek_fp16_to_fp32(ek_rd16(blk)), vm = -1.f * ek_fp16_to_fp32(ek_rd16(blk + 2));
        for (int j = 0; j < 8; ++j) {
            int sc, m;
            cv_scale_min_k4(blk + 4, j, &sc, &m);
            const float D = cv_fp16_round(d * (float)sc), M = cv_fp16_round(vm * (float)m);
            float *x = w + b * QK_K + 32 * j;
            for (int k = 0; k < 32; ++k) x[k] = D * (sc ? x[k] / (float)sc : 0.f) + M;
        }
    }
}

/* Q6_K -> Q8_0_R8 (iqk_convert_q6_k_q8_0_r8): per 32, 127 levels and an fp16 scale d*M/127. */
static void cv_q6k(const uint8_t *row, float *w, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        const float d = ek_fp16_to_fp32(ek_rd16(row + b * 210 + 208));
        for (int j = 0; j < 8; ++j) {
            float *q16 = w + b * QK_K + 32 * j, m = 0.f;
            for (int k = 0; k < 32; ++k) m = fabsf(q16[k]) > m ? fabsf(q16[k]) : m;
            const float mx = m / 127, S = cv_fp16_round(d * mx);
            const float inv = mx > 1e-9f ? 1 / mx : 0.f;
            for (int k = 0; k < 32; ++k) q16[k] = mx > 1e-9f ? S * cv_q8(q16[k] * inv) : S * 0.f;
        }
    }
}

/* The float block scale (f*d_row)*ls of 32-block ib of KT block blk (as the dequantizer). */
static float cv_kt_scale(int type, const uint8_t *blk, int ib, float d) {
    switch (type) {
    case EK_IQ1_KT: return d * (float)CV_IQ4K_VALUES[blk[ib] & 0xf];
    case EK_IQ2_KT: return d * (float)CV_IQ4K_VALUES[(blk[ib % 4] >> 4 * (ib / 4)) & 0xf];
    case EK_IQ3_KT: return d * (float)((blk[ib % 4] >> 4 * (ib / 4)) & 0xf);
    default: return d * (float)((int)((ek_rd32(blk + 4 * ib) & 0xff) >> 1) - 64);
    }
}

/* KT -> Q8_0_R8 (iqk_dequantize_iq*_kt_q80_r8): the trellis integers t exactly, the scale
 * rounded to fp16. w holds the inference dequantization sl*t on entry. */
static void cv_kt(const cv_spec *s, const uint8_t *row, float *w, int64_t nb) {
    const float d = ek_rdf32(row) * s->kt_factor;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = row + 4 + b * s->block_bytes;
        for (int ib = 0; ib < 8; ++ib) {
            const float sl = cv_kt_scale(s->type, blk, ib, d), S = cv_fp16_round(sl);
            float *x = w + b * QK_K + 32 * ib;
            for (int k = 0; k < 32; ++k) x[k] = S * (sl != 0.f ? rintf(x[k] / sl) : 0.f);
        }
    }
}

typedef struct {
    const cv_spec *spec;
    const uint8_t *q;
    float *out;
    int64_t nrows, n, row_bytes;
    int status;
} cv_job;

static int cv_row(const cv_spec *s, const uint8_t *row, uint8_t *scratch, float *w, int64_t n, int64_t rb) {
    const int64_t nb = n / QK_K;
    int rc;
    if (s->kind == CV_EXACT || s->kind == CV_KT) {
        rc = ek_dequantize(s->type, row, w, 1, n, 1, EK_DEQ_INFERENCE);
        if (rc == EK_OK && s->kind == CV_KT) cv_kt(s, row, w, nb);
        return rc;
    }
    memcpy(scratch, row, (size_t)rb);
    if (s->kind == CV_Q2K || s->kind == CV_Q45K) {
        for (int64_t b = 0; b < nb; ++b) {            /* d = 1, dmin = 0: w = sc * q */
            uint8_t *blk = scratch + b * s->block_bytes;
            const int off = s->kind == CV_Q2K ? 80 : 0;
            ek_wr16(blk + off, FP16_ONE);
            ek_wr16(blk + off + 2, 0);
        }
    } else {
        cv_unit_scales(s, scratch, nb);
    }
    rc = ek_dequantize(s->type, scratch, w, 1, n, 1, EK_DEQ_INFERENCE);
    if (rc != EK_OK) return rc;
    if (s->kind == CV_Q8K) cv_q8k(s, row, w, nb);
    else if (s->kind == CV_Q2K) cv_q2k(row, w, nb);
    else if (s->kind == CV_Q45K) cv_q45k(s, row, w, nb);
    else cv_q6k(row, w, nb);
    return EK_OK;
}

static void cv_item(void *ctx, int64_t item, int slot) {
    (void)slot;
    cv_job *j = (cv_job *)ctx;
    if (__atomic_load_n(&j->status, __ATOMIC_RELAXED) != EK_OK) return;
    uint8_t *scratch = malloc((size_t)j->row_bytes);
    if (!scratch || ek_alloc_should_fail()) {
        free(scratch);
        __atomic_store_n(&j->status, EK_ERR_NO_MEMORY, __ATOMIC_RELAXED);
        return;
    }
    const int64_t r1 = (item + 1) * CV_ITEM_ROWS < j->nrows ? (item + 1) * CV_ITEM_ROWS : j->nrows;
    for (int64_t r = item * CV_ITEM_ROWS; r < r1; ++r) {
        const int rc = cv_row(j->spec, j->q + r * j->row_bytes, scratch, j->out + r * j->n, j->n, j->row_bytes);
        if (rc != EK_OK) {
            __atomic_store_n(&j->status, rc, __ATOMIC_RELAXED);
            break;
        }
    }
    free(scratch);
}

int ek_backend_has_convert(int type) { return cv_find(type) != NULL && ek_has_dequantize(type); }

int ek_backend_convert(int type, const uint8_t *q, float *out, int64_t nrows, int64_t n, int nthreads,
                       ek_team_runner runner) {
    const cv_spec *s = cv_find(type);
    if (!s) return ek_row_size(type, 1) == EK_ERR_UNKNOWN_TYPE ? EK_ERR_UNKNOWN_TYPE : EK_ERR_NOT_IMPLEMENTED;
    if (!ek_has_dequantize(type)) return EK_ERR_NOT_IMPLEMENTED;
    const int64_t rb = ek_row_size(type, n);
    if (rb < 0) return (int)rb;
    if (nrows < 0 || (nrows > 0 && (!q || !out))) return EK_ERR_BAD_ARGUMENT;
    cv_job job = {s, q, out, nrows, n, rb, EK_OK};
    ek_run_items(cv_item, &job, (nrows + CV_ITEM_ROWS - 1) / CV_ITEM_ROWS, nthreads, runner);
    return job.status;
}
