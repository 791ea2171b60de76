/* Internal AVX-512F helpers shared by the float32 forward-pass kernels (attention.c,
 * norm_act.c). Functions carry target("avx512f"); callers check the CPU at run time. */
#ifndef EK_AVX512_H
#define EK_AVX512_H

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EK_AVX512 __attribute__((target("avx512f")))
#define EK_HAVE_AVX512_KERNELS 1

/* e^x, about 1 ulp (Cephes expf): x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6
 * polynomial, times 2^n with vscalefps. Inputs below -87.3 give ~1e-38 (never used
 * for more than a weight next to a max of 1); NaN stays NaN. */
static EK_AVX512 inline __attribute__((always_inline)) __m512 ek_exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);      /* NaN in the second operand is kept */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline int ek_have_avx512(void) { return __builtin_cpu_supports("avx512f"); }
#else
static inline int ek_have_avx512(void) { return 0; }
#endif

#endif
