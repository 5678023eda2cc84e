/* rpc_call.h - kvarcd's gRPC call machine, as the handlers see it.
 *
 * The machine (rpc_call.c) accepts calls, authenticates them, routes each
 * to its method in a table (rpc_method), runs the handler, sends the reply
 * or the status, streams in both directions, runs long calls (jobs) on
 * threads of their own, and counts every call for the metrics. It knows
 * no kvarc message: handlers get request bytes and give back byte buffers
 * (rpc_handlers.c holds kvarc's methods and their table). */
#ifndef KVARC_RPC_CALL_H
#define KVARC_RPC_CALL_H

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>
#include <stdint.h>

#include "auth.h"
#include "kvd.h"
#include "rpc_server.h"

/* What a handler sees of its call. */
typedef struct rpc_ctx {
    kvd_engine       *e;
    kvd_reader       *reader;     /* the worker's (or the job thread's) io_uring reader, for this call alone */
    const auth_scope *scope;      /* the caller's token; NULL: the local socket, unscoped */
    const char       *method;     /* "/kvarc.v1.Kvarc/Append" */
    uint64_t          log_conv;   /* the conversation the call touched (the handler sets it), for the log */
    uint64_t          records_out;   /* records (token x head) the reply carries, for the metrics */
    uint64_t          records_in;    /* records the call stored */
    void             *state;      /* a stream's state between its messages (the method's release frees it) */
} rpc_ctx;

/* A handler gets its request decoded (of the method's request type, its
 * strings checked) and owned by the machine, which frees it afterwards. */
typedef int (*rpc_unary_fn)(rpc_ctx *c, ProtobufCMessage *req, grpc_byte_buffer **out, kvd_err *err);

typedef enum {
    RPC_UNARY,          /* one request, one reply: run on a worker */
    RPC_JOB,            /* one request, progress events, one reply: run on a thread of its own */
    RPC_CLIENT_STREAM,  /* requests until the client closes, then one reply */
    RPC_SERVER_STREAM,  /* one request, replies until the handler says done */
} rpc_kind;

typedef struct rpc_method {
    const char  *path;    /* "/kvarc.v1.Kvarc/Append" */
    const char  *name;    /* "Append": the metrics' method label */
    const ProtobufCMessageDescriptor *request;   /* every request message is one of these */
    rpc_kind     kind;
    /* UNARY, JOB: the call. CLIENT_STREAM: one message (out unused). SERVER_STREAM: the request (out unused). */
    rpc_unary_fn fn;
    /* CLIENT_STREAM: the reply once the client has closed. SERVER_STREAM: the
     * next message, *out NULL when the stream is complete. */
    int        (*next)(rpc_ctx *c, grpc_byte_buffer **out, kvd_err *err);
    /* CLIENT_STREAM: the message of a failed stream, made from the handler's
     * (err->msg) and the state (e.g. how much was stored); may be NULL. */
    void       (*failed)(rpc_ctx *c, kvd_err *err);
    void       (*release)(void *state);   /* frees c->state at the call's end; may be NULL */
} rpc_method;

/* A JOB's progress: sends msg (taking it) as the next event unless one is
 * still in flight or the last went out under 200 ms ago (then msg is freed).
 * Returns nonzero once the daemon's grace period is over: the job stops. */
int rpc_job_event(rpc_ctx *c, grpc_byte_buffer *msg);
/* Whether a progress event would go out now (rpc_job_event would send it):
 * lets a job skip building one. */
int rpc_job_due(rpc_ctx *c);

/* Readers for one call's parallel work: rs[0] is the call's own, then the
 * server's helper readers free now (at most max in all). Returns how many;
 * give them back with rpc_readers_return. */
int  rpc_readers_borrow(rpc_ctx *c, kvd_reader **rs, int max);
void rpc_readers_return(rpc_ctx *c, kvd_reader *const *rs, int n);

/* Every metric (rpc_server_metrics) appended to b, for the Metrics method. */
void rpc_ctx_metrics(rpc_ctx *c, prom_buf *b);

/* Milliseconds since the server started. */
uint64_t rpc_uptime_ms(rpc_ctx *c);

/* ---- local calls: a method run in process, with no gRPC server or socket ----
 * What kvarcd does with one request's bytes once the call is routed: the
 * method's request decoded and its strings checked, then its handler on
 * the engine, as for a caller on the local socket (no token: unscoped).
 * For the fuzz targets (fuzz/fuzz_rpc.c) and tools that serve a request
 * without a daemon. A JOB runs inline and sends no progress (there is no
 * call to send it on); a CLIENT_STREAM gets `in` as its only message, then
 * the client's close (its reply); a SERVER_STREAM runs to its end and *out
 * is its first message (the others are made and dropped). One rpc_local
 * serves one thread at a time. */
typedef struct rpc_local rpc_local;
/* An io_uring reader on e for local calls; 0 or the reader's error. */
int  rpc_local_open(kvd_engine *e, rpc_local **out, kvd_err *err);
void rpc_local_close(rpc_local *l);
/* Method m (one of rpc_methods) on the request bytes in[len]. Returns 0
 * with *out the reply (the caller's: grpc_byte_buffer_destroy; NULL when
 * a server stream sent none), or the handler's code with err set (a
 * request that does not decode is -EINVAL and touches nothing). */
int  rpc_call_local(rpc_local *l, const rpc_method *m, const uint8_t *in, size_t len, grpc_byte_buffer **out,
                    kvd_err *err);

/* kvarc's methods (rpc_handlers.c). */
extern const rpc_method rpc_methods[];
extern const size_t     rpc_nmethods;

#endif
