/* attend.c - libkvarc's retrieval attention: kvarc_attend, from the
 * call's geometry through stage 1 (stage1.c) and stage 2 (stage2.c) to
 * each query's exact softmax.
 *
 * Design notes
 * One kvarc_attend call, for the layer's last n_q tokens (the chunk):
 *   ns     = min(sinks, chunk_start)          sink tokens before the chunk
 *   hot_lo = max(ns, chunk_start - hot_window) exact tokens from here on
 *   cold   = [ns, hot_lo)                      found by retrieval only
 * Scoring follows the position mode (SCHEMA.md section 6). Remapped: the
 * query is turned by `score_distance` and scored against kind-1 signatures
 * (keys are attended that far back). True: the query is turned to its own
 * position and scored against kind-2 signatures (each key at its own), a
 * bias per 64-position block restoring the centering (kvg_block_bias_ref,
 * from the conversation's table of block angles); kvarcd's stage 2 then
 * turns each shortlisted key to its position. So both stages rank by the
 * logit attention computes.
 * Queries are taken in groups sized so that one RerankLayer call carries
 * the group (its reply under 8 MiB, its records and the `have` records
 * fitting in half the cache, so nothing a reply refers to is evicted
 * before it is used). Per group: stage 1 scores each (query, kv head)
 * against the cold signatures (kvg_score_pos, the GQA group's queries
 * combined; through the coarse tier's block summaries when the context is
 * long enough, coarse.c; the kv heads over threads, stage1.c) and keeps
 * shortlist x top_k; stage 2 is one RerankLayer; then
 * per query one exact softmax over [sinks][retrieved][hot up to itself]
 * (kvg_attend: kvg_attend_ref's bits, log-sum-exp merge), RoPE applied by
 * position mode.
 * A record is decoded once per query group (the `decoded` map): the queries of a
 * prefill chunk retrieve mostly the same tokens, and a record always
 * decodes to the same K and V; in true-position mode its key is turned to
 * its position there too, once. Remapped, a key's position is its rank
 * among the retrieved, the same few for every query: their RoPE angles
 * are computed once per call (kvg_rope_angles), as are the scoring
 * distance's.
 * With a GPU (gpu.h): stage 1 and that softmax run on the device (the hot
 * window from its VRAM mirror); any device failure drops to this CPU path
 * for good, mid-call included.
 * Work space: every array a call uses is carved from one allocation kept
 * on the conversation (kl_ax, kvarc_internal.h), grown when a call needs
 * more, so that a decode step allocates no work space of its own (the
 * RerankLayer reply, and the kernels' own buffers - kvg_attend's,
 * kvg_topk_ref's winners - still come and go per call).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu.h"

#define ITEMS_MAX 1024
#define REPLY_RECORD_BYTES (8u << 20)

/* Sort pr[n] by position (distinct positions; n <= top_k, small). */
static void sort_by_pos(kl_posrec *pr, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        kl_posrec t = pr[i];
        size_t j = i;
        for (; j > 0 && pr[j - 1].pos > t.pos; j--)
            pr[j] = pr[j - 1];
        pr[j] = t;
    }
}

void kl_ax_free(kl_ax *x)
{
    free(x->mem);
    for (size_t h = 0; h < x->hcap; h++)
        free(x->hruns[h].v);
    free(x->hruns);
    free(x->iruns);
    free(x->ibias);
    memset(x, 0, sizeof *x);
}

/* Point x's arrays into base for step s (base NULL: only measure); the
 * bytes they take, each array on its own 64-byte line. */
static size_t ax_carve(kl_ax *x, const kl_step *s, size_t rb, uint8_t *base)
{
    const size_t H = s->H, QH = s->QH, d = s->d, R = s->R_n, kret = s->kret, ni = s->ni;
    size_t off = 0;
#define CARVE(field, count)                                                      \
    do {                                                                         \
        x->field = base ? (void *)(base + off) : NULL;                           \
        off += ((size_t)(count) * sizeof *x->field + 63) & ~(size_t)63;          \
    } while (0)
    x->dcap = ni * kret + 1;
    for (x->dslots = 16; x->dslots < 2 * x->dcap; x->dslots *= 2)
        ;
    for (x->lcap = 16; x->lcap < 2 * ni * kret; x->lcap *= 2)
        ;
    CARVE(idx, H * R);
    CARVE(got, H);
    CARVE(qsc, ni * s->G * d);
    CARVE(bb, QH * s->nblk);
    CARVE(qs, QH);
    CARVE(mus, QH);
    CARVE(item_head, ni);
    CARVE(shortlist, ni * R);
    CARVE(nsl, ni);
    CARVE(have, ni * R);
    CARVE(nhave, ni);
    CARVE(roff, ni);
    CARVE(rn, ni);
    CARVE(boff, ni);
    CARVE(bn, ni);
    CARVE(sort_tmp, R);
    CARVE(items, ni);
    CARVE(ip, ni);
    CARVE(lkey, x->lcap);
    CARVE(lrec, x->lcap);
    CARVE(ret_pos, ni * kret);
    CARVE(ret_rec, ni * kret * rb);
    CARVE(ret_n, ni);
    CARVE(hot_k, H * s->nh * d);
    CARVE(hot_v, H * s->nh * d);
    CARVE(sink_k, H * s->ns * d);
    CARVE(sink_v, H * s->ns * d);
    CARVE(rk, H * kret * d);
    CARVE(rv, H * kret * d);
    CARVE(qi, QH * d);
    CARVE(oi, QH * d);
    CARVE(pr, kret);
    CARVE(cs_rank, (s->remap ? kret : 0) * d);
    CARVE(dkey, x->dslots);
    CARVE(dat, x->dslots);
    CARVE(dk, x->dcap * d);
    CARVE(dv, x->dcap * d);
    CARVE(stage, kret * rb);
    CARVE(spos, kret);
#undef CARVE
    return off;
}

/* The conversation's work space laid out for step s, the decoded map empty. */
static int ax_reserve(kvarc_conv *cv, const kl_step *s)
{
    kl_ax *x = &cv->ax;
    size_t need = ax_carve(x, s, cv->rb, NULL);
    if (need > x->mem_cap) {
        free(x->mem);
        x->mem = aligned_alloc(64, need);
        x->mem_cap = x->mem ? need : 0;
        if (!x->mem)
            return -ENOMEM;
    }
    ax_carve(x, s, cv->rb, x->mem);
    memset(x->dkey, 0, x->dslots * sizeof *x->dkey);
    x->dn = 0;
    return 0;
}

/* The records of one (query, head) not yet in the decoded map, decoded
 * together (kvg_decode runs them many at a time) and entered in it. The
 * map holds one query group's records (it is emptied at each group) and
 * has room for all a group can retrieve (items x top_k), so it never
 * evicts. pr[0..kn) name the records: position and index j in recs. */
static int decode_new(kl_ax *x, const kvg_codec *codec, size_t d, size_t head, const kl_posrec *pr, size_t kn,
                      const uint8_t *recs, size_t rb, const kvarc_conv *turn)
{
    size_t nm = 0;
    for (size_t r = 0; r < kn; r++) {
        size_t i = kl_slot_of(x->dkey, x->dslots, head, pr[r].pos);
        if (x->dkey[i])
            continue;
        if (x->dn + nm == x->dcap)      /* cannot happen: a group retrieves at most dcap - 1 */
            return -EOVERFLOW;
        memcpy(x->stage + nm * rb, recs + (size_t)pr[r].j * rb, rb);
        x->spos[nm] = pr[r].pos;
        x->dkey[i] = ((uint64_t)head << 48 | pr[r].pos) + 1;
        x->dat[i] = (uint32_t)(x->dn + nm++);
    }
    int rc = kvg_decode(codec, x->stage, nm, x->dk + x->dn * d, x->dv + x->dn * d);
    if (rc)
        return rc;
    if (turn)                           /* true positions: each key turned to its own */
        for (size_t m = 0; m < nm; m++)
            kvg_rope_apply(x->dk + (x->dn + m) * d, (int)d, (int)turn->m.rotary_dims, turn->m.rope_layout,
                           turn->rope.inv_freq, (double)x->spos[m]);
    x->dn += nm;
    return 0;
}

/* K and V of (head, pos), already in the map (decode_new). */
static void decoded(const kl_ax *x, size_t d, size_t head, uint64_t pos, float *k, float *v)
{
    size_t i = kl_slot_of(x->dkey, x->dslots, head, pos);
    memcpy(k, x->dk + (size_t)x->dat[i] * d, d * 4);
    memcpy(v, x->dv + (size_t)x->dat[i] * d, d * 4);
}

/* The exact hot window [hot_lo, hot_lo + nh) of every head from the ring
 * (keys turned when appended) into x.hot_k, x.hot_v. */
static void gather_hot(const kvarc_conv *cv, const kl_layer *y, kl_ax *x, uint64_t hot_lo, uint64_t nh)
{
    const size_t d = cv->m.head_dim;
    for (size_t h = 0; h < cv->m.n_kv_heads; h++)
        for (uint64_t t = 0; t < nh; t++) {
            size_t slot = (h * cv->ring + (hot_lo + t) % cv->ring) * d, dst = (h * nh + t) * d;
            memcpy(x->hot_k + dst, y->ring_kr + slot, d * 4);
            memcpy(x->hot_v + dst, y->ring_v + slot, d * 4);
        }
}

/* The call's geometry (design notes); 0, or -ENOMEM for the block angles. */
static int step_of(kvarc_conv *cv, uint32_t layer, uint32_t n_q, kl_step *s)
{
    const kl_layer *y = &cv->layers[layer];
    memset(s, 0, sizeof *s);
    s->layer = layer;
    s->n_q = n_q;
    s->H = cv->m.n_kv_heads;
    s->QH = cv->m.n_q_heads;
    s->G = s->QH / s->H;
    s->d = cv->m.head_dim;
    s->len = y->len;
    s->cs = s->len - n_q;
    s->ns = s->cs < cv->o.sinks ? s->cs : cv->o.sinks;
    s->hot_lo = s->cs > cv->o.hot_window && s->cs - cv->o.hot_window > s->ns ? s->cs - cv->o.hot_window : s->ns;
    s->cold = s->hot_lo - s->ns;
    s->nh = s->len - s->hot_lo;
    s->kret = s->cold < cv->o.top_k ? (size_t)s->cold : cv->o.top_k;
    s->R_n = (size_t)cv->o.shortlist * cv->o.top_k;
    if (s->R_n > s->cold)
        s->R_n = (size_t)s->cold;
    s->rot = (int)cv->m.rotary_dims;
    s->lay = cv->m.rope_layout;
    s->remap = cv->o.pos_mode == 1;
    s->scale = cv->o.scale > 0 ? cv->o.scale : 1.0f / sqrtf((float)s->d);
    /* true positions: the blocks of kind-2 signatures the cold range spans */
    s->b0 = s->ns / KVG_SIG_BLOCK;
    s->nblk = s->cold && !s->remap ? (size_t)((s->hot_lo - 1) / KVG_SIG_BLOCK - s->b0 + 1) : 0;
    if (s->nblk && !(s->bcs = kl_block_angles(cv, s->b0 + s->nblk)))
        return -ENOMEM;
    /* queries per group: one RerankLayer each (its records under
     * REPLY_RECORD_BYTES, its records and `have` in half the cache) */
    size_t per_item = s->kret ? s->kret * cv->rb : 1, items_max = ITEMS_MAX;
    if (REPLY_RECORD_BYTES / per_item < items_max)
        items_max = REPLY_RECORD_BYTES / per_item;
    if (s->R_n + s->kret && cv->cache.cap / 2 / (s->R_n + s->kret) < items_max)
        items_max = cv->cache.cap / 2 / (s->R_n + s->kret);
    s->qb = items_max / s->H;
    if (s->qb < 1)
        s->qb = 1;
    if (s->qb > n_q)
        s->qb = n_q;
    s->ni = s->qb * s->H;
    return 0;
}

/* The sinks of every head into x, keys turned by the position mode. */
static void gather_sinks(const kvarc_conv *cv, const kl_layer *y, const kl_step *s, kl_ax *x)
{
    const size_t d = s->d;
    for (size_t h = 0; h < s->H; h++)
        for (uint64_t t = 0; t < s->ns; t++) {
            size_t src = (h * cv->o.sinks + t) * d, dst = (h * s->ns + t) * d;
            memcpy(x->sink_k + dst, y->sink_k + src, d * 4);
            memcpy(x->sink_v + dst, y->sink_v + src, d * 4);
            double p = s->remap ? (double)s->hot_lo - (double)s->kret - (double)s->ns + (double)t : (double)t;
            kvg_rope_apply(x->sink_k + dst, (int)d, s->rot, s->lay, cv->rope.inv_freq, p);
        }
}

/* Query i of the group's retrieved records, every head: decoded (once
 * per group: the map), keys turned by the position mode, into rk / rv;
 * their count into *kn_out. */
static int retrieved(kvarc_conv *cv, const kl_step *s, kl_ax *x, uint32_t i, size_t *kn_out)
{
    const size_t H = s->H, d = s->d, kret = s->kret;
    size_t kn = kret ? x->ret_n[(size_t)i * H] : 0;
    *kn_out = kn;
    for (size_t h = 0; h < H && kret; h++) {
        size_t it = (size_t)i * H + h;
        if (x->ret_n[it] != kn)
            return kl_fail(cv, -EIO, "kv heads got different numbers of records (%u, %zu)", x->ret_n[it], kn);
        for (size_t j = 0; j < kn; j++) {
            x->pr[j].pos = x->ret_pos[it * kret + j];
            x->pr[j].j = (uint32_t)j;
        }
        sort_by_pos(x->pr, kn);
        kvg_codec codec = kl_codec(cv, s->layer, (uint32_t)h);
        int rc = decode_new(x, &codec, d, h, x->pr, kn, x->ret_rec + it * kret * cv->rb, cv->rb,
                            s->remap ? NULL : cv);
        if (rc)
            return kl_fail(cv, rc, "decoding records of layer %u: %s", s->layer, kvarc_strerror(rc));
        for (size_t r = 0; r < kn; r++) {
            float *kk = x->rk + (h * kret + r) * d, *vv = x->rv + (h * kret + r) * d;
            decoded(x, d, h, x->pr[r].pos, kk, vv);
            if (s->remap && kn == kret)
                kvg_rope_turn(kk, (int)d, s->rot, s->lay, x->cs_rank + r * d);
            else if (s->remap)
                kvg_rope_apply(kk, (int)d, s->rot, s->lay, cv->rope.inv_freq,
                               (double)s->hot_lo - (double)kn + (double)r);
        }
    }
    return 0;
}

int kvarc_attend(kvarc_conv *cv, uint32_t layer, const float *q, uint32_t n_q, float *out)
{
    if (layer >= cv->m.n_layers || !q || !out)
        return kl_fail(cv, -EINVAL, "attend on layer %u of %u (q and out must be given)", layer, cv->m.n_layers);
    kl_layer *y = &cv->layers[layer];
    if (n_q < 1 || n_q > cv->o.max_chunk || n_q > y->len)
        return kl_fail(cv, -EINVAL, "attend of %u queries on layer %u: 1..max_chunk (%u) queries, and the chunk's "
                       "tokens appended first (the layer has %llu)", n_q, layer, cv->o.max_chunk,
                       (unsigned long long)y->len);
    /* every query value checked first: a NaN or Inf is refused before any work, whichever path serves */
    const size_t nqv = (size_t)cv->m.n_q_heads * n_q * cv->m.head_dim;
    for (size_t i = 0; i < nqv; i++)
        if (!isfinite(q[i])) {
            const size_t per_head = (size_t)n_q * cv->m.head_dim;
            return kl_fail(cv, KVARC_ENONFINITE, "attend on layer %u: query %zu head %zu has a NaN or Inf", layer,
                           i % per_head / cv->m.head_dim, i / per_head);
        }
    int rc = kl_drain(cv);                /* kvarcd holds every block this conversation counts as archived */
    if (rc)
        return rc;
    kl_step s;
    rc = step_of(cv, layer, n_q, &s);
    const size_t H = s.H, QH = s.QH, d = s.d, kret = s.kret;
    if (!rc && s.cold && y->archived < s.hot_lo && (rc = kl_flush(cv, layer)))   /* invariant 3 makes this rare */
        return rc;
    if (rc || (rc = ax_reserve(cv, &s)))
        return kl_fail(cv, rc, "out of memory for an attend of %u queries over %llu cold tokens", n_q,
                       (unsigned long long)s.cold);
    kl_ax *x = &cv->ax;

    kvg_rope_angles(x->cs_score, (int)d, s.rot, cv->rope.inv_freq, (double)cv->o.score_distance);
    for (size_t r = 0; s.remap && r < kret; r++)
        kvg_rope_angles(x->cs_rank + r * d, (int)d, s.rot, cv->rope.inv_freq,
                        (double)s.hot_lo - (double)kret + (double)r);
    /* exact parts: sinks per mode; the hot window (at true positions) is
     * gathered on the host only for the CPU path: the GPU reads its mirror */
    gather_sinks(cv, y, &s, x);
    if (cv->gpu && kl_gpu_ring_sync(cv, layer))
        kl_gpu_free(cv);                  /* the host ring is whole: the CPU path serves */
    int hot_gathered = 0;                 /* by the first query the CPU attends */
    for (uint32_t g0 = 0; g0 < n_q && !rc; g0 += (uint32_t)s.qb) {
        uint32_t gn = n_q - g0 < s.qb ? n_q - g0 : (uint32_t)s.qb;
        if (x->dn) {                      /* the decoded map holds one group's records */
            memset(x->dkey, 0, x->dslots * sizeof *x->dkey);
            x->dn = 0;
        }
        x->iruns_n = x->ibias_n = 0;      /* fast tier: the group's runs */
        int64_t t1 = kl_now_ns();
        for (uint32_t i = 0; i < gn && kret && !rc; i++)
            rc = kl_stage1_query(cv, &s, x, q, g0, i);
        int64_t t2 = kl_now_ns();
        cv->st.ns_stage1 += (uint64_t)(t2 - t1);
        if (!rc && kret)
            rc = kl_stage2(cv, &s, x, (size_t)gn * H);
        int64_t t3 = kl_now_ns();
        cv->st.ns_stage2 += (uint64_t)(t3 - t2);
        /* attention per query */
        for (uint32_t i = 0; i < gn && !rc; i++) {
            uint64_t pq = s.cs + g0 + i;
            int64_t t4 = kl_now_ns();
            size_t kn;
            rc = retrieved(cv, &s, x, i, &kn);
            int64_t t5 = kl_now_ns();
            cv->st.ns_decode += (uint64_t)(t5 - t4);
            if (rc)
                break;
            if (g0 + i == n_q - 1) {          /* the last query: kept for kvarc_last_retrieved */
                cv->last_n = (uint32_t)kn;
                for (size_t h = 0; h < H; h++)
                    memcpy(cv->last_ret + h * cv->o.top_k, x->ret_pos + ((size_t)i * H + h) * kret, kn * 8);
            }
            for (size_t hq = 0; hq < QH; hq++) {
                memcpy(x->qi + hq * d, q + (hq * n_q + g0 + i) * d, d * 4);
                kvg_rope_apply(x->qi + hq * d, (int)d, s.rot, s.lay, cv->rope.inv_freq, (double)pq);
            }
            if (cv->gpu && kl_gpu_attend(cv, layer, x->qi, x->sink_k, x->sink_v, (size_t)s.ns, x->rk, x->rv, kret,
                                         kn, s.hot_lo, (size_t)(pq - s.hot_lo + 1), s.scale, x->oi))
                kl_gpu_free(cv);          /* the device failed: this query and the rest on the CPU */
            if (!cv->gpu) {
                kvg_attn_part parts[3] = {
                    { x->sink_k, x->sink_v, (size_t)s.ns, (size_t)s.ns, NULL },
                    { x->rk, x->rv, kret, kn, NULL },
                    { x->hot_k, x->hot_v, (size_t)s.nh, (size_t)(pq - s.hot_lo + 1), NULL },
                };
                if (!hot_gathered) {
                    gather_hot(cv, y, x, s.hot_lo, s.nh);
                    hot_gathered = 1;
                }
                if ((rc = kvg_attend(x->qi, (int)QH, (int)H, (int)d, s.scale, parts, 3, x->oi))) {
                    kl_fail(cv, rc, "attention on layer %u query %u: %s", layer, g0 + i, kvarc_strerror(rc));
                    break;
                }
            }
            for (size_t hq = 0; hq < QH; hq++)
                memcpy(out + (hq * n_q + g0 + i) * d, x->oi + hq * d, d * 4);
            cv->st.ns_attend += (uint64_t)(kl_now_ns() - t5);
        }
    }
    if (!rc) {
        cv->st.steps++;
        cv->st.queries += n_q;
    }
    return rc;
}
