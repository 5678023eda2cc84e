/* score_avx512.c - the stage-1 asymmetric scan with AVX-512, chosen at run
 * time (kvg_score_pos); kvg_score_pos_ref (score_ref.c) stays the
 * definition and this gives its bits.
 *
 * Head_dim 128: a signature is two 64-bit words. The integer dot of the
 * int8 query with the +-1 signs comes from the query's bit planes, as the
 * CUDA kernel does: with q8 in two's complement, sum_{bit set} q8_i =
 * sum_b w_b popcount(plane_b & bits), w_b = 2^b (b < 7), -128 (b = 7), and
 * dot = 2 * that - sum_i q8_i: an exact integer. Eight tokens per step
 * (their words de-interleaved into two registers), VPOPCNTQ per plane,
 * then the reference's three float operations per query head, each one
 * IEEE operation ((float)dot * qscale, * scale, + bias), and the GQA
 * combination in head order: max_ps(v, acc) is the reference's
 * "v > acc ? v : acc" (equal or NaN: acc). Every query head of the group
 * is scored in the same pass over the signatures.
 */
#include <string.h>

#include "kvg.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define AVX512_SCAN __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512vpopcntdq,f16c")))

typedef struct planes {
    uint64_t p[8][2];               /* bit b of q8_i, word i / 64 */
    int64_t  qsum;
    float    qscale;
} planes;

static void make_planes(const kvg_query *q, planes *pl)
{
    memset(pl, 0, sizeof *pl);
    for (int i = 0; i < 128; i++) {
        unsigned u = (uint8_t)q->q8[i];
        for (int b = 0; b < 8; b++)
            pl->p[b][i / 64] |= (uint64_t)((u >> b) & 1u) << (i % 64);
        pl->qsum += q->q8[i];
    }
    pl->qscale = q->qscale;
}

/* Eight tokens at bits/scales (those under the masks; the others read as
 * zero and are not stored: lanes are independent, so a short group's
 * values are the full group's). */
AVX512_SCAN static inline __attribute__((always_inline)) void group8(const planes *pl, int n_q, const float *bias,
                                                                     kvg_combine comb, const uint8_t *bits,
                                                                     const uint16_t *scales, float *out, __mmask8 ka,
                                                                     __mmask8 kb, __mmask8 kt)
{
    const __m512i i0 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), i1 = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
    __m512i a = _mm512_maskz_loadu_epi64(ka, bits), b = _mm512_maskz_loadu_epi64(kb, bits + 64);
    __m512i w0 = _mm512_permutex2var_epi64(a, i0, b), w1 = _mm512_permutex2var_epi64(a, i1, b);
    __m256 sc = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(kt, scales));
    __m256 acc = _mm256_setzero_ps();
    for (int h = 0; h < n_q; h++) {
        __m512i s = _mm512_setzero_si512();
        for (int p = 0; p < 8; p++) {
            __m512i c = _mm512_add_epi64(
                _mm512_popcnt_epi64(_mm512_and_si512(w0, _mm512_set1_epi64((long long)pl[h].p[p][0]))),
                _mm512_popcnt_epi64(_mm512_and_si512(w1, _mm512_set1_epi64((long long)pl[h].p[p][1]))));
            s = p == 7 ? _mm512_sub_epi64(s, _mm512_slli_epi64(c, 7))
                       : _mm512_add_epi64(s, _mm512_slli_epi64(c, (unsigned)p));
        }
        __m512i dot = _mm512_sub_epi64(_mm512_slli_epi64(s, 1), _mm512_set1_epi64(pl[h].qsum));
        __m256 v = _mm256_mul_ps(_mm512_cvtepi64_ps(dot), _mm256_set1_ps(pl[h].qscale));
        v = _mm256_add_ps(_mm256_mul_ps(v, sc), _mm256_set1_ps(bias[h]));
        if (h == 0)
            acc = v;
        else if (comb == KVG_COMBINE_MAX)
            acc = _mm256_max_ps(v, acc);
        else
            acc = _mm256_add_ps(acc, v);
    }
    if (comb == KVG_COMBINE_MEAN && n_q > 1)
        acc = _mm256_div_ps(acc, _mm256_set1_ps((float)n_q));
    _mm256_mask_storeu_ps(out, kt, acc);
}

/* The n tokens of a run that share their biases: whole groups of eight,
 * then the last group under masks. */
AVX512_SCAN static void run8(const planes *pl, int n_q, const float *bias, kvg_combine comb, const uint8_t *bits,
                             const uint16_t *scales, size_t n, float *out)
{
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        group8(pl, n_q, bias, comb, bits + 16 * j, scales + j, out + j, 0xff, 0xff, 0xff);
    if (j < n) {
        unsigned m = (unsigned)(n - j);                                   /* 1..7 tokens */
        group8(pl, n_q, bias, comb, bits + 16 * j, scales + j, out + j,
               (__mmask8)(m >= 4 ? 0xff : (1u << (2 * m)) - 1),          /* 64-bit words of tokens 0..3 */
               (__mmask8)(m <= 4 ? 0 : (1u << (2 * (m - 4))) - 1), (__mmask8)((1u << m) - 1));
    }
}

/* cpuid as libgcc read it at start-up (no state of ours, no race). */
static int have_avx512(void)
{
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vpopcntdq");
}
#else
static int have_avx512(void) { return 0; }
#endif

const char *kvg_score_kernel(int head_dim)
{
    return head_dim == 128 && have_avx512() ? "avx512" : "scalar";
}

int kvg_score_pos(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *sig_bits,
                  const uint16_t *sig_scale, size_t n, uint64_t first_pos, const float *blk_bias, size_t nblk,
                  float *scores)
{
    int rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc || mode != KVG_SCORE_ASYM || qs[0].head_dim != 128 || !have_avx512() || n == 0 || !sig_bits ||
        !sig_scale || !scores ||
        (blk_bias && nblk < (first_pos + n - 1) / KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK + 1))
        return kvg_score_pos_ref(mode, comb, qs, n_q, sig_bits, sig_scale, n, first_pos, blk_bias, nblk, scores);
#if defined(__x86_64__) && defined(__GNUC__)
    planes pl[64];
    float bias[64];
    for (int h = 0; h < n_q; h++) {
        make_planes(&qs[h], &pl[h]);
        bias[h] = qs[h].bias;
    }
    /* runs of tokens sharing their biases: the whole range, or one block each */
    for (size_t j0 = 0, j1; j0 < n; j0 = j1) {
        j1 = n;
        if (blk_bias) {
            uint64_t p = first_pos + j0;
            for (int h = 0; h < n_q; h++)
                bias[h] = blk_bias[(size_t)h * nblk + (p / KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK)];
            if (n - j0 > KVG_SIG_BLOCK - p % KVG_SIG_BLOCK)
                j1 = j0 + (KVG_SIG_BLOCK - p % KVG_SIG_BLOCK);
        }
        run8(pl, n_q, bias, comb, sig_bits + 16 * j0, sig_scale + j0, j1 - j0, scores + j0);
    }
#endif
    return 0;
}
