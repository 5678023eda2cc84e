/* daemon.c - start and stop a kvarcd from the tools (see daemon.h). */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "kvarc_rpc.h"

#define KD_SPAWN_MS 30000     /* kd_spawn's failure bound */

const char *kd_find_kvarcd(const char *given, char *buf, size_t len)
{
    if (given)
        return given;
    char self[1024];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = 0;
        char *slash = strrchr(self, '/');
        if (slash) {
            *slash = 0;
            static const char *const rel[] = { "", "/../storaged", "/../../storaged" };   /* build trees */
            for (size_t i = 0; i < sizeof rel / sizeof *rel; i++) {
                snprintf(buf, len, "%s%s/kvarcd", self, rel[i]);
                if (!access(buf, X_OK))
                    return buf;
            }
        }
    }
    return "kvarcd";
}

int kd_alive(const char *target, int timeout_ms)
{
    kvc_conn *c;
    char msg[256];
    if (kvc_connect(target, &c))
        return 0;
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    int ok = kvc_call(c, "Health", &e.base, &kvarc__v1__health_reply__descriptor, NULL, timeout_ms, msg, sizeof msg) == 0;
    kvc_close(c);
    return ok;
}

int kd_spawn(const char *kvarcd, const char *dir, const char *log, pid_t *pid, char *msg, size_t len)
{
    pid_t p = fork();
    if (p < 0) {
        snprintf(msg, len, "fork: %s", strerror(errno));
        return -1;
    }
    if (p == 0) {
        if (!freopen(log ? log : "/dev/null", "a", stderr))
            _exit(126);
        execlp(kvarcd, "kvarcd", "--data", dir, (char *)NULL);
        fprintf(stderr, "cannot run %s: %s\n", kvarcd, strerror(errno));
        _exit(127);
    }
    /* Wait for it to answer, not for a time: a real 30 s deadline is only
     * the failure bound (an ASan build recovering a big archive on a slow
     * disk may take seconds); each Health may take what is left of it,
     * on a fresh connection (no gRPC reconnect backoff between tries). */
    char sock[1200];
    snprintf(sock, sizeof sock, "%s/kvarcd.sock", dir);
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int st;
        if (waitpid(p, &st, WNOHANG) == p) {
            snprintf(msg, len, "%s exited with code %d before serving%s%s", kvarcd, WIFEXITED(st) ? WEXITSTATUS(st) : -1,
                     log ? "; see " : "", log ? log : "");
            return -1;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = KD_SPAWN_MS - ((long)(now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000);
        if (left <= 0)
            break;
        if (!access(sock, F_OK) && kd_alive(dir, (int)(left > 1000 ? left : 1000))) {
            *pid = p;
            return 0;
        }
        struct timespec d = { 0, 20 * 1000000 };
        nanosleep(&d, NULL);
    }
    kill(p, SIGKILL);
    waitpid(p, NULL, 0);
    snprintf(msg, len, "%s did not answer within %d s; its log%s%s may say why", kvarcd, KD_SPAWN_MS / 1000,
             log ? " is " : " went to /dev/null: run it by hand to see", log ? log : "");
    return -1;
}

int kd_stop(pid_t pid)
{
    int st;
    kill(pid, SIGTERM);
    if (waitpid(pid, &st, 0) != pid)
        return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

void kd_run_end(kd_run *r, const char *tool)
{
    if (r->pid > 0)
        kd_stop(r->pid);
    r->pid = 0;
    if (r->dir[0]) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", r->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "%s: could not remove %s\n", tool, r->dir);
        r->dir[0] = 0;
    }
}
