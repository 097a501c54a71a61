/* The streaming FSMN-VAD's encoder (FunASR's FSMN: two input affine layers, FSMN blocks with a
 * memory of past frames only, two output affine layers, softmax) over a batched step in float32,
 * in one call (twopass_asr/vad/native_fsmn.py builds the model and calls it).
 *
 * The model is small (about 0.4 M weights) and a step is a few frames a stream, so as torch calls
 * (a dozen products and four convolutions from Python) a step cost some 4 ms of overhead for
 * microseconds of arithmetic. Each stream's frames depend on its own frames alone; the sums run in
 * another order than torch's, so scores agree with torch's to float rounding (the tests compare
 * them, and the segment events, with FunASR's). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_lanes.h"

/* y = x W^T (+ bias), the weights held transposed: weight_t [inputs, padded outputs], each input's
 * row padded with zeros to a multiple of DENSE_PADDING outputs; bias NULL: none. */
typedef struct {
    const float *weight_t, *bias;
    int64_t outputs, inputs;
} dense_layer;

/* The multiple of outputs weight_t's rows are padded to: a whole vector of floats on any build. */
#define DENSE_PADDING 16

int64_t fsmn_vad_dense_padding(void) { return DENSE_PADDING; }

/* One FSMN block (FunASR's BasicBlock): p = linear(x); m = p + the depthwise convolution of the
 * last `lorder` frames `lstride` apart (this one included); x = relu(affine(m)). */
typedef struct {
    dense_layer linear, affine;
    const float *taps; /* [lorder, projection]: taps[k][c] weighs frame t - (lorder - 1 - k) lstride */
    int64_t lorder, lstride;
} fsmn_block;

typedef struct {
    dense_layer in1, in2, out1, out2;
    int64_t blocks, widest, softmax;
    const fsmn_block *block;
} fsmn_vad;

/* Vectors of LANES outputs whose sums for four rows dense keeps in registers (16 of AVX-512's 32,
 * 8 of AVX2's 16). */
#if LANES == 16
#define VECTORS 4
#else
#define VECTORS 2
#endif

/* `rows` rows of x [rows, inputs] through the layer into y [rows, outputs]; relu: clamp at zero.
 * Four rows and VECTORS vectors of outputs at a time, their sums in lanes: each input of a row,
 * broadcast, meets a vector of outputs' weights, so no sum crosses lanes. A row's outputs come
 * from that row alone, each summed over the inputs in order. */
static void dense(const dense_layer *layer, const float *x, int64_t rows, int relu, float *y) {
    const int64_t n = layer->outputs, k = layer->inputs;
    const int64_t padded = (n + DENSE_PADDING - 1) / DENSE_PADDING * DENSE_PADDING;
    for (int64_t r = 0; r < rows; r += 4) {
        const int count = rows - r < 4 ? (int)(rows - r) : 4;
        const float *in[4];
        for (int i = 0; i < 4; ++i)
            in[i] = x + (r + (i < count ? i : 0)) * k;
        for (int64_t o = 0; o < padded; o += VECTORS * LANES) {
            const int vectors = (padded - o) / LANES < VECTORS ? (int)((padded - o) / LANES) : VECTORS;
            float_lanes sums[4][VECTORS];
            for (int i = 0; i < 4; ++i)
                for (int v = 0; v < VECTORS; ++v)
                    sums[i][v] = (float_lanes){0.0f};
            for (int64_t c = 0; c < k; ++c) {
                float_lanes weights[VECTORS];
                for (int v = 0; v < vectors; ++v)
                    memcpy(&weights[v], layer->weight_t + c * padded + o + v * LANES, sizeof weights[v]);
                for (int i = 0; i < 4; ++i)
                    for (int v = 0; v < vectors; ++v)
                        sums[i][v] += in[i][c] * weights[v];
            }
            for (int i = 0; i < count; ++i) {
                float row[VECTORS * LANES];
                memcpy(row, sums[i], sizeof row);
                const int64_t last = o + vectors * LANES < n ? o + vectors * LANES : n;
                for (int64_t j = o; j < last; ++j) {
                    float value = layer->bias ? row[j - o] + layer->bias[j] : row[j - o];
                    y[(r + i) * n + j] = relu && value < 0.0f ? 0.0f : value;
                }
            }
        }
    }
}

/* Frame h of a stream's FSMN history: its `span` past frames, then this step's `frames`. */
static inline const float *history_row(const float *history, const float *frames, int64_t span, int64_t width,
                                       int64_t h) {
    return h < span ? history + h * width : frames + (h - span) * width;
}

/* The number of floats fsmn_vad_encode's scratch_space must hold for `rows` rows. */
int64_t fsmn_vad_scratch_floats(const fsmn_vad *model, int64_t rows) { return 3 * rows * model->widest; }

/* All the encoder over a batched step of `batch` streams' `time` frames (stream b's first
 * lengths[b] its own): input [batch, time, in1's inputs]; out [batch, time, out2's outputs].
 * memory [blocks, batch, projection, (lorder - 1) lstride]: in, each stream's last projected
 * frames before this step (oldest first, channel by channel); out, the same after its last own
 * frame. scratch_space: fsmn_vad_scratch_floats(model, batch * time) floats. */
void fsmn_vad_encode(const fsmn_vad *model, int64_t batch, int64_t time, const float *input, const int64_t *lengths,
                     float *memory, float *out, float *scratch_space) {
    const int64_t rows = batch * time, widest = model->widest;
    float *x = scratch_space, *projected = x + rows * widest, *hidden = projected + rows * widest;
    dense(&model->in1, input, rows, 0, hidden);
    dense(&model->in2, hidden, rows, 1, x);
    for (int64_t l = 0; l < model->blocks; ++l) {
        const fsmn_block *block = &model->block[l];
        const int64_t width = block->linear.outputs, span = (block->lorder - 1) * block->lstride;
        dense(&block->linear, x, rows, 0, projected);
        for (int64_t b = 0; b < batch; ++b) {
            float *past = memory + (l * batch + b) * width * span;
            const float *frames = projected + b * time * width;
            /* The past frame by frame, so that each tap meets a row of channels, as this step's frames
             * are laid out: the channels then run in lanes, each summed over the taps in order. */
            float history[span > 0 ? span * width : 1], total[width];
            for (int64_t c = 0; c < width; ++c)
                for (int64_t j = 0; j < span; ++j)
                    history[j * width + c] = past[c * span + j];
            for (int64_t t = 0; t < time; ++t) {
                memset(total, 0, sizeof total);
                for (int64_t k = 0; k < block->lorder; ++k) {
                    const float *row = history_row(history, frames, span, width, t + k * block->lstride);
                    const float *tap = block->taps + k * width;
                    for (int64_t c = 0; c < width; ++c)
                        total[c] += tap[c] * row[c];
                }
                for (int64_t c = 0; c < width; ++c)
                    hidden[(b * time + t) * width + c] = frames[t * width + c] + total[c];
            }
            /* The history's `span` frames that end at the stream's last own frame. */
            for (int64_t j = 0; j < span; ++j) {
                const float *row = history_row(history, frames, span, width, lengths[b] + j);
                for (int64_t c = 0; c < width; ++c)
                    past[c * span + j] = row[c];
            }
        }
        dense(&block->affine, hidden, rows, 1, x);
    }
    dense(&model->out1, x, rows, 0, hidden);
    dense(&model->out2, hidden, rows, 0, out);
    if (!model->softmax)
        return;
    const int64_t pdfs = model->out2.outputs;
    for (int64_t r = 0; r < rows; ++r) {
        float *row = out + r * pdfs, largest = -INFINITY, total = 0.0f;
        for (int64_t c = 0; c < pdfs; ++c)
            largest = fmaxf(largest, row[c]);
        for (int64_t c = 0; c < pdfs; ++c) {
            row[c] = expf(row[c] - largest);
            total += row[c];
        }
        for (int64_t c = 0; c < pdfs; ++c)
            row[c] /= total;
    }
}
