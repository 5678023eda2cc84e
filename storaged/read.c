/* read.c - verified reads through io_uring, and the stage-2 rerank.
 *
 * A read resolves every position to its block (following forks) inside
 * one LMDB read txn while holding the engine's resolve lock shared, pins
 * the segment fds it needs, drops the lock, then submits all reads to the
 * reader's ring at once (up to the ring's depth in flight) and verifies
 * each record's CRC before copying it out. Pinning is what lets a
 * compaction retire a segment while reads of it are still in flight:
 * the file is unlinked only when its last pin goes (segtab.c).
 * Stage 2 (kvd_rerank_batch, kvd_rerank its one-item case): per head, the
 * union of the items' shortlists is read once in ascending order (extents
 * resolve in runs), then each item is scored on its own shortlist's
 * records in its own order, so every item's answer is what reranking it
 * alone gives, bit for bit. Scores follow the position mode (SCHEMA.md
 * section 6): remapped, the query (turned by the client's scoring
 * distance) against the decoded keys as stored; true, the query (turned to
 * its own position) against each key turned to its own
 * (kvg_key_scores_pos_ref). A conversation of the retired kind 0 is
 * refused (kvd_retrieval_check). An item may come with runs of positions
 * instead of a shortlist: stage 1b (stage1b.c) makes its shortlist first,
 * on the reader that serves its head. */
#include <assert.h>
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvd_internal.h"
#include "kvg.h"

#define RING_DEPTH 256

/* The reader's extent cache: which stored extent serves a conversation's
 * position, remembered across calls so that a read resolves each extent
 * in LMDB once, not once per call. Sets of EXT_WAYS entries chosen by
 * (conv, layer, position / 64), so that the extents of short appends
 * sharing a 64-position granule do not evict each other (a miss replaces
 * the set's entries in turn); an entry holds the positions [lo, hi) of conv it
 * answers (an ancestor's extent clipped at the nearest fork point on the
 * way, as extent_pieces clips it). Extents never change under a live
 * conversation but when compaction moves them: it kills the old segments
 * with the resolve lock held exclusive and bumps e->index_gen, and a
 * reader whose cache is older drops it (checked under the shared lock). */
#define EXT_CACHE 65536            /* entries, 64 B each */
#define EXT_WAYS 4                 /* entries a granule may take */

typedef struct ext_ent {
    uint64_t   conv, lo, hi;       /* hi == 0: empty */
    uint64_t   owner, first;       /* the conversation whose extent it is, and its first position */
    extent_val ev;
    uint32_t   layer;
} ext_ent;

struct kvd_reader {
    kvd_engine     *e;
    struct io_uring ring;
    uint8_t        *buf;           /* slot staging */
    size_t          cap;
    ext_ent        *ext;           /* [EXT_CACHE], NULL until first used (or when out of memory) */
    uint64_t        ext_gen;       /* the e->index_gen it was made under */
    unsigned        ext_next;      /* the way the next miss replaces */
    kvg_rope        rt_rope;       /* the RoPE rt was made for */
    kvg_rope_table  rt;            /* true-position stage 2's angles (1 MB at head_dim 128) */
};

/* The angle table of rope, made on first use and kept while the reader's
 * conversations share a RoPE; NULL (direct angles) when out of memory. */
static const kvg_rope_table *rope_table(kvd_reader *r, const kvg_rope *rope)
{
    const kvg_rope *o = &r->rt_rope;
    if (r->rt.t && o->d == rope->d && o->rotary_dims == rope->rotary_dims &&
        !memcmp(o->inv_freq, rope->inv_freq, sizeof o->inv_freq))
        return &r->rt;
    kvg_rope_table_free(&r->rt);
    if (kvg_rope_table_init(&r->rt, rope))
        return NULL;
    r->rt_rope = *rope;
    return &r->rt;
}

int kvd_reader_open(kvd_engine *e, kvd_reader **out, kvd_err *err)
{
    kvd_reader *r = calloc(1, sizeof *r);
    if (!r)
        return kvd_fail(err, -ENOMEM, "out of memory");
    int rc = io_uring_queue_init(RING_DEPTH, &r->ring, 0);
    if (rc < 0) {
        free(r);
        return kvd_fail(err, rc, "io_uring_queue_init failed: %s (kernel without io_uring, or "
                        "memlock limit too low)", strerror(-rc));
    }
    r->e = e;
    *out = r;
    return 0;
}

void kvd_reader_close(kvd_reader *r)
{
    if (!r)
        return;
    io_uring_queue_exit(&r->ring);
    kvg_rope_table_free(&r->rt);
    free(r->ext);
    free(r->buf);
    free(r);
}

static int reserve(kvd_reader *r, size_t bytes)
{
    if (bytes <= r->cap)
        return 0;
    uint8_t *n = realloc(r->buf, bytes);
    if (!n)
        return -ENOMEM;
    r->buf = n;
    r->cap = bytes;
    return 0;
}

/* One read to run: fd, offset, length, destination. */
typedef struct rd_op {
    int      fd;
    uint64_t off;
    uint32_t len;
    uint8_t *dst;
} rd_op;

#define MERGE_MAX (64u << 10)   /* the longest read adjacent record slots are merged into */

/* Run all ops through the ring; 0 or the first error (a short read is
 * -EIO: a committed block must be whole). */
static int ring_run(kvd_reader *r, const rd_op *ops, size_t n)
{
    size_t next = 0, done = 0, inflight = 0;
    int first_err = 0;
    while (done < n) {
        while (next < n && inflight < RING_DEPTH) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
            if (!sqe)
                break;
            io_uring_prep_read(sqe, ops[next].fd, ops[next].dst, ops[next].len, ops[next].off);
            io_uring_sqe_set_data64(sqe, next);
            next++;
            inflight++;
        }
        int rc = io_uring_submit_and_wait(&r->ring, 1);
        if (rc < 0 && rc != -EINTR)
            return rc;
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            size_t i = (size_t)io_uring_cqe_get_data64(cqe);
            if (cqe->res < 0 && !first_err)
                first_err = cqe->res;
            else if (cqe->res >= 0 && (uint32_t)cqe->res < ops[i].len && !first_err) {
                /* finish a short read synchronously */
                int prc = seg_pread_full(ops[i].fd, ops[i].dst + cqe->res, ops[i].len - (uint32_t)cqe->res,
                                         ops[i].off + (uint64_t)cqe->res);
                if (prc)
                    first_err = prc;
            }
            seen++;
        }
        io_uring_cq_advance(&r->ring, seen);
        done += seen;
        inflight -= seen;
    }
    return first_err;
}

/* Pinned segments of one read, unpinned together. The first 64 live in
 * the struct; a read over a large archive (random positions of a long
 * layer interleaved with other layers' blocks) may touch every segment,
 * so the set grows on the heap beyond that. */
typedef struct pinset {
    uint64_t  ids_small[64];
    int       fds_small[64];
    uint64_t *ids;
    int      *fds;
    int       n, cap;
} pinset;

static int pin_get(kvd_engine *e, pinset *ps, uint64_t seg)
{
    if (!ps->ids) {
        ps->ids = ps->ids_small;
        ps->fds = ps->fds_small;
        ps->cap = 64;
    }
    for (int i = 0; i < ps->n; i++)
        if (ps->ids[i] == seg)
            return ps->fds[i];
    if (ps->n == ps->cap) {
        int cap = 2 * ps->cap;
        uint64_t *ids = malloc((size_t)cap * sizeof *ids);
        int *fds = malloc((size_t)cap * sizeof *fds);
        if (!ids || !fds) {
            free(ids);
            free(fds);
            return -ENOMEM;
        }
        memcpy(ids, ps->ids, (size_t)ps->n * sizeof *ids);
        memcpy(fds, ps->fds, (size_t)ps->n * sizeof *fds);
        if (ps->ids != ps->ids_small) {
            free(ps->ids);
            free(ps->fds);
        }
        ps->ids = ids;
        ps->fds = fds;
        ps->cap = cap;
    }
    int fd = seg_pin(e, seg);
    if (fd < 0)
        return KVARC_ECORRUPT;
    ps->ids[ps->n] = seg;
    ps->fds[ps->n++] = fd;
    return fd;
}

static void pin_release(kvd_engine *e, pinset *ps)
{
    for (int i = 0; i < ps->n; i++)
        seg_unpin(e, ps->ids[i]);
    if (ps->ids && ps->ids != ps->ids_small) {
        free(ps->ids);
        free(ps->fds);
    }
    ps->ids = NULL;
    ps->fds = NULL;
    ps->n = ps->cap = 0;
}

/* The conversation's record, checked to exist with this layer and head. */
static int check_head(const conv_rec *info, uint32_t head, kvd_err *err)
{
    if (head >= info->shape.n_kv_heads)
        return kvd_fail(err, -EINVAL, "kv head %u out of range: '%s/%s' has %u kv heads", head,
                        info->ns, info->name, info->shape.n_kv_heads);
    return 0;
}

static int check_target(kvd_engine *e, uint64_t conv, uint32_t layer, uint32_t head,
                        conv_rec *info, kvd_err *err)
{
    int rc = conv_lookup(e, conv, info, err);
    if (rc)
        return rc;
    if (layer >= info->shape.n_layers)
        return kvd_fail(err, -EINVAL, "layer %u out of range: '%s/%s' has %u layers", layer,
                        info->ns, info->name, info->shape.n_layers);
    return check_head(info, head, err);
}


/* The extent serving conv's position pos of a layer (resolve lock held
 * shared, txn open): from the cache, else resolved and its fork clip
 * computed, then remembered. 0, -ERANGE past the end, or an error. */
static int ext_get(kvd_reader *r, MDB_txn *txn, uint64_t conv, uint32_t layer, uint64_t pos, ext_ent *out)
{
    kvd_engine *e = r->e;
    if (!r->ext) {
        r->ext = calloc(EXT_CACHE, sizeof *r->ext);   /* NULL: resolve every time */
        r->ext_gen = e->index_gen;
    }
    if (r->ext && r->ext_gen != e->index_gen) {
        memset(r->ext, 0, EXT_CACHE * sizeof *r->ext);
        r->ext_gen = e->index_gen;
    }
    uint64_t key = conv * 0x9e3779b97f4a7c15ull ^ ((uint64_t)layer << 40) ^ (pos >> 6);
    ext_ent *set = r->ext ? &r->ext[kvarc_splitmix64(&key) & (EXT_CACHE - EXT_WAYS)] : NULL, *x = NULL;
    for (int w = 0; set && w < EXT_WAYS; w++)
        if (set[w].hi && set[w].conv == conv && set[w].layer == layer && set[w].lo <= pos && pos < set[w].hi) {
            *out = set[w];
            return 0;
        }
    if (set)
        x = &set[r->ext_next++ % EXT_WAYS];
    ext_ent n = { .conv = conv, .layer = layer };
    uint64_t limit;                                /* an ancestor's extent: up to the nearest fork point */
    int rc = extent_resolve(e, txn, conv, layer, pos, &n.owner, &n.first, &n.ev, &limit);
    if (rc)
        return rc;
    n.lo = n.first;
    n.hi = n.first + n.ev.count < limit ? n.first + n.ev.count : limit;
    if (x)
        *x = n;
    *out = n;
    return 0;
}

/* Where each position's slot lives: ops[i] and owner[i]. */
static int resolve_slots(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head,
                         const kvd_shape *s, const uint64_t *pos, size_t n, rd_op *ops,
                         uint64_t *owner, pinset *ps, kvd_err *err)
{
    kvd_engine *e = r->e;
    uint32_t rb = (uint32_t)kvarc_record_bytes(s->format, (int)s->head_dim);
    MDB_txn *txn;
    pthread_rwlock_rdlock(&e->resolve);
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc) {
        pthread_rwlock_unlock(&e->resolve);
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    }
    ext_ent x = { .lo = 1 };          /* the last extent, in conv's positions */
    for (size_t i = 0; i < n && !rc; i++) {
        if (!(pos[i] >= x.lo && pos[i] < x.hi)) {
            rc = ext_get(r, txn, conv, layer, pos[i], &x);
            if (rc == -ERANGE) {
                uint64_t len = 0;
                layer_len_get(e, txn, conv, layer, &len);
                kvd_fail(err, rc, "position %llu is past the end of layer %u (%llu tokens)",
                         (unsigned long long)pos[i], layer, (unsigned long long)len);
                break;
            }
            if (rc) {
                kvd_fail(err, rc, rc == KVARC_ECORRUPT
                         ? "position %llu of layer %u is inside the layer but the index has no intact "
                           "extent for it: the index is damaged (run `kvarc verify`)"
                         : "resolving position %llu of layer %u: %s",
                         (unsigned long long)pos[i], layer, kvarc_strerror(rc));
                break;
            }
        }
        int fd = pin_get(e, ps, x.ev.seg);
        if (fd < 0) {
            rc = kvd_fail(err, fd, "segment %016llx of position %llu is not available",
                          (unsigned long long)x.ev.seg, (unsigned long long)pos[i]);
            break;
        }
        kvarc_block_header h = { .head_dim = (uint16_t)s->head_dim, .n_heads = (uint16_t)s->n_kv_heads,
                                 .count = x.ev.count, .rec_bytes = rb };
        ops[i].fd = fd;
        ops[i].off = x.ev.off + kvarc_block_slot_offset(&h, (int)head, (uint32_t)(pos[i] - x.first));
        ops[i].len = rb + 4;
        owner[i] = x.owner;
    }
    mdb_txn_abort(txn);
    pthread_rwlock_unlock(&e->resolve);
    return rc;
}

int kvd_read_records(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head,
                     const uint64_t *pos, size_t n, uint8_t *out, kvd_err *err)
{
    conv_rec info;
    int rc = check_target(r->e, conv, layer, head, &info, err);
    if (rc || n == 0)
        return rc;
    if (!pos || !out)
        return kvd_fail(err, -EINVAL, "read_records needs positions and an output buffer");
    uint32_t rb = (uint32_t)kvarc_record_bytes(info.shape.format, (int)info.shape.head_dim);
    size_t slot = rb + 4;
    rd_op *ops = malloc(n * sizeof *ops), *mops = malloc(n * sizeof *mops);
    uint64_t *owner = malloc(n * sizeof *owner);
    pinset ps = { .n = 0 };
    if (!ops || !mops || !owner || reserve(r, n * slot)) {
        rc = kvd_fail(err, -ENOMEM, "out of memory for %zu records", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        ops[i].dst = r->buf + i * slot;
    if ((rc = resolve_slots(r, conv, layer, head, &info.shape, pos, n, ops, owner, &ps, err)))
        goto out;
    /* slots that lie one after another in a segment (consecutive positions
     * of one block, as a shortlist's runs often are) and land one after
     * another in the buffer: one read. ops[] keeps each slot's place for
     * the checks below; the merged reads go in mops. */
    size_t nm = 0;
    for (size_t i = 0; i < n; i++) {
        if (nm && mops[nm - 1].fd == ops[i].fd && mops[nm - 1].off + mops[nm - 1].len == ops[i].off &&
            mops[nm - 1].dst + mops[nm - 1].len == ops[i].dst && mops[nm - 1].len + slot <= MERGE_MAX)
            mops[nm - 1].len += (uint32_t)slot;
        else
            mops[nm++] = ops[i];
    }
    if ((rc = ring_run(r, mops, nm))) {
        kvd_fail(err, rc, rc == KVARC_ECORRUPT
                 ? "reading records of '%s/%s' layer %u: the index points past the end of a segment: %s "
                   "(run `kvarc verify`)"
                 : "reading records of '%s/%s' layer %u: %s", info.ns, info.name, layer, kvarc_strerror(rc));
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        const uint8_t *s = ops[i].dst;
        uint32_t crc;
        memcpy(&crc, s + rb, 4);
        if (crc != kvarc_record_crc(owner[i], layer, head, pos[i], s, rb)) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "record at position %llu of '%s/%s' layer %u head %u "
                          "fails its checksum (segment offset %llu): data loss, run `kvarc verify`",
                          (unsigned long long)pos[i], info.ns, info.name, layer, head,
                          (unsigned long long)ops[i].off);
            goto out;
        }
        memcpy(out + i * rb, s, rb);
    }
out:
    pin_release(r->e, &ps);
    free(ops);
    free(mops);
    free(owner);
    return rc;
}

/* One stretch of a layer's positions [from, stop) served by one extent:
 * the block owner wrote at [first, first + ev.count), read through fd. */
typedef struct piece {
    uint64_t    owner, first, from, stop;
    extent_val  ev;
    int         fd;
} piece;

/* The extents serving conv's positions in runs[n_runs] ((first, count)
 * pairs) of a layer, run after run and in order within each, as pieces
 * (*out, malloc'ed, *np of them), their segments pinned in ps: an
 * ancestor's block serves only up to the nearest fork point on the way
 * from conv to it. One index transaction for all the runs. what names the
 * positions in errors. */
static int extent_pieces(kvd_reader *r, uint64_t conv, uint32_t layer, const uint64_t *runs, size_t n_runs,
                         pinset *ps, piece **out, size_t *np, const char *what, kvd_err *err)
{
    kvd_engine *e = r->e;
    size_t cap = 64, n = 0;
    piece *pcs = malloc(cap * sizeof *pcs);
    *out = NULL;
    *np = 0;
    if (!pcs)
        return kvd_fail(err, -ENOMEM, "out of memory");
    MDB_txn *txn;
    pthread_rwlock_rdlock(&e->resolve);
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc) {
        pthread_rwlock_unlock(&e->resolve);
        free(pcs);
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    }
    for (size_t q = 0; q < n_runs && !rc; q++) {
        const uint64_t p0 = runs[2 * q], end = p0 + runs[2 * q + 1];
        if (end < p0) {
            rc = kvd_fail(err, -EINVAL, "%s [%llu, +%llu): the run overflows", what, (unsigned long long)p0,
                          (unsigned long long)runs[2 * q + 1]);
            break;
        }
        for (uint64_t p = p0; p < end && !rc;) {
            piece pc = { 0 };
            ext_ent x;
            rc = ext_get(r, txn, conv, layer, p, &x);
            if (rc) {
                kvd_fail(err, rc, rc == -ERANGE ? "%s [%llu, %llu) reach past the end of layer %u"
                                                : "resolving %s [%llu, %llu) of layer %u failed: %s",
                         what, (unsigned long long)p0, (unsigned long long)end, layer, kvarc_strerror(rc));
                break;
            }
            pc.owner = x.owner;
            pc.first = x.first;
            pc.ev = x.ev;
            pc.from = p;
            pc.stop = x.hi;                     /* an ancestor's extent: clipped at the fork point */
            if (pc.stop > end)
                pc.stop = end;
            if ((pc.fd = pin_get(e, ps, pc.ev.seg)) < 0) {
                rc = kvd_fail(err, pc.fd, "segment %016llx is not available", (unsigned long long)pc.ev.seg);
                break;
            }
            if (n == cap) {
                piece *n2 = realloc(pcs, 2 * cap * sizeof *pcs);
                if (!n2) {
                    rc = kvd_fail(err, -ENOMEM, "out of memory");
                    break;
                }
                pcs = n2;
                cap *= 2;
            }
            pcs[n++] = pc;
            p = pc.stop;
        }
    }
    mdb_txn_abort(txn);
    pthread_rwlock_unlock(&e->resolve);
    if (rc) {
        free(pcs);
        return rc;
    }
    *out = pcs;
    *np = n;
    return 0;
}

/* Read ops[n] (their lengths set) into the reader's buffer, one after
 * another. */
static int read_ops(kvd_reader *r, rd_op *ops, size_t n, uint32_t layer, const char *what, kvd_err *err)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += ops[i].len;
    if (reserve(r, total))
        return kvd_fail(err, -ENOMEM, "out of memory for %zu bytes of %s", total, what);
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        ops[i].dst = r->buf + at;
        at += ops[i].len;
    }
    int rc = ring_run(r, ops, n);
    return rc ? kvd_fail(err, rc, "reading %s of layer %u: %s", what, layer, kvarc_strerror(rc)) : 0;
}

int kvd_read_sig_runs(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, const uint64_t *runs,
                      size_t n_runs, uint8_t *bits, uint16_t *scales, kvd_err *err)
{
    kvd_engine *e = r->e;
    conv_rec info;
    int rc = check_target(e, conv, layer, head, &info, err);
    if (rc || n_runs == 0)
        return rc;
    if (!runs || !bits || !scales)
        return kvd_fail(err, -EINVAL, "read_sigs needs runs and output buffers");
    const int d = (int)info.shape.head_dim;
    const size_t sb = (size_t)d / 8;
    piece *pcs = NULL;
    size_t np = 0, nops = 0;
    rd_op *ops = NULL;
    size_t *op_of = NULL;                          /* [np] the read that holds piece i's section */
    pinset ps = { .n = 0 };
    rc = extent_pieces(r, conv, layer, runs, n_runs, &ps, &pcs, &np, "signatures", err);
    if (!rc && !((ops = malloc((np + 1) * sizeof *ops)) && (op_of = malloc((np + 1) * sizeof *op_of))))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    for (size_t i = 0; !rc && i < np; i++) {        /* each extent's whole signature section, read once */
        kvarc_block_header h = { .head_dim = (uint16_t)d, .n_heads = (uint16_t)info.shape.n_kv_heads,
                                 .count = pcs[i].ev.count };
        rd_op op = { pcs[i].fd, pcs[i].ev.off + kvarc_block_sig_offset(&h, (int)head),
                     (uint32_t)kvarc_block_sig_section(pcs[i].ev.count, d), NULL };
        if (!nops || ops[nops - 1].fd != op.fd || ops[nops - 1].off != op.off)
            ops[nops++] = op;                       /* runs in one extent share its read */
        op_of[i] = nops - 1;
    }
    if (!rc)
        rc = read_ops(r, ops, nops, layer, "signatures", err);
    size_t outi = 0;
    for (size_t i = 0; i < np && !rc; i++) {
        const rd_op *op = &ops[op_of[i]];
        const uint8_t *sec = op->dst;
        size_t len = op->len, n = pcs[i].stop - pcs[i].from, from = pcs[i].from - pcs[i].first;
        uint32_t crc;
        memcpy(&crc, sec + len - 4, 4);
        if ((i == 0 || op_of[i] != op_of[i - 1]) &&
            crc != kvarc_sig_section_crc(pcs[i].owner, layer, pcs[i].first, head, sec, len - 4)) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "signatures of positions [%llu, %llu) layer %u head %u "
                          "fail their checksum: data loss, run `kvarc verify`",
                          (unsigned long long)pcs[i].first,
                          (unsigned long long)(pcs[i].first + pcs[i].ev.count), layer, head);
            break;
        }
        memcpy(bits + outi * sb, sec + from * sb, n * sb);
        memcpy(scales + outi, sec + (size_t)pcs[i].ev.count * sb + from * 2, n * 2);
        outi += n;
    }
    pin_release(e, &ps);
    free(pcs);
    free(ops);
    free(op_of);
    return rc;
}

int kvd_read_sigs(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, uint64_t first,
                  uint64_t count, uint8_t *bits, uint16_t *scales, kvd_err *err)
{
    uint64_t run[2] = { first, count };
    return kvd_read_sig_runs(r, conv, layer, head, run, 1, bits, scales, err);
}

/* Index of p in the ascending u[n] (p is there). */
static size_t u64_find(const uint64_t *u, size_t n, uint64_t p)
{
    size_t lo = 0, hi = n;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (u[mid] <= p)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* One pass of kvd_rerank_batch: items it[0..n) (all of one head), whose
 * shortlists hold `total` entries: the union read once, then each item
 * scored on its own shortlist's records, in its own order. */
static int rerank_pass(kvd_reader *r, uint64_t conv, uint32_t layer, const conv_rec *info, const kvg_codec *c,
                       const kvg_rope *rp, kvd_rerank_item **it, size_t n, size_t total, kvd_err *err)
{
    const int rb = kvarc_record_bytes(info->shape.format, (int)info->shape.head_dim);
    size_t most = 0;
    for (size_t i = 0; i < n; i++)
        most = it[i]->n > most ? it[i]->n : most;
    uint64_t *u = malloc((total + 1) * 8), *tmp = NULL;
    uint8_t *urec = malloc(total * (size_t)rb + 1), *recs = malloc(most * (size_t)rb + 1);
    float *sc = malloc((most + 1) * sizeof *sc);
    uint32_t *sel = malloc((most + 1) * sizeof *sel), *tks = malloc((most + 1) * sizeof *tks);
    int rc = 0;
    if (!u || !urec || !recs || !sc || !sel || !tks) {
        rc = kvd_fail(err, -ENOMEM, "out of memory for a rerank of %zu shortlist entries", total);
        goto done;
    }
    /* the union, ascending (reads resolve extents in order): a bitmap over
     * [lo, hi] when that range is small against the entries (a chunk's
     * shortlists: 32K entries within a few thousand positions), else sort */
    uint64_t lo = UINT64_MAX, hi = 0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < it[i]->n; j++) {
            uint64_t p = it[i]->shortlist[j];
            lo = p < lo ? p : lo;
            hi = p > hi ? p : hi;
        }
    size_t nu = 0;
    uint64_t *bm = hi - lo < 64 * (uint64_t)total ? calloc((size_t)((hi - lo) / 64 + 1), 8) : NULL;
    if (bm) {
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < it[i]->n; j++) {
                uint64_t o = it[i]->shortlist[j] - lo;
                bm[o / 64] |= 1ull << (o % 64);
            }
        for (size_t wd = 0; wd <= (hi - lo) / 64; wd++)
            for (uint64_t b = bm[wd]; b; b &= b - 1)
                u[nu++] = lo + wd * 64 + (uint64_t)__builtin_ctzll(b);
        free(bm);
    } else {
        for (size_t i = 0; i < n; i++) {
            memcpy(u + nu, it[i]->shortlist, it[i]->n * 8);
            nu += it[i]->n;
        }
        if (!(tmp = malloc((nu + 1) * 8))) {
            rc = kvd_fail(err, -ENOMEM, "out of memory for a rerank of %zu shortlist entries", total);
            goto done;
        }
        kvg_sort_u64(u, nu, tmp);
        size_t w = 0;
        for (size_t j = 0; j < nu; j++)
            if (!w || u[j] != u[w - 1])
                u[w++] = u[j];
        nu = w;
    }
    if ((rc = kvd_read_records(r, conv, layer, it[0]->head, u, nu, urec, err)))
        goto done;
    for (size_t i = 0; i < n; i++) {
        kvd_rerank_item *x = it[i];
        for (size_t j = 0; j < x->n; j++)
            memcpy(recs + j * (size_t)rb, urec + u64_find(u, nu, x->shortlist[j]) * (size_t)rb, (size_t)rb);
        rc = rp ? kvg_key_scores_pos(c, rp, rope_table(r, rp), x->q, x->n_q, recs, x->shortlist, x->n, sc) :
                  kvg_key_scores(c, x->q, x->n_q, recs, x->n, sc);
        if (rc) {
            kvd_fail(err, rc, "scoring the shortlist: %s", kvarc_strerror(rc));
            goto done;
        }
        size_t k = x->top_k < x->n ? x->top_k : x->n;
        long got = kvg_topk(sc, x->n, k, sel, NULL, tks);
        if (got < 0) {
            rc = kvd_fail(err, (int)got, "selecting the top %zu of a shortlist of %zu: %s", k, x->n,
                          kvarc_strerror((int)got));
            goto done;
        }
        x->got = got;
        for (long j = 0; j < x->got; j++) {
            x->pos_out[j] = x->shortlist[sel[j]];
            if (x->score_out)
                x->score_out[j] = sc[sel[j]];
            if (x->rec_out)
                memcpy(x->rec_out + (size_t)j * rb, recs + (size_t)sel[j] * rb, (size_t)rb);
        }
    }
done:
    free(u);
    free(tmp);
    free(urec);
    free(recs);
    free(sc);
    free(sel);
    free(tks);
    return rc;
}

/* What one reader does for a batch: heads h0, h0 + step, ... in order,
 * stopping at the first error (fail_head = that head). */
typedef struct rerank_share {
    kvd_reader       *r;
    uint64_t          conv;
    uint32_t          layer, h0, step;
    const conv_rec   *info;
    const kvg_rope   *rp;
    kvd_rerank_item  *items;
    size_t            n_items;
    int               rc;
    uint32_t          fail_head;
    kvd_err           err;
} rerank_share;

static void *rerank_heads(void *arg)
{
    rerank_share *w = arg;
    const conv_rec *info = w->info;
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, (int)info->shape.head_dim, info->shape.seed);
    kvd_rerank_item **pass = malloc(w->n_items * sizeof *pass);
    if (!pass) {
        w->rc = kvd_fail(&w->err, -ENOMEM, "out of memory");
        w->fail_head = w->h0;
        return NULL;
    }
    for (uint32_t h = w->h0; h < info->shape.n_kv_heads && !w->rc; h += w->step) {
        float mu_k[KVARC_HEAD_DIM_MAX];
        int have_mu = 0, rc = 0;
        size_t np = 0, total = 0;
        for (size_t i = 0; i < w->n_items && !rc; i++) {   /* stage 1b first: the items' shortlists */
            kvd_rerank_item *x = &w->items[i];
            if (x->head != h || !x->n_runs)
                continue;
            if (!have_mu && !(rc = kvd_conv_means(w->r->e, w->conv, w->layer, h, mu_k, NULL, &w->err)))
                have_mu = 1;
            if (!rc)
                rc = kvd_stage1b(w->r, w->conv, w->layer, (int)info->shape.head_dim, &rot, mu_k, w->rp == NULL, x,
                                 &w->err);
        }
        for (size_t i = 0; i <= w->n_items && !rc; i++) {
            kvd_rerank_item *x = i < w->n_items ? &w->items[i] : NULL;
            int mine = x && x->head == h && x->n && x->top_k;
            if (np && (!x || (mine && total + x->n > KVD_RERANK_PASS))) {
                if (!have_mu && !(rc = kvd_conv_means(w->r->e, w->conv, w->layer, h, mu_k, NULL, &w->err)))
                    have_mu = 1;
                kvg_codec c = { info->shape.format, &rot, mu_k, NULL };
                if (!rc)
                    rc = rerank_pass(w->r, w->conv, w->layer, info, &c, w->rp, pass, np, total, &w->err);
                np = total = 0;
            }
            if (mine) {
                pass[np++] = x;
                total += x->n;
            }
        }
        if (rc) {
            w->rc = rc;
            w->fail_head = h;
        }
    }
    free(pass);
    return NULL;
}

int kvd_rerank_batch(kvd_reader *r, uint64_t conv, uint32_t layer, kvd_rerank_item *items, size_t n_items,
                     kvd_err *err)
{
    return kvd_rerank_batch_par(&r, 1, conv, layer, items, n_items, err);
}

int kvd_rerank_batch_par(kvd_reader *const *rs, int nr, uint64_t conv, uint32_t layer, kvd_rerank_item *items,
                         size_t n_items, kvd_err *err)
{
    conv_rec info;
    int rc = 0;
    if (!rs || nr < 1 || nr > KVD_RERANK_READERS)
        return kvd_fail(err, -EINVAL, "rerank needs 1..%d readers", KVD_RERANK_READERS);
    for (int t = 0; t < nr; t++)
        if (!rs[t])
            return kvd_fail(err, -EINVAL, "rerank reader %d is missing", t);
    kvd_reader *r = rs[0];
    for (size_t i = 0; i < n_items; i++)
        items[i].got = 0;
    if (n_items && (rc = check_target(r->e, conv, layer, items[0].head, &info, err)))
        return rc;
    kvg_rope rope;           /* true positions: each key scored at its own */
    const kvg_rope *rp = NULL;
    if (n_items && (rc = kvd_retrieval_check(&info, &rope, &rp, err)))
        return rc;
    for (size_t i = 0; i < n_items; i++) {
        kvd_rerank_item *x = &items[i];
        if ((rc = check_head(&info, x->head, err)))
            return rc;
        int d = (int)info.shape.head_dim;
        if (!x->q || x->n_q < 1 || x->n_q > 64)
            return kvd_fail(err, -EINVAL, "rerank needs 1..64 queries of head_dim %d", d);
        for (size_t j = 0; j < (size_t)x->n_q * (size_t)d; j++)
            if (!isfinite(x->q[j]))
                return kvd_fail(err, KVARC_ENONFINITE, "query element %zu is NaN or Inf", j);
        if (x->n && x->top_k && ((!x->shortlist && !x->n_runs) || !x->pos_out))
            return kvd_fail(err, -EINVAL, "rerank needs a shortlist (or runs) and room for the positions");
        if (x->n_runs && (x->shortlist || !x->runs || x->s1_mode < 0 || x->s1_mode > 1 || x->s1_combine < 0 ||
                          x->s1_combine > 1))
            return kvd_fail(err, -EINVAL, "stage 1b needs runs instead of a shortlist, score mode 0|1 and "
                            "combination 0|1");
    }
    if (n_items == 0)
        return 0;
    /* the heads over the readers (h mod nr), each reader on a thread of its
     * own but the first, which runs here; items are independent, so the
     * answers do not depend on nr, and the error reported is the one of the
     * lowest failing head, as one reader would meet first */
    if ((uint32_t)nr > info.shape.n_kv_heads)
        nr = (int)info.shape.n_kv_heads;
    rerank_share sh[KVD_RERANK_READERS];
    pthread_t th[KVD_RERANK_READERS];
    int started[KVD_RERANK_READERS] = { 0 };
    for (int t = 0; t < nr; t++)
        sh[t] = (rerank_share){ rs[t], conv, layer, (uint32_t)t, (uint32_t)nr, &info, rp, items, n_items, 0, 0,
                                { 0, "" } };
    for (int t = 1; t < nr; t++)
        started[t] = pthread_create(&th[t], NULL, rerank_heads, &sh[t]) == 0;
    rerank_heads(&sh[0]);
    for (int t = 1; t < nr; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            rerank_heads(&sh[t]);           /* no thread: this one does it */
    }
    int worst = -1;
    for (int t = 0; t < nr; t++)
        if (sh[t].rc && (worst < 0 || sh[t].fail_head < sh[worst].fail_head))
            worst = t;
    if (worst < 0)
        return 0;
    if (err)
        *err = sh[worst].err;
    return sh[worst].rc;
}

static int u64_in(const uint64_t *v, size_t n, uint64_t x)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && v[lo] == x;
}

int kvd_rerank_reply(kvd_rerank_item *items, size_t n_items, size_t rb, uint8_t *recs, kvd_err *err)
{
    size_t total = 0, nseen = 16, rec_off = 0;
    for (size_t i = 0; i < n_items; i++)
        total += items[i].got > 0 ? (size_t)items[i].got : 0;
    while (nseen < 2 * total)
        nseen *= 2;
    assert(nseen >= 2 * total);              /* the set never fills: its probes end */
    uint64_t *seen = calloc(nseen, 8);     /* open-addressing set of (head << 48 | pos) + 1 */
    if (!seen)
        return kvd_fail(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < n_items; i++) {
        kvd_rerank_item *it = &items[i];
        it->kept = 0;
        for (long j = 0; j < it->got; j++) {
            uint64_t p = it->pos_out[j];
            int dup = u64_in(it->have, it->n_have, p);
            if (!dup) {        /* sent earlier in this reply for the same head? */
                uint64_t key = ((uint64_t)it->head << 48 | p) + 1, mix = key;
                size_t h = (size_t)kvarc_splitmix64(&mix) & (nseen - 1);   /* every bit of key in the slot */
                while (seen[h] && seen[h] != key)
                    h = (h + 1) & (nseen - 1);
                dup = seen[h] == key;
                seen[h] = key;
            }
            it->send_out[j] = !dup;
            if (!dup) {
                assert(recs + rec_off <= it->rec_out + (size_t)j * rb);   /* kept records only move forward */
                memmove(recs + rec_off, it->rec_out + (size_t)j * rb, rb);
                rec_off += rb;
                it->kept++;
            }
        }
    }
    free(seen);
    return 0;
}

long kvd_rerank(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, const float *q,
                int n_q, const uint64_t *shortlist, size_t n, size_t top_k, uint64_t *pos_out,
                float *score_out, uint8_t *rec_out, kvd_err *err)
{
    uint64_t scratch[1];
    kvd_rerank_item x = { .head = head, .q = q, .n_q = n_q, .shortlist = shortlist, .n = n, .top_k = top_k,
                          .pos_out = pos_out ? pos_out : scratch, .score_out = score_out, .rec_out = rec_out };
    if (!pos_out && top_k > 1 && n > 1) {      /* positions are needed to pick the records */
        x.pos_out = malloc((top_k < n ? top_k : n) * 8);
        if (!x.pos_out)
            return kvd_fail(err, -ENOMEM, "out of memory");
    }
    int rc = kvd_rerank_batch(r, conv, layer, &x, 1, err);
    if (x.pos_out != pos_out && x.pos_out != scratch)
        free(x.pos_out);
    return rc ? rc : x.got;
}

int kvd_read_sums(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, uint64_t b0, uint64_t nb,
                  uint8_t *bits, uint16_t *scales, uint8_t *ok, kvd_err *err)
{
    kvd_engine *e = r->e;
    conv_rec info;
    int rc = check_target(e, conv, layer, head, &info, err);
    if (rc || nb == 0)
        return rc;
    if (!bits || !scales || !ok)
        return kvd_fail(err, -EINVAL, "read_sums needs output buffers");
    const int d = (int)info.shape.head_dim, H = (int)info.shape.n_kv_heads;
    const size_t sb = (size_t)d / 8, S = KVARC_SUM_ITEMS, B = KVARC_SUM_BLOCK;
    const uint32_t rb = (uint32_t)kvarc_record_bytes(info.shape.format, d);
    memset(bits, 0, nb * S * sb);
    memset(scales, 0, nb * S * 2);
    memset(ok, 0, nb);
    piece *pcs = NULL;
    size_t np = 0, nr = 0;
    rd_op *ops = NULL;
    pinset ps = { .n = 0 };
    uint64_t run[2] = { b0 * B, nb * B };
    rc = extent_pieces(r, conv, layer, run, 1, &ps, &pcs, &np, "summaries of positions", err);
    if (!rc && !(ops = malloc((np + 1) * sizeof *ops)))
        rc = kvd_fail(err, -ENOMEM, "out of memory");
    /* the pieces whose data block carries summaries (the index keeps each
     * block's size: one with summaries is longer), one section each */
    for (size_t i = 0; !rc && i < np; i++) {
        uint32_t n_sum = kvarc_block_n_sum(pcs[i].first, pcs[i].ev.count);
        if (!n_sum || pcs[i].ev.bytes != KVARC_BLOCK_HEADER + kvarc_block_payload_bytes_sum(pcs[i].ev.count, d, H,
                                                                                             rb, n_sum))
            continue;
        kvarc_block_header h = { .head_dim = (uint16_t)d, .n_heads = (uint16_t)H, .count = pcs[i].ev.count,
                                 .rec_bytes = rb, .n_sum = n_sum };
        pcs[nr] = pcs[i];
        ops[nr++] = (rd_op){ pcs[i].fd, pcs[i].ev.off + kvarc_block_sum_offset(&h, (int)head),
                             (uint32_t)kvarc_block_sum_section(n_sum, d), NULL };
    }
    if (!rc)
        rc = read_ops(r, ops, nr, layer, "summaries", err);
    for (size_t i = 0; i < nr && !rc; i++) {
        const uint8_t *sec = ops[i].dst;
        size_t len = ops[i].len;
        uint32_t crc, n_sum = kvarc_block_n_sum(pcs[i].first, pcs[i].ev.count);
        memcpy(&crc, sec + len - 4, 4);
        if (crc != kvarc_sum_section_crc(pcs[i].owner, layer, pcs[i].first, head, sec, len - 4)) {
            rc = kvd_fail(err, KVARC_ECORRUPT, "block summaries of positions [%llu, %llu) layer %u head %u fail "
                          "their checksum: data loss, run `kvarc verify`", (unsigned long long)pcs[i].first,
                          (unsigned long long)(pcs[i].first + pcs[i].ev.count), layer, head);
            break;
        }
        /* summary j is of block first / 64 + j, ending at (that + 1) * 64 - 1:
         * ours when that last position lies in [from, stop) */
        for (uint32_t j = 0; j < n_sum; j++) {
            uint64_t b = pcs[i].first / B + j, last = (b + 1) * B - 1;
            if (b < b0 || b >= b0 + nb || last < pcs[i].from || last >= pcs[i].stop)
                continue;
            memcpy(bits + (b - b0) * S * sb, sec + (size_t)j * S * sb, S * sb);
            memcpy(scales + (b - b0) * S, sec + (size_t)n_sum * S * sb + (size_t)j * S * 2, S * 2);
            ok[b - b0] = 1;
        }
    }
    pin_release(e, &ps);
    free(pcs);
    free(ops);
    return rc;
}
