/* synth.c - structured synthetic K/V/Q (see synth.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"
#include "synth.h"

#define AR_RHO  0.8
#define AR_BACK 24          /* rho^24 < 0.005: random access rebuilds the AR noise from this far back */

/* The pos generator's strengths (see synth.h). Topics have free's 1.2 per
 * dimension, now in every dimension; a needle key carries 16 x its unit
 * direction, as in free. POS_NEEDLE_Q: full attention puts about half its
 * weight on a 16-token needle at 1M tokens (bench-quality's "needle share"
 * column: ~0.5 at 1M, 0.96 at 32K). POS_TOPIC_Q: an ordinary query puts
 * most of its weight on its run and the same topic's runs near it (its
 * exact top 324 tokens hold 0.99 of it at 32K, 0.90 at 1M). */
#define POS_THETA    500000.0f
#define POS_TOPIC    1.2f
#define POS_NEEDLE_K 16.0f
#define POS_NEEDLE_Q 10.0f
#define POS_TOPIC_Q  1.25f
#define POS_Q_NOISE  0.3f

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

/* The pos generator's cheap standard normal: Irwin-Hall of four 16-bit
 * uniforms of one hash (variance 1, tails cut at 3.5 sigma). base is a hash
 * of (seed, stream, token, head); i the dimension. */
static inline float gauss_fast(uint64_t base, uint64_t i)
{
    uint64_t h = mix(base + i);
    uint64_t sum = (h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48);
    return (float)(((double)sum - 131070.0) * (1.7320508075688772 / 131072.0));
}

static inline uint64_t gauss_base(uint64_t seed, uint64_t stream, uint64_t a)
{
    return mix(seed ^ mix(stream ^ mix(a)));
}

int synth_needle_at(const synth *s, uint64_t pos)
{
    int needle = -1;
    for (int j = 0; j < s->n_needles; j++)
        if (pos >= s->needle_pos[j] && pos - s->needle_pos[j] < (uint64_t)s->needle_len)
            needle = j;
    return needle;
}

int synth_topic(const synth *s, uint64_t pos)
{
    return (int)(mix(s->seed ^ 0x7091c ^ (pos / SYNTH_RUN)) % SYNTH_TOPICS);
}

/* The fields both generators share, and their buffers: 0, or -1 (freed). */
static int synth_setup(synth *s, int d, int H, int QH, uint64_t seed, int gen, int rotary_dims, float theta,
                       int needle_len, int nn)
{
    memset(s, 0, sizeof *s);
    s->d = d;
    s->n_kv_heads = H;
    s->n_q_heads = QH;
    s->seed = seed;
    s->gen = gen;
    s->rotary_dims = rotary_dims;
    s->rope_theta = theta;
    s->needle_len = needle_len;
    s->n_needles = nn < SYNTH_NEEDLES ? nn : SYNTH_NEEDLES;
    s->mu = malloc(sizeof(float) * (size_t)H * d);
    s->topic = malloc(sizeof(float) * SYNTH_TOPICS * (size_t)H * d);
    s->needle_dir = malloc(sizeof(float) * SYNTH_NEEDLES * (size_t)H * d);
    s->ar = calloc((size_t)H * d, sizeof *s->ar);
    if (!s->mu || !s->topic || !s->needle_dir || !s->ar) {
        synth_free(s);
        return -1;
    }
    return 0;
}

int synth_init(synth *s, int d, int H, int QH, uint64_t seed, uint64_t n_tokens, const double *depths, int nn)
{
    if (synth_setup(s, d, H, QH, seed, SYNTH_GEN_FREE, d / 2, 10000.0f, 1, nn))
        return -1;
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

int synth_init_pos(synth *s, int d, int H, int QH, uint64_t seed, uint64_t n_tokens, const double *depths, int nn,
                   int needle_len)
{
    memset(s, 0, sizeof *s);
    if (needle_len <= 0)
        needle_len = SYNTH_NEEDLE_LEN;
    if (d < 2 || d % 2 || d > KVARC_HEAD_DIM_MAX || H < 1 || QH < H || QH % H || n_tokens < (uint64_t)needle_len)
        return -1;
    if (synth_setup(s, d, H, QH, seed, SYNTH_GEN_POS, d, POS_THETA, needle_len, nn))
        return -1;
    /* the slow parts once, with the careful Gaussian */
    for (int h = 0; h < H; h++)
        for (int i = 0; i < d; i++)
            s->mu[h * d + i] = 2.0f * gauss(seed, 11, (uint64_t)h, (uint64_t)i);
    for (int t = 0; t < SYNTH_TOPICS; t++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < d; i++)
                s->topic[((size_t)t * H + h) * d + i] = POS_TOPIC * gauss(seed, 12, (uint64_t)(t * H + h), (uint64_t)i);
    for (int j = 0; j < SYNTH_NEEDLES; j++)
        for (int h = 0; h < H; h++) {
            float *u = s->needle_dir + ((size_t)j * H + h) * d;
            double n2 = 0;
            for (int i = 0; i < d; i++) {
                u[i] = gauss(seed, 13, (uint64_t)(j * H + h), (uint64_t)i);
                n2 += (double)u[i] * u[i];
            }
            for (int i = 0; i < d; i++)
                u[i] = (float)(u[i] / sqrt(n2));
        }
    uint64_t last = n_tokens - (uint64_t)needle_len;
    for (int j = 0; j < s->n_needles; j++) {
        uint64_t p = (uint64_t)(depths[j] * (double)n_tokens);
        s->needle_pos[j] = p < last ? p : last;
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

/* The pos generator's K (same parts as free's, every dimension, cheap
 * Gaussians) and V (free's pattern for needles). */
static void synth_kv_pos(synth *s, uint64_t pos, float *k, float *v)
{
    const int d = s->d, H = s->n_kv_heads;
    const float c = (float)sqrt(1 - AR_RHO * AR_RHO), rho = (float)AR_RHO;
    const int needle = synth_needle_at(s, pos);
    if (pos != s->next_pos) {              /* random access: rebuild the AR state */
        uint64_t first = pos > AR_BACK ? pos - AR_BACK : 0;
        memset(s->ar, 0, sizeof(float) * (size_t)H * d);
        for (uint64_t t = first; t < pos; t++)
            for (int h = 0; h < H; h++) {
                uint64_t b = gauss_base(s->seed, 14, t * (uint64_t)H + (uint64_t)h);
                for (int i = 0; i < d; i++)
                    s->ar[h * d + i] = rho * s->ar[h * d + i] + c * gauss_fast(b, (uint64_t)i);
            }
    }
    const float *tp = s->topic + (size_t)synth_topic(s, pos) * H * d;
    for (int h = 0; h < H; h++) {
        uint64_t b = gauss_base(s->seed, 14, pos * (uint64_t)H + (uint64_t)h);
        const float *u = needle >= 0 ? s->needle_dir + ((size_t)needle * H + h) * d : NULL;
        for (int i = 0; i < d; i++) {
            float *ar = &s->ar[h * d + i];
            *ar = rho * *ar + c * gauss_fast(b, (uint64_t)i);
            float spread = (i % 37 == 5) ? 5.0f : 1.0f;     /* outlier channels */
            float x = s->mu[h * d + i] + tp[h * d + i] + spread * *ar;
            if (u)
                x += POS_NEEDLE_K * u[i];
            k[h * d + i] = x;
        }
    }
    synth_v(s, pos, v);
    s->next_pos = pos + 1;
}

void synth_v(const synth *s, uint64_t pos, float *v)
{
    const int d = s->d, H = s->n_kv_heads, needle = synth_needle_at(s, pos);
    for (int h = 0; h < H; h++) {
        uint64_t b = gauss_base(s->seed, 15, pos * (uint64_t)H + (uint64_t)h);
        for (int i = 0; i < d; i++)
            if (needle >= 0)
                v[h * d + i] = 3.0f * ((i + needle) % 2 ? 1.0f : -1.0f);
            else if (s->gen == SYNTH_GEN_FREE)
                v[h * d + i] = gauss(s->seed, 5, pos * (uint64_t)H + (uint64_t)h, (uint64_t)i);
            else
                v[h * d + i] = gauss_fast(b, (uint64_t)i);
    }
}

void synth_kv(synth *s, uint64_t pos, float *k, float *v)
{
    if (s->gen == SYNTH_GEN_POS) {
        synth_kv_pos(s, pos, k, v);
        return;
    }
    const int d = s->d, H = s->n_kv_heads;
    const double c = sqrt(1 - AR_RHO * AR_RHO);
    const int needle = synth_needle_at(s, pos);
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

/* The pos generator's query: per kv head, the target's direction turned
 * from its centre c to the query's position (RoPE(c - pos)), so that at
 * true positions it meets the target's keys at their real distance; plus
 * noise per query head. */
static void synth_query_pos(const synth *s, uint64_t pos, int needle, float *q)
{
    const int d = s->d, H = s->n_kv_heads, G = s->n_q_heads / H;
    double c;
    const float *src;
    float amp;
    int topic = 0;
    if (needle >= 0 && needle < s->n_needles) {
        c = (double)s->needle_pos[needle] + 0.5 * (double)(s->needle_len - 1);
        amp = POS_NEEDLE_Q;
    } else {
        uint64_t run = (mix(s->seed ^ 0x9057 ^ pos) % (pos + 1)) / SYNTH_RUN;
        topic = synth_topic(s, run * SYNTH_RUN);
        c = (double)(run * SYNTH_RUN) + 0.5 * (SYNTH_RUN - 1);
        amp = POS_TOPIC_Q;
        needle = -1;
    }
    double inv_freq[KVARC_HEAD_DIM_MAX / 2], cs[KVARC_HEAD_DIM_MAX];
    kvg_rope_freqs(inv_freq, d, s->rotary_dims, s->rope_theta);
    kvg_rope_angles(cs, d, s->rotary_dims, inv_freq, c - (double)pos);
    for (int h = 0; h < H; h++) {
        float dir[KVARC_HEAD_DIM_MAX];
        src = needle >= 0 ? s->needle_dir + ((size_t)needle * H + h) * d : s->topic + ((size_t)topic * H + h) * d;
        for (int i = 0; i < d; i++)
            dir[i] = amp * src[i];
        kvg_rope_turn(dir, d, s->rotary_dims, 0, cs);
        for (int g = 0; g < G; g++) {
            int hq = h * G + g;
            uint64_t b = gauss_base(s->seed, 16, pos * (uint64_t)s->n_q_heads + (uint64_t)hq);
            for (int i = 0; i < d; i++)
                q[hq * d + i] = dir[i] + POS_Q_NOISE * gauss_fast(b, (uint64_t)i);
        }
    }
}

void synth_query(const synth *s, uint64_t pos, int needle, float *q)
{
    if (s->gen == SYNTH_GEN_POS) {
        synth_query_pos(s, pos, needle, q);
        return;
    }
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
