/* Activation rounding of the reference CPU backend (docs/backend-ik-cpu.md §3).
 *
 * Before a quantized weight is multiplied, ik_llama.cpp quantizes every activation row
 * (one token) to the weight type's vec_dot_type: Q8_2_X4 (blocks of 32, bf16 scale;
 * iqk_quantize.cpp: quantize_row_q8_1_x4_T, x86 branch), Q8_K (blocks of 256, float
 * scale; iqk_quantize_row_q8_K_T, AVX2 branch) or BF16 (ggml_fp32_to_bf16_row). The dot
 * products are then exact integer sums times the product of the scales, i.e. the same
 * as multiplying by the dequantized activation q*d (§5). These kernels write that
 * dequantized activation (and optionally the codes and block scales, for the tests).
 *
 * Rounding: x*id is rounded to nearest, ties to even, like _mm256_round_ps(NEAREST), by
 * adding and subtracting 1.5*2^23 (exact for |x*id| < 2^22; here |x*id| <= 127.5). No
 * FMA is ever formed (-ffp-contract=off), so every lane rounds like the reference's.
 */
#include <emmintrin.h>
#include <stdlib.h>

#include "ek_common.h"
#include "ek_team.h"

#define ACT_ITEM_ROWS 16

/* float -> bf16 -> float, round to nearest even (GGML_FP32_TO_BF16; NaN stays NaN). */
static inline float act_bf16_round(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        x = (x | 0x00400000u) & 0xffff0000u;
    } else {
        x = (x + (0x7fffu + ((x >> 16) & 1))) & 0xffff0000u;
    }
    memcpy(&f, &x, 4);
    return f;
}

/* max |x[j]| over n (a multiple of 4) floats, as _mm256_max_ps of andnot(sign) lanes. */
static inline float act_amax(const float *x, int n) {
    const __m128 sign = _mm_set1_ps(-0.0f);
    __m128 m = _mm_setzero_ps();
    for (int j = 0; j < n; j += 4) m = _mm_max_ps(m, _mm_andnot_ps(sign, _mm_loadu_ps(x + j)));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* out[j] = RNE(x[j] * id) * d for n (multiple of 4) floats, codes clamped to int8 (packs
 * saturation) and stored in q when not NULL. */
static inline void act_round_block(const float *x, float *out, int8_t *q, int n, float id, float d) {
    const __m128 vid = _mm_set1_ps(id), vd = _mm_set1_ps(d);
    const __m128 magic = _mm_set1_ps(12582912.0f), lo = _mm_set1_ps(-128.0f), hi = _mm_set1_ps(127.0f);
    for (int j = 0; j < n; j += 4) {
        __m128 v = _mm_mul_ps(_mm_loadu_ps(x + j), vid);
        v = _mm_sub_ps(_mm_add_ps(v, magic), magic);
        v = _mm_min_ps(_mm_max_ps(v, lo), hi);
        if (q) {
            int32_t t[4];
            _mm_storeu_si128((__m128i *)t, _mm_cvttps_epi32(v));
            for (int k = 0; k < 4; ++k) q[j + k] = (int8_t)t[k];
        }
        _mm_storeu_ps(out + j, _mm_mul_ps(v, vd));
    }
}

/* Q8_2_X4, one block of 32: d = bf16(amax / 127), id = 1/d (of the rounded d). */
static void act_q8_2_block(const float *x, float *out, int8_t *q, float *dout) {
    const float amax = act_amax(x, 32);
    const float d = act_bf16_round(amax / 127.f);
    const float id = d > 0 ? 1.0f / d : 0.0f;
    act_round_block(x, out, q, 32, id, d);
    if (dout) *dout = d;
}

/* Q8_K, one block of 256: d = amax / 127 (float), id = 127 / amax (not 1/d). */
static void act_q8_k_block(const float *x, float *out, int8_t *q, float *dout) {
    const float amax = act_amax(x, QK_K);
    const float d = amax / 127.f;
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    act_round_block(x, out, q, QK_K, id, d);
    if (dout) *dout = d;
}

/* BF16 row: _mm512_cvtne2ps_pbh (RNE, denormal inputs flushed to zero) on every full group
 * of 32, the scalar ggml_compute_fp32_to_bf16 (RNE, denormals kept) on the tail. */
static void act_bf16_row(const float *x, float *out, int64_t n) {
    const int64_t full = n - n % 32;
    for (int64_t j = 0; j < n; ++j) {
        float f = x[j];
        uint32_t u;
        memcpy(&u, &f, 4);
        if (j < full && (u & 0x7f800000u) == 0) {
            u &= 0x80000000u;
            memcpy(&f, &u, 4);
        }
        out[j] = act_bf16_round(f);
    }
}

typedef struct {
    int kind;
    const float *x;
    float *out;
    int8_t *q;
    float *d;
    int64_t nrows, n;
} act_job;

static void act_item(void *ctx, int64_t item, int slot) {
    (void)slot;
    const act_job *j = (const act_job *)ctx;
    const int64_t r1 = (item + 1) * ACT_ITEM_ROWS < j->nrows ? (item + 1) * ACT_ITEM_ROWS : j->nrows;
    const int bs = j->kind == EK_ACT_Q8_K ? QK_K : 32;
    const int64_t nb = j->n / bs;
    for (int64_t r = item * ACT_ITEM_ROWS; r < r1; ++r) {
        const float *x = j->x + r * j->n;
        float *out = j->out + r * j->n;
        if (j->kind == EK_ACT_F32) {
            if (out != x) memcpy(out, x, (size_t)j->n * sizeof(float));
            continue;
        }
        if (j->kind == EK_ACT_BF16) {
            act_bf16_row(x, out, j->n);
            continue;
        }
        for (int64_t b = 0; b < nb; ++b) {
            int8_t *q = j->q ? j->q + r * j->n + b * bs : NULL;
            float *d = j->d ? j->d + r * nb + b : NULL;
            if (j->kind == EK_ACT_Q8_K) act_q8_k_block(x + b * bs, out + b * bs, q, d);
            else act_q8_2_block(x + b * bs, out + b * bs, q, d);
        }
    }
}

int ek_backend_quantize_act(int kind, const float *x, float *out, int8_t *q, float *d, int64_t nrows, int64_t n,
                            int nthreads, ek_team_runner runner) {
    if (kind != EK_ACT_F32 && kind != EK_ACT_Q8_2_X4 && kind != EK_ACT_Q8_K && kind != EK_ACT_BF16)
        return EK_ERR_BAD_ARGUMENT;
    if (n <= 0 || nrows < 0) return EK_ERR_BAD_ARGUMENT;
    if ((kind == EK_ACT_Q8_2_X4 && n % 32) || (kind == EK_ACT_Q8_K && n % QK_K)) return EK_ERR_BAD_ROW_LENGTH;
    if (nrows > 0 && (!x || !out)) return EK_ERR_BAD_ARGUMENT;
    act_job job = {kind, x, out, q, d, nrows, n};
    ek_run_items(act_item, &job, (nrows + ACT_ITEM_ROWS - 1) / ACT_ITEM_ROWS, nthreads, runner);
    return EK_OK;
}
