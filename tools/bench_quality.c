/* bench-quality - how faithful retrieval attention is, per record format,
 * top_k, shortlist factor, score mode and context length, on structured
 * synthetic K/V/Q (tools/synth.h), through libkvarc and a real kvarcd; and
 * the same for a sliding window of equal budget (sinks + the last
 * top_k + hot_window tokens): the baseline that forgets.
 *
 *   bench-quality [--kvarcd PATH] [--contexts 4096,16384,65536]
 *                 [--formats q3,q4,i8,f16] [--top-k 32,64,128] [--shortlist 8]
 *                 [--score asym] [--steps 16] [--hot-window 256] [--sinks 4]
 *
 * Model: 1 layer, 2 KV heads, 8 query heads (GQA 4), head_dim 128, RoPE on
 * the first 64 dimensions (true positions). Five needles at depths 10..90%.
 * Each step appends one token and attends with its query: even steps aim
 * at a needle, odd steps at a past topic. Against exact full attention
 * over every token (double precision), per step and query head:
 *   recall   : |retrieved cold tokens in the exact top_k cold tokens| / top_k
 *   mass     : attention weight (exact) of what was attended
 *   KL       : KL(attended || full) = -ln(mass), in nats
 *   rel err  : ||out - exact|| / ||exact|| over all heads
 *   needles  : needle steps whose needle was attended, per kv head
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

#define H 2
#define QH 8
#define G (QH / H)
#define D 128
#define ROT 64
#define THETA 10000.0f
#define MAXL 16

typedef struct list {
    long v[MAXL];
    int  n;
} list;

static int parse_list(const char *s, list *l, const char *const *names)
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
        if (v < 0 || (!names && v <= 0))
            return -1;
        l->v[l->n++] = v;
    }
    return l->n ? 0 : -1;
}


/* The exact reference of one step: output, log-sum-exp per query head,
 * and the exact top cold positions per query head (by logit). */
typedef struct ref {
    float    out[QH * D];
    double   lse[QH];
    uint64_t *top;        /* [QH][kmax] */
    int      needle;
} ref;

static float *Kr, *Vv;    /* [pos][H][D]: keys after RoPE at their position, values */
static float *Qs;         /* [step][QH][D] pre-RoPE queries */

static double logit(const float *qr, uint64_t j, int h)
{
    const float *k = Kr + (j * H + (uint64_t)h) * D;
    double s = 0;
    for (int i = 0; i < D; i++)
        s += (double)qr[i] * k[i];
    return s / sqrt((double)D);
}

/* Exact attention of query qr (roped) of head hq over [0, pos], plus the
 * top kmax of the cold range [lo, hi) by logit. */
static void exact(const float *qr, int hq, uint64_t pos, uint64_t lo, uint64_t hi, int kmax, float *out, double *lse,
                  uint64_t *top, double *scratch)
{
    *lse = tu_exact_attention(Kr, Vv, H, D, qr, hq / G, pos, 0, 0, out, scratch);
    /* top kmax cold by logit, best first (kvg_topk_ref: linear radix select) */
    size_t nc = hi > lo ? (size_t)(hi - lo) : 0;
    float *f = malloc((nc + 1) * sizeof *f);
    uint32_t *idx = malloc(((size_t)kmax + 1) * sizeof *idx);
    int n = 0;
    if (f && idx) {
        for (size_t j = 0; j < nc; j++)
            f[j] = (float)scratch[lo + j];
        long got = kvg_topk_ref(f, nc, (size_t)kmax, idx, NULL, NULL);
        for (long t = 0; t < got; t++)
            top[n++] = lo + idx[t];
    }
    free(f);
    free(idx);
    for (int t = n; t < kmax; t++)
        top[t] = UINT64_MAX;
}

static int in_set(const uint64_t *v, size_t n, uint64_t x)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] == x)
            return 1;
    return 0;
}


typedef struct metrics {
    double recall, mass, kl, err;
    int    needles, needle_steps;
    int    n;                 /* (step, head) samples */
    int    steps;
} metrics;

static void report(const char *what, uint64_t ctx, const char *fmt, long k, long sl, const char *score, metrics *m)
{
    printf("%8llu  %-14s %-5s %5ld %4ld %-7s %7.3f %7.3f %7.3f %8.4f   %2d/%-2d\n", (unsigned long long)ctx, what, fmt,
           k, sl, score, m->recall / m->n, m->mass / m->n, m->kl / m->n, m->err / m->steps, m->needles, m->needle_steps);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    static const char *const fmt_names[] = { "-", "q3", "q4", "i8", "f16", "bf16", NULL };
    static const char *const score_names[] = { "asym", "hamming", NULL };
    const char *kvarcd = NULL;
    list ctxs, fmts, ks, sls, scores;
    parse_list("4096,16384,65536", &ctxs, NULL);
    parse_list("q3,q4,i8,f16", &fmts, fmt_names);
    parse_list("32,64,128", &ks, NULL);
    parse_list("8", &sls, NULL);
    parse_list("asym", &scores, score_names);
    int steps = 16, hot = 256, sinks = 4;
    for (int i = 1; i < argc; i++) {
        int bad = 0;
        if (!strcmp(argv[i], "--kvarcd") && i + 1 < argc)
            kvarcd = argv[++i];
        else if (!strcmp(argv[i], "--contexts") && i + 1 < argc)
            bad = parse_list(argv[++i], &ctxs, NULL);
        else if (!strcmp(argv[i], "--formats") && i + 1 < argc)
            bad = parse_list(argv[++i], &fmts, fmt_names);
        else if (!strcmp(argv[i], "--top-k") && i + 1 < argc)
            bad = parse_list(argv[++i], &ks, NULL);
        else if (!strcmp(argv[i], "--shortlist") && i + 1 < argc)
            bad = parse_list(argv[++i], &sls, NULL);
        else if (!strcmp(argv[i], "--score") && i + 1 < argc)
            bad = parse_list(argv[++i], &scores, score_names);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--hot-window") && i + 1 < argc)
            hot = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sinks") && i + 1 < argc)
            sinks = atoi(argv[++i]);
        else
            bad = 1;
        if (bad) {
            fprintf(stderr, "usage: bench-quality [--kvarcd PATH] [--contexts N,...] [--formats q3,q4,i8,f16,bf16] "
                            "[--top-k K,...] [--shortlist F,...] [--score asym,hamming] [--steps S] "
                            "[--hot-window W] [--sinks S]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    if (steps < 2 || hot < 64 || sinks < 0) {
        fprintf(stderr, "bench-quality: --steps >= 2, --hot-window >= 64, --sinks >= 0\n");
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
    long kmax = 0;
    for (int i = 0; i < ks.n; i++)
        kmax = ks.v[i] > kmax ? ks.v[i] : kmax;
    printf("bench-quality: 1 layer, %d kv heads, %d query heads, head_dim %d, RoPE on %d dims; sinks %d, hot window %d; "
           "%d steps per row (half aim at needles)\n", H, QH, D, ROT, sinks, hot, steps);
    printf("%8s  %-14s %-5s %5s %4s %-7s %7s %7s %7s %8s   %s\n", "context", "method", "fmt", "top_k", "SLx", "score",
           "recall", "mass", "KL", "rel err", "needles");
    static const double depths[5] = { 0.1, 0.3, 0.5, 0.7, 0.9 };
    for (int ci = 0; ci < ctxs.n; ci++) {
        uint64_t N = (uint64_t)ctxs.v[ci], T = N + (uint64_t)steps;
        synth sy;
        if (synth_init(&sy, D, H, QH, 1234 + N, N, depths, 5)) {
            fprintf(stderr, "bench-quality: out of memory\n");
            return 1;
        }
        Kr = malloc(sizeof(float) * T * H * D);
        Vv = malloc(sizeof(float) * T * H * D);
        float *Kp = malloc(sizeof(float) * T * H * D);         /* pre-RoPE, [pos][H][D] */
        Qs = malloc(sizeof(float) * (size_t)steps * QH * D);
        double *scratch = malloc(sizeof(double) * T);
        ref *refs = calloc((size_t)steps, sizeof *refs);
        float means[H * 2 * D];
        if (!Kr || !Vv || !Kp || !Qs || !scratch || !refs) {
            fprintf(stderr, "bench-quality: out of memory for %llu tokens\n", (unsigned long long)N);
            return 1;
        }
        double t0 = tu_now_s();
        synth_means(&sy, N, 256, means);
        for (uint64_t p = 0; p < T; p++) {
            synth_kv(&sy, p, Kp + p * H * D, Vv + p * H * D);
            memcpy(Kr + p * H * D, Kp + p * H * D, sizeof(float) * H * D);
            for (int h = 0; h < H; h++)
                kvg_rope_ref(Kr + (p * H + (uint64_t)h) * D, D, ROT, 0, THETA, (double)p);
        }
        /* the exact references, once per context */
        for (int s = 0; s < steps; s++) {
            uint64_t pos = N + (uint64_t)s, cs = pos;
            uint64_t ns = cs < (uint64_t)sinks ? cs : (uint64_t)sinks;
            uint64_t hot_lo = cs > (uint64_t)hot && cs - (uint64_t)hot > ns ? cs - (uint64_t)hot : ns;
            refs[s].needle = s % 2 == 0 ? (s / 2) % 5 : -1;
            synth_query(&sy, pos, refs[s].needle, Qs + (size_t)s * QH * D);
            refs[s].top = malloc(sizeof(uint64_t) * QH * (size_t)kmax);
            for (int hq = 0; hq < QH; hq++) {
                float qr[D];
                memcpy(qr, Qs + ((size_t)s * QH + hq) * D, sizeof qr);
                kvg_rope_ref(qr, D, ROT, 0, THETA, (double)pos);
                exact(qr, hq, pos, ns, hot_lo, (int)kmax, refs[s].out + hq * D, &refs[s].lse[hq],
                      refs[s].top + (size_t)hq * kmax, scratch);
            }
        }
        fprintf(stderr, "context %llu: synthesized and exact references in %.1f s\n", (unsigned long long)N,
                tu_now_s() - t0);

        /* the sliding window of equal budget, per top_k */
        for (int ki = 0; ki < ks.n; ki++) {
            long k = ks.v[ki];
            metrics m;
            memset(&m, 0, sizeof m);
            for (int s = 0; s < steps; s++) {
                uint64_t pos = N + (uint64_t)s, budget = (uint64_t)(k + hot);
                uint64_t lo = pos + 1 > budget ? pos + 1 - budget : 0;
                float out[QH * D];
                for (int hq = 0; hq < QH; hq++) {
                    int h = hq / G;
                    float qr[D];
                    memcpy(qr, Qs + ((size_t)s * QH + hq) * D, sizeof qr);
                    kvg_rope_ref(qr, D, ROT, 0, THETA, (double)pos);
                    double lse_w = tu_exact_attention(Kr, Vv, H, D, qr, h, pos, (uint64_t)sinks, lo, out + hq * D, NULL);
                    double mass = exp(lse_w - refs[s].lse[hq]);   /* the window's share of the exact weight */
                    int hit = 0;
                    for (long t = 0; t < k; t++)
                        hit += refs[s].top[(size_t)hq * kmax + t] >= lo;
                    m.recall += (double)hit / (double)k;
                    m.mass += mass;
                    m.kl += -log(mass);
                    m.n++;
                    if (refs[s].needle >= 0 && hq % G == 0) {
                        m.needle_steps++;
                        m.needles += sy.needle_pos[refs[s].needle] >= lo;
                    }
                }
                m.err += tu_rel_err(out, refs[s].out, QH * D);
                m.steps++;
            }
            report("sliding window", N, "-", k, 0, "-", &m);
        }

        /* kvarc: one archive per format, a fork per (top_k, shortlist, score) */
        for (int fi = 0; fi < fmts.n; fi++) {
            kvarc_model mod = { 1, H, QH, D, KVARC_DTYPE_F32, THETA, ROT, 0, "synth" };
            kvarc_options o;
            kvarc_options_default(&o);
            o.format = (int)fmts.v[fi];
            o.sinks = (uint32_t)sinks;
            o.hot_window = (uint32_t)hot;
            o.top_k = (uint32_t)kmax;
            char name[96];
            snprintf(name, sizeof name, "c%llu-%s", (unsigned long long)N, fmt_names[fmts.v[fi]]);
            kvarc_conv *base;
            double ta = tu_now_s();
            int rc = kvarc_conv_create(cl, "quality", name, &mod, &o, means, &base);
            for (uint64_t p = 0; !rc && p < N; p += 4096) {
                uint32_t n = (uint32_t)(N - p < 4096 ? N - p : 4096);
                static float kb[H * 4096 * D], vb[H * 4096 * D];
                for (uint32_t t = 0; t < n; t++)
                    for (int h = 0; h < H; h++) {
                        memcpy(kb + ((size_t)h * n + t) * D, Kp + ((p + t) * H + (uint64_t)h) * D, sizeof(float) * D);
                        memcpy(vb + ((size_t)h * n + t) * D, Vv + ((p + t) * H + (uint64_t)h) * D, sizeof(float) * D);
                    }
                rc = kvarc_append(base, 0, KVARC_DTYPE_F32, kb, vb, n);
            }
            if (!rc)
                rc = kvarc_conv_sync(base);
            if (rc) {
                fprintf(stderr, "bench-quality: %s: %s%s\n", name, kvarc_errmsg(base), kvarc_client_errmsg(cl));
                return 1;
            }
            fprintf(stderr, "context %llu %s: archived in %.1f s\n", (unsigned long long)N, fmt_names[fmts.v[fi]],
                    tu_now_s() - ta);
            for (int ki = 0; ki < ks.n; ki++)
                for (int si = 0; si < sls.n; si++)
                    for (int sc = 0; sc < scores.n; sc++) {
                        char fork[128];
                        snprintf(fork, sizeof fork, "%s-k%ld-s%ld-%s", name, ks.v[ki], sls.v[si], score_names[scores.v[sc]]);
                        kvarc_options oo = o;
                        oo.top_k = (uint32_t)ks.v[ki];
                        oo.shortlist = (uint32_t)sls.v[si];
                        oo.score_mode = (int)scores.v[sc];
                        kvarc_conv *cv;
                        if ((rc = kvarc_fork(base, "quality", fork, 0)) ||
                            (rc = kvarc_conv_attach(cl, "quality", fork, &mod, &oo, &cv))) {
                            fprintf(stderr, "bench-quality: %s: %s %s\n", fork, kvarc_errmsg(base), kvarc_client_errmsg(cl));
                            return 1;
                        }
                        metrics m;
                        memset(&m, 0, sizeof m);
                        for (int s = 0; s < steps && !rc; s++) {
                            uint64_t pos = N + (uint64_t)s;
                            float kb[H * D], vb[H * D], out[QH * D], qb[QH * D];
                            memcpy(kb, Kp + pos * H * D, sizeof kb);
                            memcpy(vb, Vv + pos * H * D, sizeof vb);
                            memcpy(qb, Qs + (size_t)s * QH * D, sizeof qb);
                            if ((rc = kvarc_append(cv, 0, KVARC_DTYPE_F32, kb, vb, 1)) ||
                                (rc = kvarc_attend(cv, 0, qb, 1, out))) {
                                fprintf(stderr, "bench-quality: step %d: %s\n", s, kvarc_errmsg(cv));
                                break;
                            }
                            uint64_t ns = pos < (uint64_t)sinks ? pos : (uint64_t)sinks;
                            uint64_t hot_lo = pos > (uint64_t)hot && pos - (uint64_t)hot > ns ? pos - (uint64_t)hot : ns;
                            uint64_t ret[H][1024];
                            size_t nret[H];
                            for (int h = 0; h < H; h++)
                                nret[h] = kvarc_last_retrieved(cv, (uint32_t)h, ret[h], 1024);
                            for (int hq = 0; hq < QH; hq++) {
                                int h = hq / G;
                                float qr[D];
                                memcpy(qr, qb + hq * D, sizeof qr);
                                kvg_rope_ref(qr, D, ROT, 0, THETA, (double)pos);
                                double mass = 0;
                                for (uint64_t j = 0; j < ns; j++)
                                    mass += exp(logit(qr, j, h) - refs[s].lse[hq]);
                                for (uint64_t j = hot_lo; j <= pos; j++)
                                    mass += exp(logit(qr, j, h) - refs[s].lse[hq]);
                                for (size_t r = 0; r < nret[h]; r++)
                                    mass += exp(logit(qr, ret[h][r], h) - refs[s].lse[hq]);
                                int hit = 0;
                                for (long t = 0; t < ks.v[ki]; t++)
                                    hit += in_set(ret[h], nret[h], refs[s].top[(size_t)hq * kmax + t]);
                                m.recall += (double)hit / (double)ks.v[ki];
                                m.mass += mass;
                                m.kl += -log(mass < 1 ? mass : 1);
                                m.n++;
                                if (refs[s].needle >= 0 && hq % G == 0) {
                                    uint64_t np = sy.needle_pos[refs[s].needle];
                                    m.needle_steps++;
                                    m.needles += in_set(ret[h], nret[h], np) || np >= hot_lo || np < ns;
                                }
                            }
                            m.err += tu_rel_err(out, refs[s].out, QH * D);
                            m.steps++;
                        }
                        kvarc_stats st;
                        kvarc_conv_stats(cv, &st);
                        kvarc_conv_close(cv);
                        if (rc)
                            return 1;
                        report("kvarc", N, fmt_names[fmts.v[fi]], ks.v[ki], sls.v[si], score_names[scores.v[sc]], &m);
                    }
            kvarc_conv_close(base);
        }
        for (int s = 0; s < steps; s++)
            free(refs[s].top);
        free(refs);
        free(Kr);
        free(Vv);
        free(Kp);
        free(Qs);
        free(scratch);
        synth_free(&sy);
    }
    kvarc_client_close(cl);
    int code = kd_stop(pid);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "bench-quality: could not remove %s\n", dir);
    return code == 0 ? 0 : 1;
}
