/* lanes_v3.c - the lane templates built for x86-64-v3 (AVX2): one ymm a
 * vector, 8 lanes (codec_lanes.h, attention_lanes.h; codec_simd.c and
 * attention_simd.c choose this build only where the CPU has it). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("arch=x86-64-v3")
#elif defined(__x86_64__) && defined(__clang__)   /* the fuzz build (fuzz/): x86-64-v3's features */
#pragma clang attribute push(__attribute__((target("avx2,bmi,bmi2,f16c,fma,lzcnt,movbe"))), apply_to = function)
#endif
#define LN 8
#define LANES_FN(name) kvg_lanes_##name##_v3
#include "codec_lanes.h"
#include "attention_lanes.h"
#if defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#endif
