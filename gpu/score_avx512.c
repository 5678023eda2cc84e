/* score_avx512.c - the stage-1 asymmetric scan with AVX-512, chosen at run
 * time (kvg_score_pos); kvg_score_pos_ref (score_ref.c) stays the
 * definition and this gives its bits.
 *
 * A signature is W = head_dim / 64 words of 64 bits (1, 2 or 4: head_dim
 * 64, 128, 256; each width its own specialized loop). The integer dot of the
 * int8 query with the +-1 signs comes from the query's bit planes, as the
 * CUDA kernel does: with q8 in two's complement, sum_{bit set} q8_i =
 * sum_b w_b popcount(plane_b & bits), w_b = 2^b (b < 7), -128 (b = 7), and
 * dot = 2 * that - sum_i q8_i: an exact integer. Eight tokens per step
 * (word k of each in register k: loaded as is at W = 1, de-interleaved by
 * two permutes at W = 2, gathered at W = 4), VPOPCNTQ per plane and word,
 * then the reference's three float operations per query head, each one
 * IEEE operation ((float)dot * qscale, * scale, + bias), and the GQA
 * combination in head order: max_ps(v, acc) is the reference's
 * "v > acc ? v : acc" (equal or NaN: acc). Every query head of the group
 * is scored in the same pass over the signatures.
 */
#include <errno.h>
#include <string.h>

#include "kvg.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define AVX512_SCAN __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512vpopcntdq,f16c")))

typedef struct planes {
    uint64_t p[8][4];               /* bit b of q8_i, word i / 64 */
    int64_t  qsum;
    float    qscale;
} planes;

/* The bit planes of each query: plane b of 64 int8s is the mask of the
 * bytes whose bit b is set (one VPTESTMB). */
AVX512_SCAN static void make_planes(const kvg_query *q, planes *pl)
{
    int W = q->head_dim / 64;
    for (int w = 0; w < W; w++) {
        __m512i v = _mm512_loadu_si512(q->q8 + 64 * w);
        for (int b = 0; b < 8; b++)
            pl->p[b][w] = _mm512_test_epi8_mask(v, _mm512_set1_epi8((char)(1u << b)));
    }
    int64_t sum = 0;
    for (int i = 0; i < q->head_dim; i++)
        sum += q->q8[i];
    pl->qsum = sum;
    pl->qscale = q->qscale;
}

/* Eight tokens at bits/scales (those under the mask kt; the others read
 * as zero and are not stored: lanes are independent, so a short group's
 * values are the full group's), W words each. Query h's bias: bias[h] for
 * all eight, or with item biases (ib) the eight at ib + h * ibs. */
AVX512_SCAN static inline __attribute__((always_inline)) void group8(const planes *pl, int n_q, const float *bias,
                                                                     const float *ib, size_t ibs, kvg_combine comb,
                                                                     const uint8_t *bits, const uint16_t *scales,
                                                                     float *out, __mmask8 kt, int W)
{
    __m512i wv[4];
    if (W == 1) {
        wv[0] = _mm512_maskz_loadu_epi64(kt, bits);
    } else if (W == 2) {
        unsigned m = (unsigned)__builtin_popcount(kt);               /* kt is the low m bits */
        __mmask8 ka = (__mmask8)(m >= 4 ? 0xff : (1u << (2 * m)) - 1);   /* the 64-bit words of tokens 0..3 */
        __mmask8 kb = (__mmask8)(m <= 4 ? 0 : (1u << (2 * (m - 4))) - 1);
        const __m512i i0 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
        const __m512i i1 = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
        __m512i a = _mm512_maskz_loadu_epi64(ka, bits), b = _mm512_maskz_loadu_epi64(kb, bits + 64);
        wv[0] = _mm512_permutex2var_epi64(a, i0, b);
        wv[1] = _mm512_permutex2var_epi64(a, i1, b);
    } else {
        const __m512i idx = _mm512_setr_epi64(0, 4, 8, 12, 16, 20, 24, 28);
        for (int k = 0; k < 4; k++)
            wv[k] = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), kt,
                                                _mm512_add_epi64(idx, _mm512_set1_epi64(k)), (const void *)bits, 8);
    }
    __m256 sc = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(kt, scales));
    __m256 acc = _mm256_setzero_ps();
    for (int h = 0; h < n_q; h++) {
        __m512i s = _mm512_setzero_si512();
        for (int p = 0; p < 8; p++) {
            __m512i c = _mm512_popcnt_epi64(_mm512_and_si512(wv[0], _mm512_set1_epi64((long long)pl[h].p[p][0])));
            for (int k = 1; k < W; k++) {
                __m512i pk = _mm512_set1_epi64((long long)pl[h].p[p][k]);
                c = _mm512_add_epi64(c, _mm512_popcnt_epi64(_mm512_and_si512(wv[k], pk)));
            }
            s = p == 7 ? _mm512_sub_epi64(s, _mm512_slli_epi64(c, 7))
                       : _mm512_add_epi64(s, _mm512_slli_epi64(c, (unsigned)p));
        }
        __m512i dot = _mm512_sub_epi64(_mm512_slli_epi64(s, 1), _mm512_set1_epi64(pl[h].qsum));
        __m256 v = _mm256_mul_ps(_mm512_cvtepi64_ps(dot), _mm256_set1_ps(pl[h].qscale));
        v = _mm256_add_ps(_mm256_mul_ps(v, sc), ib ? _mm256_maskz_loadu_ps(kt, ib + (size_t)h * ibs)
                                                    : _mm256_set1_ps(bias[h]));
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

/* The n tokens of a run that share their biases (or carry their own:
 * ib, ibs as in group8): whole groups of eight, then the last group
 * under masks. */
AVX512_SCAN static inline __attribute__((always_inline)) void run8_w(const planes *pl, int n_q, const float *bias,
                                                                      const float *ib, size_t ibs, kvg_combine comb,
                                                                      const uint8_t *bits, const uint16_t *scales,
                                                                      size_t n, float *out, int W)
{
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        group8(pl, n_q, bias, ib ? ib + j : NULL, ibs, comb, bits + 8 * (size_t)W * j, scales + j, out + j, 0xff, W);
    if (j < n)                                                            /* 1..7 tokens */
        group8(pl, n_q, bias, ib ? ib + j : NULL, ibs, comb, bits + 8 * (size_t)W * j, scales + j, out + j,
               (__mmask8)((1u << (n - j)) - 1), W);
}

/* run8_w for head_dim 64, 128 or 256 (W = 1, 2, 4), each specialized. */
AVX512_SCAN static void run8(const planes *pl, int n_q, const float *bias, const float *ib, size_t ibs,
                             kvg_combine comb, const uint8_t *bits, const uint16_t *scales, size_t n, float *out,
                             int W)
{
    if (W == 1)
        run8_w(pl, n_q, bias, ib, ibs, comb, bits, scales, n, out, 1);
    else if (W == 2)
        run8_w(pl, n_q, bias, ib, ibs, comb, bits, scales, n, out, 2);
    else
        run8_w(pl, n_q, bias, ib, ibs, comb, bits, scales, n, out, 4);
}

/* Tokens [j0, j0 + n) of an array whose index 0 is at first_pos, scores
 * into out[n]: runs of tokens sharing their biases (the whole range, or
 * one block each). */
AVX512_SCAN static void scan(const planes *pl, int n_q, const kvg_query *qs, kvg_combine comb, const uint8_t *bits,
                             const uint16_t *scales, uint64_t first_pos, size_t j0, size_t n, const float *blk_bias,
                             size_t nblk, float *out)
{
    float bias[64];
    for (int h = 0; h < n_q; h++)
        bias[h] = qs[h].bias;
    for (size_t a = j0, e = j0 + n, b; a < e; a = b) {
        b = e;
        if (blk_bias) {
            uint64_t p = first_pos + a;
            for (int h = 0; h < n_q; h++)
                bias[h] = blk_bias[(size_t)h * nblk + (p / KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK)];
            if (e - a > KVG_SIG_BLOCK - p % KVG_SIG_BLOCK)
                b = a + (KVG_SIG_BLOCK - p % KVG_SIG_BLOCK);
        }
        run8(pl, n_q, bias, NULL, 0, comb, bits + (size_t)qs[0].head_dim / 8 * a, scales + a, b - a, out + (a - j0),
             qs[0].head_dim / 64);
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
    return (head_dim == 64 || head_dim == 128 || head_dim == 256) && have_avx512() ? "avx512" : "scalar";
}

/* Whether the AVX-512 scan serves these arguments (else the reference). */
static int fast(kvg_score_mode mode, const kvg_query *qs, const uint8_t *sig_bits, const uint16_t *sig_scale,
                const float *scores)
{
    int d = qs[0].head_dim;
    return mode == KVG_SCORE_ASYM && (d == 64 || d == 128 || d == 256) && sig_bits && sig_scale && scores &&
           have_avx512();
}

int kvg_score_pos(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *sig_bits,
                  const uint16_t *sig_scale, size_t n, uint64_t first_pos, const float *blk_bias, size_t nblk,
                  float *scores)
{
    int rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc || n == 0 || !fast(mode, qs, sig_bits, sig_scale, scores) ||
        (blk_bias && nblk < kvg_blocks_of(first_pos, n)))
        return kvg_score_pos_ref(mode, comb, qs, n_q, sig_bits, sig_scale, n, first_pos, blk_bias, nblk, scores);
#if defined(__x86_64__) && defined(__GNUC__)
    planes pl[64];
    for (int h = 0; h < n_q; h++)
        make_planes(&qs[h], &pl[h]);
    scan(pl, n_q, qs, comb, sig_bits, sig_scale, first_pos, 0, n, blk_bias, nblk, scores);
#endif
    return 0;
}

int kvg_score_runs_check(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, uint64_t first_pos,
                         const uint64_t *runs, size_t nr, const float *blk_bias, size_t nblk, uint64_t *end)
{
    *end = 0;
    int rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc)
        return rc;
    if (nr && !runs)
        return -EINVAL;
    for (size_t r = 0; r < nr; r++)
        if (runs[2 * r + 1] && runs[2 * r] + runs[2 * r + 1] > *end)
            *end = runs[2 * r] + runs[2 * r + 1];
    if (blk_bias && *end && nblk < kvg_blocks_of(first_pos, *end))
        return -EINVAL;
    return 0;
}

int kvg_score_runs(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *sig_bits,
                   const uint16_t *sig_scale, uint64_t first_pos, const uint64_t *runs, size_t nr,
                   const float *blk_bias, size_t nblk, float *scores)
{
    uint64_t end;
    int rc = kvg_score_runs_check(mode, comb, qs, n_q, first_pos, runs, nr, blk_bias, nblk, &end);
    if (rc || !end)
        return rc;
    if (!fast(mode, qs, sig_bits, sig_scale, scores)) {
        size_t o = 0;
        for (size_t r = 0; r < nr; r++) {
            uint64_t a = runs[2 * r], n = runs[2 * r + 1], db = (first_pos + a) / KVG_SIG_BLOCK -
                                                                 first_pos / KVG_SIG_BLOCK;
            if (n && (rc = kvg_score_pos_ref(mode, comb, qs, n_q, sig_bits + a * (size_t)(qs[0].head_dim / 8),
                                             sig_scale ? sig_scale + a : NULL, n, first_pos + a,
                                             blk_bias ? blk_bias + db : NULL, nblk, scores + o)))
                return rc;
            o += n;
        }
        return 0;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    planes pl[64];
    for (int h = 0; h < n_q; h++)
        make_planes(&qs[h], &pl[h]);
    size_t o = 0;
    for (size_t r = 0; r < nr; r++) {
        scan(pl, n_q, qs, comb, sig_bits, sig_scale, first_pos, runs[2 * r], runs[2 * r + 1], blk_bias, nblk,
             scores + o);
        o += runs[2 * r + 1];
    }
#endif
    return 0;
}

int kvg_score_items(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *sig_bits,
                    const uint16_t *sig_scale, size_t n, const float *item_bias, float *scores)
{
    int rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc || n == 0 || !fast(mode, qs, sig_bits, sig_scale, scores))
        return kvg_score_items_ref(mode, comb, qs, n_q, sig_bits, sig_scale, n, item_bias, scores);
#if defined(__x86_64__) && defined(__GNUC__)
    planes pl[64];
    float bias[64];
    for (int h = 0; h < n_q; h++) {
        make_planes(&qs[h], &pl[h]);
        bias[h] = qs[h].bias;
    }
    run8(pl, n_q, bias, item_bias, n, comb, sig_bits, sig_scale, n, scores, qs[0].head_dim / 64);
#endif
    return 0;
}
