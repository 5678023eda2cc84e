/* testutil.h - tiny helpers shared by kvarc's test executables.
 * Tests exit 0 (pass), 1 (fail) or 77 (skip). CHECK records a failure and
 * goes on, so one run reports every broken case. */
#ifndef KVARC_TESTUTIL_H
#define KVARC_TESTUTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kvarc_schema.h"

static int tu_failures;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            tu_failures++;                                                    \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__,  \
                    #cond);                                                   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
        }                                                                     \
    } while (0)

#define CHECK_RC(expr, want)                                                  \
    do {                                                                      \
        int rc_ = (int)(expr);                                                \
        CHECK(rc_ == (want), "%s returned %d (%s), want %d (%s)", #expr, rc_, \
              kvarc_strerror(rc_), (int)(want), kvarc_strerror(want));        \
    } while (0)

static inline int tu_finish(const char *name)
{
    if (tu_failures) {
        fprintf(stderr, "%s: %d check(s) failed\n", name, tu_failures);
        return 1;
    }
    printf("%s: ok\n", name);
    return 0;
}

/* Deterministic generator: splitmix64 stream, uniform and Gaussian. */
typedef struct tu_rng {
    uint64_t s;
} tu_rng;

static inline double tu_uniform(tu_rng *r)   /* (0, 1) */
{
    return ((double)(kvarc_splitmix64(&r->s) >> 11) + 0.5) * 0x1p-53;
}

static inline float tu_gauss(tu_rng *r)
{
    double u1 = tu_uniform(r), u2 = tu_uniform(r);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Random stage-1 signatures: n of d/8 bytes, and their fp16 scales with
 * 0, subnormal, the largest finite fp16 and ordinary ones among them. */
static inline void tu_random_sigs(tu_rng *g, int d, size_t n, uint8_t *bits, uint16_t *sc)
{
    for (size_t i = 0; i < n * (size_t)d / 8; i++)
        bits[i] = (uint8_t)(kvarc_splitmix64(&g->s) >> 56);
    for (size_t j = 0; j < n; j++)
        sc[j] = j % 97 == 0 ? 0 : j % 89 == 0 ? 1 : j % 83 == 0 ? 0x7bff : kvarc_f32_to_f16((float)tu_uniform(g) * 4);
}

/* n vectors [n][d] shaped like real pre-RoPE keys: a shared mean
 * direction, a few outlier channels 10x the rest, Gaussian bulk. */
static inline void tu_keys_outliers(tu_rng *r, float *x, size_t n, int d)
{
    for (size_t t = 0; t < n; t++)
        for (int i = 0; i < d; i++) {
            float g = tu_gauss(r);
            float mean = 0.5f * (float)((i * 37) % 7 - 3);
            float amp = (i % 29 == 3) ? 10.0f : 1.0f;
            x[t * (size_t)d + (size_t)i] = mean + amp * g;
        }
}

static inline double tu_rel_err(const float *a, const float *ref, const float *mu, int d)
{
    double num = 0, den = 0;
    for (int i = 0; i < d; i++) {
        double e = (double)a[i] - ref[i];
        double c = (double)ref[i] - (mu ? mu[i] : 0.0f);
        num += e * e;
        den += c * c;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

#endif
