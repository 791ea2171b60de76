/* The format table and the multi-threaded row driver.
 *
 * Each format's kernels live in their own source file and are referenced here as
 * weak symbols, so a partial build (e.g. while a format is being written) links
 * and simply reports the missing kernel as EK_ERR_NOT_IMPLEMENTED. */
#include <pthread.h>
#include <stdlib.h>
#include "ek_common.h"
#include "ek_team.h"

#define EK_DECLARE(name)                                                              \
    void ek_quantize_row_##name(const float *, uint8_t *, int64_t, const float *, int) \
        __attribute__((weak));                                                        \
    void ek_dequantize_row_##name(const uint8_t *, float *, int64_t, int) __attribute__((weak));

#define EK_FORMATS(X)                                   \
    X(EK_F32, f32, 1, 4, 0)                             \
    X(EK_F16, f16, 1, 2, 0)                             \
    X(EK_BF16, bf16, 1, 2, 0)                           \
    X(EK_Q4_0, q4_0, 32, 18, 0)                         \
    X(EK_Q4_1, q4_1, 32, 20, 0)                         \
    X(EK_Q5_0, q5_0, 32, 22, 0)                         \
    X(EK_Q5_1, q5_1, 32, 24, 0)                         \
    X(EK_Q6_0, q6_0, 32, 26, 0)                         \
    X(EK_Q8_0, q8_0, 32, 34, 0)                         \
    X(EK_IQ4_NL, iq4_nl, 32, 18, 0)                     \
    X(EK_Q2_K, q2_k, 256, 84, 0)                        \
    X(EK_Q3_K, q3_k, 256, 110, 0)                       \
    X(EK_Q4_K, q4_k, 256, 144, 0)                       \
    X(EK_Q5_K, q5_k, 256, 176, 0)                       \
    X(EK_Q6_K, q6_k, 256, 210, 0)                       \
    X(EK_IQ2_K, iq2_k, 256, 76, 0)                      \
    X(EK_IQ3_K, iq3_k, 256, 110, 0)                     \
    X(EK_IQ4_K, iq4_k, 256, 144, 0)                     \
    X(EK_IQ5_K, iq5_k, 256, 176, 0)                     \
    X(EK_IQ6_K, iq6_k, 256, 212, 0)                     \
    X(EK_IQ2_KS, iq2_ks, 256, 70, 2)                    \
    X(EK_IQ3_KS, iq3_ks, 256, 102, 2)                   \
    X(EK_IQ4_KS, iq4_ks, 256, 136, 4)                   \
    X(EK_IQ5_KS, iq5_ks, 256, 168, 4)                   \
    X(EK_IQ4_KSS, iq4_kss, 256, 128, 4)                 \
    X(EK_IQ2_KL, iq2_kl, 256, 86, 2)                    \
    X(EK_IQ1_KT, iq1_kt, 256, 56, 4)                    \
    X(EK_IQ2_KT, iq2_kt, 256, 68, 4)                    \
    X(EK_IQ3_KT, iq3_kt, 256, 100, 4)                   \
    X(EK_IQ4_KT, iq4_kt, 256, 128, 4)

#define EK_DECL_ENTRY(id, name, bs, bb, hb) EK_DECLARE(name)
EK_FORMATS(EK_DECL_ENTRY)

typedef struct {
    int block_size;
    int block_bytes;
    int header_bytes;
    ek_quantize_row_fn quantize;
    ek_dequantize_row_fn dequantize;
} ek_format;

static ek_format g_formats[EK_TYPE_COUNT];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void ek_init_formats(void) {
#define EK_FILL(id, name, bs, bb, hb)                              \
    g_formats[id].block_size = bs;                                 \
    g_formats[id].block_bytes = bb;                                \
    g_formats[id].header_bytes = hb;                               \
    g_formats[id].quantize = ek_quantize_row_##name;               \
    g_formats[id].dequantize = ek_dequantize_row_##name;
    EK_FORMATS(EK_FILL)
}

static const ek_format *ek_lookup(int type) {
    pthread_once(&g_once, ek_init_formats);
    if (type < 0 || type >= EK_TYPE_COUNT || g_formats[type].block_size == 0) return NULL;
    return &g_formats[type];
}

int64_t ek_row_size(int type, int64_t n) {
    const ek_format *f = ek_lookup(type);
    if (!f) return EK_ERR_UNKNOWN_TYPE;
    if (n <= 0 || n % f->block_size) return EK_ERR_BAD_ROW_LENGTH;
    return f->header_bytes + (n / f->block_size) * (int64_t)f->block_bytes;
}

int ek_has_quantize(int type) { const ek_format *f = ek_lookup(type); return f && f->quantize; }
int ek_has_dequantize(int type) { const ek_format *f = ek_lookup(type); return f && f->dequantize; }

typedef struct {
    const ek_format *fmt;
    const float *x;
    const uint8_t *q;
    float *xout;
    uint8_t *qout;
    int64_t row0, row1, n, row_bytes;
    const float *imatrix;
    int flags;
} ek_job;

static void *ek_run_quantize(void *arg) {
    ek_job *j = (ek_job *)arg;
    for (int64_t r = j->row0; r < j->row1; ++r)
        j->fmt->quantize(j->x + r * j->n, j->qout + r * j->row_bytes, j->n, j->imatrix, j->flags);
    return NULL;
}

static void *ek_run_dequantize(void *arg) {
    ek_job *j = (ek_job *)arg;
    for (int64_t r = j->row0; r < j->row1; ++r)
        j->fmt->dequantize(j->q + r * j->row_bytes, j->xout + r * j->n, j->n, j->flags);
    return NULL;
}

/* Split rows into nthreads contiguous ranges; the calling thread runs the first. */
static int ek_parallel(ek_job *proto, int64_t nrows, int nthreads, void *(*fn)(void *)) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > nrows) nthreads = (int)(nrows > 0 ? nrows : 1);
    if (nthreads > 256) nthreads = 256;
    ek_job jobs[256];
    pthread_t tids[256];
    int started[256] = {0};
    for (int t = 0; t < nthreads; ++t) {
        jobs[t] = *proto;
        jobs[t].row0 = nrows * t / nthreads;
        jobs[t].row1 = nrows * (t + 1) / nthreads;
    }
    for (int t = 1; t < nthreads; ++t)
        started[t] = pthread_create(&tids[t], NULL, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    /* a thread that could not be started runs its rows here */
    for (int t = 1; t < nthreads; ++t) {
        if (started[t]) pthread_join(tids[t], NULL);
        else fn(&jobs[t]);
    }
    return EK_OK;
}

int ek_quantize(int type, const float *x, uint8_t *out, int64_t nrows, int64_t n, const float *imatrix,
                int nthreads, int flags) {
    const ek_format *f = ek_lookup(type);
    if (!f) return EK_ERR_UNKNOWN_TYPE;
    if (!f->quantize) return EK_ERR_NOT_IMPLEMENTED;
    int64_t rb = ek_row_size(type, n);
    if (rb < 0) return (int)rb;
    if (nrows < 0 || (nrows > 0 && (!x || !out))) return EK_ERR_BAD_ARGUMENT;
    ek_job job = {f, x, NULL, NULL, out, 0, 0, n, rb, imatrix, flags};
    return ek_parallel(&job, nrows, nthreads, ek_run_quantize);
}

int ek_dequantize(int type, const uint8_t *q, float *out, int64_t nrows, int64_t n, int nthreads, int variant) {
    const ek_format *f = ek_lookup(type);
    if (!f) return EK_ERR_UNKNOWN_TYPE;
    if (!f->dequantize) return EK_ERR_NOT_IMPLEMENTED;
    int64_t rb = ek_row_size(type, n);
    if (rb < 0) return (int)rb;
    if (nrows < 0 || (nrows > 0 && (!q || !out))) return EK_ERR_BAD_ARGUMENT;
    ek_job job = {f, NULL, q, out, NULL, 0, 0, n, rb, NULL, variant};
    return ek_parallel(&job, nrows, nthreads, ek_run_dequantize);
}

/* Rows per work item of ek_dequantize_team: enough to amortise the claim, small enough
 * to balance two threads on a SmolLM2-sized tile. */
#define EK_TEAM_ROWS 32

static void ek_dequantize_item(void *ctx, int64_t i, int slot) {
    (void)slot;
    const ek_job *j = (const ek_job *)ctx;
    int64_t r1 = (i + 1) * EK_TEAM_ROWS < j->row1 ? (i + 1) * EK_TEAM_ROWS : j->row1;
    for (int64_t r = i * EK_TEAM_ROWS; r < r1; ++r)
        j->fmt->dequantize(j->q + r * j->row_bytes, j->xout + r * j->n, j->n, j->flags);
}

int ek_dequantize_team(int type, const uint8_t *q, float *out, int64_t nrows, int64_t n, int variant,
                       int nthreads, ek_team_runner runner) {
    const ek_format *f = ek_lookup(type);
    if (!f) return EK_ERR_UNKNOWN_TYPE;
    if (!f->dequantize) return EK_ERR_NOT_IMPLEMENTED;
    int64_t rb = ek_row_size(type, n);
    if (rb < 0) return (int)rb;
    if (nrows < 0 || (nrows > 0 && (!q || !out))) return EK_ERR_BAD_ARGUMENT;
    ek_job job = {f, NULL, q, out, NULL, 0, nrows, n, rb, NULL, variant};
    ek_run_items(ek_dequantize_item, &job, (nrows + EK_TEAM_ROWS - 1) / EK_TEAM_ROWS, nthreads, runner);
    return EK_OK;
}
