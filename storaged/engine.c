/* engine.c - data directory, recovery, conversations, durable append.
 *
 * Design notes
 *
 * Durable append (group commit). Callers build whole blocks in their own
 * thread, then gc_submit() queues them. Whoever finds no leader becomes
 * the leader and runs one batch (gc_run_batch) with everything queued:
 *   1. begin an LMDB write txn; for each item, in a nested txn, assign a
 *      sequence number and an offset at the active segment's committed tail
 *      and let item->prepare validate it and add its index entries;
 *   2. pwritev all accepted blocks at the tail, fdatasync the segment;
 *   3. advance the segment's committed size in the same txn and commit it
 *      (LMDB syncs its own pages at commit);
 *   4. mark every item done and wake every waiter, under gc_mu
 *      (gc_finish_batch): an item lives in its submitter's stack frame,
 *      and the submitter returns the moment it sees done, so the leader
 *      touches no item after marking it (issue 18: a rejected item was
 *      marked done mid-batch, without the lock, and its frame was gone
 *      when the leader followed its next; kvarcd crashed under bench-load).
 * Invariants:
 *  1. No index entry references a byte that was not written and synced
 *     before the commit that created the entry (steps 2 before 3).
 *  2. A failed write or sync aborts the txn and truncates the tail back,
 *     so nothing of the batch becomes visible, half or whole; later batches
 *     start from the committed size again.
 *  3. An acknowledged append (gc_submit returned 0) is in a committed txn.
 *  4. Recovery (kvd_open) replays the valid blocks past what the index
 *     knows (replay.c: roll-forward), cuts only bytes where no valid block
 *     starts off segment ends, and removes files that hold nothing the
 *     index needs: what was acknowledged is intact even when the index
 *     lost its last transaction. A batch that was durable but whose commit
 *     never happened (a crash between steps 2 and 3) becomes visible then:
 *     it was not acknowledged, and a writer that retries it finds its
 *     layer already holds those positions.
 * Segment roll: when the active segment has grown past segment_bytes, the
 * next batch seals it and creates the next one inside its own txn.
 */
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

int kvd_fail(kvd_err *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int kvd_mdb_err(int rc)
{
    switch (rc) {
    case 0:               return 0;
    case MDB_NOTFOUND:    return -ENOENT;
    case MDB_MAP_FULL:    return -ENOSPC;
    case MDB_KEYEXIST:    return -EEXIST;
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_INCOMPATIBLE:          /* a table's flags changed under it: damage */
    case MDB_INVALID:     return KVARC_ECORRUPT;
    default:              return rc > 0 ? -rc : -EIO;
    }
}

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

static int meta_next(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t *out)
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

static int name_lookup(kvd_engine *e, MDB_txn *txn, const char *ns, const char *name, uint64_t *id)
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
        uint64_t len;
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
        uint64_t len;
        if ((rc = layer_len_get(e, txn, conv, layer, &len)))
            return rc;
        return pos < len ? KVARC_ECORRUPT : -ERANGE;
    }
    return KVARC_ECORRUPT;   /* a fork cycle */
}

/* ---- segment table ----------------------------------------------------- */

kvd_seg *segtab_find(kvd_engine *e, uint64_t id)
{
    for (size_t i = 0; i < e->nseg; i++)
        if (e->segtab[i].id == id)
            return &e->segtab[i];
    return NULL;
}

int segtab_add(kvd_engine *e, uint64_t id, int fd, uint8_t state, uint64_t bytes)
{
    pthread_mutex_lock(&e->seg_mu);
    if (e->nseg == e->capseg) {
        size_t cap = e->capseg ? 2 * e->capseg : 16;
        kvd_seg *n = realloc(e->segtab, cap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&e->seg_mu);
            return -ENOMEM;
        }
        e->segtab = n;
        e->capseg = cap;
    }
    assert(state == SEG_OPEN || state == SEG_SEALED || state == SEG_DEAD);
    assert(!segtab_find(e, id));      /* one entry per segment id */
    e->segtab[e->nseg++] = (kvd_seg){ id, fd, state, bytes, 0 };
    pthread_mutex_unlock(&e->seg_mu);
    return 0;
}

void segtab_remove(kvd_engine *e, uint64_t id)
{
    pthread_mutex_lock(&e->seg_mu);
    for (size_t i = 0; i < e->nseg; i++)
        if (e->segtab[i].id == id) {
            e->segtab[i] = e->segtab[--e->nseg];
            break;
        }
    pthread_mutex_unlock(&e->seg_mu);
}

int seg_pin(kvd_engine *e, uint64_t id)
{
    pthread_mutex_lock(&e->seg_mu);
    kvd_seg *s = segtab_find(e, id);
    int fd = -1;
    if (s && s->fd >= 0) {
        s->pins++;
        fd = s->fd;
    }
    pthread_mutex_unlock(&e->seg_mu);
    return fd;
}

/* Close and unlink a DEAD segment nobody pins (seg_mu held). */
static void seg_retire_locked(kvd_engine *e, kvd_seg *s)
{
    if (s->state != SEG_DEAD || s->pins || s->fd < 0)
        return;
    char p[PATH_MAX];
    close(s->fd);
    s->fd = -1;
    seg_path(e->dir, s->id, p, sizeof p);
    unlink(p);
}

void seg_unpin(kvd_engine *e, uint64_t id)
{
    pthread_mutex_lock(&e->seg_mu);
    kvd_seg *s = segtab_find(e, id);
    assert(s && s->pins > 0);         /* an unpin matches a pin, and a pinned segment stays in the table */
    if (s && s->pins > 0) {
        s->pins--;
        seg_retire_locked(e, s);
    }
    pthread_mutex_unlock(&e->seg_mu);
}

/* Mark a segment DEAD in the table after the commit that made it so. */
void seg_mark_dead(kvd_engine *e, uint64_t id);
void seg_mark_dead(kvd_engine *e, uint64_t id)
{
    pthread_rwlock_wrlock(&e->resolve);
    e->index_gen++;                     /* extents cached by readers may point into it */
    pthread_mutex_lock(&e->seg_mu);
    kvd_seg *s = segtab_find(e, id);
    if (s) {
        s->state = SEG_DEAD;
        seg_retire_locked(e, s);
    }
    pthread_mutex_unlock(&e->seg_mu);
    pthread_rwlock_unlock(&e->resolve);
}

static int seg_put(kvd_engine *e, MDB_txn *txn, uint64_t id, uint8_t state, uint64_t bytes)
{
    uint8_t kb[8];
    key_u64(kb, id);
    seg_val sv = { .state = state, .bytes = bytes };
    MDB_val k = { 8, kb }, v = { sizeof sv, &sv };
    return kvd_mdb_err(mdb_put(txn, e->segs, &k, &v, 0));
}

static int fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return -errno;
    int rc = fsync(fd) ? -errno : 0;
    close(fd);
    return rc;
}

/* Create segment file `id` (empty, synced into its directory) and its
 * OPEN entry in txn. The file is removed again if txn never commits
 * (kvd_open deletes files without an entry). Returns the fd or an error. */
int seg_create(kvd_engine *e, MDB_txn *txn, uint64_t *id_out, uint8_t state);
int seg_create(kvd_engine *e, MDB_txn *txn, uint64_t *id_out, uint8_t state)
{
    uint64_t id;
    int rc = meta_next(e, txn, "next_seg", &id);
    if (rc)
        return rc;
    char p[PATH_MAX], d[PATH_MAX];
    seg_path(e->dir, id, p, sizeof p);
    int fd = open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    snprintf(d, sizeof d, "%s/segments", e->dir);
    if ((rc = fsync_dir(d)) || (rc = seg_put(e, txn, id, state, 0))) {
        close(fd);
        unlink(p);
        return rc;
    }
    *id_out = id;
    return fd;
}

/* ---- group commit ------------------------------------------------------ */

#define GC_BATCH 64     /* items per batch: one pwritev of at most 64 blocks */

static void gc_run_batch(kvd_engine *e, kvd_item *batch)
{
    MDB_txn *txn = NULL;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, 0, &txn));
    struct iovec iov[GC_BATCH];
    int niov = 0, new_fd = -1;
    uint64_t new_id = 0;
    kvd_item *it;
    const char *stage = "begin the index transaction";

    pthread_mutex_lock(&e->seg_mu);
    kvd_seg *act = segtab_find(e, e->active);
    assert(act && act->state == SEG_OPEN && act->fd >= 0);   /* appends go to the one OPEN segment */
    uint64_t seg_id = act->id, tail = act->bytes;
    int fd = act->fd;
    pthread_mutex_unlock(&e->seg_mu);

    if (!rc && tail >= e->segment_bytes) {          /* roll to a new segment */
        stage = "create a new segment";
        new_fd = seg_create(e, txn, &new_id, SEG_OPEN);
        if (new_fd < 0)
            rc = new_fd;
        else if (!(rc = seg_put(e, txn, seg_id, SEG_SEALED, tail))) {
            seg_id = new_id;
            tail = 0;
            fd = new_fd;
        }
    }
    uint64_t off = tail, last_seq = 0;
    for (it = batch; it && !rc; it = it->next) {
        MDB_txn *child;
        it->rc = kvd_mdb_err(mdb_txn_begin(e->env, txn, 0, &child));
        if (!it->rc)
            it->rc = meta_next(e, child, "seq", &it->h.seq);
        if (!it->rc)
            it->rc = it->prepare(e, child, it, seg_id, off);
        if (it->rc) {
            if (child)
                mdb_txn_abort(child);
            if (!it->err.msg[0])
                kvd_fail(&it->err, it->rc, "append rejected: %s", kvarc_strerror(it->rc));
            continue;                   /* rejected: it->rc says so; done is set by gc_finish_batch */
        }
        if ((it->rc = kvd_mdb_err(mdb_txn_commit(child)))) {
            kvd_fail(&it->err, it->rc, "index update failed: %s", kvarc_strerror(it->rc));
            continue;
        }
        assert(it->h.seq > last_seq && niov < GC_BATCH);   /* replay order = the batch's order */
        last_seq = it->h.seq;
        (void)last_seq;
        kvarc_block_header_encode(&it->h, it->block);
        iov[niov].iov_base = it->block;
        iov[niov].iov_len = it->bytes;
        niov++;
        off += it->bytes;
    }
    if (!rc && niov) {
        stage = "write the segment";
        rc = seg_pwritev(fd, iov, niov, tail);
        if (!rc) {
            stage = "fdatasync the segment";
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            rc = seg_sync(fd);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            prom_hist_observe_ns(&e->sync_hist, (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000000LL +
                                                           (t1.tv_nsec - t0.tv_nsec)));
            atomic_fetch_add(&e->n_fsyncs, 1);
        }
        if (!rc) {
            stage = "commit the index";
            rc = seg_put(e, txn, seg_id, SEG_OPEN, off);
        }
    }
    /* a reader may resolve into the new segment as soon as the txn commits:
     * it must be in the table first */
    int new_in_table = 0;
    if (!rc && new_fd >= 0 && !(rc = segtab_add(e, new_id, new_fd, SEG_OPEN, off)))
        new_in_table = 1;
    if (!rc) {
        rc = kvd_mdb_err(mdb_txn_commit(txn));
        txn = NULL;
    }
    if (rc) {
        if (txn)
            mdb_txn_abort(txn);
        if (ftruncate(fd, (off_t)tail) == 0)
            fdatasync(fd);
        if (new_fd >= 0) {
            char p[PATH_MAX];
            if (new_in_table)
                segtab_remove(e, new_id);
            seg_path(e->dir, new_id, p, sizeof p);
            close(new_fd);
            unlink(p);
        }
        for (it = batch; it; it = it->next)
            if (!it->rc) {
                it->rc = rc;
                kvd_fail(&it->err, rc, "append not stored: could not %s in %s: %s (nothing of it "
                         "was kept; retry once the cause is fixed)", stage, e->dir, kvarc_strerror(rc));
            }
    } else {
        assert(off >= tail && (niov > 0) == (off > tail));
        pthread_mutex_lock(&e->seg_mu);
        if (new_fd >= 0) {
            segtab_find(e, e->active)->state = SEG_SEALED;
            e->active = new_id;
        } else {
            segtab_find(e, seg_id)->bytes = off;
        }
        pthread_mutex_unlock(&e->seg_mu);
        atomic_fetch_add(&e->n_commits, 1);
    }
}

/* Mark a batch's items done, with gc_mu held: an item lives in its
 * submitter's stack frame, and the submitter returns as soon as it sees
 * done (a spurious or earlier wake-up is enough for it to look), so done
 * is written only under the lock its submitter reads it under, and an
 * item's next is read before its done is set. */
static void gc_finish_batch(kvd_item *batch)
{
    for (kvd_item *it = batch, *next; it; it = next) {
        next = it->next;
        it->done = 1;
    }
}

/* Queue its[0..n) together (so that one batch can take them all) and
 * wait until every one is done, leading batches while no one else does.
 * An engine open to be checked only refuses each (-EROFS). */
static void gc_submit_n(kvd_engine *e, kvd_item *const *its, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        kvd_item *it = its[i];
        it->rc = 0;
        it->done = 0;
        it->err.code = 0;
        it->err.msg[0] = 0;
        it->next = NULL;
        if (e->check_only)
            it->rc = kvd_fail(&it->err, -EROFS, "%s is open to be checked only: nothing can be written", e->dir);
    }
    if (e->check_only)
        return;
    pthread_mutex_lock(&e->gc_mu);
    for (size_t i = 0; i < n; i++) {
        if (e->q_tail)
            e->q_tail->next = its[i];
        else
            e->q_head = its[i];
        e->q_tail = its[i];
    }
    for (size_t i = 0; i < n; i++)
        while (!its[i]->done) {
            if (e->leader) {
                pthread_cond_wait(&e->gc_cv, &e->gc_mu);
                continue;
            }
            /* lead one batch: at most GC_BATCH items from the head of the queue */
            kvd_item *batch = e->q_head, *last = batch;
            for (int k = 1; k < GC_BATCH && last->next; k++)
                last = last->next;
            e->q_head = last->next;
            if (!e->q_head)
                e->q_tail = NULL;
            last->next = NULL;
            e->leader = 1;
            pthread_mutex_unlock(&e->gc_mu);
            gc_run_batch(e, batch);
            pthread_mutex_lock(&e->gc_mu);
            gc_finish_batch(batch);
            e->leader = 0;
            pthread_cond_broadcast(&e->gc_cv);
        }
    pthread_mutex_unlock(&e->gc_mu);
}

int gc_submit(kvd_engine *e, kvd_item *it, kvd_err *err)
{
    gc_submit_n(e, &it, 1);
    if (it->rc && err)
        *err = it->err;
    return it->rc;
}

/* ---- open / close / recovery ----------------------------------------- */

static int mkdir_p(const char *p)
{
    if (mkdir(p, 0700) && errno != EEXIST)
        return -errno;
    return 0;
}

static int rf_push(rf_seg **v, size_t *n, const rf_seg *s)
{
    rf_seg *nv = realloc(*v, (*n + 1) * sizeof *nv);
    if (!nv)
        return -ENOMEM;
    *v = nv;
    nv[(*n)++] = *s;
    return 0;
}

/* Recovery (invariant 4 above, and replay.c's roll-forward): open every
 * listed segment, replay the valid blocks the index does not know yet,
 * cut what no valid block occupies off segment ends, remove files that
 * hold nothing needed. Refuses (changing nothing but DEAD files) when the
 * index and the segments disagree in a way only rebuild-index repairs. */
static int recover(kvd_engine *e, kvd_err *err)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    rf_seg *rs = NULL;
    size_t nrs = 0;
    char p[PATH_MAX], d[PATH_MAX];
    snprintf(d, sizeof d, "%s/segments", e->dir);
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, 0, &txn));
    if (rc)
        return kvd_fail(err, rc, "cannot open the index of %s: %s", e->dir, kvarc_strerror(rc));
    if ((rc = kvd_mdb_err(mdb_cursor_open(txn, e->segs, &cur))))
        goto out;
    for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
        seg_val sv;
        if (k.mv_size != 8 || v.mv_size != sizeof sv) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "index of %s has a malformed segment entry; with kvarcd "
                          "stopped run `kvarc verify %s`, then `kvarc rebuild-index %s`", e->dir, e->dir, e->dir);
            break;
        }
        memcpy(&sv, v.mv_data, sizeof sv);
        uint64_t id = key_get_u64(k.mv_data);
        seg_path(e->dir, id, p, sizeof p);
        if (sv.state != SEG_OPEN && sv.state != SEG_SEALED && sv.state != SEG_DEAD) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "index of %s gives segment %016llx the state %u, which does not "
                          "exist: the index is damaged; with kvarcd stopped run `kvarc verify %s`, then `kvarc "
                          "rebuild-index %s`", e->dir, (unsigned long long)id, sv.state, e->dir, e->dir);
            break;
        }
        if (sv.state == SEG_DEAD) {                /* compaction finished, unlink pending */
            /* ... unless the index still refers to it (a damaged state byte
             * must not remove live data) */
            int dfd = open(p, O_RDONLY | O_CLOEXEC);
            struct stat dst;
            uint64_t refs = 0;
            if (dfd >= 0 && !fstat(dfd, &dst))
                rc = seg_dead_referenced(e, txn, dfd, id, (uint64_t)dst.st_size, &refs);
            if (dfd >= 0)
                close(dfd);
            if (!rc && refs)
                rc = kvd_fail(err, KVARC_ECORRUPT, "segment %s is marked for removal but the index still refers to "
                              "%llu of its blocks: the index is damaged. Nothing was removed; with kvarcd stopped "
                              "run `kvarc verify %s`, then `kvarc rebuild-index %s`", p, (unsigned long long)refs,
                              e->dir, e->dir);
            if (rc)
                break;
            unlink(p);
            mdb_cursor_del(cur, 0);
            continue;
        }
        int fd = open(p, O_RDWR | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st)) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "segment %s is listed in the index but cannot be "
                          "opened: %s; with kvarcd stopped run `kvarc verify %s`, then `kvarc "
                          "rebuild-index %s`", p, strerror(errno), e->dir, e->dir);
            if (fd >= 0)
                close(fd);
            break;
        }
        if ((uint64_t)st.st_size < sv.bytes) {
            close(fd);
            rc = kvd_fail(err, KVARC_ECORRUPT, "segment %s is %lld bytes, shorter than its "
                          "committed %llu: acknowledged data is missing. With kvarcd stopped, `kvarc "
                          "verify %s` says what is lost and `kvarc rebuild-index %s` rebuilds the index "
                          "from what the segments still hold", p, (long long)st.st_size,
                          (unsigned long long)sv.bytes, e->dir, e->dir);
            break;
        }
        rf_seg r = { .id = id, .fd = fd, .listed = 1, .state = sv.state, .committed = sv.bytes,
                     .size = (uint64_t)st.st_size };
        if ((rc = rf_push(&rs, &nrs, &r))) {
            close(fd);
            break;
        }
    }
    mdb_cursor_close(cur);
    if (rc)
        goto out;
    /* files no entry knows: uncommitted rolls or compaction outputs, or a
     * segment whose creation the index lost */
    DIR *dp = opendir(d);
    if (dp) {
        struct dirent *de;
        while ((de = readdir(dp)) && !rc) {
            uint64_t id;
            int known = 0;
            if (!seg_parse_name(de->d_name, &id))
                continue;
            for (size_t i = 0; i < nrs; i++)
                known |= rs[i].id == id;
            if (known)
                continue;
            seg_path(e->dir, id, p, sizeof p);
            int fd = open(p, O_RDWR | O_CLOEXEC);
            struct stat st;
            if (fd < 0 || fstat(fd, &st)) {
                rc = kvd_fail(err, -errno, "cannot open %s: %s", p, strerror(errno));
                if (fd >= 0)
                    close(fd);
                break;
            }
            rf_seg r = { .id = id, .fd = fd, .size = (uint64_t)st.st_size };
            if ((rc = rf_push(&rs, &nrs, &r)))
                close(fd);
        }
        closedir(dp);
    }
    if (rc)
        goto out;
    if ((rc = recover_roll_forward(e, txn, rs, nrs, err)))
        goto out;
    uint64_t open_id = 0, max_id = 0, max_new = 0;
    for (size_t i = 0; i < nrs && !rc; i++) {
        rf_seg *r = &rs[i];
        seg_path(e->dir, r->id, p, sizeof p);
        if (!r->listed && !r->applied) {           /* nothing in it is needed */
            close(r->fd);
            r->fd = -1;
            unlink(p);
            continue;
        }
        e->n_rolled_forward += r->applied;
        /* damage past the old committed size with valid blocks kept after
         * it (a torn write that writeback did not finish, the batch after
         * it whole): the range stays inside the segment; verify reports it,
         * and compaction refuses that segment until rebuild-index */
        if (r->bad_what && r->new_bytes > r->bad_off)
            e->n_recovery_damaged++;
        if (r->size > r->new_bytes && (ftruncate(r->fd, (off_t)r->new_bytes) || fdatasync(r->fd))) {
            rc = kvd_fail(err, -errno, "cannot truncate the tail of %s: %s", p, strerror(errno));
            break;
        }
        uint8_t state = r->listed ? r->state : SEG_SEALED;
        if ((rc = segtab_add(e, r->id, r->fd, state, r->new_bytes)))
            break;
        r->fd = -1;                                /* the table owns it now */
        if ((!r->listed || r->new_bytes != r->committed) &&
            (rc = seg_put(e, txn, r->id, state, r->new_bytes)))
            break;
        if (!r->listed && r->id > max_new)
            max_new = r->id;
        if (r->id > max_id)
            max_id = r->id;
        if (state == SEG_OPEN && r->id > open_id)
            open_id = r->id;
    }
    if (rc)
        goto out;
    if (max_id && (rc = meta_at_least(e, txn, "next_seg", max_id + 1)))
        goto out;
    /* one OPEN segment: a segment the roll-forward brought back (its roll
     * was lost with the index) is newer than the OPEN one the index
     * remembered; compaction outputs, also of higher ids, stay sealed */
    if (open_id && max_new > open_id)
        open_id = max_new;
    for (size_t i = 0; i < e->nseg && !rc; i++) {
        kvd_seg *s = &e->segtab[i];
        uint8_t want = s->id == open_id ? SEG_OPEN : SEG_SEALED;
        if (s->state != want && s->state != SEG_DEAD) {
            s->state = want;
            rc = seg_put(e, txn, s->id, want, s->bytes);
        }
    }
    if (rc)
        goto out;
    if (!open_id) {
        int fd = seg_create(e, txn, &open_id, SEG_OPEN);
        if (fd < 0) {
            rc = kvd_fail(err, fd, "cannot create a segment in %s: %s", d, kvarc_strerror(fd));
            goto out;
        }
        if ((rc = segtab_add(e, open_id, fd, SEG_OPEN, 0)))
            goto out;
    }
    e->active = open_id;
    rc = kvd_mdb_err(mdb_txn_commit(txn));
    txn = NULL;
    if (rc)
        kvd_fail(err, rc, "cannot commit recovery of %s: %s", e->dir, kvarc_strerror(rc));
out:
    if (txn)
        mdb_txn_abort(txn);
    for (size_t i = 0; i < nrs; i++)
        if (rs[i].fd >= 0 && !segtab_find(e, rs[i].id))
            close(rs[i].fd);
    free(rs);
    return rc;
}

/* kvd_open_check's load: every listed segment that opens, read-only, at
 * its committed size; what does not open kvd_verify reports. */
static int load_segments(kvd_engine *e, kvd_err *err)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "cannot read the index of %s: %s", e->dir, kvarc_strerror(rc));
    if (!(rc = kvd_mdb_err(mdb_cursor_open(txn, e->segs, &cur)))) {
        for (int op = MDB_FIRST; !rc && !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            seg_val sv;
            if (k.mv_size != 8 || v.mv_size != sizeof sv)
                continue;
            memcpy(&sv, v.mv_data, sizeof sv);
            char p[PATH_MAX];
            seg_path(e->dir, key_get_u64(k.mv_data), p, sizeof p);
            int fd = sv.state == SEG_DEAD ? -1 : open(p, O_RDONLY | O_CLOEXEC);
            if (fd >= 0 && (rc = segtab_add(e, key_get_u64(k.mv_data), fd, sv.state, sv.bytes)))
                close(fd);
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
    return rc;
}

static int engine_open(const kvd_options *opt, int check_only, kvd_engine **out, kvd_err *err);

int kvd_open(const kvd_options *opt, kvd_engine **out, kvd_err *err)
{
    return engine_open(opt, 0, out, err);
}

int kvd_open_check(const char *dir, kvd_engine **out, kvd_err *err)
{
    char p[PATH_MAX];
    struct stat st;
    if (!dir)
        return kvd_fail(err, -EINVAL, "no data directory given");
    snprintf(p, sizeof p, "%s/index/data.mdb", dir);
    if (stat(p, &st))
        return kvd_fail(err, -ENOENT, "%s is not a kvarc data directory (no %s)", dir, p);
    kvd_options o = { .dir = dir };
    return engine_open(&o, 1, out, err);
}

static int engine_open(const kvd_options *opt, int check_only, kvd_engine **out, kvd_err *err)
{
    if (!opt || !opt->dir || !out)
        return kvd_fail(err, -EINVAL, "kvd_open: no data directory given");
    if (strlen(opt->dir) >= PATH_MAX - 128)
        return kvd_fail(err, -ENAMETOOLONG, "data directory path too long: %s", opt->dir);
    kvd_engine *e = calloc(1, sizeof *e);
    if (!e)
        return kvd_fail(err, -ENOMEM, "out of memory");
    snprintf(e->dir, sizeof e->dir, "%s", opt->dir);
    e->lock_fd = -1;
    e->segment_bytes = opt->segment_bytes ? opt->segment_bytes : 256ull << 20;
    pthread_mutex_init(&e->seg_mu, NULL);
    pthread_rwlock_init(&e->resolve, NULL);
    pthread_mutex_init(&e->gc_mu, NULL);
    pthread_cond_init(&e->gc_cv, NULL);
    pthread_mutex_init(&e->compact_mu, NULL);
    char p[PATH_MAX];
    int rc;
    MDB_txn *txn = NULL;
    if ((rc = mkdir_p(e->dir))) {
        kvd_fail(err, rc, "cannot create data directory %s: %s", e->dir, strerror(-rc));
        goto fail;
    }
    snprintf(p, sizeof p, "%s/LOCK", e->dir);
    e->lock_fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (e->lock_fd < 0) {
        rc = kvd_fail(err, -errno, "cannot open %s: %s", p, strerror(errno));
        goto fail;
    }
    if (flock(e->lock_fd, LOCK_EX | LOCK_NB)) {
        rc = kvd_fail(err, -EBUSY, check_only ? "data directory %s is in use (lock %s held): kvarcd runs "
                      "on it; verify through it instead (`kvarc verify --data DIR`)"
                      : "data directory %s is in use by another process (lock %s held); stop it first",
                      e->dir, p);
        goto fail;
    }
    e->check_only = check_only;
    snprintf(p, sizeof p, "%s/segments", e->dir);
    if ((rc = mkdir_p(p))) {
        kvd_fail(err, rc, "cannot create %s: %s", p, strerror(-rc));
        goto fail;
    }
    snprintf(p, sizeof p, "%s/index", e->dir);
    if ((rc = mkdir_p(p))) {
        kvd_fail(err, rc, "cannot create %s: %s", p, strerror(-rc));
        goto fail;
    }
    if ((rc = kvd_mdb_err(mdb_env_create(&e->env))) ||
        (rc = kvd_mdb_err(mdb_env_set_maxdbs(e->env, 8))) ||
        (rc = kvd_mdb_err(mdb_env_set_mapsize(e->env, opt->map_size ? opt->map_size : 64ull << 30))) ||
        (rc = kvd_mdb_err(mdb_env_set_maxreaders(e->env, 1024))) ||
        (rc = kvd_mdb_err(mdb_env_open(e->env, p, MDB_NOTLS | (check_only ? MDB_RDONLY : 0), 0600)))) {
        kvd_fail(err, rc, "cannot open the LMDB index %s: %s", p, kvarc_strerror(rc));
        goto fail;
    }
    if ((rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, check_only ? MDB_RDONLY : 0, &txn))))
        goto fail;
    struct { const char *name; MDB_dbi *dbi; } dbs[] = {
        { "meta", &e->meta }, { "names", &e->names }, { "convs", &e->convs }, { "means", &e->means },
        { "layers", &e->layers }, { "extents", &e->extents }, { "segs", &e->segs },
    };
    /* a new index gets every table; an index that has some but lacks
     * others is damaged (its main table): creating the missing ones empty
     * would make recovery take the segments for leftovers */
    size_t missing = 0, ntab = sizeof dbs / sizeof dbs[0];
    const char *lacks = NULL;
    for (size_t i = 0; i < ntab; i++) {
        int orc = mdb_dbi_open(txn, dbs[i].name, 0, dbs[i].dbi);
        if (orc == MDB_NOTFOUND) {
            missing++;
            lacks = dbs[i].name;
        } else if ((rc = kvd_mdb_err(orc))) {
            kvd_fail(err, rc, "cannot open table %s of %s: %s; with kvarcd stopped run `kvarc verify %s`, then "
                     "`kvarc rebuild-index %s`", dbs[i].name, p, kvarc_strerror(rc), e->dir, e->dir);
            goto fail;
        }
    }
    if (missing && (missing < ntab || check_only)) {
        rc = kvd_fail(err, KVARC_ECORRUPT, "the index %s lacks its %s table%s: it is damaged; with kvarcd stopped "
                      "run `kvarc rebuild-index %s`", p, lacks, missing > 1 ? " (and others)" : "", e->dir);
        goto fail;
    }
    for (size_t i = 0; i < ntab && missing; i++)
        if ((rc = kvd_mdb_err(mdb_dbi_open(txn, dbs[i].name, MDB_CREATE, dbs[i].dbi)))) {
            kvd_fail(err, rc, "cannot create table %s of %s: %s", dbs[i].name, p, kvarc_strerror(rc));
            goto fail;
        }
    rc = kvd_mdb_err(mdb_txn_commit(txn));
    txn = NULL;
    if (rc || (rc = check_only ? load_segments(e, err) : recover(e, err)))
        goto fail;
    *out = e;
    return 0;
fail:
    if (txn)
        mdb_txn_abort(txn);
    if (err && !err->msg[0])
        kvd_fail(err, rc, "cannot open %s: %s", e->dir, kvarc_strerror(rc));
    kvd_close(e);
    return rc;
}

void kvd_close(kvd_engine *e)
{
    if (!e)
        return;
    for (size_t i = 0; i < e->nseg; i++)
        if (e->segtab[i].fd >= 0) {
            if (e->segtab[i].state == SEG_DEAD) {
                e->segtab[i].pins = 0;
                seg_retire_locked(e, &e->segtab[i]);
            } else {
                close(e->segtab[i].fd);
            }
        }
    free(e->segtab);
    if (e->env)
        mdb_env_close(e->env);
    if (e->lock_fd >= 0)
        close(e->lock_fd);
    pthread_mutex_destroy(&e->seg_mu);
    pthread_rwlock_destroy(&e->resolve);
    pthread_mutex_destroy(&e->gc_mu);
    pthread_cond_destroy(&e->gc_cv);
    pthread_mutex_destroy(&e->compact_mu);
    free(e);
}

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
    int rc = meta_next(e, txn, "next_conv", &id);
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
    int rc = gc_submit(e, &it, err);
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

long kvd_stage_sweep(kvd_engine *e, kvd_err *err)
{
    kvd_conv_info page[256];
    char after[KVD_NS_MAX + KVD_NAME_MAX] = "";
    long got, removed = 0;
    while ((got = kvd_conv_list(e, NULL, *after ? after : NULL, page, 256, err)) > 0) {
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

int conv_lookup(kvd_engine *e, uint64_t id, conv_rec *c, kvd_err *err)
{
    MDB_txn *txn;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    rc = conv_get(e, txn, id, c);
    mdb_txn_abort(txn);
    if (rc == -ENOENT || (!rc && (c->flags & KVD_CONV_DELETED)))
        return kvd_fail(err, -ENOENT, "conversation id %llu not found", (unsigned long long)id);
    return rc ? kvd_fail(err, rc, "reading conversation %llu: %s", (unsigned long long)id,
                         kvarc_strerror(rc)) : 0;
}

long kvd_conv_list(kvd_engine *e, const char *ns, const char *after, kvd_conv_info *out,
                   size_t max, kvd_err *err)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    char buf[KVD_NS_MAX + KVD_NAME_MAX];
    if (ns && !kvd_name_valid(ns, KVD_NS_MAX))
        return names_check(ns, "x", err);
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
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
    return gc_submit(e, &it, err);
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

/* ---- append ------------------------------------------------------------- */

static int prepare_data(kvd_engine *e, MDB_txn *txn, kvd_item *it, uint64_t seg, uint64_t off)
{
    conv_rec c;
    int rc = conv_get(e, txn, it->h.conv, &c);
    if (rc == -ENOENT || (!rc && (c.flags & KVD_CONV_DELETED)))
        return kvd_fail(&it->err, -ENOENT, "conversation %llu not found (deleted?)",
                        (unsigned long long)it->h.conv);
    if (rc)
        return rc;
    if (c.flags & KVD_CONV_SNAPSHOT)
        return kvd_fail(&it->err, -EPERM, "conversation '%s/%s' is a snapshot: fork it to append",
                        c.ns, c.name);
    if (it->h.layer >= c.shape.n_layers || it->h.n_heads != c.shape.n_kv_heads ||
        it->h.head_dim != c.shape.head_dim || it->h.format != c.shape.format)
        return kvd_fail(&it->err, KVARC_ESHAPE, "append to '%s/%s' layer %u does not match its shape "
                        "(%u layers, %u kv heads, head_dim %u, format %u)", c.ns, c.name,
                        it->h.layer, c.shape.n_layers, c.shape.n_kv_heads, c.shape.head_dim,
                        c.shape.format);
    uint64_t len;
    if ((rc = layer_len_get(e, txn, it->h.conv, it->h.layer, &len)))
        return rc;
    assert(it->h.count > 0 && len + it->h.count > len);   /* a layer only grows */
    if (it->h.first_pos != len)
        return kvd_fail(&it->err, -ERANGE, "append to '%s/%s' layer %u at position %llu, but the "
                        "layer has %llu tokens: appends must continue at the end", c.ns, c.name,
                        it->h.layer, (unsigned long long)it->h.first_pos, (unsigned long long)len);
    uint8_t kb[20];
    extent_key(kb, it->h.conv, it->h.layer, it->h.first_pos);
    extent_val ev = { seg, off, it->h.count, (uint32_t)it->bytes };
    MDB_val k = { 20, kb }, v = { sizeof ev, &ev };
    if ((rc = kvd_mdb_err(mdb_put(txn, e->extents, &k, &v, MDB_NOOVERWRITE))))
        return rc;
    return layer_len_put(e, txn, it->h.conv, it->h.layer, len + it->h.count);
}

int kvd_append(kvd_engine *e, uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t count,
               const uint8_t *sig_bits, const uint16_t *sig_scale, const uint8_t *records,
               kvd_err *err)
{
    return kvd_append_sums(e, conv, layer, first_pos, count, sig_bits, sig_scale, records, NULL, NULL, err);
}

/* The data block of b for conversation info (its shape checked) in *it
 * (it->block malloc'ed): 0 or an error in err. */
static int block_make(const conv_rec *info, uint64_t conv, const kvd_block_in *b, kvd_item *it, kvd_err *err)
{
    const kvd_shape *s = &info->shape;
    const uint32_t layer = b->layer, count = b->count;
    const uint64_t first_pos = b->first_pos;
    memset(it, 0, sizeof *it);
    if (layer >= s->n_layers)
        return kvd_fail(err, -EINVAL, "layer %u out of range: '%s/%s' has %u layers", layer,
                        info->ns, info->name, s->n_layers);
    if (count == 0 || !b->sig_bits || !b->sig_scale || !b->records)
        return kvd_fail(err, -EINVAL, "append needs count > 0 and signature and record buffers");
    int d = (int)s->head_dim, H = (int)s->n_kv_heads;
    uint32_t rb = (uint32_t)kvarc_record_bytes(s->format, d);
    uint32_t n_sum = b->sum_bits && b->sum_scale ? kvarc_block_n_sum(first_pos, count) : 0;
    size_t payload = kvarc_block_payload_bytes_sum(count, d, H, rb, n_sum);
    if (payload > (1u << 30))
        return kvd_fail(err, -E2BIG, "append of %u tokens x %d heads is %zu bytes; split it into "
                        "blocks under 1 GiB", count, H, payload);
    it->bytes = KVARC_BLOCK_HEADER + payload;
    it->block = calloc(1, it->bytes);
    if (!it->block)
        return kvd_fail(err, -ENOMEM, "out of memory for a %zu-byte block", it->bytes);
    it->h.kind = KVARC_BLOCK_DATA;
    it->h.version = KVARC_BLOCK_VERSION_PLAIN;
    it->h.format = s->format;
    it->h.format_version = kvarc_format_get(s->format)->version;
    it->h.head_dim = (uint16_t)d;
    it->h.n_heads = (uint16_t)H;
    it->h.layer = layer;
    it->h.conv = conv;
    it->h.first_pos = first_pos;
    it->h.count = count;
    it->h.rec_bytes = rb;
    it->h.payload_bytes = (uint32_t)payload;
    it->h.n_sum = n_sum;
    if (n_sum)
        it->h.version = KVARC_BLOCK_VERSION;     /* summaries: the one kind of block an older reader cannot take */
    size_t sb = (size_t)d / 8, sec = kvarc_block_sig_section(count, d), ssec = kvarc_block_sum_section(n_sum, d);
    for (int h = 0; h < H && n_sum; h++) {
        uint8_t *p = it->block + kvarc_block_sum_offset(&it->h, h);
        size_t nb = (size_t)n_sum * KVARC_SUM_ITEMS;
        memcpy(p, b->sum_bits + (size_t)h * nb * sb, nb * sb);
        memcpy(p + nb * sb, b->sum_scale + (size_t)h * nb, nb * 2);
        uint32_t crc = kvarc_sum_section_crc(conv, layer, first_pos, (uint32_t)h, p, ssec - 4);
        memcpy(p + ssec - 4, &crc, 4);
    }
    for (int h = 0; h < H; h++) {
        uint8_t *p = it->block + kvarc_block_sig_offset(&it->h, h);
        memcpy(p, b->sig_bits + (size_t)h * count * sb, count * sb);
        memcpy(p + count * sb, b->sig_scale + (size_t)h * count, count * 2);
        uint32_t crc = kvarc_sig_section_crc(conv, layer, first_pos, (uint32_t)h, p, sec - 4);
        memcpy(p + sec - 4, &crc, 4);
        for (uint32_t t = 0; t < count; t++) {
            uint8_t *slot = it->block + kvarc_block_slot_offset(&it->h, h, t);
            const uint8_t *rec = b->records + ((size_t)h * count + t) * rb;
            memcpy(slot, rec, rb);
            uint32_t rcrc = kvarc_record_crc(conv, layer, (uint32_t)h, first_pos + t, rec, rb);
            memcpy(slot + rb, &rcrc, 4);
        }
    }
    it->prepare = prepare_data;
    return 0;
}

int kvd_append_sums(kvd_engine *e, uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t count,
                    const uint8_t *sig_bits, const uint16_t *sig_scale, const uint8_t *records,
                    const uint8_t *sum_bits, const uint16_t *sum_scale, kvd_err *err)
{
    kvd_block_in b = { layer, first_pos, count, sig_bits, sig_scale, records, sum_bits, sum_scale };
    int rc = 0;
    kvd_append_n(e, conv, &b, 1, &rc, NULL, err);
    return rc;
}

int kvd_append_n(kvd_engine *e, uint64_t conv, const kvd_block_in *b, size_t n, int *rcs, kvd_err *errs,
                 kvd_err *err)
{
    conv_rec info;      /* one lookup: the commit re-validates under its txn */
    int rc = conv_lookup(e, conv, &info, err), first = 0;
    for (size_t i = 0; i < n; i++)
        rcs[i] = rc;
    if (rc || n == 0)
        return rc;
    kvd_item *items = calloc(n, sizeof *items), **q = calloc(n, sizeof *q);
    if (!items || !q) {
        free(items);
        free(q);
        rc = kvd_fail(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++)
            rcs[i] = rc;
        return rc;
    }
    size_t nq = 0;
    for (size_t i = 0; i < n; i++) {       /* a block that cannot be made is refused alone */
        kvd_err be = { 0, "" };
        if ((rcs[i] = block_make(&info, conv, &b[i], &items[i], &be))) {
            if (!first && err)
                *err = be;
            if (errs)
                errs[i] = be;
            first = first ? first : rcs[i];
        } else {
            q[nq++] = &items[i];
        }
    }
    gc_submit_n(e, q, nq);
    for (size_t i = 0; i < n; i++) {
        if (!items[i].block)
            continue;
        rcs[i] = items[i].rc;
        if (items[i].rc && errs)
            errs[i] = items[i].err;
        if (!items[i].rc)
            atomic_fetch_add(&e->n_appends, 1);
        else if (!first) {
            first = items[i].rc;
            if (err)
                *err = items[i].err;
        }
        free(items[i].block);
    }
    free(items);
    free(q);
    return first;
}

int kvd_stats_get(kvd_engine *e, kvd_stats *st, kvd_err *err)
{
    memset(st, 0, sizeof *st);
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    if (!mdb_cursor_open(txn, e->convs, &cur)) {
        for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            conv_rec c;
            memcpy(&c, v.mv_data, sizeof c);
            if (c.flags & KVD_CONV_DELETED)
                st->deleted++;
            else
                st->conversations++;
        }
        mdb_cursor_close(cur);
    }
    if (!mdb_cursor_open(txn, e->extents, &cur)) {
        for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            extent_val ev;
            memcpy(&ev, v.mv_data, sizeof ev);
            st->extents++;
            st->tokens += ev.count;
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
    pthread_mutex_lock(&e->seg_mu);
    for (size_t i = 0; i < e->nseg; i++)
        if (e->segtab[i].state != SEG_DEAD) {
            st->segments++;
            st->segment_bytes += e->segtab[i].bytes;
        }
    pthread_mutex_unlock(&e->seg_mu);
    st->appends = atomic_load(&e->n_appends);
    st->group_commits = atomic_load(&e->n_commits);
    st->fsyncs = atomic_load(&e->n_fsyncs);
    st->rolled_forward = e->n_rolled_forward;
    st->recovery_damaged = e->n_recovery_damaged;
    return 0;
}
