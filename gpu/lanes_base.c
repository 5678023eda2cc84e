/* lanes_base.c - the lane templates built for the baseline ISA
 * (x86-64-v2: SSE4.2): one xmm a vector, 4 lanes (codec_lanes.h,
 * attention_lanes.h; codec_simd.c and attention_simd.c choose it where
 * nothing wider runs). */
#define LN 4
#define LANES_FN(name) kvg_lanes_##name##_base
#include "codec_lanes.h"
#include "attention_lanes.h"
