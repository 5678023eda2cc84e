/* plane.c - one KV head's signatures as the client holds them for stage 1:
 * the block-interleaved ("fast scan") layout and its scan.
 *
 * Design notes.
 * 1. Layout. Positions go in blocks of KVG_PLANE_BLOCK = 32. Block b holds
 *    W = head_dim / 16 runs of 32 16-bit words; run w is word w (signature
 *    bits 16w..16w+15, little-endian as in the token-major planes) of the
 *    block's 32 tokens in position order. Scales stay in position order.
 *    One 64-byte load thus holds the same 16 signature bits of 32 tokens,
 *    and one table lookup scores one 4-bit group of all 32. The layout
 *    holds the same bytes as the token-major plane, so memory use is the
 *    same; signatures on disk and on the wire keep the token-major layout
 *    (kvg_plane_put / _get convert).
 * 2. The score. The asymmetric dot of a token is the reference's exact
 *    integer sum_i q8_i * (bit_i ? +1 : -1); split into 4-bit groups, group
 *    g contributes T_g[v] for its 4 bits v, a 16-entry table of int16 built
 *    per query head. VPERMW (AVX-512BW) looks up 32 words at once from a
 *    32-entry table; it reads the low 5 bits of each index word, so entries
 *    16..31 repeat 0..15 and the group of bits 4s..4s+3 is the word shifted
 *    right by 4s. Sums stay within int16: |dot| <= head_dim * 127 = 32512
 *    at head_dim 256 (a query holding -128, which the preparation never
 *    makes, goes to the reference). Hamming is the same lookup with
 *    T_g[v] = 4 - 2 * popcount(v ^ qbits_g). After the integer, each query
 *    head's score is the reference's float operations in its order
 *    (((float)dot * qscale) * scale + bias; (float)dot for Hamming) and
 *    the GQA combination in head order (max_ps(v, acc) is "v > acc ? v :
 *    acc"), so every bit is kvg_score_pos_ref's.
 * 3. Heads in chunks of up to 8 (each with two int16 accumulators, in
 *    registers): the block's words are loaded once per chunk; a group of
 *    more than 8 query heads re-reads the plane and combines into the
 *    scores already written, still in head order.
 * 4. Blocks cut by the range's ends are computed whole into a scratch of
 *    32 scores and copied out in part; capacity is a multiple of 32 and
 *    zero-filled, so whole blocks are always readable.
 * 4b. AVX2 (block3): VPSHUFB looks up bytes in 16-entry tables per 128-bit
 *    lane, so each table is held as the low and high bytes of U = T + 512
 *    and each word's lookup index is its nibble with 0x80 (reads as 0) in
 *    the high byte: words sum without widening and the dot is sum lo +
 *    256 sum hi - 512 x groups in wrapping int16 (exact: it fits). 16
 *    tokens a vector, 4 query heads a pass (16 registers).
 * 5. No software prefetch: 8, 16 or 32 blocks ahead each ran slower at 2M
 *    tokens than the hardware's stride prefetcher alone (bench-scan).
 * 6. Dispatch: the AVX-512 kernel where the CPU has x86-64-v4 (F, BW, DQ,
 *    VL), the AVX2 one where it has x86-64-v3, else the reference over the
 *    token-major copy of each stretch (kvg_plane_score_isa runs one for
 *    tests and benchmarks). A signature block of
 *    KVG_SIG_BLOCK = 64 positions holds two plane blocks, so one bias per
 *    query head serves a whole plane block.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"

#define PB KVG_PLANE_BLOCK

/* ---- the layout ------------------------------------------------------------ */

int kvg_plane_reserve(kvg_plane *p, int head_dim, uint64_t n)
{
    if (!p || kvarc_head_dim_check(head_dim) || (p->cap && p->head_dim != head_dim))
        return -EINVAL;
    if (n <= p->cap)
        return 0;
    uint64_t cap = p->cap ? p->cap : 1024;
    while (cap < n)
        cap *= 2;
    size_t W = (size_t)head_dim / 16;
    void *w = NULL;
    uint16_t *s = calloc(cap, 2);
    if (!s || posix_memalign(&w, 64, cap * W * 2)) {
        free(s);
        return -ENOMEM;
    }
    memset(w, 0, cap * W * 2);
    if (p->cap) {
        memcpy(w, p->words, p->cap * W * 2);
        memcpy(s, p->scale, p->cap * 2);
    }
    free(p->words);
    free(p->scale);
    p->words = w;
    p->scale = s;
    p->cap = cap;
    p->head_dim = head_dim;
    return 0;
}

void kvg_plane_free(kvg_plane *p)
{
    if (!p)
        return;
    free(p->words);
    free(p->scale);
    memset(p, 0, sizeof *p);
}

/* Word w of position t. */
static inline uint16_t *word_at(const kvg_plane *p, uint64_t t, size_t w)
{
    size_t W = (size_t)p->head_dim / 16;
    return p->words + (t / PB) * W * PB + w * PB + t % PB;
}

int kvg_plane_put(kvg_plane *p, uint64_t pos, size_t n, const uint8_t *bits, const void *scale)
{
    if (!p || !bits || !scale || pos > p->cap || n > p->cap - pos)
        return -EINVAL;
    size_t W = (size_t)p->head_dim / 16;
    for (size_t j = 0; j < n; j++)
        for (size_t w = 0; w < W; w++)
            memcpy(word_at(p, pos + j, w), bits + (j * W + w) * 2, 2);
    memcpy(p->scale + pos, scale, n * 2);
    return 0;
}

int kvg_plane_get(const kvg_plane *p, uint64_t pos, size_t n, uint8_t *bits, uint16_t *scale)
{
    if (!p || (!bits && !scale) || pos > p->cap || n > p->cap - pos)
        return -EINVAL;
    size_t W = (size_t)p->head_dim / 16;
    for (size_t j = 0; bits && j < n; j++)
        for (size_t w = 0; w < W; w++)
            memcpy(bits + (j * W + w) * 2, word_at(p, pos + j, w), 2);
    if (scale)
        memcpy(scale, p->scale + pos, n * 2);
    return 0;
}

/* Whether positions [first_pos, first_pos + n) of p hold signatures of
 * head_dim (the range checks every scan makes). */
static int range_ok(const kvg_plane *p, int head_dim, uint64_t first_pos, uint64_t n)
{
    return p && p->words && head_dim == p->head_dim && first_pos <= p->cap && n <= p->cap - first_pos;
}

/* ---- the reference over the layout --------------------------------------- */

/* kvg_score_pos_ref over a token-major copy, a stretch at a time. */
static int score_ref(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const kvg_plane *p,
                     uint64_t first_pos, size_t n, const float *blk_bias, size_t nblk, float *scores)
{
    enum { STRETCH = 1024 };
    uint8_t bits[STRETCH * KVARC_HEAD_DIM_MAX / 8];
    uint16_t sc[STRETCH];
    for (size_t o = 0; o < n; o += STRETCH) {
        size_t m = n - o < STRETCH ? n - o : STRETCH;
        uint64_t at = first_pos + o;
        kvg_plane_get(p, at, m, bits, sc);
        size_t db = at / KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK;
        int rc = kvg_score_pos_ref(mode, comb, qs, n_q, bits, sc, m, at, blk_bias ? blk_bias + db : NULL, nblk,
                                   scores + o);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- the AVX-512 kernel ---------------------------------------------------- */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define V4 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c")))
#define V3 __attribute__((target("avx2,f16c")))
#define CHUNK 8           /* query heads a pass (AVX-512; AVX2 takes CHUNK3) */
#define CHUNK3 4

/* One query's tables, group g being signature bits 4g..4g+3. */
typedef union ptab {
    int16_t t[KVARC_HEAD_DIM_MAX / 4][32];       /* AVX-512: T_g[v], entries 16..31 repeat 0..15 */
    struct {
        uint8_t lo[KVARC_HEAD_DIM_MAX / 4][32];  /* AVX2: U = T_g[v] + 512 (0..1023) split in bytes, */
        uint8_t hi[KVARC_HEAD_DIM_MAX / 4][32];  /* each 16-entry table in both 128-bit lanes */
    } b;
} __attribute__((aligned(64))) ptab;

/* Query q's tables for isa (V4 or V3); 0, or -1 where int16 could
 * overflow (q8 = -128). */
static int make_tables(kvg_isa isa, kvg_score_mode mode, const kvg_query *q, ptab *t)
{
    int d = q->head_dim;
    for (int g = 0; g < d / 4; g++) {
        /* w[j]: what bit j set adds against it clear (T[v] = T[0] + the w of v's bits): 2 q8 (asym),
         * +-2 (Hamming: agreeing with the query's sign bit or not) */
        int w[4], e[16];
        e[0] = 0;
        for (int j = 0; j < 4; j++) {
            int i = 4 * g + j;
            if (mode == KVG_SCORE_ASYM) {
                if (q->q8[i] == -128)
                    return -1;
                w[j] = 2 * q->q8[i];
                e[0] -= q->q8[i];
            } else {
                int qb = (q->bits[i / 8] >> (i % 8)) & 1;
                w[j] = qb ? 2 : -2;
                e[0] += qb ? -1 : 1;
            }
        }
        for (int v = 1; v < 16; v++)
            e[v] = e[v & (v - 1)] + w[__builtin_ctz((unsigned)v)];
        for (int v = 0; v < 16; v++) {
            int s = e[v];
            if (isa == KVG_ISA_V4) {
                t->t[g][v] = t->t[g][v + 16] = (int16_t)s;
            } else {
                t->b.lo[g][v] = t->b.lo[g][v + 16] = (uint8_t)((s + 512) & 255);
                t->b.hi[g][v] = t->b.hi[g][v + 16] = (uint8_t)((s + 512) >> 8);
            }
        }
    }
    return 0;
}

/* One block's scores for the NQ query heads at tab/qs (chunk c0 of the
 * group; first: this chunk holds head 0), combined into out[32] (read
 * first unless first). NQ and W are constants in each instance. */
V4 static inline __attribute__((always_inline)) void block(kvg_score_mode mode, kvg_combine comb, const ptab *tab,
                                                           const kvg_query *qs, const float *bias, int NQ, int W,
                                                           const uint16_t *words, const uint16_t *scale,
                                                           float *out, int first, int last_chunk, int n_q)
{
    __m512i a0[CHUNK], a1[CHUNK];
    for (int h = 0; h < NQ; h++)
        a0[h] = a1[h] = _mm512_setzero_si512();
    for (int w = 0; w < W; w++) {
        __m512i x0 = _mm512_loadu_si512(words + w * PB);
        __m512i x1 = _mm512_srli_epi16(x0, 4), x2 = _mm512_srli_epi16(x0, 8), x3 = _mm512_srli_epi16(x0, 12);
        for (int h = 0; h < NQ; h++) {
            const int16_t (*t)[32] = tab[h].t + 4 * w;
            a0[h] = _mm512_add_epi16(a0[h], _mm512_permutexvar_epi16(x0, _mm512_load_si512(t[0])));
            a1[h] = _mm512_add_epi16(a1[h], _mm512_permutexvar_epi16(x1, _mm512_load_si512(t[1])));
            a0[h] = _mm512_add_epi16(a0[h], _mm512_permutexvar_epi16(x2, _mm512_load_si512(t[2])));
            a1[h] = _mm512_add_epi16(a1[h], _mm512_permutexvar_epi16(x3, _mm512_load_si512(t[3])));
        }
    }
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, c0 = s0, c1 = s0;
    if (mode == KVG_SCORE_ASYM) {
        s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)scale));
        s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(scale + 16)));
    }
    if (!first) {
        c0 = _mm512_loadu_ps(out);
        c1 = _mm512_loadu_ps(out + 16);
    }
    for (int h = 0; h < NQ; h++) {
        __m512i dot = _mm512_add_epi16(a0[h], a1[h]);
        __m512 v0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(dot)));
        __m512 v1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(dot, 1)));
        if (mode == KVG_SCORE_ASYM) {
            __m512 qsc = _mm512_set1_ps(qs[h].qscale), b = _mm512_set1_ps(bias[h]);
            v0 = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(v0, qsc), s0), b);
            v1 = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(v1, qsc), s1), b);
        }
        if (first && h == 0) {
            c0 = v0;
            c1 = v1;
        } else if (comb == KVG_COMBINE_MAX) {
            c0 = _mm512_max_ps(v0, c0);
            c1 = _mm512_max_ps(v1, c1);
        } else {
            c0 = _mm512_add_ps(c0, v0);
            c1 = _mm512_add_ps(c1, v1);
        }
    }
    if (last_chunk && comb == KVG_COMBINE_MEAN && n_q > 1) {
        c0 = _mm512_div_ps(c0, _mm512_set1_ps((float)n_q));
        c1 = _mm512_div_ps(c1, _mm512_set1_ps((float)n_q));
    }
    _mm512_storeu_ps(out, c0);
    _mm512_storeu_ps(out + 16, c1);
}

/* The AVX2 block: as block, 16 tokens a half. VPSHUFB looks up bytes in
 * 16-entry tables, so each group's table is split: the low and high bytes
 * of U = T + 512, looked up with the group's nibble in the low byte of
 * each word and 0x80 (which reads as zero) in the high one; the words sum
 * without widening (sum of lo <= 64 * 255) and dot = sum lo + 256 * sum hi
 * - 512 * groups, exact in wrapping int16 because the dot fits int16. */
V3 static inline __attribute__((always_inline)) void block3(kvg_score_mode mode, kvg_combine comb, const ptab *tab,
                                                            const kvg_query *qs, const float *bias, int NQ, int W,
                                                            const uint16_t *words, const uint16_t *scale,
                                                            float *out, int first, int last_chunk, int n_q)
{
    const __m256i nib = _mm256_set1_epi16(0x000f), zhi = _mm256_set1_epi16((short)0x8000),
                  off = _mm256_set1_epi16((short)(uint16_t)(512 * 4 * W));   /* 512 x groups, mod 2^16 */
    for (int half = 0; half < 2; half++) {
        __m256i al[CHUNK3], ah[CHUNK3];
        for (int h = 0; h < NQ; h++)
            al[h] = ah[h] = _mm256_setzero_si256();
        for (int w = 0; w < W; w++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(const void *)(words + w * PB + 16 * half));
            for (int s = 0; s < 4; s++) {
                __m256i y = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4 * s), nib), zhi);
                for (int h = 0; h < NQ; h++) {
                    al[h] = _mm256_add_epi16(al[h], _mm256_shuffle_epi8(
                        _mm256_load_si256((const __m256i *)(const void *)tab[h].b.lo[4 * w + s]), y));
                    ah[h] = _mm256_add_epi16(ah[h], _mm256_shuffle_epi8(
                        _mm256_load_si256((const __m256i *)(const void *)tab[h].b.hi[4 * w + s]), y));
                }
            }
        }
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, c0 = s0, c1 = s0;
        if (mode == KVG_SCORE_ASYM) {
            s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(scale + 16 * half)));
            s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(scale + 16 * half + 8)));
        }
        if (!first) {
            c0 = _mm256_loadu_ps(out + 16 * half);
            c1 = _mm256_loadu_ps(out + 16 * half + 8);
        }
        for (int h = 0; h < NQ; h++) {
            __m256i dot = _mm256_sub_epi16(_mm256_add_epi16(al[h], _mm256_slli_epi16(ah[h], 8)), off);
            __m256 v0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(dot)));
            __m256 v1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(dot, 1)));
            if (mode == KVG_SCORE_ASYM) {
                __m256 qsc = _mm256_set1_ps(qs[h].qscale), b = _mm256_set1_ps(bias[h]);
                v0 = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(v0, qsc), s0), b);
                v1 = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(v1, qsc), s1), b);
            }
            if (first && h == 0) {
                c0 = v0;
                c1 = v1;
            } else if (comb == KVG_COMBINE_MAX) {
                c0 = _mm256_max_ps(v0, c0);
                c1 = _mm256_max_ps(v1, c1);
            } else {
                c0 = _mm256_add_ps(c0, v0);
                c1 = _mm256_add_ps(c1, v1);
            }
        }
        if (last_chunk && comb == KVG_COMBINE_MEAN && n_q > 1) {
            c0 = _mm256_div_ps(c0, _mm256_set1_ps((float)n_q));
            c1 = _mm256_div_ps(c1, _mm256_set1_ps((float)n_q));
        }
        _mm256_storeu_ps(out + 16 * half, c0);
        _mm256_storeu_ps(out + 16 * half + 8, c1);
    }
}

/* Positions [first_pos, first_pos + n) for one chunk of NQ heads, through
 * BLOCK (block or block3): chunk_scan4 and chunk_scan3. */
#define DEFINE_CHUNK_SCAN(NAME, ATTR, BLOCK, MAXQ)                                                          \
    ATTR static inline __attribute__((always_inline)) void NAME(                                              \
        kvg_score_mode mode, kvg_combine comb, const ptab *tab, const kvg_query *qs, int NQ, int W,          \
        const kvg_plane *p, uint64_t first_pos, size_t n, const float *blk_bias, size_t nblk, int c0, int n_q,  \
        float *scores)                                                                                        \
    {                                                                                                         \
        float bias[MAXQ];                                                                                     \
        const int first = c0 == 0, last = c0 + NQ == n_q;                                                     \
        for (int h = 0; h < NQ; h++)                                                                          \
            bias[h] = qs[h].bias;                                                                             \
        uint64_t end = first_pos + n;                                                                         \
        for (uint64_t b0 = first_pos / PB * PB; b0 < end; b0 += PB) {                                         \
            if (blk_bias)                                                                                     \
                for (int h = 0; h < NQ; h++)                                                                  \
                    bias[h] = blk_bias[(size_t)h * nblk + (b0 / KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK)];  \
            const uint16_t *words = p->words + (b0 / PB) * (size_t)W * PB, *sc = p->scale + b0;               \
            if (b0 >= first_pos && b0 + PB <= end) {                                                          \
                BLOCK(mode, comb, tab, qs, bias, NQ, W, words, sc, scores + (b0 - first_pos), first, last, n_q); \
            } else { /* cut by the range: through a scratch */                                                \
                float tmp[PB] = { 0 };                                                                        \
                uint64_t lo = b0 > first_pos ? b0 : first_pos, hi = b0 + PB < end ? b0 + PB : end;            \
                if (!first)                                                                                   \
                    memcpy(tmp + (lo - b0), scores + (lo - first_pos), (hi - lo) * 4);                        \
                BLOCK(mode, comb, tab, qs, bias, NQ, W, words, sc, tmp, first, last, n_q);                    \
                memcpy(scores + (lo - first_pos), tmp + (lo - b0), (hi - lo) * 4);                            \
            }                                                                                                 \
        }                                                                                                     \
    }
DEFINE_CHUNK_SCAN(chunk_scan4, V4, block, CHUNK)
DEFINE_CHUNK_SCAN(chunk_scan3, V3, block3, CHUNK3)

/* chunk_scan4 / chunk_scan3 with NQ and W as constants. */
#define CHUNK_W(NAME, SCAN, ATTR, NQ)                                                                         \
    ATTR static void NAME##NQ(kvg_score_mode mode, kvg_combine comb, const ptab *tab, const kvg_query *qs,     \
                              int W, const kvg_plane *p, uint64_t first_pos, size_t n, const float *blk_bias, \
                              size_t nblk, int c0, int n_q, float *scores)                                    \
    {                                                                                                         \
        if (W == 4)                                                                                           \
            SCAN(mode, comb, tab, qs, NQ, 4, p, first_pos, n, blk_bias, nblk, c0, n_q, scores);                \
        else if (W == 8)                                                                                      \
            SCAN(mode, comb, tab, qs, NQ, 8, p, first_pos, n, blk_bias, nblk, c0, n_q, scores);                \
        else                                                                                                  \
            SCAN(mode, comb, tab, qs, NQ, 16, p, first_pos, n, blk_bias, nblk, c0, n_q, scores);               \
    }
CHUNK_W(chunk_, chunk_scan4, V4, 1) CHUNK_W(chunk_, chunk_scan4, V4, 2) CHUNK_W(chunk_, chunk_scan4, V4, 3)
CHUNK_W(chunk_, chunk_scan4, V4, 4) CHUNK_W(chunk_, chunk_scan4, V4, 5) CHUNK_W(chunk_, chunk_scan4, V4, 6)
CHUNK_W(chunk_, chunk_scan4, V4, 7) CHUNK_W(chunk_, chunk_scan4, V4, 8)
CHUNK_W(chunk3_, chunk_scan3, V3, 1) CHUNK_W(chunk3_, chunk_scan3, V3, 2) CHUNK_W(chunk3_, chunk_scan3, V3, 3)
CHUNK_W(chunk3_, chunk_scan3, V3, 4)

typedef void chunk_fn(kvg_score_mode, kvg_combine, const ptab *, const kvg_query *, int, const kvg_plane *,
                      uint64_t, size_t, const float *, size_t, int, int, float *);
static chunk_fn *const chunks[CHUNK + 1] = { NULL, chunk_1, chunk_2, chunk_3, chunk_4,
                                             chunk_5, chunk_6, chunk_7, chunk_8 };
static chunk_fn *const chunks3[CHUNK3 + 1] = { NULL, chunk3_1, chunk3_2, chunk3_3, chunk3_4 };

/* The tables of the group's n_q queries: in stack (room for CHUNK) or
 * allocated; NULL when out of memory or a query the kernel cannot serve
 * (the reference serves them). Free with tables_free. */
static ptab *tables_make(kvg_isa isa, kvg_score_mode mode, const kvg_query *qs, int n_q, ptab *stack)
{
    ptab *t = n_q <= CHUNK ? stack : aligned_alloc(64, (size_t)n_q * sizeof *t);
    for (int h = 0; t && h < n_q; h++)
        if (make_tables(isa, mode, &qs[h], &t[h])) {
            if (t != stack)
                free(t);
            return NULL;
        }
    return t;
}

/* (NULL: nothing to free) */
static void tables_free(ptab *t, ptab *stack)
{
    if (t != stack)
        free(t);
}

/* The scores through isa's kernel (V4 or V3), a chunk of heads at a time. */
static void score_tabs(kvg_isa isa, kvg_score_mode mode, kvg_combine comb, const ptab *tab, const kvg_query *qs,
                       int n_q, const kvg_plane *p, uint64_t first_pos, size_t n, const float *blk_bias,
                       size_t nblk, float *scores)
{
    int step = isa == KVG_ISA_V4 ? CHUNK : CHUNK3;
    for (int c0 = 0; c0 < n_q; c0 += step) {
        int nq = n_q - c0 < step ? n_q - c0 : step;
        (isa == KVG_ISA_V4 ? chunks : chunks3)[nq](mode, comb, tab + c0, qs + c0, p->head_dim / 16, p, first_pos,
                                                   n, blk_bias ? blk_bias + (size_t)c0 * nblk : NULL, nblk, c0,
                                                   n_q, scores);
    }
}

/* The plane kernels the CPU has (kvg_codec_isa_supported: x86-64-v4 has
 * AVX-512 F/BW/DQ/VL, v3 AVX2 and F16C). */
static int have_isa(kvg_isa isa)
{
    return (isa == KVG_ISA_V4 || isa == KVG_ISA_V3) && kvg_codec_isa_supported(isa);
}
#else
typedef struct ptab { int unused; } ptab;
#define CHUNK 1
static int have_isa(kvg_isa isa) { (void)isa; return 0; }
static ptab *tables_make(kvg_isa isa, kvg_score_mode mode, const kvg_query *qs, int n_q, ptab *stack)
{
    (void)isa, (void)mode, (void)qs, (void)n_q, (void)stack;
    return NULL;
}
static void tables_free(ptab *t, ptab *stack) { (void)t, (void)stack; }
static void score_tabs(kvg_isa isa, kvg_score_mode mode, kvg_combine comb, const ptab *tab, const kvg_query *qs,
                       int n_q, const kvg_plane *p, uint64_t first_pos, size_t n, const float *blk_bias,
                       size_t nblk, float *scores)
{
    (void)isa, (void)mode, (void)comb, (void)tab, (void)qs, (void)n_q, (void)p, (void)first_pos, (void)n;
    (void)blk_bias, (void)nblk, (void)scores;
}
#endif

/* ---- dispatch ----------------------------------------------------------------- */

static kvg_isa plane_best(void)
{
    return have_isa(KVG_ISA_V4) ? KVG_ISA_V4 : have_isa(KVG_ISA_V3) ? KVG_ISA_V3 : KVG_ISA_REF;
}

const char *kvg_plane_kernel(void)
{
    kvg_isa b = plane_best();
    return b == KVG_ISA_V4 ? "avx512-vpermw" : b == KVG_ISA_V3 ? "avx2-vpshufb" : "scalar";
}

int kvg_plane_score_isa(kvg_isa isa, kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                        const kvg_plane *p, uint64_t first_pos, size_t n, const float *blk_bias, size_t nblk,
                        float *scores)
{
    if (isa != KVG_ISA_REF && isa != KVG_ISA_V4 && isa != KVG_ISA_V3)
        return -EINVAL;
    if (isa != KVG_ISA_REF && !have_isa(isa))
        return -ENOTSUP;
    int rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc)
        return rc;
    if (n == 0)
        return 0;
    if (!scores || !range_ok(p, qs[0].head_dim, first_pos, n))
        return -EINVAL;
    if (blk_bias && nblk < kvg_blocks_of(first_pos, n))
        return -EINVAL;
    ptab stack[CHUNK], *tab;
    if (isa != KVG_ISA_REF && (tab = tables_make(isa, mode, qs, n_q, stack))) {
        score_tabs(isa, mode, comb, tab, qs, n_q, p, first_pos, n, blk_bias, nblk, scores);
        tables_free(tab, stack);
        return 0;
    }
    return score_ref(mode, comb, qs, n_q, p, first_pos, n, blk_bias, nblk, scores);
}

int kvg_plane_score(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const kvg_plane *p,
                    uint64_t first_pos, size_t n, const float *blk_bias, size_t nblk, float *scores)
{
    return kvg_plane_score_isa(plane_best(), mode, comb, qs, n_q, p, first_pos, n, blk_bias, nblk, scores);
}

int kvg_plane_score_runs(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const kvg_plane *p,
                         uint64_t base, const uint64_t *runs, size_t nr, const float *blk_bias, size_t nblk,
                         float *scores)
{
    uint64_t end;
    int rc = kvg_score_runs_check(mode, comb, qs, n_q, base, runs, nr, blk_bias, nblk, &end);
    if (rc || !end)
        return rc;
    /* the kernel's tables once for every run (a prefill query scans a few short runs: making them per
     * run cost more than the scan) */
    kvg_isa kisa = plane_best();
    ptab stack[CHUNK], *tab = NULL;
    if (kisa != KVG_ISA_REF && scores && range_ok(p, qs[0].head_dim, base, end))
        tab = tables_make(kisa, mode, qs, n_q, stack);
    size_t o = 0;
    for (size_t r = 0; r < nr; r++) {
        uint64_t at = base + runs[2 * r], len = runs[2 * r + 1];
        size_t db = at / KVG_SIG_BLOCK - base / KVG_SIG_BLOCK;
        if (len && tab)
            score_tabs(kisa, mode, comb, tab, qs, n_q, p, at, len, blk_bias ? blk_bias + db : NULL, nblk, scores + o);
        else if (len && (rc = kvg_plane_score(mode, comb, qs, n_q, p, at, len, blk_bias ? blk_bias + db : NULL,
                                              nblk, scores + o)))
            return rc;
        o += len;
    }
    tables_free(tab, stack);
    return 0;
}

/* ---- stage 1's shortlist: the scan with the top-k fused -------------------- */

long kvg_plane_topk(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const kvg_plane *p,
                    uint64_t first_pos, size_t n, const float *blk_bias, size_t nblk, size_t k, uint32_t *idx_out,
                    float *val_out, float *scores, uint32_t *scratch)
{
    enum { STRETCH = 4096 };
    long rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc)
        return rc;
    if (!scores || !scratch || (k && !idx_out) ||           /* the stretches below check their own part */
        (blk_bias && n && nblk < kvg_blocks_of(first_pos, n)))
        return -EINVAL;
    if (k > n)
        k = n;
    kvg_isa isa = kvg_codec_isa_best(), kisa = plane_best();   /* the filter's, the scan's */
    float samp[KVG_TOPK_SAMPLE_MAX], part[STRETCH];
    /* the sample: SB blocks spread over the range, a 256th of it (from 32 to 256 blocks): the larger
     * the sample, the closer the threshold keeps to 2k candidates (the reference then selects from
     * fewer) */
    size_t SB = n / 256 / PB;
    SB = SB < 32 ? 32 : SB > KVG_TOPK_SAMPLE_MAX / PB ? KVG_TOPK_SAMPLE_MAX / PB : SB;
    uint32_t t;
    ptab stack[CHUNK], *tab = NULL;
    /* as kvg_topk: the filter pays when the answer is a small part of a long list; the kernel's
     * tables are made once for every stretch */
    if (k == 0 || n > UINT32_MAX || n < 4 * SB * PB || 8 * k > n || kisa == KVG_ISA_REF ||
        !range_ok(p, qs[0].head_dim, first_pos, n) || !(tab = tables_make(kisa, mode, qs, n_q, stack)))
        goto whole;
    for (size_t i = 0; i < SB; i++) {
        uint64_t at = first_pos + i * (n - PB) / (SB - 1);
        size_t db = at / KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK;
        score_tabs(kisa, mode, comb, tab, qs, n_q, p, at, PB, blk_bias ? blk_bias + db : NULL, nblk, samp + i * PB);
    }
    if (kvg_topk_threshold(samp, SB * PB, n, k, scratch, &t))
        goto whole;
    /* scratch: [cap] candidate indices, [cap] the reference's work space; scores: [cap] theirs */
    size_t cap = n / 3, c = 0;
    for (size_t o = 0; o < n && c <= cap; o += STRETCH) {   /* each stretch's scores stay in cache */
        size_t m = n - o < STRETCH ? n - o : STRETCH;
        uint64_t at = first_pos + o;
        size_t db = at / KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK;
        score_tabs(kisa, mode, comb, tab, qs, n_q, p, at, m, blk_bias ? blk_bias + db : NULL, nblk, part);
        c = kvg_topk_filter(isa, part, m, t, (uint32_t)o, scratch, scores, c, cap);
    }
    if (c < k || c > cap)
        goto whole;
    tables_free(tab, stack);
    rc = kvg_topk_ref(scores, c, k, idx_out, val_out, scratch + cap);
    for (long i = 0; i < rc; i++)
        idx_out[i] = scratch[idx_out[i]];
    return rc;
whole:
    tables_free(tab, stack);
    if ((rc = kvg_plane_score(mode, comb, qs, n_q, p, first_pos, n, blk_bias, nblk, scores)))
        return rc;
    return kvg_topk(scores, n, k, idx_out, val_out, scratch);
}
