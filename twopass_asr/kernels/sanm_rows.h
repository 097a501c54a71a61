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

/* The lanes of the dot products below: sums of every LANES-th product, added at the end, which
 * the compiler keeps in vector registers (an `omp simd` reduction of four sums it left scalar). */
#define LANES 16

/* scores[i * stride + j] = the dot product of query row i (of four) with key j, for `count`
 * keys [count, head_dim]: the four rows share each key's reading and their sums run side by side. */
static void score_keys(const float *const queries[4], const float *keys, int64_t count, int64_t head_dim,
                       float *scores, int64_t stride) {
    const int64_t whole = head_dim - head_dim % LANES;
    for (int64_t j = 0; j < count; ++j) {
        const float *key = keys + j * head_dim;
        float lanes[4][LANES] = {{0.0f}};
        for (int64_t d = 0; d < whole; d += LANES)
            for (int i = 0; i < 4; ++i)
                for (int l = 0; l < LANES; ++l)
                    lanes[i][l] += queries[i][d + l] * key[d + l];
        for (int i = 0; i < 4; ++i) {
            float dot = 0.0f;
            for (int l = 0; l < LANES; ++l)
                dot += lanes[i][l];
            for (int64_t d = whole; d < head_dim; ++d)
                dot += queries[i][d] * key[d];
            scores[i * stride + j] = dot;
        }
    }
}

/* LANES floats as one vector of the compiler's (GCC and Clang), for sums it must keep in registers. */
typedef float float_lanes __attribute__((vector_size(LANES * sizeof(float))));

/* out[i] += the `count` values [count, head_dim] weighted by weights[i * stride + j], for rows i
 * below `rows` (of four; the weights of all four are read). Each LANES columns of the four rows
 * are summed over all the values in registers before out is touched. */
static void add_weighted_values(const float *values, int64_t count, int64_t head_dim, const float *weights,
                                int64_t stride, int rows, float *out, int64_t out_stride) {
    const int64_t whole = head_dim - head_dim % LANES;
    for (int64_t d = 0; d < whole; d += LANES) {
        float_lanes sums[4] = {{0.0f}};
        for (int64_t j = 0; j < count; ++j) {
            float_lanes value;
            memcpy(&value, values + j * head_dim + d, sizeof value);
            for (int i = 0; i < 4; ++i)
                sums[i] += weights[i * stride + j] * value;
        }
        for (int i = 0; i < rows; ++i) {
            float_lanes row;
            memcpy(&row, out + i * out_stride + d, sizeof row);
            row += sums[i];
            memcpy(out + i * out_stride + d, &row, sizeof row);
        }
    }
    for (int i = 0; i < rows; ++i)
        for (int64_t j = 0; j < count; ++j)
            for (int64_t d = whole; d < head_dim; ++d)
                out[i * out_stride + d] += weights[i * stride + j] * values[j * head_dim + d];
}

/* Up to four query rows (queries[i], `query_stride` apart) of one stream's head over its keys:
 * its look-back (`history` of them) and the current chunk's first `current`, into out[i]
 * (`out_stride` apart). keys, values: the head's [capacity, head_dim], the chunk's from index
 * `chunk_start` on. The look-back and the chunk are two runs of keys, each walked on its own (a
 * choice of key per index kept the compiler's vectors out of the chunk's run). scores:
 * 4 * (history + current) floats. */
static void attend_rows(const float *queries, int64_t query_stride, int count, const float *keys,
                        const float *values, int64_t history, int64_t chunk_start, int64_t current,
                        int64_t head_dim, float *scores, float *out, int64_t out_stride) {
    const float scaling = 1.0f / sqrtf((float)head_dim);
    const int64_t keys_count = history + current;
    /* Each query times the scaling first, as torch's SANM attention does. */
    float scaled[4 * head_dim];
    const float *q[4];
    for (int i = 0; i < 4; ++i) {
        const float *query = queries + (i < count ? i : 0) * query_stride;
        for (int64_t d = 0; d < head_dim; ++d)
            scaled[i * head_dim + d] = query[d] * scaling;
        q[i] = scaled + i * head_dim;
    }
    score_keys(q, keys, history, head_dim, scores, keys_count);
    score_keys(q, keys + chunk_start * head_dim, current, head_dim, scores + history, keys_count);
    for (int i = 0; i < count; ++i) {
        float *row = scores + i * keys_count;
        float largest = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < keys_count; ++j)
            largest = row[j] > largest ? row[j] : largest;
        for (int64_t j = 0; j < keys_count; ++j) {
            row[j] = expf(row[j] - largest);
            total += row[j];
        }
        for (int64_t j = 0; j < keys_count; ++j)
            row[j] /= total;
        memset(out + i * out_stride, 0, (size_t)head_dim * sizeof(float));
    }
    add_weighted_values(values, history, head_dim, scores, keys_count, count, out, out_stride);
    add_weighted_values(values + chunk_start * head_dim, current, head_dim, scores + history, keys_count, count, out,
                        out_stride);
}

#endif
