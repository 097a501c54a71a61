/* The per-row work around tokenwise_int8's int8 products on oneDNN, one pass per row while the
 * row is in cache (twopass_asr/kernels/row_kernels.py compiles and calls it). Each function
 * gives the bits of the torch operations it replaces (tokenwise_int8's _onednn_product), which
 * the tests check: the same operations in the same order, rounding half to even, no
 * contraction but the fused multiply-add torch's addcmul itself uses. */

#include <math.h>
#include <stdint.h>
#include <string.h>

/* torch's clamp_(min=...) of a row's largest magnitude: float32's smallest normal number. */
static const float SMALLEST_SCALE = 1.1754943508222875e-38f;

/* The largest magnitude in a row, at least SMALLEST_SCALE. Compared as integers: the sign bit
 * cleared, a non-NaN float's bits order as its magnitude does, and integer maxima vectorise
 * without relaxing float semantics. */
static float row_magnitude(const float *row, int64_t columns) {
    const uint32_t *bits = (const uint32_t *)row;
    uint32_t largest = 0;
    for (int64_t c = 0; c < columns; ++c) {
        uint32_t magnitude = bits[c] & 0x7fffffffu;
        largest = magnitude > largest ? magnitude : largest;
    }
    float scale;
    memcpy(&scale, &largest, sizeof scale);
    return scale < SMALLEST_SCALE ? SMALLEST_SCALE : scale;
}

/* Each row divided by its largest magnitude, times 127, rounded: int8 steps on -127..127
 * (oneDNN's input); scales[r] gets the row's magnitude. */
void quantize_rows(const float *x, int64_t rows, int64_t columns, int8_t *steps, float *scales) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * columns;
        int8_t *out = steps + r * columns;
        float scale = row_magnitude(row, columns);
        scales[r] = scale;
        for (int64_t c = 0; c < columns; ++c)
            out[c] = (int8_t)(int32_t)nearbyintf((row[c] / scale) * 127.0f);
    }
}

/* In place: each row of the product of steps times (its row's scale / 127), plus the bias where
 * there is one. */
void scale_rows(float *y, int64_t rows, int64_t columns, const float *scales, const float *bias) {
    for (int64_t r = 0; r < rows; ++r) {
        float *row = y + r * columns;
        float factor = scales[r] / 127.0f;
        if (bias)
            for (int64_t c = 0; c < columns; ++c)
                row[c] = fmaf(row[c], factor, bias[c]);
        else
            for (int64_t c = 0; c < columns; ++c)
                row[c] = row[c] * factor;
    }
}
