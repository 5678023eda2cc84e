/* metrics_http.h - the HTTP endpoint for Prometheus scrapes (internal).
 *
 * For kvarcd's --metrics-listen HOST:PORT. Serves, on one address only:
 *
 *   GET|HEAD /metrics  200, Content-Type: text/plain; version=0.0.4; charset=utf-8,
 *                      the text the render callback wrote; 500 and why when
 *                      it fails
 *   GET|HEAD /health   200 "ok\n", or 503 and the health callback's reason
 *   other paths        404; another method on /metrics or /health: 405
 *
 * A query string is ignored for routing (/metrics?x=1 is /metrics).
 *
 * Threads: one thread of libmicrohttpd's own serves every connection; the
 * callbacks run on it, one at a time, never after mh_stop returns. They
 * must not block for long (a scrape waits on them) and must not call
 * mh_stop.
 *
 * Caveats
 * - No TLS and no authentication: bind it to loopback or a private
 *   network. The body says only what the render callback chooses to.
 * - libmicrohttpd's own diagnostics while serving (a client that closes
 *   early, a malformed request) are not logged; the client gets its
 *   4xx/5xx from libmicrohttpd.
 * - fork(): do not use a server in a child process.
 */
#ifndef KVARC_METRICS_HTTP_H
#define KVARC_METRICS_HTTP_H

#include <stddef.h>

#include "prom.h"

typedef struct mh_server mh_server;

/* Fills out (empty on entry) with the /metrics body. 0, or a negative
 * errno: then, and when out->err is set, the scrape gets 500 with
 * out->errmsg (or the errno's text) instead of the body. */
typedef int (*mh_render_fn)(void *arg, prom_buf *out);

/* 0 = healthy; nonzero = unhealthy, with a one-line reason written into
 * reason (len bytes, "" on entry) for the 503 body. */
typedef int (*mh_health_fn)(void *arg, char *reason, size_t len);

/* Listens on host_port and serves until mh_stop.
 *   host_port  "HOST:PORT": HOST is an IPv4 address, an IPv6 address in
 *              brackets ([::1]:9100; a zone as [fe80::1%eth0]) or
 *              "localhost" (127.0.0.1); only that address is bound, so
 *              all interfaces take 0.0.0.0 or [::] (IPv6 only) said
 *              explicitly. Names are not resolved. PORT 0 takes a free port.
 *   render     required; health may be NULL (always healthy). Both get arg.
 *   out        the server, for mh_stop.
 *   bound_port (may be NULL) the port listened on: PORT, or the one chosen for 0.
 * Returns 0, or a negative errno with msg (msglen bytes) saying what and
 * where, e.g. "cannot listen for metrics on 127.0.0.1:9100: Address
 * already in use": -EINVAL for a malformed host_port, the socket call's
 * errno for bind/listen, -ENOMEM, -EIO if libmicrohttpd does not start. */
int mh_start(const char *host_port, mh_render_fn render, mh_health_fn health, void *arg, mh_server **out,
             int *bound_port, char *msg, size_t msglen);

/* Stops serving (closes the socket, ends open connections, joins the
 * thread) and frees s. NULL is a no-op. */
void mh_stop(mh_server *s);

#endif
