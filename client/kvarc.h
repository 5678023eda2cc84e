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
 * Return codes: 0, a negative errno, or a KVARC_E* code (kvarc_strerror).
 * A call that fails leaves a message in kvarc_errmsg(conv) /
 * kvarc_client_errmsg(client) naming what and where. Memory: libkvarc
 * returns -ENOMEM; it never aborts.
 *
 * Caveats
 * - A kvarc_conv is used by one thread at a time; different conversations
 *   may be used from different threads; a kvarc_client may be shared.
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
                                   top_k splits a prefill chunk into one query per RerankLayer */
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
    float    scale;             /* attention logit scale; 0: 1/sqrt(head_dim) */
    int      use_gpu;           /* 1 (default): stage 1 and attention on the GPU when libkvarc
                                   was built with CUDA and a device is present (stage 1 the same
                                   answers bit for bit, attention to 1e-5 relative); 0: CPU only */
} kvarc_options;

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

/* Connect to kvarcd: "unix:/path", a socket path, a data directory, or
 * "host:port". token (for TCP) and tls_ca_file (PEM; TLS on) may be NULL.
 * Nothing is sent until the first call. */
int  kvarc_client_open(const char *target, const char *token, const char *tls_ca_file, kvarc_client **out);
void kvarc_client_close(kvarc_client *c);
const char *kvarc_client_errmsg(const kvarc_client *c);

/* Create ns/name for model m with options o (NULL: defaults). means:
 * per (layer, kv head) centering means of K then V, [n_layers][n_kv_heads]
 * [2][head_dim] fp32, or NULL for zero (a sample of the model's keys makes
 * stage 1 sharper: see the README). */
int kvarc_conv_create(kvarc_client *c, const char *ns, const char *name, const kvarc_model *m,
                      const kvarc_options *o, const float *means, kvarc_conv **out);

/* Attach to an existing ns/name (another worker's, a fork, a restored
 * snapshot): checks m against it (KVARC_ESHAPE naming both sides), loads
 * every layer's signatures (LoadSignatures), sinks and hot window, and
 * continues at its archived length: the shortest layer's when a writer
 * died between its per-layer Appends (then re-feed the tokens from
 * kvarc_length on; see the caveats). Format, pos_mode and seed come from
 * the conversation; the rest of o applies. */
int kvarc_conv_attach(kvarc_client *c, const char *ns, const char *name, const kvarc_model *m,
                      const kvarc_options *o, kvarc_conv **out);

/* Archive every appended token now (normally done in batches), so that
 * kvarcd holds the whole conversation. */
int kvarc_conv_sync(kvarc_conv *cv);

/* Sync, then free the handle. Returns the sync's code. */
int kvarc_conv_close(kvarc_conv *cv);

const char *kvarc_errmsg(const kvarc_conv *cv);

/* Append n tokens of one layer: k and v are [n_kv_heads][n][head_dim] of
 * dtype (KVARC_DTYPE_F16/BF16/F32), pre-RoPE. Every layer must be given the
 * same tokens; positions continue from the layer's length. Tokens are
 * encoded and archived in batches of o.batch (each batch durable when the
 * call that completes it returns; with append_together 2, when the next
 * call that waits for kvarcd returns). */
int kvarc_append(kvarc_conv *cv, uint32_t layer, int dtype, const void *k, const void *v, uint32_t n);

/* Attention of the layer's last n_q appended tokens (a decode step: 1; a
 * prefill chunk: up to o.max_chunk). q is [n_q_heads][n_q][head_dim] fp32
 * pre-RoPE, out the same shape. Query i (position len - n_q + i) attends
 * to the sinks, its top_k cold tokens per kv head (retrieved from what was
 * archived and had left the hot window before the chunk), and the hot
 * window up to itself (causal). GQA: query head h reads kv head
 * h / (n_q_heads / n_kv_heads). */
int kvarc_attend(kvarc_conv *cv, uint32_t layer, const float *q, uint32_t n_q, float *out);

/* Tokens appended to layer (0 for a bad layer). */
uint64_t kvarc_length(const kvarc_conv *cv, uint32_t layer);

/* Fork (snapshot = 0) or snapshot (1) this conversation at its current
 * length into dst_ns/dst_name (syncs first; every layer must have the same
 * length). Restore a snapshot: kvarc_restore, then kvarc_conv_attach. */
int kvarc_fork(kvarc_conv *cv, const char *dst_ns, const char *dst_name, int snapshot);
int kvarc_restore(kvarc_client *c, const char *snap_ns, const char *snap_name, const char *dst_ns,
                  const char *dst_name);

void kvarc_conv_stats(const kvarc_conv *cv, kvarc_stats *out);

/* The options in effect: those given, with format, pos_mode and seed the
 * conversation's (attach), and score_distance resolved (-1: hot_window). */
void kvarc_conv_options(const kvarc_conv *cv, kvarc_options *out);

/* 1 if this conversation's stage 1 and attention run on the GPU. */
int kvarc_uses_gpu(const kvarc_conv *cv);

/* kvarc_append and kvarc_attend with k, v, q and out in CUDA device
 * memory (same layouts), for an engine whose tensors live on the GPU.
 * They copy through host memory for now (K/V to be encoded, the query for
 * stage 1); -ENOTSUP when libkvarc was built without CUDA, -EINVAL when a
 * pointer is not device memory. */
int kvarc_append_device(kvarc_conv *cv, uint32_t layer, int dtype, const void *d_k, const void *d_v, uint32_t n);
int kvarc_attend_device(kvarc_conv *cv, uint32_t layer, const float *d_q, uint32_t n_q, float *d_out);

/* The cold positions the last kvarc_attend retrieved for its last query
 * and kv head `head`, best first: up to max into pos; returns how many
 * there were (0 when nothing was cold). For measuring retrieval (recall,
 * needles), not needed to use the library. */
size_t kvarc_last_retrieved(const kvarc_conv *cv, uint32_t head, uint64_t *pos, size_t max);

#ifdef __cplusplus
}
#endif
#endif /* KVARC_H */
