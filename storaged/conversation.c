/* conversation.c - conversations: create (and a stage for imports), open
 * and stat, list, delete, fork / snapshot / restore, layer lengths and
 * centering means. Each change is a CONV_CREATE or CONV_DELETE block that
 * goes through the group commit (commit.c), its index entries made by the
 * block's prepare() in the batch's transaction, so the log alone rebuilds
 * them (replay.c, verify.c). */
#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "cluster.h"
#include "kvd_internal.h"

/* ---- conversations ----------------------------------------------------- */

int shape_check(const kvd_shape *s, kvd_err *err)
{
    if (!s)
        return kvd_fail(err, -EINVAL, "no shape given");
    if (s->n_layers < 1 || s->n_layers > KVD_MAX_LAYERS)
        return kvd_fail(err, -EINVAL, "n_layers %u out of range 1..%d", s->n_layers, KVD_MAX_LAYERS);
    if (s->n_kv_heads < 1 || s->n_kv_heads > KVD_MAX_HEADS)
        return kvd_fail(err, -EINVAL, "n_kv_heads %u out of range 1..%d", s->n_kv_heads, KVD_MAX_HEADS);
    if (s->n_q_heads < s->n_kv_heads || s->n_q_heads % s->n_kv_heads)
        return kvd_fail(err, -EINVAL, "n_q_heads %u is not a multiple of n_kv_heads %u",
                        s->n_q_heads, s->n_kv_heads);
    if (kvarc_head_dim_check((int)s->head_dim))
        return kvd_fail(err, KVARC_EHEADDIM, "head_dim %u unsupported (64, 128 or 256)", s->head_dim);
    if (!kvarc_format_get(s->format))
        return kvd_fail(err, KVARC_EFORMAT, "record format %u unknown", s->format);
    if (!kvarc_dtype_size((kvarc_dtype)s->dtype))
        return kvd_fail(err, KVARC_EDTYPE, "dtype %u unknown (0 f32, 1 f16, 2 bf16)", s->dtype);
    if (s->rope_layout > 1)     /* any position-mode byte is a stored shape: a newer kind is refused
                                   where retrieval needs it (kvd_retrieval_check), not here */
        return kvd_fail(err, -EINVAL, "rope_layout %u out of range 0..1", s->rope_layout);
    if (s->rotary_dims > s->head_dim || s->rotary_dims % 2)
        return kvd_fail(err, -EINVAL, "rotary_dims %u must be even and <= head_dim %u",
                        s->rotary_dims, s->head_dim);
    if (!isfinite(s->rope_theta) || s->rope_theta < 0)
        return kvd_fail(err, -EINVAL, "rope_theta must be a finite non-negative number");
    if (!memchr(s->fingerprint, 0, sizeof s->fingerprint))
        return kvd_fail(err, -EINVAL, "fingerprint must be NUL-terminated within 64 bytes");
    return 0;
}

static int names_check(const char *ns, const char *name, kvd_err *err)
{
    if (!kvd_name_valid(ns, KVD_NS_MAX))
        return kvd_fail(err, -EINVAL, "namespace '%s' invalid: 1-%d characters of [A-Za-z0-9._-], "
                        "not starting with '.'", ns ? ns : "(null)", KVD_NS_MAX - 1);
    if (!kvd_name_valid(name, KVD_NAME_MAX))
        return kvd_fail(err, -EINVAL, "conversation name '%s' invalid: 1-%d characters of "
                        "[A-Za-z0-9._-], not starting with '.'", name ? name : "(null)",
                        KVD_NAME_MAX - 1);
    return 0;
}

/* A name to look up: one a client may create, or a stage's (kvd_conv_create_stage),
 * which an admin may open, fork or delete but no one may create by name. */
static int lookup_names_check(const char *ns, const char *name, kvd_err *err)
{
    size_t pl = strlen(KVD_STAGE_PREFIX);
    if (name && !strncmp(name, KVD_STAGE_PREFIX, pl) && kvd_name_valid(name + pl, KVD_NAME_MAX - pl))
        return names_check(ns, name + pl, err);
    return names_check(ns, name, err);
}

typedef struct create_arg {
    conv_rec rec;
    const float *means;
    uint64_t parent_len_needed;     /* forks: parent must still have this many tokens */
    uint64_t id;                    /* the cluster's id for it (cluster.c); 0: the index's next */
} create_arg;

static int prepare_create(kvd_engine *e, MDB_txn *txn, kvd_item *it, uint64_t seg, uint64_t off)
{
    create_arg *a = it->arg;
    char buf[KVD_NS_MAX + KVD_NAME_MAX];
    MDB_val k, v;
    uint64_t id, tmp;
    if (name_lookup(e, txn, a->rec.ns, a->rec.name, &tmp) == 0)
        return kvd_fail(&it->err, -EEXIST, "conversation '%s/%s' already exists", a->rec.ns, a->rec.name);
    if (a->rec.parent) {
        conv_rec p;
        kvd_conv_info pi;
        int rc = conv_get(e, txn, a->rec.parent, &p);
        if (rc || (p.flags & KVD_CONV_DELETED))
            return kvd_fail(&it->err, -ENOENT, "fork source was deleted meanwhile");
        if ((rc = conv_info_fill(e, txn, a->rec.parent, &p, &pi)))
            return rc;
        if (pi.length < a->rec.fork_len)
            return kvd_fail(&it->err, -ERANGE, "fork at %llu past the source's length %llu",
                            (unsigned long long)a->rec.fork_len, (unsigned long long)pi.length);
    }
    int rc = a->id ? meta_at_least(e, txn, "next_conv", (id = a->id) + 1) : meta_next(e, txn, "next_conv", &id);
    if (rc)
        return rc;
    it->h.conv = id;
    conv_rec r = a->rec;
    r.create_seg = seg;
    r.create_off = off;
    if ((rc = conv_put(e, txn, id, &r)))
        return rc;
    name_key(buf, sizeof buf, r.ns, r.name, &k);
    v.mv_size = 8;
    v.mv_data = &id;
    if ((rc = kvd_mdb_err(mdb_put(txn, e->names, &k, &v, MDB_NOOVERWRITE))))
        return rc;
    uint8_t kb[8];
    key_u64(kb, id);
    MDB_val mk = { 8, kb }, mv = { means_floats(&r.shape) * sizeof(float),
                                   (uint8_t *)it->block + KVARC_BLOCK_HEADER + sizeof(conv_rec) };
    if ((rc = kvd_mdb_err(mdb_put(txn, e->means, &mk, &mv, 0))))
        return rc;
    if (r.fork_len)
        for (uint32_t l = 0; l < r.shape.n_layers; l++)
            if ((rc = layer_len_put(e, txn, id, l, r.fork_len)))
                return rc;
    return 0;
}

/* Build and submit a CONV_CREATE block for rec (+ means), returning the id. */
static int create_block(kvd_engine *e, create_arg *a, kvd_conv_info *info, kvd_err *err)
{
    size_t nm = means_floats(&a->rec.shape);
    size_t payload = (sizeof(conv_rec) + nm * sizeof(float) + 7) / 8 * 8;
    int rc;
    if (e->cluster && (rc = clu_create_begin(e, a->rec.ns, a->rec.name, &a->id, err)))
        return rc;
    kvd_item it;
    memset(&it, 0, sizeof it);
    it.bytes = KVARC_BLOCK_HEADER + payload;
    it.block = calloc(1, it.bytes);
    if (!it.block)
        return kvd_fail(err, -ENOMEM, "out of memory for %zu bytes of metadata", it.bytes);
    uint8_t *p = it.block + KVARC_BLOCK_HEADER;
    memcpy(p, &a->rec, sizeof a->rec);
    float *m = (float *)(void *)(p + sizeof(conv_rec));
    if (a->means)
        memcpy(m, a->means, nm * sizeof(float));
    it.h.kind = KVARC_BLOCK_CONV_CREATE;
    it.h.version = KVARC_BLOCK_VERSION_PLAIN;
    it.h.format = a->rec.shape.format;
    it.h.format_version = kvarc_format_get(a->rec.shape.format)->version;
    it.h.head_dim = (uint16_t)a->rec.shape.head_dim;
    it.h.n_heads = (uint16_t)a->rec.shape.n_kv_heads;
    it.h.payload_bytes = (uint32_t)payload;
    it.h.payload_crc = kvarc_crc32c(0, p, payload);
    it.prepare = prepare_create;
    it.arg = a;
    rc = gc_submit(e, &it, err);
    if (rc && e->cluster)
        clu_create_undo(e, a->rec.ns, a->rec.name, a->id);
    if (!rc && info) {
        MDB_txn *txn;
        conv_rec c;
        if (!(rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn)))) {
            if (!(rc = conv_get(e, txn, it.h.conv, &c)))
                rc = conv_info_fill(e, txn, it.h.conv, &c, info);
            mdb_txn_abort(txn);
        }
    }
    free(it.block);
    return rc;
}

/* Create ns/name; names_check'ed by the callers (a stage's name is one no client may use). */
static int conv_create(kvd_engine *e, const char *ns, const char *name, const kvd_shape *shape,
                       const float *means, kvd_conv_info *info, kvd_err *err)
{
    int rc = shape_check(shape, err);
    if (rc)
        return rc;
    if (shape->pos_mode > KVARC_POS_KIND_MAX)
        return kvd_fail(err, -EINVAL, "pos_mode %u out of range 0..%d", shape->pos_mode, KVARC_POS_KIND_MAX);
    size_t nm = means_floats(shape);
    if (means)
        for (size_t i = 0; i < nm; i++)
            if (!isfinite(means[i]))
                return kvd_fail(err, KVARC_ENONFINITE, "centering mean %zu of '%s/%s' is not finite",
                                i, ns, name);
    create_arg a;
    memset(&a, 0, sizeof a);
    snprintf(a.rec.ns, sizeof a.rec.ns, "%s", ns);
    snprintf(a.rec.name, sizeof a.rec.name, "%s", name);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    a.rec.created_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    a.rec.shape = *shape;
    a.means = means;
    return create_block(e, &a, info, err);
}

int kvd_conv_create(kvd_engine *e, const char *ns, const char *name, const kvd_shape *shape,
                    const float *means, kvd_conv_info *info, kvd_err *err)
{
    int rc = names_check(ns, name, err);
    return rc ? rc : conv_create(e, ns, name, shape, means, info, err);
}

int kvd_conv_create_stage(kvd_engine *e, const char *ns, const kvd_shape *shape, const float *means,
                          kvd_conv_info *info, kvd_err *err)
{
    int rc = names_check(ns, "stage", err);
    if (rc)
        return rc;
    char name[KVD_NAME_MAX];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t x = ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^ (uint64_t)(uintptr_t)&ts;
    snprintf(name, sizeof name, "%s%016llx", KVD_STAGE_PREFIX, (unsigned long long)kvarc_splitmix64(&x));
    return conv_create(e, ns, name, shape, means, info, err);
}

static long conv_list(kvd_engine *e, const char *ns, const char *after, kvd_conv_info *out, size_t max,
                      int sync, kvd_err *err);

long kvd_stage_sweep(kvd_engine *e, kvd_err *err)
{
    kvd_conv_info page[256];
    char after[KVD_NS_MAX + KVD_NAME_MAX] = "";
    long got, removed = 0;
    /* the cache's own stages only (on the RADOS backend, a first page
     * would otherwise bring every conversation of the pool here first) */
    while ((got = conv_list(e, NULL, *after ? after : NULL, page, 256, 0, err)) > 0) {
        for (long i = 0; i < got; i++)
            if (!strncmp(page[i].name, KVD_STAGE_PREFIX, strlen(KVD_STAGE_PREFIX))) {
                int rc = kvd_conv_delete(e, page[i].ns, page[i].name, err);
                if (rc)
                    return rc;
                removed++;
            }
        snprintf(after, sizeof after, "%s/%s", page[got - 1].ns, page[got - 1].name);
        if (got < 256)
            break;
    }
    return got < 0 ? got : removed;
}

static int shape_diff(const char *ns, const char *name, const kvd_shape *have, const kvd_shape *want,
                      kvd_err *err)
{
#define DIFF(field, what)                                                                        \
    if (have->field != want->field)                                                              \
        return kvd_fail(err, KVARC_ESHAPE, "conversation '%s/%s' was created for " what " %llu, " \
                        "this client sends %llu", ns, name, (unsigned long long)have->field,     \
                        (unsigned long long)want->field);
    DIFF(n_layers, "n_layers")
    DIFF(n_kv_heads, "n_kv_heads")
    DIFF(n_q_heads, "n_q_heads")
    DIFF(head_dim, "head_dim")
    DIFF(format, "record format")
    DIFF(pos_mode, "position mode")
    DIFF(rope_layout, "rope layout")
    DIFF(rotary_dims, "rotary_dims")
    DIFF(seed, "rotation seed")
#undef DIFF
    if (have->rope_theta != want->rope_theta)
        return kvd_fail(err, KVARC_ESHAPE, "conversation '%s/%s' was created for rope_theta %g, "
                        "this client sends %g", ns, name, have->rope_theta, want->rope_theta);
    if (strncmp(have->fingerprint, want->fingerprint, sizeof have->fingerprint))
        return kvd_fail(err, KVARC_ESHAPE, "conversation '%s/%s' was created for model '%s', "
                        "this client is model '%s'", ns, name, have->fingerprint, want->fingerprint);
    return 0;
}

static int lookup_info(kvd_engine *e, const char *ns, const char *name, kvd_conv_info *info,
                       kvd_err *err)
{
    MDB_txn *txn;
    uint64_t id;
    conv_rec c;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    rc = name_lookup(e, txn, ns, name, &id);
    if (!rc)
        rc = conv_get(e, txn, id, &c);
    if (!rc)
        rc = conv_info_fill(e, txn, id, &c, info);
    mdb_txn_abort(txn);
    if (rc == -ENOENT)
        return kvd_fail(err, rc, "conversation '%s/%s' not found", ns, name);
    if (rc)
        return kvd_fail(err, rc, "reading conversation '%s/%s': %s", ns, name, kvarc_strerror(rc));
    return 0;
}

int kvd_conv_open(kvd_engine *e, const char *ns, const char *name, const kvd_shape *expect,
                  kvd_conv_info *info, kvd_err *err)
{
    kvd_conv_info tmp;
    int rc = lookup_names_check(ns, name, err);
    if (rc)
        return rc;
    if (!info)
        info = &tmp;
    if (e->cluster && (rc = clu_sync_name(e, ns, name, err)))
        return rc;
    if ((rc = lookup_info(e, ns, name, info, err)))
        return rc;
    return expect ? shape_diff(ns, name, &info->shape, expect, err) : 0;
}

int kvd_conv_stat(kvd_engine *e, uint64_t id, kvd_conv_info *info, kvd_err *err)
{
    MDB_txn *txn;
    conv_rec c;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    rc = conv_get(e, txn, id, &c);
    if (!rc && (c.flags & KVD_CONV_DELETED))
        rc = -ENOENT;
    if (!rc)
        rc = conv_info_fill(e, txn, id, &c, info);
    mdb_txn_abort(txn);
    if (rc == -ENOENT)
        return kvd_fail(err, rc, "conversation id %llu not found", (unsigned long long)id);
    return rc ? kvd_fail(err, rc, "reading conversation %llu: %s", (unsigned long long)id,
                         kvarc_strerror(rc)) : 0;
}

int conv_read(kvd_engine *e, uint64_t id, conv_rec *c, kvd_err *err)
{
    MDB_txn *txn;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    rc = conv_get(e, txn, id, c);
    mdb_txn_abort(txn);
    return rc && rc != -ENOENT ? kvd_fail(err, rc, "reading conversation %llu: %s", (unsigned long long)id,
                                          kvarc_strerror(rc)) : rc;
}

int conv_lookup(kvd_engine *e, uint64_t id, conv_rec *c, kvd_err *err)
{
    int rc = conv_read(e, id, c, err);
    if (rc == -ENOENT || (!rc && (c->flags & KVD_CONV_DELETED)))
        return kvd_fail(err, -ENOENT, "conversation id %llu not found", (unsigned long long)id);
    return rc;
}

long kvd_conv_list(kvd_engine *e, const char *ns, const char *after, kvd_conv_info *out,
                   size_t max, kvd_err *err)
{
    return conv_list(e, ns, after, out, max, 1, err);
}

static long conv_list(kvd_engine *e, const char *ns, const char *after, kvd_conv_info *out, size_t max,
                      int sync, kvd_err *err)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    char buf[KVD_NS_MAX + KVD_NAME_MAX];
    if (ns && !kvd_name_valid(ns, KVD_NS_MAX))
        return names_check(ns, "x", err);
    int rc;
    if (sync && e->cluster && (!after || !after[0]) && (rc = clu_sync_all(e, ns, err)))   /* a listing's first page */
        return rc;
    rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    if ((rc = kvd_mdb_err(mdb_cursor_open(txn, e->names, &cur)))) {
        mdb_txn_abort(txn);
        return rc;
    }
    size_t n = 0;
    int op = MDB_SET_RANGE;
    char after_ns[KVD_NS_MAX] = "";
    const char *after_name = after;
    if (!ns && after) {             /* across namespaces, `after` is "NS/NAME" */
        const char *slash = strchr(after, '/');
        size_t l = slash ? (size_t)(slash - after) : 0;
        if (!slash || l >= sizeof after_ns) {
            mdb_cursor_close(cur);
            mdb_txn_abort(txn);
            return kvd_fail(err, -EINVAL, "listing every namespace, 'after' is NAMESPACE/NAME; got '%s'", after);
        }
        memcpy(after_ns, after, l);
        after_ns[l] = 0;
        after_name = slash + 1;
    }
    if (ns)
        name_key(buf, sizeof buf, ns, after ? after : "", &k);
    else if (after)
        name_key(buf, sizeof buf, after_ns, after_name, &k);
    else
        op = MDB_FIRST;
    for (; n < max && !(rc = mdb_cursor_get(cur, &k, &v, op)); op = MDB_NEXT) {
        const char *kn = k.mv_data;
        size_t nslen = strnlen(kn, k.mv_size);
        if (ns && (nslen != strlen(ns) || memcmp(kn, ns, nslen)))
            break;
        if (after && (size_t)k.mv_size - nslen - 1 == strlen(after_name) &&
            !memcmp(kn + nslen + 1, after_name, strlen(after_name)) &&
            (ns || (nslen == strlen(after_ns) && !memcmp(kn, after_ns, nslen))))
            continue;
        uint64_t id;
        conv_rec c;
        memcpy(&id, v.mv_data, 8);
        if (conv_get(e, txn, id, &c) || conv_info_fill(e, txn, id, &c, &out[n]))
            continue;
        n++;
    }
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    return (long)n;
}

typedef struct delete_arg {
    const char *ns, *name;
    uint64_t id;
} delete_arg;

static int prepare_delete(kvd_engine *e, MDB_txn *txn, kvd_item *it, uint64_t seg, uint64_t off)
{
    (void)seg;
    (void)off;
    delete_arg *a = it->arg;
    uint64_t id;
    conv_rec c;
    char buf[KVD_NS_MAX + KVD_NAME_MAX];
    MDB_val k;
    if (name_lookup(e, txn, a->ns, a->name, &id) || id != a->id)
        return kvd_fail(&it->err, -ENOENT, "conversation '%s/%s' not found", a->ns, a->name);
    int rc = conv_get(e, txn, id, &c);
    if (rc)
        return rc;
    c.flags |= KVD_CONV_DELETED;
    if ((rc = conv_put(e, txn, id, &c)))
        return rc;
    name_key(buf, sizeof buf, a->ns, a->name, &k);
    return kvd_mdb_err(mdb_del(txn, e->names, &k, NULL));
}

int kvd_conv_delete(kvd_engine *e, const char *ns, const char *name, kvd_err *err)
{
    kvd_conv_info info;
    int rc = kvd_conv_open(e, ns, name, NULL, &info, err);
    if (rc)
        return rc;
    delete_arg a = { ns, name, info.id };
    uint8_t block[KVARC_BLOCK_HEADER];
    kvd_item it;
    memset(&it, 0, sizeof it);
    it.block = block;
    it.bytes = sizeof block;
    it.h.kind = KVARC_BLOCK_CONV_DELETE;
    it.h.version = KVARC_BLOCK_VERSION_PLAIN;
    it.h.conv = info.id;
    it.h.payload_crc = kvarc_crc32c(0, "", 0);
    it.prepare = prepare_delete;
    it.arg = &a;
    if (e->cluster && (rc = clu_writer_begin(e, info.id, err)))
        return rc;
    if ((rc = gc_submit(e, &it, err)))
        return rc;
    if (e->cluster)
        clu_name_release(e, ns, name, info.id);
    return 0;
}

int kvd_conv_fork(kvd_engine *e, const char *src_ns, const char *src_name, uint64_t at_len,
                  const char *dst_ns, const char *dst_name, uint32_t flags,
                  kvd_conv_info *info, kvd_err *err)
{
    kvd_conv_info src;
    int rc = kvd_conv_open(e, src_ns, src_name, NULL, &src, err);
    if (rc || (rc = names_check(dst_ns, dst_name, err)))
        return rc;
    if (flags & ~KVD_CONV_SNAPSHOT)
        return kvd_fail(err, -EINVAL, "unknown fork flags 0x%x", flags);
    if (at_len == UINT64_MAX)
        at_len = src.length;
    if (at_len > src.length)
        return kvd_fail(err, -ERANGE, "cannot fork '%s/%s' at %llu: it has %llu tokens in every "
                        "layer", src_ns, src_name, (unsigned long long)at_len,
                        (unsigned long long)src.length);
    create_arg a;
    memset(&a, 0, sizeof a);
    snprintf(a.rec.ns, sizeof a.rec.ns, "%s", dst_ns);
    snprintf(a.rec.name, sizeof a.rec.name, "%s", dst_name);
    a.rec.parent = src.id;
    a.rec.fork_len = at_len;
    a.rec.flags = flags;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    a.rec.created_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    a.rec.shape = src.shape;
    float *means = malloc(means_floats(&src.shape) * sizeof(float));
    if (!means)
        return kvd_fail(err, -ENOMEM, "out of memory");
    MDB_txn *txn;
    uint8_t kb[8];
    key_u64(kb, src.id);
    MDB_val k = { 8, kb }, v;
    if (!(rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn)))) {
        rc = kvd_mdb_err(mdb_get(txn, e->means, &k, &v));
        if (!rc && v.mv_size == means_floats(&src.shape) * sizeof(float))
            memcpy(means, v.mv_data, v.mv_size);
        else if (!rc)
            rc = KVARC_ECORRUPT;
        mdb_txn_abort(txn);
    }
    a.means = means;
    if (!rc)
        rc = create_block(e, &a, info, err);
    else
        kvd_fail(err, rc, "reading the means of '%s/%s': %s", src_ns, src_name, kvarc_strerror(rc));
    free(means);
    return rc;
}

int kvd_layer_length(kvd_engine *e, uint64_t conv, uint32_t layer, uint64_t *len, kvd_err *err)
{
    conv_rec c;
    int rc = conv_lookup(e, conv, &c, err);
    if (rc)
        return rc;
    if (layer >= c.shape.n_layers)
        return kvd_fail(err, -EINVAL, "layer %u out of range: conversation has %u layers", layer,
                        c.shape.n_layers);
    MDB_txn *txn;
    if ((rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn))))
        return rc;
    rc = layer_len_get(e, txn, conv, layer, len);
    mdb_txn_abort(txn);
    return rc;
}

int kvd_conv_means(kvd_engine *e, uint64_t conv, uint32_t layer, uint32_t head, float *mu_k,
                   float *mu_v, kvd_err *err)
{
    MDB_txn *txn;
    conv_rec c;
    uint8_t kb[8];
    key_u64(kb, conv);
    MDB_val k = { 8, kb }, v;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    if (!(rc = conv_get(e, txn, conv, &c))) {
        if (layer >= c.shape.n_layers || head >= c.shape.n_kv_heads) {
            rc = kvd_fail(err, -EINVAL, "layer %u / head %u out of range (%u layers, %u kv heads)",
                          layer, head, c.shape.n_layers, c.shape.n_kv_heads);
        } else if (!(rc = kvd_mdb_err(mdb_get(txn, e->means, &k, &v)))) {
            size_t d = c.shape.head_dim, at = ((size_t)layer * c.shape.n_kv_heads + head) * 2 * d;
            if (v.mv_size != means_floats(&c.shape) * sizeof(float)) {
                rc = KVARC_ECORRUPT;
            } else {
                if (mu_k)
                    memcpy(mu_k, (float *)v.mv_data + at, d * sizeof(float));
                if (mu_v)
                    memcpy(mu_v, (float *)v.mv_data + at + d, d * sizeof(float));
            }
        }
    }
    mdb_txn_abort(txn);
    if (rc && err && !err->msg[0])
        kvd_fail(err, rc, "reading the means of conversation %llu: %s", (unsigned long long)conv,
                 kvarc_strerror(rc));
    return rc;
}
