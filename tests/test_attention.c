/* test_attention: attention over sinks + hot window + every record
 * retrieved (lossless format) equals plain softmax attention computed in
 * double over all tokens; the result does not depend on how keys are split
 * into partitions; GQA maps query heads to their KV head; huge logits stay
 * finite; bad input gets its defined error. */
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
    double w10[D];
    plain_attention(q + 7 * D, k + (size_t)T * D, v + (size_t)T * D, 10, scale, w10);
    CHECK(max_err(out + 7 * D, w10, D) < 1e-5, "per-head token counts ignored");

    /* huge logits: no overflow, the max key dominates */
    float big[NQ * D];
    for (int i = 0; i < NQ * D; i++)
        big[i] = q[i] * 1000.0f;
    CHECK_RC(kvg_attend_ref(big, NQ, NKV, D, scale, &one, 1, out), 0);
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
    q[5] = INFINITY;
    CHECK_RC(kvg_attend_ref(q, NQ, NKV, D, scale, &one, 1, out), KVARC_ENONFINITE);
    free(k); free(v); free(rec); free(ck); free(cv);
    return tu_finish("test_attention");
}
