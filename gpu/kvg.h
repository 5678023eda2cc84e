/* kvg.h - kvarc's numeric kernels: CPU references (always built) and, when
 * built with CUDA, their GPU versions with the same semantics.
 *
 * Families (one file each, CPU reference first):
 *   codec     : K/V (f32, f16, bf16) -> records + signatures, records -> K/V
 *   query     : rotate and quantize a query for stage 1
 *   score     : stage-1 scores of queries against N signatures
 *   topk      : the k best of N scores, linear in N (radix select)
 *   attention : exact attention of one decode step over partitions
 *               (sinks, hot window, retrieved records), GQA, LSE merge
 *
 * Semantics are bit-exact where SCHEMA.md says so (codec, query, score,
 * topk): a GPU version must produce the same bytes. Attention is exact
 * math in fp32 accumulation; GPU parity is to a stated tolerance.
 *
 * Memory: no function allocates except kvg_topk_ref when given no scratch
 * and kvg_rope_table_init (then -ENOMEM is possible). Outputs are caller-owned. Every function is
 * thread-safe on distinct outputs.
 */
#ifndef KVG_H
#define KVG_H

#include "kvarc_schema.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- codec ------------------------------------------------------------ */

/* What is fixed for one (conversation, layer, kv head). */
typedef struct kvg_codec {
    int                   format;   /* kvarc_format */
    const kvarc_rotation *rot;      /* the conversation's rotation (head_dim) */
    const float          *mu_k;     /* [head_dim] centering mean of K, NULL = 0 */
    const float          *mu_v;     /* [head_dim] centering mean of V, NULL = 0 */
} kvg_codec;

/* Encode n tokens of one (layer, kv head).
 *   k, v      : [n][head_dim] elements of dtype dt (pre-RoPE K)
 *   records   : out, n * kvarc_record_bytes(format, head_dim) bytes
 *   sig_bits  : out, n * head_dim/8 bytes
 *   sig_scale : out, n fp16 values
 *   bad_token : out (may be NULL), index of the token that failed
 * Returns 0, -EINVAL, KVARC_EFORMAT, KVARC_EHEADDIM, KVARC_EDTYPE, or
 * KVARC_ENONFINITE (NaN/Inf in K or V, or a vector whose squared norm
 * overflows fp32). On error the outputs are unspecified. n = 0 is a no-op. */
int kvg_encode_ref(const kvg_codec *c, kvarc_dtype dt, const void *k, const void *v,
                   size_t n, uint8_t *records, uint8_t *sig_bits, uint16_t *sig_scale,
                   size_t *bad_token);

/* Decode n records to fp32 [n][head_dim]; k_out or v_out may be NULL to
 * skip that half. Returns 0, -EINVAL, KVARC_EFORMAT or KVARC_EHEADDIM. */
int kvg_decode_ref(const kvg_codec *c, const uint8_t *records, size_t n,
                   float *k_out, float *v_out);

/* Stage-2 scores: for each of n records, the max over the n_q queries
 * q[n_q][head_dim] (fp32, uncentered, same positions as the keys) of
 * q . khat, khat the decoded key. Rotated formats compute it without
 * decoding: q.mu_k (tree sum) + scale * sum_i (R q)_i L[code_i] (sum in
 * index order); lossless formats sum q_i k_i in index order. Equals
 * decode-then-dot up to fp32 rounding. Returns 0, -EINVAL, KVARC_EFORMAT,
 * KVARC_EHEADDIM, KVARC_ENONFINITE (q). */
int kvg_key_scores_ref(const kvg_codec *c, const float *q, int n_q, const uint8_t *records,
                       size_t n, float *scores);

/* The same codec sixteen tokens at a time (codec_simd.c), chosen at run
 * time: kvg_encode / kvg_decode give kvg_encode_ref's / kvg_decode_ref's
 * bits and return codes (bad_token included) on every CPU. The *_isa forms
 * run one build: KVG_ISA_REF the reference, BASE the lanes on the build's
 * baseline ISA, V3 / V4 on x86-64-v3 (AVX2) / x86-64-v4 (AVX-512);
 * -ENOTSUP where this CPU lacks it. */
typedef enum kvg_isa { KVG_ISA_REF = 0, KVG_ISA_BASE = 1, KVG_ISA_V3 = 2, KVG_ISA_V4 = 3 } kvg_isa;
int         kvg_codec_isa_supported(kvg_isa isa);
kvg_isa     kvg_codec_isa_best(void);
const char *kvg_codec_isa_name(kvg_isa isa);
int kvg_encode(const kvg_codec *c, kvarc_dtype dt, const void *k, const void *v, size_t n, uint8_t *records,
               uint8_t *sig_bits, uint16_t *sig_scale, size_t *bad_token);
int kvg_encode_isa(kvg_isa isa, const kvg_codec *c, kvarc_dtype dt, const void *k, const void *v, size_t n,
                   uint8_t *records, uint8_t *sig_bits, uint16_t *sig_scale, size_t *bad_token);
/* kvg_signature_ref of n centered keys x[n][d] in order: 0, or the first
 * failing token's code with *bad (may be NULL) = that token. */
int kvg_signatures(const kvarc_rotation *rot, const float *x, size_t n, uint8_t *bits, uint16_t *scales, size_t *bad);
int kvg_signatures_isa(kvg_isa isa, const kvarc_rotation *rot, const float *x, size_t n, uint8_t *bits,
                       uint16_t *scales, size_t *bad);
int kvg_decode(const kvg_codec *c, const uint8_t *records, size_t n, float *k_out, float *v_out);
int kvg_decode_isa(kvg_isa isa, const kvg_codec *c, const uint8_t *records, size_t n, float *k_out, float *v_out);

/* The queries of kvg_key_scores_ref as it prepares them: bias[h] = q_h .
 * mu_k (tree sum; 0 without mu_k) and, r not NULL, r[h][d] = R q_h.
 * 0 or KVARC_ENONFINITE (a query element). */
int kvg_key_query_prep(const kvg_codec *c, const float *q, int n_q, float *r, float *bias);

/* The signature (SCHEMA.md section 6) of an already centered key x[d]:
 * bits and scale of y = R x. 0, -EINVAL, KVARC_ENONFINITE (x, or a squared
 * norm that overflows). kvg_encode_ref makes the same from k - mu_k. */
int kvg_signature_ref(const kvarc_rotation *rot, const float *x, uint8_t *bits, uint16_t *scale);

/* y = R x and x = R^T y (SCHEMA.md section 3); x and y may alias. */
void kvg_rotate_ref(const kvarc_rotation *rot, const float *x, float *y);
void kvg_unrotate_ref(const kvarc_rotation *rot, const float *y, float *x);

/* ---- query preparation ------------------------------------------------ */

/* A query prepared for stage 1 against one KV head's signatures. */
typedef struct kvg_query {
    int     head_dim;
    float   qscale;                         /* R q ~= qscale * q8 */
    float   bias;                           /* q . mu_k, added to asym scores */
    int8_t  q8[KVARC_HEAD_DIM_MAX];         /* rintf((R q)_i / qscale) */
    uint8_t bits[KVARC_HEAD_DIM_MAX / 8];   /* sign bits of R q (Hamming) */
} kvg_query;

/* Prepare query q ([head_dim] of dt) for stage 1. mu_k as in the codec
 * (NULL = 0): only keys are centered; q.mu_k becomes the bias.
 * Returns 0, -EINVAL, KVARC_EDTYPE, KVARC_ENONFINITE. */
int kvg_query_prep_ref(const kvarc_rotation *rot, const float *mu_k, kvarc_dtype dt,
                       const void *q, kvg_query *out);

/* ---- stage-1 scoring -------------------------------------------------- */

typedef enum kvg_score_mode {
    KVG_SCORE_ASYM    = 0, /* (dot(q8, +-1) * qscale) * sig_scale + bias */
    KVG_SCORE_HAMMING = 1, /* head_dim - 2 * popcount(qbits ^ kbits) */
} kvg_score_mode;

typedef enum kvg_combine {
    KVG_COMBINE_MAX  = 0, /* GQA: max over the group's query heads */
    KVG_COMBINE_MEAN = 1, /* GQA: sum in head order, divided by n_q */
} kvg_combine;

/* Score n signatures of one KV head against the n_q queries of its GQA
 * group (1 <= n_q <= 64), writing scores[n]. Higher is more relevant.
 * Returns 0, -EINVAL (bad pointers, n_q, mode, or queries of different
 * head_dims). n = 0 is a no-op. */
int kvg_score_ref(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                  const uint8_t *sig_bits, const uint16_t *sig_scale, size_t n,
                  float *scores);

/* kvg_score_pos_ref's answer bit for bit by the fastest kernel this CPU
 * has, chosen at run time (cpuid): AVX-512 (VPOPCNTDQ) for the asymmetric
 * score at head_dim 128, every query head of the group in one pass;
 * otherwise the reference. kvg_score_kernel names the choice. */
int kvg_score_pos(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *sig_bits,
                  const uint16_t *sig_scale, size_t n, uint64_t first_pos, const float *blk_bias, size_t nblk,
                  float *scores);
const char *kvg_score_kernel(int head_dim);

/* The same over runs of one head's signatures: runs[2r] is run r's first
 * index in sig_bits/sig_scale (the token at position first_pos + that
 * index), runs[2r + 1] its length; the scores of every run are written
 * one after another into scores[sum of lengths]. Each run is what
 * kvg_score_pos_ref gives for it alone (blk_bias, when given, covers the
 * whole array from first_pos: nblk blocks from block first_pos / 64); the
 * query is prepared once for all runs. Same return codes. */
/* The argument checks of kvg_score_runs and kvg_plane_score_runs, and the
 * extent the runs reach (*end: 0 when every run is empty). 0 or -EINVAL. */
int kvg_score_runs_check(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, uint64_t first_pos,
                         const uint64_t *runs, size_t nr, const float *blk_bias, size_t nblk, uint64_t *end);
int kvg_score_runs(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *sig_bits,
                   const uint16_t *sig_scale, uint64_t first_pos, const uint64_t *runs, size_t nr,
                   const float *blk_bias, size_t nblk, float *scores);

/* Scores of n items that each carry their own bias: as kvg_score_pos_ref
 * with item j of query h taking item_bias[h * n + j] (NULL: the query's
 * bias). The coarse tier scores its block summaries with it. The _ref
 * version is the definition; kvg_score_items picks the kernel as
 * kvg_score_pos does. */
int kvg_score_items_ref(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                        const uint8_t *sig_bits, const uint16_t *sig_scale, size_t n, const float *item_bias,
                        float *scores);
int kvg_score_items(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *sig_bits,
                    const uint16_t *sig_scale, size_t n, const float *item_bias, float *scores);

/* ---- signature planes: the client's stage-1 layout (plane.c) ---------- */

/* One KV head's signatures of positions [0, cap) in the block-interleaved
 * layout the stage-1 scan reads fastest: blocks of KVG_PLANE_BLOCK
 * positions, block b holding head_dim / 16 runs of 32 16-bit words, run w
 * being word w (signature bits 16w..16w+15) of the block's tokens; scales
 * in position order. The same bytes as token-major signatures; a
 * zero-filled kvg_plane is empty. */
#define KVG_PLANE_BLOCK 32
typedef struct kvg_plane {
    int       head_dim;
    uint64_t  cap;       /* positions with room (a multiple of KVG_PLANE_BLOCK; zero-filled past what was put) */
    uint16_t *words;     /* [cap / 32][head_dim / 16][32], 64-byte aligned */
    uint16_t *scale;     /* [cap] fp16 */
} kvg_plane;
/* Room for positions [0, n) (grows by doubling; what was put stays).
 * 0, -EINVAL (head_dim, or not the plane's), -ENOMEM (the plane is kept). */
int  kvg_plane_reserve(kvg_plane *p, int head_dim, uint64_t n);
void kvg_plane_free(kvg_plane *p);
/* Token-major signatures bits[n][head_dim / 8] and scale[n] of positions
 * [pos, pos + n) in / out (put's scales: fp16 at any alignment, as a
 * protobuf bytes field holds them; get: either output may be NULL).
 * 0, or -EINVAL beyond the capacity. */
int  kvg_plane_put(kvg_plane *p, uint64_t pos, size_t n, const uint8_t *bits, const void *scale);
int  kvg_plane_get(const kvg_plane *p, uint64_t pos, size_t n, uint8_t *bits, uint16_t *scale);
/* Positions [first_pos, first_pos + n) scored as kvg_score_pos_ref does
 * their token-major signatures (same first_pos, blk_bias, nblk), bit for
 * bit: AVX-512 (VPERMW table lookups, every query head of the group in
 * one pass) where the CPU has x86-64-v4, AVX2 (VPSHUFB) where it has v3,
 * else the reference. kvg_plane_score_isa runs KVG_ISA_V4 or KVG_ISA_V3
 * (-ENOTSUP where the CPU lacks it) or KVG_ISA_REF. 0, -EINVAL (as kvg_score_pos_ref, a range beyond the
 * capacity, another head_dim). */
int kvg_plane_score(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const kvg_plane *p,
                    uint64_t first_pos, size_t n, const float *blk_bias, size_t nblk, float *scores);
int kvg_plane_score_isa(kvg_isa isa, kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                        const kvg_plane *p, uint64_t first_pos, size_t n, const float *blk_bias, size_t nblk,
                        float *scores);
/* kvg_score_runs over a plane: runs[2r] is run r's first position less
 * base, runs[2r + 1] its length; blk_bias covers blocks from base / 64. */
int kvg_plane_score_runs(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const kvg_plane *p,
                         uint64_t base, const uint64_t *runs, size_t nr, const float *blk_bias, size_t nblk,
                         float *scores);
const char *kvg_plane_kernel(void);
/* Stage 1's shortlist: the min(k, n) best of the scores kvg_plane_score
 * gives positions [first_pos, first_pos + n) (indices from first_pos),
 * exactly kvg_topk_ref's output of them, without writing every score out:
 * a threshold from a sample of 32 blocks, then a stretch at a time the
 * scan and kvg_topk's filter while the stretch is in cache, the reference
 * over the candidates (when the sample misleads: every score into scores
 * and kvg_topk). scores: [n] floats, scratch: [n] uint32 of work space.
 * The count, or what kvg_plane_score and kvg_topk return on bad input. */
long kvg_plane_topk(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const kvg_plane *p,
                    uint64_t first_pos, size_t n, const float *blk_bias, size_t nblk, size_t k, uint32_t *idx_out,
                    float *val_out, float *scores, uint32_t *scratch);

/* ---- coarse tier ---------------------------------------------------------- */

/* The coarse tier summarizes each KVG_SIG_BLOCK-position block of one
 * (layer, kv head) by KVG_SUM_ITEMS signatures, scored like tokens
 * (kvg_score_items, every item with its block's kind-2 bias); stage 1
 * then scans the tokens of the best blocks only (SCHEMA.md section 6.3).
 * Made by the writer from the exact keys, x[n][d] as the block's
 * signatures sign them (kind 1: k - mu_k; kind 2: kvg_sig_pos_keys):
 *   m_i = (sum over tokens j in order of x_ji) / n          (fp32)
 *   item 0: kvg_signature_ref(m): its score is about the mean of the
 *           block's token scores;
 *   v_i = (sum over j of (x_ji - m_i)^2) / n, and per token the whitened
 *   distance r_j = tree sum over i of (x_ji - m_i)^2 / v_i (0 where v_i is 0);
 *   items 1..: copies of the signatures of the tokens of largest r_j (ties
 *           to the lower index): the outliers a mean dilutes n times, such
 *           as a one-token needle, measured against the block's own spread
 *           per channel (so a channel that is loud everywhere does not
 *           make every token an outlier). A one-token block's item 1 is
 *           that token's signature; items past the block's token count
 *           (more items than tokens) repeat item 0. */
#define KVG_SUM_ITEMS KVARC_SUM_ITEMS   /* 2 */
/* Summarize n (1..KVG_SIG_BLOCK) tokens: x[n][d] (fp32), their signatures
 * bits[n][d/8] and scales[n], into sum_bits[KVG_SUM_ITEMS][d/8] and
 * sum_scales[KVG_SUM_ITEMS]. 0, -EINVAL (sizes, NULL pointers),
 * KVARC_ENONFINITE (x, or a distance that overflows fp32). */
int kvg_summary_ref(const kvarc_rotation *rot, const float *x, const uint8_t *bits, const uint16_t *scales,
                    size_t n, uint8_t *sum_bits, uint16_t *sum_scales);
/* Items 1.. from the tokens' whitened distances r[n] (item 0 already in
 * sum_bits / sum_scales): the rule above, shared by every build. */
void kvg_summary_pick(const float *r, size_t n, const uint8_t *bits, const uint16_t *scales, size_t sb,
                      uint8_t *sum_bits, uint16_t *sum_scales);
/* The same bits through the codec's lanes (codec_simd.c: the means and
 * variances many dimensions a vector, the distances many tokens a vector;
 * the build chosen as kvg_encode's), or through isa (-ENOTSUP where the
 * CPU lacks it). Errors are the reference's (it runs where the lanes meet
 * a non-finite value). */
int kvg_summary(const kvarc_rotation *rot, const float *x, const uint8_t *bits, const uint16_t *scales, size_t n,
                uint8_t *sum_bits, uint16_t *sum_scales);
int kvg_summary_isa(kvg_isa isa, const kvarc_rotation *rot, const float *x, const uint8_t *bits,
                    const uint16_t *scales, size_t n, uint8_t *sum_bits, uint16_t *sum_scales);

/* Each block's score from its n_items summary items' scores
 * item_scores[nb][n_items]: the best item (compared in item order, so a
 * NaN first item stays), or -INFINITY where ok (may be NULL: all) says the
 * block has no summaries (such blocks are always scanned). out[nb]. */
void kvg_block_best_ref(const float *item_scores, size_t nb, int n_items, const uint8_t *ok, float *out);

/* The argument checks of kvg_score_ref, shared with the GPU version:
 * 0 or -EINVAL. */
int kvg_score_check(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q);

/* ---- top-k -------------------------------------------------------------- */

/* The min(k, n) best of scores[n], ordered by score descending then index
 * ascending (so ties are broken by the lower index, and the result equals
 * a full sort's first k). NaN ranks below every number. Linear in n: a
 * byte-wise radix select, then a sort of the k winners.
 *   idx_out  : out, min(k, n) token indices
 *   val_out  : out (may be NULL), their scores
 *   scratch  : n uint32 of work space, or NULL to allocate internally
 * Returns the number selected (0 when k or n is 0), or -EINVAL/-ENOMEM. */
long kvg_topk_ref(const float *scores, size_t n, size_t k, uint32_t *idx_out,
                  float *val_out, uint32_t *scratch);

/* kvg_topk_ref's output bytes through a SIMD filter (topk_simd.c): a
 * threshold from a sample, one pass keeping the indices at or above it,
 * the reference over those. kvg_topk picks AVX-512, AVX2 or the scalar
 * filter as kvg_codec_isa_best says; kvg_topk_isa runs one (-ENOTSUP
 * where kvg_codec_isa_supported says no; KVG_ISA_REF is the reference).
 * Same arguments and returns as kvg_topk_ref. */
long kvg_topk(const float *scores, size_t n, size_t k, uint32_t *idx_out, float *val_out, uint32_t *scratch);
/* kvg_topk's parts, for top-k fused into a scan (kvg_plane_topk).
 * kvg_topk_threshold: from a sample of ns (<= KVG_TOPK_SAMPLE_MAX) of n scores,
 * the key about 2k of the n are expected to reach (the sample's rank
 * 2k * ns / n + 8); 0, or -1 where the sample gives none (too few, a NaN).
 * work: ns uint32. kvg_topk_filter: the indices j < n with
 * kvg_score_key(scores[j]) >= t appended as base + j at cand[c..] in
 * order, their scores at cs[c..]: the new count, or cap + 1 if more than
 * cap (AVX-512, AVX2 or scalar as isa says and the CPU has). */
#define KVG_TOPK_SAMPLE_MAX 8192
int    kvg_topk_threshold(const float *sample, size_t ns, size_t n, size_t k, uint32_t *work, uint32_t *t);
size_t kvg_topk_filter(kvg_isa isa, const float *scores, size_t n, uint32_t t, uint32_t base, uint32_t *cand,
                       float *cs, size_t c, size_t cap);
long kvg_topk_isa(kvg_isa isa, const float *scores, size_t n, size_t k, uint32_t *idx_out, float *val_out,
                  uint32_t *scratch);

/* Sort v[n] ascending: an LSD radix sort by bytes that skips a byte every
 * value shares (positions and packed keys share their high bytes), so a
 * few linear passes instead of n log n indirect compares; up to 512 values
 * (where a pass's 256 buckets cost more than the values) a merge sort of
 * insertion-sorted runs, 3x faster at 128. tmp: n values of work space.
 * Used by the top-k's sort of its winners and by libkvarc. */
void kvg_sort_u64(uint64_t *v, size_t n, uint64_t *tmp);

/* The order-preserving map of a score onto uint32 used by the select
 * (larger score -> larger key; every NaN -> 0). */
static inline uint32_t kvg_score_key(float s)
{
    union { float f; uint32_t u; } c = { s };
    if ((c.u & 0x7fffffffu) > 0x7f800000u)
        return 0;
    return (c.u & 0x80000000u) ? ~c.u : (c.u | 0x80000000u);
}

/* ---- RoPE ---------------------------------------------------------------- */

/* Rotate x[d] in place as RoPE at position pos: the pairs of the first
 * rotary_dims dimensions (layout 0: (i, i + rotary_dims/2); 1: (2i, 2i+1))
 * turn by pos * theta^(-2i/rotary_dims), angles in double. rotary_dims 0
 * leaves x alone. q.k of two rotated vectors depends on the difference of
 * their positions only; pos may be negative (to undo a rotation). */
void kvg_rope_ref(float *x, int d, int rotary_dims, int layout, float theta, double pos);
/* The same in two parts, for many vectors: the frequencies once
 * (inv_freq[rotary_dims/2]), then each rotation. Same results. */
void kvg_rope_freqs(double *inv_freq, int d, int rotary_dims, float theta);
void kvg_rope_apply(float *x, int d, int rotary_dims, int layout, const double *inv_freq, double pos);
/* And in three, for many vectors at a few positions: the cosines and sines
 * of one position once (cs[rotary_dims/2][2]), then each turn. kvg_rope_apply
 * is these two; same results. */
void kvg_rope_angles(double *cs, int d, int rotary_dims, const double *inv_freq, double pos);
void kvg_rope_turn(float *x, int d, int rotary_dims, int layout, const double *cs);

/* A conversation's RoPE, prepared once: frequencies and which dimensions
 * a true-position signature centers (SCHEMA.md section 6.2). */
#define KVG_SIG_BLOCK 64           /* positions per signature block */
/* The signature blocks positions [first, first + n) touch (n >= 1). */
static inline uint64_t kvg_blocks_of(uint64_t first, uint64_t n)
{
    return (first + n - 1) / KVG_SIG_BLOCK - first / KVG_SIG_BLOCK + 1;
}
#define KVG_SLOW_FREQ (1.0 / 320)  /* a pair turning at most this (rad/token) is "slow" */
typedef struct kvg_rope {
    int    d, rotary_dims, layout; /* rotary_dims as used: min(rotary_dims, d), even */
    int    first_slow, n_slow;     /* pairs [first_slow, rotary_dims/2) are slow */
    double inv_freq[KVARC_HEAD_DIM_MAX / 2];
} kvg_rope;

/* 0, or -EINVAL (d not 64/128/256, layout not 0/1, theta not finite or
 * not > 0 while rotary_dims > 0). */
int kvg_rope_init(kvg_rope *r, int d, int rotary_dims, int layout, float theta);
/* Block b's center position (b * KVG_SIG_BLOCK + 31.5) and the cosines
 * and sines of the slow pairs there: cs[n_slow][2], the values
 * kvg_rope_angles gives for those pairs. */
double kvg_block_center(uint64_t b);
void kvg_block_angles(const kvg_rope *r, uint64_t b, double *cs);
/* The same for blocks [b0, b0 + nb) laid out pair-major, for kernels that
 * run across blocks: cos of slow pair s at block b0 + j in
 * cs[2s * stride + j], its sin in cs[(2s + 1) * stride + j]. */
void kvg_block_angles_pm(const kvg_rope *r, uint64_t b0, size_t nb, double *cs, size_t stride);

/* True-position signatures (kind 2) of n keys k[n][d] (fp32, pre-RoPE) at
 * positions first_pos.. of one (layer, kv head): key n turned to n
 * (kvg_rope_apply), minus the slow-and-unturned part of mu_k turned to
 * its block's center, then kvg_signature_ref. bits [n][d/8], scales[n].
 * 0, -EINVAL, KVARC_ENONFINITE (*bad = the token). */
int kvg_sig_pos_ref(const kvg_rope *r, const kvarc_rotation *rot, const float *mu_k, const float *k,
                    uint64_t first_pos, size_t n, uint8_t *bits, uint16_t *scales, size_t *bad);

/* Keys x[n][d] already turned to their positions first_pos.. (by
 * kvg_rope_apply) become what kind-2 signatures sign: minus each one's
 * block's centering (SCHEMA.md 6.2: mu_k's unturned dims and its slow pairs
 * turned to the block's center; none for mu_k NULL), in place. */
void kvg_sig_pos_center(const kvg_rope *r, const float *mu_k, uint64_t first_pos, size_t n, float *x);

/* The vectors kind-2 signatures sign, x[n][d] (x may alias k): key t
 * turned to its position first_pos + t, minus its block's centering, as
 * kvg_sig_pos_ref makes them. 0 or -EINVAL. */
int kvg_sig_pos_keys(const kvg_rope *r, const float *mu_k, const float *k, uint64_t first_pos, size_t n, float *x);

/* The stage-1 bias of kind-2 signatures for a query q_r[d] already turned
 * to its own position: per block b in [b0, b0 + nb), the exact q_r . (the
 * centering that block's signatures subtracted), in double, rounded once:
 *   sum over unturned dims j of q_j mu_j, then over slow pairs i (a, b) of
 *   (q_a mu_a + q_b mu_b) cos_i + (q_b mu_a - q_a mu_b) sin_i.
 * Each block's sum runs in that order in double; blocks are independent
 * (so a kernel may run across them). cs: block b0's entry of a pair-major
 * table (kvg_block_angles_pm) whose rows are cs_stride long, or NULL
 * (computed here). mu_k NULL = 0. out[nb]. Returns 0, or KVARC_ENONFINITE
 * when a bias overflows fp32 (as kvg_query_prep_ref refuses a kind-1 bias). */
int kvg_block_bias_ref(const kvg_rope *r, const float *mu_k, const float *q_r, uint64_t b0, size_t nb,
                       const double *cs, size_t cs_stride, float *out);
/* The same bits, compiled for AVX-512 / AVX2 as the CPU allows (chosen at
 * load time by cpuid). kvg_block_bias_n does n_q queries in one pass over
 * the angle table (its memory is the cost): query q_r[i] with centering
 * mu_k[i] (NULL = 0), its biases into out[i][nb]; each the bits
 * kvg_block_bias_ref gives it alone. */
int kvg_block_bias(const kvg_rope *r, const float *mu_k, const float *q_r, uint64_t b0, size_t nb,
                   const double *cs, size_t cs_stride, float *out);
int kvg_block_bias_n(const kvg_rope *r, int n_q, const float *const *mu_k, const float *const *q_r, uint64_t b0,
                     size_t nb, const double *cs, size_t cs_stride, float *const *out);
/* The angle table tiled for the fast pass: tiles of KVG_BIAS_TILE blocks
 * from block 0, tile t holding blocks [32t, 32t + 32) pair-major,
 * [2 n_slow][32] (the values kvg_block_angles_pm gives), so that a tile is
 * one contiguous stretch. kvg_block_angles_tm_len: the doubles the tiles
 * of blocks [0, nb) take; kvg_block_angles_tm fills tiles [t0, t0 + nt)
 * (a table grows by tiles: the tiles before stay as they are).
 * kvg_block_bias_nt: kvg_block_bias_n over such a table (from block 0,
 * any b0): the same bits, the table read once per tile for all queries.
 * -EINVAL without a table. */
#define KVG_BIAS_TILE 32
size_t kvg_block_angles_tm_len(const kvg_rope *r, uint64_t nb);
void   kvg_block_angles_tm(const kvg_rope *r, uint64_t t0, uint64_t nt, double *tiles);
int    kvg_block_bias_nt(const kvg_rope *r, int n_q, const float *const *mu_k, const float *const *q_r, uint64_t b0,
                         size_t nb, const double *tiles, float *const *out);

/* Stage-1 scores against kind-2 signatures: as kvg_score_ref, with each
 * query's constant bias replaced by a bias per block: token j (position
 * first_pos + j) of query h takes blk_bias[h * nblk + (first_pos + j) /
 * KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK]. Hamming mode ignores biases.
 * blk_bias NULL = kvg_score_ref. */
int kvg_score_pos_ref(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                      const uint8_t *sig_bits, const uint16_t *sig_scale, size_t n, uint64_t first_pos,
                      const float *blk_bias, size_t nblk, float *scores);

/* RoPE angles of any position below 2^32 without a cosine per pair: the
 * turn by pos is the product of the turns by its four bytes (a table of
 * 4 x 256 unit complex numbers per pair, made once). The values equal
 * kvg_rope_angles' to about 1e-15 (both are exact rotations up to double
 * rounding), not bit for bit. */
typedef struct kvg_rope_table {
    int     n_pairs;
    double *t;                     /* [4][256][n_pairs][2] */
} kvg_rope_table;
int  kvg_rope_table_init(kvg_rope_table *tb, const kvg_rope *r);   /* 0 or -ENOMEM */
void kvg_rope_table_free(kvg_rope_table *tb);
/* cs[rotary_dims/2][2] for pos (kvg_rope_angles past 2^32). */
void kvg_rope_table_angles(const kvg_rope_table *tb, const kvg_rope *r, uint64_t pos, double *cs);

/* Stage-2 scores at true positions: for each record j at position pos[j],
 * the max over the n_q queries q_r[n_q][d] (turned to their own
 * positions) of q_r . RoPE(pos[j]) khat_j, khat the decoded key (sum in
 * index order). tb (may be NULL: kvg_rope_angles) gives the angles. Same
 * return codes as kvg_key_scores_ref. */
int kvg_key_scores_pos_ref(const kvg_codec *c, const kvg_rope *r, const kvg_rope_table *tb, const float *q_r,
                           int n_q, const uint8_t *records, const uint64_t *pos, size_t n, float *scores);

/* kvg_key_scores_ref's bits, many records at a time (codec_simd.c; isa as
 * for kvg_encode_isa). */
int kvg_key_scores(const kvg_codec *c, const float *q, int n_q, const uint8_t *records, size_t n, float *scores);
int kvg_key_scores_isa(kvg_isa isa, const kvg_codec *c, const float *q, int n_q, const uint8_t *records, size_t n,
                       float *scores);

/* kvg_key_scores_pos_ref's bits, sixteen records at a time (codec_simd.c;
 * isa as for kvg_encode_isa). */
int kvg_key_scores_pos(const kvg_codec *c, const kvg_rope *r, const kvg_rope_table *tb, const float *q_r, int n_q,
                       const uint8_t *records, const uint64_t *pos, size_t n, float *scores);
int kvg_key_scores_pos_isa(kvg_isa isa, const kvg_codec *c, const kvg_rope *r, const kvg_rope_table *tb,
                           const float *q_r, int n_q, const uint8_t *records, const uint64_t *pos, size_t n,
                           float *scores);

/* ---- attention ---------------------------------------------------------- */

/* One partition of keys/values for all KV heads, fp32:
 * k[h * stride + t][d] for kv head h, token t < count(h). */
typedef struct kvg_attn_part {
    const float  *k, *v;         /* [n_kv_heads][stride][head_dim] */
    size_t        stride;        /* tokens between consecutive heads */
    size_t        n;             /* tokens per head when n_per_head is NULL */
    const size_t *n_per_head;    /* [n_kv_heads] token counts, or NULL */
} kvg_attn_part;

/* Softmax state of one query head over a set of keys: max logit m, sum of
 * exp(logit - m) l, and the unnormalized output o. */
typedef struct kvg_attn_state {
    float m, l;
    float o[KVARC_HEAD_DIM_MAX];
} kvg_attn_state;

/* State over n keys for one query (two-pass: max, then sum). n = 0 gives
 * the empty state (m = -Inf, l = 0). */
void kvg_attn_partial_ref(const float *q, float scale, const float *k, const float *v,
                          size_t n, int d, kvg_attn_state *st);
/* a <- a merged with b (log-sum-exp). Empty states merge as identities. */
void kvg_attn_merge_ref(kvg_attn_state *a, const kvg_attn_state *b, int d);

/* Attention of n_q_heads queries q[n_q_heads][d] over the union of the
 * partitions, GQA (query head h reads kv head h / (n_q_heads/n_kv_heads)),
 * logits = scale * q.k, one exact softmax via LSE merge of the partitions.
 * out[n_q_heads][d]. Returns 0, -EINVAL (shape, pointers), KVARC_EHEADDIM,
 * KVARC_ENONFINITE (q), or -ENODATA when a head has no key at all. */
int kvg_attend_ref(const float *q, int n_q_heads, int n_kv_heads, int d, float scale,
                   const kvg_attn_part *parts, int n_parts, float *out);

/* kvg_attend_ref's bits through the lanes (attention_simd.c): each GQA
 * group's heads share the transposed keys; the build as kvg_encode's
 * (kvg_attend_isa runs one: -ENOTSUP where the CPU lacks it). */
int kvg_attend(const float *q, int n_q_heads, int n_kv_heads, int d, float scale, const kvg_attn_part *parts,
               int n_parts, float *out);
int kvg_attend_isa(kvg_isa isa, const float *q, int n_q_heads, int n_kv_heads, int d, float scale,
                   const kvg_attn_part *parts, int n_parts, float *out);

#ifdef __cplusplus
}
#endif
#endif /* KVG_H */
