/* kvarcd - the kvarc storage daemon.
 *
 *   kvarcd [--data DIR] [--threads N] [--grace-ms MS]
 *
 * Serves the engine of DIR on the unix socket DIR/kvarcd.sock (mode 0600).
 * SIGTERM/SIGINT: stop accepting, let calls in flight finish within the
 * grace period (then cancel them), close the engine, exit 0. A second
 * kvarcd on the same DIR is refused (the engine's lock). Log lines go to
 * stderr as key=value pairs. */
#include <errno.h>
#include <stdarg.h>
#include <grpc/grpc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "rpc_server.h"

static void log_line(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_line(const char *level, const char *fmt, ...)
{
    char ts[32], msg[600];
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "level=%s ts=%s.%03ldZ %s\n", level, ts, now.tv_nsec / 1000000, msg);
}

static void log_call(const char *method, int status, const char *msg, double ms)
{
    if (status)
        log_line("warn", "call=%s status=%d duration_ms=%.3f msg=\"%s\"", method, status, ms, msg);
    else
        log_line("info", "call=%s status=0 duration_ms=%.3f", method, ms);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: kvarcd [--data DIR] [--threads N] [--grace-ms MS] [--version] [--help]\n"
               "  --data DIR     data directory (default: $KVARC_DATA, else ~/.local/share/kvarc)\n"
               "  --threads N    completion-queue worker threads (default: number of cores)\n"
               "  --grace-ms MS  on SIGTERM, how long calls in flight may finish (default 5000)\n"
               "Listens on DIR/kvarcd.sock (mode 0600).\n");
}

int main(int argc, char **argv)
{
    const char *dir = getenv("KVARC_DATA");
    char defdir[1024];
    long threads = sysconf(_SC_NPROCESSORS_ONLN);
    int grace = 5000;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--data") && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = strtol(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "--grace-ms") && i + 1 < argc) {
            grace = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--version")) {
            printf("kvarcd %s\n", KVARCD_VERSION);
            return 0;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "kvarcd: unknown argument '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (threads < 1 || threads > 64 || grace < 0) {
        fprintf(stderr, "kvarcd: --threads must be 1..64 and --grace-ms >= 0\n");
        return 2;
    }
    if (!dir) {
        const char *home = getenv("HOME");
        snprintf(defdir, sizeof defdir, "%s/.local/share/kvarc", home ? home : ".");
        char parent[1024];
        snprintf(parent, sizeof parent, "%s/.local", home ? home : ".");
        mkdir(parent, 0700);
        snprintf(parent, sizeof parent, "%s/.local/share", home ? home : ".");
        mkdir(parent, 0700);
        dir = defdir;
    }
    /* signals are taken by sigwait in this thread only */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    kvd_options o = { .dir = dir };
    kvd_engine *e;
    kvd_err err = { 0, "" };
    if (kvd_open(&o, &e, &err)) {
        log_line("error", "msg=\"%s\"", err.msg);
        return 1;
    }
    char sock[1200], addr[1300], msg[256];
    snprintf(sock, sizeof sock, "%s/kvarcd.sock", dir);
    if (strlen(sock) >= 108) {
        log_line("error", "msg=\"socket path %s is longer than a unix socket allows (107 bytes): use a "
                 "shorter --data\"", sock);
        kvd_close(e);
        return 1;
    }
    unlink(sock);          /* we hold the directory's lock: a leftover socket is stale */
    snprintf(addr, sizeof addr, "unix:%s", sock);
    grpc_init();
    mode_t old = umask(077);
    rpc_server *srv;
    int rc = rpc_server_start(e, addr, (int)threads, log_call, &srv, msg, sizeof msg);
    umask(old);
    if (rc) {
        log_line("error", "msg=\"%s\"", msg);
        grpc_shutdown();
        kvd_close(e);
        return 1;
    }
    chmod(sock, 0600);
    log_line("info", "msg=\"serving\" data=%s socket=%s threads=%ld version=%s", dir, sock, threads,
             KVARCD_VERSION);
    int sig = 0;
    sigwait(&set, &sig);
    log_line("info", "msg=\"shutting down\" signal=%d grace_ms=%d", sig, grace);
    int cancelled = rpc_server_stop(srv, grace);
    grpc_shutdown();
    kvd_close(e);
    unlink(sock);
    log_line("info", "msg=\"stopped\" calls_cancelled_after_grace=%s", cancelled ? "yes" : "no");
    return 0;
}
