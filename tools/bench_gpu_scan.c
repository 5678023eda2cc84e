/* bench-gpu-scan - GPU stage-1 scan and top-k against a device copy.
 *
 *   bench-gpu-scan [--tokens N[,N...]] [--reps R]
 *
 * For each N (cold tokens of one KV head, head_dim 128) it times, on the
 * same device buffers and in the same run:
 *   copy      : cudaMemcpy device-to-device of the signature planes
 *               (N * 18 bytes): the bandwidth baseline
 *   asym      : kvg_score_cuda, one query
 *   gqa4      : kvg_score_cuda, a GQA group of 4 query heads (max)
 *   topk512   : kvg_topk_cuda of the 512 best of the N scores
 *   asym+topk : both, the stage-1 step of one KV head
 * Each figure is the best of R launches of the synchronous launcher
 * (its host overhead included). Napkin math: GB/s = bytes read / time
 * (the copy also writes as many bytes: its row shows read + write). */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvg_cuda.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct ctx {
    size_t n;
    uint8_t *bits, *copy_dst;
    uint16_t *ss;
    float *scores;
    uint32_t *idx;
    void *scratch;
    kvg_query q[4];
} ctx;

static int run_copy(ctx *c)
{
    cudaMemcpy(c->copy_dst, c->bits, c->n * 18, cudaMemcpyDeviceToDevice);
    return cudaDeviceSynchronize() == cudaSuccess ? 0 : -1;
}
static int run_asym(ctx *c) { return kvg_score_cuda(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 1, c->bits, c->ss, c->n, c->scores, NULL); }
static int run_gqa(ctx *c) { return kvg_score_cuda(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 4, c->bits, c->ss, c->n, c->scores, NULL); }
static int run_topk(ctx *c) { return kvg_topk_cuda(c->scores, c->n, 512, c->idx, NULL, c->scratch, NULL) < 0; }
static int run_both(ctx *c) { return run_asym(c) || run_topk(c); }

int main(int argc, char **argv)
{
    size_t ns[8] = { 131072, 1048576, 4194304 };
    int nn = 3, reps = 50;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            nn = 0;
            for (char *s = strtok(argv[++i], ","); s && nn < 8; s = strtok(NULL, ","))
                ns[nn++] = strtoull(s, NULL, 10);
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: bench-gpu-scan [--tokens N[,N...]] [--reps R]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    if (!kvg_cuda_available()) {
        fprintf(stderr, "bench-gpu-scan: no CUDA device\n");
        return 77;
    }
    char name[256];
    kvg_cuda_device_name(name, sizeof name);
    printf("bench-gpu-scan on %s: head_dim 128, signature 16 B bits + 2 B scale, best of %d\n", name, reps);
    printf("%-9s %-10s %10s %14s %10s %10s\n", "tokens", "kernel", "us", "sigs/s", "GB/s", "vs copy");
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, 128, 1);
    for (int in = 0; in < nn; in++) {
        ctx c = { 0 };
        c.n = ns[in];
        size_t bytes = c.n * 18;
        uint8_t *h = malloc(bytes);
        uint64_t st = 9;
        for (size_t i = 0; i < bytes; i++)
            h[i] = (uint8_t)kvarc_splitmix64(&st);
        for (size_t i = 0; i < c.n; i++) {          /* plausible fp16 scales */
            uint16_t v = kvarc_f32_to_f16(0.5f + (float)(i % 97) / 50.0f);
            memcpy(h + c.n * 16 + 2 * i, &v, 2);
        }
        if (cudaMalloc((void **)&c.bits, bytes) || cudaMalloc((void **)&c.copy_dst, bytes) ||
            cudaMalloc((void **)&c.scores, c.n * 4) || cudaMalloc((void **)&c.idx, 512 * 4) ||
            cudaMalloc(&c.scratch, kvg_topk_cuda_scratch_bytes(c.n))) {
            fprintf(stderr, "bench-gpu-scan: cudaMalloc failed for %zu tokens\n", c.n);
            return 1;
        }
        cudaMemcpy(c.bits, h, bytes, cudaMemcpyHostToDevice);
        c.ss = (uint16_t *)(c.bits + c.n * 16);
        float qv[128];
        for (int hq = 0; hq < 4; hq++) {
            for (int i = 0; i < 128; i++)
                qv[i] = (float)((int)(kvarc_splitmix64(&st) % 2001) - 1000) / 1000.0f;
            kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, qv, &c.q[hq]);
        }
        struct { const char *name; int (*fn)(ctx *); double bytes; } ks[] = {
            { "copy", run_copy, 2.0 * bytes }, { "asym", run_asym, (double)bytes },
            { "gqa4", run_gqa, (double)bytes }, { "topk512", run_topk, 4.0 * c.n },
            { "asym+topk", run_both, (double)bytes + 4.0 * c.n },
        };
        double base = 0;
        for (size_t k = 0; k < sizeof ks / sizeof ks[0]; k++) {
            double best = 1e30;
            for (int r = 0; r < reps + 3; r++) {
                double t0 = now();
                if (ks[k].fn(&c)) {
                    fprintf(stderr, "bench-gpu-scan: %s failed\n", ks[k].name);
                    return 1;
                }
                double dt = now() - t0;
                if (r >= 3 && dt < best)
                    best = dt;
            }
            if (k == 0)
                base = best;
            printf("%-9zu %-10s %10.1f %14.4g %10.1f %9.3fx\n", c.n, ks[k].name, best * 1e6,
                   (double)c.n / best, ks[k].bytes / best / 1e9, base / best);
        }
        cudaFree(c.bits); cudaFree(c.copy_dst); cudaFree(c.scores); cudaFree(c.idx); cudaFree(c.scratch);
        free(h);
    }
    return 0;
}
