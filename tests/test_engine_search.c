/* test_engine_search: stage 1 over stored signatures (kvd_search) scans in
 * chunks of KVD_SEARCH_CHUNK tokens; over a layer of 2.2 chunks its answer
 * must equal one kvg_topk_ref over the whole layer, positions and scores,
 * in both score modes (Hamming scores are integers: many ties, which must
 * still go to the lower position), for k from 1 to past a chunk's
 * boundary, GQA max and mean; the same with kind-2 block biases; a zero k
 * and an empty layer are handled. */
#include <errno.h>

#include "engine_util.h"
#include "kvg.h"

#define D 128

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "search");
    kvd_options o = { .dir = dir };
    kvd_engine *e;
    kvd_err err = { 0 };
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    kvd_shape s = eu_shape(2, 1, KVARC_FMT_Q3);
    kvd_conv_info ci;
    CHECK_RC(kvd_conv_create(e, "s", "c", &s, NULL, &ci, &err), 0);
    const uint64_t len = 2 * KVD_SEARCH_CHUNK + KVD_SEARCH_CHUNK / 5;
    for (uint64_t p = 0; p < len; p += 8192)
        CHECK_RC(eu_append(e, &ci, 3, 0, p, (uint32_t)(len - p < 8192 ? len - p : 8192), &err), 0);
    kvd_reader *r;
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);

    uint8_t *bits = malloc(len * D / 8);
    uint16_t *sc = malloc(len * 2);
    float *scores = malloc(len * 4), zero[D] = { 0 }, q[4 * D];
    uint32_t *idx = malloc(5000 * 4);
    uint64_t *pos = malloc(5000 * 8);
    float *best = malloc(5000 * 4), *want = malloc(5000 * 4);
    CHECK_RC(kvd_read_sigs(r, ci.id, 0, 0, 0, len, bits, sc, &err), 0);
    tu_rng rng = { 5 };
    for (int i = 0; i < 4 * D; i++)
        q[i] = tu_gauss(&rng);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, D, s.seed);
    kvg_query qs[4];
    for (int h = 0; h < 4; h++)
        CHECK_RC(kvg_query_prep_ref(&rot, zero, KVARC_DTYPE_F32, q + h * D, &qs[h]), 0);

    static const size_t ks[] = { 1, 64, 512, 4096 };
    for (int mode = 0; mode < 2; mode++)
        for (int comb = 0; comb < 2; comb++)
            for (int nq = 1; nq <= 4; nq += 3)
                for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
                    size_t k = ks[ki];
                    CHECK_RC(kvg_score_ref((kvg_score_mode)mode, (kvg_combine)comb, qs, nq, bits, sc, len, scores), 0);
                    long w = kvg_topk_ref(scores, len, k, idx, want, NULL);
                    long got = kvd_search(r, ci.id, 0, 0, D, len, mode, comb, qs, nq, NULL, k, pos, best, &err);
                    CHECK(got == w && got == (long)k, "mode %d comb %d nq %d k %zu: %ld vs %ld", mode, comb, nq, k,
                          got, w);
                    int same = got == w;
                    for (long i = 0; same && i < got; i++)
                        same = pos[i] == idx[i] && best[i] == want[i];
                    CHECK(same, "mode %d comb %d nq %d k %zu: chunked answer equals the whole-layer top-k", mode,
                          comb, nq, k);
                }
    /* kind-2 signatures: a bias per 64-position block, computed per chunk
     * from the turned queries; equal to one scan with every block's bias */
    {
        kvg_rope rope;
        CHECK_RC(kvg_rope_init(&rope, D, D, 0, 500000.0f), 0);
        float mu[D];
        for (int i = 0; i < D; i++)
            mu[i] = 2.0f * tu_gauss(&rng);
        kvg_query q2[4];
        for (int h = 0; h < 4; h++)
            CHECK_RC(kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q + h * D, &q2[h]), 0);
        size_t nblk = (size_t)((len + KVG_SIG_BLOCK - 1) / KVG_SIG_BLOCK);
        float *bb = malloc(4 * nblk * 4);
        for (int h = 0; h < 4; h++)
            kvg_block_bias_ref(&rope, mu, q + h * D, 0, nblk, NULL, 0, bb + h * nblk);
        kvd_qbias qb = { &rope, mu, q };
        for (int comb = 0; comb < 2; comb++) {
            CHECK_RC(kvg_score_pos_ref(KVG_SCORE_ASYM, (kvg_combine)comb, q2, 4, bits, sc, len, 0, bb, nblk, scores), 0);
            long w = kvg_topk_ref(scores, len, 512, idx, want, NULL);
            long got = kvd_search(r, ci.id, 0, 0, D, len, 0, comb, q2, 4, &qb, 512, pos, best, &err);
            int same = got == w && got == 512;
            for (long i = 0; same && i < got; i++)
                same = pos[i] == idx[i] && best[i] == want[i];
            CHECK(same, "kind 2, comb %d: chunked answer with block biases equals the whole-layer top-k (%ld, %ld)",
                  comb, got, w);
        }
        free(bb);
    }
    CHECK(kvd_search(r, ci.id, 0, 0, D, len, 0, 0, qs, 1, NULL, 0, pos, best, &err) == -EINVAL, "k 0 refused");
    CHECK(kvd_search(r, ci.id, 1, 0, D, 0, 0, 0, qs, 1, NULL, 8, pos, best, &err) == 0, "an empty layer answers nothing");
    CHECK(kvd_search(r, ci.id, 0, 0, D, len + 1, 0, 0, qs, 1, NULL, 8, pos, best, &err) < 0, "past the end refused");

    free(bits); free(sc); free(scores); free(idx); free(pos); free(best); free(want);
    kvd_reader_close(r);
    kvd_close(e);

    /* reads that touch more than 64 segments (a long layer interleaved with
     * another, small segments): once refused, now served */
    {
        char dir2[256];
        eu_tmpdir(dir2, sizeof dir2, "search-segs");
        kvd_options o2 = { .dir = dir2, .segment_bytes = 16 << 10 };
        kvd_engine *e2;
        kvd_conv_info c2;
        CHECK_RC(kvd_open(&o2, &e2, &err), 0);
        kvd_shape s2 = eu_shape(2, 1, KVARC_FMT_Q3);
        CHECK_RC(kvd_conv_create(e2, "s", "spread", &s2, NULL, &c2, &err), 0);
        for (uint64_t p = 0; p < 200 * 64; p += 64)
            for (uint32_t l = 0; l < 2; l++)
                CHECK_RC(eu_append(e2, &c2, 9, l, p, 64, &err), 0);
        kvd_stats st;
        CHECK_RC(kvd_stats_get(e2, &st, &err), 0);
        CHECK(st.segments > 100, "the layer spans %llu segments", (unsigned long long)st.segments);
        kvd_reader *r2;
        CHECK_RC(kvd_reader_open(e2, &r2, &err), 0);
        uint64_t spread[200];
        for (int i = 0; i < 200; i++)
            spread[i] = (uint64_t)i * 64 + (uint64_t)(i % 64);
        int rc2 = eu_check_records(r2, &c2, 9, 1, 0, spread, 200, &err);
        CHECK(rc2 == 0, "200 records over every segment: %s", err.msg);
        uint8_t *b2 = malloc(200 * 64 * D / 8);
        uint16_t *s2c = malloc(200 * 64 * 2);
        rc2 = kvd_read_sigs(r2, c2.id, 0, 0, 0, 200 * 64, b2, s2c, &err);
        CHECK(rc2 == 0, "a whole layer's signatures over every segment: %s", err.msg);
        free(b2);
        free(s2c);
        kvd_reader_close(r2);
        kvd_close(e2);
        if (!tu_failures)
            eu_rmrf(dir2);
    }
    if (!tu_failures)
        eu_rmrf(dir);
    return tu_finish("test_engine_search");
}
