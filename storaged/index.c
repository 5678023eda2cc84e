/* index.c - the LMDB index's keys and records: meta counters, conversation
 * records and their names, layer lengths, and an extent's resolution
 * through a conversation's chain of forks (extent_resolve). Stateless
 * helpers over a caller's transaction; the tables are opened in engine.c. */
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

#include "kvd_internal.h"

/* ---- keys ------------------------------------------------------------- */

void key_u64(uint8_t *k, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        k[i] = (uint8_t)v;
}

uint64_t key_get_u64(const uint8_t *k)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | k[i];
    return v;
}

static void key_u32(uint8_t *k, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        k[i] = (uint8_t)v;
}

void extent_key(uint8_t k[20], uint64_t conv, uint32_t layer, uint64_t first)
{
    key_u64(k, conv);
    key_u32(k + 8, layer);
    key_u64(k + 12, first);
}

void layer_key(uint8_t k[12], uint64_t conv, uint32_t layer)
{
    key_u64(k, conv);
    key_u32(k + 8, layer);
}

size_t means_floats(const kvd_shape *s)
{
    return (size_t)s->n_layers * s->n_kv_heads * 2 * s->head_dim;
}

int kvd_name_valid(const char *s, size_t max)
{
    if (!s || !*s || *s == '.')
        return 0;
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (n + 1 >= max || !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* ---- small LMDB helpers ---------------------------------------------- */

int meta_get(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t dflt, uint64_t *out)
{
    MDB_val k = { strlen(name), (void *)name }, v;
    int rc = mdb_get(txn, e->meta, &k, &v);
    *out = dflt;
    if (rc == 0 && v.mv_size == 8)
        memcpy(out, v.mv_data, 8);
    else if (rc != MDB_NOTFOUND)
        return kvd_mdb_err(rc ? rc : MDB_CORRUPTED);
    return 0;
}

int meta_put(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t value)
{
    MDB_val k = { strlen(name), (void *)name }, v = { 8, &value };
    return kvd_mdb_err(mdb_put(txn, e->meta, &k, &v, 0));
}

int meta_next(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t *out)
{
    int rc = meta_get(e, txn, name, 1, out);
    return rc ? rc : meta_put(e, txn, name, *out + 1);
}

int conv_get(kvd_engine *e, MDB_txn *txn, uint64_t id, conv_rec *out)
{
    uint8_t kb[8];
    key_u64(kb, id);
    MDB_val k = { 8, kb }, v;
    int rc = mdb_get(txn, e->convs, &k, &v);
    if (rc)
        return kvd_mdb_err(rc);
    if (v.mv_size != sizeof *out)
        return KVARC_ECORRUPT;
    memcpy(out, v.mv_data, sizeof *out);
    return 0;
}

int kvd_retrieval_check(const conv_rec *c, kvg_rope *buf, const kvg_rope **rope, kvd_err *err)
{
    *rope = NULL;
    if (c->shape.pos_mode == KVARC_POS_TRUE_FREE)
        return kvd_fail(err, KVARC_EVERSION, "'%s/%s' was archived in true-position mode with position-free "
                        "signatures (kind 0, written before kind 2): stage 1 and 2 would rank its keys by a score "
                        "attention does not use, so it is not searched; its records still read, fork and export: "
                        "archive its tokens again into a new conversation", c->ns, c->name);
    if (c->shape.pos_mode > KVARC_POS_KIND_MAX)
        return kvd_fail(err, KVARC_EVERSION, "'%s/%s' has signature kind %u, unknown to this kvarcd", c->ns,
                        c->name, c->shape.pos_mode);
    if (c->shape.pos_mode != KVARC_POS_TRUE)
        return 0;
    if (kvg_rope_init(buf, (int)c->shape.head_dim, (int)c->shape.rotary_dims, c->shape.rope_layout,
                      c->shape.rope_theta))
        return kvd_fail(err, -EINVAL, "'%s/%s' has a RoPE kvarc cannot apply (rotary_dims %u, theta %g)", c->ns,
                        c->name, c->shape.rotary_dims, (double)c->shape.rope_theta);
    *rope = buf;
    return 0;
}

int conv_put(kvd_engine *e, MDB_txn *txn, uint64_t id, const conv_rec *c)
{
    uint8_t kb[8];
    key_u64(kb, id);
    MDB_val k = { 8, kb }, v = { sizeof *c, (void *)c };
    return kvd_mdb_err(mdb_put(txn, e->convs, &k, &v, 0));
}

void name_key(char *buf, size_t len, const char *ns, const char *name, MDB_val *k)
{
    size_t a = strlen(ns), b = strlen(name);
    if (a + b + 2 > len)
        b = len - a - 2;
    memcpy(buf, ns, a);
    buf[a] = 0;
    memcpy(buf + a + 1, name, b);
    k->mv_size = a + 1 + b;
    k->mv_data = buf;
}

int name_lookup(kvd_engine *e, MDB_txn *txn, const char *ns, const char *name, uint64_t *id)
{
    char buf[KVD_NS_MAX + KVD_NAME_MAX];
    MDB_val k, v;
    name_key(buf, sizeof buf, ns, name, &k);
    int rc = mdb_get(txn, e->names, &k, &v);
    if (rc)
        return kvd_mdb_err(rc);
    if (v.mv_size != 8)
        return KVARC_ECORRUPT;
    memcpy(id, v.mv_data, 8);
    return 0;
}

int layer_len_get(kvd_engine *e, MDB_txn *txn, uint64_t conv, uint32_t layer, uint64_t *len)
{
    uint8_t kb[12];
    layer_key(kb, conv, layer);
    MDB_val k = { 12, kb }, v;
    int rc = mdb_get(txn, e->layers, &k, &v);
    if (rc == MDB_NOTFOUND) {
        *len = 0;
        return 0;
    }
    if (rc)
        return kvd_mdb_err(rc);
    memcpy(len, v.mv_data, 8);
    return 0;
}

int layer_len_put(kvd_engine *e, MDB_txn *txn, uint64_t conv, uint32_t layer, uint64_t len)
{
    uint8_t kb[12];
    layer_key(kb, conv, layer);
    MDB_val k = { 12, kb }, v = { 8, &len };
    return kvd_mdb_err(mdb_put(txn, e->layers, &k, &v, 0));
}

int conv_info_fill(kvd_engine *e, MDB_txn *txn, uint64_t id, const conv_rec *c, kvd_conv_info *info)
{
    memset(info, 0, sizeof *info);
    memcpy(info->ns, c->ns, sizeof info->ns);
    memcpy(info->name, c->name, sizeof info->name);
    info->id = id;
    info->parent = c->parent;
    info->fork_len = c->fork_len;
    info->flags = c->flags;
    info->created_ns = c->created_ns;
    info->shape = c->shape;
    uint64_t minlen = UINT64_MAX;
    for (uint32_t l = 0; l < c->shape.n_layers; l++) {
        uint64_t len = 0;
        int rc = layer_len_get(e, txn, id, l, &len);
        if (rc)
            return rc;
        if (len < minlen)
            minlen = len;
    }
    info->length = minlen == UINT64_MAX ? 0 : minlen;
    return 0;
}

int extent_resolve(kvd_engine *e, MDB_txn *txn, uint64_t conv, uint32_t layer, uint64_t pos,
                   uint64_t *owner, uint64_t *first, extent_val *ev, uint64_t *limit)
{
    if (limit)
        *limit = UINT64_MAX;
    for (int depth = 0; depth < 4096; depth++) {
        conv_rec c;
        int rc = conv_get(e, txn, conv, &c);
        if (rc)
            return rc == -ENOENT ? KVARC_ECORRUPT : rc;
        if (pos < c.fork_len && c.parent) {
            if (limit && c.fork_len < *limit)
                *limit = c.fork_len;        /* the nearest fork point on the way */
            conv = c.parent;
            continue;
        }
        uint8_t kb[20];
        extent_key(kb, conv, layer, pos);
        MDB_val k = { 20, kb }, v;
        MDB_cursor *cur;
        if ((rc = mdb_cursor_open(txn, e->extents, &cur)))
            return kvd_mdb_err(rc);
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        if (rc == 0 && memcmp(k.mv_data, kb, 20) != 0)
            rc = mdb_cursor_get(cur, &k, &v, MDB_PREV);
        else if (rc == MDB_NOTFOUND)
            rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
        int found = 0;
        if (rc == 0 && k.mv_size == 20 && memcmp(k.mv_data, kb, 12) == 0 && v.mv_size == sizeof *ev) {
            uint64_t f = key_get_u64((uint8_t *)k.mv_data + 12);
            memcpy(ev, v.mv_data, sizeof *ev);
            if (f <= pos && pos < f + ev->count) {
                *owner = conv;
                *first = f;
                found = 1;
            }
        }
        mdb_cursor_close(cur);
        if (found)
            return 0;
        /* inside the layer's length an extent must hold it: the index is
         * damaged (data loss), not the caller past the end */
        uint64_t len = 0;
        if ((rc = layer_len_get(e, txn, conv, layer, &len)))
            return rc;
        return pos < len ? KVARC_ECORRUPT : -ERANGE;
    }
    return KVARC_ECORRUPT;   /* a fork cycle */
}
