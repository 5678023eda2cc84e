/* fuzz_codec - stored records and signatures (SCHEMA.md sections 4-6) into
 * every function that reads them, differentially: the scalar reference
 * (codec_ref.c, score_ref.c) defines the bits, and every SIMD build this
 * CPU runs (codec_simd.c's lanes: base, AVX2, AVX-512; the stage-1 kernel
 * kvg_score_pos picks by cpuid) must give the same return code and the
 * same bits. A record or signature is whatever bytes a client appended or
 * a disk returned with a valid CRC: NaN, Inf and denormal scales included.
 *
 * Input: byte 0 the format (1 + b % 5), byte 1 the head_dim (64, 128,
 * 256) and the mode (records or signatures), byte 2 flags (means, queries,
 * RoPE layout and rotary dims), bytes 3..10 the seed of the queries, means
 * and positions; the rest are records (or signatures: head_dim/8 bits and
 * an fp16 scale per token), at most NMAX tokens; for signatures flag
 * bits 4 and 5 pick the score mode and the GQA combination. Two NaNs compare equal
 * whatever their payloads (a NaN's payload is not part of any format). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"

enum { NMAX = 40, QMAX = 4 };   /* 40 tokens: two and a half 16-lane groups, every tail */

/* RoPE tables by (head_dim, half or all rotary dims, layout): made once
 * (a table is 2 x 1024 x d/2 trigonometric calls, far more than an input's work) */
static kvg_rope_table tables[3][2][2];
static int            have_table[3][2][2];

static float kf_r[NMAX * KVARC_HEAD_DIM_MAX], kf_s[NMAX * KVARC_HEAD_DIM_MAX];
static float vf_r[NMAX * KVARC_HEAD_DIM_MAX], vf_s[NMAX * KVARC_HEAD_DIM_MAX];

static int same_floats(const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t x, y;
        memcpy(&x, &a[i], 4);
        memcpy(&y, &b[i], 4);
        if (x != y && !(isnan(a[i]) && isnan(b[i])))
            return 0;
    }
    return 1;
}

#define MUST(cond)                                                                              \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            fprintf(stderr, "fuzz_codec: %s differs from the reference (line %d)\n", #cond, __LINE__); \
            abort();                                                                            \
        }                                                                                       \
    } while (0)

static float rnd(uint64_t *s, float span)
{
    return ((float)(kvarc_splitmix64(s) >> 40) / (float)(1 << 24) * 2.0f - 1.0f) * span;
}

static void records(const uint8_t *in, size_t len, int fmt, int d, uint8_t flags, uint64_t seed)
{
    int rb = kvarc_record_bytes(fmt, d);
    if (rb <= 0)
        return;
    size_t n = len / (size_t)rb;
    if (n > NMAX)
        n = NMAX;
    kvarc_rotation rot;
    if (kvarc_rotation_init(&rot, d, seed))
        return;
    float mu_k[KVARC_HEAD_DIM_MAX], mu_v[KVARC_HEAD_DIM_MAX], q[QMAX * KVARC_HEAD_DIM_MAX];
    float s_r[NMAX], s_s[NMAX];
    uint64_t pos[NMAX];
    uint64_t st = seed;
    for (int i = 0; i < d; i++) {
        mu_k[i] = rnd(&st, 0.5f);
        mu_v[i] = rnd(&st, 0.5f);
    }
    int nq = 1 + (flags >> 2) % QMAX;
    for (int i = 0; i < nq * d; i++)
        q[i] = rnd(&st, 2.0f);
    for (size_t j = 0; j < n; j++) {
        uint64_t r = kvarc_splitmix64(&st);
        pos[j] = r % 3 == 0 ? r % 4096 : r % 3 == 1 ? r % (1ull << 32) : r >> 8;
    }
    kvg_codec c = { fmt, &rot, flags & 1 ? mu_k : NULL, flags & 2 ? mu_v : NULL };
    int rc_r = kvg_decode_ref(&c, in, n, kf_r, vf_r);
    int kr = kvg_key_scores_ref(&c, q, nq, in, n, s_r);
    kvg_rope rp;
    int rdims = (flags & 0x40) ? d / 2 : d, lay = (flags >> 5) & 1, di = d == 64 ? 0 : d == 128 ? 1 : 2;
    int have_rope = !kvg_rope_init(&rp, d, rdims, lay, 10000.0f);
    int *ht = &have_table[di][rdims != d][lay];
    if (have_rope && !*ht)
        *ht = kvg_rope_table_init(&tables[di][rdims != d][lay], &rp) ? -1 : 1;
    have_rope = have_rope && *ht == 1;
    kvg_rope_table tb = have_rope ? tables[di][rdims != d][lay] : (kvg_rope_table){ 0, NULL };
    float p_r[NMAX], p_s[NMAX];
    int pr = have_rope ? kvg_key_scores_pos_ref(&c, &rp, (flags & 0x80) ? &tb : NULL, q, nq, in, pos, n, p_r) : 0;
    for (int isa = KVG_ISA_BASE; isa <= KVG_ISA_V4; isa++) {
        if (!kvg_codec_isa_supported((kvg_isa)isa))
            continue;
        MUST(kvg_decode_isa((kvg_isa)isa, &c, in, n, kf_s, vf_s) == rc_r);
        if (!rc_r)
            MUST(same_floats(kf_r, kf_s, n * (size_t)d) && same_floats(vf_r, vf_s, n * (size_t)d));
        MUST(kvg_decode_isa((kvg_isa)isa, &c, in, n, NULL, vf_s) == rc_r);   /* one half only */
        if (!rc_r)
            MUST(same_floats(vf_r, vf_s, n * (size_t)d));
        MUST(kvg_key_scores_isa((kvg_isa)isa, &c, q, nq, in, n, s_s) == kr);
        if (!kr)
            MUST(same_floats(s_r, s_s, n));
        if (have_rope) {
            MUST(kvg_key_scores_pos_isa((kvg_isa)isa, &c, &rp, (flags & 0x80) ? &tb : NULL, q, nq, in, pos, n,
                                        p_s) == pr);
            if (!pr)
                MUST(same_floats(p_r, p_s, n));
        }
    }
}

static void signatures(const uint8_t *in, size_t len, int d, uint8_t flags, uint64_t seed)
{
    size_t per = (size_t)d / 8 + 2, n = len / per;
    if (n > NMAX)
        n = NMAX;
    static uint8_t bits[NMAX * KVARC_HEAD_DIM_MAX / 8];
    uint16_t scales[NMAX];
    for (size_t j = 0; j < n; j++) {
        memcpy(bits + j * (size_t)d / 8, in + j * per, (size_t)d / 8);
        scales[j] = (uint16_t)(in[j * per + (size_t)d / 8] | in[j * per + (size_t)d / 8 + 1] << 8);
    }
    kvarc_rotation rot;
    if (kvarc_rotation_init(&rot, d, seed))
        return;
    uint64_t st = seed;
    float mu_k[KVARC_HEAD_DIM_MAX], q[KVARC_HEAD_DIM_MAX], bias[QMAX * 8], ib[QMAX * NMAX];
    for (int i = 0; i < d; i++)
        mu_k[i] = rnd(&st, 0.5f);
    int nq = 1 + (flags >> 2) % QMAX;
    kvg_query qs[QMAX];
    for (int h = 0; h < nq; h++) {
        for (int i = 0; i < d; i++)
            q[i] = rnd(&st, 2.0f);
        if (kvg_query_prep_ref(&rot, (flags & 1) ? mu_k : NULL, KVARC_DTYPE_F32, q, &qs[h]))
            return;
    }
    for (size_t i = 0; i < sizeof bias / sizeof bias[0]; i++)
        bias[i] = rnd(&st, 3.0f);
    for (size_t i = 0; i < sizeof ib / sizeof ib[0]; i++)
        ib[i] = rnd(&st, 3.0f);
    uint64_t first = (flags & 0x80) ? kvarc_splitmix64(&st) % 100000 : 0;
    size_t nblk = n ? (size_t)kvg_blocks_of(first, n) : 0;
    const float *bb = (flags & 2) && nblk <= 8 ? bias : NULL;
    float s_r[NMAX], s_s[NMAX];
    int mode = (flags >> 4) & 1, comb = (flags >> 5) & 1;   /* one of the four an input: the reference is slow */
    int r = kvg_score_pos_ref((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, bits, scales, n, first, bb,
                              bb ? nblk : 0, s_r);
    MUST(kvg_score_pos((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, bits, scales, n, first, bb, bb ? nblk : 0,
                       s_s) == r);
    if (!r)
        MUST(same_floats(s_r, s_s, n));
    r = kvg_score_items_ref((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, bits, scales, n,
                            (flags & 0x40) ? ib : NULL, s_r);
    MUST(kvg_score_items((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, bits, scales, n, (flags & 0x40) ? ib : NULL,
                         s_s) == r);
    if (!r)
        MUST(same_floats(s_r, s_s, n));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 11)
        return 0;
    static const int dims[] = { 64, 128, 256 };
    int fmt = 1 + data[0] % 5, d = dims[(data[1] & 0x7f) % 3];
    uint64_t seed;
    memcpy(&seed, data + 3, 8);
    if (data[1] & 0x80)
        signatures(data + 11, size - 11, d, data[2], seed);
    else
        records(data + 11, size - 11, fmt, d, data[2], seed);
    return 0;
}
