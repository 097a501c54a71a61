/* A row's largest magnitude, by which the int8 recipes divide a product's input row: shared by
 * row_scaling.c (the passes around torch's products) and int8_product.h (the compiled product). */

#ifndef TWOPASS_ASR_ROW_MAGNITUDE_H
#define TWOPASS_ASR_ROW_MAGNITUDE_H

#include <stdint.h>
#include <string.h>

/* torch's clamp of a row's largest magnitude: float32's smallest normal number. */
static const float SMALLEST_SCALE = 1.1754943508222875e-38f;

/* A row's largest magnitude, at least SMALLEST_SCALE. Compared as integers: with the sign bit
 * cleared a non-NaN float's bits order as its magnitude does, and integer maxima vectorise
 * (fmaxf's, with its NaN rule, did not: a third of a quantization's time). */
static float row_magnitude(const float *row, int64_t columns) {
    const uint32_t *bits = (const uint32_t *)row;
    uint32_t largest = 0;
    for (int64_t c = 0; c < columns; ++c) {
        const uint32_t magnitude = bits[c] & 0x7fffffffu;
        largest = magnitude > largest ? magnitude : largest;
    }
    float scale;
    memcpy(&scale, &largest, sizeof scale);
    return scale < SMALLEST_SCALE ? SMALLEST_SCALE : scale;
}

#endif
