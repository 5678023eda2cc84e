/* engine.c - a data directory opened, recovered and closed, and the
 * engine's counters (kvd_stats_get).
 *
 * Design notes
 * The engine is split by concept: index.c (LMDB keys and records),
 * segtab.c (the segment table and a segment's states), commit.c (the
 * group commit: durable append's invariants 1-3), conversation.c, append.c,
 * and here open / recovery / close.
 * Invariant 4 (with commit.c's 1-3). Recovery (kvd_open) replays the
 * valid blocks past what the index knows (replay.c: roll-forward), cuts
 * only bytes where no valid block starts off segment ends, and removes
 * files that hold nothing the index needs: what was acknowledged is intact
 * even when the index lost its last transaction. A batch that was durable
 * but whose commit never happened (a crash between the group commit's
 * steps 2 and 3) becomes visible then: it was not acknowledged, and a
 * writer that retries it finds its layer already holds those positions.
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
    if (!check_only && opt->cluster && (rc = clu_open(e, opt->cluster, err)))
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
    clu_close(e);       /* its writer locks released first */
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
