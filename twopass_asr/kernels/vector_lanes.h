/* LANES floats as one vector of the compiler's (GCC and Clang), for sums it must keep in registers:
 * as wide as the CPU's float vectors (a wider type went through memory on AVX2). Shared by the
 * native SANM layers (sanm_rows.h) and the VAD's encoder (fsmn_vad.c). */

#ifndef TWOPASS_ASR_VECTOR_LANES_H
#define TWOPASS_ASR_VECTOR_LANES_H

#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
typedef float float_lanes __attribute__((vector_size(LANES * sizeof(float))));

#endif
