/* Trellis ("KT") codebooks: the integer generator, the clustered codebooks the
 * quantizers search, and the two search helpers (best match, best scale).
 *
 * The KT formats (IQ1_KT, IQ2_KT, IQ3_KT, IQ4_KT) were created by Iwan Kawrakow in
 * ik_llama.cpp. This is an independent implementation written from evalkit's
 * specification and from reading the reference quantizer (class QuantizerIQKT in
 * ggml/src/iqk/iqk_quantize.cpp); no code was copied.
 *
 * Internal to the kernel library.
 */
#ifndef EK_KT_CODEBOOK_H
#define EK_KT_CODEBOOK_H

#include <stdint.h>

#define EK_KT_OFFSET 4096u

/* The generator (QuantizerIQKT::set_values): group index i (offset already added by the
 * caller) -> g values v in -126..126 (|v| when is_abs), each multiplied by scale
 * with one rounding. */
static inline void ek_kt_gen(uint32_t x, int g, int is_abs, float scale, float *out) {
    for (int k = 0; k < g; ++k) {
        x *= 0xCBAC1FEDu;
        const uint32_t s = x & 0x3F3F3F3Fu;
        /* byte sum via one multiply: the top byte of s * 0x01010101 (no carries,
         * each byte <= 63) */
        int v = (int)((s * 0x01010101u) >> 24) - 126;
        if (is_abs) v = v < 0 ? -v : v;
        out[k] = scale * (float)v;
    }
}

/* Which codebook. */
enum ek_kt_book {
    EK_KT_BOOK_IQ1 = 0,   /* 13 bits, g = 8, 256 clusters, 32 neighbours */
    EK_KT_BOOK_IQ2 = 1,   /* 16 bits, g = 8, 256 clusters,  8 neighbours */
    EK_KT_BOOK_IQ3 = 2,   /* 16 bits, |v|, g = 8, 256 clusters, 8 neighbours */
    EK_KT_BOOK_IQ4A = 3,  /* 15 bits, g = 4, 625 clusters, 6 neighbours, offset 4096 */
    EK_KT_BOOK_IQ4B = 4,  /* same, offset 4096 + 32768 */
    EK_KT_BOOK_COUNT = 5
};

typedef struct ek_kt_codebook {
    int g;              /* values per group: 8 or 4 */
    int nval;           /* 2^bits points */
    int ncluster;       /* 256 or 625 */
    int is_abs;
    float *values;      /* nval * g, point-major */
    float mid[8];       /* per-dimension split for the 256-cluster books */
    int32_t *cl_off;    /* ncluster + 1 offsets (in points) into cl_idx */
    int32_t *cl_idx;    /* member points of each cluster, padded to multiples of 8 */
    float *cl_valt;     /* member values, in batches of 8 candidates stored lane-major:
                           batch b of a cluster: g rows of 8 lanes (see ek_kt_codebook.c) */
} ek_kt_codebook;

/* Library-internal: not exported from the shared object. */
#if defined(__GNUC__)
#define EK_KT_HIDDEN __attribute__((visibility("hidden")))
#else
#define EK_KT_HIDDEN
#endif

/* The codebook, built once per process (thread-safe); NULL if out of memory. */
EK_KT_HIDDEN const ek_kt_codebook *ek_kt_get_codebook(int book);

/* Nearest codebook point per group for scale d (the reference's AVX2 search,
 * emulated lane for lane). xb/weight: 32 values; best_idx: 32/g indices. */
EK_KT_HIDDEN void ek_kt_find_best_match(const ek_kt_codebook *cb, float d, const float *xb, const float *weight,
                           int *best_idx);

/* S = sum w q x, Q = sum w q^2 over the 32 values with the reference's 8-lane FMA
 * accumulation; returns S/Q in *d and S^2/Q in *score (both 0 when Q <= 0). */
EK_KT_HIDDEN void ek_kt_find_best_scale(const ek_kt_codebook *cb, const float *xb, const float *weight,
                           const int *best_idx, float *d, float *score);

#endif
