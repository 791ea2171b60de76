/* Shared building blocks of the IQ*_K / IQ*_KS quantizers: value tables, the
 * nearest-value search tables, the imatrix sanitizer, weights, the block fit BF,
 * the IQ2 partition search and the scale-of-scales search SS.
 *
 * The IQK formats were created by Iwan Kawrakow in ik_llama.cpp. This is an
 * independent implementation written from evalkit's specification of the pieces
 * ik_llama.cpp's quantize_row_iq*_k_impl functions share (ggml/src/iqk/iqk_quantize.cpp).
 * Tables are facts transcribed from the reference.
 */
#include "iqk_common.h"

/* ---- tables (iq2nl_values ... iq6nl_values, the iq*nl_index search tables, and
 *      dequantize_row_iq6_k's values) ---- */
const int8_t ek_iqk_v2[8] = {
     -31,  -13,    1,   17,  -26,   -8,    6,   22,
};
const int8_t ek_iqk_v3[16] = {
     -63,  -40,  -23,  -10,    1,   13,   28,   47,  -59,  -36,  -19,   -6,    5,   17,   32,   51,
};
const int8_t ek_iqk_v4[32] = {
    -127, -104,  -83,  -65,  -49,  -35,  -22,  -10,    1,   13,   25,   38,   53,   69,   89,  113,
    -123, -100,  -79,  -61,  -45,  -31,  -18,   -6,    5,   17,   29,   42,   57,   73,   93,  117,
};
const int8_t ek_iqk_v5[64] = {
    -126, -114, -103,  -92,  -83,  -74,  -65,  -57,  -50,  -43,  -36,  -30,  -24,  -18,  -12,   -6,
      -1,    5,   11,   17,   23,   29,   36,   43,   51,   59,   68,   77,   87,   97,  109,  121,
    -124, -112, -101,  -90,  -81,  -72,  -63,  -55,  -48,  -41,  -34,  -28,  -22,  -16,  -10,   -4,
       1,    7,   13,   19,   25,   31,   38,   45,   53,   61,   70,   79,   89,   99,  111,  123,
};
const int8_t ek_iqk_v6[128] = {
    -127, -121, -115, -109, -104,  -98,  -93,  -88,  -84,  -79,  -74,  -70,  -66,  -62,  -58,  -54,
     -51,  -47,  -44,  -40,  -37,  -34,  -31,  -28,  -25,  -22,  -19,  -16,  -13,  -11,   -8,   -5,
      -2,    0,    3,    6,    9,   12,   14,   17,   20,   23,   27,   30,   33,   36,   40,   44,
      47,   51,   55,   59,   63,   68,   72,   77,   82,   87,   92,   98,  103,  109,  115,  121,
    -126, -120, -114, -108, -103,  -97,  -92,  -87,  -83,  -78,  -73,  -69,  -65,  -61,  -57,  -53,
     -50,  -46,  -43,  -39,  -36,  -33,  -30,  -27,  -24,  -21,  -18,  -15,  -12,  -10,   -7,   -4,
      -1,    1,    4,    7,   10,   13,   15,   18,   21,   24,   28,   31,   34,   37,   41,   45,
      48,   52,   56,   60,   64,   69,   73,   78,   83,   88,   93,   99,  104,  110,  116,  122,
};
const float ek_iqk_v2f[8] = {
     -31.f,  -13.f,    1.f,   17.f,  -26.f,   -8.f,    6.f,   22.f,
};
const float ek_iqk_v3f[16] = {
     -63.f,  -40.f,  -23.f,  -10.f,    1.f,   13.f,   28.f,   47.f,  -59.f,  -36.f,  -19.f,   -6.f,    5.f,   17.f,   32.f,   51.f,
};
const float ek_iqk_v4f[32] = {
    -127.f, -104.f,  -83.f,  -65.f,  -49.f,  -35.f,  -22.f,  -10.f,    1.f,   13.f,   25.f,   38.f,   53.f,   69.f,   89.f,  113.f,
    -123.f, -100.f,  -79.f,  -61.f,  -45.f,  -31.f,  -18.f,   -6.f,    5.f,   17.f,   29.f,   42.f,   57.f,   73.f,   93.f,  117.f,
};
const float ek_iqk_v5f[64] = {
    -126.f, -114.f, -103.f,  -92.f,  -83.f,  -74.f,  -65.f,  -57.f,  -50.f,  -43.f,  -36.f,  -30.f,  -24.f,  -18.f,  -12.f,   -6.f,
      -1.f,    5.f,   11.f,   17.f,   23.f,   29.f,   36.f,   43.f,   51.f,   59.f,   68.f,   77.f,   87.f,   97.f,  109.f,  121.f,
    -124.f, -112.f, -101.f,  -90.f,  -81.f,  -72.f,  -63.f,  -55.f,  -48.f,  -41.f,  -34.f,  -28.f,  -22.f,  -16.f,  -10.f,   -4.f,
       1.f,    7.f,   13.f,   19.f,   25.f,   31.f,   38.f,   45.f,   53.f,   61.f,   70.f,   79.f,   89.f,   99.f,  111.f,  123.f,
};
const float ek_iqk_v6f[128] = {
    -127.f, -121.f, -115.f, -109.f, -104.f,  -98.f,  -93.f,  -88.f,  -84.f,  -79.f,  -74.f,  -70.f,  -66.f,  -62.f,  -58.f,  -54.f,
     -51.f,  -47.f,  -44.f,  -40.f,  -37.f,  -34.f,  -31.f,  -28.f,  -25.f,  -22.f,  -19.f,  -16.f,  -13.f,  -11.f,   -8.f,   -5.f,
      -2.f,    0.f,    3.f,    6.f,    9.f,   12.f,   14.f,   17.f,   20.f,   23.f,   27.f,   30.f,   33.f,   36.f,   40.f,   44.f,
      47.f,   51.f,   55.f,   59.f,   63.f,   68.f,   72.f,   77.f,   82.f,   87.f,   92.f,   98.f,  103.f,  109.f,  115.f,  121.f,
    -126.f, -120.f, -114.f, -108.f, -103.f,  -97.f,  -92.f,  -87.f,  -83.f,  -78.f,  -73.f,  -69.f,  -65.f,  -61.f,  -57.f,  -53.f,
     -50.f,  -46.f,  -43.f,  -39.f,  -36.f,  -33.f,  -30.f,  -27.f,  -24.f,  -21.f,  -18.f,  -15.f,  -12.f,  -10.f,   -7.f,   -4.f,
      -1.f,    1.f,    4.f,    7.f,   10.f,   13.f,   15.f,   18.f,   21.f,   24.f,   28.f,   31.f,   34.f,   37.f,   41.f,   45.f,
      48.f,   52.f,   56.f,   60.f,   64.f,   69.f,   73.f,   78.f,   83.f,   88.f,   93.f,   99.f,  104.f,  110.f,  116.f,  122.f,
};
const uint8_t ek_iqk_ni3_tab[111] = {
      0,   0,   0,   0,   0,   0,   0,   0,   0,   0,   0,   8,   8,   1,   1,   1,
      1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   9,
      9,   2,   2,   2,   2,   2,   2,   2,   2,   2,   2,   2,   2,   2,  10,  10,
      3,   3,   3,   3,   3,   3,   3,   3,   3,   3,  11,  11,   4,   4,   4,   4,
      4,   4,   4,   4,   4,   4,  12,   5,   5,   5,   5,   5,   5,   5,   5,   5,
      5,   5,   5,  13,  13,   6,   6,   6,   6,   6,   6,   6,   6,   6,   6,   6,
      6,   6,   6,   6,  14,  14,   7,   7,   7,   7,   7,   7,   7,   7,   7,
};
const uint8_t ek_iqk_ni4_tab[241] = {
      0,   0,   0,   0,   0,   0,   0,   0,   0,   0,   0,  16,  16,   1,   1,   1,
      1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,   1,
      1,  17,  17,   2,   2,   2,   2,   2,   2,   2,   2,   2,   2,   2,   2,   2,
      2,   2,   2,   2,   2,  18,   3,   3,   3,   3,   3,   3,   3,   3,   3,   3,
      3,   3,   3,   3,   3,   3,  19,   4,   4,   4,   4,   4,   4,   4,   4,   4,
      4,   4,   4,   4,   4,  20,   5,   5,   5,   5,   5,   5,   5,   5,   5,   5,
      5,   5,  21,  21,   6,   6,   6,   6,   6,   6,   6,   6,   6,   6,   6,  22,
      7,   7,   7,   7,   7,   7,   7,   7,   7,   7,  23,  23,   8,   8,   8,   8,
      8,   8,   8,   8,   8,   8,  24,   9,   9,   9,   9,   9,   9,   9,   9,   9,
      9,   9,  25,  10,  10,  10,  10,  10,  10,  10,  10,  10,  10,  10,  26,  26,
     11,  11,  11,  11,  11,  11,  11,  11,  11,  11,  11,  11,  27,  27,  12,  12,
     12,  12,  12,  12,  12,  12,  12,  12,  12,  12,  12,  12,  28,  13,  13,  13,
     13,  13,  13,  13,  13,  13,  13,  13,  13,  13,  13,  13,  13,  13,  29,  14,
     14,  14,  14,  14,  14,  14,  14,  14,  14,  14,  14,  14,  14,  14,  14,  14,
     14,  14,  14,  14,  30,  15,  15,  15,  15,  15,  15,  15,  15,  15,  15,  15,
     15,
};
const uint8_t ek_iqk_ni5_tab[248] = {
      0,   0,   0,   0,   0,   0,  32,   1,   1,   1,   1,   1,   1,   1,   1,   1,
      1,  33,  33,   2,   2,   2,   2,   2,   2,   2,   2,   2,  34,  34,   3,   3,
      3,   3,   3,   3,   3,   3,  35,  35,   4,   4,   4,   4,   4,   4,   4,  36,
     36,   5,   5,   5,   5,   5,   5,   5,  37,  37,   6,   6,   6,   6,   6,   6,
      6,  38,   7,   7,   7,   7,   7,   7,  39,  39,   8,   8,   8,   8,   8,  40,
     40,   9,   9,   9,   9,   9,  41,  41,  10,  10,  10,  10,  10,  42,  11,  11,
     11,  11,  11,  43,  12,  12,  12,  12,  12,  44,  13,  13,  13,  13,  13,  45,
     14,  14,  14,  14,  14,  46,  15,  15,  15,  15,  47,  47,  16,  16,  16,  16,
     48,  17,  17,  17,  17,  17,  49,  18,  18,  18,  18,  18,  50,  19,  19,  19,
     19,  19,  51,  20,  20,  20,  20,  20,  52,  21,  21,  21,  21,  21,  53,  53,
     22,  22,  22,  22,  22,  54,  54,  23,  23,  23,  23,  23,  23,  55,  24,  24,
     24,  24,  24,  24,  24,  56,  25,  25,  25,  25,  25,  25,  25,  57,  57,  26,
     26,  26,  26,  26,  26,  26,  58,  58,  27,  27,  27,  27,  27,  27,  27,  27,
     59,  28,  28,  28,  28,  28,  28,  28,  28,  28,  60,  29,  29,  29,  29,  29,
     29,  29,  29,  29,  29,  61,  30,  30,  30,  30,  30,  30,  30,  30,  30,  30,
     30,  62,  31,  31,  31,  31,  31,  31,
};
const uint8_t ek_iqk_ni6_tab[249] = {
      0,   0,   0,  64,   1,   1,   1,   1,   1,  65,   2,   2,   2,   2,   2,  66,
      3,   3,   3,   3,  67,  67,   4,   4,   4,   4,  68,   5,   5,   5,   5,  69,
     69,   6,   6,   6,  70,  70,   7,   7,   7,  71,   8,   8,   8,  72,  72,   9,
      9,   9,  73,  73,  10,  10,  10,  74,  11,  11,  11,  75,  12,  12,  12,  76,
     13,  13,  13,  77,  14,  14,  14,  78,  15,  15,  79,  79,  16,  16,  80,  17,
     17,  81,  81,  18,  18,  82,  19,  19,  83,  83,  20,  84,  84,  21,  85,  85,
     22,  86,  86,  23,  87,  87,  24,  88,  88,  25,  89,  89,  26,  90,  90,  27,
     91,  91,  28,  92,  29,  93,  93,  30,  94,  94,  31,  95,  95,  32,  96,  33,
     97,  97,  34,  98,  98,  35,  99,  99,  36, 100, 100,  37, 101,  38, 102, 102,
     39, 103, 103,  40, 104, 104,  41,  41, 105,  42,  42, 106, 106,  43, 107, 107,
     44, 108, 108,  45,  45, 109,  46,  46,  46, 110,  47,  47, 111, 111,  48,  48,
    112,  49,  49,  49, 113,  50,  50,  50, 114,  51,  51,  51, 115,  52,  52,  52,
    116, 116,  53,  53,  53, 117,  54,  54,  54, 118, 118,  55,  55,  55, 119, 119,
     56,  56,  56, 120, 120,  57,  57,  57, 121, 121,  58,  58,  58,  58, 122,  59,
     59,  59,  59, 123, 123,  60,  60,  60,  60, 124,  61,  61,  61,  61,  61, 125,
     62,  62,  62,  62,  62, 126,  63,  63,  63,
};
const float ek_iqk_iq6k_cubic[128] = {
    -0x1.fcp+6f, -0x1.e36aaep+6f, -0x1.cbb3c2p+6f, -0x1.b4d3dcp+6f,
    -0x1.9ec3a4p+6f, -0x1.897bcp+6f, -0x1.74f4d2p+6f, -0x1.612782p+6f,
    -0x1.4e0c72p+6f, -0x1.3b9c48p+6f, -0x1.29cfaap+6f, -0x1.189f3cp+6f,
    -0x1.0803a4p+6f, -0x1.efeb0cp+5f, -0x1.d0db1p+5f, -0x1.b2c898p+5f,
    -0x1.95a4f8p+5f, -0x1.79616cp+5f, -0x1.5def4cp+5f, -0x1.433fdcp+5f,
    -0x1.294464p+5f, -0x1.0fee3p+5f, -0x1.ee5d18p+4f, -0x1.bded8p+4f,
    -0x1.8e7028p+4f, -0x1.5fc7bp+4f, -0x1.31d69p+4f, -0x1.047f9p+4f,
    -0x1.af49fp+3f, -0x1.56534p+3f, -0x1.fbcp+2f, -0x1.4b6acp+2f,
    -0x1.3662p+1f, 0x1.563p-2f, 0x1.8d8d8p+1f, 0x1.796fcp+2f,
    0x1.16ea2p+3f, 0x1.7235p+3f, 0x1.ced2ep+3f, 0x1.167f8p+4f,
    0x1.467a1p+4f, 0x1.77769p+4f, 0x1.a9926p+4f, 0x1.dcebp+4f,
    0x1.08ceep+5f, 0x1.23e41p+5f, 0x1.3fc3cp+5f, 0x1.5c7cbp+5f,
    0x1.7a1d9p+5f, 0x1.98b51p+5f, 0x1.b851fp+5f, 0x1.d902ep+5f,
    0x1.fad6ap+5f, 0x1.0eede8p+6f, 0x1.21109cp+6f, 0x1.33daccp+6f,
    0x1.4753c4p+6f, 0x1.5b82ecp+6f, 0x1.706f98p+6f, 0x1.862128p+6f,
    0x1.9c9efp+6f, 0x1.b3f054p+6f, 0x1.cc1ca4p+6f, 0x1.e52b4cp+6f,
    -0x1.f8p+6f, -0x1.df6aaep+6f, -0x1.c7b3c2p+6f, -0x1.b0d3dcp+6f,
    -0x1.9ac3a4p+6f, -0x1.857bcp+6f, -0x1.70f4d2p+6f, -0x1.5d2782p+6f,
    -0x1.4a0c72p+6f, -0x1.379c48p+6f, -0x1.25cfaap+6f, -0x1.149f3cp+6f,
    -0x1.0403a4p+6f, -0x1.e7eb0cp+5f, -0x1.c8db1p+5f, -0x1.aac898p+5f,
    -0x1.8da4f8p+5f, -0x1.71616cp+5f, -0x1.55ef4cp+5f, -0x1.3b3fdcp+5f,
    -0x1.214464p+5f, -0x1.07ee3p+5f, -0x1.de5d18p+4f, -0x1.aded8p+4f,
    -0x1.7e7028p+4f, -0x1.4fc7bp+4f, -0x1.21d69p+4f, -0x1.e8ff2p+3f,
    -0x1.8f49fp+3f, -0x1.36534p+3f, -0x1.bbcp+2f, -0x1.0b6acp+2f,
    -0x1.6cc4p+0f, 0x1.558cp+0f, 0x1.06c6cp+2f, 0x1.b96fcp+2f,
    0x1.36ea2p+3f, 0x1.9235p+3f, 0x1.eed2ep+3f, 0x1.267f8p+4f,
    0x1.567a1p+4f, 0x1.87769p+4f, 0x1.b9926p+4f, 0x1.ecebp+4f,
    0x1.10ceep+5f, 0x1.2be41p+5f, 0x1.47c3cp+5f, 0x1.647cbp+5f,
    0x1.821d9p+5f, 0x1.a0b51p+5f, 0x1.c051fp+5f, 0x1.e102ep+5f,
    0x1.016b5p+6f, 0x1.12ede8p+6f, 0x1.25109cp+6f, 0x1.37daccp+6f,
    0x1.4b53c4p+6f, 0x1.5f82ecp+6f, 0x1.746f98p+6f, 0x1.8a2128p+6f,
    0x1.a09efp+6f, 0x1.b7f054p+6f, 0x1.d01ca4p+6f, 0x1.e92b4cp+6f,
};

/* ---- importance weights (QHelper::row_weights; the weights of quantize_row_*_impl) ---- */

void ek_iqk_sanitize_imatrix(const float *x, const float *qw, float *out, int n, int bs) {
    /* The threshold is the float product 1e-9f*1e-9f scaled by the group size. */
    const float eps = 1e-9f;
    const float eps2 = eps * eps;
    const float thr = (float)bs * eps2;
    for (int g = 0; g < n; g += bs) {
        float sw2 = 0, sx2 = 0, swx = 0;
        for (int j = g; j < g + bs; ++j) {
            sw2 += qw[j] * qw[j];
            sx2 += x[j] * x[j];
            swx += qw[j] * fabsf(x[j]);
        }
        if (sw2 > thr && sx2 > thr && swx > thr) {
            for (int j = g; j < g + bs; ++j) out[j] = qw[j];
        } else {
            /* a group without usable information falls back to uniform tiny weights */
            for (int j = g; j < g + bs; ++j) out[j] = eps;
        }
    }
}

float ek_iqk_sumsq(const float *x, int n) {
    float s = 0;
    for (int j = 0; j < n; ++j) s += x[j] * x[j];
    return s;
}

void ek_iqk_weights(const float *x, const float *qw, int n, float sigma2, int mode, float *w) {
    if (qw) {
        for (int j = 0; j < n; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
    } else if (mode == EK_IQK_W_QUARTER_SIGMA) {
        for (int j = 0; j < n; ++j) w[j] = 0.25f * sigma2 + x[j] * x[j];
    } else if (mode == EK_IQK_W_SQUARE) {
        for (int j = 0; j < n; ++j) w[j] = x[j] * x[j];
    } else {
        for (int j = 0; j < n; ++j) w[j] = fabsf(x[j]);
    }
}

/* ---- scale of scales SS (ik_llama.cpp's make_qx_quants) ---- */

static inline int ek_iqk_clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

float ek_iqk_scale_of_scales(int n, int nmax, const float *s, const float *c, int8_t *L) {
    float m;
    float amax = ek_iqk_amax(s, n, &m);
    if (!amax) {
        if (L) memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)(-nmax) / m;
    float sx = 0, s2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = ek_iqk_clampi(ek_nearest_int(iscale * s[i]), -nmax, nmax - 1);
        if (L) L[i] = (int8_t)(l + nmax);
        sx += c[i] * s[i] * (float)l;
        s2 += c[i] * (float)l * (float)l;
    }
    float D = s2 != 0 ? sx / s2 : 0.0f;
    float best = D * sx;
    for (int k = -9; k <= 9; ++k) {
        if (k == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)k) / m;
        sx = s2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = ek_iqk_clampi(ek_nearest_int(iscale * s[i]), -nmax, nmax - 1);
            sx += c[i] * s[i] * (float)l;
            s2 += c[i] * (float)l * (float)l;
        }
        if (s2 > 0 && sx * sx > best * s2) {
            if (L) {
                for (int i = 0; i < n; ++i)
                    L[i] = (int8_t)(nmax + ek_iqk_clampi(ek_nearest_int(iscale * s[i]), -nmax, nmax - 1));
            }
            D = sx / s2;
            best = D * sx;
        }
    }
    return D;
}

/* ---- block fit BF (the per-block scale search of quantize_row_iq3_k_impl,
 *      quantize_row_iq4_k_impl_bs16, quantize_row_iq5_k_impl, quantize_row_iq6_k_impl) ---- */

/* EVAL: plus assignment for a = id*x_j, minus assignment for -a, both with the
 * table's own values; four independent accumulators. For NI3..NI5,
 * trunc(-a) = -trunc(a), so one conversion serves both signs.
 * No truncation range check is needed here: every id used by BF is
 * (step*t + T[0])/m or 1/(-m/T0[0]) and |x_j| <= |m|, so |a| stays within
 * |step*ntry| + |T[0]| (+ rounding), far inside the int range. */
static inline __attribute__((always_inline)) void
ek_iqk_bf_eval(int bits, const float *T, float id, const float *x, const float *w, int B, float *sp, float *qp,
               float *sm, float *qm) {
    float SP = 0, QP = 0, SM = 0, QM = 0;
    const uint8_t *tab = bits == 3 ? ek_iqk_ni3_tab : bits == 4 ? ek_iqk_ni4_tab : bits == 5 ? ek_iqk_ni5_tab
                                                                                          : ek_iqk_ni6_tab;
    const int n = 1 << bits;
    const int L = bits == 3 ? 111 : bits == 4 ? 241 : bits == 5 ? 247 : 249;
    const int v0 = (int)T[0];
    for (int j = 0; j < B; ++j) {
        const float a = id * x[j];
        float qa, qb;
        if (bits == 6) {
            qa = ek_iqk_nv_lookup_nb(T, a, (int)(a - T[0]), tab, L, n);
            qb = ek_iqk_nv_lookup_nb(T, -a, (int)(-a - T[0]), tab, L, n);
        } else if (bits == 5) {
            const int ti = (int)a;
            qa = ek_iqk_nv_lookup_nb(T, a, ti - v0, tab, L, n);
            qb = ek_iqk_nv_lookup_nb(T, -a, -ti - v0, tab, L, n);
        } else {
            const int ti = (int)a;
            qa = ek_iqk_nv_lookup(T, a, ti - v0, tab, L, n);
            qb = ek_iqk_nv_lookup(T, -a, -ti - v0, tab, L, n);
        }
        float wq = w[j] * qa;
        SP += wq * x[j];
        QP += wq * qa;
        wq = w[j] * qb;
        SM += wq * x[j];
        QM += wq * qb;
    }
    *sp = SP; *qp = QP; *sm = SM; *qm = QM;
}

static inline __attribute__((always_inline)) int
ek_iqk_bf_body(int bits, const float *T0, const float *T1, const float *x, const float *w, int B, int ntry,
               int step, int guard, int refit, float *dout, int *shout) {
    float m;
    float amax = ek_iqk_amax(x, B, &m);
    if (amax < 1e-16f) {
        *dout = 0; *shout = 0;
        return EK_IQK_BF_EMPTY;
    }
    float d = -m / T0[0];
    float id = 1 / d;
    float sp, qp, sm, qm;
    ek_iqk_bf_eval(bits, T0, id, x, w, B, &sp, &qp, &sm, &qm);
    float best = 0;
    if (!guard || qp > 0) {
        d = sp / qp;
        best = d * sp;
    }
    if (qm > 0 && sm * sm > best * qm) {
        d = sm / qm;
        best = d * sm;
    }
    int shift = 0;
    for (int t = -ntry; t <= ntry; ++t) {
        for (int h = 0; h < 2; ++h) {
            const float *T = h ? T1 : T0;
            id = ((float)(step * t) + T[0]) / m;
            ek_iqk_bf_eval(bits, T, id, x, w, B, &sp, &qp, &sm, &qm);
            if (qp > 0 && sp * sp > best * qp) {
                d = sp / qp; best = d * sp; shift = h;
            }
            if (qm > 0 && sm * sm > best * qm) {
                d = sm / qm; best = d * sm; shift = h;
            }
        }
    }
    *shout = shift;
    if (d == 0) {
        *dout = d;
        return EK_IQK_BF_ZERO;
    }
    if (refit) {
        const float *T = shift ? T1 : T0;
        float S = 0, Q = 0;
        id = 1 / d;
        for (int j = 0; j < B; ++j) {
            float q = T[ek_iqk_ni(bits, T, id * x[j])];
            float wq = w[j] * q;
            S += wq * x[j];
            Q += wq * q;
        }
        if (Q > 0) d = S / Q;
    }
    *dout = d;
    return EK_IQK_BF_OK;
}

/* One specialised copy per table and block length (16 or 32), so that the NI
 * selection folds away and the element loops have constant trip counts. */
#define EK_IQK_BF_INSTANCE(bits, BL)                                                                      \
    static int ek_iqk_bf_##bits##_##BL(const float *T0, const float *T1, const float *x, const float *w,  \
                                       int ntry, int step, int guard, int refit, float *d, int *shift) {  \
        return ek_iqk_bf_body(bits, T0, T1, x, w, BL, ntry, step, guard, refit, d, shift);               \
    }
EK_IQK_BF_INSTANCE(3, 16)
EK_IQK_BF_INSTANCE(4, 16)
EK_IQK_BF_INSTANCE(5, 16)
EK_IQK_BF_INSTANCE(6, 16)
EK_IQK_BF_INSTANCE(3, 32)
EK_IQK_BF_INSTANCE(4, 32)
EK_IQK_BF_INSTANCE(5, 32)

int ek_iqk_block_fit(int bits, const float *T0, const float *T1, const float *x, const float *w, int B,
                     int ntry, int step, int guard, int refit, float *d, int *shift) {
    if (B == 16) {
        switch (bits) {
        case 3: return ek_iqk_bf_3_16(T0, T1, x, w, ntry, step, guard, refit, d, shift);
        case 4: return ek_iqk_bf_4_16(T0, T1, x, w, ntry, step, guard, refit, d, shift);
        case 5: return ek_iqk_bf_5_16(T0, T1, x, w, ntry, step, guard, refit, d, shift);
        default: return ek_iqk_bf_6_16(T0, T1, x, w, ntry, step, guard, refit, d, shift);
        }
    }
    if (B == 32) {
        switch (bits) {
        case 3: return ek_iqk_bf_3_32(T0, T1, x, w, ntry, step, guard, refit, d, shift);
        case 4: return ek_iqk_bf_4_32(T0, T1, x, w, ntry, step, guard, refit, d, shift);
        case 5: return ek_iqk_bf_5_32(T0, T1, x, w, ntry, step, guard, refit, d, shift);
        default: break;
        }
    }
    return ek_iqk_bf_body(bits, T0, T1, x, w, B, ntry, step, guard, refit, d, shift);
}

/* ---- IQ2 partition search (the sorted-pairs search of quantize_row_iq2_k_impl) ---- */

/* The four value assignments are evaluated side by side in the lanes of a GNU C
 * vector: every lane performs exactly the scalar float operations of the spec
 * (element-wise IEEE operations, no contraction), so the sums are bit-identical
 * to the scalar formulation. Partial terms are computed once and reused (each is
 * the same float operation the full expression performs). The acceptance test
 * reads and updates `best` sequentially, so it runs lane by lane, in the spec's
 * candidate order, but only when some lane passes it against the current best
 * (if none does, the sequential test would not accept any either). */
typedef float ek_v4f __attribute__((vector_size(16)));
typedef int32_t ek_v4i __attribute__((vector_size(16)));

float ek_iqk_iq2_partition(const float *x, const float *w, int B, int max_i1, int min_i3, const float *V,
                           int *shift) {
    /* Sort indices by (value, index): insertion sort, stable on the index. */
    int ord[32];
    for (int j = 0; j < B; ++j) {
        int k = j;
        while (k > 0 && x[ord[k - 1]] > x[j]) { ord[k] = ord[k - 1]; --k; }
        ord[k] = j;
    }
    float SX[33], SW[33];
    SX[0] = SW[0] = 0;
    for (int k = 0; k < B; ++k) {
        int j = ord[k];
        SW[k + 1] = SW[k] + w[j];
        SX[k + 1] = SX[k] + w[j] * x[j];
    }
    /* Lane a holds assignment (a) base 0..3, (b) shifted 0..3, (c) base 3..0,
     * (d) shifted 3..0 (the spec's order); vg is the value given to group g. */
    const ek_v4f v1 = {V[0], V[4], V[3], V[7]};
    const ek_v4f v2 = {V[1], V[5], V[2], V[6]};
    const ek_v4f v3 = {V[2], V[6], V[1], V[5]};
    const ek_v4f v4 = {V[3], V[7], V[0], V[4]};
    const float xt = SX[B], wt = SW[B];
    /* S = ((ΔX1·v1 + ΔX2·v2) + ΔX3·v3) + ΔX4·v4,
     * Q = (((ΔW1·v1)·v1 + (ΔW2·v2)·v2) + (ΔW3·v3)·v3) + (ΔW4·v4)·v4. */
    ek_v4f s4[32], q4[32];
    for (int i3 = 0; i3 < B; ++i3) {
        const float dx4 = xt - SX[i3], dw4 = wt - SW[i3];
        s4[i3] = dx4 * v4;
        q4[i3] = dw4 * v4 * v4;
    }
    ek_v4f s3[B][B], q3[B][B]; /* third-group terms for (i2, i3), i3 >= i2 */
    for (int i2 = 0; i2 < B; ++i2) {
        for (int i3 = i2; i3 < B; ++i3) {
            const float dx3 = SX[i3] - SX[i2], dw3 = SW[i3] - SW[i2];
            s3[i2][i3] = dx3 * v3;
            q3[i2][i3] = dw3 * v3 * v3;
        }
    }
    float best = 0, d = 0;
    int sh = 0;
    ek_v4f vbest = {0, 0, 0, 0};
    const ek_v4f zero = {0, 0, 0, 0};
    for (int i1 = 0; i1 < max_i1; ++i1) {
        const float dx1 = SX[i1] - SX[0], dw1 = SW[i1] - SW[0];
        const ek_v4f s1 = dx1 * v1, q1 = dw1 * v1 * v1;
        for (int i2 = i1; i2 < B; ++i2) {
            const float dx2 = SX[i2] - SX[i1], dw2 = SW[i2] - SW[i1];
            const ek_v4f s2 = s1 + dx2 * v2, q2 = q1 + dw2 * v2 * v2;
            for (int i3 = i2 > min_i3 ? i2 : min_i3; i3 < B; ++i3) {
                const ek_v4f S = (s2 + s3[i2][i3]) + s4[i3];
                const ek_v4f Q = (q2 + q3[i2][i3]) + q4[i3];
                const ek_v4i pass = (Q > zero) & (S * S > vbest * Q);
                uint64_t m[2];
                memcpy(m, &pass, sizeof m);
                if (!(m[0] | m[1])) continue;
                for (int a = 0; a < 4; ++a) {
                    const float Sa = S[a], Qa = Q[a];
                    if (Qa > 0 && Sa * Sa > best * Qa) {
                        d = Sa / Qa;
                        best = d * Sa;
                        sh = a & 1;
                    }
                }
                vbest = (ek_v4f){best, best, best, best};
            }
        }
    }
    *shift = sh;
    return d;
}
