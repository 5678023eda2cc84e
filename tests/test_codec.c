/* test_codec: record sizes, round-trip error per format within the bounds
 * SCHEMA.md states (Gaussian and outlier-heavy vectors, every input dtype,
 * every head_dim), lossless formats bit-exact, signatures equal the signs
 * of an independent double-precision rotation, and bad input gets its
 * defined error. */
#include <errno.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define N 256

/* SCHEMA.md section 5: mean and worst relative error ||x^ - x|| / ||x - mu||
 * over a batch, per format, for keys and values alike. */
static const struct {
    int fmt;
    double mean_max, worst_max;
} bounds[] = {
    { KVARC_FMT_Q3, 0.200, 0.36 },
    { KVARC_FMT_Q4, 0.105, 0.22 },
    { KVARC_FMT_I8, 0.010, 0.020 },
};

static void mean_of(kvarc_dtype dt, const void *x, int d, float *mu)
{
    for (int i = 0; i < d; i++) {
        double s = 0;
        for (int t = 0; t < N; t++)
            s += kvarc_load_f32(dt, x, (size_t)t * d + i);
        mu[i] = (float)(s / N);
    }
}

/* Independent rotation in double: explicit Sylvester Hadamard entries. */
static void rotate_double(const kvarc_rotation *rot, const float *x, double *y)
{
    int d = rot->head_dim;
    for (int r = 0; r < d; r++) {
        double s = 0;
        for (int c = 0; c < d; c++) {
            int sign = __builtin_popcount((unsigned)(r & c)) & 1 ? -1 : 1;
            s += sign * (double)rot->signs[c] * x[c];
        }
        y[r] = s / sqrt((double)d);
    }
}

static void check_roundtrip(int fmt, int d, kvarc_dtype dt, int outliers, tu_rng *r)
{
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, d, 0x5eed + (uint64_t)d), 0);
    size_t ne = (size_t)N * d;
    float *kf = calloc(ne, 4), *vf = calloc(ne, 4), *kd = malloc(ne * 4), *vd = malloc(ne * 4);
    float *kin = malloc(ne * 4), *vin = malloc(ne * 4);
    void *k = malloc(ne * 4), *v = malloc(ne * 4);
    int rb = kvarc_record_bytes(fmt, d);
    uint8_t *rec = malloc((size_t)N * rb), *bits = malloc((size_t)N * d / 8);
    uint16_t *ss = malloc(N * 2);
    float mu_k[KVARC_HEAD_DIM_MAX], mu_v[KVARC_HEAD_DIM_MAX];

    if (outliers) {
        tu_keys_outliers(r, kf, N, d);
        tu_keys_outliers(r, vf, N, d);
    } else {
        for (size_t i = 0; i < ne; i++) {
            kf[i] = tu_gauss(r);
            vf[i] = 0.3f * tu_gauss(r);
        }
    }
    for (size_t i = 0; i < ne; i++) {
        kvarc_store_f32(dt, k, i, kf[i]);
        kvarc_store_f32(dt, v, i, vf[i]);
    }
    for (size_t i = 0; i < ne; i++) {       /* the values as the codec sees them */
        kin[i] = kvarc_load_f32(dt, k, i);
        vin[i] = kvarc_load_f32(dt, v, i);
    }
    mean_of(dt, k, d, mu_k);
    mean_of(dt, v, d, mu_v);
    kvg_codec c = { fmt, &rot, mu_k, mu_v };
    CHECK_RC(kvg_encode_ref(&c, dt, k, v, N, rec, bits, ss, NULL), 0);
    CHECK_RC(kvg_decode_ref(&c, rec, N, kd, vd), 0);

    const kvarc_format_info *fi = kvarc_format_get(fmt);
    double mean = 0, worst = 0;
    size_t sign_bad = 0;
    for (int t = 0; t < N; t++) {
        size_t o = (size_t)t * d;
        double ek = tu_rel_err(kd + o, kin + o, mu_k, d), ev = tu_rel_err(vd + o, vin + o, mu_v, d);
        mean += (ek + ev) / (2.0 * N);
        worst = fmax(worst, fmax(ek, ev));
        /* signature: signs of the centered, rotated key */
        float x[KVARC_HEAD_DIM_MAX];
        double y[KVARC_HEAD_DIM_MAX];
        for (int i = 0; i < d; i++)
            x[i] = kin[o + i] - mu_k[i];
        rotate_double(&rot, x, y);
        for (int i = 0; i < d; i++) {
            int bit = (bits[(size_t)t * d / 8 + i / 8] >> (i % 8)) & 1;
            if (fabs(y[i]) > 1e-4 && bit != (y[i] >= 0))
                sign_bad++;
        }
    }
    CHECK(sign_bad == 0, "%s d%d: %zu signature bits disagree with the double rotation",
          fi->name, d, sign_bad);
    if (fi->lossless) {
        kvarc_dtype own = fmt == KVARC_FMT_F16 ? KVARC_DTYPE_F16 : KVARC_DTYPE_BF16;
        if (dt == own) {
            int half = rb / 2;
            size_t diff = 0;
            for (int t = 0; t < N; t++) {
                diff += memcmp(rec + (size_t)t * rb, (uint8_t *)k + (size_t)t * d * 2, (size_t)half) != 0;
                diff += memcmp(rec + (size_t)t * rb + half, (uint8_t *)v + (size_t)t * d * 2, (size_t)half) != 0;
            }
            CHECK(diff == 0, "%s d%d: lossless record differs from the input bytes", fi->name, d);
            size_t vals = 0;
            for (size_t i = 0; i < ne; i++)
                vals += memcmp(&kd[i], &kin[i], 4) != 0 || memcmp(&vd[i], &vin[i], 4) != 0;
            CHECK(vals == 0, "%s d%d: %zu decoded values not bit-exact", fi->name, d, vals);
        } else {
            double tol = fmt == KVARC_FMT_F16 ? 0x1p-11 : 0x1p-8;
            /* half an ulp of the format, or half its subnormal step */
            double floor_abs = fmt == KVARC_FMT_F16 ? 0x1p-25 : 0x1p-134;
            size_t over = 0;
            for (size_t i = 0; i < ne; i++)
                over += fabs((double)kd[i] - kin[i]) > tol * fabs(kin[i]) + floor_abs;
            CHECK(over == 0, "%s d%d from %s: %zu elements off by more than rounding", fi->name,
                  d, kvarc_dtype_name(dt), over);
        }
    } else {
        for (size_t b = 0; b < sizeof bounds / sizeof bounds[0]; b++) {
            if (bounds[b].fmt != fmt)
                continue;
            CHECK(mean <= bounds[b].mean_max && worst <= bounds[b].worst_max,
                  "%s d%d %s %s: mean rel err %.4f (bound %.3f), worst %.4f (bound %.3f)",
                  fi->name, d, kvarc_dtype_name(dt), outliers ? "outliers" : "gauss", mean,
                  bounds[b].mean_max, worst, bounds[b].worst_max);
        }
        if (dt == KVARC_DTYPE_F32)
            printf("  %-4s d%-3d %-8s mean rel err %.4f  worst %.4f\n", fi->name, d,
                   outliers ? "outliers" : "gauss", mean, worst);
    }
    free(kf); free(vf); free(kd); free(vd); free(kin); free(vin);
    free(k); free(v); free(rec); free(bits); free(ss);
}

static void check_sizes(void)
{
    CHECK(kvarc_record_bytes(KVARC_FMT_Q3, 128) == 104, "q3 d128 must be 104 B, is %d",
          kvarc_record_bytes(KVARC_FMT_Q3, 128));
    CHECK(kvarc_record_bytes(KVARC_FMT_Q3, 64) == 56 && kvarc_record_bytes(KVARC_FMT_Q3, 256) == 200,
          "q3 sizes");
    CHECK(kvarc_record_bytes(KVARC_FMT_Q4, 128) == 136, "q4 d128");
    CHECK(kvarc_record_bytes(KVARC_FMT_I8, 128) == 264, "i8 d128");
    CHECK(kvarc_record_bytes(KVARC_FMT_F16, 128) == 512 && kvarc_record_bytes(KVARC_FMT_BF16, 64) == 256,
          "lossless sizes");
    CHECK_RC(kvarc_record_bytes(KVARC_FMT_Q3, 96), KVARC_EHEADDIM);
    CHECK_RC(kvarc_record_bytes(0, 128), KVARC_EFORMAT);
    CHECK_RC(kvarc_record_bytes(6, 128), KVARC_EFORMAT);
    CHECK(kvarc_sig_bytes(128) == 16, "signature bits of d128 are 16 bytes");
    CHECK(kvarc_format_by_name("q3") == kvarc_format_get(KVARC_FMT_DEFAULT), "default is q3");
    CHECK(kvarc_format_by_name("q5") == NULL && kvarc_format_by_name(NULL) == NULL, "by_name");
}

static void check_bad_input(void)
{
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, 96, 1), KVARC_EHEADDIM);
    CHECK_RC(kvarc_rotation_init(&rot, 0, 1), KVARC_EHEADDIM);
    CHECK_RC(kvarc_rotation_init(NULL, 128, 1), -EINVAL);
    CHECK_RC(kvarc_rotation_init(&rot, 128, 1), 0);
    float k[8 * 128], v[8 * 128], out[8 * 128];
    uint8_t rec[8 * 512], bits[8 * 16];
    uint16_t ss[8];
    tu_rng r = { 7 };
    for (int i = 0; i < 8 * 128; i++) {
        k[i] = tu_gauss(&r);
        v[i] = tu_gauss(&r);
    }
    kvg_codec c = { KVARC_FMT_Q3, &rot, NULL, NULL };
    size_t bad = 99;
    CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, 0, NULL, NULL, NULL, NULL), 0);
    CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, NULL, v, 8, rec, bits, ss, NULL), -EINVAL);
    CHECK_RC(kvg_encode_ref(NULL, KVARC_DTYPE_F32, k, v, 8, rec, bits, ss, NULL), -EINVAL);
    CHECK_RC(kvg_encode_ref(&c, (kvarc_dtype)7, k, v, 8, rec, bits, ss, NULL), KVARC_EDTYPE);
    kvg_codec badfmt = { 42, &rot, NULL, NULL };
    CHECK_RC(kvg_encode_ref(&badfmt, KVARC_DTYPE_F32, k, v, 8, rec, bits, ss, NULL), KVARC_EFORMAT);
    CHECK_RC(kvg_decode_ref(&badfmt, rec, 8, out, NULL), KVARC_EFORMAT);
    kvarc_rotation rot96 = rot;
    rot96.head_dim = 96;
    kvg_codec baddim = { KVARC_FMT_Q3, &rot96, NULL, NULL };
    CHECK_RC(kvg_encode_ref(&baddim, KVARC_DTYPE_F32, k, v, 8, rec, bits, ss, NULL), KVARC_EHEADDIM);

    for (int f = KVARC_FMT_Q3; f <= KVARC_FMT_BF16; f++) {
        c.format = f;
        k[5 * 128 + 17] = NAN;
        CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, 8, rec, bits, ss, &bad), KVARC_ENONFINITE);
        CHECK(bad == 5, "fmt %d: NaN in token 5 reported at %zu", f, bad);
        k[5 * 128 + 17] = 0.5f;
        v[3 * 128] = -INFINITY;
        CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, 8, rec, bits, ss, &bad), KVARC_ENONFINITE);
        CHECK(bad == 3, "fmt %d: Inf in V of token 3 reported at %zu", f, bad);
        v[3 * 128] = 1.0f;
        k[2 * 128 + 1] = 1e30f;          /* finite, but its squared norm is not */
        CHECK_RC(kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, 8, rec, bits, ss, &bad), KVARC_ENONFINITE);
        CHECK(bad == 2, "fmt %d: overflowing norm of token 2 reported at %zu", f, bad);
        k[2 * 128 + 1] = 0.0f;
        /* zero vectors (after centering) decode to exactly the mean */
        float mu[128];
        for (int i = 0; i < 128; i++) {
            mu[i] = 0.25f * (float)(i % 5);
            k[i] = mu[i];
            v[i] = 0.0f;
        }
        kvg_codec cz = { f, &rot, mu, NULL };
        CHECK_RC(kvg_encode_ref(&cz, KVARC_DTYPE_F32, k, v, 8, rec, bits, ss, NULL), 0);
        CHECK_RC(kvg_decode_ref(&cz, rec, 1, out, out + 128), 0);
        int exact = memcmp(out, mu, sizeof mu) == 0;
        for (int i = 0; i < 128; i++)
            exact &= out[128 + i] == 0.0f;
        CHECK(exact, "fmt %d: zero vector does not decode exactly", f);
        CHECK(ss[0] == 0, "fmt %d: zero key must have signature scale 0, has %04x", f, ss[0]);
    }
}

int main(void)
{
    check_sizes();
    check_bad_input();
    tu_rng r = { 2026 };
    static const int fmts[] = { KVARC_FMT_Q3, KVARC_FMT_Q4, KVARC_FMT_I8, KVARC_FMT_F16, KVARC_FMT_BF16 };
    static const int dims[] = { 64, 128, 256 };
    static const kvarc_dtype dts[] = { KVARC_DTYPE_F32, KVARC_DTYPE_F16, KVARC_DTYPE_BF16 };
    for (size_t f = 0; f < 5; f++)
        for (size_t di = 0; di < 3; di++)
            for (size_t t = 0; t < 3; t++)
                for (int o = 0; o < 2; o++)
                    check_roundtrip(fmts[f], dims[di], dts[t], o, &r);
    return tu_finish("test_codec");
}
