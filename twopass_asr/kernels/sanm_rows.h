/* The float work of one row that the native SANM layers share (sanm_encoder.c, sanm_decoder.c):
 * torch's layer norm, the quantization of a product's input, and scaled dot-product attention of
 * a few query rows over one stream's keys. Static functions, as in int8_product.h. */

#ifndef TWOPASS_ASR_SANM_ROWS_H
#define TWOPASS_ASR_SANM_ROWS_H

#include "int8_product.h"

/* torch's layer norm of one row: (x - mean) / sqrt(variance + eps) * weight + bias. */
static void layer_norm(const float *x, const float *weight, const float *bias, int64_t columns, float eps,
                       float *out) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < columns; ++c)
        total += x[c];
    const float mean = total / (float)columns;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < columns; ++c)
        squares += (x[c] - mean) * (x[c] - mean);
    const float inverse = 1.0f / sqrtf(squares / (float)columns + eps);
    for (int64_t c = 0; c < columns; ++c)
        out[c] = (x[c] - mean) * inverse * weight[c] + bias[c];
}

/* Each of `rows` rows [rows, columns] layer-normed into `normed` and quantized as a product's
 * input (`quantized`, its scale in row_scales). */
static void normed_rows(const float *x, const float *weight, const float *bias, int64_t rows, int64_t columns,
                        float eps, float input_step, float *normed, float *row_scales, uint8_t *quantized) {
    for (int64_t r = 0; r < rows; ++r) {
        layer_norm(x + r * columns, weight, bias, columns, eps, normed + r * columns);
        row_scales[r] = quantize_row(normed + r * columns, columns, input_step, quantized + r * columns);
    }
}

static void quantized_rows(const float *x, int64_t rows, int64_t columns, float input_step, float *row_scales,
                           uint8_t *quantized) {
    for (int64_t r = 0; r < rows; ++r)
        row_scales[r] = quantize_row(x + r * columns, columns, input_step, quantized + r * columns);
}

static void add_bias(float *y, const float *bias, int64_t rows, int64_t columns) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < columns; ++c)
            y[r * columns + c] += bias[c];
}

/* Up to four query rows (queries[i], `query_stride` apart) of one stream's head over its keys:
 * its look-back (`history` of them) and the current chunk's first `current`, into out[i]
 * (`out_stride` apart). keys, values: the head's [capacity, head_dim], the chunk's from index
 * `chunk_start` on. The four rows share each key's and value's reading, and their sums run side
 * by side. scores: 4 * (history + current) floats. */
static void attend_rows(const float *queries, int64_t query_stride, int count, const float *keys,
                        const float *values, int64_t history, int64_t chunk_start, int64_t current,
                        int64_t head_dim, float *scores, float *out, int64_t out_stride) {
    const float scaling = 1.0f / sqrtf((float)head_dim);
    const int64_t keys_count = history + current;
    const float *q[4];
    for (int i = 0; i < 4; ++i)
        q[i] = queries + (i < count ? i : 0) * query_stride;
    for (int64_t j = 0; j < keys_count; ++j) {
        const float *key = keys + (j < history ? j : chunk_start + j - history) * head_dim;
        float dot0 = 0.0f, dot1 = 0.0f, dot2 = 0.0f, dot3 = 0.0f;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
        for (int64_t d = 0; d < head_dim; ++d) {
            dot0 += q[0][d] * scaling * key[d];
            dot1 += q[1][d] * scaling * key[d];
            dot2 += q[2][d] * scaling * key[d];
            dot3 += q[3][d] * scaling * key[d];
        }
        scores[j] = dot0;
        scores[keys_count + j] = dot1;
        scores[2 * keys_count + j] = dot2;
        scores[3 * keys_count + j] = dot3;
    }
    for (int i = 0; i < count; ++i) {
        float *row = scores + i * keys_count;
        float largest = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < keys_count; ++j)
            largest = fmaxf(largest, row[j]);
        for (int64_t j = 0; j < keys_count; ++j) {
            row[j] = expf(row[j] - largest);
            total += row[j];
        }
        for (int64_t j = 0; j < keys_count; ++j)
            row[j] /= total;
        memset(out + i * out_stride, 0, (size_t)head_dim * sizeof(float));
    }
    for (int64_t j = 0; j < keys_count; ++j) {
        const float *value = values + (j < history ? j : chunk_start + j - history) * head_dim;
        for (int i = 0; i < count; ++i) {
            float *row_out = out + i * out_stride;
            const float weight = scores[i * keys_count + j];
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d)
                row_out[d] += weight * value[d];
        }
    }
}

#endif
