/* AMX's tile registers as the compiled products use them (int8_product.h, bf16_product.h):
 * eight tiles of 16 rows of 64 bytes, which Linux lends a process only once it has asked. The
 * products use them where the build has AMX's int8 and bf16 dot products both (AMX_PRODUCTS),
 * as every CPU with AMX has. Also the weights' prefetch distance, which every path shares. */

#ifndef TWOPASS_ASR_AMX_TILES_H
#define TWOPASS_ASR_AMX_TILES_H

/* How far ahead of every path of the products (int8 and bf16, tiles or vectors) the weights are
 * fetched: a step of one row streams every weight once from memory, and with the hardware's
 * prefetching alone the products ran slower, AMX's tile loads too (perf/RESULTS.md, sessions 22
 * and 40). A prefetch past the end of the weights is harmless. */
#define WEIGHT_PREFETCH_BYTES 2048

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define AMX_PRODUCTS 1

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TILE_ROWS 16
#define AMX_TILE_ROW_BYTES 64
#define AMX_TILE_OUTPUTS 16 /* a tile of sums: 16 outputs of 4 bytes a row */

/* Whether this process may use the tiles (asked once). */
static int tiles_permitted(void) {
    static volatile int state; /* 0 not asked yet, 1 granted, -1 refused */
    if (state == 0)
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
    return state > 0;
}

typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* All eight tiles 16 rows of 64 bytes. The products use tiles 0-3 for the sums of a 32 x 32
 * block (rows 0-15 x outputs 0-15, 0-15 x 16-31, 16-31 x 0-15, 16-31 x 16-31), 4-5 for its two
 * 16-row input tiles and 6-7 for its two weight tiles. */
static void configure_tiles(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = AMX_TILE_ROWS;
        config.bytes_per_row[t] = AMX_TILE_ROW_BYTES;
    }
    _tile_loadconfig(&config);
}

/* The dot product of tile c += tile a . tile b: bf16 pairs summed in float (bf16), or uint8
 * inputs by int8 weights in groups of 4 summed in int32. */
#define TILE_DOT(bf16, c, a, b)      \
    do {                             \
        if (bf16)                    \
            _tile_dpbf16ps(c, a, b); \
        else                         \
            _tile_dpbusd(c, a, b);   \
    } while (0)

/* sums [32, 32] (row stride 32; float for bf16, else int32) of input rows [16 or 32
 * (two_row_tiles)] `stride` bytes apart, and one or two (two_output_tiles) consecutive blocks of
 * 16 outputs' weight tiles, `steps` tiles a block: each step the next 64 bytes of the rows
 * against the next tile (16 rows of 64 bytes) of each block. */
static inline __attribute__((always_inline)) void tile_block(const uint8_t *inputs, int64_t stride,
                                                             int two_row_tiles, const uint8_t *tiles,
                                                             int two_output_tiles, int64_t steps, int bf16,
                                                             void *sums) {
    const int64_t tile_bytes = AMX_TILE_ROWS * AMX_TILE_ROW_BYTES;
    const uint8_t *second_tiles = tiles + steps * tile_bytes;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
        const uint8_t *ahead = tiles + s * tile_bytes + WEIGHT_PREFETCH_BYTES;
        for (int64_t line = 0; line < tile_bytes; line += AMX_TILE_ROW_BYTES) {
            _mm_prefetch((const char *)ahead + line, _MM_HINT_T0);
            if (two_output_tiles)
                _mm_prefetch((const char *)ahead + steps * tile_bytes + line, _MM_HINT_T0);
        }
        _tile_loadd(4, inputs + s * AMX_TILE_ROW_BYTES, stride);
        _tile_loadd(6, tiles + s * tile_bytes, AMX_TILE_ROW_BYTES);
        TILE_DOT(bf16, 0, 4, 6);
        if (two_row_tiles) {
            _tile_loadd(5, inputs + AMX_TILE_ROWS * stride + s * AMX_TILE_ROW_BYTES, stride);
            TILE_DOT(bf16, 2, 5, 6);
        }
        if (two_output_tiles) {
            _tile_loadd(7, second_tiles + s * tile_bytes, AMX_TILE_ROW_BYTES);
            TILE_DOT(bf16, 1, 4, 7);
            if (two_row_tiles)
                TILE_DOT(bf16, 3, 5, 7);
        }
    }
    /* 32 sums of 4 bytes a row, in either type. */
    uint8_t *block = sums;
    const int64_t row_bytes = 2 * AMX_TILE_ROW_BYTES;
    _tile_stored(0, block, row_bytes);
    _tile_stored(1, block + AMX_TILE_ROW_BYTES, row_bytes);
    _tile_stored(2, block + AMX_TILE_ROWS * row_bytes, row_bytes);
    _tile_stored(3, block + AMX_TILE_ROWS * row_bytes + AMX_TILE_ROW_BYTES, row_bytes);
}

/* What a tile product does with a block's sums (tile_block's, for input rows start.. of which
 * rows r..end-1 are the ones to keep, and outputs o..o+width-1): scale or copy them out. */
typedef void (*tile_sums_finish)(const void *context, const void *sums, int64_t start, int64_t r, int64_t end,
                                 int64_t o, int64_t width);

/* A product on AMX's tiles (called by every thread of a parallel region) in blocks of 32 input
 * rows (16 where fewer are left) by two 16-output blocks of tiles (`steps` tiles each, 1 KiB a
 * tile). In int8 each block of rows goes over all outputs: its inputs stay in the first-level
 * cache while the weights stream past, which ran faster than a pair of output blocks over all
 * rows. In bf16, whose weights take twice the bytes a product, the other way ran faster: each
 * pair's weight tiles are read from memory once, whatever the rows. A last short block of rows
 * is moved back to end at the last row (recomputing a few rows) rather than padded. Fewer than
 * 32 rows in all are copied into zeros of one block (16 rows, or 32 past 16): two 16-row blocks
 * would stream the weights twice. rows of `row_bytes` bytes each. */
static inline __attribute__((always_inline)) void tile_product_rows(const uint8_t *inputs, int64_t row_bytes,
                                                                    int64_t rows, const uint8_t *tiles,
                                                                    int64_t steps, int64_t output_blocks, int bf16,
                                                                    tile_sums_finish finish, const void *context) {
    const int two_row_tiles = rows > AMX_TILE_ROWS;
    const int64_t span = two_row_tiles ? 2 * AMX_TILE_ROWS : AMX_TILE_ROWS;
    const uint8_t *source = inputs;
    uint8_t *padded = NULL;
    if (rows < span) {
        padded = calloc((size_t)span, (size_t)row_bytes);
        if (padded == NULL)
            abort();
        memcpy(padded, inputs, (size_t)(rows * row_bytes));
        source = padded;
    }
    uint32_t sums[32 * 32]; /* int32 or float */
    configure_tiles();
    const int64_t block_bytes = steps * AMX_TILE_ROWS * AMX_TILE_ROW_BYTES, pairs = (output_blocks + 1) / 2;
/* The block of rows from r (moved back to end at the last row) by output blocks 2 pair and 2 pair + 1. */
#define TILE_PAIR(r, pair)                                                                                   \
    do {                                                                                                     \
        const int64_t start = rows - (r) < span && rows >= span ? rows - span : (r);                         \
        const int two_output_tiles = 2 * (pair) + 1 < output_blocks;                                         \
        tile_block(source + start * row_bytes, row_bytes, two_row_tiles, tiles + 2 * (pair) * block_bytes,   \
                   two_output_tiles, steps, bf16, sums);                                                     \
        finish(context, sums, start, (r), start + span < rows ? start + span : rows,                         \
               (pair) * 2 * AMX_TILE_OUTPUTS, (two_output_tiles ? 2 : 1) * AMX_TILE_OUTPUTS);                \
    } while (0)
    if (bf16) {
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; ++pair)
            for (int64_t r = 0; r < rows; r += span)
                TILE_PAIR(r, pair);
    } else {
        for (int64_t r = 0; r < rows; r += span) {
#pragma omp for schedule(static)
            for (int64_t pair = 0; pair < pairs; ++pair)
                TILE_PAIR(r, pair);
        }
    }
#undef TILE_PAIR
    _tile_release();
    free(padded);
}

#endif
#endif
