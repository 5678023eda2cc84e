/* bench-engine - the storage engine against raw I/O baselines, one run.
 *
 *   bench-engine [--dir DIR] [--tokens N] [--reads N] [--threads T]
 *
 * Shape: one layer, 8 KV heads, head_dim 128, q3 (104-byte records),
 * blocks of 64 tokens (~66 KB each).
 *   append : kvd_append of N tokens, 1 thread then T threads (group
 *            commit), against a raw pwrite + fdatasync of the same block
 *            sizes to a file in the same directory (same durability per op)
 *   read   : N random records of head 0 in batches of 512: kvd_read_records
 *            (index lookup, io_uring, CRC check) against plain pread and raw
 *            io_uring of the same slots, page cache warm and cold (cold:
 *            posix_fadvise DONTNEED on the segment files before each pass)
 *   rerank : kvd_rerank of a 512-position shortlist, top_k 64, per head
 * Ratios are against the baseline of the same run on the same disk. */
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvd_internal.h"

#define HEADS 8
#define D 128
#define BLOCK 64

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what, const kvd_err *err)
{
    fprintf(stderr, "bench-engine: %s: %s\n", what, err ? err->msg : strerror(errno));
    exit(1);
}

typedef struct app_arg {
    kvd_engine *e;
    uint64_t conv;
    uint64_t blocks;
    uint8_t *bits, *recs;
    uint16_t *sc;
} app_arg;

static void *append_thread(void *p)
{
    app_arg *a = p;
    kvd_err err;
    for (uint64_t b = 0; b < a->blocks; b++)
        if (kvd_append(a->e, a->conv, 0, b * BLOCK, BLOCK, a->bits, a->sc, a->recs, &err))
            die("append", &err);
    return NULL;
}

static kvd_conv_info make_conv(kvd_engine *e, const char *name)
{
    kvd_shape s;
    memset(&s, 0, sizeof s);
    s.n_layers = 1;
    s.n_kv_heads = HEADS;
    s.n_q_heads = HEADS * 4;
    s.head_dim = D;
    s.format = KVARC_FMT_Q3;
    s.dtype = KVARC_DTYPE_F16;
    s.rope_theta = 500000.0f;
    s.seed = 7;
    snprintf(s.fingerprint, sizeof s.fingerprint, "bench");
    kvd_conv_info ci;
    kvd_err err;
    if (kvd_conv_create(e, "bench", name, &s, NULL, &ci, &err))
        die("create", &err);
    return ci;
}

static void drop_cache(const char *dir)
{
    char p[4200];
    for (uint64_t id = 1; id < 4096; id++) {
        snprintf(p, sizeof p, "%s/segments/%016llx.seg", dir, (unsigned long long)id);
        int fd = open(p, O_RDONLY);
        if (fd < 0)
            continue;
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    uint64_t tokens = 65536, nreads = 65536;
    int threads = 4;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            tokens = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--reads") && i + 1 < argc)
            nreads = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench-engine [--dir DIR] [--tokens N] [--reads N] [--threads T]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    char tmp[256];
    if (!dir) {
        snprintf(tmp, sizeof tmp, "/var/tmp/kvarc-bench-XXXXXX");
        if (!mkdtemp(tmp))
            die("mkdtemp", NULL);
        dir = tmp;
    }
    if (threads < 1 || threads > 64 || tokens < BLOCK || nreads < 512)
        return 2;
    uint64_t blocks = tokens / BLOCK;
    tokens = blocks * BLOCK;
    int rb = kvarc_record_bytes(KVARC_FMT_Q3, D);
    size_t nrec = (size_t)HEADS * BLOCK;
    uint8_t *bits = malloc(nrec * D / 8), *recs = malloc(nrec * rb);
    uint16_t *sc = malloc(nrec * 2);
    uint64_t st = 1;
    for (size_t i = 0; i < nrec * (size_t)rb; i++)
        recs[i] = (uint8_t)kvarc_splitmix64(&st);
    for (size_t i = 0; i < nrec * D / 8; i++)
        bits[i] = (uint8_t)kvarc_splitmix64(&st);
    for (size_t i = 0; i < nrec; i++)
        sc[i] = kvarc_f32_to_f16(1.0f);
    size_t block_bytes = KVARC_BLOCK_HEADER + kvarc_block_payload_bytes(BLOCK, D, HEADS, (uint32_t)rb);

    kvd_options o = { .dir = dir };
    kvd_engine *e;
    kvd_err err;
    if (kvd_open(&o, &e, &err))
        die("open", &err);
    printf("bench-engine in %s: 1 layer x %d kv heads x head_dim %d, q3 (%d B records), blocks of %d "
           "tokens (%zu B)\n\n", dir, HEADS, D, rb, BLOCK, block_bytes);

    /* ---- append ---- */
    char rawp[4200];
    snprintf(rawp, sizeof rawp, "%s/raw.bench", dir);
    int rfd = open(rawp, O_RDWR | O_CREAT | O_TRUNC, 0600);
    uint8_t *blockbuf = calloc(1, block_bytes);
    double t0 = now();
    for (uint64_t b = 0; b < blocks; b++) {
        if (pwrite(rfd, blockbuf, block_bytes, (off_t)(b * block_bytes)) != (ssize_t)block_bytes || fdatasync(rfd))
            die("raw write", NULL);
    }
    double t_raw = now() - t0;
    close(rfd);
    unlink(rawp);
    kvd_conv_info c1 = make_conv(e, "single");
    app_arg a1 = { e, c1.id, blocks, bits, recs, sc };
    t0 = now();
    append_thread(&a1);
    double t_one = now() - t0;
    app_arg *as = calloc((size_t)threads, sizeof *as);
    pthread_t *th = calloc((size_t)threads, sizeof *th);
    kvd_stats s0, s1;
    kvd_stats_get(e, &s0, &err);
    for (int i = 0; i < threads; i++) {
        char name[24];
        snprintf(name, sizeof name, "multi%d", i);
        kvd_conv_info ci = make_conv(e, name);
        as[i] = (app_arg){ e, ci.id, blocks / (uint64_t)threads, bits, recs, sc };
    }
    t0 = now();
    for (int i = 0; i < threads; i++)
        pthread_create(&th[i], NULL, append_thread, &as[i]);
    for (int i = 0; i < threads; i++)
        pthread_join(th[i], NULL);
    double t_multi = now() - t0;
    kvd_stats_get(e, &s1, &err);
    uint64_t mblocks = (blocks / (uint64_t)threads) * (uint64_t)threads;
    double recs_total = (double)tokens * HEADS;
    printf("durable append (%llu blocks, %.1f MB)        records/s      MB/s   vs raw\n",
           (unsigned long long)blocks, blocks * (double)block_bytes / 1e6);
    printf("  raw pwrite + fdatasync per block        %12.0f %9.1f   1.000x\n", recs_total / t_raw,
           blocks * (double)block_bytes / t_raw / 1e6);
    printf("  kvd_append, 1 thread                    %12.0f %9.1f   %.3fx\n", recs_total / t_one,
           blocks * (double)block_bytes / t_one / 1e6, t_raw / t_one);
    double rm = (double)mblocks / blocks;
    printf("  kvd_append, %d threads (group commit)    %12.0f %9.1f   %.3fx  (%.2f blocks per commit)\n",
           threads, recs_total * rm / t_multi, mblocks * (double)block_bytes / t_multi / 1e6,
           (t_raw * rm) / t_multi, (double)(s1.appends - s0.appends) / (double)(s1.group_commits - s0.group_commits));

    /* ---- random reads ---- */
    kvd_reader *r;
    if (kvd_reader_open(e, &r, &err))
        die("reader", &err);
    uint64_t *pos = malloc(nreads * sizeof *pos);
    for (uint64_t i = 0; i < nreads; i++)
        pos[i] = kvarc_splitmix64(&st) % tokens;
    uint8_t *out = malloc(512 * (size_t)rb), *slots = malloc(512 * (size_t)(rb + 4));
    /* the slots' (fd, offset), resolved once for the baselines */
    int *fds = malloc(nreads * sizeof *fds);
    uint64_t *offs = malloc(nreads * sizeof *offs);
    MDB_txn *txn;
    mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn);
    for (uint64_t i = 0; i < nreads; i++) {
        uint64_t owner, first;
        extent_val ev;
        if (extent_resolve(e, txn, c1.id, 0, pos[i], &owner, &first, &ev, NULL))
            die("resolve", NULL);
        kvarc_block_header h = { .head_dim = D, .n_heads = HEADS, .count = ev.count, .rec_bytes = (uint32_t)rb };
        fds[i] = seg_pin(e, ev.seg);
        offs[i] = ev.off + kvarc_block_slot_offset(&h, 0, (uint32_t)(pos[i] - first));
    }
    mdb_txn_abort(txn);
    struct io_uring ring;
    io_uring_queue_init(512, &ring, 0);
    printf("\nrandom record reads (%llu reads of head 0, batches of 512)   records/s   vs pread\n",
           (unsigned long long)nreads);
    for (int cold = 0; cold < 2; cold++) {
        double tp = 0, tu = 0, tk = 0;
        for (int pass = 0; pass < 3; pass++) {
            int which = (pass + cold) % 3;   /* rotate order so none always runs first */
            for (int m = 0; m < 3; m++) {
                int k = (which + m) % 3;
                if (cold)
                    drop_cache(dir);
                t0 = now();
                for (uint64_t b = 0; b < nreads; b += 512) {
                    uint64_t n = nreads - b < 512 ? nreads - b : 512;
                    if (k == 0) {
                        for (uint64_t i = 0; i < n; i++)
                            if (pread(fds[b + i], slots + i * (rb + 4), (size_t)rb + 4, (off_t)offs[b + i]) != rb + 4)
                                die("pread", NULL);
                    } else if (k == 1) {
                        for (uint64_t i = 0; i < n; i++) {
                            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
                            io_uring_prep_read(sqe, fds[b + i], slots + i * (rb + 4), (unsigned)rb + 4, offs[b + i]);
                        }
                        io_uring_submit_and_wait(&ring, (unsigned)n);
                        struct io_uring_cqe *cqe;
                        unsigned head, seen = 0;
                        io_uring_for_each_cqe(&ring, head, cqe) seen++;
                        io_uring_cq_advance(&ring, seen);
                        while (seen < n) {
                            io_uring_wait_cqe(&ring, &cqe);
                            io_uring_cqe_seen(&ring, cqe);
                            seen++;
                        }
                    } else if (kvd_read_records(r, c1.id, 0, 0, pos + b, n, out, &err)) {
                        die("read_records", &err);
                    }
                }
                double dt = now() - t0;
                double *slot = k == 0 ? &tp : k == 1 ? &tu : &tk;
                if (pass == 0 || dt < *slot)
                    *slot = dt;
            }
        }
        const char *w = cold ? "cold" : "warm";
        printf("  %s  plain pread of the slots                      %12.0f   1.000x\n", w, nreads / tp);
        printf("  %s  raw io_uring of the slots                     %12.0f   %.3fx\n", w, nreads / tu, tp / tu);
        printf("  %s  kvd_read_records (index + io_uring + CRC)     %12.0f   %.3fx\n", w, nreads / tk, tp / tk);
    }

    /* ---- rerank ---- */
    float q[4 * D];
    for (int i = 0; i < 4 * D; i++)
        q[i] = (float)((int)(kvarc_splitmix64(&st) % 2001) - 1000) / 1000.0f;
    uint64_t sl[512], best[64];
    double tr = 1e30;
    for (int rep = 0; rep < 200; rep++) {
        for (int i = 0; i < 512; i++)
            sl[i] = kvarc_splitmix64(&st) % tokens;
        t0 = now();
        long got = kvd_rerank(r, c1.id, 0, (uint32_t)(rep % HEADS), q, 4, sl, 512, 64, best, NULL, NULL, &err);
        double dt = now() - t0;
        if (got != 64)
            die("rerank", &err);
        if (dt < tr)
            tr = dt;
    }
    double t_rd = 1e30;
    for (int rep = 0; rep < 200; rep++) {
        t0 = now();
        if (kvd_read_records(r, c1.id, 0, 0, pos + (uint64_t)rep % (nreads / 512) * 512, 512, out, &err))
            die("read", &err);
        double dt = now() - t0;
        if (dt < t_rd)
            t_rd = dt;
    }
    printf("\nrerank of a 512-position shortlist, GQA group of 4, top_k 64 (warm, best of 200)\n");
    printf("  kvd_read_records of 512 (the I/O part)   %8.1f us\n", t_rd * 1e6);
    printf("  kvd_rerank                               %8.1f us  (%.2fx the read alone)\n", tr * 1e6, tr / t_rd);

    io_uring_queue_exit(&ring);
    kvd_reader_close(r);
    kvd_close(e);
    if (dir == tmp) {
        char cmd[512];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd))
            fprintf(stderr, "bench-engine: could not remove %s\n", tmp);
    }
    return 0;
}
