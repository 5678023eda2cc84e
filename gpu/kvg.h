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
 * (then -ENOMEM is possible). Outputs are caller-owned. Every function is
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

/* Sort v[n] ascending: an LSD radix sort by bytes that skips a byte every
 * value shares (positions and packed keys share their high bytes), so a
 * few linear passes instead of n log n indirect compares. tmp: n values
 * of work space. Used by the top-k's sort of its winners and by libkvarc. */
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

#ifdef __cplusplus
}
#endif
#endif /* KVG_H */
