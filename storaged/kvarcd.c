/* kvarcd - the kvarc storage daemon.
 *
 *   kvarcd [--data DIR] [--threads N] [--rerank-threads N] [--grace-ms MS]
 *          [--listen HOST:PORT --token-file FILE [--tls-cert PEM --tls-key PEM]]
 *
 * Serves the engine of DIR on the unix socket DIR/kvarcd.sock (mode 0600),
 * and on TCP only when asked, then with bearer tokens scoped to namespaces
 * (auth.h) and TLS when certificate files are given.
 * SIGTERM/SIGINT: stop accepting, let calls in flight finish within the
 * grace period (then cancel them), close the engine, exit 0. SIGHUP: read
 * the token file again; new calls are checked against the new tokens (a
 * call in flight keeps the set it was checked with); a file that does not
 * load keeps the old tokens and the log says why. A second
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

#include "metrics_http.h"
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

static void log_call(const char *method, uint64_t conv, const char *who, int status, const char *msg, double ms)
{
    char cv[32] = "-";
    if (conv)
        snprintf(cv, sizeof cv, "%llu", (unsigned long long)conv);
    if (status)
        log_line("warn", "call=%s conv=%s who=%s status=%d duration_ms=%.3f msg=\"%s\"", method, cv, who, status,
                 ms, msg);
    else
        log_line("info", "call=%s conv=%s who=%s status=0 duration_ms=%.3f", method, cv, who, ms);
}

/* The whole of a small file (a PEM), NUL-terminated; NULL with msg set. */
static char *read_small_file(const char *path, const char *what, char *msg, size_t msglen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(msg, msglen, "%s %s: %s", what, path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(1 << 20);
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    int bad = !buf || ferror(f) || !feof(f) || n == 0;
    fclose(f);
    if (bad) {
        snprintf(msg, msglen, "%s %s: unreadable, empty or over 1 MiB", what, path);
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    return buf;
}

/* What the metrics endpoint serves from: the server, and whether it is stopping. */
typedef struct metrics_src {
    pthread_mutex_t mu;
    rpc_server     *srv;     /* NULL once kvarcd is shutting down */
} metrics_src;

static int render_metrics(void *arg, prom_buf *out)
{
    metrics_src *ms = arg;
    pthread_mutex_lock(&ms->mu);
    if (ms->srv)
        rpc_server_metrics(ms->srv, out);
    int rc = ms->srv ? out->err : -ESHUTDOWN;
    pthread_mutex_unlock(&ms->mu);
    return rc;
}

static int health(void *arg, char *reason, size_t len)
{
    metrics_src *ms = arg;
    pthread_mutex_lock(&ms->mu);
    int up = ms->srv != NULL;
    pthread_mutex_unlock(&ms->mu);
    if (!up)
        snprintf(reason, len, "kvarcd is shutting down");
    return !up;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: kvarcd [--data DIR] [--threads N] [--rerank-threads N] [--grace-ms MS] [--segment-mb N]\n"
               "              [--listen HOST:PORT --token-file FILE [--tls-cert PEM --tls-key PEM]]\n"
               "              [--metrics-listen HOST:PORT] [--rados-pool POOL [--rados-conf FILE]\n"
               "              [--rados-user ID] [--rados-keyring FILE] [--rados-lock-s S] [--rados-timeout-s S]\n"
               "              [--rados-segment-kb N] [--rados-gc-grace-s S] [--node NAME]] [--version] [--help]\n"
               "  --data DIR         data directory (default: $KVARC_DATA, else ~/.local/share/kvarc)\n"
               "  --threads N        completion-queue worker threads (1..64; default: twice the cores,\n"
               "                     at least 8)\n"
               "  --rerank-threads N threads one RerankLayer call may use, its kv heads split over\n"
               "                     them, when they are free (1..64; default: the cores, at most 64)\n"
               "  --grace-ms MS      on SIGTERM, how long calls in flight may finish (default 5000)\n"
               "  --segment-mb N     seal a segment file once it is past N MiB (1..65536; default\n"
               "                     256); smaller segments let compaction reclaim space sooner\n"
               "  --listen HOST:PORT also serve TCP (port 0 picks one; the log says which)\n"
               "  --token-file FILE  bearer tokens for TCP callers, one 'TOKEN NS[,NS...]' or\n"
               "                     'TOKEN *' per line; mode 0600 (required with --listen)\n"
               "  --tls-cert PEM     certificate chain for TLS on the TCP listener\n"
               "  --tls-key PEM      its private key\n"
               "  --metrics-listen HOST:PORT\n"
               "                     serve Prometheus metrics on http://HOST:PORT/metrics and\n"
               "                     liveness on /health (off by default; no TLS, no tokens: bind\n"
               "                     it to loopback or a private network; port 0 picks one)\n"
               "  --rados-pool POOL  keep conversations in this Ceph RADOS pool (the data directory\n"
               "                     becomes a cache of it): any kvarcd on the pool serves any of\n"
               "                     them, one kvarcd at a time appends to each (a writer lock)\n"
               "  --rados-conf FILE  ceph.conf (default: librados's search, /etc/ceph/ceph.conf)\n"
               "  --rados-user ID    cephx user without 'client.' (default: admin)\n"
               "  --rados-keyring FILE  its keyring (default: what ceph.conf says)\n"
               "  --rados-lock-s S   writer lock duration: a killed kvarcd's conversations can be\n"
               "                     taken over S seconds after its last renewal (1..3600; default 30)\n"
               "  --rados-timeout-s S  how long a Ceph operation may take before the call fails\n"
               "                     UNAVAILABLE (1..3600; default 30)\n"
               "  --rados-segment-kb N  start a conversation's next segment object past N KiB\n"
               "                     (64..92160; default 65536)\n"
               "  --rados-gc-grace-s S  compaction removes from the pool only objects unchanged for\n"
               "                     S seconds (1..604800; default 3600)\n"
               "  --node NAME        this kvarcd's name in writer locks (default: the host name)\n"
               "SIGHUP reads the token file again (a file that does not load keeps the tokens in force).\n"
               "Always listens on DIR/kvarcd.sock (mode 0600) for local callers.\n");
}

int main(int argc, char **argv)
{
    const char *dir = getenv("KVARC_DATA");
    char defdir[1024];
    /* Workers block in disk work (a group commit's fdatasync, LMDB's writer
     * lock, io_uring reads), so more of them than cores keep reads from
     * queueing behind appends: bench-load (16 clients x 64 conversations,
     * 2 cores) answered 2.0-2.2x the calls with 8 workers than with 2, Fetch
     * p50 7.5-8.2 -> 1.3 ms, RerankLayer p50 8.2-8.9 -> 1.9-2.1 ms. */
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long threads = 2 * cores < 8 ? 8 : 2 * cores > 64 ? 64 : 2 * cores;
    long rerank_threads = cores < 1 ? 1 : cores > 64 ? 64 : cores;
    int grace = 5000;
    long segment_mb = 256;
    const char *listen = NULL, *token_file = NULL, *tls_cert = NULL, *tls_key = NULL, *metrics_listen = NULL;
    kvd_cluster_options copt = { 0 };
    long lock_s = 30, timeout_s = 30, object_kb = 65536, grace_s = 3600;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--data") && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = strtol(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "--rerank-threads") && i + 1 < argc) {
            char *end;
            rerank_threads = strtol(argv[++i], &end, 10);
            if (*end || end == argv[i])
                rerank_threads = -1;
        } else if (!strcmp(argv[i], "--grace-ms") && i + 1 < argc) {
            grace = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--segment-mb") && i + 1 < argc) {
            char *end;
            segment_mb = strtol(argv[++i], &end, 10);
            if (*end || end == argv[i])
                segment_mb = -1;
        } else if (!strcmp(argv[i], "--listen") && i + 1 < argc) {
            listen = argv[++i];
        } else if (!strcmp(argv[i], "--token-file") && i + 1 < argc) {
            token_file = argv[++i];
        } else if (!strcmp(argv[i], "--tls-cert") && i + 1 < argc) {
            tls_cert = argv[++i];
        } else if (!strcmp(argv[i], "--tls-key") && i + 1 < argc) {
            tls_key = argv[++i];
        } else if (!strcmp(argv[i], "--metrics-listen") && i + 1 < argc) {
            metrics_listen = argv[++i];
        } else if (!strcmp(argv[i], "--rados-pool") && i + 1 < argc) {
            copt.pool = argv[++i];
        } else if (!strcmp(argv[i], "--rados-conf") && i + 1 < argc) {
            copt.conf = argv[++i];
        } else if (!strcmp(argv[i], "--rados-user") && i + 1 < argc) {
            copt.user = argv[++i];
        } else if (!strcmp(argv[i], "--rados-keyring") && i + 1 < argc) {
            copt.keyring = argv[++i];
        } else if (!strcmp(argv[i], "--node") && i + 1 < argc) {
            copt.node = argv[++i];
        } else if ((!strcmp(argv[i], "--rados-lock-s") || !strcmp(argv[i], "--rados-timeout-s") ||
                    !strcmp(argv[i], "--rados-segment-kb") || !strcmp(argv[i], "--rados-gc-grace-s")) &&
                   i + 1 < argc) {
            struct { const char *flag; long *v, max; } nums[] = {
                { "--rados-lock-s", &lock_s, 3600 }, { "--rados-timeout-s", &timeout_s, 3600 },
                { "--rados-segment-kb", &object_kb, 92160 }, { "--rados-gc-grace-s", &grace_s, 604800 },
            };
            for (size_t k = 0; k < sizeof nums / sizeof nums[0]; k++) {
                if (strcmp(argv[i], nums[k].flag))
                    continue;
                char *end;
                long v = strtol(argv[i + 1], &end, 10);
                long min = nums[k].v == &object_kb ? 64 : 1;
                if (*end || end == argv[i + 1] || v < min || v > nums[k].max) {
                    fprintf(stderr, "kvarcd: %s must be a number in %ld..%ld\n", argv[i], min, nums[k].max);
                    return 2;
                }
                *nums[k].v = v;
            }
            i++;
        } else if (!strcmp(argv[i], "--version")) {
            printf("kvarcd %s (git %s)\n", KVARCD_VERSION, KVARC_GIT_REVISION);
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
    if (rerank_threads < 1 || rerank_threads > 64) {
        fprintf(stderr, "kvarcd: --rerank-threads must be a number in 1..64\n");
        return 2;
    }
    if (segment_mb < 1 || segment_mb > 65536) {
        fprintf(stderr, "kvarcd: --segment-mb must be a number in 1..65536\n");
        return 2;
    }
    if (listen && !token_file) {
        fprintf(stderr, "kvarcd: --listen %s needs --token-file FILE: TCP callers must present a token\n", listen);
        return 2;
    }
    if ((tls_cert || tls_key || token_file) && !listen) {
        fprintf(stderr, "kvarcd: --token-file, --tls-cert and --tls-key apply to a TCP listener: add --listen "
                        "HOST:PORT\n");
        return 2;
    }
    if (!tls_cert != !tls_key) {
        fprintf(stderr, "kvarcd: TLS needs both --tls-cert and --tls-key\n");
        return 2;
    }
    char emsg[600];
    auth_tokens *tokens = NULL;
    char *cert_pem = NULL, *key_pem = NULL;
    if (token_file && auth_load(token_file, &tokens, emsg, sizeof emsg)) {
        log_line("error", "msg=\"%s\"", emsg);
        return 1;
    }
    if (tls_cert && (!(cert_pem = read_small_file(tls_cert, "TLS certificate", emsg, sizeof emsg)) ||
                     !(key_pem = read_small_file(tls_key, "TLS key", emsg, sizeof emsg)))) {
        log_line("error", "msg=\"%s\"", emsg);
        free(cert_pem);
        auth_free(tokens);
        return 1;
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
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (!copt.pool && (copt.conf || copt.user || copt.keyring || copt.node)) {
        fprintf(stderr, "kvarcd: --rados-conf, --rados-user, --rados-keyring and --node apply to the RADOS "
                        "backend: add --rados-pool POOL\n");
        return 2;
    }
    copt.lock_seconds = (unsigned)lock_s;
    copt.op_timeout = (unsigned)timeout_s;
    copt.object_bytes = (uint64_t)object_kb << 10;
    copt.gc_grace_s = (unsigned)grace_s;
    kvd_options o = { .dir = dir, .segment_bytes = (uint64_t)segment_mb << 20, .cluster = copt.pool ? &copt : NULL };
    kvd_engine *e;
    kvd_err err = { 0, "" };
    int rc = 1, tcp_port = 0;
    if (kvd_open(&o, &e, &err)) {
        log_line("error", "msg=\"%s\"", err.msg);
        goto out;
    }
    kvd_stats rst;
    if (!kvd_stats_get(e, &rst, NULL) && rst.rolled_forward)
        log_line("warn", "msg=\"recovery replayed %llu valid block(s) that the index of %s did not know "
                 "(its last transaction was lost, or a crash came between a write and its commit)\"",
                 (unsigned long long)rst.rolled_forward, dir);
    if (!kvd_stats_get(e, &rst, NULL) && rst.recovery_damaged)
        log_line("warn", "msg=\"recovery kept %llu damaged range(s) in %s because valid blocks follow them; "
                 "`kvarc verify` names them\"", (unsigned long long)rst.recovery_damaged, dir);
    long swept = kvd_stage_sweep(e, &err);
    if (swept > 0)
        log_line("warn", "msg=\"removed %ld unfinished import(s) (a stage left when kvarcd stopped during "
                 "an import)\"", swept);
    else if (swept < 0)
        log_line("warn", "msg=\"could not remove unfinished imports: %s\"", err.msg);
    char sock[1200], addr[1300], msg[256];
    snprintf(sock, sizeof sock, "%s/kvarcd.sock", dir);
    if (strlen(sock) >= 108) {
        log_line("error", "msg=\"socket path %s is longer than a unix socket allows (107 bytes): use a "
                 "shorter --data\"", sock);
        kvd_close(e);
        goto out;
    }
    unlink(sock);          /* we hold the directory's lock: a leftover socket is stale */
    snprintf(addr, sizeof addr, "unix:%s", sock);
    grpc_init();
    mode_t old = umask(077);
    rpc_server *srv;
    rpc_config cfg = { .unix_addr = addr, .tcp_addr = listen, .tokens = tokens, .tls_cert_pem = cert_pem,
                       .tls_key_pem = key_pem, .threads = (int)threads,
                       .rerank_threads = (int)rerank_threads, .log = log_call };
    int src = rpc_server_start(e, &cfg, &srv, &tcp_port, msg, sizeof msg);
    umask(old);
    if (src) {
        log_line("error", "msg=\"%s\"", msg);
        grpc_shutdown();
        kvd_close(e);
        goto out;
    }
    chmod(sock, 0600);
    log_line("info", "msg=\"serving\" data=%s socket=%s threads=%ld rerank_threads=%ld version=%s", dir, sock,
             threads, rerank_threads, KVARCD_VERSION);
    if (listen) {
        char host[300];
        snprintf(host, sizeof host, "%s", listen);
        char *colon = strrchr(host, ':');
        if (colon)
            *colon = 0;
        log_line("info", "msg=\"listening\" tcp=%s:%d tls=%s tokens=%zu", host, tcp_port, cert_pem ? "yes" : "no",
                 auth_count(tokens));
    }
    mh_server *mh = NULL;
    metrics_src ms = { PTHREAD_MUTEX_INITIALIZER, srv };
    if (metrics_listen) {
        int mport = 0;
        char mmsg[300];
        if (mh_start(metrics_listen, render_metrics, health, &ms, &mh, &mport, mmsg, sizeof mmsg)) {
            log_line("error", "msg=\"%s\"", mmsg);
            rpc_server_stop(srv, 0);
            grpc_shutdown();
            kvd_close(e);
            unlink(sock);
            goto out;
        }
        char mhost[300];
        snprintf(mhost, sizeof mhost, "%s", metrics_listen);
        char *mcolon = strrchr(mhost, ':');
        if (mcolon)
            *mcolon = 0;
        log_line("info", "msg=\"metrics\" url=http://%s:%d/metrics port=%d", mhost, mport, mport);
    }
    int sig = 0;
    while (!sigwait(&set, &sig) && sig == SIGHUP) {   /* SIGHUP: read the token file again */
        auth_tokens *fresh = NULL;
        if (!token_file)
            log_line("warn", "msg=\"SIGHUP: no token file to read again (kvarcd serves no TCP listener)\"");
        else if (auth_load(token_file, &fresh, emsg, sizeof emsg))
            log_line("error", "msg=\"SIGHUP: %s; the %zu token(s) read before stay in force\"", emsg,
                     auth_count(tokens));
        else {
            rpc_server_set_tokens(srv, fresh);
            auth_free(tokens);
            tokens = fresh;
            log_line("info", "msg=\"SIGHUP: token file %s read again\" tokens=%zu", token_file, auth_count(tokens));
        }
    }
    log_line("info", "msg=\"shutting down\" signal=%d grace_ms=%d", sig, grace);
    pthread_mutex_lock(&ms.mu);         /* /health answers 503 from now on, /metrics 500 */
    ms.srv = NULL;
    pthread_mutex_unlock(&ms.mu);
    int cancelled = rpc_server_stop(srv, grace);
    mh_stop(mh);
    grpc_shutdown();
    kvd_close(e);
    unlink(sock);
    log_line("info", "msg=\"stopped\" calls_cancelled_after_grace=%s", cancelled ? "yes" : "no");
    rc = 0;
out:
    auth_free(tokens);
    free(cert_pem);
    if (key_pem) {
        memset(key_pem, 0, strlen(key_pem));
        free(key_pem);
    }
    return rc;
}
