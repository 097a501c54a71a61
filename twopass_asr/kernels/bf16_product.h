/* The compiled bf16 product, for decode_step.c's LLM with bf16 weights (llm_on_torch): each
 * float input row rounded to bf16 (to nearest, ties to even), its products with the weights
 * summed in float. Its functions are static, as int8_product.h's.
 *
 * Where the build has AVX-512 BF16, a layer whose shape suits (outputs a multiple of 16, inputs
 * of 2) carries its weights in tile order (bf16_products_native says so). Its sums run on AMX's
 * tiles where the build has them and Linux grants them (inputs a multiple of 32), else a 64-byte
 * row of a tile (2 inputs of 16 outputs) at a time against each input row's pair, broadcast, in
 * AVX-512 BF16's dot products. Other builds and shapes run row by row, widened to float. The
 * paths sum in different orders: they agree to float rounding, not bit for bit. */

#ifndef TWOPASS_ASR_BF16_PRODUCT_H
#define TWOPASS_ASR_BF16_PRODUCT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define BF16_DOT_512 1
#include <immintrin.h>
#ifdef AMX_PRODUCTS
#define BF16_TILES 1
#endif
#endif

#define BF16_TILE_OUTPUTS 16
#define BF16_TILE_INPUTS 32 /* a tile's 16 rows of 64 bytes: 16 pairs of inputs */
#define BF16_TILE_ELEMENTS (BF16_TILE_OUTPUTS * BF16_TILE_INPUTS)
/* As int8_product.h's: the bytes of inputs a block of rows may span to stay in the first-level
 * cache while the weights pass over it. */
#define BF16_ROW_BLOCK_BYTES 16384

/* A bf16 linear layer without bias, its weights in one of two orders. */
typedef struct {
    const uint16_t *weights; /* [outputs, inputs], or NULL with tiles */
    int64_t outputs, inputs;
    /* [outputs / 16, ceil(inputs / 32), 16, 16, 2]: for each 16 outputs and 32 inputs, one AMX
     * tile of 16 rows, row i holding inputs 2i and 2i + 1 of each of the 16 outputs (zeros past
     * the last input). Or NULL. */
    const uint16_t *tiles;
} bf16_layer;

static inline float bf16_to_float(uint16_t value) {
    const uint32_t bits = (uint32_t)value << 16;
    float widened;
    memcpy(&widened, &bits, sizeof widened);
    return widened;
}

/* A float row rounded to bf16: to nearest, ties to even (the carry of a mantissa all ones goes
 * into the exponent, as it should); NaNs stay NaNs. */
static void bf16_row(const float *row, int64_t columns, uint16_t *out) {
    for (int64_t c = 0; c < columns; ++c) {
        uint32_t bits;
        memcpy(&bits, row + c, sizeof bits);
        const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
        out[c] = (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded);
    }
}

#ifdef BF16_TILES
/* A tile block's sums of bf16_product, copied out (tile_sums_finish). */
typedef struct {
    int64_t outputs;
    float *out;
} tile_copy;

static inline __attribute__((always_inline)) void copy_tile_sums(const void *context, const void *sums,
                                                                 int64_t start, int64_t r, int64_t end, int64_t o,
                                                                 int64_t width) {
    const tile_copy *copy = context;
    for (int64_t row = r; row < end; ++row)
        memcpy(copy->out + row * copy->outputs + o, (const float *)sums + (row - start) * 32,
               (size_t)width * sizeof(float));
}

/* bf16_product on AMX's tiles (tile_product_rows). */
static void bf16_tile_product(const bf16_layer *layer, const uint16_t *inputs, int64_t rows, float *out) {
    const tile_copy copy = {layer->outputs, out};
    tile_product_rows((const uint8_t *)inputs, layer->inputs * (int64_t)sizeof(uint16_t), rows,
                      (const uint8_t *)layer->tiles, layer->inputs / BF16_TILE_INPUTS,
                      layer->outputs / BF16_TILE_OUTPUTS, 1, copy_tile_sums, &copy);
}
#endif

#ifdef BF16_DOT_512
#define BF16_BLOCK_ROWS 8

/* sums[r][j * 16 + l] (32 a row) for `count` (1 to BF16_BLOCK_ROWS) input rows of `inputs`
 * elements, `stride` apart, and one or two (two_vectors) vectors of 16 outputs whose
 * tile-ordered weights start at `first` and `second`. The pair padding the last tile is not
 * read. */
static inline __attribute__((always_inline)) void bf16_ordered_block(const uint16_t *rows, int64_t inputs,
                                                                     int64_t stride, int count, const uint16_t *first,
                                                                     const uint16_t *second, int two_vectors,
                                                                     float *sums) {
    __m512 acc[BF16_BLOCK_ROWS][2];
    for (int r = 0; r < count; ++r)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < inputs / 2; ++g) {
        _mm_prefetch((const char *)(first + 32 * g) + WEIGHT_PREFETCH_BYTES, _MM_HINT_T0);
        const __m512bh low = (__m512bh)_mm512_loadu_si512(first + 32 * g);
        __m512bh high = low;
        if (two_vectors) {
            _mm_prefetch((const char *)(second + 32 * g) + WEIGHT_PREFETCH_BYTES, _MM_HINT_T0);
            high = (__m512bh)_mm512_loadu_si512(second + 32 * g);
        }
        for (int r = 0; r < count; ++r) {
            int32_t pair;
            memcpy(&pair, rows + r * stride + 2 * g, sizeof pair);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, low);
            if (two_vectors)
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, high);
        }
    }
    for (int r = 0; r < count; ++r) {
        _mm512_storeu_ps(sums + r * 32, acc[r][0]);
        if (two_vectors)
            _mm512_storeu_ps(sums + r * 32 + 16, acc[r][1]);
    }
}

/* bf16_product on tile-ordered weights without AMX: a block of rows at a time
 * (BF16_ROW_BLOCK_BYTES), each two vectors of outputs of it BF16_BLOCK_ROWS rows at a time. */
static void bf16_ordered_product(const bf16_layer *layer, const uint16_t *inputs, int64_t rows, float *out) {
    const int64_t n = layer->outputs, k = layer->inputs, steps = (k + BF16_TILE_INPUTS - 1) / BF16_TILE_INPUTS;
    const int64_t vectors = n / BF16_TILE_OUTPUTS, fitting = BF16_ROW_BLOCK_BYTES / (2 * k);
    const int64_t block_rows = fitting > BF16_BLOCK_ROWS ? fitting / BF16_BLOCK_ROWS * BF16_BLOCK_ROWS
                                                         : BF16_BLOCK_ROWS;
    for (int64_t start = 0; start < rows; start += block_rows) {
        const int64_t end = start + block_rows < rows ? start + block_rows : rows;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < (vectors + 1) / 2; ++pair) {
            const int two_vectors = 2 * pair + 1 < vectors;
            const int64_t o = 2 * pair * BF16_TILE_OUTPUTS, width = (two_vectors ? 2 : 1) * BF16_TILE_OUTPUTS;
            const uint16_t *first = layer->tiles + 2 * pair * steps * BF16_TILE_ELEMENTS;
            const uint16_t *second = two_vectors ? first + steps * BF16_TILE_ELEMENTS : first;
            for (int64_t r = start; r < end; r += BF16_BLOCK_ROWS) {
                float sums[BF16_BLOCK_ROWS * 32];
                const int count = end - r < BF16_BLOCK_ROWS ? (int)(end - r) : BF16_BLOCK_ROWS;
#define BF16_CASE(c) \
    case c: bf16_ordered_block(inputs + r * k, k, k, c, first, second, two_vectors, sums); break;
                switch (count) {
                    BF16_CASE(8) BF16_CASE(7) BF16_CASE(6) BF16_CASE(5) BF16_CASE(4) BF16_CASE(3) BF16_CASE(2)
                    BF16_CASE(1)
                }
#undef BF16_CASE
                for (int i = 0; i < count; ++i)
                    memcpy(out + (r + i) * n + o, sums + i * 32, (size_t)width * sizeof(float));
            }
        }
    }
}

/* out [16] = outputs 16 block to 16 block + 15 of the layer (weights in tile order) over one bf16
 * input row, with the bits bf16_product gives them: on either of its native paths an output's sum
 * runs over the inputs in the same order whatever other outputs and rows it is computed with. Not
 * a worksharing call: each thread may compute blocks of its own. */
static void bf16_block_of_row(const bf16_layer *layer, const uint16_t *row, int64_t block, float out[16]) {
    const int64_t steps = (layer->inputs + BF16_TILE_INPUTS - 1) / BF16_TILE_INPUTS;
    const uint16_t *tiles = layer->tiles + block * steps * BF16_TILE_ELEMENTS;
#ifdef BF16_TILES
    if (layer->inputs % BF16_TILE_INPUTS == 0 && tiles_permitted()) {
        float sums[32 * 32];
        configure_tiles();
        /* A stride of 0 loads the row into every row of the input tile. */
        tile_block((const uint8_t *)row, 0, 0, (const uint8_t *)tiles, 0, steps, 1, sums);
        _tile_release();
        memcpy(out, sums, BF16_TILE_OUTPUTS * sizeof(float));
        return;
    }
#endif
    float sums[BF16_BLOCK_ROWS * 32];
    bf16_ordered_block(row, layer->inputs, layer->inputs, 1, tiles, tiles, 0, sums);
    memcpy(out, sums, BF16_TILE_OUTPUTS * sizeof(float));
}
#endif

/* Whether this build's bf16 products use the CPU's bf16 dot products (AVX-512 BF16, and AMX's
 * tiles where Linux grants them), and so take weights in tile order. */
int bf16_products_native(void) {
#ifdef BF16_DOT_512
    return 1;
#else
    return 0;
#endif
}

/* out [rows, outputs] = the layer over bf16 input rows [rows, inputs], the outputs shared among
 * the team's threads (called by every thread of a parallel region). */
static void bf16_product(const bf16_layer *layer, const uint16_t *inputs, int64_t rows, float *out) {
#ifdef BF16_TILES
    if (layer->tiles != NULL && layer->inputs % BF16_TILE_INPUTS == 0 && tiles_permitted()) {
        bf16_tile_product(layer, inputs, rows, out);
        return;
    }
#endif
#ifdef BF16_DOT_512
    if (layer->tiles != NULL) {
        bf16_ordered_product(layer, inputs, rows, out);
        return;
    }
#endif
    const int64_t n = layer->outputs, k = layer->inputs;
#pragma omp for schedule(static)
    for (int64_t o = 0; o < n; ++o) {
        const uint16_t *weights = layer->weights + o * k;
        for (int64_t r = 0; r < rows; ++r) {
            const uint16_t *row = inputs + r * k;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < k; ++c)
                sum += bf16_to_float(weights[c]) * bf16_to_float(row[c]);
            out[r * n + o] = sum;
        }
    }
}

#endif
