/* kvarc_demo.c - `kvarc demo`, the main job: a long synthetic conversation
 * through libkvarc and a kvarcd, then decode steps with retrieval.
 *
 *   kvarc demo [--data DIR] [--kvarcd PATH] [--tokens N] [--layers L]
 *              [--steps S] [--format q3|q4|i8|f16|bf16] [--top-k K] [--keep]
 *
 * Uses the kvarcd serving DIR (default $KVARC_DATA, else
 * ~/.local/share/kvarc), or starts one there for the run. Archives N
 * tokens of every layer (tools/synth.h: topics, outliers, RoPE, needles at
 * 10..90% depth) with a progress bar, then decodes S steps: each appends a
 * token and attends on every layer with retrieval; even steps ask for a
 * needle. Prints needles found against a sliding window of the same
 * budget, the attention error against exact attention over every token
 * (layer 0), time per decode step by stage, and the memory bill. Exit 0
 * when every needle was found. The conversation is deleted at the end
 * unless --keep.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "kvarc.h"
#include "kvarc_admin.h"
#include "kvarc_rpc.h"
#include "kvg.h"
#include "synth.h"
#include "toolutil.h"

#define DH 2          /* kv heads */
#define DQH 8         /* query heads */
#define DD 128
#define DROT 64
#define DTHETA 10000.0f


static void bar(uint64_t done, uint64_t total, double t0)
{
    int w = 30, fill = (int)((double)w * (double)done / (double)total);
    double el = tu_now_s() - t0;
    fprintf(stderr, "\rarchiving [%.*s%.*s] %llu/%llu tokens, %.1f s", fill, "##############################", w - fill,
            "------------------------------", (unsigned long long)done, (unsigned long long)total, el);
    if (done == total)
        fprintf(stderr, "\n");
    fflush(stderr);
}

static const char *human(double bytes, char *buf, size_t len)
{
    if (bytes >= 1 << 30)
        snprintf(buf, len, "%.2f GiB", bytes / (1 << 30));
    else if (bytes >= 1 << 20)
        snprintf(buf, len, "%.1f MiB", bytes / (1 << 20));
    else
        snprintf(buf, len, "%.0f KiB", bytes / 1024);
    return buf;
}

int kvarc_demo(int argc, char **argv)
{
    const char *data = getenv("KVARC_DATA"), *kvarcd = NULL;
    uint64_t N = 65536;
    int layers = 4, steps = 16, keep = 0, fmt = KVARC_FMT_Q3;
    long top_k = 64;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--data") && i + 1 < argc)
            data = argv[++i];
        else if (!strcmp(argv[i], "--kvarcd") && i + 1 < argc)
            kvarcd = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            N = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc)
            layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--top-k") && i + 1 < argc)
            top_k = atol(argv[++i]);
        else if (!strcmp(argv[i], "--keep"))
            keep = 1;
        else if (!strcmp(argv[i], "--format") && i + 1 < argc) {
            const char *f = argv[++i];
            fmt = !strcmp(f, "q3") ? KVARC_FMT_Q3 : !strcmp(f, "q4") ? KVARC_FMT_Q4 : !strcmp(f, "i8") ? KVARC_FMT_I8
                : !strcmp(f, "f16") ? KVARC_FMT_F16 : !strcmp(f, "bf16") ? KVARC_FMT_BF16 : -1;
            if (fmt < 0) {
                fprintf(stderr, "kvarc demo: unknown format '%s' (q3, q4, i8, f16, bf16)\n", f);
                return 2;
            }
        } else {
            fprintf(stderr, "kvarc demo: unknown argument '%s' (see kvarc --help)\n", argv[i]);
            return 2;
        }
    }
    if (N < 4096 || N > (1ull << 24) || layers < 1 || layers > 64 || steps < 2 || top_k < 1 || top_k > 1024) {
        fprintf(stderr, "kvarc demo: need 4096 <= --tokens <= 16M, 1 <= --layers <= 64, --steps >= 2, "
                        "1 <= --top-k <= 1024\n");
        return 2;
    }
    char defdir[1024], kbuf[1024], msg[512], log[1100];
    if (!data) {
        const char *home = getenv("HOME");
        snprintf(defdir, sizeof defdir, "%s/.local", home ? home : ".");
        mkdir(defdir, 0700);
        snprintf(defdir, sizeof defdir, "%s/.local/share", home ? home : ".");
        mkdir(defdir, 0700);
        snprintf(defdir, sizeof defdir, "%s/.local/share/kvarc", home ? home : ".");
        data = defdir;
    }
    mkdir(data, 0700);
    pid_t pid = 0;
    int started = 0;
    /* a generous deadline: a busy daemon answers late, and none running
     * fails at once (nothing listens on the socket) */
    if (!kd_alive(data, 10000)) {
        snprintf(log, sizeof log, "%s/kvarcd.log", data);
        if (kd_spawn(kd_find_kvarcd(kvarcd, kbuf, sizeof kbuf), data, log, &pid, msg, sizeof msg)) {
            fprintf(stderr, "kvarc demo: could not start kvarcd: %s\n", msg);
            return 3;
        }
        started = 1;
    }
    printf("kvarc demo: a %llu-token conversation, %d layers x %d KV heads (%d query heads) x head_dim %d, %s records\n",
           (unsigned long long)N, layers, DH, DQH, DD, kvarc_format_get(fmt)->name);
    printf("kvarcd: %s %s\n", started ? "started for this run on" : "already serving", data);

    kvarc_client *cl;
    if (kvarc_client_open(data, NULL, NULL, &cl)) {
        fprintf(stderr, "kvarc demo: cannot connect to %s\n", data);
        return 3;
    }
    static const double depths[5] = { 0.1, 0.3, 0.5, 0.7, 0.9 };
    synth *sy = calloc((size_t)layers, sizeof *sy);
    uint64_t T = N + (uint64_t)steps;
    float *Kr0 = malloc(sizeof(float) * T * DH * DD), *V0 = malloc(sizeof(float) * T * DH * DD);
    float *means = malloc(sizeof(float) * (size_t)layers * DH * 2 * DD);
    float *kb = malloc(sizeof(float) * DH * 4096 * DD), *vb = malloc(sizeof(float) * DH * 4096 * DD);
    float *tk = malloc(sizeof(float) * DH * DD), *tv = malloc(sizeof(float) * DH * DD);
    if (!sy || !Kr0 || !V0 || !means || !kb || !vb || !tk || !tv) {
        fprintf(stderr, "kvarc demo: out of memory for %llu tokens\n", (unsigned long long)N);
        return 1;
    }
    for (int l = 0; l < layers; l++) {
        synth_init(&sy[l], DD, DH, DQH, 42 + (uint64_t)l, N, depths, 5);
        synth_means(&sy[l], N, 256, means + (size_t)l * DH * 2 * DD);
    }
    kvarc_model m = { (uint32_t)layers, DH, DQH, DD, KVARC_DTYPE_F32, DTHETA, DROT, 0, "kvarc-demo-synth" };
    kvarc_options o;
    kvarc_options_default(&o);
    o.format = fmt;
    o.top_k = (uint32_t)top_k;
    char name[64];
    snprintf(name, sizeof name, "run-%ld-%d", (long)time(NULL), (int)getpid());
    kvarc_conv *cv;
    int rc = kvarc_conv_create(cl, "demo", name, &m, &o, means, &cv);
    if (rc) {
        fprintf(stderr, "kvarc demo: create demo/%s: %s\n", name, kvarc_client_errmsg(cl));
        return 1;
    }
    /* archive: every layer, in chunks of 4096 tokens */
    double t0 = tu_now_s();
    for (uint64_t p = 0; p < N && !rc; p += 4096) {
        uint32_t n = (uint32_t)(N - p < 4096 ? N - p : 4096);
        for (int l = 0; l < layers && !rc; l++) {
            for (uint32_t t = 0; t < n; t++) {
                synth_kv(&sy[l], p + t, tk, tv);
                for (int h = 0; h < DH; h++) {
                    memcpy(kb + ((size_t)h * n + t) * DD, tk + h * DD, sizeof(float) * DD);
                    memcpy(vb + ((size_t)h * n + t) * DD, tv + h * DD, sizeof(float) * DD);
                }
                if (l == 0) {
                    memcpy(Kr0 + (p + t) * DH * DD, tk, sizeof(float) * DH * DD);
                    memcpy(V0 + (p + t) * DH * DD, tv, sizeof(float) * DH * DD);
                    for (int h = 0; h < DH; h++)
                        kvg_rope_ref(Kr0 + ((p + t) * DH + (uint64_t)h) * DD, DD, DROT, 0, DTHETA, (double)(p + t));
                }
            }
            rc = kvarc_append(cv, (uint32_t)l, KVARC_DTYPE_F32, kb, vb, n);
        }
        bar(p + n, N, t0);
    }
    if (!rc)
        rc = kvarc_conv_sync(cv);
    if (rc) {
        fprintf(stderr, "kvarc demo: archiving: %s\n", kvarc_errmsg(cv));
        return 1;
    }
    double t_arch = tu_now_s() - t0;
    printf("archived %llu tokens x %d layers in %.1f s (%.0f tokens/s)\n", (unsigned long long)N, layers, t_arch,
           (double)N / t_arch);

    /* decode */
    printf("decoding %d steps with retrieval: top_k %ld of each head's cold tokens, shortlist %u x top_k, "
           "%u sinks + %u-token hot window exact\n", steps, top_k, o.shortlist, o.sinks, o.hot_window);
    float *q = malloc(sizeof(float) * DQH * DD), *out = malloc(sizeof(float) * DQH * DD);
    float ex[DQH * DD], sw[DQH * DD], qr[DD];
    double *step_ms = calloc((size_t)steps, sizeof *step_ms), err_kv = 0, err_sw = 0;
    int found = 0, found_sw = 0, asked = 0;
    kvarc_stats s0, s1;
    kvarc_conv_stats(cv, &s0);
    for (int s = 0; s < steps && !rc; s++) {
        uint64_t pos = N + (uint64_t)s;
        int needle = s % 2 == 0 ? (s / 2) % 5 : -1;
        double ts = tu_now_s();
        for (int l = 0; l < layers && !rc; l++) {
            synth_kv(&sy[l], pos, tk, tv);
            if (l == 0) {
                memcpy(Kr0 + pos * DH * DD, tk, sizeof(float) * DH * DD);
                memcpy(V0 + pos * DH * DD, tv, sizeof(float) * DH * DD);
                for (int h = 0; h < DH; h++)
                    kvg_rope_ref(Kr0 + (pos * DH + (uint64_t)h) * DD, DD, DROT, 0, DTHETA, (double)pos);
            }
            synth_query(&sy[l], pos, needle, q);
            if ((rc = kvarc_append(cv, (uint32_t)l, KVARC_DTYPE_F32, tk, tv, 1)) ||
                (rc = kvarc_attend(cv, (uint32_t)l, q, 1, out)))
                break;
            if (l == 0) {          /* the checks against exact attention are not timed */
                double tx = tu_now_s();
                uint64_t budget = (uint64_t)top_k + o.hot_window, lo = pos + 1 > budget ? pos + 1 - budget : 0;
                for (int hq = 0; hq < DQH; hq++) {
                    memcpy(qr, q + hq * DD, sizeof qr);
                    kvg_rope_ref(qr, DD, DROT, 0, DTHETA, (double)pos);
                    tu_exact_attention(Kr0, V0, DH, DD, qr, hq / (DQH / DH), pos, 0, 0, ex + hq * DD, NULL);
                    tu_exact_attention(Kr0, V0, DH, DD, qr, hq / (DQH / DH), pos, o.sinks, lo, sw + hq * DD, NULL);
                }
                err_kv += tu_rel_err(out, ex, DQH * DD);
                err_sw += tu_rel_err(sw, ex, DQH * DD);
                if (needle >= 0) {
                    uint64_t np = sy[0].needle_pos[needle], ret[1024];
                    for (int h = 0; h < DH; h++) {
                        size_t n = kvarc_last_retrieved(cv, (uint32_t)h, ret, 1024);
                        int hit = 0;
                        for (size_t r = 0; r < n && r < 1024; r++)
                            hit |= ret[r] == np;
                        found += hit;
                        found_sw += np >= lo;
                        asked++;
                    }
                }
                ts += tu_now_s() - tx;
            }
        }
        step_ms[s] = (tu_now_s() - ts) * 1e3;
    }
    if (rc) {
        fprintf(stderr, "kvarc demo: decode: %s\n", kvarc_errmsg(cv));
        return 1;
    }
    kvarc_conv_stats(cv, &s1);
    qsort(step_ms, (size_t)steps, sizeof *step_ms, tu_cmp_double);
    double per = 1e-6 / steps;
    printf("  needles found        kvarc %d/%d    sliding window of the same budget %d/%d\n", found, asked, found_sw,
           asked);
    printf("  attention error      kvarc %.3f    sliding window %.3f   (relative, vs exact attention over all %llu "
           "tokens, layer 0)\n", err_kv / steps, err_sw / steps, (unsigned long long)N);
    printf("  time per step        p50 %.1f ms for %d layers (stage 1 %.1f, stage 2 %.1f, decode %.1f, attention %.1f "
           "ms per step)\n", step_ms[steps / 2], layers, (double)(s1.ns_stage1 - s0.ns_stage1) * per,
           (double)(s1.ns_stage2 - s0.ns_stage2) * per, (double)(s1.ns_decode - s0.ns_decode) * per,
           (double)(s1.ns_attend - s0.ns_attend) * per);
    uint64_t lookups = s1.cache_lookups - s0.cache_lookups, hits = s1.cache_hits - s0.cache_hits;
    printf("  wire                 %llu records fetched, cache hit rate %.0f%%\n",
           (unsigned long long)(s1.records_fetched - s0.records_fetched),
           lookups ? 100.0 * (double)hits / (double)lookups : 0.0);
    int rb = kvarc_record_bytes(fmt, DD);
    double tok = (double)T * layers * DH;
    double sig = tok * (DD / 8 + 2), exact_win = (double)layers * DH * (o.sinks + o.hot_window + o.max_chunk) * DD * 8;
    double cache = (double)o.cache_records * rb;
    double disk = tok * (rb + DD / 8 + 2), fp16 = tok * DD * 2 * 2;
    char b1[32], b2[32], b3[32], b4[32], b5[32];
    printf("  memory               in this process: signatures %s + exact sinks and window %s (+ record cache up to "
           "%s)\n                       in kvarcd, on disk: %s; the same K/V in fp16 would need %s (%.1fx)\n",
           human(sig, b1, sizeof b1), human(exact_win, b2, sizeof b2), human(cache, b3, sizeof b3),
           human(disk, b4, sizeof b4), human(fp16, b5, sizeof b5), fp16 / disk);
    kvarc_conv_close(cv);
    if (!keep) {
        kvc_conn *k;
        if (!kvc_connect(data, &k)) {
            Kvarc__V1__DeleteRequest dr = KVARC__V1__DELETE_REQUEST__INIT;
            dr.ns = "demo";
            dr.name = name;
            if (!kvc_call(k, "Delete", &dr.base, &kvarc__v1__empty__descriptor, NULL, 0, msg, sizeof msg))
                printf("deleted demo/%s (its space returns at the next `kvarc compact`; --keep keeps it)\n", name);
            kvc_close(k);
        }
    } else {
        printf("kept as demo/%s (kvarc inspect demo/%s)\n", name, name);
    }
    kvarc_client_close(cl);
    if (started)
        printf("kvarcd: stopped (exit %d)\n", kd_stop(pid));
    for (int l = 0; l < layers; l++)
        synth_free(&sy[l]);
    free(sy); free(Kr0); free(V0); free(means); free(kb); free(vb); free(tk); free(tv); free(q); free(out);
    free(step_ms);
    return found == asked ? 0 : 1;
}
