/* stage2.c - libkvarc's stage 2 for one query group: one RerankLayer call,
 * then every item's records resolved.
 *
 * Design notes
 * The request carries, per item (query, kv head), the GQA group's scoring
 * queries, stage 1's shortlist, top_k, and `have`: the shortlisted
 * positions the record cache holds, so kvarcd sends only the records the
 * client lacks, and a record once per head and call (an item whose
 * record an earlier item of the same head already received gets it
 * unsent). The reply's records are resolved in three passes, so that a
 * record cache smaller than one reply still serves it: 1. the records
 * the client said it has, from the cache, before any record of this
 * reply enters it (and could evict them); 2. the records sent, into
 * place and into the cache; 3. those sent once for an earlier item of
 * the same head, from where pass 2 put them (the `landed` table). The
 * group is sized (attend.c) so that its records and `have` fit in half
 * the cache. Everything kvarcd answers is checked against what was asked
 * (counts, top_k, record size, records present) and is -EIO otherwise.
 * The request and the landed table live in the conversation's work space
 * (kl_ax).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvarc_internal.h"

static int u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Pass `pass` (1..3, above) over item i's result; 0 or an error. */
static int resolve(kvarc_conv *cv, const kl_step *s, kl_ax *x, size_t nland, size_t i,
                   const Kvarc__V1__RerankResult *res, int pass)
{
    const uint32_t head = x->item_head[i];
    const uint64_t *hv = x->have + i * s->R_n;
    size_t off = 0;
    for (size_t j = 0; j < res->n_positions; j++) {
        uint64_t p = res->positions[j], key = kl_cache_key(s->layer, head, p);
        uint64_t lk = ((uint64_t)head << 48 | p) + 1;
        uint8_t *dst = x->ret_rec + (i * s->kret + j) * cv->rb;
        if (res->sent[j]) {
            if (off + cv->rb > res->records.len)
                return kl_fail(cv, -EIO, "RerankLayer result %zu is short of records", i);
            if (pass == 2) {
                memcpy(dst, res->records.data + off, cv->rb);
                kl_cache_put(&cv->cache, key, dst);
                cv->st.records_fetched++;
                size_t slot = kl_slot_of(x->lkey, nland, head, p);
                x->lkey[slot] = lk;
                x->lrec[slot] = dst;
            }
            off += cv->rb;
            continue;
        }
        if (pass == 2)
            continue;
        int had = bsearch(&p, hv, x->nhave[i], 8, u64_cmp) != NULL;
        if (pass == 1 && had) {
            const uint8_t *c = kl_cache_get(&cv->cache, key);
            if (!c)
                return kl_fail(cv, -EIO, "record of layer %u head %u position %llu left the cache between stage 1 "
                               "and stage 2", s->layer, head, (unsigned long long)p);
            memcpy(dst, c, cv->rb);
            cv->st.cache_hits++;
        } else if (pass == 3 && !had) {
            size_t slot = kl_slot_of(x->lkey, nland, head, p);
            if (x->lkey[slot] != lk)
                return kl_fail(cv, -EIO, "record of layer %u head %u position %llu was neither sent nor held",
                               s->layer, head, (unsigned long long)p);
            memcpy(dst, x->lrec[slot], cv->rb);
            cv->st.cache_hits++;
        }
    }
    return 0;
}

int kl_stage2(kvarc_conv *cv, const kl_step *s, kl_ax *x, size_t n)
{
    const size_t d = s->d, G = s->G, kret = s->kret;
    size_t sent_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        Kvarc__V1__RerankItem *it = &x->items[i];
        kvarc__v1__rerank_item__init(it);
        it->head = x->item_head[i];
        it->n_queries = (uint32_t)G;
        it->n_query = G * d;
        it->query = x->qsc + i * G * d;
        it->top_k = (uint32_t)kret;
        if (cv->o.fast_tier) {          /* stage 1b in kvarcd over the runs stage 1 picked */
            it->n_runs = x->rn[i];
            it->runs = x->iruns + x->roff[i];
            it->shortlist_len = x->nsl[i];
            it->n_run_bias = x->bn[i];
            it->run_bias = x->bn[i] ? x->ibias + x->boff[i] : NULL;
        } else {
            it->n_shortlist = x->nsl[i];
            it->shortlist = x->shortlist + i * s->R_n;
            it->n_have = x->nhave[i];
            it->have = x->have + i * s->R_n;
        }
        x->ip[i] = it;
        sent_bytes += G * d * 4 + (it->n_shortlist + it->n_have + it->n_runs) * 8 + it->n_run_bias * 4 + 16;
    }
    Kvarc__V1__RerankLayerRequest r = KVARC__V1__RERANK_LAYER_REQUEST__INIT;
    r.conv = cv->id;
    r.layer = s->layer;
    r.n_items = n;
    r.items = x->ip;
    r.stage1_mode = (uint32_t)cv->o.score_mode;
    r.stage1_combine = (uint32_t)cv->o.combine;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(cv->cl->conn, "RerankLayer", &r.base, &kvarc__v1__rerank_layer_reply__descriptor, &rep, 0,
                      cv->err, sizeof cv->err);
    cv->st.bytes_sent += sent_bytes;
    if (st)
        return kw_rc_of(st);
    Kvarc__V1__RerankLayerReply *rl = (Kvarc__V1__RerankLayerReply *)rep;
    int rc = rl->n_results == n && rl->record_bytes == cv->rb ? 0 :
             kl_fail(cv, -EIO, "RerankLayer answered %zu results of %u-byte records for %zu items", rl->n_results,
                     rl->record_bytes, n);
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
        nland *= 2;                     /* <= lcap: total <= n x kret */
    if (!rc)
        memset(x->lkey, 0, nland * sizeof *x->lkey);
    for (int pass = 1; !rc && pass <= 3; pass++)
        for (size_t i = 0; !rc && i < n; i++)
            rc = resolve(cv, s, x, nland, i, rl->results[i], pass);
    protobuf_c_message_free_unpacked(rep, NULL);
    return rc;
}
