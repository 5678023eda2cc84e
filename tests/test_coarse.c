/* test_coarse: the coarse tier's block summaries (kvg_summary_ref,
 * gpu/coarse_ref.c), against their definition in kvg.h:
 * - item 0 is kvg_signature_ref of the fp32 mean, summed over the tokens
 *   in order and divided by n, at head_dim 64, 128, 256 and n 1..64;
 * - item 1 is a byte copy of the signature of the token of largest
 *   whitened distance (computed here from the formula; ties to the lower
 *   index), and a one-token outlier planted in 64 keys with loud channels
 *   is that token, though it is often not the largest by norm;
 * - a one-token block repeats item 0;
 * - bad sizes and pointers are -EINVAL, a NaN or Inf key
 *   KVARC_ENONFINITE; the same inputs give the same bytes, every output
 *   byte written;
 * - kvg_summary (the codec's lanes, every build this CPU runs) gives the
 *   reference's bytes and codes: every n 1..64 at head_dim 64/128/256, a
 *   channel constant over the block (variance 0), keys large enough that a
 *   distance overflows, a NaN and an Inf key;
 * - kvg_block_best_ref: a block's best item, -INFINITY where it has no
 *   summaries, a NaN first item kept (so top-k ranks it last), a NaN
 *   later item ignored. */
#include <math.h>
#include <errno.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define S KVG_SUM_ITEMS

/* n keys [n][d]: Gaussian around a per-channel mean, every 16th channel
 * loud (std 5) on every token, as real keys have. */
static void loud_keys(tu_rng *g, float *x, size_t n, int d)
{
    for (size_t t = 0; t < n; t++)
        for (int i = 0; i < d; i++)
            x[t * (size_t)d + i] = 0.5f * (float)((i * 37) % 7 - 3) + (i % 16 == 5 ? 5.0f : 1.0f) * tu_gauss(g);
}

/* The signatures of x[n][d]. */
static void sign_all(const kvarc_rotation *rot, const float *x, size_t n, uint8_t *bits, uint16_t *sc)
{
    int d = rot->head_dim;
    for (size_t t = 0; t < n; t++)
        CHECK_RC(kvg_signature_ref(rot, x + t * (size_t)d, bits + t * (size_t)d / 8, &sc[t]), 0);
}

/* The token item 1 must copy, from kvg.h's formula: m_i = (sum over j in
 * order) / n, v_i = (sum over j of (x_ji - m_i)^2) / n, r_j = tree sum over
 * i of (x_ji - m_i)^2 / v_i (0 where v_i is 0); the largest r_j, ties to
 * the lower index. */
static size_t farthest(const float *x, size_t n, int d)
{
    float m[KVARC_HEAD_DIM_MAX], v[KVARC_HEAD_DIM_MAX], sq[KVARC_HEAD_DIM_MAX], best = 0.0f;
    size_t arg = 0;
    for (int i = 0; i < d; i++) {
        float s = 0.0f, q = 0.0f;
        for (size_t j = 0; j < n; j++)
            s += x[j * (size_t)d + i];
        m[i] = s / (float)n;
        for (size_t j = 0; j < n; j++) {
            float e = x[j * (size_t)d + i] - m[i];
            q += e * e;
        }
        v[i] = q / (float)n;
    }
    for (size_t j = 0; j < n; j++) {
        for (int i = 0; i < d; i++) {
            float e = x[j * (size_t)d + i] - m[i];
            sq[i] = v[i] > 0.0f ? e * e / v[i] : 0.0f;
        }
        float r = kvarc_tree_sum(sq, d);
        if (j == 0 || r > best) {
            best = r;
            arg = j;
        }
    }
    return arg;
}

/* (a) item 0 is the mean's signature; item 1 the farthest token's bytes.
 * The token signatures passed in are stand-ins that name their token
 * (bits: the index in every byte, scale: the index + 1), so that a copy
 * of the wrong token cannot pass by having similar bits. */
static void definition_case(int d)
{
    tu_rng g = { 500 + (uint64_t)d };
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, d, 41), 0);
    const size_t sb = (size_t)d / 8;
    float x[64 * KVARC_HEAD_DIM_MAX], m[KVARC_HEAD_DIM_MAX];
    uint8_t bits[64 * KVARC_HEAD_DIM_MAX / 8], sbits[S * KVARC_HEAD_DIM_MAX / 8], mb[KVARC_HEAD_DIM_MAX / 8];
    uint16_t sc[64], ssc[S], ms;
    int bad0 = 0, bad1 = 0, cases = 0;
    for (size_t n = 1; n <= 64; n++)
        for (int trial = 0; trial < (n == 64 ? 8 : 1); trial++) {
            loud_keys(&g, x, n, d);
            for (size_t t = 0; t < n; t++) {
                memset(bits + t * sb, (int)t, sb);
                sc[t] = (uint16_t)(t + 1);
            }
            for (int i = 0; i < d; i++) {
                float s = 0.0f;
                for (size_t j = 0; j < n; j++)
                    s += x[j * (size_t)d + i];
                m[i] = s / (float)n;
            }
            CHECK_RC(kvg_signature_ref(&rot, m, mb, &ms), 0);
            CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, n, sbits, ssc), 0);
            bad0 += memcmp(sbits, mb, sb) != 0 || ssc[0] != ms;
            if (n >= 2) {
                size_t f = farthest(x, n, d);
                bad1 += memcmp(sbits + sb, bits + f * sb, sb) != 0 || ssc[1] != sc[f];
            }
            cases++;
        }
    CHECK(bad0 == 0, "head_dim %d: item 0 is not the signature of the mean in %d of %d blocks", d, bad0, cases);
    CHECK(bad1 == 0, "head_dim %d: item 1 is not the farthest token's signature in %d of %d blocks", d, bad1, cases);

    /* ties to the lower index: tokens A B A B, each pair bit-identical,
     * so the two A's (and the two B's) have the same distance exactly */
    loud_keys(&g, x, 2, d);
    memcpy(x + 2 * (size_t)d, x, 2 * (size_t)d * sizeof *x);
    for (size_t t = 0; t < 4; t++) {
        memset(bits + t * sb, (int)t, sb);
        sc[t] = (uint16_t)(t + 1);
    }
    CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, 4, sbits, ssc), 0);
    size_t f = farthest(x, 4, d);
    CHECK(f < 2 && (size_t)sbits[sb] == f && (size_t)ssc[1] == f + 1, "head_dim %d: a tie went to token %u (want %zu)",
          d, (unsigned)sbits[sb], f);
}

/* (b) a one-token outlier: key + 16 x a unit direction, in a block of 64
 * keys whose loud channels make many tokens larger by norm; item 1 must
 * be its signature, wherever it sits. */
static void outlier_case(void)
{
    enum { D = 128, N = 64 };
    tu_rng g = { 77 };
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, D, 5), 0);
    static float x[N * D];
    uint8_t bits[N * D / 8], sbits[S * D / 8];
    uint16_t sc[N], ssc[S];
    int found = 0, by_norm = 0, trials = 0;
    for (int trial = 0; trial < 40; trial++, trials++) {
        loud_keys(&g, x, N, D);
        size_t o = (size_t)(trial * 29 + 3) % N;
        float u[D];
        double nn = 0;
        for (int i = 0; i < D; i++) {
            u[i] = tu_gauss(&g);
            nn += (double)u[i] * u[i];
        }
        for (int i = 0; i < D; i++)
            x[o * D + i] += 16.0f * (float)(u[i] / sqrt(nn));
        sign_all(&rot, x, N, bits, sc);
        CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, N, sbits, ssc), 0);
        found += memcmp(sbits + D / 8, bits + o * D / 8, D / 8) == 0 && ssc[1] == sc[o];
        size_t big = 0;             /* what a plain largest-norm rule would take (reported only) */
        double bn = -1;
        for (size_t t = 0; t < N; t++) {
            double s = 0;
            for (int i = 0; i < D; i++)
                s += (double)x[t * D + i] * x[t * D + i];
            if (s > bn) {
                bn = s;
                big = t;
            }
        }
        by_norm += big == o;
    }
    printf("  planted outlier: item 1 is it in %d of %d blocks; the largest norm is it in %d\n", found, trials,
           by_norm);
    CHECK(found == trials, "item 1 missed the planted outlier in %d of %d blocks", trials - found, trials);
}

/* (c) one token: item 1 repeats item 0 (the token is its own mean). */
static void one_token_case(void)
{
    tu_rng g = { 8 };
    for (int d = 64; d <= 256; d *= 2) {
        kvarc_rotation rot;
        CHECK_RC(kvarc_rotation_init(&rot, d, 3), 0);
        float x[KVARC_HEAD_DIM_MAX];
        uint8_t bits[KVARC_HEAD_DIM_MAX / 8], sbits[S * KVARC_HEAD_DIM_MAX / 8];
        uint16_t sc, ssc[S];
        loud_keys(&g, x, 1, d);
        sign_all(&rot, x, 1, bits, &sc);
        CHECK_RC(kvg_summary_ref(&rot, x, bits, &sc, 1, sbits, ssc), 0);
        for (int it = 1; it < S; it++)
            CHECK(memcmp(sbits + it * d / 8, sbits, (size_t)d / 8) == 0 && ssc[it] == ssc[0],
                  "head_dim %d, one token: item %d differs from item 0", d, it);
        CHECK(memcmp(sbits, bits, (size_t)d / 8) == 0 && ssc[0] == sc,
              "head_dim %d, one token: item 0 is not the token's signature", d);
    }
}

/* (d) bad input, (e) determinism. */
static void input_case(void)
{
    enum { D = 128, N = 64 };
    tu_rng g = { 9 };
    kvarc_rotation rot, bad;
    CHECK_RC(kvarc_rotation_init(&rot, D, 1), 0);
    static float x[(N + 1) * D];
    uint8_t bits[(N + 1) * D / 8], s1[S * D / 8], s2[S * D / 8];
    uint16_t sc[N + 1], c1[S], c2[S];
    loud_keys(&g, x, N + 1, D);
    sign_all(&rot, x, N + 1, bits, sc);
    CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, 0, s1, c1), -EINVAL);
    CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, N + 1, s1, c1), -EINVAL);
    CHECK_RC(kvg_summary_ref(NULL, x, bits, sc, N, s1, c1), -EINVAL);
    CHECK_RC(kvg_summary_ref(&rot, NULL, bits, sc, N, s1, c1), -EINVAL);
    CHECK_RC(kvg_summary_ref(&rot, x, NULL, sc, N, s1, c1), -EINVAL);
    CHECK_RC(kvg_summary_ref(&rot, x, bits, NULL, N, s1, c1), -EINVAL);
    CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, N, NULL, c1), -EINVAL);
    CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, N, s1, NULL), -EINVAL);
    bad = rot;
    bad.head_dim = 96;
    CHECK_RC(kvg_summary_ref(&bad, x, bits, sc, N, s1, c1), -EINVAL);
    bad.head_dim = 512;
    CHECK_RC(kvg_summary_ref(&bad, x, bits, sc, N, s1, c1), -EINVAL);
    bad.head_dim = 0;
    CHECK_RC(kvg_summary_ref(&bad, x, bits, sc, N, s1, c1), -EINVAL);
    float keep = x[37 * D + 11];
    x[37 * D + 11] = NAN;
    CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, N, s1, c1), KVARC_ENONFINITE);
    x[37 * D + 11] = INFINITY;
    CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, N, s1, c1), KVARC_ENONFINITE);
    x[37 * D + 11] = keep;

    /* the same inputs twice, over outputs that start different: the same bytes */
    for (size_t n = 1; n <= N; n += 21) {
        memset(s1, 0x00, sizeof s1);
        memset(c1, 0x00, sizeof c1);
        memset(s2, 0xff, sizeof s2);
        memset(c2, 0xff, sizeof c2);
        CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, n, s1, c1), 0);
        CHECK_RC(kvg_summary_ref(&rot, x, bits, sc, n, s2, c2), 0);
        CHECK(memcmp(s1, s2, sizeof s1) == 0 && memcmp(c1, c2, sizeof c1) == 0, "n %zu: two runs differ", n);
    }
}

/* (f) the lanes: kvg_summary_isa against the reference, byte for byte. */
static void isa_case(void)
{
    tu_rng g = { 77 };
    static float x[64 * KVARC_HEAD_DIM_MAX];
    uint8_t bits[64 * KVARC_HEAD_DIM_MAX / 8], b1[S * KVARC_HEAD_DIM_MAX / 8], b2[S * KVARC_HEAD_DIM_MAX / 8];
    uint16_t sc[64], c1[S], c2[S];
    int runs = 0;
    for (int isa = KVG_ISA_BASE; isa <= KVG_ISA_V4; isa++) {
        if (!kvg_codec_isa_supported((kvg_isa)isa)) {
            CHECK_RC(kvg_summary_isa((kvg_isa)isa, NULL, x, bits, sc, 1, b1, c1), -ENOTSUP);
            continue;
        }
        for (int d = 64; d <= 256; d *= 2) {
            kvarc_rotation rot;
            CHECK_RC(kvarc_rotation_init(&rot, d, 3), 0);
            const size_t sb = (size_t)d / 8;
            int diff = 0;
            for (size_t n = 1; n <= 64; n++) {
                loud_keys(&g, x, n, d);
                if (n % 5 == 0)                       /* a channel constant over the block: variance 0 */
                    for (size_t j = 0; j < n; j++)
                        x[j * (size_t)d + 3] = 1.25f;
                sign_all(&rot, x, n, bits, sc);
                memset(b1, 0x11, sizeof b1);
                memset(b2, 0xee, sizeof b2);
                int r1 = kvg_summary_ref(&rot, x, bits, sc, n, b1, c1);
                int r2 = kvg_summary_isa((kvg_isa)isa, &rot, x, bits, sc, n, b2, c2);
                diff += r1 != 0 || r2 != 0 || memcmp(b1, b2, S * sb) != 0 || memcmp(c1, c2, sizeof c1) != 0;
                runs++;
            }
            CHECK(diff == 0, "%s, head_dim %d: %d of 64 blocks differ from the reference",
                  kvg_codec_isa_name((kvg_isa)isa), d, diff);
            /* a distance that overflows fp32, a NaN, an Inf: the reference's code */
            loud_keys(&g, x, 64, d);
            sign_all(&rot, x, 64, bits, sc);
            x[5 * (size_t)d + 7] = 3e38f;
            x[6 * (size_t)d + 7] = -3e38f;
            CHECK_RC(kvg_summary_isa((kvg_isa)isa, &rot, x, bits, sc, 64, b2, c2),
                     kvg_summary_ref(&rot, x, bits, sc, 64, b1, c1));
            x[6 * (size_t)d + 7] = 1.0f;
            x[5 * (size_t)d + 7] = 1e19f;                 /* finite mean and variance, a distance past fp32 */
            int want = kvg_summary_ref(&rot, x, bits, sc, 64, b1, c1);
            CHECK_RC(kvg_summary_isa((kvg_isa)isa, &rot, x, bits, sc, 64, b2, c2), want);
            if (!want)
                CHECK(!memcmp(b1, b2, S * sb) && !memcmp(c1, c2, sizeof c1), "%s: a loud token's block differs",
                      kvg_codec_isa_name((kvg_isa)isa));
            x[5 * (size_t)d + 7] = NAN;
            CHECK_RC(kvg_summary_isa((kvg_isa)isa, &rot, x, bits, sc, 64, b2, c2), KVARC_ENONFINITE);
            x[5 * (size_t)d + 7] = -INFINITY;
            CHECK_RC(kvg_summary_isa((kvg_isa)isa, &rot, x, bits, sc, 64, b2, c2), KVARC_ENONFINITE);
        }
    }
    CHECK(runs > 0, "no lanes build ran");
}

static void block_best_case(void)
{
    const float is[] = { 1.0f, 2.0f,   5.0f, -3.0f,   NAN, 9.0f,   4.0f, NAN,   -1.0f, -2.0f };
    const uint8_t ok[] = { 1, 1, 1, 1, 0 };
    float out[5];
    kvg_block_best_ref(is, 5, 2, NULL, out);
    CHECK(out[0] == 2.0f && out[1] == 5.0f && isnan(out[2]) && out[3] == 4.0f && out[4] == -1.0f,
          "block best: %g %g %g %g %g", out[0], out[1], out[2], out[3], out[4]);
    kvg_block_best_ref(is, 5, 2, ok, out);
    CHECK(out[0] == 2.0f && out[4] == -INFINITY, "block best: a block without summaries scores %g", out[4]);
    kvg_block_best_ref(is, 2, 1, NULL, out);           /* one item per block: the items themselves */
    CHECK(out[0] == 1.0f && out[1] == 2.0f, "block best of one item: %g %g", out[0], out[1]);
}

int main(void)
{
    block_best_case();
    isa_case();
    for (int d = 64; d <= 256; d *= 2)
        definition_case(d);
    outlier_case();
    one_token_case();
    input_case();
    return tu_finish("test_coarse");
}
