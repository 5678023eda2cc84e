/* verify.c - check a data directory end to end, and rebuild its index
 * from the segments alone.
 *
 * Both walk segments with scan_segment(), which reads blocks in order and
 * checks each completely (header CRC; per head the signature section CRC
 * and every record CRC; meta payload CRC). Verify then checks the index
 * against what the scan found; rebuild replays the blocks in sequence
 * order into a fresh LMDB environment and swaps it in (index.rebuild ->
 * index, the old one kept as index.old). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvd_internal.h"

typedef struct blk {
    uint64_t seg, off;
    kvarc_block_header h;
} blk;

typedef struct blklist {
    blk   *v;
    size_t n, cap;
} blklist;

static int blk_push(blklist *l, const blk *b)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 1024;
        blk *n = realloc(l->v, cap * sizeof *n);
        if (!n)
            return -ENOMEM;
        l->v = n;
        l->cap = cap;
    }
    l->v[l->n++] = *b;
    return 0;
}

typedef void (*log_fn)(void *arg, const char *line);

static void logf_(log_fn log, void *arg, uint64_t *problems, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void logf_(log_fn log, void *arg, uint64_t *problems, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (problems)
        (*problems)++;
    if (log)
        log(arg, line);
}

/* Check one block's payload in buf (header h). 0 or KVARC_ECORRUPT with
 * *what saying which part failed. */
static int check_payload(const kvarc_block_header *h, const uint8_t *block, const char **what,
                         uint64_t *records)
{
    if (h->kind != KVARC_BLOCK_DATA) {
        *what = "metadata payload checksum";
        return kvarc_crc32c(0, block + KVARC_BLOCK_HEADER, h->payload_bytes) == h->payload_crc
                   ? 0 : KVARC_ECORRUPT;
    }
    size_t sec = kvarc_block_sig_section(h->count, h->head_dim);
    for (int hd = 0; hd < h->n_heads; hd++) {
        const uint8_t *p = block + kvarc_block_sig_offset(h, hd);
        uint32_t crc;
        memcpy(&crc, p + sec - 4, 4);
        if (crc != kvarc_sig_section_crc(h->conv, h->layer, h->first_pos, (uint32_t)hd, p, sec - 4)) {
            *what = "signature section checksum";
            return KVARC_ECORRUPT;
        }
        for (uint32_t t = 0; t < h->count; t++) {
            const uint8_t *s = block + kvarc_block_slot_offset(h, hd, t);
            memcpy(&crc, s + h->rec_bytes, 4);
            if (crc != kvarc_record_crc(h->conv, h->layer, (uint32_t)hd, h->first_pos + t, s, h->rec_bytes)) {
                *what = "record checksum";
                return KVARC_ECORRUPT;
            }
        }
        if (records)
            *records += h->count;
    }
    return 0;
}

/* Scan fd's blocks in [0, limit). Valid blocks are pushed to out; the scan
 * stops at the first block that does not check (its offset in *valid_end).
 * Meta payloads are kept when keep_meta (caller frees via metas). */
static int scan_segment(int fd, uint64_t seg, uint64_t limit, blklist *out, uint64_t *valid_end,
                        uint64_t *records, const char **what, kvd_progress_fn fn, void *parg,
                        uint64_t *done, uint64_t total, log_fn bad, void *bad_arg, uint64_t *problems)
{
    uint64_t off = 0;
    uint8_t *buf = NULL;
    size_t cap = 0;
    int rc = 0;
    *what = NULL;
    while (off + KVARC_BLOCK_HEADER <= limit) {
        uint8_t hb[KVARC_BLOCK_HEADER];
        blk b = { .seg = seg, .off = off };
        if ((rc = seg_pread_full(fd, hb, sizeof hb, off)))
            break;
        if ((rc = kvarc_block_header_decode(hb, &b.h))) {
            *what = "block header";
            break;
        }
        size_t bytes = KVARC_BLOCK_HEADER + (size_t)b.h.payload_bytes;
        if (off + bytes > limit) {
            rc = KVARC_ECORRUPT;
            *what = "block running past the segment's end";
            break;
        }
        if (bytes > cap) {
            uint8_t *n = realloc(buf, bytes);
            if (!n) {
                rc = -ENOMEM;
                break;
            }
            buf = n;
            cap = bytes;
        }
        memcpy(buf, hb, sizeof hb);
        if ((rc = seg_pread_full(fd, buf + sizeof hb, b.h.payload_bytes, off + sizeof hb)))
            break;
        if ((rc = check_payload(&b.h, buf, what, records))) {
            if (!problems)
                break;
            /* verify: the header is sound, so report this block and go on */
            logf_(bad, bad_arg, problems, "segment %016llx offset %llu: %s failed (conversation %llu "
                  "layer %u positions %llu..%llu)", (unsigned long long)seg, (unsigned long long)off,
                  *what, (unsigned long long)b.h.conv, b.h.layer, (unsigned long long)b.h.first_pos,
                  (unsigned long long)(b.h.first_pos + b.h.count - 1));
            rc = 0;
            *what = NULL;
        } else if ((rc = blk_push(out, &b))) {
            break;
        }
        off += bytes;
        *done += bytes;
        if (fn && fn(parg, *done, total)) {
            rc = -ECANCELED;
            break;
        }
    }
    if (!rc && off != limit && off + KVARC_BLOCK_HEADER > limit && off < limit) {
        rc = KVARC_ECORRUPT;
        *what = "trailing bytes shorter than a block header";
    }
    *valid_end = off;
    free(buf);
    return rc;
}

static int blk_find(const blklist *l, uint64_t seg, uint64_t off)
{
    size_t lo = 0, hi = l->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const blk *b = &l->v[mid];
        if (b->seg < seg || (b->seg == seg && b->off < off))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < l->n && l->v[lo].seg == seg && l->v[lo].off == off ? (int)lo : -1;
}

static int blk_cmp_pos(const void *a, const void *b)
{
    const blk *x = a, *y = b;
    if (x->seg != y->seg)
        return x->seg < y->seg ? -1 : 1;
    return (x->off > y->off) - (x->off < y->off);
}

int kvd_verify(kvd_engine *e, kvd_verify_report *rep, log_fn log, void *arg, kvd_progress_fn fn,
               void *parg, kvd_err *err)
{
    kvd_verify_report local;
    if (!rep)
        rep = &local;
    memset(rep, 0, sizeof *rep);
    blklist bl = { 0 };
    int rc = 0;
    pthread_mutex_lock(&e->compact_mu);

    /* the committed segments, as the index says (pinned while scanned) */
    pthread_mutex_lock(&e->seg_mu);
    size_t nseg = e->nseg;
    kvd_seg *segs = malloc((nseg ? nseg : 1) * sizeof *segs);
    if (segs)
        memcpy(segs, e->segtab, nseg * sizeof *segs);
    pthread_mutex_unlock(&e->seg_mu);
    if (!segs) {
        pthread_mutex_unlock(&e->compact_mu);
        return kvd_fail(err, -ENOMEM, "out of memory");
    }
    uint64_t total = 0, done = 0;
    for (size_t i = 0; i < nseg; i++)
        if (segs[i].state != SEG_DEAD)
            total += segs[i].bytes;
    for (size_t i = 0; i < nseg; i++) {
        if (segs[i].state == SEG_DEAD)
            continue;
        int fd = seg_pin(e, segs[i].id);
        if (fd < 0) {
            logf_(log, arg, &rep->problems, "segment %016llx: listed but not open",
                  (unsigned long long)segs[i].id);
            continue;
        }
        uint64_t end;
        const char *what;
        int src = scan_segment(fd, segs[i].id, segs[i].bytes, &bl, &end, &rep->records, &what,
                               fn, parg, &done, total, log, arg, &rep->problems);
        seg_unpin(e, segs[i].id);
        rep->segments++;
        rep->bytes += segs[i].bytes;
        if (src == -ENOMEM || src == -ECANCELED) {
            rc = kvd_fail(err, src, src == -ECANCELED ? "verify stopped before it finished"
                                                      : "out of memory while verifying");
            goto out;
        }
        if (src)
            logf_(log, arg, &rep->problems, "segment %016llx offset %llu: %s failed (%s); %llu of "
                  "%llu committed bytes check", (unsigned long long)segs[i].id,
                  (unsigned long long)end, what ? what : "read", kvarc_strerror(src),
                  (unsigned long long)end, (unsigned long long)segs[i].bytes);
    }
    if (bl.n)   /* an empty archive has no list at all: qsort(NULL) is undefined */
        qsort(bl.v, bl.n, sizeof *bl.v, blk_cmp_pos);
    rep->blocks = bl.n;

    /* every extent points at a matching data block; layers are contiguous */
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    if ((rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn)))) {
        kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
        goto out;
    }
    if (!mdb_cursor_open(txn, e->extents, &cur)) {
        uint64_t pconv = UINT64_MAX, expect = 0;
        uint32_t player = UINT32_MAX;
        for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            const uint8_t *kb = k.mv_data;
            uint64_t conv = key_get_u64(kb), first = key_get_u64(kb + 12);
            uint32_t layer = (uint32_t)kb[8] << 24 | (uint32_t)kb[9] << 16 | (uint32_t)kb[10] << 8 | kb[11];
            extent_val ev;
            memcpy(&ev, v.mv_data, sizeof ev);
            rep->extents++;
            conv_rec c;
            int crc = conv_get(e, txn, conv, &c);
            if (crc) {
                logf_(log, arg, &rep->problems, "extent of unknown conversation %llu", (unsigned long long)conv);
                continue;
            }
            if (conv != pconv || layer != player) {
                if (pconv != UINT64_MAX) {
                    conv_rec pc;
                    uint64_t len;
                    if (!conv_get(e, txn, pconv, &pc) && !(pc.flags & KVD_CONV_DELETED) &&
                        !layer_len_get(e, txn, pconv, player, &len) && len != expect)
                        logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u: length %llu but "
                              "extents end at %llu", pc.ns, pc.name, player, (unsigned long long)len,
                              (unsigned long long)expect);
                }
                pconv = conv;
                player = layer;
                expect = c.fork_len;
            }
            if (first != expect && !(c.flags & KVD_CONV_DELETED))
                logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u: extent at %llu, expected "
                      "%llu (gap or overlap)", c.ns, c.name, layer, (unsigned long long)first,
                      (unsigned long long)expect);
            expect = first + ev.count;
            int bi = blk_find(&bl, ev.seg, ev.off);
            if (bi < 0) {
                logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u position %llu: extent "
                      "points at segment %016llx offset %llu where no valid block starts", c.ns,
                      c.name, layer, (unsigned long long)first, (unsigned long long)ev.seg,
                      (unsigned long long)ev.off);
                continue;
            }
            const kvarc_block_header *h = &bl.v[bi].h;
            if (h->kind != KVARC_BLOCK_DATA || h->conv != conv || h->layer != layer ||
                h->first_pos != first || h->count != ev.count)
                logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u position %llu: the block "
                      "at segment %016llx offset %llu is another one", c.ns, c.name, layer,
                      (unsigned long long)first, (unsigned long long)ev.seg, (unsigned long long)ev.off);
        }
        if (pconv != UINT64_MAX) {
            conv_rec pc;
            uint64_t len;
            if (!conv_get(e, txn, pconv, &pc) && !(pc.flags & KVD_CONV_DELETED) &&
                !layer_len_get(e, txn, pconv, player, &len) && len != expect)
                logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u: length %llu but extents "
                      "end at %llu", pc.ns, pc.name, player, (unsigned long long)len, (unsigned long long)expect);
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
    rc = rep->problems ? kvd_fail(err, KVARC_ECORRUPT, "verify found %llu problem(s) in %s",
                                  (unsigned long long)rep->problems, e->dir) : 0;
out:
    free(bl.v);
    free(segs);
    pthread_mutex_unlock(&e->compact_mu);
    return rc;
}

/* ---- rebuild ------------------------------------------------------------ */

typedef struct segfile {
    uint64_t id, valid;
    int fd;
} segfile;

static int seq_cmp(const void *a, const void *b)
{
    const blk *x = a, *y = b;
    if (x->h.seq != y->h.seq)
        return x->h.seq < y->h.seq ? -1 : 1;
    return (x->seg < y->seg) - (x->seg > y->seg);    /* newest copy first */
}

static int put_u64(MDB_txn *txn, MDB_dbi dbi, const char *key, uint64_t v)
{
    MDB_val k = { strlen(key), (void *)key }, d = { 8, &v };
    return kvd_mdb_err(mdb_put(txn, dbi, &k, &d, 0));
}

int kvd_rebuild_index(const char *dir, kvd_progress_fn fn, void *arg, kvd_err *err)
{
    char p[PATH_MAX - 64], q[PATH_MAX];
    int rc = 0, lock_fd = -1;
    segfile *sf = NULL;
    size_t nsf = 0;
    blklist bl = { 0 };
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    uint8_t *buf = NULL;
    if (!dir || strlen(dir) > PATH_MAX - 128)
        return kvd_fail(err, -EINVAL, "rebuild: bad data directory");
    snprintf(p, sizeof p, "%s/LOCK", dir);
    lock_fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0 || flock(lock_fd, LOCK_EX | LOCK_NB)) {
        rc = kvd_fail(err, -EBUSY, "data directory %s is in use (or its lock cannot be taken); stop "
                      "kvarcd first", dir);
        goto out;
    }
    snprintf(p, sizeof p, "%s/segments", dir);
    DIR *dp = opendir(p);
    if (!dp) {
        rc = kvd_fail(err, -errno, "cannot list %s: %s", p, strerror(errno));
        goto out;
    }
    struct dirent *de;
    while ((de = readdir(dp))) {
        uint64_t id;
        if (!seg_parse_name(de->d_name, &id))
            continue;
        segfile *n = realloc(sf, (nsf + 1) * sizeof *n);
        if (!n) {
            closedir(dp);
            rc = kvd_fail(err, -ENOMEM, "out of memory");
            goto out;
        }
        sf = n;
        sf[nsf++] = (segfile){ id, 0, -1 };
    }
    closedir(dp);
    uint64_t total = 0, done = 0, records = 0, maxseg = 0;
    for (size_t i = 0; i < nsf; i++) {
        struct stat st;
        seg_path(dir, sf[i].id, p, sizeof p);
        sf[i].fd = open(p, O_RDONLY | O_CLOEXEC);
        if (sf[i].fd < 0 || fstat(sf[i].fd, &st)) {
            rc = kvd_fail(err, -errno, "cannot open %s: %s", p, strerror(errno));
            goto out;
        }
        total += (uint64_t)st.st_size;
        if (sf[i].id > maxseg)
            maxseg = sf[i].id;
    }
    uint64_t bad_blocks = 0;
    for (size_t i = 0; i < nsf; i++) {
        struct stat st;
        const char *what;
        fstat(sf[i].fd, &st);
        /* blocks whose payload fails are skipped (their layer ends there);
         * a header that fails ends the segment: a torn tail */
        int src = scan_segment(sf[i].fd, sf[i].id, (uint64_t)st.st_size, &bl, &sf[i].valid, &records,
                               &what, fn, arg, &done, total, NULL, NULL, &bad_blocks);
        if (src == -ENOMEM || src == -ECANCELED) {
            rc = kvd_fail(err, src, src == -ECANCELED ? "rebuild stopped before it wrote anything" : "out of memory");
            goto out;
        }
        /* a failing block ends the segment's usable part: a torn tail */
    }
    if (bl.n)
        qsort(bl.v, bl.n, sizeof *bl.v, seq_cmp);

    snprintf(p, sizeof p, "%s/index.rebuild", dir);
    mkdir(p, 0700);
    snprintf(q, sizeof q, "%s/data.mdb", p);
    unlink(q);
    snprintf(q, sizeof q, "%s/lock.mdb", p);
    unlink(q);
    kvd_engine shadow;                 /* only the dbi handles are used */
    memset(&shadow, 0, sizeof shadow);
    if ((rc = kvd_mdb_err(mdb_env_create(&env))) || (rc = kvd_mdb_err(mdb_env_set_maxdbs(env, 8))) ||
        (rc = kvd_mdb_err(mdb_env_set_mapsize(env, 64ull << 30))) ||
        (rc = kvd_mdb_err(mdb_env_open(env, p, MDB_NOTLS, 0600))) ||
        (rc = kvd_mdb_err(mdb_txn_begin(env, NULL, 0, &txn)))) {
        kvd_fail(err, rc, "cannot create the new index in %s: %s", p, kvarc_strerror(rc));
        goto out;
    }
    shadow.env = env;
    struct { const char *name; MDB_dbi *dbi; } dbs[] = {
        { "meta", &shadow.meta }, { "names", &shadow.names }, { "convs", &shadow.convs },
        { "means", &shadow.means }, { "layers", &shadow.layers }, { "extents", &shadow.extents },
        { "segs", &shadow.segs },
    };
    for (size_t i = 0; i < sizeof dbs / sizeof dbs[0]; i++)
        if ((rc = kvd_mdb_err(mdb_dbi_open(txn, dbs[i].name, MDB_CREATE, dbs[i].dbi))))
            goto out;
    uint64_t maxconv = 0, maxseq = 0;
    for (size_t i = 0; i < bl.n && !rc; i++) {
        blk *b = &bl.v[i];
        kvarc_block_header *h = &b->h;
        if (h->seq > maxseq)
            maxseq = h->seq;
        conv_rec c;
        int have = conv_get(&shadow, txn, h->conv, &c) == 0;
        segfile *s = NULL;
        for (size_t j = 0; j < nsf; j++)
            if (sf[j].id == b->seg)
                s = &sf[j];
        if (h->kind == KVARC_BLOCK_CONV_CREATE) {
            if (have)
                continue;                              /* an older copy of the same block */
            size_t bytes = h->payload_bytes;
            uint8_t *n = realloc(buf, bytes);
            if (!n) {
                rc = -ENOMEM;
                break;
            }
            buf = n;
            if ((rc = seg_pread_full(s->fd, buf, bytes, b->off + KVARC_BLOCK_HEADER)))
                break;
            memcpy(&c, buf, sizeof c);
            c.ns[KVD_NS_MAX - 1] = 0;
            c.name[KVD_NAME_MAX - 1] = 0;
            c.create_seg = b->seg;
            c.create_off = b->off;
            c.flags &= ~KVD_CONV_DELETED;
            if (sizeof c + means_floats(&c.shape) * sizeof(float) > bytes)
                continue;                              /* malformed: skip */
            uint8_t kb[8];
            key_u64(kb, h->conv);
            MDB_val k = { 8, kb }, nk, nv = { 8, &h->conv };
            MDB_val mv = { means_floats(&c.shape) * sizeof(float), buf + sizeof c };
            char nb[KVD_NS_MAX + KVD_NAME_MAX];
            name_key(nb, sizeof nb, c.ns, c.name, &nk);
            if ((rc = conv_put(&shadow, txn, h->conv, &c)) ||
                (rc = kvd_mdb_err(mdb_put(txn, shadow.names, &nk, &nv, 0))) ||
                (rc = kvd_mdb_err(mdb_put(txn, shadow.means, &k, &mv, 0))))
                break;
            if (c.fork_len)
                for (uint32_t l = 0; l < c.shape.n_layers && !rc; l++)
                    rc = layer_len_put(&shadow, txn, h->conv, l, c.fork_len);
            if (h->conv > maxconv)
                maxconv = h->conv;
        } else if (h->kind == KVARC_BLOCK_CONV_DELETE) {
            if (!have || (c.flags & KVD_CONV_DELETED))
                continue;
            c.flags |= KVD_CONV_DELETED;
            char nb[KVD_NS_MAX + KVD_NAME_MAX];
            MDB_val nk;
            name_key(nb, sizeof nb, c.ns, c.name, &nk);
            if ((rc = conv_put(&shadow, txn, h->conv, &c)))
                break;
            mdb_del(txn, shadow.names, &nk, NULL);
        } else {
            uint64_t len;
            if (!have || h->layer >= c.shape.n_layers || layer_len_get(&shadow, txn, h->conv, h->layer, &len) ||
                h->first_pos != len)
                continue;                              /* unknown conv, duplicate copy, or gap */
            uint8_t kb[20];
            extent_key(kb, h->conv, h->layer, h->first_pos);
            extent_val ev = { b->seg, b->off, h->count, (uint32_t)(KVARC_BLOCK_HEADER + h->payload_bytes) };
            MDB_val k = { 20, kb }, v = { sizeof ev, &ev };
            if ((rc = kvd_mdb_err(mdb_put(txn, shadow.extents, &k, &v, 0))) ||
                (rc = layer_len_put(&shadow, txn, h->conv, h->layer, len + h->count)))
                break;
        }
    }
    for (size_t i = 0; i < nsf && !rc; i++) {
        uint8_t kb[8];
        key_u64(kb, sf[i].id);
        seg_val sv = { .state = sf[i].id == maxseg ? SEG_OPEN : SEG_SEALED, .bytes = sf[i].valid };
        MDB_val k = { 8, kb }, v = { sizeof sv, &sv };
        rc = kvd_mdb_err(mdb_put(txn, shadow.segs, &k, &v, 0));
    }
    if (!rc && !(rc = put_u64(txn, shadow.meta, "next_conv", maxconv + 1)) &&
        !(rc = put_u64(txn, shadow.meta, "next_seg", maxseg + 1)) &&
        !(rc = put_u64(txn, shadow.meta, "seq", maxseq + 1))) {
        rc = kvd_mdb_err(mdb_txn_commit(txn));
        txn = NULL;
    }
    if (rc) {
        kvd_fail(err, rc, "rebuilding the index of %s failed: %s", dir, kvarc_strerror(rc));
        goto out;
    }
    mdb_env_sync(env, 1);
    mdb_env_close(env);
    env = NULL;
    /* swap: index -> index.old, index.rebuild -> index */
    char old[PATH_MAX - 64], cur[PATH_MAX - 64];
    snprintf(cur, sizeof cur, "%s/index", dir);
    snprintf(old, sizeof old, "%s/index.old", dir);
    snprintf(q, sizeof q, "%s/data.mdb", old);
    unlink(q);
    snprintf(q, sizeof q, "%s/lock.mdb", old);
    unlink(q);
    rmdir(old);
    if (rename(cur, old) && errno != ENOENT) {
        rc = kvd_fail(err, -errno, "cannot move %s aside: %s", cur, strerror(errno));
        goto out;
    }
    if (rename(p, cur)) {
        rc = kvd_fail(err, -errno, "cannot move %s into place: %s", p, strerror(errno));
        goto out;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
out:
    if (txn)
        mdb_txn_abort(txn);
    if (env)
        mdb_env_close(env);
    for (size_t i = 0; i < nsf; i++)
        if (sf[i].fd >= 0)
            close(sf[i].fd);
    free(sf);
    free(bl.v);
    free(buf);
    if (lock_fd >= 0)
        close(lock_fd);
    return rc;
}
