/* kvarc.h - libkvarc, the KV-cache archive inside the inference process.
 *
 * An inference engine hands libkvarc the K and V of every token, layer by
 * layer, and asks it for attention. libkvarc keeps the first `sinks`
 * tokens and the last `hot_window` tokens exact in memory; every token is
 * also encoded (schema/SCHEMA.md formats) and archived in kvarcd in
 * batches. For each query it scores the query against the signatures of
 * the cold tokens (stage 1, here), asks kvarcd for the exact top_k of that
 * shortlist with their records (stage 2, one RerankLayer call per layer
 * and step), and computes one exact softmax over sinks + retrieved + hot
 * window (log-sum-exp merge). Fetched records stay in an LRU cache; a
 * record the cache holds does not cross the wire again.
 *
 * Positions and RoPE. K and Q are handed over pre-RoPE; libkvarc applies
 * the conversation's RoPE (rope_theta, rotary_dims, rope_layout; none when
 * rotary_dims is 0) when it attends. Position mode "true" (0): every key
 * at its real position. "remapped" (1): sinks and retrieved keys take
 * consecutive positions just before the hot window (sinks first, then the
 * retrieved in position order); hot keys keep theirs. Retrieval ranks keys
 * by the logit attention will use: in true mode each key is scored at its
 * own position and the query at its own (kind-2 signatures, SCHEMA.md
 * section 6.2); remapped, stages 1 and 2 score with the query turned by
 * `score_distance` positions (default: the hot window), the distance
 * retrieved keys are attended at. A conversation archived in true mode
 * before kind-2 signatures existed is refused by attach (KVARC_EVERSION).
 *
 * Return codes. Every int-returning call gives 0 on success, else a
 * negative errno or a KVARC_E* code (kvarc_schema.h; kvarc_strerror names
 * any of them). The codes a caller acts on, whichever call gives them:
 *   -EINVAL         a bad argument or option (the message says which); also
 *                   kvarcd's refusals of a request's content, among them
 *                   "appends must continue at the end" (another writer
 *                   appended that position first) and positions out of range
 *   -ENOMEM         out of memory in this process (libkvarc never aborts)
 *   -ENOENT         the conversation does not exist (or was deleted)
 *   -EEXIST         create, fork, snapshot or restore: the name is taken
 *   -EACCES         kvarcd refused the token (unknown, or not for this namespace)
 *   -ECONNREFUSED   kvarcd is unreachable (not running, restarting, or no
 *                   answer within 30 s); the message names the kvarcd and the
 *                   call. Retry it (sync) later. If an append reached kvarcd
 *                   and only its answer was lost, the retry is refused
 *                   ("appends must continue at the end", -EINVAL): kvarcd
 *                   has the tokens; close and attach again to continue
 *   -ENOSPC         kvarcd's disk, index map or memory is full, or a request
 *                   or reply over the transport's limits
 *   -EIO            kvarcd failed internally, or answered something malformed
 *   -EILSEQ         after an attach, a re-fed token differs from the stored one
 *   -ENOTSUP        a *_device call in a libkvarc built without CUDA
 *   KVARC_ESHAPE    attach: the model differs from the conversation's (the
 *                   message names both); appending to a snapshot; restoring
 *                   from something that is not one
 *   KVARC_EDTYPE    an element type that is not f32, f16 or bf16
 *   KVARC_ENONFINITE a NaN or Inf in K, V or a query, or a K/V value of
 *                   magnitude 2^59 or more (its square would overflow fp32)
 *   KVARC_ECORRUPT  kvarcd found damaged data (a checksum or structure)
 *   KVARC_EVERSION  attach: a conversation this libkvarc cannot serve
 *   KVARC_ELOCKED   an append (sync), fork onto or delete of a conversation
 *                   another kvarcd on the same Ceph pool is writing (its
 *                   writer lock; the message names it): retry once it is
 *                   released or lapses (kvarcd --rados-lock-s)
 * kvarcd's KVARC_ESHAPE, KVARC_ECORRUPT and KVARC_ELOCKED arrive as themselves, its other
 * KVARC_E* codes as -EINVAL (the message keeps the name). Each function
 * below lists what it can return.
 *
 * Messages. A failing call leaves a message (what and where, at most 511
 * bytes) in kvarc_errmsg(cv) for the conversation's calls, or in
 * kvarc_client_errmsg(c) for create, attach, restore and a failing
 * kvarc_conv_close. Read it right after the failing call: the string lives
 * in the handle and is overwritten in place by its next call that talks to
 * kvarcd (which clears it), and freed with the handle.
 *
 * Failed calls and state. A call refused for its arguments changes nothing.
 * A call that fails in kvarcd keeps what kvarcd acknowledged and what was
 * appended locally (see kvarc_append); sync again to retry. Some refusals
 * repeat on every later sync (-EILSEQ, "appends must continue at the
 * end", KVARC_ESHAPE for a snapshot, a broken pipelined append): the
 * handle holds tokens kvarcd will never take, and the way on is to close it
 * and attach again.
 *
 * Caveats
 * - A kvarc_conv is used by one thread at a time; different conversations
 *   may be used from different threads. A kvarc_client may be shared (its
 *   connection is thread-safe), but its message buffer is one per client:
 *   with several threads on one client, kvarc_client_errmsg may show
 *   another thread's message (the return codes are always right).
 * - Close every conversation before its client (kvarc_client_close does
 *   not know them; a conversation used after it is a use after free).
 * - One writer per conversation: kvarcd refuses an append at a position
 *   already stored ("appends must continue at the end"), so a second
 *   worker writing the same conversation fails; give each worker its own
 *   fork (kvarc_fork), which shares the prefix without copying it.
 * - Do not fork() a process holding a kvarc_client and use it in the child
 *   (gRPC's rule).
 * - Attaching (kvarc_conv_attach) rebuilds the sinks and the hot window
 *   from the archived records: exact with a lossless format (f16/bf16),
 *   quantized otherwise; tokens appended but not yet synced by the other
 *   worker are not there.
 * - Taking over from a dead writer. Archiving sends one Append per layer
 *   (kvarc_conv_sync, and each batch of kvarc_append), so a writer that
 *   dies in between leaves layers of different lengths. Attach then
 *   continues every layer at the common (shortest) length, which
 *   kvarc_length reports: the hot-window tokens the dead writer never
 *   archived are gone with it, as in any crash, and the taker must append
 *   the same tokens again from that length on (recomputed from its own
 *   transcript). Where a layer already holds a position, the re-fed token
 *   is not sent again: its signature is compared with the stored one and
 *   the stored record is kept (what kvarcd acknowledged is never
 *   rewritten). A recomputation that differs only by rounding passes; a
 *   different token fails the append or sync with -EILSEQ and nothing is
 *   written. The taker's first sync past the longest layer leaves every
 *   layer at the same length. A taker without the transcript forks the
 *   conversation right after attach (kvarc_fork: at the common length)
 *   and continues the fork. Attach cannot tell a dead writer from a slow
 *   one: if the old writer still runs, the first to append a position
 *   wins and the other's Append is refused ("appends must continue at
 *   the end").
 */
#ifndef KVARC_H
#define KVARC_H

#include <stddef.h>
#include <stdint.h>

#include "kvarc_schema.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvarc_client kvarc_client;
typedef struct kvarc_conv   kvarc_conv;

/* The model a conversation is bound to (checked when attaching). */
typedef struct kvarc_model {
    uint32_t    n_layers, n_kv_heads, n_q_heads, head_dim;
    int         dtype;          /* KVARC_DTYPE_* of the K/V the model produces */
    float       rope_theta;     /* e.g. 10000 or 500000 */
    uint32_t    rotary_dims;    /* 0: no RoPE (keys used as given) */
    int         rope_layout;    /* 0 half-split (NeoX/HF), 1 interleaved pairs */
    const char *fingerprint;    /* the client's name for the weights, <= 63 bytes */
} kvarc_model;

/* Retrieval options; kvarc_options_default() gives the measured defaults. */
typedef struct kvarc_options {
    int      format;            /* record format (KVARC_FMT_*), fixed at create */
    int      pos_mode;          /* 0 true positions, 1 remapped; fixed at create */
    uint64_t seed;              /* rotation seed, fixed at create */
    uint32_t sinks;             /* first tokens kept exact */
    uint32_t hot_window;        /* last tokens kept exact (>= batch) */
    uint32_t top_k;             /* cold records attended per query and kv head; 0: none (no
                                   retrieval: sinks + hot window only, an ablation) */
    uint32_t shortlist;         /* stage-1 shortlist = shortlist x top_k */
    uint32_t batch;             /* tokens encoded and archived per append call to kvarcd */
    uint32_t max_chunk;         /* largest prefill chunk (queries of one attend call) */
    int      score_mode;        /* 0 asymmetric (RaBitQ-style), 1 Hamming */
    int      combine;           /* GQA group in stage 1: 0 max, 1 mean */
    int32_t  score_distance;    /* remapped: stage 1/2 turn the query this many positions; -1:
                                   hot_window (true mode scores at true positions) */
    size_t   cache_records;     /* LRU record cache capacity, records per conversation; any
                                   size works, but one under 2 x kv heads x (shortlist + 1) x
                                   top_k splits a prefill chunk into one query per RerankLayer; at most 2^30 */
    uint32_t coarse_blocks;     /* coarse tier: stage 1 scores every 64-token block's summaries and
                                   scans only the tokens of this many best blocks per query and kv
                                   head (contexts under twice that scan all). 0 (default): scan every
                                   cold token; 64 kept every synthetic needle but lost 2 of 10
                                   passkeys at 16K (README). 0 or shortlist x top_k / 64 .. 2^24,
                                   else create/attach fail with -EINVAL */
    uint32_t prefill_coarse_blocks; /* the same for the queries of a prefill chunk (an attend of
                                   several queries) but its last, whose output picks the next
                                   token: that one, and every decode step, scan as coarse_blocks
                                   says. 0 (default): as coarse_blocks; same range */
    uint32_t prefill_shortlist; /* the same queries' shortlist, in top_k (stage 2 reranks
                                   prefill_shortlist x top_k of them). 0 (default): shortlist;
                                   else 1..shortlist */
    uint32_t threads;           /* threads a decode step's stage 1 may use from 32K cold tokens on
                                   (kv heads spread over them; the same answer whatever the count):
                                   0 (default) every online CPU, 1 only the caller's; at most 256 */
    int      fast_tier;         /* 0 (default): the client holds every cold token's signature (18 B
                                   per token, layer and kv head at head_dim 128) and runs stage 1;
                                   1: it holds only the coarse tier's block summaries (and the
                                   signatures of each layer's unfinished block): it scores them, picks
                                   coarse_blocks blocks (all of them when that is 0 or does not pay)
                                   and kvarcd scans their tokens in the same RerankLayer call (stage
                                   1b) - the shortlists of 0 with the same options, bit for bit, with
                                   1/28 of the memory and attach traffic (measured at 1M). No GPU
                                   stage 1 then.
                                   0 or 1, else -EINVAL */
    int      append_together;   /* 1 (default): the layers' batches wait for the last layer's and
                                   go together in one AppendMany, one durable commit in kvarcd for
                                   all (kvarc_conv_sync too; 2x the archiving rate, README); a layer
                                   whose ring fills first, whose cold tokens attend needs, or that
                                   has re-fed tokens to check after an attach is sent alone. 0: each
                                   layer's batch is one Append as it fills (a writer that dies then
                                   leaves layers of different lengths more often; attach handles
                                   both). 2: as 1, and the AppendMany stays in flight while the
                                   writer goes on (encoding the next batch as kvarcd commits this
                                   one: ~1.2x the archiving rate, README); a batch is then durable
                                   when the call that sends the next one returns, or at
                                   kvarc_conv_sync, kvarc_attend, kvarc_fork or close (each waits
                                   for it first), not when the call that filled it returns. If
                                   kvarcd refuses it, that waiting call fails, and so does every
                                   later one (the handle counted the batch as archived): attach
                                   again. 0, 1 or 2, else -EINVAL */
    float    scale;             /* attention logit scale; 0: 1/sqrt(head_dim); else finite > 0 */
    int      use_gpu;           /* 1 (default): stage 1 and attention on the GPU when libkvarc
                                   was built with CUDA and a device is present (stage 1 the same
                                   answers bit for bit, attention to 1e-5 relative); 0: CPU only */
} kvarc_options;

/* Fill *o (out) with the measured defaults (the comments above give each).
 * Cannot fail; o must not be NULL. Options out of the ranges above make
 * kvarc_conv_create and kvarc_conv_attach fail with -EINVAL, naming them. */
void kvarc_options_default(kvarc_options *o);

/* Counters since the conversation was opened. */
typedef struct kvarc_stats {
    uint64_t steps;             /* attend calls */
    uint64_t queries;           /* query tokens attended */
    uint64_t archived;          /* (token, layer) pairs sent to kvarcd */
    uint64_t records_fetched;   /* records that crossed the wire */
    uint64_t cache_lookups, cache_hits;
    uint64_t bytes_sent, bytes_received;   /* RPC payloads */
    uint64_t ns_stage1, ns_stage2, ns_decode, ns_attend, ns_archive;
} kvarc_stats;

/* ---- the client: one connection to one kvarcd ------------------------------ */

/* Connect to kvarcd.
 *   target       in: "unix:/path", a socket path, a data directory (its
 *                kvarcd.sock), or "host:port" (TCP)
 *   token        in: bearer token for TCP (<= 1024 bytes, no white space), or NULL
 *   tls_ca_file  in: PEM file of the CA to trust (TLS on), or NULL (plaintext)
 *   out          out: the client, on success
 * Nothing is sent until the first call: a kvarcd that is not there shows
 * as -ECONNREFUSED from the first create, attach or restore.
 * Returns 0; -EINVAL (target or out NULL, a bad token, an unreadable CA
 * file, or a target gRPC cannot use); -ENOMEM. On failure nothing is left
 * to free and there is no client to read a message from. */
int  kvarc_client_open(const char *target, const char *token, const char *tls_ca_file, kvarc_client **out);

/* Close the connection and free c (NULL: nothing). Close its
 * conversations first. kvarc_client_errmsg(c)'s string goes with it. */
void kvarc_client_close(kvarc_client *c);

/* The message of c's last failing create, attach, restore or conversation
 * close ("" after a create, attach or restore that succeeded; "no client"
 * for NULL). Valid until the next of those calls on c, from any thread,
 * or kvarc_client_close. */
const char *kvarc_client_errmsg(const kvarc_client *c);

/* ---- conversations ---------------------------------------------------------- */

/* Create ns/name for model m.
 *   ns, name  in: 1..63 and 1..127 bytes of [A-Za-z0-9._-], not starting with '.'
 *   m         in: the model's shape (checked; kept by the conversation)
 *   o         in: options, or NULL for kvarc_options_default's; format,
 *             pos_mode and seed are fixed for the conversation's life
 *   means     in: per (layer, kv head) centering means of K then V,
 *             [n_layers][n_kv_heads][2][head_dim] fp32 (finite), or NULL for
 *             zero (a sample of the model's keys makes stage 1 sharper: README)
 *   out       out: the open conversation, on success; close it with
 *             kvarc_conv_close
 * Returns 0; -EINVAL (a bad name, shape or option: the message says which;
 * head_dim must be 64, 128 or 256); -EEXIST (ns/name exists); -ENOMEM;
 * -EACCES, -ECONNREFUSED, -ENOSPC, -EIO (from kvarcd). Messages in
 * kvarc_client_errmsg(c). If the Create reached kvarcd but its answer was
 * lost (-ECONNREFUSED), the conversation may exist: creating it again then
 * gives -EEXIST (attach it). */
int kvarc_conv_create(kvarc_client *c, const char *ns, const char *name, const kvarc_model *m,
                      const kvarc_options *o, const float *means, kvarc_conv **out);

/* Attach to the existing ns/name (another worker's, a fork, a restored
 * snapshot): checks m against it, loads every layer's signatures
 * (LoadSignatures), sinks and hot window, and continues at its archived
 * length: the shortest layer's when a writer died between its per-layer
 * Appends (then re-feed the tokens from kvarc_length on; see the caveats).
 *   ns, name, m  in: as kvarc_conv_create (m must match; its dtype is not compared)
 *   o            in: options, or NULL; format, pos_mode and seed come from
 *                the conversation (kvarc_conv_options shows the result)
 *   out          out: the open conversation, on success
 * Returns 0; -ENOENT (no such conversation); KVARC_ESHAPE (m differs: the
 * message names both sides); KVARC_EVERSION (true positions archived
 * before kind-2 signatures, or a newer kvarc's conversation); -EINVAL (a
 * bad option); -ENOMEM; -ENOSPC (among others: a hot window whose records
 * exceed one 8 MiB Fetch); -EACCES, -ECONNREFUSED, KVARC_ECORRUPT, -EIO
 * (from kvarcd). Messages in kvarc_client_errmsg(c). Attach only reads:
 * a failure changes nothing in kvarcd. A snapshot attaches, but appends to
 * it are refused (KVARC_ESHAPE): restore it under a new name first. */
int kvarc_conv_attach(kvarc_client *c, const char *ns, const char *name, const kvarc_model *m,
                      const kvarc_options *o, kvarc_conv **out);

/* Archive every appended token now (normally done in batches), so that
 * kvarcd holds the whole conversation; with append_together 2, also wait
 * for the AppendMany in flight.
 * Returns 0 (every appended token is durable in kvarcd); -ENOMEM;
 * KVARC_ENONFINITE (a token too large to encode); -EILSEQ (re-fed tokens
 * differ, after an attach); -EINVAL ("appends must continue at the end":
 * another writer has those positions); KVARC_ESHAPE (a snapshot); -ENOENT
 * (deleted); -ECONNREFUSED, -ENOSPC, -EACCES, KVARC_ECORRUPT, -EIO (from
 * kvarcd); with append_together 2, the code of an earlier refused
 * AppendMany, on every later call (attach again). Messages in
 * kvarc_errmsg(cv). What kvarcd acknowledged stays archived; the rest stays
 * appended (kvarc_length counts it) for the next sync to retry. */
int kvarc_conv_sync(kvarc_conv *cv);

/* Sync, then free cv (NULL: returns 0). Returns the sync's code; the
 * handle is freed whatever it is, and a failure's message goes to
 * kvarc_client_errmsg (kvarc_errmsg(cv) is freed with cv). */
int kvarc_conv_close(kvarc_conv *cv);

/* The message of cv's last failing call ("" after a call that talked to
 * kvarcd and succeeded; "no conversation" for NULL). Valid until cv's next
 * call or kvarc_conv_close(cv). */
const char *kvarc_errmsg(const kvarc_conv *cv);

/* Append n tokens of one layer.
 *   layer  in: 0..n_layers-1
 *   dtype  in: KVARC_DTYPE_F16, _BF16 or _F32: the element type of k and v
 *   k, v   in: [n_kv_heads][n][head_dim], pre-RoPE; read during the call only
 *   n      in: tokens (0: nothing, or a flush that was due)
 * Every layer must be given the same tokens; positions continue from the
 * layer's length. Tokens are encoded and archived in batches of o.batch
 * (each batch durable when the call that completes it returns; with
 * append_together 1, the last layer's call sends every layer's batch;
 * with append_together 2, when the next call that waits for kvarcd
 * returns).
 * Returns 0; -EINVAL (bad layer, NULL k or v); KVARC_EDTYPE;
 * KVARC_ENONFINITE (a NaN, an Inf or a magnitude of 2^59 or more anywhere
 * in k or v: checked before any token is kept, so nothing is appended; the
 * message names token and head); -ENOMEM; and, when the call archives a batch, every code of
 * kvarc_conv_sync. Messages in kvarc_errmsg(cv). An archiving failure
 * can happen part way through the call (a full ring, or a batch sent per
 * layer): the tokens before it were appended and stay (the next sync
 * retries them), the rest were not. kvarc_length tells which: append
 * again from there, not the whole call. */
int kvarc_append(kvarc_conv *cv, uint32_t layer, int dtype, const void *k, const void *v, uint32_t n);

/* Attention of the layer's last n_q appended tokens (a decode step: 1; a
 * prefill chunk: up to o.max_chunk).
 *   layer  in: 0..n_layers-1
 *   q      in: [n_q_heads][n_q][head_dim] fp32, pre-RoPE
 *   n_q    in: 1..min(o.max_chunk, kvarc_length(cv, layer))
 *   out    out: [n_q_heads][n_q][head_dim] fp32 (may not overlap q)
 * Query i (position len - n_q + i) attends to the sinks, its top_k cold
 * tokens per kv head (retrieved from what was archived and had left the
 * hot window before the chunk), and the hot window up to itself (causal).
 * GQA: query head h reads kv head h / (n_q_heads / n_kv_heads).
 * Returns 0; -EINVAL (bad layer or n_q, NULL q or out); KVARC_ENONFINITE
 * (a NaN or Inf anywhere in q: checked before any work); -ENOMEM; -ENOENT, -ENOSPC, -EACCES, -ECONNREFUSED,
 * KVARC_ECORRUPT, -EIO (kvarcd's RerankLayer); every code of
 * kvarc_conv_sync when it must archive first (rare: layers appended
 * unevenly) or waits for a pipelined append. Messages in kvarc_errmsg(cv).
 * On failure out may be partly written (queries are served in groups);
 * nothing appended or archived is undone. A GPU failure is not an error:
 * the conversation continues on the CPU (kvarc_uses_gpu turns 0). */
int kvarc_attend(kvarc_conv *cv, uint32_t layer, const float *q, uint32_t n_q, float *out);

/* Tokens appended to layer, archived or not (0 for a bad layer). */
uint64_t kvarc_length(const kvarc_conv *cv, uint32_t layer);

/* Fork (snapshot = 0) or snapshot (1) this conversation at its current
 * length into dst_ns/dst_name: syncs first, and every layer must have the
 * same length. A fork shares the prefix without copying it and can be
 * appended to; a snapshot cannot (restore it). Returns 0; every code of
 * kvarc_conv_sync; -EINVAL (layers of different lengths, a bad name);
 * -EEXIST (the destination exists); -ENOENT; -EACCES, -ECONNREFUSED,
 * -ENOSPC, KVARC_ECORRUPT, -EIO (from kvarcd). Messages in
 * kvarc_errmsg(cv). A failed fork keeps what its sync archived. */
int kvarc_fork(kvarc_conv *cv, const char *dst_ns, const char *dst_name, int snapshot);

/* Make dst_ns/dst_name from the snapshot snap_ns/snap_name (then
 * kvarc_conv_attach it). Returns 0; -ENOENT (no such snapshot);
 * KVARC_ESHAPE (it is not a snapshot: fork it instead); -EEXIST (the
 * destination exists); -EINVAL (a bad name); -EACCES, -ECONNREFUSED,
 * -ENOSPC, KVARC_ECORRUPT, -EIO. Messages in kvarc_client_errmsg(c). */
int kvarc_restore(kvarc_client *c, const char *snap_ns, const char *snap_name, const char *dst_ns,
                  const char *dst_name);

/* Copy the counters since the conversation was opened into *out. Failed
 * calls count their work too, except steps and queries (successes only). */
void kvarc_conv_stats(const kvarc_conv *cv, kvarc_stats *out);

/* The options in effect: those given, with format, pos_mode and seed the
 * conversation's (attach), and score_distance resolved (-1: hot_window). */
void kvarc_conv_options(const kvarc_conv *cv, kvarc_options *out);

/* 1 if this conversation's stage 1 and attention run on the GPU (0 for
 * NULL, without CUDA or a device, with use_gpu 0 or fast_tier 1). It can
 * turn 0 during any call after a device failure (the CPU serves on), and
 * never back. */
int kvarc_uses_gpu(const kvarc_conv *cv);

/* kvarc_append and kvarc_attend with k, v, q and out in CUDA device
 * memory (same layouts), for an engine whose tensors live on the GPU.
 * They copy through host memory for now (K/V to be encoded, the query for
 * stage 1). Returns every code of kvarc_append / kvarc_attend, and
 * -ENOTSUP when libkvarc was built without CUDA, -EINVAL when a pointer
 * is not device memory the copy can read (or, with CUDA but no device,
 * always). kvarc_attend_device can fail after the attention succeeded, in
 * copying out back: then d_out is not written but the step counts. */
int kvarc_append_device(kvarc_conv *cv, uint32_t layer, int dtype, const void *d_k, const void *d_v, uint32_t n);
int kvarc_attend_device(kvarc_conv *cv, uint32_t layer, const float *d_q, uint32_t n_q, float *d_out);

/* The cold positions the last kvarc_attend (of any layer) that got as far
 * as retrieving for its last query retrieved for it and kv head `head`, best first as kvarcd
 * ranked them: min(count, max) of them copied into pos (the caller's; pos
 * may be NULL when max is 0). Returns the count, which can exceed max (0
 * for a bad head, before any attend, or when nothing was cold or top_k is
 * 0). For measuring retrieval (recall, needles), not needed to use the
 * library. */
size_t kvarc_last_retrieved(const kvarc_conv *cv, uint32_t head, uint64_t *pos, size_t max);

#ifdef __cplusplus
}
#endif
#endif /* KVARC_H */
