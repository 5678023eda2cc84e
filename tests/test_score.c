/* test_score: stage-1 scores equal an independent per-token computation
 * bit for bit (asymmetric and Hamming, GQA max and mean), the asymmetric
 * estimator tracks the true q.k (centering bias added back), a planted
 * needle lands in the shortlist, and bad input gets its defined error.
 * The coarse tier's entry points: kvg_score_items equals
 * kvg_score_items_ref, which is kvg_score_pos_ref item by item with the
 * item's own bias; kvg_score_runs equals kvg_score_pos_ref run by run
 * (ragged runs across block boundaries, block biases sliced per run), at
 * head_dim 64, 128 and 256 (the AVX-512 scan where the CPU has it). */
#include <errno.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define N 4096
#define D 128

static float naive_asym(const kvg_query *q, const uint8_t *bits, uint16_t scale)
{
    int dot = 0;
    for (int i = 0; i < q->head_dim; i++)
        dot += ((bits[i / 8] >> (i % 8)) & 1) ? q->q8[i] : -q->q8[i];
    return ((float)dot * q->qscale) * kvarc_f16_to_f32(scale) + q->bias;
}

static float naive_hamming(const kvg_query *q, const uint8_t *bits)
{
    int agree = 0;
    for (int i = 0; i < q->head_dim; i++)
        agree += (((bits[i / 8] ^ q->bits[i / 8]) >> (i % 8)) & 1) == 0;
    return (float)(2 * agree - q->head_dim);
}

/* kvg_score_pos (the run-time choice: AVX-512 where the CPU has it) gives
 * the reference's bits: head_dim 64, 128 and 256 (signatures of 1, 2, 4
 * words), GQA groups 1..8, both combines, with and without block biases,
 * ranges not a multiple of 8 nor block-aligned, scales 0, subnormal and
 * large. */
static void dispatch_case(int d)
{
    tu_rng g = { 31 };
    enum { NS = 1000 };
    static uint8_t bits[NS * 32];
    uint16_t sc[NS];
    for (size_t i = 0; i < sizeof bits; i++)
        bits[i] = (uint8_t)(kvarc_splitmix64(&g.s) >> 56);
    for (int j = 0; j < NS; j++)
        sc[j] = j % 97 == 0 ? 0 : j % 89 == 0 ? 1 : j % 83 == 0 ? 0x7bff : kvarc_f32_to_f16((float)tu_uniform(&g) * 4);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, d, 9);
    kvg_query qs[8];
    float q[256], bb[8 * 20], want[NS], got[NS];
    for (int h = 0; h < 8; h++) {
        for (int i = 0; i < d; i++)
            q[i] = tu_gauss(&g) * (float)(h + 1);
        CHECK_RC(kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q, &qs[h]), 0);
        qs[h].bias = tu_gauss(&g);
    }
    for (int i = 0; i < 8 * 20; i++)
        bb[i] = 30.0f * tu_gauss(&g);
    int bad = 0;
    for (int nq = 1; nq <= 8; nq += nq < 4 ? 1 : 4)
        for (int comb = 0; comb < 2; comb++)
            for (int withb = 0; withb < 2; withb++)
                for (size_t n = 1; n <= NS; n += n < 24 ? 1 : 333) {   /* every short group size */
                    uint64_t first = 1000003 + n;
                    CHECK_RC(kvg_score_pos_ref(KVG_SCORE_ASYM, comb, qs, nq, bits, sc, n, first, withb ? bb : NULL, 20,
                                               want), 0);
                    CHECK_RC(kvg_score_pos(KVG_SCORE_ASYM, comb, qs, nq, bits, sc, n, first, withb ? bb : NULL, 20, got),
                             0);
                    bad += memcmp(want, got, n * 4) != 0;
                }
    CHECK(bad == 0, "head_dim %d: the %s scan differs from the reference in %d cases", d, kvg_score_kernel(d), bad);
    printf("stage-1 kernel at head_dim %d: %s\n", d, kvg_score_kernel(d));
}

/* nq prepared queries of head_dim d (each with a bias of its own). */
static void make_queries(tu_rng *g, int d, kvg_query *qs, int nq)
{
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, d, 9 + (uint64_t)d), 0);
    float q[KVARC_HEAD_DIM_MAX];
    for (int h = 0; h < nq; h++) {
        for (int i = 0; i < d; i++)
            q[i] = tu_gauss(g) * (float)(h + 1);
        CHECK_RC(kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q, &qs[h]), 0);
        qs[h].bias = tu_gauss(g);
    }
}

/* What kvg_score_runs must give: kvg_score_pos_ref on each run alone
 * (its own first position, the block biases of the blocks it spans
 * copied out), concatenated. Returns the total length. */
static size_t runs_want(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int nq, int d,
                        const uint8_t *bits, const uint16_t *sc, uint64_t first, const uint64_t *runs, size_t nr,
                        const float *bb, size_t nblk, float *want)
{
    size_t o = 0, sb = (size_t)d / 8;
    for (size_t r = 0; r < nr; r++) {
        uint64_t a = runs[2 * r], n = runs[2 * r + 1], p0 = first + a;
        if (!n)
            continue;
        uint64_t b0 = p0 / 64 - first / 64, nbr = (p0 + n - 1) / 64 - p0 / 64 + 1;
        float rb[8 * 4];
        for (int h = 0; h < nq && bb; h++)
            for (uint64_t k = 0; k < nbr; k++)
                rb[(size_t)h * nbr + k] = bb[(size_t)h * nblk + b0 + k];
        CHECK_RC(kvg_score_pos_ref(mode, comb, qs, nq, bits + a * sb, sc + a, n, p0, bb ? rb : NULL, nbr, want + o),
                 0);
        o += n;
    }
    return o;
}

/* kvg_score_runs against runs_want, bit for bit: runs of 0..100 tokens
 * in any order (overlapping too), many starting a few tokens before a
 * 64-position boundary, first_pos not a multiple of 64, GQA groups of
 * 1..8 at head_dim 128 (1, 3, 8 at 64 and 256), both combines and modes,
 * with and without block biases.
 * The output past the runs' total is never written. */
static void runs_case(int d)
{
    tu_rng g = { 1000 + (uint64_t)d };
    enum { NS = 700, MAXR = 12 };
    const size_t sb = (size_t)d / 8;
    uint8_t *bits = malloc(NS * sb);
    uint16_t sc[NS];
    tu_random_sigs(&g, d, NS, bits, sc);
    kvg_query qs[8];
    make_queries(&g, d, qs, 8);
    const uint64_t first = 64 * 1000 + 37;
    const size_t nblk = (first + NS - 1) / 64 - first / 64 + 1;
    float *bb = malloc(8 * nblk * sizeof *bb);
    for (size_t i = 0; i < 8 * nblk; i++)
        bb[i] = 30.0f * tu_gauss(&g);
    static float want[MAXR * 100], got[MAXR * 100 + 8];
    uint64_t runs[2 * MAXR];
    int bad = 0, cases = 0, crossing = 0, trials = d == 128 ? 10 : 4;
    for (int trial = 0; trial < trials; trial++) {
        size_t nr = 1 + (size_t)(kvarc_splitmix64(&g.s) % MAXR);
        for (size_t r = 0; r < nr; r++) {
            uint64_t u = kvarc_splitmix64(&g.s), n = u % 8 == 0 ? 0 : (u >> 8) % 101, a;
            if ((u >> 20) & 1) {      /* start 1..n-1 tokens before a block boundary */
                uint64_t bnd = 64 * (1 + (u >> 24) % (NS / 64 - 2)) - first % 64, back = 1 + (u >> 40) % (n ? n : 1);
                a = bnd - (back < bnd ? back : 0);
            } else {
                a = (u >> 24) % (NS - n + 1);
            }
            if (a + n > NS)
                a = NS - n;
            runs[2 * r] = a;
            runs[2 * r + 1] = n;
            crossing += n && (first + a) / 64 != (first + a + n - 1) / 64;
        }
        for (int mode = 0; mode < 2; mode++)
            for (int nq = 1; nq <= 8; nq += d != 128 ? (nq < 3 ? 2 : 5) : 1)
                for (int comb = 0; comb < 2; comb++)
                    for (int withb = 0; withb < 2; withb++) {
                        const float *b = withb ? bb : NULL;
                        size_t tot = runs_want((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, d, bits, sc, first,
                                               runs, nr, b, nblk, want);
                        memset(got, 0xa5, sizeof got);
                        CHECK_RC(kvg_score_runs((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, bits, sc, first, runs,
                                                nr, b, nblk, got), 0);
                        uint8_t untouched[8 * 4];
                        memset(untouched, 0xa5, sizeof untouched);
                        bad += memcmp(want, got, tot * 4) != 0 || memcmp(got + tot, untouched, sizeof untouched) != 0;
                        cases++;
                    }
    }
    CHECK(bad == 0, "head_dim %d: kvg_score_runs (%s) differs from kvg_score_pos_ref run by run in %d of %d cases",
          d, kvg_score_kernel(d), bad, cases);
    CHECK(crossing >= 2 * trials, "only %d runs crossed a block boundary", crossing);

    /* the block biases must cover the runs' whole extent (the widest run
     * in the middle): one block short is -EINVAL */
    uint64_t fp = 64 * 5 + 40, ex[6] = { 10, 30, 0, 100, 50, 20 };   /* extent [0, 100): blocks 5..7 */
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, sc, fp, ex, 3, bb, 3, got), 0);
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, sc, fp, ex, 3, bb, 2, got), -EINVAL);
    CHECK_RC(kvg_score_runs(KVG_SCORE_HAMMING, KVG_COMBINE_MEAN, qs, 2, bits, sc, fp, ex, 3, bb, 2, got), -EINVAL);
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, sc, fp, ex, 3, NULL, 0, got), 0);
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, sc, fp, NULL, 1, NULL, 0, got), -EINVAL);
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, sc, fp, NULL, 0, NULL, 0, got), 0);
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, NULL, fp, ex, 3, NULL, 0, got), -EINVAL);
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, sc, fp, ex, 3, NULL, 0, NULL), -EINVAL);
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 0, bits, sc, fp, ex, 3, NULL, 0, got), -EINVAL);
    CHECK_RC(kvg_score_runs(KVG_SCORE_ASYM, (kvg_combine)7, qs, 2, bits, sc, fp, ex, 3, NULL, 0, got), -EINVAL);
    free(bits);
    free(bb);
}

/* kvg_score_items equals kvg_score_items_ref bit for bit: at head_dim 128
 * every n up to 24 (each short group of the scan), then longer, GQA groups
 * of 1..8; at 64 and 256 n up to 13, groups of 1, 3, 8; both
 * combines and modes, item biases or NULL. And kvg_score_items_ref is its
 * definition: kvg_score_pos_ref of item j alone, each query's bias
 * replaced by item j's (NULL: left as it is). */
static void items_case(int d)
{
    tu_rng g = { 2000 + (uint64_t)d };
    enum { NI = 400 };
    const size_t sb = (size_t)d / 8;
    uint8_t *bits = malloc(NI * sb);
    uint16_t sc[NI];
    tu_random_sigs(&g, d, NI, bits, sc);
    kvg_query qs[8], q1[8];
    make_queries(&g, d, qs, 8);
    float *ib = malloc(8 * NI * sizeof *ib), want[NI], got[NI + 8], one;
    for (size_t i = 0; i < 8 * NI; i++)
        ib[i] = 30.0f * tu_gauss(&g);
    int bad = 0, bad_def = 0, cases = 0;
    for (int mode = 0; mode < 2; mode++)
        for (int nq = 1; nq <= 8; nq += d != 128 ? (nq < 3 ? 2 : 5) : 1)
            for (int comb = 0; comb < 2; comb++)
                for (int withb = 0; withb < 2; withb++)
                    for (size_t n = 1; n <= (d == 128 ? NI : 13); n += n < 24 ? 1 : 75) {
                        const float *b = withb ? ib : NULL;
                        CHECK_RC(kvg_score_items_ref((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, bits, sc, n, b,
                                                     want), 0);
                        memset(got, 0xa5, sizeof got);
                        CHECK_RC(kvg_score_items((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, bits, sc, n, b, got),
                                 0);
                        uint8_t untouched[8 * 4];
                        memset(untouched, 0xa5, sizeof untouched);
                        bad += memcmp(want, got, n * 4) != 0 || memcmp(got + n, untouched, sizeof untouched) != 0;
                        cases++;
                        if (n != 13)
                            continue;
                        for (size_t j = 0; j < n; j++) {
                            for (int h = 0; h < nq; h++) {
                                q1[h] = qs[h];
                                if (b)
                                    q1[h].bias = b[(size_t)h * n + j];
                            }
                            CHECK_RC(kvg_score_pos_ref((kvg_score_mode)mode, (kvg_combine)comb, q1, nq, bits + j * sb,
                                                       sc + j, 1, 0, NULL, 0, &one), 0);
                            bad_def += memcmp(&one, &want[j], 4) != 0;
                        }
                    }
    CHECK(bad == 0, "head_dim %d: kvg_score_items (%s) differs from kvg_score_items_ref in %d of %d cases", d,
          kvg_score_kernel(d), bad, cases);
    CHECK(bad_def == 0, "head_dim %d: kvg_score_items_ref differs from kvg_score_pos_ref item by item %d times", d,
          bad_def);
    CHECK_RC(kvg_score_items(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 0, bits, sc, 8, NULL, got), -EINVAL);
    CHECK_RC(kvg_score_items(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 65, bits, sc, 8, NULL, got), -EINVAL);
    CHECK_RC(kvg_score_items(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, NULL, 8, ib, got), -EINVAL);
    CHECK_RC(kvg_score_items(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, sc, 8, ib, NULL), -EINVAL);
    CHECK_RC(kvg_score_items(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, NULL, NULL, 0, NULL, NULL), 0);
    CHECK_RC(kvg_score_items_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 2, bits, NULL, 8, ib, got), -EINVAL);
    free(bits);
    free(ib);
}

int main(void)
{
    dispatch_case(64);
    dispatch_case(128);
    dispatch_case(256);
    for (int d = 64; d <= 256; d *= 2) {
        runs_case(d);
        items_case(d);
    }
    tu_rng r = { 99 };
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, D, 77), 0);
    float *k = malloc(sizeof(float) * N * D), *v = calloc(N * D, sizeof(float));
    uint8_t *rec = malloc((size_t)N * 104), *bits = malloc(N * D / 8);
    uint16_t *ss = malloc(N * 2);
    float *scores = malloc(N * 4), mu[D];
    tu_keys_outliers(&r, k, N, D);
    for (int i = 0; i < D; i++) {
        double s = 0;
        for (int t = 0; t < N; t++)
            s += k[(size_t)t * D + i];
        mu[i] = (float)(s / N);
    }
    /* a needle: token 1234's key is the query direction, scaled to a
     * typical key norm */
    float qv[4][D];
    for (int h = 0; h < 4; h++)
        for (int i = 0; i < D; i++)
            qv[h][i] = tu_gauss(&r);
    double qn = 0, kn = 0;
    for (int i = 0; i < D; i++) {
        qn += (double)qv[0][i] * qv[0][i];
        kn += ((double)k[i] - mu[i]) * ((double)k[i] - mu[i]);
    }
    for (int i = 0; i < D; i++)
        k[1234 * D + i] = mu[i] + (float)(qv[0][i] * sqrt(kn / qn));

    kvg_codec c = { KVARC_FMT_Q3, &rot, mu, NULL };
    CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, N, rec, bits, ss, NULL), 0);
    kvg_query q[4];
    for (int h = 0; h < 4; h++)
        CHECK_RC(kvg_query_prep_ref(&rot, mu, KVARC_DTYPE_F32, qv[h], &q[h]), 0);

    /* bit-exact against the naive per-token formula */
    for (int mode = 0; mode < 2; mode++)
        for (int comb = 0; comb < 2; comb++) {
            CHECK_RC(kvg_score_ref((kvg_score_mode)mode, (kvg_combine)comb, q, 4, bits, ss, N, scores), 0);
            size_t bad = 0;
            for (int t = 0; t < N; t++) {
                float want = 0;
                for (int h = 0; h < 4; h++) {
                    float s = mode == KVG_SCORE_ASYM ? naive_asym(&q[h], bits + t * D / 8, ss[t])
                                                     : naive_hamming(&q[h], bits + t * D / 8);
                    want = h == 0 ? s : comb == KVG_COMBINE_MAX ? (s > want ? s : want) : want + s;
                }
                if (comb == KVG_COMBINE_MEAN)
                    want /= 4.0f;
                bad += memcmp(&want, &scores[t], 4) != 0;
            }
            CHECK(bad == 0, "mode %d comb %d: %zu scores differ from the naive formula", mode, comb, bad);
        }

    /* the estimator tracks the true (uncentered) q.k */
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, q, 1, bits, ss, N, scores), 0);
    double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
    int above = 0;
    for (int t = 0; t < N; t++) {
        double tru = 0;
        for (int i = 0; i < D; i++)
            tru += (double)qv[0][i] * k[(size_t)t * D + i];
        sx += tru; sy += scores[t]; sxx += tru * tru; syy += (double)scores[t] * scores[t];
        sxy += tru * scores[t];
        above += t != 1234 && scores[t] >= scores[1234];
    }
    double corr = (N * sxy - sx * sy) / sqrt((N * sxx - sx * sx) * (N * syy - sy * sy));
    printf("  asym estimate vs true q.k: correlation %.4f, needle rank %d of %d\n", corr, above, N);
    /* 1-bit estimators reach sqrt(2/pi) = 0.80 on isotropic keys; these
     * keys are anisotropic (outlier channels), which costs some */
    CHECK(corr > 0.6, "asymmetric estimate correlates only %.3f with q.k", corr);

    /* recall of the exact top 64 within a shortlist of 512 (8x) */
    float *tru = malloc(N * 4);
    uint32_t top[64], sl[512];
    for (int t = 0; t < N; t++) {
        double a = 0;
        for (int i = 0; i < D; i++)
            a += (double)qv[0][i] * k[(size_t)t * D + i];
        tru[t] = (float)a;
    }
    CHECK(kvg_topk_ref(tru, N, 64, top, NULL, NULL) == 64, "exact top 64");
    int hits[2] = { 0, 0 };
    for (int mode = 0; mode < 2; mode++) {
        CHECK_RC(kvg_score_ref((kvg_score_mode)mode, KVG_COMBINE_MAX, q, 1, bits, ss, N, scores), 0);
        CHECK(kvg_topk_ref(scores, N, 512, sl, NULL, NULL) == 512, "shortlist");
        int hit = 0;
        for (int a = 0; a < 64; a++)
            for (int b = 0; b < 512; b++)
                hit += top[a] == sl[b];
        printf("  %s: recall of exact top-64 in a 512 shortlist of %d keys: %.3f\n",
               mode ? "hamming" : "asym", N, hit / 64.0);
        hits[mode] = hit;
    }
    /* measured 47 and 38 on these keys (random Gaussian keys have no
     * standout top 64; needles do, see above) */
    CHECK(hits[0] >= 42 && hits[1] >= 32, "recall asym %d/64, hamming %d/64", hits[0], hits[1]);
    CHECK(hits[0] > hits[1], "the asymmetric estimator must beat plain Hamming");
    free(tru);
    CHECK(above < 8, "needle ranked %d: it must lead the shortlist", above);

    /* a zero query scores every token at its bias */
    float zq[D] = { 0 };
    kvg_query z;
    CHECK_RC(kvg_query_prep_ref(&rot, mu, KVARC_DTYPE_F32, zq, &z), 0);
    CHECK(z.qscale == 0.0f && z.bias == 0.0f, "zero query: qscale %g bias %g", z.qscale, z.bias);
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, &z, 1, bits, ss, 8, scores), 0);
    CHECK(scores[0] == 0.0f && scores[7] == 0.0f, "zero query scores %g %g", scores[0], scores[7]);

    /* bad input */
    zq[3] = NAN;
    CHECK_RC(kvg_query_prep_ref(&rot, mu, KVARC_DTYPE_F32, zq, &z), KVARC_ENONFINITE);
    CHECK_RC(kvg_query_prep_ref(&rot, mu, (kvarc_dtype)5, zq, &z), KVARC_EDTYPE);
    CHECK_RC(kvg_query_prep_ref(NULL, mu, KVARC_DTYPE_F32, zq, &z), -EINVAL);
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, q, 0, bits, ss, N, scores), -EINVAL);
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, q, 65, bits, ss, N, scores), -EINVAL);
    CHECK_RC(kvg_score_ref((kvg_score_mode)7, KVG_COMBINE_MAX, q, 1, bits, ss, N, scores), -EINVAL);
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, (kvg_combine)7, q, 1, bits, ss, N, scores), -EINVAL);
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, q, 1, bits, NULL, N, scores), -EINVAL);
    CHECK_RC(kvg_score_ref(KVG_SCORE_HAMMING, KVG_COMBINE_MAX, q, 1, bits, NULL, N, scores), 0);
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, q, 1, NULL, NULL, 0, NULL), 0);
    kvg_query mixed[2] = { q[0], q[1] };
    mixed[1].head_dim = 64;
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, mixed, 2, bits, ss, N, scores), -EINVAL);
    free(k); free(v); free(rec); free(bits); free(ss); free(scores);
    return tu_finish("test_score");
}
