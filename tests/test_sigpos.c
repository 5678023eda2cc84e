/* test_sigpos: kind-2 (true-position) signatures and their scores
 * (gpu/sigpos_ref.c, SCHEMA.md section 6.2).
 *
 * - which pairs are slow, and bad RoPE refused;
 * - without RoPE a kind-2 signature is the encoder's signature;
 * - scores with a bias per block equal kind-1 scores with that bias, block
 *   by block, for both GQA combines; Hamming ignores the biases;
 * - the block bias is q_r . (the block's centering), computed here
 *   independently; the table path equals the direct one bit for bit; an
 *   overflowing bias is refused;
 * - retrieval at true positions on Llama-like keys (large means in the
 *   slow pairs, RoPE on every dimension, theta 500000, keys spread over
 *   1M positions): a needle matched at its true distance ranks first, and
 *   the shortlist of 512 holds >= 90% of the exact top-64 by the logit
 *   attention computes; the position-free score at a fixed distance (what
 *   true mode did before kind 2) does not (the test can fail);
 * - stage 2 at true positions equals the exact turned logit for lossless
 *   records, with and without the angle table; the table's angles equal
 *   the direct ones;
 * - a NaN key or query is refused, naming the token. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define D 128
#define THETA 500000.0f

static void rope_cases(void)
{
    kvg_rope r;
    CHECK_RC(kvg_rope_init(&r, D, D, 0, THETA), 0);
    int slow = 0;
    for (int i = 0; i < D / 2; i++)
        slow += pow(THETA, -2.0 * i / D) <= 1.0 / 320;
    CHECK(r.n_slow == slow && r.first_slow + r.n_slow == D / 2 && slow > 20 && slow < 45,
          "theta 500000: %d slow pairs from %d, want %d", r.n_slow, r.first_slow, slow);
    CHECK_RC(kvg_rope_init(&r, 64, 0, 0, 10000.0f), 0);
    CHECK(r.n_slow == 0 && r.rotary_dims == 0, "no RoPE: nothing turns");
    CHECK_RC(kvg_rope_init(&r, D, D, 2, THETA), -EINVAL);
    CHECK_RC(kvg_rope_init(&r, D, D, 0, NAN), -EINVAL);
    CHECK_RC(kvg_rope_init(&r, D, D, 0, 0.0f), -EINVAL);
    CHECK_RC(kvg_rope_init(&r, 96, 96, 0, THETA), -EINVAL);
}

/* Llama-like pre-RoPE keys: a mean large in the slow pairs, outliers, noise. */
static void llama_keys(tu_rng *g, const kvg_rope *r, float *mu, float *k, size_t n)
{
    for (int i = 0; i < D; i++) {
        int pair = i % (D / 2);
        mu[i] = (pair >= r->first_slow ? 3.0f : 0.3f) * tu_gauss(g);
    }
    for (size_t t = 0; t < n; t++)
        for (int i = 0; i < D; i++)
            k[t * D + i] = mu[i] + (i % 29 == 3 ? 3.0f : 1.0f) * tu_gauss(g);
}

static void no_rope_equals_encoder(void)
{
    tu_rng g = { 11 };
    kvg_rope r;
    kvarc_rotation rot;
    CHECK_RC(kvg_rope_init(&r, D, 0, 0, THETA), 0);
    kvarc_rotation_init(&rot, D, 99);
    static float mu[D], k[40 * D], v[40 * D];
    llama_keys(&g, &r, mu, k, 40);
    for (int i = 0; i < 40 * D; i++)
        v[i] = tu_gauss(&g);
    uint8_t rec[40 * 104], b1[40 * D / 8], b2[40 * D / 8];
    uint16_t s1[40], s2[40];
    kvg_codec c = { KVARC_FMT_Q3, &rot, mu, NULL };
    CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, 40, rec, b1, s1, NULL), 0);
    CHECK_RC(kvg_sig_pos_ref(&r, &rot, mu, k, 1000003, 40, b2, s2, NULL), 0);
    CHECK(!memcmp(b1, b2, sizeof b1) && !memcmp(s1, s2, sizeof s1), "without RoPE, kind 2 is the encoder's signature");
}

static void block_scores(void)
{
    tu_rng g = { 12 };
    enum { N = 300, Q = 4 };
    const uint64_t first = 37;                         /* not on a block boundary */
    const size_t nblk = kvg_blocks_of(first, N);
    static uint8_t bits[N * D / 8];
    uint16_t sc[N];
    for (size_t i = 0; i < sizeof bits; i++)
        bits[i] = (uint8_t)(kvarc_splitmix64(&g.s) >> 56);
    for (int j = 0; j < N; j++)
        sc[j] = kvarc_f32_to_f16(0.5f + (float)tu_uniform(&g));
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, D, 5);
    kvg_query qs[Q];
    float q[D], bb[Q * 8];
    for (int h = 0; h < Q; h++) {
        for (int i = 0; i < D; i++)
            q[i] = tu_gauss(&g);
        CHECK_RC(kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q, &qs[h]), 0);
    }
    for (size_t i = 0; i < Q * nblk; i++)
        bb[i] = 10.0f * tu_gauss(&g);
    for (int comb = 0; comb < 2; comb++) {
        float got[N], want[N];
        CHECK_RC(kvg_score_pos_ref(KVG_SCORE_ASYM, comb, qs, Q, bits, sc, N, first, bb, nblk, got), 0);
        for (size_t b = 0; b < nblk; b++) {
            uint64_t lo = (first / KVG_SIG_BLOCK + b) * KVG_SIG_BLOCK, hi = lo + KVG_SIG_BLOCK;
            lo = lo < first ? first : lo;
            hi = hi > first + N ? first + N : hi;
            kvg_query qb[Q];
            memcpy(qb, qs, sizeof qb);
            for (int h = 0; h < Q; h++)
                qb[h].bias = bb[h * nblk + b];
            CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, comb, qb, Q, bits + (lo - first) * D / 8, sc + (lo - first),
                                   hi - lo, want + (lo - first)), 0);
        }
        CHECK(!memcmp(got, want, sizeof got), "combine %d: block-biased scores equal kind-1 scores block by block", comb);
        CHECK_RC(kvg_score_pos_ref(KVG_SCORE_HAMMING, comb, qs, Q, bits, sc, N, first, bb, nblk, got), 0);
        CHECK_RC(kvg_score_ref(KVG_SCORE_HAMMING, comb, qs, Q, bits, sc, N, want), 0);
        CHECK(!memcmp(got, want, sizeof got), "Hamming ignores the biases");
    }
    float out[N];
    CHECK_RC(kvg_score_pos_ref(KVG_SCORE_ASYM, 0, qs, Q, bits, sc, N, first, bb, nblk - 1, out), -EINVAL);
}

static void bias_cases(void)
{
    tu_rng g = { 13 };
    for (int rd = 64; rd <= D; rd += 64) {             /* partial and full rotary */
        for (int lay = 0; lay < 2; lay++) {
            kvg_rope r;
            CHECK_RC(kvg_rope_init(&r, D, rd, lay, THETA), 0);
            float mu[D], q[D];
            for (int i = 0; i < D; i++) {
                mu[i] = tu_gauss(&g);
                q[i] = tu_gauss(&g);
            }
            const uint64_t b0 = 15600;
            enum { NB = 70 };
            float direct[NB], tab[NB];
            kvg_block_bias_ref(&r, mu, q, b0, NB, NULL, 0, direct);
            size_t stride = NB + 5;
            double *cs = malloc(2 * (size_t)r.n_slow * stride * sizeof *cs + 8);
            kvg_block_angles_pm(&r, b0 - 3, NB + 3, cs, stride);
            kvg_block_bias_ref(&r, mu, q, b0, NB, cs + 3, stride, tab);
            CHECK(!memcmp(direct, tab, sizeof tab), "rotary %d layout %d: table and direct block biases agree", rd, lay);
            /* the dispatched version (the widest vectors the CPU has) gives the same bits, with or without
             * the table, at every length (its vector loop and its tail) */
            int same = 1;
            for (size_t nb = 1; nb <= NB; nb++) {
                float fast[NB], fast_t[NB];
                CHECK_RC(kvg_block_bias(&r, mu, q, b0, nb, NULL, 0, fast), 0);
                CHECK_RC(kvg_block_bias(&r, mu, q, b0, nb, cs + 3, stride, fast_t), 0);
                same &= !memcmp(fast, direct, nb * sizeof *fast) && !memcmp(fast_t, direct, nb * sizeof *fast);
            }
            CHECK(same, "rotary %d layout %d: kvg_block_bias gives kvg_block_bias_ref's bits", rd, lay);
            /* 37 queries at once (past the 16 whose coefficients it keeps at a time), each with its own
             * centering, one without (no bias): each query's row is the reference's alone */
            enum { NQ = 37 };
            static float qn[NQ][D], mun[NQ][D], outn[NQ][NB + 3];
            const float *mup[NQ], *qp[NQ];
            float *op[NQ];
            for (int k = 0; k < NQ; k++) {
                for (int i = 0; i < D; i++) {
                    qn[k][i] = tu_gauss(&g);
                    mun[k][i] = tu_gauss(&g);
                }
                mup[k] = k == 5 ? NULL : mun[k];
                qp[k] = qn[(k * 7) % NQ];            /* in any order */
                op[k] = outn[(k * 7) % NQ];
            }
            int same_n = 1;
            for (int with_table = 0; with_table < 2; with_table++) {
                CHECK_RC(kvg_block_bias_n(&r, NQ, mup, qp, b0, NB, with_table ? cs + 3 : NULL, stride, op), 0);
                for (int k = 0; k < NQ; k++) {
                    float one[NB];
                    kvg_block_bias_ref(&r, mup[k], qp[k], b0, NB, NULL, 0, one);
                    same_n &= !memcmp(one, op[k], sizeof one);
                }
            }
            free(cs);
            CHECK(same_n, "rotary %d layout %d: kvg_block_bias_n gives each query the reference's bits", rd, lay);
            /* the tiled table (tiles of 32 blocks from block 0, only those b0.. needs filled): every query
             * the reference's bits, ranges starting inside a tile, on its edge, and a whole tile long */
            double *tl = malloc(kvg_block_angles_tm_len(&r, b0 + NB) * sizeof *tl);
            const uint64_t t0 = b0 / KVG_BIAS_TILE, nt = (b0 + NB - 1) / KVG_BIAS_TILE - t0 + 1;
            kvg_block_angles_tm(&r, t0, nt, tl);
            int same_t = 1;
            static const uint64_t offs[] = { 0, 3, 16, 17, 38 };    /* b0 + 16 is a tile's first block */
            static const size_t nbs[] = { 1, 5, 16, 31, 32, 33, 54 };
            for (int oi = 0; oi < 5; oi++)
                for (int ni = 0; ni < 7; ni++) {
                    const uint64_t off = offs[oi];
                    const size_t nb = nbs[ni];
                    if (off + nb > NB)
                        continue;
                    CHECK_RC(kvg_block_bias_nt(&r, NQ, mup, qp, b0 + off, nb, tl, op), 0);
                    for (int k = 0; k < NQ; k++) {
                        float one[NB];
                        kvg_block_bias_ref(&r, mup[k], qp[k], b0 + off, nb, NULL, 0, one);
                        same_t &= !memcmp(one, op[k], nb * sizeof *one);
                    }
                }
            CHECK_RC(kvg_block_bias_nt(&r, NQ, mup, qp, b0, NB, NULL, op), -EINVAL);
            free(tl);
            CHECK(same_t, "rotary %d layout %d: kvg_block_bias_nt over the tiled table gives the reference's bits", rd,
                  lay);
            /* independently: mu masked to the unturned dims and the slow pairs, turned to the center */
            int worst = 0;
            for (int b = 0; b < NB; b++) {
                float c[D];
                memcpy(c, mu, sizeof c);
                for (int i = 0; i < r.rotary_dims / 2; i++)
                    if (i < r.first_slow) {
                        int a = lay ? 2 * i : i, bb = lay ? 2 * i + 1 : i + r.rotary_dims / 2;
                        c[a] = c[bb] = 0.0f;
                    }
                kvg_rope_ref(c, D, rd, lay, THETA, kvg_block_center(b0 + (uint64_t)b));
                double dot = 0, mag = 0;
                for (int i = 0; i < D; i++) {
                    dot += (double)q[i] * c[i];
                    mag += fabs((double)q[i] * c[i]);
                }
                worst |= fabs(dot - direct[b]) > 1e-5 * (mag + 1);
            }
            CHECK(!worst, "rotary %d layout %d: the block bias is q . (the block's centering)", rd, lay);
            float big[D], o1[2];
            for (int i = 0; i < D; i++)
                big[i] = 1e30f;
            CHECK_RC(kvg_block_bias_ref(&r, big, big, b0, 2, NULL, 0, o1), KVARC_ENONFINITE);
            CHECK_RC(kvg_block_bias(&r, big, big, b0, 2, NULL, 0, o1), KVARC_ENONFINITE);
        }
    }
}

/* The exact turned logit q_r . RoPE(pos) k in double. */
static double logit(const kvg_rope *r, const float *q_r, const float *k, uint64_t pos)
{
    float kr[D];
    memcpy(kr, k, sizeof kr);
    kvg_rope_apply(kr, D, r->rotary_dims, r->layout, r->inv_freq, (double)pos);
    double s = 0;
    for (int i = 0; i < D; i++)
        s += (double)q_r[i] * kr[i];
    return s;
}

static int by_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void retrieval_at_true_positions(void)
{
    enum { N = 8192, TOPK = 64, SL = 512 };
    tu_rng g = { 14 };
    kvg_rope r;
    kvarc_rotation rot;
    CHECK_RC(kvg_rope_init(&r, D, D, 0, THETA), 0);
    kvarc_rotation_init(&rot, D, 0x6b76617263ull);
    float *k = malloc(sizeof(float) * N * D), mu[D], q[D], q_r[D], dir[D];
    uint64_t *pos = malloc(N * sizeof *pos);
    llama_keys(&g, &r, mu, k, N);
    for (int t = 0; t < N; t++)                         /* spread over [0, 1M) */
        pos[t] = (uint64_t)t * 128 + (kvarc_splitmix64(&g.s) % 128);
    const int needle = 5000;
    const uint64_t m = 1048576 + 300;
    double nn = 0;
    for (int i = 0; i < D; i++) {
        dir[i] = tu_gauss(&g);
        nn += dir[i] * dir[i];
    }
    for (int i = 0; i < D; i++) {                        /* the needle: mean + a strong direction of its own */
        dir[i] = (float)(dir[i] / sqrt(nn));
        k[needle * D + i] = mu[i] + 16.0f * dir[i];
    }
    /* the query matches the needle at its true distance: RoPE(m) q = RoPE(n) dir * 3, plus noise */
    memcpy(q, dir, sizeof q);
    kvg_rope_ref(q, D, D, 0, THETA, (double)pos[needle] - (double)m);
    for (int i = 0; i < D; i++)
        q[i] = 3.0f * q[i] + 0.1f * tu_gauss(&g);
    memcpy(q_r, q, sizeof q_r);
    kvg_rope_apply(q_r, D, D, 0, r.inv_freq, (double)m);

    double *exact = malloc(N * sizeof *exact), *sorted = malloc(N * sizeof *sorted);
    float *s2 = malloc(N * sizeof *s2), *s1 = malloc(N * sizeof *s1);
    kvg_query qp, q1;
    CHECK_RC(kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q_r, &qp), 0);
    /* kind 1 as true mode scored before: the query turned by a fixed distance of 256 */
    float qd[D];
    memcpy(qd, q, sizeof qd);
    kvg_rope_ref(qd, D, D, 0, THETA, 256.0);
    CHECK_RC(kvg_query_prep_ref(&rot, mu, KVARC_DTYPE_F32, qd, &q1), 0);
    kvg_codec c = { KVARC_FMT_Q3, &rot, mu, NULL };
    int fails = 0;
    for (int t = 0; t < N; t++) {
        uint8_t bits[D / 8], rec[104], b1[D / 8];
        uint16_t sc, sc1;
        float bias, vz[D] = { 0 };
        exact[t] = sorted[t] = logit(&r, q_r, k + (size_t)t * D, pos[t]);
        fails |= kvg_sig_pos_ref(&r, &rot, mu, k + (size_t)t * D, pos[t], 1, bits, &sc, NULL);
        kvg_block_bias_ref(&r, mu, q_r, pos[t] / KVG_SIG_BLOCK, 1, NULL, 0, &bias);
        fails |= kvg_score_pos_ref(KVG_SCORE_ASYM, 0, &qp, 1, bits, &sc, 1, pos[t], &bias, 1, &s2[t]);
        fails |= kvg_encode_ref(&c, KVARC_DTYPE_F32, k + (size_t)t * D, vz, 1, rec, b1, &sc1, NULL);
        fails |= kvg_score_ref(KVG_SCORE_ASYM, 0, &q1, 1, b1, &sc1, 1, &s1[t]);
    }
    CHECK(!fails, "scoring failed");
    qsort(sorted, N, sizeof *sorted, by_desc);
    double cut = sorted[TOPK - 1];
    uint32_t *i2 = malloc(SL * 4), *i1 = malloc(SL * 4);
    CHECK(kvg_topk_ref(s2, N, SL, i2, NULL, NULL) == SL && kvg_topk_ref(s1, N, SL, i1, NULL, NULL) == SL, "top-k");
    int rec2 = 0, rec1 = 0;
    for (int j = 0; j < SL; j++) {
        rec2 += exact[i2[j]] >= cut;
        rec1 += exact[i1[j]] >= cut;
    }
    CHECK(exact[needle] == sorted[0], "the needle has the largest exact logit");
    CHECK(i2[0] == (uint32_t)needle, "kind 2 ranks the needle first (got token %u)", i2[0]);
    CHECK(rec2 >= TOPK * 9 / 10, "kind 2: the shortlist of %d holds %d of the exact top %d", SL, rec2, TOPK);
    CHECK(rec1 < TOPK / 2, "the fixed-distance score holds only %d of the top %d (it must miss them)", rec1, TOPK);
    printf("true positions, 8192 keys over 1M: kind 2 recall %d/%d, fixed-distance score %d/%d\n", rec2, TOPK, rec1,
           TOPK);
    free(k); free(pos); free(exact); free(sorted); free(s2); free(s1); free(i2); free(i1);
}

static void stage2_cases(void)
{
    tu_rng g = { 15 };
    enum { N = 64 };
    kvg_rope r;
    kvarc_rotation rot;
    kvg_rope_table tb;
    CHECK_RC(kvg_rope_init(&r, D, D, 0, THETA), 0);
    CHECK_RC(kvg_rope_table_init(&tb, &r), 0);
    kvarc_rotation_init(&rot, D, 3);
    /* angles: table vs direct below 2^24 (where the direct angle's own
     * rounding, ~pos x 2^-53 rad, is below 4e-9); from 2^32 on the table
     * hands over to the direct angles */
    double worst = 0, a[D], b[D];
    int same = 1;
    for (int t = 0; t < 200; t++) {
        uint64_t p = kvarc_splitmix64(&g.s) >> (t < 100 ? 40 : 28);
        kvg_rope_table_angles(&tb, &r, p, a);
        kvg_rope_angles(b, D, D, r.inv_freq, (double)p);
        for (int i = 0; i < D && t < 100; i++)
            worst = fmax(worst, fabs(a[i] - b[i]));
        if (p >> 32)
            same &= !memcmp(a, b, sizeof a);
    }
    CHECK(worst < 1e-8, "table angles differ from direct ones by %g", worst);
    CHECK(same, "past 2^32 the table gives the direct angles");
    /* f16 records: stage-2 scores are the exact turned logits */
    static uint16_t kh[N * D], vh[N * D];
    float kf[N * D], q[2 * D], sc[N], sct[N];
    uint64_t pos[N];
    uint8_t rec[N * 512], bits[N * D / 8];
    uint16_t ss[N];
    for (int i = 0; i < N * D; i++) {
        kh[i] = kvarc_f32_to_f16(tu_gauss(&g));
        vh[i] = kvarc_f32_to_f16(tu_gauss(&g));
        kf[i] = kvarc_f16_to_f32(kh[i]);
    }
    for (int i = 0; i < 2 * D; i++)
        q[i] = tu_gauss(&g);
    for (int t = 0; t < N; t++)
        pos[t] = kvarc_splitmix64(&g.s) % 3000000;
    kvg_codec c = { KVARC_FMT_F16, &rot, NULL, NULL };
    CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F16, kh, vh, N, rec, bits, ss, NULL), 0);
    CHECK_RC(kvg_key_scores_pos_ref(&c, &r, NULL, q, 2, rec, pos, N, sc), 0);
    CHECK_RC(kvg_key_scores_pos_ref(&c, &r, &tb, q, 2, rec, pos, N, sct), 0);
    double w = 0, wt = 0;
    for (int t = 0; t < N; t++) {
        double e = fmax(logit(&r, q, kf + t * D, pos[t]), logit(&r, q + D, kf + t * D, pos[t]));
        w = fmax(w, fabs(sc[t] - e) / (fabs(e) + 1));
        wt = fmax(wt, fabs(sct[t] - sc[t]) / (fabs(sc[t]) + 1));
    }
    CHECK(w < 1e-5, "stage 2 at true positions differs from the exact logit by %g", w);
    CHECK(wt < 1e-6, "the angle table changes stage-2 scores by %g", wt);
    q[3] = NAN;
    CHECK_RC(kvg_key_scores_pos_ref(&c, &r, &tb, q, 1, rec, pos, N, sc), KVARC_ENONFINITE);
    kvg_rope_table_free(&tb);
    /* a NaN key is refused, naming it */
    float mu[D] = { 0 };
    size_t bad = 99;
    kf[3 * D + 7] = NAN;
    CHECK_RC(kvg_sig_pos_ref(&r, &rot, mu, kf, 10, N, bits, ss, &bad), KVARC_ENONFINITE);
    CHECK(bad == 3, "the NaN token is named (got %zu)", bad);
}

int main(void)
{
    rope_cases();
    no_rope_equals_encoder();
    block_scores();
    bias_cases();
    retrieval_at_true_positions();
    stage2_cases();
    return tu_finish("test_sigpos");
}
