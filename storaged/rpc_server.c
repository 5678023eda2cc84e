/* rpc_server.c - the engine served over the gRPC C core (unary calls).
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
 *   REQUESTED --rpc_on_requested--> RECEIVING --rpc_on_received--> FINISHING
 *     --rpc_on_finished--> freed
 *   REQUESTED: grpc_server_request_call outstanding. On success the worker
 *     requests the next call first, then starts [send initial metadata,
 *     receive message]. On failure (server shutting down) it frees it.
 *   RECEIVING: the request bytes are decoded (protobuf-c), the handler runs
 *     against the engine, and [send message, send status, receive close]
 *     starts. A request that does not decode is INVALID_ARGUMENT, and the
 *     engine is not touched.
 *   RECEIVING again (AppendStream): each message is one block, appended
 *     durably before the next [receive message] starts; the client's close
 *     (no message) leads to the reply.
 *   SENDING (LoadSignatures): one chunk in flight at a time; its completion
 *     reads and sends the next (rpc_sig_step) until the plan is done.
 *   JOB (Verify, Compact): rpc_job_start hands the call to a thread of its
 *     own, so long work holds no worker. The engine's progress callback
 *     (job_progress) sends an event when none is in flight (job_sending);
 *     the worker frees it on completion (rpc_on_job_sent). At the end the
 *     thread waits for job_sending to clear, then rpc_finish. When the
 *     grace period is over, job_progress returns nonzero and the engine
 *     stops (-ECANCELED, nothing changed).
 *   FINISHING: every buffer, slice and the call are released.
 * Invariants: 1. every buffer a batch refers to lives in the rpc_call until
 * that batch's event arrives; 2. only the worker owning the queue touches a
 * call; 3. shutdown order: shutdown_and_notify -> after the grace period
 * cancel_all_calls and stop jobs -> wait the notify tag -> wait for the
 * job threads -> wait until no call is in
 * flight (a cancelled call's last batch must find its queue open) ->
 * destroy the server -> shut down and drain every queue -> join the workers.
 */
#include <errno.h>
#include <grpc/byte_buffer_reader.h>
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

#include "auth.h"
#include "kvarc.pb-c.h"
#include "kvd_internal.h"
#include "kvg.h"
#include "pb_strings.h"
#include "rpc_server.h"

enum { REQUESTED, RECEIVING, SENDING, JOB, FINISHING };

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
    kvd_reader  **helpers;      /* [nhelpers] extra readers a RerankLayer may borrow */
    atomic_int   *help_busy;    /* [nhelpers] 1 while borrowed */
    int           nhelpers;
    atomic_int    jobs;         /* job threads running (Verify, Compact) */
    atomic_int    stopping;     /* the grace period is over: jobs stop at their next progress */
};

struct rpc_worker {
    rpc_server            *s;
    grpc_completion_queue *cq;
    kvd_reader            *reader;   /* this worker's io_uring */
    pthread_t              th;
};

typedef struct rpc_call {
    rpc_worker         *w;
    int                 state;
    grpc_call          *call;
    grpc_call_details   details;
    grpc_metadata_array md;
    grpc_byte_buffer   *req, *resp;
    grpc_slice          status_details;
    grpc_status_code    status;
    int                 cancelled;
    int64_t             t0;
    char                method[64];
    const auth_scope   *scope;          /* the caller's token; NULL = local, unscoped */
    auth_tokens        *tokens;         /* the set scope points into, referenced until the call ends */
    uint64_t            log_conv;       /* the conversation it touched, for the log line */
    /* JOB: the handler runs on its own thread; progress events go out one at a time */
    atomic_int          job_sending;    /* a progress event is in flight (job_buf) */
    grpc_byte_buffer   *job_buf;
    int64_t             job_last_ns;
    uint8_t            *job_in;         /* the request bytes, the thread's own copy */
    size_t              job_len;
    int               (*job_fn)(struct rpc_call *, const uint8_t *, size_t, grpc_byte_buffer **, kvd_err *);
    int                 streaming;      /* AppendStream: messages until the client closes */
    uint64_t            stream_blocks, stream_len;
    /* LoadSignatures: the plan, and where it is */
    uint64_t            ls_conv, ls_first, ls_end, ls_next;
    uint32_t            ls_layer, ls_head, ls_heads, ls_dim, ls_chunk;
} rpc_call;

static int64_t now_ns(int clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

grpc_status_code rpc_status_of(int rc)
{
    switch (rc) {
    case 0:                return GRPC_STATUS_OK;
    case -ENOENT:          return GRPC_STATUS_NOT_FOUND;
    case -EEXIST:          return GRPC_STATUS_ALREADY_EXISTS;
    case KVARC_ESHAPE:
    case -EPERM:           return GRPC_STATUS_FAILED_PRECONDITION;
    case -ENOSPC:
    case -E2BIG:
    case -ENOMEM:          return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case KVARC_ECORRUPT:   return GRPC_STATUS_DATA_LOSS;
    case -EINVAL:
    case -ERANGE:
    case KVARC_EHEADDIM:
    case KVARC_EFORMAT:
    case KVARC_EVERSION:
    case KVARC_EDTYPE:
    case KVARC_ENONFINITE: return GRPC_STATUS_INVALID_ARGUMENT;
    case -EBUSY:
    case -ECANCELED:       return GRPC_STATUS_UNAVAILABLE;
    case -EACCES:          return GRPC_STATUS_PERMISSION_DENIED;
    default:               return GRPC_STATUS_INTERNAL;
    }
}

/* ---- messages <-> engine structs ------------------------------------- */

static int shape_from_pb(const Kvarc__V1__Shape *p, kvd_shape *s, kvd_err *err)
{
    memset(s, 0, sizeof *s);
    if (!p)
        return kvd_fail(err, -EINVAL, "shape missing");
    if (p->format > 255 || p->pos_mode > 255 || p->rope_layout > 255 || p->dtype > 255)
        return kvd_fail(err, -EINVAL, "shape field out of range");
    s->n_layers = p->n_layers;
    s->n_kv_heads = p->n_kv_heads;
    s->n_q_heads = p->n_q_heads;
    s->head_dim = p->head_dim;
    s->format = (uint8_t)p->format;
    s->pos_mode = (uint8_t)p->pos_mode;
    s->rope_layout = (uint8_t)p->rope_layout;
    s->dtype = (uint8_t)p->dtype;
    s->rotary_dims = p->rotary_dims;
    s->rope_theta = p->rope_theta;
    s->seed = p->seed;
    if (p->fingerprint && strlen(p->fingerprint) >= sizeof s->fingerprint)
        return kvd_fail(err, -EINVAL, "fingerprint longer than %zu bytes", sizeof s->fingerprint - 1);
    snprintf(s->fingerprint, sizeof s->fingerprint, "%s", p->fingerprint ? p->fingerprint : "");
    return 0;
}

/* Fill pb (and its shape, caller storage) from info; strings point into info. */
static void info_to_pb(kvd_conv_info *i, Kvarc__V1__ConvInfo *pb, Kvarc__V1__Shape *sp)
{
    kvarc__v1__conv_info__init(pb);
    kvarc__v1__shape__init(sp);
    pb->ns = i->ns;
    pb->name = i->name;
    pb->id = i->id;
    pb->parent = i->parent;
    pb->fork_len = i->fork_len;
    pb->length = i->length;
    pb->flags = i->flags;
    pb->created_ns = i->created_ns;
    sp->n_layers = i->shape.n_layers;
    sp->n_kv_heads = i->shape.n_kv_heads;
    sp->n_q_heads = i->shape.n_q_heads;
    sp->head_dim = i->shape.head_dim;
    sp->format = i->shape.format;
    sp->pos_mode = i->shape.pos_mode;
    sp->rope_layout = i->shape.rope_layout;
    sp->dtype = i->shape.dtype;
    sp->rotary_dims = i->shape.rotary_dims;
    sp->rope_theta = i->shape.rope_theta;
    sp->seed = i->shape.seed;
    sp->fingerprint = i->shape.fingerprint;
    pb->shape = sp;
}

static grpc_byte_buffer *pack(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf)
        return NULL;
    protobuf_c_message_pack(m, buf);
    grpc_slice sl = grpc_slice_from_copied_buffer((const char *)buf, n);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    free(buf);
    return bb;
}

/* The bytes of a received buffer, as one slice (empty if unreadable). */
static grpc_slice bb_slice(grpc_byte_buffer *bb)
{
    grpc_byte_buffer_reader rd;
    grpc_slice all = grpc_empty_slice();
    if (grpc_byte_buffer_reader_init(&rd, bb)) {
        all = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
    }
    return all;
}

/* The reply for one conversation, with every layer's durable length (a
 * worker attaching to it continues each layer from there). */
static grpc_byte_buffer *conv_reply(rpc_call *c, kvd_conv_info *info, int with_means)
{
    kvd_engine *e = c->w->s->e;
    c->log_conv = info->id;
    Kvarc__V1__ConvReply r = KVARC__V1__CONV_REPLY__INIT;
    Kvarc__V1__ConvInfo ci;
    Kvarc__V1__Shape sp;
    uint64_t lens[KVD_MAX_LAYERS];
    info_to_pb(info, &ci, &sp);
    kvd_err err;
    uint32_t nl = info->shape.n_layers <= KVD_MAX_LAYERS ? info->shape.n_layers : 0;
    for (uint32_t l = 0; l < nl; l++)
        if (kvd_layer_length(e, info->id, l, &lens[l], &err))
            nl = 0;            /* deleted meanwhile: the reply goes without them */
    ci.n_layer_lengths = nl;
    ci.layer_lengths = lens;
    r.info = &ci;
    float *means = NULL;
    size_t per = 2 * (size_t)info->shape.head_dim, nh = info->shape.n_kv_heads;
    if (with_means && nl && (means = malloc((size_t)nl * nh * per * sizeof *means))) {
        for (uint32_t l = 0; l < nl && means; l++)
            for (size_t h = 0; h < nh; h++) {
                float *m = means + ((size_t)l * nh + h) * per;
                if (kvd_conv_means(e, info->id, l, (uint32_t)h, m, m + per / 2, &err)) {
                    free(means);
                    means = NULL;
                    break;
                }
            }
        r.n_means = means ? (size_t)nl * nh * per : 0;
        r.means = means;
    }
    grpc_byte_buffer *bb = with_means && !means ? NULL : pack(&r.base);
    free(means);
    return bb;
}

/* ---- namespace scopes ---------------------------------------------------- */

/* A conversation by id, as the caller may see it: one of a namespace
 * outside the caller's scope answers exactly like an unknown id. */
static int visible_conv(rpc_call *c, uint64_t id, conv_rec *info, kvd_err *err)
{
    int rc = conv_lookup(c->w->s->e, id, info, err);
    c->log_conv = id;
    if (!rc && !auth_ns_allowed(c->scope, info->ns))
        return kvd_fail(err, -ENOENT, "conversation id %llu not found", (unsigned long long)id);
    return rc;
}

/* A namespace named in a request must be in the caller's scope. */
static int ns_check(rpc_call *c, const char *ns, kvd_err *err)
{
    if (auth_ns_allowed(c->scope, ns))
        return 0;
    return kvd_fail(err, -EACCES, "token %s is not scoped to namespace '%s'", c->scope->token_tag, ns ? ns : "");
}

/* Whole-archive calls (Stats, Verify, Compact) need a '*' token or the local socket. */
static int admin_check(rpc_call *c, kvd_err *err)
{
    if (!c->scope || c->scope->all)
        return 0;
    return kvd_fail(err, -EACCES, "%s covers the whole archive: token %s is scoped to namespaces, not '*'",
                    c->method, c->scope->token_tag);
}

/* ---- handlers: decode request bytes, call the engine, encode reply ---- */

typedef int (*handler_fn)(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out,
                          kvd_err *err);

#define DECODE(type, fn, var)                                                             \
    type *var = fn(NULL, len, in);                                                        \
    if (!var)                                                                             \
        return kvd_fail(err, -EINVAL, "request is not a valid " #type " message (%zu bytes)", len); \
    int var##_bad = pb_strings_check(var->base.descriptor, in, len, err);                 \
    if (var##_bad) {                                                                      \
        protobuf_c_message_free_unpacked(&var->base, NULL);                               \
        return var##_bad;                                                                 \
    }

static int h_health(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    rpc_server *s = c->w->s;
    DECODE(Kvarc__V1__Empty, kvarc__v1__empty__unpack, req);
    kvarc__v1__empty__free_unpacked(req, NULL);
    kvd_stats st;
    int rc = kvd_stats_get(s->e, &st, err);
    if (rc)
        return rc;
    Kvarc__V1__HealthReply r = KVARC__V1__HEALTH_REPLY__INIT;
    r.status = "serving";
    r.version = KVARCD_VERSION;
    r.uptime_ms = (uint64_t)((now_ns(CLOCK_MONOTONIC) - s->started_ns) / 1000000);
    r.conversations = st.conversations;
    *out = pack(&r.base);
    return 0;
}

static int h_create(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    rpc_server *s = c->w->s;
    DECODE(Kvarc__V1__CreateRequest, kvarc__v1__create_request__unpack, req);
    kvd_shape sh;
    kvd_conv_info info;
    int rc = ns_check(c, req->ns, err);
    if (!rc)
        rc = shape_from_pb(req->shape, &sh, err);
    if (!rc && sh.pos_mode == KVARC_POS_TRUE_FREE)     /* what a libkvarc before kind 2 sends for true mode */
        rc = kvd_fail(err, KVARC_EVERSION, "'%s/%s': position mode 0 (true positions with position-free "
                      "signatures) is no longer created: its retrieval ranks keys by a score attention does not "
                      "use; a current libkvarc sends 2 for true positions (kind-2 signatures) or 1 for remapped: "
                      "upgrade the client", req->ns, req->name);
    if (!rc && req->n_means && req->n_means != (size_t)sh.n_layers * sh.n_kv_heads * 2 * sh.head_dim)
        rc = kvd_fail(err, -EINVAL, "means has %zu values, the shape needs %llu (n_layers x n_kv_heads "
                      "x 2 x head_dim) or none", req->n_means,
                      (unsigned long long)sh.n_layers * sh.n_kv_heads * 2 * sh.head_dim);
    if (!rc)
        rc = kvd_conv_create(s->e, req->ns, req->name, &sh, req->n_means ? req->means : NULL, &info, err);
    kvarc__v1__create_request__free_unpacked(req, NULL);
    if (!rc)
        *out = conv_reply(c, &info, 0);
    return rc;
}

static int h_open(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    rpc_server *s = c->w->s;
    DECODE(Kvarc__V1__OpenRequest, kvarc__v1__open_request__unpack, req);
    kvd_shape sh;
    kvd_conv_info info;
    int rc = ns_check(c, req->ns, err);
    if (!rc && req->expect)
        rc = shape_from_pb(req->expect, &sh, err);
    if (!rc)
        rc = kvd_conv_open(s->e, req->ns, req->name, req->expect ? &sh : NULL, &info, err);
    int with_means = req->with_means;
    kvarc__v1__open_request__free_unpacked(req, NULL);
    if (!rc)
        *out = conv_reply(c, &info, with_means);
    return rc;
}

static int h_stat(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    rpc_server *s = c->w->s;
    DECODE(Kvarc__V1__StatRequest, kvarc__v1__stat_request__unpack, req);
    kvd_conv_info info;
    int rc = kvd_conv_stat(s->e, req->id, &info, err);
    c->log_conv = req->id;
    if (!rc && !auth_ns_allowed(c->scope, info.ns))
        rc = kvd_fail(err, -ENOENT, "conversation id %llu not found", (unsigned long long)req->id);
    kvarc__v1__stat_request__free_unpacked(req, NULL);
    if (!rc)
        *out = conv_reply(c, &info, 0);
    return rc;
}

/* Every namespace the caller's scope holds, in (namespace, name) order:
 * the engine's listing filtered, page by page. */
static long list_in_scope(rpc_call *c, const char *after, kvd_conv_info *out, size_t max, kvd_err *err)
{
    char last[KVD_NS_MAX + KVD_NAME_MAX];
    kvd_conv_info *page = malloc(max * sizeof *page);
    if (!page)
        return kvd_fail(err, -ENOMEM, "out of memory");
    size_t n = 0;
    long got = 0;
    while (n < max && (got = kvd_conv_list(c->w->s->e, NULL, after, page, max, err)) > 0) {
        for (long i = 0; i < got && n < max; i++)
            if (auth_ns_allowed(c->scope, page[i].ns))
                out[n++] = page[i];
        snprintf(last, sizeof last, "%s/%s", page[got - 1].ns, page[got - 1].name);
        after = last;
        if ((size_t)got < max)
            break;
    }
    free(page);
    return got < 0 ? got : (long)n;
}

static int h_list(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    rpc_server *s = c->w->s;
    DECODE(Kvarc__V1__ListRequest, kvarc__v1__list_request__unpack, req);
    size_t limit = req->limit ? req->limit : 100;
    int rc = 0;
    if (limit > 1000)
        rc = kvd_fail(err, -EINVAL, "list limit %zu over the maximum of 1000", limit);
    kvd_conv_info *infos = rc ? NULL : calloc(limit + 1, sizeof *infos);
    Kvarc__V1__ConvInfo *pbs = rc ? NULL : calloc(limit + 1, sizeof *pbs);
    Kvarc__V1__ConvInfo **ptrs = rc ? NULL : calloc(limit + 1, sizeof *ptrs);
    Kvarc__V1__Shape *sps = rc ? NULL : calloc(limit + 1, sizeof *sps);
    if (!rc && (!infos || !pbs || !ptrs || !sps))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    long n = 0;
    const char *ns = req->ns && *req->ns ? req->ns : NULL, *after = req->after && *req->after ? req->after : NULL;
    if (!rc && ns)
        rc = ns_check(c, ns, err);
    if (!rc && (ns || !c->scope || c->scope->all)) {
        n = kvd_conv_list(s->e, ns, after, infos, limit + 1, err);
        if (n < 0)
            rc = (int)n;
    } else if (!rc) {
        n = list_in_scope(c, after, infos, limit + 1, err);
        if (n < 0)
            rc = (int)n;
    }
    if (!rc) {
        Kvarc__V1__ListReply r = KVARC__V1__LIST_REPLY__INIT;
        r.more = (size_t)n > limit;
        r.n_convs = r.more ? limit : (size_t)n;
        for (size_t i = 0; i < r.n_convs; i++) {
            info_to_pb(&infos[i], &pbs[i], &sps[i]);
            ptrs[i] = &pbs[i];
        }
        r.convs = ptrs;
        *out = pack(&r.base);
    }
    kvarc__v1__list_request__free_unpacked(req, NULL);
    free(infos);
    free(pbs);
    free(ptrs);
    free(sps);
    return rc;
}

static int h_delete(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    rpc_server *s = c->w->s;
    DECODE(Kvarc__V1__DeleteRequest, kvarc__v1__delete_request__unpack, req);
    int rc = ns_check(c, req->ns, err);
    if (!rc)
        rc = kvd_conv_delete(s->e, req->ns, req->name, err);
    kvarc__v1__delete_request__free_unpacked(req, NULL);
    if (!rc) {
        Kvarc__V1__Empty r = KVARC__V1__EMPTY__INIT;
        *out = pack(&r.base);
    }
    return rc;
}

static int fork_common(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out,
                       kvd_err *err, uint32_t flags, int need_snapshot)
{
    rpc_server *s = c->w->s;
    DECODE(Kvarc__V1__ForkRequest, kvarc__v1__fork_request__unpack, req);
    kvd_conv_info src, info;
    int rc = ns_check(c, req->src_ns, err);
    if (!rc)
        rc = ns_check(c, req->dst_ns, err);
    if (!rc && need_snapshot) {        /* Restore: the source must be a snapshot */
        rc = kvd_conv_open(s->e, req->src_ns, req->src_name, NULL, &src, err);
        if (!rc && !(src.flags & KVD_CONV_SNAPSHOT))
            rc = kvd_fail(err, -EPERM, "'%s/%s' is not a snapshot: use Fork", req->src_ns, req->src_name);
    }
    if (!rc)
        rc = kvd_conv_fork(s->e, req->src_ns, req->src_name, req->has_at_len ? req->at_len : UINT64_MAX,
                           req->dst_ns, req->dst_name, flags, &info, err);
    kvarc__v1__fork_request__free_unpacked(req, NULL);
    if (!rc)
        *out = conv_reply(c, &info, 0);
    return rc;
}

static int h_fork(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    return fork_common(c, in, len, out, err, 0, 0);
}

static int h_snapshot(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    return fork_common(c, in, len, out, err, KVD_CONV_SNAPSHOT, 0);
}

static int h_restore(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    return fork_common(c, in, len, out, err, 0, 1);
}

#define MAX_REPLY_RECORD_BYTES (8u << 20)

/* Block r (an Append's, or one of an AppendMany's) checked against the
 * conversation's shape and made a kvd_block_in: the fp16 fields copied
 * aligned into copies[0..1] (malloc'ed, the caller frees them). what
 * names the block in errors. 0 or -EINVAL / -ENOMEM in err. */
static int append_block(const conv_rec *info, const Kvarc__V1__AppendRequest *r, const char *what, uint16_t **copies,
                        kvd_block_in *b, kvd_err *err)
{
    size_t H = info->shape.n_kv_heads, d = info->shape.head_dim, n = r->count;
    size_t rb = (size_t)kvarc_record_bytes(info->shape.format, (int)d);
    size_t ns = (size_t)kvarc_block_n_sum(r->first_pos, r->count) * KVARC_SUM_ITEMS;
    if (r->sig_bits.len != H * n * d / 8 || r->sig_scale.len != H * n * 2 || r->records.len != H * n * rb)
        return kvd_fail(err, -EINVAL, "%s of %u tokens to '%s/%s' needs %zu signature bytes, %zu scale bytes and "
                        "%zu record bytes; got %zu, %zu, %zu", what, r->count, info->ns, info->name, H * n * d / 8,
                        H * n * 2, H * n * rb, r->sig_bits.len, r->sig_scale.len, r->records.len);
    if ((r->sum_bits.len || r->sum_scale.len) &&
        (!ns || r->sum_bits.len != H * ns * d / 8 || r->sum_scale.len != H * ns * 2))
        return kvd_fail(err, -EINVAL, "%s of positions [%llu, +%u) to '%s/%s' completes %zu blocks: their "
                        "summaries are %zu bits and %zu scale bytes (or none); got %zu, %zu", what,
                        (unsigned long long)r->first_pos, r->count, info->ns, info->name, ns / KVARC_SUM_ITEMS,
                        H * ns * d / 8, H * ns * 2, r->sum_bits.len, r->sum_scale.len);
    copies[0] = malloc(r->sig_scale.len + 1);
    copies[1] = malloc(r->sum_scale.len + 1);
    if (!copies[0] || !copies[1])
        return kvd_fail(err, -ENOMEM, "out of memory");
    memcpy(copies[0], r->sig_scale.data, r->sig_scale.len);
    if (r->sum_scale.len)
        memcpy(copies[1], r->sum_scale.data, r->sum_scale.len);
    *b = (kvd_block_in){ r->layer, r->first_pos, r->count, r->sig_bits.data, copies[0], r->records.data,
                         r->sum_bits.len ? r->sum_bits.data : NULL, r->sum_bits.len ? copies[1] : NULL };
    return 0;
}

/* Decode one AppendRequest and append it durably; *length is the layer's
 * length afterwards. Shared by Append and AppendStream. */
static int append_one(rpc_call *c, const uint8_t *in, size_t len, uint64_t *length, kvd_err *err)
{
    DECODE(Kvarc__V1__AppendRequest, kvarc__v1__append_request__unpack, req);
    conv_rec info;
    kvd_block_in b;
    uint16_t *copies[2] = { NULL, NULL };
    int rc = visible_conv(c, req->conv, &info, err);
    if (!rc)
        rc = append_block(&info, req, "append", copies, &b, err);
    if (!rc) {
        int brc = 0;
        rc = kvd_append_n(c->w->s->e, req->conv, &b, 1, &brc, NULL, err);
    }
    free(copies[0]);
    free(copies[1]);
    if (!rc)
        rc = kvd_layer_length(c->w->s->e, req->conv, req->layer, length, err);
    kvarc__v1__append_request__free_unpacked(req, NULL);
    return rc;
}

static int h_append(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    uint64_t length = 0;
    int rc = append_one(c, in, len, &length, err);
    if (!rc) {
        Kvarc__V1__AppendReply r = KVARC__V1__APPEND_REPLY__INIT;
        r.length = length;
        r.blocks = 1;
        *out = pack(&r.base);
    }
    return rc;
}

#define APPEND_MANY_BLOCKS 1024

/* AppendMany: every block checked as Append checks it, the good ones
 * stored together (kvd_append_n); a result per block. The call fails as
 * a whole only when the conversation is not there or the request is bad
 * as a whole. */
static int h_append_many(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__AppendManyRequest, kvarc__v1__append_many_request__unpack, req);
    conv_rec info;
    const size_t n = req->n_blocks;
    int rc = visible_conv(c, req->conv, &info, err);
    if (!rc && n > APPEND_MANY_BLOCKS)
        rc = kvd_fail(err, -E2BIG, "AppendMany of %zu blocks over the limit of %d", n, APPEND_MANY_BLOCKS);
    kvd_block_in *b = NULL;
    int *rcs = NULL, *idx = NULL;
    kvd_err *errs = NULL;
    uint16_t **copies = NULL;          /* aligned copies of the fp16 fields: [2n] */
    Kvarc__V1__AppendResult *res = NULL, **resp = NULL;
    if (!rc && !((b = calloc(n + 1, sizeof *b)) && (rcs = calloc(n + 1, sizeof *rcs)) &&
                 (idx = calloc(n + 1, sizeof *idx)) && (errs = calloc(n + 1, sizeof *errs)) &&
                 (copies = calloc(2 * n + 1, sizeof *copies)) && (res = calloc(n + 1, sizeof *res)) &&
                 (resp = calloc(n + 1, sizeof *resp))))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    size_t nb = 0;                     /* blocks that pass the checks, b[0..nb), idx: their request index */
    for (size_t i = 0; !rc && i < n; i++) {
        Kvarc__V1__AppendRequest *r = req->blocks[i];
        char what[32];
        snprintf(what, sizeof what, "block %zu", i);
        if (r->conv && r->conv != req->conv)
            rcs[i] = kvd_fail(&errs[i], -EINVAL, "block %zu names conversation %llu in an AppendMany to %llu", i,
                              (unsigned long long)r->conv, (unsigned long long)req->conv);
        else if ((rcs[i] = append_block(&info, r, what, copies + 2 * i, &b[nb], &errs[i])) == -ENOMEM)
            rc = kvd_fail(err, -ENOMEM, "out of memory");
        if (!rcs[i])
            idx[nb++] = (int)i;
    }
    int *got = rc ? NULL : calloc(nb + 1, sizeof *got);
    kvd_err *gerr = rc ? NULL : calloc(nb + 1, sizeof *gerr);
    if (!rc && (!got || !gerr))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    if (!rc) {
        kvd_err e1 = { 0, "" };
        kvd_append_n(c->w->s->e, req->conv, b, nb, got, gerr, &e1);
        for (size_t j = 0; j < nb; j++)     /* each refused block's own message, as Append gives it */
            if ((rcs[idx[j]] = got[j]))
                errs[idx[j]] = gerr[j];
    }
    for (size_t i = 0; !rc && i < n; i++) {
        Kvarc__V1__AppendRequest *r = req->blocks[i];
        kvarc__v1__append_result__init(&res[i]);
        res[i].status = rcs[i] ? (uint32_t)rpc_status_of(rcs[i]) : 0;
        res[i].message = rcs[i] ? (errs[i].msg[0] ? errs[i].msg : (char *)kvarc_strerror(rcs[i])) : "";
        kvd_err le;
        uint64_t length = 0;
        if (!kvd_layer_length(c->w->s->e, req->conv, r->layer, &length, &le))
            res[i].length = length;
        resp[i] = &res[i];
    }
    if (!rc) {
        Kvarc__V1__AppendManyReply r = KVARC__V1__APPEND_MANY_REPLY__INIT;
        r.n_results = n;
        r.results = resp;
        *out = pack(&r.base);
    }
    for (size_t i = 0; copies && i < 2 * n; i++)
        free(copies[i]);
    free(copies);
    free(b);
    free(rcs);
    free(idx);
    free(errs);
    free(got);
    free(gerr);
    free(res);
    free(resp);
    kvarc__v1__append_many_request__free_unpacked(req, NULL);
    return rc;
}

static int h_fetch(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__FetchRequest, kvarc__v1__fetch_request__unpack, req);
    conv_rec info;
    uint8_t *recs = NULL;
    size_t rb = 0;
    int rc = visible_conv(c, req->conv, &info, err);
    if (!rc) {
        rb = (size_t)kvarc_record_bytes(info.shape.format, (int)info.shape.head_dim);
        if (req->n_positions * rb > MAX_REPLY_RECORD_BYTES)
            rc = kvd_fail(err, -E2BIG, "fetch of %zu records is %zu bytes, over the %u-byte limit of one "
                          "reply: split it", req->n_positions, req->n_positions * rb, MAX_REPLY_RECORD_BYTES);
        else if (!(recs = malloc(req->n_positions * rb + 1)))
            rc = kvd_fail(err, -ENOMEM, "out of memory");
    }
    if (!rc)
        rc = kvd_read_records(c->w->reader, req->conv, req->layer, req->head, req->positions, req->n_positions,
                              recs, err);
    if (!rc) {
        Kvarc__V1__FetchReply r = KVARC__V1__FETCH_REPLY__INIT;
        r.record_bytes = (uint32_t)rb;
        r.records.data = recs;
        r.records.len = req->n_positions * rb;
        *out = pack(&r.base);
    }
    kvarc__v1__fetch_request__free_unpacked(req, NULL);
    free(recs);
    return rc;
}

#define MAX_SUM_BLOCKS 65536     /* blocks per LoadSummaries reply (2.4 MB at head_dim 128) */

static int h_load_sums(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__LoadSummariesRequest, kvarc__v1__load_summaries_request__unpack, req);
    conv_rec info;
    uint64_t llen = 0, n = 0;
    uint8_t *bits = NULL, *ok = NULL;
    uint16_t *sc = NULL;
    size_t sb = 0;
    int rc = visible_conv(c, req->conv, &info, err);
    if (!rc)
        rc = kvd_layer_length(c->w->s->e, req->conv, req->layer, &llen, err);
    if (!rc) {
        uint64_t complete = llen / KVARC_SUM_BLOCK;
        n = req->count ? req->count : (req->first_block < complete ? complete - req->first_block : 0);
        if (!req->count && n > MAX_SUM_BLOCKS)
            n = MAX_SUM_BLOCKS;
        if (req->first_block > complete || n > complete - req->first_block || n > MAX_SUM_BLOCKS)
            rc = kvd_fail(err, -ERANGE, "summaries of blocks [%llu, +%llu) of layer %u: it has %llu complete "
                          "64-position blocks, and a call answers at most %u", (unsigned long long)req->first_block,
                          (unsigned long long)req->count, req->layer, (unsigned long long)complete, MAX_SUM_BLOCKS);
    }
    if (!rc) {
        sb = info.shape.head_dim / 8;
        bits = malloc(n * KVARC_SUM_ITEMS * sb + 1);
        sc = malloc(n * KVARC_SUM_ITEMS * 2 + 2);
        ok = malloc(n + 1);
        if (!bits || !sc || !ok)
            rc = kvd_fail(err, -ENOMEM, "out of memory");
    }
    if (!rc)
        rc = kvd_read_sums(c->w->reader, req->conv, req->layer, req->head, req->first_block, n, bits, sc, ok, err);
    if (!rc) {
        Kvarc__V1__LoadSummariesReply r = KVARC__V1__LOAD_SUMMARIES_REPLY__INIT;
        r.first_block = req->first_block;
        r.count = n;
        r.bits.data = bits;
        r.bits.len = n * KVARC_SUM_ITEMS * sb;
        r.scales.data = (uint8_t *)sc;
        r.scales.len = n * KVARC_SUM_ITEMS * 2;
        r.present.data = ok;
        r.present.len = n;
        *out = pack(&r.base);
    }
    kvarc__v1__load_summaries_request__free_unpacked(req, NULL);
    free(bits);
    free(sc);
    free(ok);
    return rc;
}

static int h_rerank(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__RerankRequest, kvarc__v1__rerank_request__unpack, req);
    conv_rec info;
    uint64_t *pos = NULL;
    float *sc = NULL;
    uint8_t *recs = NULL;
    size_t rb = 0;
    int rc = visible_conv(c, req->conv, &info, err);
    if (!rc && (req->n_queries < 1 || req->n_queries > 64 ||
                (size_t)req->n_queries * info.shape.head_dim != req->n_query))
        rc = kvd_fail(err, -EINVAL, "rerank needs n_queries in 1..64 and n_queries x head_dim (%u) query "
                      "values; got n_queries %u and %zu values", info.shape.head_dim, req->n_queries,
                      req->n_query);
    size_t k = req->top_k < req->n_shortlist ? req->top_k : req->n_shortlist;
    if (!rc) {
        rb = (size_t)kvarc_record_bytes(info.shape.format, (int)info.shape.head_dim);
        if (req->n_shortlist > 65536 || k * rb > MAX_REPLY_RECORD_BYTES)
            rc = kvd_fail(err, -E2BIG, "rerank shortlist %zu / top_k %zu over the limits (65536, %u reply "
                          "bytes)", req->n_shortlist, k, MAX_REPLY_RECORD_BYTES);
        else if (!(pos = malloc((k + 1) * sizeof *pos)) || !(sc = malloc((k + 1) * sizeof *sc)) ||
                 !(recs = malloc(k * rb + 1)))
            rc = kvd_fail(err, -ENOMEM, "out of memory");
    }
    long got = 0;
    if (!rc) {
        got = kvd_rerank(c->w->reader, req->conv, req->layer, req->head, req->query, (int)req->n_queries, req->shortlist,
                         req->n_shortlist, k, pos, sc, recs, err);
        if (got < 0)
            rc = (int)got;
    }
    if (!rc) {
        Kvarc__V1__RerankReply r = KVARC__V1__RERANK_REPLY__INIT;
        r.n_positions = (size_t)got;
        r.positions = pos;
        r.n_scores = (size_t)got;
        r.scores = sc;
        r.record_bytes = (uint32_t)rb;
        r.records.data = recs;
        r.records.len = (size_t)got * rb;
        *out = pack(&r.base);
    }
    kvarc__v1__rerank_request__free_unpacked(req, NULL);
    free(pos);
    free(sc);
    free(recs);
    return rc;
}

static int u64_in(const uint64_t *v, size_t n, uint64_t x)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && v[lo] == x;
}

#define RERANK_LAYER_ITEMS 8192

/* RerankLayer: every item's exact top_k (kvd_rerank_batch; an item with
 * runs gets its shortlist from stage 1b first, stage1b.c), then the
 * records not held by the client nor already sent for that head. The
 * reply's records stay under MAX_REPLY_RECORD_BYTES. */
static int h_rerank_layer(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__RerankLayerRequest, kvarc__v1__rerank_layer_request__unpack, req);
    conv_rec info;
    int rc = visible_conv(c, req->conv, &info, err);
    size_t d = info.shape.head_dim, rb = 0, n = req->n_items, total_k = 0, total_sl = 0;
    if (!rc && n > RERANK_LAYER_ITEMS)
        rc = kvd_fail(err, -E2BIG, "RerankLayer of %zu items over the limit of %d", n, RERANK_LAYER_ITEMS);
    for (size_t i = 0; !rc && i < n; i++) {
        Kvarc__V1__RerankItem *it = req->items[i];
        size_t nsl = it->n_runs ? it->shortlist_len : it->n_shortlist;
        if (it->head >= info.shape.n_kv_heads || it->n_queries < 1 || it->n_queries > 64 ||
            (size_t)it->n_queries * d != it->n_query || nsl > 65536)
            rc = kvd_fail(err, -EINVAL, "item %zu: head %u of %u, %u queries with %zu values (head_dim %zu), "
                          "shortlist %zu (at most 65536)", i, it->head, info.shape.n_kv_heads, it->n_queries,
                          it->n_query, d, nsl);
        for (size_t j = 1; !rc && j < it->n_have; j++)
            if (it->have[j] <= it->have[j - 1])
                rc = kvd_fail(err, -EINVAL, "item %zu: `have` must ascend", i);
        if (!rc && it->n_runs) {           /* stage 1b here: runs instead of a shortlist */
            size_t nb = 0;
            for (size_t q = 0; q + 1 < it->n_runs; q += 2)
                if (it->runs[q + 1] && it->runs[q] + it->runs[q + 1] > it->runs[q])
                    nb += (size_t)kvg_blocks_of(it->runs[q], it->runs[q + 1]);
            if (it->n_runs % 2 || it->n_runs > 2 * 16777216 || it->n_shortlist || it->n_have ||
                req->stage1_mode > 1 || req->stage1_combine > 1 ||
                (it->n_run_bias && it->n_run_bias != (size_t)it->n_queries * nb))
                rc = kvd_fail(err, -EINVAL, "item %zu: stage 1b takes (first, count) pairs of runs (%zu values), no "
                              "shortlist or `have` (%zu, %zu), stage1_mode 0|1 and stage1_combine 0|1 (%u, %u), "
                              "and no block biases or n_queries x the runs' blocks (%zu, %u x %zu)", i, it->n_runs,
                              it->n_shortlist, it->n_have, req->stage1_mode, req->stage1_combine, it->n_run_bias,
                              it->n_queries, nb);
        }
        total_k += it->top_k < nsl ? it->top_k : nsl;
        total_sl += it->n_runs ? nsl : 0;
    }
    if (!rc) {
        rb = (size_t)kvarc_record_bytes(info.shape.format, (int)d);
        if (total_k * rb > MAX_REPLY_RECORD_BYTES)
            rc = kvd_fail(err, -E2BIG, "RerankLayer asks for up to %zu records (%zu bytes), over the %u-byte "
                          "reply limit: split it", total_k, total_k * rb, MAX_REPLY_RECORD_BYTES);
    }
    Kvarc__V1__RerankResult *res = NULL, **resp = NULL;
    kvd_rerank_item *ri = NULL;
    uint64_t *pos = NULL, *seen = NULL;   /* seen: open-addressing set of (head, pos) + 1 */
    uint64_t *sl = NULL;                  /* stage 1b's shortlists */
    float *sc = NULL;
    protobuf_c_boolean *sent = NULL;
    uint8_t *recs = NULL;
    size_t nseen = 16;
    while (nseen < 2 * total_k)
        nseen *= 2;
    if (!rc && !((res = calloc(n + 1, sizeof *res)) && (resp = calloc(n + 1, sizeof *resp)) &&
                 (ri = calloc(n + 1, sizeof *ri)) && (pos = malloc((total_k + 1) * 8)) &&
                 (seen = calloc(nseen, 8)) && (sc = malloc((total_k + 1) * 4)) &&
                 (sent = malloc((total_k + 1) * sizeof *sent)) && (recs = malloc(total_k * rb + 1)) &&
                 (sl = malloc((total_sl + 1) * 8))))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    /* every item's top_k with its records (kvd_rerank_batch reads a record
     * that several items list once), then only the records not held by the
     * client nor sent earlier in this reply for the same head, compacted in
     * place (an item's kept records never move past its own slice) */
    for (size_t i = 0, off = 0, sl_off = 0; !rc && i < n; i++) {
        Kvarc__V1__RerankItem *it = req->items[i];
        size_t nsl = it->n_runs ? it->shortlist_len : it->n_shortlist, k = it->top_k < nsl ? it->top_k : nsl;
        ri[i] = (kvd_rerank_item){ .head = it->head, .q = it->query, .n_q = (int)it->n_queries,
                                   .shortlist = it->n_runs ? NULL : it->shortlist, .n = nsl, .top_k = k,
                                   .pos_out = pos + off, .score_out = sc + off, .rec_out = recs + off * rb };
        if (it->n_runs) {
            ri[i].runs = it->runs;
            ri[i].n_runs = it->n_runs / 2;
            ri[i].run_bias = it->n_run_bias ? it->run_bias : NULL;
            ri[i].s1_mode = (int)req->stage1_mode;
            ri[i].s1_combine = (int)req->stage1_combine;
            ri[i].sl_buf = sl + sl_off;
            sl_off += nsl;
        }
        off += k;
    }
    if (!rc) {   /* the heads over this worker's reader and the helpers free now (none: it alone) */
        rpc_server *s = c->w->s;
        kvd_reader *rs[KVD_RERANK_READERS];
        int hid[KVD_RERANK_READERS], nr = 1;
        rs[0] = c->w->reader;
        for (int i = 0; i < s->nhelpers && (uint32_t)nr < info.shape.n_kv_heads && nr < KVD_RERANK_READERS; i++)
            if (!atomic_exchange(&s->help_busy[i], 1)) {
                hid[nr] = i;
                rs[nr++] = s->helpers[i];
            }
        rc = kvd_rerank_batch_par(rs, nr, req->conv, req->layer, ri, n, err);
        for (int t = 1; t < nr; t++)
            atomic_store(&s->help_busy[hid[t]], 0);
    }
    size_t off = 0, rec_off = 0;
    for (size_t i = 0; !rc && i < n; i++) {
        Kvarc__V1__RerankItem *it = req->items[i];
        size_t start = rec_off;
        for (long j = 0; j < ri[i].got; j++) {
            uint64_t p = pos[off + (size_t)j];
            int dup = u64_in(it->have, it->n_have, p);
            if (!dup) {        /* sent earlier in this reply for the same head? */
                uint64_t key = ((uint64_t)it->head << 48 | p) + 1, mix = key;
                size_t h = (size_t)kvarc_splitmix64(&mix) & (nseen - 1);   /* every bit of key in the slot */
                while (seen[h] && seen[h] != key)
                    h = (h + 1) & (nseen - 1);
                dup = seen[h] == key;
                seen[h] = key;
            }
            sent[off + (size_t)j] = !dup;
            if (!dup) {
                memmove(recs + rec_off, ri[i].rec_out + (size_t)j * rb, rb);
                rec_off += rb;
            }
        }
        kvarc__v1__rerank_result__init(&res[i]);
        res[i].n_positions = res[i].n_scores = res[i].n_sent = (size_t)ri[i].got;
        res[i].positions = pos + off;
        res[i].scores = sc + off;
        res[i].sent = sent + off;
        res[i].records.data = recs + start;
        res[i].records.len = rec_off - start;
        resp[i] = &res[i];
        off += ri[i].top_k;
    }
    if (!rc) {
        Kvarc__V1__RerankLayerReply r = KVARC__V1__RERANK_LAYER_REPLY__INIT;
        r.record_bytes = (uint32_t)rb;
        r.n_results = n;
        r.results = resp;
        *out = pack(&r.base);
    }
    kvarc__v1__rerank_layer_request__free_unpacked(req, NULL);
    free(res); free(resp); free(ri); free(pos); free(seen); free(sc); free(sent); free(recs); free(sl);
    return rc;
}

static int h_search(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__SearchRequest, kvarc__v1__search_request__unpack, req);
    conv_rec info;
    uint64_t llen = 0;
    float *best = NULL;
    uint64_t *pos = NULL;
    kvg_query *qs = NULL;
    int rc = visible_conv(c, req->conv, &info, err);
    size_t d = info.shape.head_dim;
    if (!rc && (req->n_queries < 1 || req->n_queries > 64 || (size_t)req->n_queries * d != req->n_query ||
                req->mode > 1 || req->combine > 1 || req->k < 1 || req->k > KVD_SEARCH_K_MAX))
        rc = kvd_fail(err, -EINVAL, "search needs n_queries 1..64 with n_queries x head_dim (%zu) values, "
                      "mode 0|1, combine 0|1, k 1..%d", d, KVD_SEARCH_K_MAX);
    if (!rc)
        rc = kvd_layer_length(c->w->s->e, req->conv, req->layer, &llen, err);
    if (!rc && !((best = malloc(req->k * 4)) && (pos = malloc(req->k * 8)) &&
                 (qs = malloc(req->n_queries * sizeof *qs))))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    float mu[KVARC_HEAD_DIM_MAX];
    /* true positions (kind 2): the query comes turned to its own position,
     * is prepared uncentered, and the centering returns as block biases */
    kvg_rope rope;
    const kvg_rope *rp = NULL;
    if (!rc)
        rc = kvd_retrieval_check(&info, &rope, &rp, err);
    if (!rc)
        rc = kvd_conv_means(c->w->s->e, req->conv, req->layer, req->head, mu, NULL, err);
    const int pos_true = rp != NULL;
    kvd_qbias qb = { rp, mu, req->query };
    kvarc_rotation rot;
    if (!rc)
        kvarc_rotation_init(&rot, (int)d, info.shape.seed);
    for (uint32_t h = 0; !rc && h < req->n_queries; h++)
        if ((rc = kvg_query_prep_ref(&rot, pos_true ? NULL : mu, KVARC_DTYPE_F32, req->query + h * d, &qs[h])))
            kvd_fail(err, rc, "query %u: %s", h, kvarc_strerror(rc));
    long got = 0;
    if (!rc && llen) {
        got = kvd_search(c->w->reader, req->conv, req->layer, req->head, (uint32_t)d, llen, (int)req->mode,
                         (int)req->combine, qs, (int)req->n_queries, pos_true ? &qb : NULL, req->k, pos, best, err);
        if (got < 0)
            rc = (int)got;
    }
    if (!rc) {
        Kvarc__V1__SearchReply r = KVARC__V1__SEARCH_REPLY__INIT;
        r.n_positions = (size_t)got;
        r.positions = pos;
        r.n_scores = (size_t)got;
        r.scores = best;
        *out = pack(&r.base);
    }
    kvarc__v1__search_request__free_unpacked(req, NULL);
    free(best);
    free(pos);
    free(qs);
    return rc;
}

static int h_stats(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__Empty, kvarc__v1__empty__unpack, req);
    kvarc__v1__empty__free_unpacked(req, NULL);
    kvd_stats st;
    int rc = admin_check(c, err);
    if (!rc)
        rc = kvd_stats_get(c->w->s->e, &st, err);
    if (!rc) {
        Kvarc__V1__StatsReply r = KVARC__V1__STATS_REPLY__INIT;
        r.conversations = st.conversations;
        r.deleted = st.deleted;
        r.segments = st.segments;
        r.segment_bytes = st.segment_bytes;
        r.extents = st.extents;
        r.tokens = st.tokens;
        r.appends = st.appends;
        r.group_commits = st.group_commits;
        *out = pack(&r.base);
    }
    return rc;
}

/* The engine's progress callback for a JOB call: an event at most every
 * 200 ms, and none while one is in flight. Nonzero once the daemon's
 * grace period is over. */
static int job_progress(void *arg, uint64_t done, uint64_t total)
{
    rpc_call *c = arg;
    if (atomic_load(&c->w->s->stopping))
        return 1;
    int64_t now = now_ns(CLOCK_MONOTONIC);
    if (now - c->job_last_ns < 200000000 || atomic_load(&c->job_sending))
        return 0;
    c->job_last_ns = now;
    Kvarc__V1__JobEvent ev = KVARC__V1__JOB_EVENT__INIT;
    ev.done = done;
    ev.total = total;
    c->job_buf = pack(&ev.base);
    if (!c->job_buf)
        return 0;
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

typedef struct verify_lines {
    char  *v[100];
    size_t n;
} verify_lines;

static void keep_line(void *arg, const char *line)
{
    verify_lines *vl = arg;
    if (vl->n < 100)
        vl->v[vl->n++] = strdup(line);
}

static int h_verify(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__Empty, kvarc__v1__empty__unpack, req);
    kvarc__v1__empty__free_unpacked(req, NULL);
    verify_lines vl = { .n = 0 };
    kvd_verify_report rep;
    int rc = admin_check(c, err);
    if (!rc)
        rc = kvd_verify(c->w->s->e, &rep, keep_line, &vl, job_progress, c, err);
    if (rc == 0 || rc == KVARC_ECORRUPT) {       /* problems are the answer, not a failure */
        Kvarc__V1__VerifyReply r = KVARC__V1__VERIFY_REPLY__INIT;
        r.segments = rep.segments;
        r.blocks = rep.blocks;
        r.records = rep.records;
        r.extents = rep.extents;
        r.bytes = rep.bytes;
        r.problems = rep.problems;
        r.lines = vl.v;
        r.n_lines = vl.n;
        Kvarc__V1__JobEvent ev = KVARC__V1__JOB_EVENT__INIT;
        ev.done = ev.total = rep.bytes;
        ev.verify = &r;
        *out = pack(&ev.base);
        rc = 0;
    }
    for (size_t i = 0; i < vl.n; i++)
        free(vl.v[i]);
    return rc;
}

static int h_compact(rpc_call *c, const uint8_t *in, size_t len, grpc_byte_buffer **out, kvd_err *err)
{
    DECODE(Kvarc__V1__CompactRequest, kvarc__v1__compact_request__unpack, req);
    double th = req->threshold == 0.0f ? 0.5 : (double)req->threshold;
    kvarc__v1__compact_request__free_unpacked(req, NULL);
    uint64_t reclaimed = 0;
    int rc = admin_check(c, err);
    if (!rc)
        rc = kvd_compact(c->w->s->e, th, &reclaimed, job_progress, c, err);
    if (!rc) {
        Kvarc__V1__CompactReply r = KVARC__V1__COMPACT_REPLY__INIT;
        r.reclaimed = reclaimed;
        Kvarc__V1__JobEvent ev = KVARC__V1__JOB_EVENT__INIT;
        ev.compact = &r;
        *out = pack(&ev.base);
    }
    return rc;
}

static const struct { const char *path; handler_fn fn; } jobs[] = {
    { "/kvarc.v1.Kvarc/Verify", h_verify }, { "/kvarc.v1.Kvarc/Compact", h_compact },
};

static const struct { const char *path; handler_fn fn; } routes[] = {
    { "/kvarc.v1.Kvarc/Health", h_health },     { "/kvarc.v1.Kvarc/Create", h_create },
    { "/kvarc.v1.Kvarc/Open", h_open },         { "/kvarc.v1.Kvarc/Stat", h_stat },
    { "/kvarc.v1.Kvarc/List", h_list },         { "/kvarc.v1.Kvarc/Delete", h_delete },
    { "/kvarc.v1.Kvarc/Fork", h_fork },         { "/kvarc.v1.Kvarc/Snapshot", h_snapshot },
    { "/kvarc.v1.Kvarc/Restore", h_restore },   { "/kvarc.v1.Kvarc/Append", h_append },
    { "/kvarc.v1.Kvarc/AppendMany", h_append_many },
    { "/kvarc.v1.Kvarc/Fetch", h_fetch },       { "/kvarc.v1.Kvarc/Rerank", h_rerank },
    { "/kvarc.v1.Kvarc/RerankLayer", h_rerank_layer },
    { "/kvarc.v1.Kvarc/Stats", h_stats },       { "/kvarc.v1.Kvarc/Search", h_search },
    { "/kvarc.v1.Kvarc/LoadSummaries", h_load_sums },
};

/* ---- call state machine ---------------------------------------------------- */

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

static void call_free(rpc_call *c)
{
    auth_free(c->tokens);             /* this call's reference to the token set it was checked against */
    if (c->state != REQUESTED)
        atomic_fetch_sub(&c->w->s->in_flight, 1);
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

static void rpc_on_requested(rpc_call *c)
{
    call_request(c->w);                 /* keep one call requested on this queue */
    atomic_fetch_add(&c->w->s->in_flight, 1);
    c->t0 = now_ns(CLOCK_MONOTONIC);
    char *m = grpc_slice_to_c_string(c->details.method);
    snprintf(c->method, sizeof c->method, "%s", m);
    gpr_free(m);
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &c->req;
    c->state = RECEIVING;
    if (grpc_call_start_batch(c->call, ops, 2, c, NULL) != GRPC_CALL_OK)
        call_free(c);
}

/* Send the reply (or the error status) and receive the close. */
static void rpc_finish(rpc_call *c, kvd_err *err)
{
    rpc_server *s = c->w->s;
    c->status_details = grpc_slice_from_copied_string(c->status ? err->msg : "");
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    int n = 0;
    if (c->status == GRPC_STATUS_OK && c->resp) {   /* a server stream ends without one */
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->resp;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = c->status;
    ops[n++].data.send_status_from_server.status_details = &c->status_details;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    c->state = FINISHING;
    if (s->log)
        s->log(c->method, c->log_conv, c->scope ? c->scope->token_tag : "local", (int)c->status,
               c->status ? err->msg : "", (double)(now_ns(CLOCK_MONOTONIC) - c->t0) / 1e6);
    if (grpc_call_start_batch(c->call, ops, (size_t)n, c, NULL) != GRPC_CALL_OK)
        call_free(c);
}

/* One message of an AppendStream (or its end, when c->req is NULL). */
static void rpc_stream_step(rpc_call *c)
{
    kvd_err err = { 0, "" };
    if (!c->req) {                                  /* the client closed: reply */
        Kvarc__V1__AppendReply r = KVARC__V1__APPEND_REPLY__INIT;
        r.length = c->stream_len;
        r.blocks = c->stream_blocks;
        c->resp = pack(&r.base);
        c->status = c->resp ? GRPC_STATUS_OK : GRPC_STATUS_RESOURCE_EXHAUSTED;
        kvd_fail(&err, -ENOMEM, "out of memory encoding the reply");
        rpc_finish(c, &err);
        return;
    }
    grpc_slice all = bb_slice(c->req);
    grpc_byte_buffer_destroy(c->req);
    c->req = NULL;
    size_t len = GRPC_SLICE_LENGTH(all);
    int rc = len > RPC_STREAM_CHUNK
                 ? kvd_fail(&err, -E2BIG, "stream message of %zu bytes over the %d-byte chunk limit", len,
                            RPC_STREAM_CHUNK)
                 : append_one(c, GRPC_SLICE_START_PTR(all), len, &c->stream_len, &err);
    grpc_slice_unref(all);
    if (rc) {
        char m[sizeof err.msg + 80];
        snprintf(m, sizeof m, "%s (%llu earlier block(s) of this stream are stored)", err.msg,
                 (unsigned long long)c->stream_blocks);
        size_t l = strnlen(m, sizeof err.msg - 1);
        memcpy(err.msg, m, l);
        err.msg[l] = 0;
        c->status = rpc_status_of(rc);
        rpc_finish(c, &err);
        return;
    }
    c->stream_blocks++;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->req;
    if (grpc_call_start_batch(c->call, &op, 1, c, NULL) != GRPC_CALL_OK)
        call_free(c);
}

/* LoadSignatures: send the next chunk, or end the call with OK. */
static void rpc_sig_step(rpc_call *c)
{
    kvd_err err = { 0, "" };
    if (c->resp) {
        grpc_byte_buffer_destroy(c->resp);
        c->resp = NULL;
    }
    if (c->ls_next >= c->ls_end) {
        c->ls_head++;
        c->ls_next = c->ls_first;
    }
    if (c->ls_head >= c->ls_heads || c->ls_first >= c->ls_end) {
        c->status = GRPC_STATUS_OK;
        c->resp = NULL;
        rpc_finish(c, &err);
        return;
    }
    uint64_t per = RPC_STREAM_CHUNK / (c->ls_dim / 8 + 2);
    if (c->ls_chunk && c->ls_chunk < per)
        per = c->ls_chunk;
    uint64_t n = c->ls_end - c->ls_next < per ? c->ls_end - c->ls_next : per;
    uint8_t *bits = malloc(n * c->ls_dim / 8 + 1);
    uint16_t *sc = malloc(n * 2 + 2);
    int rc = bits && sc ? kvd_read_sigs(c->w->reader, c->ls_conv, c->ls_layer, c->ls_head, c->ls_next, n, bits,
                                        sc, &err)
                        : kvd_fail(&err, -ENOMEM, "out of memory");
    if (!rc) {
        Kvarc__V1__SigChunk m = KVARC__V1__SIG_CHUNK__INIT;
        m.head = c->ls_head;
        m.first_pos = c->ls_next;
        m.count = (uint32_t)n;
        m.bits.data = bits;
        m.bits.len = n * c->ls_dim / 8;
        m.scales.data = (uint8_t *)sc;
        m.scales.len = n * 2;
        c->resp = pack(&m.base);
        if (!c->resp)
            rc = kvd_fail(&err, -ENOMEM, "out of memory");
    }
    free(bits);
    free(sc);
    if (rc) {
        c->status = rpc_status_of(rc);
        rpc_finish(c, &err);
        return;
    }
    c->ls_next += n;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = c->resp;
    c->state = SENDING;
    if (grpc_call_start_batch(c->call, &op, 1, c, NULL) != GRPC_CALL_OK)
        call_free(c);
}

/* LoadSignatures: check the request, plan the chunks, send the first. */
static void rpc_sig_start(rpc_call *c, const uint8_t *in, size_t len)
{
    kvd_err err = { 0, "" };
    Kvarc__V1__LoadSignaturesRequest *req = kvarc__v1__load_signatures_request__unpack(NULL, len, in);
    conv_rec info;
    uint64_t llen = 0;
    int rc = req ? visible_conv(c, req->conv, &info, &err)
                 : kvd_fail(&err, -EINVAL, "request is not a valid LoadSignaturesRequest (%zu bytes)", len);
    if (!rc)
        rc = kvd_layer_length(c->w->s->e, req->conv, req->layer, &llen, &err);
    if (!rc && (req->first > llen || (req->count && req->first + req->count > llen)))
        rc = kvd_fail(&err, -ERANGE, "signatures [%llu, +%llu) reach past the end of layer %u (%llu tokens)",
                      (unsigned long long)req->first, (unsigned long long)req->count, req->layer,
                      (unsigned long long)llen);
    if (!rc) {
        c->ls_conv = req->conv;
        c->ls_layer = req->layer;
        c->ls_first = c->ls_next = req->first;
        c->ls_end = req->count ? req->first + req->count : llen;
        c->ls_head = 0;
        c->ls_heads = info.shape.n_kv_heads;
        c->ls_dim = info.shape.head_dim;
        c->ls_chunk = req->chunk_tokens;
    }
    if (req)
        kvarc__v1__load_signatures_request__free_unpacked(req, NULL);
    if (rc) {
        c->status = rpc_status_of(rc);
        rpc_finish(c, &err);
        return;
    }
    rpc_sig_step(c);
}

/* A JOB call's thread: run the handler, wait for the last progress event
 * to be sent, then finish the call as any other. */
static void *job_main(void *arg)
{
    rpc_call *c = arg;
    rpc_server *s = c->w->s;
    kvd_err err = { 0, "" };
    int rc = c->job_fn(c, c->job_in, c->job_len, &c->resp, &err);
    if (!rc && !c->resp)
        rc = kvd_fail(&err, -ENOMEM, "out of memory encoding the reply");
    while (atomic_load(&c->job_sending)) {
        struct timespec d = { 0, 1000000 };
        nanosleep(&d, NULL);
    }
    c->status = rpc_status_of(rc);
    rpc_finish(c, &err);
    atomic_fetch_sub(&s->jobs, 1);
    return NULL;
}

static void rpc_job_start(rpc_call *c, handler_fn fn, grpc_slice all)
{
    kvd_err err = { 0, "" };
    c->job_len = GRPC_SLICE_LENGTH(all);
    c->job_in = malloc(c->job_len + 1);
    c->job_fn = fn;
    c->state = JOB;
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
        rpc_finish(c, &err);
    }
    pthread_attr_destroy(&at);
}

/* A progress event of a JOB call went out (or failed): free it. */
static void rpc_on_job_sent(rpc_call *c)
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
    c->scope = NULL;
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
    c->scope = auth_check(c->tokens, (const char *)GRPC_SLICE_START_PTR(*val), GRPC_SLICE_LENGTH(*val));
    if (!c->scope) {
        kvd_fail(err, -EACCES, "%s: the bearer token is not one of this kvarcd's tokens", c->method);
        return GRPC_STATUS_UNAUTHENTICATED;
    }
    return GRPC_STATUS_OK;
}

static void rpc_on_received(rpc_call *c)
{
    kvd_err err = { 0, "" };
    int rc = 0;
    handler_fn fn = NULL;
    if (!c->streaming && (c->status = authenticate(c, &err)) != GRPC_STATUS_OK) {
        rpc_finish(c, &err);
        return;
    }
    if (c->req && !grpc_slice_str_cmp(c->details.method, "/kvarc.v1.Kvarc/LoadSignatures")) {
        grpc_slice all = bb_slice(c->req);
        rpc_sig_start(c, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all));
        grpc_slice_unref(all);
        return;
    }
    if (c->streaming || !grpc_slice_str_cmp(c->details.method, "/kvarc.v1.Kvarc/AppendStream")) {
        c->streaming = 1;
        rpc_stream_step(c);
        return;
    }
    for (size_t i = 0; c->req && i < sizeof jobs / sizeof jobs[0]; i++)
        if (!grpc_slice_str_cmp(c->details.method, jobs[i].path)) {
            grpc_slice all = bb_slice(c->req);
            rpc_job_start(c, jobs[i].fn, all);
            grpc_slice_unref(all);
            return;
        }
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (!grpc_slice_str_cmp(c->details.method, routes[i].path))
            fn = routes[i].fn;
    if (!fn) {
        c->status = GRPC_STATUS_UNIMPLEMENTED;
        kvd_fail(&err, -ENOSYS, "method %s is not a kvarc.v1 method", c->method);
    } else if (!c->req) {
        c->status = GRPC_STATUS_INVALID_ARGUMENT;
        kvd_fail(&err, -EINVAL, "%s: no request message", c->method);
    } else {
        grpc_slice all = bb_slice(c->req);
        rc = fn(c, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all), &c->resp, &err);
        grpc_slice_unref(all);
        if (!rc && !c->resp)
            rc = kvd_fail(&err, -ENOMEM, "out of memory encoding the reply");
        c->status = rpc_status_of(rc);
    }
    rpc_finish(c, &err);
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
        if (c->state == REQUESTED) {
            if (ev.success)
                rpc_on_requested(c);
            else
                call_free(c);            /* server shutting down */
        } else if (c->state == RECEIVING) {
            if (ev.success)
                rpc_on_received(c);
            else
                call_free(c);            /* client went away */
        } else if (c->state == JOB) {
            rpc_on_job_sent(c);
        } else if (c->state == SENDING) {
            if (ev.success)
                rpc_sig_step(c);
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

static void helpers_close(rpc_server *s)
{
    for (int i = 0; i < s->nhelpers; i++)
        kvd_reader_close(s->helpers[i]);
    free(s->helpers);
    free(s->help_busy);
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
    helpers_close(s);
    auth_free(s->tokens);
    pthread_mutex_destroy(&s->tok_mu);
    free(s->workers);
    free(s);
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
                                    sizeof *s->workers))) {
        free(s);
        snprintf(msg, msglen, "out of memory");
        return -ENOMEM;
    }
    s->e = e;
    s->log = cfg->log;
    s->tokens = auth_ref(cfg->tokens);
    pthread_mutex_init(&s->tok_mu, NULL);
    s->started_ns = now_ns(CLOCK_MONOTONIC);
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
    helpers_close(s);
    auth_free(s->tokens);
    pthread_mutex_destroy(&s->tok_mu);
    free(s->workers);
    free(s);
    return cancelled;
}
