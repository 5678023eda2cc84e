/* score_ref.c - CPU reference of query preparation and stage-1 scoring
 * (SCHEMA.md section 6).
 *
 * The asymmetric score of token j against a query is
 *     ((float)dot_j * qscale) * sig_scale_j + bias,
 *     dot_j = sum_i q8_i * (bit_ij ? +1 : -1)          (exact integer)
 * Because dot_j is an integer, every implementation gets the same bits no
 * matter how it orders the sum; only the two multiplies and the add are
 * floating point, in that order. GQA max keeps the earlier head's score
 * unless a later one is strictly greater (scores are never NaN). The CPU computes dot_j with one 256-entry
 * table per signature byte (16 lookups per token at head_dim 128). */
#include "kvg.h"

#include <errno.h>
#include <math.h>
#include <string.h>

int kvg_query_prep_ref(const kvarc_rotation *rot, const float *mu_k, kvarc_dtype dt,
                       const void *q, kvg_query *out)
{
    if (!rot || !q || !out)
        return -EINVAL;
    if (!kvarc_dtype_size(dt))
        return KVARC_EDTYPE;
    int d = rot->head_dim;
    if (kvarc_head_dim_check(d))
        return KVARC_EHEADDIM;
    float x[KVARC_HEAD_DIM_MAX], y[KVARC_HEAD_DIM_MAX], prod[KVARC_HEAD_DIM_MAX];
    for (int i = 0; i < d; i++) {
        x[i] = kvarc_load_f32(dt, q, (size_t)i);
        if (!isfinite(x[i]))
            return KVARC_ENONFINITE;
        prod[i] = mu_k ? x[i] * mu_k[i] : 0.0f;
    }
    memset(out, 0, sizeof *out);
    out->head_dim = d;
    out->bias = kvarc_tree_sum(prod, d);
    kvg_rotate_ref(rot, x, y);
    float m = 0.0f;
    for (int i = 0; i < d; i++) {
        m = fmaxf(m, fabsf(y[i]));
        if (!(y[i] < 0.0f))
            out->bits[i / 8] |= (uint8_t)(1u << (i % 8));
    }
    if (!isfinite(out->bias) || !isfinite(m))
        return KVARC_ENONFINITE;
    out->qscale = m / 127.0f;
    /* clamped: where max |y| is subnormal, m / 127 rounds so far that
     * y / qscale passes 127 (up to 130 seen), and converting that to int8
     * was undefined (it wrapped to the opposite sign on x86) */
    for (int i = 0; i < d; i++)
        out->q8[i] = out->qscale > 0.0f ? (int8_t)fminf(fmaxf(rintf(y[i] / out->qscale), -127.0f), 127.0f) : 0;
    return 0;
}

/* lut[b * 256 + v] = sum over the 8 bits j of byte value v of
 * (bit j ? +q8[8b+j] : -q8[8b+j]). */
static void build_lut(const kvg_query *q, int16_t *lut)
{
    int nb = q->head_dim / 8;
    for (int b = 0; b < nb; b++)
        for (int v = 0; v < 256; v++) {
            int s = 0;
            for (int j = 0; j < 8; j++)
                s += ((v >> j) & 1) ? q->q8[8 * b + j] : -q->q8[8 * b + j];
            lut[b * 256 + v] = (int16_t)s;
        }
}

/* fp16 -> fp32 for the signature scales, inlined here because the scan
 * converts one per token (same bits as kvarc_f16_to_f32). */
static inline float half_to_float(uint16_t h)
{
    uint32_t exp = (h >> 10) & 0x1f;
    if (exp == 0 || exp == 0x1f)
        return kvarc_f16_to_f32(h);
    uint32_t u = ((uint32_t)(h & 0x8000) << 16) | ((exp + 112) << 23) | ((uint32_t)(h & 0x3ff) << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One query head's score v of a token into the GQA combination *o. */
static inline void combine_into(float *o, float v, int first, kvg_combine comb)
{
    if (first)
        *o = v;
    else if (comb == KVG_COMBINE_MAX)
        *o = v > *o ? v : *o;
    else
        *o += v;
}

/* Asymmetric scores of one query into out[n]; NB (signature bytes) is a
 * compile-time constant in each instance so the lookups unroll. */
static inline void score_asym_nb(const kvg_query *q, const int16_t *lut, int nb,
                                 const uint8_t *bits, const uint16_t *scale, size_t n,
                                 float *out, int first, kvg_combine comb, uint64_t first_pos,
                                 const float *bb, const float *ib)
{
    /* runs of tokens sharing one bias: the whole range, one block each, or
     * (item biases) one token each */
    for (size_t j0 = 0, j1; j0 < n; j0 = j1) {
        float bias = q->bias;
        j1 = n;
        if (ib) {
            bias = ib[j0];
            j1 = j0 + 1;
        } else if (bb) {
            uint64_t p = first_pos + j0;
            bias = bb[p / KVG_SIG_BLOCK - first_pos / KVG_SIG_BLOCK];
            if (n - j0 > KVG_SIG_BLOCK - p % KVG_SIG_BLOCK)
                j1 = j0 + (KVG_SIG_BLOCK - p % KVG_SIG_BLOCK);
        }
        for (size_t j = j0; j < j1; j++) {
            const uint8_t *s = bits + j * (size_t)nb;
            int dot = 0;
#pragma GCC unroll 32
            for (int b = 0; b < nb; b++)
                dot += lut[b * 256 + s[b]];
            combine_into(out + j, ((float)dot * q->qscale) * half_to_float(scale[j]) + bias, first, comb);
        }
    }
}

static void score_asym_one(const kvg_query *q, const uint8_t *bits, const uint16_t *scale,
                           size_t n, float *out, int first, kvg_combine comb, uint64_t first_pos,
                           const float *bb, const float *ib)
{
    int16_t lut[KVARC_HEAD_DIM_MAX / 8 * 256];
    build_lut(q, lut);
    switch (q->head_dim) {
    case 64:  score_asym_nb(q, lut, 8, bits, scale, n, out, first, comb, first_pos, bb, ib); break;
    case 128: score_asym_nb(q, lut, 16, bits, scale, n, out, first, comb, first_pos, bb, ib); break;
    default:  score_asym_nb(q, lut, 32, bits, scale, n, out, first, comb, first_pos, bb, ib); break;
    }
}

static void score_hamming_one(const kvg_query *q, const uint8_t *bits, size_t n, float *out,
                              int first, kvg_combine comb)
{
    int d = q->head_dim, nw = d / 64;
    uint64_t qw[KVARC_HEAD_DIM_MAX / 64];
    memcpy(qw, q->bits, (size_t)d / 8);
    for (size_t j = 0; j < n; j++) {
        const uint8_t *s = bits + j * (size_t)(d / 8);
        int pop = 0;
        for (int w = 0; w < nw; w++) {
            uint64_t kw;
            memcpy(&kw, s + 8 * w, 8);
            pop += __builtin_popcountll(qw[w] ^ kw);
        }
        combine_into(out + j, (float)(d - 2 * pop), first, comb);
    }
}

int kvg_score_check(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q)
{
    if (!qs || n_q < 1 || n_q > 64)
        return -EINVAL;
    if (mode != KVG_SCORE_ASYM && mode != KVG_SCORE_HAMMING)
        return -EINVAL;
    if (comb != KVG_COMBINE_MAX && comb != KVG_COMBINE_MEAN)
        return -EINVAL;
    for (int h = 0; h < n_q; h++)
        if (kvarc_head_dim_check(qs[h].head_dim) || qs[h].head_dim != qs[0].head_dim)
            return -EINVAL;
    return 0;
}

int kvg_score_ref(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                  const uint8_t *sig_bits, const uint16_t *sig_scale, size_t n,
                  float *scores)
{
    return kvg_score_pos_ref(mode, comb, qs, n_q, sig_bits, sig_scale, n, 0, NULL, 0, scores);
}

/* kvg_score_pos_ref and kvg_score_items_ref: block biases or item biases
 * (at most one of the two). */
static int score_any(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *sig_bits,
                     const uint16_t *sig_scale, size_t n, uint64_t first_pos, const float *blk_bias, size_t nblk,
                     const float *item_bias, float *scores)
{
    int rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc)
        return rc;
    if (n == 0)
        return 0;
    if (!sig_bits || !scores || (mode == KVG_SCORE_ASYM && !sig_scale))
        return -EINVAL;
    if (blk_bias && nblk < kvg_blocks_of(first_pos, n))
        return -EINVAL;
    for (int h = 0; h < n_q; h++) {
        if (mode == KVG_SCORE_ASYM)
            score_asym_one(&qs[h], sig_bits, sig_scale, n, scores, h == 0, comb, first_pos,
                           blk_bias ? blk_bias + (size_t)h * nblk : NULL,
                           item_bias ? item_bias + (size_t)h * n : NULL);
        else
            score_hamming_one(&qs[h], sig_bits, n, scores, h == 0, comb);
    }
    if (comb == KVG_COMBINE_MEAN && n_q > 1)
        for (size_t j = 0; j < n; j++)
            scores[j] /= (float)n_q;
    return 0;
}

int kvg_score_pos_ref(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                      const uint8_t *sig_bits, const uint16_t *sig_scale, size_t n, uint64_t first_pos,
                      const float *blk_bias, size_t nblk, float *scores)
{
    return score_any(mode, comb, qs, n_q, sig_bits, sig_scale, n, first_pos, blk_bias, nblk, NULL, scores);
}

int kvg_score_items_ref(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                        const uint8_t *sig_bits, const uint16_t *sig_scale, size_t n, const float *item_bias,
                        float *scores)
{
    return score_any(mode, comb, qs, n_q, sig_bits, sig_scale, n, 0, NULL, 0, item_bias, scores);
}
