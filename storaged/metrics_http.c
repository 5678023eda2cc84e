/* metrics_http.c - /metrics and /health over HTTP, on libmicrohttpd.
 *
 * Design notes
 * Why libmicrohttpd: Debian packages it (libmicrohttpd-dev, 0.9.75 in
 * bookworm), it is a small C library built to be embedded, and it runs
 * its own thread, so the daemon's gRPC workers never serve a scrape.
 * Writing our own HTTP parser is ruled out by the project; a web framework
 * is far more than two GET routes need. Alternatives checked with
 * apt-cache policy on bookworm: civetweb is packaged (libcivetweb-dev
 * 1.15) and would do as well, but brings CGI, Lua, SSL and file serving
 * we would have to keep switched off; "mongoose" in Debian is a graph
 * partitioning tool, not Cesanta's web server, which is not packaged.
 * libmicrohttpd is also what other C Prometheus exporters embed.
 *
 * States (one mh_server):
 *   mh_start: parse HOST:PORT --open_listener--> bound socket (ours)
 *     --MHD_start_daemon--> SERVING (libmicrohttpd owns the socket)
 *     --mh_stop: MHD_stop_daemon--> stopped, freed
 * Invariants: 1. we bind the socket ourselves (getaddrinfo with
 * AI_NUMERICHOST, bind, listen) and hand it over with
 * MHD_OPTION_LISTEN_SOCKET: libmicrohttpd's own bind reports a failure
 * only in its log, and we owe the user the errno and the address. 2. Once
 * MHD_start_daemon has been called the socket is libmicrohttpd's, even if
 * it fails: 0.9.75 closes a listen socket it was given on every failure
 * after taking it (daemon.c, MHD_start_daemon_va), and closing it again
 * here could close a descriptor another thread has just been given. 3.
 * poll, not select, in libmicrohttpd's thread: kvarcd holds many
 * descriptors (segments, LMDB, gRPC) and select cannot watch one above
 * FD_SETSIZE. 4. A request's response is queued on the first call of the
 * access handler: no route takes a body, so none is read.
 */
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "metrics_http.h"

#define MH_CONN_LIMIT   32     /* scrapers are few; more waits in the backlog */
#define MH_CONN_TIMEOUT 10     /* seconds idle before a connection is closed */

struct mh_server {
    struct MHD_Daemon *d;
    mh_render_fn       render;
    mh_health_fn       health;
    void              *arg;
    pthread_mutex_t    log_mu;        /* guards log_last: libmicrohttpd logs from its thread too */
    char               log_last[200]; /* libmicrohttpd's last message, for a failed start */
};

/* ---- address ------------------------------------------------------------ */

/* Splits "HOST:PORT" / "[V6]:PORT" into host and port strings. */
static int split_host_port(const char *hp, char *host, size_t hostlen, char *port, size_t portlen, char *msg,
                           size_t msglen)
{
    const char *h, *he, *p;
    if (hp[0] == '[') {
        h = hp + 1;
        he = strchr(h, ']');
        if (!he || he[1] != ':') {
            snprintf(msg, msglen, "metrics address '%s': write an IPv6 address as [ADDRESS]:PORT, e.g. [::1]:9100",
                     hp);
            return -EINVAL;
        }
        p = he + 2;
    } else {
        he = strrchr(hp, ':');
        if (!he) {
            snprintf(msg, msglen, "metrics address '%s' has no port: write HOST:PORT, e.g. 127.0.0.1:9100", hp);
            return -EINVAL;
        }
        if (memchr(hp, ':', (size_t)(he - hp))) {
            snprintf(msg, msglen, "metrics address '%s': put an IPv6 address in brackets, e.g. [::1]:9100", hp);
            return -EINVAL;
        }
        h = hp;
        p = he + 1;
    }
    if (he == h) {
        snprintf(msg, msglen, "metrics address '%s' has no host: name the address to listen on (0.0.0.0 or [::] "
                 "for every interface), e.g. 127.0.0.1:9100", hp);
        return -EINVAL;
    }
    char *end;
    errno = 0;
    unsigned long v = strtoul(p, &end, 10);
    if (!*p || *end || p[0] < '0' || p[0] > '9' || errno || v > 65535) {
        snprintf(msg, msglen, "metrics address '%s': the port '%s' is not a number in 0..65535", hp, p);
        return -EINVAL;
    }
    if ((size_t)(he - h) >= hostlen) {
        snprintf(msg, msglen, "metrics address '%s': the host is longer than an address can be", hp);
        return -EINVAL;
    }
    memcpy(host, h, (size_t)(he - h));
    host[he - h] = '\0';
    snprintf(port, portlen, "%lu", v);
    return 0;
}

/* A socket bound to host_port and listening; its family and port. Returns
 * the descriptor, or a negative errno with msg. */
static int open_listener(const char *hp, int *family, int *bound_port, char *msg, size_t msglen)
{
    char host[INET6_ADDRSTRLEN + 64], port[8];
    int rc = split_host_port(hp, host, sizeof host, port, sizeof port, msg, msglen);
    if (rc)
        return rc;
    /* "localhost" resolves to ::1 or 127.0.0.1 first depending on
     * /etc/hosts and gai.conf, and we bind one address: fix it */
    const char *node = strcmp(host, "localhost") ? host : "127.0.0.1";
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(node, port, &hints, &ai);
    if (gai) {
        if (gai == EAI_SYSTEM) {
            rc = -errno;
            snprintf(msg, msglen, "metrics address '%s': %s", hp, strerror(errno));
            return rc;
        }
        snprintf(msg, msglen, "metrics address '%s': '%s' is not an IPv4 address, an [IPv6] address or localhost "
                 "(%s)", hp, host, gai_strerror(gai));
        return gai == EAI_MEMORY ? -ENOMEM : -EINVAL;
    }
    int one = 1, fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const char *step = "socket";
    if (fd < 0)
        goto fail;
    /* SO_REUSEADDR: a restart may bind while the last run's connections
     * sit in TIME_WAIT; it does not let two live listeners share a port */
    step = "setsockopt SO_REUSEADDR";
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one))
        goto fail;
    step = "setsockopt IPV6_V6ONLY";   /* [::] means IPv6 only, not IPv4 too */
    if (ai->ai_family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one))
        goto fail;
    step = "bind";
    if (bind(fd, ai->ai_addr, ai->ai_addrlen))
        goto fail;
    step = "listen";
    if (listen(fd, 64))
        goto fail;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    step = "getsockname";
    if (getsockname(fd, (struct sockaddr *)&ss, &sl))
        goto fail;
    *family = ai->ai_family;
    *bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
    freeaddrinfo(ai);
    return fd;
fail:
    rc = -errno;
    if (!strcmp(step, "bind") || !strcmp(step, "listen"))
        snprintf(msg, msglen, "cannot listen for metrics on %s: %s", hp, strerror(errno));
    else
        snprintf(msg, msglen, "cannot listen for metrics on %s: %s: %s", hp, step, strerror(errno));
    if (fd >= 0)
        close(fd);
    freeaddrinfo(ai);
    return rc;
}

/* ---- requests ------------------------------------------------------------- */

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *ctype, char *body,
                             size_t len, enum MHD_ResponseMemoryMode mode, const char *allow)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, mode);
    if (!r) {
        if (mode == MHD_RESPMEM_MUST_FREE)
            free(body);
        return MHD_NO;   /* out of memory: libmicrohttpd closes the connection */
    }
    enum MHD_Result ok = MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (ok == MHD_YES && allow)
        ok = MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    if (ok == MHD_YES)
        ok = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ok;
}

#define TEXT "text/plain; charset=utf-8"

static enum MHD_Result reply_text(struct MHD_Connection *c, unsigned status, const char *allow, const char *fmt,
                                  ...) __attribute__((format(printf, 4, 5)));
static enum MHD_Result reply_text(struct MHD_Connection *c, unsigned status, const char *allow, const char *fmt,
                                  ...)
{
    char body[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    size_t len = n < 0 ? 0 : (size_t)n < sizeof body ? (size_t)n : sizeof body - 1;
    return reply(c, status, TEXT, body, len, MHD_RESPMEM_MUST_COPY, allow);
}

static enum MHD_Result serve_metrics(mh_server *s, struct MHD_Connection *c)
{
    prom_buf b;
    prom_buf_init(&b);
    int rc = s->render(s->arg, &b);
    if (!rc && b.err)
        rc = b.err;
    if (rc) {
        enum MHD_Result r = reply_text(c, MHD_HTTP_INTERNAL_SERVER_ERROR, NULL, "cannot render metrics: %s\n",
                                       b.err ? b.errmsg : strerror(rc < 0 ? -rc : rc));
        prom_buf_free(&b);
        return r;
    }
    if (!b.len) {
        prom_buf_free(&b);
        return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", (char *)"", 0,
                     MHD_RESPMEM_PERSISTENT, NULL);
    }
    /* the response takes the buffer and frees it (free()) when sent */
    return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", b.data, b.len, MHD_RESPMEM_MUST_FREE,
                 NULL);
}

static enum MHD_Result serve_health(mh_server *s, struct MHD_Connection *c)
{
    char reason[256] = "";
    int rc = s->health ? s->health(s->arg, reason, sizeof reason) : 0;
    if (!rc)
        return reply_text(c, MHD_HTTP_OK, NULL, "ok\n");
    reason[sizeof reason - 1] = '\0';
    if (reason[0])
        return reply_text(c, MHD_HTTP_SERVICE_UNAVAILABLE, NULL, "%s\n", reason);
    return reply_text(c, MHD_HTTP_SERVICE_UNAVAILABLE, NULL, "unhealthy (the health check returned %d)\n", rc);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **req_cls)
{
    (void)version;
    (void)upload_data;
    (void)upload_data_size;
    (void)req_cls;
    mh_server *s = cls;
    /* libmicrohttpd hands over the path without the query; cut it anyway */
    size_t plen = strcspn(url, "?");
    int metrics = plen == 8 && !memcmp(url, "/metrics", 8);
    int health = plen == 7 && !memcmp(url, "/health", 7);
    if (!metrics && !health)
        return reply_text(c, MHD_HTTP_NOT_FOUND, NULL, "not found: %.*s (try /metrics or /health)\n",
                          (int)(plen > 200 ? 200 : plen), url);
    if (strcmp(method, MHD_HTTP_METHOD_GET) && strcmp(method, MHD_HTTP_METHOD_HEAD))
        return reply_text(c, MHD_HTTP_METHOD_NOT_ALLOWED, "GET, HEAD", "method %.32s not allowed on %s: use GET\n",
                          method, metrics ? "/metrics" : "/health");
    return metrics ? serve_metrics(s, c) : serve_health(s, c);
}

/* ---- start and stop -------------------------------------------------------- */

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    mh_server *s = cls;
    pthread_mutex_lock(&s->log_mu);
    vsnprintf(s->log_last, sizeof s->log_last, fmt, ap);
    size_t n = strlen(s->log_last);
    while (n && (s->log_last[n - 1] == '\n' || s->log_last[n - 1] == '\r'))
        s->log_last[--n] = '\0';
    pthread_mutex_unlock(&s->log_mu);
}

int mh_start(const char *host_port, mh_render_fn render, mh_health_fn health, void *arg, mh_server **out,
             int *bound_port, char *msg, size_t msglen)
{
    *out = NULL;
    if (!host_port || !render) {
        snprintf(msg, msglen, "mh_start: %s is NULL", host_port ? "the render callback" : "the address");
        return -EINVAL;
    }
    int family = 0, port = 0;
    int fd = open_listener(host_port, &family, &port, msg, msglen);
    if (fd < 0)
        return fd;
    mh_server *s = calloc(1, sizeof *s);
    if (!s) {
        close(fd);
        snprintf(msg, msglen, "cannot serve metrics on %s: out of memory", host_port);
        return -ENOMEM;
    }
    s->render = render;
    s->health = health;
    s->arg = arg;
    pthread_mutex_init(&s->log_mu, NULL);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    if (MHD_is_feature_supported(MHD_FEATURE_POLL) == MHD_YES)
        flags |= MHD_USE_POLL;
    if (family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* from here the socket is libmicrohttpd's (invariant 2) */
    s->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s,
                            MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)MH_CONN_LIMIT,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)MH_CONN_TIMEOUT,
                            MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, s,
                            MHD_OPTION_END);
    if (!s->d) {
        snprintf(msg, msglen, "cannot serve metrics on %s: libmicrohttpd did not start (%s)", host_port,
                 s->log_last[0] ? s->log_last : "no reason given");
        pthread_mutex_destroy(&s->log_mu);
        free(s);
        return -EIO;
    }
    if (bound_port)
        *bound_port = port;
    *out = s;
    return 0;
}

void mh_stop(mh_server *s)
{
    if (!s)
        return;
    MHD_stop_daemon(s->d);
    pthread_mutex_destroy(&s->log_mu);
    free(s);
}
