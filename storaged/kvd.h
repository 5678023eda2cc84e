/* kvd.h - kvarc's storage engine: the library that kvarcd serves.
 *
 * A data directory holds an LMDB environment (index/) and append-only
 * segment files (segments/). Segments are the truth: every block in them
 * is self-describing (SCHEMA.md section 9), conversations' metadata
 * included, so the index can be rebuilt from the segments alone. LMDB is
 * what makes a block visible: a block is referenced by the index only
 * after its bytes were written and fdatasync'ed, in the same transaction
 * that advances the segment's committed size.
 *
 * Return codes: 0 (or a count) on success, a negative errno or kvarc code
 * (kvarc_schema.h) on failure. Functions that take a kvd_err * fill it
 * (when not NULL) with the code and a message that says what and where.
 *
 * Threads: one kvd_engine is shared by all threads. Appends from any
 * number of threads and conversations are batched into one group commit
 * (one write + one fdatasync + one LMDB commit per batch). Reads go
 * through a kvd_reader, one per thread (each owns an io_uring).
 *
 * Caveats
 * - One process per data directory: kvd_open takes an exclusive lock on
 *   DIR/LOCK and fails with -EBUSY if another process holds it.
 * - fork(): do not use an engine or reader in a child process.
 * - Metadata of deleted conversations stays in the segments until their
 *   creating block is compacted away; that is small next to their data.
 */
#ifndef KVD_H
#define KVD_H

#include <stddef.h>
#include <stdint.h>

#include "kvarc_schema.h"
#include "kvg.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvd_engine kvd_engine;
typedef struct kvd_reader kvd_reader;

typedef struct kvd_err {
    int  code;          /* the return code, repeated */
    char msg[1024];     /* what went wrong, where, and what to do (the remedy first
                           where a long path could push it past the end) */
} kvd_err;

/* The RADOS backend (cluster.c): the pool is the record, the data
 * directory a cache of it. */
typedef struct kvd_cluster_options {
    const char *pool;           /* required */
    const char *conf;           /* ceph.conf; NULL: librados's default search */
    const char *user;           /* cephx id without "client."; NULL: "admin" */
    const char *keyring;        /* NULL: what conf says */
    unsigned    lock_seconds;   /* writer lock duration; 0 = 30 */
    unsigned    op_timeout;     /* rados_osd_op_timeout and rados_mon_op_timeout, s; 0 = 30 */
    uint64_t    object_bytes;   /* start a conversation's next segment object past this; 0 = 64 MiB */
    const char *node;           /* this kvarcd's name in lock descriptions; NULL: the host name */
    unsigned    gc_grace_s;     /* compaction leaves pool objects changed this recently; 0 = 3600 */
} kvd_cluster_options;

typedef struct kvd_options {
    const char *dir;            /* data directory, created if missing */
    size_t      map_size;       /* LMDB map size; 0 = 64 GiB */
    uint64_t    segment_bytes;  /* seal a segment past this size; 0 = 256 MiB */
    const kvd_cluster_options *cluster;  /* NULL: the local backend */
} kvd_options;

#define KVD_NS_MAX    64        /* namespace, bytes incl. NUL */
#define KVD_NAME_MAX  128       /* conversation name, bytes incl. NUL */
#define KVD_MAX_LAYERS 1024
#define KVD_MAX_HEADS  256

/* Validated name: [A-Za-z0-9._-], 1..max-1 bytes, not starting with '.'. */
int kvd_name_valid(const char *s, size_t max);

/* A conversation's binding, fixed at creation. */
typedef struct kvd_shape {
    uint32_t n_layers, n_kv_heads, n_q_heads, head_dim;
    uint8_t  format;            /* kvarc_format of its records */
    uint8_t  pos_mode;          /* kvarc_pos_kind: 2 true positions (kind-2 signatures),
                                   1 remapped, 0 true with retired kind-0 signatures */
    uint8_t  rope_layout;       /* 0 half-split (NeoX), 1 interleaved pairs */
    uint8_t  dtype;             /* kvarc_dtype the client hands K/V in */
    uint32_t rotary_dims;       /* dimensions RoPE turns (0: none) */
    float    rope_theta;
    uint64_t seed;              /* rotation seed */
    char     fingerprint[64];   /* model fingerprint, NUL-terminated */
} kvd_shape;

#define KVD_CONV_SNAPSHOT 1u    /* immutable: appends refused */
#define KVD_CONV_DELETED  2u    /* internal: tombstone */

typedef struct kvd_conv_info {
    char      ns[KVD_NS_MAX], name[KVD_NAME_MAX];
    uint64_t  id;               /* internal id, stable for the conversation's life */
    uint64_t  parent;           /* id of the conversation forked from, 0 = none */
    uint64_t  fork_len;         /* tokens shared with the parent */
    uint64_t  length;           /* tokens archived in every layer (min over layers) */
    uint32_t  flags;            /* KVD_CONV_* */
    int64_t   created_ns;       /* CLOCK_REALTIME at creation */
    kvd_shape shape;
} kvd_conv_info;

/* ---- engine --------------------------------------------------------- */

/* Open (creating if needed) the data directory; recovers from a crash:
 * valid blocks past what the index knows are replayed into it (the index
 * may have lost its last transaction), bytes where no valid block starts
 * are cut off segment ends, files holding nothing the index needs are
 * removed. Refuses with KVARC_ECORRUPT, naming `kvarc verify DIR` and
 * `kvarc rebuild-index DIR`, when the index and its segments disagree in a
 * way only a rebuild repairs (a segment shorter than its committed size,
 * a valid block the index cannot take). */
int  kvd_open(const kvd_options *opt, kvd_engine **out, kvd_err *err);
void kvd_close(kvd_engine *e);

/* ---- conversations ------------------------------------------------- */

/* Create ns/name bound to shape. means: [n_layers][n_kv_heads][2][head_dim]
 * fp32 (mu_k then mu_v per head) or NULL for zero means. Durable on
 * return. -EEXIST if the name exists, -EINVAL for a bad name or shape. */
int kvd_conv_create(kvd_engine *e, const char *ns, const char *name, const kvd_shape *shape,
                    const float *means, kvd_conv_info *info, kvd_err *err);

/* Look ns/name up. With `expect` non-NULL, a different shape, format or
 * fingerprint is refused with KVARC_ESHAPE and a message naming both. */
int kvd_conv_open(kvd_engine *e, const char *ns, const char *name, const kvd_shape *expect,
                  kvd_conv_info *info, kvd_err *err);
int kvd_conv_stat(kvd_engine *e, uint64_t id, kvd_conv_info *info, kvd_err *err);

/* Up to max conversations of namespace ns (NULL = all) whose name sorts
 * after `after` (NULL = from the start), in name order; with ns NULL the
 * order is (namespace, name) and `after` is "NS/NAME". Returns the count. */
long kvd_conv_list(kvd_engine *e, const char *ns, const char *after, kvd_conv_info *out,
                   size_t max, kvd_err *err);

/* Staging (import): create ns/.import-<16 hex digits>, a name no client
 * can give (names do not start with '.'), so that a conversation is
 * published under its real name only when it is complete (a fork of the
 * stage), and a stage a crash left is known as one. info->name says which. */
#define KVD_STAGE_PREFIX ".import-"
int kvd_conv_create_stage(kvd_engine *e, const char *ns, const kvd_shape *shape, const float *means,
                          kvd_conv_info *info, kvd_err *err);
/* Delete every stage (at start, none can be in use): how many, or an error. */
long kvd_stage_sweep(kvd_engine *e, kvd_err *err);

/* Delete ns/name: it disappears at once; its records go at compaction
 * unless a fork or snapshot still shares them. */
int kvd_conv_delete(kvd_engine *e, const char *ns, const char *name, kvd_err *err);

/* Fork src at `at_len` tokens into dst (copy-on-write: no record copied).
 * at_len must not exceed src's length; UINT64_MAX means src's length.
 * KVD_CONV_SNAPSHOT in flags makes dst an immutable snapshot; restore is a
 * fork of a snapshot. */
int kvd_conv_fork(kvd_engine *e, const char *src_ns, const char *src_name, uint64_t at_len,
                  const char *dst_ns, const char *dst_name, uint32_t flags,
                  kvd_conv_info *info, kvd_err *err);

/* Tokens archived in one layer. */
int kvd_layer_length(kvd_engine *e, uint64_t conv, uint32_t layer, uint64_t *len, kvd_err *err);

/* Centering means of one (layer, kv head): mu_k[head_dim], mu_v[head_dim]. */
int kvd_conv_means(kvd_engine *e, uint64_t conv, uint32_t layer, uint32_t head, float *mu_k,
                   float *mu_v, kvd_err *err);

/* ---- append ---------------------------------------------------------- */

/* Append `count` tokens of one layer, all KV heads, at first_pos (which
 * must equal the layer's length). Layouts, per head h:
 *   sig_bits  [n_kv_heads][count][head_dim/8]
 *   sig_scale [n_kv_heads][count]
 *   records   [n_kv_heads][count][record_bytes]
 * Returns once the block is durable and visible (group commit). */
int kvd_append(kvd_engine *e, uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t count,
               const uint8_t *sig_bits, const uint16_t *sig_scale, const uint8_t *records,
               kvd_err *err);

/* The same, with the coarse tier's summaries of the 64-position blocks
 * the tokens complete (kvarc_block_n_sum(first_pos, count) of them, 0
 * allowed), per head: sum_bits [n_kv_heads][n_sum][KVARC_SUM_ITEMS]
 * [head_dim/8], sum_scale [n_kv_heads][n_sum][KVARC_SUM_ITEMS]; NULL:
 * none (those blocks then have no summary). */
int kvd_append_sums(kvd_engine *e, uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t count,
                    const uint8_t *sig_bits, const uint16_t *sig_scale, const uint8_t *records,
                    const uint8_t *sum_bits, const uint16_t *sum_scale, kvd_err *err);

/* One block of kvd_append_n, as kvd_append_sums takes it. */
typedef struct kvd_block_in {
    uint32_t        layer;
    uint64_t        first_pos;
    uint32_t        count;
    const uint8_t  *sig_bits;
    const uint16_t *sig_scale;
    const uint8_t  *records;
    const uint8_t  *sum_bits;    /* NULL: no summaries */
    const uint16_t *sum_scale;
} kvd_block_in;

/* Blocks of one conversation (any layers; a layer's in position order)
 * made durable together: queued at once, so that one group commit (one
 * segment fdatasync and one LMDB commit) takes up to 64 of them. Each
 * block is stored or refused on its own, as kvd_append_sums would:
 * rcs[i] its result, errs[i] (errs may be NULL) a refused block's
 * message. Returns the first nonzero rcs[i] (its message in err), 0 when
 * every block is stored. */
int kvd_append_n(kvd_engine *e, uint64_t conv, const kvd_block_in *b, size_t n, int *rcs, kvd_err *errs,
                 kvd_err *err);

/* ---- reads (one reader per thread) -------------------------------- */

int  kvd_reader_open(kvd_engine *e, kvd_reader **out, kvd_err *err);
void kvd_reader_close(kvd_reader *r);

/* Records of (conv, layer, head) at positions pos[0..n) into
 * out[n][record_bytes], each verified against its CRC (KVARC_ECORRUPT,
 * never the bytes, when one fails). Positions may repeat and come in any
 * order; every one must be below the layer's length (-ERANGE). */
int kvd_read_records(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head,
                     const uint64_t *pos, size_t n, uint8_t *out, kvd_err *err);

/* Signature planes of positions [first, first + count): bits[count][d/8]
 * and scales[count], verified. */
int kvd_read_sigs(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, uint64_t first,
                  uint64_t count, uint8_t *bits, uint16_t *scales, kvd_err *err);
/* The same for runs of positions (runs[2i] first, runs[2i + 1] count),
 * one after another into bits and scales; runs within one stored extent
 * read its section once. */
int kvd_read_sig_runs(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, const uint64_t *runs,
                      size_t n_runs, uint8_t *bits, uint16_t *scales, kvd_err *err);

/* Summaries of the 64-position blocks [b0, b0 + nb) of (conv, layer,
 * head), each block's last position below the layer's length (-ERANGE):
 * bits[nb][KVARC_SUM_ITEMS][d/8], scales[nb][KVARC_SUM_ITEMS], and ok[nb]
 * (1: present, verified; 0: the block was archived without one, its bytes
 * zero). KVARC_ECORRUPT when a summary section fails its checksum. */
int kvd_read_sums(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, uint64_t b0, uint64_t nb,
                  uint8_t *bits, uint16_t *scales, uint8_t *ok, kvd_err *err);

/* Kind-2 (true-position) signatures: what stage 1 needs for the block
 * biases (kvg_block_bias_ref): the RoPE, the head's mu_k (NULL = 0) and
 * the queries q_r[n_q][head_dim] turned to their own positions (the ones
 * qs were prepared from, with mu NULL). */
typedef struct kvd_qbias {
    const kvg_rope *rope;
    const float    *mu_k;
    const float    *q_r;
} kvd_qbias;

/* Stage 1 over the stored signatures of (conv, layer, head), positions
 * [0, len): the best k (1..KVD_SEARCH_K_MAX) by kvg_score_ref(mode,
 * combine) over the prepared queries qs[n_q] (kvg_score_pos_ref with the
 * block biases of qb when qb is given: kind-2 signatures), best first,
 * ties to the lower position: pos_out[k], score_out[k] (may be NULL).
 * Scans in chunks of KVD_SEARCH_CHUNK tokens (a multiple of
 * KVG_SIG_BLOCK), so memory stays bounded at any length; the answer equals
 * one kvg_topk_ref over the whole layer. Returns the count. */
#define KVD_SEARCH_CHUNK 65536
#define KVD_SEARCH_K_MAX 65536
long kvd_search(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, uint32_t head_dim, uint64_t len,
                int mode, int combine, const kvg_query *qs, int n_q, const kvd_qbias *qb, size_t k,
                uint64_t *pos_out, float *score_out, kvd_err *err);

/* Stage 2: score the shortlist exactly against the queries of a GQA group
 * (q[n_q][head_dim], fp32, combined by max; the score is q.k of the
 * decoded key, uncentered; in a true-position conversation (pos_mode 2)
 * the queries come turned to their own positions and each key is turned
 * to its own first) and return the best top_k: positions, scores and
 * records (pos_out[top_k], score_out[top_k] may be NULL, rec_out[top_k]
 * [record_bytes] may be NULL), best first. Returns the count, or
 * KVARC_EVERSION for a conversation of the retired kind 0 or an unknown
 * kind (kvd_retrieval_check). */
long kvd_rerank(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, const float *q,
                int n_q, const uint64_t *shortlist, size_t n, size_t top_k, uint64_t *pos_out,
                float *score_out, uint8_t *rec_out, kvd_err *err);

/* Many stage-2 reranks of one layer at once (a prefill chunk's queries,
 * every KV head): each item's answer equals kvd_rerank's bit for bit, but
 * a record that several items of the same head list is read and verified
 * once (consecutive queries' shortlists overlap most). Items of a head are
 * taken in passes of at most KVD_RERANK_PASS shortlist entries (a longer
 * item is a pass of its own; RerankLayer allows 65536), so memory stays
 * bounded. Returns 0 and each item's count in item.got, or the
 * first error (then no item's outputs are to be used). */
#define KVD_RERANK_PASS 65536
typedef struct kvd_rerank_item {
    uint32_t        head;
    const float    *q;           /* [n_q][head_dim], fp32 */
    int             n_q;         /* 1..64 */
    const uint64_t *shortlist;   /* [n] */
    size_t          n;
    size_t          top_k;
    uint64_t       *pos_out;     /* [top_k], best first */
    float          *score_out;   /* [top_k], may be NULL */
    uint8_t        *rec_out;     /* [top_k][record_bytes], may be NULL */
    long            got;         /* out: how many of top_k */
    /* Stage 1b here (n_runs > 0; shortlist NULL, n the shortlist's length):
     * the runs' tokens scored by their stored signatures (s1_mode, s1_combine;
     * the queries prepared as libkvarc prepares them: remapped centered by
     * mu_k, true uncentered with run_bias), their best n in kvg_topk_ref's
     * order the shortlist, written to sl_buf[n] (then shortlist = sl_buf,
     * n = how many). */
    const uint64_t *runs;        /* [n_runs][2] first position, count; ascending, disjoint */
    size_t          n_runs;
    const float    *run_bias;    /* true positions: [n_q][the runs' 64-blocks in run order]; else NULL */
    int             s1_mode, s1_combine;
    uint64_t       *sl_buf;
    /* The reply's choice (kvd_rerank_reply): */
    const uint64_t *have;        /* [n_have] positions whose records the client holds, ascending */
    size_t          n_have;
    int            *send_out;    /* [top_k] out: 1 where the record goes back */
    size_t          kept;        /* out: how many go back */
} kvd_rerank_item;
int kvd_rerank_batch(kvd_reader *r, uint64_t conv, uint32_t layer, kvd_rerank_item *items, size_t n_items,
                     kvd_err *err);
/* The same over nr readers (1..KVD_RERANK_READERS, each used by this call
 * alone): the kv heads split h mod nr, every reader but the first on a
 * thread of its own for the call. The answers are kvd_rerank_batch's
 * whatever nr is; on errors, the lowest failing head's. */
#define KVD_RERANK_READERS 64
int kvd_rerank_batch_par(kvd_reader *const *rs, int nr, uint64_t conv, uint32_t layer, kvd_rerank_item *items,
                         size_t n_items, kvd_err *err);
/* Which records a RerankLayer reply carries, after kvd_rerank_batch: of
 * each item's got records, those the client does not hold (have) and no
 * earlier item of the same head sends already. Each item's send_out marks
 * them and its kept counts them; their records are moved, in order, to the
 * front of recs (rb bytes each), where the items' rec_out slices lie one
 * after another in item order (an item's records only move toward the
 * front, never past its own slice). 0 or -ENOMEM. */
int kvd_rerank_reply(kvd_rerank_item *items, size_t n_items, size_t rb, uint8_t *recs, kvd_err *err);

/* ---- maintenance ------------------------------------------------------ */

typedef struct kvd_stats {
    uint64_t conversations, deleted, segments, segment_bytes, live_bytes;
    uint64_t blocks, tokens, extents;          /* tokens: archived (token, layer) pairs */
    uint64_t appends, group_commits, fsyncs;   /* since open */
    uint64_t rolled_forward;   /* valid blocks the index lacked, replayed by recovery at open */
    uint64_t recovery_damaged; /* damaged ranges past a committed size that recovery kept, because
                                  valid blocks follow them (verify names them) */
} kvd_stats;

int kvd_stats_get(kvd_engine *e, kvd_stats *st, kvd_err *err);

/* The engine's metrics in Prometheus text format, appended to b
 * (engine_metrics.c): what kvd_stats_get reads but the extents, and the
 * fdatasync latency histogram. 0 or an index read error. */
struct prom_buf;
int kvd_metrics(kvd_engine *e, struct prom_buf *b, kvd_err *err);

/* Progress of a long operation: done of total units (bytes). */
/* Progress of long work: done of total bytes. Return nonzero to stop it:
 * the call then returns -ECANCELED, having changed nothing. */
typedef int (*kvd_progress_fn)(void *arg, uint64_t done, uint64_t total);

/* Rewrite sealed segments whose live ratio is below `threshold` (0..1)
 * and drop the records of deleted conversations nothing shares. Old files
 * go once no reader uses them. reclaimed_out (may be NULL): bytes freed. */
int kvd_compact(kvd_engine *e, double threshold, uint64_t *reclaimed_out, kvd_progress_fn fn,
                void *arg, kvd_err *err);

typedef struct kvd_verify_report {
    uint64_t segments, blocks, records, extents, bytes;
    uint64_t problems;          /* 0: consistent */
} kvd_verify_report;

/* Check every block (header, signature, record and summary CRCs), that every
 * extent points at a matching block inside a committed segment, and that
 * every layer's extents cover [fork_len, length) exactly. Each problem is
 * described through `log` (may be NULL). Returns 0 or KVARC_ECORRUPT. */
int kvd_verify(kvd_engine *e, kvd_verify_report *rep, void (*log)(void *arg, const char *line),
               void *arg, kvd_progress_fn fn, void *parg, kvd_err *err);

/* Rebuild the index of the (closed) data directory from its segments:
 * every valid block is replayed in sequence order (damage is skipped, the
 * blocks after it still count); a block the index cannot take (a gap left
 * by a lost block, ...) is left out, described through `log` (may be
 * NULL) and counted in *dropped_out (may be NULL). The old index is kept
 * as index.old/ until the new one is complete. -EBUSY while kvarcd runs. */
int kvd_rebuild_index(const char *dir, void (*log)(void *arg, const char *line), void *larg,
                      uint64_t *dropped_out, kvd_progress_fn fn, void *arg, kvd_err *err);

/* Open a stopped data directory to check it, changing nothing: no
 * recovery, no truncation, the index read-only. kvd_verify on it also
 * reports what recovery would act on (valid blocks past the committed
 * sizes, segment files the index does not list); appends and compaction
 * are refused. -EBUSY while kvarcd runs (use the Verify RPC then). */
int kvd_open_check(const char *dir, kvd_engine **out, kvd_err *err);

/* ---- fault injection (tests) ----------------------------------------- */

typedef enum kvd_fault_op {
    KVD_FAULT_WRITE = 0,        /* segment pwrite */
    KVD_FAULT_SYNC  = 1,        /* segment fdatasync */
    KVD_FAULT_SHORT = 2,        /* segment pwrite writes half, then fails */
} kvd_fault_op;

/* After `countdown` more calls of op, fail the next with error (e.g.
 * -ENOSPC, -EIO); countdown < 0 disarms. Process-wide. */
void kvd_fault_set(kvd_fault_op op, int error, int countdown);

#ifdef __cplusplus
}
#endif
#endif /* KVD_H */
