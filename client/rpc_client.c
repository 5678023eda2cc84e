/* rpc_client.c - blocking unary calls to kvarcd over the gRPC C core.
 * One call: create it on a fresh pluck queue, start one batch with every
 * op (send metadata, message, close; receive metadata, message, status),
 * pluck its tag, release everything. */
#include <errno.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kvarc_rpc.h"
#include "wire.h"

#define MAX_MESSAGE (16 << 20)

struct kvc_conn {
    grpc_channel *ch;
    char          addr[1200]; /* the channel's target, for messages */
    int           has_auth;
    grpc_metadata auth;      /* authorization: Bearer TOKEN, sent with every call */
};

/* Every call's initial metadata carries the token, if there is one. */
static void set_auth(kvc_conn *c, grpc_op *op)
{
    if (c->has_auth) {
        op->data.send_initial_metadata.count = 1;
        op->data.send_initial_metadata.metadata = &c->auth;
    }
}

static char *read_pem(const char *path, char *msg, size_t msglen)
{
    FILE *f = fopen(path, "r");
    char *buf = f ? malloc(1 << 20) : NULL;
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    if (!f || !buf || !n || ferror(f) || !feof(f)) {
        snprintf(msg, msglen, "TLS CA file %s: %s", path, !f ? strerror(errno) : "unreadable, empty or over 1 MiB");
        if (f)
            fclose(f);
        free(buf);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    return buf;
}

int kvc_connect(const char *target, kvc_conn **out)
{
    return kvc_connect_opts(target, NULL, out, NULL, 0);
}

int kvc_connect_opts(const char *target, const kvc_options *o, kvc_conn **out, char *msg, size_t msglen)
{
    char addr[1200], dummy[8];
    struct stat st;
    if (!msg) {
        msg = dummy;
        msglen = sizeof dummy;
    }
    if (!target || !out) {
        snprintf(msg, msglen, "no target");
        return -EINVAL;
    }
    if (o && o->token && (strlen(o->token) > 1024 || strpbrk(o->token, " \t\r\n"))) {
        snprintf(msg, msglen, "a token is at most 1024 bytes without white space");
        return -EINVAL;
    }
    if (!strncmp(target, "unix:", 5) || (strchr(target, ':') && target[0] != '/' && target[0] != '.'))
        snprintf(addr, sizeof addr, "%s", target);
    else if (!stat(target, &st) && S_ISDIR(st.st_mode))
        snprintf(addr, sizeof addr, "unix:%s/kvarcd.sock", target);
    else
        snprintf(addr, sizeof addr, "unix:%s", target);
    kvc_conn *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    char *ca_pem = NULL;
    if (o && o->tls_ca_file && !(ca_pem = read_pem(o->tls_ca_file, msg, msglen))) {
        free(c);
        return -EINVAL;
    }
    grpc_init();
    /* Connection policy.
     * - A restarted kvarcd is found again within ~1 s: gRPC's default
     *   reconnect backoff grows to minutes.
     * - gRPC 1.51 gives a connection attempt max(next backoff time, now +
     *   GRPC_ARG_MIN_RECONNECT_BACKOFF_MS) to reach the server's SETTINGS
     *   frame. At 100 ms, clients started together on a loaded machine
     *   timed out (20 of 128 `kvarc health`, 64 at once): the handshake
     *   needs both processes scheduled. 20 s is gRPC's own default; a
     *   refused or missing socket still fails at once.
     * - Calls are not wait-for-ready: a call made while the channel is
     *   connecting already waits for the connection (up to its deadline);
     *   wait-for-ready would only add waiting through failed attempts,
     *   i.e. through "nothing listens here", which callers want reported
     *   at once (`kvarc health` exits 3, a writer sees kvarcd die). */
    grpc_arg args[6] = {
        { .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = MAX_MESSAGE },
        { .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, .value.integer = MAX_MESSAGE },
        { .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, .value.integer = 100 },
        { .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, .value.integer = 20000 },
        { .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, .value.integer = 1000 },
        { .type = GRPC_ARG_STRING, .key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG,
          .value.string = (char *)(o && o->tls_name ? o->tls_name : "") },
    };
    grpc_channel_args ca = { o && o->tls_name && ca_pem ? 6 : 5, args };
    grpc_channel_credentials *cr = ca_pem ? grpc_ssl_credentials_create(ca_pem, NULL, NULL, NULL)
                                          : grpc_insecure_credentials_create();
    c->ch = cr ? grpc_channel_create(addr, cr, &ca) : NULL;
    snprintf(c->addr, sizeof c->addr, "%s", addr);
    if (cr)
        grpc_channel_credentials_release(cr);
    free(ca_pem);
    if (!c->ch) {
        snprintf(msg, msglen, "cannot make a channel to %s", addr);
        free(c);
        grpc_shutdown();
        return -EINVAL;
    }
    if (o && o->token) {
        char v[1100];
        snprintf(v, sizeof v, "Bearer %s", o->token);
        c->auth.key = grpc_slice_from_static_string("authorization");
        c->auth.value = grpc_slice_from_copied_string(v);
        c->has_auth = 1;
    }
    *out = c;
    return 0;
}

void kvc_close(kvc_conn *c)
{
    if (!c)
        return;
    grpc_channel_destroy(c->ch);
    if (c->has_auth)
        grpc_slice_unref(c->auth.value);
    free(c);
    grpc_shutdown();
}

const char *kvc_status_name(int code)
{
    static const char *names[] = { "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED" };
    return code >= 0 && code <= 16 ? names[code] : "?";
}

/* A unary call in flight: its queue, call, buffers and status fields. */
struct kvc_pending {
    grpc_completion_queue *cq;
    grpc_call             *call;
    grpc_byte_buffer      *send, *recv;
    grpc_metadata_array    init_md, trail_md;
    grpc_status_code       status;
    grpc_slice             details;
    const char            *error_string;
    int                    tag;
    char                   method[64];     /* for messages */
    const char            *addr;           /* the connection's, for messages */
};

/* A failed call's message: kvarcd's own words when it answered; when the
 * transport failed (UNAVAILABLE, DEADLINE_EXCEEDED: gRPC's words, such as
 * "Broken pipe"), which kvarcd and which call, so the caller can tell. */
static void status_msg(grpc_status_code status, grpc_slice details, const char *method, const char *addr,
                       char *msg, size_t msglen)
{
    char *d = grpc_slice_to_c_string(details);
    const char *text = d && *d ? d : status ? kvc_status_name(status) : "";
    if (status == GRPC_STATUS_UNAVAILABLE || status == GRPC_STATUS_DEADLINE_EXCEEDED)
        snprintf(msg, msglen, "kvarcd at %s: %s %s (%s)", addr ? addr : "?", method, kvc_status_name(status), text);
    else
        snprintf(msg, msglen, "%s", text);
    gpr_free(d);
}

/* Start a unary call with the request bytes (copied): its whole batch is
 * queued, nothing waited for. NULL only when out of memory. */
static kvc_pending *call_start(kvc_conn *c, const char *method, const void *req, size_t len, int timeout_ms)
{
    kvc_pending *pc = calloc(1, sizeof *pc);
    if (!pc)
        return NULL;
    char path[128];
    snprintf(path, sizeof path, "/kvarc.v1.Kvarc/%s", method);
    snprintf(pc->method, sizeof pc->method, "%s", method);
    pc->addr = c->addr;
    pc->cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(timeout_ms > 0 ? timeout_ms : 30000, GPR_TIMESPAN));
    grpc_slice mslice = grpc_slice_from_copied_string(path);
    pc->call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, pc->cq, mslice, NULL, deadline, NULL);
    grpc_slice_unref(mslice);
    grpc_slice body = grpc_slice_from_copied_buffer(req, len);
    pc->send = grpc_raw_byte_buffer_create(&body, 1);
    grpc_slice_unref(body);
    grpc_metadata_array_init(&pc->init_md);
    grpc_metadata_array_init(&pc->trail_md);
    pc->status = GRPC_STATUS_UNKNOWN;
    pc->details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    set_auth(c, &ops[0]);
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = pc->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &pc->init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &pc->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &pc->trail_md;
    ops[5].data.recv_status_on_client.status = &pc->status;
    ops[5].data.recv_status_on_client.status_details = &pc->details;
    ops[5].data.recv_status_on_client.error_string = &pc->error_string;
    if (grpc_call_start_batch(pc->call, ops, 6, &pc->tag, NULL) != GRPC_CALL_OK) {
        pc->status = GRPC_STATUS_INTERNAL;
        pc->tag = -1;                     /* nothing to wait for */
    }
    return pc;
}

/* Wait for pc, take its reply bytes (malloc'ed into *out, *out_len, when
 * out is given) and free it. The status. */
static int call_wait(kvc_pending *pc, uint8_t **out, size_t *out_len, char *msg, size_t msglen)
{
    if (pc->tag != -1)
        grpc_completion_queue_pluck(pc->cq, &pc->tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_status_code status = pc->status;
    if (msg && msglen)
        status_msg(status, pc->details, pc->method, pc->addr, msg, msglen);
    if (out) {
        *out = NULL;
        *out_len = 0;
    }
    if (status == GRPC_STATUS_OK && pc->recv && out) {
        grpc_slice all = kw_slice(pc->recv);
        *out_len = GRPC_SLICE_LENGTH(all);
        *out = malloc(*out_len ? *out_len : 1);
        if (*out)
            memcpy(*out, GRPC_SLICE_START_PTR(all), *out_len);
        else
            status = GRPC_STATUS_RESOURCE_EXHAUSTED;
        grpc_slice_unref(all);
    }
    if (pc->error_string)
        gpr_free((void *)pc->error_string);
    grpc_slice_unref(pc->details);
    grpc_metadata_array_destroy(&pc->init_md);
    grpc_metadata_array_destroy(&pc->trail_md);
    grpc_byte_buffer_destroy(pc->send);
    if (pc->recv)
        grpc_byte_buffer_destroy(pc->recv);
    grpc_call_unref(pc->call);
    grpc_completion_queue_shutdown(pc->cq);
    while (grpc_completion_queue_pluck(pc->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(pc->cq);
    free(pc);
    return (int)status;
}

int kvc_call_raw(kvc_conn *c, const char *method, const void *req, size_t len, uint8_t **out,
                 size_t *out_len, int timeout_ms, char *msg, size_t msglen)
{
    kvc_pending *pc = call_start(c, method, req, len, timeout_ms);
    if (!pc)
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    return call_wait(pc, out, out_len, msg, msglen);
}

int kvc_call_start(kvc_conn *c, const char *method, const ProtobufCMessage *req, int timeout_ms,
                   kvc_pending **out)
{
    size_t n;
    uint8_t *buf = kw_pack_bytes(req, &n);
    *out = NULL;
    if (!buf)
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    *out = call_start(c, method, buf, n, timeout_ms);
    free(buf);
    return *out ? 0 : GRPC_STATUS_RESOURCE_EXHAUSTED;
}

int kvc_call_finish(kvc_pending *pc, const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
                    char *msg, size_t msglen)
{
    uint8_t *out = NULL;
    size_t out_len = 0;
    char method[sizeof pc->method];
    snprintf(method, sizeof method, "%s", pc->method);
    int st = call_wait(pc, reply ? &out : NULL, &out_len, msg, msglen);
    if (st == 0 && reply) {
        *reply = protobuf_c_message_unpack(reply_desc, NULL, out_len, out);
        if (!*reply) {
            st = GRPC_STATUS_INTERNAL;
            if (msg)
                snprintf(msg, msglen, "reply to %s did not decode", method);
        }
    }
    free(out);
    return st;
}

int kvc_call(kvc_conn *c, const char *method, const ProtobufCMessage *req,
             const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
             int timeout_ms, char *msg, size_t msglen)
{
    kvc_pending *pc;
    int st = kvc_call_start(c, method, req, timeout_ms, &pc);
    return st ? st : kvc_call_finish(pc, reply_desc, reply, msg, msglen);
}

struct kvc_stream {
    grpc_completion_queue *cq;
    grpc_call             *call;
    grpc_metadata_array    init_md;
    int                    broken;
    int                    closed;    /* server streaming: our side already closed */
    char                   method[64];     /* for messages */
    const char            *addr;
};

/* Run one batch on the stream's call and wait for it; 0 if it succeeded. */
static int stream_batch(kvc_stream *s, grpc_op *ops, size_t n)
{
    int tag;
    if (grpc_call_start_batch(s->call, ops, n, &tag, NULL) != GRPC_CALL_OK)
        return -EIO;
    grpc_event ev = grpc_completion_queue_pluck(s->cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    return ev.type == GRPC_OP_COMPLETE && ev.success ? 0 : -EPIPE;
}

int kvc_stream_open(kvc_conn *c, const char *method, int timeout_ms, kvc_stream **out)
{
    char path[128];
    kvc_stream *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    snprintf(path, sizeof path, "/kvarc.v1.Kvarc/%s", method);
    snprintf(s->method, sizeof s->method, "%s", method);
    s->addr = c->addr;
    s->cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(timeout_ms > 0 ? timeout_ms : 600000, GPR_TIMESPAN));
    grpc_slice m = grpc_slice_from_copied_string(path);
    s->call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq, m, NULL, deadline, NULL);
    grpc_slice_unref(m);
    grpc_metadata_array_init(&s->init_md);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_INITIAL_METADATA;
    set_auth(c, &op);
    s->broken = stream_batch(s, &op, 1) != 0;
    *out = s;
    return 0;
}

int kvc_stream_send(kvc_stream *s, const ProtobufCMessage *m)
{
    if (s->broken)
        return -EPIPE;
    grpc_byte_buffer *bb = kw_pack(m);
    if (!bb)
        return -ENOMEM;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = bb;
    int rc = stream_batch(s, &op, 1);
    grpc_byte_buffer_destroy(bb);
    if (rc)
        s->broken = 1;
    return rc;
}

static void stream_free(kvc_stream *s)
{
    grpc_metadata_array_destroy(&s->init_md);
    grpc_call_unref(s->call);
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_pluck(s->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(s->cq);
    free(s);
}

int kvc_stream_finish(kvc_stream *s, const ProtobufCMessageDescriptor *reply_desc,
                      ProtobufCMessage **reply, char *msg, size_t msglen)
{
    grpc_byte_buffer *recv = NULL;
    grpc_metadata_array trail;
    grpc_metadata_array_init(&trail);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    const char *error_string = NULL;
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!s->closed) {            /* client streaming: close, then the one reply */
        if (!s->broken)
            ops[n++].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[n++].data.recv_initial_metadata.recv_initial_metadata = &s->init_md;
        ops[n].op = GRPC_OP_RECV_MESSAGE;
        ops[n++].data.recv_message.recv_message = &recv;
    }
    ops[n].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[n].data.recv_status_on_client.trailing_metadata = &trail;
    ops[n].data.recv_status_on_client.status = &status;
    ops[n].data.recv_status_on_client.status_details = &details;
    ops[n++].data.recv_status_on_client.error_string = &error_string;
    int tag;
    if (grpc_call_start_batch(s->call, ops, n, &tag, NULL) == GRPC_CALL_OK)
        grpc_completion_queue_pluck(s->cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    else
        status = GRPC_STATUS_INTERNAL;
    if (msg && msglen)
        status_msg(status, details, s->method, s->addr, msg, msglen);
    if (reply)
        *reply = NULL;
    if (status == GRPC_STATUS_OK && recv && reply && !(*reply = kw_unpack(recv, reply_desc)))
        status = GRPC_STATUS_INTERNAL;
    if (error_string)
        gpr_free((void *)error_string);
    if (recv)
        grpc_byte_buffer_destroy(recv);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&trail);
    stream_free(s);
    return (int)status;
}

void kvc_stream_cancel(kvc_stream *s)
{
    grpc_call_cancel(s->call, NULL);
    char msg[64];
    kvc_stream_finish(s, &kvarc__v1__empty__descriptor, NULL, msg, sizeof msg);
}

int kvc_sstream_open(kvc_conn *c, const char *method, const ProtobufCMessage *req, int timeout_ms,
                     kvc_stream **out)
{
    int rc = kvc_stream_open(c, method, timeout_ms, out);
    if (rc)
        return rc;
    kvc_stream *s = *out;
    grpc_byte_buffer *bb = kw_pack(req);
    if (!bb) {
        kvc_stream_cancel(s);
        return -ENOMEM;
    }
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_MESSAGE;
    ops[0].data.send_message.send_message = bb;
    ops[1].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[2].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[2].data.recv_initial_metadata.recv_initial_metadata = &s->init_md;
    if (!s->broken && stream_batch(s, ops, 3))
        s->broken = 1;
    grpc_byte_buffer_destroy(bb);
    s->closed = 1;
    return 0;
}

int kvc_sstream_next(kvc_stream *s, const ProtobufCMessageDescriptor *desc, ProtobufCMessage **m)
{
    *m = NULL;
    if (s->broken)
        return 0;
    grpc_byte_buffer *recv = NULL;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &recv;
    if (stream_batch(s, &op, 1) || !recv)
        return 0;                    /* end of stream (or failure: finish says) */
    *m = kw_unpack(recv, desc);
    grpc_byte_buffer_destroy(recv);
    return *m ? 1 : -EIO;
}

int kvc_job(kvc_conn *c, const char *method, const ProtobufCMessage *req, int timeout_ms,
            void (*progress)(void *arg, uint64_t done, uint64_t total), void *arg,
            Kvarc__V1__JobEvent **last, char *msg, size_t msglen)
{
    kvc_stream *s;
    *last = NULL;
    int rc = kvc_sstream_open(c, method, req, timeout_ms, &s);
    if (rc) {
        snprintf(msg, msglen, "%s: cannot start the call (%d)", method, rc);
        return GRPC_STATUS_INTERNAL;
    }
    ProtobufCMessage *m;
    while (kvc_sstream_next(s, &kvarc__v1__job_event__descriptor, &m) == 1) {
        Kvarc__V1__JobEvent *ev = (Kvarc__V1__JobEvent *)m;
        if (ev->verify || ev->compact) {
            if (*last)
                protobuf_c_message_free_unpacked(&(*last)->base, NULL);
            *last = ev;
        } else {
            if (progress)
                progress(arg, ev->done, ev->total);
            protobuf_c_message_free_unpacked(m, NULL);
        }
    }
    int status = kvc_stream_finish(s, &kvarc__v1__empty__descriptor, NULL, msg, msglen);
    if (!status && !*last) {
        snprintf(msg, msglen, "%s ended without its result", method);
        status = GRPC_STATUS_INTERNAL;
    }
    if (status && *last) {
        protobuf_c_message_free_unpacked(&(*last)->base, NULL);
        *last = NULL;
    }
    return status;
}
