/* segtab.c - the segment table and a segment's life.
 *
 * Design notes
 * The table (e->segtab, under seg_mu) holds every segment file kvarcd has
 * open: id, fd, state, committed bytes, pins. States: OPEN (the one appends
 * go to; seg_create) -> SEALED (the group commit rolled past it; seg_put in
 * commit.c) -> DEAD (compaction moved its live blocks; seg_mark_dead) ->
 * removed (seg_retire_locked, once no read pins it). A read pins the fd it
 * resolved (seg_pin) before dropping the resolve lock and unpins after
 * (seg_unpin), so a segment is never closed under a read in flight. The
 * index's `segments` table (seg_put) is the durable side of these states. */
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
void seg_retire_locked(kvd_engine *e, kvd_seg *s)
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

int seg_put(kvd_engine *e, MDB_txn *txn, uint64_t id, uint8_t state, uint64_t bytes)
{
    uint8_t kb[8];
    key_u64(kb, id);
    seg_val sv = { .state = state, .bytes = bytes };
    MDB_val k = { 8, kb }, v = { sizeof sv, &sv };
    return kvd_mdb_err(mdb_put(txn, e->segs, &k, &v, 0));
}

int fsync_dir(const char *path)
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
