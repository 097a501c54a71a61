/* SANM encoder layers in int8, all of them in one call: the layer norms, the int8 products
 * (int8_product.h's, fbgemm's bits), the FSMN memory (row_scaling.c's fsmn_memory, linked in),
 * the attention and the residual connections, with no Python or torch operator between them
 * (twopass_asr/first_pass/native_layers.py builds the model and calls it). Two uses:
 * sanm_encode, the streaming Paraformer's batched step, each stream attending over its look-back
 * and its chunk; sanm_encode_segments, the Nano's audio encoder (SenseVoice's layers), each
 * segment attending over all its frames.
 *
 * Each stream's rows are computed from its own rows alone (per-row norms and quantization, each
 * stream attending over its own keys), so a stream gets the same bits alone or batched, and with
 * any number of threads (each output of a product, each row and each head of the other passes is
 * one thread's). The float work is torch's arithmetic in another summation order, the attention's
 * multiply-adds fused: a layer agrees with torch's to float rounding, not bit for bit. */

#ifdef _OPENMP
#include <omp.h>
#endif

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
    float *attention;   /* [threads, attention_scratch_floats(keys, head_dim)] */
    uint8_t *quantized; /* [rows, max(in_size, size, hidden)] */
} encode_scratch;

static int64_t larger(int64_t a, int64_t b) { return a > b ? a : b; }

static int64_t lay_out_scratch(const sanm_encoder *model, int64_t rows, int64_t keys, int threads, float *base,
                               encode_scratch *scratch) {
    const int64_t size = model->size, in_size = model->layers ? model->layer[0].in_size : size;
    const int64_t widest_input = larger(larger(in_size, size), model->hidden);
    const int64_t sizes[8] = {rows * larger(in_size, size), rows, rows * 3 * size, rows * size, rows * size,
                              rows * size, rows * larger(size, model->hidden),
                              threads * attention_scratch_floats(keys, model->head_dim)};
    float **parts[8] = {&scratch->normed, &scratch->row_scales, &scratch->qkv, &scratch->masked,
                        &scratch->memory, &scratch->attended, &scratch->product, &scratch->attention};
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

/* The number of floats the scratch_space of sanm_encode or sanm_encode_segments must hold for
 * `rows` rows, `keys` keys a stream attends over at most and `threads` threads. */
int64_t encode_scratch_floats(const sanm_encoder *model, int64_t rows, int64_t keys, int threads) {
    encode_scratch unused;
    return lay_out_scratch(model, rows, keys, threads, NULL, &unused);
}

static int thread_number(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
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

/* Layer `layer`'s current rows of each stream attending over its look-back (look_back[b]'s, or
 * none where look_back is NULL) and its own frames' keys and (masked) values; the look-back then
 * takes the frames it keeps. Rows past a stream's frames get zeros. The streams' heads are shared
 * among the threads; `keys` bounds history + time over the streams. */
static void attend(const sanm_encoder *model, int64_t layer, int64_t batch, int64_t time, const int64_t *lengths,
                   const stream_look_back *look_back, int64_t keys, encode_scratch *scratch) {
    const int64_t size = model->size, heads = model->heads, head_dim = model->head_dim;
    float *scores = scratch->attention + thread_number() * attention_scratch_floats(keys, head_dim);
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < heads; ++h) {
            const float *qkv = scratch->qkv + b * time * 3 * size + h * head_dim;
            attend_head(look_back && look_back[b].keys ? &look_back[b] : NULL, layer, heads, h, qkv, 3 * size,
                        lengths[b], time, qkv + size, 3 * size, scratch->masked + b * time * size + h * head_dim,
                        size, lengths[b], head_dim, keys, scores, scratch->attended + b * time * size + h * head_dim,
                        size);
        }
}

/* All the encoder's layers over a batched step of `batch` streams' `time` frames (stream b's
 * first lengths[b] its own), on `threads` threads. input [batch, time, layer 0's in_size]; x
 * [batch, time, size]: out, the last layer's output. look_back: each stream's look-back (its
 * buffers updated in place), or NULL where no stream has a look-back or keeps one; history: the
 * largest of their histories (0 without). scratch_space: encode_scratch_floats(model, batch *
 * time, history + time, threads) floats. */
void sanm_encode(const sanm_encoder *model, int64_t batch, int64_t time, const float *input, float *x,
                 const int64_t *lengths, const stream_look_back *look_back, int64_t history, int threads,
                 float *scratch_space) {
    const int64_t rows = batch * time, size = model->size, hidden = model->hidden, keys = history + time;
    encode_scratch scratch;
    lay_out_scratch(model, rows, keys, threads, scratch_space, &scratch);
#pragma omp parallel num_threads(threads)
    for (int64_t l = 0; l < model->layers; ++l) {
        const sanm_layer *layer = &model->layer[l];
        const float *layer_input = l ? x : input;
        normed_inputs(model, layer_input, layer->norm1_weight, layer->norm1_bias, rows, layer->in_size, &scratch);
        const product_epilogue qkv_bias = {layer->qkv_bias, 0, {NULL, NULL}};
        int8_product(&layer->qkv, scratch.quantized, scratch.row_scales, rows, &qkv_bias, scratch.qkv);
        fsmn_memory(scratch.qkv + 2 * size, 3 * size, batch, time, size, lengths, layer->fsmn_taps,
                    layer->fsmn_width, layer->fsmn_left, scratch.masked, scratch.memory);
        attend(model, l, batch, time, lengths, look_back, keys, &scratch);

        /* x = layer_input + ((out(attended) + out_bias) + memory), without the residual where the
         * layer changes the width. x may be layer_input: each element is read before it is written. */
        quantized_inputs(model, scratch.attended, rows, size, &scratch);
        const product_epilogue attention_output = {
            layer->out_bias, 0, {scratch.memory, layer->in_size == size ? layer_input : NULL}};
        int8_product(&layer->out, scratch.quantized, scratch.row_scales, rows, &attention_output, x);

        normed_inputs(model, x, layer->norm2_weight, layer->norm2_bias, rows, size, &scratch);
        const product_epilogue hidden_activation = {layer->w1_bias, 1, {NULL, NULL}};
        int8_product(&layer->w1, scratch.quantized, scratch.row_scales, rows, &hidden_activation, scratch.product);
        quantized_inputs(model, scratch.product, rows, hidden, &scratch);
        const product_epilogue feed_forward_residual = {layer->w2_bias, 0, {x, NULL}};
        int8_product(&layer->w2, scratch.quantized, scratch.row_scales, rows, &feed_forward_residual, x);
    }
}

/* All the encoder's layers over `batch` whole segments of `time` frames (segment b's first
 * lengths[b] its own), each frame attending over its segment's frames. input and x as
 * sanm_encode's; x's rows past a segment's frames are not its encoder's (nothing of theirs
 * reaches the segment's own rows). scratch_space: encode_scratch_floats(model, batch * time,
 * time, threads) floats. */
void sanm_encode_segments(const sanm_encoder *model, int64_t batch, int64_t time, const float *input, float *x,
                          const int64_t *lengths, int threads, float *scratch_space) {
    sanm_encode(model, batch, time, input, x, lengths, NULL, 0, threads, scratch_space);
}
