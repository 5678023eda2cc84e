/* test_metrics_http.c - the /metrics and /health endpoint (storaged/metrics_http.h)
 * spoken to with a plain socket client: status lines, headers, bodies,
 * routing, a port already taken, bad addresses, IPv6 where ::1 exists.
 * Every request reads to EOF (Connection: close), so the test waits on
 * exactly what it checks and never sleeps. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "metrics_http.h"
#include "testutil.h"

typedef struct srv_state {
    atomic_int renders;     /* render calls so far */
    atomic_int fail;        /* 0 render well; 1 return -EIO; 2 write a bad metric name */
    atomic_int unhealthy;   /* 0 healthy; 1 with a reason; 2 without one */
} srv_state;

static int render(void *arg, prom_buf *out)
{
    srv_state *st = arg;
    int n = atomic_fetch_add(&st->renders, 1) + 1;
    switch (atomic_load(&st->fail)) {
    case 1: return -EIO;
    case 2: prom_sample_u64(out, "bad name", NULL, 1); return 0;
    }
    prom_family(out, "test_renders_total", "counter", "Render calls.");
    prom_sample_u64(out, "test_renders_total", NULL, (uint64_t)n);
    return 0;
}

static int health(void *arg, char *reason, size_t len)
{
    srv_state *st = arg;
    switch (atomic_load(&st->unhealthy)) {
    case 1: snprintf(reason, len, "engine is read-only: disk full"); return 1;
    case 2: return 7;
    }
    return 0;
}

typedef struct http_resp {
    int    status;         /* from the status line; -1 if none came */
    char   raw[65536];     /* everything read, NUL-terminated */
    size_t raw_len;
    char  *body;           /* into raw, after the blank line */
} http_resp;

/* Sends req to addr:port (IPv4 or IPv6 literal) and reads the reply to
 * EOF. 0, or -errno of the connect (or -EPROTO for no status line). */
static int http(const char *addr, int port, const char *req, http_resp *r)
{
    memset(r, 0, sizeof *r);
    r->status = -1;
    struct sockaddr_storage ss = {0};
    socklen_t sl;
    int family = strchr(addr, ':') ? AF_INET6 : AF_INET;
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        inet_pton(AF_INET6, addr, &a->sin6_addr);
        sl = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        inet_pton(AF_INET, addr, &a->sin_addr);
        sl = sizeof *a;
    }
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* a safety net only: a hung server fails the test instead of hanging it */
    struct timeval tv = {.tv_sec = 20};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&ss, sl)) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    for (size_t off = 0, n = strlen(req); off < n;) {
        ssize_t w = send(fd, req + off, n - off, MSG_NOSIGNAL);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    for (;;) {
        ssize_t got = recv(fd, r->raw + r->raw_len, sizeof r->raw - 1 - r->raw_len, 0);
        if (got <= 0)
            break;
        r->raw_len += (size_t)got;
        if (r->raw_len == sizeof r->raw - 1)
            break;
    }
    close(fd);
    r->raw[r->raw_len] = '\0';
    int st;
    if (sscanf(r->raw, "HTTP/1.%*d %d ", &st) != 1)
        return -EPROTO;
    r->status = st;
    char *blank = strstr(r->raw, "\r\n\r\n");
    r->body = blank ? blank + 4 : r->raw + r->raw_len;
    return 0;
}

/* The value of header name (case-insensitive), copied into v; NULL if absent. */
static const char *header(const http_resp *r, const char *name, char *v, size_t vlen)
{
    size_t nl = strlen(name);
    const char *end = r->body ? r->body : r->raw + r->raw_len;
    for (const char *p = strstr(r->raw, "\r\n"); p && p + 2 < end; p = strstr(p + 2, "\r\n")) {
        const char *h = p + 2;
        if (!strncasecmp(h, name, nl) && h[nl] == ':') {
            h += nl + 1;
            while (*h == ' ')
                h++;
            size_t n = strcspn(h, "\r\n");
            snprintf(v, vlen, "%.*s", (int)n, h);
            return v;
        }
    }
    return NULL;
}

/* Binds (and closes) an IPv4 socket to addr:port: 0, or -errno. SO_REUSEADDR
 * so that a connection in TIME_WAIT on that port does not count; a
 * listening socket still does. */
static int probe_bind(const char *addr, int port)
{
    int one = 1, rc = 0, fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, addr, &a.sin_addr);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        bind(fd, (struct sockaddr *)&a, sizeof a))
        rc = -errno;
    if (fd >= 0)
        close(fd);
    return rc;
}

#define GET(path) "GET " path " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
#define PROM_CTYPE "text/plain; version=0.0.4; charset=utf-8"

static const char *metrics_body(int n, char *buf, size_t len)
{
    snprintf(buf, len, "# HELP test_renders_total Render calls.\n# TYPE test_renders_total counter\n"
                       "test_renders_total %d\n", n);
    return buf;
}

/* GET /metrics on addr:port answers 200 with the n-th render. */
static void check_metrics(const char *addr, int port, int n)
{
    http_resp *r = malloc(sizeof *r);
    char want[256], v[128];
    CHECK(r != NULL, "malloc");
    if (!r)
        return;
    int rc = http(addr, port, GET("/metrics"), r);
    CHECK(rc == 0 && r->status == 200, "GET /metrics on %s:%d: rc %d, status %d\n%s", addr, port, rc, r->status,
          r->raw);
    CHECK(header(r, "Content-Type", v, sizeof v) && !strcmp(v, PROM_CTYPE), "Content-Type '%s'\n%s",
          header(r, "Content-Type", v, sizeof v) ? v : "(none)", r->raw);
    CHECK(r->body && !strcmp(r->body, metrics_body(n, want, sizeof want)), "body:\n%s\nwant:\n%s",
          r->body ? r->body : "(none)", want);
    free(r);
}

static void test_routes(void)
{
    static srv_state st;
    mh_server *s = NULL;
    int port = -1;
    char msg[256] = "", v[128], want[256];
    int rc = mh_start("127.0.0.1:0", render, health, &st, &s, &port, msg, sizeof msg);
    CHECK(rc == 0 && s && port > 0 && port < 65536, "mh_start 127.0.0.1:0: rc %d port %d: %s", rc, port, msg);
    if (rc)
        return;
    http_resp *r = malloc(sizeof *r);
    CHECK(r != NULL, "malloc");
    if (!r) {
        mh_stop(s);
        return;
    }

    /* /metrics: 200, the format's content type, the render's text; one render per scrape */
    check_metrics("127.0.0.1", port, 1);
    CHECK(atomic_load(&st.renders) == 1, "renders %d after one scrape", atomic_load(&st.renders));
    rc = http("127.0.0.1", port, GET("/metrics?x=1&name[]=y"), r);
    CHECK(rc == 0 && r->status == 200 && !strcmp(r->body, metrics_body(2, want, sizeof want)),
          "GET /metrics?x=1: rc %d\n%s", rc, r->raw);

    /* HEAD: the same headers, no body */
    rc = http("127.0.0.1", port, "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", r);
    snprintf(want, sizeof want, "%zu", strlen(metrics_body(3, v, sizeof v)));
    CHECK(rc == 0 && r->status == 200 && r->body && !*r->body, "HEAD /metrics: rc %d\n%s", rc, r->raw);
    CHECK(header(r, "Content-Length", v, sizeof v) && !strcmp(v, want), "HEAD Content-Length '%s', want %s",
          header(r, "Content-Length", v, sizeof v) ? v : "(none)", want);
    CHECK(header(r, "Content-Type", v, sizeof v) && !strcmp(v, PROM_CTYPE), "HEAD Content-Type\n%s", r->raw);
    CHECK(atomic_load(&st.renders) == 3, "renders %d after three scrapes", atomic_load(&st.renders));

    /* a failing render: 500 and why, never a partial body */
    atomic_store(&st.fail, 1);
    rc = http("127.0.0.1", port, GET("/metrics"), r);
    CHECK(rc == 0 && r->status == 500 && !strcmp(r->body, "cannot render metrics: Input/output error\n"),
          "render -EIO: rc %d\n%s", rc, r->raw);
    atomic_store(&st.fail, 2);
    rc = http("127.0.0.1", port, GET("/metrics"), r);
    CHECK(rc == 0 && r->status == 500 && strstr(r->body, "cannot render metrics: metric name 'bad name'") &&
              !strstr(r->body, "test_renders_total"),
          "render with a bad name: rc %d\n%s", rc, r->raw);
    atomic_store(&st.fail, 0);
    check_metrics("127.0.0.1", port, 6);

    /* /health: ok, then 503 with the reason, then 503 without one */
    rc = http("127.0.0.1", port, GET("/health"), r);
    CHECK(rc == 0 && r->status == 200 && !strcmp(r->body, "ok\n"), "healthy: rc %d\n%s", rc, r->raw);
    atomic_store(&st.unhealthy, 1);
    rc = http("127.0.0.1", port, GET("/health?verbose"), r);
    CHECK(rc == 0 && r->status == 503 && !strcmp(r->body, "engine is read-only: disk full\n"),
          "unhealthy: rc %d\n%s", rc, r->raw);
    atomic_store(&st.unhealthy, 2);
    rc = http("127.0.0.1", port, GET("/health"), r);
    CHECK(rc == 0 && r->status == 503 && strstr(r->body, "returned 7"), "unhealthy, no reason: rc %d\n%s", rc,
          r->raw);
    atomic_store(&st.unhealthy, 0);
    rc = http("127.0.0.1", port, GET("/health"), r);
    CHECK(rc == 0 && r->status == 200 && !strcmp(r->body, "ok\n"), "healthy again: rc %d\n%s", rc, r->raw);

    /* unknown paths: 404, whatever the method */
    static const char *const unknown[] = {
        GET("/nope"), GET("/"), GET("/metricsx"), GET("/metrics/"), GET("/healthz"),
        "POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        rc = http("127.0.0.1", port, unknown[i], r);
        CHECK(rc == 0 && r->status == 404 && strstr(r->body, "not found"), "%.40s: rc %d\n%s", unknown[i], rc,
              r->raw);
    }
    /* other methods on our paths: 405 with Allow, and no render */
    int before = atomic_load(&st.renders);
    static const char *const other[] = {
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        "PUT /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        "DELETE /metrics?x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof other / sizeof other[0]; i++) {
        rc = http("127.0.0.1", port, other[i], r);
        CHECK(rc == 0 && r->status == 405 && strstr(r->body, "not allowed") &&
                  header(r, "Allow", v, sizeof v) && !strcmp(v, "GET, HEAD"),
              "%.40s: rc %d\n%s", other[i], rc, r->raw);
    }
    CHECK(atomic_load(&st.renders) == before, "405s rendered: %d -> %d", before, atomic_load(&st.renders));

    /* the port is taken: a second server fails and says where */
    char hp[64], want_msg[128];
    snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
    snprintf(want_msg, sizeof want_msg, "cannot listen for metrics on %s: %s", hp, strerror(EADDRINUSE));
    mh_server *s2 = (mh_server *)&st;   /* mh_start must set it to NULL */
    int port2 = -1;
    rc = mh_start(hp, render, health, &st, &s2, &port2, msg, sizeof msg);
    CHECK(rc == -EADDRINUSE && s2 == NULL && port2 == -1 && !strcmp(msg, want_msg), "second mh_start on %s: rc %d, "
          "msg '%s', want '%s'", hp, rc, msg, want_msg);
    if (!rc)
        mh_stop(s2);

    /* only 127.0.0.1 is bound: 127.0.0.2 (loopback too) on the same port is
     * free, which it would not be had the server bound every interface */
    rc = probe_bind("127.0.0.2", port);
    CHECK(rc == 0, "bind 127.0.0.2:%d: %s (is the metrics server bound to every interface?)", port, strerror(-rc));

    /* stopped: nothing listens, no more renders */
    int renders = atomic_load(&st.renders);
    mh_stop(s);
    rc = http("127.0.0.1", port, GET("/metrics"), r);
    CHECK(rc == -ECONNREFUSED, "GET after mh_stop: rc %d, want -ECONNREFUSED\n%s", rc, r->raw);
    CHECK(atomic_load(&st.renders) == renders, "rendered after mh_stop");
    mh_stop(NULL);
    free(r);
}

static void test_bad_addresses(void)
{
    static const struct {
        const char *hp, *want;
    } cases[] = {
        {"nohost", "has no port"},
        {"::1:9100", "in brackets"},
        {"[::1]9100", "[ADDRESS]:PORT"},
        {"[::1", "[ADDRESS]:PORT"},
        {":9100", "has no host"},
        {"[]:9100", "has no host"},
        {"127.0.0.1:", "the port '' is not"},
        {"127.0.0.1:65536", "the port '65536' is not"},
        {"127.0.0.1:x", "the port 'x' is not"},
        {"127.0.0.1:-1", "the port '-1' is not"},
        {"127.0.0.1:+80", "the port '+80' is not"},
        {"127.0.0.1:80 ", "the port '80 ' is not"},
        {"example.com:80", "'example.com' is not an IPv4 address"},
        {"256.0.0.1:80", "'256.0.0.1' is not an IPv4 address"},
        {"[127.0.0.1x]:80", "'127.0.0.1x' is not"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mh_server *s = NULL;
        char msg[256] = "";
        int rc = mh_start(cases[i].hp, render, NULL, NULL, &s, NULL, msg, sizeof msg);
        CHECK(rc == -EINVAL && !s && strstr(msg, cases[i].hp) && strstr(msg, cases[i].want),
              "mh_start '%s': rc %d, msg '%s' (want -EINVAL and '%s')", cases[i].hp, rc, msg, cases[i].want);
        if (!rc)
            mh_stop(s);
    }
    mh_server *s = NULL;
    char msg[256] = "";
    CHECK(mh_start("127.0.0.1:0", NULL, NULL, NULL, &s, NULL, msg, sizeof msg) == -EINVAL && !s &&
              strstr(msg, "render"),
          "a NULL render callback: '%s'", msg);
}

/* "localhost" is 127.0.0.1; health NULL is always healthy. */
static void test_localhost(void)
{
    static srv_state st;
    mh_server *s = NULL;
    int port = -1;
    char msg[256] = "";
    int rc = mh_start("localhost:0", render, NULL, &st, &s, &port, msg, sizeof msg);
    CHECK(rc == 0 && port > 0, "mh_start localhost:0: rc %d: %s", rc, msg);
    if (rc)
        return;
    check_metrics("127.0.0.1", port, 1);
    http_resp *r = malloc(sizeof *r);
    if (r) {
        rc = http("127.0.0.1", port, GET("/health"), r);
        CHECK(rc == 0 && r->status == 200 && !strcmp(r->body, "ok\n"), "health NULL: rc %d\n%s", rc, r->raw);
        free(r);
    }
    mh_stop(s);
}

/* [::1]:0 where the machine has ::1; skipped (not failed) where it has not. */
static void test_ipv6(void)
{
    static srv_state st;
    mh_server *s = NULL;
    int port = -1;
    char msg[256] = "";
    int rc = mh_start("[::1]:0", render, health, &st, &s, &port, msg, sizeof msg);
    if (rc == -EADDRNOTAVAIL || rc == -EAFNOSUPPORT) {
        printf("test_metrics_http: no ::1 here (%s): IPv6 part skipped\n", msg);
        return;
    }
    CHECK(rc == 0 && port > 0, "mh_start [::1]:0: rc %d: %s", rc, msg);
    if (rc)
        return;
    check_metrics("::1", port, 1);
    char hp[64];
    snprintf(hp, sizeof hp, "[::1]:%d", port);
    mh_server *s2 = NULL;
    rc = mh_start(hp, render, health, &st, &s2, NULL, msg, sizeof msg);
    CHECK(rc == -EADDRINUSE && strstr(msg, hp), "second mh_start on %s: rc %d, msg '%s'", hp, rc, msg);
    if (!rc)
        mh_stop(s2);
    mh_stop(s);

    /* [::] is IPv6 only: IPv4's 0.0.0.0 on the same port stays free (a
     * dual-stack socket, the kernel's default, would hold it too). The port
     * is free for IPv6 only, so an IPv4 socket of another test may hold it
     * by chance: three ports in a row must all be taken to fail. */
    int tries = 0;
    for (rc = -1; rc && tries < 3; tries++) {
        rc = mh_start("[::]:0", render, health, &st, &s, &port, msg, sizeof msg);
        CHECK(rc == 0, "mh_start [::]:0: rc %d: %s", rc, msg);
        if (rc)
            return;
        rc = probe_bind("0.0.0.0", port);
        mh_stop(s);
    }
    CHECK(rc == 0, "bind 0.0.0.0 beside [::] on the same port, %d tries: %s", tries, strerror(-rc));
}

int main(void)
{
    test_routes();
    test_bad_addresses();
    test_localhost();
    test_ipv6();
    return tu_finish("test_metrics_http");
}
