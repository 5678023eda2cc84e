/* topk_simd.c - the top-k with a SIMD filter in front, chosen at run time
 * (kvg_topk); kvg_topk_ref (topk_ref.c) stays the definition and this
 * gives its output bytes.
 *
 * Design notes.
 * - The result is defined as the first k of all n in the order (key
 *   descending, index ascending), key = kvg_score_key. If at least k keys
 *   are >= some threshold T, every one of those first k is >= T, and so is
 *   every tie of the k-th key. The candidates (indices with key >= T, in
 *   index order) therefore hold the whole answer, and the reference run
 *   over them in index order picks the same k in the same order (mapping
 *   candidate positions back to indices keeps index order). Any T with
 *   count >= k gives the reference's bytes; T only decides the speed.
 * - T comes from a strided sample of the scores: the key of rank j of the
 *   sample, j chosen so that about 2k of the n are expected above it (at
 *   least 8 sample ranks). If the filter keeps fewer than k, or more than a
 *   third of n (the scratch would not hold the candidates, their scores
 *   and the reference's work space), the reference runs over all n: slower,
 *   never different.
 * - The filter is one pass: 16 keys a step with AVX-512 (compare to a
 *   mask, compress-store the indices), 8 with AVX2 (compare, movemask, the
 *   few set bits in a loop). Keys are computed exactly as kvg_score_key
 *   does (NaN -> 0, sign-flip order) and compared unsigned.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"

/* The scalar filter from index j on, c candidates already kept: each
 * kept index plus base into cand, its score into cs; the count, or
 * cap + 1 past cap. */
static size_t filter_from(const float *scores, size_t j, size_t n, uint32_t t, uint32_t base, uint32_t *cand,
                          float *cs, size_t c, size_t cap)
{
    for (; j < n; j++)
        if (kvg_score_key(scores[j]) >= t) {
            if (c == cap)
                return cap + 1;
            cs[c] = scores[j];
            cand[c++] = base + (uint32_t)j;
        }
    return c;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define AVX512_TK __attribute__((target("avx512f")))
#define AVX2_TK __attribute__((target("avx2")))

/* filter_from from 0 with c kept, 16 keys a step. */
AVX512_TK static size_t filter_avx512(const float *scores, size_t n, uint32_t t, uint32_t base, uint32_t *cand,
                                      float *cs, size_t c, size_t cap)
{
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), abs = _mm512_set1_epi32(0x7fffffff),
                  inf = _mm512_set1_epi32(0x7f800000), tv = _mm512_set1_epi32((int)t),
                  step = _mm512_set1_epi32(16);
    __m512i iota = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                    _mm512_set1_epi32((int)base));
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512i u = _mm512_loadu_si512(scores + j);
        __mmask16 neg = _mm512_test_epi32_mask(u, sign);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
        __m512i key = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), neg, u, _mm512_set1_epi32(-1));
        __mmask16 m = _mm512_mask_cmpge_epu32_mask((__mmask16)~nan, key, tv);
        if (m) {
            unsigned k = (unsigned)__builtin_popcount(m);
            if (c + k > cap)
                return cap + 1;
            _mm512_mask_compressstoreu_epi32(cand + c, m, iota);
            _mm512_mask_compressstoreu_ps(cs + c, m, _mm512_castsi512_ps(u));
            c += k;
        }
        iota = _mm512_add_epi32(iota, step);
    }
    return filter_from(scores, j, n, t, base, cand, cs, c, cap);
}

AVX2_TK static size_t filter_avx2(const float *scores, size_t n, uint32_t t, uint32_t base, uint32_t *cand,
                                  float *cs, size_t c, size_t cap)
{
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), abs = _mm256_set1_epi32(0x7fffffff),
                  inf = _mm256_set1_epi32(0x7f800000), ones = _mm256_set1_epi32(-1);
    /* unsigned a >= t  <=>  signed (a ^ sign) > (t ^ sign) - 1, t > 0 */
    const __m256i tb = _mm256_set1_epi32((int)((t ^ 0x80000000u) - 1u));
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)(scores + j));
        __m256i neg = _mm256_srai_epi32(u, 31);                       /* -1 where the sign is set */
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);   /* both sides non-negative */
        __m256i key = _mm256_xor_si256(_mm256_or_si256(u, sign), _mm256_and_si256(neg, ones));
        key = _mm256_andnot_si256(nan, key);                          /* NaN -> 0 */
        __m256i ge = _mm256_cmpgt_epi32(_mm256_xor_si256(key, sign), tb);
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(ge));
        while (m) {
            if (c == cap)
                return cap + 1;
            size_t i = j + (size_t)__builtin_ctz(m);
            cs[c] = scores[i];
            cand[c++] = base + (uint32_t)i;
            m &= m - 1;
        }
    }
    return filter_from(scores, j, n, t, base, cand, cs, c, cap);
}
#endif

size_t kvg_topk_filter(kvg_isa isa, const float *scores, size_t n, uint32_t t, uint32_t base, uint32_t *cand,
                       float *cs, size_t c, size_t cap)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == KVG_ISA_V4 && kvg_codec_isa_supported(isa))
        return filter_avx512(scores, n, t, base, cand, cs, c, cap);
    if (isa == KVG_ISA_V3 && kvg_codec_isa_supported(isa))
        return filter_avx2(scores, n, t, base, cand, cs, c, cap);
#endif
    return filter_from(scores, 0, n, t, base, cand, cs, c, cap);
}

int kvg_topk_threshold(const float *sample, size_t ns, size_t n, size_t k, uint32_t *work, uint32_t *t)
{
    size_t j = (2 * k * ns + n - 1) / n + 8;
    uint32_t sidx[KVG_TOPK_SAMPLE_MAX / 2];
    if (ns > KVG_TOPK_SAMPLE_MAX || !work || j > ns / 2 || kvg_topk_ref(sample, ns, j, sidx, NULL, work) != (long)j)
        return -1;
    *t = kvg_score_key(sample[sidx[j - 1]]);
    return *t ? 0 : -1;                 /* a NaN threshold would keep everything */
}

#define SAMPLE 1024

long kvg_topk_isa(kvg_isa isa, const float *scores, size_t n, size_t k, uint32_t *idx_out, float *val_out,
                  uint32_t *scratch)
{
    if (!kvg_codec_isa_supported(isa))   /* the same builds as the codec's (x86-64-v4 has AVX-512F, v3 AVX2) */
        return -ENOTSUP;
    if (k > n)
        k = n;
    /* the filter pays when the answer is a small part of a long list */
    if (isa == KVG_ISA_REF || k == 0 || !scores || !idx_out || n > UINT32_MAX || n < 4 * SAMPLE || 8 * k > n)
        return kvg_topk_ref(scores, n, k, idx_out, val_out, scratch);
    uint32_t *own = NULL;
    if (!scratch && !(scratch = own = malloc(n * sizeof *scratch)))
        return -ENOMEM;
    /* the threshold: the key of sample rank j, about 2k of n expected above it */
    float samp[SAMPLE];
    size_t stride = n / SAMPLE;
    for (size_t i = 0; i < SAMPLE; i++)
        samp[i] = scores[i * stride + stride / 2];
    uint32_t t;
    long rc;
    if (kvg_topk_threshold(samp, SAMPLE, n, k, scratch, &t)) {
        rc = kvg_topk_ref(scores, n, k, idx_out, val_out, scratch);
        goto out;
    }
    /* scratch: [cap] candidate indices, [cap] their scores, [cap] the reference's work space */
    size_t cap = n / 3;
    uint32_t *cand = scratch;
    float *cs = (float *)(void *)(scratch + cap);
    size_t c = kvg_topk_filter(isa, scores, n, t, 0, cand, cs, 0, cap);
    if (c < k || c > cap) {
        rc = kvg_topk_ref(scores, n, k, idx_out, val_out, scratch);
        goto out;
    }
    rc = kvg_topk_ref(cs, c, k, idx_out, NULL, scratch + 2 * cap);
    for (long i = 0; i < rc; i++) {
        idx_out[i] = cand[idx_out[i]];
        if (val_out)
            val_out[i] = scores[idx_out[i]];
    }
out:
    free(own);
    return rc;
}

long kvg_topk(const float *scores, size_t n, size_t k, uint32_t *idx_out, float *val_out, uint32_t *scratch)
{
    return kvg_topk_isa(kvg_codec_isa_best(), scores, n, k, idx_out, val_out, scratch);
}
