/* RMS norm and SwiGLU for the reference forward pass, in float32 (AVX-512F).
 *
 * Both are one pass over memory each where torch needs several (RMS norm: square, mean,
 * rsqrt, two products; SwiGLU: silu, then the product), and both run on the caller's
 * thread team like the attention kernel.
 *
 * RMS norm follows ggml's rms_norm + mul: the squares are float products summed in
 * double (8 double lanes here, one running sum in ggml), mean = (float)(sum / n),
 * scale = 1 / sqrtf(mean + eps), y = (x * scale) * w with two roundings.
 * SwiGLU: y = g / (1 + e^-g) * u, e^x from ek_avx512.h (about 1 ulp).
 *
 * Without AVX-512F the entry points return EK_ERR_NOT_IMPLEMENTED and the caller uses
 * torch. */
#include <math.h>
#include "ek_avx512.h"
#include "ek_team.h"

typedef struct {
    const float *x, *w;
    float *out;
    int64_t n, rows, inner, x_outer, x_inner;   /* row r = (o, i) at x + o * x_outer + i * x_inner */
    float eps;
} norm_ctx;

typedef struct {
    const float *g, *u;
    float *out;
    int64_t n;
} swiglu_ctx;

#define NORM_ROWS 16          /* rows per work item */
#define SWIGLU_CHUNK 16384    /* elements per work item (a multiple of 16) */

#ifdef EK_HAVE_AVX512_KERNELS
static EK_AVX512 void norm_item(void *vctx, int64_t item, int slot) {
    (void)slot;
    const norm_ctx *c = (const norm_ctx *)vctx;
    const int64_t n = c->n, r1 = (item + 1) * NORM_ROWS < c->rows ? (item + 1) * NORM_ROWS : c->rows;
    for (int64_t r = item * NORM_ROWS; r < r1; ++r) {
        const int64_t o = r / c->inner, i = r % c->inner;
        const float *x = c->x + o * c->x_outer + i * c->x_inner;
        float *y = c->out + r * n;
        __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            const __m512 v = _mm512_loadu_ps(x + j);
            const __m512 sq = _mm512_mul_ps(v, v);
            s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(sq)));
            s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sq), 1))));
        }
        double sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
        for (; j < n; ++j) sum += (double)(x[j] * x[j]);
        const float mean = (float)(sum / (double)n);
        const float scale = 1.0f / sqrtf(mean + c->eps);
        const __m512 sv = _mm512_set1_ps(scale);
        for (j = 0; j + 16 <= n; j += 16)
            _mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), sv), _mm512_loadu_ps(c->w + j)));
        for (; j < n; ++j) y[j] = (x[j] * scale) * c->w[j];
    }
}

static EK_AVX512 void swiglu_item(void *vctx, int64_t item, int slot) {
    (void)slot;
    const swiglu_ctx *c = (const swiglu_ctx *)vctx;
    const int64_t j0 = item * SWIGLU_CHUNK, j1 = j0 + SWIGLU_CHUNK < c->n ? j0 + SWIGLU_CHUNK : c->n;
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
        const __m512 g = _mm512_loadu_ps(c->g + j);
        const __m512 e = ek_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_storeu_ps(c->out + j, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(c->u + j)));
    }
    if (j < j1) {
        const __mmask16 m = (__mmask16)((1u << (j1 - j)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(m, c->g + j);
        const __m512 e = ek_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_mask_storeu_ps(c->out + j, m, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)),
                                                          _mm512_maskz_loadu_ps(m, c->u + j)));
    }
}

#endif

int ek_has_norm_act(void) { return ek_have_avx512(); }

int ek_rms_norm(const float *x, const float *w, float *out, int64_t outer, int64_t inner, int64_t n,
                int64_t x_outer_stride, int64_t x_inner_stride, float eps, int nthreads, ek_team_runner runner) {
    if (outer < 0 || inner < 0 || n <= 0) return EK_ERR_BAD_ARGUMENT;
    if (outer * inner == 0) return EK_OK;
    if (!x || !w || !out) return EK_ERR_BAD_ARGUMENT;
    if (!ek_have_avx512()) return EK_ERR_NOT_IMPLEMENTED;
#ifdef EK_HAVE_AVX512_KERNELS
    const int64_t rows = outer * inner;
    norm_ctx c = {x, w, out, n, rows, inner, x_outer_stride, x_inner_stride, eps};
    ek_run_items(norm_item, &c, (rows + NORM_ROWS - 1) / NORM_ROWS, nthreads, runner);
    return EK_OK;
#else
    (void)nthreads; (void)runner; (void)eps; (void)x_outer_stride; (void)x_inner_stride;
    return EK_ERR_NOT_IMPLEMENTED;
#endif
}

int ek_swiglu(const float *g, const float *u, float *out, int64_t n, int nthreads, ek_team_runner runner) {
    if (n < 0) return EK_ERR_BAD_ARGUMENT;
    if (n == 0) return EK_OK;
    if (!g || !u || !out) return EK_ERR_BAD_ARGUMENT;
    if (!ek_have_avx512()) return EK_ERR_NOT_IMPLEMENTED;
#ifdef EK_HAVE_AVX512_KERNELS
    swiglu_ctx c = {g, u, out, n};
    ek_run_items(swiglu_item, &c, (n + SWIGLU_CHUNK - 1) / SWIGLU_CHUNK, nthreads, runner);
    return EK_OK;
#else
    (void)nthreads; (void)runner;
    return EK_ERR_NOT_IMPLEMENTED;
#endif
}
