/* cluster.c - the RADOS backend: conversations' logs in a Ceph pool
 * (issue 19), the data directory a cache of them.
 *
 * Design notes
 *
 * A kvarcd started with --rados-pool keeps everything it has always kept
 * (LMDB index, segment files, read through io_uring), but as a cache: the
 * record is the pool, and any kvarcd on any host using the same pool
 * serves any conversation in it. Replication, placement, recovery and
 * atomic per-object operations are Ceph's; kvarc adds no consensus.
 *
 * Objects in the pool (names are ASCII; ids 16 hex digits):
 *   kvarc.ids                 xattr "next": the next conversation id,
 *                             taken by a cmpxattr/setxattr loop
 *   kvarc.name.NS/NAME        xattr "id": the conversation the name is
 *                             bound to; made by an exclusive create
 *   kvarc.conv.ID             the head: the writer lock ("writer",
 *                             exclusive, with a duration); xattr "kvarc"
 *                             marks a head a create made
 *   kvarc.seg.ID.K            the log, K = 0, 1, ... (8 hex): block bytes
 *                             exactly as a segment file holds them
 *                             (self-describing, CRC'd), and in omap the
 *                             log's entries, key SEQ (16 hex, from 1, no
 *                             gaps across segments) -> (offset, bytes) of
 *                             one batch of blocks in this object; xattrs
 *                             "state" ("open EPOCH" for the one writer
 *                             appending to it, then "sealed") and "last"
 *                             (its last SEQ)
 *
 * Append (commit.c's batch -> clu_log_batch, after the index prepare and
 * before the local write): ONE operation per conversation of the batch,
 * all in flight together, on its writer's segment: {cmpxattr(state ==
 * "open EPOCH"), cmpxattr(last == SEQ0), setxattr(last = SEQ0 + 1),
 * write(blocks at the segment's end), omap_set(SEQ0 + 1 -> extent)}. Ceph
 * applies it whole or not at all and answers once every replica has it:
 * a block is in the log only once durable. An operation of a writer whose
 * segment was sealed (a takeover) fails, and no entry is ever written
 * over, even by an operation that timed out here and landed later (the
 * compare on "last" fails; the conversation is marked stale, and before
 * its next append this kvarcd seals its segment, syncs and starts a new
 * one: only a new epoch clears stale, never a read-side sync). Then the local commit; the client hears of success after both.
 * A batch that fails after some logs advanced marks those conversations
 * stale, and a retried append finds its positions held (as after a crash
 * between a local segment's fdatasync and its index commit). Past
 * object_bytes the writer seals its segment and makes the next
 * (exclusively: EEXIST means it was taken over).
 *
 * Writer lock and epochs (clu_writer_begin, start_epoch): the lock is
 * rados_lock_exclusive on the head with a duration; it decides who may
 * start an epoch. Starting one: seal the last segment (an earlier
 * writer's operations on it fail from then on), sync the log to its end
 * (what landed before the seal included), make segment K+1 "open EPOCH"
 * exclusively (if another writer made it first, seal and sync that too,
 * and go on). Fencing is the seal, not the lock: a writer whose lock
 * lapsed but was not taken over loses nothing. A head without "kvarc" was
 * made by the lock itself (its conversation's log was collected): it is
 * removed again, -ENOENT. Refused (another holder): KVARC_ELOCKED with the
 * holder's description (its node name, pid) and address. A thread renews
 * every lock used within the last duration, every duration/3, with
 * MUST_RENEW (a lapsed lock is never silently retaken: it is taken again
 * only through a new epoch), and releases the others: a kvarcd that
 * stopped writing a conversation lets another take it within one duration
 * and a third; a killed one within one duration.
 *
 * Sync (sync_locked): segment after segment from the cache's watermark
 * (its last SEQ and segment: the index's meta counters "clog.ID" and
 * "cseg.ID", advanced in the same transaction as the writer's own commits
 * and after each replayed entry), each entry's bytes read and their blocks
 * checked (header and payload CRCs: a damaged block stops the sync with
 * KVARC_ECORRUPT, nothing wrong is served) and replayed into the cache
 * through the group commit (prepare_ingest: replay.c's replay_block,
 * idempotent). Segment K+1 existing means K is final: K is read once more,
 * then K+1. A fork's parent is synced after the fork. Readers sync a
 * conversation when it is opened by name (kvd_conv_open: attach, Open,
 * Stat by name, fork's source, export); what another host appends
 * afterwards is seen at the next open.
 *
 * Names: create = an id from kvarc.ids, the new head locked and marked,
 * segment 0 started, an exclusive create of the name object (so that a
 * create in progress is seen locked, never dead), then the CONV_CREATE
 * block logged like any other; a create that fails before its first entry
 * seals segment 0 if its "last" is still 0 (one compare-and-set: a late
 * CONV_CREATE then fails), then unbinds the name and releases the lock. A
 * name bound to a conversation whose log is deleted (or was never written:
 * a create that died, fenced the same way) is rebound with a cmpxattr on
 * the old id. Delete =
 * the CONV_DELETE block logged, then the name object removed.
 *
 * Collection (clu_compact, from kvarc compact): a deleted conversation no
 * live one descends from, whose head is unchanged for the grace: its head
 * locked by the collector, its segments removed, then the head in the
 * operation that asserts that lock (never while a writer holds it).
 * Not done yet (issue 19's note): a bound on the cache (each conversation
 * opened here is held whole in the data directory).
 */
#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <pthread.h>
#include <rados/librados.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "cluster.h"

#define LOCK_NAME "writer"

typedef struct cconv cconv;
struct cconv {
    uint64_t id;
    pthread_mutex_t wmu;    /* one sync or lock taking of this conversation at a time */
    /* under kvd_cluster.mu: */
    uint64_t seq;           /* the last log entry the cache holds */
    uint64_t log_seq;       /* the last entry known to be in the log (>= seq) */
    uint64_t pending;       /* log_seq after this batch, the cache's once it commits */
    uint64_t pending_seg;   /* the segment it is in */
    int      loaded;        /* seq read from the index */
    int      locked;        /* this kvarcd holds the writer lock */
    int      stale;         /* a failed batch may have left log entries the cache lacks */
    uint64_t rseg;          /* the segment object the cache's last entry is in */
    uint64_t epoch;         /* this writer's, in its segment's state */
    uint64_t wseg, woff;    /* where this writer's next bytes go */
    int64_t  last_write_ns; /* the last writer_begin */
    cconv   *next;
};

typedef struct kvd_cluster kvd_cluster;
struct kvd_cluster {
    rados_t       rados;
    rados_ioctx_t io;
    char          cookie[96], desc[160];
    unsigned      lock_s, gc_grace_s, op_timeout_s;
    uint64_t      object_bytes;
    pthread_mutex_t mu;     /* the table below and every cconv's fields marked so */
    cconv        *tab[256];
    pthread_t     renewer;
    pthread_cond_t cv;
    int           stop, have_renewer;
};

typedef struct log_ext {    /* an omap value, little-endian: where in its segment */
    uint64_t off, bytes;
} log_ext;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void head_oid(char *b, size_t n, uint64_t id)
{
    snprintf(b, n, "kvarc.conv.%016" PRIx64, id);
}

static void seg_oid(char *b, size_t n, uint64_t id, uint64_t k)
{
    snprintf(b, n, "kvarc.seg.%016" PRIx64 ".%08" PRIx64, id, k);
}

static void name_oid(char *b, size_t n, const char *ns, const char *name)
{
    snprintf(b, n, "kvarc.name.%s/%s", ns, name);
}

/* A RADOS error in err: what, on which object, and the pool. */
static int rfail(kvd_err *err, int rc, const char *what, const char *oid)
{
    if (rc == -ETIMEDOUT)
        return kvd_fail(err, rc, "the Ceph cluster did not answer in time: %s (%s)", what, oid);
    return kvd_fail(err, rc < 0 ? rc : -EIO, "Ceph: %s (%s): %s", what, oid, strerror(rc < 0 ? -rc : EIO));
}

/* Room for element n of the array at *(T **)pv (*cap of elem bytes),
 * doubling: 0, or -ENOMEM with the array unchanged. */
static int grow(void *pv, size_t n, size_t *cap, size_t elem)
{
    if (n < *cap)
        return 0;
    size_t nc = *cap ? 2 * *cap : 64;
    void *p, *m;
    memcpy(&p, pv, sizeof p);
    if (!(m = realloc(p, nc * elem)))
        return -ENOMEM;
    memcpy(pv, &m, sizeof m);
    *cap = nc;
    return 0;
}

/* ---- the table of conversations this kvarcd has touched ----------------- */

static cconv *cconv_get(kvd_engine *e, uint64_t id)
{
    kvd_cluster *c = e->cluster;
    pthread_mutex_lock(&c->mu);
    cconv **slot = &c->tab[id & 255], *x;
    for (x = *slot; x && x->id != id; x = x->next)
        ;
    if (!x && (x = calloc(1, sizeof *x))) {
        x->id = id;
        pthread_mutex_init(&x->wmu, NULL);
        x->next = *slot;
        *slot = x;
    }
    int loaded = x ? x->loaded : 1;
    pthread_mutex_unlock(&c->mu);
    if (!loaded) {              /* the watermark the cache has (0: none) */
        char name[40], sname[40];
        uint64_t seq = 0, seg = 0;
        MDB_txn *txn;
        snprintf(name, sizeof name, "clog.%016" PRIx64, id);
        snprintf(sname, sizeof sname, "cseg.%016" PRIx64, id);
        if (mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn) == 0) {
            (void)meta_get(e, txn, name, 0, &seq);
            (void)meta_get(e, txn, sname, 0, &seg);
            mdb_txn_abort(txn);
        }
        pthread_mutex_lock(&c->mu);
        if (!x->loaded) {
            x->seq = x->log_seq = seq;
            x->rseg = seg;
            x->loaded = 1;
        }
        pthread_mutex_unlock(&c->mu);
    }
    return x;
}

static int watermark_put(kvd_engine *e, MDB_txn *txn, uint64_t id, uint64_t seq, uint64_t seg)
{
    char name[40], sname[40];
    snprintf(name, sizeof name, "clog.%016" PRIx64, id);
    snprintf(sname, sizeof sname, "cseg.%016" PRIx64, id);
    int rc = meta_put(e, txn, name, seq);
    return rc ? rc : meta_put(e, txn, sname, seg);
}

/* ---- connection ------------------------------------------------------------- */

static void *renew_main(void *arg);

int clu_open(kvd_engine *e, const kvd_cluster_options *o, kvd_err *err)
{
    if (!o->pool || !o->pool[0])
        return kvd_fail(err, -EINVAL, "--rados-pool: no pool named");
    kvd_cluster *c = calloc(1, sizeof *c);
    if (!c)
        return kvd_fail(err, -ENOMEM, "out of memory");
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    c->lock_s = o->lock_seconds ? o->lock_seconds : 30;
    c->object_bytes = o->object_bytes ? o->object_bytes : 64u << 20;
    c->gc_grace_s = o->gc_grace_s ? o->gc_grace_s : 3600;
    unsigned tmo = o->op_timeout ? o->op_timeout : 30;
    c->op_timeout_s = tmo;
    char host[64] = "", tbuf[16];
    if (o->node && o->node[0])
        snprintf(host, sizeof host, "%s", o->node);
    else if (gethostname(host, sizeof host - 1))
        snprintf(host, sizeof host, "unknown-host");
    uint64_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, 0) != sizeof rnd)
        rnd = (uint64_t)now_ns() ^ (uint64_t)getpid() << 32;
    snprintf(c->cookie, sizeof c->cookie, "%.40s.%d.%016" PRIx64, host, (int)getpid(), rnd);
    snprintf(c->desc, sizeof c->desc, "kvarcd on %.60s, pid %d", host, (int)getpid());
    snprintf(tbuf, sizeof tbuf, "%u", tmo);
    int rc = rados_create(&c->rados, o->user && o->user[0] ? o->user : NULL);
    const char *stage = "create a client";
    if (!rc) {
        stage = "read the configuration";
        rc = rados_conf_read_file(c->rados, o->conf && o->conf[0] ? o->conf : NULL);
    }
    if (!rc && o->keyring && o->keyring[0]) {
        stage = "set the keyring";
        rc = rados_conf_set(c->rados, "keyring", o->keyring);
    }
    if (!rc)            /* no admin socket: every kvarcd of one cephx user would want the same path */
        (void)rados_conf_set(c->rados, "admin_socket", "");
    if (!rc) {          /* a client waits forever by default */
        stage = "set the timeouts";
        rc = rados_conf_set(c->rados, "rados_osd_op_timeout", tbuf);
        if (!rc)
            rc = rados_conf_set(c->rados, "rados_mon_op_timeout", tbuf);
        if (!rc)
            rc = rados_conf_set(c->rados, "client_mount_timeout", tbuf);
    }
    if (!rc) {
        stage = "connect";
        rc = rados_connect(c->rados);
    }
    if (!rc) {
        stage = "open the pool";
        rc = rados_ioctx_create(c->rados, o->pool, &c->io);
    }
    if (rc) {
        kvd_fail(err, rc, "Ceph: cannot %s (pool '%s', conf %s, user %s): %s", stage, o->pool,
                 o->conf ? o->conf : "(default)", o->user ? o->user : "admin", strerror(-rc));
        if (c->rados)
            rados_shutdown(c->rados);
        free(c);
        return rc;
    }
    e->cluster = c;
    if (pthread_create(&c->renewer, NULL, renew_main, e) == 0)
        c->have_renewer = 1;
    else {
        clu_close(e);
        return kvd_fail(err, -EAGAIN, "cannot start the lock renewal thread");
    }
    return 0;
}

void clu_close(kvd_engine *e)
{
    kvd_cluster *c = e->cluster;
    if (!c)
        return;
    if (c->have_renewer) {
        pthread_mutex_lock(&c->mu);
        c->stop = 1;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
        pthread_join(c->renewer, NULL);
    }
    for (int b = 0; b < 256; b++)
        for (cconv *x = c->tab[b], *n; x; x = n) {
            n = x->next;
            if (x->locked) {
                char oid[64];
                head_oid(oid, sizeof oid, x->id);
                rados_unlock(c->io, oid, LOCK_NAME, c->cookie);
            }
            pthread_mutex_destroy(&x->wmu);
            free(x);
        }
    rados_ioctx_destroy(c->io);
    rados_shutdown(c->rados);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c);
    e->cluster = NULL;
}

/* Renew the locks in use, release the idle ones, every lock_s / 3. */
static void *renew_main(void *arg)
{
    kvd_engine *e = arg;
    kvd_cluster *c = e->cluster;
    int64_t period = (int64_t)c->lock_s * 1000000000 / 3;
    pthread_mutex_lock(&c->mu);
    while (!c->stop) {
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        int64_t t = (int64_t)dl.tv_sec * 1000000000 + dl.tv_nsec + period;
        dl.tv_sec = t / 1000000000;
        dl.tv_nsec = t % 1000000000;
        pthread_cond_timedwait(&c->cv, &c->mu, &dl);
        if (c->stop)
            break;
        for (int b = 0; b < 256; b++)
            for (cconv *x = c->tab[b]; x; x = x->next) {
                if (!x->locked)
                    continue;
                int idle = now_ns() - x->last_write_ns > (int64_t)c->lock_s * 1000000000;
                uint64_t id = x->id;
                pthread_mutex_unlock(&c->mu);
                /* no sync or lock taking of it runs meanwhile; skip it if one does */
                if (pthread_mutex_trylock(&x->wmu) == 0) {
                    /* again (an append may have come meanwhile), and released at
                     * once: an append now takes the slow path and waits on wmu */
                    pthread_mutex_lock(&c->mu);
                    idle = x->locked && now_ns() - x->last_write_ns > (int64_t)c->lock_s * 1000000000;
                    if (idle)
                        x->locked = 0;
                    pthread_mutex_unlock(&c->mu);
                    char oid[64];
                    head_oid(oid, sizeof oid, id);
                    struct timeval d = { (time_t)c->lock_s, 0 };
                    int r = idle ? rados_unlock(c->io, oid, LOCK_NAME, c->cookie)
                                 : rados_lock_exclusive(c->io, oid, LOCK_NAME, c->cookie, c->desc, &d,
                                                        LIBRADOS_LOCK_FLAG_MUST_RENEW);
                    pthread_mutex_lock(&c->mu);
                    if (idle || (r < 0 && r != -EEXIST))
                        x->locked = 0;      /* released, or lapsed: taken again only by a sync */
                    pthread_mutex_unlock(&c->mu);
                    pthread_mutex_unlock(&x->wmu);
                }
                pthread_mutex_lock(&c->mu);
            }
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* ---- sync: the log into the cache ------------------------------------------ */

static int prepare_ingest(kvd_engine *e, MDB_txn *txn, kvd_item *it, uint64_t seg, uint64_t off)
{
    int rc = replay_block(e, txn, &it->h, it->block, seg, off, &it->err);
    if (rc == 1)
        return 0;
    if (rc == 0) {              /* the cache has it already: nothing to write */
        kvd_fail(&it->err, -EALREADY, "already in the cache");
        return -EALREADY;
    }
    return rc;
}

/* The block at byte p of an extent (n bytes) of conversation id: 0 (h
 * set), 1 damaged (*what names the part that failed), 2 a block of
 * another conversation (h set). */
static int extent_block(const uint8_t *buf, size_t n, size_t p, uint64_t id, kvarc_block_header *h,
                        const char **what)
{
    *what = "a block header";
    if (n - p < KVARC_BLOCK_HEADER || kvarc_block_header_decode(buf + p, h) ||
        h->payload_bytes > n - p - KVARC_BLOCK_HEADER || block_check_payload(h, buf + p, what, NULL))
        return 1;
    return h->conv != id ? 2 : 0;
}

/* Replay the blocks of buf (one log extent of conversation id) into the cache. */
static int ingest_extent(kvd_engine *e, uint64_t id, uint64_t seq, uint8_t *buf, size_t n, kvd_err *err)
{
    size_t cap = 0, cnt = 0;
    kvd_item *items = NULL;
    int rc = 0;
    for (size_t p = 0; p < n && !rc;) {
        kvarc_block_header h;
        const char *what;
        int bad = extent_block(buf, n, p, id, &h, &what);
        if (bad == 1) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "conversation %" PRIu64 "'s log entry %" PRIu64
                          " is damaged at byte %zu of %zu: %s fails its check", id, seq, p, n, what);
            break;
        }
        if (bad == 2) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "conversation %" PRIu64 "'s log entry %" PRIu64
                          " holds a block of conversation %" PRIu64, id, seq, (uint64_t)h.conv);
            break;
        }
        if (grow(&items, cnt, &cap, sizeof *items)) {
            rc = kvd_fail(err, -ENOMEM, "out of memory");
            break;
        }
        memset(&items[cnt], 0, sizeof items[cnt]);
        items[cnt].h = h;
        items[cnt].block = buf + p;
        items[cnt].bytes = KVARC_BLOCK_HEADER + (size_t)h.payload_bytes;
        items[cnt].prepare = prepare_ingest;
        items[cnt].ingest = 1;
        cnt++;
        p += KVARC_BLOCK_HEADER + (size_t)h.payload_bytes;
    }
    if (!rc && cnt) {
        kvd_item **q = malloc(cnt * sizeof *q);
        if (!q)
            rc = kvd_fail(err, -ENOMEM, "out of memory");
        for (size_t i = 0; q && i < cnt; i++)
            q[i] = &items[i];
        if (q)
            gc_submit_n(e, q, cnt);
        free(q);
        for (size_t i = 0; !rc && i < cnt; i++)
            if (items[i].rc && items[i].rc != -EALREADY) {
                rc = items[i].rc;
                kvd_fail(err, rc, "replaying conversation %" PRIu64 "'s log entry %" PRIu64 " into the "
                         "cache: %s", id, seq, items[i].err.msg);
            }
    }
    free(items);
    return rc;
}

static int read_all(kvd_cluster *c, const char *oid, uint8_t *buf, size_t n, uint64_t off)
{
    size_t got = 0;
    while (got < n) {
        size_t want = n - got > (16u << 20) ? 16u << 20 : n - got;
        int r = rados_read(c->io, oid, (char *)buf + got, want, off + got);
        if (r < 0)
            return r;
        if (r == 0)
            return KVARC_ECORRUPT;      /* the log names bytes the object lacks */
        got += (size_t)r;
    }
    return 0;
}

/* The entries of conversation id's segment k after *seq, each one more
 * than the last, into *refs (malloc'ed; *seq advanced to the last read).
 * -ENOENT (no segment k); KVARC_ECORRUPT, a malformed entry or a gap (err
 * says which); -ENOMEM, or a RADOS error. *refs is NULL on any error. */
static int seg_entries(kvd_cluster *c, uint64_t id, uint64_t k, uint64_t *seq, log_ext **refs, size_t *nrefs,
                       kvd_err *err)
{
    char oid[64], after[17];
    seg_oid(oid, sizeof oid, id, k);
    size_t cap = 0;
    *refs = NULL;
    *nrefs = 0;
    for (;;) {
        snprintf(after, sizeof after, "%016" PRIx64, *seq);
        rados_read_op_t op = rados_create_read_op();
        rados_omap_iter_t iter = NULL;
        unsigned char more = 0;
        int prval = 0, n = 0;
        rados_read_op_omap_get_vals2(op, after, "", 256, &iter, &more, &prval);
        int r = rados_read_op_operate(op, c->io, oid, 0);
        if (!r)
            r = prval;
        char *key, *val;
        size_t kl, vl;
        while (!r && rados_omap_get_next2(iter, &key, &val, &kl, &vl) == 0 && key) {
            log_ext x;
            char kb[17];
            uint64_t q = 0;
            memcpy(kb, key, kl < 16 ? kl : 16);
            kb[kl < 16 ? kl : 16] = 0;
            if (vl != sizeof x || kl != 16 || sscanf(kb, "%" SCNx64, &q) != 1 || q != *seq + 1) {
                r = KVARC_ECORRUPT;     /* malformed, or a gap */
                break;
            }
            memcpy(&x, val, sizeof x);
            if (grow(refs, *nrefs, &cap, sizeof **refs)) {
                r = -ENOMEM;
                break;
            }
            (*refs)[(*nrefs)++] = x;
            *seq = q;
            n++;
        }
        if (iter)
            rados_omap_get_end(iter);
        rados_release_read_op(op);
        if (r) {
            free(*refs);
            *refs = NULL;
            *nrefs = 0;
        }
        if (r == -ENOENT)
            return -ENOENT;
        if (r == KVARC_ECORRUPT)
            return kvd_fail(err, r, "%s: log entry %" PRIu64 " is malformed or missing", oid, *seq + 1);
        if (r)
            return r == -ENOMEM ? kvd_fail(err, r, "out of memory") : rfail(err, r, "reading a log", oid);
        if (!more || n == 0)
            return 0;
    }
}

/* The bytes entry ext of segment oid names, into *buf (malloc'ed): 0,
 * KVARC_ECORRUPT (it names over 2 GiB, or bytes the segment lacks),
 * -ENOMEM, or a RADOS error. */
static int read_extent(kvd_cluster *c, const char *oid, const log_ext *ext, uint8_t **buf)
{
    if (ext->bytes > (1ull << 31))
        return KVARC_ECORRUPT;
    if (!(*buf = malloc(ext->bytes ? ext->bytes : 1)))
        return -ENOMEM;
    int r = read_all(c, oid, *buf, ext->bytes, ext->off);
    if (r) {
        free(*buf);
        *buf = NULL;
    }
    return r;
}

/* Entries of segment k after *seq into the cache, *seq and the cache's
 * position advanced after each. -ENOENT: no such segment. */
static int sync_segment(kvd_engine *e, cconv *x, uint64_t k, uint64_t *seq, kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    char oid[64];
    seg_oid(oid, sizeof oid, x->id, k);
    log_ext *refs;
    size_t nrefs;
    uint64_t last = *seq;
    int rc = seg_entries(c, x->id, k, &last, &refs, &nrefs, err);
    for (size_t i = 0; !rc && i < nrefs; i++) {
        uint64_t q = *seq + 1;
        uint8_t *buf;
        int r = read_extent(c, oid, &refs[i], &buf);
        if (r) {
            rc = r == KVARC_ECORRUPT ? kvd_fail(err, r, "%s: log entry %" PRIu64 " names %" PRIu64 " bytes at %"
                                                PRIu64 " the segment does not hold", oid, q, refs[i].bytes,
                                                refs[i].off)
               : r == -ENOMEM ? kvd_fail(err, r, "out of memory")
                              : rfail(err, r, "reading a log extent", oid);
            break;
        }
        rc = ingest_extent(e, x->id, q, buf, refs[i].bytes, err);
        free(buf);
        if (rc)
            break;
        MDB_txn *txn;       /* the watermark: replay is idempotent if it lags */
        if (!(rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, 0, &txn)))) {
            if ((rc = watermark_put(e, txn, x->id, q, k)))
                mdb_txn_abort(txn);
            else
                rc = kvd_mdb_err(mdb_txn_commit(txn));
        }
        if (rc) {
            kvd_fail(err, rc, "storing the cache's log position: %s", kvarc_strerror(rc));
            break;
        }
        *seq = q;
        pthread_mutex_lock(&c->mu);
        x->seq = q;
        x->rseg = k;
        if (x->log_seq < q)
            x->log_seq = q;
        pthread_mutex_unlock(&c->mu);
    }
    free(refs);
    return rc;
}

/* Every entry after x->seq into the cache, segment after segment (x->wmu
 * held); x->rseg ends at the last segment there is. -ENOENT: the pool has
 * no log for it (no segment 0). */
static int sync_locked(kvd_engine *e, cconv *x, kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    pthread_mutex_lock(&c->mu);
    uint64_t seq = x->seq, k = x->rseg;
    pthread_mutex_unlock(&c->mu);
    for (;;) {
        int rc = sync_segment(e, x, k, &seq, err);
        if (rc == -ENOENT)      /* no segment 0, or the one the cache's position names: collected */
            return kvd_fail(err, -ENOENT, "conversation %" PRIu64 " has no log in the cluster%s", x->id,
                            k == 0 && seq == 0 ? "" : " any more (collected after its delete)");
        if (rc)
            return rc;
        /* the end of segment k; a next one means k is final: what k got
         * before it was made is read once more, then on */
        char next[64];
        uint64_t sz;
        time_t mt;
        seg_oid(next, sizeof next, x->id, k + 1);
        int r = rados_stat(c->io, next, &sz, &mt);
        if (r == -ENOENT)
            return 0;
        if (r)
            return rfail(err, r, "looking for a conversation's next segment", next);
        if ((rc = sync_segment(e, x, k, &seq, err)))
            return rc == -ENOENT ? kvd_fail(err, KVARC_ECORRUPT, "a segment of conversation %" PRIu64
                                            " vanished", x->id) : rc;
        k++;
        pthread_mutex_lock(&c->mu);
        x->rseg = k;
        pthread_mutex_unlock(&c->mu);
    }
}
/* Conversation id alone (not its ancestors) up to its log; -ENOENT: the
 * pool has no log for it. */
static int sync_one(kvd_engine *e, uint64_t id, kvd_err *err)
{
    cconv *x = cconv_get(e, id);
    if (!x)
        return kvd_fail(err, -ENOMEM, "out of memory");
    pthread_mutex_lock(&x->wmu);
    pthread_mutex_lock(&e->cluster->mu);
    int current = x->locked && !x->stale;     /* the writer's cache is the log */
    pthread_mutex_unlock(&e->cluster->mu);
    /* a stale writer stays stale: only start_epoch (a sealed segment, a new
     * one, a fresh offset) makes its appends safe again */
    int rc = current ? 0 : sync_locked(e, x, err);
    pthread_mutex_unlock(&x->wmu);
    return rc;
}

int clu_sync_id(kvd_engine *e, uint64_t id, kvd_err *err)
{
    for (int depth = 0; id && depth < 1024; depth++) {    /* the conversation, then its ancestors */
        int rc = sync_one(e, id, err);
        if (rc)
            return rc;
        conv_rec r;
        rc = conv_read(e, id, &r, err);
        if (rc && rc != -ENOENT)
            return rc;
        id = rc ? 0 : r.parent;
    }
    return 0;
}

/* ---- names -------------------------------------------------------------------- */

static int name_get(kvd_cluster *c, const char *oid, uint64_t *id)
{
    char v[32];
    int r = rados_getxattr(c->io, oid, "id", v, sizeof v - 1);
    if (r < 0)
        return r == -ENODATA ? -ENOENT : r;
    v[r] = 0;
    return sscanf(v, "%" SCNx64, id) == 1 ? 0 : KVARC_ECORRUPT;
}

/* The id the local index gives ns/name (0 if none). */
static uint64_t local_id(kvd_engine *e, const char *ns, const char *name)
{
    MDB_txn *txn;
    uint64_t id = 0;
    if (mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn) == 0) {
        if (name_lookup(e, txn, ns, name, &id))
            id = 0;
        mdb_txn_abort(txn);
    }
    return id;
}

/* The cache's copy of conversation id deleted, as its CONV_DELETE block
 * would: for a conversation whose log the pool no longer has. */
static int forget(kvd_engine *e, uint64_t id, kvd_err *err)
{
    uint8_t block[KVARC_BLOCK_HEADER];
    kvd_item it;
    memset(&it, 0, sizeof it);
    memset(block, 0, sizeof block);
    it.block = block;
    it.bytes = sizeof block;
    it.h.kind = KVARC_BLOCK_CONV_DELETE;
    it.h.version = KVARC_BLOCK_VERSION_PLAIN;
    it.h.conv = id;
    it.h.payload_crc = kvarc_crc32c(0, "", 0);
    it.prepare = prepare_ingest;
    it.ingest = 1;
    int rc = gc_submit(e, &it, err);
    return rc == -EALREADY ? 0 : rc;
}

int clu_sync_name(kvd_engine *e, const char *ns, const char *name, kvd_err *err)
{
    char oid[256];
    uint64_t id = 0, mine = local_id(e, ns, name);
    name_oid(oid, sizeof oid, ns, name);
    int r = name_get(e->cluster, oid, &id);
    if (r && r != -ENOENT)
        return r == KVARC_ECORRUPT ? kvd_fail(err, r, "%s: its id is malformed", oid)
                                   : rfail(err, r, "looking up a name", oid);
    if (mine && mine != id) {   /* what the cache calls ns/name was deleted (or replaced) elsewhere */
        int rc = sync_one(e, mine, err);
        if (rc == -ENOENT)      /* its own log is gone from the pool (collected after its delete) */
            rc = forget(e, mine, err);
        if (rc)
            return rc;
    }
    if (r == -ENOENT)
        return 0;               /* the local lookup says "not found" */
    int rc = clu_sync_id(e, id, err);
    return rc == -ENOENT ? 0 : rc;  /* a name whose create died before its first log entry */
}

int clu_sync_all(kvd_engine *e, const char *ns, kvd_err *err)
{
    rados_list_ctx_t ctx;
    int r = rados_nobjects_list_open(e->cluster->io, &ctx);
    if (r)
        return rfail(err, r, "listing the pool", "kvarc.name.*");
    const char *entry;
    int rc = 0;
    char prefix[KVD_NS_MAX + 16];
    snprintf(prefix, sizeof prefix, "kvarc.name.%s%s", ns ? ns : "", ns ? "/" : "");
    size_t pl = strlen(prefix);
    while (!rc && (r = rados_nobjects_list_next(ctx, &entry, NULL, NULL)) == 0) {
        if (strncmp(entry, prefix, pl))
            continue;
        char nsb[KVD_NS_MAX], nb[KVD_NAME_MAX];
        const char *s = entry + strlen("kvarc.name."), *slash = strchr(s, '/');
        if (!slash || (size_t)(slash - s) >= sizeof nsb || strlen(slash + 1) >= sizeof nb)
            continue;
        memcpy(nsb, s, (size_t)(slash - s));
        nsb[slash - s] = 0;
        snprintf(nb, sizeof nb, "%s", slash + 1);
        rc = clu_sync_name(e, nsb, nb, err);
    }
    rados_nobjects_list_close(ctx);
    if (!rc && r != -ENOENT)
        rc = rfail(err, r, "listing the pool", "kvarc.name.*");
    /* and what the cache names that the pool may no longer (deleted elsewhere) */
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    size_t cap = 64, n = 0;
    char (*names)[KVD_NS_MAX + KVD_NAME_MAX] = rc ? NULL : malloc(cap * sizeof *names);
    if (!rc && !names)
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    if (!rc && !(rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn)))) {
        if (!(rc = kvd_mdb_err(mdb_cursor_open(txn, e->names, &cur)))) {
            for (int op = MDB_FIRST; !rc && mdb_cursor_get(cur, &k, &v, op) == 0; op = MDB_NEXT) {
                if (k.mv_size >= sizeof names[0])
                    continue;
                if (grow(&names, n, &cap, sizeof *names)) {
                    rc = kvd_fail(err, -ENOMEM, "out of memory");
                    break;
                }
                memcpy(names[n], k.mv_data, k.mv_size);     /* "ns\0name" */
                names[n][k.mv_size] = 0;
                n++;
            }
            mdb_cursor_close(cur);
        }
        mdb_txn_abort(txn);
    }
    for (size_t i = 0; !rc && i < n; i++) {
        const char *nsp = names[i], *nm = nsp + strlen(nsp) + 1;
        if ((size_t)(nm - names[i]) < sizeof names[i] && (!ns || !strcmp(ns, nsp)))
            rc = clu_sync_name(e, nsp, nm, err);
    }
    free(names);
    return rc;
}

/* ---- the writer lock ---------------------------------------------------------- */

/* KVARC_ELOCKED naming who holds oid's lock. */
static int refuse_locked(kvd_engine *e, uint64_t id, const char *oid, kvd_err *err)
{
    char tag[128], clients[256] = "", cookies[256] = "", addrs[256] = "";
    size_t tl = sizeof tag, cl = sizeof clients, kl = sizeof cookies, al = sizeof addrs;
    int excl = 0;
    ssize_t n = rados_list_lockers(e->cluster->io, oid, LOCK_NAME, &excl, tag, &tl, clients, &cl, cookies, &kl,
                                   addrs, &al);
    const char *dot = strchr(cookies, '.');
    char node[64] = "?";
    if (n > 0 && dot) {
        snprintf(node, sizeof node, "%.*s", (int)(dot - cookies) < 63 ? (int)(dot - cookies) : 63, cookies);
    }
    conv_rec r;
    char what[KVD_NS_MAX + KVD_NAME_MAX + 32];
    snprintf(what, sizeof what, "conversation %" PRIu64, id);
    if (conv_read(e, id, &r, NULL) == 0)
        snprintf(what, sizeof what, "'%s/%s'", r.ns, r.name);
    if (n <= 0)
        return kvd_fail(err, KVARC_ELOCKED, "%s is being written by another kvarcd (its writer lock on %s "
                        "is held); retry once it is released or lapses", what, oid);
    return kvd_fail(err, KVARC_ELOCKED, "%s is being written by the kvarcd on %s (Ceph %s at %s, lock "
                    "cookie %s); another kvarcd may append once that one releases it or its lock lapses "
                    "(at most %u s after its last renewal)", what, node, clients, addrs, cookies,
                    e->cluster->lock_s);
}

static size_t assert_input(const kvd_cluster *c, char *b);
static int fence_empty(kvd_cluster *c, uint64_t id);

/* Take id's lock (x->wmu held): 0, KVARC_ELOCKED, -ENOENT (no such head:
 * unless fresh, a create's, the lock would have made one), or an error. */
static int take_lock(kvd_engine *e, cconv *x, int fresh, kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    char oid[64];
    head_oid(oid, sizeof oid, x->id);
    struct timeval d = { (time_t)c->lock_s, 0 };
    int r = rados_lock_exclusive(c->io, oid, LOCK_NAME, c->cookie, c->desc, &d, 0);
    if (r == -EBUSY)
        return refuse_locked(e, x->id, oid, err);
    if (r && r != -EEXIST)
        return rfail(err, r, "taking a conversation's writer lock", oid);
    char mark[32];
    if (!fresh && (r = rados_getxattr(c->io, oid, "kvarc", mark, sizeof mark)) < 0) {
        /* no mark: the lock made this head (its conversation's log was collected) */
        rados_write_op_t op = rados_create_write_op();
        char in[sizeof LOCK_NAME + sizeof c->cookie + 32];
        int prval = 0;
        rados_write_op_exec(op, "lock", "assert_locked", in, assert_input(c, in), &prval);
        rados_write_op_remove(op);
        (void)rados_write_op_operate(op, c->io, oid, NULL, 0);
        rados_release_write_op(op);
        if (r == -ENODATA || r == -ENOENT)
            return kvd_fail(err, -ENOENT, "conversation %" PRIu64 " is not in the pool (deleted, its log "
                            "collected)", x->id);
        return rfail(err, r, "reading a conversation's head", oid);
    }
    pthread_mutex_lock(&c->mu);
    x->locked = 1;
    x->stale = 1;               /* writable only once start_epoch has run */
    x->last_write_ns = now_ns();
    pthread_mutex_unlock(&c->mu);
    return 0;
}

/* Seal segment k: no append of an earlier writer lands there afterwards
 * (theirs compare the state). 0, or an error; -ENOENT if there is none. */
static int seal(kvd_engine *e, uint64_t id, uint64_t k, kvd_err *err)
{
    char oid[64];
    seg_oid(oid, sizeof oid, id, k);
    rados_write_op_t op = rados_create_write_op();
    rados_write_op_assert_exists(op);
    rados_write_op_setxattr(op, "state", "sealed", 6);
    int r = rados_write_op_operate(op, e->cluster->io, oid, NULL, 0);
    rados_release_write_op(op);
    return r == 0 || r == -ENOENT ? r : rfail(err, r, "sealing a segment", oid);
}

/* Segment k of conversation id made, exclusively, open for epoch with its
 * log's end at seq: 0, -EEXIST (another writer made it), or -errno. */
static int seg_start(kvd_cluster *c, uint64_t id, uint64_t k, uint64_t epoch, uint64_t seq)
{
    char oid[64], state[32], last[17];
    seg_oid(oid, sizeof oid, id, k);
    snprintf(state, sizeof state, "open %016" PRIx64, epoch);
    snprintf(last, sizeof last, "%016" PRIx64, seq);
    rados_write_op_t op = rados_create_write_op();
    rados_write_op_create(op, LIBRADOS_CREATE_EXCLUSIVE, NULL);
    rados_write_op_setxattr(op, "state", state, strlen(state));
    rados_write_op_setxattr(op, "last", last, 16);
    int r = rados_write_op_operate(op, c->io, oid, NULL, 0);
    rados_release_write_op(op);
    return r;
}

/* This kvarcd's writing epoch of a conversation whose lock it holds
 * (x->wmu held): the last segment sealed, the log synced to its end, a
 * new segment made (exclusively: if another writer made it first, that one
 * is sealed and synced in turn) in state "open EPOCH" with "last" at the
 * log's end; the writer appends there. */
static int start_epoch(kvd_engine *e, cconv *x, int creating, kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    uint64_t epoch = 0;
    if (getrandom(&epoch, sizeof epoch, 0) != sizeof epoch)
        epoch = (uint64_t)now_ns() * 0x9e3779b97f4a7c15ull;
    int rc = sync_locked(e, x, err), fresh = rc == -ENOENT && creating;
    if (rc && !fresh)
        return rc;          /* -ENOENT for a conversation whose log is gone: never start it again */
    for (int tries = 0; tries < 64; tries++) {
        pthread_mutex_lock(&c->mu);
        uint64_t k = x->rseg, seq = x->seq;
        pthread_mutex_unlock(&c->mu);
        uint64_t next = 0;
        if (!fresh) {
            if ((rc = seal(e, x->id, k, err)) && rc != -ENOENT)
                return rc;
            if ((rc = sync_locked(e, x, err)))     /* what landed before the seal */
                return rc;
            pthread_mutex_lock(&c->mu);
            int moved = x->rseg != k;
            seq = x->seq;
            pthread_mutex_unlock(&c->mu);
            if (moved)
                continue;                           /* a later segment appeared: seal that one */
            next = k + 1;
        }
        char oid[64];
        seg_oid(oid, sizeof oid, x->id, next);
        int r = seg_start(c, x->id, next, epoch, seq);
        if (r == -EEXIST) {                         /* another writer's: seal it and read it first */
            fresh = 0;
            if ((rc = sync_locked(e, x, err)) && rc != -ENOENT)
                return rc;
            continue;
        }
        if (r)
            return rfail(err, r, "starting a segment", oid);
        pthread_mutex_lock(&c->mu);
        x->epoch = epoch;
        x->wseg = next;
        x->woff = 0;
        x->log_seq = seq;
        x->stale = 0;
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    return kvd_fail(err, -EAGAIN, "conversation %" PRIu64 ": its log kept growing while this kvarcd took it "
                    "over; retry", x->id);
}

int clu_writer_begin(kvd_engine *e, uint64_t id, kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    cconv *x = cconv_get(e, id);
    if (!x)
        return kvd_fail(err, -ENOMEM, "out of memory");
    pthread_mutex_lock(&c->mu);
    if (x->locked && !x->stale) {
        x->last_write_ns = now_ns();
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_lock(&x->wmu);
    pthread_mutex_lock(&c->mu);
    int locked = x->locked;
    pthread_mutex_unlock(&c->mu);
    int rc = locked ? 0 : take_lock(e, x, 0, err);
    int started = !rc && !(rc = start_epoch(e, x, 0, err));  /* nobody else extends the log now */
    pthread_mutex_lock(&c->mu);
    if (started) {
        x->last_write_ns = now_ns();
    } else if (x->locked) {
        x->stale = 1;           /* locked but behind the log: never log on top of it */
    }
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&x->wmu);
    return rc;
}

/* ---- create and delete ------------------------------------------------------- */

static int alloc_id(kvd_engine *e, uint64_t *id, kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    for (int tries = 0; tries < 1000; tries++) {
        char v[32] = "", nv[17];
        uint64_t next = 1;
        int r = rados_getxattr(c->io, "kvarc.ids", "next", v, sizeof v - 1);
        int fresh = r == -ENOENT || r == -ENODATA;
        if (r < 0 && !fresh)
            return rfail(err, r, "reading the id counter", "kvarc.ids");
        if (r >= 0) {
            v[r] = 0;
            if (sscanf(v, "%" SCNx64, &next) != 1)
                return kvd_fail(err, KVARC_ECORRUPT, "kvarc.ids: its counter '%s' is malformed", v);
        }
        snprintf(nv, sizeof nv, "%016" PRIx64, next + 1);
        rados_write_op_t op = rados_create_write_op();
        if (fresh)
            rados_write_op_create(op, LIBRADOS_CREATE_EXCLUSIVE, NULL);
        else
            rados_write_op_cmpxattr(op, "next", LIBRADOS_CMPXATTR_OP_EQ, v, (size_t)r);
        rados_write_op_setxattr(op, "next", nv, 16);
        r = rados_write_op_operate(op, c->io, "kvarc.ids", NULL, 0);
        rados_release_write_op(op);
        if (r == 0) {
            *id = next;
            return 0;
        }
        if (r != -ECANCELED && r != -EEXIST)
            return rfail(err, r, "taking a conversation id", "kvarc.ids");
    }
    return kvd_fail(err, -EAGAIN, "kvarc.ids: too many kvarcd taking ids at once; retry");
}

/* Is conversation id dead for its name: deleted, or its create died
 * before logging anything (no log entry and nobody holding its lock)? */
static int id_dead(kvd_engine *e, uint64_t id, kvd_err *err)
{
    kvd_err tmp;
    int rc = clu_sync_id(e, id, &tmp);
    if (rc == -ENOENT)
        return 1;
    if (rc) {
        *err = tmp;
        return rc;
    }
    conv_rec r;
    rc = conv_read(e, id, &r, err);
    if (rc == 0)
        return (r.flags & KVD_CONV_DELETED) ? 1 : 0;
    if (rc != -ENOENT)
        return rc;
    /* nothing logged: dead unless its creator still holds the lock, and
     * then made dead for good (segment 0 sealed while still empty: a
     * CONV_CREATE that would land later fails) */
    char oid[64], clients[256], cookies[256], addrs[256], tag[128];
    size_t cl = sizeof clients, kl = sizeof cookies, al = sizeof addrs, tl = sizeof tag;
    int excl;
    head_oid(oid, sizeof oid, id);
    ssize_t n = rados_list_lockers(e->cluster->io, oid, LOCK_NAME, &excl, tag, &tl, clients, &cl, cookies, &kl,
                                   addrs, &al);
    if (n < 0 && n != -ENOENT)
        return rfail(err, (int)n, "reading a create's lock", oid);
    if (n > 0)
        return 0;
    int f = fence_empty(e->cluster, id);
    if (f < 0)
        return rfail(err, f, "fencing an unfinished create", oid);
    if (f == 0)                 /* its create landed meanwhile: alive */
        return 0;
    return 1;
}

int clu_create_begin(kvd_engine *e, const char *ns, const char *name, uint64_t *id, kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    char oid[256], hv[17];
    name_oid(oid, sizeof oid, ns, name);
    int rc = alloc_id(e, id, err);
    if (rc)
        return rc;
    snprintf(hv, sizeof hv, "%016" PRIx64, *id);
    /* the head first, locked, and segment 0: while the name is being
     * bound, another kvarcd sees a live (locked) create */
    cconv *x = cconv_get(e, *id);
    if (!x)
        return kvd_fail(err, -ENOMEM, "out of memory");
    pthread_mutex_lock(&x->wmu);
    rc = take_lock(e, x, 1, err);
    if (!rc) {
        char head[64], in[sizeof LOCK_NAME + sizeof c->cookie + 32];
        int prval = 0;
        head_oid(head, sizeof head, *id);
        rados_write_op_t op = rados_create_write_op();
        rados_write_op_exec(op, "lock", "assert_locked", in, assert_input(c, in), &prval);
        rados_write_op_setxattr(op, "kvarc", "1", 1);
        int r = rados_write_op_operate(op, c->io, head, NULL, 0);
        rados_release_write_op(op);
        if (r)
            rc = rfail(err, r, "starting a conversation's head", head);
        else
            rc = start_epoch(e, x, 1, err);     /* segment 0 */
    }
    pthread_mutex_unlock(&x->wmu);
    if (rc)
        return rc;
    for (int tries = 0;; tries++) {
        rados_write_op_t op = rados_create_write_op();
        rados_write_op_create(op, LIBRADOS_CREATE_EXCLUSIVE, NULL);
        rados_write_op_setxattr(op, "id", hv, 16);
        int r = rados_write_op_operate(op, c->io, oid, NULL, 0);
        rados_release_write_op(op);
        if (r == 0)
            break;
        if (r != -EEXIST) {
            clu_create_undo(e, ns, name, *id);
            return rfail(err, r, "binding a name", oid);
        }
        uint64_t old;
        if ((r = name_get(c, oid, &old)) == -ENOENT && tries < 3)
            continue;           /* removed meanwhile: bind it again */
        int dead = r ? r : id_dead(e, old, err);
        if (dead < 0 || !dead || tries >= 3) {
            clu_create_undo(e, ns, name, *id);
            if (r)
                return rfail(err, r, "reading a name", oid);
            return dead < 0 ? dead : kvd_fail(err, -EEXIST, "conversation '%s/%s' already exists", ns, name);
        }
        char ov[17];            /* rebind it, if still bound to the dead one */
        snprintf(ov, sizeof ov, "%016" PRIx64, old);
        op = rados_create_write_op();
        rados_write_op_cmpxattr(op, "id", LIBRADOS_CMPXATTR_OP_EQ, ov, 16);
        rados_write_op_setxattr(op, "id", hv, 16);
        r = rados_write_op_operate(op, c->io, oid, NULL, 0);
        rados_release_write_op(op);
        if (r == 0)
            break;
        if (r != -ECANCELED && r != -ENOENT) {
            clu_create_undo(e, ns, name, *id);
            return rfail(err, r, "rebinding a name", oid);
        }
    }
    return 0;
}

void clu_name_release(kvd_engine *e, const char *ns, const char *name, uint64_t id)
{
    char oid[256], hv[17];
    name_oid(oid, sizeof oid, ns, name);
    snprintf(hv, sizeof hv, "%016" PRIx64, id);
    rados_write_op_t op = rados_create_write_op();
    rados_write_op_cmpxattr(op, "id", LIBRADOS_CMPXATTR_OP_EQ, hv, 16);
    rados_write_op_remove(op);
    (void)rados_write_op_operate(op, e->cluster->io, oid, NULL, 0);   /* rebound or gone: not ours */
    rados_release_write_op(op);
}

/* Seal segment 0 of conversation id if its log is still empty, in one
 * operation: afterwards no CONV_CREATE can land there, ever. 1 sealed (or
 * there is no segment 0: nothing can land either), 0 the create is in the
 * log, <0 an error. */
static int fence_empty(kvd_cluster *c, uint64_t id)
{
    char seg0[64];
    seg_oid(seg0, sizeof seg0, id, 0);
    rados_write_op_t op = rados_create_write_op();
    rados_write_op_assert_exists(op);
    rados_write_op_cmpxattr(op, "last", LIBRADOS_CMPXATTR_OP_EQ, "0000000000000000", 16);
    rados_write_op_setxattr(op, "state", "sealed", 6);
    int r = rados_write_op_operate(op, c->io, seg0, NULL, 0);
    rados_release_write_op(op);
    return r == 0 || r == -ENOENT ? 1 : r == -ECANCELED ? 0 : r;
}

void clu_create_undo(kvd_engine *e, const char *ns, const char *name, uint64_t id)
{
    kvd_cluster *c = e->cluster;
    char head[64];
    head_oid(head, sizeof head, id);
    /* segment 0's own word, not this kvarcd's view, and fenced: a log
     * operation that timed out may land later, and then must fail */
    if (fence_empty(c, id) != 1)
        return;                 /* its create may be in the log: it exists (or id_dead decides later) */
    clu_name_release(e, ns, name, id);
    cconv *x = cconv_get(e, id);
    if (x) {
        pthread_mutex_lock(&c->mu);
        int locked = x->locked;
        x->locked = 0;
        pthread_mutex_unlock(&c->mu);
        if (locked)
            rados_unlock(c->io, head, LOCK_NAME, c->cookie);
    }
}

/* ---- append: the batch into the log ----------------------------------------- */

/* One conversation's share of a batch: ONE operation on its segment, all
 * conversations' in flight together (one round trip per batch). */
typedef struct conv_job {
    cconv   *x;
    kvd_item *its[GC_BATCH_MAX];
    size_t   n;
    uint64_t epoch, seg, off, seq, total;
    uint8_t *buf;
    rados_completion_t comp;
    rados_write_op_t op;
    int      rc, started;
    kvd_err  err;
} conv_job;

/* cls_lock's assert_locked input for this kvarcd's cookie:
 * ENCODE_START(1, 1) {name, type 1 (exclusive), cookie, tag ""}, strings
 * as u32 length + bytes, little-endian. */
static size_t assert_input(const kvd_cluster *c, char *b)
{
    size_t o = 6;
    uint32_t l32 = (uint32_t)strlen(LOCK_NAME);
    memcpy(b + o, &l32, 4);
    memcpy(b + o + 4, LOCK_NAME, l32);
    o += 4 + l32;
    b[o++] = 1;
    l32 = (uint32_t)strlen(c->cookie);
    memcpy(b + o, &l32, 4);
    memcpy(b + o + 4, c->cookie, l32);
    o += 4 + l32;
    l32 = 0;
    memcpy(b + o, &l32, 4);
    o += 4;
    b[0] = 1;
    b[1] = 1;
    l32 = (uint32_t)(o - 6);
    memcpy(b + 2, &l32, 4);
    return o;
}

/* The writer's own move to the next segment (the current one is full):
 * the current sealed, the next made exclusively; EEXIST means another
 * kvarcd took the conversation over (it makes segments only after taking
 * the lock). */
static int roll(kvd_engine *e, conv_job *j)
{
    kvd_cluster *c = e->cluster;
    char oid[64];
    int rc = seal(e, j->x->id, j->seg, &j->err);
    if (rc)
        return rc == -ENOENT ? kvd_fail(&j->err, KVARC_ECORRUPT, "conversation %" PRIu64 "'s segment %" PRIu64
                                        " vanished", j->x->id, j->seg) : rc;
    seg_oid(oid, sizeof oid, j->x->id, j->seg + 1);
    int r = seg_start(c, j->x->id, j->seg + 1, j->epoch, j->seq);
    if (r == -EEXIST) {
        char head[64];
        head_oid(head, sizeof head, j->x->id);
        pthread_mutex_lock(&c->mu);
        j->x->locked = 0;
        pthread_mutex_unlock(&c->mu);
        return refuse_locked(e, j->x->id, head, &j->err);
    }
    if (r)
        return rfail(&j->err, r, "starting a segment", oid);
    j->seg++;
    j->off = 0;
    pthread_mutex_lock(&c->mu);
    j->x->wseg = j->seg;
    j->x->woff = 0;
    pthread_mutex_unlock(&c->mu);
    return 0;
}

/* Job j's operation started: {state still "open EPOCH" (no one sealed
 * it), last == SEQ0, last = SEQ0 + 1, the blocks written at the
 * segment's end, omap SEQ0 + 1 -> (offset, bytes)}. */
static void job_start(kvd_engine *e, conv_job *j)
{
    kvd_cluster *c = e->cluster;
    pthread_mutex_lock(&c->mu);
    int locked = j->x->locked, stale = j->x->stale;
    j->epoch = j->x->epoch;
    j->seg = j->x->wseg;
    j->off = j->x->woff;
    j->seq = j->x->log_seq;
    pthread_mutex_unlock(&c->mu);
    char head[64];
    head_oid(head, sizeof head, j->x->id);
    if (!locked) {
        j->rc = refuse_locked(e, j->x->id, head, &j->err);
        return;
    }
    if (stale) {        /* prepared against a cache that lacks some of the log: never log on top of it */
        j->rc = kvd_fail(&j->err, -EAGAIN, "the cache of conversation %" PRIu64 " is behind its log after a "
                         "failed append; nothing of this one was kept: retry", j->x->id);
        return;
    }
    for (size_t i = 0; i < j->n; i++)
        j->total += j->its[i]->bytes;
    if (j->off > 0 && j->off + j->total > c->object_bytes && (j->rc = roll(e, j)))
        return;
    if (!(j->buf = malloc(j->total))) {
        j->rc = kvd_fail(&j->err, -ENOMEM, "out of memory");
        return;
    }
    for (size_t i = 0, p = 0; i < j->n; p += j->its[i]->bytes, i++)
        memcpy(j->buf + p, j->its[i]->block, j->its[i]->bytes);
    char oid[64], state[32], was[17], now_last[17], key[17];
    seg_oid(oid, sizeof oid, j->x->id, j->seg);
    snprintf(state, sizeof state, "open %016" PRIx64, j->epoch);
    snprintf(was, sizeof was, "%016" PRIx64, j->seq);
    snprintf(now_last, sizeof now_last, "%016" PRIx64, j->seq + 1);
    snprintf(key, sizeof key, "%016" PRIx64, j->seq + 1);
    log_ext ext = { j->off, j->total };
    const char *kp[1] = { key }, *vp[1] = { (const char *)&ext };
    size_t kl[1] = { 16 }, vl[1] = { sizeof ext };
    j->op = rados_create_write_op();
    rados_write_op_cmpxattr(j->op, "state", LIBRADOS_CMPXATTR_OP_EQ, state, strlen(state));
    rados_write_op_cmpxattr(j->op, "last", LIBRADOS_CMPXATTR_OP_EQ, was, 16);
    rados_write_op_setxattr(j->op, "last", now_last, 16);
    rados_write_op_write(j->op, (const char *)j->buf, j->total, j->off);
    rados_write_op_omap_set2(j->op, kp, vp, kl, vl, 1);   /* copied into the op */
    int r = rados_aio_create_completion2(NULL, NULL, &j->comp);
    if (!r)
        r = rados_aio_write_op_operate(j->op, c->io, j->comp, oid, NULL, 0);
    if (r) {
        if (j->comp) {
            rados_aio_release(j->comp);
            j->comp = NULL;
        }
        j->rc = rfail(&j->err, r, "logging blocks", oid);
        return;
    }
    j->started = 1;
}

/* Wait for job j; its outcome in j->rc and the conversation's state. */
static void job_finish(kvd_engine *e, MDB_txn *txn, conv_job *j)
{
    kvd_cluster *c = e->cluster;
    if (!j->x)
        return;
    if (!j->started && !j->rc)
        return;             /* never started (the batch failed before it): nothing to record */
    char oid[64];
    seg_oid(oid, sizeof oid, j->x->id, j->seg);
    if (j->started) {
        rados_aio_wait_for_complete(j->comp);
        int r = rados_aio_get_return_value(j->comp);
        if (r == -ECANCELED) {      /* sealed (taken over), or the log's end moved (a late operation) */
            char st[32] = "";
            int n = rados_getxattr(c->io, oid, "state", st, sizeof st - 1);
            st[n > 0 ? n : 0] = 0;
            if (!strncmp(st, "sealed", 6)) {
                char head[64];
                head_oid(head, sizeof head, j->x->id);
                pthread_mutex_lock(&c->mu);
                j->x->locked = 0;
                pthread_mutex_unlock(&c->mu);
                int rr = refuse_locked(e, j->x->id, head, &j->err);
                if (rr == KVARC_ELOCKED && !strstr(j->err.msg, "kvarcd on"))
                    kvd_fail(&j->err, KVARC_ELOCKED, "this kvarcd's segment %s was sealed by another kvarcd "
                             "taking the conversation over; nothing of the append was kept: retry", oid);
                j->rc = KVARC_ELOCKED;
            } else {
                j->rc = kvd_fail(&j->err, -EAGAIN, "%s: the log had moved past where this kvarcd saw its end (an "
                                 "earlier operation that timed out landed); nothing of this append was kept: "
                                 "retry", oid);
            }
        } else if (r) {
            j->rc = rfail(&j->err, r, "logging blocks", oid);
        }
    }
    if (!j->rc && (j->rc = watermark_put(e, txn, j->x->id, j->seq + 1, j->seg)))
        kvd_fail(&j->err, j->rc, "storing the cache's log position: %s", kvarc_strerror(j->rc));
    pthread_mutex_lock(&c->mu);
    if (!j->rc) {
        j->x->log_seq = j->x->pending = j->seq + 1;     /* the cache's at the batch's commit (clu_batch_done) */
        j->x->pending_seg = j->seg;
        j->x->woff = j->off + j->total;
    } else if (j->started || j->rc == -EAGAIN) {
        j->x->stale = 1;        /* it may land later: seal, sync and start afresh before the next append */
    }
    pthread_mutex_unlock(&c->mu);
}

static void job_free(conv_job *j)
{
    if (j->comp)
        rados_aio_release(j->comp);
    if (j->op)
        rados_release_write_op(j->op);
    free(j->buf);
}

int clu_log_batch(kvd_engine *e, MDB_txn *txn, kvd_item *batch, kvd_err *err)
{
    kvd_item *its[GC_BATCH_MAX];
    size_t n = 0, nj = 0;
    for (kvd_item *it = batch; it && n < GC_BATCH_MAX; it = it->next)
        if (!it->rc && !it->ingest)
            its[n++] = it;
    conv_job *jobs = calloc(n ? n : 1, sizeof *jobs);
    if (!jobs)
        return kvd_fail(err, -ENOMEM, "out of memory");
    int done[GC_BATCH_MAX] = { 0 }, rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {     /* each conversation's items in the batch's order */
        if (done[i])
            continue;
        conv_job *j = &jobs[nj++];
        if (!(j->x = cconv_get(e, its[i]->h.conv)))
            rc = kvd_fail(err, -ENOMEM, "out of memory");
        for (size_t k = i; k < n; k++)
            if (!done[k] && its[k]->h.conv == its[i]->h.conv) {
                j->its[j->n++] = its[k];
                done[k] = 1;
            }
    }
    for (size_t i = 0; i < nj && !rc; i++)
        job_start(e, &jobs[i]);
    for (size_t i = 0; i < nj; i++) {      /* every job waited for, whatever failed before it */
        job_finish(e, txn, &jobs[i]);
        if (!rc && jobs[i].rc) {
            rc = jobs[i].rc;
            *err = jobs[i].err;
        }
        job_free(&jobs[i]);
    }
    free(jobs);
    return rc;
}

int clu_item_check(kvd_engine *e, kvd_item *it)
{
    if (it->ingest || !it->h.conv)
        return 0;               /* a replay, or a create (its id is set by its prepare; its head is locked) */
    cconv *x = cconv_get(e, it->h.conv);
    if (!x)
        return kvd_fail(&it->err, -ENOMEM, "out of memory");
    pthread_mutex_lock(&e->cluster->mu);
    int locked = x->locked, stale = x->stale;
    pthread_mutex_unlock(&e->cluster->mu);
    if (!locked) {
        char head[64];
        head_oid(head, sizeof head, it->h.conv);
        return refuse_locked(e, it->h.conv, head, &it->err);
    }
    if (stale)
        return kvd_fail(&it->err, -EAGAIN, "the cache of conversation %" PRIu64 " is behind its log after a "
                        "failed append; nothing of this one was kept: retry", it->h.conv);
    return 0;
}

void clu_batch_done(kvd_engine *e, kvd_item *batch)
{
    for (kvd_item *it = batch; it; it = it->next) {
        if (it->ingest || it->rc)
            continue;
        cconv *x = cconv_get(e, it->h.conv);
        if (!x)
            continue;
        pthread_mutex_lock(&e->cluster->mu);
        if (x->seq < x->pending) {
            x->seq = x->pending;
            x->rseg = x->pending_seg;
        }
        pthread_mutex_unlock(&e->cluster->mu);
    }
}

void clu_batch_failed(kvd_engine *e, kvd_item *batch)
{
    for (kvd_item *it = batch; it; it = it->next) {
        if (it->ingest || !it->h.conv)
            continue;
        cconv *x = cconv_get(e, it->h.conv);
        if (!x)
            continue;
        pthread_mutex_lock(&e->cluster->mu);
        x->stale = 1;
        pthread_mutex_unlock(&e->cluster->mu);
    }
}

/* ---- collection: what the pool no longer needs --------------------------- */

typedef struct pool_obj {
    char     oid[96];
    uint64_t id, k;
    int      head;          /* kvarc.conv.ID (else kvarc.seg.ID.K) */
} pool_obj;

/* Every head and segment object in the pool, into *po (malloc'ed). */
static int list_pool(kvd_cluster *c, pool_obj **po, size_t *npo, kvd_err *err)
{
    size_t cap = 0;
    *po = NULL;
    *npo = 0;
    rados_list_ctx_t ctx;
    int r = rados_nobjects_list_open(c->io, &ctx);
    if (r)
        return rfail(err, r, "listing the pool", "*");
    const char *entry;
    while ((r = rados_nobjects_list_next(ctx, &entry, NULL, NULL)) == 0) {
        pool_obj o = { .head = 0 };
        if (sscanf(entry, "kvarc.conv.%16" SCNx64, &o.id) == 1 && strlen(entry) == 27)
            o.head = 1;
        else if (sscanf(entry, "kvarc.seg.%16" SCNx64 ".%8" SCNx64, &o.id, &o.k) != 2)
            continue;
        snprintf(o.oid, sizeof o.oid, "%s", entry);
        if (grow(po, *npo, &cap, sizeof **po)) {
            r = -ENOMEM;
            break;
        }
        (*po)[(*npo)++] = o;
    }
    rados_nobjects_list_close(ctx);
    if (r == -ENOENT)
        return 0;
    free(*po);
    *po = NULL;
    *npo = 0;
    return r == -ENOMEM ? kvd_fail(err, r, "out of memory") : rfail(err, r, "listing the pool", "*");
}

typedef struct idvec {
    uint64_t *v;
    size_t    n, cap;
} idvec;

static int idv_push(idvec *a, uint64_t id)
{
    if (grow(&a->v, a->n, &a->cap, sizeof *a->v))
        return -ENOMEM;
    a->v[a->n++] = id;
    return 0;
}

static int idv_has(const idvec *a, uint64_t id)
{
    for (size_t i = 0; i < a->n; i++)
        if (a->v[i] == id)
            return 1;
    return 0;
}

int clu_compact(kvd_engine *e, unsigned grace_s, uint64_t *objects, uint64_t *bytes, kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    if (!grace_s)
        grace_s = c->gc_grace_s;
    *objects = *bytes = 0;
    int rc = clu_sync_all(e, NULL, err);
    if (rc)
        return rc;
    /* 1. what the pool holds */
    pool_obj *po;
    size_t npo;
    if ((rc = list_pool(c, &po, &npo, err)))
        return rc;
    /* 2. every conversation the pool has a log for, in the cache (deletes included) */
    for (size_t i = 0; i < npo && !rc; i++)
        if (po[i].head && (rc = clu_sync_id(e, po[i].id, err)) == -ENOENT)
            rc = 0;
    /* 3. which conversations must stay: live ones and their ancestors, and
     *    any whose head changed within the grace (a fork being made of it) */
    time_t now = time(NULL);
    idvec keep = { 0 }, gone = { 0 };
    MDB_txn *txn = NULL;
    if (!rc && (rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn))))
        kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    for (size_t i = 0; i < npo && !rc; i++) {
        if (!po[i].head)
            continue;
        uint64_t sz;
        time_t mt;
        conv_rec cr;
        int known = conv_get(e, txn, po[i].id, &cr) == 0;
        int young = rados_stat(c->io, po[i].oid, &sz, &mt) == 0 && now - mt < (time_t)grace_s;
        if (young || (known && !(cr.flags & KVD_CONV_DELETED))) {
            for (uint64_t a = po[i].id, d = 0; a && d < 1024 && !rc; d++) {     /* it and its ancestors */
                conv_rec ar;
                if (idv_push(&keep, a))
                    rc = kvd_fail(err, -ENOMEM, "out of memory");
                a = conv_get(e, txn, a, &ar) == 0 ? ar.parent : 0;
            }
        } else if (!known) {
            char clients[256], cookies[256], addrs[256], tag[128];
            size_t cl = sizeof clients, kl = sizeof cookies, al = sizeof addrs, tl = sizeof tag;
            int excl;
            if (rados_list_lockers(c->io, po[i].oid, LOCK_NAME, &excl, tag, &tl, clients, &cl, cookies, &kl,
                                   addrs, &al) <= 0)
                rc = idv_push(&gone, po[i].id);     /* a create that died before its first entry */
            else
                rc = idv_push(&keep, po[i].id);
        } else {
            rc = idv_push(&gone, po[i].id);     /* deleted; kept below if an ancestor of a kept one */
        }
        if (rc)
            kvd_fail(err, rc, "out of memory");
    }
    if (txn)
        mdb_txn_abort(txn);
    /* 4. remove every object of a gone conversation nothing keeps, under
     *    its head's lock, taken here (never while a writer holds it): its
     *    segments first, the head last, in the operation that asserts the lock */
    for (size_t i = 0; i < npo && !rc; i++) {
        int is_gone = idv_has(&gone, po[i].id), is_kept = idv_has(&keep, po[i].id);
        uint64_t sz = 0;
        time_t mt = 0;
        if (!po[i].head || !is_gone || is_kept || rados_stat(c->io, po[i].oid, &sz, &mt) ||
            now - mt < (time_t)grace_s)
            continue;
        struct timeval d = { (time_t)c->lock_s, 0 };
        if (rados_lock_exclusive(c->io, po[i].oid, LOCK_NAME, c->cookie, c->desc, &d, 0))
            continue;
        for (size_t k = 0; k < npo; k++) {
            uint64_t ssz = 0;
            time_t smt;
            if (po[k].head || po[k].id != po[i].id || rados_stat(c->io, po[k].oid, &ssz, &smt))
                continue;
            if (rados_remove(c->io, po[k].oid) == 0) {
                (*objects)++;
                *bytes += ssz;
            }
        }
        char in[sizeof LOCK_NAME + sizeof c->cookie + 32];
        int prval = 0;
        rados_write_op_t op = rados_create_write_op();
        rados_write_op_exec(op, "lock", "assert_locked", in, assert_input(c, in), &prval);
        rados_write_op_remove(op);
        if (rados_write_op_operate(op, c->io, po[i].oid, NULL, 0) == 0) {
            (*objects)++;
            *bytes += sz;
        } else {
            rados_unlock(c->io, po[i].oid, LOCK_NAME, c->cookie);
        }
        rados_release_write_op(op);
    }
    free(keep.v);
    free(gone.v);
    free(po);
    return rc;
}

/* ---- verify: the pool's logs ---------------------------------------------- */

static void vproblem(void (*log)(void *, const char *), void *arg, uint64_t *problems, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void vproblem(void (*log)(void *, const char *), void *arg, uint64_t *problems, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    (*problems)++;
    if (log)
        log(arg, line);
}

int clu_verify(kvd_engine *e, uint64_t *problems, void (*log)(void *arg, const char *line), void *arg,
               kvd_err *err)
{
    kvd_cluster *c = e->cluster;
    pool_obj *po;
    size_t npo;
    int rc = list_pool(c, &po, &npo, err);
    for (size_t i = 0; i < npo && !rc; i++) {
        if (!po[i].head)
            continue;
        uint64_t id = po[i].id, seq = 0;
        for (uint64_t sk = 0; !rc; sk++) {      /* its segments in order; entries numbered on across them */
            log_ext *refs;
            size_t nrefs;
            uint64_t first = seq + 1;
            char oid[64];
            seg_oid(oid, sizeof oid, id, sk);
            kvd_err lerr = { 0, "" };
            int lr = seg_entries(c, id, sk, &seq, &refs, &nrefs, &lerr);
            if (lr == -ENOENT)
                break;
            if (lr == KVARC_ECORRUPT) {
                vproblem(log, arg, problems, "pool: %s", lerr.msg);
                break;
            }
            if (lr) {
                *err = lerr;
                rc = lr;
                break;
            }
            for (size_t k = 0; k < nrefs && !rc; k++) {
                uint64_t q = first + k;
                uint8_t *buf;
                int rr = read_extent(c, oid, &refs[k], &buf);
                if (rr == KVARC_ECORRUPT) {
                    vproblem(log, arg, problems, "pool: %s entry %" PRIu64 ": the segment lacks bytes %" PRIu64
                             "..%" PRIu64 " it names", oid, q, refs[k].off, refs[k].off + refs[k].bytes);
                    continue;
                }
                if (rr) {
                    rc = rr == -ENOMEM ? kvd_fail(err, rr, "out of memory") : rfail(err, rr, "reading a log extent", oid);
                    break;
                }
                for (size_t p = 0; p < refs[k].bytes;) {
                    kvarc_block_header h;
                    const char *what;
                    int bad = extent_block(buf, (size_t)refs[k].bytes, p, id, &h, &what);
                    if (bad == 1)
                        vproblem(log, arg, problems, "pool: %s entry %" PRIu64 " (at %" PRIu64 "): %s fails its "
                                 "check at byte %zu", oid, q, refs[k].off, what, p);
                    else if (bad == 2)
                        vproblem(log, arg, problems, "pool: %s entry %" PRIu64 " holds a block of conversation %"
                                 PRIu64, oid, q, (uint64_t)h.conv);
                    if (bad)
                        break;
                    p += KVARC_BLOCK_HEADER + (size_t)h.payload_bytes;
                }
                free(buf);
            }
            free(refs);
        }
    }
    free(po);
    return rc;
}
