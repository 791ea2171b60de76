/* F32, F16 and BF16 "formats": conversions with ggml's rounding rules. */
#include "ek_common.h"

uint16_t ek_fp32_to_fp16(float f) {
    /* IEEE binary16, round to nearest even, overflow to inf, NaN stays NaN (quiet). */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) { /* inf or NaN */
        if (absx == 0x7f800000u) return (uint16_t)(sign | 0x7c00u);
        return (uint16_t)(sign | 0x7e00u | ((absx >> 13) & 0x3ffu));
    }
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520 -> inf */
    if (absx < 0x38800000u) { /* result is subnormal or zero */
        if (absx < 0x33000000u) return (uint16_t)sign; /* < 2^-25 rounds to 0 (2^-25 ties to even 0) */
        uint32_t e = absx >> 23;                       /* 102..112 */
        uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)e;                      /* bring to units of 2^-24 */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    /* normal: rebias exponent, round mantissa 23 -> 10 bits */
    uint32_t h = ((absx >> 13) - (112u << 10));
    uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

float ek_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu, x;
    if (e == 0) {
        if (m == 0) x = sign;
        else { /* subnormal: normalise */
            int sh = 0;
            while (!(m & 0x400u)) { m <<= 1; sh++; }
            m &= 0x3ffu;
            x = sign | ((uint32_t)(113 - sh) << 23) | (m << 13);
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static uint16_t ek_fp32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 64); /* quiet NaN, as ggml */
    return (uint16_t)((x + (0x7fffu + ((x >> 16) & 1))) >> 16);
}

int ek_quantize_row_f32(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)qw; (void)flags;
    for (int64_t i = 0; i < n; ++i) ek_wrf32(y + 4 * i, x[i]);
    return EK_OK;
}
void ek_dequantize_row_f32(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t i = 0; i < n; ++i) x[i] = ek_rdf32(y + 4 * i);
}
int ek_quantize_row_f16(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)qw; (void)flags;
    for (int64_t i = 0; i < n; ++i) ek_wr16(y + 2 * i, ek_fp32_to_fp16(x[i]));
    return EK_OK;
}
void ek_dequantize_row_f16(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t i = 0; i < n; ++i) x[i] = ek_fp16_to_fp32(ek_rd16(y + 2 * i));
}
int ek_quantize_row_bf16(const float *x, uint8_t *y, int64_t n, const float *qw, int flags) {
    (void)qw; (void)flags;
    for (int64_t i = 0; i < n; ++i) ek_wr16(y + 2 * i, ek_fp32_to_bf16(x[i]));
    return EK_OK;
}
void ek_dequantize_row_bf16(const uint8_t *y, float *x, int64_t n, int variant) {
    (void)variant;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t u = (uint32_t)ek_rd16(y + 2 * i) << 16;
        memcpy(&x[i], &u, 4);
    }
}
