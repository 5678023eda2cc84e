/* attention_ref.c - CPU reference of exact attention for one decode step.
 *
 * Each partition (sinks, hot window, retrieved records, ...) yields a
 * softmax state (m, l, o) per query head, computed two-pass (max, then
 * sum of exponentials) in fp32; the states merge with the log-sum-exp
 * rule, so the result is one exact softmax over the union of partitions
 * whatever their number or sizes. This is the flash-decoding split that
 * the GPU version runs over the key axis. */
#include "kvg.h"

#include <errno.h>
#include <math.h>
#include <string.h>

static float dot(const float *a, const float *b, int d)
{
    float s = 0.0f;
    for (int i = 0; i < d; i++)
        s += a[i] * b[i];
    return s;
}

void kvg_attn_partial_ref(const float *q, float scale, const float *k, const float *v,
                          size_t n, int d, kvg_attn_state *st)
{
    st->m = -INFINITY;
    st->l = 0.0f;
    memset(st->o, 0, (size_t)d * sizeof(float));
    for (size_t t = 0; t < n; t++)
        st->m = fmaxf(st->m, scale * dot(q, k + t * (size_t)d, d));
    for (size_t t = 0; t < n; t++) {
        float p = expf(scale * dot(q, k + t * (size_t)d, d) - st->m);
        st->l += p;
        const float *vt = v + t * (size_t)d;
        for (int i = 0; i < d; i++)
            st->o[i] += p * vt[i];
    }
}

void kvg_attn_merge_ref(kvg_attn_state *a, const kvg_attn_state *b, int d)
{
    if (b->l == 0.0f)
        return;
    if (a->l == 0.0f) {
        a->m = b->m;
        a->l = b->l;
        memcpy(a->o, b->o, (size_t)d * sizeof(float));
        return;
    }
    float m = fmaxf(a->m, b->m);
    float ca = expf(a->m - m), cb = expf(b->m - m);
    a->m = m;
    a->l = a->l * ca + b->l * cb;
    for (int i = 0; i < d; i++)
        a->o[i] = a->o[i] * ca + b->o[i] * cb;
}

int kvg_attend_ref(const float *q, int n_q_heads, int n_kv_heads, int d, float scale,
                   const kvg_attn_part *parts, int n_parts, float *out)
{
    if (!q || !out || n_q_heads < 1 || n_kv_heads < 1 || n_q_heads % n_kv_heads ||
        n_parts < 0 || (n_parts && !parts) || !isfinite(scale))
        return -EINVAL;
    if (kvarc_head_dim_check(d))
        return KVARC_EHEADDIM;
    for (size_t i = 0; i < (size_t)n_q_heads * (size_t)d; i++)
        if (!isfinite(q[i]))
            return KVARC_ENONFINITE;
    for (int p = 0; p < n_parts; p++) {
        for (int h = 0; h < n_kv_heads; h++) {
            size_t cnt = parts[p].n_per_head ? parts[p].n_per_head[h] : parts[p].n;
            if (cnt && (!parts[p].k || !parts[p].v || cnt > parts[p].stride))
                return -EINVAL;
        }
    }
    int group = n_q_heads / n_kv_heads;
    kvg_attn_state acc, cur;
    for (int hq = 0; hq < n_q_heads; hq++) {
        int hk = hq / group;
        const float *qh = q + (size_t)hq * (size_t)d;
        acc.m = -INFINITY;
        acc.l = 0.0f;
        memset(acc.o, 0, sizeof acc.o);
        for (int p = 0; p < n_parts; p++) {
            const kvg_attn_part *pt = &parts[p];
            size_t cnt = pt->n_per_head ? pt->n_per_head[hk] : pt->n;
            size_t off = (size_t)hk * pt->stride * (size_t)d;
            kvg_attn_partial_ref(qh, scale, cnt ? pt->k + off : NULL, cnt ? pt->v + off : NULL,
                                 cnt, d, &cur);
            kvg_attn_merge_ref(&acc, &cur, d);
        }
        if (acc.l == 0.0f)
            return -ENODATA;
        for (int i = 0; i < d; i++)
            out[(size_t)hq * (size_t)d + (size_t)i] = acc.o[i] / acc.l;
    }
    return 0;
}
