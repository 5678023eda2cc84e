/* replay.c - segments read back as blocks, and what each block does to
 * the index: shared by recovery (roll-forward), verify and rebuild-index.
 *
 * Design notes
 *
 * Walking a segment (block_walk). Blocks follow each other with no gap;
 * a block's header says how long it is. A header that does not decode
 * (or a block that runs past the file's end, or whose payload fails its
 * checksums when the caller asks for payloads) does not end the walk: it
 * resynchronises on the next offset where a whole valid block starts
 * (magic, header CRC, payload CRCs), and reports the bytes it skipped.
 * Only a block that checks completely is ever handed on.
 *
 * Replaying a block (replay_block) against an index in a write txn:
 *   DATA:        the conversation must exist with that shape; an extent
 *                already at (conv, layer, first_pos) of the same count is
 *                the block itself or a copy (compaction): nothing to do;
 *                else it must start exactly at the layer's length: added.
 *   CONV_CREATE: a conversation already under that id: nothing to do
 *                (a copy); else created as the block says.
 *   CONV_DELETE: applied once; a conversation already gone: nothing.
 * Anything else (a gap, an overlap, an unknown conversation, a name taken
 * by another id) is a conflict: KVARC_ECORRUPT with a message; rebuild
 * counts and skips it, recovery refuses to start.
 *
 * Roll-forward (recover_roll_forward). The index's committed size of a
 * segment is where acknowledged data ends, as far as the index knows. But
 * the index can be behind its segments: a crash between fdatasync and the
 * LMDB commit (the batch was not acknowledged, yet its blocks are whole
 * and durable), or a damaged LMDB meta page that makes LMDB open the
 * previous transaction, or a damaged committed size. Invariants:
 *  1. Recovery never discards a block that checks. Bytes are cut from a
 *     segment's end only where no valid block starts at or after them.
 *  2. Valid blocks past what the index knows (past a segment's committed
 *     size, or in a segment file the index does not list) are replayed in
 *     sequence order; when every one applies or is already there, the
 *     committed sizes grow over them and recovery goes on.
 *  3. When one conflicts, nothing is changed and kvarcd refuses to start,
 *     naming `kvarc verify DIR` and `kvarc rebuild-index DIR`.
 *  4. A segment file the index does not list and none of whose blocks was
 *     needed (an uncommitted compaction output, an empty roll) is removed
 *     as before; but one the index refers to (its segment table damaged)
 *     makes recovery refuse, never a removal. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvd_internal.h"

int block_check_payload(const kvarc_block_header *h, const uint8_t *block, const char **what,
                        uint64_t *records)
{
    if (h->kind != KVARC_BLOCK_DATA) {
        *what = "metadata payload checksum";
        return kvarc_crc32c(0, block + KVARC_BLOCK_HEADER, h->payload_bytes) == h->payload_crc
                   ? 0 : KVARC_ECORRUPT;
    }
    if (h->n_heads == 0 || kvarc_head_dim_check(h->head_dim) ||
        h->payload_bytes != kvarc_block_payload_bytes_sum(h->count, h->head_dim, h->n_heads, h->rec_bytes,
                                                          h->n_sum)) {
        *what = "data block geometry";
        return KVARC_ECORRUPT;
    }
    size_t sec = kvarc_block_sig_section(h->count, h->head_dim), ssec = kvarc_block_sum_section(h->n_sum, h->head_dim);
    for (int hd = 0; hd < h->n_heads; hd++) {
        const uint8_t *p = block + kvarc_block_sig_offset(h, hd);
        uint32_t crc;
        if (ssec) {
            const uint8_t *q = block + kvarc_block_sum_offset(h, hd);
            memcpy(&crc, q + ssec - 4, 4);
            if (crc != kvarc_sum_section_crc(h->conv, h->layer, h->first_pos, (uint32_t)hd, q, ssec - 4)) {
                *what = "summary section checksum";
                return KVARC_ECORRUPT;
            }
        }
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
    }
    if (records)
        *records += (uint64_t)h->count * h->n_heads;
    return 0;
}

/* Read the block at off (its header already in h) whole into *buf and
 * check it. 0, KVARC_ECORRUPT (*what set), or an I/O error. */
static int read_block(int fd, uint64_t off, const kvarc_block_header *h, uint8_t **buf, size_t *cap,
                      const char **what)
{
    size_t bytes = KVARC_BLOCK_HEADER + (size_t)h->payload_bytes;
    if (bytes > *cap) {
        uint8_t *n = realloc(*buf, bytes);
        if (!n)
            return -ENOMEM;
        *buf = n;
        *cap = bytes;
    }
    int rc = seg_pread_full(fd, *buf, bytes, off);
    if (rc)
        return rc;
    return block_check_payload(h, *buf, what, NULL);
}

/* The next offset in (from, end) where a whole valid block starts; end if
 * none. Reads in 1 MiB windows and tries every offset whose bytes are the
 * magic. */
static int resync(int fd, uint64_t from, uint64_t end, uint64_t *next, uint8_t **buf, size_t *cap)
{
    enum { WIN = 1 << 20 };
    size_t wcap = end - from < WIN + KVARC_BLOCK_HEADER ? (size_t)(end - from) : WIN + KVARC_BLOCK_HEADER;
    uint8_t *w = malloc(wcap ? wcap : 1);     /* a small file needs no 1 MiB window */
    if (!w)
        return -ENOMEM;
    const uint8_t magic[4] = { KVARC_BLOCK_MAGIC & 0xff, (KVARC_BLOCK_MAGIC >> 8) & 0xff,
                               (KVARC_BLOCK_MAGIC >> 16) & 0xff, KVARC_BLOCK_MAGIC >> 24 };
    int rc = 0;
    *next = end;
    for (uint64_t base = from + 1; base + KVARC_BLOCK_HEADER <= end; base += WIN) {
        size_t n = (size_t)(end - base < WIN + KVARC_BLOCK_HEADER ? end - base : WIN + KVARC_BLOCK_HEADER);
        if ((rc = seg_pread_full(fd, w, n, base)))
            break;
        for (size_t i = 0; i + KVARC_BLOCK_HEADER <= n && i < WIN; i++) {
            const uint8_t *m = memchr(w + i, magic[0], n - KVARC_BLOCK_HEADER + 1 - i);
            if (!m)
                break;
            i = (size_t)(m - w);
            if (i >= WIN)
                break;
            if (memcmp(m, magic, 4))
                continue;
            kvarc_block_header h;
            const char *what;
            if (kvarc_block_header_decode(w + i, &h) ||
                base + i + KVARC_BLOCK_HEADER + h.payload_bytes > end)
                continue;
            int brc = read_block(fd, base + i, &h, buf, cap, &what);
            if (brc == KVARC_ECORRUPT)
                continue;
            if (brc) {
                rc = brc;
                goto out;
            }
            *next = base + i;
            goto out;
        }
    }
out:
    free(w);
    return rc;
}

int block_walk(int fd, uint64_t seg, uint64_t start, uint64_t check_from, uint64_t end, block_fn fn,
               void *arg, uint64_t *valid_end)
{
    uint8_t *buf = NULL;
    size_t cap = 0;
    uint64_t off = start;
    int rc = 0;
    *valid_end = start;
    while (off < end) {
        uint8_t hb[KVARC_BLOCK_HEADER];
        kvarc_block_header h;
        const char *what = NULL;
        int bad = 0, hdr_ok = 0;
        if (end - off < KVARC_BLOCK_HEADER) {
            what = "trailing bytes shorter than a block header";
            bad = 1;
        } else if ((rc = seg_pread_full(fd, hb, sizeof hb, off))) {
            break;
        } else if (kvarc_block_header_decode(hb, &h)) {
            what = "block header";
            bad = 1;
        } else if (h.payload_bytes > end - off - KVARC_BLOCK_HEADER) {
            what = "block running past the segment's end";
            bad = 1;
        } else if (off + KVARC_BLOCK_HEADER + h.payload_bytes > check_from) {
            int brc = read_block(fd, off, &h, &buf, &cap, &what);
            if (brc == KVARC_ECORRUPT)
                bad = hdr_ok = 1;
            else if ((rc = brc))
                break;
        }
        if (bad) {
            uint64_t next;
            if ((rc = resync(fd, off, end, &next, &buf, &cap)))
                break;
            if ((rc = fn(arg, seg, off, hdr_ok ? &h : NULL, NULL, what, next - off)))
                break;
            off = next;
            continue;
        }
        uint64_t bytes = KVARC_BLOCK_HEADER + (uint64_t)h.payload_bytes;
        int checked = off + bytes > check_from;
        if ((rc = fn(arg, seg, off, &h, checked ? buf : NULL, NULL, bytes)))
            break;
        off += bytes;
        *valid_end = off;
    }
    free(buf);
    return rc;
}

/* ---- replay ---------------------------------------------------------- */

int meta_at_least(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t at_least)
{
    uint64_t cur;
    int rc = meta_get(e, txn, name, 0, &cur);
    return rc || cur >= at_least ? rc : meta_put(e, txn, name, at_least);
}

int replay_block(kvd_engine *e, MDB_txn *txn, const kvarc_block_header *h, const uint8_t *block,
                 uint64_t seg, uint64_t off, kvd_err *err)
{
    conv_rec c;
    int rc = conv_get(e, txn, h->conv, &c), have = rc == 0;
    if (rc && rc != -ENOENT)
        return rc;
    if ((rc = meta_at_least(e, txn, "seq", h->seq + 1)))
        return rc;
    if (h->kind == KVARC_BLOCK_CONV_CREATE) {
        if (have)
            return 0;                                   /* the block itself, or a copy */
        conv_rec r;
        if (h->payload_bytes < sizeof r)
            return kvd_fail(err, KVARC_ECORRUPT, "its metadata is too short");
        memcpy(&r, block + KVARC_BLOCK_HEADER, sizeof r);
        r.ns[KVD_NS_MAX - 1] = 0;
        r.name[KVD_NAME_MAX - 1] = 0;
        kvd_err why;
        if (shape_check(&r.shape, &why))
            return kvd_fail(err, KVARC_ECORRUPT, "its metadata is malformed: %s", why.msg);
        size_t nm = means_floats(&r.shape);
        if (sizeof r + nm * sizeof(float) > h->payload_bytes)
            return kvd_fail(err, KVARC_ECORRUPT, "its metadata is shorter than its means");
        r.create_seg = seg;
        r.create_off = off;
        r.flags &= ~KVD_CONV_DELETED;
        char nb[KVD_NS_MAX + KVD_NAME_MAX];
        MDB_val nk, nv;
        name_key(nb, sizeof nb, r.ns, r.name, &nk);
        if (mdb_get(txn, e->names, &nk, &nv) == 0)
            return kvd_fail(err, KVARC_ECORRUPT, "it creates '%s/%s', a name the index gives another "
                            "conversation", r.ns, r.name);
        uint8_t kb[8];
        key_u64(kb, h->conv);
        MDB_val k = { 8, kb }, iv = { 8, (void *)&h->conv };
        MDB_val mv = { nm * sizeof(float), (void *)(block + KVARC_BLOCK_HEADER + sizeof r) };
        if ((rc = conv_put(e, txn, h->conv, &r)) || (rc = kvd_mdb_err(mdb_put(txn, e->names, &nk, &iv, 0))) ||
            (rc = kvd_mdb_err(mdb_put(txn, e->means, &k, &mv, 0))))
            return rc;
        for (uint32_t l = 0; r.fork_len && l < r.shape.n_layers; l++)
            if ((rc = layer_len_put(e, txn, h->conv, l, r.fork_len)))
                return rc;
        return (rc = meta_at_least(e, txn, "next_conv", h->conv + 1)) ? rc : 1;
    }
    if (h->kind == KVARC_BLOCK_CONV_DELETE) {
        if (!have || (c.flags & KVD_CONV_DELETED))
            return 0;
        c.flags |= KVD_CONV_DELETED;
        char nb[KVD_NS_MAX + KVD_NAME_MAX];
        MDB_val nk, nv;
        name_key(nb, sizeof nb, c.ns, c.name, &nk);
        if ((rc = conv_put(e, txn, h->conv, &c)))
            return rc;
        uint64_t owner = 0;
        if (mdb_get(txn, e->names, &nk, &nv) || nv.mv_size != 8 || (memcpy(&owner, nv.mv_data, 8), owner != h->conv))
            return 1;                                   /* the name is not (or no longer) its */
        return (rc = mdb_del(txn, e->names, &nk, NULL)) ? kvd_mdb_err(rc) : 1;
    }
    if (h->kind != KVARC_BLOCK_DATA)
        return kvd_fail(err, KVARC_ECORRUPT, "its kind %u is unknown", h->kind);
    if (!have)
        return kvd_fail(err, KVARC_ECORRUPT, "the index does not know its conversation");
    if (c.flags & KVD_CONV_DELETED)
        return 0;                                       /* data of a deleted conversation */
    if (h->layer >= c.shape.n_layers || h->n_heads != c.shape.n_kv_heads ||
        h->head_dim != c.shape.head_dim || h->format != c.shape.format)
        return kvd_fail(err, KVARC_ECORRUPT, "it does not match the shape of '%s/%s'", c.ns, c.name);
    uint8_t kb[20];
    extent_key(kb, h->conv, h->layer, h->first_pos);
    MDB_val k = { 20, kb }, v;
    if (mdb_get(txn, e->extents, &k, &v) == 0) {
        extent_val ev;
        if (v.mv_size == sizeof ev && (memcpy(&ev, v.mv_data, sizeof ev), ev.count == h->count))
            return 0;                                   /* indexed: this block or a copy of it */
        return kvd_fail(err, KVARC_ECORRUPT, "the index has another extent at that position of "
                        "'%s/%s'", c.ns, c.name);
    }
    uint64_t len;
    if ((rc = layer_len_get(e, txn, h->conv, h->layer, &len)))
        return rc;
    if (h->first_pos != len)
        return kvd_fail(err, KVARC_ECORRUPT, "'%s/%s' layer %u has %llu tokens in the index, the block "
                        "starts at %llu", c.ns, c.name, h->layer, (unsigned long long)len,
                        (unsigned long long)h->first_pos);
    extent_val ev = { seg, off, h->count, (uint32_t)(KVARC_BLOCK_HEADER + h->payload_bytes) };
    v.mv_size = sizeof ev;
    v.mv_data = &ev;
    if ((rc = kvd_mdb_err(mdb_put(txn, e->extents, &k, &v, 0))) ||
        (rc = layer_len_put(e, txn, h->conv, h->layer, len + h->count)))
        return rc;
    return 1;
}

/* ---- roll-forward ------------------------------------------------------ */

typedef struct dead_ctx {
    kvd_engine *e;
    MDB_txn    *txn;
    uint64_t    referenced;
} dead_ctx;

static int dead_block(void *arg, uint64_t seg, uint64_t off, const kvarc_block_header *h,
                      const uint8_t *block, const char *bad, uint64_t bytes)
{
    dead_ctx *d = arg;
    (void)block;
    (void)bytes;
    if (!bad && block_indexed_at(d->e, d->txn, h, seg, off))
        d->referenced++;
    return 0;
}

int seg_dead_referenced(kvd_engine *e, MDB_txn *txn, int fd, uint64_t seg, uint64_t size, uint64_t *n)
{
    dead_ctx d = { e, txn, 0 };
    uint64_t vend;
    int rc = block_walk(fd, seg, 0, size, size, dead_block, &d, &vend);   /* headers only */
    *n = d.referenced;
    return rc;
}

typedef struct rf_blk {
    uint64_t seg, off, seq;
} rf_blk;

typedef struct rf_state {
    rf_blk  *v;
    size_t   n, cap;
    uint64_t committed;         /* of the segment being walked */
    uint64_t last_end;          /* end of its last valid block */
    uint64_t bad_off, bad_len;  /* the last damaged range found past committed */
    const char *bad_what;
} rf_state;

static int rf_collect(void *arg, uint64_t seg, uint64_t off, const kvarc_block_header *h,
                      const uint8_t *block, const char *bad, uint64_t bytes)
{
    rf_state *s = arg;
    (void)block;
    if (bad) {
        if (off + bytes > s->committed) {
            s->bad_off = off;
            s->bad_len = bytes;
            s->bad_what = bad;
        }
        return 0;
    }
    s->last_end = off + bytes;
    if (off + bytes <= s->committed)
        return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        rf_blk *n = realloc(s->v, cap * sizeof *n);
        if (!n)
            return -ENOMEM;
        s->v = n;
        s->cap = cap;
    }
    s->v[s->n++] = (rf_blk){ seg, off, h->seq };
    return 0;
}

static int rf_cmp(const void *a, const void *b)
{
    const rf_blk *x = a, *y = b;
    if (x->seq != y->seq)
        return x->seq < y->seq ? -1 : 1;
    return (x->seg > y->seg) - (x->seg < y->seg);
}

int block_indexed_at(kvd_engine *e, MDB_txn *txn, const kvarc_block_header *h, uint64_t seg,
                            uint64_t off)
{
    if (h->kind == KVARC_BLOCK_CONV_CREATE) {
        conv_rec c;
        return conv_get(e, txn, h->conv, &c) == 0 && c.create_seg == seg && c.create_off == off;
    }
    if (h->kind != KVARC_BLOCK_DATA)
        return 0;
    uint8_t kb[20];
    extent_key(kb, h->conv, h->layer, h->first_pos);
    MDB_val k = { 20, kb }, v;
    extent_val ev;
    return mdb_get(txn, e->extents, &k, &v) == 0 && v.mv_size == sizeof ev &&
           (memcpy(&ev, v.mv_data, sizeof ev), ev.seg == seg && ev.off == off);
}

int recover_roll_forward(kvd_engine *e, MDB_txn *txn, rf_seg *segs, size_t nsegs, kvd_err *err)
{
    rf_state st = { 0 };
    uint8_t *buf = NULL;
    size_t cap = 0;
    int rc = 0;
    char p[PATH_MAX];
    for (size_t i = 0; i < nsegs; i++) {
        rf_seg *s = &segs[i];
        s->new_bytes = s->committed;
        if (s->size <= s->committed)            /* nothing past what the index knows */
            continue;
        st.committed = s->committed;
        st.last_end = 0;
        st.bad_what = NULL;
        uint64_t valid_end;
        /* headers alone up to the committed size (they only give lengths),
         * every block that reaches past it checked whole */
        if ((rc = block_walk(s->fd, s->id, 0, s->committed, s->size, rf_collect, &st, &valid_end))) {
            seg_path(e->dir, s->id, p, sizeof p);
            kvd_fail(err, rc, "cannot read %s: %s", p, kvarc_strerror(rc));
            goto out;
        }
        s->new_bytes = st.last_end > s->committed ? st.last_end : s->committed;
        s->bad_off = st.bad_what ? st.bad_off : 0;
        s->bad_what = st.bad_what;
    }
    if (st.n)
        qsort(st.v, st.n, sizeof *st.v, rf_cmp);
    for (size_t i = 0; i < st.n; i++) {
        rf_seg *s = NULL;
        for (size_t j = 0; j < nsegs; j++)
            if (segs[j].id == st.v[i].seg)
                s = &segs[j];
        uint8_t hb[KVARC_BLOCK_HEADER];
        kvarc_block_header h;
        const char *what = NULL;
        if ((rc = seg_pread_full(s->fd, hb, sizeof hb, st.v[i].off)) ||
            (rc = kvarc_block_header_decode(hb, &h)) ||
            (rc = read_block(s->fd, st.v[i].off, &h, &buf, &cap, &what)))
            goto io;
        if (!s->listed && block_indexed_at(e, txn, &h, s->id, st.v[i].off)) {
            /* the index points into a file its segment table does not list:
             * that table is damaged; the file must not be taken for a leftover */
            seg_path(e->dir, s->id, p, sizeof p);
            rc = kvd_fail(err, KVARC_ECORRUPT, "the index refers to %s (offset %llu) but does not list it among "
                          "its segments: the index is damaged. Nothing was changed; with kvarcd stopped run "
                          "`kvarc verify %s`, then `kvarc rebuild-index %s`", p, (unsigned long long)st.v[i].off,
                          e->dir, e->dir);
            goto out;
        }
        kvd_err why = { 0, "" };
        int arc = replay_block(e, txn, &h, buf, st.v[i].seg, st.v[i].off, &why);
        if (arc == KVARC_ECORRUPT) {
            seg_path(e->dir, s->id, p, sizeof p);
            rc = kvd_fail(err, KVARC_ECORRUPT, "nothing was changed; with kvarcd stopped run `kvarc verify %s`, "
                          "then `kvarc rebuild-index %s`: %s offset %llu holds a valid block (conversation %llu "
                          "layer %u positions %llu..+%u) past what the index knows, and the index cannot take "
                          "it: %s", e->dir, e->dir, p, (unsigned long long)st.v[i].off,
                          (unsigned long long)h.conv, h.layer, (unsigned long long)h.first_pos, h.count, why.msg);
            goto out;
        }
        if (arc < 0) {
            rc = arc;
            goto io;
        }
        s->applied += arc;
        continue;
io:
        seg_path(e->dir, s->id, p, sizeof p);
        kvd_fail(err, rc, "cannot replay the block at %s offset %llu: %s", p,
                 (unsigned long long)st.v[i].off, what ? what : kvarc_strerror(rc));
        goto out;
    }
out:
    free(st.v);
    free(buf);
    return rc;
}
