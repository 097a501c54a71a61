/* Forward passes of a Qwen3 LLM whose projections and output head are int8 or bf16 (the torch
 * LLMs of twopass_asr/second_pass/llm_on_torch.py) over new rows of a few sequences, in one call:
 * the norms, the rotary embedding, the attention over a key/value cache and the products, with
 * no Python or torch operator between them. One call is a decode step (one new row per
 * sequence) or a prompt's prefill (all its rows, each attending the rows before it);
 * twopass_asr/second_pass/native_decode.py builds the model and calls it.
 *
 * The int8 products are int8_product.h's, with fbgemm's bits; the bf16 ones bf16_product.h's.
 * The float work around them is torch's arithmetic in another summation order, so a pass agrees
 * with HF's to float rounding, not bit for bit. */

#include <float.h>

#include "bf16_product.h"
#include "exp_nonpositive.h"
#include "int8_product.h"
#include "vector_lanes.h"

/* One of the model's projections: int8 or bf16, as the model's products are (the other left
 * empty). */
typedef struct {
    int8_layer int8;
    bf16_layer bf16;
} projection;

typedef struct {
    const float *input_norm, *post_attention_norm; /* [hidden] */
    const float *query_norm, *key_norm;            /* [head_dim] */
    projection qkv;                                /* queries, keys, values stacked */
    projection output;
    projection gate_up;                            /* gate, up stacked */
    projection down;
    float *keys, *values; /* [slots, kv_heads, capacity, head_dim] */
} decoder_layer;

/* A bf16 output head's int8 copy, by which the greedy token is found reading half the head's bytes
 * (screened_head): the head's weights on 127 levels per output, and per output the sum of its bf16
 * weights' magnitudes and the largest difference between a bf16 weight and its int8 value (both
 * rounded up). No screen: outputs 0. */
typedef struct {
    int8_layer weights;
    const float *magnitudes, *rounding; /* [outputs] each */
} head_screen;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, slots, capacity;
    float norm_eps, input_step;       /* input_step: the int8 products' */
    int bf16_products;                /* else int8 */
    const float *inverse_frequencies; /* [head_dim / 2] */
    const decoder_layer *layer;
    const float *final_norm;
    projection head;
    head_screen screen; /* of a bf16 head, or none */
} qwen3_model;

/* Space for one step of `rows` sequences (all float unless said), in one buffer the caller
 * allocates (step_scratch_floats) and lay_out_scratch divides. */
typedef struct {
    float *normed;       /* [rows, max(hidden, intermediate)] the next product's float input */
    void *product_input; /* [rows, max(hidden, heads * head_dim, intermediate)]: uint8 or bf16 */
    float *row_scales;   /* [rows], of int8 inputs */
    float *qkv;          /* [rows, (heads + 2 kv_heads) head_dim] */
    float *attended;     /* [rows, heads * head_dim] */
    float *product;      /* [rows, max(hidden, 2 intermediate)] */
    float *scores;       /* [rows * heads, capacity] */
    float *rotary;       /* [rows, head_dim]: the cosines, then the sines, of each row's rotary angles */
    int32_t *runs;       /* [rows + 1]: find_runs' */
    /* Where the model has a head screen: */
    uint8_t *screened_input; /* [rows, hidden]: the screen's quantized input */
    int32_t *blocks;         /* [rows, head outputs / 16]: each row's candidate blocks (screened_head) */
    int64_t *block_starts;   /* [rows + 1]: where each row's candidates start among all rows' */
} step_scratch;

/* Qwen3's RMS norm of one row: x / sqrt(mean(x^2) + eps) * weight. */
static void rms_norm(const float *x, const float *weight, int64_t columns, float eps, float *out) {
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < columns; ++c)
        squares += x[c] * x[c];
    const float inverse = 1.0f / sqrtf(squares / (float)columns + eps);
    for (int64_t c = 0; c < columns; ++c)
        out[c] = weight[c] * (x[c] * inverse);
}

/* Row r of a product's input, from the float row [columns]: quantized (int8) or rounded (bf16). */
static void make_product_input(const qwen3_model *model, const float *row, int64_t columns, int64_t r,
                               step_scratch *scratch) {
    if (model->bf16_products)
        bf16_row(row, columns, (uint16_t *)scratch->product_input + r * columns);
    else
        scratch->row_scales[r] = quantize_row(row, columns, model->input_step,
                                              (uint8_t *)scratch->product_input + r * columns);
}

/* out [rows, outputs] = the projection over the rows of scratch's product input. */
static void project(const qwen3_model *model, const projection *layer, int64_t rows, const step_scratch *scratch,
                    float *out) {
    if (model->bf16_products)
        bf16_product(&layer->bf16, scratch->product_input, rows, out);
    else
        int8_product(&layer->int8, scratch->product_input, scratch->row_scales, rows, NULL, out);
}

/* Each row of `x` [rows, columns], `addend`'s row added to it first in place (if given: the
 * residual connection), normed (if `norm`) and made a product's input. */
static void product_inputs(const qwen3_model *model, float *x, const float *addend, const float *norm,
                           int64_t rows, int64_t columns, step_scratch *scratch) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        float *row = x + r * columns;
        if (addend)
            for (int64_t c = 0; c < columns; ++c)
                row[c] += addend[r * columns + c];
        const float *input = row;
        if (norm) {
            rms_norm(row, norm, columns, model->norm_eps, scratch->normed + r * columns);
            input = scratch->normed + r * columns;
        }
        make_product_input(model, input, columns, r, scratch);
    }
}

/* The cosines and sines of the rotary angles at `position` into rotary [head_dim]: once a row
 * for all its heads and layers, not once per head and layer. */
static void rotary_angles(const float *inverse_frequencies, int64_t head_dim, int64_t position, float *rotary) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float angle = (float)position * inverse_frequencies[i];
        rotary[i] = cosf(angle);
        rotary[half + i] = sinf(angle);
    }
}

/* The rotary embedding of one head (rotary: rotary_angles' at its position): x * cos +
 * rotate_half(x) * sin. */
static void rotate(float *x, int64_t head_dim, const float *rotary) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float cosine = rotary[i], sine = rotary[half + i];
        const float first = x[i], second = x[i + half];
        x[i] = first * cosine - second * sine;
        x[i + half] = second * cosine + first * sine;
    }
}

/* Up to GROUP_QUERIES query heads of one key/value head attend together, sharing each key and
 * value they load; KEY_BLOCK keys are scored at a time, one vector of sums for each query and key,
 * as many vectors as a vector has lanes: their lanes are then summed together (sum_lanes), a few
 * shuffles for them all where each vector's own sum takes several. */
#define GROUP_QUERIES 2
#define KEY_BLOCK (LANES / GROUP_QUERIES)

/* out[i] = the sum of the lanes of v[i], for the LANES vectors v: added in halves across vectors,
 * so that a few shuffles and adds serve them all. */
static inline __attribute__((always_inline)) void sum_lanes(const float_lanes v[LANES], float out[LANES]) {
#if defined(__AVX512F__)
    /* Each step halves the lanes a vector's partial sums take and doubles the vectors one register
     * holds: quarters of two vectors, then quarters of four, then pairs, then single lanes. */
    __m512 halves[8], quarters[4], pairs[2];
    for (int i = 0; i < 8; ++i) {
        const __m512 a = (__m512)v[i], b = (__m512)v[i + 8];
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    }
    for (int i = 0; i < 4; ++i)
        quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[i], halves[i + 4], 0x88),
                                    _mm512_shuffle_f32x4(halves[i], halves[i + 4], 0xdd));
    for (int i = 0; i < 2; ++i)
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(quarters[i], quarters[i + 2]),
                                 _mm512_unpackhi_ps(quarters[i], quarters[i + 2]));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* sums holds v 0 2 1 3 8 10 9 11 4 6 5 7 12 14 13 15's. */
    const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, sums));
#elif defined(__AVX__)
    __m256 halves[4], pairs[2];
    for (int i = 0; i < 4; ++i) {
        const __m256 a = (__m256)v[i], b = (__m256)v[i + 4];
        halves[i] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    }
    for (int i = 0; i < 2; ++i)
        pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(halves[i], halves[i + 2]),
                                 _mm256_unpackhi_ps(halves[i], halves[i + 2]));
    const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm256_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* sums holds v 0 2 1 3 4 6 5 7's. */
    _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7)));
#else
    for (int i = 0; i < LANES; ++i) {
        float total = 0.0f;
        for (int l = 0; l < LANES; ++l)
            total += v[i][l];
        out[i] = total;
    }
#endif
}

/* scores[i][t + k] = query[i] . key t + k (of `keys` [*, head_dim]) for the `queries` (1 to
 * GROUP_QUERIES) and `count` (1 to KEY_BLOCK) keys from t: over each key's whole vectors of LANES
 * in lanes, then the lanes (sum_lanes) and the floats past them. A block short of queries or keys
 * takes the first query again and `zeros` (head_dim of them) for the keys past `count`, so each
 * score is summed the same way in any block. */
static inline __attribute__((always_inline)) void score_block(const float *const query[GROUP_QUERIES], int queries,
                                                              const float *keys, int64_t t, int count,
                                                              int64_t head_dim, const float *zeros,
                                                              float *const scores[GROUP_QUERIES]) {
    const int64_t whole = head_dim - head_dim % LANES;
    const float *q[GROUP_QUERIES], *key[KEY_BLOCK];
    for (int i = 0; i < GROUP_QUERIES; ++i)
        q[i] = query[i < queries ? i : 0];
    for (int k = 0; k < KEY_BLOCK; ++k)
        key[k] = k < count ? keys + (t + k) * head_dim : zeros;
    float_lanes sums[LANES];
    for (int s = 0; s < LANES; ++s)
        sums[s] = (float_lanes){0.0f};
    for (int64_t d = 0; d < whole; d += LANES) {
        float_lanes lanes[GROUP_QUERIES];
        for (int i = 0; i < GROUP_QUERIES; ++i)
            memcpy(&lanes[i], q[i] + d, sizeof lanes[i]);
        for (int k = 0; k < KEY_BLOCK; ++k) {
            float_lanes row;
            memcpy(&row, key[k] + d, sizeof row);
            for (int i = 0; i < GROUP_QUERIES; ++i)
                sums[i * KEY_BLOCK + k] += lanes[i] * row;
        }
    }
    float dots[LANES];
    sum_lanes(sums, dots);
    for (int i = 0; i < queries; ++i)
        for (int k = 0; k < count; ++k) {
            float dot = dots[i * KEY_BLOCK + k];
            for (int64_t d = whole; d < head_dim; ++d)
                dot += q[i][d] * key[k][d];
            scores[i][t + k] = dot;
        }
}

/* out[i] = the `queries` rows of weights [*, index + 1] times the values of entries 0..index
 * that `present` marks, for columns d to d + WEIGHED_VECTORS * LANES (or the head's end): the
 * outputs stay in registers over all the values. */
#define WEIGHED_VECTORS 4
static inline __attribute__((always_inline)) void weigh_columns(const float *const weights[GROUP_QUERIES],
                                                                int queries, const float *values,
                                                                const uint8_t *present, int64_t index,
                                                                int64_t head_dim, int64_t d, int vectors,
                                                                float *const out[GROUP_QUERIES]) {
    float_lanes sums[GROUP_QUERIES][WEIGHED_VECTORS];
    for (int i = 0; i < queries; ++i)
        for (int v = 0; v < vectors; ++v)
            sums[i][v] = (float_lanes){0.0f};
    for (int64_t t = 0; t <= index; ++t) {
        if (!present[t])
            continue;
        for (int v = 0; v < vectors; ++v) {
            float_lanes value;
            memcpy(&value, values + t * head_dim + d + v * LANES, sizeof value);
            for (int i = 0; i < queries; ++i)
                sums[i][v] += weights[i][t] * value;
        }
    }
    for (int i = 0; i < queries; ++i)
        memcpy(out[i] + d, sums[i], (size_t)vectors * sizeof sums[i][0]);
}

/* Up to GROUP_QUERIES query heads of one row over one key/value head: their queries (normed and
 * rotated), where their scores (index + 1 floats each) and outputs go, and the last cache entry
 * the row attends. */
typedef struct {
    const float *query[GROUP_QUERIES];
    float *scores[GROUP_QUERIES], *out[GROUP_QUERIES];
    int queries;
    int64_t index;
} query_group;

/* The attention of `count` rows of one sequence (groups[j], each over the entries up to its own
 * index that `present` marks; the others are never read as values, and their scores weigh
 * nothing) over the cache of one key/value head. Key by key block and value column by column
 * block, every row takes its turn while the block is in the first-level cache: the rows a pass
 * holds for a sequence (a prompt's, or a step's drafts) read its cache once. Each row's sums run
 * in the same order whatever rows come with it. */
static void attend_rows(const query_group *groups, int64_t count, const float *keys, const float *values,
                        const uint8_t *present, int64_t head_dim) {
    const float scaling = 1.0f / sqrtf((float)head_dim);
    int64_t last = 0;
    for (int64_t j = 0; j < count; ++j)
        last = groups[j].index > last ? groups[j].index : last;
    float zeros[head_dim];
    memset(zeros, 0, sizeof zeros);
    for (int64_t t = 0; t <= last; t += KEY_BLOCK)
        for (int64_t j = 0; j < count; ++j) {
            const query_group *group = &groups[j];
            if (t <= group->index)
                score_block(group->query, group->queries, keys, t,
                            (int)(group->index + 1 - t < KEY_BLOCK ? group->index + 1 - t : KEY_BLOCK), head_dim,
                            zeros, group->scores);
        }
    for (int64_t j = 0; j < count; ++j)
        for (int i = 0; i < groups[j].queries; ++i) {
            float *row = groups[j].scores[i], largest = -INFINITY;
            const int64_t index = groups[j].index;
#pragma omp simd reduction(max : largest)
            for (int64_t e = 0; e <= index; ++e) {
                row[e] *= scaling;
                largest = present[e] && row[e] > largest ? row[e] : largest;
            }
#pragma omp simd
            for (int64_t e = 0; e <= index; ++e)
                row[e] = present[e] ? exp_nonpositive(row[e] - largest) : 0.0f;
            /* Summed in order, not in lanes: the same total wherever the row's entries sit in the
             * cache (a prompt padded in a batch, or alone). */
            float total = 0.0f;
            for (int64_t e = 0; e <= index; ++e)
                total += row[e];
#pragma omp simd
            for (int64_t e = 0; e <= index; ++e)
                row[e] /= total;
        }
    const int64_t whole = head_dim - head_dim % LANES;
    for (int64_t d = 0; d < whole; d += WEIGHED_VECTORS * LANES) {
        const int vectors = whole - d < WEIGHED_VECTORS * LANES ? (int)((whole - d) / LANES) : WEIGHED_VECTORS;
        for (int64_t j = 0; j < count; ++j) {
            const query_group *group = &groups[j];
            const float *const weights[GROUP_QUERIES] = {group->scores[0],
                                                         group->scores[group->queries > 1 ? 1 : 0]};
            if (group->queries == GROUP_QUERIES && vectors == WEIGHED_VECTORS)
                weigh_columns(weights, GROUP_QUERIES, values, present, group->index, head_dim, d, WEIGHED_VECTORS,
                              group->out);
            else
                weigh_columns(weights, group->queries, values, present, group->index, head_dim, d, vectors,
                              group->out);
        }
    }
    for (int64_t j = 0; j < count; ++j)
        for (int i = 0; i < groups[j].queries; ++i)
            for (int64_t d = whole; d < head_dim; ++d) {
                float sum = 0.0f;
                for (int64_t e = 0; e <= groups[j].index; ++e)
                    if (present[e])
                        sum += groups[j].scores[i][e] * values[e * head_dim + d];
                groups[j].out[i][d] = sum;
            }
}

/* The most rows of one sequence that attend together (attend_rows): a longer run is cut, so
 * that its query groups fit on the stack. */
#define RUN_ROWS 64

/* Row r is sequence slots[r] (its rotary angles in scratch's), its key and value going to cache
 * index indices[r]. First every row's keys are normed and rotated and written to the cache with
 * its values (and its queries normed and rotated), then each run of rows of one sequence
 * (runs: the first row of each, and the row count after the last) attends that sequence's cache,
 * each row up to its own index: the rows of one prompt, written together, each see the rows
 * before them. */
static void attend(const qwen3_model *model, const decoder_layer *layer, int64_t rows, const int64_t *slots,
                   const int64_t *indices, const uint8_t *valid, const int32_t *runs, int64_t run_count,
                   step_scratch *scratch) {
    const int64_t heads = model->heads, kv_heads = model->kv_heads, head_dim = model->head_dim;
    const int64_t capacity = model->capacity, group = heads / kv_heads;
    const int64_t qkv_width = (heads + 2 * kv_heads) * head_dim;
#pragma omp for schedule(static) collapse(2)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < kv_heads; ++g) {
            float *row = scratch->qkv + r * qkv_width;
            const int64_t entry = ((slots[r] * kv_heads + g) * capacity + indices[r]) * head_dim;
            float *key = row + (heads + g) * head_dim;
            rms_norm(key, layer->key_norm, head_dim, model->norm_eps, key);
            rotate(key, head_dim, scratch->rotary + r * head_dim);
            memcpy(layer->keys + entry, key, (size_t)head_dim * sizeof(float));
            memcpy(layer->values + entry, row + (heads + kv_heads + g) * head_dim, (size_t)head_dim * sizeof(float));
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
                float *query = row + h * head_dim;
                rms_norm(query, layer->query_norm, head_dim, model->norm_eps, query);
                rotate(query, head_dim, scratch->rotary + r * head_dim);
            }
        }
    }
#pragma omp for schedule(dynamic) collapse(2)
    for (int64_t u = 0; u < run_count; ++u) {
        for (int64_t g = 0; g < kv_heads; ++g) {
            const int64_t first = runs[u], count = runs[u + 1] - first, slot = slots[first];
            const int64_t cached = (slot * kv_heads + g) * capacity * head_dim;
            for (int64_t h = g * group; h < (g + 1) * group; h += GROUP_QUERIES) {
                const int queries = (g + 1) * group - h < GROUP_QUERIES ? (int)((g + 1) * group - h) : GROUP_QUERIES;
                query_group groups[RUN_ROWS];
                for (int64_t j = 0; j < count; ++j) {
                    const int64_t r = first + j;
                    groups[j].queries = queries;
                    groups[j].index = indices[r];
                    for (int i = 0; i < queries; ++i) {
                        groups[j].query[i] = scratch->qkv + r * qkv_width + (h + i) * head_dim;
                        groups[j].scores[i] = scratch->scores + (r * heads + h + i) * capacity;
                        groups[j].out[i] = scratch->attended + (r * heads + h + i) * head_dim;
                    }
                }
                attend_rows(groups, count, layer->keys + cached, layer->values + cached, valid + slot * capacity,
                            head_dim);
            }
        }
    }
}

/* The runs of rows of one sequence, at most RUN_ROWS rows each, that attend together: the first
 * row of each into runs, then `rows`; returns their count. */
static int64_t find_runs(const int64_t *slots, int64_t rows, int32_t *runs) {
    int64_t count = 0;
    for (int64_t r = 0; r < rows; ++r)
        if (r == 0 || slots[r] != slots[r - 1] || r - runs[count - 1] == RUN_ROWS)
            runs[count++] = (int32_t)r;
    runs[count] = (int32_t)rows;
    return count;
}

/* The scratch of a step of `rows` rows laid out from `base` (when given); returns the floats
 * it takes. */
static int64_t lay_out_scratch(const qwen3_model *model, int64_t rows, float *base, step_scratch *scratch) {
    const int64_t width = model->hidden, intermediate = model->intermediate;
    const int64_t attended_width = model->heads * model->head_dim;
    const int64_t qkv_width = (model->heads + 2 * model->kv_heads) * model->head_dim;
    const int64_t widest = intermediate > width ? intermediate : width;
    const int64_t widest_input = attended_width > widest ? attended_width : widest;
    const int64_t widest_output = 2 * intermediate > width ? 2 * intermediate : width;
    const int64_t sizes[7] = {rows * widest, rows, rows * qkv_width, rows * attended_width, rows * widest_output,
                              rows * model->heads * model->capacity, rows * model->head_dim};
    float **parts[7] = {&scratch->normed, &scratch->row_scales, &scratch->qkv, &scratch->attended,
                        &scratch->product, &scratch->scores, &scratch->rotary};
    int64_t used = 0;
    for (int i = 0; i < 7; ++i) {
        if (base)
            *parts[i] = base + used;
        used += sizes[i];
    }
    if (base)
        scratch->product_input = base + used;
    /* As bf16, two bytes an input (int8 takes one). */
    const int64_t input_bytes = rows * widest_input * (int64_t)sizeof(uint16_t);
    used += (input_bytes + (int64_t)sizeof(float) - 1) / (int64_t)sizeof(float);
    if (base)
        scratch->runs = (int32_t *)(base + used);
    used += rows + 1;
    if (model->screen.weights.outputs == 0)
        return used;
    /* Each part below starts at an even float, so on 8 bytes. */
    used += used % 2;
    if (base)
        scratch->block_starts = (int64_t *)(base + used);
    used += 2 * (rows + 1);
    if (base)
        scratch->blocks = (int32_t *)(base + used);
    used += rows * (model->screen.weights.outputs / BF16_TILE_OUTPUTS);
    if (base)
        scratch->screened_input = (uint8_t *)(base + used);
    return used + (rows * model->hidden + (int64_t)sizeof(float) - 1) / (int64_t)sizeof(float);
}

/* The number of floats qwen3_forward's scratch_space must hold for `rows` rows. */
int64_t step_scratch_floats(const qwen3_model *model, int64_t rows) {
    step_scratch unused;
    return lay_out_scratch(model, rows, NULL, &unused);
}

/* The index of the largest of `count` values, the first where several are (torch's argmax; a
 * NaN counts as the largest). */
static int64_t first_largest(const float *values, int64_t count) {
    float largest = values[0];
    int unordered = 0;
#pragma omp simd reduction(max : largest) reduction(| : unordered)
    for (int64_t i = 0; i < count; ++i) {
        largest = values[i] > largest ? values[i] : largest;
        unordered |= values[i] != values[i];
    }
    for (int64_t i = 0; i < count; ++i)
        if (unordered ? values[i] != values[i] : values[i] == largest)
            return i;
    return 0;
}

#ifdef BF16_DOT_512
/* The greedy token among blocks of 16 values (of `count` blocks, in ascending order) that hold
 * every largest value of a row: first_largest's, the first of equals or the first NaN. */
static int64_t first_largest_of_blocks(const float *values, const int32_t *blocks, int64_t count) {
    int64_t chosen = -1;
    float largest = 0.0f;
    for (int64_t n = 0; n < count; ++n)
        for (int64_t j = 0; j < BF16_TILE_OUTPUTS; ++j) {
            const int64_t index = (int64_t)blocks[n] * BF16_TILE_OUTPUTS + j;
            const float value = values[index];
            if (value != value)
                return index;
            if (chosen < 0 || value > largest) {
                chosen = index;
                largest = value;
            }
        }
    return chosen;
}

/* Row i's blocks of 16 outputs of the bf16 head that may hold its largest logit, from the screen's
 * approximate logits (`approximate`, the int8 copy's), into `blocks` in ascending order; returns
 * how many. Each output's exact logit lies within a bound of its approximation: the input's
 * largest difference from the screen's input times the output's weight magnitudes, plus the
 * screen's input magnitudes times the output's largest weight rounding, plus what float sums may
 * round (the exact product's, the screen's scaling), with a generous margin. An output whose
 * approximation plus its bound falls below some output's approximation minus its bound cannot
 * hold the largest logit. A row that is not finite, or whose bounds are not, keeps every block. */
static int64_t candidate_blocks(const qwen3_model *model, const step_scratch *scratch, int64_t i,
                                const float *approximate, int32_t *blocks) {
    const head_screen *screen = &model->screen;
    const int64_t width = model->hidden, outputs = screen->weights.outputs;
    const int64_t block_count = outputs / BF16_TILE_OUTPUTS;
    const uint16_t *rounded = (const uint16_t *)scratch->product_input + i * width;
    const uint8_t *quantized = scratch->screened_input + i * width;
    const double step = (double)scratch->row_scales[i] * (double)model->input_step;
    double input_error = 0.0, screened_magnitude = 0.0, largest_input = 0.0;
    for (int64_t c = 0; c < width; ++c) {
        const double x = bf16_to_float(rounded[c]);
        const double screened = (double)((int32_t)quantized[c] - INPUT_ZERO_POINT) * step;
        const double error = fabs(x - screened);
        input_error = error > input_error || error != error ? error : input_error;
        largest_input = fabs(x) > largest_input || x != x ? fabs(x) : largest_input;
        screened_magnitude += fabs(screened);
    }
    /* A float sum of n products rounds by at most n units of its last place per product magnitude;
     * twice that, for however the hardware rounds its pairs. */
    const double sum_rounding = 2.0 * (double)width * 0x1p-24;
    const double margin = 1.0 + 0x1p-10;
    const float per_magnitude = (float)((input_error + sum_rounding * largest_input) * margin);
    const float per_rounding = (float)(screened_magnitude * margin);
    /* One pass over the outputs: the floor, and each block's largest upper end, held in `blocks`
     * (as floats) until the blocks above the floor are listed there in their place. */
    float floor = -FLT_MAX, widest = 0.0f;
    for (int64_t b = 0; b < block_count; ++b) {
        float upper = -INFINITY;
#pragma omp simd reduction(max : floor, widest, upper)
        for (int64_t o = b * BF16_TILE_OUTPUTS; o < (b + 1) * BF16_TILE_OUTPUTS; ++o) {
            const float bound = per_magnitude * screen->magnitudes[o] + per_rounding * screen->rounding[o]
                                + 0x1p-20f * fabsf(approximate[o]) + 0x1p-100f;
            floor = approximate[o] - bound > floor ? approximate[o] - bound : floor;
            upper = approximate[o] + bound > upper ? approximate[o] + bound : upper;
            /* A NaN counts as infinite. */
            const float reach = approximate[o] == approximate[o] ? fabsf(approximate[o]) + bound : INFINITY;
            widest = reach > widest ? reach : widest;
        }
        memcpy(blocks + b, &upper, sizeof upper);
    }
    const int keep_all = !(widest < FLT_MAX && per_magnitude < FLT_MAX && per_rounding < FLT_MAX);
    int64_t count = 0;
    for (int64_t b = 0; b < block_count; ++b) {
        float upper;
        memcpy(&upper, blocks + b, sizeof upper);
        if (keep_all || upper >= floor)
            blocks[count++] = (int32_t)b;
    }
    return count;
}

/* The greedy token of each of `count` rows through the bf16 head (their product inputs ready,
 * and the screen's), reading the head's int8 copy whole and only the bf16 blocks that may hold a
 * row's largest logit (candidate_blocks): those logits have the bits the whole bf16 head gives
 * them, so the tokens are the same. logits: the screen's approximations, those blocks exact. */
static void screened_head(const qwen3_model *model, int64_t count, step_scratch *scratch, float *logits,
                          int64_t *tokens) {
    const bf16_layer *head = &model->head.bf16;
    const int64_t width = model->hidden, outputs = head->outputs, block_count = outputs / BF16_TILE_OUTPUTS;
    int8_product(&model->screen.weights, scratch->screened_input, scratch->row_scales, count, NULL, logits);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < count; ++i)
        scratch->block_starts[i + 1] = candidate_blocks(model, scratch, i, logits + i * outputs,
                                                        scratch->blocks + i * block_count);
#pragma omp single
    {
        scratch->block_starts[0] = 0;
        for (int64_t i = 0; i < count; ++i)
            scratch->block_starts[i + 1] += scratch->block_starts[i];
    }
    const int64_t *starts = scratch->block_starts;
#pragma omp for schedule(dynamic, 8)
    for (int64_t item = 0; item < starts[count]; ++item) {
        int64_t i = 0;
        while (starts[i + 1] <= item)
            ++i;
        const int64_t block = scratch->blocks[i * block_count + item - starts[i]];
        bf16_block_of_row(head, (const uint16_t *)scratch->product_input + i * width, block,
                          logits + i * outputs + block * BF16_TILE_OUTPUTS);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < count; ++i)
        tokens[i] = first_largest_of_blocks(logits + i * outputs, scratch->blocks + i * block_count,
                                            starts[i + 1] - starts[i]);
}
#endif

/* Whether the pass finds its tokens through the head's screen: only builds with native bf16
 * blocks have one (native_decode builds none elsewhere). */
static int head_is_screened(const qwen3_model *model) {
#ifdef BF16_DOT_512
    return model->bf16_products && model->screen.weights.outputs > 0;
#else
    (void)model;
    return 0;
#endif
}

/* hidden [rows, hidden]: in, the new rows' embeddings; out, for the rows in logit_rows, the
 * last layer's output before the final norm (the others are left without its MLP output).
 * Row r is sequence slots[r] at positions[r] (its rotary position), its key and value going to
 * cache index indices[r]; it attends the entries of its sequence up to that
 * index that valid [slots, capacity] marks (the new ones included). logits [logit_count,
 * vocabulary]: of the rows logit_rows names, in that order; tokens [logit_count]: the greedy
 * token of each (its largest logit). scratch_space: step_scratch_floats(model, rows) floats. */
void qwen3_forward(const qwen3_model *model, int64_t rows, float *hidden, const int64_t *slots,
                   const int64_t *positions, const int64_t *indices, const uint8_t *valid, float *scratch_space,
                   int64_t logit_count, const int64_t *logit_rows, float *logits, int64_t *tokens, int threads) {
    const int64_t width = model->hidden, intermediate = model->intermediate, head_dim = model->head_dim;
    const int64_t attended_width = model->heads * head_dim;
    step_scratch scratch;
    lay_out_scratch(model, rows, scratch_space, &scratch);
    const int64_t run_count = find_runs(slots, rows, scratch.runs);
    const int screened = head_is_screened(model);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            rotary_angles(model->inverse_frequencies, head_dim, positions[r], scratch.rotary + r * head_dim);
        for (int64_t l = 0; l < model->layers; ++l) {
            const decoder_layer *layer = &model->layer[l];
            /* The previous layer's MLP output is added to the hidden rows here. */
            product_inputs(model, hidden, l ? scratch.product : NULL, layer->input_norm, rows, width, &scratch);
            project(model, &layer->qkv, rows, &scratch, scratch.qkv);
            attend(model, layer, rows, slots, indices, valid, scratch.runs, run_count, &scratch);
            product_inputs(model, scratch.attended, NULL, NULL, rows, attended_width, &scratch);
            project(model, &layer->output, rows, &scratch, scratch.product);
            product_inputs(model, hidden, scratch.product, layer->post_attention_norm, rows, width, &scratch);
            project(model, &layer->gate_up, rows, &scratch, scratch.product);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                const float *gate = scratch.product + r * 2 * intermediate, *up = gate + intermediate;
                float *activated = scratch.normed + r * intermediate;
                /* SiLU, g / (1 + e^-g), from e^-|g| (which vectorises): g e^g / (1 + e^g) for g < 0,
                 * where g e^g is the larger of the two numerators. */
                for (int64_t c = 0; c < intermediate; ++c) {
                    const float g = gate[c], e = exp_nonpositive(-fabsf(g)), scaled = g * e;
                    activated[c] = (scaled > g ? scaled : g) / (1.0f + e) * up[c];
                }
                make_product_input(model, activated, intermediate, r, &scratch);
            }
            project(model, &layer->down, rows, &scratch, scratch.product);
        }
        /* Only the rows whose logits are asked for take the last layer's MLP output and go
         * through the output head: a prefill wants each prompt's last row. */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < logit_count; ++i) {
            float *row = hidden + logit_rows[i] * width;
            if (model->layers)
                for (int64_t c = 0; c < width; ++c)
                    row[c] += scratch.product[logit_rows[i] * width + c];
            rms_norm(row, model->final_norm, width, model->norm_eps, scratch.normed + i * width);
            make_product_input(model, scratch.normed + i * width, width, i, &scratch);
            if (screened)
                scratch.row_scales[i] = quantize_row(scratch.normed + i * width, width, model->input_step,
                                                     scratch.screened_input + i * width);
        }
#ifdef BF16_DOT_512
        if (screened) {
            screened_head(model, logit_count, &scratch, logits, tokens);
        } else
#endif
        {
            project(model, &model->head, logit_count, &scratch, logits);
            const int64_t vocabulary = model->bf16_products ? model->head.bf16.outputs : model->head.int8.outputs;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < logit_count; ++i)
                tokens[i] = first_largest(logits + i * vocabulary, vocabulary);
        }
    }
}

/* One int8 layer over `rows` float rows [rows, inputs] into out [rows, outputs], the rows
 * quantized first: the compiled kernel's product (tokenwise_int8), which the LLM's torch
 * forward runs (HF's steps, the prompt openings' caches), and the one qwen3_forward runs.
 * quantized: rows * inputs bytes; row_scales: rows floats. */
void int8_rows_product(const int8_layer *layer, const float *x, int64_t rows, float input_step, uint8_t *quantized,
                       float *row_scales, float *out, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            row_scales[r] = quantize_row(x + r * layer->inputs, layer->inputs, input_step,
                                         quantized + r * layer->inputs);
        int8_product(layer, quantized, row_scales, rows, NULL, out);
    }
}

/* One bf16 layer over `rows` float rows [rows, inputs] into out [rows, outputs], the rows
 * rounded to bf16 first: the product the bf16 LLM's torch forward runs (the prompt openings'
 * caches), and the one qwen3_forward runs. rounded: rows * inputs bf16. */
void bf16_rows_product(const bf16_layer *layer, const float *x, int64_t rows, uint16_t *rounded, float *out,
                       int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            bf16_row(x + r * layer->inputs, layer->inputs, rounded + r * layer->inputs);
        bf16_product(layer, rounded, rows, out);
    }
}
