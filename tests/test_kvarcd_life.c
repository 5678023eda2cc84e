/* test_kvarcd_life: kvarcd's life cycle under load.
 *  1. kill -9 during streams of appends: writer processes (unary Append,
 *     and AppendStream) run flat out; the daemon is SIGKILLed under them,
 *     restarted; every acknowledged append is there, every layer's length
 *     is a whole number of blocks, and the bytes are exact.
 *  2. graceful shutdown with calls in flight: a stream open at SIGTERM
 *     may keep sending within the grace period and gets its reply; new
 *     connections are refused meanwhile; the daemon exits 0.
 *  3. a stream left idle past a short grace period is cancelled, the
 *     daemon still exits 0, and the blocks it had received are durable.
 * Every step waits for what it needs (acknowledgements read from the
 * writers' pipes, lengths the daemon reports, a refusal, an exit), never for
 * a time; the milliseconds below are failure guards only. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>

#include "kvarcd_util.h"

#define BLOCK 20

static uint64_t layer0_length(kvc_conn *c, uint64_t id)
{
    Kvarc__V1__StatRequest r = KVARC__V1__STAT_REQUEST__INIT;
    r.id = id;
    ProtobufCMessage *rep = NULL;
    char msg[256];
    uint64_t len = UINT64_MAX;
    if (!kvc_call(c, "Stat", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg)) {
        Kvarc__V1__ConvInfo *i = ((Kvarc__V1__ConvReply *)rep)->info;
        if (i->n_layer_lengths)
            len = i->layer_lengths[0];
        protobuf_c_message_free_unpacked(rep, NULL);
    }
    return len;
}

/* Check every record of layer 0 below len against tag, 60 positions a call. */
static int check_layer(kvc_conn *c, uint64_t id, uint64_t len, uint64_t tag)
{
    char msg[256];
    uint64_t pos[60];
    for (uint64_t p = 0; p < len; p += 60) {
        size_t n = 0;
        for (uint64_t q = p; q < len && n < 60; q++)
            pos[n++] = q;
        for (uint32_t h = 0; h < 2; h++)
            if (rpc_fetch_check(c, id, 0, h, pos, n, tag, msg))
                return -1;
    }
    return 0;
}

/* Writer process: appends blocks to conversation `id` until killed or the
 * daemon goes away; after each acknowledged block it writes the acked
 * length (8 bytes) to fd 3. mode 0: unary Append; 1: one AppendStream per
 * 5 blocks (acknowledged when the stream's reply arrives). */
static int writer_main(int mode, uint64_t id, uint64_t tag)
{
    kvc_conn *c;
    char msg[256];
    if (kvc_connect(dir, &c))
        return 2;
    for (int b = 0; b < 100000;) {
        uint64_t len = 0, blocks = 0;
        if (mode == 0) {
            if (rpc_append(c, id, 0, (uint64_t)b * BLOCK, BLOCK, tag, 0, &len, msg))
                break;
            b++;
        } else {
            kvc_stream *st;
            if (kvc_stream_open(c, "AppendStream", 30000, &st))   /* a guard: 5 blocks */
                break;
            int sent = 0;
            for (; sent < 5 && !stream_block(st, id, b + sent, tag, 0); sent++)
                ;
            if (stream_end(st, &len, &blocks, msg))
                break;
            b += sent;
        }
        if (write(3, &len, sizeof len) != sizeof len)
            break;
    }
    kvc_close(c);
    return 0;
}

static pid_t spawn_writer(const char *self, int mode, uint64_t id, uint64_t tag, int *rfd)
{
    int p[2];
    if (pipe(p))
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 3);
        char m[8], i[24], t[24];
        snprintf(m, sizeof m, "%d", mode);
        snprintf(i, sizeof i, "%llu", (unsigned long long)id);
        snprintf(t, sizeof t, "%llu", (unsigned long long)tag);
        execl(self, self, "--writer", m, i, t, dir, (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    *rfd = p[0];
    return pid;
}

/* The last length a writer acknowledged: *last updated from its pipe to
 * the end (the writer has exited). */
static void read_acked(int fd, uint64_t *last)
{
    uint64_t v;
    while (read(fd, &v, sizeof v) == sizeof v)
        *last = v;
    close(fd);
}

/* Wait until writer i has acknowledged at least want[i] tokens (or ms
 * pass), keeping the lengths read in acked[]. A fixed sleep is not enough:
 * on a loaded machine (CI runs the suite in parallel) two writers starting
 * up may not get an append through in 700 ms. 0 when both got there. */
static int wait_acked(const int fd[2], uint64_t acked[2], const uint64_t want[2], int ms)
{
    long end = kd_now_ms() + ms;
    for (;;) {
        if (acked[0] >= want[0] && acked[1] >= want[1])
            return 0;
        int left = (int)(end - kd_now_ms());
        if (left <= 0)
            return -1;
        struct pollfd pf[2] = { { fd[0], POLLIN, 0 }, { fd[1], POLLIN, 0 } };
        if (poll(pf, 2, left) < 0 && errno != EINTR)
            return -1;
        for (int i = 0; i < 2; i++) {
            if (pf[i].revents & POLLIN) {
                uint64_t v;
                if (read(fd[i], &v, sizeof v) == sizeof v)
                    acked[i] = v;
            } else if (pf[i].revents & (POLLHUP | POLLERR)) {
                return -1;      /* a writer ended before the daemon was killed */
            }
        }
    }
}

/* For up to ms (of real time), open a new connection and call Health
 * until the daemon refuses it (UNAVAILABLE: it no longer accepts); 0 once
 * it does. A timeout or any other status is not taken for a refusal. */
static int wait_refused(int ms)
{
    char msg[256];
    long end = kd_now_ms() + ms;
    for (;;) {
        kvc_conn *late;
        if (!kvc_connect(dir, &late)) {
            Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
            ProtobufCMessage *rep = NULL;
            int st = kvc_call(late, "Health", &e.base, &kvarc__v1__health_reply__descriptor, &rep, 2000, msg,
                              sizeof msg);
            if (rep)
                protobuf_c_message_free_unpacked(rep, NULL);
            kvc_close(late);
            if (st == GRPC_STATUS_UNAVAILABLE)
                return 0;
        }
        if (kd_now_ms() > end)
            return -1;
        kd_sleep_ms(50);
    }
}

/* Wait (at most ms) until the daemon reports layer 0 of id at want tokens,
 * asked on a connection of its own; 0 once it does. A stream's blocks are
 * appended as they arrive, so this is how a test knows the daemon has
 * them. */
static int wait_length(uint64_t id, uint64_t want, int ms)
{
    kvc_conn *probe;
    if (kvc_connect(dir, &probe))
        return -1;
    long end = kd_now_ms() + ms;
    int rc = 0;
    while (layer0_length(probe, id) != want) {
        if (kd_now_ms() > end) {
            rc = -1;
            break;
        }
        kd_sleep_ms(20);
    }
    kvc_close(probe);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "--writer")) {
        snprintf(dir, sizeof dir, "%s", argv[5]);
        return writer_main(atoi(argv[2]), strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10));
    }
    eu_tmpdir(dir, sizeof dir, "kvarcd-life");
    char msg[256];
    kvc_conn *c;

    /* 1. kill -9 under two writers */
    pid_t pid = start_daemon();
    CHECK_RC(kvc_connect(dir, &c), 0);
    CHECK(wait_ready(c), "kvarcd ready");
    uint64_t unary = 0, streamed = 0;
    CHECK_RC(create(c, "life", "unary", 128, msg, &unary), 0);
    CHECK_RC(create(c, "life", "streamed", 128, msg, &streamed), 0);
    kvc_close(c);
    if (tu_failures) {
        kill(pid, SIGKILL);
        return tu_finish("test_kvarcd_life");
    }
    int fd_u, fd_s;
    pid_t wu = spawn_writer(argv[0], 0, unary, 11, &fd_u), ws = spawn_writer(argv[0], 1, streamed, 12, &fd_s);
    int fds[2] = { fd_u, fd_s };
    uint64_t acked[2] = { 0, 0 };
    /* kill once both have appends through, and each has had one more
     * acknowledged since: both are still writing */
    uint64_t want[2] = { 3 * BLOCK, 3 * BLOCK };
    CHECK(wait_acked(fds, acked, want, 30000) == 0, "both writers had 3 blocks acknowledged within 30 s (%llu, %llu)",
          (unsigned long long)acked[0], (unsigned long long)acked[1]);
    want[0] = acked[0] + 1;
    want[1] = acked[1] + 1;
    CHECK(wait_acked(fds, acked, want, 30000) == 0, "both writers had one more append acknowledged (%llu, %llu)",
          (unsigned long long)acked[0], (unsigned long long)acked[1]);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    CHECK(wait_exit(wu, 20000) == 0 && wait_exit(ws, 20000) == 0, "writers end when the daemon dies");
    read_acked(fd_u, &acked[0]);
    read_acked(fd_s, &acked[1]);
    uint64_t acked_u = acked[0], acked_s = acked[1];
    CHECK(acked_u > 0 && acked_s > 0, "both writers had appends acknowledged (%llu, %llu)",
          (unsigned long long)acked_u, (unsigned long long)acked_s);
    /* a long grace: part 2 checks that an in-flight stream completes after
     * SIGTERM, which must not depend on how fast a loaded machine gets
     * there (a 2 s grace expired under ASan beside other tests) */
    const char *long_grace[] = { "--grace-ms", "60000", NULL };
    pid = start_daemon_args(long_grace);
    CHECK_RC(kvc_connect(dir, &c), 0);
    CHECK(wait_ready(c), "kvarcd ready after kill -9");
    uint64_t len_u = layer0_length(c, unary), len_s = layer0_length(c, streamed);
    CHECK(len_u != UINT64_MAX && len_u >= acked_u && len_u % BLOCK == 0, "unary: durable %llu, acknowledged %llu",
          (unsigned long long)len_u, (unsigned long long)acked_u);
    CHECK(len_s != UINT64_MAX && len_s >= acked_s && len_s % BLOCK == 0, "stream: durable %llu, acknowledged %llu",
          (unsigned long long)len_s, (unsigned long long)acked_s);
    CHECK_RC(check_layer(c, unary, len_u, 11), 0);
    CHECK_RC(check_layer(c, streamed, len_s, 12), 0);
    fprintf(stderr, "kill -9 under writers: unary acked %llu durable %llu, stream acked %llu durable %llu\n",
            (unsigned long long)acked_u, (unsigned long long)len_u, (unsigned long long)acked_s,
            (unsigned long long)len_s);

    /* 2. SIGTERM with a stream in flight: it finishes within the grace period */
    uint64_t g = 0, len = 0, blocks = 0;
    CHECK_RC(create(c, "life", "graceful", 128, msg, &g), 0);
    kvc_stream *st;
    CHECK_RC(kvc_stream_open(c, "AppendStream", 60000, &st), 0);   /* a guard */
    CHECK_RC(stream_block(st, g, 0, 13, 0), 0);
    CHECK_RC(stream_block(st, g, 1, 13, 0), 0);
    /* SIGTERM once the daemon has the call in hand (both blocks appended) */
    CHECK(wait_length(g, 2 * BLOCK, 30000) == 0, "the stream's two blocks were appended before SIGTERM");
    kill(pid, SIGTERM);
    CHECK(wait_refused(10000) == 0, "a new connection is refused while shutting down");
    CHECK_RC(stream_block(st, g, 2, 13, 0), 0);
    int sst = stream_end(st, &len, &blocks, msg);
    /* gRPC's graceful close races its client: the server sends the status
     * and, its last stream done after the GOAWAY, closes the connection; a
     * client still writing then (a window update) fails the call with
     * "Broken pipe" before reading the status already in its socket (seen
     * 2 in 65 runs under ASan with both cores busy). What kvarcd owes is
     * the call's work: it is checked on the restart below either way. */
    CHECK(sst == GRPC_STATUS_OK || sst == GRPC_STATUS_UNAVAILABLE,
          "the in-flight stream after SIGTERM: status %d (%s)", sst, msg);
    CHECK(sst != GRPC_STATUS_OK || (len == 3 * BLOCK && blocks == 3),
          "the in-flight stream completed: %llu tokens, %llu blocks", (unsigned long long)len,
          (unsigned long long)blocks);
    kvc_close(c);
    CHECK(wait_exit(pid, 30000) == 0, "kvarcd exits 0 after the in-flight call");

    /* 3. a stream idle past a short grace period is cancelled */
    const char *short_grace[] = { "--grace-ms", "300", NULL };
    pid = start_daemon_args(short_grace);
    CHECK_RC(kvc_connect(dir, &c), 0);
    CHECK(wait_ready(c), "kvarcd ready (short grace)");
    CHECK(layer0_length(c, g) == 3 * BLOCK, "the stream in flight at SIGTERM had all 3 blocks stored");
    uint64_t idle = 0;
    CHECK_RC(create(c, "life", "idle", 128, msg, &idle), 0);
    /* the stream's own deadline (60 s) is what would end it if the daemon
     * did not cancel it after its grace: exiting within 30 s shows that it
     * did, however slow the machine */
    CHECK_RC(kvc_stream_open(c, "AppendStream", 60000, &st), 0);
    CHECK_RC(stream_block(st, idle, 0, 14, 0), 0);
    CHECK_RC(stream_block(st, idle, 1, 14, 0), 0);
    /* SIGTERM only once the daemon has made both blocks durable (Stat on
     * another connection), so what is checked below does not race it */
    CHECK(wait_length(idle, 2 * BLOCK, 30000) == 0, "the idle stream's two blocks were appended before SIGTERM");
    kill(pid, SIGTERM);
    int code = wait_exit(pid, 30000);
    CHECK(code == 0, "kvarcd exits 0 within 30 s, cancelling the idle stream after its 0.3 s grace instead of "
          "waiting for the stream's 60 s deadline (code %d, -1: still running)", code);
    if (code == -1) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    int fin = stream_end(st, &len, &blocks, msg);
    CHECK(fin != GRPC_STATUS_OK, "the idle stream did not succeed: %s", kvc_status_name(fin));
    kvc_close(c);
    pid = start_daemon();
    CHECK_RC(kvc_connect(dir, &c), 0);
    CHECK(wait_ready(c), "kvarcd ready again");
    CHECK(layer0_length(c, idle) == 2 * BLOCK, "the idle stream's received blocks are durable");
    CHECK_RC(check_layer(c, idle, 2 * BLOCK, 14), 0);
    kvc_close(c);
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 10000) == 0, "final SIGTERM exits 0");
    if (!tu_failures)
        kd_remove_dir();
    return tu_finish("test_kvarcd_life");
}
