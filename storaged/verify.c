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

#include "cluster.h"
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

/* What block_walk finds in one segment: valid blocks into out, damage
 * reported through bad (verify) or only counted (rebuild). */
typedef struct scan_ctx {
    blklist *out;
    uint64_t *records, *problems;
    log_fn    bad;
    void     *bad_arg;
    kvd_progress_fn fn;
    void     *parg;
    uint64_t *done, total;
} scan_ctx;

static int scan_block(void *arg, uint64_t seg, uint64_t off, const kvarc_block_header *h,
                      const uint8_t *block, const char *bad, uint64_t bytes)
{
    scan_ctx *sc = arg;
    if (bad) {
        if (h)
            logf_(sc->bad, sc->bad_arg, sc->problems, "segment %016llx offset %llu: %s failed "
                  "(conversation %llu layer %u positions %llu..%llu); %llu bytes skipped",
                  (unsigned long long)seg, (unsigned long long)off, bad, (unsigned long long)h->conv,
                  h->layer, (unsigned long long)h->first_pos,
                  (unsigned long long)(h->first_pos + h->count - 1), (unsigned long long)bytes);
        else
            logf_(sc->bad, sc->bad_arg, sc->problems, "segment %016llx offset %llu: %s failed; %llu "
                  "bytes skipped to the next valid block", (unsigned long long)seg,
                  (unsigned long long)off, bad, (unsigned long long)bytes);
    } else {
        blk b = { .seg = seg, .off = off, .h = *h };
        int rc = blk_push(sc->out, &b);
        if (rc)
            return rc;
        if (h->kind == KVARC_BLOCK_DATA)
            *sc->records += (uint64_t)h->count * h->n_heads;
        (void)block;
    }
    *sc->done += bytes;
    return sc->fn && sc->fn(sc->parg, *sc->done, sc->total) ? -ECANCELED : 0;
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

static uint32_t key_get_u32(const uint8_t *k)
{
    return (uint32_t)k[0] << 24 | (uint32_t)k[1] << 16 | (uint32_t)k[2] << 8 | k[3];
}

/* A table walked to its end ends with MDB_NOTFOUND; anything else is a
 * damaged index (a walk that stopped early checked nothing after it). */
static void walk_end(int rc, const char *table, kvd_verify_report *rep, log_fn log, void *arg)
{
    if (rc != MDB_NOTFOUND)
        logf_(log, arg, &rep->problems, "the index's %s table cannot be read to its end: %s", table,
              mdb_strerror(rc));
}

/* Every conversation opens as kvd_conv_open would open it: its record,
 * its name both ways, its means, its layer lengths, its creating block. */
static void verify_convs(kvd_engine *e, MDB_txn *txn, const blklist *bl, kvd_verify_report *rep,
                         log_fn log, void *arg)
{
    MDB_cursor *cur;
    MDB_val k, v;
    if (mdb_cursor_open(txn, e->convs, &cur)) {
        logf_(log, arg, &rep->problems, "the index's conversations table cannot be read");
        return;
    }
    int wrc = 0;
    for (int op = MDB_FIRST; !(wrc = mdb_cursor_get(cur, &k, &v, op)); op = MDB_NEXT) {
        if (k.mv_size != 8 || v.mv_size != sizeof(conv_rec)) {
            logf_(log, arg, &rep->problems, "conversation record %s is damaged (%zu bytes, expected %zu): "
                  "it cannot be opened", k.mv_size == 8 ? "entry" : "key", v.mv_size, sizeof(conv_rec));
            continue;
        }
        uint64_t id = key_get_u64(k.mv_data);
        conv_rec c;
        memcpy(&c, v.mv_data, sizeof c);
        if (c.flags & KVD_CONV_DELETED)
            continue;
        if (!memchr(c.ns, 0, sizeof c.ns) || !memchr(c.name, 0, sizeof c.name) ||
            !kvd_name_valid(c.ns, KVD_NS_MAX) || !kvd_name_valid(c.name, KVD_NAME_MAX)) {
            logf_(log, arg, &rep->problems, "conversation %llu: its name in the index is damaged",
                  (unsigned long long)id);
            continue;
        }
        const kvd_shape *s = &c.shape;
        kvd_err why;
        if (shape_check(s, &why)) {
            logf_(log, arg, &rep->problems, "conversation '%s/%s' (%llu): its shape in the index is damaged (%s)",
                  c.ns, c.name, (unsigned long long)id, why.msg);
            continue;
        }
        char nb[KVD_NS_MAX + KVD_NAME_MAX];
        MDB_val nk, nv;
        name_key(nb, sizeof nb, c.ns, c.name, &nk);
        uint64_t nid = 0;
        if (mdb_get(txn, e->names, &nk, &nv) || nv.mv_size != 8 || (memcpy(&nid, nv.mv_data, 8), nid != id))
            logf_(log, arg, &rep->problems, "conversation '%s/%s' (%llu): the name table does not lead to it "
                  "(it cannot be opened by name)", c.ns, c.name, (unsigned long long)id);
        MDB_val mv;
        if (mdb_get(txn, e->means, &k, &mv) || mv.mv_size != means_floats(s) * sizeof(float))
            logf_(log, arg, &rep->problems, "conversation '%s/%s': its centering means are missing or damaged",
                  c.ns, c.name);
        if (c.parent) {
            conv_rec pc;
            if (conv_get(e, txn, c.parent, &pc))
                logf_(log, arg, &rep->problems, "conversation '%s/%s': its fork parent %llu is missing",
                      c.ns, c.name, (unsigned long long)c.parent);
        }
        for (uint32_t l = 0; l < s->n_layers; l++) {
            uint8_t lk[12];
            layer_key(lk, id, l);
            MDB_val lkv = { 12, lk }, lv;
            int lrc = mdb_get(txn, e->layers, &lkv, &lv);
            uint64_t len = 0;
            if (lrc == 0 && lv.mv_size == 8)
                memcpy(&len, lv.mv_data, 8);
            if ((lrc && lrc != MDB_NOTFOUND) || (lrc == 0 && lv.mv_size != 8) || len < c.fork_len) {
                logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u: its length in the index "
                      "is damaged", c.ns, c.name, l);
                break;
            }
            /* its own part must have extents up to the length (a walk of
             * the extents table cannot see a layer that has none at all) */
            uint64_t owner, f;
            extent_val ev;
            if (len > c.fork_len && (extent_resolve(e, txn, id, l, len - 1, &owner, &f, &ev, NULL) || owner != id)) {
                logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u: position %llu, inside its "
                      "length, has no extent in the index", c.ns, c.name, l, (unsigned long long)(len - 1));
                break;
            }
        }
        int bi = blk_find(bl, c.create_seg, c.create_off);
        if (bi < 0 || bl->v[bi].h.kind != KVARC_BLOCK_CONV_CREATE || bl->v[bi].h.conv != id)
            logf_(log, arg, &rep->problems, "conversation '%s/%s': the index says it was created by the "
                  "block at segment %016llx offset %llu, where no such block is", c.ns, c.name,
                  (unsigned long long)c.create_seg, (unsigned long long)c.create_off);
    }
    mdb_cursor_close(cur);
    walk_end(wrc, "conversations", rep, log, arg);
    /* and every name leads to a live conversation of that name */
    if (mdb_cursor_open(txn, e->names, &cur)) {
        logf_(log, arg, &rep->problems, "the index's names table cannot be read");
        return;
    }
    wrc = 0;
    for (int op = MDB_FIRST; !(wrc = mdb_cursor_get(cur, &k, &v, op)); op = MDB_NEXT) {
        uint64_t id = 0;
        conv_rec c;
        if (v.mv_size == 8)
            memcpy(&id, v.mv_data, 8);
        if (v.mv_size != 8 || conv_get(e, txn, id, &c) || (c.flags & KVD_CONV_DELETED))
            logf_(log, arg, &rep->problems, "name '%.*s' leads to no live conversation",
                  (int)(k.mv_size < 200 ? k.mv_size : 200), (const char *)k.mv_data);
    }
    mdb_cursor_close(cur);
    walk_end(wrc, "names", rep, log, arg);
}

static int count_block(void *arg, uint64_t seg, uint64_t off, const kvarc_block_header *h,
                       const uint8_t *block, const char *bad, uint64_t bytes)
{
    (void)seg; (void)off; (void)h; (void)block; (void)bytes;
    *(uint64_t *)arg += !bad;
    return 0;
}

/* A stopped directory (kvd_open_check): the index's segments that do not
 * open, and segment files the index does not list. */
static void verify_files(kvd_engine *e, MDB_txn *txn, kvd_verify_report *rep, log_fn log, void *arg)
{
    MDB_cursor *cur;
    MDB_val k, v;
    char p[PATH_MAX];
    if (!mdb_cursor_open(txn, e->segs, &cur)) {
        int wrc = 0;
        for (int op = MDB_FIRST; !(wrc = mdb_cursor_get(cur, &k, &v, op)); op = MDB_NEXT) {
            seg_val sv;
            if (k.mv_size != 8 || v.mv_size != sizeof sv) {
                logf_(log, arg, &rep->problems, "a segment entry of the index is damaged");
                continue;
            }
            memcpy(&sv, v.mv_data, sizeof sv);
            uint64_t id = key_get_u64(k.mv_data);
            if (sv.state != SEG_DEAD && !segtab_find(e, id)) {
                seg_path(e->dir, id, p, sizeof p);
                logf_(log, arg, &rep->problems, "segment %016llx is listed in the index (%llu committed "
                      "bytes) but %s cannot be opened", (unsigned long long)id, (unsigned long long)sv.bytes, p);
            }
        }
        mdb_cursor_close(cur);
        walk_end(wrc, "segments", rep, log, arg);
    } else {
        logf_(log, arg, &rep->problems, "the index's segments table cannot be read");
    }
    snprintf(p, sizeof p, "%s/segments", e->dir);
    DIR *dp = opendir(p);
    struct dirent *de;
    while (dp && (de = readdir(dp))) {
        uint64_t id, n = 0, vend;
        uint8_t kb[8];
        if (!seg_parse_name(de->d_name, &id))
            continue;
        key_u64(kb, id);
        MDB_val sk = { 8, kb }, sv;
        if (mdb_get(txn, e->segs, &sk, &sv) == 0)
            continue;
        seg_path(e->dir, id, p, sizeof p);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd >= 0 && !fstat(fd, &st))
            block_walk(fd, id, 0, 0, (uint64_t)st.st_size, count_block, &n, &vend);
        if (fd >= 0)
            close(fd);
        if (n)
            logf_(log, arg, &rep->problems, "segment file %s is not in the index but holds %llu valid "
                  "block(s): at start kvarcd replays those the index lacks, or removes the file when it "
                  "needs none", p, (unsigned long long)n);
    }
    if (dp)
        closedir(dp);
}

/* The counters new ids come from must be past every id in use, or the
 * next create, block or segment would take one again. */
static void verify_counters(kvd_engine *e, MDB_txn *txn, const blklist *bl, const kvd_seg *segs, size_t nseg,
                            kvd_verify_report *rep, log_fn log, void *arg)
{
    uint64_t seq = 0, conv = 0, seg = 0;
    for (size_t i = 0; i < bl->n; i++) {
        if (bl->v[i].h.seq > seq)
            seq = bl->v[i].h.seq;
        if (bl->v[i].h.conv > conv)
            conv = bl->v[i].h.conv;
    }
    for (size_t i = 0; i < nseg; i++)
        if (segs[i].id > seg)
            seg = segs[i].id;
    const struct { const char *name; uint64_t in_use; } c[] = {
        { "seq", seq }, { "next_conv", conv }, { "next_seg", seg },
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        uint64_t next;
        if (meta_get(e, txn, c[i].name, 0, &next) || (c[i].in_use && next <= c[i].in_use))
            logf_(log, arg, &rep->problems, "the index's counter %s is %llu, but %llu is in use: the next one "
                  "would be given twice", c[i].name, (unsigned long long)next, (unsigned long long)c[i].in_use);
    }
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
    MDB_txn *txn = NULL;
    pthread_mutex_lock(&e->compact_mu);
    atomic_fetch_add(&e->n_verifies, 1);
    /* the index view first: every extent it holds then lies within the
     * committed sizes read next (the table grows after each commit) */
    if ((rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn)))) {
        pthread_mutex_unlock(&e->compact_mu);
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    }

    /* the committed segments, as the index says (pinned while scanned) */
    pthread_mutex_lock(&e->seg_mu);
    size_t nseg = e->nseg;
    kvd_seg *segs = malloc((nseg ? nseg : 1) * sizeof *segs);
    if (segs)
        memcpy(segs, e->segtab, nseg * sizeof *segs);
    pthread_mutex_unlock(&e->seg_mu);
    if (!segs) {
        mdb_txn_abort(txn);
        pthread_mutex_unlock(&e->compact_mu);
        return kvd_fail(err, -ENOMEM, "out of memory");
    }
    uint64_t total = 0, done = 0;
    for (size_t i = 0; i < nseg; i++)
        if (segs[i].state != SEG_DEAD)
            total += segs[i].bytes;
    scan_ctx sc = { &bl, &rep->records, &rep->problems, log, arg, fn, parg, &done, total };
    for (size_t i = 0; i < nseg; i++) {
        /* scan what this view's index committed: the table's size grows
         * only after a commit, so a view begun between the two would see
         * extents past the table's size */
        uint8_t skb[8];
        key_u64(skb, segs[i].id);
        MDB_val sk = { 8, skb }, sv;
        seg_val segv;
        if (mdb_get(txn, e->segs, &sk, &sv) || sv.mv_size != sizeof segv)
            continue;                         /* created after this view began */
        memcpy(&segv, sv.mv_data, sizeof segv);
        segs[i].bytes = segv.bytes;
        segs[i].state = segv.state;
        if (segs[i].state == SEG_DEAD)
            continue;
        int fd = seg_pin(e, segs[i].id);
        if (fd < 0) {
            logf_(log, arg, &rep->problems, "segment %016llx: listed but not open",
                  (unsigned long long)segs[i].id);
            continue;
        }
        struct stat st;
        uint64_t end = segs[i].bytes, vend;
        if (fstat(fd, &st))
            st.st_size = (off_t)end;                 /* unknown: take the index's word */
        if ((uint64_t)st.st_size < end) {
            logf_(log, arg, &rep->problems, "segment %016llx is %llu bytes, shorter than its committed %llu: "
                  "the bytes after %llu are missing", (unsigned long long)segs[i].id,
                  (unsigned long long)st.st_size, (unsigned long long)end, (unsigned long long)st.st_size);
            end = (uint64_t)st.st_size;
        }
        int src = block_walk(fd, segs[i].id, 0, 0, end, scan_block, &sc, &vend);
        /* the index of a stopped directory may be behind its segments:
         * kvarcd replays those blocks at start (online the tail past the
         * committed size is a batch being written) */
        uint64_t behind = 0;
        if (!src && e->check_only && (uint64_t)st.st_size > segs[i].bytes)
            src = block_walk(fd, segs[i].id, segs[i].bytes, 0, (uint64_t)st.st_size, count_block, &behind, &vend);
        seg_unpin(e, segs[i].id);
        rep->segments++;
        rep->bytes += end;
        if (src == -ENOMEM || src == -ECANCELED) {
            rc = kvd_fail(err, src, src == -ECANCELED ? "verify stopped before it finished"
                                                      : "out of memory while verifying");
            goto out;
        }
        if (src)
            logf_(log, arg, &rep->problems, "segment %016llx: reading it failed: %s",
                  (unsigned long long)segs[i].id, kvarc_strerror(src));
        if (behind)
            logf_(log, arg, &rep->problems, "segment %016llx holds %llu valid block(s) past its committed "
                  "size %llu: the index is behind its segments (kvarcd replays them into it at start)",
                  (unsigned long long)segs[i].id, (unsigned long long)behind, (unsigned long long)segs[i].bytes);
    }
    if (bl.n)   /* an empty archive has no list at all: qsort(NULL) is undefined */
        qsort(bl.v, bl.n, sizeof *bl.v, blk_cmp_pos);
    rep->blocks = bl.n;

    /* every extent points at a matching data block, reads find it where it
     * says, and layers are contiguous */
    MDB_cursor *cur;
    MDB_val k, v;
    verify_convs(e, txn, &bl, rep, log, arg);
    if (!mdb_cursor_open(txn, e->extents, &cur)) {
        uint64_t pconv = UINT64_MAX, expect = 0;
        uint32_t player = UINT32_MAX;
        int wrc = 0;
        for (int op = MDB_FIRST; !(wrc = mdb_cursor_get(cur, &k, &v, op)); op = MDB_NEXT) {
            rep->extents++;
            if (k.mv_size != 20 || v.mv_size != sizeof(extent_val)) {
                logf_(log, arg, &rep->problems, "an extent entry is damaged (key %zu bytes, value %zu)",
                      k.mv_size, v.mv_size);
                continue;
            }
            const uint8_t *kb = k.mv_data;
            uint64_t conv = key_get_u64(kb), first = key_get_u64(kb + 12);
            uint32_t layer = key_get_u32(kb + 8);
            extent_val ev;
            memcpy(&ev, v.mv_data, sizeof ev);
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
            if (c.flags & KVD_CONV_DELETED) {
                expect = first + ev.count;
                continue;
            }
            if (first != expect)
                logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u: extent at %llu, expected "
                      "%llu (gap or overlap)", c.ns, c.name, layer, (unsigned long long)first,
                      (unsigned long long)expect);
            expect = first + ev.count;
            /* the path reads take (a seek, not a walk) must land on it */
            uint64_t owner, f;
            extent_val rv;
            for (int end = 0; end < 2 && ev.count; end++) {
                uint64_t pos = end ? first + ev.count - 1 : first;
                int rrc = extent_resolve(e, txn, conv, layer, pos, &owner, &f, &rv, NULL);
                if (rrc || owner != conv || f != first || rv.seg != ev.seg || rv.off != ev.off) {
                    logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u position %llu: a read "
                          "does not find the extent that holds it (%s)", c.ns, c.name, layer,
                          (unsigned long long)pos, rrc ? kvarc_strerror(rrc) : "it finds another");
                    break;
                }
            }
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
                h->first_pos != first || h->count != ev.count ||
                ev.bytes != KVARC_BLOCK_HEADER + h->payload_bytes)
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
        walk_end(wrc, "extents", rep, log, arg);
    } else {
        logf_(log, arg, &rep->problems, "the index's extents table cannot be read");
    }
    if (e->check_only)
        verify_files(e, txn, rep, log, arg);
    verify_counters(e, txn, &bl, segs, nseg, rep, log, arg);
    /* and the other way: a valid data block of a live conversation past
     * its layer's length is data the index lost */
    for (size_t i = 0; i < bl.n; i++) {
        const kvarc_block_header *h = &bl.v[i].h;
        conv_rec c;
        uint64_t len;
        uint8_t sk[8];
        key_u64(sk, bl.v[i].seg);
        MDB_val skv = { 8, sk }, sv;
        seg_val segv;
        if (mdb_get(txn, e->segs, &skv, &sv) || sv.mv_size != sizeof segv ||
            (memcpy(&segv, sv.mv_data, sizeof segv), bl.v[i].off + KVARC_BLOCK_HEADER + h->payload_bytes > segv.bytes))
            continue;                   /* committed after this view began */
        if (h->kind != KVARC_BLOCK_DATA || conv_get(e, txn, h->conv, &c) || (c.flags & KVD_CONV_DELETED) ||
            h->layer >= c.shape.n_layers || layer_len_get(e, txn, h->conv, h->layer, &len) ||
            h->first_pos + h->count <= len)
            continue;
        logf_(log, arg, &rep->problems, "conversation '%s/%s' layer %u: the valid block at segment %016llx "
              "offset %llu holds positions %llu..%llu, past the %llu tokens the index has: the index lost "
              "them (with kvarcd stopped, `kvarc rebuild-index %s` takes them back)", c.ns, c.name, h->layer,
              (unsigned long long)bl.v[i].seg, (unsigned long long)bl.v[i].off,
              (unsigned long long)h->first_pos, (unsigned long long)(h->first_pos + h->count - 1),
              (unsigned long long)len, e->dir);
    }
    if (e->cluster) {   /* and the pool's logs, which the cache was made from */
        kvd_err cerr = { 0, "" };
        if ((rc = clu_verify(e, &rep->problems, log, arg, &cerr))) {
            *err = cerr;
            goto out;
        }
    }
    rc = rep->problems ? kvd_fail(err, KVARC_ECORRUPT, "verify found %llu problem(s) in %s%s",
                                  (unsigned long long)rep->problems, e->dir,
                                  e->cluster ? " and its pool" : "") : 0;
out:
    if (txn)
        mdb_txn_abort(txn);
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

int kvd_rebuild_index(const char *dir, log_fn log, void *larg, uint64_t *dropped_out, kvd_progress_fn fn,
                      void *arg, kvd_err *err)
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
    uint64_t bad_ranges = 0;
    scan_ctx sc = { &bl, &records, &bad_ranges, NULL, NULL, fn, arg, &done, total };
    for (size_t i = 0; i < nsf; i++) {
        struct stat st;
        if (fstat(sf[i].fd, &st)) {
            rc = kvd_fail(err, -errno, "cannot stat segment %016llx of %s: %s", (unsigned long long)sf[i].id,
                          dir, strerror(errno));
            goto out;
        }
        /* damage is skipped: blocks after it still count */
        int src = block_walk(sf[i].fd, sf[i].id, 0, 0, (uint64_t)st.st_size, scan_block, &sc, &sf[i].valid);
        if (src == -ENOMEM || src == -ECANCELED) {
            rc = kvd_fail(err, src, src == -ECANCELED ? "rebuild stopped before it wrote anything" : "out of memory");
            goto out;
        }
        if (src) {
            seg_path(dir, sf[i].id, p, sizeof p);
            rc = kvd_fail(err, src, "cannot read %s: %s", p, kvarc_strerror(src));
            goto out;
        }
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
    uint64_t maxconv = 0, dropped = 0;
    for (size_t i = 0; i < bl.n && !rc; i++) {
        blk *b = &bl.v[i];
        kvarc_block_header *h = &b->h;
        if (h->conv > maxconv)          /* every kind: a purged conversation's id is not given again */
            maxconv = h->conv;
        segfile *s = NULL;
        for (size_t j = 0; j < nsf; j++)
            if (sf[j].id == b->seg)
                s = &sf[j];
        size_t bytes = KVARC_BLOCK_HEADER + (size_t)h->payload_bytes;
        if (h->kind != KVARC_BLOCK_DATA) {     /* data blocks are replayed from their header */
            uint8_t *n = realloc(buf, bytes);
            if (!n) {
                rc = -ENOMEM;
                break;
            }
            buf = n;
            if ((rc = seg_pread_full(s->fd, buf, bytes, b->off)))
                break;
        }
        kvd_err why = { 0, "" };
        int arc = replay_block(&shadow, txn, h, buf, b->seg, b->off, &why);
        if (arc == KVARC_ECORRUPT) {           /* a gap or a block nothing can take: skipped */
            dropped++;
            if (log)
                logf_(log, larg, NULL, "segment %016llx offset %llu (conversation %llu layer %u positions "
                      "%llu..+%u) left out: %s", (unsigned long long)b->seg, (unsigned long long)b->off,
                      (unsigned long long)h->conv, h->layer, (unsigned long long)h->first_pos, h->count,
                      why.msg);
        } else if (arc < 0) {
            rc = arc;
        }
    }
    for (size_t i = 0; i < nsf && !rc; i++) {
        uint8_t kb[8];
        key_u64(kb, sf[i].id);
        seg_val sv = { .state = sf[i].id == maxseg ? SEG_OPEN : SEG_SEALED, .bytes = sf[i].valid };
        MDB_val k = { 8, kb }, v = { sizeof sv, &sv };
        rc = kvd_mdb_err(mdb_put(txn, shadow.segs, &k, &v, 0));
    }
    /* replay raised seq and next_conv past what it applied; ids of blocks
     * it left out are not given again either */
    if (!rc && !(rc = meta_at_least(&shadow, txn, "next_conv", maxconv + 1)) &&
        !(rc = meta_at_least(&shadow, txn, "next_seg", maxseg + 1))) {
        rc = kvd_mdb_err(mdb_txn_commit(txn));
        txn = NULL;
    }
    if (dropped_out)
        *dropped_out = dropped;
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
