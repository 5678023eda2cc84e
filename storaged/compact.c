/* compact.c - reclaim the space of deleted conversations.
 *
 * Design notes (state: SEALED --kvd_compact--> DEAD --last unpin--> unlinked)
 *  1. Liveness is decided in one read txn: a conversation is live if it is
 *     not deleted or if a live conversation descends from it (forks share
 *     its records). A segment's live bytes are its blocks that live
 *     conversations' extents and creation records reference.
 *  2. Victims are SEALED segments whose live ratio is under the threshold;
 *     the active (OPEN) segment is never one, so appends go on meanwhile.
 *  3. Live blocks are copied verbatim (same header, same sequence number)
 *     into a new segment file that the index does not know yet, which is
 *     fsync'ed before the index changes: a crash before the commit leaves
 *     an unknown file that kvd_open removes.
 *  4. One write txn re-points every extent and creation record that still
 *     points at a victim, purges conversations that died entirely, adds the
 *     new segment and marks the victims DEAD. Readers that resolved before
 *     the commit hold pins; a victim file is unlinked on its last unpin.
 *  5. Deletion blocks are carried forward while their conversation's
 *     creation block still exists anywhere, so a rebuild from segments
 *     never resurrects a deleted conversation.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster.h"
#include "kvd_internal.h"


typedef struct idset {
    uint64_t *v;
    size_t    n, cap;
} idset;

static int idset_has(const idset *s, uint64_t id)
{
    for (size_t i = 0; i < s->n; i++)
        if (s->v[i] == id)
            return 1;
    return 0;
}

static int idset_add(idset *s, uint64_t id)
{
    if (idset_has(s, id))
        return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 64;
        uint64_t *n = realloc(s->v, cap * sizeof *n);
        if (!n)
            return -ENOMEM;
        s->v = n;
        s->cap = cap;
    }
    s->v[s->n++] = id;
    return 0;
}

/* A block copied: where it was and where it went. */
typedef struct moved {
    uint64_t old_seg, old_off, new_off;
    kvarc_block_header h;
} moved;

/* Live conversations: not deleted, or an ancestor of one that is not. */
static int live_set(kvd_engine *e, MDB_txn *txn, idset *live)
{
    MDB_cursor *cur;
    MDB_val k, v;
    int rc = kvd_mdb_err(mdb_cursor_open(txn, e->convs, &cur));
    if (rc)
        return rc;
    for (int op = MDB_FIRST; !rc && !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
        conv_rec c;
        memcpy(&c, v.mv_data, sizeof c);
        if (c.flags & KVD_CONV_DELETED)
            continue;
        uint64_t id = key_get_u64(k.mv_data);
        for (int depth = 0; id && depth < 4096 && !rc; depth++) {
            if ((rc = idset_add(live, id)))
                break;
            conv_rec p;
            if (conv_get(e, txn, id, &p))
                break;
            id = p.parent;
        }
    }
    mdb_cursor_close(cur);
    return rc;
}

int kvd_compact(kvd_engine *e, double threshold, uint64_t *reclaimed_out, kvd_progress_fn fn,
                void *arg, kvd_err *err)
{
    if (e->check_only)
        return kvd_fail(err, -EROFS, "%s is open to be checked only: it cannot be compacted", e->dir);
    if (!(threshold >= 0.0 && threshold <= 1.0))
        return kvd_fail(err, -EINVAL, "compaction threshold %g is not in [0, 1]", threshold);
    pthread_mutex_lock(&e->compact_mu);
    atomic_fetch_add(&e->n_compactions, 1);
    idset live = { 0 }, victims = { 0 };
    moved *mv = NULL;
    size_t nmv = 0, capmv = 0;
    uint64_t *vbytes = NULL, *vlive = NULL, reclaimed = 0, out_id = 0, out_off = 0;
    int out_fd = -1, rc;
    uint8_t *buf = NULL;
    size_t bufcap = 0;
    MDB_txn *txn = NULL;
    MDB_cursor *cur;
    MDB_val k, v;

    /* 1. liveness and victims */
    pthread_mutex_lock(&e->seg_mu);
    size_t nseg = e->nseg;
    kvd_seg *segs = malloc((nseg ? nseg : 1) * sizeof *segs);
    if (segs)
        memcpy(segs, e->segtab, nseg * sizeof *segs);
    pthread_mutex_unlock(&e->seg_mu);
    vbytes = calloc(nseg ? nseg : 1, sizeof *vbytes);
    vlive = calloc(nseg ? nseg : 1, sizeof *vlive);
    if (!segs || !vbytes || !vlive) {
        rc = kvd_fail(err, -ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn))) || (rc = live_set(e, txn, &live))) {
        kvd_fail(err, rc, "compaction: reading the index failed: %s", kvarc_strerror(rc));
        goto out;
    }
    if (!mdb_cursor_open(txn, e->extents, &cur)) {
        for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            extent_val ev;
            memcpy(&ev, v.mv_data, sizeof ev);
            if (!idset_has(&live, key_get_u64(k.mv_data)))
                continue;
            for (size_t i = 0; i < nseg; i++)
                if (segs[i].id == ev.seg)
                    vlive[i] += ev.bytes;
        }
        mdb_cursor_close(cur);
    }
    for (size_t l = 0; l < live.n; l++) {
        conv_rec c;
        if (!conv_get(e, txn, live.v[l], &c))
            for (size_t i = 0; i < nseg; i++)
                if (segs[i].id == c.create_seg)
                    vlive[i] += KVARC_BLOCK_HEADER + sizeof c + means_floats(&c.shape) * sizeof(float);
    }
    mdb_txn_abort(txn);
    txn = NULL;
    uint64_t total = 0;
    for (size_t i = 0; i < nseg; i++)
        if (segs[i].state == SEG_SEALED && segs[i].bytes &&
            (double)vlive[i] < threshold * (double)segs[i].bytes) {
            if ((rc = idset_add(&victims, segs[i].id))) {
                kvd_fail(err, rc, "out of memory");
                goto out;
            }
            vbytes[i] = segs[i].bytes;
            total += segs[i].bytes;
        }
    if (!victims.n) {
        rc = 0;
        goto out;
    }

    /* 2. the output segment (known to the index only at step 4) */
    if ((rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, 0, &txn)))) {
        kvd_fail(err, rc, "compaction: index write failed: %s", kvarc_strerror(rc));
        goto out;
    }
    out_fd = seg_create(e, txn, &out_id, SEG_SEALED);
    if (out_fd < 0) {
        rc = kvd_fail(err, out_fd, "compaction: cannot create a segment: %s", kvarc_strerror(out_fd));
        goto out;
    }
    /* the entry is re-put at step 4; this txn only reserves the id */
    uint8_t okb[8];
    key_u64(okb, out_id);
    MDB_val ok = { 8, okb };
    mdb_del(txn, e->segs, &ok, NULL);
    if ((rc = kvd_mdb_err(mdb_txn_commit(txn)))) {
        txn = NULL;
        kvd_fail(err, rc, "compaction: index commit failed: %s", kvarc_strerror(rc));
        goto out;
    }
    txn = NULL;

    /* 3. copy live blocks */
    if ((rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn))))
        goto out;
    uint64_t done = 0;
    for (size_t vi = 0; vi < victims.n && !rc; vi++) {
        uint64_t sid = victims.v[vi], limit = 0;
        for (size_t i = 0; i < nseg; i++)
            if (segs[i].id == sid)
                limit = segs[i].bytes;
        int fd = seg_pin(e, sid);
        if (fd < 0) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "compaction: segment %016llx vanished", (unsigned long long)sid);
            break;
        }
        for (uint64_t off = 0; off + KVARC_BLOCK_HEADER <= limit && !rc;) {
            uint8_t hb[KVARC_BLOCK_HEADER];
            kvarc_block_header h;
            if ((rc = seg_pread_full(fd, hb, sizeof hb, off)) || (rc = kvarc_block_header_decode(hb, &h))) {
                kvd_fail(err, rc, "compaction: segment %016llx offset %llu has no valid block (%s); run "
                         "`kvarc verify`", (unsigned long long)sid, (unsigned long long)off, kvarc_strerror(rc));
                break;
            }
            size_t bytes = KVARC_BLOCK_HEADER + (size_t)h.payload_bytes;
            int keep = 0;
            conv_rec c;
            int have = conv_get(e, txn, h.conv, &c) == 0;
            if (h.kind == KVARC_BLOCK_DATA) {
                uint8_t kb[20];
                extent_key(kb, h.conv, h.layer, h.first_pos);
                MDB_val ek = { 20, kb }, evv;
                extent_val ev;
                if (idset_has(&live, h.conv) && !mdb_get(txn, e->extents, &ek, &evv)) {
                    memcpy(&ev, evv.mv_data, sizeof ev);
                    keep = ev.seg == sid && ev.off == off;
                }
            } else if (h.kind == KVARC_BLOCK_CONV_CREATE) {
                keep = have && idset_has(&live, h.conv) && c.create_seg == sid && c.create_off == off;
            } else {
                /* a deletion stays while its creation block survives elsewhere */
                keep = have && !idset_has(&live, h.conv) && !idset_has(&victims, c.create_seg);
            }
            if (keep) {
                if (bytes > bufcap) {
                    uint8_t *n = realloc(buf, bytes);
                    if (!n) {
                        rc = kvd_fail(err, -ENOMEM, "out of memory");
                        break;
                    }
                    buf = n;
                    bufcap = bytes;
                }
                struct iovec iov = { buf, bytes };
                if ((rc = seg_pread_full(fd, buf, bytes, off)) || (rc = seg_pwritev(out_fd, &iov, 1, out_off))) {
                    kvd_fail(err, rc, "compaction: copying a block failed: %s", kvarc_strerror(rc));
                    break;
                }
                if (nmv == capmv) {
                    size_t cap = capmv ? 2 * capmv : 256;
                    moved *n = realloc(mv, cap * sizeof *n);
                    if (!n) {
                        rc = kvd_fail(err, -ENOMEM, "out of memory");
                        break;
                    }
                    mv = n;
                    capmv = cap;
                }
                mv[nmv++] = (moved){ sid, off, out_off, h };
                out_off += bytes;
            }
            off += bytes;
            done += bytes;
            if (fn && fn(arg, done, total)) {
                rc = kvd_fail(err, -ECANCELED, "compaction stopped before switching the index: nothing changed");
                break;
            }
        }
        seg_unpin(e, sid);
    }
    mdb_txn_abort(txn);
    txn = NULL;
    if (rc)
        goto out;
    if ((rc = seg_sync(out_fd))) {
        kvd_fail(err, rc, "compaction: fdatasync of the new segment failed: %s", kvarc_strerror(rc));
        goto out;
    }

    /* 4. switch the index over in one txn */
    if ((rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, 0, &txn))))
        goto out;
    for (size_t i = 0; i < nmv && !rc; i++) {
        kvarc_block_header *h = &mv[i].h;
        if (h->kind == KVARC_BLOCK_DATA) {
            uint8_t kb[20];
            extent_key(kb, h->conv, h->layer, h->first_pos);
            MDB_val ek = { 20, kb }, evv;
            extent_val ev;
            if (mdb_get(txn, e->extents, &ek, &evv))
                continue;
            memcpy(&ev, evv.mv_data, sizeof ev);
            if (ev.seg != mv[i].old_seg || ev.off != mv[i].old_off)
                continue;
            ev.seg = out_id;
            ev.off = mv[i].new_off;
            MDB_val nv = { sizeof ev, &ev };
            rc = kvd_mdb_err(mdb_put(txn, e->extents, &ek, &nv, 0));
        } else if (h->kind == KVARC_BLOCK_CONV_CREATE) {
            conv_rec c;
            if (conv_get(e, txn, h->conv, &c) || c.create_seg != mv[i].old_seg || c.create_off != mv[i].old_off)
                continue;
            c.create_seg = out_id;
            c.create_off = mv[i].new_off;
            uint8_t kb[8];
            key_u64(kb, h->conv);
            MDB_val ck = { 8, kb }, cv = { sizeof c, &c };
            rc = kvd_mdb_err(mdb_put(txn, e->convs, &ck, &cv, 0));
        }
    }
    /* extents left pointing at victims belong to dead conversations: drop
     * them; dead conversations whose creation block went are purged */
    if (!rc && !(rc = kvd_mdb_err(mdb_cursor_open(txn, e->extents, &cur)))) {
        for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            extent_val ev;
            memcpy(&ev, v.mv_data, sizeof ev);
            if (idset_has(&victims, ev.seg))
                mdb_cursor_del(cur, 0);
        }
        mdb_cursor_close(cur);
    }
    if (!rc && !(rc = kvd_mdb_err(mdb_cursor_open(txn, e->convs, &cur)))) {
        for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            conv_rec c;
            memcpy(&c, v.mv_data, sizeof c);
            uint64_t id = key_get_u64(k.mv_data);
            if (!(c.flags & KVD_CONV_DELETED) || idset_has(&live, id) || !idset_has(&victims, c.create_seg))
                continue;
            uint8_t kb[8], lk[12];
            key_u64(kb, id);
            MDB_val mk = { 8, kb };
            mdb_del(txn, e->means, &mk, NULL);
            for (uint32_t l = 0; l < c.shape.n_layers; l++) {
                layer_key(lk, id, l);
                MDB_val lkv = { 12, lk };
                mdb_del(txn, e->layers, &lkv, NULL);
            }
            mdb_cursor_del(cur, 0);
        }
        mdb_cursor_close(cur);
    }
    /* any extent of a purged conversation in another segment goes too */
    if (!rc && !(rc = kvd_mdb_err(mdb_cursor_open(txn, e->extents, &cur)))) {
        for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            conv_rec c;
            if (conv_get(e, txn, key_get_u64(k.mv_data), &c) == -ENOENT)
                mdb_cursor_del(cur, 0);
        }
        mdb_cursor_close(cur);
    }
    for (size_t i = 0; i < victims.n && !rc; i++) {
        uint8_t kb[8];
        key_u64(kb, victims.v[i]);
        seg_val sv = { .state = SEG_DEAD };
        for (size_t j = 0; j < nseg; j++)
            if (segs[j].id == victims.v[i])
                sv.bytes = segs[j].bytes;
        MDB_val sk = { 8, kb }, svv = { sizeof sv, &sv };
        rc = kvd_mdb_err(mdb_put(txn, e->segs, &sk, &svv, 0));
    }
    if (!rc) {
        seg_val sv = { .state = SEG_SEALED, .bytes = out_off };
        MDB_val svv = { sizeof sv, &sv };
        rc = kvd_mdb_err(mdb_put(txn, e->segs, &ok, &svv, 0));
    }
    /* readers may resolve into the new segment once the txn commits: it
     * goes into the table first */
    if (!rc && !(rc = segtab_add(e, out_id, out_fd, SEG_SEALED, out_off))) {
        rc = kvd_mdb_err(mdb_txn_commit(txn));
        txn = NULL;
        if (rc)
            segtab_remove(e, out_id);
        else
            out_fd = -1;
    }
    if (rc) {
        kvd_fail(err, rc, "compaction: index update failed: %s (nothing changed)", kvarc_strerror(rc));
        goto out;
    }
    for (size_t i = 0; i < victims.n; i++)
        seg_mark_dead(e, victims.v[i]);
    reclaimed = total > out_off ? total - out_off : 0;
out:
    if (txn)
        mdb_txn_abort(txn);
    if (out_fd >= 0) {                       /* failed: the new file goes */
        char p[PATH_MAX];
        seg_path(e->dir, out_id, p, sizeof p);
        close(out_fd);
        unlink(p);
    }
    if (!rc && e->cluster) {    /* and the pool: what no conversation needs any more */
        uint64_t objs = 0, pool_bytes = 0;
        rc = clu_compact(e, 0, &objs, &pool_bytes, err);
        reclaimed += pool_bytes;
    }
    if (reclaimed_out)
        *reclaimed_out = reclaimed;
    free(segs);
    free(vbytes);
    free(vlive);
    free(live.v);
    free(victims.v);
    free(mv);
    free(buf);
    pthread_mutex_unlock(&e->compact_mu);
    return rc;
}
