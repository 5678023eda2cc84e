/* smoke.c - a program built against an installed kvarc with nothing but
 * `pkg-config --cflags --libs kvarc` (tests/install/test_install.sh).
 *
 * It is what an engine would do: connect to a kvarcd, create a
 * conversation, append K/V, attend, sync, fork, stats, and have a wrong
 * model refused by attach. Retrieval is set up to be exact (f16 records
 * of f16-representable K/V, true positions, no RoPE, top_k above every
 * cold token), so kvarc's attention must equal plain softmax attention
 * computed here: the library is not only linked, it computes. */
#include <kvarc.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HKV 2
#define HQ  4
#define HD  64
#define N   300

static int fails;
#define CHECK(c, ...)                                        \
    do {                                                     \
        if (!(c)) {                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                    \
            fputc('\n', stderr);                             \
            fails++;                                         \
        }                                                    \
    } while (0)

static uint64_t rng = 88172645463325252ull;
static float unit(void)   /* f16-representable, in [-2, 2) */
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    float x = (float)((rng >> 11) * 0x1.0p-53) * 4.0f - 2.0f;
    return kvarc_f16_to_f32(kvarc_f32_to_f16(x));
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: smoke DATA_DIR (of a running kvarcd)\n");
        return 2;
    }
    static float k[HKV][N][HD], v[HKV][N][HD], q[HQ][1][HD], out[HQ][1][HD];
    for (int h = 0; h < HKV; h++)
        for (int t = 0; t < N; t++)
            for (int j = 0; j < HD; j++)
                k[h][t][j] = unit(), v[h][t][j] = unit();
    for (int h = 0; h < HQ; h++)
        for (int j = 0; j < HD; j++)
            q[h][0][j] = unit();

    kvarc_client *cl;
    int rc = kvarc_client_open(argv[1], NULL, NULL, &cl);
    CHECK(rc == 0, "kvarc_client_open(%s): %s", argv[1], kvarc_strerror(rc));
    if (rc)
        return 1;
    kvarc_model m = { .n_layers = 1, .n_kv_heads = HKV, .n_q_heads = HQ, .head_dim = HD,
                      .dtype = KVARC_DTYPE_F32, .rope_theta = 10000, .rotary_dims = 0, .fingerprint = "smoke" };
    kvarc_options o;
    kvarc_options_default(&o);
    o.format = KVARC_FMT_F16, o.pos_mode = 0, o.sinks = 4, o.hot_window = 32, o.batch = 32, o.top_k = N;
    o.shortlist = 1;
    kvarc_conv *cv;
    rc = kvarc_conv_create(cl, "smoke", "c", &m, &o, NULL, &cv);
    CHECK(rc == 0, "kvarc_conv_create: %s", kvarc_client_errmsg(cl));
    if (rc)
        return 1;
    rc = kvarc_append(cv, 0, KVARC_DTYPE_F32, k, v, N);
    CHECK(rc == 0, "kvarc_append: %s", kvarc_errmsg(cv));
    rc = kvarc_attend(cv, 0, &q[0][0][0], 1, &out[0][0][0]);
    CHECK(rc == 0, "kvarc_attend: %s", kvarc_errmsg(cv));
    CHECK(kvarc_length(cv, 0) == N, "kvarc_length %llu, not %d", (unsigned long long)kvarc_length(cv, 0), N);

    /* softmax attention over every token, in double */
    double worst = 0;
    for (int hq = 0; hq < HQ; hq++) {
        const int h = hq / (HQ / HKV);
        double s[N], mx = -INFINITY, z = 0, o_[HD] = { 0 };
        for (int t = 0; t < N; t++) {
            s[t] = 0;
            for (int j = 0; j < HD; j++)
                s[t] += (double)q[hq][0][j] * k[h][t][j];
            s[t] /= sqrt(HD);
            mx = s[t] > mx ? s[t] : mx;
        }
        for (int t = 0; t < N; t++) {
            s[t] = exp(s[t] - mx), z += s[t];
            for (int j = 0; j < HD; j++)
                o_[j] += s[t] * v[h][t][j];
        }
        for (int j = 0; j < HD; j++) {
            double d = fabs(o_[j] / z - out[hq][0][j]);
            worst = d > worst ? d : worst;
        }
    }
    CHECK(worst < 1e-4, "kvarc's attention differs from exact attention by %g", worst);

    rc = kvarc_conv_sync(cv);
    CHECK(rc == 0, "kvarc_conv_sync: %s", kvarc_errmsg(cv));
    rc = kvarc_fork(cv, "smoke", "fork", 0);
    CHECK(rc == 0, "kvarc_fork: %s", kvarc_errmsg(cv));
    kvarc_stats st;
    kvarc_conv_stats(cv, &st);
    CHECK(st.archived == N && st.steps == 1, "stats: archived %llu, steps %llu", (unsigned long long)st.archived,
          (unsigned long long)st.steps);
    CHECK(kvarc_conv_close(cv) == 0, "kvarc_conv_close");

    kvarc_model wrong = m;
    wrong.head_dim = 128;
    rc = kvarc_conv_attach(cl, "smoke", "fork", &wrong, NULL, &cv);
    CHECK(rc == KVARC_ESHAPE, "attach with a wrong head_dim: %d (%s), not KVARC_ESHAPE", rc, kvarc_strerror(rc));
    CHECK(strstr(kvarc_client_errmsg(cl), "head_dim") != NULL, "attach's message names head_dim: '%s'",
          kvarc_client_errmsg(cl));
    rc = kvarc_conv_attach(cl, "smoke", "fork", &m, NULL, &cv);
    CHECK(rc == 0, "attach of the fork: %s", kvarc_client_errmsg(cl));
    if (!rc) {
        CHECK(kvarc_length(cv, 0) == N, "the fork holds %llu tokens", (unsigned long long)kvarc_length(cv, 0));
        kvarc_conv_close(cv);
    }
    kvarc_client_close(cl);
    if (fails)
        return 1;
    printf("smoke: installed libkvarc attends within %.2g of exact attention\n", worst);
    return 0;
}
