/* e^x for x <= 0 in arithmetic the compiler vectorises: the softmaxes of the native SANM layers
 * (sanm_rows.h) and the decode step's softmax and SiLU (decode_step.c). */

#ifndef TWOPASS_ASR_EXP_NONPOSITIVE_H
#define TWOPASS_ASR_EXP_NONPOSITIVE_H

#include <stdint.h>

/* e^x for x <= 0 (a softmax's scores less their largest) in operations the compiler vectorises,
 * where a call of expf is one element at a time: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its
 * Taylor polynomial to degree 7 (truncation below 2^-27), 2^n put in the exponent's bits; zero
 * below -87, where e^x leaves float's normal range. Within about one unit in the last place of
 * e^x, with or without fused multiply-adds (every float of [-87, 0] compared: perf/RESULTS.md,
 * 2026-12-07, session 42). */
static inline float exp_nonpositive(float x) {
    const float rounder = 12582912.0f; /* 1.5 * 2^23: adding it leaves the nearest integer in the low bits */
    const float log2e = 1.44269504f, ln2_high = 0.693145752f, ln2_low = 1.42860677e-6f;
    const float shifted = x * log2e + rounder, n = shifted - rounder;
    const float r = (x - n * ln2_high) - n * ln2_low;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; int32_t i; } n_bits = {shifted}, rounder_bits = {rounder}, power, value;
    power.i = (n_bits.i - rounder_bits.i + 127) << 23;
    value.f = p * power.f;
    /* The cut to zero as a mask of the bits: a branch around the product (x < -87 ? 0 : p * 2^n)
     * kept the compiler from vectorising it without AVX-512's masks. */
    value.i &= -(int32_t)(x >= -87.0f);
    return value.f;
}

#endif
