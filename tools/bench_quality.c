/* bench-quality - how faithful retrieval attention is, per synthetic
 * generator, position mode, record format, top_k, shortlist factor, score
 * mode and context length, on structured synthetic K/V/Q (tools/synth.h),
 * through libkvarc's public API and a real kvarcd; beside the best any
 * retrieval could do at the same token budget (the oracle) and a sliding
 * window of that budget (the baseline that forgets).
 *
 *   bench-quality [--kvarcd PATH] [--gen free,pos] [--pos-mode true,remapped]
 *                 [--contexts 4096,16384,65536] [--formats q3,q4,i8,f16]
 *                 [--top-k 32,64,128] [--shortlist 8] [--score asym] [--coarse 0,64]
 *                 [--steps 16] [--hot-window 256] [--sinks 4]
 *                 [--kv-heads 2] [--group 4] [--needle-len 16]
 *                 [--expect-oracle R] [--expect-needles F] [--expect-err E]
 *
 * Model: 1 layer, --kv-heads KV heads, --group query heads each (GQA),
 * head_dim 128, RoPE layout 0 as the generator says: free, RoPE on the
 * first 64 dimensions (theta 10000), topics and needles in the other 64,
 * five one-token needles at depths 10..90%; pos, RoPE on all 128
 * (theta 500000), topics and needles in every dimension, eight needles of
 * --needle-len tokens at stratified depths, every query aiming at its
 * target at the target's true distance. Each step appends one token and
 * attends with its query: even steps aim at a needle, odd steps at a past
 * topic run.
 *
 * The reference is exact full attention over every token in double, query
 * at its position, every key at its own (true positions, whatever the
 * position mode under test). Per step and query head:
 *   recall  : |retrieved cold tokens in the exact top_k cold tokens by logit| / top_k
 *   mass    : the exact attention weight of what was attended (sinks +
 *             retrieved + hot window; for remapped mode, of the same token set)
 *   oracle  : the most mass any choice of top_k cold tokens per kv head can
 *             reach with the same sinks and hot window (the top_k cold
 *             tokens by summed exact weight of the kv head's query heads)
 *   /oracle : mass / oracle
 *   KL      : KL(attended || full) = -ln(mass), in nats
 *   rel err : ||out - exact|| / ||exact|| over all heads (kvarc's own output)
 *   needles : needle steps, per kv head, where at least half of the needle's
 *             tokens were attended
 * and per context, "needle share": full attention's weight on the needle's
 * tokens (what a model would read there).
 *
 * Memory: K once (pre-RoPE fp32, contexts x kv heads x 128 x 4 B: 1 GiB at
 * 1M tokens and 2 kv heads); V is regenerated (synth_v) wherever needed.
 * Two streaming passes over K make the reference: the first, while
 * generating, the exact output and log-sum-exp of every query head; the
 * second the exact top cold tokens, the oracle and the needle shares.
 * Gates (for tests and acceptance): with --expect-*, every kvarc row must
 * reach mass/oracle >= R, find a fraction >= F of the needle steps and
 * keep rel_err <= E; a row that does not is named on a '# GATE FAIL' line
 * and the exit code is 1.
 * Output: one line per row, columns separated by spaces, the generator and
 * the position mode first (grep '^pos  *true'); '#' lines are the
 * references and the timings.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "kvarc.h"
#include "kvg.h"
#include "synth.h"
#include "toolutil.h"

#define D       128
#define MAXL    16
#define CHUNK   4096          /* tokens per kvarc_append while archiving */

typedef struct list {
    long v[MAXL];
    int  n;
} list;

static int parse_list_min(const char *s, list *l, const char *const *names, long min)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s", s);
    l->n = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t && l->n < MAXL; t = strtok_r(NULL, ",", &save)) {
        long v = -1;
        for (int i = 0; names && names[i]; i++)
            if (!strcmp(t, names[i]))
                v = i;
        if (!names)
            v = strtol(t, NULL, 10);
        if (v < 0 || (!names && v < min))
            return -1;
        l->v[l->n++] = v;
    }
    return l->n ? 0 : -1;
}

/* A comma list of names (names given) or of numbers >= 1. */
static int parse_list(const char *s, list *l, const char *const *names)
{
    return parse_list_min(s, l, names, 1);
}

/* A min-heap of the best n (value, position) pairs seen. */
typedef struct best {
    double   *val;
    uint64_t *pos;
    int       n, cap;
} best;

/* Where a value v replacing the root settles: the children smaller than
 * v move up along the way. */
static int sift_down(best *b, double v)
{
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= b->n)
            break;
        if (c + 1 < b->n && b->val[c + 1] < b->val[c])
            c++;
        if (b->val[c] >= v)
            break;
        b->val[i] = b->val[c];
        b->pos[i] = b->pos[c];
        i = c;
    }
    return i;
}

static void best_push(best *b, double v, uint64_t p)
{
    int i;
    if (b->n < b->cap) {
        i = b->n++;
        while (i > 0 && b->val[(i - 1) / 2] > v) {
            b->val[i] = b->val[(i - 1) / 2];
            b->pos[i] = b->pos[(i - 1) / 2];
            i = (i - 1) / 2;
        }
    } else {
        if (b->cap == 0 || v <= b->val[0])
            return;
        i = sift_down(b, v);                /* v replaces the root */
    }
    b->val[i] = v;
    b->pos[i] = p;
}

/* Empty the heap into pos/val, best first. */
static int best_drain(best *b, uint64_t *pos, double *val)
{
    int n = b->n;
    for (int r = n - 1; r >= 0; r--) {
        if (pos)
            pos[r] = b->pos[0];
        if (val)
            val[r] = b->val[0];
        double v = b->val[--b->n];
        uint64_t p = b->pos[b->n];
        int i = sift_down(b, v);
        if (b->n) {
            b->val[i] = v;
            b->pos[i] = p;
        }
    }
    return n;
}

/* The reference of one decode step (query at pos = N + step). */
typedef struct step_ref {
    uint64_t pos, ns, hot_lo;  /* sinks [0, ns), cold [ns, hot_lo), hot [hot_lo, pos] */
    int      needle;           /* the needle aimed at, or -1 (a topic) */
    float   *out;              /* [QH][D] exact output */
    double  *lse;              /* [QH] log-sum-exp of every logit */
    double  *base;             /* [QH] exact weight of sinks + hot window */
    double  *share;            /* [QH] exact weight of the needle's tokens */
    uint64_t *top;             /* [QH][kmax] exact top cold tokens by logit, best first */
    double  *oracle;           /* [H][kmax + 1] summed group weight of the best j cold tokens */
} step_ref;

typedef struct bench {
    int      H, G, QH, steps, hot, sinks, kmax;
    uint64_t N, T;
    synth    sy;
    float   *Kp;               /* [T][H][D] pre-RoPE keys: the one copy of K */
    float   *Q;                /* [steps][QH][D] pre-RoPE queries */
    float   *Qr;               /* [steps][QH][D] the queries turned to their positions */
    double   inv_freq[D / 2];
    step_ref *ref;
} bench;

static double dot(const float *a, const float *b)
{
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int i = 0; i < D; i += 4) {
        s0 += (double)a[i] * b[i];
        s1 += (double)a[i + 1] * b[i + 1];
        s2 += (double)a[i + 2] * b[i + 2];
        s3 += (double)a[i + 3] * b[i + 3];
    }
    return (s0 + s1) + (s2 + s3);
}

/* Every kv head's key of token p turned to position p: kr[H][D]. */
static void turned_keys(const bench *b, uint64_t p, float *kr)
{
    double cs[D];
    kvg_rope_angles(cs, D, b->sy.rotary_dims, b->inv_freq, (double)p);
    memcpy(kr, b->Kp + p * (uint64_t)b->H * D, sizeof(float) * (size_t)b->H * D);
    for (int h = 0; h < b->H; h++)
        kvg_rope_turn(kr + h * D, D, b->sy.rotary_dims, 0, cs);
}

/* The exact weight of token p for query head hq at step s. */
static double weight(const bench *b, int s, int hq, uint64_t p)
{
    float kr[16 * D];
    turned_keys(b, p, kr);
    return exp(dot(b->Qr + ((size_t)s * b->QH + hq) * D, kr + (hq / b->G) * D) / sqrt((double)D) -
               b->ref[s].lse[hq]);
}

static int needle_tokens_in(const bench *b, int needle, uint64_t lo, uint64_t hi)
{
    int n = 0;
    for (int t = 0; t < b->sy.needle_len; t++) {
        uint64_t p = b->sy.needle_pos[needle] + (uint64_t)t;
        n += p >= lo && p < hi;
    }
    return n;
}

/* Pass 1, while generating K: the exact output and log-sum-exp of every
 * (step, query head), online (running max, rescaled sums). */
static void pass_exact(bench *b)
{
    const int H = b->H, QH = b->QH, S = b->steps;
    double *mx = malloc(sizeof(double) * (size_t)S * QH), *l = calloc((size_t)S * QH, sizeof(double));
    double *acc = calloc((size_t)S * QH * D, sizeof(double));
    float *k = malloc(sizeof(float) * (size_t)H * D), *v = malloc(sizeof(float) * (size_t)H * D);
    float *kr = malloc(sizeof(float) * (size_t)H * D);
    const double inv = 1.0 / sqrt((double)D);
    if (!mx || !l || !acc || !k || !v || !kr) {
        fprintf(stderr, "bench-quality: out of memory\n");
        exit(1);
    }
    for (int i = 0; i < S * QH; i++)
        mx[i] = -INFINITY;
    for (uint64_t p = 0; p < b->T; p++) {
        synth_kv(&b->sy, p, k, v);
        memcpy(b->Kp + p * (uint64_t)H * D, k, sizeof(float) * (size_t)H * D);
        turned_keys(b, p, kr);
        for (int s = p > b->N ? (int)(p - b->N) : 0; s < S; s++)
            for (int hq = 0; hq < QH; hq++) {
                int h = hq / b->G, i = s * QH + hq;
                double x = dot(b->Qr + (size_t)i * D, kr + h * D) * inv, w;
                double *a = acc + (size_t)i * D;
                if (x > mx[i]) {
                    double c = exp(mx[i] - x);
                    l[i] *= c;
                    for (int j = 0; j < D; j++)
                        a[j] *= c;
                    mx[i] = x;
                    w = 1;
                } else {
                    w = exp(x - mx[i]);
                }
                l[i] += w;
                const float *vh = v + h * D;
                for (int j = 0; j < D; j++)
                    a[j] += w * vh[j];
            }
    }
    for (int s = 0; s < S; s++)
        for (int hq = 0; hq < QH; hq++) {
            int i = s * QH + hq;
            b->ref[s].lse[hq] = mx[i] + log(l[i]);
            for (int j = 0; j < D; j++)
                b->ref[s].out[hq * D + j] = (float)(acc[(size_t)i * D + j] / l[i]);
        }
    free(mx);
    free(l);
    free(acc);
    free(k);
    free(v);
    free(kr);
}

/* Pass 2, over the stored K: the weight of sinks + hot window, the needle
 * shares, the exact top cold tokens by logit per query head and the oracle
 * per kv head (cold tokens by the group's summed weight). */
static int pass_select(bench *b)
{
    const int H = b->H, G = b->G, QH = b->QH, S = b->steps, K = b->kmax;
    best *bl = calloc((size_t)S * QH, sizeof *bl), *bo = calloc((size_t)S * H, sizeof *bo);
    double *vals = malloc(sizeof(double) * (size_t)(S * QH + S * H) * K);
    uint64_t *poss = malloc(sizeof(uint64_t) * (size_t)(S * QH + S * H) * K);
    float *kr = malloc(sizeof(float) * (size_t)H * D);
    const double inv = 1.0 / sqrt((double)D);
    if (!bl || !bo || !vals || !poss || !kr)
        return -1;
    for (int i = 0; i < S * QH + S * H; i++) {
        best *x = i < S * QH ? &bl[i] : &bo[i - S * QH];
        x->val = vals + (size_t)i * K;
        x->pos = poss + (size_t)i * K;
        x->cap = K;
    }
    for (uint64_t p = 0; p < b->T; p++) {
        turned_keys(b, p, kr);
        for (int s = p > b->N ? (int)(p - b->N) : 0; s < S; s++) {
            step_ref *r = &b->ref[s];
            int cold = p >= r->ns && p < r->hot_lo;
            int in_needle = r->needle >= 0 && p >= b->sy.needle_pos[r->needle] &&
                            p - b->sy.needle_pos[r->needle] < (uint64_t)b->sy.needle_len;
            for (int h = 0; h < H; h++) {
                double wsum = 0;
                for (int g = 0; g < G; g++) {
                    int hq = h * G + g;
                    double x = dot(b->Qr + ((size_t)s * QH + hq) * D, kr + h * D) * inv;
                    double w = exp(x - r->lse[hq]);
                    if (cold) {
                        best_push(&bl[s * QH + hq], x, p);
                        wsum += w;
                    } else {
                        r->base[hq] += w;
                    }
                    if (in_needle)
                        r->share[hq] += w;
                }
                if (cold)
                    best_push(&bo[s * H + h], wsum, p);
            }
        }
    }
    for (int s = 0; s < S; s++) {
        step_ref *r = &b->ref[s];
        for (int hq = 0; hq < QH; hq++) {
            int n = best_drain(&bl[s * QH + hq], r->top + (size_t)hq * K, NULL);
            for (int t = n; t < K; t++)
                r->top[(size_t)hq * K + t] = UINT64_MAX;
        }
        for (int h = 0; h < H; h++) {
            double v[4096];
            int n = best_drain(&bo[s * H + h], NULL, v);
            double *o = r->oracle + (size_t)h * (K + 1);
            o[0] = 0;
            for (int t = 0; t < K; t++)
                o[t + 1] = o[t] + (t < n ? v[t] : 0);
        }
    }
    free(bl);
    free(bo);
    free(vals);
    free(poss);
    free(kr);
    return 0;
}

typedef struct metrics {
    double recall, mass, oracle, kl, err;
    int    needles, needle_steps;
    int    n;                 /* (step, query head) samples */
    int    steps;
} metrics;

static const char *const gen_names[] = { "free", "pos", NULL };
static const char *const pm_names[] = { "true", "remapped", NULL };
static const char *const fmt_names[] = { "-", "q3", "q4", "i8", "f16", "bf16", NULL };
static const char *const score_names[] = { "asym", "hamming", NULL };

static void header(void)
{
    printf("%-4s %-8s %8s %-14s %-4s %5s %3s %-7s %6s %6s %6s %7s %6s %8s %7s\n", "gen", "pos_mode", "context",
           "method", "fmt", "top_k", "SLx", "score", "recall", "mass", "oracle", "/oracle", "KL", "rel_err", "needles");
}

static void report(const char *gen, const char *pm, uint64_t ctx, const char *what, const char *fmt, long k,
                   const char *sl, const char *score, const metrics *m)
{
    char nd[32];
    snprintf(nd, sizeof nd, "%d/%d", m->needles, m->needle_steps);
    printf("%-4s %-8s %8llu %-14s %-4s %5ld %3s %-7s %6.3f %6.3f %6.3f %7.3f %6.3f %8.4f %7s\n", gen, pm,
           (unsigned long long)ctx, what, fmt, k, sl, score, m->recall / m->n, m->mass / m->n, m->oracle / m->n,
           m->oracle > 0 ? m->mass / m->oracle : 0, m->kl / m->n, m->err / m->steps, nd);
    fflush(stdout);
}

/* The sliding window of kvarc's budget: sinks + the last top_k + hot + 1 tokens. */
static void sliding_window(const bench *b, const char *gen, long k)
{
    metrics m;
    memset(&m, 0, sizeof m);
    float *kr = malloc(sizeof(float) * (size_t)b->H * D), *v = malloc(sizeof(float) * (size_t)b->H * D);
    float *out = malloc(sizeof(float) * (size_t)b->QH * D);
    double *acc = malloc(sizeof(double) * (size_t)b->QH * D), *lsum = malloc(sizeof(double) * (size_t)b->QH);
    if (!kr || !v || !out || !acc || !lsum) {
        fprintf(stderr, "bench-quality: out of memory\n");
        exit(1);
    }
    for (int s = 0; s < b->steps; s++) {
        const step_ref *r = &b->ref[s];
        uint64_t back = (uint64_t)(k + b->hot);
        uint64_t lo = r->pos > back && r->pos - back > r->ns ? r->pos - back : r->ns;
        memset(acc, 0, sizeof(double) * (size_t)b->QH * D);
        memset(lsum, 0, sizeof(double) * (size_t)b->QH);
        for (uint64_t p = 0; p <= r->pos; p++) {       /* weights relative to the exact lse: no overflow */
            if (p == r->ns && lo > p)
                p = lo;
            turned_keys(b, p, kr);
            synth_v(&b->sy, p, v);
            for (int hq = 0; hq < b->QH; hq++) {
                int h = hq / b->G;
                double w = exp(dot(b->Qr + ((size_t)s * b->QH + hq) * D, kr + h * D) / sqrt((double)D) - r->lse[hq]);
                lsum[hq] += w;
                for (int j = 0; j < D; j++)
                    acc[hq * D + j] += w * v[h * D + j];
            }
        }
        for (int hq = 0; hq < b->QH; hq++) {
            int h = hq / b->G, hit = 0;
            for (int j = 0; j < D; j++)
                out[hq * D + j] = (float)(acc[hq * D + j] / lsum[hq]);
            for (long t = 0; t < k; t++)
                hit += r->top[(size_t)hq * b->kmax + t] != UINT64_MAX && r->top[(size_t)hq * b->kmax + t] >= lo;
            m.recall += (double)hit / (double)k;
            m.mass += lsum[hq];
            m.oracle += r->base[hq] + r->oracle[(size_t)h * (b->kmax + 1) + k] / b->G;
            m.kl += -log(lsum[hq] < 1 ? lsum[hq] : 1);
            m.n++;
            if (r->needle >= 0 && hq % b->G == 0) {
                int in = needle_tokens_in(b, r->needle, 0, r->ns) + needle_tokens_in(b, r->needle, lo, r->pos + 1);
                m.needle_steps++;
                m.needles += 2 * in >= b->sy.needle_len;
            }
        }
        m.err += tu_rel_err(out, r->out, (size_t)b->QH * D);
        m.steps++;
    }
    report(gen, "-", b->N, "sliding-window", "-", k, "-", "-", &m);
    free(kr);
    free(v);
    free(out);
    free(acc);
    free(lsum);
}

/* Archive the context into a new conversation ns/name. */
static int archive(const bench *b, kvarc_client *cl, const char *name, const kvarc_model *mod, const kvarc_options *o,
                   const float *means, kvarc_conv **out)
{
    const int H = b->H;
    float *kb = malloc(sizeof(float) * (size_t)H * CHUNK * D), *vb = malloc(sizeof(float) * (size_t)H * CHUNK * D);
    float *v = malloc(sizeof(float) * (size_t)H * D);
    kvarc_conv *cv = NULL;
    int rc = !kb || !vb || !v ? -ENOMEM : kvarc_conv_create(cl, "quality", name, mod, o, means, &cv);
    for (uint64_t p = 0; !rc && p < b->N; p += CHUNK) {
        uint32_t n = (uint32_t)(b->N - p < CHUNK ? b->N - p : CHUNK);
        for (uint32_t t = 0; t < n; t++) {
            synth_v(&b->sy, p + t, v);
            for (int h = 0; h < H; h++) {
                memcpy(kb + ((size_t)h * n + t) * D, b->Kp + ((p + t) * H + (uint64_t)h) * D, sizeof(float) * D);
                memcpy(vb + ((size_t)h * n + t) * D, v + h * D, sizeof(float) * D);
            }
        }
        rc = kvarc_append(cv, 0, KVARC_DTYPE_F32, kb, vb, n);
    }
    if (!rc)
        rc = kvarc_conv_sync(cv);
    if (rc)
        fprintf(stderr, "bench-quality: %s: %s %s\n", name, cv ? kvarc_errmsg(cv) : "", kvarc_client_errmsg(cl));
    free(kb);
    free(vb);
    free(v);
    *out = cv;
    return rc;
}

/* One kvarc row: decode the steps on conversation cv, measure. */
static int kvarc_row(const bench *b, kvarc_conv *cv, long k, metrics *m)
{
    const int H = b->H, QH = b->QH;
    float *kb = malloc(sizeof(float) * (size_t)H * D), *vb = malloc(sizeof(float) * (size_t)H * D);
    float *out = malloc(sizeof(float) * (size_t)QH * D);
    uint64_t *ret = malloc(sizeof(uint64_t) * (size_t)H * (size_t)k);
    size_t *nret = malloc(sizeof(size_t) * (size_t)H);
    int rc = 0;
    if (!kb || !vb || !out || !ret || !nret)
        rc = -ENOMEM;
    memset(m, 0, sizeof *m);
    for (int s = 0; s < b->steps && !rc; s++) {
        const step_ref *r = &b->ref[s];
        memcpy(kb, b->Kp + r->pos * (uint64_t)H * D, sizeof(float) * (size_t)H * D);
        synth_v(&b->sy, r->pos, vb);
        if ((rc = kvarc_append(cv, 0, KVARC_DTYPE_F32, kb, vb, 1)) ||
            (rc = kvarc_attend(cv, 0, b->Q + (size_t)s * QH * D, 1, out))) {
            fprintf(stderr, "bench-quality: step %d: %s\n", s, kvarc_errmsg(cv));
            break;
        }
        for (int h = 0; h < H; h++) {
            nret[h] = kvarc_last_retrieved(cv, (uint32_t)h, ret + (size_t)h * k, (size_t)k);
            nret[h] = nret[h] < (size_t)k ? nret[h] : (size_t)k;
        }
        for (int hq = 0; hq < QH; hq++) {
            int h = hq / b->G, hit = 0;
            const uint64_t *rh = ret + (size_t)h * k;
            double mass = r->base[hq];
            for (size_t j = 0; j < nret[h]; j++)
                mass += weight(b, s, hq, rh[j]);
            for (long t = 0; t < k; t++)
                for (size_t j = 0; j < nret[h]; j++)
                    hit += rh[j] == r->top[(size_t)hq * b->kmax + t];
            m->recall += (double)hit / (double)k;
            m->mass += mass;
            m->oracle += r->base[hq] + r->oracle[(size_t)h * (b->kmax + 1) + k] / b->G;
            m->kl += -log(mass < 1 ? mass : 1);
            m->n++;
            if (r->needle >= 0 && hq % b->G == 0) {
                uint64_t np = b->sy.needle_pos[r->needle];
                int in = needle_tokens_in(b, r->needle, 0, r->ns) + needle_tokens_in(b, r->needle, r->hot_lo, r->pos + 1);
                for (size_t j = 0; j < nret[h]; j++)
                    in += rh[j] >= np && rh[j] - np < (uint64_t)b->sy.needle_len;
                m->needle_steps++;
                m->needles += 2 * in >= b->sy.needle_len;
            }
        }
        m->err += tu_rel_err(out, r->out, (size_t)QH * D);
        m->steps++;
    }
    free(kb);
    free(vb);
    free(out);
    free(ret);
    free(nret);
    return rc;
}

static uint64_t hash64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void usage(void)
{
    fprintf(stderr, "usage: bench-quality [--kvarcd PATH] [--gen free,pos] [--pos-mode true,remapped] "
                    "[--contexts N,...] [--formats q3,q4,i8,f16,bf16] [--top-k K,...] [--shortlist F,...] "
                    "[--score asym,hamming] [--coarse BLOCKS,...] [--steps S] [--hot-window W] [--sinks S] [--kv-heads H] "
                    "[--group G] [--needle-len L] [--expect-oracle R] [--expect-needles F] [--expect-err E]\n");
}

int main(int argc, char **argv)
{
    const char *kvarcd = NULL;
    list ctxs, gens, pms, fmts, ks, sls, scores, coarse;
    kvarc_options dflt;
    kvarc_options_default(&dflt);
    coarse.n = 1;
    coarse.v[0] = dflt.coarse_blocks;
    parse_list("4096,16384,65536", &ctxs, NULL);
    parse_list("free,pos", &gens, gen_names);
    parse_list("true", &pms, pm_names);
    parse_list("q3,q4,i8,f16", &fmts, fmt_names);
    parse_list("32,64,128", &ks, NULL);
    parse_list("8", &sls, NULL);
    parse_list("asym", &scores, score_names);
    int steps = 16, hot = 256, sinks = 4, H = 2, G = 4, needle_len = SYNTH_NEEDLE_LEN;
    double expect_oracle = -1, expect_needles = -1, expect_err = -1;
    for (int i = 1; i < argc; i++) {
        int bad = 0;
        if (!strcmp(argv[i], "--kvarcd") && i + 1 < argc)
            kvarcd = argv[++i];
        else if (!strcmp(argv[i], "--contexts") && i + 1 < argc)
            bad = parse_list(argv[++i], &ctxs, NULL);
        else if (!strcmp(argv[i], "--gen") && i + 1 < argc)
            bad = parse_list(argv[++i], &gens, gen_names);
        else if (!strcmp(argv[i], "--pos-mode") && i + 1 < argc)
            bad = parse_list(argv[++i], &pms, pm_names);
        else if (!strcmp(argv[i], "--formats") && i + 1 < argc)
            bad = parse_list(argv[++i], &fmts, fmt_names);
        else if (!strcmp(argv[i], "--top-k") && i + 1 < argc)
            bad = parse_list(argv[++i], &ks, NULL);
        else if (!strcmp(argv[i], "--shortlist") && i + 1 < argc)
            bad = parse_list(argv[++i], &sls, NULL);
        else if (!strcmp(argv[i], "--score") && i + 1 < argc)
            bad = parse_list(argv[++i], &scores, score_names);
        else if (!strcmp(argv[i], "--coarse") && i + 1 < argc)
            bad = parse_list_min(argv[++i], &coarse, NULL, 0);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--hot-window") && i + 1 < argc)
            hot = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sinks") && i + 1 < argc)
            sinks = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--kv-heads") && i + 1 < argc)
            H = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--group") && i + 1 < argc)
            G = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--needle-len") && i + 1 < argc)
            needle_len = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--expect-oracle") && i + 1 < argc)
            expect_oracle = atof(argv[++i]);
        else if (!strcmp(argv[i], "--expect-needles") && i + 1 < argc)
            expect_needles = atof(argv[++i]);
        else if (!strcmp(argv[i], "--expect-err") && i + 1 < argc)
            expect_err = atof(argv[++i]);
        else
            bad = 1;
        if (bad) {
            usage();
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    long kmax = 0;
    for (int i = 0; i < ks.n; i++)
        kmax = ks.v[i] > kmax ? ks.v[i] : kmax;
    if (steps < 2 || hot < 64 || sinks < 0 || H < 1 || H > 16 || G < 1 || G > 64 || needle_len < 1 ||
        needle_len > 4096 || kmax > 4096) {
        fprintf(stderr, "bench-quality: --steps >= 2, --hot-window >= 64, --sinks >= 0, --kv-heads 1..16, "
                        "--group 1..64, --needle-len 1..4096, --top-k <= 4096\n");
        return 2;
    }
    for (int i = 0; i < ctxs.n; i++)
        if ((uint64_t)ctxs.v[i] <= (uint64_t)(sinks + hot + kmax) || ctxs.v[i] < needle_len * 8) {
            fprintf(stderr, "bench-quality: context %ld leaves nothing to retrieve (sinks + hot window + top_k)\n",
                    ctxs.v[i]);
            return 2;
        }
    char kbuf[1024], dir[] = "/var/tmp/kvarc-quality-XXXXXX", msg[512];
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    pid_t pid;
    if (kd_spawn(kd_find_kvarcd(kvarcd, kbuf, sizeof kbuf), dir, NULL, &pid, msg, sizeof msg)) {
        fprintf(stderr, "bench-quality: %s\n", msg);
        return 1;
    }
    kvarc_client *cl;
    if (kvarc_client_open(dir, NULL, NULL, &cl)) {
        fprintf(stderr, "bench-quality: cannot connect to %s\n", dir);
        return 1;
    }
    const int QH = H * G;
    printf("# bench-quality: 1 layer, %d kv heads x %d query heads, head_dim %d; sinks %d, hot window %d; %d steps per "
           "row (half aim at needles); reference: exact attention at true positions\n", H, G, D, sinks, hot, steps);
    printf("# gen free: RoPE on %d dims, theta 10000, 5 one-token needles; gen pos: RoPE on %d dims, theta 500000, "
           "8 needles of %d tokens\n", D / 2, D, needle_len);
    header();
    int code = 0, gate = 0;
    for (int gi = 0; gi < gens.n && !code; gi++)
        for (int ci = 0; ci < ctxs.n && !code; ci++) {
            const int gen = (int)gens.v[gi];
            const char *gname = gen_names[gen];
            bench b;
            memset(&b, 0, sizeof b);
            b.H = H;
            b.G = G;
            b.QH = QH;
            b.steps = steps;
            b.hot = hot;
            b.sinks = sinks;
            b.kmax = (int)kmax;
            b.N = (uint64_t)ctxs.v[ci];
            b.T = b.N + (uint64_t)steps;
            static const double free_depths[5] = { 0.1, 0.3, 0.5, 0.7, 0.9 };
            double pos_depths[8];
            for (int j = 0; j < 8; j++)        /* stratified: one needle in each eighth, at a seeded spot */
                pos_depths[j] = (j + 0.1 + 0.8 * (double)(hash64(b.N * 8 + (uint64_t)j) >> 11) / 9007199254740992.0) / 8;
            int n_needles = gen == SYNTH_GEN_POS ? 8 : 5;
            int rc = gen == SYNTH_GEN_POS
                         ? synth_init_pos(&b.sy, D, H, QH, 1234 + b.N, b.N, pos_depths, 8, needle_len)
                         : synth_init(&b.sy, D, H, QH, 1234 + b.N, b.N, free_depths, 5);
            size_t kbytes = sizeof(float) * b.T * (uint64_t)H * D;
            b.Kp = rc ? NULL : malloc(kbytes);
            b.Q = malloc(sizeof(float) * (size_t)steps * QH * D);
            b.Qr = malloc(sizeof(float) * (size_t)steps * QH * D);
            b.ref = calloc((size_t)steps, sizeof *b.ref);
            float *means = malloc(sizeof(float) * (size_t)H * 2 * D);
            if (rc || !b.Kp || !b.Q || !b.Qr || !b.ref || !means) {
                fprintf(stderr, "bench-quality: out of memory for %llu tokens (K alone: %.1f GiB)\n",
                        (unsigned long long)b.N, (double)kbytes / (1 << 30));
                return 1;
            }
            kvg_rope_freqs(b.inv_freq, D, b.sy.rotary_dims, b.sy.rope_theta);
            double t0 = tu_now_s();
            synth_means(&b.sy, b.N, 256, means);
            for (int s = 0; s < steps; s++) {
                step_ref *r = &b.ref[s];
                r->pos = b.N + (uint64_t)s;
                r->ns = r->pos < (uint64_t)sinks ? r->pos : (uint64_t)sinks;
                r->hot_lo = r->pos > (uint64_t)hot && r->pos - (uint64_t)hot > r->ns ? r->pos - (uint64_t)hot : r->ns;
                r->needle = s % 2 == 0 ? (s / 2) % n_needles : -1;
                r->out = malloc(sizeof(float) * (size_t)QH * D);
                r->lse = calloc((size_t)QH, sizeof(double));
                r->base = calloc((size_t)QH, sizeof(double));
                r->share = calloc((size_t)QH, sizeof(double));
                r->top = malloc(sizeof(uint64_t) * (size_t)QH * kmax);
                r->oracle = malloc(sizeof(double) * (size_t)H * (kmax + 1));
                if (!r->out || !r->lse || !r->base || !r->share || !r->top || !r->oracle) {
                    fprintf(stderr, "bench-quality: out of memory\n");
                    return 1;
                }
                float *q = b.Q + (size_t)s * QH * D, *qr = b.Qr + (size_t)s * QH * D;
                synth_query(&b.sy, r->pos, r->needle, q);
                memcpy(qr, q, sizeof(float) * (size_t)QH * D);
                for (int hq = 0; hq < QH; hq++)
                    kvg_rope_apply(qr + hq * D, D, b.sy.rotary_dims, 0, b.inv_freq, (double)r->pos);
            }
            pass_exact(&b);
            if (pass_select(&b)) {
                fprintf(stderr, "bench-quality: out of memory\n");
                return 1;
            }
            double t_ref = tu_now_s() - t0, sh = 0, shmin = 1;
            int nsh = 0;
            for (int s = 0; s < steps; s++)
                for (int hq = 0; b.ref[s].needle >= 0 && hq < QH; hq++) {
                    sh += b.ref[s].share[hq];
                    shmin = b.ref[s].share[hq] < shmin ? b.ref[s].share[hq] : shmin;
                    nsh++;
                }
            printf("# ref gen=%s context=%llu needle_share mean=%.3f min=%.3f (full attention's weight on the needle's "
                   "tokens; K %.2f GiB) generated and exact in %.1f s\n", gname, (unsigned long long)b.N,
                   nsh ? sh / nsh : 0, nsh ? shmin : 0, (double)kbytes / (1 << 30), t_ref);
            fflush(stdout);

            double tw = tu_now_s();
            for (int ki = 0; ki < ks.n; ki++)
                sliding_window(&b, gname, ks.v[ki]);
            printf("# time gen=%s context=%llu sliding-window %.1f s\n", gname, (unsigned long long)b.N, tu_now_s() - tw);

            /* kvarc: one archive per (position mode, format), a fork per (top_k, shortlist, score) */
            for (int pi = 0; pi < pms.n && !code; pi++)
                for (int fi = 0; fi < fmts.n && !code; fi++) {
                    const char *pname = pm_names[pms.v[pi]], *fname = fmt_names[fmts.v[fi]];
                    char fp[32];
                    snprintf(fp, sizeof fp, "synth-%s", gname);
                    kvarc_model mod = { 1, (uint32_t)H, (uint32_t)QH, D, KVARC_DTYPE_F32, b.sy.rope_theta,
                                        (uint32_t)b.sy.rotary_dims, 0, fp };
                    kvarc_options o;
                    kvarc_options_default(&o);
                    o.format = (int)fmts.v[fi];
                    o.pos_mode = (int)pms.v[pi];
                    o.sinks = (uint32_t)sinks;
                    o.hot_window = (uint32_t)hot;
                    o.top_k = (uint32_t)kmax;
                    char name[96];
                    snprintf(name, sizeof name, "%s-c%llu-%s-%s", gname, (unsigned long long)b.N, pname, fname);
                    kvarc_conv *base;
                    double ta = tu_now_s();
                    if (archive(&b, cl, name, &mod, &o, means, &base)) {
                        code = 1;
                        break;
                    }
                    double t_arch = tu_now_s() - ta, tr = tu_now_s();
                    for (int ki = 0; ki < ks.n && !code; ki++)
                        for (int si = 0; si < sls.n && !code; si++)
                            for (int sc = 0; sc < scores.n && !code; sc++)
                            for (int ci = 0; ci < coarse.n && !code; ci++) {
                                char fork[160], slx[16], method[32];
                                snprintf(fork, sizeof fork, "%s-k%ld-s%ld-%s-c%ld", name, ks.v[ki], sls.v[si],
                                         score_names[scores.v[sc]], coarse.v[ci]);
                                kvarc_options oo = o;
                                oo.top_k = (uint32_t)ks.v[ki];
                                oo.shortlist = (uint32_t)sls.v[si];
                                oo.score_mode = (int)scores.v[sc];
                                oo.coarse_blocks = (uint32_t)coarse.v[ci];
                                if (coarse.v[ci])
                                    snprintf(method, sizeof method, "kvarc/c%ld", coarse.v[ci]);
                                else
                                    snprintf(method, sizeof method, "kvarc");
                                kvarc_conv *cv;
                                if ((rc = kvarc_fork(base, "quality", fork, 0)) ||
                                    (rc = kvarc_conv_attach(cl, "quality", fork, &mod, &oo, &cv))) {
                                    fprintf(stderr, "bench-quality: %s: %s %s\n", fork, kvarc_errmsg(base),
                                            kvarc_client_errmsg(cl));
                                    code = 1;
                                    break;
                                }
                                metrics m;
                                rc = kvarc_row(&b, cv, ks.v[ki], &m);
                                kvarc_conv_close(cv);
                                if (rc) {
                                    code = 1;
                                    break;
                                }
                                snprintf(slx, sizeof slx, "%ld", sls.v[si]);
                                report(gname, pname, b.N, method, fname, ks.v[ki], slx, score_names[scores.v[sc]], &m);
                                double ratio = m.oracle > 0 ? m.mass / m.oracle : 0, err = m.err / m.steps;
                                double found = m.needle_steps ? (double)m.needles / m.needle_steps : 1;
                                char why[256] = "";
                                size_t wl = 0;
                                if (expect_oracle >= 0 && ratio < expect_oracle)
                                    wl += (size_t)snprintf(why + wl, sizeof why - wl, " mass/oracle %.3f < %g;", ratio,
                                                           expect_oracle);
                                if (expect_needles >= 0 && found < expect_needles)
                                    wl += (size_t)snprintf(why + wl, sizeof why - wl, " needles %.2f < %g;", found,
                                                           expect_needles);
                                if (expect_err >= 0 && err > expect_err)
                                    wl += (size_t)snprintf(why + wl, sizeof why - wl, " rel_err %.4f > %g;", err,
                                                           expect_err);
                                if (wl) {
                                    printf("# GATE FAIL gen=%s pos_mode=%s context=%llu fmt=%s top_k=%ld coarse=%ld:%s\n",
                                           gname, pname, (unsigned long long)b.N, fname, ks.v[ki], coarse.v[ci], why);
                                    gate = 1;
                                }
                            }
                    kvarc_conv_close(base);
                    printf("# time gen=%s context=%llu %s/%s archive %.1f s, %d rows %.1f s\n", gname,
                           (unsigned long long)b.N, pname, fname, t_arch, ks.n * sls.n * scores.n * coarse.n, tu_now_s() - tr);
                    fflush(stdout);
                }
            for (int s = 0; s < steps; s++) {
                free(b.ref[s].out);
                free(b.ref[s].lse);
                free(b.ref[s].base);
                free(b.ref[s].share);
                free(b.ref[s].top);
                free(b.ref[s].oracle);
            }
            free(b.ref);
            free(b.Kp);
            free(b.Q);
            free(b.Qr);
            free(means);
            synth_free(&b.sy);
        }
    kvarc_client_close(cl);
    int stop = kd_stop(pid);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "bench-quality: could not remove %s\n", dir);
    return code || stop || gate ? 1 : 0;
}
