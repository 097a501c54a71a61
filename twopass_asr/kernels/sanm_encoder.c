/* The streaming Paraformer's SANM encoder layers in int8, all of them in one call per batched
 * step: the layer norms, the int8 products (int8_product.h's, fbgemm's bits), the FSMN memory
 * (row_scaling.c's fsmn_memory, linked in), the attention over each stream's look-back and the
 * residual connections, with no Python or torch operator between them
 * (twopass_asr/first_pass/native_layers.py builds the model and calls it).
 *
 * Each stream's rows are computed from its own rows alone (per-row norms and quantization, each
 * stream attending over its own keys), so a stream gets the same bits alone or batched. The
 * float work is torch's arithmetic in another summation order: a layer agrees with torch's to
 * float rounding, not bit for bit. */

#include "sanm_rows.h"

/* row_scaling.c's */
void fsmn_memory(const float *values, int64_t row_stride, int64_t batch, int64_t time, int64_t columns,
                 const int64_t *lengths, const float *taps, int64_t width, int64_t left, float *masked,
                 float *memory);

/* One pre-norm SANM encoder layer (FunASR's EncoderLayerSANM) with its linear layers in int8. */
typedef struct {
    const float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias;
    int8_layer qkv, out, w1, w2;
    const float *qkv_bias, *out_bias, *w1_bias, *w2_bias;
    const float *fsmn_taps; /* [fsmn_width, size]: one row per frame of the window */
    int64_t fsmn_width, fsmn_left, in_size;
} sanm_layer;

typedef struct {
    int64_t layers, size, heads, head_dim, hidden;
    float norm_eps, input_step;
    const sanm_layer *layer;
} sanm_encoder;

/* Space for one step (all float unless said), in one buffer the caller allocates
 * (encode_scratch_floats) and lay_out_scratch divides. */
typedef struct {
    float *normed;      /* [rows, max(in_size, size)] */
    float *row_scales;  /* [rows] */
    float *qkv;         /* [rows, 3 size] */
    float *masked;      /* [rows, size] the values, zeroed after each stream's frames */
    float *memory;      /* [rows, size] */
    float *attended;    /* [rows, size] */
    float *product;     /* [rows, max(size, hidden)] */
    float *scores;      /* [4, keys] */
    uint8_t *quantized; /* [rows, max(in_size, size, hidden)] */
} encode_scratch;

static int64_t larger(int64_t a, int64_t b) { return a > b ? a : b; }

static int64_t lay_out_scratch(const sanm_encoder *model, int64_t rows, int64_t keys, float *base,
                               encode_scratch *scratch) {
    const int64_t size = model->size, in_size = model->layers ? model->layer[0].in_size : size;
    const int64_t widest_input = larger(larger(in_size, size), model->hidden);
    const int64_t sizes[8] = {rows * larger(in_size, size), rows, rows * 3 * size, rows * size, rows * size,
                              rows * size, rows * larger(size, model->hidden), 4 * keys};
    float **parts[8] = {&scratch->normed, &scratch->row_scales, &scratch->qkv, &scratch->masked,
                        &scratch->memory, &scratch->attended, &scratch->product, &scratch->scores};
    int64_t used = 0;
    for (int i = 0; i < 8; ++i) {
        if (base)
            *parts[i] = base + used;
        used += sizes[i];
    }
    if (base)
        scratch->quantized = (uint8_t *)(base + used);
    return used + (rows * widest_input + (int64_t)sizeof(float) - 1) / (int64_t)sizeof(float);
}

/* The number of floats sanm_encode's scratch_space must hold for `rows` rows and `keys` keys
 * a stream attends over at most. */
int64_t encode_scratch_floats(const sanm_encoder *model, int64_t rows, int64_t keys) {
    encode_scratch unused;
    return lay_out_scratch(model, rows, keys, NULL, &unused);
}

static void normed_inputs(const sanm_encoder *model, const float *x, const float *weight, const float *bias,
                          int64_t rows, int64_t columns, encode_scratch *scratch) {
    normed_rows(x, weight, bias, rows, columns, model->norm_eps, model->input_step, scratch->normed,
                scratch->row_scales, scratch->quantized);
}

static void quantized_inputs(const sanm_encoder *model, const float *x, int64_t rows, int64_t columns,
                             encode_scratch *scratch) {
    quantized_rows(x, rows, columns, model->input_step, scratch->row_scales, scratch->quantized);
}

/* The layer's keys and (masked) values written to its look-back buffer after each stream's
 * history, then each stream's current rows attending over them; rows past a stream's frames
 * get zeros. keys, values: the layer's [batch, heads, capacity, head_dim]. */
static void attend(const sanm_encoder *model, int64_t batch, int64_t time, const int64_t *lengths,
                   const int64_t *history_lengths, int64_t history, int64_t capacity, float *keys, float *values,
                   encode_scratch *scratch) {
    const int64_t size = model->size, heads = model->heads, head_dim = model->head_dim;
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t h = 0; h < heads; ++h) {
            float *head_keys = keys + (b * heads + h) * capacity * head_dim;
            float *head_values = values + (b * heads + h) * capacity * head_dim;
            for (int64_t t = 0; t < time; ++t) {
                const int64_t row = b * time + t;
                memcpy(head_keys + (history + t) * head_dim, scratch->qkv + row * 3 * size + size + h * head_dim,
                       (size_t)head_dim * sizeof(float));
                memcpy(head_values + (history + t) * head_dim, scratch->masked + row * size + h * head_dim,
                       (size_t)head_dim * sizeof(float));
            }
            for (int64_t t = 0; t < time; t += 4) {
                const int64_t row = b * time + t;
                const int64_t rows_left = (t < lengths[b] ? lengths[b] : t) - t;
                const int count = rows_left < 4 ? (int)rows_left : 4;
                float *out = scratch->attended + row * size + h * head_dim;
                if (count > 0)
                    attend_rows(scratch->qkv + row * 3 * size + h * head_dim, 3 * size, count, head_keys,
                                head_values, history_lengths[b], history, lengths[b], head_dim, scratch->scores,
                                out, size);
                for (int64_t i = count; i < 4 && t + i < time; ++i)
                    memset(out + i * size, 0, (size_t)head_dim * sizeof(float));
            }
        }
    }
}

/* All the encoder's layers over a batched step of `batch` streams' `time` frames (stream b's
 * first lengths[b] its own). input [batch, time, layer 0's in_size]; x [batch, time, size]:
 * out, the last layer's output. keys, values [layers, batch, heads, history + time, head_dim]:
 * in, each stream's look-back at its first history_lengths[b] (of `history`) entries; out, the
 * current frames' keys and values after them. scratch_space: encode_scratch_floats(model,
 * batch * time, history + time) floats. */
void sanm_encode(const sanm_encoder *model, int64_t batch, int64_t time, const float *input, float *x,
                 const int64_t *lengths, float *keys, float *values, const int64_t *history_lengths,
                 int64_t history, float *scratch_space) {
    const int64_t rows = batch * time, size = model->size, hidden = model->hidden;
    const int64_t capacity = history + time, layer_cache = batch * model->heads * capacity * model->head_dim;
    encode_scratch scratch;
    lay_out_scratch(model, rows, capacity, scratch_space, &scratch);
    for (int64_t l = 0; l < model->layers; ++l) {
        const sanm_layer *layer = &model->layer[l];
        const float *layer_input = l ? x : input;
        normed_inputs(model, layer_input, layer->norm1_weight, layer->norm1_bias, rows, layer->in_size, &scratch);
        int8_product(&layer->qkv, scratch.quantized, scratch.row_scales, rows, scratch.qkv);
        add_bias(scratch.qkv, layer->qkv_bias, rows, 3 * size);
        fsmn_memory(scratch.qkv + 2 * size, 3 * size, batch, time, size, lengths, layer->fsmn_taps,
                    layer->fsmn_width, layer->fsmn_left, scratch.masked, scratch.memory);
        attend(model, batch, time, lengths, history_lengths, history, capacity, keys + l * layer_cache,
               values + l * layer_cache, &scratch);

        quantized_inputs(model, scratch.attended, rows, size, &scratch);
        int8_product(&layer->out, scratch.quantized, scratch.row_scales, rows, scratch.product);
        const int residual = layer->in_size == size;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < size; ++c) {
                const int64_t i = r * size + c;
                const float attended = (scratch.product[i] + layer->out_bias[c]) + scratch.memory[i];
                x[i] = residual ? x[i] + attended : attended;
            }

        normed_inputs(model, x, layer->norm2_weight, layer->norm2_bias, rows, size, &scratch);
        int8_product(&layer->w1, scratch.quantized, scratch.row_scales, rows, scratch.product);
        for (int64_t r = 0; r < rows; ++r) {
            float *row = scratch.product + r * hidden;
            for (int64_t c = 0; c < hidden; ++c) {
                const float value = row[c] + layer->w1_bias[c];
                row[c] = value > 0.0f ? value : 0.0f;
            }
        }
        quantized_inputs(model, scratch.product, rows, hidden, &scratch);
        int8_product(&layer->w2, scratch.quantized, scratch.row_scales, rows, scratch.product);
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < size; ++c)
                x[r * size + c] += scratch.product[r * size + c] + layer->w2_bias[c];
    }
}
