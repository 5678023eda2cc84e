/* rpc_server.h - kvarcd's gRPC service over the engine (internal to kvarcd): the
 * call machine is rpc_call.c, kvarc's methods rpc_handlers.c. */
#ifndef KVARC_RPC_SERVER_H
#define KVARC_RPC_SERVER_H

#include <grpc/status.h>

#include "auth.h"
#include "kvd.h"
#include "prom.h"

#include "kvarc_version.h"   /* generated: the project version and git revision */
#define KVARCD_VERSION KVARC_VERSION
/* gRPC's default receive limit is 4 MiB; requests carry at most one
 * conversation's means (32 layers x 8 heads x 2 x 128 fp32 = 256 KiB) today,
 * and record payloads will stream in chunks of <= 4 MiB: 16 MiB leaves room. */
#define RPC_MAX_MESSAGE (16 << 20)
/* One message of a stream (AppendStream): at most 4 MiB, as DESIGN.md asks. */
#define RPC_STREAM_CHUNK (4 << 20)

typedef struct rpc_server rpc_server;

/* One log line per finished call: method, the conversation it touched (0:
 * none), who called (a token's tag, or "local"), gRPC status, message,
 * duration. */
typedef void (*rpc_log_fn)(const char *method, uint64_t conv, const char *who, int status,
                           const char *msg, double ms);

typedef struct rpc_config {
    const char        *unix_addr;     /* "unix:/path": local callers, unscoped */
    const char        *tcp_addr;      /* "host:port" or NULL; needs tokens */
    auth_tokens       *tokens;        /* bearer tokens for TCP callers (the server takes a reference) */
    const char        *tls_cert_pem;  /* with tls_key_pem: TLS on tcp_addr */
    const char        *tls_key_pem;
    int                threads;       /* completion-queue workers */
    int                rerank_threads; /* readers one RerankLayer may use at once (<= 1: one) */
    rpc_log_fn         log;
} rpc_config;

/* Start serving e as cfg says. grpc_init() must have been called.
 * *tcp_port is the bound TCP port (useful with port 0). 0 or a negative
 * errno with msg filled. */
int rpc_server_start(kvd_engine *e, const rpc_config *cfg, rpc_server **out, int *tcp_port, char *msg,
                     size_t msglen);

/* Stop accepting, let calls in flight finish for grace_ms, then cancel the
 * rest; free everything. Returns 1 if calls had to be cancelled. */
int rpc_server_stop(rpc_server *s, int grace_ms);

/* Serve with the token set t from now on (SIGHUP's new token file): the
 * server takes a reference to t and drops its old set's; calls already
 * authenticated keep the set they were checked against until they end. */
void rpc_server_set_tokens(rpc_server *s, auth_tokens *t);

/* Every metric in Prometheus text format, appended to b: the build, the
 * calls (by method and status, latency, bytes, records, auth refusals) and
 * the engine's (kvd_metrics). b->err says whether it all fit. */
void rpc_server_metrics(rpc_server *s, prom_buf *b);

#endif
