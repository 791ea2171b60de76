/* The format table and the row drivers (rows split into items run by team.c).
 *
 * Each format's kernels live in their own source file and are referenced here as
 * weak symbols, so a partial build (e.g. while a format is being written) links
 * and simply reports the missing kernel as EK_ERR_NOT_IMPLEMENTED. */
#include <pthread.h>
#include "ek_common.h"
#include "ek_team.h"

#define EK_DECLARE(name)                                                             \
    int ek_quantize_row_##name(const float *, uint8_t *, int64_t, const float *, int) \
        __attribute__((weak));                                                       \
    void ek_dequantize_row_##name(const uint8_t *, float *, int64_t, int) __attribute__((weak));

/* id, kernel name, elements per block, bytes per block, bytes of the per-row header.
 * evalkit/formats/__init__.py holds the same geometry spelled out field by field (as
 * ggml's block structs); tests/test_geometry.py checks the two against each other
 * through ek_format_info. */
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
    X(EK_IQ4_KT, iq4_kt, 256, 128, 4)                   \
    X(EK_IQ4_XS, iq4_xs, 256, 136, 0)                   \
    X(EK_Q8_KV, q8_kv, 32, 32, 8)

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

int ek_format_info(int type, int *block_size, int *type_size, int *header_bytes) {
    const ek_format *f = ek_lookup(type);
    if (!f) return EK_ERR_UNKNOWN_TYPE;
    if (block_size) *block_size = f->block_size;
    if (type_size) *type_size = f->block_bytes;
    if (header_bytes) *header_bytes = f->header_bytes;
    return EK_OK;
}

int ek_has_quantize(int type) { const ek_format *f = ek_lookup(type); return f && f->quantize; }
int ek_has_dequantize(int type) { const ek_format *f = ek_lookup(type); return f && f->dequantize; }

typedef struct {
    const ek_format *fmt;
    const float *x;
    const uint8_t *q;
    float *xout;
    uint8_t *qout;
    int64_t nrows, n, row_bytes;
    const float *imatrix;
    int flags;
    int status; /* EK_OK, or the first failure of a row kernel (written atomically) */
} ek_job;

/* Rows per work item: enough to amortise claiming an item, small enough to balance two
 * threads on a SmolLM2-sized tile. Rows never interact, so any split gives the same bytes. */
#define EK_ITEM_ROWS 32

/* A failed row (out of memory) fails the call: it is recorded and the remaining items
 * are skipped. */
static void ek_quantize_item(void *ctx, int64_t i, int slot) {
    (void)slot;
    ek_job *j = (ek_job *)ctx;
    if (__atomic_load_n(&j->status, __ATOMIC_RELAXED) != EK_OK) return;
    const int64_t r1 = (i + 1) * EK_ITEM_ROWS < j->nrows ? (i + 1) * EK_ITEM_ROWS : j->nrows;
    for (int64_t r = i * EK_ITEM_ROWS; r < r1; ++r) {
        const int rc = j->fmt->quantize(j->x + r * j->n, j->qout + r * j->row_bytes, j->n, j->imatrix, j->flags);
        if (rc != EK_OK) {
            __atomic_store_n(&j->status, rc, __ATOMIC_RELAXED);
            return;
        }
    }
}

static void ek_dequantize_item(void *ctx, int64_t i, int slot) {
    (void)slot;
    const ek_job *j = (const ek_job *)ctx;
    const int64_t r1 = (i + 1) * EK_ITEM_ROWS < j->nrows ? (i + 1) * EK_ITEM_ROWS : j->nrows;
    for (int64_t r = i * EK_ITEM_ROWS; r < r1; ++r)
        j->fmt->dequantize(j->q + r * j->row_bytes, j->xout + r * j->n, j->n, j->flags);
}

/* The format (or NULL with *rc set) for a call on nrows rows of n elements. */
static const ek_format *ek_checked(int type, int64_t n, int64_t nrows, const void *src, const void *dst,
                                   int want_quantize, int64_t *row_bytes, int *rc) {
    const ek_format *f = ek_lookup(type);
    *rc = EK_OK;
    if (!f) *rc = EK_ERR_UNKNOWN_TYPE;
    else if (want_quantize ? !f->quantize : !f->dequantize) *rc = EK_ERR_NOT_IMPLEMENTED;
    else if ((*row_bytes = ek_row_size(type, n)) < 0) *rc = (int)*row_bytes;
    else if (nrows < 0 || (nrows > 0 && (!src || !dst))) *rc = EK_ERR_BAD_ARGUMENT;
    return *rc == EK_OK ? f : NULL;
}

int ek_quantize(int type, const float *x, uint8_t *out, int64_t nrows, int64_t n, const float *imatrix,
                int nthreads, int flags) {
    int64_t rb;
    int rc;
    const ek_format *f = ek_checked(type, n, nrows, x, out, 1, &rb, &rc);
    if (!f) return rc;
    ek_job job = {f, x, NULL, NULL, out, nrows, n, rb, imatrix, flags, EK_OK};
    ek_run_items(ek_quantize_item, &job, (nrows + EK_ITEM_ROWS - 1) / EK_ITEM_ROWS, nthreads, NULL);
    return job.status; /* every worker has finished: ek_run_items joined them */
}

int ek_dequantize_team(int type, const uint8_t *q, float *out, int64_t nrows, int64_t n, int variant,
                       int nthreads, ek_team_runner runner) {
    int64_t rb;
    int rc;
    const ek_format *f = ek_checked(type, n, nrows, q, out, 0, &rb, &rc);
    if (!f) return rc;
    ek_job job = {f, NULL, q, out, NULL, nrows, n, rb, NULL, variant, EK_OK};
    ek_run_items(ek_dequantize_item, &job, (nrows + EK_ITEM_ROWS - 1) / EK_ITEM_ROWS, nthreads, runner);
    return EK_OK;
}

int ek_dequantize(int type, const uint8_t *q, float *out, int64_t nrows, int64_t n, int nthreads, int variant) {
    return ek_dequantize_team(type, q, out, nrows, n, variant, nthreads, NULL);
}

/* ------------------------------------------------------------------ test hook */

static int g_fail_alloc;

int ek_test_fail_alloc(int on) { return __atomic_exchange_n(&g_fail_alloc, on != 0, __ATOMIC_SEQ_CST); }

int ek_alloc_should_fail(void) { return __atomic_load_n(&g_fail_alloc, __ATOMIC_RELAXED); }
