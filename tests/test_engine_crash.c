/* test_engine_crash: a child process appends from three threads (three
 * conversations, one group commit) and reports on a pipe each append it
 * starts ("B ...") and each one acknowledged ("A ..."); the parent kills it
 * with SIGKILL, reopens the directory and checks that every acknowledged
 * append reads back bit-exact, that nothing beyond the committed length is
 * visible, and that verify passes. Repeated many times on the same
 * directory.
 *
 * When to kill is decided by events, never by the clock: a round draws k
 * from the seed and kills once k acknowledgements have been read, either at
 * once (the other threads are then mid-append: in the group commit, the
 * write or the fsync) or at the next append the child starts. So every
 * round has at least k acknowledged appends to check on any disk (one that
 * takes 5 ms per fsync included), and the kill still lands at varied
 * moments. Time is used only as a failure guard: a child that reports
 * nothing for POLL_GUARD_MS is taken as hung. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

#include "engine_util.h"

#define ROUNDS 25
#define CONVS 3
#define POLL_GUARD_MS 60000

typedef struct worker {
    kvd_engine *e;
    kvd_conv_info ci;
    int tag, out_fd;
} worker;

/* One line on the pipe; lines are shorter than PIPE_BUF, so the threads'
 * writes never interleave. */
static void report(int fd, char kind, const worker *w, uint32_t l, uint64_t first, uint32_t count)
{
    char line[96];
    int n = snprintf(line, sizeof line, "%c %d %u %llu %u\n", kind, w->tag, l, (unsigned long long)first, count);
    if (write(fd, line, (size_t)n) != n)
        _exit(5);
}

static void *append_loop(void *p)
{
    worker *w = p;
    kvd_err err;
    for (;;) {
        uint64_t len;
        for (uint32_t l = 0; l < w->ci.shape.n_layers; l++) {
            if (kvd_layer_length(w->e, w->ci.id, l, &len, &err))
                _exit(3);
            uint32_t count = 1 + (uint32_t)(len % 23);
            report(w->out_fd, 'B', w, l, len, count);
            if (eu_append(w->e, &w->ci, (uint64_t)w->tag, l, len, count, &err)) {
                fprintf(stderr, "child append failed: %s\n", err.msg);
                _exit(4);
            }
            report(w->out_fd, 'A', w, l, len, count);
        }
    }
    return NULL;
}

static void child(const char *dir, int out_fd)
{
    kvd_options o = { .dir = dir, .segment_bytes = 512 << 10 };
    kvd_engine *e;
    kvd_err err;
    if (kvd_open(&o, &e, &err)) {
        fprintf(stderr, "child open: %s\n", err.msg);
        _exit(2);
    }
    kvd_shape s = eu_shape(2, 2, KVARC_FMT_Q3);
    worker w[CONVS];
    pthread_t th[CONVS];
    for (int i = 0; i < CONVS; i++) {
        char name[16];
        snprintf(name, sizeof name, "c%d", i);
        if (kvd_conv_open(e, "crash", name, NULL, &w[i].ci, &err) &&
            kvd_conv_create(e, "crash", name, &s, NULL, &w[i].ci, &err))
            _exit(2);
        w[i].e = e;
        w[i].tag = 100 + i;
        w[i].out_fd = out_fd;
        pthread_create(&th[i], NULL, append_loop, &w[i]);
    }
    pause();
    _exit(0);
}

/* acked[tag][layer] = end of the highest acknowledged append */
static uint64_t acked[CONVS][2];

enum { KILL_AT_ACK, KILL_AT_NEXT_START };

/* Read the child's lines from fd until EOF, killing pid with SIGKILL once
 * k acknowledgements were read (at once, or at the next append started,
 * per mode); the acknowledgements read before EOF go to acked[] and
 * *acks. 0, or -1 when the child reported nothing for POLL_GUARD_MS (it
 * is killed then too). */
static int watch_child(pid_t pid, int fd, int k, int mode, int *acks)
{
    char buf[65536], line[128];
    size_t ll = 0;
    int killed = 0, rc = 0;
    for (;;) {
        struct pollfd pf = { fd, POLLIN, 0 };
        int pr = poll(&pf, 1, POLL_GUARD_MS);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0) {
            fprintf(stderr, "the child reported nothing for %d ms (%d of %d acknowledgements read)\n",
                    POLL_GUARD_MS, *acks, k);
            if (!killed)
                kill(pid, SIGKILL);
            rc = -1;
            break;
        }
        ssize_t n = read(fd, buf, sizeof buf);   /* EOF once the child is dead */
        if (n <= 0)
            break;
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] != '\n') {
                if (ll < sizeof line - 1)
                    line[ll++] = buf[i];
                continue;
            }
            line[ll] = 0;
            ll = 0;
            char kind;
            int tag;
            unsigned l, cnt;
            unsigned long long first;
            if (sscanf(line, "%c %d %u %llu %u", &kind, &tag, &l, &first, &cnt) != 5 || tag < 100 ||
                tag >= 100 + CONVS || l >= 2)
                continue;
            if (kind == 'A') {
                if (first + cnt > acked[tag - 100][l])
                    acked[tag - 100][l] = first + cnt;
                ++*acks;
            }
            /* lines read after the kill were written before it: they are
             * still acknowledgements to check */
            if (!killed && *acks >= k && (mode == KILL_AT_ACK ? kind == 'A' : kind == 'B')) {
                kill(pid, SIGKILL);
                killed = 1;
            }
        }
    }
    return rc;
}

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "crash");
    uint64_t seed = (uint64_t)time(NULL);
    printf("  seed %llu\n", (unsigned long long)seed);
    int total_acks = 0, want_acks = 0, at_start = 0, beyond = 0;
    for (int round = 0; round < ROUNDS && !tu_failures; round++) {
        /* every fifth round kills within the first few appends (right after
         * recovery), the others after 8..48 */
        int k = round % 5 == 0 ? 1 + (int)(kvarc_splitmix64(&seed) % 3) : 8 + (int)(kvarc_splitmix64(&seed) % 41);
        int mode = (int)(kvarc_splitmix64(&seed) % 2) ? KILL_AT_NEXT_START : KILL_AT_ACK;
        int pfd[2];
        if (pipe(pfd))
            return 1;
        pid_t pid = fork();
        if (pid == 0) {
            close(pfd[0]);
            child(dir, pfd[1]);
        }
        close(pfd[1]);
        int acks = 0;
        CHECK(watch_child(pid, pfd[0], k, mode, &acks) == 0, "round %d: the child hung", round);
        CHECK(acks >= k, "round %d: the child died after %d acknowledged appends, before the kill at %d",
              round, acks, k);
        total_acks += acks;
        want_acks += k;
        at_start += mode == KILL_AT_NEXT_START;
        close(pfd[0]);
        int status;
        waitpid(pid, &status, 0);
        CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "round %d: child exited %d instead of "
              "being killed", round, WIFEXITED(status) ? WEXITSTATUS(status) : -1);

        /* reopen and check */
        kvd_options o = { .dir = dir, .segment_bytes = 512 << 10 };
        kvd_engine *e;
        kvd_err err;
        CHECK_RC(kvd_open(&o, &e, &err), 0);
        if (tu_failures)
            break;
        kvd_reader *r;
        CHECK_RC(kvd_reader_open(e, &r, &err), 0);
        for (int c = 0; c < CONVS; c++) {
            char name[16];
            snprintf(name, sizeof name, "c%d", c);
            kvd_conv_info ci;
            if (kvd_conv_open(e, "crash", name, NULL, &ci, &err)) {
                CHECK(acked[c][0] == 0 && acked[c][1] == 0, "round %d: %s lost after acks", round, name);
                continue;
            }
            for (uint32_t l = 0; l < 2; l++) {
                uint64_t len;
                CHECK_RC(kvd_layer_length(e, ci.id, l, &len, &err), 0);
                CHECK(len >= acked[c][l], "round %d: %s layer %u has %llu tokens, %llu were acknowledged",
                      round, name, l, (unsigned long long)len, (unsigned long long)acked[c][l]);
                beyond += len > acked[c][l];     /* committed, killed before its ack: mid-flight */
                uint64_t *pos = malloc((len + 1) * sizeof *pos);
                for (uint64_t i = 0; i < len; i++)
                    pos[i] = i;
                for (uint32_t h = 0; h < 2 && len; h++)
                    CHECK(eu_check_records(r, &ci, (uint64_t)(100 + c), l, h, pos, len, &err) == 0,
                          "round %d: %s layer %u head %u differs after crash: %s", round, name, l, h, err.msg);
                pos[0] = len;
                uint8_t rec[104];
                CHECK_RC(kvd_read_records(r, ci.id, l, 0, pos, 1, rec, &err), -ERANGE);
                free(pos);
            }
        }
        kvd_verify_report rep;
        CHECK_RC(kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err), 0);
        kvd_reader_close(r);
        kvd_close(e);
    }
    printf("  %d rounds (%d killed as an append started), %d acknowledged appends checked (kills drawn "
           "after %d), %d layers found longer than acknowledged\n", ROUNDS, at_start, total_acks, want_acks, beyond);
    /* holds by construction (at least 5 x 1 + 20 x 8 kills drawn) unless a
     * round failed above */
    CHECK(total_acks >= want_acks && want_acks > 100, "too few appends happened (%d of %d) for the test to mean "
          "anything", total_acks, want_acks);
    eu_rmrf(dir);
    return tu_finish("test_engine_crash");
}
