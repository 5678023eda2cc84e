/* kvarcd_util.h - helpers for tests that run a real kvarcd (header-only).
 * Needs KVARCD_PATH and KVARC_CLI_PATH defined by CMake (the environment
 * variables of the same names override them: a bundle run elsewhere), and engine_util.h's
 * deterministic content (eu_fill / eu_byte) for what is appended.
 *
 * Waiting: every wait_* helper waits for the thing itself (a process
 * exit, a socket, a log line, an answer), polling where there is nothing
 * to block on; its milliseconds are a failure guard in real time
 * (CLOCK_MONOTONIC), generous because CI machines are 3-5x slower than a
 * workstation and an ASan kvarcd starts slower still. */
#ifndef KVARC_KVARCD_UTIL_H
#define KVARC_KVARCD_UTIL_H

#include <errno.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "engine_util.h"
#include "kvarc_rpc.h"

/* The daemon and the CLI: the environment's, else the build's. */
#define KD_KVARCD (getenv("KVARCD_PATH") ? getenv("KVARCD_PATH") : KVARCD_PATH)
#define KD_CLI    (getenv("KVARC_CLI_PATH") ? getenv("KVARC_CLI_PATH") : KVARC_CLI_PATH)

/* Each test uses some of these. */
#define KD_FN static __attribute__((unused))

static char dir[256];

/* Milliseconds on CLOCK_MONOTONIC: deadlines of the waits below. */
KD_FN long kd_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* The pause between two polls of something that cannot be waited on. */
KD_FN void kd_sleep_ms(int ms)
{
    struct timespec d = { ms / 1000, (long)(ms % 1000) * 1000000 };
    nanosleep(&d, NULL);
}

/* kvarcd on dir with 2 threads and a 2 s grace, plus the NULL-terminated
 * extra arguments; stderr appends to dir.log. */
KD_FN pid_t start_daemon_args(const char *const *extra)
{
    pid_t pid = fork();
    if (pid == 0) {
        char log[300];
        const char *argv[32] = { "kvarcd", "--data", dir, "--threads", "2", "--grace-ms", "2000" };
        int n = 7;
        for (int i = 0; extra && extra[i] && n < 31; i++)
            argv[n++] = extra[i];
        argv[n] = NULL;
        snprintf(log, sizeof log, "%s.log", dir);
        if (!freopen(log, "a", stderr))
            _exit(126);
        execv(KD_KVARCD, (char *const *)argv);
        _exit(127);
    }
    return pid;
}

KD_FN pid_t start_daemon(void)
{
    return start_daemon_args(NULL);
}

/* The TCP port of the newest "listening" line in dir.log, waiting up to
 * 30 s for it; 0 if none. */
KD_FN int daemon_tcp_port(void)
{
    char log[300], line[1024];
    snprintf(log, sizeof log, "%s.log", dir);
    for (long end = kd_now_ms() + 30000;;) {
        FILE *f = fopen(log, "r");
        int port = 0;
        while (f && fgets(line, sizeof line, f)) {
            char *t = strstr(line, " tcp=");
            char *colon = t ? strrchr(strtok(t + 5, " "), ':') : NULL;
            if (colon)
                port = atoi(colon + 1);
        }
        if (f)
            fclose(f);
        if (port)
            return port;
        if (kd_now_ms() > end)
            return 0;
        kd_sleep_ms(20);
    }
}

/* Wait for pid to exit (at most ms); its exit code, -2 on a signal, -1 on timeout. */
KD_FN int wait_exit(pid_t pid, int ms)
{
    for (long end = kd_now_ms() + ms;;) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : -2;
        if (kd_now_ms() > end)
            return -1;
        kd_sleep_ms(10);
    }
}

/* Health on c: 1 serving, 0 answered otherwise, -1 no answer within ms. */
KD_FN int kd_health(kvc_conn *c, long ms)
{
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    ProtobufCMessage *rep = NULL;
    char msg[256];
    if (kvc_call(c, "Health", &e.base, &kvarc__v1__health_reply__descriptor, &rep, (int)(ms > 1000 ? ms : 1000),
                 msg, sizeof msg))
        return -1;
    int ok = !strcmp(((Kvarc__V1__HealthReply *)rep)->status, "serving");
    protobuf_c_message_free_unpacked(rep, NULL);
    return ok;
}

/* Wait until the daemon on dir answers, then until c gets an answer: 1
 * when it is "serving" (at most 30 s in all). The daemon is probed first
 * on a fresh connection per try: a gRPC channel that failed to connect
 * (the daemon not up yet, or a stale socket left by a kill -9) backs off
 * 1 s, 1.6 s, 2.6 s... before it tries again, which would keep a c that
 * was not used yet seconds behind a daemon that is ready. Each call may
 * take up to what is left: a slow answer (an ASan daemon still
 * recovering, a loaded machine) is still an answer. */
KD_FN int wait_ready(kvc_conn *c)
{
    char sock[300];
    struct stat st;
    long end = kd_now_ms() + 30000;
    snprintf(sock, sizeof sock, "%s/kvarcd.sock", dir);
    while (stat(sock, &st) && kd_now_ms() < end)
        kd_sleep_ms(20);
    for (;;) {
        kvc_conn *probe;
        int up = 0;
        if (!kvc_connect(dir, &probe)) {
            up = kd_health(probe, end - kd_now_ms()) >= 0;
            kvc_close(probe);
        }
        if (up || kd_now_ms() > end)
            break;
        kd_sleep_ms(20);
    }
    for (;;) {
        int h = kd_health(c, end - kd_now_ms());
        if (h >= 0)
            return h;
        if (kd_now_ms() > end)
            return 0;
        kd_sleep_ms(20);
    }
}

KD_FN Kvarc__V1__Shape shape_pb(uint32_t head_dim)
{
    Kvarc__V1__Shape s = KVARC__V1__SHAPE__INIT;
    s.n_layers = 4;
    s.n_kv_heads = 2;
    s.n_q_heads = 8;
    s.head_dim = head_dim;
    s.format = KVARC_FMT_Q3;
    s.pos_mode = KVARC_POS_REMAPPED;   /* no RoPE here: kind-1 scores, the query as sent */
    s.dtype = KVARC_DTYPE_F16;
    s.rope_theta = 10000.0f;
    s.seed = 42;
    s.fingerprint = "tiny-llama";
    return s;
}

KD_FN int create(kvc_conn *c, const char *ns, const char *name, uint32_t head_dim, char *msg,
                  uint64_t *id)
{
    Kvarc__V1__CreateRequest r = KVARC__V1__CREATE_REQUEST__INIT;
    Kvarc__V1__Shape s = shape_pb(head_dim);
    r.ns = (char *)ns;
    r.name = (char *)name;
    r.shape = &s;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, "Create", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, 256);
    if (!st) {
        if (id)
            *id = ((Kvarc__V1__ConvReply *)rep)->info->id;
        protobuf_c_message_free_unpacked(rep, NULL);
    }
    return st;
}

KD_FN int open_conv(kvc_conn *c, const char *ns, const char *name, Kvarc__V1__Shape *expect, char *msg)
{
    Kvarc__V1__OpenRequest r = KVARC__V1__OPEN_REQUEST__INIT;
    r.ns = (char *)ns;
    r.name = (char *)name;
    r.expect = expect;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, "Open", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, 256);
    if (!st)
        protobuf_c_message_free_unpacked(rep, NULL);
    return st;
}

/* One Append request of count tokens of (tag) at first of layer, in the
 * shape of shape_pb (eu_shape(4, 2, q3): 2 KV heads, 104-byte records);
 * the buffers belong to b until kd_block_free. An AppendMany takes
 * several b.r; an AppendStream sends them one by one. */
typedef struct kd_block {
    Kvarc__V1__AppendRequest r;
    uint8_t *bits, *recs;
    uint16_t *sc;
} kd_block;

KD_FN void kd_block_make(kd_block *b, uint64_t conv, uint32_t layer, uint64_t first, uint32_t count, uint64_t tag)
{
    kvd_shape s = eu_shape(4, 2, KVARC_FMT_Q3);
    size_t n = 2 * (size_t)count;
    b->bits = malloc(n * 16);
    b->recs = malloc(n * 104);
    b->sc = malloc(n * 2);
    if (!b->bits || !b->recs || !b->sc)
        abort();
    eu_fill(&s, tag, layer, first, count, b->bits, b->sc, b->recs);
    Kvarc__V1__AppendRequest r = KVARC__V1__APPEND_REQUEST__INIT;
    r.conv = conv;
    r.layer = layer;
    r.first_pos = first;
    r.count = count;
    r.sig_bits.data = b->bits;
    r.sig_bits.len = n * 16;
    r.sig_scale.data = (uint8_t *)b->sc;
    r.sig_scale.len = n * 2;
    r.records.data = b->recs;
    r.records.len = n * 104;
    b->r = r;
}

KD_FN void kd_block_free(kd_block *b)
{
    free(b->bits);
    free(b->recs);
    free(b->sc);
}

/* Append count tokens of (tag) at first through the service. */
KD_FN int rpc_append(kvc_conn *c, uint64_t conv, uint32_t layer, uint64_t first, uint32_t count,
                      uint64_t tag, int bad_sizes, uint64_t *len_out, char *msg)
{
    kd_block b;
    kd_block_make(&b, conv, layer, first, count, tag);
    if (bad_sizes)
        b.r.sig_scale.len -= 2;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, "Append", &b.r.base, &kvarc__v1__append_reply__descriptor, &rep, 0, msg, 256);
    if (!st) {
        if (len_out)
            *len_out = ((Kvarc__V1__AppendReply *)rep)->length;
        protobuf_c_message_free_unpacked(rep, NULL);
    }
    kd_block_free(&b);
    return st;
}

/* ns/name's id and the durable length of each of its first n layers
 * (missing layers: 0), by Open. The gRPC status; msg: 256 bytes. */
KD_FN int kd_layer_lengths(kvc_conn *c, const char *ns, const char *name, uint64_t *id, uint64_t *len, size_t n,
                           char *msg)
{
    Kvarc__V1__OpenRequest r = KVARC__V1__OPEN_REQUEST__INIT;
    r.ns = (char *)ns;
    r.name = (char *)name;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, "Open", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, 256);
    if (st)
        return st;
    Kvarc__V1__ConvInfo *i = ((Kvarc__V1__ConvReply *)rep)->info;
    if (id)
        *id = i->id;
    for (size_t l = 0; l < n; l++)
        len[l] = l < i->n_layer_lengths ? i->layer_lengths[l] : 0;
    protobuf_c_message_free_unpacked(rep, NULL);
    return 0;
}

/* Fetch positions of (conv, layer, head): the status; on OK *reply (free
 * it with protobuf_c_message_free_unpacked). msg: 256 bytes. */
KD_FN int rpc_fetch(kvc_conn *c, uint64_t conv, uint32_t layer, uint32_t head, uint64_t *pos, size_t n,
                    Kvarc__V1__FetchReply **reply, char *msg)
{
    Kvarc__V1__FetchRequest r = KVARC__V1__FETCH_REQUEST__INIT;
    r.conv = conv;
    r.layer = layer;
    r.head = head;
    r.positions = pos;
    r.n_positions = n;
    return kvc_call(c, "Fetch", &r.base, &kvarc__v1__fetch_reply__descriptor, (ProtobufCMessage **)reply, 0,
                    msg, 256);
}

/* Fetch positions and compare with tag's records; returns the status, or
 * 100 when the bytes differ. */
KD_FN int rpc_fetch_check(kvc_conn *c, uint64_t conv, uint32_t layer, uint32_t head, uint64_t *pos,
                           size_t n, uint64_t tag, char *msg)
{
    Kvarc__V1__FetchReply *f = NULL;
    int st = rpc_fetch(c, conv, layer, head, pos, n, &f, msg);
    if (st)
        return st;
    int bad = f->record_bytes != 104 || f->records.len != n * 104;
    for (size_t i = 0; !bad && i < n; i++)
        for (int b = 0; b < 104; b++)
            bad |= f->records.data[i * 104 + b] != eu_byte(tag, layer, head, pos[i], (size_t)b);
    protobuf_c_message_free_unpacked(&f->base, NULL);
    return bad ? 100 : 0;
}

/* Remove dir and its kvarcd log (a test's last step when it passed;
 * KEEP=1 in the environment keeps them to look at). */
KD_FN void kd_remove_dir(void)
{
    char log[300];
    if (getenv("KEEP"))
        return;
    snprintf(log, sizeof log, "%s.log", dir);
    unlink(log);
    eu_rmrf(dir);
}

/* Run the shell command cmd; its exit code, stdout into out. */
KD_FN int kd_run(char *out, size_t len, const char *cmd)
{
    FILE *f = popen(cmd, "r");
    if (!f)
        return -1;
    size_t n = fread(out, 1, len - 1, f);
    out[n] = 0;
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Run the kvarc CLI against dir; its exit code, stdout into out. */
KD_FN int cli(char *out, size_t len, const char *args)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s %s --data %s 2>/dev/null", KD_CLI, args, dir);
    return kd_run(out, len, cmd);
}

KD_FN int fork_call(kvc_conn *c, const char *method, const char *src, const char *dst, char *msg)
{
    Kvarc__V1__ForkRequest r = KVARC__V1__FORK_REQUEST__INIT;
    r.src_ns = "t";
    r.src_name = (char *)src;
    r.dst_ns = "t";
    r.dst_name = (char *)dst;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, method, &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, 256);
    if (!st)
        protobuf_c_message_free_unpacked(rep, NULL);
    return st;
}

KD_FN long list_all(kvc_conn *c, const char *ns, uint32_t limit, int *pages)
{
    char after[KVD_NS_MAX + KVD_NAME_MAX] = "", msg[256];
    long total = 0;
    *pages = 0;
    for (;;) {
        Kvarc__V1__ListRequest r = KVARC__V1__LIST_REQUEST__INIT;
        r.ns = (char *)ns;
        r.after = after;
        r.limit = limit;
        ProtobufCMessage *rep = NULL;
        if (kvc_call(c, "List", &r.base, &kvarc__v1__list_reply__descriptor, &rep, 0, msg, sizeof msg))
            return -1;
        Kvarc__V1__ListReply *l = (Kvarc__V1__ListReply *)rep;
        total += (long)l->n_convs;
        (*pages)++;
        int more = l->more;
        if (l->n_convs && ns && *ns)
            snprintf(after, sizeof after, "%s", l->convs[l->n_convs - 1]->name);
        else if (l->n_convs)     /* across namespaces a page ends at NS/NAME */
            snprintf(after, sizeof after, "%.63s/%.127s", l->convs[l->n_convs - 1]->ns,
                     l->convs[l->n_convs - 1]->name);
        protobuf_c_message_free_unpacked(rep, NULL);
        if (!more)
            return total;
    }
}

/* Send block b (20 tokens at b x 20, layer 0, content tag) on an
 * AppendStream; with bad, one signature byte short. kvc_stream_send's code. */
KD_FN int stream_block(kvc_stream *st, uint64_t conv, int b, uint64_t tag, int bad)
{
    kvd_shape s = eu_shape(4, 2, KVARC_FMT_Q3);
    uint8_t bits[2 * 20 * 16], recs[2 * 20 * 104];
    uint16_t sc[2 * 20];
    eu_fill(&s, tag, 0, (uint64_t)b * 20, 20, bits, sc, recs);
    Kvarc__V1__AppendRequest r = KVARC__V1__APPEND_REQUEST__INIT;
    r.conv = conv;
    r.first_pos = (uint64_t)b * 20;
    r.count = 20;
    r.sig_bits.data = bits;
    r.sig_bits.len = sizeof bits - (bad ? 1 : 0);
    r.sig_scale.data = (uint8_t *)sc;
    r.sig_scale.len = sizeof sc;
    r.records.data = recs;
    r.records.len = sizeof recs;
    return kvc_stream_send(st, &r.base);
}

/* Close an AppendStream: its status; on OK the durable length and blocks. */
KD_FN int stream_end(kvc_stream *st, uint64_t *len, uint64_t *blocks, char *msg)
{
    ProtobufCMessage *rep = NULL;
    int status = kvc_stream_finish(st, &kvarc__v1__append_reply__descriptor, &rep, msg, 256);
    if (!status) {
        *len = ((Kvarc__V1__AppendReply *)rep)->length;
        *blocks = ((Kvarc__V1__AppendReply *)rep)->blocks;
        protobuf_c_message_free_unpacked(rep, NULL);
    }
    return status;
}

#endif
