/* test_kvarcd_metrics: kvarcd --metrics-listen serves Prometheus text on
 * /metrics and liveness on /health. Scrapes while a writer thread appends
 * and fetches, and checks: every counter only grows from scrape to scrape;
 * once the writer is done, the counts are exactly what it did (calls by
 * method and status, records appended and served, the latency histogram's
 * count, bytes in and out); group commits and their fdatasync histogram,
 * segments and bytes on disk, live and deleted conversations, compaction
 * and verify runs, auth refusals (a wrong token over TCP) move as they
 * must; the Metrics call answers the same families; a second kvarcd
 * cannot take the same metrics port (and says which); a bad address is
 * refused at start. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kvarc_version.h"
#include "kvarcd_util.h"
#include "testutil.h"

#define APPENDS  60
#define TOKENS   8           /* per append */
#define FETCHES  40
#define FETCH_N  5           /* positions per fetch */

/* The port of the "metrics" log line, waiting up to 30 s; 0 if none. */
static int metrics_port(void)
{
    char log[300], line[1024];
    snprintf(log, sizeof log, "%s.log", dir);
    for (long end = kd_now_ms() + 30000;;) {
        FILE *f = fopen(log, "r");
        int port = 0;
        while (f && fgets(line, sizeof line, f)) {
            char *t = strstr(line, "msg=\"metrics\"");
            char *p = t ? strstr(t, " port=") : NULL;
            if (p)
                port = atoi(p + 6);
        }
        if (f)
            fclose(f);
        if (port || kd_now_ms() > end)
            return port;
        kd_sleep_ms(20);
    }
}

/* GET path from 127.0.0.1:port: the status code, the body in a malloc'ed
 * string (*body, may be NULL). -1 when nothing answers. */
static int http_get(int port, const char *method, const char *path, char **body)
{
    if (body)
        *body = NULL;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    char req[256];
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", method, path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (ssize_t r; (r = read(fd, buf + len, cap - len - 1)) > 0;) {
        len += (size_t)r;
        if (cap - len < 4096)
            buf = realloc(buf, cap *= 2);
    }
    close(fd);
    buf[len] = 0;
    int code = -1;
    sscanf(buf, "HTTP/1.%*d %d", &code);
    char *b = strstr(buf, "\r\n\r\n");
    if (body && b)
        *body = strdup(b + 4);
    free(buf);
    return code;
}

/* The value of the sample named exactly `series` (name{labels}) in text; -1 if absent. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        if (!strncmp(p, series, n) && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    return -1;
}

static char *scrape(int port)
{
    char *body = NULL;
    int code = http_get(port, "GET", "/metrics", &body);
    CHECK(code == 200 && body, "GET /metrics answered %d", code);
    return body ? body : strdup("");
}

/* A scrape once no call is in flight: a call is counted as it ends, after
 * its client already has the answer, so the counts of calls a client saw
 * answered are complete only then (waits at most 30 s). */
static char *scrape_quiet(int port)
{
    char *t = scrape(port);
    for (long end = kd_now_ms() + 30000; sample(t, "kvarc_rpc_in_flight") != 0 && kd_now_ms() < end;) {
        free(t);
        kd_sleep_ms(10);
        t = scrape(port);
    }
    return t;
}

/* The counters that must never go down between two scrapes. */
static const char *const monotonic[] = {
    "kvarc_rpc_calls_total{method=\"Append\",code=\"OK\"}",
    "kvarc_rpc_calls_total{method=\"Fetch\",code=\"OK\"}",
    "kvarc_rpc_duration_seconds_count{method=\"Append\"}",
    "kvarc_rpc_duration_seconds_bucket{method=\"Append\",le=\"+Inf\"}",
    "kvarc_rpc_received_bytes_total{method=\"Append\"}",
    "kvarc_rpc_sent_bytes_total{method=\"Fetch\"}",
    "kvarc_records_appended_total",
    "kvarc_records_served_total",
    "kvarc_appended_blocks_total",
    "kvarc_group_commits_total",
    "kvarc_fdatasync_seconds_count",
    "kvarc_fdatasync_seconds_sum",
};
#define NMONO (sizeof monotonic / sizeof monotonic[0])

typedef struct writer {
    uint64_t conv;
    atomic_int done, failed;
} writer;

static void *writer_main(void *arg)
{
    writer *w = arg;
    kvc_conn *c;
    char msg[256];
    if (kvc_connect(dir, &c)) {
        atomic_store(&w->failed, 1);
        atomic_store(&w->done, 1);
        return NULL;
    }
    for (int i = 0; i < APPENDS; i++)
        if (rpc_append(c, w->conv, 0, (uint64_t)i * TOKENS, TOKENS, 7, 0, NULL, msg)) {
            fprintf(stderr, "append %d: %s\n", i, msg);
            atomic_store(&w->failed, 1);
        }
    for (int i = 0; i < FETCHES; i++) {
        uint64_t pos[FETCH_N];
        for (int j = 0; j < FETCH_N; j++)
            pos[j] = (uint64_t)(i * 7 + j * 13) % (APPENDS * TOKENS);
        Kvarc__V1__FetchReply *r = NULL;
        if (rpc_fetch(c, w->conv, 0, (uint32_t)i % 2, pos, FETCH_N, &r, msg)) {
            fprintf(stderr, "fetch %d: %s\n", i, msg);
            atomic_store(&w->failed, 1);
        } else {
            protobuf_c_message_free_unpacked(&r->base, NULL);
        }
    }
    kvc_close(c);
    atomic_store(&w->done, 1);
    return NULL;
}

static int write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fputs(text, f);
    fclose(f);
    return chmod(path, 0600);
}

/* The call's status over TCP with token. */
static int tcp_health(int port, const char *token)
{
    char addr[64], msg[256];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    kvc_options o = { .token = token };
    kvc_conn *c = NULL;
    if (kvc_connect_opts(addr, &o, &c, msg, sizeof msg))
        return -1;
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, "Health", &e.base, &kvarc__v1__health_reply__descriptor, &rep, 0, msg, sizeof msg);
    if (rep)
        protobuf_c_message_free_unpacked(rep, NULL);
    kvc_close(c);
    return st;
}

int main(void)
{
    eu_tmpdir(dir, sizeof dir, "kvarcd-metrics");
    char tokens[300], msg[256];
    snprintf(tokens, sizeof tokens, "%s.tokens", dir);
    CHECK(write_file(tokens, "admin-0123456789abcdef *\n") == 0, "token file");
    const char *extra[] = { "--metrics-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--token-file", tokens,
                            NULL };
    pid_t pid = start_daemon_args(extra);
    kvc_conn *c;
    CHECK_RC(kvc_connect(dir, &c), 0);
    CHECK(wait_ready(c), "kvarcd ready");
    int port = metrics_port(), tcp = daemon_tcp_port();
    CHECK(port > 0 && tcp > 0, "the log names the metrics port (%d) and the TCP port (%d)", port, tcp);
    if (tu_failures) {
        kill(pid, SIGKILL);
        return tu_finish("test_kvarcd_metrics");
    }

    /* 1. the endpoint: /health, 404, 405, the families before any traffic */
    char *body = NULL;
    CHECK(http_get(port, "GET", "/health", &body) == 200 && body && !strcmp(body, "ok\n"), "/health: 200 ok");
    free(body);
    CHECK(http_get(port, "GET", "/nope", NULL) == 404, "an unknown path is 404");
    CHECK(http_get(port, "POST", "/metrics", NULL) == 405, "POST /metrics is 405");
    char *t0 = scrape(port);
    CHECK(strstr(t0, "# TYPE kvarc_rpc_calls_total counter\n") && strstr(t0, "# TYPE kvarc_rpc_duration_seconds "
          "histogram\n") && strstr(t0, "# TYPE kvarc_fdatasync_seconds histogram\n") &&
          strstr(t0, "kvarc_build_info{version=\"" KVARC_VERSION "\",revision=\""),
          "the families are there before any traffic");
    CHECK(sample(t0, "kvarc_conversations{state=\"live\"}") == 0, "no conversation yet");
    CHECK(sample(t0, "kvarc_rpc_calls_total{method=\"Append\",code=\"OK\"}") == 0, "no append yet");

    /* 2. scrapes while a writer appends and fetches: nothing goes down */
    writer w = { 0 };
    CHECK_RC(create(c, "m", "a", 128, msg, &w.conv), 0);
    pthread_t th;
    pthread_create(&th, NULL, writer_main, &w);
    double prev[NMONO];
    for (size_t i = 0; i < NMONO; i++)
        prev[i] = sample(t0, monotonic[i]);
    free(t0);
    int scrapes = 0, moved = 0;
    while (!atomic_load(&w.done) || scrapes < 3) {
        char *t = scrape(port);
        for (size_t i = 0; i < NMONO; i++) {
            double v = sample(t, monotonic[i]);
            CHECK(v >= prev[i], "%s went from %g to %g", monotonic[i], prev[i], v);
            moved += v > prev[i];
            prev[i] = v;
        }
        free(t);
        scrapes++;
    }
    pthread_join(th, NULL);
    CHECK(!atomic_load(&w.failed), "the writer's calls succeeded");
    CHECK(moved > 0, "counters moved during %d scrapes", scrapes);

    /* 3. the counts are what was done */
    char *t = scrape_quiet(port);
    CHECK(sample(t, "kvarc_rpc_calls_total{method=\"Append\",code=\"OK\"}") == APPENDS, "Append OK = %d: %g",
          APPENDS, sample(t, "kvarc_rpc_calls_total{method=\"Append\",code=\"OK\"}"));
    CHECK(sample(t, "kvarc_rpc_calls_total{method=\"Fetch\",code=\"OK\"}") == FETCHES, "Fetch OK = %d", FETCHES);
    CHECK(sample(t, "kvarc_rpc_calls_total{method=\"Create\",code=\"OK\"}") == 1, "Create OK = 1");
    CHECK(sample(t, "kvarc_rpc_duration_seconds_count{method=\"Append\"}") == APPENDS, "Append latency count");
    CHECK(sample(t, "kvarc_rpc_duration_seconds_bucket{method=\"Append\",le=\"+Inf\"}") == APPENDS,
          "Append's +Inf bucket");
    CHECK(sample(t, "kvarc_rpc_duration_seconds_sum{method=\"Append\"}") > 0, "Append latency sum");
    CHECK(sample(t, "kvarc_records_appended_total") == APPENDS * TOKENS * 2, "records appended = %d x %d x 2 "
          "heads: %g", APPENDS, TOKENS, sample(t, "kvarc_records_appended_total"));
    CHECK(sample(t, "kvarc_records_served_total") == FETCHES * FETCH_N, "records served = %d: %g",
          FETCHES * FETCH_N, sample(t, "kvarc_records_served_total"));
    CHECK(sample(t, "kvarc_appended_blocks_total") == APPENDS, "blocks appended");
    double gc = sample(t, "kvarc_group_commits_total"), fs = sample(t, "kvarc_fdatasync_seconds_count");
    CHECK(gc >= 1 && gc <= APPENDS + 1 && fs >= 1 && fs <= gc, "group commits %g (1..%d: the appends and the "
          "Create), fdatasyncs %g (1..commits)", gc, APPENDS + 1, fs);
    /* each Fetch reply carries its records: more bytes out than the records' */
    CHECK(sample(t, "kvarc_rpc_sent_bytes_total{method=\"Fetch\"}") >= FETCHES * FETCH_N * 104.0, "Fetch bytes out");
    CHECK(sample(t, "kvarc_rpc_received_bytes_total{method=\"Append\"}") >= APPENDS * TOKENS * 2 * 104.0,
          "Append bytes in");
    CHECK(sample(t, "kvarc_segments") >= 1 && sample(t, "kvarc_segment_bytes") >= APPENDS * TOKENS * 2 * 104.0,
          "segments and their bytes on disk");
    CHECK(sample(t, "kvarc_conversations{state=\"live\"}") == 1, "one live conversation");
    free(t);

    /* 4. errors by status, deletes, verify and compact runs, auth refusals */
    CHECK(rpc_append(c, w.conv, 0, APPENDS * TOKENS, TOKENS, 7, 1, NULL, msg) == GRPC_STATUS_INVALID_ARGUMENT,
          "a bad append is refused");
    Kvarc__V1__DeleteRequest del = KVARC__V1__DELETE_REQUEST__INIT;
    del.ns = "m";
    del.name = "a";
    ProtobufCMessage *rep = NULL;
    CHECK_RC(kvc_call(c, "Delete", &del.base, &kvarc__v1__empty__descriptor, &rep, 0, msg, sizeof msg), 0);
    if (rep)
        protobuf_c_message_free_unpacked(rep, NULL);
    char cmd[700];
    snprintf(cmd, sizeof cmd, "%s --data %s verify >/dev/null && %s --data %s compact >/dev/null", KD_CLI, dir,
             KD_CLI, dir);
    CHECK(system(cmd) == 0, "kvarc verify and compact");
    CHECK(tcp_health(tcp, "wrong-token-000000") == GRPC_STATUS_UNAUTHENTICATED, "a wrong token is refused");
    CHECK(tcp_health(tcp, "admin-0123456789abcdef") == 0, "the right token is taken");
    t = scrape_quiet(port);
    CHECK(sample(t, "kvarc_rpc_calls_total{method=\"Append\",code=\"INVALID_ARGUMENT\"}") == 1,
          "the refused append counts as INVALID_ARGUMENT");
    CHECK(sample(t, "kvarc_conversations{state=\"live\"}") == 0 &&
          sample(t, "kvarc_conversations{state=\"deleted\"}") <= 1, "the deleted conversation is not live");
    CHECK(sample(t, "kvarc_verify_runs_total") == 1 && sample(t, "kvarc_compaction_runs_total") == 1,
          "one verify and one compaction run");
    CHECK(sample(t, "kvarc_rpc_calls_total{method=\"Verify\",code=\"OK\"}") == 1, "Verify OK");
    CHECK(sample(t, "kvarc_auth_refusals_total") == 1, "one auth refusal: %g", sample(t, "kvarc_auth_refusals_total"));
    CHECK(sample(t, "kvarc_rpc_calls_total{method=\"Health\",code=\"UNAUTHENTICATED\"}") == 1,
          "Health UNAUTHENTICATED = 1");
    free(t);

    /* 5. the Metrics call answers the same text */
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    rep = NULL;
    CHECK_RC(kvc_call(c, "Metrics", &e.base, &kvarc__v1__metrics_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
    if (rep) {
        const char *mt = ((Kvarc__V1__MetricsReply *)rep)->text;
        CHECK(sample(mt, "kvarc_rpc_calls_total{method=\"Append\",code=\"OK\"}") == APPENDS &&
              sample(mt, "kvarc_records_served_total") == FETCHES * FETCH_N, "Metrics answers the same counts");
        protobuf_c_message_free_unpacked(rep, NULL);
    }

    /* 6. kvarc top: two views (not a terminal: one after the other) from the same counters */
    snprintf(cmd, sizeof cmd, "%s --data %s top --count 2 --interval 0.05", KD_CLI, dir);
    FILE *p = popen(cmd, "r");
    char tl[512];
    int views = 0, append_rows = 0, append_total_ok = 0;
    while (p && fgets(tl, sizeof tl, p)) {
        views += !strncmp(tl, "kvarcd " KVARC_VERSION " (git ", 7 + strlen(KVARC_VERSION) + 6);
        if (!strncmp(tl, "Append ", 7)) {
            append_rows++;
            char *last = strrchr(tl, ' ');
            append_total_ok += last && atoi(last + 1) == APPENDS + 1;   /* the refused one too */
        }
    }
    CHECK(p && pclose(p) == 0, "kvarc top --count 2 exits 0");
    CHECK(views == 2 && append_rows == 2 && append_total_ok == 2, "kvarc top: %d views, %d Append rows, %d with "
          "%d calls in all", views, append_rows, append_total_ok, APPENDS + 1);
    snprintf(cmd, sizeof cmd, "%s --data %s top --interval 0 2>/dev/null", KD_CLI, dir);
    CHECK(WEXITSTATUS(system(cmd)) == 2, "kvarc top --interval 0 is a usage error");

    /* 7. a second kvarcd cannot take the port; a bad address is refused */
    char port_arg[32], dir1[240];
    snprintf(port_arg, sizeof port_arg, "127.0.0.1:%d", port);
    snprintf(dir1, sizeof dir1, "%.*s", (int)sizeof dir1 - 1, dir);
    snprintf(dir, sizeof dir, "%s-2", dir1);
    const char *same[] = { "--metrics-listen", port_arg, NULL };
    CHECK(wait_exit(start_daemon_args(same), 30000) == 1, "a second kvarcd on the same metrics port exits 1");
    char log[300], line[1024], last[1024] = "";
    snprintf(log, sizeof log, "%s.log", dir);
    FILE *f = fopen(log, "r");
    while (f && fgets(line, sizeof line, f))
        snprintf(last, sizeof last, "%s", line);
    if (f)
        fclose(f);
    CHECK(strstr(last, port_arg) != NULL, "its log names the address: %s", last);
    const char *bad[] = { "--metrics-listen", "nowhere", NULL };
    CHECK(wait_exit(start_daemon_args(bad), 30000) == 1, "--metrics-listen without a port exits 1");
    snprintf(dir, sizeof dir, "%s", dir1);

    kvc_close(c);
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 30000) == 0, "kvarcd stops cleanly");
    CHECK(http_get(port, "GET", "/health", NULL) == -1, "the endpoint is gone with kvarcd");
    return tu_finish("test_kvarcd_metrics");
}
