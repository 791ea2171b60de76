/* SSE2 helpers for the row dequantizers (x86-64 baseline; no -march needed).
 *
 * Bit-exactness: integer codes are widened to int32 and converted with cvtdq2ps, which is
 * exact for these small integers, exactly like the scalar (float) casts. The products and
 * sums are single mulps/addps, i.e. the same IEEE float operations, in the same order, as
 * the scalar code compiled with -ffp-contract=off (no FMA is ever used), so every lane
 * rounds exactly like the scalar expression. Block scales are converted from fp16 once per
 * block, in scalar code. Loads and stores are unaligned-safe.
 */
#ifndef EK_SIMD_H
#define EK_SIMD_H

#include <stdint.h>

#include "ek_common.h"

/* fp16 -> fp32 for a block scale: the normal-number branch of ek_fp16_to_fp32 inlined
 * (same bits), everything else (zero, subnormal, inf, NaN) delegated to it. The call
 * to the out-of-line helper otherwise costs as much as a whole 32-element block. */
static inline float ek_fp16_to_fp32_inl(uint16_t h) {
    const uint32_t e = h & 0x7c00u;
    if (__builtin_expect(e - 0x0400u >= 0x7800u, 0)) return ek_fp16_to_fp32(h);
    const uint32_t u = ((uint32_t)(h & 0x8000u) << 16) | ((((uint32_t)h & 0x7fffu) << 13) + (112u << 23));
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__SSE2__)
#include <emmintrin.h>
#define EK_HAVE_SSE2 1

/* The helpers below are written out lane group by lane group (no arrays, no loops) so
 * that at -O2 everything stays in registers. */

/* x[0..3] = (float)q * d, and the same followed by + m. */
static inline void ek_sse_st_mul(float *x, __m128i q, __m128 d) {
    _mm_storeu_ps(x, _mm_mul_ps(_mm_cvtepi32_ps(q), d));
}
static inline void ek_sse_st_mul_add(float *x, __m128i q, __m128 d, __m128 m) {
    _mm_storeu_ps(x, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(q), d), m));
}

/* x[0..15] = (float)v[i] * d + m for 16 unsigned bytes v (zero-extended). */
static inline void ek_sse_u8x16_mul_add(float *x, __m128i v, __m128 d, __m128 m) {
    const __m128i z = _mm_setzero_si128();
    const __m128i w0 = _mm_unpacklo_epi8(v, z), w1 = _mm_unpackhi_epi8(v, z);
    ek_sse_st_mul_add(x, _mm_unpacklo_epi16(w0, z), d, m);
    ek_sse_st_mul_add(x + 4, _mm_unpackhi_epi16(w0, z), d, m);
    ek_sse_st_mul_add(x + 8, _mm_unpacklo_epi16(w1, z), d, m);
    ek_sse_st_mul_add(x + 12, _mm_unpackhi_epi16(w1, z), d, m);
}

/* x[0..15] = (float)v[i] * d for 16 signed bytes v: each byte is moved to the top of its
 * 32-bit lane and shifted back arithmetically (SSE2 has no pmovsx). */
static inline void ek_sse_i8x16_mul(float *x, __m128i v, __m128 d) {
    const __m128i z = _mm_setzero_si128();
    const __m128i w0 = _mm_unpacklo_epi8(z, v), w1 = _mm_unpackhi_epi8(z, v);
    ek_sse_st_mul(x, _mm_srai_epi32(_mm_unpacklo_epi16(z, w0), 24), d);
    ek_sse_st_mul(x + 4, _mm_srai_epi32(_mm_unpackhi_epi16(z, w0), 24), d);
    ek_sse_st_mul(x + 8, _mm_srai_epi32(_mm_unpacklo_epi16(z, w1), 24), d);
    ek_sse_st_mul(x + 12, _mm_srai_epi32(_mm_unpackhi_epi16(z, w1), 24), d);
}

/* Low and high nibbles of 16 bytes. */
static inline __m128i ek_sse_lo_nibbles(__m128i v) { return _mm_and_si128(v, _mm_set1_epi8(0x0F)); }
static inline __m128i ek_sse_hi_nibbles(__m128i v) {
    return _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
}

/* Q5 fifth bits: ek_q5_hbits[b] has byte k = 0x10 if bit k of b is set, else 0. */
#define EK_HB(b)                                                                          \
    ((((b) & 1ULL) << 4) | (((b) >> 1 & 1ULL) << 12) | (((b) >> 2 & 1ULL) << 20) |       \
     (((b) >> 3 & 1ULL) << 28) | (((b) >> 4 & 1ULL) << 36) | (((b) >> 5 & 1ULL) << 44) | \
     (((b) >> 6 & 1ULL) << 52) | (((b) >> 7 & 1ULL) << 60))
#define EK_HB4(b) EK_HB(b), EK_HB((b) + 1), EK_HB((b) + 2), EK_HB((b) + 3)
#define EK_HB16(b) EK_HB4(b), EK_HB4((b) + 4), EK_HB4((b) + 8), EK_HB4((b) + 12)
#define EK_HB64(b) EK_HB16(b), EK_HB16((b) + 16), EK_HB16((b) + 32), EK_HB16((b) + 48)
static const uint64_t ek_q5_hbits[256] = { EK_HB64(0), EK_HB64(64), EK_HB64(128), EK_HB64(192) };

/* Byte j (j < 16) = 0x10 if bit j of b is set, else 0 (the Q5 fifth bit, in place). */
static inline __m128i ek_sse_bits_to_0x10(uint32_t b) {
    return _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)&ek_q5_hbits[b & 0xFF]),
                              _mm_loadl_epi64((const __m128i *)&ek_q5_hbits[(b >> 8) & 0xFF]));
}

/* ---- IQ4_NL table lookup (SSE2 has no pshufb) ----
 * ek_iq4nl_pairs[b] holds the 8-bit values of both nibbles of code byte b: T[b & 15] in
 * the low byte, T[b >> 4] in the high byte. Eight code bytes are gathered with pinsrw into
 * one vector of words; each word is then split into two sign-extended int32 lanes. The
 * values are those of IQ4_NL's table (= the base half of IQ4_K's V4). */
#define EK_IQ4NL_V(i)                                                                     \
    ((i) == 0 ? -127 : (i) == 1 ? -104 : (i) == 2 ? -83 : (i) == 3 ? -65 : (i) == 4 ? -49 \
     : (i) == 5 ? -35 : (i) == 6 ? -22 : (i) == 7 ? -10 : (i) == 8 ? 1 : (i) == 9 ? 13   \
     : (i) == 10 ? 25 : (i) == 11 ? 38 : (i) == 12 ? 53 : (i) == 13 ? 69 : (i) == 14 ? 89 : 113)
#define EK_IQ4NL_P(b) \
    (uint16_t)((uint8_t)EK_IQ4NL_V((b) & 15) | ((unsigned)(uint8_t)EK_IQ4NL_V((b) >> 4) << 8))
#define EK_IQ4NL_P4(b) EK_IQ4NL_P(b), EK_IQ4NL_P((b) + 1), EK_IQ4NL_P((b) + 2), EK_IQ4NL_P((b) + 3)
#define EK_IQ4NL_P16(b) EK_IQ4NL_P4(b), EK_IQ4NL_P4((b) + 4), EK_IQ4NL_P4((b) + 8), EK_IQ4NL_P4((b) + 12)
#define EK_IQ4NL_P64(b) EK_IQ4NL_P16(b), EK_IQ4NL_P16((b) + 16), EK_IQ4NL_P16((b) + 32), EK_IQ4NL_P16((b) + 48)
static const uint16_t ek_iq4nl_pairs[256] = {
    EK_IQ4NL_P64(0), EK_IQ4NL_P64(64), EK_IQ4NL_P64(128), EK_IQ4NL_P64(192)
};

/* Word j = ek_iq4nl_pairs[q[j]] for the code bytes q[0..7]. */
static inline __m128i ek_sse_iq4nl_gather8(const uint8_t *q) {
    const uint16_t *t = ek_iq4nl_pairs;
    __m128i a = _mm_cvtsi32_si128(t[q[0]]);
    a = _mm_insert_epi16(a, t[q[1]], 1);
    a = _mm_insert_epi16(a, t[q[2]], 2);
    a = _mm_insert_epi16(a, t[q[3]], 3);
    a = _mm_insert_epi16(a, t[q[4]], 4);
    a = _mm_insert_epi16(a, t[q[5]], 5);
    a = _mm_insert_epi16(a, t[q[6]], 6);
    a = _mm_insert_epi16(a, t[q[7]], 7);
    return a;
}

/* x[0..3] = (float)lo * d and x[16..19] = (float)hi * d, lo / hi the signed low / high
 * bytes of the four words in w (one unpack puts each word in the top half of a dword,
 * arithmetic shifts sign-extend either byte; cheaper in shuffles than unpacking twice). */
static inline void ek_sse_pairs4_mul(float *x, __m128i w_top, __m128 dlo, __m128 dhi) {
    ek_sse_st_mul(x, _mm_srai_epi32(_mm_slli_epi32(w_top, 8), 24), dlo);
    ek_sse_st_mul(x + 16, _mm_srai_epi32(w_top, 24), dhi);
}

/* The 32 values of 16 code bytes q: x[j] = dlo * (T[q[j] & 15] + add_lo) and x[16 + j] =
 * dhi * (T[q[j] >> 4] + add_hi); add holds add_lo in the low and add_hi in the high byte
 * of every word (IQ4_K's +4 for a shifted sub-block; the sums stay within int8). */
static inline void ek_sse_iq4nl_block(float *x, const uint8_t *q, __m128i add, __m128 dlo, __m128 dhi) {
    const __m128i z = _mm_setzero_si128();
    const __m128i a = _mm_add_epi8(ek_sse_iq4nl_gather8(q), add);
    const __m128i b = _mm_add_epi8(ek_sse_iq4nl_gather8(q + 8), add);
    ek_sse_pairs4_mul(x, _mm_unpacklo_epi16(z, a), dlo, dhi);
    ek_sse_pairs4_mul(x + 4, _mm_unpackhi_epi16(z, a), dlo, dhi);
    ek_sse_pairs4_mul(x + 8, _mm_unpacklo_epi16(z, b), dlo, dhi);
    ek_sse_pairs4_mul(x + 12, _mm_unpackhi_epi16(z, b), dlo, dhi);
}

#endif /* __SSE2__ */
/* AVX-512F, chosen at run time (no -march; ek_avx512.h): the legacy dequantizers widen
 * 16 codes per instruction, with the same IEEE operations in the same order as the
 * scalar code (mul, then add; never FMA), so the output is bit-identical. */
#include "ek_avx512.h"

#endif /* EK_SIMD_H */
