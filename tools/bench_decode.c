/* bench-decode - decode-step time of libkvarc's CPU path against exact
 * full attention over the same tokens, in one run.
 *
 *   bench-decode [--kvarcd PATH] [--layers L] [--tokens N] [--steps S] [--format q3]
 *                [--coarse 0,256] [--fast 0[,1]] [--block T] [--threads T]
 *
 * Model: L layers x 8 KV heads x 32 query heads (GQA 4) x head_dim 128,
 * RoPE on all 128 dims (theta 500000): a Llama-3-8B-shaped attention.
 * N cold tokens per layer are archived (encoded once, the same records
 * appended to every layer straight through the transport: only timing is
 * measured here, see bench-quality for fidelity), then a libkvarc handle
 * attaches (loading every layer's signatures) and decodes S steps: per
 * step and layer, append one token and attend with one query (32 heads),
 * top_k 64, shortlist 8 x 64, kvarcd on a unix socket; once per --coarse
 * setting (the coarse tier's blocks per kv head, 0 = off; the archive
 * carries the block summaries libkvarc would have made) and --fast setting
 * (kvarc_options.fast_tier: 1 = the client holds block summaries only and
 * kvarcd runs stage 1b). --block: tokens per Append, i.e. per stored
 * extent (default 4096; libkvarc appends batches of 64, and stage 1b reads
 * a chosen block's signatures through its extent's checksummed section).
 * Baseline, same run: exact attention of the same 32 query heads over the
 * same N tokens held as fp32 in RAM (one layer; x L for the model), its
 * loops laid out to vectorize (built -O3), each GQA group reading its KV
 * head once.
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
#include "kvarc_rpc.h"
#include "kvg.h"
#include "toolutil.h"

#define H 8
#define QH 32
#define D 128
#define THETA 500000.0f
#define CHUNK 4096


static uint64_t rng_s = 0x9e3779b97f4a7c15ull;
static float rnd(void)            /* roughly N(0, 0.33): the sum of two uniforms */
{
    rng_s ^= rng_s >> 12;
    rng_s ^= rng_s << 25;
    rng_s ^= rng_s >> 27;
    uint64_t x = rng_s * 0x2545f4914f6cdd1dull;
    return (float)((double)(x >> 40) / 16777216.0 + (double)((x >> 16) & 0xffffff) / 16777216.0 - 1.0);
}


static kd_run run;            /* the daemon and its directory, removed on the way out */

static void die(const char *what, const char *msg)
{
    fprintf(stderr, "bench-decode: %s: %s\n", what, msg);
    kd_run_end(&run, "bench-decode");
    exit(1);
}

/* Exact attention of q[QH][D] (roped) over keys kt [H][D][n] (roped,
 * dimension-major so the logit loop runs over tokens and vectorizes) and
 * values v [n][H][D]: out[QH][D]. The GQA group's query heads go through
 * their KV head's keys and values together (each read once per step).
 * lg: G x n floats of scratch. */
static void exact(const float *q, const float *kt, const float *v, size_t n, float *out, float *lg)
{
    enum { GQ = QH / H };
    for (int h = 0; h < H; h++) {
        memset(lg, 0, GQ * n * sizeof *lg);
        for (int i = 0; i < D; i++) {
            const float *ki = kt + ((size_t)h * D + (size_t)i) * n;
            for (int g = 0; g < GQ; g++) {
                float qi = q[(h * GQ + g) * D + i] * 0.08838834764831845f;
                float *lgg = lg + (size_t)g * n;
                for (size_t j = 0; j < n; j++)
                    lgg[j] += qi * ki[j];
            }
        }
        float m[GQ], l[GQ], acc[GQ][D];
        memset(acc, 0, sizeof acc);
        for (int g = 0; g < GQ; g++) {
            m[g] = -INFINITY;
            l[g] = 0;
            for (size_t j = 0; j < n; j++)
                m[g] = lg[(size_t)g * n + j] > m[g] ? lg[(size_t)g * n + j] : m[g];
            for (size_t j = 0; j < n; j++) {
                lg[(size_t)g * n + j] = expf(lg[(size_t)g * n + j] - m[g]);
                l[g] += lg[(size_t)g * n + j];
            }
        }
        for (size_t j = 0; j < n; j++) {
            const float *vj = v + (j * H + (size_t)h) * D;
            for (int g = 0; g < GQ; g++) {
                float w = lg[(size_t)g * n + j];
                for (int i = 0; i < D; i++)
                    acc[g][i] += w * vj[i];
            }
        }
        for (int g = 0; g < GQ; g++)
            for (int i = 0; i < D; i++)
                out[(h * GQ + g) * D + i] = acc[g][i] / l[g];
    }
}

int main(int argc, char **argv)
{
    const char *kvarcd = NULL;
    int layers = 1, steps = 20, fmt = KVARC_FMT_Q3, n_coarse = 2, n_fast = 1, fast[2] = { 0, 1 };
    uint32_t coarse[8] = { 0, 256 };
    int blk = CHUNK;
    int threads = 0;
    uint64_t N = 131072;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--kvarcd") && i + 1 < argc)
            kvarcd = argv[++i];
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc)
            layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            N = strtoull(argv[++i], NULL, 10) / CHUNK * CHUNK;
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--coarse") && i + 1 < argc) {
            char *e = argv[++i];
            n_coarse = 0;
            do {
                long v = strtol(e, &e, 10);
                if (v < 0 || v > (1 << 24) || n_coarse == 8)
                    die("usage", "--coarse BLOCKS[,BLOCKS...]: up to 8 values, 0 (off) .. 16777216");
                coarse[n_coarse++] = (uint32_t)v;
            } while (*e == ',' && *++e);
        }
        else if (!strcmp(argv[i], "--fast") && i + 1 < argc) {
            const char *f = argv[++i];
            if (!strcmp(f, "0") || !strcmp(f, "1")) {
                n_fast = 1;
                fast[0] = f[0] - '0';
            } else if (!strcmp(f, "0,1")) {
                n_fast = 2;
            } else {
                die("usage", "--fast 0 | 1 | 0,1");
            }
        } else if (!strcmp(argv[i], "--block") && i + 1 < argc) {
            blk = atoi(argv[++i]);
            if (blk < KVG_SIG_BLOCK || blk > CHUNK || CHUNK % blk || blk % KVG_SIG_BLOCK)
                die("usage", "--block T: 64..4096 tokens per Append, a multiple of 64 dividing 4096");
        }
        else if (!strcmp(argv[i], "--format") && i + 1 < argc) {
            const char *f = argv[++i];
            fmt = !strcmp(f, "q3") ? KVARC_FMT_Q3 : !strcmp(f, "q4") ? KVARC_FMT_Q4 : !strcmp(f, "i8") ? KVARC_FMT_I8
                : !strcmp(f, "f16") ? KVARC_FMT_F16 : -1;
            if (fmt < 0)
                die("usage", "--format q3|q4|i8|f16");
        } else {
            fprintf(stderr, "usage: bench-decode [--kvarcd PATH] [--layers L] [--tokens N] [--steps S] [--format F] "
                            "[--coarse BLOCKS,...] [--fast 0[,1]] [--block T] [--threads T]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    if (layers < 1 || layers > 128 || N < CHUNK || steps < 5 || threads < 0 || threads > 256)
        die("usage", "--layers 1..128, --tokens >= 4096, --steps >= 5, --threads 0..256");
    char dir[] = "/var/tmp/kvarc-decode-XXXXXX", kbuf[1024], msg[512];
    if (!mkdtemp(dir))
        die("mkdtemp", strerror(errno));
    snprintf(run.dir, sizeof run.dir, "%s", dir);
    pid_t pid;
    if (kd_spawn(kd_find_kvarcd(kvarcd, kbuf, sizeof kbuf), dir, NULL, &pid, msg, sizeof msg))
        die("kvarcd", msg);
    run.pid = pid;
    kvarc_client *cl;
    if (kvarc_client_open(dir, NULL, NULL, &cl))
        die("connect", dir);
    kvarc_model m = { (uint32_t)layers, H, QH, D, KVARC_DTYPE_F32, THETA, D, 0, "bench-decode" };
    kvarc_options o;
    kvarc_options_default(&o);
    o.format = fmt;
    o.threads = (uint32_t)threads;
    kvarc_conv *cv;
    if (kvarc_conv_create(cl, "bench", "decode", &m, &o, NULL, &cv))
        die("create", kvarc_client_errmsg(cl));
    uint64_t conv_id = 0;
    {   /* the id, for the raw appends */
        kvc_conn *k;
        if (kvc_connect(dir, &k))
            die("connect", dir);
        Kvarc__V1__OpenRequest r = KVARC__V1__OPEN_REQUEST__INIT;
        r.ns = "bench";
        r.name = "decode";
        ProtobufCMessage *rep = NULL;
        if (kvc_call(k, "Open", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg))
            die("open", msg);
        conv_id = ((Kvarc__V1__ConvReply *)rep)->info->id;
        protobuf_c_message_free_unpacked(rep, NULL);
        kvarc_conv_close(cv);

        /* archive: N tokens, encoded once, appended to every layer */
        int rb = kvarc_record_bytes(fmt, D);
        float *K = malloc(sizeof(float) * N * H * D), *V = malloc(sizeof(float) * N * H * D);
        float *kb = malloc(sizeof(float) * CHUNK * D), *vb = malloc(sizeof(float) * CHUNK * D);
        uint8_t *recs = malloc((size_t)H * CHUNK * rb), *bits = malloc((size_t)H * CHUNK * D / 8);
        uint16_t *sc = malloc((size_t)H * CHUNK * 2);
        /* the coarse tier's summaries of the chunk's 64-position blocks, as libkvarc makes them */
        const size_t nsb = CHUNK / KVG_SIG_BLOCK, S = KVG_SUM_ITEMS;
        uint8_t *sbits = malloc((size_t)H * nsb * S * D / 8);
        uint16_t *sscale = malloc((size_t)H * nsb * S * 2);
        uint8_t *sub_recs = malloc((size_t)H * CHUNK * rb), *sub_bits = malloc((size_t)H * CHUNK * D / 8);
        uint16_t *sub_sc = malloc((size_t)H * CHUNK * 2), *sub_ss = malloc((size_t)H * nsb * S * 2);
        uint8_t *sub_sb = malloc((size_t)H * nsb * S * D / 8);
        if (!K || !V || !kb || !vb || !recs || !bits || !sc || !sbits || !sscale || !sub_recs || !sub_bits ||
            !sub_sc || !sub_ss || !sub_sb)
            die("memory", "out of memory");
        for (size_t i = 0; i < N * H * D; i++) {
            K[i] = rnd();
            V[i] = rnd();
        }
        kvarc_rotation rot;
        kvarc_rotation_init(&rot, D, o.seed);
        kvg_codec codec = { fmt, &rot, NULL, NULL };
        kvg_rope rope;               /* true positions (the default): kind-2 signatures, as libkvarc makes them */
        if (kvg_rope_init(&rope, D, D, 0, THETA))
            die("rope", "bad RoPE");
        double ta = tu_now_s(), t_enc = 0;
        for (uint64_t p = 0; p < N; p += CHUNK) {
            double te = tu_now_s();
            for (int h = 0; h < H; h++) {
                for (int t = 0; t < CHUNK; t++) {
                    memcpy(kb + (size_t)t * D, K + ((p + (uint64_t)t) * H + (uint64_t)h) * D, sizeof(float) * D);
                    memcpy(vb + (size_t)t * D, V + ((p + (uint64_t)t) * H + (uint64_t)h) * D, sizeof(float) * D);
                }
                if (kvg_encode(&codec, KVARC_DTYPE_F32, kb, vb, CHUNK, recs + (size_t)h * CHUNK * rb,
                                   bits + (size_t)h * CHUNK * D / 8, sc + (size_t)h * CHUNK, NULL) ||
                    kvg_sig_pos_keys(&rope, NULL, kb, p, CHUNK, kb))   /* the keys kind 2 signs, as libkvarc */
                    die("encode", "failed");
                if (kvg_signatures(&rot, kb, CHUNK, bits + (size_t)h * CHUNK * D / 8, sc + (size_t)h * CHUNK, NULL))
                    die("encode", "failed");
                for (size_t b = 0; b < nsb; b++) {
                    size_t t0 = b * KVG_SIG_BLOCK, o = (size_t)h * nsb + b;
                    if (kvg_summary_ref(&rot, kb + t0 * D, bits + ((size_t)h * CHUNK + t0) * D / 8,
                                        sc + (size_t)h * CHUNK + t0, KVG_SIG_BLOCK, sbits + o * S * D / 8,
                                        sscale + o * S))
                        die("summary", "failed");
                }
            }
            t_enc += tu_now_s() - te;
            for (int b0 = 0; b0 < CHUNK; b0 += blk) {       /* Appends of blk tokens: [H][blk] slices */
                const size_t bn = (size_t)blk / KVG_SIG_BLOCK, sbb = S * D / 8;
                for (int h = 0; h < H; h++) {
                    memcpy(sub_recs + (size_t)h * blk * rb, recs + ((size_t)h * CHUNK + b0) * rb, (size_t)blk * rb);
                    memcpy(sub_bits + (size_t)h * blk * D / 8, bits + ((size_t)h * CHUNK + b0) * D / 8,
                           (size_t)blk * D / 8);
                    memcpy(sub_sc + (size_t)h * blk, sc + (size_t)h * CHUNK + b0, (size_t)blk * 2);
                    memcpy(sub_sb + (size_t)h * bn * sbb, sbits + ((size_t)h * nsb + b0 / KVG_SIG_BLOCK) * sbb,
                           bn * sbb);
                    memcpy(sub_ss + (size_t)h * bn * S, sscale + ((size_t)h * nsb + b0 / KVG_SIG_BLOCK) * S,
                           bn * S * 2);
                }
                for (int l = 0; l < layers; l++) {
                    Kvarc__V1__AppendRequest r2 = KVARC__V1__APPEND_REQUEST__INIT;
                    r2.conv = conv_id;
                    r2.layer = (uint32_t)l;
                    r2.first_pos = p + (uint64_t)b0;
                    r2.count = (uint32_t)blk;
                    r2.sig_bits.data = sub_bits;
                    r2.sig_bits.len = (size_t)H * blk * D / 8;
                    r2.sig_scale.data = (uint8_t *)sub_sc;
                    r2.sig_scale.len = (size_t)H * blk * 2;
                    r2.records.data = sub_recs;
                    r2.records.len = (size_t)H * blk * rb;
                    r2.sum_bits.data = sub_sb;
                    r2.sum_bits.len = (size_t)H * bn * sbb;
                    r2.sum_scale.data = (uint8_t *)sub_ss;
                    r2.sum_scale.len = (size_t)H * bn * S * 2;
                    if (kvc_call(k, "Append", &r2.base, &kvarc__v1__append_reply__descriptor, NULL, 0, msg,
                                 sizeof msg))
                        die("append", msg);
                }
            }
            fprintf(stderr, "\rarchived %llu/%llu tokens x %d layers", (unsigned long long)(p + CHUNK),
                    (unsigned long long)N, layers);
        }
        fprintf(stderr, "\n");
        kvc_close(k);
        double tarch = tu_now_s() - ta;

        /* the baseline: exact attention over the same tokens, one layer, fp32 in RAM */
        float *q = malloc(sizeof(float) * QH * D), *out = malloc(sizeof(float) * QH * D);
        float *lg = malloc(sizeof(float) * N * (QH / H));
        for (uint64_t p = 0; p < N; p++)         /* K roped, then dimension-major into K's place */
            for (int h = 0; h < H; h++)
                kvg_rope_ref(K + (p * H + (uint64_t)h) * D, D, D, 0, THETA, (double)p);
        float *kt = malloc(sizeof(float) * N * H * D);
        if (!kt)
            die("memory", "out of memory for the baseline's keys");
        for (uint64_t p = 0; p < N; p++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < D; i++)
                    kt[((size_t)h * D + (size_t)i) * N + p] = K[(p * H + (uint64_t)h) * D + (uint64_t)i];
        free(K);
        K = kt;
        double best = 1e30;
        for (int rep2 = 0; rep2 < 3; rep2++) {
            for (int i = 0; i < QH * D; i++)
                q[i] = rnd();
            double te = tu_now_s();
            exact(q, K, V, (size_t)N, out, lg);
            double t = tu_now_s() - te;
            best = t < best ? t : best;
        }
        free(K);
        free(V);

        /* attach (signatures of every layer) and decode, once per coarse setting */
        double *step = calloc((size_t)steps, sizeof *step);
        printf("bench-decode: %d layer(s) x %d kv heads x %d query heads x head_dim %d, %llu cold tokens, %s records, "
               "top_k %u, shortlist %u x top_k; %d steps; stage-1 threads %d%s\n", layers, H, QH, D,
               (unsigned long long)N, kvarc_format_get(fmt)->name, o.top_k, o.shortlist, steps, threads,
               threads ? "" : " (every CPU)");
        printf("  archive: %.1f s (encode %.1f s, once for all layers)\n", tarch, t_enc);
        printf("  exact full attention, one layer, fp32 in RAM (baseline): %.2f ms; x %d layers = %.2f ms\n", best * 1e3,
               layers, best * 1e3 * layers);
        printf("  appends of %d tokens (one stored extent each)\n", blk);
        for (int run = 0; run < n_coarse * n_fast; run++) {
            int ci = run / n_fast;
            o.coarse_blocks = coarse[ci];
            o.fast_tier = fast[run % n_fast];
            double tl = tu_now_s();
            if (kvarc_conv_attach(cl, "bench", "decode", &m, &o, &cv))
                die("attach", kvarc_client_errmsg(cl));
            double tattach = tu_now_s() - tl;
            float tk[H * D], tv[H * D];
            kvarc_stats s0, s1;
            kvarc_conv_stats(cv, &s0);
            for (int s = 0; s < steps; s++) {
                for (int i = 0; i < QH * D; i++)
                    q[i] = rnd();
                for (int i = 0; i < H * D; i++) {
                    tk[i] = rnd();
                    tv[i] = rnd();
                }
                double ts = tu_now_s();
                for (int l = 0; l < layers; l++)
                    if (kvarc_append(cv, (uint32_t)l, KVARC_DTYPE_F32, tk, tv, 1) ||
                        kvarc_attend(cv, (uint32_t)l, q, 1, out))
                        die("decode", kvarc_errmsg(cv));
                step[s] = tu_now_s() - ts;
            }
            kvarc_conv_stats(cv, &s1);
            qsort(step, (size_t)steps, sizeof *step, tu_cmp_double);
            double p50 = step[steps / 2], p90 = step[steps * 9 / 10];
            if (coarse[ci])
                printf("coarse tier on: stage 1 scans the %u best 64-token blocks of each kv head\n", coarse[ci]);
            else
                printf("coarse tier off: stage 1 scans every cold token\n");
            if (o.fast_tier)
                printf("  fast tier: the client holds block summaries only; stage 1b in kvarcd\n");
            printf("  attach (%s of every layer): %.1f s, %.1f MB received (%.1f B per cold token of the model); "
                   "stage 1 on the %s\n", o.fast_tier ? "summaries" : "signatures and summaries", tattach,
                   (double)s0.bytes_received / 1e6, (double)s0.bytes_received / (double)N,
                   kvarc_uses_gpu(cv) ? "GPU" : "CPU");
            printf("  decode step, all %d layer(s):  p50 %8.2f ms   p90 %8.2f ms\n", layers, p50 * 1e3, p90 * 1e3);
            printf("    by stage (mean per step):    stage 1 %.2f ms, stage 2 (RerankLayer) %.2f ms, decode %.2f ms, "
                   "attention %.2f ms, archive %.2f ms\n", (double)(s1.ns_stage1 - s0.ns_stage1) * 1e-6 / steps,
                   (double)(s1.ns_stage2 - s0.ns_stage2) * 1e-6 / steps,
                   (double)(s1.ns_decode - s0.ns_decode) * 1e-6 / steps,
                   (double)(s1.ns_attend - s0.ns_attend) * 1e-6 / steps,
                   (double)(s1.ns_archive - s0.ns_archive) * 1e-6 / steps);
            printf("  kvarc step / exact attention:  %.3fx   (per layer: kvarc %.2f ms, exact %.2f ms)\n",
                   p50 / (best * layers), p50 * 1e3 / layers, best * 1e3);
            printf("  records fetched per step %.0f, cache hit rate %.0f%%, bytes on the wire per step %.0f KB\n",
                   (double)(s1.records_fetched - s0.records_fetched) / steps,
                   s1.cache_lookups > s0.cache_lookups ? 100.0 * (double)(s1.cache_hits - s0.cache_hits) /
                                                             (double)(s1.cache_lookups - s0.cache_lookups) : 0.0,
                   (double)(s1.bytes_sent - s0.bytes_sent + s1.bytes_received - s0.bytes_received) / steps / 1024);
            fflush(stdout);
            /* the next setting continues the same conversation: fork-free, the appended steps stay */
            kvarc_conv_close(cv);
        }
        free(step);
        free(q);
        free(out);
        free(lg);
        free(kb);
        free(vb);
        free(recs);
        free(bits);
        free(sc);
        free(sbits);
        free(sscale);
        free(sub_recs);
        free(sub_bits);
        free(sub_sc);
        free(sub_ss);
        free(sub_sb);
    }
    kvarc_client_close(cl);
    kd_run_end(&run, "bench-decode");
    return 0;
}
