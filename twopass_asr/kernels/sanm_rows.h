/* The float work of one row that the native SANM layers share (sanm_encoder.c, sanm_decoder.c):
 * torch's layer norm, the quantization of a product's input, scaled dot-product attention of a
 * few query rows over one stream's keys, and what a stream keeps of its keys for the next step.
 * Static functions, as in int8_product.h. The passes over many rows share them among the
 * threads of a parallel region where there is one (as int8_product does its outputs). */

#ifndef TWOPASS_ASR_SANM_ROWS_H
#define TWOPASS_ASR_SANM_ROWS_H

#include "exp_nonpositive.h"
#include "int8_product.h"
#include "vector_lanes.h"
#ifdef __AVX__
#include <immintrin.h>
#endif

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
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        layer_norm(x + r * columns, weight, bias, columns, eps, normed + r * columns);
        row_scales[r] = quantize_row(normed + r * columns, columns, input_step, quantized + r * columns);
    }
}

static void quantized_rows(const float *x, int64_t rows, int64_t columns, float input_step, float *row_scales,
                           uint8_t *quantized) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        row_scales[r] = quantize_row(x + r * columns, columns, input_step, quantized + r * columns);
}

/* One stream's look-back for a batched step: its history's keys and values for every attending
 * layer and head, [layers, heads, room, head_dim] each, the first `history` frames of each head
 * kept from earlier steps. After the step each head holds the last `kept` frames of that history
 * followed by this step's first `fresh` frames. keys NULL: the stream keeps no look-back. */
typedef struct {
    float *keys, *values;
    int64_t room, history, fresh, kept;
} stream_look_back;

/* A head's history after its step (stream_look_back's): the last `kept` frames of its `history`
 * frames at `frames` followed by the step's first `fresh` frames, rows `chunk_stride` apart at
 * `chunk`. */
static void keep_history(float *frames, int64_t history, const float *chunk, int64_t chunk_stride, int64_t fresh,
                         int64_t kept, int64_t head_dim) {
    const int64_t from_chunk = fresh < kept ? fresh : kept, from_history = kept - from_chunk;
    const size_t row_bytes = (size_t)head_dim * sizeof(float);
    memmove(frames, frames + (history - from_history) * head_dim, (size_t)from_history * row_bytes);
    for (int64_t t = 0; t < from_chunk; ++t)
        memcpy(frames + (from_history + t) * head_dim, chunk + (fresh - from_chunk + t) * chunk_stride, row_bytes);
}

/* `keys` rounded up to whole vectors of LANES. */
static int64_t whole_lanes(int64_t keys) { return (keys + LANES - 1) / LANES * LANES; }

/* Scores (a row of `count`, count >= 1, with room for whole_lanes(count)) made their softmax in
 * place: each less their largest, to e, over their sum. The room past `count` takes scores that
 * weigh nothing, so every pass runs over whole vectors of LANES (a row shorter than a vector
 * otherwise ran element by element); the largest and the sum are taken lane by lane. */
static void softmax_row(float *row, int64_t count) {
    const int64_t whole = whole_lanes(count);
    for (int64_t j = count; j < whole; ++j)
        row[j] = -INFINITY; /* exp_nonpositive's 0, whatever its arithmetic gives before the cut-off */
    float lanes[LANES];
    for (int l = 0; l < LANES; ++l)
        lanes[l] = row[l];
    for (int64_t j = LANES; j < whole; j += LANES)
        for (int l = 0; l < LANES; ++l)
            lanes[l] = row[j + l] > lanes[l] ? row[j + l] : lanes[l];
    float largest = lanes[0];
    for (int l = 1; l < LANES; ++l)
        largest = lanes[l] > largest ? lanes[l] : largest;
    for (int64_t j = 0; j < whole; ++j)
        row[j] = exp_nonpositive(row[j] - largest);
    for (int l = 0; l < LANES; ++l)
        lanes[l] = 0.0f;
    for (int64_t j = 0; j < whole; j += LANES)
        for (int l = 0; l < LANES; ++l)
            lanes[l] += row[j + l];
    float total = 0.0f;
    for (int l = 0; l < LANES; ++l)
        total += lanes[l];
    for (int64_t j = 0; j < whole; ++j)
        row[j] /= total;
}

/* The floats a head's attention over `keys` keys works in: attend_rows' scores, then the
 * transposed keys (transpose_keys', at attention_keys). */
static int64_t attention_scratch_floats(int64_t keys, int64_t head_dim) { return (4 + head_dim) * whole_lanes(keys); }
static float *attention_keys(float *scratch, int64_t keys) { return scratch + 4 * whole_lanes(keys); }

#ifdef __AVX__
/* Floats d to d + 7 of eight rows (rows[i] + d) written as eight columns of eight (out, rows
 * `out_stride` apart) through registers: each column one vector store, where element by element
 * it took eight strided stores. */
static inline __attribute__((always_inline)) void transpose_eight(const float *const rows[8], int64_t d, float *out,
                                                                  int64_t out_stride) {
    __m256 r[8], pairs[8], quads[8];
    for (int i = 0; i < 8; ++i)
        r[i] = _mm256_loadu_ps(rows[i] + d);
    for (int i = 0; i < 8; i += 2) {
        pairs[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        pairs[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        quads[i] = _mm256_shuffle_ps(pairs[i], pairs[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        quads[i + 1] = _mm256_shuffle_ps(pairs[i], pairs[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        quads[i + 2] = _mm256_shuffle_ps(pairs[i + 1], pairs[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        quads[i + 3] = _mm256_shuffle_ps(pairs[i + 1], pairs[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(out + i * out_stride, _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x20));
        _mm256_storeu_ps(out + (i + 4) * out_stride, _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x31));
    }
}
#endif

/* `count` keys (head_dim floats each, rows `row_stride` apart) into keys_t's columns from
 * `column` on (rows `stride` apart); returns the column after the last it wrote. Where the build
 * has AVX, eight keys by eight of their floats at a time; a last group of fewer keys is filled
 * out with `zeros` (head_dim of them) where eight columns fit within the row, so it writes zeros
 * past `column + count`. */
static int64_t transpose_rows(const float *keys, int64_t row_stride, int64_t count, int64_t head_dim,
                              const float *zeros, float *keys_t, int64_t column, int64_t stride) {
    int64_t j = 0;
#ifdef __AVX__
    const int64_t whole = head_dim - head_dim % 8;
    for (; j < count && column + j + 8 <= stride; j += 8) {
        const float *rows[8];
        for (int64_t i = 0; i < 8; ++i)
            rows[i] = j + i < count ? keys + (j + i) * row_stride : zeros;
        for (int64_t d = 0; d < whole; d += 8)
            transpose_eight(rows, d, keys_t + d * stride + column + j, stride);
        for (int64_t d = whole; d < head_dim; ++d)
            for (int64_t i = 0; i < 8; ++i)
                keys_t[d * stride + column + j + i] = rows[i][d];
    }
    if (j >= count)
        return column + j;
#endif
    for (; j < count; ++j)
        for (int64_t d = 0; d < head_dim; ++d)
            keys_t[d * stride + column + j] = keys[j * row_stride + d];
    return column + count;
}

/* A head's keys transposed into keys_t [head_dim, whole_lanes(history + current)], zeros after
 * the last: its look-back's `history` keys [history, head_dim], then the chunk's `current`, rows
 * `chunk_stride` apart. The dot products then run along the keys, LANES keys a vector, with no
 * sum across a vector's lanes. The chunk's keys overwrite the look-back's zero fill; the columns
 * neither call wrote take zeros here, eight at a time where they fit: a memset of each row's few
 * padding floats cost more than the attention's arithmetic over them. */
static void transpose_keys(const float *history_keys, int64_t history, const float *chunk_keys,
                           int64_t chunk_stride, int64_t current, int64_t head_dim, float *keys_t) {
    const int64_t count = history + current, stride = whole_lanes(count);
    float zeros[head_dim];
    memset(zeros, 0, sizeof zeros);
    const int64_t after_history = transpose_rows(history_keys, head_dim, history, head_dim, zeros, keys_t, 0, stride);
    const int64_t after_chunk = transpose_rows(chunk_keys, chunk_stride, current, head_dim, zeros, keys_t, history,
                                               stride);
    int64_t written = after_history > after_chunk ? after_history : after_chunk;
#ifdef __AVX__
    for (; written + 8 <= stride; written += 8)
        for (int64_t d = 0; d < head_dim; ++d)
            _mm256_storeu_ps(keys_t + d * stride + written, _mm256_setzero_ps());
#endif
    for (int64_t d = 0; d < head_dim; ++d)
        for (int64_t c = written; c < stride; ++c)
            keys_t[d * stride + c] = 0.0f;
}

/* a times each lane of b plus that lane of c, rounded once: FMA instructions where the build has
 * them (two roundings without). */
static inline __attribute__((always_inline)) float_lanes multiply_add(float a, float_lanes b, float_lanes c) {
#if defined(__AVX512F__)
    return (float_lanes)_mm512_fmadd_ps(_mm512_set1_ps(a), (__m512)b, (__m512)c);
#elif defined(__FMA__)
    return (float_lanes)_mm256_fmadd_ps(_mm256_set1_ps(a), (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* score_keys for keys j to j + vectors * LANES - 1 (vectors 1 or 2): two vectors of keys give
 * eight independent sums, as many as keep two FMA units busy. */
static inline __attribute__((always_inline)) void score_vectors(const float *const queries[4], const float *keys_t,
                                                                int64_t stride, int64_t j, int64_t head_dim,
                                                                int vectors, float *scores) {
    float_lanes sums[4][2] = {{{0.0f}}};
    for (int64_t d = 0; d < head_dim; ++d) {
        float_lanes first, second = {0.0f};
        memcpy(&first, keys_t + d * stride + j, sizeof first);
        if (vectors > 1)
            memcpy(&second, keys_t + d * stride + j + LANES, sizeof second);
        for (int i = 0; i < 4; ++i) {
            sums[i][0] = multiply_add(queries[i][d], first, sums[i][0]);
            if (vectors > 1)
                sums[i][1] = multiply_add(queries[i][d], second, sums[i][1]);
        }
    }
    for (int i = 0; i < 4; ++i) {
        memcpy(scores + i * stride + j, &sums[i][0], sizeof sums[i][0]);
        if (vectors > 1)
            memcpy(scores + i * stride + j + LANES, &sums[i][1], sizeof sums[i][1]);
    }
}

/* scores[i * whole_lanes(count) + j] = the dot product of query row i (of four) with key j, for
 * the `count` keys of transpose_keys' keys_t (and zeros up to whole_lanes(count)), each summed
 * over d in order in its vector's lane. */
static void score_keys(const float *const queries[4], const float *keys_t, int64_t count, int64_t head_dim,
                       float *scores) {
    const int64_t stride = whole_lanes(count);
    int64_t j = 0;
    for (; j + 2 * LANES <= stride; j += 2 * LANES)
        score_vectors(queries, keys_t, stride, j, head_dim, 2, scores);
    if (j < stride)
        score_vectors(queries, keys_t, stride, j, head_dim, 1, scores);
}

/* weigh_values for columns d to d + vectors * LANES - 1 (vectors 1 or 2), as score_vectors. */
static inline __attribute__((always_inline)) void weigh_vectors(const float *const values[2],
                                                                const int64_t value_strides[2],
                                                                const int64_t counts[2], int64_t d,
                                                                const float *weights, int64_t stride, int rows,
                                                                int vectors, float *out, int64_t out_stride) {
    float_lanes sums[4][2] = {{{0.0f}}};
    for (int part = 0; part < 2; ++part)
        for (int64_t j = 0; j < counts[part]; ++j) {
            const float *value = values[part] + j * value_strides[part] + d;
            const float *weight = weights + part * counts[0] + j;
            float_lanes first, second = {0.0f};
            memcpy(&first, value, sizeof first);
            if (vectors > 1)
                memcpy(&second, value + LANES, sizeof second);
            for (int i = 0; i < 4; ++i) {
                sums[i][0] = multiply_add(weight[i * stride], first, sums[i][0]);
                if (vectors > 1)
                    sums[i][1] = multiply_add(weight[i * stride], second, sums[i][1]);
            }
        }
    for (int i = 0; i < rows; ++i) {
        memcpy(out + i * out_stride + d, &sums[i][0], sizeof sums[i][0]);
        if (vectors > 1)
            memcpy(out + i * out_stride + d + LANES, &sums[i][1], sizeof sums[i][1]);
    }
}

/* out[i] = the look-back's `history` values [history, head_dim] and the chunk's `current` (rows
 * `chunk_stride` apart) weighted by weights[i * stride + j] (the look-back's first), for rows i
 * below `rows` (of four; the weights of all four are read). Each LANES columns of the four rows
 * are summed over all the values in registers, then stored. */
static void weigh_values(const float *history_values, int64_t history, const float *chunk_values,
                         int64_t chunk_stride, int64_t current, int64_t head_dim, const float *weights,
                         int64_t stride, int rows, float *out, int64_t out_stride) {
    const float *values[2] = {history_values, chunk_values};
    const int64_t value_strides[2] = {head_dim, chunk_stride}, counts[2] = {history, current};
    const int64_t whole = head_dim - head_dim % LANES;
    int64_t d = 0;
    for (; d + 2 * LANES <= whole; d += 2 * LANES)
        weigh_vectors(values, value_strides, counts, d, weights, stride, rows, 2, out, out_stride);
    if (d < whole)
        weigh_vectors(values, value_strides, counts, d, weights, stride, rows, 1, out, out_stride);
    for (int i = 0; i < rows; ++i)
        for (d = whole; d < head_dim; ++d) {
            float sum = 0.0f;
            for (int part = 0; part < 2; ++part)
                for (int64_t j = 0; j < counts[part]; ++j)
                    sum = fmaf(weights[i * stride + part * history + j], values[part][j * value_strides[part] + d],
                               sum);
            out[i * out_stride + d] = sum;
        }
}

/* Up to four query rows (queries[i], `query_stride` apart) of one stream's head over its keys:
 * its look-back (`history` of them) and the current chunk's `current`, into out[i] (`out_stride`
 * apart). keys_t: those keys transposed (transpose_keys); values: the look-back's [history,
 * head_dim], then the chunk's, rows `chunk_stride` apart. scores: 4 * whole_lanes(history +
 * current) floats. */
static void attend_rows(const float *queries, int64_t query_stride, int count, const float *keys_t,
                        const float *history_values, int64_t history, const float *chunk_values,
                        int64_t chunk_stride, int64_t current, int64_t head_dim, float *scores, float *out,
                        int64_t out_stride) {
    const float scaling = 1.0f / sqrtf((float)head_dim);
    const int64_t keys_count = history + current, score_stride = whole_lanes(keys_count);
    /* Each query times the scaling first, as torch's SANM attention does. */
    float scaled[4 * head_dim];
    const float *q[4];
    for (int i = 0; i < 4; ++i) {
        const float *query = queries + (i < count ? i : 0) * query_stride;
        for (int64_t d = 0; d < head_dim; ++d)
            scaled[i * head_dim + d] = query[d] * scaling;
        q[i] = scaled + i * head_dim;
    }
    score_keys(q, keys_t, keys_count, head_dim, scores);
    for (int i = 0; i < count; ++i)
        softmax_row(scores + i * score_stride, keys_count);
    weigh_values(history_values, history, chunk_values, chunk_stride, current, head_dim, scores, score_stride, count,
                 out, out_stride);
}

/* Head h of one stream: its `rows` query rows (`query_stride` apart; the first `queries` its own)
 * attending over its look-back (`kept`'s for layer `layer`, none where kept is NULL) and the
 * chunk's `current` keys and values (`key_stride` and `value_stride` apart), into out
 * (`out_stride` apart; rows past its own get zeros); the look-back then keeps its frames.
 * scores: attention_scratch_floats(keys, head_dim) floats, `keys` bounding history + current. */
static void attend_head(const stream_look_back *kept, int64_t layer, int64_t heads, int64_t h, const float *query,
                        int64_t query_stride, int64_t queries, int64_t rows, const float *chunk_keys,
                        int64_t key_stride, const float *chunk_values, int64_t value_stride, int64_t current,
                        int64_t head_dim, int64_t keys, float *scores, float *out, int64_t out_stride) {
    float *keys_t = attention_keys(scores, keys);
    const int64_t head_frames = kept ? ((layer * heads + h) * kept->room) * head_dim : 0;
    float *head_keys = kept ? kept->keys + head_frames : NULL;
    float *head_values = kept ? kept->values + head_frames : NULL;
    const int64_t history = kept ? kept->history : 0;
    transpose_keys(head_keys, history, chunk_keys, key_stride, current, head_dim, keys_t);
    for (int64_t t = 0; t < rows; t += 4) {
        const int64_t rows_left = (t < queries ? queries : t) - t;
        const int count = rows_left < 4 ? (int)rows_left : 4;
        if (count > 0)
            attend_rows(query + t * query_stride, query_stride, count, keys_t, head_values, history, chunk_values,
                        value_stride, current, head_dim, scores, out + t * out_stride, out_stride);
        for (int64_t i = count; i < 4 && t + i < rows; ++i)
            memset(out + (t + i) * out_stride, 0, (size_t)head_dim * sizeof(float));
    }
    if (kept == NULL)
        return;
    keep_history(head_keys, history, chunk_keys, key_stride, kept->fresh, kept->kept, head_dim);
    keep_history(head_values, history, chunk_values, value_stride, kept->fresh, kept->kept, head_dim);
}

#endif
