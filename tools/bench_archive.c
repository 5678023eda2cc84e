/* bench-archive - archiving through libkvarc and kvarcd (encode + durable
 * Append) against the raw disk, one run.
 *
 *   bench-archive [--kvarcd PATH] [--layers L] [--tokens N] [--writers W] [--together 0,1,2]
 *
 * Model: L layers (default 8) x 8 KV heads x 32 query heads x head_dim 128,
 * RoPE on every dimension (theta 500000), true positions, q3, batch 64:
 * the Llama-3-8B shape's attention, L of its 32 layers. W writers (default
 * 2: the VM's cores), each a thread with its own libkvarc client and
 * conversation, append N tokens (default 16384) to every layer, 64 a call
 * (kvarc_append: the ring, then an encode and one durable Append per layer
 * and batch, or with --together 1 (kvarc_options.append_together) one
 * AppendMany of every layer's batch when the last layer fills it), then
 * kvarc_conv_sync. kvarcd runs on a unix socket on the same cores, its
 * data directory on the benchmark's disk. --together 2: the same
 * AppendMany, in flight while the writer encodes its next batch
 * (append_together = 2). Default: 0, 1 and 2, one after the other, each
 * with fresh conversations.
 * Baseline, same run, same directory: one pwrite + fdatasync per block of
 * the bytes one Append stores (64 tokens x 8 heads x (a 104-byte record +
 * an 18-byte signature) + the block summaries), as many blocks as the
 * writers append, on one thread. Figures: tokens/s of the 8B shape
 * (the rate x L / 32), MB/s of what the Appends carry, and that rate
 * against the raw rate.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon.h"
#include "kvarc.h"
#include "toolutil.h"

#define H 8
#define QH 32
#define D 128
#define BATCH 64
#define WRITERS_MAX 16

static kd_run run;            /* the daemon and its directory, removed on the way out */

static void die(const char *what, const char *msg)
{
    fprintf(stderr, "bench-archive: %s: %s\n", what, msg);
    kd_run_end(&run, "bench-archive");
    exit(1);
}

typedef struct writer {
    int            id, layers, together;
    uint64_t       tokens;
    const float   *k, *v;        /* [BATCH][H][D] token-major per call: [H][BATCH][D] as kvarc_append takes */
    double         seconds;
    kvarc_stats    st;
    char           err[512];
} writer;

static void *write_main(void *arg)
{
    writer *w = arg;
    kvarc_client *cl;
    kvarc_conv *cv;
    kvarc_model m = { (uint32_t)w->layers, H, QH, D, KVARC_DTYPE_F32, 500000.0f, D, 0, "bench-archive" };
    kvarc_options o;
    kvarc_options_default(&o);
    o.append_together = w->together;
    char name[32];
    snprintf(name, sizeof name, "w%d-%d", w->id, w->together);
    if (kvarc_client_open(run.dir, NULL, NULL, &cl)) {
        snprintf(w->err, sizeof w->err, "connect to %s", run.dir);
        return NULL;
    }
    if (kvarc_conv_create(cl, "bench", name, &m, &o, NULL, &cv)) {
        snprintf(w->err, sizeof w->err, "create: %s", kvarc_client_errmsg(cl));
        kvarc_client_close(cl);
        return NULL;
    }
    double t0 = tu_now_s();
    for (uint64_t p = 0; p < w->tokens && !w->err[0]; p += BATCH)
        for (int l = 0; l < w->layers; l++)
            if (kvarc_append(cv, (uint32_t)l, KVARC_DTYPE_F32, w->k, w->v, BATCH)) {
                snprintf(w->err, sizeof w->err, "append: %s", kvarc_errmsg(cv));
                break;
            }
    if (!w->err[0] && kvarc_conv_sync(cv))
        snprintf(w->err, sizeof w->err, "sync: %s", kvarc_errmsg(cv));
    w->seconds = tu_now_s() - t0;
    kvarc_conv_stats(cv, &w->st);
    kvarc_conv_close(cv);
    kvarc_client_close(cl);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *kvarcd = NULL;
    int layers = 8, writers = 2, tg[3] = { 0, 1, 2 }, ntg = 3;
    uint64_t tokens = 16384;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--kvarcd") && i + 1 < argc)
            kvarcd = argv[++i];
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc)
            layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            tokens = strtoull(argv[++i], NULL, 10) / BATCH * BATCH;
        else if (!strcmp(argv[i], "--writers") && i + 1 < argc)
            writers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--together") && i + 1 < argc) {
            const char *f = argv[++i];             /* a list of 0, 1, 2 */
            ntg = 0;
            for (const char *c = f; *c; c += c[1] == ',' ? 2 : 1) {
                if (*c < '0' || *c > '2' || ntg == 3 || (c[1] && c[1] != ','))
                    die("usage", "--together takes a list of 0, 1 and 2 (e.g. 0,1,2)");
                tg[ntg++] = *c - '0';
            }
            if (!ntg)
                die("usage", "--together takes a list of 0, 1 and 2 (e.g. 0,1,2)");
        }
        else {
            fprintf(stderr, "usage: bench-archive [--kvarcd PATH] [--layers L] [--tokens N] [--writers W] "
                            "[--together 0,1,2]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    if (layers < 1 || layers > 128 || tokens < BATCH || writers < 1 || writers > WRITERS_MAX)
        die("usage", "--layers 1..128, --tokens >= 64, --writers 1..16");
    char dir[] = "/var/tmp/kvarc-archive-XXXXXX", kbuf[1024], msg[512];
    if (!mkdtemp(dir))
        die("mkdtemp", strerror(errno));
    snprintf(run.dir, sizeof run.dir, "%s", dir);

    /* the baseline first, in the same directory: what one Append stores, per block */
    const size_t rb = (size_t)kvarc_record_bytes(KVARC_FMT_Q3, D), sb = D / 8 + 2;
    const size_t block = (size_t)BATCH * H * (rb + sb) + (size_t)H * (BATCH / 64) * KVARC_SUM_ITEMS * sb;
    const uint64_t blocks = (uint64_t)writers * (uint64_t)layers * (tokens / BATCH);
    uint8_t *buf = malloc(block);
    if (!buf)
        die("memory", "out of memory");
    for (size_t i = 0; i < block; i++)
        buf[i] = (uint8_t)(i * 131 + 7);
    char rawp[128];
    snprintf(rawp, sizeof rawp, "%s/raw.bench", dir);
    int fd = open(rawp, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        die("raw file", strerror(errno));
    double t0 = tu_now_s();
    for (uint64_t b = 0; b < blocks; b++)
        if (pwrite(fd, buf, block, (off_t)(b * block)) != (ssize_t)block || fdatasync(fd))
            die("raw write", strerror(errno));
    double t_raw = tu_now_s() - t0;
    close(fd);
    unlink(rawp);
    free(buf);

    pid_t pid;
    if (kd_spawn(kd_find_kvarcd(kvarcd, kbuf, sizeof kbuf), dir, NULL, &pid, msg, sizeof msg))
        die("kvarcd", msg);
    run.pid = pid;
    /* one batch of K and V, [H][BATCH][D], roughly N(0, 1): what each call appends (the encode does
     * not get cheaper for repeated input) */
    float *k = malloc(sizeof(float) * H * BATCH * D), *v = malloc(sizeof(float) * H * BATCH * D);
    if (!k || !v)
        die("memory", "out of memory");
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < (size_t)H * BATCH * D; i++) {
        double a = (double)(kvarc_splitmix64(&s) >> 11) / 9007199254740992.0;
        double c = (double)(kvarc_splitmix64(&s) >> 11) / 9007199254740992.0;
        k[i] = (float)((a + c - 1.0) * 2.4);
        v[i] = (float)((c - a) * 2.4);
    }
    double toks = (double)writers * (double)tokens, mb = (double)blocks * (double)block / 1e6;
    printf("bench-archive: %d writer(s) x %llu tokens x %d layers x %d kv heads x head_dim %d, q3, batch %d; "
           "kvarcd on a unix socket, data in %s\n", writers, (unsigned long long)tokens, layers, H, D, BATCH, dir);
    printf("  what                                        tokens/s (8B shape)      MB/s   vs raw\n");
    printf("  raw pwrite + fdatasync per Append's bytes    %20s %9.1f   1.000x   (%llu blocks of %zu B)\n", "-",
           mb / t_raw, (unsigned long long)blocks, block);
    for (int run = 0; run < ntg; run++) {
        writer w[WRITERS_MAX];
        pthread_t th[WRITERS_MAX];
        for (int i = 0; i < writers; i++)
            w[i] = (writer){ .id = i, .layers = layers, .together = tg[run], .tokens = tokens, .k = k, .v = v };
        t0 = tu_now_s();
        for (int i = 0; i < writers; i++)
            if (pthread_create(&th[i], NULL, write_main, &w[i]))
                die("thread", strerror(errno));
        for (int i = 0; i < writers; i++)
            pthread_join(th[i], NULL);
        double t_all = tu_now_s() - t0, ns_archive = 0;
        for (int i = 0; i < writers; i++) {
            if (w[i].err[0])
                die("writer", w[i].err);
            ns_archive += (double)w[i].st.ns_archive;
        }
        static const char *what[] = { "an Append per layer (0)", "layers together (1)", "together, pipelined (2)" };
        printf("  libkvarc -> kvarcd, %-24s %14.0f %9.1f   %.3fx\n", what[tg[run]], toks / t_all * layers / 32.0,
               mb / t_all, t_raw / t_all);
        printf("    (archiving time inside libkvarc, all writers: %.2f s of %.2f s wall; %.2f us per record)\n",
               ns_archive * 1e-9, t_all, ns_archive * 1e-3 / (toks * layers * H));
        fflush(stdout);
    }
    free(k);
    free(v);
    kd_run_end(&run, "bench-archive");
    return 0;
}
