/* Helpers shared by the row-scaled IQK kernels (IQ2_KS, IQ3_KS, IQ4_KS, IQ5_KS,
 * IQ4_KSS, IQ2_KL).
 *
 * The formats were created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of ik_llama.cpp's
 * row-scaled quantizers (quantize_row_iq2_ks_impl ... quantize_row_iq2_kl_impl in
 * ggml/src/iqk/iqk_quantize.cpp). It builds on iqk_common.h
 * (tables, NI searches, sanitizer, weights, BF, SS), which is shared with the
 * IQ2_K..IQ6_K kernels and is deliberately not modified here.
 *
 * Everything is pure and works on caller-provided memory, so it is thread-safe.
 */
#ifndef EK_IQKS_COMMON_H
#define EK_IQKS_COMMON_H

#include <stdlib.h>
#include "iqk_common.h"

/* Per-row scratch. The KS types choose one scale for the whole row, so the
 * per-32-block results of the first pass have to be kept until the row scale is
 * known. Rows up to EK_IQKS_STACK_BLOCKS 32-blocks (131072 weights) use the
 * caller's stack buffer; longer rows use the heap. */
#define EK_IQKS_STACK_BLOCKS 4096

/* Returns stack_buf when `bytes` fits, else a heap block (NULL on failure, and always
 * while the test hook ek_test_fail_alloc is on). */
static inline void *ek_iqks_scratch(void *stack_buf, size_t stack_bytes, size_t bytes) {
    if (ek_alloc_should_fail()) return NULL;
    if (bytes <= stack_bytes) return stack_buf;
    return malloc(bytes);
}
static inline void ek_iqks_scratch_free(void *p, void *stack_buf) {
    if (p != stack_buf) free(p);
}

/* Sanitized importance weights of one super-block (QHelper::row_weights, S(32)): the
 * 32-groups never straddle a super-block, so a row can be sanitized 256
 * columns at a time. Returns NULL when there is no imatrix. */
static inline const float *ek_iqks_qw(const float *xbl, const float *qw_blk, float *buf) {
    if (!qw_blk) return NULL;
    ek_iqk_sanitize_imatrix(xbl, qw_blk, buf, QK_K, 32);
    return buf;
}

static inline int ek_iqks_clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* Placement of a 2-bit index, shared by IQ2_KS and IQ3_KS (the IQ2_K layout of
 * block_iq2_k's qs, here at base offset 6): each 32-byte half covers 128 elements. */
static inline int ek_iqks_qs2_byte(int e) { return 32 * (e / 128) + (e % 32); }
static inline int ek_iqks_qs2_shift(int e) { return 2 * ((e % 128) / 32); }

/* NI by thresholds. ek_iqks_ni_thresholds fills th[0..n-2] (n = 2^bits) with
 * the smallest t at which NI(V, t) exceeds i; then NI(V, t) is the number of
 * thresholds <= t, found below by a branch-free binary search. This gives
 * exactly the table procedure of best_index_iq*nl (including its NI5 exception and
 * its answers for out-of-range inputs; NaN compares false and gives 0 like
 * the reference) at a fraction of the cost. The one non-monotone corner of
 * the reference, t >= 2^31 where its float-to-int conversion yields INT_MIN
 * and hence index 0, is reproduced explicitly. */
void ek_iqks_ni_thresholds(int bits, const float *V, float *th);

static inline __attribute__((always_inline)) int ek_iqks_ni_th(const float *th, int n, float t) {
    int pos = 0;
#pragma GCC unroll 5
    for (int step = n / 2; step >= 1; step /= 2) pos += (t >= th[pos + step - 1]) ? step : 0;
    return t < 2147483648.0f ? pos : 0;
}

/* Block fit BF (see iqk_common.h) of one 32-block with step 1 and no refit, the form
 * IQ3_KS (V3, ntry 5, guard), IQ4_KS (V4, ntry 7) and IQ5_KS (V5, ntry 5)
 * use. Same results as ek_iqk_block_fit; faster where AVX2 is available (see
 * iqks_common.c). Set up once per row with ek_iqks_bf_init. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(EK_IQKS_PORTABLE_ONLY)
#define EK_IQKS_HAVE_X86 1
#else
#define EK_IQKS_HAVE_X86 0
#endif
typedef struct {
    int bits, ntry, guard, ncand, nvec, use_vec;
    const float *T0, *T1;
    float lth[4][31][8]; /* per vector of 8 candidates: each lane's NI thresholds */
    float lsh[4][8];     /* 0, or the shift of the lane's table half */
    float lnum[4][8];    /* numerator t + T[0] of the lane's inverse scale */
    float ltab[32];      /* base half of the table, zero padded */
} ek_iqks_bf;
void ek_iqks_bf_init(ek_iqks_bf *bf, int bits, int ntry, int guard);
int ek_iqks_bf_fit(const ek_iqks_bf *bf, const float *x, const float *w, float *d, int *shift);

/* The first pass shared by IQ3_KS, IQ4_KS, IQ5_KS, IQ4_KSS and IQ2_KL: for every 32-block of
 * the row, its importance weights (kind wkind, sigma2 = sigma_scale * the super-block's sum of
 * squares), then the type's block fit, which returns the block's signed scale (0 for an empty
 * block) and may set per-block bits (shift flags) in its super-block blk. Stores the scales
 * (scales[32-block]) and returns the scale of largest magnitude (the first one on ties). */
typedef float (*ek_iqks_fit_fn)(const void *ctx, const float *xb, const float *w, uint8_t *blk, int ib);
float ek_iqks_first_pass(const float *x, const float *qw, int64_t n, float sigma_scale, int wkind,
                         uint8_t *blocks, int block_bytes, ek_iqks_fit_fn fit, const void *ctx, float *scales);

/* IQ4_KS and IQ5_KS rows (quantize_row_iq4_k_impl_bs128, quantize_row_iq5_ks_impl):
 * float32 row scale D, odd 7-bit block scales ls (code l in bits 1..7 of scale byte ib,
 * shift in bit 0), from pass 1 (V<bits>, ntry) and the row's final scale refitted from
 * the weighted sums. encode writes block ib's indices of xb for the step 1 / idl of table
 * half `half` and adds its weighted sums to *sumqx, *sumq2 (in the reference's order).
 * Returns EK_OK, or EK_ERR_NO_MEMORY (the row then stays all zero). */
typedef void (*ek_iqks_encode_fn)(const float *xb, const float *w, int ls, float idl, int half, uint8_t *blk,
                                  int ib, float *sumqx, float *sumq2);
int ek_iqks_quantize_odd7_row(const float *x, uint8_t *y, int64_t n, const float *qw, int block_bytes, int bits,
                              int ntry, ek_iqks_encode_fn encode);

#endif
