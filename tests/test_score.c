/* test_score: stage-1 scores equal an independent per-token computation
 * bit for bit (asymmetric and Hamming, GQA max and mean), the asymmetric
 * estimator tracks the true q.k (centering bias added back), a planted
 * needle lands in the shortlist, and bad input gets its defined error. */
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
 * the reference's bits: head_dim 128, GQA groups 1..8, both combines, with
 * and without block biases, ranges not a multiple of 8 nor block-aligned,
 * scales 0, subnormal and large. */
static void dispatch_case(void)
{
    tu_rng g = { 31 };
    enum { NS = 1000 };
    static uint8_t bits[NS * 16];
    uint16_t sc[NS];
    for (size_t i = 0; i < sizeof bits; i++)
        bits[i] = (uint8_t)(kvarc_splitmix64(&g.s) >> 56);
    for (int j = 0; j < NS; j++)
        sc[j] = j % 97 == 0 ? 0 : j % 89 == 0 ? 1 : j % 83 == 0 ? 0x7bff : kvarc_f32_to_f16((float)tu_uniform(&g) * 4);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, 128, 9);
    kvg_query qs[8];
    float q[128], bb[8 * 20], want[NS], got[NS];
    for (int h = 0; h < 8; h++) {
        for (int i = 0; i < 128; i++)
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
    CHECK(bad == 0, "the %s scan differs from the reference in %d cases", kvg_score_kernel(128), bad);
    printf("stage-1 kernel at head_dim 128: %s\n", kvg_score_kernel(128));
}

int main(void)
{
    dispatch_case();
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
