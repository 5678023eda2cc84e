/* test_attention: attention over sinks + hot window + every record
 * retrieved (lossless format) equals plain softmax attention computed in
 * double over all tokens; the result does not depend on how keys are split
 * into partitions; GQA maps query heads to their KV head; huge logits stay
 * finite; bad input gets its defined error. kvg_attend (the lanes, every
 * build this CPU runs) gives kvg_attend_ref's bits and return codes in
 * every case, and at head_dim 64 and 256, GQA groups 1..8, 1..40 keys. */
#include <errno.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define D 128
#define NKV 2
#define NQ 8
#define T 600            /* tokens per kv head: 4 sinks, 500 cold, 96 hot */

/* double-precision softmax attention of q over k/v [n][D] */
static void plain_attention(const float *q, const float *k, const float *v, size_t n,
                            double scale, double *out)
{
    double m = -INFINITY, l = 0;
    double *lg = malloc(n * sizeof *lg);
    for (size_t t = 0; t < n; t++) {
        double s = 0;
        for (int i = 0; i < D; i++)
            s += (double)q[i] * k[t * D + i];
        lg[t] = s * scale;
        m = fmax(m, lg[t]);
    }
    memset(out, 0, D * sizeof *out);
    for (size_t t = 0; t < n; t++) {
        double p = exp(lg[t] - m);
        l += p;
        for (int i = 0; i < D; i++)
            out[i] += p * v[t * D + i];
    }
    for (int i = 0; i < D; i++)
        out[i] /= l;
    free(lg);
}

static double max_err(const float *got, const double *want, int n)
{
    double e = 0, mag = 0;
    for (int i = 0; i < n; i++) {
        e = fmax(e, fabs(got[i] - want[i]));
        mag = fmax(mag, fabs(want[i]));
    }
    return e / (mag > 0 ? mag : 1);
}

/* kvg_attend_isa of every build against kvg_attend_ref: the same code
 * and the same output bytes. */
static int same_all(const char *what, const float *q, int nq, int nkv, int d, float scale, const kvg_attn_part *parts,
                    int np)
{
    size_t no = (size_t)(nq > 0 ? nq : 1) * (size_t)(d > 0 && d <= 256 ? d : 256);
    float *want = malloc(no * 4), *got = malloc(no * 4);
    memset(want, 0x7e, no * 4);
    int rc = kvg_attend_ref(q, nq, nkv, d, scale, parts, np, want), bad = 0;
    for (int isa = KVG_ISA_BASE; isa <= KVG_ISA_V4; isa++) {
        if (!kvg_codec_isa_supported((kvg_isa)isa))
            continue;
        memset(got, 0x7e, no * 4);
        int r2 = kvg_attend_isa((kvg_isa)isa, q, nq, nkv, d, scale, parts, np, got);
        if (r2 != rc || memcmp(want, got, no * 4)) {
            bad++;
            CHECK(0, "%s: %s gives %d, the reference %d%s", what, kvg_codec_isa_name((kvg_isa)isa), r2, rc,
                  r2 == rc ? " and other bytes" : "");
        }
    }
    free(want);
    free(got);
    return bad;
}

/* Odd shapes: head_dim 64 / 256, groups of 1..8, few keys in three
 * partitions (one empty for some heads). */
static void shapes_case(tu_rng *r)
{
    for (int d = 64; d <= 256; d *= 2)
        for (int g = 1; g <= 8; g += g < 2 ? 1 : 3)
            for (size_t n = 1; n <= 40; n += n < 18 ? 1 : 11) {
                int nkv = 2, nq = nkv * g;
                size_t ne = (size_t)nkv * n * (size_t)d;
                float *k = malloc(ne * 4), *v = malloc(ne * 4), *q = malloc((size_t)nq * (size_t)d * 4);
                for (size_t i = 0; i < ne; i++) {
                    k[i] = tu_gauss(r) * 3.0f;
                    v[i] = tu_gauss(r);
                }
                for (int i = 0; i < nq * d; i++)
                    q[i] = tu_gauss(r);
                size_t cut = n / 3, none[2] = { 0, n - cut };
                kvg_attn_part parts[3] = {
                    { k, v, n, cut, NULL },
                    { k + cut * (size_t)d, v + cut * (size_t)d, n, 0, none },
                    { k, v, n, n, NULL },
                };
                char what[64];
                snprintf(what, sizeof what, "d %d group %d keys %zu", d, g, n);
                same_all(what, q, nq, nkv, d, 1.0f / sqrtf((float)d), parts, 3);
                free(k); free(v); free(q);
            }
}

int main(void)
{
    tu_rng r = { 3 };
    size_t ne = (size_t)NKV * T * D;
    float *k = malloc(ne * 4), *v = malloc(ne * 4), q[NQ * D], out[NQ * D];
    for (size_t i = 0; i < ne; i++) {
        k[i] = tu_gauss(&r);
        v[i] = tu_gauss(&r);
    }
    for (int i = 0; i < NQ * D; i++)
        q[i] = tu_gauss(&r);
    /* round K/V to fp16 so the lossless f16 format holds them exactly */
    for (size_t i = 0; i < ne; i++) {
        k[i] = kvarc_f16_to_f32(kvarc_f32_to_f16(k[i]));
        v[i] = kvarc_f16_to_f32(kvarc_f32_to_f16(v[i]));
    }
    float scale = 1.0f / sqrtf(D);
    double want[NQ][D];
    for (int h = 0; h < NQ; h++)
        plain_attention(q + h * D, k + (size_t)(h / (NQ / NKV)) * T * D,
                        v + (size_t)(h / (NQ / NKV)) * T * D, T, scale, want[h]);

    /* cold tokens 4..503 go through records of the f16 format and back */
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, D, 9), 0);
    kvg_codec c = { KVARC_FMT_F16, &rot, NULL, NULL };
    int rb = kvarc_record_bytes(KVARC_FMT_F16, D);
    uint8_t *rec = malloc((size_t)500 * rb), bits[500 * D / 8];
    uint16_t ss[500], kh[500 * D], vh[500 * D];
    float *ck = malloc((size_t)NKV * 500 * D * 4), *cv = malloc((size_t)NKV * 500 * D * 4);
    for (int h = 0; h < NKV; h++) {
        for (int i = 0; i < 500 * D; i++) {
            kh[i] = kvarc_f32_to_f16(k[(size_t)h * T * D + 4 * D + i]);
            vh[i] = kvarc_f32_to_f16(v[(size_t)h * T * D + 4 * D + i]);
        }
        CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F16, kh, vh, 500, rec, bits, ss, NULL), 0);
        CHECK_RC(kvg_decode_ref(&c, rec, 500, ck + (size_t)h * 500 * D, cv + (size_t)h * 500 * D), 0);
    }
    kvg_attn_part parts[3] = {
        { k, v, T, 4, NULL },                                   /* sinks */
        { k + 504 * D, v + 504 * D, T, 96, NULL },              /* hot window */
        { ck, cv, 500, 500, NULL },                             /* retrieved */
    };
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, parts, 3, out), 0);
    same_all("sinks + hot + records", q, NQ, NKV, D, scale, parts, 3);
    double e = 0;
    for (int h = 0; h < NQ; h++)
        e = fmax(e, max_err(out + h * D, want[h], D));
    printf("  sinks + hot + all records (f16) vs plain softmax: max rel err %.2e\n", e);
    CHECK(e < 1e-5, "attention over every record differs from softmax by %g", e);

    /* any split gives the same answer: 1 partition, and 7 with empties */
    kvg_attn_part one = { k, v, T, T, NULL };
    float out1[NQ * D], out7[NQ * D];
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, &one, 1, out1), 0);
    size_t cnt[NKV] = { 0, 0 };
    kvg_attn_part seven[7];
    size_t cuts[8] = { 0, 0, 1, 50, 50, 333, 599, T };
    for (int p = 0; p < 7; p++)
        seven[p] = (kvg_attn_part){ k + cuts[p] * D, v + cuts[p] * D, T, cuts[p + 1] - cuts[p], NULL };
    seven[3].n_per_head = cnt;                                  /* empty for both heads */
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, seven, 7, out7), 0);
    same_all("one partition", q, NQ, NKV, D, scale, &one, 1);
    same_all("seven partitions", q, NQ, NKV, D, scale, seven, 7);
    double e1 = 0, e7 = 0;
    for (int h = 0; h < NQ; h++) {
        e1 = fmax(e1, max_err(out1 + h * D, want[h], D));
        e7 = fmax(e7, max_err(out7 + h * D, want[h], D));
    }
    CHECK(e1 < 1e-5 && e7 < 1e-5, "split changes the answer: %g (1 part) %g (7 parts)", e1, e7);

    /* per-head counts: head 1 sees only its first 10 tokens */
    size_t per[NKV] = { T, 10 };
    kvg_attn_part ph = { k, v, T, 0, per };
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, &ph, 1, out), 0);
    same_all("per-head counts", q, NQ, NKV, D, scale, &ph, 1);
    double w10[D];
    plain_attention(q + 7 * D, k + (size_t)T * D, v + (size_t)T * D, 10, scale, w10);
    CHECK(max_err(out + 7 * D, w10, D) < 1e-5, "per-head token counts ignored");

    /* huge logits: no overflow, the max key dominates */
    float big[NQ * D];
    for (int i = 0; i < NQ * D; i++)
        big[i] = q[i] * 1000.0f;
    CHECK_RC(kvg_attend_ref(big, NQ, NKV, D, scale, &one, 1, out), 0);
    same_all("huge logits", big, NQ, NKV, D, scale, &one, 1);
    int finite = 1;
    for (int i = 0; i < NQ * D; i++)
        finite &= isfinite(out[i]);
    CHECK(finite, "huge logits produced non-finite output");

    /* bad input */
    CHECK_RC(kvg_attend_ref(q, 6, 4, D, scale, &one, 1, out), -EINVAL);
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, 96, scale, &one, 1, out), KVARC_EHEADDIM);
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, NAN, &one, 1, out), -EINVAL);
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, NULL, 1, out), -EINVAL);
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, NULL, 0, out), -ENODATA);
    kvg_attn_part over = { k, v, 10, 11, NULL };
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, &over, 1, out), -EINVAL);
    same_all("count past the stride", q, NQ, NKV, D, scale, &over, 1);
    same_all("no partitions", q, NQ, NKV, D, scale, NULL, 0);
    same_all("6 over 4 heads", q, 6, 4, D, scale, &one, 1);
    size_t nobody[NKV] = { 5, 0 };
    kvg_attn_part empty1 = { k, v, T, 0, nobody };
    same_all("a head with no key", q, NQ, NKV, D, scale, &empty1, 1);
    q[5] = INFINITY;
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, &one, 1, out), KVARC_ENONFINITE);
    same_all("an infinite query", q, NQ, NKV, D, scale, &one, 1);
    shapes_case(&r);
    free(k); free(v); free(rec); free(ck); free(cv);
    return tu_finish("test_attention");
}
