/* The streaming Paraformer's SANM decoder layers in int8, all of them in one call per batched
 * step: the feed-forward blocks, each layer's causal FSMN over the stream's previous tokens, the
 * cross-attention over the stream's encoder frames (and their look-back), the residual
 * connections, and the feed-forward-only layers after them (FunASR's decoders3); the int8
 * products are int8_product.h's (fbgemm's bits). twopass_asr/first_pass/native_decoder.py
 * builds the model and calls it; the output norm and layer stay in torch.
 *
 * As in sanm_encoder.c, a stream's rows are computed from its own rows alone (a stream gets the
 * same bits alone or batched), and the float work is torch's in another summation order, the
 * attention's multiply-adds fused. */

#include "sanm_rows.h"

/* One pre-norm SANM decoder layer (FunASR's DecoderLayerSANM) with its linear layers in int8:
 * x + FSMN(h) + h with h = norm2(feed_forward(norm1(x))), then x + out(attention(q(norm3(x)))
 * over kv(encoder frames)). A feed-forward-only layer (decoders3) has no FSMN and no attention:
 * feed_forward(norm1(x)), no residual. feed_forward: w2(ffn_norm(relu(w1 x + w1_bias))). */
typedef struct {
    const float *norm1_weight, *norm1_bias, *ffn_norm_weight, *ffn_norm_bias;
    const float *norm2_weight, *norm2_bias, *norm3_weight, *norm3_bias;
    int8_layer w1, w2, q, kv, out;
    const float *w1_bias, *q_bias, *kv_bias, *out_bias;
    const float *fsmn_taps; /* [size, fsmn_memory + 1] */
    int64_t attends;        /* 0: a feed-forward-only layer; the fields after w2 unused */
} sanm_decoder_layer;

typedef struct {
    int64_t layers, size, heads, head_dim, hidden, fsmn_memory;
    float norm_eps, input_step;
    const sanm_decoder_layer *layer;
} sanm_decoder;

/* Space for one step (all float unless said), in one buffer the caller allocates
 * (decode_scratch_floats) and lay_out_scratch divides. */
typedef struct {
    float *normed;       /* [tokens, hidden] */
    float *row_scales;   /* [max(tokens, frames)] */
    float *hidden;       /* [tokens, hidden] */
    float *h;            /* [tokens, size] the feed-forward block's output */
    float *q;            /* [tokens, size] */
    float *kv;           /* [frames, 2 size] */
    float *attended;     /* [tokens, size] */
    float *frame_scales; /* [frames] */
    float *attention;    /* [attention_scratch_floats(keys, head_dim)] */
    uint8_t *quantized;  /* [tokens, hidden] */
    uint8_t *frames;     /* [frames, size] the encoder frames quantized once for every layer */
} decode_scratch;

static int64_t lay_out_scratch(const sanm_decoder *model, int64_t tokens, int64_t frames, int64_t keys,
                               float *base, decode_scratch *scratch) {
    const int64_t size = model->size, hidden = model->hidden;
    const int64_t widest = hidden > size ? hidden : size;
    const int64_t sizes[9] = {tokens * widest, tokens > frames ? tokens : frames, tokens * widest, tokens * size,
                              tokens * size, frames * 2 * size, tokens * size, frames,
                              attention_scratch_floats(keys, model->head_dim)};
    float **parts[9] = {&scratch->normed, &scratch->row_scales, &scratch->hidden, &scratch->h, &scratch->q,
                        &scratch->kv, &scratch->attended, &scratch->frame_scales, &scratch->attention};
    int64_t used = 0;
    for (int i = 0; i < 9; ++i) {
        if (base)
            *parts[i] = base + used;
        used += sizes[i];
    }
    const int64_t bytes[2] = {tokens * widest, frames * size};
    uint8_t **byte_parts[2] = {&scratch->quantized, &scratch->frames};
    for (int i = 0; i < 2; ++i) {
        if (base)
            *byte_parts[i] = (uint8_t *)(base + used);
        used += (bytes[i] + (int64_t)sizeof(float) - 1) / (int64_t)sizeof(float);
    }
    return used;
}

/* The number of floats sanm_decode's scratch_space must hold for `tokens` token rows, `frames`
 * encoder frame rows and `keys` keys a stream attends over at most. */
int64_t decode_scratch_floats(const sanm_decoder *model, int64_t tokens, int64_t frames, int64_t keys) {
    decode_scratch unused;
    return lay_out_scratch(model, tokens, frames, keys, NULL, &unused);
}

/* h = w2(ffn_norm(relu(w1(norm1(x)) + w1_bias))) over `rows` rows; h may be x (read before h is
 * written). */
static void feed_forward(const sanm_decoder *model, const sanm_decoder_layer *layer, const float *x, int64_t rows,
                         decode_scratch *scratch, float *h) {
    const int64_t size = model->size, hidden = model->hidden;
    normed_rows(x, layer->norm1_weight, layer->norm1_bias, rows, size, model->norm_eps, model->input_step,
                scratch->normed, scratch->row_scales, scratch->quantized);
    const product_epilogue hidden_activation = {layer->w1_bias, 1, {NULL, NULL}};
    int8_product(&layer->w1, scratch->quantized, scratch->row_scales, rows, &hidden_activation, scratch->hidden);
    normed_rows(scratch->hidden, layer->ffn_norm_weight, layer->ffn_norm_bias, rows, hidden, model->norm_eps,
                model->input_step, scratch->normed, scratch->row_scales, scratch->quantized);
    int8_product(&layer->w2, scratch->quantized, scratch->row_scales, rows, NULL, h);
}

/* x += FSMN(h) + h for each stream's rows. fsmn_states[b]: stream b's [size, fsmn_memory] last
 * FSMN inputs of this layer before the step, left holding the last fsmn_memory of them and its
 * token_counts[b] rows of h. */
static void fsmn_block(const sanm_decoder *model, const sanm_decoder_layer *layer, int64_t batch, int64_t tokens,
                       const int64_t *token_counts, float *const *fsmn_states, decode_scratch *scratch,
                       float *x) {
    const int64_t size = model->size, memory = model->fsmn_memory, width = memory + 1;
    float inputs[memory + tokens];
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t c = 0; c < size; ++c) {
            float *state = fsmn_states[b] + c * memory;
            memcpy(inputs, state, (size_t)memory * sizeof(float));
            for (int64_t t = 0; t < tokens; ++t)
                inputs[memory + t] = scratch->h[(b * tokens + t) * size + c];
            const float *taps = layer->fsmn_taps + c * width;
            for (int64_t t = 0; t < tokens; ++t) {
                float total = 0.0f;
                for (int64_t k = 0; k < width; ++k)
                    total += taps[k] * inputs[t + k];
                const int64_t i = (b * tokens + t) * size + c;
                x[i] = x[i] + (total + scratch->h[i]);
            }
            memcpy(state, inputs + token_counts[b], (size_t)memory * sizeof(float));
        }
}

/* Each stream's tokens (token_counts[b] of them) attending over its keys: its look-back
 * (look_back[b]'s for attending layer `layer`, none where look_back is NULL) and its first
 * lengths[b] frames of this step, whose keys and values are read where the product wrote them;
 * the look-back then takes the frames it keeps. Rows past a stream's tokens get zeros. `keys`
 * bounds history + time over the streams. */
static void cross_attend(const sanm_decoder *model, int64_t layer, int64_t batch, int64_t tokens, int64_t time,
                         const int64_t *token_counts, const int64_t *lengths, const stream_look_back *look_back,
                         int64_t keys, decode_scratch *scratch) {
    const int64_t size = model->size, heads = model->heads, head_dim = model->head_dim;
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < heads; ++h) {
            const float *kv = scratch->kv + b * time * 2 * size + h * head_dim;
            attend_head(look_back && look_back[b].keys ? &look_back[b] : NULL, layer, heads, h,
                        scratch->q + b * tokens * size + h * head_dim, size, token_counts[b], tokens, kv, 2 * size,
                        kv + size, 2 * size, lengths[b], head_dim, keys, scratch->attention,
                        scratch->attended + b * tokens * size + h * head_dim, size);
        }
}

/* All the decoder's layers over a batched step: x [batch, tokens, size], stream b's first
 * token_counts[b] rows its own (in: the acoustic embeddings; out: the last layer's output).
 * frames [batch, time, size]: the encoder's output, stream b's first lengths[b] its own.
 * fsmn_states[b]: stream b's [attending layers, size, fsmn_memory] last FSMN inputs, updated in
 * place (fsmn_block). look_back: each stream's cross-attention look-back over the attending layers
 * (its buffers updated in place), or NULL where no stream has one or keeps one; history: the
 * largest of their histories (0 without). scratch_space: decode_scratch_floats(model, batch *
 * tokens, batch * time, history + time). */
void sanm_decode(const sanm_decoder *model, int64_t batch, int64_t tokens, float *x, const int64_t *token_counts,
                 int64_t time, const float *frames, const int64_t *lengths, float *const *fsmn_states,
                 const stream_look_back *look_back, int64_t history, float *scratch_space) {
    const int64_t rows = batch * tokens, frame_rows = batch * time, size = model->size;
    const int64_t layer_fsmn = size * model->fsmn_memory;
    float *layer_states[batch];
    decode_scratch scratch = {0};
    lay_out_scratch(model, rows, frame_rows, history + time, scratch_space, &scratch);
    quantized_rows(frames, frame_rows, size, model->input_step, scratch.frame_scales, scratch.frames);
    int64_t attending = 0;
    for (int64_t l = 0; l < model->layers; ++l) {
        const sanm_decoder_layer *layer = &model->layer[l];
        if (!layer->attends) {
            feed_forward(model, layer, x, rows, &scratch, x);
            continue;
        }
        feed_forward(model, layer, x, rows, &scratch, scratch.h);
        for (int64_t r = 0; r < rows; ++r)
            layer_norm(scratch.h + r * size, layer->norm2_weight, layer->norm2_bias, size, model->norm_eps,
                       scratch.h + r * size);
        for (int64_t b = 0; b < batch; ++b)
            layer_states[b] = fsmn_states[b] + attending * layer_fsmn;
        fsmn_block(model, layer, batch, tokens, token_counts, layer_states, &scratch, x);

        normed_rows(x, layer->norm3_weight, layer->norm3_bias, rows, size, model->norm_eps, model->input_step,
                    scratch.normed, scratch.row_scales, scratch.quantized);
        const product_epilogue q_bias = {layer->q_bias, 0, {NULL, NULL}}, kv_bias = {layer->kv_bias, 0, {NULL, NULL}};
        int8_product(&layer->q, scratch.quantized, scratch.row_scales, rows, &q_bias, scratch.q);
        int8_product(&layer->kv, scratch.frames, scratch.frame_scales, frame_rows, &kv_bias, scratch.kv);
        cross_attend(model, attending, batch, tokens, time, token_counts, lengths, look_back, history + time,
                     &scratch);

        quantized_rows(scratch.attended, rows, size, model->input_step, scratch.row_scales, scratch.quantized);
        const product_epilogue attention_residual = {layer->out_bias, 0, {x, NULL}};
        int8_product(&layer->out, scratch.quantized, scratch.row_scales, rows, &attention_residual, x);
        ++attending;
    }
}
