/* kvd_internal.h - what the engine's files share; not installed. */
#ifndef KVD_INTERNAL_H
#define KVD_INTERNAL_H

#include <limits.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <sys/uio.h>

#include "kvd.h"
#include "prom.h"

/* ---- segments (segment.c) ------------------------------------------- */

enum { SEG_OPEN = 1, SEG_SEALED = 2, SEG_DEAD = 3 };

typedef struct kvd_seg {
    uint64_t id;
    int      fd;            /* -1 once closed */
    uint8_t  state;         /* SEG_* as committed in the index */
    uint64_t bytes;         /* committed size */
    int      pins;          /* readers using fd right now */
} kvd_seg;

/* Path of segment id in dir. */
void seg_path(const char *dir, uint64_t id, char *out, size_t len);
/* pwrite all of iov at off, honouring injected faults; 0 or -errno. */
int  seg_pwritev(int fd, const struct iovec *iov, int n, uint64_t off);
int  seg_sync(int fd);
/* Read exactly len bytes at off (pread loop); 0, -errno, or KVARC_ECORRUPT
 * at the end of the file (what should be there is missing). */
int  seg_pread_full(int fd, void *buf, size_t len, uint64_t off);

/* ---- LMDB layout (opened in engine.c; keys and records in index.c) --- */

/* Conversation record: the value in `convs`, and the head of a
 * CONV_CREATE payload (means follow it there). Host little-endian. */
typedef struct conv_rec {
    char      ns[KVD_NS_MAX], name[KVD_NAME_MAX];
    uint64_t  parent, fork_len;
    uint32_t  flags, pad;
    int64_t   created_ns;
    kvd_shape shape;
    uint64_t  create_seg, create_off;   /* where its CONV_CREATE block is (index only) */
} conv_rec;

typedef struct extent_val {
    uint64_t seg, off;      /* block start in segment seg */
    uint32_t count;         /* tokens in the block */
    uint32_t bytes;         /* header + payload */
} extent_val;

typedef struct seg_val {
    uint8_t  state, pad[7];
    uint64_t bytes;
} seg_val;

void key_u64(uint8_t *k, uint64_t v);                  /* big-endian */
uint64_t key_get_u64(const uint8_t *k);
void extent_key(uint8_t k[20], uint64_t conv, uint32_t layer, uint64_t first);
void layer_key(uint8_t k[12], uint64_t conv, uint32_t layer);
size_t means_floats(const kvd_shape *s);

/* ---- the engine ------------------------------------------------------- */

typedef struct kvd_item kvd_item;
struct kvd_item {
    kvarc_block_header h;
    uint8_t  *block;        /* KVARC_BLOCK_HEADER + payload */
    size_t    bytes;
    /* validate against and update the index (in a nested txn); may set
     * h.conv; 0 or an error code with item->err filled */
    int     (*prepare)(kvd_engine *e, MDB_txn *txn, kvd_item *it, uint64_t seg, uint64_t off);
    void     *arg;
    int       ingest;       /* a block of the cluster's log replayed into the cache (cluster.c) */
    int       rc, done;
    kvd_err   err;
    kvd_item *next;
};

struct kvd_engine {
    char     dir[PATH_MAX - 128];  /* room for the file names below it */
    int      lock_fd;
    MDB_env *env;
    MDB_dbi  meta, names, convs, means, layers, extents, segs;
    uint64_t segment_bytes;

    pthread_mutex_t seg_mu;     /* guards the segment table */
    kvd_seg *segtab;
    size_t   nseg, capseg;
    uint64_t active;            /* id of the OPEN segment appends go to */

    pthread_rwlock_t resolve;   /* readers: shared from index lookup to pin;
                                   compaction: exclusive to retire segments */
    uint64_t index_gen;         /* bumped (resolve held exclusive) when a segment dies: readers'
                                   extent caches made before it are dropped (read.c) */
    pthread_mutex_t gc_mu;      /* group commit queue */
    pthread_cond_t  gc_cv;
    kvd_item *q_head, *q_tail;
    int       leader;
    pthread_mutex_t compact_mu; /* one compaction at a time */

    atomic_ullong n_appends, n_commits, n_fsyncs;
    atomic_ullong n_compactions, n_verifies;   /* runs started since open */
    prom_hist     sync_hist;    /* the group commit's fdatasync of the segment, each */
    uint64_t n_rolled_forward;  /* blocks recovery replayed into the index at open */
    uint64_t n_recovery_damaged; /* damaged ranges recovery kept (valid blocks after them) */
    int      check_only;        /* kvd_open_check: read-only, no recovery */
    struct kvd_cluster *cluster; /* the RADOS backend (cluster.c); NULL: local only */
};

/* Fill err (if non-NULL) with code and a formatted message; returns code. */
int kvd_fail(kvd_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int kvd_mdb_err(int mdb_rc);    /* LMDB code -> negative errno */

/* Segment table (segtab.c). */
kvd_seg *segtab_find(kvd_engine *e, uint64_t id);     /* seg_mu held */
int      segtab_add(kvd_engine *e, uint64_t id, int fd, uint8_t state, uint64_t bytes);
void     segtab_remove(kvd_engine *e, uint64_t id);
/* Pin the fd of segment id for a read (resolve lock held shared); -1 if gone. */
int      seg_pin(kvd_engine *e, uint64_t id);
void     seg_unpin(kvd_engine *e, uint64_t id);
/* Close and unlink a DEAD segment nobody pins (seg_mu held). */
void     seg_retire_locked(kvd_engine *e, kvd_seg *s);

#define GC_BATCH_MAX 64  /* items per group-commit batch: one pwritev of at most 64 blocks */

/* Submit an item to the group commit and wait until it is durable. */
int  gc_submit(kvd_engine *e, kvd_item *it, kvd_err *err);
/* Queue its[0..n) together and wait until each is done (commit.c). */
void gc_submit_n(kvd_engine *e, kvd_item *const *its, size_t n);

/* Segment lifecycle (segtab.c): a new OPEN or SEALED segment file, its
 * entry in the index's segments table in txn; the durable state of a
 * segment; DEAD in the table after the commit that made it so; fsync of a
 * directory (a file created or removed in it made durable). */
int  seg_create(kvd_engine *e, MDB_txn *txn, uint64_t *id_out, uint8_t state);
int  seg_put(kvd_engine *e, MDB_txn *txn, uint64_t id, uint8_t state, uint64_t bytes);
void seg_mark_dead(kvd_engine *e, uint64_t id);
int  fsync_dir(const char *path);

int  conv_get(kvd_engine *e, MDB_txn *txn, uint64_t id, conv_rec *out);
/* Conversation id's record in a read txn of its own, deleted ones
 * included: 0, -ENOENT (no message), or an error in err. */
int  conv_read(kvd_engine *e, uint64_t id, conv_rec *c, kvd_err *err);
/* A live conversation's record in its own read txn: the hot paths' check
 * (no length over every layer, unlike kvd_conv_stat). -ENOENT if deleted. */
int  conv_lookup(kvd_engine *e, uint64_t id, conv_rec *c, kvd_err *err);
/* 0 if c's signatures can be searched and reranked, with *rope the RoPE
 * its scores turn by (kind 2, true positions: made in *buf) or NULL (kind
 * 1, remapped: scored as stored). KVARC_EVERSION, naming it, for the
 * retired kind 0 (true positions, position-free signatures) and for a kind
 * this kvarcd does not know; -EINVAL for a RoPE kvg_rope_init refuses. */
int  kvd_retrieval_check(const conv_rec *c, kvg_rope *buf, const kvg_rope **rope, kvd_err *err);
int  conv_put(kvd_engine *e, MDB_txn *txn, uint64_t id, const conv_rec *c);
/* The `names` key of ns/name, built in buf. */
void name_key(char *buf, size_t len, const char *ns, const char *name, MDB_val *k);
int  layer_len_put(kvd_engine *e, MDB_txn *txn, uint64_t conv, uint32_t layer, uint64_t len);
/* Segment id of a file name "<16 hex>.seg"; 0 if it is not one. */
int  seg_parse_name(const char *name, uint64_t *id);
int  conv_info_fill(kvd_engine *e, MDB_txn *txn, uint64_t id, const conv_rec *c, kvd_conv_info *info);
int  layer_len_get(kvd_engine *e, MDB_txn *txn, uint64_t conv, uint32_t layer, uint64_t *len);

/* Locate position pos of (conv, layer): the conversation that owns it
 * (following forks) and its extent; *limit (may be NULL) the nearest fork
 * point on the way, where an ancestor's extent stops serving conv
 * (UINT64_MAX when conv owns it). 0, -ERANGE past the end, or an error. */
int  extent_resolve(kvd_engine *e, MDB_txn *txn, uint64_t conv, uint32_t layer, uint64_t pos,
                    uint64_t *owner, uint64_t *first, extent_val *ev, uint64_t *limit);

/* ---- stage 1b (stage1b.c) ---------------------------------------------- */

/* Item x's shortlist from its runs' stored signatures (kvd_rerank_item's
 * stage-1b fields): x->shortlist = x->sl_buf, x->n = its length. rot,
 * mu_k: the conversation's rotation and this head's key mean; remap: the
 * remapped position mode (else true positions, x->run_bias required). */
int kvd_stage1b(kvd_reader *r, uint64_t conv, uint32_t layer, int head_dim, const kvarc_rotation *rot,
                const float *mu_k, int remap, kvd_rerank_item *x, kvd_err *err);

/* ---- blocks read back (replay.c) --------------------------------------- */

/* Check a whole block's payload (header h already decoded): 0 or
 * KVARC_ECORRUPT with *what naming the part that failed; records (may be
 * NULL) grows by the records it holds. */
int block_check_payload(const kvarc_block_header *h, const uint8_t *block, const char **what,
                        uint64_t *records);

/* Called per block by block_walk, in file order. A valid block: h set,
 * bad NULL, bytes its length, block its bytes when it was read whole
 * (those reaching past check_from), else NULL. A damaged range: bad says
 * what failed, h is the header when only the payload failed (else NULL),
 * bytes is how much was skipped to the next valid block (or the end).
 * Nonzero stops the walk and is returned. */
typedef int (*block_fn)(void *arg, uint64_t seg, uint64_t off, const kvarc_block_header *h,
                        const uint8_t *block, const char *bad, uint64_t bytes);
/* Walk fd's blocks in [start, end); blocks ending past check_from are
 * read and checked whole, earlier ones by their header only. Damage is
 * skipped by resynchronising on the next valid block. *valid_end: the
 * end of the last valid block (start if none). */
int block_walk(int fd, uint64_t seg, uint64_t start, uint64_t check_from, uint64_t end, block_fn fn,
               void *arg, uint64_t *valid_end);

/* Apply one valid block (whole, at seg/off) to the index in txn: 1
 * applied, 0 already there or nothing to do, KVARC_ECORRUPT (err says
 * why) when the index cannot take it, or another error. */
/* The counter `name` of the meta table (dflt when absent), and its store. */
int meta_get(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t dflt, uint64_t *out);
int meta_put(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t value);
/* The next value of counter name (ids, sequence numbers), stored in txn. */
int meta_next(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t *out);
/* The id ns/name names, in txn (-ENOENT). */
int name_lookup(kvd_engine *e, MDB_txn *txn, const char *ns, const char *name, uint64_t *id);
/* A shape as kvd_conv_create accepts it: 0 or an error with err saying why. */
int shape_check(const kvd_shape *s, kvd_err *err);
/* Raise the counter `name` in the meta table to at least at_least. */
int meta_at_least(kvd_engine *e, MDB_txn *txn, const char *name, uint64_t at_least);
int replay_block(kvd_engine *e, MDB_txn *txn, const kvarc_block_header *h, const uint8_t *block,
                 uint64_t seg, uint64_t off, kvd_err *err);

/* Does the index refer to the block h at (seg, off) itself (not a copy)? */
int block_indexed_at(kvd_engine *e, MDB_txn *txn, const kvarc_block_header *h, uint64_t seg, uint64_t off);
/* How many blocks of the file fd (segment seg, size bytes) the index still
 * refers to: a segment marked DEAD must have none before it is removed. */
int seg_dead_referenced(kvd_engine *e, MDB_txn *txn, int fd, uint64_t seg, uint64_t size, uint64_t *n);

/* A segment file as recovery found it. */
typedef struct rf_seg {
    uint64_t id;
    int      fd;
    int      listed;            /* in the index's segment table (else a file it does not know) */
    uint8_t  state;             /* SEG_OPEN or SEG_SEALED as listed */
    uint64_t committed;         /* the index's committed size (0 if not listed) */
    uint64_t size;              /* the file's size */
    uint64_t new_bytes;         /* out: committed size after roll-forward */
    uint64_t applied;           /* out: blocks past committed that were replayed */
    uint64_t bad_off;           /* out: damage past committed (when bad_what) */
    const char *bad_what;
} rf_seg;

/* Replay, in sequence order, every valid block past the committed size of
 * those segs that are longer than it (recovery's roll-forward; replay.c's
 * design notes); sets every seg's new_bytes and applied. 0, or
 * KVARC_ECORRUPT (a block the index cannot take: nothing should be
 * changed, kvarcd refuses to start), or an I/O error. */
int recover_roll_forward(kvd_engine *e, MDB_txn *txn, rf_seg *segs, size_t nsegs, kvd_err *err);

#endif
