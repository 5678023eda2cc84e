/* codec_lanes_base.c - the codec's lanes built for the build's baseline ISA (x86-64-v2: SSE4.2): one xmm a vector, 4 tokens a batch
 * (codec_lanes.h; chosen by codec_simd.c only where the CPU has it). */
#define LN 4
#define LANES_FN(name) kvg_lanes_##name##_base
#include "codec_lanes.h"
