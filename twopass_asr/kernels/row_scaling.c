/* The per-row work around tokenwise_int8's int8 products, one pass per row while the row is in
 * cache, and the elementwise work between the products of the first pass's encoder layers
 * (twopass_asr/kernels/row_kernels.py compiles and calls it). Each function gives the bits of
 * the torch operations it replaces (tokenwise_int8's products, the encoder layer of
 * first_pass/batched.py), which the tests check: the same operations in the same order, rounding
 * half to even, no contraction but the fused multiply-adds torch's addcmul and oneDNN's
 * depthwise convolution themselves use.
 *
 * A product's input is each row over its largest magnitude, in one of the two forms the
 * kernels take: int8 steps on -127..127 (oneDNN) or the float quotients (fbgemm, which
 * quantizes them itself); its output is scaled back by the magnitude over `divisor` (127 for
 * steps, 1 for quotients). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "row_magnitude.h"

/* One row as a product's input, scale being its magnitude: int8 steps where `steps` is given,
 * else the quotients into `quotients`. */
static void row_input(const float *row, int64_t columns, float scale, int8_t *steps, float *quotients) {
    if (steps)
        for (int64_t c = 0; c < columns; ++c)
            steps[c] = (int8_t)(int32_t)nearbyintf((row[c] / scale) * 127.0f);
    else
        for (int64_t c = 0; c < columns; ++c)
            quotients[c] = row[c] / scale;
}

/* Each row as a product's input: int8 steps (steps given) or quotients; scales[r] gets the
 * row's magnitude. */
void quantize_rows(const float *x, int64_t rows, int64_t columns, int8_t *steps, float *quotients,
                   float *scales) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * columns;
        float scale = row_magnitude(row, columns);
        scales[r] = scale;
        row_input(row, columns, scale, steps ? steps + r * columns : 0, steps ? 0 : quotients + r * columns);
    }
}

/* One element of a product scaled back: times its row's factor, plus the bias where there is
 * one (the compiler takes the test out of the loops). */
static inline float scaled_back(float product, float factor, const float *bias, int64_t column) {
    return bias ? fmaf(product, factor, bias[column]) : product * factor;
}

/* In place: each row of a product times (its input row's scale / divisor), plus the bias where
 * there is one. */
void scale_rows(float *y, int64_t rows, int64_t columns, const float *scales, float divisor, const float *bias) {
    for (int64_t r = 0; r < rows; ++r) {
        float *row = y + r * columns;
        float factor = scales[r] / divisor;
        for (int64_t c = 0; c < columns; ++c)
            row[c] = scaled_back(row[c], factor, bias, c);
    }
}

/* A feed-forward's hidden rows: in place, each row of a product scaled back (as scale_rows) and
 * through ReLU, then made the next product's input (as quantize_rows) while it is in cache. */
void scale_relu_quantize_rows(float *y, int64_t rows, int64_t columns, const float *scales, float divisor,
                              const float *bias, int8_t *steps, float *quotients, float *next_scales) {
    for (int64_t r = 0; r < rows; ++r) {
        float *row = y + r * columns;
        float factor = scales[r] / divisor;
        for (int64_t c = 0; c < columns; ++c) {
            float value = scaled_back(row[c], factor, bias, c);
            row[c] = value < 0.0f ? 0.0f : value;
        }
        float scale = row_magnitude(row, columns);
        next_scales[r] = scale;
        row_input(row, columns, scale, steps ? steps + r * columns : 0, steps ? 0 : quotients + r * columns);
    }
}

/* A residual connection: x += (each row of a product scaled back, as scale_rows) + addend, the
 * addend left out where it is null. */
void add_scaled_rows(float *x, const float *y, int64_t rows, int64_t columns, const float *scales, float divisor,
                     const float *bias, const float *addend) {
    for (int64_t r = 0; r < rows; ++r) {
        float *out = x + r * columns;
        const float *row = y + r * columns;
        const float *extra = addend ? addend + r * columns : 0;
        float factor = scales[r] / divisor;
        for (int64_t c = 0; c < columns; ++c) {
            float value = scaled_back(row[c], factor, bias, c);
            if (extra)
                value = value + extra[c];
            out[c] = out[c] + value;
        }
    }
}

/* The SANM encoder's FSMN memory over each stream's values, as FunASR computes it on a padded
 * batch: masked = the values, zeroed (times 0, keeping the sign as torch does) from each stream's
 * length on; memory = its depthwise convolution over time (taps [width, columns], zeros beyond
 * the batch's frames, `left` of them before a frame) plus masked. values: rows of [batch * time]
 * whose columns start `row_stride` apart. The taps are added first to last with fused
 * multiply-adds from zero, as oneDNN's depthwise convolution does. Within a parallel region
 * (sanm_encoder.c's) the rows are shared among its threads. */
void fsmn_memory(const float *values, int64_t row_stride, int64_t batch, int64_t time, int64_t columns,
                 const int64_t *lengths, const float *taps, int64_t width, int64_t left, float *masked,
                 float *memory) {
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < time; ++t) {
            const float *in = values + (b * time + t) * row_stride;
            float *out = masked + (b * time + t) * columns;
            if (t < lengths[b])
                memcpy(out, in, columns * sizeof(float));
            else
                for (int64_t c = 0; c < columns; ++c)
                    out[c] = in[c] * 0.0f;
        }
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < time; ++t) {
            const float *stream_masked = masked + b * time * columns;
            float *out = memory + (b * time + t) * columns;
            memset(out, 0, columns * sizeof(float));
            for (int64_t k = 0; k < width; ++k) {
                int64_t source = t + k - left;
                if (source < 0 || source >= time)
                    continue;
                const float *tap = taps + k * columns, *in = stream_masked + source * columns;
                for (int64_t c = 0; c < columns; ++c)
                    out[c] = fmaf(tap[c], in[c], out[c]);
            }
            const float *in = stream_masked + t * columns;
            for (int64_t c = 0; c < columns; ++c)
                out[c] = out[c] + in[c];
        }
}
