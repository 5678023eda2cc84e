/* commit.c - durable append: the group commit.
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
 * next batch seals it and creates the next one inside its own txn
 * (seg_create, seg_put in segtab.c).
 * An item lives in its submitter's stack frame: it is marked done only at
 * the batch's end under gc_mu (gc_finish_batch), its next read first.
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

#include "cluster.h"
#include "kvd_internal.h"

/* ---- group commit ------------------------------------------------------ */


static void gc_run_batch(kvd_engine *e, kvd_item *batch)
{
    MDB_txn *txn = NULL;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, 0, &txn));
    struct iovec iov[GC_BATCH_MAX];
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
        if (!it->rc && e->cluster)
            it->rc = clu_item_check(e, it);     /* one conversation's lapsed lock fails its items only */
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
        assert(it->h.seq > last_seq && niov < GC_BATCH_MAX);   /* replay order = the batch's order */
        last_seq = it->h.seq;
        (void)last_seq;
        kvarc_block_header_encode(&it->h, it->block);
        iov[niov].iov_base = it->block;
        iov[niov].iov_len = it->bytes;
        niov++;
        off += it->bytes;
    }
    kvd_err cerr = { 0, "" };
    int logged = 0;
    if (!rc && niov && e->cluster) {    /* the cluster's log first: Ceph's answer is the durability point */
        logged = 1;
        rc = clu_log_batch(e, txn, batch, &cerr);
        if (rc && !cerr.code)
            kvd_fail(&cerr, rc, "append not stored: the cluster refused it: %s", kvarc_strerror(rc));
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
        if (logged)
            clu_batch_failed(e, batch);
        for (it = batch; it; it = it->next)
            if (!it->rc && cerr.code) {
                it->rc = rc;
                it->err = cerr;
            } else if (!it->rc) {
                it->rc = rc;
                kvd_fail(&it->err, rc, "append not stored: could not %s in %s: %s (%s; retry once the "
                         "cause is fixed)", stage, e->dir, kvarc_strerror(rc),
                         logged ? "the cluster's log may hold it: a retry finds its positions held"
                                : "nothing of it was kept");
            }
    } else {
        if (logged)
            clu_batch_done(e, batch);
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
void gc_submit_n(kvd_engine *e, kvd_item *const *its, size_t n)
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
            /* lead one batch: at most GC_BATCH_MAX items from the head of the queue */
            kvd_item *batch = e->q_head, *last = batch;
            for (int k = 1; k < GC_BATCH_MAX && last->next; k++)
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
