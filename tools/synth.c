/* synth.c - structured synthetic K/V/Q (see synth.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "synth.h"

#define AR_RHO  0.8
#define AR_BACK 24          /* rho^24 < 0.005: random access rebuilds the AR noise from this far back */

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* A standard normal from a hash of (a, b, c, i). */
static float gauss(uint64_t a, uint64_t b, uint64_t c, uint64_t i)
{
    uint64_t h = mix(a ^ mix(b ^ mix(c ^ mix(i))));
    double u1 = ((double)(h >> 11) + 0.5) / 9007199254740992.0;
    double u2 = ((double)(mix(h) >> 11) + 0.5) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

int synth_topic(const synth *s, uint64_t pos)
{
    return (int)(mix(s->seed ^ 0x7091c ^ (pos / SYNTH_RUN)) % SYNTH_TOPICS);
}

int synth_init(synth *s, int d, int H, int QH, uint64_t seed, uint64_t n_tokens, const double *depths, int nn)
{
    memset(s, 0, sizeof *s);
    s->d = d;
    s->n_kv_heads = H;
    s->n_q_heads = QH;
    s->seed = seed;
    s->n_needles = nn < SYNTH_NEEDLES ? nn : SYNTH_NEEDLES;
    s->mu = malloc(sizeof(float) * (size_t)H * d);
    s->topic = malloc(sizeof(float) * SYNTH_TOPICS * (size_t)H * d);
    s->needle_dir = malloc(sizeof(float) * SYNTH_NEEDLES * (size_t)H * d);
    s->ar = calloc((size_t)H * d, sizeof *s->ar);
    if (!s->mu || !s->topic || !s->needle_dir || !s->ar) {
        synth_free(s);
        return -1;
    }
    for (int h = 0; h < H; h++)
        for (int i = 0; i < d; i++)
            s->mu[h * d + i] = 2.0f * gauss(seed, 1, (uint64_t)h, (uint64_t)i);
    for (int t = 0; t < SYNTH_TOPICS; t++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < d; i++)
                s->topic[((size_t)t * H + h) * d + i] = i < d / 2 ? 0.0f : 1.2f * gauss(seed, 2, (uint64_t)(t * H + h), (uint64_t)i);
    for (int j = 0; j < SYNTH_NEEDLES; j++)
        for (int h = 0; h < H; h++) {
            float *u = s->needle_dir + ((size_t)j * H + h) * d;
            double n2 = 0;
            for (int i = 0; i < d; i++) {
                u[i] = i < d / 2 ? 0.0f : gauss(seed, 3, (uint64_t)(j * H + h), (uint64_t)i);
                n2 += (double)u[i] * u[i];
            }
            for (int i = 0; i < d; i++)
                u[i] = (float)(u[i] / sqrt(n2));
        }
    for (int j = 0; j < s->n_needles; j++) {
        uint64_t p = (uint64_t)(depths[j] * (double)n_tokens);
        s->needle_pos[j] = p < n_tokens ? p : n_tokens - 1;
    }
    return 0;
}

void synth_free(synth *s)
{
    free(s->mu);
    free(s->topic);
    free(s->needle_dir);
    free(s->ar);
    memset(s, 0, sizeof *s);
}

void synth_kv(synth *s, uint64_t pos, float *k, float *v)
{
    const int d = s->d, H = s->n_kv_heads;
    const double c = sqrt(1 - AR_RHO * AR_RHO);
    int needle = -1;
    for (int j = 0; j < s->n_needles; j++)
        if (s->needle_pos[j] == pos)
            needle = j;
    if (pos != s->next_pos) {              /* random access: rebuild the AR state */
        uint64_t first = pos > AR_BACK ? pos - AR_BACK : 0;
        memset(s->ar, 0, sizeof(float) * (size_t)H * d);
        for (uint64_t t = first; t < pos; t++)
            for (int j = 0; j < H * d; j++)
                s->ar[j] = (float)(AR_RHO * s->ar[j] + c * gauss(s->seed, 4, t * (uint64_t)H + (uint64_t)(j / d),
                                                                 (uint64_t)(j % d)));
    }
    const float *tp = s->topic + (size_t)synth_topic(s, pos) * H * d;
    for (int h = 0; h < H; h++)
        for (int i = 0; i < d; i++) {
            float *ar = &s->ar[h * d + i];
            *ar = (float)(AR_RHO * *ar + c * gauss(s->seed, 4, pos * (uint64_t)H + (uint64_t)h, (uint64_t)i));
            float spread = (i % 37 == 5) ? 5.0f : 1.0f;     /* outlier channels */
            float x = s->mu[h * d + i] + tp[h * d + i] + spread * *ar;
            if (needle >= 0)
                x += 16.0f * s->needle_dir[((size_t)needle * H + h) * d + i];
            k[h * d + i] = x;
            float y = gauss(s->seed, 5, pos * (uint64_t)H + (uint64_t)h, (uint64_t)i);
            v[h * d + i] = needle >= 0 ? 3.0f * ((i + needle) % 2 ? 1.0f : -1.0f) : y;
        }
    s->next_pos = pos + 1;
}

void synth_query(const synth *s, uint64_t pos, int needle, float *q)
{
    const int d = s->d, H = s->n_kv_heads, G = s->n_q_heads / H;
    int topic = synth_topic(s, (uint64_t)(mix(s->seed ^ pos) % (pos + 1)));
    for (int hq = 0; hq < s->n_q_heads; hq++) {
        int h = hq / G;
        for (int i = 0; i < d; i++) {
            float noise = 0.3f * gauss(s->seed, 6, pos * (uint64_t)s->n_q_heads + (uint64_t)hq, (uint64_t)i);
            float dir = needle >= 0 ? 10.0f * s->needle_dir[((size_t)needle * H + h) * d + i]
                                    : 1.5f * s->topic[((size_t)topic * H + h) * d + i];
            q[hq * d + i] = dir + noise;
        }
    }
}

void synth_means(synth *s, uint64_t n_tokens, int n, float *means)
{
    const int d = s->d, H = s->n_kv_heads;
    float *k = malloc(sizeof(float) * (size_t)H * d), *v = malloc(sizeof(float) * (size_t)H * d);
    double *acc = calloc((size_t)H * 2 * d, sizeof *acc);
    if (!k || !v || !acc) {
        memset(means, 0, sizeof(float) * (size_t)H * 2 * d);
        free(k);
        free(v);
        free(acc);
        return;
    }
    for (int j = 0; j < n; j++) {
        synth_kv(s, (uint64_t)((double)j / n * (double)n_tokens), k, v);
        for (int h = 0; h < H; h++)
            for (int i = 0; i < d; i++) {
                acc[(h * 2) * d + i] += k[h * d + i];
                acc[(h * 2 + 1) * d + i] += v[h * d + i];
            }
    }
    for (int i = 0; i < H * 2 * d; i++)
        means[i] = (float)(acc[i] / n);
    free(k);
    free(v);
    free(acc);
}
