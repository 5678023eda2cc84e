/* sigpos_ref.c - true-position signatures (kind 2), their stage-1 block
 * biases and the stage-2 scores at true positions: the CPU reference
 * (SCHEMA.md section 6.2).
 *
 * Why: attention's logit is q_m . RoPE(n - m) k_n, which depends on the
 * distance; at long contexts even the slowest rotary pair turns by
 * radians, so a signature made at one fixed distance ranks keys by a
 * score attention never computes. A kind-2 signature is made from the key
 * at its own position, and the query is turned to its own.
 *
 * Centering. RoPE smears a key mean over positions, so a constant center
 * fits turned keys badly; centering each key with the mean turned to the
 * key's own position fits exactly, but then the bias q . center depends on
 * the position, a trigonometric sum per token. The middle way kept here:
 * the unturned dimensions and the slow pairs (at most KVG_SLOW_FREQ rad per
 * token, where real models keep their large key means) are centered with
 * the mean turned to the center of the key's 64-position block (it moves
 * at most 0.1 rad within a block); fast pairs are not centered (their
 * turned mean averages out). The bias is then one number per block and
 * query, exact for the center used, so the score still estimates the
 * whole logit. In a numpy simulation of Llama-like keys (large means in
 * the slow pairs, theta 500000, 32K tokens), top-64 recall in a 512
 * shortlist: 0.88 with this centering (0.87 with the exact per-token
 * bias), 0.73 with the best constant center, 0.49 uncentered, 0.28 for
 * the fixed-distance score.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"

int kvg_rope_init(kvg_rope *r, int d, int rotary_dims, int layout, float theta)
{
    if (!r || kvarc_head_dim_check(d) || (layout != 0 && layout != 1) || rotary_dims < 0)
        return -EINVAL;
    memset(r, 0, sizeof *r);
    int half = (rotary_dims < d ? rotary_dims : d) / 2;
    if (half && !(isfinite(theta) && theta > 0.0f))
        return -EINVAL;
    r->d = d;
    r->rotary_dims = 2 * half;
    r->layout = layout;
    kvg_rope_freqs(r->inv_freq, d, r->rotary_dims, theta);
    r->first_slow = half;
    for (int i = half - 1; i >= 0 && r->inv_freq[i] <= KVG_SLOW_FREQ; i--)
        r->first_slow = i;
    r->n_slow = half - r->first_slow;
    return 0;
}

double kvg_block_center(uint64_t b)
{
    return (double)b * KVG_SIG_BLOCK + (KVG_SIG_BLOCK - 1) / 2.0;
}

void kvg_block_angles(const kvg_rope *r, uint64_t b, double *cs)
{
    double c = kvg_block_center(b);
    for (int s = 0; s < r->n_slow; s++) {
        double ang = c * r->inv_freq[r->first_slow + s];
        cs[2 * s] = cos(ang);
        cs[2 * s + 1] = sin(ang);
    }
}

void kvg_block_angles_pm(const kvg_rope *r, uint64_t b0, size_t nb, double *cs, size_t stride)
{
    double one[KVARC_HEAD_DIM_MAX];
    for (size_t j = 0; j < nb; j++) {
        kvg_block_angles(r, b0 + j, one);
        for (int s = 0; s < 2 * r->n_slow; s++)
            cs[(size_t)s * stride + j] = one[s];
    }
}

/* The two dimensions of pair i. */
static void pair_dims(const kvg_rope *r, int i, int *a, int *b)
{
    int half = r->rotary_dims / 2;
    *a = r->layout ? 2 * i : i;
    *b = r->layout ? 2 * i + 1 : i + half;
}

/* The centering of block b's keys: mu's unturned dims, its slow pairs
 * turned to the block's center (as kvg_rope_turn would), 0 elsewhere. */
static void block_center_mu(const kvg_rope *r, const float *mu, uint64_t b, float *c)
{
    double cs[KVARC_HEAD_DIM_MAX];
    memset(c, 0, (size_t)r->d * sizeof *c);
    if (!mu)
        return;
    for (int j = r->rotary_dims; j < r->d; j++)
        c[j] = mu[j];
    kvg_block_angles(r, b, cs);
    for (int s = 0; s < r->n_slow; s++) {
        int a, bb;
        pair_dims(r, r->first_slow + s, &a, &bb);
        double ma = mu[a], mb = mu[bb], co = cs[2 * s], si = cs[2 * s + 1];
        c[a] = (float)(ma * co - mb * si);
        c[bb] = (float)(ma * si + mb * co);
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void kvg_sig_pos_center(const kvg_rope *r, const float *mu_k, uint64_t first_pos, size_t n, float *x)
{
    const int d = r->d;
    float c[KVARC_HEAD_DIM_MAX];
    uint64_t cb = UINT64_MAX;
    for (size_t t = 0; t < n; t++) {
        uint64_t pos = first_pos + t;
        float *xt = x + t * (size_t)d;
        if (pos / KVG_SIG_BLOCK != cb) {
            cb = pos / KVG_SIG_BLOCK;
            block_center_mu(r, mu_k, cb, c);
        }
        for (int i = 0; i < d; i++)
            xt[i] = xt[i] - c[i];
    }
}

int kvg_sig_pos_keys(const kvg_rope *r, const float *mu_k, const float *k, uint64_t first_pos, size_t n, float *x)
{
    if (!r || (n && (!k || !x)))
        return -EINVAL;
    const int d = r->d;
    for (size_t t = 0; t < n; t++) {
        float *xt = x + t * (size_t)d;
        memmove(xt, k + t * (size_t)d, (size_t)d * sizeof *xt);
        kvg_rope_apply(xt, d, r->rotary_dims, r->layout, r->inv_freq, (double)(first_pos + t));
    }
    kvg_sig_pos_center(r, mu_k, first_pos, n, x);
    return 0;
}

#define SIG_CHUNK 16   /* keys turned at a time on the stack (16 KB at head_dim 256) */

int kvg_sig_pos_ref(const kvg_rope *r, const kvarc_rotation *rot, const float *mu_k, const float *k,
                    uint64_t first_pos, size_t n, uint8_t *bits, uint16_t *scales, size_t *bad)
{
    if (!r || !rot || rot->head_dim != r->d || (n && (!k || !bits || !scales)))
        return -EINVAL;
    const int d = r->d;
    float x[SIG_CHUNK * KVARC_HEAD_DIM_MAX];
    for (size_t t0 = 0; t0 < n; t0 += SIG_CHUNK) {
        size_t cn = n - t0 < SIG_CHUNK ? n - t0 : SIG_CHUNK;
        kvg_sig_pos_keys(r, mu_k, k + t0 * (size_t)d, first_pos + t0, cn, x);
        for (size_t t = 0; t < cn; t++) {
            int rc = kvg_signature_ref(rot, x + t * (size_t)d, bits + (t0 + t) * (size_t)(d / 8), &scales[t0 + t]);
            if (rc) {
                if (bad)
                    *bad = t0 + t;
                return rc;
            }
        }
    }
    return 0;
}

#define TILE KVG_BIAS_TILE   /* blocks per tile (without a table: their angles on the stack, 64 KB at most) */

#define MULTI_Q 16   /* queries whose coefficients sit on the stack at a time */

typedef double v8d __attribute__((vector_size(64)));   /* 8 blocks' sums: one register in the v4 build */

/* The same sums for n_q queries at once, a tile of blocks' angles read
 * once for all of them (the table is the memory traffic: 72 doubles a
 * block); each query's blocks are summed 32 at a time in registers (4
 * chains), every block keeping the reference's order, nothing fused
 * (-ffp-contract=off), so the bits are kvg_block_bias_ref's. The C is
 * compiled for the widest vectors this CPU has, chosen at load time (an
 * ifunc: cpuid). The table: tiled (kvg_block_angles_tm: a tile's rows one
 * contiguous stretch, read as one stream), or pair-major rows cs_stride
 * long from block b0 (a tile's 70 rows then lie a whole row apart: at 1M
 * tokens that read cost 4x the arithmetic), or none (computed per tile). */
static inline __attribute__((always_inline)) int bias_n(const kvg_rope *r, int n_q, const float *const *mu_k,
                                                        const float *const *q_r, uint64_t b0, size_t nb,
                                                        const double *cs, size_t cs_stride, int tiled,
                                                        int vec, float *const *out)
{
    double c0[MULTI_Q], A[MULTI_Q][KVARC_HEAD_DIM_MAX / 2], B[MULTI_Q][KVARC_HEAD_DIM_MAX / 2], acc[TILE];
    double own[KVARC_HEAD_DIM_MAX * TILE] __attribute__((aligned(64)));   /* [2 n_slow][TILE] */
    int finite = 1;
    for (int q0 = 0; q0 < n_q; q0 += MULTI_Q) {
        const int nq = n_q - q0 < MULTI_Q ? n_q - q0 : MULTI_Q;
        for (int q = 0; q < nq; q++) {
            const float *mu = mu_k[q0 + q], *qr = q_r[q0 + q];
            c0[q] = 0.0;
            for (int j = r->rotary_dims; mu && j < r->d; j++)
                c0[q] += (double)qr[j] * (double)mu[j];
            for (int s = 0; s < r->n_slow; s++) {
                int a, bb;
                pair_dims(r, r->first_slow + s, &a, &bb);
                A[q][s] = mu ? (double)qr[a] * mu[a] + (double)qr[bb] * mu[bb] : 0.0;
                B[q][s] = mu ? (double)qr[bb] * mu[a] - (double)qr[a] * mu[bb] : 0.0;
            }
        }
        const size_t tile_len = (size_t)(2 * r->n_slow) * TILE, lines = tile_len * sizeof(double) / 64;
        for (size_t t0 = 0, tn; t0 < nb; t0 += tn) {
            const double *tc;
            size_t st = TILE;
            if (tiled) {                               /* up to the end of the table's tile */
                const uint64_t b = b0 + t0, off = b % TILE;
                tn = nb - t0 < TILE - off ? nb - t0 : (size_t)(TILE - off);
                tc = cs + (size_t)(b / TILE) * tile_len + off;
            } else if (cs) {
                tn = nb - t0 < TILE ? nb - t0 : TILE;
                tc = cs + t0;
                st = cs_stride;
            } else {
                tn = nb - t0 < TILE ? nb - t0 : TILE;
                kvg_block_angles_pm(r, b0 + t0, tn, own, TILE);
                tc = own;
            }
            /* tiled: the next tile's lines, a share per query, while this tile computes (the hardware's
             * prefetcher alone left the pass waiting on memory: 1.44 against 1.21 ms, 16 queries x 16K
             * blocks from a cold table) */
            const char *nx = tiled && t0 + tn < nb ? (const char *)(tc - (b0 + t0) % TILE + tile_len) : NULL;
            for (int q = 0; q < nq; q++) {
                const size_t l0 = lines * (size_t)q / (size_t)nq, l1 = lines * (size_t)(q + 1) / (size_t)nq;
                for (size_t l = l0; nx && l < l1; l++)
                    __builtin_prefetch(nx + 64 * l);
                float *o = out[q0 + q] + t0;
                if (!mu_k[q0 + q]) {                   /* no centering: no bias */
                    for (size_t j = 0; j < tn; j++)
                        o[j] = 0.0f;
                    continue;
                }
                if (vec && tn == TILE) {               /* 32 blocks' sums in 4 registers over every pair */
                    v8d a8[TILE / 8];
                    for (int k = 0; k < TILE / 8; k++)
                        a8[k] = (v8d){ 0 } + c0[q];
                    for (int s = 0; s < r->n_slow; s++) {
                        const double *co = tc + (size_t)(2 * s) * st, *si = tc + (size_t)(2 * s + 1) * st;
                        for (int k = 0; k < TILE / 8; k++) {
                            v8d c, n;
                            memcpy(&c, co + 8 * k, sizeof c);
                            memcpy(&n, si + 8 * k, sizeof n);
                            a8[k] += A[q][s] * c + B[q][s] * n;
                        }
                    }
                    memcpy(acc, a8, sizeof a8);
                } else {
                    for (size_t j = 0; j < tn; j++)
                        acc[j] = c0[q];
                    for (int s = 0; s < r->n_slow; s++) {
                        const double *co = tc + (size_t)(2 * s) * st, *si = tc + (size_t)(2 * s + 1) * st;
                        const double as = A[q][s], bs = B[q][s];
                        for (size_t j = 0; j < tn; j++)
                            acc[j] += as * co[j] + bs * si[j];
                    }
                }
                for (size_t j = 0; j < tn; j++) {
                    o[j] = (float)acc[j];
                    finite &= isfinite(o[j]) != 0;
                }
            }
        }
    }
    return finite ? 0 : KVARC_ENONFINITE;
}

/* The definition: one query, the plain C (x86-64-v2, two doubles a vector),
 * each block's sum in the loop over pairs as written. */
int kvg_block_bias_ref(const kvg_rope *r, const float *mu_k, const float *q_r, uint64_t b0, size_t nb,
                       const double *cs, size_t cs_stride, float *out)
{
    return bias_n(r, 1, &mu_k, &q_r, b0, nb, cs, cs_stride, 0, 0, &out);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
int kvg_block_bias_n(const kvg_rope *r, int n_q, const float *const *mu_k, const float *const *q_r, uint64_t b0,
                     size_t nb, const double *cs, size_t cs_stride, float *const *out)
{
    return bias_n(r, n_q, mu_k, q_r, b0, nb, cs, cs_stride, 0, 1, out);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
int kvg_block_bias_nt(const kvg_rope *r, int n_q, const float *const *mu_k, const float *const *q_r, uint64_t b0,
                      size_t nb, const double *tiles, float *const *out)
{
    if (!tiles)
        return -EINVAL;
    return bias_n(r, n_q, mu_k, q_r, b0, nb, tiles, 0, 1, 1, out);
}

size_t kvg_block_angles_tm_len(const kvg_rope *r, uint64_t nb)
{
    return (size_t)((nb + TILE - 1) / TILE) * (size_t)(2 * r->n_slow) * TILE;
}

void kvg_block_angles_tm(const kvg_rope *r, uint64_t t0, uint64_t nt, double *tiles)
{
    for (uint64_t t = t0; t < t0 + nt; t++)
        kvg_block_angles_pm(r, t * TILE, TILE, tiles + (size_t)t * (size_t)(2 * r->n_slow) * TILE, TILE);
}

int kvg_block_bias(const kvg_rope *r, const float *mu_k, const float *q_r, uint64_t b0, size_t nb,
                   const double *cs, size_t cs_stride, float *out)
{
    return kvg_block_bias_n(r, 1, &mu_k, &q_r, b0, nb, cs, cs_stride, &out);
}

int kvg_rope_table_init(kvg_rope_table *tb, const kvg_rope *r)
{
    int np = r->rotary_dims / 2;
    tb->n_pairs = np;
    tb->t = malloc((size_t)4 * 256 * (size_t)(np ? np : 1) * 2 * sizeof *tb->t);
    if (!tb->t)
        return -ENOMEM;
    for (int l = 0; l < 4; l++)
        for (int v = 0; v < 256; v++)
            for (int i = 0; i < np; i++) {
                double ang = (double)((uint64_t)v << (8 * l)) * r->inv_freq[i];
                double *e = tb->t + (((size_t)l * 256 + (size_t)v) * (size_t)np + (size_t)i) * 2;
                e[0] = cos(ang);
                e[1] = sin(ang);
            }
    return 0;
}

void kvg_rope_table_free(kvg_rope_table *tb)
{
    free(tb->t);
    tb->t = NULL;
}

void kvg_rope_table_angles(const kvg_rope_table *tb, const kvg_rope *r, uint64_t pos, double *cs)
{
    int np = tb->n_pairs;
    if (pos >> 32) {
        kvg_rope_angles(cs, r->d, r->rotary_dims, r->inv_freq, (double)pos);
        return;
    }
    const double *e0 = tb->t + (size_t)(pos & 255) * (size_t)np * 2;
    for (int i = 0; i < np; i++) {
        cs[2 * i] = e0[2 * i];
        cs[2 * i + 1] = e0[2 * i + 1];
    }
    for (int l = 1; l < 4; l++) {
        unsigned v = (unsigned)(pos >> (8 * l)) & 255;
        if (!v)
            continue;
        const double *e = tb->t + ((size_t)l * 256 + v) * (size_t)np * 2;
        for (int i = 0; i < np; i++) {
            double c = cs[2 * i], s = cs[2 * i + 1];
            cs[2 * i] = c * e[2 * i] - s * e[2 * i + 1];
            cs[2 * i + 1] = c * e[2 * i + 1] + s * e[2 * i];
        }
    }
}

int kvg_key_scores_pos_ref(const kvg_codec *c, const kvg_rope *r, const kvg_rope_table *tb, const float *q_r,
                           int n_q, const uint8_t *records, const uint64_t *pos, size_t n, float *scores)
{
    if (!c || !c->rot || !r || r->d != c->rot->head_dim || !q_r || n_q < 1 || n_q > 64 ||
        (n && (!records || !pos || !scores)))
        return -EINVAL;
    const int d = r->d;
    const int rb = kvarc_record_bytes(c->format, d);
    if (rb < 0)
        return rb;
    for (size_t i = 0; i < (size_t)n_q * (size_t)d; i++)
        if (!isfinite(q_r[i]))
            return KVARC_ENONFINITE;
    float k[KVARC_HEAD_DIM_MAX];
    for (size_t j = 0; j < n; j++) {
        int rc = kvg_decode_ref(c, records + j * (size_t)rb, 1, k, NULL);
        if (rc)
            return rc;
        double cs[KVARC_HEAD_DIM_MAX];
        if (tb)
            kvg_rope_table_angles(tb, r, pos[j], cs);
        else
            kvg_rope_angles(cs, d, r->rotary_dims, r->inv_freq, (double)pos[j]);
        kvg_rope_turn(k, d, r->rotary_dims, r->layout, cs);
        float best = 0.0f;
        for (int h = 0; h < n_q; h++) {
            const float *q = q_r + (size_t)h * (size_t)d;
            float s = 0.0f;
            for (int i = 0; i < d; i++)
                s += q[i] * k[i];
            if (h == 0 || s > best)
                best = s;
        }
        scores[j] = best;
    }
    return 0;
}
