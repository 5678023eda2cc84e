/* bench_binding.c - `bench-binding DATA NAME [--tokens N] [--steps S]`: the C side of
 * tools/bench_python.py. Through libkvarc.so (as the Python package uses it): a conversation of N
 * random tokens (2 layers, 2 kv heads, 4 query heads, head_dim 64, q3, defaults otherwise), then S
 * decode steps of append + attend per layer; prints "ms_per_step X" for the decode steps. The
 * Python script runs the same workload, with the same values, through the package and through raw
 * ctypes calls, and prints the ratios. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvarc.h"
#include "toolutil.h"

#define HKV 2
#define HQ  4
#define HD  64

/* The workload's values: value i of stream s, in [-1, 1) (bench_python.py computes the same). */
static float val(uint64_t s, uint64_t i)
{
    uint64_t z = s * 0x9E3779B97F4A7C15ull + i + 1;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((double)(z >> 40) * 0x1.0p-24 * 2.0 - 1.0);
}

int main(int argc, char **argv)
{
    if (argc < 3 || !strcmp(argv[1], "--help")) {
        fprintf(argc < 3 ? stderr : stdout, "usage: bench-binding DATA NAME [--tokens N] [--steps S]\n");
        return argc < 3 ? 2 : 0;
    }
    uint32_t T = 4096, S = 300;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--tokens"))
            T = (uint32_t)strtoul(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--steps"))
            S = (uint32_t)strtoul(argv[i + 1], NULL, 10);
        else {
            fprintf(stderr, "bench-binding: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (T < 64 || T % 64 || !S) {
        fprintf(stderr, "bench-binding: --tokens a multiple of 64, --steps >= 1\n");
        return 2;
    }
    kvarc_client *cl;
    kvarc_conv *cv;
    kvarc_model m = { .n_layers = 2, .n_kv_heads = HKV, .n_q_heads = HQ, .head_dim = HD, .dtype = KVARC_DTYPE_F32,
                      .rope_theta = 10000, .rotary_dims = HD, .fingerprint = "bench-binding" };
    if (kvarc_client_open(argv[1], NULL, NULL, &cl))
        return 1;
    if (kvarc_conv_create(cl, "bench", argv[2], &m, NULL, NULL, &cv)) {
        fprintf(stderr, "bench-binding: %s\n", kvarc_client_errmsg(cl));
        return 1;
    }
    static float k[HKV * 64 * HD], v[HKV * 64 * HD], out[HQ * HD];
    int rc = 0;
    for (uint32_t at = 0; at < T && !rc; at += 64)      /* streams 10 + layer (k), 20 + layer (v): [kv][64][hd] chunks */
        for (uint32_t l = 0; l < 2 && !rc; l++) {
            for (uint32_t i = 0; i < HKV * 64 * HD; i++)
                k[i] = val(10 + l, (uint64_t)at * HKV * HD + i), v[i] = val(20 + l, (uint64_t)at * HKV * HD + i);
            rc = kvarc_append(cv, l, KVARC_DTYPE_F32, k, v, 64);
        }
    /* the decode steps' values first, as the Python side has them in arrays: only the calls are timed */
    float *dk = malloc((size_t)S * 2 * HKV * HD * sizeof *dk), *dq = malloc((size_t)S * 2 * HQ * HD * sizeof *dq);
    if (!dk || !dq) {
        fprintf(stderr, "bench-binding: out of memory for %u steps\n", S);
        return 1;
    }
    for (uint32_t s = 0; s < S; s++)
        for (uint32_t l = 0; l < 2; l++) {
            for (uint32_t i = 0; i < HKV * HD; i++)
                dk[((size_t)s * 2 + l) * HKV * HD + i] = val(30 + l, (uint64_t)s * HKV * HD + i);
            for (uint32_t i = 0; i < HQ * HD; i++)
                dq[((size_t)s * 2 + l) * HQ * HD + i] = val(40 + l, (uint64_t)s * HQ * HD + i);
        }
    double t0 = tu_now_s();
    for (uint32_t s = 0; s < S && !rc; s++)
        for (uint32_t l = 0; l < 2 && !rc; l++) {
            const float *kk = dk + ((size_t)s * 2 + l) * HKV * HD;
            if (!(rc = kvarc_append(cv, l, KVARC_DTYPE_F32, kk, kk, 1)))
                rc = kvarc_attend(cv, l, dq + ((size_t)s * 2 + l) * HQ * HD, 1, out);
        }
    double dt = tu_now_s() - t0;
    free(dk);
    free(dq);
    if (rc)
        fprintf(stderr, "bench-binding: %s\n", kvarc_errmsg(cv));
    else
        printf("ms_per_step %.4f\n", dt / S * 1e3);
    kvarc_conv_close(cv);
    kvarc_client_close(cl);
    return rc ? 1 : 0;
}
