/* evalkit kernel library: C ABI.
 *
 * Quantization formats originate in ik_llama.cpp / llama.cpp (ggml). The IQ*_K
 * family was created by Iwan Kawrakow. This is an independent implementation
 * written from evalkit's specification of the reference's quantizers and dequantizers
 * (ggml/src/iqk/iqk_quantize.cpp of ik_llama.cpp).
 *
 * Every function works on whole rows; rows never interact, so any split of rows
 * across threads gives identical bytes.
 */
#ifndef EVALKIT_KERNELS_H
#define EVALKIT_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ggml type ids (ggml/include/ggml.h of ik_llama.cpp) */
enum ek_type {
    EK_F32 = 0, EK_F16 = 1, EK_Q4_0 = 2, EK_Q4_1 = 3, EK_Q5_0 = 6, EK_Q5_1 = 7,
    EK_Q8_0 = 8, EK_Q2_K = 10, EK_Q3_K = 11, EK_Q4_K = 12, EK_Q5_K = 13,
    EK_Q6_K = 14, EK_IQ4_NL = 20, EK_BF16 = 30, EK_Q6_0 = 133,
    EK_IQ2_K = 137, EK_IQ3_K = 138, EK_IQ4_K = 139, EK_IQ5_K = 140, EK_IQ6_K = 141,
    EK_IQ4_KS = 144, EK_IQ2_KS = 145, EK_IQ4_KSS = 146, EK_IQ5_KS = 152,
    EK_IQ2_KT = 153, EK_IQ3_KT = 154, EK_IQ4_KT = 155, EK_IQ3_KS = 156,
    EK_IQ2_KL = 157, EK_IQ1_KT = 158,
    EK_IQ4_XS = 23, EK_Q8_KV = 151,   /* dequantized only (kernels/read_only.c) */
    EK_TYPE_COUNT = 512
};

/* Dequantization variants. */
enum ek_dequant_variant {
    EK_DEQ_TO_FLOAT = 0,   /* the reference's CPU to_float (what golden .deq hold) */
    EK_DEQ_INFERENCE = 1   /* what the reference's matmul kernels use (IQ6_K table, KT scale factors) */
};

/* Quantization flags. */
enum ek_quant_flags {
    EK_QFLAG_NONE = 0,
    EK_QFLAG_IQ2KS_SLOW = 1  /* IQ2_KS portable quantizer instead of the AVX2 "fast" path */
};

/* Error codes returned by the entry points. */
enum ek_status {
    EK_OK = 0,
    EK_ERR_UNKNOWN_TYPE = -1,
    EK_ERR_NOT_IMPLEMENTED = -2,
    EK_ERR_BAD_ROW_LENGTH = -3,
    EK_ERR_BAD_ARGUMENT = -4,
    EK_ERR_NO_MEMORY = -5
};

/* Per-row kernels implemented by each format's source file.
 * quantize: x has n floats, y receives row_size(type, n) bytes, qw is NULL or n
 * importance weights shared by all rows (the kernel applies the type's sanitizer).
 * Returns EK_OK, or EK_ERR_NO_MEMORY when its scratch memory (or, for the KT types,
 * the codebook) could not be allocated; the row is then all zero bytes. */
typedef int (*ek_quantize_row_fn)(const float *x, uint8_t *y, int64_t n, const float *qw, int flags);
typedef void (*ek_dequantize_row_fn)(const uint8_t *y, float *x, int64_t n, int variant);

/* Bytes of one row of n elements, or a negative ek_status. */
int64_t ek_row_size(int type, int64_t n_per_row);
/* Geometry of a type: elements per block, bytes per block, bytes of the per-row header
 * (any pointer may be NULL). Returns EK_OK, or EK_ERR_UNKNOWN_TYPE for an id the library
 * does not know (which also enumerates the known ids). */
int ek_format_info(int type, int *block_size, int *type_size, int *header_bytes);
/* 1 when the library has a quantizer / dequantizer for the type. */
int ek_has_quantize(int type);
int ek_has_dequantize(int type);

/* Quantize nrows rows of n_per_row floats into out (nrows * row_size bytes).
 * EK_ERR_NO_MEMORY when a row kernel ran out of memory (the output is then unusable). */
int ek_quantize(int type, const float *x, uint8_t *out, int64_t nrows, int64_t n_per_row,
                const float *imatrix, int nthreads, int flags);
/* Dequantize nrows rows into out (nrows * n_per_row floats). */
int ek_dequantize(int type, const uint8_t *q, float *out, int64_t nrows, int64_t n_per_row,
                  int nthreads, int variant);

/* A thread-team runner with the signature of GOMP_parallel (libgomp / LLVM libomp):
 * runs body(data) on nthreads threads of the caller's team and returns when all are
 * done. Passing torch's lets evalkit's parallel work use torch's own (spinning)
 * threads instead of competing with them; NULL means pthreads of our own. */
typedef void (*ek_team_runner)(void (*body)(void *), void *data, unsigned nthreads, unsigned flags);

/* ek_dequantize with the rows split over nthreads threads of the runner's team. */
int ek_dequantize_team(int type, const uint8_t *q, float *out, int64_t nrows, int64_t n_per_row,
                       int variant, int nthreads, ek_team_runner runner);

/* Causal grouped-query attention, float32 (kernels/attention.c): q, out (B, T, H, D) and
 * k, v (B, T, Hkv, D), contiguous; only positions t >= q_from are computed and out holds
 * T - q_from positions. Returns EK_ERR_NOT_IMPLEMENTED where ek_has_causal_attention(D)
 * is 0 (no AVX-512F, or D not a multiple of 16). */
int ek_has_causal_attention(int64_t head_dim);
int ek_causal_attention(const float *q, const float *k, const float *v, float *out, int64_t B, int64_t T,
                        int64_t H, int64_t Hkv, int64_t D, int64_t q_from, float scale, int nthreads,
                        ek_team_runner runner);

/* RMS norm and SwiGLU, float32 (kernels/norm_act.c); EK_ERR_NOT_IMPLEMENTED where
 * ek_has_norm_act() is 0 (no AVX-512F).
 * rms_norm: out (outer*inner rows of n, contiguous) = x / sqrt(mean(x^2) + eps) * w, row
 * (o, i) of x at x + o * x_outer_stride + i * x_inner_stride (floats).
 * swiglu: out[j] = g[j] / (1 + e^-g[j]) * u[j]; out may be g. */
int ek_has_norm_act(void);
int ek_rms_norm(const float *x, const float *w, float *out, int64_t outer, int64_t inner, int64_t n,
                int64_t x_outer_stride, int64_t x_inner_stride, float eps, int nthreads, ek_team_runner runner);
int ek_swiglu(const float *g, const float *u, float *out, int64_t n, int nthreads, ek_team_runner runner);

/* Emulated reference CPU backend (docs/backend-ik-cpu.md; kernels/backend_*.c).
 *
 * Activation rounding (§3): each of the nrows rows of n floats of x is quantized to `kind`
 * and written back dequantized (code x block scale) into out (which may be x). When not
 * NULL, q receives the int8 codes (nrows*n) and d the block scales (nrows*n/block, the
 * bf16-rounded value for Q8_2_X4). EK_ERR_BAD_ROW_LENGTH when n is not a multiple of the
 * block (32 for Q8_2_X4, 256 for Q8_K). */
enum ek_act_kind {
    EK_ACT_F32 = 0,      /* no rounding (F32/F16 weights) */
    EK_ACT_Q8_2_X4 = 1,  /* blocks of 32, d = bf16(amax/127), q = RNE(x/d) */
    EK_ACT_Q8_K = 2,     /* blocks of 256, d = amax/127, q = RNE(x*127/amax) */
    EK_ACT_BF16 = 3      /* RNE to bfloat16 (denormals of full 32-groups flushed) */
};
int ek_backend_quantize_act(int kind, const float *x, float *out, int8_t *q, float *d, int64_t nrows, int64_t n,
                            int nthreads, ek_team_runner runner);

/* Weight conversion (§4): the float32 weights that the reference's on-the-fly re-encoding
 * of nrows packed rows of `type` represents (Q8_K_R16 with the type's d0, Q8_1_R8 with
 * fp16 scales, Q6_K -> Q8_0_R8, KT -> Q8_0_R8 with fp16 block scales; exact types are
 * plainly dequantized with the inference variant). EK_ERR_NOT_IMPLEMENTED for types the
 * reference never converts (F32, F16, BF16). */
int ek_backend_has_convert(int type);
int ek_backend_convert(int type, const uint8_t *q, float *out, int64_t nrows, int64_t n, int nthreads,
                       ek_team_runner runner);

/* Test hook: while on != 0, every row kernel's scratch allocation fails, so that the
 * EK_ERR_NO_MEMORY path can be exercised (the KT codebooks, built once per process, are
 * not affected). Returns the previous setting. */
int ek_test_fail_alloc(int on);

/* fp16 / bf16 helpers (round to nearest even, as F16C with immediate 0). */
uint16_t ek_fp32_to_fp16(float f);
float ek_fp16_to_fp32(uint16_t h);

/* Repacked ("_R4"/"_R8") tensor blocks → plain rows by bit-field runs (kernels/repack.c;
 * the runs come from evalkit/formats/repack.py). */
int ek_unrepack(const uint8_t *src, int64_t ngroups, int64_t nchunks, int64_t src_group_stride,
                int64_t src_offset, uint8_t *dst, int64_t rows, int64_t row_stride, int64_t dst_offset,
                int64_t chunk_bytes, const int32_t *runs, int64_t nruns);

#ifdef __cplusplus
}
#endif
#endif
