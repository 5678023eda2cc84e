/* attend.c - libkvarc's retrieval attention (the CPU path).
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
 * With a GPU (gpu.c): stage 1 and that softmax run on the device (the hot
 * window from its VRAM mirror); any device failure drops to this CPU path
 * for good, mid-call included.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvarc_internal.h"

#define ITEMS_MAX 1024
#define REPLY_RECORD_BYTES (8u << 20)

typedef struct posrec {
    uint64_t pos;
    uint32_t j;              /* index in the result (best first) */
} posrec;

static int u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Sort pr[n] by position (distinct positions; n <= top_k, small). */
static void sort_by_pos(posrec *pr, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        posrec t = pr[i];
        size_t j = i;
        for (; j > 0 && pr[j - 1].pos > t.pos; j--)
            pr[j] = pr[j - 1];
        pr[j] = t;
    }
}

/* The slot of (head, pos) in an open-addressing table keys[n] (n a power
 * of two; key (head << 48 | pos) + 1, 0 = empty): where it is or would go. */
static size_t slot_of(const uint64_t *keys, size_t n, size_t head, uint64_t pos)
{
    uint64_t key = ((uint64_t)head << 48 | pos) + 1, h = key;
    size_t i = (size_t)kvarc_splitmix64(&h) & (n - 1);
    while (keys[i] && keys[i] != key)
        i = (i + 1) & (n - 1);
    return i;
}

/* Per call scratch, allocated once. */
typedef struct scratch {
    uint32_t *idx;           /* [H][R] one query's shortlists, indices from ns */
    long     *got;           /* [H] their lengths */
    float    *qsc;           /* [items][G][d] scoring queries */
    float    *bb;            /* [QH][nblk] true positions: a query's kind-2 block biases, every head */
    uint64_t *shortlist;     /* [items][R] */
    uint64_t *have;          /* [items][R] */
    size_t   *nhave;
    uint64_t *ret_pos;       /* [items][kret] */
    uint8_t  *ret_rec;       /* [items][kret][rb] */
    uint32_t *ret_n;         /* [items] */
    float    *hot_k;         /* [H][nh][d] roped at true positions */
    float    *sink_k;        /* [H][ns][d] roped */
    float    *rk, *rv;       /* [H][kret][d] one query's retrieved, roped */
    float    *qi, *oi;       /* [n_q_heads][d] */
    float    *hot_v;         /* [H][nh][d] */
    float    *sink_v;        /* [H][ns][d] */
    posrec   *pr;            /* [kret] */
    uint64_t *sort_tmp;      /* [R] kvg_sort_u64's work space */
    double   *cs_rank;       /* [kret][d] remapped: RoPE angles of rank r when all kret came back */
    double    cs_score[KVARC_HEAD_DIM_MAX];   /* RoPE angles of the scoring distance */
    uint64_t *dkey;          /* [dslots] decoded map: (head << 48 | pos) + 1, 0 = empty */
    uint32_t *dat;           /* [dslots] where that entry's K and V are */
    float    *dk, *dv;       /* [dcap][d] decoded (true positions: turned) */
    uint8_t  *stage;         /* [kret] records to decode together */
    uint32_t *nsl;           /* [items] each item's shortlist length (prefill_shortlist) */
    uint64_t *spos;          /* [kret] their positions */
    size_t    dcap, dslots, dn;   /* dcap: a group's items x kret + 1; dslots: a power of two >= 2 dcap */
} scratch;

/* The records of one (query, head) not yet in the decoded map, decoded
 * together (kvg_decode runs them many at a time) and entered in it. The
 * map holds one query group's records (it is emptied at each group) and
 * has room for all a group can retrieve (items x top_k), so it never
 * evicts. pr[0..kn) name the records: position and index j in recs. */
static int decode_new(scratch *x, const kvg_codec *codec, size_t d, size_t head, const posrec *pr, size_t kn,
                      const uint8_t *recs, size_t rb, const kvarc_conv *turn)
{
    size_t nm = 0;
    for (size_t r = 0; r < kn; r++) {
        size_t i = slot_of(x->dkey, x->dslots, head, pr[r].pos);
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
static void decoded(const scratch *x, size_t d, size_t head, uint64_t pos, float *k, float *v)
{
    size_t i = slot_of(x->dkey, x->dslots, head, pos);
    memcpy(k, x->dk + (size_t)x->dat[i] * d, d * 4);
    memcpy(v, x->dv + (size_t)x->dat[i] * d, d * 4);
}

static void scratch_free(scratch *x)
{
    free(x->idx); free(x->got); free(x->qsc); free(x->bb); free(x->shortlist); free(x->have);
    free(x->nhave); free(x->ret_pos); free(x->ret_rec); free(x->ret_n); free(x->hot_k); free(x->sink_k);
    free(x->rk); free(x->rv); free(x->qi); free(x->oi); free(x->hot_v); free(x->sink_v); free(x->pr);
    free(x->sort_tmp); free(x->cs_rank);
    free(x->dkey); free(x->dat); free(x->dk); free(x->dv); free(x->stage); free(x->spos); free(x->nsl);
}

/* The exact hot window [hot_lo, hot_lo + nh) of every head from the ring
 * (keys turned when appended) into x.hot_k, x.hot_v. */
static void gather_hot(const kvarc_conv *cv, const kl_layer *y, scratch *x, uint64_t hot_lo, uint64_t nh)
{
    const size_t d = cv->m.head_dim;
    for (size_t h = 0; h < cv->m.n_kv_heads; h++)
        for (uint64_t t = 0; t < nh; t++) {
            size_t slot = (h * cv->ring + (hot_lo + t) % cv->ring) * d, dst = (h * nh + t) * d;
            memcpy(x->hot_k + dst, y->ring_kr + slot, d * 4);
            memcpy(x->hot_v + dst, y->ring_v + slot, d * 4);
        }
}

/* Stage 2 for items [0, n) of the group: one RerankLayer, records resolved
 * from the reply or the cache into ret_rec. */
static int stage2(kvarc_conv *cv, uint32_t layer, scratch *x, const uint32_t *item_head, size_t n, size_t G,
                  size_t R_n, size_t kret)
{
    size_t d = cv->m.head_dim;
    Kvarc__V1__RerankItem *items = calloc(n, sizeof *items), **ip = calloc(n, sizeof *ip);
    if (!items || !ip) {
        free(items);
        free(ip);
        return kl_fail(cv, -ENOMEM, "out of memory");
    }
    size_t sent_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        kvarc__v1__rerank_item__init(&items[i]);
        items[i].head = item_head[i];
        items[i].n_queries = (uint32_t)G;
        items[i].n_query = G * d;
        items[i].query = x->qsc + i * G * d;
        items[i].n_shortlist = x->nsl[i];
        items[i].shortlist = x->shortlist + i * R_n;
        items[i].top_k = (uint32_t)kret;
        items[i].n_have = x->nhave[i];
        items[i].have = x->have + i * R_n;
        ip[i] = &items[i];
        sent_bytes += G * d * 4 + x->nsl[i] * 8 + x->nhave[i] * 8 + 16;
    }
    Kvarc__V1__RerankLayerRequest r = KVARC__V1__RERANK_LAYER_REQUEST__INIT;
    r.conv = cv->id;
    r.layer = layer;
    r.n_items = n;
    r.items = ip;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(cv->cl->conn, "RerankLayer", &r.base, &kvarc__v1__rerank_layer_reply__descriptor, &rep, 0,
                      cv->err, sizeof cv->err);
    free(items);
    free(ip);
    cv->st.bytes_sent += sent_bytes;
    if (st)
        return kl_rc_of_status(st);
    Kvarc__V1__RerankLayerReply *rl = (Kvarc__V1__RerankLayerReply *)rep;
    int rc = rl->n_results == n && rl->record_bytes == cv->rb ? 0 :
             kl_fail(cv, -EIO, "RerankLayer answered %zu results of %u-byte records for %zu items", rl->n_results,
                     rl->record_bytes, n);
    /* Three passes, so that a record cache smaller than one reply still
     * serves it: 1. the records the client said it has, from the cache,
     * before any record of this reply enters it (and could evict them);
     * 2. the records sent, into place and into the cache; 3. those kvarcd
     * sent once for an earlier item of the same head, from where pass 2
     * put them (found through `landed`). */
    size_t total = 0, nland = 16;
    for (size_t i = 0; !rc && i < n; i++) {
        Kvarc__V1__RerankResult *res = rl->results[i];
        if (res->n_positions > kret || res->n_sent != res->n_positions) {
            rc = kl_fail(cv, -EIO, "RerankLayer result %zu: %zu positions for top_k %zu", i, res->n_positions, kret);
            break;
        }
        total += res->n_positions;
        x->ret_n[i] = (uint32_t)res->n_positions;
        memcpy(x->ret_pos + i * kret, res->positions, res->n_positions * 8);
        cv->st.bytes_received += res->records.len + res->n_positions * 13;
        cv->st.cache_lookups += res->n_positions;
    }
    while (nland < 2 * total)
        nland *= 2;
    uint64_t *lkey = rc ? NULL : calloc(nland, sizeof *lkey);    /* (head << 48 | pos) + 1, 0 = empty */
    uint8_t **lrec = rc ? NULL : malloc(nland * sizeof *lrec);
    if (!rc && (!lkey || !lrec))
        rc = kl_fail(cv, -ENOMEM, "out of memory");
    for (int pass = 1; !rc && pass <= 3; pass++)
        for (size_t i = 0; !rc && i < n; i++) {
            Kvarc__V1__RerankResult *res = rl->results[i];
            const uint64_t *hv = x->have + i * R_n;
            size_t off = 0;
            for (size_t j = 0; !rc && j < res->n_positions; j++) {
                uint64_t p = res->positions[j], key = kl_cache_key(layer, item_head[i], p);
                uint64_t lk = ((uint64_t)item_head[i] << 48 | p) + 1;
                uint8_t *dst = x->ret_rec + (i * kret + j) * cv->rb;
                if (res->sent[j]) {
                    if (off + cv->rb > res->records.len) {
                        rc = kl_fail(cv, -EIO, "RerankLayer result %zu is short of records", i);
                        break;
                    }
                    if (pass == 2) {
                        memcpy(dst, res->records.data + off, cv->rb);
                        kl_cache_put(&cv->cache, key, dst);
                        cv->st.records_fetched++;
                        size_t slot = slot_of(lkey, nland, item_head[i], p);
                        lkey[slot] = lk;
                        lrec[slot] = dst;
                    }
                    off += cv->rb;
                    continue;
                }
                if (pass == 2)
                    continue;
                int had = bsearch(&p, hv, x->nhave[i], 8, u64_cmp) != NULL;
                if (pass == 1 && had) {
                    const uint8_t *c = kl_cache_get(&cv->cache, key);
                    if (!c) {
                        rc = kl_fail(cv, -EIO, "record of layer %u head %u position %llu left the cache between "
                                     "stage 1 and stage 2", layer, item_head[i], (unsigned long long)p);
                        break;
                    }
                    memcpy(dst, c, cv->rb);
                    cv->st.cache_hits++;
                } else if (pass == 3 && !had) {
                    size_t slot = slot_of(lkey, nland, item_head[i], p);
                    if (lkey[slot] != lk) {
                        rc = kl_fail(cv, -EIO, "record of layer %u head %u position %llu was neither sent nor held",
                                     layer, item_head[i], (unsigned long long)p);
                        break;
                    }
                    memcpy(dst, lrec[slot], cv->rb);
                    cv->st.cache_hits++;
                }
            }
        }
    free(lkey);
    free(lrec);
    protobuf_c_message_free_unpacked(rep, NULL);
    return rc;
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
    const size_t H = cv->m.n_kv_heads, QH = cv->m.n_q_heads, G = QH / H, d = cv->m.head_dim;
    const uint64_t len = y->len, cs = len - n_q;
    const uint64_t ns = cs < cv->o.sinks ? cs : cv->o.sinks;
    const uint64_t hot_lo = cs > cv->o.hot_window && cs - cv->o.hot_window > ns ? cs - cv->o.hot_window : ns;
    const uint64_t cold = hot_lo - ns, nh = len - hot_lo;
    const size_t kret = cold < cv->o.top_k ? (size_t)cold : cv->o.top_k;
    size_t R_n = (size_t)cv->o.shortlist * cv->o.top_k;
    if (R_n > cold)
        R_n = (size_t)cold;
    const int rot = (int)cv->m.rotary_dims, lay = cv->m.rope_layout;
    const float scale = cv->o.scale > 0 ? cv->o.scale : 1.0f / sqrtf((float)d);
    const int remap = cv->o.pos_mode == 1;
    /* true positions: the blocks of kind-2 signatures the cold range spans (0 remapped) */
    const uint64_t b0 = ns / KVG_SIG_BLOCK;
    const size_t nblk = cold && !remap ? (size_t)((hot_lo - 1) / KVG_SIG_BLOCK - b0 + 1) : 0;
    const double *bcs = NULL;
    int rc = 0;
    if (cold && y->archived < hot_lo && (rc = kl_flush(cv, layer)))   /* invariant 3 makes this rare */
        return rc;

    /* queries per group: one RerankLayer each */
    size_t per_item = kret ? kret * cv->rb : 1, items_max = ITEMS_MAX;
    if (REPLY_RECORD_BYTES / per_item < items_max)
        items_max = REPLY_RECORD_BYTES / per_item;
    if (R_n + kret && cv->cache.cap / 2 / (R_n + kret) < items_max)
        items_max = cv->cache.cap / 2 / (R_n + kret);
    size_t qb = items_max / H;
    if (qb < 1)
        qb = 1;
    if (qb > n_q)
        qb = n_q;

    scratch x;
    memset(&x, 0, sizeof x);
    size_t ni = qb * H;
    x.idx = malloc((H * R_n + 1) * 4);
    x.got = malloc(H * sizeof *x.got);
    x.qsc = malloc(ni * G * d * 4);
    x.bb = malloc((QH * nblk + 1) * 4);
    x.shortlist = malloc((ni * R_n + 1) * 8);
    x.have = malloc((ni * R_n + 1) * 8);
    x.nhave = calloc(ni, sizeof *x.nhave);
    x.ret_pos = malloc((ni * kret + 1) * 8);
    x.ret_rec = malloc(ni * kret * cv->rb + 1);
    x.ret_n = calloc(ni, sizeof *x.ret_n);
    x.hot_k = malloc((H * nh + 1) * d * 4);
    x.hot_v = malloc((H * nh + 1) * d * 4);
    x.sink_k = malloc((H * ns + 1) * d * 4);
    x.sink_v = malloc((H * ns + 1) * d * 4);
    x.rk = malloc((H * kret + 1) * d * 4);
    x.rv = malloc((H * kret + 1) * d * 4);
    x.qi = malloc(QH * d * 4);
    x.oi = malloc(QH * d * 4);
    x.pr = malloc((kret + 1) * sizeof *x.pr);
    x.sort_tmp = malloc((R_n + 1) * sizeof *x.sort_tmp);
    x.cs_rank = malloc((remap ? kret : 0) * d * sizeof *x.cs_rank + 1);
    x.dcap = ni * kret + 1;
    for (x.dslots = 16; x.dslots < 2 * x.dcap; x.dslots *= 2)
        ;
    x.dkey = calloc(x.dslots, sizeof *x.dkey);
    x.dat = malloc(x.dslots * sizeof *x.dat);
    x.dk = malloc(x.dcap * d * 4);
    x.dv = malloc(x.dcap * d * 4);
    x.stage = malloc((kret + 1) * cv->rb);
    x.spos = malloc((kret + 1) * sizeof *x.spos);
    x.nsl = calloc(ni + 1, sizeof *x.nsl);
    uint32_t *item_head = malloc(ni * sizeof *item_head);
    kvg_query *qs = malloc(QH * sizeof *qs);
    const float **mus = malloc(QH * sizeof *mus);     /* each query head's centering (its kv head's mu_k) */
    if (nblk)
        bcs = kl_block_angles(cv, b0 + nblk);
    if (!x.idx || !x.got || !x.qsc || !x.bb || (nblk && !bcs) || !x.shortlist ||
        !x.have || !x.nhave || !x.ret_pos ||
        !x.ret_rec || !x.ret_n || !x.hot_k || !x.hot_v || !x.sink_k || !x.sink_v || !x.rk || !x.rv || !x.qi ||
        !x.oi || !x.pr || !x.sort_tmp || !x.cs_rank || !x.dkey || !x.dat || !x.dk || !x.dv || !x.stage ||
        !x.spos || !x.nsl || !item_head || !qs || !mus) {
        rc = kl_fail(cv, -ENOMEM, "out of memory for an attend of %u queries over %llu cold tokens", n_q,
                     (unsigned long long)cold);
        goto out;
    }

    kvg_rope_angles(x.cs_score, (int)d, rot, cv->rope.inv_freq, (double)cv->o.score_distance);
    for (size_t r = 0; remap && r < kret; r++)
        kvg_rope_angles(x.cs_rank + r * d, (int)d, rot, cv->rope.inv_freq,
                        (double)hot_lo - (double)kret + (double)r);

    /* exact parts: sinks per mode; the hot window (at true positions) is
     * gathered on the host only for the CPU path: the GPU reads its mirror */
    for (size_t h = 0; h < H; h++) {
        for (uint64_t s = 0; s < ns; s++) {
            size_t src = (h * cv->o.sinks + s) * d, dst = (h * ns + s) * d;
            memcpy(x.sink_k + dst, y->sink_k + src, d * 4);
            memcpy(x.sink_v + dst, y->sink_v + src, d * 4);
            double p = remap ? (double)hot_lo - (double)kret - (double)ns + (double)s : (double)s;
            kvg_rope_apply(x.sink_k + dst, (int)d, rot, lay, cv->rope.inv_freq, p);
        }
    }

#ifdef KVARC_HAVE_CUDA
    if (cv->gpu && kl_gpu_ring_sync(cv, layer))
        kl_gpu_free(cv);                  /* the host ring is whole: the CPU path serves */
#endif
    int hot_gathered = 0;                 /* by the first query the CPU attends */
    for (uint32_t g0 = 0; g0 < n_q && !rc; g0 += (uint32_t)qb) {
        uint32_t gn = n_q - g0 < qb ? n_q - g0 : (uint32_t)qb;
        size_t n_items = (size_t)gn * H;
        if (x.dn) {                   /* the decoded map holds one group's records */
            memset(x.dkey, 0, x.dslots * sizeof *x.dkey);
            x.dn = 0;
        }
        /* stage 1 */
        int64_t t1 = kl_now_ns();
        for (uint32_t i = 0; i < gn && kret && !rc; i++) {
            /* every query head of query i: turned and prepared (their block
             * biases, true mode, are made by stage 1's threads) */
            for (size_t h = 0; h < H && !rc; h++) {
                size_t it = (size_t)i * H + h;
                item_head[it] = (uint32_t)h;
                kvg_codec codec = kl_codec(cv, layer, (uint32_t)h);
                for (size_t g = 0; g < G; g++) {
                    float *qv = x.qsc + (it * G + g) * d;
                    memcpy(qv, q + ((h * G + g) * n_q + g0 + i) * d, d * 4);
                    /* remapped: the query turned by the scoring distance against
                     * kind-1 signatures; true: turned to its own position against
                     * kind-2 ones, the centering's bias per block */
                    if (remap)
                        kvg_rope_turn(qv, (int)d, rot, lay, x.cs_score);
                    else
                        kvg_rope_apply(qv, (int)d, rot, lay, cv->rope.inv_freq, (double)(cs + g0 + i));
                    if ((rc = kvg_query_prep_ref(&cv->rot, remap ? codec.mu_k : NULL, KVARC_DTYPE_F32, qv,
                                                 &qs[h * G + g]))) {
                        kl_fail(cv, rc, "query %u head %zu: %s", g0 + i, h * G + g, kvarc_strerror(rc));
                        break;
                    }
                    mus[h * G + g] = codec.mu_k;
                }
            }
            /* every head's shortlist, the heads over threads (stage1.c); a prefill chunk's queries but
             * its last may take a coarse tier and a shortlist of their own */
            int pre = n_q > 1 && g0 + i != n_q - 1;
            uint32_t cb = pre && cv->o.prefill_coarse_blocks ? cv->o.prefill_coarse_blocks : cv->o.coarse_blocks;
            size_t take = R_n;
            if (pre && cv->o.prefill_shortlist && (size_t)cv->o.prefill_shortlist * cv->o.top_k < take)
                take = (size_t)cv->o.prefill_shortlist * cv->o.top_k;
            kl_s1_args a = { H, G, R_n, nblk, ns, hot_lo, qs, remap ? NULL : x.bb, x.idx,
                             x.qsc + (size_t)i * H * G * d, mus, remap ? NULL : bcs + b0, cv->bcs_n, b0, cb, take };
            if (!rc)
                rc = kl_stage1(cv, layer, &a, &cv->lanes, x.got);
            for (size_t h = 0; h < H && !rc; h++) {
                size_t it = (size_t)i * H + h;
                x.nsl[it] = (uint32_t)x.got[h];
                uint64_t *sl = x.shortlist + it * R_n, *hv = x.have + it * R_n;
                const uint32_t *idx = x.idx + h * R_n;
                size_t nhv = 0;
                for (long j = 0; j < x.got[h]; j++) {
                    sl[j] = ns + idx[j];
                    if (kl_cache_has(&cv->cache, kl_cache_key(layer, (uint32_t)h, sl[j])))
                        hv[nhv++] = sl[j];
                }
                kvg_sort_u64(hv, nhv, x.sort_tmp);
                x.nhave[it] = nhv;
            }
        }
        int64_t t2 = kl_now_ns();
        cv->st.ns_stage1 += (uint64_t)(t2 - t1);
        /* stage 2 */
        if (!rc && kret)
            rc = stage2(cv, layer, &x, item_head, n_items, G, R_n, kret);
        int64_t t3 = kl_now_ns();
        cv->st.ns_stage2 += (uint64_t)(t3 - t2);
        /* attention per query */
        for (uint32_t i = 0; i < gn && !rc; i++) {
            uint64_t pq = cs + g0 + i;
            int64_t t4 = kl_now_ns();
            size_t kn = kret ? x.ret_n[(size_t)i * H] : 0;
            if (g0 + i == n_q - 1) {          /* the last query: kept for kvarc_last_retrieved */
                cv->last_n = (uint32_t)kn;
                for (size_t h = 0; h < H; h++)
                    memcpy(cv->last_ret + h * cv->o.top_k, x.ret_pos + ((size_t)i * H + h) * kret, kn * 8);
            }
            for (size_t h = 0; h < H && kret; h++) {
                size_t it = (size_t)i * H + h;
                if (x.ret_n[it] != kn) {
                    rc = kl_fail(cv, -EIO, "kv heads got different numbers of records (%u, %zu)", x.ret_n[it], kn);
                    break;
                }
                for (size_t j = 0; j < kn; j++) {
                    x.pr[j].pos = x.ret_pos[it * kret + j];
                    x.pr[j].j = (uint32_t)j;
                }
                sort_by_pos(x.pr, kn);
                kvg_codec codec = kl_codec(cv, layer, (uint32_t)h);
                if ((rc = decode_new(&x, &codec, d, h, x.pr, kn, x.ret_rec + it * kret * cv->rb, cv->rb,
                                     remap ? NULL : cv))) {
                    kl_fail(cv, rc, "decoding records of layer %u: %s", layer, kvarc_strerror(rc));
                    break;
                }
                for (size_t r = 0; r < kn; r++) {
                    float *kk = x.rk + (h * kret + r) * d, *vv = x.rv + (h * kret + r) * d;
                    decoded(&x, d, h, x.pr[r].pos, kk, vv);
                    if (remap && kn == kret)
                        kvg_rope_turn(kk, (int)d, rot, lay, x.cs_rank + r * d);
                    else if (remap)
                        kvg_rope_apply(kk, (int)d, rot, lay, cv->rope.inv_freq,
                                       (double)hot_lo - (double)kn + (double)r);
                }
            }
            int64_t t5 = kl_now_ns();
            cv->st.ns_decode += (uint64_t)(t5 - t4);
            if (rc)
                break;
            for (size_t hq = 0; hq < QH; hq++) {
                memcpy(x.qi + hq * d, q + (hq * n_q + g0 + i) * d, d * 4);
                kvg_rope_apply(x.qi + hq * d, (int)d, rot, lay, cv->rope.inv_freq, (double)pq);
            }
            kvg_attn_part parts[3] = {
                { x.sink_k, x.sink_v, (size_t)ns, (size_t)ns, NULL },
                { x.rk, x.rv, kret, kn, NULL },
                { x.hot_k, x.hot_v, (size_t)nh, (size_t)(pq - hot_lo + 1), NULL },
            };
            int on_gpu = 0;
#ifdef KVARC_HAVE_CUDA
            if (cv->gpu && kl_gpu_attend(cv, layer, x.qi, x.sink_k, x.sink_v, (size_t)ns, x.rk, x.rv, kret, kn,
                                         hot_lo, (size_t)(pq - hot_lo + 1), scale, x.oi))
                kl_gpu_free(cv);          /* the device failed: this query and the rest on the CPU */
            on_gpu = cv->gpu != NULL;
#endif
            if (!on_gpu && !hot_gathered) {
                gather_hot(cv, y, &x, hot_lo, nh);
                hot_gathered = 1;
            }
            if (!on_gpu && (rc = kvg_attend(x.qi, (int)QH, (int)H, (int)d, scale, parts, 3, x.oi))) {
                kl_fail(cv, rc, "attention on layer %u query %u: %s", layer, g0 + i, kvarc_strerror(rc));
                break;
            }
            for (size_t hq = 0; hq < QH; hq++)
                memcpy(out + (hq * n_q + g0 + i) * d, x.oi + hq * d, d * 4);
            cv->st.ns_attend += (uint64_t)(kl_now_ns() - t5);
        }
    }
    if (!rc) {
        cv->st.steps++;
        cv->st.queries += n_q;
    }
out:
    scratch_free(&x);
    free(item_head);
    free(qs);
    free(mus);
    return rc;
}
