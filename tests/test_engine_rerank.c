/* test_engine_rerank: stage 2 near the data. Real keys encoded with the
 * conversation's rotation and means are archived; kvd_rerank of a shortlist
 * returns the top_k by exact q.k of the decoded keys (equal to computing it
 * here from kvg_decode_ref), best first, with their records; a planted
 * needle comes first; GQA takes the max over the group's queries; bad
 * queries are refused. kvd_rerank_batch (many items, two heads, shortlists
 * that overlap, repeat positions and span more than one read pass) gives
 * every item the answer of its own reference computation, bit for bit.
 * At true positions (kind 2) each key is scored turned to its own
 * position; the retired kind 0 is refused. */
#include <errno.h>

#include "engine_util.h"
#include "kvg.h"

#define N 2048
#define D 128
#define ITEMS 48

/* The reference for one item: its shortlist's records gathered from the
 * archived ones (recs[head][N]), scored, top_k picked. Returns the count. */
static long ref_rerank(const kvg_codec *c, const uint8_t *recs, const float *q, int n_q, const uint64_t *sl,
                       size_t n, size_t k, uint64_t *pos, float *sc, uint8_t *out)
{
    uint8_t *g = malloc(n * 104 + 1);
    float *all = malloc((n + 1) * sizeof *all);
    uint32_t *idx = malloc((k + 1) * sizeof *idx);
    for (size_t i = 0; i < n; i++)
        memcpy(g + i * 104, recs + sl[i] * 104, 104);
    long got = kvg_key_scores_ref(c, q, n_q, g, n, all) ? -1 : kvg_topk_ref(all, n, k < n ? k : n, idx, NULL, NULL);
    for (long i = 0; i < got; i++) {
        pos[i] = sl[idx[i]];
        sc[i] = all[idx[i]];
        memcpy(out + i * 104, g + idx[i] * 104, 104);
    }
    free(g);
    free(all);
    free(idx);
    return got;
}

/* Each item of a finished batch against ref_rerank (recs[head][N]). */
static int same_as_ref(const kvg_codec *c, const uint8_t *recs, const kvd_rerank_item *it, int n)
{
    int same = 1;
    for (int i = 0; i < n; i++) {
        uint64_t rp[80];
        float rs[80];
        uint8_t ro[80 * 104];
        long want = ref_rerank(&c[it[i].head], recs + (size_t)it[i].head * N * 104, it[i].q, it[i].n_q,
                               it[i].shortlist, it[i].n, it[i].top_k, rp, rs, ro);
        int ok = want == it[i].got;
        for (long j = 0; ok && j < want; j++)
            ok = rp[j] == it[i].pos_out[j] && rs[j] == it[i].score_out[j] &&
                 !memcmp(ro + j * 104, it[i].rec_out + j * 104, 104);
        if (!ok)
            fprintf(stderr, "item %d (head %u, %zu -> %zu): differs from its reference\n", i, it[i].head,
                    it[i].n, it[i].top_k);
        same &= ok;
    }
    return same;
}

/* kvd_rerank_batch on a 2-head conversation of real keys. */
static void batch_case(kvd_engine *e, kvd_reader *r)
{
    kvd_err err = { 0 };
    kvd_shape s = eu_shape(1, 2, KVARC_FMT_Q3);
    tu_rng rng = { 4242 };
    float *k = malloc(sizeof(float) * N * D), *v = malloc(sizeof(float) * N * D), means[2 * 2 * D];
    for (int i = 0; i < 2 * 2 * D; i++)
        means[i] = 0.1f * tu_gauss(&rng);
    kvd_conv_info ci;
    CHECK_RC(kvd_conv_create(e, "r", "batch", &s, means, &ci, &err), 0);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, D, s.seed);
    uint8_t *rec = malloc((size_t)2 * N * 104), *bits = malloc((size_t)2 * N * D / 8);
    uint16_t *ss = malloc((size_t)2 * N * 2);
    kvg_codec c[2];
    for (int h = 0; h < 2; h++) {
        c[h] = (kvg_codec){ KVARC_FMT_Q3, &rot, means + h * 2 * D, means + h * 2 * D + D };
        tu_keys_outliers(&rng, k, N, D);
        for (int i = 0; i < N * D; i++)
            v[i] = tu_gauss(&rng);
        CHECK_RC(kvg_encode_ref(&c[h], KVARC_DTYPE_F32, k, v, N, rec + (size_t)h * N * 104,
                                bits + (size_t)h * N * D / 8, ss + (size_t)h * N, NULL), 0);
    }
    /* blocks of 256: [head][256] slices of the per-head arrays */
    uint8_t *brec = malloc(2 * 256 * 104), *bbits = malloc(2 * 256 * D / 8);
    uint16_t *bss = malloc(2 * 256 * 2);
    for (int b = 0; b < N; b += 256) {
        for (int h = 0; h < 2; h++) {
            memcpy(brec + h * 256 * 104, rec + ((size_t)h * N + b) * 104, 256 * 104);
            memcpy(bbits + h * 256 * D / 8, bits + ((size_t)h * N + b) * D / 8, 256 * D / 8);
            memcpy(bss + h * 256, ss + (size_t)h * N + b, 256 * 2);
        }
        CHECK_RC(kvd_append(e, ci.id, 0, (uint64_t)b, 256, bbits, bss, brec, &err), 0);
    }
    /* items: heads interleaved, a sliding shortlist (neighbours overlap by
     * most), some with repeats, varying n_q and top_k; the 40th and later
     * list 34000 positions (each many times) so each head needs passes */
    kvd_rerank_item it[ITEMS];
    uint64_t *sl[ITEMS], *pos[ITEMS];
    float *q[ITEMS], *sc[ITEMS];
    uint8_t *out[ITEMS];
    for (int i = 0; i < ITEMS; i++) {
        size_t n = i >= 40 ? 34000 : 300 + (size_t)(i % 7) * 40, kk = 1 + (size_t)(i * 13) % 80;
        int nq = 1 + i % 4;
        sl[i] = malloc(n * 8);
        pos[i] = malloc(kk * 8);
        sc[i] = malloc(kk * 4);
        out[i] = malloc(kk * 104);
        q[i] = malloc((size_t)nq * D * 4);
        for (size_t j = 0; j < n; j++)
            sl[i][j] = i >= 40 ? (j * 7 + (size_t)i) % N : ((size_t)i * 23 + j * 3) % N;
        if (i % 5 == 0)
            sl[i][n - 1] = sl[i][0];            /* a position listed twice */
        for (int j = 0; j < nq * D; j++)
            q[i][j] = tu_gauss(&rng);
        it[i] = (kvd_rerank_item){ .head = (uint32_t)(i % 3 == 0), .q = q[i], .n_q = nq, .shortlist = sl[i], .n = n,
                                   .top_k = kk, .pos_out = pos[i], .score_out = sc[i], .rec_out = out[i], .got = -1 };
    }
    size_t per_head[2] = { 0, 0 };
    for (int i = 0; i < ITEMS; i++)
        per_head[it[i].head] += it[i].n;
    CHECK(per_head[0] > KVD_RERANK_PASS && per_head[1] > KVD_RERANK_PASS, "the case spans read passes");
    CHECK_RC(kvd_rerank_batch(r, ci.id, 0, it, ITEMS, &err), 0);
    CHECK(same_as_ref(c, rec, it, ITEMS), "every item of the batch equals its reference");
    /* the heads over two and three readers (threads; three is capped at the
     * two heads): the same answers */
    kvd_reader *rs[3] = { r, NULL, NULL };
    CHECK_RC(kvd_reader_open(e, &rs[1], &err), 0);
    CHECK_RC(kvd_reader_open(e, &rs[2], &err), 0);
    for (int nr = 2; nr <= 3; nr++) {
        for (int i = 0; i < ITEMS; i++)
            memset(pos[i], 0, it[i].top_k * 8);
        CHECK_RC(kvd_rerank_batch_par(rs, nr, ci.id, 0, it, ITEMS, &err), 0);
        CHECK(same_as_ref(c, rec, it, ITEMS), "%d readers: every item equals its reference", nr);
    }
    CHECK(kvd_rerank_batch_par(rs, 0, ci.id, 0, it, ITEMS, &err) == -EINVAL, "no readers refused");
    kvd_reader *holey[2] = { r, NULL };
    CHECK(kvd_rerank_batch_par(holey, 2, ci.id, 0, it, ITEMS, &err) == -EINVAL && strstr(err.msg, "reader 1"),
          "a missing reader is refused, named: %s", err.msg);
    /* a sparse batch: positions far apart, so the union is sorted rather
     * than mapped by a bitmap */
    kvd_rerank_item sp[2];
    uint64_t ssl[2][16], spos[2][5];
    float ssc[2][5];
    uint8_t sout[2][5 * 104];
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < 16; j++)
            ssl[i][j] = (uint64_t)(j * 127 + i * 5) % N;
        ssl[i][15] = ssl[i][2];                  /* a repeat, deduplicated by the sort */
        sp[i] = (kvd_rerank_item){ .head = (uint32_t)i, .q = q[i], .n_q = 1, .shortlist = ssl[i], .n = 16, .top_k = 5,
                                   .pos_out = spos[i], .score_out = ssc[i], .rec_out = sout[i], .got = -1 };
    }
    CHECK_RC(kvd_rerank_batch(r, ci.id, 0, sp, 2, &err), 0);
    CHECK(same_as_ref(c, rec, sp, 2), "a sparse batch equals its reference");
    /* a bad item refuses the whole batch, naming what is wrong */
    sl[3][1] = N + 5;
    CHECK(kvd_rerank_batch(r, ci.id, 0, it, ITEMS, &err) == -ERANGE && strstr(err.msg, "past the end"),
          "a position past the end is refused: %s", err.msg);
    /* a fault met while reading (a position past the end) in head 1's items
     * and in head 0's: with readers in parallel, the lowest head's is told,
     * as one reader would meet it first */
    char one[sizeof err.msg];
    sl[3][1] = N + 5;                         /* item 3: head 1 */
    sl[4][2] = N + 9;                         /* item 4: head 0 */
    CHECK(kvd_rerank_batch(r, ci.id, 0, it, ITEMS, &err) == -ERANGE, "two faults: %s", err.msg);
    snprintf(one, sizeof one, "%s", err.msg);
    CHECK(kvd_rerank_batch_par(rs, 2, ci.id, 0, it, ITEMS, &err) == -ERANGE && !strcmp(err.msg, one),
          "two readers report the fault one reader meets first: '%s' vs '%s'", err.msg, one);
    sl[4][2] = 0;
    sl[3][1] = 0;
    kvd_reader_close(rs[1]);
    kvd_reader_close(rs[2]);
    it[5].head = 2;
    CHECK(kvd_rerank_batch(r, ci.id, 0, it, ITEMS, &err) == -EINVAL && strstr(err.msg, "kv head 2"),
          "a head out of range is refused: %s", err.msg);
    for (int i = 0; i < ITEMS; i++) {
        free(sl[i]); free(pos[i]); free(sc[i]); free(out[i]); free(q[i]);
    }
    free(k); free(v); free(rec); free(bits); free(ss); free(brec); free(bbits); free(bss);
}

/* True positions (kind 2): stage 2 turns each shortlisted key to its own
 * position. Keys with a large mean, RoPE on every dimension (theta
 * 500000), positions up to 64K; a needle matched by the query at its true
 * distance comes first, and every answer equals kvg_key_scores_pos_ref on
 * the same records. A conversation of the retired kind 0 is refused,
 * naming what to do, while its records still read. */
static void true_position_case(kvd_engine *e, kvd_reader *r)
{
    enum { T = 65536, SL = 512 };
    kvd_err err = { 0 };
    kvd_shape s = eu_shape(1, 1, KVARC_FMT_Q3);
    s.pos_mode = KVARC_POS_TRUE;
    s.rotary_dims = D;
    s.rope_theta = 500000.0f;
    kvg_rope rope;
    CHECK_RC(kvg_rope_init(&rope, D, D, 0, s.rope_theta), 0);
    tu_rng g = { 78 };
    float *k = malloc(sizeof(float) * T * D), *v = malloc(sizeof(float) * T * D), means[2 * D] = { 0 };
    for (int i = 0; i < D; i++)
        means[i] = (i % 64 >= rope.first_slow ? 3.0f : 0.3f) * tu_gauss(&g);
    for (size_t t = 0; t < T; t++)
        for (int i = 0; i < D; i++) {
            k[t * D + i] = means[i] + tu_gauss(&g);
            v[t * D + i] = tu_gauss(&g);
        }
    float dir[D], q[D], q_r[D];
    for (int i = 0; i < D; i++)
        dir[i] = tu_gauss(&g) / sqrtf(D);
    const uint64_t needle = 40000, m = T + 300;
    for (int i = 0; i < D; i++)
        k[needle * D + i] = means[i] + 16.0f * dir[i];
    memcpy(q, dir, sizeof q);
    kvg_rope_ref(q, D, D, 0, s.rope_theta, (double)needle - (double)m);
    for (int i = 0; i < D; i++)
        q_r[i] = 3.0f * q[i];
    kvg_rope_ref(q_r, D, D, 0, s.rope_theta, (double)m);
    kvd_conv_info ci;
    CHECK_RC(kvd_conv_create(e, "r", "true", &s, means, &ci, &err), 0);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, D, s.seed);
    kvg_codec c = { KVARC_FMT_Q3, &rot, means, means + D };
    uint8_t *rec = malloc((size_t)T * 104), *bits = malloc((size_t)T * D / 8);
    uint16_t *ss = malloc(T * 2);
    CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, T, rec, bits, ss, NULL), 0);
    CHECK_RC(kvg_sig_pos_ref(&rope, &rot, means, k, 0, T, bits, ss, NULL), 0);
    for (int b = 0; b < T; b += 4096)
        CHECK_RC(kvd_append(e, ci.id, 0, (uint64_t)b, 4096, bits + (size_t)b * D / 8, ss + b, rec + (size_t)b * 104,
                            &err), 0);
    uint64_t sl[SL], pos[16];
    for (int i = 0; i < SL; i++)
        sl[i] = (uint64_t)i * 127 + 13;                  /* spread over the layer, the needle among them */
    sl[SL / 3] = needle;
    float sc[16], ks[SL];
    uint8_t out[16 * 104], g2[SL * 104];
    long n = kvd_rerank(r, ci.id, 0, 0, q_r, 1, sl, SL, 16, pos, sc, out, &err);
    CHECK(n == 16, "true-position rerank returned %ld: %s", n, err.msg);
    CHECK(pos[0] == needle, "the needle at its true distance comes first (got %llu)", (unsigned long long)pos[0]);
    for (int i = 0; i < SL; i++)
        memcpy(g2 + i * 104, rec + sl[i] * 104, 104);
    CHECK_RC(kvg_key_scores_pos_ref(&c, &rope, NULL, q_r, 1, g2, sl, SL, ks), 0);
    uint32_t idx[16];
    CHECK(kvg_topk_ref(ks, SL, 16, idx, NULL, NULL) == 16, "reference top-k");
    int same = 1;
    for (int i = 0; i < 16; i++)
        same &= pos[i] == sl[idx[i]] && fabsf(sc[i] - ks[idx[i]]) <= 1e-5f * (fabsf(ks[idx[i]]) + 1);
    CHECK(same, "true-position rerank equals kvg_key_scores_pos_ref");

    s.pos_mode = KVARC_POS_TRUE_FREE;                     /* written by a kvarc before kind 2 */
    kvd_conv_info c0;
    CHECK_RC(kvd_conv_create(e, "r", "kind0", &s, means, &c0, &err), 0);
    CHECK_RC(kvd_append(e, c0.id, 0, 0, 4096, bits, ss, rec, &err), 0);
    uint64_t few[4] = { 1, 2, 3, 4 };
    CHECK(kvd_rerank(r, c0.id, 0, 0, q_r, 1, few, 4, 2, pos, sc, out, &err) == KVARC_EVERSION &&
          strstr(err.msg, "kind 0") && strstr(err.msg, "r/kind0"), "kind 0 refused for retrieval: %s", err.msg);
    CHECK_RC(kvd_read_records(r, c0.id, 0, 0, few, 4, out, &err), 0);
    s.pos_mode = KVARC_POS_KIND_MAX + 1;
    CHECK(kvd_conv_create(e, "r", "kind3", &s, means, &c0, &err) == -EINVAL, "an unknown kind is not created");
    free(k); free(v); free(rec); free(bits); free(ss);
}

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

    uint8_t out2[16 * 104];                     /* records without positions asked for */
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 2, sl, 512, 16, NULL, NULL, out2, &err) == 16 && !memcmp(out, out2, sizeof out),
          "rerank without pos_out returns the same records");
    q[5] = NAN;
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 1, sl, 512, 16, pos, sc, out, &err) == KVARC_ENONFINITE, "NaN query");
    q[5] = 0.0f;
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 0, sl, 512, 16, pos, sc, out, &err) == -EINVAL, "no query");
    sl[7] = N;
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 1, sl, 512, 16, pos, sc, out, &err) == -ERANGE, "past the end");
    CHECK(kvd_rerank(r, ci.id, 0, 0, q, 1, sl, 0, 16, pos, sc, out, &err) == 0, "empty shortlist");
    batch_case(e, r);
    true_position_case(e, r);
    kvd_reader_close(r);
    kvd_close(e);
    free(k); free(v); free(rec); free(bits); free(ss); free(kd);
    eu_rmrf(dir);
    return tu_finish("test_engine_rerank");
}
