/* test_plane: the client's block-interleaved signature planes (plane.c).
 * Signatures put in return bytewise from get at any offset; a plane's
 * scores equal kvg_score_pos_ref over the token-major signatures bit for
 * bit: head_dim 64, 128 and 256, GQA groups 1..12 (chunks of 8 heads and a
 * second pass), max and mean, asymmetric and Hamming, with and without
 * block biases, ranges that start and end inside blocks, extreme queries
 * (every q8 at +-127: the largest dot the int16 sums must hold), scales 0,
 * subnormal and the largest finite. The AVX-512 and AVX2 kernels (each
 * skipped where the CPU lacks it) and the reference path. Runs as
 * kvg_score_runs. kvg_plane_topk is the reference top-k of those scores.
 * Bad input gets -EINVAL. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define NS 700

/* nq queries; query 0 is extreme: every rotated coordinate of equal
 * magnitude, so every q8 is +-127 (|dot| reaches head_dim * 127 on the
 * signature that agrees with it, which the test plants). */
static void make_queries(tu_rng *g, int d, kvg_query *qs, int nq)
{
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, d, 5 + (uint64_t)d), 0);
    float q[KVARC_HEAD_DIM_MAX], y[KVARC_HEAD_DIM_MAX];
    for (int h = 0; h < nq; h++) {
        for (int i = 0; i < d; i++)
            q[i] = tu_gauss(g) * (float)(h + 1);
        CHECK_RC(kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q, &qs[h]), 0);
        qs[h].bias = tu_gauss(g);
    }
    for (int i = 0; i < d; i++)
        y[i] = (i * 7) % 3 ? 1.0f : -1.0f;
    kvg_unrotate_ref(&rot, y, q);
    CHECK_RC(kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q, &qs[0]), 0);
    int extreme = 1;
    for (int i = 0; i < d; i++)
        extreme &= qs[0].q8[i] == 127 || qs[0].q8[i] == -127;
    CHECK(extreme, "head_dim %d: the extreme query's q8 are not all +-127", d);
}

static void roundtrip(int d)
{
    tu_rng g = { 11 };
    size_t sb = (size_t)d / 8;
    uint8_t *bits = malloc(NS * sb), *back = malloc(NS * sb);
    uint16_t sc[NS], sback[NS];
    tu_random_sigs(&g, d, NS, bits, sc);
    kvg_plane p = { 0 };
    CHECK_RC(kvg_plane_reserve(&p, d, 5), 0);
    CHECK(p.cap % KVG_PLANE_BLOCK == 0 && p.cap >= 5, "capacity %llu", (unsigned long long)p.cap);
    CHECK_RC(kvg_plane_put(&p, 0, 5, bits, sc), 0);
    CHECK_RC(kvg_plane_reserve(&p, d, 3 + NS), 0);     /* growth keeps what was put */
    CHECK_RC(kvg_plane_put(&p, 5, NS - 5, bits + 5 * sb, sc + 5), 0);
    for (size_t a = 0; a < NS; a += 37) {
        size_t n = (NS - a) < 45 ? NS - a : 45;
        memset(back, 0, n * sb);
        CHECK_RC(kvg_plane_get(&p, a, n, back, sback), 0);
        CHECK(!memcmp(back, bits + a * sb, n * sb) && !memcmp(sback, sc + a, n * 2),
              "head_dim %d: positions %zu..%zu do not come back as put", d, a, a + n);
    }
    CHECK_RC(kvg_plane_put(&p, p.cap - 1, 2, bits, sc), -EINVAL);
    CHECK_RC(kvg_plane_get(&p, p.cap + 1, 0, back, NULL), -EINVAL);
    CHECK_RC(kvg_plane_reserve(&p, d == 128 ? 64 : 128, 10), -EINVAL);
    CHECK_RC(kvg_plane_reserve(&p, 96, 10), -EINVAL);
    kvg_plane_free(&p);
    free(bits);
    free(back);
}

static void scores(int d, kvg_isa isa)
{
    tu_rng g = { 77 + (uint64_t)d };
    enum { NQ = 12, NBLK = 16 };
    size_t sb = (size_t)d / 8;
    uint64_t base = 64 * 3 + 9;        /* the plane's first signature: position base */
    uint8_t *bits = malloc((base + NS) * sb);
    uint16_t sc[64 * 3 + 9 + NS];
    tu_random_sigs(&g, d, base + NS, bits, sc);
    kvg_query qs[NQ];
    make_queries(&g, d, qs, NQ);
    for (int i = 0; i < d; i++) {     /* position base + 100 agrees with the extreme query everywhere */
        uint8_t *b = bits + (base + 100) * sb;
        b[i / 8] = (uint8_t)((b[i / 8] & ~(1u << (i % 8))) | (qs[0].q8[i] > 0 ? 1u << (i % 8) : 0));
    }
    kvg_plane p = { 0 };
    CHECK_RC(kvg_plane_reserve(&p, d, base + NS), 0);
    CHECK_RC(kvg_plane_put(&p, 0, base + NS, bits, sc), 0);
    float bb[NQ * NBLK], want[NS], got[NS];
    for (int i = 0; i < NQ * NBLK; i++)
        bb[i] = 30.0f * tu_gauss(&g);
    int bad = 0, cases = 0, top = 0;
    const int nqs[] = { 1, 2, 3, 4, 5, 8, 9, 12 };
    for (int mode = 0; mode < 2; mode++)
        for (size_t k = 0; k < sizeof nqs / sizeof nqs[0]; k++)
            for (int comb = 0; comb < 2; comb++)
                for (int withb = 0; withb < 2 && !(mode && withb); withb++)
                    for (size_t a = base; a < base + NS; a += 61)
                        for (size_t n = 1; a + n <= base + NS; n += n < 40 ? 13 : 211) {
                            int nq = nqs[k];
                            CHECK_RC(kvg_score_pos_ref(mode, comb, qs, nq, bits + a * sb, sc + a, n, a,
                                                       withb ? bb : NULL, NBLK, want), 0);
                            memset(got, 0xff, sizeof got);
                            CHECK_RC(kvg_plane_score_isa(isa, mode, comb, qs, nq, &p, a, n, withb ? bb : NULL,
                                                         NBLK, got), 0);
                            bad += memcmp(want, got, n * 4) != 0;
                            cases++;
                            if (!mode && nq == 1 && a <= base + 100 && base + 100 < a + n) {
                                float s = got[base + 100 - a], e = ((float)(d * 127) * qs[0].qscale) *
                                                                     kvarc_f16_to_f32(sc[base + 100]) + qs[0].bias;
                                top += s == e;
                            }
                        }
    CHECK(bad == 0, "head_dim %d %s: the plane's scores differ from the reference in %d of %d cases", d,
          isa == KVG_ISA_V4 ? "avx512" : isa == KVG_ISA_V3 ? "avx2" : "reference path", bad, cases);
    CHECK(top > 0, "head_dim %d: the largest dot (%d) was never scored exactly", d, d * 127);

    /* runs: ragged, across block boundaries, an empty one */
    uint64_t runs[] = { 0, 3, 40, 0, 41, 70, 200, 64, 333, 1, 500, 150 };
    size_t nr = sizeof runs / sizeof runs[0] / 2, tot = 0;
    for (size_t r = 0; r < nr; r++) {
        uint64_t at = base + runs[2 * r], n = runs[2 * r + 1];
        size_t db = at / 64 - base / 64;
        if (n)
            CHECK_RC(kvg_score_pos_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 4, bits + at * sb, sc + at, n, at,
                                       bb + db, NBLK, want + tot), 0);
        tot += n;
    }
    memset(got, 0, sizeof got);
    CHECK_RC(kvg_plane_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 4, &p, base, runs, nr, bb, NBLK, got), 0);
    CHECK(!memcmp(want, got, tot * 4), "head_dim %d: runs differ from the reference", d);

    /* bad input */
    CHECK_RC(kvg_plane_score_isa(isa, KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 1, &p, p.cap - 3, 4, NULL, 0, got),
             -EINVAL);
    CHECK_RC(kvg_plane_score_isa(isa, KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 1, &p, base, 200, bb, 2, got), -EINVAL);
    CHECK_RC(kvg_plane_score_isa(isa, KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 0, &p, base, 10, NULL, 0, got), -EINVAL);
    CHECK_RC(kvg_plane_score_isa(isa, KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 1, NULL, base, 10, NULL, 0, got),
             -EINVAL);
    CHECK_RC(kvg_plane_score_runs(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 1, &p, base, runs, nr, bb, 2, got),
             -EINVAL);
    kvg_query other = qs[0];
    other.head_dim = d == 128 ? 64 : 128;
    CHECK_RC(kvg_plane_score_isa(isa, KVG_SCORE_ASYM, KVG_COMBINE_MAX, &other, 1, &p, base, 10, NULL, 0, got),
             -EINVAL);
    kvg_plane_free(&p);
    free(bits);
}

/* kvg_plane_topk is kvg_topk_ref over kvg_score_pos_ref's scores, byte
 * for byte: k from 1 to past n / 8 (where it scores everything), GQA 4
 * with block biases; signatures whose best keys sit in one stretch the
 * sample never sees, and whose best keys are exactly the sampled blocks
 * (the filter keeps fewer than k: the whole path), ties
 * (zero scales give every such token the bias alone), NaN scores (NaN
 * scales) ranked last. */
static void topk_case(int d)
{
    tu_rng g = { 5 + (uint64_t)d };
    enum { NT = 40000, NBLK = NT / 64 + 2 };
    const size_t sb = (size_t)d / 8;
    const uint64_t first = 777;
    uint8_t *bits = malloc((first + NT) * sb);
    uint16_t *sc = malloc((first + NT) * 2);
    float *want_s = malloc(NT * 4), *scores = malloc(NT * 4), *wv = malloc(NT * 4), *gv = malloc(NT * 4);
    uint32_t *wi = malloc(NT * 4), *gi = malloc(NT * 4), *scratch = malloc(NT * 4);
    float *bb = malloc(4 * NBLK * 4);
    kvg_query qs[4];
    make_queries(&g, d, qs, 4);
    for (size_t i = 0; i < 4 * NBLK; i++)
        bb[i] = tu_gauss(&g);
    kvg_plane p = { 0 };
    CHECK_RC(kvg_plane_reserve(&p, d, first + NT), 0);
    int bad = 0, cases = 0;
    for (int shape = 0; shape < 4; shape++) {
        tu_random_sigs(&g, d, first + NT, bits, sc);
        for (size_t j = first; j < first + NT; j++) {
            if (shape == 1)                   /* a 300-token hot stretch between the sample's blocks */
                sc[j] = j - first >= 20100 && j - first < 20400 ? sc[j] : (uint16_t)(sc[j] >> 4);
            if (shape == 2)                   /* ties and NaN */
                sc[j] = j % 7 == 0 ? 0 : j % 101 == 0 ? 0x7e00 : sc[j];
            if (shape == 3)                   /* hot exactly where the sample looks: it overestimates */
                sc[j] = (uint16_t)(sc[j] >> 4);
        }
        for (size_t i = 0; shape == 3 && i < 32; i++)
            for (size_t j = 0; j < 32; j++) {
                size_t at = first + i * (NT - 32) / 31 + j;
                sc[at] = kvarc_f32_to_f16(8.0f + (float)tu_uniform(&g));
            }
        CHECK_RC(kvg_plane_put(&p, 0, first + NT, bits, sc), 0);
        const size_t ks[] = { 1, 64, 256, 512, 4999, 6000 };
        for (size_t kk = 0; kk < sizeof ks / sizeof ks[0]; kk++)
            for (int withb = 0; withb < 2; withb++) {
                size_t k = ks[kk];
                CHECK_RC(kvg_score_pos_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 4, bits + first * sb, sc + first, NT,
                                           first, withb ? bb : NULL, NBLK, want_s), 0);
                long w = kvg_topk_ref(want_s, NT, k, wi, wv, scratch);
                long r = kvg_plane_topk(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 4, &p, first, NT, withb ? bb : NULL,
                                        NBLK, k, gi, gv, scores, scratch);
                bad += r != w || memcmp(wi, gi, (size_t)w * 4) || memcmp(wv, gv, (size_t)w * 4);
                cases++;
            }
    }
    CHECK(bad == 0, "head_dim %d: kvg_plane_topk differs from the reference top-k in %d of %d cases", d, bad, cases);
    CHECK_RC(kvg_plane_topk(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 4, &p, first, NT, bb, 3, 10, gi, NULL, scores,
                            scratch), -EINVAL);
    CHECK_RC(kvg_plane_topk(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qs, 4, &p, first, NT, NULL, 0, 10, gi, NULL, NULL,
                            scratch), -EINVAL);
    kvg_plane_free(&p);
    free(bits); free(sc); free(want_s); free(scores); free(wv); free(gv); free(wi); free(gi); free(scratch); free(bb);
}

int main(void)
{
    int dims[] = { 64, 128, 256 };
    int v4 = kvg_plane_score_isa(KVG_ISA_V4, KVG_SCORE_ASYM, KVG_COMBINE_MAX, NULL, 1, NULL, 0, 0, NULL, 0,
                                 NULL) != -ENOTSUP;
    int v3 = kvg_plane_score_isa(KVG_ISA_V3, KVG_SCORE_ASYM, KVG_COMBINE_MAX, NULL, 1, NULL, 0, 0, NULL, 0,
                                 NULL) != -ENOTSUP;
    for (int i = 0; i < 3; i++) {
        roundtrip(dims[i]);
        topk_case(dims[i]);
        scores(dims[i], KVG_ISA_REF);
        if (v4)
            scores(dims[i], KVG_ISA_V4);
        if (v3)
            scores(dims[i], KVG_ISA_V3);
    }
    CHECK_RC(kvg_plane_score_isa(KVG_ISA_BASE, KVG_SCORE_ASYM, KVG_COMBINE_MAX, NULL, 1, NULL, 0, 0, NULL, 0, NULL),
             -EINVAL);
    printf("plane kernel: %s%s%s\n", kvg_plane_kernel(), v4 ? "" : " (the AVX-512 kernel is untested here)",
           v3 ? "" : " (the AVX2 kernel is untested here)");
    return tu_finish("test_plane");
}
