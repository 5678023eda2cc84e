/* lanes.h - what the lane templates share (codec_lanes.h,
 * attention_lanes.h): the vector types of one build (LN fp32 lanes, one
 * native register), and moving rows in and out of lanes. Included by the
 * build files (lanes_v4.c, lanes_v3.c, lanes_base.c), each defining LN
 * and LANES_FN and setting its target ISA first. */
#ifndef KVG_LANES_H
#define KVG_LANES_H
#include <math.h>
#include <string.h>

#include "kvg.h"

#if !defined(LN) || !defined(LANES_FN)
#error "lanes.h is included by a build file that defines LN and LANES_FN"
#endif

typedef float   vf __attribute__((vector_size(4 * LN)));
typedef int32_t vi __attribute__((vector_size(4 * LN)));
typedef uint32_t vu __attribute__((vector_size(4 * LN)));
typedef double  vd __attribute__((vector_size(8 * LN)));
typedef int64_t vl __attribute__((vector_size(8 * LN)));

#define AI static inline __attribute__((always_inline))

/* gcc's __builtin_shuffle, which clang (the fuzz build, fuzz/) lacks:
 * there a two-source shuffle with constant indices is
 * __builtin_shufflevector and a one-source permute by variable indices
 * (taken modulo LN, as gcc does) a loop over the lanes. Only moves: the
 * bits are the same either way. */
#ifdef __clang__
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
AI vf permute_l(vf v, vi idx)
{
    vf r;
    for (int l = 0; l < LN; l++)
        r[l] = v[idx[l] & (LN - 1)];
    return r;
}
#else
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (vi){ __VA_ARGS__ })
#define permute_l(v, idx) __builtin_shuffle(v, idx)
#endif

/* In-register transpose of an LN x LN block: b[r][p] becomes b[p][r].
 * Stage s swaps bit s of the row index with bit s of the position (two
 * two-source shuffles with constant masks a row pair); all stages together
 * swap every bit, which is the transpose. Exact: only moves. */
#define TP_MK(p, s, hi) ((((p) & (s)) ? LN : 0) + (((p) & ~(s)) | ((hi) ? (s) : 0)))
#define TP_L4(s, hi) TP_MK(0, s, hi), TP_MK(1, s, hi), TP_MK(2, s, hi), TP_MK(3, s, hi)
#define TP_L8(s, hi) TP_L4(s, hi), TP_MK(4, s, hi), TP_MK(5, s, hi), TP_MK(6, s, hi), TP_MK(7, s, hi)
#define TP_L16(s, hi) TP_L8(s, hi), TP_MK(8, s, hi), TP_MK(9, s, hi), TP_MK(10, s, hi), TP_MK(11, s, hi), \
                      TP_MK(12, s, hi), TP_MK(13, s, hi), TP_MK(14, s, hi), TP_MK(15, s, hi)
#if LN == 16
#define TP_LIST TP_L16
#elif LN == 8
#define TP_LIST TP_L8
#elif LN == 4
#define TP_LIST TP_L4
#else
#error "LN must be 4, 8 or 16"
#endif
#define TP_STAGE(b, s)                                                                         \
    do {                                                                                       \
        for (int r0 = 0; r0 < LN; r0++) {                                                      \
            if (r0 & (s))                                                                      \
                continue;                                                                      \
            vf lo_ = (b)[r0], hi_ = (b)[r0 | (s)];                                             \
            (b)[r0] = SHUFFLE2(lo_, hi_, TP_LIST(s, 0));                      \
            (b)[r0 | (s)] = SHUFFLE2(lo_, hi_, TP_LIST(s, 1));                \
        }                                                                                      \
    } while (0)

AI void transpose_l(vf *b)
{
    TP_STAGE(b, 1);
    TP_STAGE(b, 2);
#if LN >= 8
    TP_STAGE(b, 4);
#endif
#if LN >= 16
    TP_STAGE(b, 8);
#endif
}

/* Rows src[m][d] (fp32, m <= LN; zeros past m) into lanes: x[i] holds
 * dimension i of the m rows, LN dims of LN rows a block transposed in
 * registers. */
AI void load_rows_l(const float *src, int d, int m, vf *x)
{
    for (int i0 = 0; i0 < d; i0 += LN) {
        vf *b = x + i0;
        for (int l = 0; l < LN; l++) {
            if (l < m)
                memcpy(&b[l], src + (size_t)l * (size_t)d + (size_t)i0, sizeof(vf));
            else
                b[l] = (vf){ 0 };
        }
        transpose_l(b);
    }
}

#endif /* KVG_LANES_H */
