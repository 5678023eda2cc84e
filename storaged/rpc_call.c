/* rpc_call.c - kvarcd's gRPC call machine (unary, streams, jobs), over the
 * gRPC C core; it knows no kvarc message (the methods: rpc_handlers.c).
 *
 * Design notes
 * Threads: N workers, each with its own completion queue registered with
 * the server; each keeps one call requested at a time on its queue, so
 * new calls spread over the workers. Handlers run on the workers and block
 * in disk work (group commit: pwritev + fdatasync + LMDB commit; LMDB's
 * writer lock; io_uring reads). gRPC's I/O (accepting connections, the
 * HTTP/2 handshake, reading requests) runs only on threads inside
 * grpc_completion_queue_next: with every worker in a handler, a new
 * connection got no SETTINGS frame until one returned (measured: none in
 * 5 s with both workers waiting on the LMDB writer lock). So one more
 * thread (io_main) waits on a queue of its own, registered with the server
 * but never given a call: it only drives I/O, and is never busy.
 * A call's states (tag = the rpc_call):
 *   REQUESTED --on_requested--> RECEIVING --on_received--> FINISHING
 *     --(its last event)--> freed
 *   REQUESTED: grpc_server_request_call outstanding. On success the worker
 *     requests the next call first, then starts [send initial metadata,
 *     receive message]. On failure (server shutting down) it frees it.
 *   RECEIVING: the caller is authenticated, the method found in the table
 *     (rpc_methods), the handler runs against the engine, and [send
 *     message, send status, receive close] starts. A request that does not
 *     decode is INVALID_ARGUMENT, and the engine is not touched.
 *   RECEIVING again (RPC_CLIENT_STREAM): each message goes to the handler
 *     before the next [receive message] starts; the client's close (no
 *     message) leads to the method's reply (next).
 *   SENDING (RPC_SERVER_STREAM): one message in flight at a time; its
 *     completion asks the method for the next (stream_step) until it has none.
 *   JOB (RPC_JOB): job_start hands the call to a thread of its own, so long
 *     work holds no worker. The handler's progress (rpc_job_event) sends an
 *     event when none is in flight (job_sending); the worker frees it on
 *     completion (on_job_sent). At the end the thread waits for job_sending
 *     to clear, then finishes. When the grace period is over, rpc_job_event
 *     returns nonzero and the engine stops (-ECANCELED, nothing changed).
 *   FINISHING: every buffer, slice and the call are released, and the call
 *     is counted (rpc_stats: by method and status, latency, bytes).
 * Invariants: 1. every buffer a batch refers to lives in the rpc_call until
 * that batch's event arrives; 2. only the worker owning the queue touches a
 * call (a JOB's thread owns it until it finishes); 3. shutdown order:
 * shutdown_and_notify -> after the grace period cancel_all_calls and stop
 * jobs -> wait the notify tag -> wait for the job threads -> wait until no
 * call is in flight (a cancelled call's last batch must find its queue
 * open) -> destroy the server -> shut down and drain every queue -> join
 * the workers.
 */
#include <assert.h>
#include <errno.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd_internal.h"
#include "pb_strings.h"
#include "rpc_call.h"
#include "wire.h"

enum { REQUESTED, RECEIVING, SENDING, JOB, FINISHING };

#define RPC_NSTATUS 17   /* gRPC status codes 0 (OK) .. 16 (UNAUTHENTICATED) */

/* One method's counts (rpc_server_metrics renders them). */
typedef struct rpc_stats {
    _Atomic uint64_t calls[RPC_NSTATUS];   /* finished calls by status (a client gone: CANCELLED) */
    _Atomic uint64_t bytes_in, bytes_out;  /* message bytes received and sent */
    prom_hist        latency;              /* from the request's arrival to the call's end */
} rpc_stats;

typedef struct rpc_totals {
    _Atomic uint64_t records_out, records_in, auth_refused;
} rpc_totals;

typedef struct rpc_worker rpc_worker;

struct rpc_server {
    kvd_engine   *e;
    grpc_server  *server;
    rpc_worker   *workers;
    int           nworkers;
    grpc_completion_queue *io_cq;  /* io_main's: drives gRPC I/O, holds no calls */
    pthread_t     io_th;
    int64_t       started_ns;
    rpc_log_fn    log;
    auth_tokens       *tokens;  /* NULL: no TCP listener, no tokens; under tok_mu (SIGHUP swaps it) */
    pthread_mutex_t    tok_mu;
    atomic_int    in_flight;    /* calls past REQUESTED, not yet freed */
    kvd_reader  **helpers;      /* [nhelpers] extra readers a call may borrow (rpc_readers_borrow) */
    atomic_int   *help_busy;    /* [nhelpers] 1 while borrowed */
    int           nhelpers;
    atomic_int    jobs;         /* job threads running */
    atomic_int    stopping;     /* the grace period is over: jobs stop at their next progress */
    rpc_stats    *stats;        /* [rpc_nmethods + 1]: the last for calls to no known method */
    rpc_totals    totals;
};

struct rpc_worker {
    rpc_server            *s;
    grpc_completion_queue *cq;
    kvd_reader            *reader;   /* this worker's io_uring */
    pthread_t              th;
};

typedef struct rpc_call {
    rpc_ctx             x;              /* what the handler sees */
    rpc_worker         *w;
    const rpc_method   *m;              /* NULL until routed (or no such method) */
    int                 state;
    grpc_call          *call;
    grpc_call_details   details;
    grpc_metadata_array md;
    grpc_byte_buffer   *req, *resp;
    grpc_slice          status_details;
    grpc_status_code    status;
    int                 cancelled;
    int                 started;        /* the stream (either way) has begun */
    int64_t             t0;
    char                method[64];
    auth_tokens        *tokens;         /* the set x.scope points into, referenced until the call ends */
    uint64_t            bytes_in, bytes_out;
    uint64_t            messages;       /* a client stream's messages so far */
    /* JOB: the handler runs on its own thread; progress events go out one at a time */
    atomic_int          job_sending;    /* a progress event is in flight (job_buf) */
    grpc_byte_buffer   *job_buf;
    int64_t             job_last_ns;
    uint8_t            *job_in;         /* the request bytes, the thread's own copy */
    size_t              job_len;
} rpc_call;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- what handlers may ask of the machine ---------------------------------- */

uint64_t rpc_uptime_ms(rpc_ctx *x)
{
    rpc_call *c = (rpc_call *)x;
    return (uint64_t)((now_ns() - c->w->s->started_ns) / 1000000);
}

int rpc_readers_borrow(rpc_ctx *x, kvd_reader **rs, int max)
{
    rpc_server *s = ((rpc_call *)x)->w->s;
    int n = 0;
    if (max > 0)
        rs[n++] = x->reader;
    for (int i = 0; i < s->nhelpers && n < max; i++)
        if (!atomic_exchange(&s->help_busy[i], 1))
            rs[n++] = s->helpers[i];
    return n;
}

void rpc_readers_return(rpc_ctx *x, kvd_reader *const *rs, int n)
{
    rpc_server *s = ((rpc_call *)x)->w->s;
    for (int t = 1; t < n; t++)
        for (int i = 0; i < s->nhelpers; i++)
            if (s->helpers[i] == rs[t])
                atomic_store(&s->help_busy[i], 0);
}

int rpc_job_due(rpc_ctx *x)
{
    rpc_call *c = (rpc_call *)x;
    return c->call && !atomic_load(&c->job_sending) && now_ns() - c->job_last_ns >= 200000000;
}

int rpc_job_event(rpc_ctx *x, grpc_byte_buffer *msg)
{
    rpc_call *c = (rpc_call *)x;
    if (atomic_load(&c->w->s->stopping)) {
        if (msg)
            grpc_byte_buffer_destroy(msg);
        return 1;
    }
    if (!msg)
        return 0;
    if (!rpc_job_due(x)) {               /* too soon, one in flight, or a local call (none to send on) */
        grpc_byte_buffer_destroy(msg);
        return 0;
    }
    c->job_last_ns = now_ns();
    c->job_buf = msg;
    c->bytes_out += grpc_byte_buffer_length(msg);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = c->job_buf;
    atomic_store(&c->job_sending, 1);
    if (grpc_call_start_batch(c->call, &op, 1, c, NULL) != GRPC_CALL_OK) {
        grpc_byte_buffer_destroy(c->job_buf);
        c->job_buf = NULL;
        atomic_store(&c->job_sending, 0);
    }
    return 0;
}

/* ---- the call's life ---------------------------------------------------------- */

static rpc_call *call_request(rpc_worker *w)
{
    rpc_call *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->w = w;
    c->state = REQUESTED;
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    if (grpc_server_request_call(w->s->server, &c->call, &c->details, &c->md, w->cq, w->cq, c) !=
        GRPC_CALL_OK) {
        grpc_call_details_destroy(&c->details);
        grpc_metadata_array_destroy(&c->md);
        free(c);
        return NULL;
    }
    return c;
}

/* Count a finished call: by method and status, its latency and bytes. */
static void call_count(rpc_call *c)
{
    rpc_server *s = c->w->s;
    rpc_stats *st = &s->stats[c->m ? (size_t)(c->m - rpc_methods) : rpc_nmethods];
    int code = c->state == FINISHING && !c->cancelled ? (int)c->status : GRPC_STATUS_CANCELLED;
    atomic_fetch_add(&st->calls[code >= 0 && code < RPC_NSTATUS ? code : GRPC_STATUS_UNKNOWN], 1);
    prom_hist_observe_ns(&st->latency, (uint64_t)(now_ns() - c->t0));
    atomic_fetch_add(&st->bytes_in, c->bytes_in);
    atomic_fetch_add(&st->bytes_out, c->bytes_out);
    atomic_fetch_add(&s->totals.records_out, c->x.records_out);
    atomic_fetch_add(&s->totals.records_in, c->x.records_in);
    if (c->status == GRPC_STATUS_UNAUTHENTICATED || c->status == GRPC_STATUS_PERMISSION_DENIED)
        atomic_fetch_add(&s->totals.auth_refused, 1);
}

static void call_free(rpc_call *c)
{
    auth_free(c->tokens);             /* this call's reference to the token set it was checked against */
    if (c->state != REQUESTED) {
        call_count(c);
        int was = atomic_fetch_sub(&c->w->s->in_flight, 1);
        assert(was > 0);
        (void)was;
    }
    if (c->m && c->m->release && c->x.state)
        c->m->release(c->x.state);
    if (c->call)
        grpc_call_unref(c->call);
    if (c->req)
        grpc_byte_buffer_destroy(c->req);
    if (c->resp)
        grpc_byte_buffer_destroy(c->resp);
    if (c->state == FINISHING)
        grpc_slice_unref(c->status_details);
    free(c->job_in);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->md);
    free(c);
}

static void on_requested(rpc_call *c)
{
    call_request(c->w);                 /* keep one call requested on this queue */
    atomic_fetch_add(&c->w->s->in_flight, 1);
    c->t0 = now_ns();
    char *m = grpc_slice_to_c_string(c->details.method);
    snprintf(c->method, sizeof c->method, "%s", m);
    gpr_free(m);
    c->x.e = c->w->s->e;
    c->x.reader = c->w->reader;
    c->x.method = c->method;
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &c->req;
    c->state = RECEIVING;
    if (grpc_call_start_batch(c->call, ops, 2, c, NULL) != GRPC_CALL_OK)
        call_free(c);
}

/* Send the reply (c->resp, if any and the status is OK) and the status, and receive the close. */
static void finish(rpc_call *c, kvd_err *err)
{
    rpc_server *s = c->w->s;
    assert(c->state == RECEIVING || c->state == SENDING || c->state == JOB);   /* finished once */
    assert(c->state != JOB || !atomic_load(&c->job_sending));   /* a job's last event went out first */
    c->status_details = grpc_slice_from_copied_string(c->status ? err->msg : "");
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    int n = 0;
    if (c->status == GRPC_STATUS_OK && c->resp) {   /* a server stream ends without one */
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->resp;
        c->bytes_out += grpc_byte_buffer_length(c->resp);
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = c->status;
    ops[n++].data.send_status_from_server.status_details = &c->status_details;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    c->state = FINISHING;
    if (s->log)
        s->log(c->method, c->x.log_conv, c->x.scope ? c->x.scope->token_tag : "local", (int)c->status,
               c->status ? err->msg : "", (double)(now_ns() - c->t0) / 1e6);
    if (grpc_call_start_batch(c->call, ops, (size_t)n, c, NULL) != GRPC_CALL_OK)
        call_free(c);
}

/* Finish with rc: OK with the reply (out of memory if the handler made none), or rc's status. */
static void finish_rc(rpc_call *c, int rc, kvd_err *err)
{
    if (!rc && !c->resp)
        rc = kvd_fail(err, -ENOMEM, "out of memory encoding the reply");
    c->status = kw_status_of(rc);
    finish(c, err);
}

/* The request's bytes, counted; the buffer is released. */
static grpc_slice take_request(rpc_call *c)
{
    grpc_slice all = kw_slice(c->req);
    grpc_byte_buffer_destroy(c->req);
    c->req = NULL;
    c->bytes_in += GRPC_SLICE_LENGTH(all);
    return all;
}

/* The request bytes as the method's message: unpacked, its strings
 * checked (pb_strings.c); NULL with err set when they are not one. */
static ProtobufCMessage *decode(const rpc_call *c, const uint8_t *in, size_t len, kvd_err *err)
{
    ProtobufCMessage *m = protobuf_c_message_unpack(c->m->request, NULL, len, in);
    if (!m) {
        kvd_fail(err, -EINVAL, "%s: request is not a valid %s message (%zu bytes)", c->method, c->m->request->name,
                 len);
        return NULL;
    }
    if (pb_strings_check(c->m->request, in, len, err)) {
        protobuf_c_message_free_unpacked(m, NULL);
        return NULL;
    }
    return m;
}

/* The handler fn on the request bytes: decoded first (a request that does not decode is -EINVAL). */
static int run(rpc_call *c, rpc_unary_fn fn, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    ProtobufCMessage *m = decode(c, in, len, err);
    if (!m)
        return err->code;
    int rc = fn(&c->x, m, out, err);
    protobuf_c_message_free_unpacked(m, NULL);
    return rc;
}

/* RPC_CLIENT_STREAM: one message to the handler (or, at the client's close, the reply). */
static void client_stream_step(rpc_call *c)
{
    assert(c->m->kind == RPC_CLIENT_STREAM && c->state == RECEIVING);
    kvd_err err = { 0, "" };
    int rc;
    if (!c->req) {                                  /* the client closed: reply */
        rc = c->m->next(&c->x, &c->resp, &err);
        finish_rc(c, rc, &err);
        return;
    }
    grpc_slice all = take_request(c);
    size_t len = GRPC_SLICE_LENGTH(all);
    rc = len > RPC_STREAM_CHUNK
             ? kvd_fail(&err, -E2BIG, "stream message of %zu bytes over the %d-byte chunk limit", len,
                        RPC_STREAM_CHUNK)
             : run(c, c->m->fn, GRPC_SLICE_START_PTR(all), len, NULL, &err);
    grpc_slice_unref(all);
    if (rc) {
        if (c->m->failed)
            c->m->failed(&c->x, &err);
        c->status = kw_status_of(rc);
        finish(c, &err);
        return;
    }
    c->messages++;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->req;
    if (grpc_call_start_batch(c->call, &op, 1, c, NULL) != GRPC_CALL_OK)
        call_free(c);
}

/* RPC_SERVER_STREAM: send the handler's next message, or end the call with OK. */
static void server_stream_step(rpc_call *c)
{
    assert(c->m->kind == RPC_SERVER_STREAM);
    kvd_err err = { 0, "" };
    if (c->resp) {
        grpc_byte_buffer_destroy(c->resp);
        c->resp = NULL;
    }
    int rc = c->m->next(&c->x, &c->resp, &err);
    if (rc || !c->resp) {
        c->status = kw_status_of(rc);
        finish(c, &err);
        return;
    }
    c->bytes_out += grpc_byte_buffer_length(c->resp);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = c->resp;
    c->state = SENDING;
    if (grpc_call_start_batch(c->call, &op, 1, c, NULL) != GRPC_CALL_OK)
        call_free(c);
}

/* A JOB's thread: run the handler, wait for the last progress event to be
 * sent, then finish the call as any other. */
static void *job_main(void *arg)
{
    rpc_call *c = arg;
    rpc_server *s = c->w->s;
    kvd_err err = { 0, "" };
    int rc = run(c, c->m->fn, c->job_in, c->job_len, &c->resp, &err);
    while (atomic_load(&c->job_sending)) {
        struct timespec d = { 0, 1000000 };
        nanosleep(&d, NULL);
    }
    finish_rc(c, rc, &err);
    atomic_fetch_sub(&s->jobs, 1);
    return NULL;
}

static void job_start(rpc_call *c, grpc_slice all)
{
    kvd_err err = { 0, "" };
    c->job_len = GRPC_SLICE_LENGTH(all);
    c->job_in = malloc(c->job_len + 1);
    c->state = JOB;
    c->x.reader = NULL;                 /* the worker's reader stays the worker's */
    pthread_t th;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    atomic_fetch_add(&c->w->s->jobs, 1);
    if (c->job_in)
        memcpy(c->job_in, GRPC_SLICE_START_PTR(all), c->job_len);
    if (!c->job_in || pthread_create(&th, &at, job_main, c)) {
        atomic_fetch_sub(&c->w->s->jobs, 1);
        c->status = GRPC_STATUS_RESOURCE_EXHAUSTED;
        kvd_fail(&err, -ENOMEM, "%s: cannot start its thread", c->method);
        finish(c, &err);
    }
    pthread_attr_destroy(&at);
}

/* A progress event of a JOB went out (or failed): free it. */
static void on_job_sent(rpc_call *c)
{
    grpc_byte_buffer_destroy(c->job_buf);
    c->job_buf = NULL;
    atomic_store(&c->job_sending, 0);
}

/* Who is calling: a unix-socket peer passed the socket's 0600 mode and is
 * unscoped unless it sends a token; a TCP peer must send a known token. */
static grpc_status_code authenticate(rpc_call *c, kvd_err *err)
{
    const grpc_slice *val = NULL;
    for (size_t i = 0; i < c->md.count; i++)
        if (!grpc_slice_str_cmp(c->md.metadata[i].key, "authorization"))
            val = &c->md.metadata[i].value;
    char *peer = grpc_call_get_peer(c->call);
    int local = peer && !strncmp(peer, "unix:", 5);
    gpr_free(peer);
    c->x.scope = NULL;
    if (!c->tokens) {                 /* the current set, held until the call ends (a SIGHUP may swap it) */
        pthread_mutex_lock(&c->w->s->tok_mu);
        c->tokens = auth_ref(c->w->s->tokens);
        pthread_mutex_unlock(&c->w->s->tok_mu);
    }
    if (local && (!val || !c->tokens))
        return GRPC_STATUS_OK;
    if (!val) {
        kvd_fail(err, -EACCES, "%s: no bearer token; callers over TCP send 'authorization: Bearer TOKEN' "
                 "(kvarc --token-file FILE)", c->method);
        return GRPC_STATUS_UNAUTHENTICATED;
    }
    c->x.scope = auth_check(c->tokens, (const char *)GRPC_SLICE_START_PTR(*val), GRPC_SLICE_LENGTH(*val));
    if (!c->x.scope) {
        kvd_fail(err, -EACCES, "%s: the bearer token is not one of this kvarcd's tokens", c->method);
        return GRPC_STATUS_UNAUTHENTICATED;
    }
    return GRPC_STATUS_OK;
}

static void on_received(rpc_call *c)
{
    kvd_err err = { 0, "" };
    if (c->started) {                   /* a client stream's next message, or its end */
        client_stream_step(c);
        return;
    }
    c->started = 1;
    for (size_t i = 0; i < rpc_nmethods && !c->m; i++)
        if (!grpc_slice_str_cmp(c->details.method, rpc_methods[i].path))
            c->m = &rpc_methods[i];
    if ((c->status = authenticate(c, &err)) != GRPC_STATUS_OK) {
        finish(c, &err);
        return;
    }
    if (!c->m) {
        c->status = GRPC_STATUS_UNIMPLEMENTED;
        kvd_fail(&err, -ENOSYS, "method %s is not a kvarc.v1 method", c->method);
        finish(c, &err);
        return;
    }
    if (c->m->kind == RPC_CLIENT_STREAM) {
        client_stream_step(c);
        return;
    }
    if (!c->req) {
        c->status = GRPC_STATUS_INVALID_ARGUMENT;
        kvd_fail(&err, -EINVAL, "%s: no request message", c->method);
        finish(c, &err);
        return;
    }
    grpc_slice all = take_request(c);
    int rc = 0;
    switch (c->m->kind) {
    case RPC_JOB:
        job_start(c, all);
        break;
    case RPC_SERVER_STREAM:
        rc = run(c, c->m->fn, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all), NULL, &err);
        if (rc) {
            c->status = kw_status_of(rc);
            finish(c, &err);
        } else {
            server_stream_step(c);
        }
        break;
    default:
        rc = run(c, c->m->fn, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all), &c->resp, &err);
        finish_rc(c, rc, &err);
    }
    grpc_slice_unref(all);
}

static void *worker_main(void *p)
{
    rpc_worker *w = p;
    call_request(w);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        rpc_call *c = ev.tag;
        assert(c->w == w && c->state >= REQUESTED && c->state <= FINISHING);   /* only its own queue's calls */
        if (c->state == REQUESTED) {
            if (ev.success)
                on_requested(c);
            else
                call_free(c);            /* server shutting down */
        } else if (c->state == RECEIVING) {
            if (ev.success)
                on_received(c);
            else
                call_free(c);            /* client went away */
        } else if (c->state == JOB) {
            on_job_sent(c);
        } else if (c->state == SENDING) {
            if (ev.success)
                server_stream_step(c);
            else
                call_free(c);            /* client went away mid-stream */
        } else {
            call_free(c);
        }
    }
    return NULL;
}
/* Polls for gRPC's I/O so that connections are accepted and answered
 * while every worker sits in a handler; no call is ever requested on its
 * queue, so the only event it sees is the shutdown. */
static void *io_main(void *p)
{
    grpc_completion_queue *cq = p;
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN)
        ;
    return NULL;
}

/* The last of a server, its queues and workers' readers already closed:
 * the helper readers, the tokens and the memory. */
static void server_free(rpc_server *s)
{
    for (int i = 0; i < s->nhelpers; i++)
        kvd_reader_close(s->helpers[i]);
    free(s->helpers);
    free(s->help_busy);
    auth_free(s->tokens);
    pthread_mutex_destroy(&s->tok_mu);
    free(s->workers);
    free(s->stats);
    free(s);
}

/* Undo a partial start: the server (never started), the I/O queue and the
 * workers' queues and readers. */
static void start_unwind(rpc_server *s, int nready)
{
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(s->io_cq);
    io_main(s->io_cq);
    grpc_completion_queue_destroy(s->io_cq);
    for (int i = 0; i < nready; i++) {
        grpc_completion_queue_shutdown(s->workers[i].cq);
        while (grpc_completion_queue_next(s->workers[i].cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(s->workers[i].cq);
        kvd_reader_close(s->workers[i].reader);
    }
    server_free(s);
}

void rpc_server_set_tokens(rpc_server *s, auth_tokens *t)
{
    auth_tokens *old;
    pthread_mutex_lock(&s->tok_mu);
    old = s->tokens;
    s->tokens = auth_ref(t);
    pthread_mutex_unlock(&s->tok_mu);
    auth_free(old);                   /* freed with the last call that still holds it */
}

int rpc_server_start(kvd_engine *e, const rpc_config *cfg, rpc_server **out, int *tcp_port, char *msg,
                     size_t msglen)
{
    if (cfg->tcp_addr && !cfg->tokens) {
        snprintf(msg, msglen, "listening on TCP (%s) needs a token file", cfg->tcp_addr);
        return -EINVAL;
    }
    rpc_server *s = calloc(1, sizeof *s);
    if (!s || !(s->workers = calloc((size_t)(cfg->threads < 1 ? 1 : cfg->threads > 64 ? 64 : cfg->threads),
                                    sizeof *s->workers)) ||
        !(s->stats = calloc(rpc_nmethods + 1, sizeof *s->stats))) {
        if (s)
            free(s->workers);
        free(s);
        snprintf(msg, msglen, "out of memory");
        return -ENOMEM;
    }
    s->e = e;
    s->log = cfg->log;
    s->tokens = auth_ref(cfg->tokens);
    pthread_mutex_init(&s->tok_mu, NULL);
    s->started_ns = now_ns();
    s->nworkers = cfg->threads < 1 ? 1 : cfg->threads > 64 ? 64 : cfg->threads;
    grpc_arg args[2] = {
        { .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = RPC_MAX_MESSAGE },
        { .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, .value.integer = RPC_MAX_MESSAGE },
    };
    grpc_channel_args ca = { 2, args };
    s->server = grpc_server_create(&ca, NULL);
    s->io_cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->io_cq, NULL);
    /* the helper readers RerankLayer calls borrow (cfg->rerank_threads - 1) */
    int nh = cfg->rerank_threads < 1 ? 0 : cfg->rerank_threads > KVD_RERANK_READERS ? KVD_RERANK_READERS - 1 :
                                                                                     cfg->rerank_threads - 1;
    if (nh && (!(s->helpers = calloc((size_t)nh, sizeof *s->helpers)) ||
               !(s->help_busy = calloc((size_t)nh, sizeof *s->help_busy)))) {
        snprintf(msg, msglen, "out of memory");
        start_unwind(s, 0);
        return -ENOMEM;
    }
    for (; s->nhelpers < nh; s->nhelpers++) {
        kvd_err rerr;
        if (kvd_reader_open(e, &s->helpers[s->nhelpers], &rerr)) {
            snprintf(msg, msglen, "%s", rerr.msg);
            start_unwind(s, 0);
            return rerr.code;
        }
    }
    for (int i = 0; i < s->nworkers; i++) {
        kvd_err rerr;
        s->workers[i].s = s;
        if (kvd_reader_open(e, &s->workers[i].reader, &rerr)) {
            snprintf(msg, msglen, "%s", rerr.msg);
            start_unwind(s, i);
            return rerr.code;
        }
        s->workers[i].cq = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(s->server, s->workers[i].cq, NULL);
    }
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    int port = grpc_server_add_http2_port(s->server, cfg->unix_addr, creds);
    grpc_server_credentials_release(creds);
    if (!port) {
        snprintf(msg, msglen, "cannot listen on %s (in use, or a bad address)", cfg->unix_addr);
        start_unwind(s, s->nworkers);
        return -EADDRINUSE;
    }
    if (cfg->tcp_addr) {
        if (cfg->tls_cert_pem && cfg->tls_key_pem) {
            grpc_ssl_pem_key_cert_pair pair = { cfg->tls_key_pem, cfg->tls_cert_pem };
            creds = grpc_ssl_server_credentials_create(NULL, &pair, 1, 0, NULL);
        } else {
            creds = grpc_insecure_server_credentials_create();
        }
        port = creds ? grpc_server_add_http2_port(s->server, cfg->tcp_addr, creds) : 0;
        if (creds)
            grpc_server_credentials_release(creds);
        if (!port) {
            snprintf(msg, msglen, "cannot listen on %s (in use, a bad address%s)", cfg->tcp_addr,
                     cfg->tls_cert_pem ? ", or a bad certificate or key" : "");
            start_unwind(s, s->nworkers);
            return -EADDRINUSE;
        }
        if (tcp_port)
            *tcp_port = port;
    }
    grpc_server_start(s->server);
    pthread_create(&s->io_th, NULL, io_main, s->io_cq);
    for (int i = 0; i < s->nworkers; i++)
        pthread_create(&s->workers[i].th, NULL, worker_main, &s->workers[i]);
    *out = s;
    return 0;
}

int rpc_server_stop(rpc_server *s, int grace_ms)
{
    grpc_completion_queue *scq = grpc_completion_queue_create_for_pluck(NULL);
    int tag = 0, cancelled = 0;
    grpc_server_shutdown_and_notify(s->server, scq, &tag);
    /* Calls in flight get the grace period. Idle client connections would
     * hold the shutdown for all of it: once no call is in flight they are
     * closed at once (cancel_all_calls also force-closes channels). */
    gpr_timespec end = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(grace_ms, GPR_TIMESPAN));
    for (;;) {
        gpr_timespec step = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(20, GPR_TIMESPAN));
        if (grpc_completion_queue_pluck(scq, &tag, step, NULL).type == GRPC_OP_COMPLETE)
            break;
        int busy = atomic_load(&s->in_flight) > 0;
        if (!busy || gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), end) >= 0) {
            cancelled = busy;
            atomic_store(&s->stopping, 1);
            grpc_server_cancel_all_calls(s->server);
            grpc_completion_queue_pluck(scq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            break;
        }
    }
    /* Cancelled calls still get their last events on the workers' queues,
     * and a handler may start one more batch (the status): the queues stay
     * open until every call is freed. */
    atomic_store(&s->stopping, 1);
    while (atomic_load(&s->jobs) > 0) {       /* they stop at their next progress call */
        struct timespec d = { 0, 1000000 };
        nanosleep(&d, NULL);
    }
    for (int i = 0; i < 10000 && atomic_load(&s->in_flight) > 0; i++) {
        struct timespec d = { 0, 1000000 };
        nanosleep(&d, NULL);
    }
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(scq);
    while (grpc_completion_queue_pluck(scq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(scq);
    grpc_completion_queue_shutdown(s->io_cq);
    pthread_join(s->io_th, NULL);
    grpc_completion_queue_destroy(s->io_cq);
    for (int i = 0; i < s->nworkers; i++)
        grpc_completion_queue_shutdown(s->workers[i].cq);
    for (int i = 0; i < s->nworkers; i++) {
        pthread_join(s->workers[i].th, NULL);
        grpc_completion_queue_destroy(s->workers[i].cq);
        kvd_reader_close(s->workers[i].reader);
    }
    server_free(s);
    return cancelled;
}

/* ---- local calls ---------------------------------------------------------------- */

/* A server of no gRPC server and one worker of no queue: what the
 * handlers reach through their call (the engine, the reader, the counts). */
struct rpc_local {
    rpc_server s;
    rpc_worker w;
};

int rpc_local_open(kvd_engine *e, rpc_local **out, kvd_err *err)
{
    rpc_local *l = calloc(1, sizeof *l);
    if (!l || !(l->s.stats = calloc(rpc_nmethods + 1, sizeof *l->s.stats))) {
        free(l);
        return kvd_fail(err, -ENOMEM, "out of memory");
    }
    int rc = kvd_reader_open(e, &l->w.reader, err);
    if (rc) {
        free(l->s.stats);
        free(l);
        return rc;
    }
    l->s.e = e;
    l->s.started_ns = now_ns();
    l->s.workers = &l->w;
    l->s.nworkers = 1;
    pthread_mutex_init(&l->s.tok_mu, NULL);
    l->w.s = &l->s;
    *out = l;
    return 0;
}

void rpc_local_close(rpc_local *l)
{
    if (!l)
        return;
    kvd_reader_close(l->w.reader);
    pthread_mutex_destroy(&l->s.tok_mu);
    free(l->s.stats);
    free(l);
}

int rpc_call_local(rpc_local *l, const rpc_method *m, const uint8_t *in, size_t len, grpc_byte_buffer **out,
                   kvd_err *err)
{
    rpc_call c;
    memset(&c, 0, sizeof c);
    c.w = &l->w;
    c.m = m;
    c.state = RECEIVING;
    c.t0 = now_ns();
    c.bytes_in = len;
    snprintf(c.method, sizeof c.method, "%s", m->path);
    c.x.e = l->s.e;
    c.x.reader = m->kind == RPC_JOB ? NULL : l->w.reader;   /* as job_start: a job has no worker's reader */
    c.x.method = c.method;
    *out = NULL;
    err->code = 0;
    err->msg[0] = 0;
    atomic_fetch_add(&l->s.in_flight, 1);
    int rc;
    switch (m->kind) {
    case RPC_CLIENT_STREAM:
        rc = len > RPC_STREAM_CHUNK ? kvd_fail(err, -E2BIG, "stream message of %zu bytes over the %d-byte chunk "
                                               "limit", len, RPC_STREAM_CHUNK)
                                    : run(&c, m->fn, in, len, NULL, err);
        if (rc && m->failed)
            m->failed(&c.x, err);
        if (!rc)
            rc = m->next(&c.x, out, err);
        break;
    case RPC_SERVER_STREAM:
        rc = run(&c, m->fn, in, len, NULL, err);
        for (grpc_byte_buffer *b = NULL; !rc; ) {
            b = NULL;
            rc = m->next(&c.x, &b, err);
            if (!b)
                break;
            c.bytes_out += grpc_byte_buffer_length(b);
            if (!*out)
                *out = b;
            else
                grpc_byte_buffer_destroy(b);
        }
        if (rc && *out) {
            grpc_byte_buffer_destroy(*out);
            *out = NULL;
        }
        break;
    default:                            /* RPC_UNARY, and RPC_JOB inline */
        rc = run(&c, m->fn, in, len, out, err);
        if (!rc && !*out)
            rc = kvd_fail(err, -ENOMEM, "out of memory encoding the reply");
        if (rc && *out) {
            grpc_byte_buffer_destroy(*out);
            *out = NULL;
        }
    }
    if (m->kind != RPC_SERVER_STREAM && *out)
        c.bytes_out += grpc_byte_buffer_length(*out);
    if (m->release && c.x.state)
        m->release(c.x.state);
    c.status = kw_status_of(rc);
    c.state = FINISHING;
    call_count(&c);
    atomic_fetch_sub(&l->s.in_flight, 1);
    return rc;
}

/* ---- metrics ------------------------------------------------------------------ */

static const char *const status_names[RPC_NSTATUS] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
};

/* The method label of stats row i (the last: calls to no known method). */
static void method_label(prom_buf *l, size_t i)
{
    prom_buf_free(l);
    prom_label(l, "method", i < rpc_nmethods ? rpc_methods[i].name : "unknown");
}

void rpc_ctx_metrics(rpc_ctx *x, prom_buf *b)
{
    rpc_server_metrics(((rpc_call *)x)->w->s, b);
}

void rpc_server_metrics(rpc_server *s, prom_buf *b)
{
    prom_buf l;
    prom_buf_init(&l);
    prom_family(b, "kvarc_build_info", "gauge", "kvarcd's version and git revision (the value is 1).");
    prom_label(&l, "version", KVARCD_VERSION);
    prom_label(&l, "revision", KVARC_GIT_REVISION);
    prom_sample_u64(b, "kvarc_build_info", l.data, 1);
    prom_family(b, "kvarc_rpc_calls_total", "counter", "Finished calls by method and gRPC status code (a "
                "caller that went away counts as CANCELLED).");
    for (size_t i = 0; i <= rpc_nmethods; i++)
        for (int k = 0; k < RPC_NSTATUS; k++) {
            uint64_t n = atomic_load(&s->stats[i].calls[k]);
            if (!n && k)            /* every method's OK line, other codes once they happen */
                continue;
            method_label(&l, i);
            prom_label(&l, "code", status_names[k]);
            prom_sample_u64(b, "kvarc_rpc_calls_total", l.data, n);
        }
    prom_family(b, "kvarc_rpc_duration_seconds", "histogram", "Call latency by method, from the request's "
                "arrival to the call's end (a stream's or a job's whole life).");
    for (size_t i = 0; i <= rpc_nmethods; i++) {
        method_label(&l, i);
        prom_hist_write(b, "kvarc_rpc_duration_seconds", l.data, &s->stats[i].latency);
    }
    prom_family(b, "kvarc_rpc_received_bytes_total", "counter", "Request message bytes received, by method.");
    for (size_t i = 0; i <= rpc_nmethods; i++) {
        method_label(&l, i);
        prom_sample_u64(b, "kvarc_rpc_received_bytes_total", l.data, atomic_load(&s->stats[i].bytes_in));
    }
    prom_family(b, "kvarc_rpc_sent_bytes_total", "counter", "Reply message bytes sent, by method.");
    for (size_t i = 0; i <= rpc_nmethods; i++) {
        method_label(&l, i);
        prom_sample_u64(b, "kvarc_rpc_sent_bytes_total", l.data, atomic_load(&s->stats[i].bytes_out));
    }
    prom_buf_free(&l);
    prom_family(b, "kvarc_rpc_in_flight", "gauge", "Calls being served now.");
    prom_sample_u64(b, "kvarc_rpc_in_flight", NULL, (uint64_t)atomic_load(&s->in_flight));
    prom_family(b, "kvarc_records_served_total", "counter", "Records (one token of one KV head) sent in "
                "Fetch, Rerank and RerankLayer replies.");
    prom_sample_u64(b, "kvarc_records_served_total", NULL, atomic_load(&s->totals.records_out));
    prom_family(b, "kvarc_records_appended_total", "counter", "Records (one token of one KV head) stored by "
                "Append, AppendMany and AppendStream.");
    prom_sample_u64(b, "kvarc_records_appended_total", NULL, atomic_load(&s->totals.records_in));
    prom_family(b, "kvarc_auth_refusals_total", "counter", "Calls refused for their token: none or unknown "
                "(UNAUTHENTICATED), or outside its namespaces (PERMISSION_DENIED).");
    prom_sample_u64(b, "kvarc_auth_refusals_total", NULL, atomic_load(&s->totals.auth_refused));
    prom_family(b, "kvarc_uptime_seconds", "gauge", "Seconds since kvarcd started serving.");
    prom_sample_f64(b, "kvarc_uptime_seconds", NULL, (double)(now_ns() - s->started_ns) / 1e9);
    kvd_err err;
    if (!b->err && kvd_metrics(s->e, b, &err)) {
        b->err = err.code;
        snprintf(b->errmsg, sizeof b->errmsg, "%.*s", (int)sizeof b->errmsg - 1, err.msg);
    }
}
