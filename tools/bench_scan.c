/* bench-scan - CPU stage-1 scan throughput against a plain read.
 *
 *   bench-scan [--tokens N[,N...]] [--head-dim D] [--seconds S]
 *
 * For each N (cold tokens of one KV head) it encodes N random keys, then
 * times, in the same run and on the same buffers:
 *   read     : a plain sequential read of the signature planes (the bits
 *              and the fp16 scales), summing 64-bit words: the baseline
 *   asym     : kvg_plane_score over the block-interleaved plane libkvarc
 *              scans (the kernel chosen at run time: AVX-512 VPERMW table
 *              lookups), asymmetric estimator, one query
 *   hamming  : the same, plain Hamming
 *   asym+topk: the 512 best of asym's scores by kvg_plane_topk (stage 1's
 *              shortlist: the scan a cache-sized stretch at a time with
 *              kvg_topk's filter fused in, the reference over what it keeps)
 *   gqa4     : asym for a GQA group of 4 query heads (max), one pass
 *   asym-avx2, gqa4-avx2: asym and gqa4 through the plane's AVX2 kernel
 *              (VPSHUFB), as a CPU without AVX-512 runs them (skipped
 *              where the CPU lacks AVX2: the reference's time)
 *   asym-tok, gqa4-tok: kvg_score_pos over token-major signatures (as
 *              kvarcd's Search scans its segment files; AVX-512 VPOPCNTQ
 *              over the query's bit planes)
 *   asym-ref, gqa4-ref: the same with the scalar reference (kvg_score_ref)
 *   asym+topk-ref: asym, then the reference top-k (kvg_topk_ref) over all
 * and prints signatures per second, the bytes that implies, and the ratio
 * to the plain read. Napkin math: a signature is D/8 + 2 bytes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvg.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static volatile uint64_t sink;

typedef struct ctx {
    const uint8_t *bits;
    const uint16_t *ss;
    size_t n;
    int d;
    kvg_query q[4];
    kvg_plane plane;
    float *scores;
    uint32_t *idx, *scratch;
} ctx;

static void run_read(ctx *c)
{
    const uint64_t *w = (const uint64_t *)(const void *)c->bits;
    size_t nw = c->n * (size_t)c->d / 64;
    uint64_t a = 0, b = 0;
    for (size_t i = 0; i + 1 < nw; i += 2) {
        a += w[i];
        b ^= w[i + 1];
    }
    const uint64_t *s = (const uint64_t *)(const void *)c->ss;
    for (size_t i = 0; i < c->n / 4; i++)
        a += s[i];
    sink = a + b;
}
static void run_asym(ctx *c)
{
    kvg_plane_score(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 1, &c->plane, 0, c->n, NULL, 0, c->scores);
}
static void run_asym_v3(ctx *c)
{
    kvg_plane_score_isa(KVG_ISA_V3, KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 1, &c->plane, 0, c->n, NULL, 0, c->scores);
}
static void run_gqa_v3(ctx *c)
{
    kvg_plane_score_isa(KVG_ISA_V3, KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 4, &c->plane, 0, c->n, NULL, 0, c->scores);
}
static void run_asym_tok(ctx *c)
{
    kvg_score_pos(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 1, c->bits, c->ss, c->n, 0, NULL, 0, c->scores);
}
static void run_asym_ref(ctx *c) { kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 1, c->bits, c->ss, c->n, c->scores); }
static void run_ham(ctx *c)
{
    kvg_plane_score(KVG_SCORE_HAMMING, KVG_COMBINE_MAX, c->q, 1, &c->plane, 0, c->n, NULL, 0, c->scores);
}
static void run_topk(ctx *c)
{
    sink += (uint64_t)kvg_plane_topk(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 1, &c->plane, 0, c->n, NULL, 0, 512,
                                     c->idx, NULL, c->scores, c->scratch);
}
static void run_topk_ref(ctx *c)
{
    run_asym(c);
    sink += (uint64_t)kvg_topk_ref(c->scores, c->n, 512, c->idx, NULL, c->scratch);
}
static void run_gqa(ctx *c)
{
    kvg_plane_score(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 4, &c->plane, 0, c->n, NULL, 0, c->scores);
}
static void run_gqa_tok(ctx *c)
{
    kvg_score_pos(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 4, c->bits, c->ss, c->n, 0, NULL, 0, c->scores);
}
static void run_gqa_ref(ctx *c) { kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 4, c->bits, c->ss, c->n, c->scores); }

/* Best-of-repeats seconds per call, running for about `secs`. */
static double time_it(void (*fn)(ctx *), ctx *c, double secs)
{
    double best = 1e30, end = now() + secs;
    int reps = 0;
    do {
        double t0 = now();
        fn(c);
        double dt = now() - t0;
        if (dt < best)
            best = dt;
        reps++;
    } while (now() < end || reps < 3);
    return best;
}

int main(int argc, char **argv)
{
    size_t ns[8] = { 131072, 1048576 };
    int nn = 2, d = 128;
    double secs = 1.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            nn = 0;
            for (char *s = strtok(argv[++i], ","); s && nn < 8; s = strtok(NULL, ","))
                ns[nn++] = strtoull(s, NULL, 10);
        } else if (!strcmp(argv[i], "--head-dim") && i + 1 < argc) {
            d = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) {
            secs = atof(argv[++i]);
        } else {
            fprintf(stderr, "usage: bench-scan [--tokens N[,N...]] [--head-dim 64|128|256] [--seconds S]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    kvarc_rotation rot;
    if (kvarc_rotation_init(&rot, d, 1)) {
        fprintf(stderr, "bench-scan: head_dim %d unsupported (64, 128, 256)\n", d);
        return 2;
    }
    printf("bench-scan: CPU stage-1 scan, head_dim %d, 1 thread, signature = %d B bits + 2 B scale\n",
           d, d / 8);
    printf("bench-scan: the run-time choice of the scan here: %s (plane), %s (token-major)\n", kvg_plane_kernel(),
           kvg_score_kernel(d));
    printf("%-10s %-14s %14s %10s %12s\n", "tokens", "kernel", "sigs/s", "GB/s", "vs read");
    for (int in = 0; in < nn; in++) {
        size_t n = ns[in];
        if (n % 4)
            n += 4 - n % 4;
        ctx c = { 0 };
        c.n = n;
        c.d = d;
        uint8_t *bits = malloc(n * (size_t)d / 8);
        uint16_t *ss = malloc(n * 2);
        c.scores = malloc(n * 4);
        c.idx = malloc(512 * 4);
        c.scratch = malloc(n * 4);
        uint8_t *rec = malloc(1024 * (size_t)kvarc_record_bytes(KVARC_FMT_Q3, d));
        float *k = malloc(1024 * (size_t)d * 4), *v = calloc(1024 * (size_t)d, 4);
        if (!bits || !ss || !c.scores || !c.idx || !c.scratch || !rec || !k || !v) {
            fprintf(stderr, "bench-scan: out of memory for %zu tokens\n", n);
            return 1;
        }
        uint64_t st = 42;
        kvg_codec codec = { KVARC_FMT_Q3, &rot, NULL, NULL };
        for (size_t t0 = 0; t0 < n; t0 += 1024) {   /* real signatures of random keys */
            size_t m = n - t0 < 1024 ? n - t0 : 1024;
            for (size_t i = 0; i < m * (size_t)d; i++)
                k[i] = (float)((int64_t)(kvarc_splitmix64(&st) >> 40) - (1 << 23)) / (float)(1 << 23);
            kvg_encode(&codec, KVARC_DTYPE_F32, k, v, m, rec, bits + t0 * d / 8, ss + t0, NULL);
        }
        c.bits = bits;
        c.ss = ss;
        if (kvg_plane_reserve(&c.plane, d, n) || kvg_plane_put(&c.plane, 0, n, bits, ss)) {
            fprintf(stderr, "bench-scan: out of memory for the plane of %zu tokens\n", n);
            return 1;
        }
        for (int h = 0; h < 4; h++)
            kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, k + (size_t)h * d, &c.q[h]);
        double bytes = (double)n * (d / 8 + 2);
        struct { const char *name; void (*fn)(ctx *); } ks[] = {
            { "read", run_read }, { "asym", run_asym }, { "hamming", run_ham },
            { "asym+topk", run_topk }, { "gqa4", run_gqa }, { "asym-avx2", run_asym_v3 }, { "gqa4-avx2", run_gqa_v3 },
            { "asym-tok", run_asym_tok }, { "gqa4-tok", run_gqa_tok },
            { "asym-ref", run_asym_ref }, { "gqa4-ref", run_gqa_ref },
            { "asym+topk-ref", run_topk_ref },
        };
        double base = 0;
        for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++) {
            double t = time_it(ks[i].fn, &c, secs);
            if (i == 0)
                base = t;
            printf("%-10zu %-14s %14.4g %10.2f %11.3fx\n", n, ks[i].name, (double)n / t,
                   bytes / t / 1e9, base / t);
        }
        kvg_plane_free(&c.plane);
        free(bits); free(ss); free(c.scores); free(c.idx); free(c.scratch); free(rec); free(k); free(v);
    }
    return 0;
}
