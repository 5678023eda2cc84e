/* test_engine_crash: a child process appends from three threads (three
 * conversations, one group commit) and reports each acknowledged append on
 * a pipe; the parent kills it with SIGKILL at a random moment, reopens the
 * directory and checks that every acknowledged append reads back
 * bit-exact, that nothing beyond the committed length is visible, and that
 * verify passes. Repeated many times on the same directory. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

#include "engine_util.h"

#define ROUNDS 25
#define CONVS 3

typedef struct worker {
    kvd_engine *e;
    kvd_conv_info ci;
    int tag, out_fd;
} worker;

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
            if (eu_append(w->e, &w->ci, (uint64_t)w->tag, l, len, count, &err)) {
                fprintf(stderr, "child append failed: %s\n", err.msg);
                _exit(4);
            }
            char line[96];
            int n = snprintf(line, sizeof line, "%d %u %llu %u\n", w->tag, l, (unsigned long long)len, count);
            if (write(w->out_fd, line, (size_t)n) != n)
                _exit(5);
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

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "crash");
    uint64_t seed = (uint64_t)time(NULL);
    printf("  seed %llu\n", (unsigned long long)seed);
    int total_acks = 0;
    for (int round = 0; round < ROUNDS && !tu_failures; round++) {
        int pfd[2];
        if (pipe(pfd))
            return 1;
        pid_t pid = fork();
        if (pid == 0) {
            close(pfd[0]);
            child(dir, pfd[1]);
        }
        close(pfd[1]);
        /* let it run 5..60 ms, reading acks, then kill it */
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        long run_ms = 5 + (long)(kvarc_splitmix64(&seed) % 56);
        char buf[65536], line[128];
        size_t ll = 0;
        int killed = 0;
        for (;;) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            long ms = (now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000;
            if (!killed && ms >= run_ms) {
                kill(pid, SIGKILL);
                killed = 1;
            }
            ssize_t n = read(pfd[0], buf, sizeof buf);   /* EOF once the child is dead */
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
                int tag;
                unsigned l, cnt;
                unsigned long long first;
                if (sscanf(line, "%d %u %llu %u", &tag, &l, &first, &cnt) == 4 && tag >= 100 &&
                    tag < 100 + CONVS && l < 2) {
                    if (first + cnt > acked[tag - 100][l])
                        acked[tag - 100][l] = first + cnt;
                    total_acks++;
                }
            }
        }
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
    printf("  %d rounds, %d acknowledged appends checked\n", ROUNDS, total_acks);
    CHECK(total_acks > 100, "too few appends happened (%d) for the test to mean anything", total_acks);
    eu_rmrf(dir);
    return tu_finish("test_engine_crash");
}
