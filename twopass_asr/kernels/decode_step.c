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

#include "bf16_product.h"
#include "exp_nonpositive.h"
#include "int8_product.h"

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

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, slots, capacity;
    float norm_eps, input_step;       /* input_step: the int8 products' */
    int bf16_products;                /* else int8 */
    const float *inverse_frequencies; /* [head_dim / 2] */
    const decoder_layer *layer;
    const float *final_norm;
    projection head;
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

/* The attention of one query head (normed and rotated in place) over its sequence's cache up
 * to `index`, into `out`. */
static void attend_head(const qwen3_model *model, const decoder_layer *layer, float *query, const float *keys,
                        const float *values, const uint8_t *present, int64_t index, const float *rotary,
                        float *scores, float *out) {
    const int64_t head_dim = model->head_dim;
    const float scaling = 1.0f / sqrtf((float)head_dim);
    rms_norm(query, layer->query_norm, head_dim, model->norm_eps, query);
    rotate(query, head_dim, rotary);
    float largest = -INFINITY;
    for (int64_t t = 0; t <= index; ++t) {
        if (!present[t])
            continue;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < head_dim; ++d)
            dot += query[d] * keys[t * head_dim + d];
        scores[t] = dot * scaling;
        largest = fmaxf(largest, scores[t]);
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t <= index; ++t) {
        scores[t] = present[t] ? exp_nonpositive(scores[t] - largest) : 0.0f;
        total += scores[t];
    }
    memset(out, 0, (size_t)head_dim * sizeof(float));
    for (int64_t t = 0; t <= index; ++t) {
        if (!present[t])
            continue;
        const float weight = scores[t] / total;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d)
            out[d] += weight * values[t * head_dim + d];
    }
}

/* Row r is sequence slots[r] (its rotary angles in scratch's), its key and value going to cache
 * index indices[r]. First every row's keys are normed and rotated and written to the cache with
 * its values, then each query head attends its sequence's cache up to its row's index: the
 * rows of one prompt, written together, each see the rows before them. */
static void attend(const qwen3_model *model, const decoder_layer *layer, int64_t rows, const int64_t *slots,
                   const int64_t *indices, const uint8_t *valid, step_scratch *scratch) {
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
        }
    }
#pragma omp for schedule(static) collapse(2)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < kv_heads; ++g) {
            const int64_t cached = (slots[r] * kv_heads + g) * capacity * head_dim;
            for (int64_t h = g * group; h < (g + 1) * group; ++h)
                attend_head(model, layer, scratch->qkv + r * qkv_width + h * head_dim, layer->keys + cached,
                            layer->values + cached, valid + slots[r] * capacity, indices[r],
                            scratch->rotary + r * head_dim, scratch->scores + (r * heads + h) * capacity,
                            scratch->attended + (r * heads + h) * head_dim);
        }
    }
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
    return used + (input_bytes + (int64_t)sizeof(float) - 1) / (int64_t)sizeof(float);
}

/* The number of floats qwen3_decode_step's scratch_space must hold for `rows` rows. */
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
            attend(model, layer, rows, slots, indices, valid, &scratch);
            product_inputs(model, scratch.attended, NULL, NULL, rows, attended_width, &scratch);
            project(model, &layer->output, rows, &scratch, scratch.product);
            product_inputs(model, hidden, scratch.product, layer->post_attention_norm, rows, width, &scratch);
            project(model, &layer->gate_up, rows, &scratch, scratch.product);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                const float *gate = scratch.product + r * 2 * intermediate, *up = gate + intermediate;
                float *activated = scratch.normed + r * intermediate;
                /* SiLU, g / (1 + e^-g), from e^-|g| (which vectorises): g e^g / (1 + e^g) for g < 0. */
                for (int64_t c = 0; c < intermediate; ++c) {
                    const float g = gate[c], e = exp_nonpositive(-fabsf(g));
                    activated[c] = (g < 0.0f ? g * e : g) / (1.0f + e) * up[c];
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
        }
        project(model, &model->head, logit_count, &scratch, logits);
        const int64_t vocabulary = model->bf16_products ? model->head.bf16.outputs : model->head.int8.outputs;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < logit_count; ++i)
            tokens[i] = first_largest(logits + i * vocabulary, vocabulary);
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
