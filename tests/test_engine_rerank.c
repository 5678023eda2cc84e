/* test_engine_rerank: stage 2 near the data. Real keys encoded with the
 * conversation's rotation and means are archived; kvd_rerank of a shortlist
 * returns the top_k by exact q.k of the decoded keys (equal to computing it
 * here from kvg_decode_ref), best first, with their records; a planted
 * needle comes first; GQA takes the max over the group's queries; bad
 * queries are refused. */
#include <errno.h>

#include "engine_util.h"
#include "kvg.h"

#define N 2048
#define D 128

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "rerank");
    kvd_options o = { .dir = dir };
    kvd_engine *e;
    kvd_err err = { 0 };
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    kvd_shape s = eu_shape(1, 1, KVARC_FMT_Q3);
    tu_rng rng = { 77 };
    float *k = malloc(sizeof(float) * N * D), *v = malloc(sizeof(float) * N * D);
    float means[2 * D], q[2 * D];
    tu_keys_outliers(&rng, k, N, D);
    for (int i = 0; i < N * D; i++)
        v[i] = tu_gauss(&rng);
    for (int i = 0; i < D; i++) {
        double m = 0;
        for (int t = 0; t < N; t++)
            m += k[t * D + i];
        means[i] = (float)(m / N);
        means[D + i] = 0.0f;
        q[i] = tu_gauss(&rng);
        q[D + i] = tu_gauss(&rng);
    }
    for (int i = 0; i < D; i++)                 /* needle at 1500 along query 1 */
        k[1500 * D + i] = means[i] + 3.0f * q[D + i];
    kvd_conv_info ci;
    CHECK_RC(kvd_conv_create(e, "r", "c", &s, means, &ci, &err), 0);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, D, s.seed);
    kvg_codec c = { KVARC_FMT_Q3, &rot, means, means + D };
    uint8_t *rec = malloc((size_t)N * 104), *bits = malloc(N * D / 8);
    uint16_t *ss = malloc(N * 2);
    CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, N, rec, bits, ss, NULL), 0);
    for (int b = 0; b < N; b += 256)
        CHECK_RC(kvd_append(e, ci.id, 0, (uint64_t)b, 256, bits + (size_t)b * D / 8, ss + b,
                            rec + (size_t)b * 104, &err), 0);
    kvd_reader *r;
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    uint64_t sl[512];
    for (int i = 0; i < 512; i++)
        sl[i] = (uint64_t)(i * 4);              /* 0, 4, ..., 2044: includes 1500 */
    uint64_t pos[16];
    float sc[16];
    uint8_t out[16 * 104];
    long n = kvd_rerank(r, ci.id, 0, 0, q, 2, sl, 512, 16, pos, sc, out, &err);
    CHECK(n == 16, "rerank returned %ld: %s", n, err.msg);
    CHECK(pos[0] == 1500, "the needle must come first, got %llu", (unsigned long long)pos[0]);
    /* the same computed here */
    float *kd = malloc(sizeof(float) * N * D), best[512];
    CHECK_RC(kvg_decode_ref(&c, rec, N, kd, NULL), 0);
    for (int i = 0; i < 512; i++) {
        best[i] = -INFINITY;
        for (int h = 0; h < 2; h++) {
            float d = 0;
            for (int j = 0; j < D; j++)
                d += q[h * D + j] * kd[sl[i] * D + j];
            best[i] = d > best[i] ? d : best[i];
        }
    }
    /* the rotated-domain scores agree with decode-then-dot to fp32 rounding */
    uint8_t slrec[512 * 104];
    float ks[512];
    for (int i = 0; i < 512; i++)
        memcpy(slrec + i * 104, rec + sl[i] * 104, 104);
    CHECK_RC(kvg_key_scores_ref(&c, q, 2, slrec, 512, ks), 0);
    double worst = 0;
    for (int i = 0; i < 512; i++)
        worst = fmax(worst, fabs((double)ks[i] - best[i]) / (fabs(best[i]) + 1.0));
    CHECK(worst < 1e-5, "key scores differ from decode-then-dot by %g", worst);
    uint32_t idx[16];
    CHECK(kvg_topk_ref(ks, 512, 16, idx, NULL, NULL) == 16, "reference top-k");
    int same = 1;
    for (int i = 0; i < 16; i++)
        same &= pos[i] == sl[idx[i]] && sc[i] == ks[idx[i]] &&
                !memcmp(out + i * 104, rec + sl[idx[i]] * 104, 104);
    CHECK(same, "rerank differs from the reference computation");
    for (int i = 1; i < 16; i++)
        CHECK(sc[i - 1] >= sc[i], "scores must be best first");

    q[5] = NAN;
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 1, sl, 512, 16, pos, sc, out, &err) == KVARC_ENONFINITE, "NaN query");
    q[5] = 0.0f;
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 0, sl, 512, 16, pos, sc, out, &err) == -EINVAL, "no query");
    sl[7] = N;
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 1, sl, 512, 16, pos, sc, out, &err) == -ERANGE, "past the end");
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 1, sl, 0, 16, pos, sc, out, &err) == 0, "empty shortlist");
    kvd_reader_close(r);
    kvd_close(e);
    free(k); free(v); free(rec); free(bits); free(ss); free(kd);
    eu_rmrf(dir);
    return tu_finish("test_engine_rerank");
}
