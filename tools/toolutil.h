/* toolutil.h - small helpers shared by the tools (header-only). */
#ifndef KVARC_TOOLUTIL_H
#define KVARC_TOOLUTIL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* Monotonic seconds. */
static inline double tu_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* qsort comparator for doubles, ascending. */
static inline int tu_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ||a - b|| / ||b|| in double. */
static inline double tu_rel_err(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (double)(a[i] - b[i]) * (a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den + 1e-300));
}

/* Exact attention in double of the RoPE-turned query qr[d] over kv head h
 * of keys kr[pos][n_kv_heads][d] (turned) and values v (same layout),
 * scale 1/sqrt(d), on tokens [0, sinks) and [lo, pos] (sinks = lo = 0:
 * every token): out[d]; returns the log-sum-exp of the attended logits.
 * logits (NULL or pos + 1 doubles) receives each attended token's logit. */
static inline double tu_exact_attention(const float *kr, const float *v, int n_kv_heads, int d, const float *qr,
                                        int h, uint64_t pos, uint64_t sinks, uint64_t lo, float *out,
                                        double *logits)
{
    double m = -INFINITY, l = 0, acc[256] = { 0 }, inv = 1.0 / sqrt((double)d);
    for (int pass = 0; pass < 2; pass++)
        for (uint64_t j = 0; j <= pos; j++) {
            if (j >= sinks && j < lo)
                continue;
            double s;
            if (pass == 1 && logits) {
                s = logits[j];
            } else {
                const float *k = kr + (j * (uint64_t)n_kv_heads + (uint64_t)h) * (uint64_t)d;
                s = 0;
                for (int i = 0; i < d; i++)
                    s += (double)qr[i] * k[i];
                s *= inv;
                if (logits)
                    logits[j] = s;
            }
            if (pass == 0) {
                m = s > m ? s : m;
            } else {
                double w = exp(s - m);
                const float *vj = v + (j * (uint64_t)n_kv_heads + (uint64_t)h) * (uint64_t)d;
                l += w;
                for (int i = 0; i < d; i++)
                    acc[i] += w * vj[i];
            }
        }
    for (int i = 0; i < d; i++)
        out[i] = (float)(acc[i] / l);
    return m + log(l);
}

#endif
