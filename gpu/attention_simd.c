/* attention_simd.c - exact attention of one decode step through the lanes
 * (attention_lanes.h), chosen at run time: kvg_attend gives
 * kvg_attend_ref's bits on every CPU.
 *
 * Design notes: the reference loops query heads, then partitions, merging
 * each partition's state into the head's (kvg_attn_merge_ref). Here the
 * query heads of one GQA group get their partition states together (the
 * lanes run over keys, so the group's heads share each transposed block of
 * keys), then each head merges its states in partition order with the
 * reference's own merge: the same states merged in the same order. The
 * build (x86-64-v4, v3 or the baseline) is codec_simd.c's choice. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"

#define DECLARE(sfx)                                                                                          \
    void kvg_lanes_attn_partial_##sfx(const float *q, int G, float scale, const float *k, const float *v,      \
                                      size_t n, int d, kvg_attn_state *st, float *lg);
DECLARE(v4)
DECLARE(v3)
DECLARE(base)

typedef void (*partial_fn)(const float *, int, float, const float *, const float *, size_t, int, kvg_attn_state *,
                           float *);

static partial_fn partial_of(kvg_isa isa)
{
    return isa == KVG_ISA_V4 ? kvg_lanes_attn_partial_v4 : isa == KVG_ISA_V3 ? kvg_lanes_attn_partial_v3 :
                                                                              kvg_lanes_attn_partial_base;
}

int kvg_attend_isa(kvg_isa isa, const float *q, int n_q_heads, int n_kv_heads, int d, float scale,
                   const kvg_attn_part *parts, int n_parts, float *out)
{
    if (!kvg_codec_isa_supported(isa))
        return -ENOTSUP;
    if (isa == KVG_ISA_REF || !q || !out || n_q_heads < 1 || n_kv_heads < 1 || n_q_heads % n_kv_heads ||
        n_q_heads / n_kv_heads > 64 || n_parts < 0 || (n_parts && !parts) || !isfinite(scale) ||
        kvarc_head_dim_check(d))
        return kvg_attend_ref(q, n_q_heads, n_kv_heads, d, scale, parts, n_parts, out);
    /* the reference's checks, in its order */
    for (size_t i = 0; i < (size_t)n_q_heads * (size_t)d; i++)
        if (!isfinite(q[i]))
            return KVARC_ENONFINITE;
    size_t most = 1;                                  /* the longest partition of any head */
    for (int p = 0; p < n_parts; p++)
        for (int h = 0; h < n_kv_heads; h++) {
            size_t cnt = parts[p].n_per_head ? parts[p].n_per_head[h] : parts[p].n;
            if (cnt && (!parts[p].k || !parts[p].v || cnt > parts[p].stride))
                return -EINVAL;
            if (cnt > most)
                most = cnt;
        }
    partial_fn partial = partial_of(isa);
    int G = n_q_heads / n_kv_heads;
    kvg_attn_state *st = malloc((size_t)(n_parts ? n_parts : 1) * (size_t)G * sizeof *st);  /* [part][head] */
    float *lg = malloc((size_t)G * most * sizeof *lg);                                      /* [head][key] */
    if (!st || !lg) {
        free(st);
        free(lg);
        return kvg_attend_ref(q, n_q_heads, n_kv_heads, d, scale, parts, n_parts, out);
    }
    int rc = 0;
    for (int hk = 0; hk < n_kv_heads && !rc; hk++) {
        const float *qg = q + (size_t)hk * (size_t)G * (size_t)d;
        for (int p = 0; p < n_parts; p++) {
            const kvg_attn_part *pt = &parts[p];
            size_t cnt = pt->n_per_head ? pt->n_per_head[hk] : pt->n;
            size_t off = (size_t)hk * pt->stride * (size_t)d;
            partial(qg, G, scale, cnt ? pt->k + off : NULL, cnt ? pt->v + off : NULL, cnt, d, st + (size_t)p * G,
                    lg);
        }
        for (int g = 0; g < G; g++) {
            kvg_attn_state acc;
            acc.m = -INFINITY;
            acc.l = 0.0f;
            memset(acc.o, 0, sizeof acc.o);
            for (int p = 0; p < n_parts; p++)
                kvg_attn_merge_ref(&acc, &st[(size_t)p * G + g], d);
            if (acc.l == 0.0f) {
                rc = -ENODATA;
                break;
            }
            float *o = out + ((size_t)hk * (size_t)G + (size_t)g) * (size_t)d;
            for (int i = 0; i < d; i++)
                o[i] = acc.o[i] / acc.l;
        }
    }
    free(st);
    free(lg);
    return rc;
}

int kvg_attend(const float *q, int n_q_heads, int n_kv_heads, int d, float scale, const kvg_attn_part *parts,
               int n_parts, float *out)
{
    return kvg_attend_isa(kvg_codec_isa_best(), q, n_q_heads, n_kv_heads, d, scale, parts, n_parts, out);
}
