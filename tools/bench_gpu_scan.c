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
 *   gqa4+topk : the full scan of one KV head with a GQA group of 4, as
 *               libkvarc's GPU stage 1 runs it without the coarse tier
 *   coarse256 : the same through the coarse tier, as libkvarc's GPU stage 1
 *               runs it (client/gpu.c): the N / 64 blocks' two summary
 *               items scored with one bias per block, each block's best,
 *               the 256 best blocks' indices back to the host, their tokens
 *               scored in place as pieces, the 512 best of those; its
 *               "vs copy" column is against gqa4+topk instead (the speedup
 *               of the tier; rows for N >= 64K)
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
    /* the coarse tier: summaries [nb][2] of every 64-token block, biases [4][nb], work space */
    size_t nb;
    uint8_t *sum_bits;
    uint16_t *sum_ss;
    float *bias, *is, *bs, *ts;
    uint32_t *bidx, hbidx[256];
    kvg_cuda_piece pc[256];
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
static int run_gqa_topk(ctx *c) { return run_gqa(c) || run_topk(c); }

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int run_coarse(ctx *c)
{
    const size_t S = KVG_SUM_ITEMS, ni = c->nb * S;
    if (kvg_score_items_cuda(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 4, c->sum_bits, c->sum_ss, ni, c->bias, S, c->nb,
                             c->is, NULL) ||
        kvg_block_best_cuda(c->is, c->nb, (int)S, NULL, c->bs, NULL))
        return -1;
    long nc = kvg_topk_cuda(c->bs, c->nb, 256, c->bidx, NULL, c->scratch, NULL);
    if (nc != 256 || cudaMemcpy(c->hbidx, c->bidx, 256 * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
        return -1;
    qsort(c->hbidx, 256, 4, cmp_u32);
    for (size_t k = 0; k < 256; k++) {
        uint64_t p = (uint64_t)c->hbidx[k] * KVG_SIG_BLOCK;
        c->pc[k] = (kvg_cuda_piece){ c->bits + p * 16, c->ss + p, p, KVG_SIG_BLOCK, k * KVG_SIG_BLOCK };
    }
    if (kvg_score_pieces_cuda(KVG_SCORE_ASYM, KVG_COMBINE_MAX, c->q, 4, c->pc, 256, 0, c->bias, c->nb, c->ts, NULL))
        return -1;
    return kvg_topk_cuda(c->ts, 256 * KVG_SIG_BLOCK, 512, c->idx, NULL, c->scratch, NULL) < 0;
}

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
        c.nb = c.n / KVG_SIG_BLOCK;
        const size_t S = KVG_SUM_ITEMS, nsb = c.nb * S * 18;
        int coarse = c.nb >= 1024;
        if (coarse) {                                   /* random summaries and biases of every block */
            uint8_t *hs = malloc(nsb);
            float *hb = malloc(4 * c.nb * sizeof *hb);
            for (size_t i = 0; i < c.nb * S * 16; i++)
                hs[i] = (uint8_t)kvarc_splitmix64(&st);
            for (size_t i = 0; i < c.nb * S; i++) {
                uint16_t v = kvarc_f32_to_f16(0.5f + (float)(i % 89) / 40.0f);
                memcpy(hs + c.nb * S * 16 + 2 * i, &v, 2);
            }
            for (size_t i = 0; i < 4 * c.nb; i++)
                hb[i] = (float)((int)(kvarc_splitmix64(&st) % 2001) - 1000) / 100.0f;
            if (cudaMalloc((void **)&c.sum_bits, nsb) || cudaMalloc((void **)&c.bias, 4 * c.nb * 4) ||
                cudaMalloc((void **)&c.is, c.nb * S * 4) || cudaMalloc((void **)&c.bs, c.nb * 4) ||
                cudaMalloc((void **)&c.ts, 256 * KVG_SIG_BLOCK * 4) || cudaMalloc((void **)&c.bidx, 256 * 4)) {
                fprintf(stderr, "bench-gpu-scan: cudaMalloc failed for the coarse tier of %zu tokens\n", c.n);
                return 1;
            }
            cudaMemcpy(c.sum_bits, hs, nsb, cudaMemcpyHostToDevice);
            cudaMemcpy(c.bias, hb, 4 * c.nb * 4, cudaMemcpyHostToDevice);
            c.sum_ss = (uint16_t *)(c.sum_bits + c.nb * S * 16);
            free(hs);
            free(hb);
        }
        struct { const char *name; int (*fn)(ctx *); double bytes; } ks[] = {
            { "copy", run_copy, 2.0 * bytes }, { "asym", run_asym, (double)bytes },
            { "gqa4", run_gqa, (double)bytes }, { "topk512", run_topk, 4.0 * c.n },
            { "asym+topk", run_both, (double)bytes + 4.0 * c.n },
            { "gqa4+topk", run_gqa_topk, (double)bytes + 4.0 * c.n },
            { "coarse256", run_coarse, (double)nsb + 256.0 * KVG_SIG_BLOCK * 18 },
        };
        double base = 0, full = 0;
        for (size_t k = 0; k < sizeof ks / sizeof ks[0]; k++) {
            if (ks[k].fn == run_coarse && !coarse)
                continue;
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
            if (ks[k].fn == run_gqa_topk)
                full = best;
            printf("%-9zu %-10s %10.1f %14.4g %10.1f %9.3fx%s\n", c.n, ks[k].name, best * 1e6,
                   (double)c.n / best, ks[k].bytes / best / 1e9, (ks[k].fn == run_coarse ? full : base) / best,
                   ks[k].fn == run_coarse ? " (vs gqa4+topk)" : "");
        }
        cudaFree(c.bits); cudaFree(c.copy_dst); cudaFree(c.scores); cudaFree(c.idx); cudaFree(c.scratch);
        cudaFree(c.sum_bits); cudaFree(c.bias); cudaFree(c.is); cudaFree(c.bs); cudaFree(c.ts); cudaFree(c.bidx);
        free(h);
    }
    return 0;
}
