/* The compiled int8 product (tokenwise_int8's "compiled" kernel), included by the C passes
 * that run it between their own float work (decode_step.c, sanm_encoder.c); its functions are
 * static, so each library has its own copy.
 *
 * It follows tokenwise_int8's fbgemm layers: weights on -63..63 per output channel, each input
 * row divided by its largest magnitude and quantized to uint8 around 128 in steps of 2/255,
 * integer sums, scaled back per output and per row. On AVX2 a row's bytes and a weight row's
 * are multiplied in pairs into 16 bits (255 x 63 x 2 fits), then summed in 32 bits; the
 * products give fbgemm's bits (tests/kernels/test_tokenwise_int8.py compares them). */

#ifndef TWOPASS_ASR_INT8_PRODUCT_H
#define TWOPASS_ASR_INT8_PRODUCT_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* torch's clamp of a row's largest magnitude: float32's smallest normal number. */
static const float SMALLEST_SCALE = 1.1754943508222875e-38f;
static const int32_t INPUT_ZERO_POINT = 128;
/* How far ahead of the product the weights are fetched: a step of one row streams every weight
 * once from memory, and with the hardware's prefetching alone it ran slower (perf/RESULTS.md,
 * 2026-12-05, session 22). A prefetch past the end of the weights is harmless. */
#define WEIGHT_PREFETCH_BYTES 2048

/* An int8 linear layer without bias. scales[o]: output o's weight scale times the input
 * step; sums[o]: the sum of its weights, to take the input's zero point back out. */
typedef struct {
    const int8_t *weights; /* [outputs, inputs] */
    const float *scales;
    const int32_t *sums;
    int64_t outputs, inputs;
} int8_layer;

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

/* A row divided by its largest magnitude, in uint8 around INPUT_ZERO_POINT: fbgemm's rounding
 * (half to even) of the quotient over the input step. */
static float quantize_row(const float *row, int64_t columns, float input_step, uint8_t *out) {
    const float scale = row_magnitude(row, columns);
    const float inverse_step = 1.0f / input_step;
    for (int64_t c = 0; c < columns; ++c) {
        float value = nearbyintf((row[c] / scale) * inverse_step) + (float)INPUT_ZERO_POINT;
        value = value < 0.0f ? 0.0f : (value > 255.0f ? 255.0f : value);
        out[c] = (uint8_t)value;
    }
    return scale;
}


/* sums[2 r + j] = sum over c of inputs[r][c] * weights j [c], for `count` (1 to 4) input rows
 * `stride` apart and two weight rows: each weight row is read once for all the rows, each input
 * row once for both weight rows. */
static inline __attribute__((always_inline)) void dot_block(const int8_t *first_weights,
                                                            const int8_t *second_weights, const uint8_t *inputs,
                                                            int64_t stride, int64_t columns, int count,
                                                            int32_t *sums) {
    int64_t c = 0;
    int32_t total[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#ifdef __AVX2__
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4][2];
    for (int r = 0; r < 4; ++r)
        acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (; c + 32 <= columns; c += 32) {
        _mm_prefetch((const char *)(first_weights + c + WEIGHT_PREFETCH_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(second_weights + c + WEIGHT_PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i first = _mm256_loadu_si256((const __m256i *)(first_weights + c));
        const __m256i second = _mm256_loadu_si256((const __m256i *)(second_weights + c));
        for (int r = 0; r < count; ++r) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(inputs + r * stride + c));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, first), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, second), ones));
        }
    }
    /* The eight sums of lanes at once: pairwise additions within each 128-bit half leave, in
     * each half, rows 0-1 (and 2-3) by weight row; the two halves are then added. */
    const __m256i low = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0][0], acc[0][1]),
                                          _mm256_hadd_epi32(acc[1][0], acc[1][1]));
    const __m256i high = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[2][0], acc[2][1]),
                                           _mm256_hadd_epi32(acc[3][0], acc[3][1]));
    _mm_storeu_si128((__m128i *)total,
                     _mm_add_epi32(_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1)));
    _mm_storeu_si128((__m128i *)(total + 4),
                     _mm_add_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
#endif
    for (; c < columns; ++c)
        for (int r = 0; r < count; ++r) {
            total[2 * r] += (int32_t)inputs[r * stride + c] * (int32_t)first_weights[c];
            total[2 * r + 1] += (int32_t)inputs[r * stride + c] * (int32_t)second_weights[c];
        }
    for (int i = 0; i < 2 * count; ++i)
        sums[i] = total[i];
}

/* out[r] = layer(rows' quantized inputs) for `rows` rows, the outputs shared among the team's
 * threads (called by every thread of a parallel region) two at a time. */
static void int8_product(const int8_layer *layer, const uint8_t *inputs, const float *row_scales, int64_t rows,
                         float *out) {
    const int64_t n = layer->outputs, k = layer->inputs, pairs = (n + 1) / 2;
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
        /* An odd last output is paired with itself. */
        const int64_t o = 2 * pair;
        const int outputs = o + 1 < n ? 2 : 1;
        const int8_t *first = layer->weights + o * k, *second = first + (outputs - 1) * k;
        for (int64_t r = 0; r < rows; r += 4) {
            int32_t sums[8];
            const int count = rows - r < 4 ? (int)(rows - r) : 4;
            switch (count) {
            case 4: dot_block(first, second, inputs + r * k, k, k, 4, sums); break;
            case 3: dot_block(first, second, inputs + r * k, k, k, 3, sums); break;
            case 2: dot_block(first, second, inputs + r * k, k, k, 2, sums); break;
            default: dot_block(first, second, inputs + r * k, k, k, 1, sums); break;
            }
            for (int i = 0; i < count; ++i)
                for (int j = 0; j < outputs; ++j)
                    out[(r + i) * n + o + j] = (float)(sums[2 * i + j] - INPUT_ZERO_POINT * layer->sums[o + j])
                                               * layer->scales[o + j] * row_scales[r + i];
        }
    }
}

#endif
