/* The compiled int8 product (tokenwise_int8's "compiled" kernel), included by the C passes
 * that run it between their own float work (decode_step.c, sanm_encoder.c); its functions are
 * static, so each library has its own copy.
 *
 * It follows tokenwise_int8's fbgemm layers: weights on -63..63 per output channel, each input
 * row divided by its largest magnitude and quantized to uint8 around 128 in steps of 2/255,
 * integer sums, scaled back per output and per row. On AVX2 a row's bytes and a weight row's
 * are multiplied in pairs into 16 bits (255 x 63 x 2 fits), then summed in 32 bits; the
 * products give fbgemm's bits (tests/kernels/test_tokenwise_int8.py compares them).
 *
 * Wherever the build has AVX2, a layer whose shape suits (outputs a multiple of 16, inputs of 4)
 * carries its weights in tile order (int8_tile_inputs; it and int8_product_uses_avx512_vnni are
 * the functions here not static: each library is asked on its own). Its sums run on AMX's tiles,
 * or a 64-byte row of a tile (4 inputs of 16 outputs) at a time against each input row's 4 bytes,
 * broadcast: on 512 bits with AVX-512 VNNI, on 256 with AVX-VNNI or AVX2's pair sums. Other
 * shapes run row by row. They are exact integer sums in every path, so the bits are the same. */

#ifndef TWOPASS_ASR_INT8_PRODUCT_H
#define TWOPASS_ASR_INT8_PRODUCT_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "row_magnitude.h"

#include <stdlib.h>

#include "amx_tiles.h"
#ifdef AMX_PRODUCTS
#define INT8_TILES 1
#endif

static const int32_t INPUT_ZERO_POINT = 128;
/* The bytes of inputs a block of rows may span: the block stays in the first-level cache while
 * every output's weights pass over it. */
#define ROW_BLOCK_BYTES 16384

/* An int8 linear layer without bias. scales[o]: output o's weight scale times the input
 * step; sums[o]: the sum of its weights, to take the input's zero point back out. A layer
 * has its weights in one of two orders: `weights` row by row, or (AMX, VNNI) `tiles`. */
typedef struct {
    const int8_t *weights; /* [outputs, inputs], or NULL with tiles */
    const float *scales;
    const int32_t *sums;
    int64_t outputs, inputs;
    /* [outputs / 16, inputs / 64, 16, 16, 4]: for each 16 outputs and 64 inputs, one AMX tile
     * of 16 rows, row i holding inputs 4i to 4i + 3 of each of the 16 outputs. Or NULL. */
    const int8_t *tiles;
} int8_layer;

/* What a product adds to its scaled sums while they are still in the first-level cache, in this
 * order: a bias per output, then ReLU, then the element at the same place of each addend (laid out
 * as the output; an addend may be the output itself, its old value then added). These are the
 * float operations of the passes over the output they replace, in their order, so the bits are
 * the same. */
typedef struct {
    const float *bias; /* or NULL */
    int relu;
    const float *addends[2]; /* NULL, or the second alone NULL, or neither */
} product_epilogue;

/* The row magnitudes by which quantize_row divides by multiplying: from 2^-90, above which the
 * remainder of no quotient of 2^-9 or more falls below float's normal range, to 2^126, below which
 * the reciprocal is normal. */
static const float SMALLEST_MULTIPLIED_SCALE = 0x1p-90f;
static const float LARGEST_MULTIPLIED_SCALE = 0x1p126f;

/* quantize_row's loop, `divide` a constant: each form its own vector loop. */
static inline __attribute__((always_inline)) void quantize_quotients(const float *row, int64_t columns, float scale,
                                                                     float inverse_step, int divide, uint8_t *out) {
    const float reciprocal = 1.0f / scale;
    for (int64_t c = 0; c < columns; ++c) {
        float quotient;
        if (divide) {
            quotient = row[c] / scale;
        } else {
            const float estimate = row[c] * reciprocal;
            quotient = fmaf(fmaf(-estimate, scale, row[c]), reciprocal, estimate);
        }
        float value = nearbyintf(fmaf(quotient, inverse_step, (float)INPUT_ZERO_POINT));
        /* The quotient is at least -1, so the value at least 0: only the top needs a clamp (a NaN
         * from a row with an infinity or NaN takes it too). Clamping both ends, or converting the
         * float to uint8 directly, compiled into mask operations slower than the rest of the loop. */
        value = value < 255.0f ? value : 255.0f;
        out[c] = (uint8_t)(int32_t)value;
    }
}

/* A row divided by its largest magnitude, in uint8 around INPUT_ZERO_POINT: fbgemm's rounding,
 * the quotient times the inverse step plus the zero point in one fused multiply-add, then to the
 * nearest integer (half to even). Rounding the product first differs where it lands within a
 * rounding of a half.
 *
 * A vector division was the larger part of the rest on AVX-512, so between the scales above each
 * quotient is the element times the scale's reciprocal, corrected once by the exact remainder of
 * that estimate (Markstein's step). That gives the correctly rounded quotient, the division's bits,
 * where the remainder is exact, as it is for every quotient of 2^-9 or more there; smaller ones
 * give the zero point either way. Other rows (tiny, huge, or not finite) are divided. */
static float quantize_row(const float *row, int64_t columns, float input_step, uint8_t *out) {
    const float scale = row_magnitude(row, columns);
    const float inverse_step = 1.0f / input_step;
    if (scale >= SMALLEST_MULTIPLIED_SCALE && scale <= LARGEST_MULTIPLIED_SCALE)
        quantize_quotients(row, columns, scale, inverse_step, 0, out);
    else
        quantize_quotients(row, columns, scale, inverse_step, 1, out);
    return scale;
}


#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INT8_DOT_512 1 /* ordered_product on 512 bits */
#endif
/* A 256-bit VNNI instruction: AVX-VNNI's, or AVX-512 VNNI's on 256 bits. */
#if defined(__AVXVNNI__)
#define DOT_256(acc, x, weights) _mm256_dpbusd_avx_epi32(acc, x, weights)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT_256(acc, x, weights) _mm256_dpbusd_epi32(acc, x, weights)
#endif

/* sums[2 r + j] = sum over c of inputs[r][c] * weights j [c], for `count` (1 to 4) input rows
 * `stride` apart and two weight rows: each weight row is read once for all the rows, each input
 * row once for both weight rows. With VNNI (AVX-VNNI, or AVX-512's on 256 bits) four bytes'
 * products are summed into 32 bits by one instruction; without it, in pairs into 16 bits (255 x
 * 63 x 2 fits) and then into 32. Exact integer sums either way. */
static inline __attribute__((always_inline)) void dot_block(const int8_t *first_weights,
                                                            const int8_t *second_weights, const uint8_t *inputs,
                                                            int64_t stride, int64_t columns, int count,
                                                            int32_t *sums) {
    int64_t c = 0;
    int32_t total[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#ifdef __AVX2__
    __m256i acc[4][2];
    for (int r = 0; r < 4; ++r)
        acc[r][0] = acc[r][1] = _mm256_setzero_si256();
#ifndef DOT_256
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (; c + 32 <= columns; c += 32) {
        _mm_prefetch((const char *)(first_weights + c + WEIGHT_PREFETCH_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(second_weights + c + WEIGHT_PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i first = _mm256_loadu_si256((const __m256i *)(first_weights + c));
        const __m256i second = _mm256_loadu_si256((const __m256i *)(second_weights + c));
        for (int r = 0; r < count; ++r) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(inputs + r * stride + c));
#ifdef DOT_256
            acc[r][0] = DOT_256(acc[r][0], x, first);
            acc[r][1] = DOT_256(acc[r][1], x, second);
#else
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, first), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, second), ones));
#endif
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

/* scale_sums with the epilogue's parts as arguments; each caller passes constant flags (has_bias,
 * relu, addend_count), so each form compiles to its own loop without branches. One loop over a
 * row's outputs reads each addend's element before writing the output's, so an addend may be the
 * output itself. */
static inline __attribute__((always_inline)) void scale_sums_and_finish(
    const int8_layer *layer, const int32_t *sums, int64_t stride, int64_t first, int64_t count, int64_t o,
    int64_t outputs, const float *row_scales, int has_bias, const float *bias, int relu, int addend_count,
    const float *first_addend, const float *second_addend, float *out) {
    for (int64_t i = 0; i < count; ++i) {
        const int64_t at = (first + i) * layer->outputs + o;
        const int32_t *row_sums = sums + i * stride;
        const float row_scale = row_scales[first + i];
#pragma omp simd
        for (int64_t j = 0; j < outputs; ++j) {
            float value = (float)(row_sums[j] - INPUT_ZERO_POINT * layer->sums[o + j]) * layer->scales[o + j]
                          * row_scale;
            if (has_bias)
                value += bias[o + j];
            if (relu)
                value = value > 0.0f ? value : 0.0f;
            if (addend_count > 0)
                value += first_addend[at + j];
            if (addend_count > 1)
                value += second_addend[at + j];
            out[at + j] = value;
        }
    }
}

/* out[r] for rows first to first + count - 1 of a block of sums (int32, `stride` a row, the
 * first one row `first`'s) and `outputs` outputs from o: the sums scaled back, then the
 * epilogue's operations (where there is one). */
static inline void scale_sums(const int8_layer *layer, const int32_t *sums, int64_t stride, int64_t first,
                              int64_t count, int64_t o, int64_t outputs, const float *row_scales,
                              const product_epilogue *epilogue, float *out) {
#define FINISH(has_bias, relu, addend_count)                                                                \
    scale_sums_and_finish(layer, sums, stride, first, count, o, outputs, row_scales, has_bias,             \
                          epilogue ? epilogue->bias : NULL, relu, addend_count,                             \
                          epilogue ? epilogue->addends[0] : NULL, epilogue ? epilogue->addends[1] : NULL, out)
    if (epilogue == NULL) {
        FINISH(0, 0, 0);
        return;
    }
    const int has_bias = epilogue->bias != NULL, relu = epilogue->relu;
    const int addend_count = epilogue->addends[0] == NULL ? 0 : epilogue->addends[1] == NULL ? 1 : 2;
    if (has_bias && !relu && addend_count == 0)
        FINISH(1, 0, 0);
    else if (has_bias && relu && addend_count == 0)
        FINISH(1, 1, 0);
    else if (has_bias && !relu && addend_count == 1)
        FINISH(1, 0, 1);
    else if (has_bias && !relu && addend_count == 2)
        FINISH(1, 0, 2);
    else /* the forms no pass uses, with their branches */
        FINISH(has_bias, relu, addend_count);
#undef FINISH
}

#define TILE_OUTPUTS 16 /* outputs of a weight tile */
#define TILE_INPUTS 64  /* inputs (bytes) of a weight tile's rows, and of an input tile's */
#define TILE_BYTES (TILE_OUTPUTS * TILE_INPUTS)

#ifdef INT8_TILES
/* A tile block's sums of int8_product, scaled back (tile_sums_finish). */
typedef struct {
    const int8_layer *layer;
    const float *row_scales;
    const product_epilogue *epilogue;
    float *out;
} tile_scaling;

static inline __attribute__((always_inline)) void scale_tile_sums(const void *context, const void *sums,
                                                                  int64_t start, int64_t r, int64_t end, int64_t o,
                                                                  int64_t width) {
    const tile_scaling *scaling = context;
    scale_sums(scaling->layer, (const int32_t *)sums + (r - start) * 32, 32, r, end - r, o, width,
               scaling->row_scales, scaling->epilogue, scaling->out);
}

/* int8_product on the layer's tiles (tile_product_rows). */
static void tile_product(const int8_layer *layer, const uint8_t *inputs, const float *row_scales, int64_t rows,
                         const product_epilogue *epilogue, float *out) {
    const tile_scaling scaling = {layer, row_scales, epilogue, out};
    tile_product_rows(inputs, layer->inputs, rows, (const uint8_t *)layer->tiles, layer->inputs / TILE_INPUTS,
                      layer->outputs / TILE_OUTPUTS, 0, scale_tile_sums, &scaling);
}
#endif

/* Tile order without AMX's tiles: a vector of ORDERED_LANES outputs' sums per row, each 4-input
 * group of a tile's row meeting a row's 4 inputs, broadcast, in one instruction per vector: VNNI
 * (AVX-512's, AVX-VNNI's) or AVX2's pair sums. No sums across lanes; ORDERED_BLOCK_ROWS rows at
 * a time in the registers there are (32 with AVX-512, 16 with AVX2). */
#if defined(INT8_DOT_512)
#define ORDERED_LANES 16
#define ORDERED_BLOCK_ROWS 8
typedef __m512i ordered_sums;
#define ORDERED_ZERO() _mm512_setzero_si512()
#define ORDERED_LOAD(bytes) _mm512_loadu_si512(bytes)
#define ORDERED_BROADCAST(quad) _mm512_set1_epi32(quad)
#define ORDERED_DOT(acc, x, weights) _mm512_dpbusd_epi32(acc, x, weights)
#define ORDERED_STORE(sums, acc) _mm512_storeu_si512(sums, acc)
#elif defined(__AVX2__)
#define ORDERED_LANES 8
#define ORDERED_BLOCK_ROWS 4
typedef __m256i ordered_sums;
#define ORDERED_ZERO() _mm256_setzero_si256()
#define ORDERED_LOAD(bytes) _mm256_loadu_si256((const __m256i *)(bytes))
#define ORDERED_BROADCAST(quad) _mm256_set1_epi32(quad)
#ifdef DOT_256
#define ORDERED_DOT(acc, x, weights) DOT_256(acc, x, weights)
#else
#define ORDERED_DOT(acc, x, weights) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, weights), _mm256_set1_epi16(1)))
#endif
#define ORDERED_STORE(sums, acc) _mm256_storeu_si256((__m256i *)(sums), acc)
#endif

#ifdef ORDERED_LANES
/* sums[r][j * ORDERED_LANES + l] (2 ORDERED_LANES a row) for `count` (1 to ORDERED_BLOCK_ROWS)
 * input rows of `inputs` bytes, `stride` bytes apart, and one or two (two_vectors) vectors of
 * outputs whose tile-ordered weights start at `first` and `second`. The groups that pad the last
 * tile are not read. */
static inline __attribute__((always_inline)) void ordered_block(const uint8_t *rows, int64_t inputs, int64_t stride,
                                                                int count, const int8_t *first, const int8_t *second,
                                                                int two_vectors, int32_t *sums) {
    ordered_sums acc[ORDERED_BLOCK_ROWS][2];
    for (int r = 0; r < count; ++r)
        acc[r][0] = acc[r][1] = ORDERED_ZERO();
    for (int64_t g = 0; g < inputs / 4; ++g) {
        _mm_prefetch((const char *)(first + 64 * g + WEIGHT_PREFETCH_BYTES), _MM_HINT_T0);
        const ordered_sums low = ORDERED_LOAD(first + 64 * g);
        const ordered_sums high = two_vectors ? ORDERED_LOAD(second + 64 * g) : low;
        /* 16 lanes: the second vector is the next tile's 16 outputs; 8: the same 64 bytes. */
        if (two_vectors && ORDERED_LANES == TILE_OUTPUTS)
            _mm_prefetch((const char *)(second + 64 * g + WEIGHT_PREFETCH_BYTES), _MM_HINT_T0);
        for (int r = 0; r < count; ++r) {
            int32_t quad;
            memcpy(&quad, rows + r * stride + 4 * g, sizeof quad);
            const ordered_sums x = ORDERED_BROADCAST(quad);
            acc[r][0] = ORDERED_DOT(acc[r][0], x, low);
            if (two_vectors)
                acc[r][1] = ORDERED_DOT(acc[r][1], x, high);
        }
    }
    for (int r = 0; r < count; ++r) {
        ORDERED_STORE(sums + r * 2 * ORDERED_LANES, acc[r][0]);
        if (two_vectors)
            ORDERED_STORE(sums + r * 2 * ORDERED_LANES + ORDERED_LANES, acc[r][1]);
    }
}

/* Where output o's weights start in a layer's tiles (o a multiple of ORDERED_LANES). */
static inline const int8_t *ordered_weights(const int8_layer *layer, int64_t steps, int64_t o) {
    return layer->tiles + o / TILE_OUTPUTS * steps * TILE_BYTES + o % TILE_OUTPUTS * 4;
}

/* int8_product on tile-ordered weights without AMX: a block of rows at a time (ROW_BLOCK_BYTES, as
 * int8_product), each two vectors of outputs of it ORDERED_BLOCK_ROWS rows at a time. */
static void ordered_product(const int8_layer *layer, const uint8_t *inputs, const float *row_scales, int64_t rows,
                            const product_epilogue *epilogue, float *out) {
    const int64_t k = layer->inputs, steps = (k + TILE_INPUTS - 1) / TILE_INPUTS;
    const int64_t vectors = layer->outputs / ORDERED_LANES;
    const int64_t block_rows = ROW_BLOCK_BYTES / k / ORDERED_BLOCK_ROWS * ORDERED_BLOCK_ROWS > ORDERED_BLOCK_ROWS
                                   ? ROW_BLOCK_BYTES / k / ORDERED_BLOCK_ROWS * ORDERED_BLOCK_ROWS
                                   : ORDERED_BLOCK_ROWS;
    for (int64_t start = 0; start < rows; start += block_rows) {
        const int64_t end = start + block_rows < rows ? start + block_rows : rows;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < (vectors + 1) / 2; ++pair) {
            const int two_vectors = 2 * pair + 1 < vectors;
            const int64_t o = 2 * pair * ORDERED_LANES;
            const int8_t *first = ordered_weights(layer, steps, o);
            const int8_t *second = two_vectors ? ordered_weights(layer, steps, o + ORDERED_LANES) : first;
            for (int64_t r = start; r < end; r += ORDERED_BLOCK_ROWS) {
                int32_t sums[ORDERED_BLOCK_ROWS * 2 * ORDERED_LANES];
                const int count = end - r < ORDERED_BLOCK_ROWS ? (int)(end - r) : ORDERED_BLOCK_ROWS;
#define ORDERED_CASE(n)                                                                   \
    case n: ordered_block(inputs + r * k, k, k, n, first, second, two_vectors, sums); break;
                switch (count) {
#if ORDERED_BLOCK_ROWS == 8
                    ORDERED_CASE(8) ORDERED_CASE(7) ORDERED_CASE(6) ORDERED_CASE(5)
#endif
                    ORDERED_CASE(4) ORDERED_CASE(3) ORDERED_CASE(2) ORDERED_CASE(1)
                }
#undef ORDERED_CASE
                scale_sums(layer, sums, 2 * ORDERED_LANES, r, count, o, (two_vectors ? 2 : 1) * ORDERED_LANES,
                           row_scales, epilogue, out);
            }
        }
    }
}
#endif

/* The multiple of inputs a layer needs to carry its weights in tile order in this build (as
 * `tiles`, padded with zeros to whole tiles): 4 (a group's inputs) wherever ordered_product runs
 * (AMX's tiles then run the layers of whole tiles where Linux permits them), else 0. */
int int8_tile_inputs(void) {
#ifdef ORDERED_LANES
    return 4;
#else
    return 0;
#endif
}

/* Whether this build's products use AVX-512 VNNI (and AMX's tiles where Linux grants them): the
 * int8 dot products cpu_features counts. */
int int8_product_uses_avx512_vnni(void) {
#ifdef INT8_DOT_512
    return 1;
#else
    return 0;
#endif
}

/* out[r] = layer(rows' quantized inputs) for `rows` rows, then the epilogue's operations (where
 * there is one), the outputs shared among the team's threads (called by every thread of a
 * parallel region) two at a time, a block of rows at a time (ROW_BLOCK_BYTES; rows streamed past
 * each pair of outputs came from the second level). */
static void int8_product(const int8_layer *layer, const uint8_t *inputs, const float *row_scales, int64_t rows,
                         const product_epilogue *epilogue, float *out) {
#ifdef INT8_TILES
    if (layer->tiles != NULL && layer->inputs % TILE_INPUTS == 0 && tiles_permitted()) {
        tile_product(layer, inputs, row_scales, rows, epilogue, out);
        return;
    }
#endif
#ifdef ORDERED_LANES
    if (layer->tiles != NULL) {
        ordered_product(layer, inputs, row_scales, rows, epilogue, out);
        return;
    }
#endif
    const int64_t n = layer->outputs, k = layer->inputs, pairs = (n + 1) / 2;
    const int64_t block = ROW_BLOCK_BYTES / k / 4 * 4 > 4 ? ROW_BLOCK_BYTES / k / 4 * 4 : 4;
    for (int64_t start = 0; start < rows; start += block) {
        const int64_t end = start + block < rows ? start + block : rows;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; ++pair) {
            /* An odd last output is paired with itself. */
            const int64_t o = 2 * pair;
            const int outputs = o + 1 < n ? 2 : 1;
            const int8_t *first = layer->weights + o * k, *second = first + (outputs - 1) * k;
            for (int64_t r = start; r < end; r += 4) {
                int32_t sums[8];
                const int count = end - r < 4 ? (int)(end - r) : 4;
                switch (count) {
                case 4: dot_block(first, second, inputs + r * k, k, k, 4, sums); break;
                case 3: dot_block(first, second, inputs + r * k, k, k, 3, sums); break;
                case 2: dot_block(first, second, inputs + r * k, k, k, 2, sums); break;
                default: dot_block(first, second, inputs + r * k, k, k, 1, sums); break;
                }
                scale_sums(layer, sums, 2, r, count, o, outputs, row_scales, epilogue, out);
            }
        }
    }
}

#endif
