/* attention_lanes.h - one partition's softmax states for the query heads
 * of a GQA group, many keys at a time: the body of kvg_attend's fast path
 * (attention_simd.c), a template included by each build file (lanes_v4.c,
 * lanes_v3.c, lanes_base.c) after lanes.h.
 *
 * It gives kvg_attn_partial_ref's bits for every head. The logits: lane l
 * of a vector is key t0 + l, each lane summing q_i k_i in index order from
 * 0 and then multiplying by scale, as the reference's dot does (the keys
 * come in as rows and are transposed in registers). The max is taken over
 * the logits in key order with fmaxf, the exponentials with expf, one key
 * at a time in key order, as the reference does; the output accumulates
 * p v_t over the keys in order with lanes over the dimensions (each
 * element its own sum in the reference's order). The reference computes
 * each logit twice (for the max, then for the sum); both give the same
 * value, which is computed once here and kept for the second pass. */
#include "lanes.h"

/* Lane l: scale * (sum_i q_i kt[i][l] in index order from 0), the
 * reference's logit of key l. */
AI void logits_l(const float *q, float scale, const vf *kt, int d, vf *out)
{
    vf acc = { 0 };
    for (int i = 0; i < d; i++)
        acc += q[i] * kt[i];
    *out = scale * acc;
}

/* States st[0..G) of the G queries q[G][d] over keys k[n][d], v[n][d];
 * lg: G x n floats of work space (the logits, kept between the passes). */
void LANES_FN(attn_partial)(const float *q, int G, float scale, const float *k, const float *v, size_t n, int d,
                            kvg_attn_state *st, float *lg)
{
    vf kt[KVARC_HEAD_DIM_MAX];
    for (int h = 0; h < G; h++) {
        st[h].m = -INFINITY;
        st[h].l = 0.0f;
        memset(st[h].o, 0, (size_t)d * sizeof(float));
    }
    /* pass 1: the logits, and the max of each head (fmaxf in key order) */
    for (size_t t0 = 0; t0 < n; t0 += LN) {
        int m = n - t0 < LN ? (int)(n - t0) : LN;
        load_rows_l(k + t0 * (size_t)d, d, m, kt);
        for (int h = 0; h < G; h++) {
            vf acc;
            logits_l(q + (size_t)h * (size_t)d, scale, kt, d, &acc);
            float *lh = lg + (size_t)h * n + t0;
            for (int l = 0; l < m; l++) {
                lh[l] = acc[l];
                st[h].m = fmaxf(st[h].m, acc[l]);
            }
        }
    }
    /* pass 2: exponentials, their sum and the weighted values, key order */
    for (int h = 0; h < G; h++) {
        const float *lh = lg + (size_t)h * n;
        for (size_t t = 0; t < n; t++) {
            float p = expf(lh[t] - st[h].m);
            st[h].l += p;
            const float *vt = v + t * (size_t)d;
            for (int i0 = 0; i0 < d; i0 += LN) {       /* d is a multiple of LN */
                vf x, o;
                memcpy(&x, vt + i0, sizeof x);
                memcpy(&o, st[h].o + i0, sizeof o);
                o += p * x;
                memcpy(st[h].o + i0, &o, sizeof o);
            }
        }
    }
}
