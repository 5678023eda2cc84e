/* rpc_server.h - kvarcd's gRPC service over the engine (internal to kvarcd). */
#ifndef KVARC_RPC_SERVER_H
#define KVARC_RPC_SERVER_H

#include <grpc/status.h>

#include "kvd.h"

#define KVARCD_VERSION "0.1.0"
/* gRPC's default receive limit is 4 MiB; requests carry at most one
 * conversation's means (32 layers x 8 heads x 2 x 128 fp32 = 256 KiB) today,
 * and record payloads will stream in chunks of <= 4 MiB: 16 MiB leaves room. */
#define RPC_MAX_MESSAGE (16 << 20)
/* One message of a stream (AppendStream): at most 4 MiB, as DESIGN.md asks. */
#define RPC_STREAM_CHUNK (4 << 20)

typedef struct rpc_server rpc_server;

/* One log line per finished call: method, gRPC status, message, duration. */
typedef void (*rpc_log_fn)(const char *method, int status, const char *msg, double ms);

/* Start serving e on addr ("unix:/path" or "host:port") with `threads`
 * workers. grpc_init() must have been called. 0 or a negative errno with
 * msg filled. */
int rpc_server_start(kvd_engine *e, const char *addr, int threads, rpc_log_fn log, rpc_server **out,
                     char *msg, size_t msglen);

/* Stop accepting, let calls in flight finish for grace_ms, then cancel the
 * rest; free everything. Returns 1 if calls had to be cancelled. */
int rpc_server_stop(rpc_server *s, int grace_ms);

/* The gRPC status for an engine return code. */
grpc_status_code rpc_status_of(int rc);

#endif
