/* rpc_handlers.c - kvarc's gRPC methods: each decodes its request (protobuf-c),
 * checks it against the caller's scope and the conversation's shape, calls
 * the engine, and encodes the reply; and the table (rpc_methods) that
 * names every method, its kind and its handler for the call machine
 * (rpc_call.c). Handlers are stateless between calls; a stream keeps its
 * progress in the call's state (rpc_ctx.state), freed with the call. */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvarc.pb-c.h"
#include "kvd_internal.h"
#include "kvg.h"
#include "pb_strings.h"
#include "rpc_call.h"
#include "transfer.h"
#include "wire.h"

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

/* The reply for one conversation, with every layer's durable length (a
 * worker attaching to it continues each layer from there). */
static grpc_byte_buffer *conv_reply(rpc_ctx *c, kvd_conv_info *info, int with_means)
{
    kvd_engine *e = c->e;
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
    grpc_byte_buffer *bb = with_means && !means ? NULL : kw_pack(&r.base);
    free(means);
    return bb;
}

/* ---- namespace scopes ---------------------------------------------------- */

/* A conversation by id, as the caller may see it: one of a namespace
 * outside the caller's scope answers exactly like an unknown id. */
static int visible_conv(rpc_ctx *c, uint64_t id, conv_rec *info, kvd_err *err)
{
    int rc = conv_lookup(c->e, id, info, err);
    c->log_conv = id;
    if (!rc && !auth_ns_allowed(c->scope, info->ns))
        return kvd_fail(err, -ENOENT, "conversation id %llu not found", (unsigned long long)id);
    return rc;
}

/* A namespace named in a request must be in the caller's scope. */
static int ns_check(rpc_ctx *c, const char *ns, kvd_err *err)
{
    if (auth_ns_allowed(c->scope, ns))
        return 0;
    return kvd_fail(err, -EACCES, "token %s is not scoped to namespace '%s'", c->scope->token_tag, ns ? ns : "");
}

/* Whole-archive calls (Stats, Verify, Compact) need a '*' token or the local socket. */
static int admin_check(rpc_ctx *c, kvd_err *err)
{
    if (!c->scope || c->scope->all)
        return 0;
    return kvd_fail(err, -EACCES, "%s covers the whole archive: token %s is scoped to namespaces, not '*'",
                    c->method, c->scope->token_tag);
}

/* ---- handlers: decode request bytes, call the engine, encode reply ---- */

static int h_health(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    (void)msg;                       /* Empty */
    kvd_stats st;
    int rc = kvd_stats_get(c->e, &st, err);
    if (rc)
        return rc;
    Kvarc__V1__HealthReply r = KVARC__V1__HEALTH_REPLY__INIT;
    r.status = "serving";
    r.version = KVARCD_VERSION;
    r.uptime_ms = rpc_uptime_ms(c);
    r.conversations = st.conversations;
    *out = kw_pack(&r.base);
    return 0;
}

static int h_create(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__CreateRequest *req = (Kvarc__V1__CreateRequest *)msg;
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
        rc = kvd_conv_create(c->e, req->ns, req->name, &sh, req->n_means ? req->means : NULL, &info, err);
    if (!rc)
        *out = conv_reply(c, &info, 0);
    return rc;
}

static int h_open(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__OpenRequest *req = (Kvarc__V1__OpenRequest *)msg;
    kvd_shape sh;
    kvd_conv_info info;
    int rc = ns_check(c, req->ns, err);
    if (!rc && req->expect)
        rc = shape_from_pb(req->expect, &sh, err);
    if (!rc)
        rc = kvd_conv_open(c->e, req->ns, req->name, req->expect ? &sh : NULL, &info, err);
    int with_means = req->with_means;
    if (!rc)
        *out = conv_reply(c, &info, with_means);
    return rc;
}

static int h_stat(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__StatRequest *req = (Kvarc__V1__StatRequest *)msg;
    kvd_conv_info info;
    int rc = kvd_conv_stat(c->e, req->id, &info, err);
    c->log_conv = req->id;
    if (!rc && !auth_ns_allowed(c->scope, info.ns))
        rc = kvd_fail(err, -ENOENT, "conversation id %llu not found", (unsigned long long)req->id);
    if (!rc)
        *out = conv_reply(c, &info, 0);
    return rc;
}

/* Every namespace the caller's scope holds, in (namespace, name) order:
 * the engine's listing filtered, page by page. */
static long list_in_scope(rpc_ctx *c, const char *after, kvd_conv_info *out, size_t max, kvd_err *err)
{
    char last[KVD_NS_MAX + KVD_NAME_MAX];
    kvd_conv_info *page = malloc(max * sizeof *page);
    if (!page)
        return kvd_fail(err, -ENOMEM, "out of memory");
    size_t n = 0;
    long got = 0;
    while (n < max && (got = kvd_conv_list(c->e, NULL, after, page, max, err)) > 0) {
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

static int h_list(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__ListRequest *req = (Kvarc__V1__ListRequest *)msg;
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
        n = kvd_conv_list(c->e, ns, after, infos, limit + 1, err);
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
        *out = kw_pack(&r.base);
    }
    free(infos);
    free(pbs);
    free(ptrs);
    free(sps);
    return rc;
}

static int h_delete(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__DeleteRequest *req = (Kvarc__V1__DeleteRequest *)msg;
    int rc = ns_check(c, req->ns, err);
    if (!rc)
        rc = kvd_conv_delete(c->e, req->ns, req->name, err);
    if (!rc) {
        Kvarc__V1__Empty r = KVARC__V1__EMPTY__INIT;
        *out = kw_pack(&r.base);
    }
    return rc;
}

static int fork_common(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out,
                       kvd_err *err, uint32_t flags, int need_snapshot)
{
    Kvarc__V1__ForkRequest *req = (Kvarc__V1__ForkRequest *)msg;
    kvd_conv_info src, info;
    int rc = ns_check(c, req->src_ns, err);
    if (!rc)
        rc = ns_check(c, req->dst_ns, err);
    if (!rc && need_snapshot) {        /* Restore: the source must be a snapshot */
        rc = kvd_conv_open(c->e, req->src_ns, req->src_name, NULL, &src, err);
        if (!rc && !(src.flags & KVD_CONV_SNAPSHOT))
            rc = kvd_fail(err, -EPERM, "'%s/%s' is not a snapshot: use Fork", req->src_ns, req->src_name);
    }
    if (!rc)
        rc = kvd_conv_fork(c->e, req->src_ns, req->src_name, req->has_at_len ? req->at_len : UINT64_MAX,
                           req->dst_ns, req->dst_name, flags, &info, err);
    if (!rc)
        *out = conv_reply(c, &info, 0);
    return rc;
}

static int h_fork(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    return fork_common(c, msg, out, err, 0, 0);
}

static int h_snapshot(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    return fork_common(c, msg, out, err, KVD_CONV_SNAPSHOT, 0);
}

static int h_restore(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    return fork_common(c, msg, out, err, 0, 1);
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
    if (r->sig_scale.len)             /* count 0: no data pointer at all (memcpy from NULL is undefined) */
        memcpy(copies[0], r->sig_scale.data, r->sig_scale.len);
    if (r->sum_scale.len)
        memcpy(copies[1], r->sum_scale.data, r->sum_scale.len);
    *b = (kvd_block_in){ r->layer, r->first_pos, r->count, r->sig_bits.data, copies[0], r->records.data,
                         r->sum_bits.len ? r->sum_bits.data : NULL, r->sum_bits.len ? copies[1] : NULL };
    return 0;
}

/* Decode one AppendRequest and append it durably; *length is the layer's
 * length afterwards. Shared by Append and AppendStream. */
static int append_one(rpc_ctx *c, Kvarc__V1__AppendRequest *req, uint64_t *length, kvd_err *err)
{
    conv_rec info;
    kvd_block_in b;
    uint16_t *copies[2] = { NULL, NULL };
    int rc = visible_conv(c, req->conv, &info, err);
    if (!rc)
        rc = append_block(&info, req, "append", copies, &b, err);
    if (!rc) {
        int brc = 0;
        rc = kvd_append_n(c->e, req->conv, &b, 1, &brc, NULL, err);
        if (!rc)
            c->records_in += (uint64_t)req->count * info.shape.n_kv_heads;
    }
    free(copies[0]);
    free(copies[1]);
    if (!rc)
        rc = kvd_layer_length(c->e, req->conv, req->layer, length, err);
    return rc;
}

/* AppendStream: each message one block, stored durably before the next is read. */
typedef struct append_stream {
    uint64_t blocks, length;
} append_stream;

static int as_message(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    (void)out;
    if (!c->state && !(c->state = calloc(1, sizeof(append_stream))))
        return kvd_fail(err, -ENOMEM, "out of memory");
    append_stream *as = c->state;
    int rc = append_one(c, (Kvarc__V1__AppendRequest *)msg, &as->length, err);
    if (!rc)
        as->blocks++;
    return rc;
}

static int as_reply(rpc_ctx *c, grpc_byte_buffer **out, kvd_err *err)
{
    (void)err;
    append_stream *as = c->state;
    Kvarc__V1__AppendReply r = KVARC__V1__APPEND_REPLY__INIT;
    r.length = as ? as->length : 0;
    r.blocks = as ? as->blocks : 0;
    *out = kw_pack(&r.base);
    return 0;
}

static void as_failed(rpc_ctx *c, kvd_err *err)
{
    append_stream *as = c->state;
    char m[sizeof err->msg + 80];
    snprintf(m, sizeof m, "%s (%llu earlier block(s) of this stream are stored)", err->msg,
             (unsigned long long)(as ? as->blocks : 0));
    size_t l = strnlen(m, sizeof err->msg - 1);
    memcpy(err->msg, m, l);
    err->msg[l] = 0;
}

static int h_append(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    uint64_t length = 0;
    int rc = append_one(c, (Kvarc__V1__AppendRequest *)msg, &length, err);
    if (!rc) {
        Kvarc__V1__AppendReply r = KVARC__V1__APPEND_REPLY__INIT;
        r.length = length;
        r.blocks = 1;
        *out = kw_pack(&r.base);
    }
    return rc;
}

#define APPEND_MANY_BLOCKS 1024

/* AppendMany: every block checked as Append checks it, the good ones
 * stored together (kvd_append_n); a result per block. The call fails as
 * a whole only when the conversation is not there or the request is bad
 * as a whole. */
static int h_append_many(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__AppendManyRequest *req = (Kvarc__V1__AppendManyRequest *)msg;
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
        kvd_append_n(c->e, req->conv, b, nb, got, gerr, &e1);
        for (size_t j = 0; j < nb; j++)     /* each refused block's own message, as Append gives it */
            if ((rcs[idx[j]] = got[j]))
                errs[idx[j]] = gerr[j];
            else
                c->records_in += (uint64_t)b[j].count * info.shape.n_kv_heads;
    }
    for (size_t i = 0; !rc && i < n; i++) {
        Kvarc__V1__AppendRequest *r = req->blocks[i];
        kvarc__v1__append_result__init(&res[i]);
        res[i].status = rcs[i] ? (uint32_t)kw_status_of(rcs[i]) : 0;
        res[i].message = rcs[i] ? (errs[i].msg[0] ? errs[i].msg : (char *)kvarc_strerror(rcs[i])) : "";
        kvd_err le;
        uint64_t length = 0;
        if (!kvd_layer_length(c->e, req->conv, r->layer, &length, &le))
            res[i].length = length;
        resp[i] = &res[i];
    }
    if (!rc) {
        Kvarc__V1__AppendManyReply r = KVARC__V1__APPEND_MANY_REPLY__INIT;
        r.n_results = n;
        r.results = resp;
        *out = kw_pack(&r.base);
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
    return rc;
}

static int h_fetch(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__FetchRequest *req = (Kvarc__V1__FetchRequest *)msg;
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
        rc = kvd_read_records(c->reader, req->conv, req->layer, req->head, req->positions, req->n_positions,
                              recs, err);
    if (!rc) {
        Kvarc__V1__FetchReply r = KVARC__V1__FETCH_REPLY__INIT;
        r.record_bytes = (uint32_t)rb;
        r.records.data = recs;
        r.records.len = req->n_positions * rb;
        c->records_out += req->n_positions;
        *out = kw_pack(&r.base);
    }
    free(recs);
    return rc;
}

#define MAX_SUM_BLOCKS 65536     /* blocks per LoadSummaries reply (2.4 MB at head_dim 128) */

static int h_load_sums(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__LoadSummariesRequest *req = (Kvarc__V1__LoadSummariesRequest *)msg;
    conv_rec info;
    uint64_t llen = 0, n = 0;
    uint8_t *bits = NULL, *ok = NULL;
    uint16_t *sc = NULL;
    size_t sb = 0;
    int rc = visible_conv(c, req->conv, &info, err);
    if (!rc)
        rc = kvd_layer_length(c->e, req->conv, req->layer, &llen, err);
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
        rc = kvd_read_sums(c->reader, req->conv, req->layer, req->head, req->first_block, n, bits, sc, ok, err);
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
        *out = kw_pack(&r.base);
    }
    free(bits);
    free(sc);
    free(ok);
    return rc;
}

static int h_rerank(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__RerankRequest *req = (Kvarc__V1__RerankRequest *)msg;
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
        got = kvd_rerank(c->reader, req->conv, req->layer, req->head, req->query, (int)req->n_queries, req->shortlist,
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
        c->records_out += (uint64_t)got;
        *out = kw_pack(&r.base);
    }
    free(pos);
    free(sc);
    free(recs);
    return rc;
}

#define RERANK_LAYER_ITEMS 8192

/* RerankLayer: every item's exact top_k (kvd_rerank_batch; an item with
 * runs gets its shortlist from stage 1b first, stage1b.c), then the
 * records not held by the client nor already sent for that head. The
 * reply's records stay under MAX_REPLY_RECORD_BYTES. */
static int h_rerank_layer(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__RerankLayerRequest *req = (Kvarc__V1__RerankLayerRequest *)msg;
    conv_rec info;
    int rc = visible_conv(c, req->conv, &info, err);
    size_t d = info.shape.head_dim, rb = 0, n = req->n_items, total_k = 0, total_sl = 0;
    if (!rc && n > RERANK_LAYER_ITEMS)
        rc = kvd_fail(err, -E2BIG, "RerankLayer of %zu items over the limit of %d", n, RERANK_LAYER_ITEMS);
    uint64_t llen = 0;
    int have_len = 0;
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
        if (!rc && it->n_runs && !have_len) {   /* runs must lie inside the layer (before any memory is sized by them) */
            rc = kvd_layer_length(c->e, req->conv, req->layer, &llen, err);
            have_len = 1;
        }
        for (size_t q = 0; !rc && q + 1 < it->n_runs; q += 2)
            if (!it->runs[q + 1] || it->runs[q] + it->runs[q + 1] < it->runs[q] || it->runs[q] + it->runs[q + 1] > llen)
                rc = kvd_fail(err, -ERANGE, "item %zu: run [%llu, +%llu) is empty or reaches past the end of layer %u "
                              "(%llu tokens)", i, (unsigned long long)it->runs[q], (unsigned long long)it->runs[q + 1],
                              req->layer, (unsigned long long)llen);
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
    uint64_t *pos = NULL;
    uint64_t *sl = NULL;                  /* stage 1b's shortlists */
    float *sc = NULL;
    protobuf_c_boolean *sent = NULL;
    uint8_t *recs = NULL;
    if (!rc && !((res = calloc(n + 1, sizeof *res)) && (resp = calloc(n + 1, sizeof *resp)) &&
                 (ri = calloc(n + 1, sizeof *ri)) && (pos = malloc((total_k + 1) * 8)) &&
                 (sc = malloc((total_k + 1) * 4)) &&
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
                                   .pos_out = pos + off, .score_out = sc + off, .rec_out = recs + off * rb,
                                   .have = it->have, .n_have = it->n_have, .send_out = sent + off };
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
    if (!rc) {   /* the heads over this call's reader and the helpers free now (none: it alone) */
        kvd_reader *rs[KVD_RERANK_READERS];
        int max = info.shape.n_kv_heads < KVD_RERANK_READERS ? (int)info.shape.n_kv_heads : KVD_RERANK_READERS;
        int nr = rpc_readers_borrow(c, rs, max);
        rc = kvd_rerank_batch_par(rs, nr, req->conv, req->layer, ri, n, err);
        rpc_readers_return(c, rs, nr);
    }
    if (!rc)
        rc = kvd_rerank_reply(ri, n, rb, recs, err);
    size_t off = 0, rec_off = 0;
    for (size_t i = 0; !rc && i < n; i++) {
        kvarc__v1__rerank_result__init(&res[i]);
        res[i].n_positions = res[i].n_scores = res[i].n_sent = (size_t)ri[i].got;
        res[i].positions = pos + off;
        res[i].scores = sc + off;
        res[i].sent = sent + off;
        res[i].records.data = recs + rec_off;
        res[i].records.len = ri[i].kept * rb;
        resp[i] = &res[i];
        c->records_out += ri[i].kept;
        off += ri[i].top_k;
        rec_off += ri[i].kept * rb;
    }
    if (!rc) {
        Kvarc__V1__RerankLayerReply r = KVARC__V1__RERANK_LAYER_REPLY__INIT;
        r.record_bytes = (uint32_t)rb;
        r.n_results = n;
        r.results = resp;
        *out = kw_pack(&r.base);
    }
    free(res); free(resp); free(ri); free(pos); free(sc); free(sent); free(recs); free(sl);
    return rc;
}

static int h_search(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__SearchRequest *req = (Kvarc__V1__SearchRequest *)msg;
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
        rc = kvd_layer_length(c->e, req->conv, req->layer, &llen, err);
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
        rc = kvd_conv_means(c->e, req->conv, req->layer, req->head, mu, NULL, err);
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
        got = kvd_search(c->reader, req->conv, req->layer, req->head, (uint32_t)d, llen, (int)req->mode,
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
        *out = kw_pack(&r.base);
    }
    free(best);
    free(pos);
    free(qs);
    return rc;
}

/* LoadSignatures: one KV head's signatures of a range per message, head after head. */
typedef struct sig_stream {
    uint64_t conv, first, end, next;
    uint32_t layer, head, heads, dim, chunk;
} sig_stream;

static int ls_start(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    (void)out;
    Kvarc__V1__LoadSignaturesRequest *req = (Kvarc__V1__LoadSignaturesRequest *)msg;
    conv_rec info;
    uint64_t llen = 0;
    sig_stream *ls = NULL;
    int rc = visible_conv(c, req->conv, &info, err);
    if (!rc)
        rc = kvd_layer_length(c->e, req->conv, req->layer, &llen, err);
    if (!rc && (req->first > llen || (req->count && req->first + req->count > llen)))
        rc = kvd_fail(err, -ERANGE, "signatures [%llu, +%llu) reach past the end of layer %u (%llu tokens)",
                      (unsigned long long)req->first, (unsigned long long)req->count, req->layer,
                      (unsigned long long)llen);
    if (!rc && !(ls = calloc(1, sizeof *ls)))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    if (!rc) {
        *ls = (sig_stream){ .conv = req->conv, .layer = req->layer, .first = req->first, .next = req->first,
                            .end = req->count ? req->first + req->count : llen, .head = 0,
                            .heads = info.shape.n_kv_heads, .dim = info.shape.head_dim,
                            .chunk = req->chunk_tokens };
        c->state = ls;
    }
    return rc;
}

static int ls_next(rpc_ctx *c, grpc_byte_buffer **out, kvd_err *err)
{
    sig_stream *ls = c->state;
    *out = NULL;
    if (ls->next >= ls->end) {
        ls->head++;
        ls->next = ls->first;
    }
    if (ls->head >= ls->heads || ls->first >= ls->end)
        return 0;                                   /* done */
    uint64_t per = RPC_STREAM_CHUNK / (ls->dim / 8 + 2);
    if (ls->chunk && ls->chunk < per)
        per = ls->chunk;
    uint64_t n = ls->end - ls->next < per ? ls->end - ls->next : per;
    uint8_t *bits = malloc(n * ls->dim / 8 + 1);
    uint16_t *sc = malloc(n * 2 + 2);
    int rc = bits && sc ? kvd_read_sigs(c->reader, ls->conv, ls->layer, ls->head, ls->next, n, bits, sc, err)
                        : kvd_fail(err, -ENOMEM, "out of memory");
    if (!rc) {
        Kvarc__V1__SigChunk m = KVARC__V1__SIG_CHUNK__INIT;
        m.head = ls->head;
        m.first_pos = ls->next;
        m.count = (uint32_t)n;
        m.bits.data = bits;
        m.bits.len = n * ls->dim / 8;
        m.scales.data = (uint8_t *)sc;
        m.scales.len = n * 2;
        if (!(*out = kw_pack(&m.base)))
            rc = kvd_fail(err, -ENOMEM, "out of memory");
    }
    free(bits);
    free(sc);
    if (!rc)
        ls->next += n;
    return rc;
}

/* Export: the file's pieces as kvd_export makes them, in messages of at most RPC_STREAM_CHUNK bytes. */
typedef struct export_stream {
    kvd_export    *x;
    const uint8_t *p;       /* the rest of the current piece */
    size_t         left;
    uint64_t       heads, done;
} export_stream;

static void ex_release(void *state)
{
    export_stream *es = state;
    kvd_export_close(es->x);
    free(es);
}

static int ex_start(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    (void)out;
    Kvarc__V1__ExportRequest *req = (Kvarc__V1__ExportRequest *)msg;
    kvd_conv_info info;
    export_stream *es = NULL;
    int rc = ns_check(c, req->ns, err);
    if (!rc)
        rc = kvd_conv_open(c->e, req->ns, req->name, NULL, &info, err);
    if (!rc && !(es = calloc(1, sizeof *es)))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    size_t max = RPC_STREAM_CHUNK - 256;   /* a section and its header fit one message */
    if (!rc && req->section_bytes && req->section_bytes < max)
        max = req->section_bytes;
    if (!rc)
        rc = kvd_export_open(c->e, c->reader, info.id, max, &es->x, err);
    if (!rc) {
        c->log_conv = info.id;
        es->heads = info.shape.n_kv_heads;
        c->state = es;
    } else {
        free(es);
    }
    return rc;
}

static int ex_next(rpc_ctx *c, grpc_byte_buffer **out, kvd_err *err)
{
    export_stream *es = c->state;
    *out = NULL;
    if (!es->left) {
        int rc = kvd_export_next(es->x, &es->p, &es->left, err);
        if (rc || !es->left)
            return rc;                          /* an error, or the file is complete */
    }
    size_t n = es->left < RPC_STREAM_CHUNK - 64 ? es->left : RPC_STREAM_CHUNK - 64;
    Kvarc__V1__FileChunk m = KVARC__V1__FILE_CHUNK__INIT;
    m.data.data = (uint8_t *)es->p;
    m.data.len = n;
    kvd_export_progress(es->x, &m.tokens_done, &m.tokens_total);
    if (!(*out = kw_pack(&m.base)))
        return kvd_fail(err, -ENOMEM, "out of memory");
    c->records_out += (m.tokens_done - es->done) * es->heads;
    es->done = m.tokens_done;
    es->p += n;
    es->left -= n;
    return 0;
}

/* Import: the file's bytes into kvd_import as they come; the reply once the client has closed. */
static void im_release(void *state)
{
    kvd_import_free(state);
}

static int im_message(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    (void)out;
    Kvarc__V1__ImportRequest *req = (Kvarc__V1__ImportRequest *)msg;
    int rc = 0;
    if (!c->state) {
        rc = ns_check(c, req->ns, err);
        if (!rc)
            rc = kvd_import_begin(c->e, req->ns, req->name, (kvd_import **)&c->state, err);
    } else if ((req->ns && *req->ns) || (req->name && *req->name)) {
        rc = kvd_fail(err, -EINVAL, "Import: only the first message names the conversation");
    }
    if (!rc)
        rc = kvd_import_feed(c->state, req->data.data, req->data.len, err);
    return rc;
}

static int im_reply(rpc_ctx *c, grpc_byte_buffer **out, kvd_err *err)
{
    kvd_conv_info info;
    if (!c->state)
        return kvd_fail(err, -EINVAL, "Import: no message (an empty file)");
    int rc = kvd_import_finish(c->state, &info, err);
    if (!rc) {   /* the records count once the conversation is there */
        c->records_in += kvd_import_tokens(c->state) * info.shape.n_kv_heads;
        *out = conv_reply(c, &info, 0);
    }
    return rc;
}

static int h_stats(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    (void)msg;                       /* Empty */
    kvd_stats st;
    int rc = admin_check(c, err);
    if (!rc)
        rc = kvd_stats_get(c->e, &st, err);
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
        *out = kw_pack(&r.base);
    }
    return rc;
}

static int h_metrics(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    (void)msg;                       /* Empty */
    int rc = admin_check(c, err);
    prom_buf b;
    prom_buf_init(&b);
    if (!rc)
        rpc_ctx_metrics(c, &b);
    if (!rc && b.err)
        rc = kvd_fail(err, b.err, "metrics: %s", b.errmsg);
    if (!rc) {
        Kvarc__V1__MetricsReply r = KVARC__V1__METRICS_REPLY__INIT;
        r.text = b.data ? b.data : "";
        *out = kw_pack(&r.base);
    }
    prom_buf_free(&b);
    return rc;
}

/* The engine's progress callback for a JOB: an event when the call
 * machine would send one (rpc_job_due). Nonzero once the daemon's grace
 * period is over: the engine stops. */
static int job_progress(void *arg, uint64_t done, uint64_t total)
{
    rpc_ctx *c = arg;
    if (!rpc_job_due(c))
        return rpc_job_event(c, NULL);
    Kvarc__V1__JobEvent ev = KVARC__V1__JOB_EVENT__INIT;
    ev.done = done;
    ev.total = total;
    return rpc_job_event(c, kw_pack(&ev.base));
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

static int h_verify(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    (void)msg;                       /* Empty */
    verify_lines vl = { .n = 0 };
    kvd_verify_report rep;
    int rc = admin_check(c, err);
    if (!rc)
        rc = kvd_verify(c->e, &rep, keep_line, &vl, job_progress, c, err);
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
        *out = kw_pack(&ev.base);
        rc = 0;
    }
    for (size_t i = 0; i < vl.n; i++)
        free(vl.v[i]);
    return rc;
}

static int h_compact(rpc_ctx *c, ProtobufCMessage *msg, grpc_byte_buffer **out, kvd_err *err)
{
    Kvarc__V1__CompactRequest *req = (Kvarc__V1__CompactRequest *)msg;
    double th = req->threshold == 0.0f ? 0.5 : (double)req->threshold;
    uint64_t reclaimed = 0;
    int rc = admin_check(c, err);
    if (!rc)
        rc = kvd_compact(c->e, th, &reclaimed, job_progress, c, err);
    if (!rc) {
        Kvarc__V1__CompactReply r = KVARC__V1__COMPACT_REPLY__INIT;
        r.reclaimed = reclaimed;
        Kvarc__V1__JobEvent ev = KVARC__V1__JOB_EVENT__INIT;
        ev.compact = &r;
        *out = kw_pack(&ev.base);
    }
    return rc;
}

/* ---- the methods ------------------------------------------------------------- */

/* Every method: its path and metrics label, its request message (the call
 * machine decodes it and checks its strings, pb_strings.c), its kind and
 * handler(s). */
#define M(name) "/kvarc.v1.Kvarc/" name, name
const rpc_method rpc_methods[] = {
    { M("Health"), &kvarc__v1__empty__descriptor, RPC_UNARY, h_health, NULL, NULL, NULL },
    { M("Create"), &kvarc__v1__create_request__descriptor, RPC_UNARY, h_create, NULL, NULL, NULL },
    { M("Open"), &kvarc__v1__open_request__descriptor, RPC_UNARY, h_open, NULL, NULL, NULL },
    { M("Stat"), &kvarc__v1__stat_request__descriptor, RPC_UNARY, h_stat, NULL, NULL, NULL },
    { M("List"), &kvarc__v1__list_request__descriptor, RPC_UNARY, h_list, NULL, NULL, NULL },
    { M("Delete"), &kvarc__v1__delete_request__descriptor, RPC_UNARY, h_delete, NULL, NULL, NULL },
    { M("Fork"), &kvarc__v1__fork_request__descriptor, RPC_UNARY, h_fork, NULL, NULL, NULL },
    { M("Snapshot"), &kvarc__v1__fork_request__descriptor, RPC_UNARY, h_snapshot, NULL, NULL, NULL },
    { M("Restore"), &kvarc__v1__fork_request__descriptor, RPC_UNARY, h_restore, NULL, NULL, NULL },
    { M("Append"), &kvarc__v1__append_request__descriptor, RPC_UNARY, h_append, NULL, NULL, NULL },
    { M("AppendMany"), &kvarc__v1__append_many_request__descriptor, RPC_UNARY, h_append_many, NULL, NULL, NULL },
    { M("AppendStream"), &kvarc__v1__append_request__descriptor, RPC_CLIENT_STREAM, as_message, as_reply, as_failed, free },
    { M("Fetch"), &kvarc__v1__fetch_request__descriptor, RPC_UNARY, h_fetch, NULL, NULL, NULL },
    { M("Rerank"), &kvarc__v1__rerank_request__descriptor, RPC_UNARY, h_rerank, NULL, NULL, NULL },
    { M("RerankLayer"), &kvarc__v1__rerank_layer_request__descriptor, RPC_UNARY, h_rerank_layer, NULL, NULL, NULL },
    { M("Search"), &kvarc__v1__search_request__descriptor, RPC_UNARY, h_search, NULL, NULL, NULL },
    { M("LoadSummaries"), &kvarc__v1__load_summaries_request__descriptor, RPC_UNARY, h_load_sums, NULL, NULL, NULL },
    { M("LoadSignatures"), &kvarc__v1__load_signatures_request__descriptor, RPC_SERVER_STREAM, ls_start, ls_next, NULL, free },
    { M("Stats"), &kvarc__v1__empty__descriptor, RPC_UNARY, h_stats, NULL, NULL, NULL },
    { M("Metrics"), &kvarc__v1__empty__descriptor, RPC_UNARY, h_metrics, NULL, NULL, NULL },
    { M("Export"), &kvarc__v1__export_request__descriptor, RPC_SERVER_STREAM, ex_start, ex_next, NULL, ex_release },
    { M("Import"), &kvarc__v1__import_request__descriptor, RPC_CLIENT_STREAM, im_message, im_reply, NULL, im_release },
    { M("Verify"), &kvarc__v1__empty__descriptor, RPC_JOB, h_verify, NULL, NULL, NULL },
    { M("Compact"), &kvarc__v1__compact_request__descriptor, RPC_JOB, h_compact, NULL, NULL, NULL },
};
#undef M
const size_t rpc_nmethods = sizeof rpc_methods / sizeof rpc_methods[0];
