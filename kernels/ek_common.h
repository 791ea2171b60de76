/* Helpers shared by the format kernels (internal to the library). */
#ifndef EK_COMMON_H
#define EK_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "evalkit_kernels.h"

#define QK_K 256

/* Library-internal: not exported from the shared object. */
#if defined(__GNUC__)
#define EK_HIDDEN __attribute__((visibility("hidden")))
#else
#define EK_HIDDEN
#endif

/* 1 while the test hook ek_test_fail_alloc is on: the row kernels then treat their
 * scratch allocation as failed (dispatch.c). */
EK_HIDDEN int ek_alloc_should_fail(void);

/* Round to nearest, ties to even, via the 1.5*2^23 trick (ggml's nearest_int). */
static inline int ek_nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

static inline float ek_f16(uint16_t h) { return ek_fp16_to_fp32(h); }
static inline uint16_t ek_to_f16(float f) { return ek_fp32_to_fp16(f); }

static inline uint16_t ek_rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline void ek_wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline uint32_t ek_rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline void ek_wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline float ek_rdf32(const uint8_t *p) { uint32_t u = ek_rd32(p); float f; memcpy(&f, &u, 4); return f; }
static inline void ek_wrf32(uint8_t *p, float f) { uint32_t u; memcpy(&u, &f, 4); ek_wr32(p, u); }

#endif
