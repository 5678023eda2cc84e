/* coarse_ref.c - the coarse tier's block summaries (kvg.h, "coarse tier";
 * SCHEMA.md section 6.3). */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "kvg.h"

void kvg_summary_pick(const float *r, size_t n, const uint8_t *bits, const uint16_t *scales, size_t sb,
                      uint8_t *sum_bits, uint16_t *sum_scales)
{
    uint64_t taken = 0;
    for (int it = 1; it < KVG_SUM_ITEMS; it++) {
        size_t best = n;
        for (size_t j = 0; j < n; j++)
            if (!(taken >> j & 1) && (best == n || r[j] > r[best]))
                best = j;
        if (best == n) {                      /* fewer tokens than items: the mean again */
            memcpy(sum_bits + (size_t)it * sb, sum_bits, sb);
            sum_scales[it] = sum_scales[0];
            continue;
        }
        taken |= 1ull << best;
        memcpy(sum_bits + (size_t)it * sb, bits + best * sb, sb);
        sum_scales[it] = scales[best];
    }
}

int kvg_summary_ref(const kvarc_rotation *rot, const float *x, const uint8_t *bits, const uint16_t *scales,
                    size_t n, uint8_t *sum_bits, uint16_t *sum_scales)
{
    if (!rot || kvarc_head_dim_check(rot->head_dim) || !x || !bits || !scales || !sum_bits || !sum_scales ||
        n < 1 || n > KVG_SIG_BLOCK)
        return -EINVAL;
    const int d = rot->head_dim;
    const size_t sb = (size_t)d / 8;
    float m[KVARC_HEAD_DIM_MAX], v[KVARC_HEAD_DIM_MAX], sq[KVARC_HEAD_DIM_MAX], r[KVG_SIG_BLOCK];
    for (int i = 0; i < d; i++) {
        float s = 0.0f;
        for (size_t j = 0; j < n; j++)
            s += x[j * (size_t)d + i];
        m[i] = s / (float)n;
    }
    int rc = kvg_signature_ref(rot, m, sum_bits, &sum_scales[0]);
    if (rc)
        return rc;
    for (int i = 0; i < d; i++) {
        float s = 0.0f;
        for (size_t j = 0; j < n; j++) {
            float e = x[j * (size_t)d + i] - m[i];
            s += e * e;
        }
        v[i] = s / (float)n;
    }
    for (size_t j = 0; j < n; j++) {
        for (int i = 0; i < d; i++) {
            float e = x[j * (size_t)d + i] - m[i];
            sq[i] = v[i] > 0.0f ? e * e / v[i] : 0.0f;
        }
        r[j] = kvarc_tree_sum(sq, d);
        if (!isfinite(r[j]))
            return KVARC_ENONFINITE;
    }
    kvg_summary_pick(r, n, bits, scales, sb, sum_bits, sum_scales);
    return 0;
}

void kvg_block_best_ref(const float *item_scores, size_t nb, int n_items, const uint8_t *ok, float *out)
{
    for (size_t b = 0; b < nb; b++) {
        const float *is = item_scores + b * (size_t)n_items;
        float best = is[0];
        for (int s = 1; s < n_items; s++)
            best = is[s] > best ? is[s] : best;
        out[b] = ok && !ok[b] ? -INFINITY : best;
    }
}
