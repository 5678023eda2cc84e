/* test_codec_simd - the codec's lanes (codec_simd.c) give the reference's
 * bits: encode (records, signature bits and scales), decode, stage-2
 * scores (remapped and at true positions) and signatures of centered
 * keys, for every
 * build this CPU runs, every format, head dim and input dtype, batch tails,
 * zero vectors, and the error paths (a NaN or Inf anywhere, a squared norm
 * that overflows: the same code and bad token as the reference). */
#include <errno.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define NMAX 300

static float kf[NMAX * KVARC_HEAD_DIM_MAX], vf_[NMAX * KVARC_HEAD_DIM_MAX];
static uint8_t kin[NMAX * KVARC_HEAD_DIM_MAX * 4], vin[NMAX * KVARC_HEAD_DIM_MAX * 4];
static uint8_t rec_r[NMAX * 1024], rec_s[NMAX * 1024], bits_r[NMAX * 32], bits_s[NMAX * 32];
static uint16_t sc_r[NMAX], sc_s[NMAX];
static float dk_r[NMAX * KVARC_HEAD_DIM_MAX], dk_s[NMAX * KVARC_HEAD_DIM_MAX];
static float dv_r[NMAX * KVARC_HEAD_DIM_MAX], dv_s[NMAX * KVARC_HEAD_DIM_MAX];

static const int fmts[] = { KVARC_FMT_Q3, KVARC_FMT_Q4, KVARC_FMT_I8, KVARC_FMT_F16, KVARC_FMT_BF16 };
static const int dims[] = { 64, 128, 256 };
static const kvarc_dtype dts[] = { KVARC_DTYPE_F32, KVARC_DTYPE_F16, KVARC_DTYPE_BF16 };
static const size_t counts[] = { 1, 15, 16, 17, 47, 300 };

/* Keys shaped like a model's (outlier channels, a mean), some tokens all
 * zero (sigma 0), some tiny, some V times big (finite in the dtype). */
static void make_inputs(tu_rng *r, size_t n, int d, float big)
{
    tu_keys_outliers(r, kf, n, d);
    tu_keys_outliers(r, vf_, n, d);
    for (size_t t = 0; t < n; t++) {
        float *k = kf + t * (size_t)d, *v = vf_ + t * (size_t)d;
        if (t % 11 == 5)
            for (int i = 0; i < d; i++)
                k[i] = v[i] = 0.0f;
        if (t % 13 == 7)
            for (int i = 0; i < d; i++)
                k[i] *= 1e-30f;
        if (t % 17 == 9)
            for (int i = 0; i < d; i++)
                v[i] *= big;
    }
}

static void to_dtype(kvarc_dtype dt, size_t n, int d)
{
    for (size_t e = 0; e < n * (size_t)d; e++) {
        kvarc_store_f32(dt, kin, e, kf[e]);
        kvarc_store_f32(dt, vin, e, vf_[e]);
    }
}

static void check_codec(kvg_isa isa, tu_rng *r)
{
    const char *nm = kvg_codec_isa_name(isa);
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        int d = dims[di];
        kvarc_rotation rot;
        CHECK_RC(kvarc_rotation_init(&rot, d, 0x5eed + (uint64_t)d), 0);
        float mu_k[KVARC_HEAD_DIM_MAX], mu_v[KVARC_HEAD_DIM_MAX];
        for (int i = 0; i < d; i++) {
            mu_k[i] = 0.3f * tu_gauss(r);
            mu_v[i] = 0.1f * tu_gauss(r);
        }
        for (size_t fi = 0; fi < sizeof fmts / sizeof fmts[0]; fi++)
            for (size_t ti = 0; ti < sizeof dts / sizeof dts[0]; ti++)
                for (size_t ci = 0; ci < sizeof counts / sizeof counts[0]; ci++) {
                    size_t n = counts[ci];
                    int centered = (int)((ci + fi) % 2);
                    kvg_codec c = { fmts[fi], &rot, centered ? mu_k : NULL, centered ? mu_v : NULL };
                    int rb = kvarc_record_bytes(fmts[fi], d);
                    make_inputs(r, n, d, dts[ti] == KVARC_DTYPE_F16 ? 100.0f : 1e15f);
                    to_dtype(dts[ti], n, d);
                    memset(rec_r, 0x11, n * (size_t)rb);
                    memset(rec_s, 0x22, n * (size_t)rb);
                    CHECK_RC(kvg_encode_ref(&c, dts[ti], kin, vin, n, rec_r, bits_r, sc_r, NULL), 0);
                    CHECK_RC(kvg_encode_isa(isa, &c, dts[ti], kin, vin, n, rec_s, bits_s, sc_s, NULL), 0);
                    CHECK(!memcmp(rec_r, rec_s, n * (size_t)rb) && !memcmp(bits_r, bits_s, n * (size_t)d / 8) &&
                              !memcmp(sc_r, sc_s, n * 2),
                          "%s: encode d %d fmt %d dtype %d n %zu centered %d differs from the reference", nm, d,
                          fmts[fi], dts[ti], n, centered);
                    CHECK_RC(kvg_decode_ref(&c, rec_r, n, dk_r, dv_r), 0);
                    CHECK_RC(kvg_decode_isa(isa, &c, rec_r, n, dk_s, dv_s), 0);
                    CHECK(!memcmp(dk_r, dk_s, n * (size_t)d * 4) && !memcmp(dv_r, dv_s, n * (size_t)d * 4),
                          "%s: decode d %d fmt %d n %zu differs from the reference", nm, d, fmts[fi], n);
                    /* one half only */
                    memset(dv_s, 0x33, n * (size_t)d * 4);
                    CHECK_RC(kvg_decode_isa(isa, &c, rec_r, n, NULL, dv_s), 0);
                    CHECK(!memcmp(dv_r, dv_s, n * (size_t)d * 4), "%s: decode of V alone differs", nm);
                }
    }
}

/* A NaN / Inf in K or V of token bad, or a squared norm past fp32: the
 * reference's code and bad token, and the reference's bytes before it. */
static void check_faults(kvg_isa isa, tu_rng *r)
{
    const char *nm = kvg_codec_isa_name(isa);
    int d = 128;
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, d, 77), 0);
    kvg_codec c = { KVARC_FMT_Q3, &rot, NULL, NULL };
    int rb = kvarc_record_bytes(KVARC_FMT_Q3, d);
    const size_t bads[] = { 0, 15, 16, 37, 299 };
    const float poison[] = { NAN, INFINITY, -INFINITY, 3e38f };   /* the last: squares overflow */
    for (size_t bi = 0; bi < sizeof bads / sizeof bads[0]; bi++)
        for (size_t pi = 0; pi < sizeof poison / sizeof poison[0]; pi++)
            for (int inv = 0; inv < 2; inv++) {
                size_t n = NMAX, bad = bads[bi];
                make_inputs(r, n, d, 1e15f);
                (inv ? vf_ : kf)[bad * (size_t)d + (size_t)(bi * 7 % (size_t)d)] = poison[pi];
                if (pi == 3)   /* a second bad token later must not be the one reported */
                    (inv ? kf : vf_)[(NMAX - 1) * (size_t)d] = NAN;
                size_t br = 12345, bs = 54321;
                memset(rec_r, 0, n * (size_t)rb);
                memset(rec_s, 0, n * (size_t)rb);
                int rr = kvg_encode_ref(&c, KVARC_DTYPE_F32, kf, vf_, n, rec_r, bits_r, sc_r, &br);
                int rs = kvg_encode_isa(isa, &c, KVARC_DTYPE_F32, kf, vf_, n, rec_s, bits_s, sc_s, &bs);
                CHECK(rr == KVARC_ENONFINITE && rs == rr && bs == br,
                      "%s: poison %g in %s at %zu: ref %d bad %zu, lanes %d bad %zu", nm, poison[pi],
                      inv ? "V" : "K", bad, rr, br, rs, bs);
                CHECK(!memcmp(rec_r, rec_s, bad * (size_t)rb), "%s: records before the bad token differ", nm);
            }
    /* what the reference refuses, refused the same */
    kvg_codec nf = { 99, &rot, NULL, NULL };
    CHECK_RC(kvg_encode_isa(isa, &nf, KVARC_DTYPE_F32, kf, vf_, 4, rec_s, bits_s, sc_s, NULL), KVARC_EFORMAT);
    CHECK_RC(kvg_encode_isa(isa, &c, (kvarc_dtype)9, kf, vf_, 4, rec_s, bits_s, sc_s, NULL), KVARC_EDTYPE);
    CHECK_RC(kvg_encode_isa(isa, &c, KVARC_DTYPE_F32, NULL, vf_, 4, rec_s, bits_s, sc_s, NULL), -EINVAL);
    CHECK_RC(kvg_encode_isa(isa, NULL, KVARC_DTYPE_F32, kf, vf_, 4, rec_s, bits_s, sc_s, NULL), -EINVAL);
    CHECK_RC(kvg_encode_isa(isa, &c, KVARC_DTYPE_F32, kf, vf_, 0, NULL, NULL, NULL, NULL), 0);
    CHECK_RC(kvg_decode_isa(isa, &nf, rec_s, 4, dk_s, NULL), KVARC_EFORMAT);
    CHECK_RC(kvg_decode_isa(isa, &c, NULL, 4, dk_s, NULL), -EINVAL);
}

/* kvg_key_scores (remapped positions: no RoPE) against the reference. */
static void check_key_scores(kvg_isa isa, tu_rng *r)
{
    const char *nm = kvg_codec_isa_name(isa);
    float q[5 * KVARC_HEAD_DIM_MAX], s_r[NMAX], s_s[NMAX];
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        int d = dims[di];
        kvarc_rotation rot;
        CHECK_RC(kvarc_rotation_init(&rot, d, 31337), 0);
        float mu_k[KVARC_HEAD_DIM_MAX];
        for (int i = 0; i < d; i++)
            mu_k[i] = 0.5f * tu_gauss(r);
        for (size_t fi = 0; fi < sizeof fmts / sizeof fmts[0]; fi++)
            for (size_t ci = 0; ci < sizeof counts / sizeof counts[0]; ci++) {
                size_t n = counts[ci];
                kvg_codec c = { fmts[fi], &rot, ci % 2 ? NULL : mu_k, NULL };
                make_inputs(r, n, d, 1e15f);
                CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, kf, vf_, n, rec_r, bits_r, sc_r, NULL), 0);
                int nq = 1 + (int)((ci + fi) % 5);
                for (int i = 0; i < nq * d; i++)
                    q[i] = tu_gauss(r);
                CHECK_RC(kvg_key_scores_ref(&c, q, nq, rec_r, n, s_r), 0);
                memset(s_s, 0x44, sizeof s_s);
                CHECK_RC(kvg_key_scores_isa(isa, &c, q, nq, rec_r, n, s_s), 0);
                CHECK(!memcmp(s_r, s_s, n * 4), "%s: key scores d %d fmt %d n %zu nq %d differ", nm, d, fmts[fi],
                      n, nq);
                q[0] = INFINITY;
                CHECK_RC(kvg_key_scores_isa(isa, &c, q, nq, rec_r, n, s_s), KVARC_ENONFINITE);
                CHECK_RC(kvg_key_scores_isa(isa, &c, q, 65, rec_r, n, s_s), -EINVAL);
            }
    }
}

/* kvg_signatures against kvg_signature_ref token by token. */
static void check_signatures(kvg_isa isa, tu_rng *r)
{
    const char *nm = kvg_codec_isa_name(isa);
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        int d = dims[di];
        kvarc_rotation rot;
        CHECK_RC(kvarc_rotation_init(&rot, d, 4242), 0);
        for (size_t ci = 0; ci < sizeof counts / sizeof counts[0]; ci++) {
            size_t n = counts[ci];
            make_inputs(r, n, d, 1e15f);
            for (size_t t = 0; t < n; t++)
                CHECK_RC(kvg_signature_ref(&rot, kf + t * (size_t)d, bits_r + t * (size_t)d / 8, &sc_r[t]), 0);
            memset(bits_s, 0x5a, n * (size_t)d / 8);
            CHECK_RC(kvg_signatures_isa(isa, &rot, kf, n, bits_s, sc_s, NULL), 0);
            CHECK(!memcmp(bits_r, bits_s, n * (size_t)d / 8) && !memcmp(sc_r, sc_s, n * 2),
                  "%s: signatures d %d n %zu differ from the reference", nm, d, n);
        }
        /* a NaN, an Inf, an overflowing norm at token bad: its code and index */
        const float poison[] = { NAN, INFINITY, 3e38f };
        for (size_t pi = 0; pi < 3; pi++) {
            size_t n = 100, bad = 17 + 23 * pi, got = 999;
            make_inputs(r, n, d, 1.0f);
            kf[bad * (size_t)d + 5] = poison[pi];
            kf[99 * (size_t)d] = NAN;
            CHECK_RC(kvg_signatures_isa(isa, &rot, kf, n, bits_s, sc_s, &got), KVARC_ENONFINITE);
            CHECK(got == bad, "%s: signatures: poison %g at %zu reported at %zu", nm, poison[pi], bad, got);
        }
        CHECK_RC(kvg_signatures_isa(isa, NULL, kf, 4, bits_s, sc_s, NULL), -EINVAL);
        CHECK_RC(kvg_signatures_isa(isa, &rot, NULL, 4, bits_s, sc_s, NULL), -EINVAL);
        CHECK_RC(kvg_signatures_isa(isa, &rot, NULL, 0, NULL, NULL, NULL), 0);
    }
}

static void check_scores(kvg_isa isa, tu_rng *r)
{
    const char *nm = kvg_codec_isa_name(isa);
    static uint64_t pos[NMAX];
    float q[4 * KVARC_HEAD_DIM_MAX], s_r[NMAX], s_s[NMAX];
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        int d = dims[di];
        kvarc_rotation rot;
        CHECK_RC(kvarc_rotation_init(&rot, d, 99), 0);
        float mu_k[KVARC_HEAD_DIM_MAX];
        for (int i = 0; i < d; i++)
            mu_k[i] = 0.5f * tu_gauss(r);
        const int rds[] = { d, d / 2, 0 };
        for (int layout = 0; layout < 2; layout++)
            for (int ri = 0; ri < 3; ri++)
                for (size_t fi = 0; fi < 3; fi++) {
                    kvg_rope rp;
                    CHECK_RC(kvg_rope_init(&rp, d, rds[ri], layout, 500000.0f), 0);
                    kvg_rope_table tb;
                    CHECK_RC(kvg_rope_table_init(&tb, &rp), 0);
                    kvg_codec c = { fmts[fi], &rot, fi == 1 ? NULL : mu_k, NULL };
                    size_t n = counts[(fi + (size_t)ri) % 6];
                    make_inputs(r, n, d, 1e15f);
                    CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, kf, vf_, n, rec_r, bits_r, sc_r, NULL), 0);
                    for (size_t j = 0; j < n; j++)    /* small, large, past 2^32 */
                        pos[j] = j % 3 == 0 ? j : j % 3 == 1 ? 1000000 + 977 * j : (1ull << 33) + 12345 * j;
                    int nq = 1 + (int)((fi + (size_t)layout) % 4);
                    for (int i = 0; i < nq * d; i++)
                        q[i] = tu_gauss(r);
                    for (int use_tb = 0; use_tb < 2; use_tb++) {
                        CHECK_RC(kvg_key_scores_pos_ref(&c, &rp, use_tb ? &tb : NULL, q, nq, rec_r, pos, n, s_r),
                                 0);
                        memset(s_s, 0x44, sizeof s_s);
                        CHECK_RC(kvg_key_scores_pos_isa(isa, &c, &rp, use_tb ? &tb : NULL, q, nq, rec_r, pos, n,
                                                        s_s),
                                 0);
                        CHECK(!memcmp(s_r, s_s, n * 4),
                              "%s: scores d %d rotary %d layout %d fmt %d n %zu nq %d table %d differ", nm, d,
                              rds[ri], layout, fmts[fi], n, nq, use_tb);
                    }
                    q[nq * d - 1] = NAN;
                    CHECK_RC(kvg_key_scores_pos_isa(isa, &c, &rp, &tb, q, nq, rec_r, pos, n, s_s), KVARC_ENONFINITE);
                    CHECK_RC(kvg_key_scores_pos_isa(isa, &c, &rp, &tb, q, 0, rec_r, pos, n, s_s), -EINVAL);
                    kvg_rope_table_free(&tb);
                }
    }
}

int main(void)
{
    tu_rng r = { 20261202 };
    int ran = 0;
    CHECK(kvg_codec_isa_supported(kvg_codec_isa_best()) && kvg_codec_isa_best() != KVG_ISA_REF,
          "the best build must be a supported build of the lanes");
    for (int isa = KVG_ISA_BASE; isa <= KVG_ISA_V4; isa++) {
        if (!kvg_codec_isa_supported((kvg_isa)isa)) {
            printf("test_codec_simd: %s not supported by this CPU, skipped\n", kvg_codec_isa_name((kvg_isa)isa));
            CHECK_RC(kvg_encode_isa((kvg_isa)isa, NULL, KVARC_DTYPE_F32, NULL, NULL, 0, NULL, NULL, NULL, NULL),
                     -ENOTSUP);
            continue;
        }
        check_codec((kvg_isa)isa, &r);
        check_faults((kvg_isa)isa, &r);
        check_scores((kvg_isa)isa, &r);
        check_signatures((kvg_isa)isa, &r);
        check_key_scores((kvg_isa)isa, &r);
        printf("test_codec_simd: %s checked\n", kvg_codec_isa_name((kvg_isa)isa));
        ran++;
    }
    CHECK(ran >= 1, "no build ran");
    CHECK_RC(kvg_encode_isa((kvg_isa)7, NULL, KVARC_DTYPE_F32, NULL, NULL, 0, NULL, NULL, NULL, NULL), -ENOTSUP);
    return tu_finish("test_codec_simd");
}
