/* bench-rpc - what the gRPC hop costs: kvarcd on a unix socket against the
 * same engine calls made in-process, one run.
 *
 *   bench-rpc [--kvarcd PATH] [--tokens N] [--steps S]   (default: the kvarcd of this build)
 *
 * Both sides hold the same data (1 layer, 8 KV heads, head_dim 128, q3,
 * N tokens appended in 64-token blocks): the daemon in its own directory,
 * the in-process engine in another.
 *   append : blocks/s through Append RPCs against kvd_append in-process
 *   rerank : one decode step = 8 Rerank calls (one per KV head), shortlist
 *            512, top_k 64, GQA group of 4; p50/p99 over S steps, against
 *            kvd_rerank in-process on the same shortlists. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "kvarc_rpc.h"
#include "kvd.h"

#define HEADS 8
#define D 128
#define BLOCK 64

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void die(const char *what, const char *msg)
{
    fprintf(stderr, "bench-rpc: %s: %s\n", what, msg);
    exit(1);
}

int main(int argc, char **argv)
{
    const char *kvarcd = NULL;
    uint64_t tokens = 131072;
    int steps = 300;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--kvarcd") && i + 1 < argc)
            kvarcd = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            tokens = strtoull(argv[++i], NULL, 10) / BLOCK * BLOCK;
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench-rpc [--kvarcd PATH] [--tokens N] [--steps S]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    if (tokens < 1024 || steps < 10)
        die("usage", "--tokens >= 1024, --steps >= 10");
    char ddir[] = "/var/tmp/kvarc-rpcd-XXXXXX", edir[] = "/var/tmp/kvarc-rpce-XXXXXX", kbuf[4096];
    if (!mkdtemp(ddir) || !mkdtemp(edir))
        die("mkdtemp", strerror(errno));
    kvarcd = kd_find_kvarcd(kvarcd, kbuf, sizeof kbuf);
    pid_t pid;
    char msg[512];
    if (kd_spawn(kvarcd, ddir, NULL, &pid, msg, sizeof msg))
        die("kvarcd", msg);
    kvc_conn *k;
    if (kvc_connect(ddir, &k))
        die("connect", ddir);
    kvd_options o = { .dir = edir };
    kvd_engine *e;
    kvd_err err;
    if (kvd_open(&o, &e, &err))
        die("open", err.msg);

    kvd_shape s;
    memset(&s, 0, sizeof s);
    s.n_layers = 1;
    s.n_kv_heads = HEADS;
    s.n_q_heads = 4 * HEADS;
    s.head_dim = D;
    s.format = KVARC_FMT_Q3;
    s.pos_mode = KVARC_POS_REMAPPED;
    s.dtype = KVARC_DTYPE_F16;
    s.rope_theta = 500000.0f;
    s.seed = 3;
    snprintf(s.fingerprint, sizeof s.fingerprint, "bench");
    kvd_conv_info ci;
    if (kvd_conv_create(e, "b", "c", &s, NULL, &ci, &err))
        die("create", err.msg);
    Kvarc__V1__CreateRequest cr = KVARC__V1__CREATE_REQUEST__INIT;
    Kvarc__V1__Shape sp = KVARC__V1__SHAPE__INIT;
    sp.n_layers = 1;
    sp.n_kv_heads = HEADS;
    sp.n_q_heads = 4 * HEADS;
    sp.head_dim = D;
    sp.format = KVARC_FMT_Q3;
    sp.pos_mode = KVARC_POS_REMAPPED;       /* no RoPE here: kind 1 */
    sp.dtype = KVARC_DTYPE_F16;
    sp.rope_theta = 500000.0f;
    sp.seed = 3;
    sp.fingerprint = "bench";
    cr.ns = "b";
    cr.name = "c";
    cr.shape = &sp;
    ProtobufCMessage *rep = NULL;
    if (kvc_call(k, "Create", &cr.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg))
        die("Create", msg);
    uint64_t rid = ((Kvarc__V1__ConvReply *)rep)->info->id;
    protobuf_c_message_free_unpacked(rep, NULL);

    /* the same block contents on both sides: real q3 records of random keys */
    size_t n = (size_t)HEADS * BLOCK;
    uint8_t *bits = malloc(n * D / 8), *recs = malloc(n * 104);
    uint16_t *sc = malloc(n * 2);
    uint64_t st = 11;
    for (size_t i = 0; i < n * 104; i++)
        recs[i] = (uint8_t)kvarc_splitmix64(&st);
    for (size_t i = 0; i < n; i++) {
        float f = 0.05f + (float)(i % 7) * 0.01f;   /* finite scales */
        memcpy(recs + i * 104, &f, 4);
        memcpy(recs + i * 104 + 52, &f, 4);
        sc[i] = kvarc_f32_to_f16(1.0f);
    }
    for (size_t i = 0; i < n * D / 8; i++)
        bits[i] = (uint8_t)kvarc_splitmix64(&st);
    uint64_t blocks = tokens / BLOCK;
    double t0 = now();
    for (uint64_t b = 0; b < blocks; b++)
        if (kvd_append(e, ci.id, 0, b * BLOCK, BLOCK, bits, sc, recs, &err))
            die("append", err.msg);
    double t_eng = now() - t0;
    Kvarc__V1__AppendRequest ar = KVARC__V1__APPEND_REQUEST__INIT;
    ar.conv = rid;
    ar.count = BLOCK;
    ar.sig_bits.data = bits;
    ar.sig_bits.len = n * D / 8;
    ar.sig_scale.data = (uint8_t *)sc;
    ar.sig_scale.len = n * 2;
    ar.records.data = recs;
    ar.records.len = n * 104;
    t0 = now();
    for (uint64_t b = 0; b < blocks; b++) {
        ar.first_pos = b * BLOCK;
        if (kvc_call(k, "Append", &ar.base, &kvarc__v1__append_reply__descriptor, NULL, 0, msg, sizeof msg))
            die("Append", msg);
    }
    double t_rpc = now() - t0;
    printf("bench-rpc: %llu tokens x %d kv heads, head_dim %d, q3; kvarcd on a unix socket vs the engine "
           "in-process\n\n", (unsigned long long)tokens, HEADS, D);
    printf("append, 1 client, blocks of %d tokens (%zu KB)   blocks/s   vs engine\n", BLOCK, n * 122 / 1000);
    printf("  engine in-process (baseline)                 %9.0f   1.000x\n", blocks / t_eng);
    printf("  Append RPC                                   %9.0f   %.3fx\n", blocks / t_rpc, t_eng / t_rpc);

    kvd_reader *r;
    if (kvd_reader_open(e, &r, &err))
        die("reader", err.msg);
    float q[4 * D];
    for (int i = 0; i < 4 * D; i++)
        q[i] = (float)((int)(kvarc_splitmix64(&st) % 2001) - 1000) / 1000.0f;
    uint64_t sl[512], pos[64];
    double *lat_rpc = malloc((size_t)steps * sizeof(double)), *lat_eng = malloc((size_t)steps * sizeof(double));
    Kvarc__V1__RerankRequest rr = KVARC__V1__RERANK_REQUEST__INIT;
    rr.conv = rid;
    rr.n_queries = 4;
    rr.query = q;
    rr.n_query = 4 * D;
    rr.shortlist = sl;
    rr.n_shortlist = 512;
    rr.top_k = 64;
    for (int step = 0; step < steps; step++) {
        for (int i = 0; i < 512; i++)
            sl[i] = kvarc_splitmix64(&st) % tokens;
        t0 = now();
        for (uint32_t h = 0; h < HEADS; h++) {
            rr.head = h;
            if (kvc_call(k, "Rerank", &rr.base, &kvarc__v1__rerank_reply__descriptor, &rep, 0, msg, sizeof msg))
                die("Rerank", msg);
            protobuf_c_message_free_unpacked(rep, NULL);
        }
        lat_rpc[step] = now() - t0;
        t0 = now();
        for (uint32_t h = 0; h < HEADS; h++)
            if (kvd_rerank(r, ci.id, 0, h, q, 4, sl, 512, 64, pos, NULL, NULL, &err) != 64)
                die("kvd_rerank", err.msg);
        lat_eng[step] = now() - t0;
    }
    qsort(lat_rpc, (size_t)steps, sizeof(double), cmp_d);
    qsort(lat_eng, (size_t)steps, sizeof(double), cmp_d);
    int p50 = steps / 2, p99 = steps * 99 / 100;
    printf("\nrerank, one decode step = %d heads x (shortlist 512 -> top_k 64, GQA 4), %d steps\n", HEADS, steps);
    printf("                                   p50 ms    p99 ms\n");
    printf("  engine in-process (baseline)   %7.3f   %7.3f\n", lat_eng[p50] * 1e3, lat_eng[p99] * 1e3);
    printf("  Rerank RPCs over the socket    %7.3f   %7.3f   (p50 %.2fx the engine)\n", lat_rpc[p50] * 1e3,
           lat_rpc[p99] * 1e3, lat_rpc[p50] / lat_eng[p50]);
    kvd_reader_close(r);
    kvd_close(e);
    kvc_close(k);
    if (kd_stop(pid))
        fprintf(stderr, "bench-rpc: kvarcd did not exit cleanly\n");
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", ddir, edir);
    if (system(cmd))
        fprintf(stderr, "bench-rpc: could not remove the temporary directories\n");
    free(bits); free(recs); free(sc); free(lat_rpc); free(lat_eng);
    return 0;
}
