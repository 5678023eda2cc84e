/* coarse.c - libkvarc's coarse tier: block summaries, and stage 1 through
 * them.
 *
 * Design notes
 * Every KVG_SIG_BLOCK (64) positions of a (layer, kv head) get
 * KVG_SUM_ITEMS summary signatures (kvg_summary_ref: the block mean's, and
 * the token most unlike the block), which only the writer can make: from
 * the exact keys in its ring, in the flush whose tokens complete the block
 * (kl_coarse_make), sent with that Append and kept (kl_coarse_keep);
 * an attaching worker loads them (LoadSummaries). y->sum_n blocks have an
 * entry, y->sum_ok says which have summaries (a block archived without
 * them is always scanned). A block is aligned with the kind-2 bias
 * blocks, so in true-position mode each summary item takes its block's
 * bias and scores like a token of it.
 * Stage 1 (kl_stage1_coarse) then scores the summaries of the cold range's
 * blocks (kvg_score_items, the GQA group combined as for tokens), ranks a
 * block by its best item, and scans the tokens of the o.coarse_blocks best
 * blocks and of the blocks without summaries (among them the last, partly
 * archived or hot) with kvg_score_runs, in position order; the shortlist
 * is their best r, ordered as kvg_topk_ref orders a full scan's (score
 * descending, position ascending). So the shortlist equals the full scan's
 * whenever the full scan's winners lie in the chosen blocks; bench-quality
 * and the passkey runs measure how often they do.
 * When the chosen blocks would hold fewer than r tokens or about as many
 * as the whole cold range, the full scan runs instead (-ENOTSUP), the
 * same for every head so that heads shortlist equally many.
 * The fast tier (o.fast_tier) stops before the scan: the runs go to
 * kvarcd in the RerankLayer call, which scans their stored signatures
 * (storaged/stage1b.c) the same way, and a full scan is one run of the
 * whole cold range. The client then keeps no per-token signatures but
 * those of each layer's unfinished block (conv.c, sig_base).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvarc_internal.h"

long kl_coarse_make(kvarc_conv *cv, uint32_t layer, uint64_t a, uint32_t n, const uint8_t *tok_bits,
                    const uint16_t *tok_sc, uint8_t **sbits, uint16_t **sscale)
{
    kl_layer *y = &cv->layers[layer];
    const uint64_t B = KVG_SIG_BLOCK, b0 = a / B, nsb = (a + n) / B - b0, len = y->len;
    *sbits = NULL;
    *sscale = NULL;
    if (!nsb)
        return 0;
    if (b0 * B + cv->ring < len)          /* the block's first tokens left the ring (right after an attach) */
        return -1;
    const size_t H = cv->m.n_kv_heads, d = cv->m.head_dim, sb = d / 8, S = KVG_SUM_ITEMS;
    uint8_t *ob = malloc(H * nsb * S * sb), *bb = malloc(B * sb);
    uint16_t *os = malloc(H * nsb * S * 2), *bs = malloc(B * 2);
    float *x = malloc(B * d * 4);
    int rc = ob && bb && os && bs && x ? 0 : kl_fail(cv, -ENOMEM, "out of memory for block summaries");
    for (size_t h = 0; !rc && h < H; h++) {
        kvg_codec codec = kl_codec(cv, layer, (uint32_t)h);
        for (uint64_t b = b0; !rc && b < b0 + nsb; b++) {
            kl_sig_keys(cv, y, h, codec.mu_k, b * B, B, x);   /* what the block's signatures sign */
            for (uint64_t t = 0; t < B; t++) {
                uint64_t p = b * B + t;
                if (p < a) {
                    kvg_plane_get(&y->sig[h], p - y->sig_base, 1, bb + t * sb, bs + t);
                } else {
                    memcpy(bb + t * sb, tok_bits + (h * n + (p - a)) * sb, sb);
                    bs[t] = tok_sc[h * n + (p - a)];
                }
            }
            size_t o = h * nsb + (b - b0);
            if ((rc = kvg_summary(&cv->rot, x, bb, bs, B, ob + o * S * sb, os + o * S)))
                kl_fail(cv, rc, "summarizing block %llu of layer %u head %zu: %s", (unsigned long long)b, layer, h,
                        kvarc_strerror(rc));
        }
    }
    free(bb);
    free(bs);
    free(x);
    if (rc) {
        free(ob);
        free(os);
        return rc;
    }
    *sbits = ob;
    *sscale = os;
    return (long)nsb;
}

int kl_coarse_keep(kvarc_conv *cv, kl_layer *y, uint64_t b0, uint64_t nsb, const uint8_t *sbits,
                   const uint16_t *sscale)
{
    const size_t H = cv->m.n_kv_heads, sb = cv->m.head_dim / 8, S = KVG_SUM_ITEMS;
    if (b0 + nsb <= y->sum_n)
        return 0;
    if (b0 > y->sum_n)                    /* never: summaries come in block order */
        return kl_fail(cv, -EIO, "block summaries %llu.. after %llu", (unsigned long long)b0,
                       (unsigned long long)y->sum_n);
    const uint64_t nb = b0 + nsb;
    if (nb > y->sum_cap) {
        uint64_t cap = y->sum_cap ? y->sum_cap : 64;
        while (cap < nb)
            cap *= 2;
        uint8_t *ok = realloc(y->sum_ok, cap);
        if (ok)
            y->sum_ok = ok;
        for (size_t h = 0; ok && h < H; h++) {
            uint8_t *b = realloc(y->sum_bits[h], cap * S * sb);
            if (b)
                y->sum_bits[h] = b;
            uint16_t *s = realloc(y->sum_scale[h], cap * S * 2);
            if (s)
                y->sum_scale[h] = s;
            if (!b || !s)
                ok = NULL;
        }
        if (!ok)
            return kl_fail(cv, -ENOMEM, "out of memory for %llu block summaries", (unsigned long long)cap);
        y->sum_cap = cap;
    }
    for (uint64_t b = y->sum_n; b < nb; b++) {
        y->sum_ok[b] = sbits != NULL;
        for (size_t h = 0; h < H; h++) {
            size_t o = h * nsb + (b - b0);
            if (sbits) {
                memcpy(y->sum_bits[h] + b * S * sb, sbits + o * S * sb, S * sb);
                memcpy(y->sum_scale[h] + b * S, sscale + o * S, S * 2);
            } else {                          /* scored but never chosen: defined bytes */
                memset(y->sum_bits[h] + b * S * sb, 0, S * sb);
                memset(y->sum_scale[h] + b * S, 0, S * 2);
            }
        }
    }
    y->sum_n = nb;
    return 0;
}

void kl_coarse_scratch_free(kl_coarse_scratch *x)
{
    free(x->ib); free(x->is); free(x->bs); free(x->bidx); free(x->tk); free(x->chosen); free(x->tmp);
    free(x->runs); free(x->rel); free(x->ts); free(x->tidx); free(x->tk2);
    memset(x, 0, sizeof *x);
}

/* Room for n_items summary items (of up to 64 queries), n_blocks blocks
 * (summarized or not) and n_tok scanned tokens. */
static int reserve(kl_coarse_scratch *x, size_t n_items, size_t n_blocks, size_t n_tok)
{
    size_t nbk = n_blocks + 1;
    if (n_items > x->n_items || nbk > x->n_blocks) {
        free(x->ib); free(x->is); free(x->bs); free(x->bidx); free(x->tk); free(x->chosen); free(x->tmp);
        x->ib = malloc(n_items * (size_t)64 * 4);          /* G <= 64 */
        x->is = malloc(n_items * 4);
        x->bs = malloc(nbk * 4);
        x->bidx = malloc(nbk * 4);
        x->tk = malloc(nbk * 4);
        x->chosen = malloc(nbk * 8);
        x->tmp = malloc(nbk * 8);
        x->runs = realloc(x->runs, nbk * 16);
        int ok = x->ib && x->is && x->bs && x->bidx && x->tk && x->chosen && x->tmp && x->runs;
        x->n_items = ok ? n_items : 0;
        x->n_blocks = ok ? nbk : 0;
        if (!ok)
            return -ENOMEM;
    }
    if (n_tok > x->n_tok) {
        free(x->rel); free(x->ts); free(x->tidx); free(x->tk2);
        x->rel = malloc(n_tok * 4);
        x->ts = malloc(n_tok * 4);
        x->tidx = malloc(n_tok * 4);
        x->tk2 = malloc(n_tok * 4);
        x->n_tok = x->rel && x->ts && x->tidx && x->tk2 ? n_tok : 0;
        if (!x->n_tok)
            return -ENOMEM;
    }
    return 0;
}

int kl_coarse_plan_of(const kl_layer *y, uint64_t ns, uint64_t hot_lo, size_t r, uint32_t blocks,
                      kl_coarse_plan *pl)
{
    const uint64_t M = blocks, B = KVG_SIG_BLOCK;
    if (!M || hot_lo <= ns || !r)
        return -ENOTSUP;
    const uint64_t fb = ns / B, lb = (hot_lo - 1) / B;          /* blocks the cold range spans */
    const uint64_t se = y->sum_n < lb + 1 ? y->sum_n : lb + 1;  /* summarized: [fb, se) */
    const uint64_t nsum = se > fb ? se - fb : 0, tail = lb + 1 - (se > fb ? se : fb);
    /* the chosen blocks hold at least M - 2 whole blocks (the first and
     * last may be clipped); worth it only well below the whole range */
    if (nsum <= 2 * M || (M < 2 ? 0 : M - 2) * B < r)
        return -ENOTSUP;
    uint64_t missing = 0;                                       /* blocks without summaries: always scanned */
    for (uint64_t b = fb; b < se; b++)
        missing += !y->sum_ok[b];
    if (2 * (M + missing + tail) >= nsum + tail)
        return -ENOTSUP;
    *pl = (kl_coarse_plan){ ns, hot_lo, fb, lb, se, nsum, blocks, (size_t)(M + missing + tail) * B };
    return 0;
}

int kl_coarse_reserve(kl_coarse_scratch *x, const kl_coarse_plan *pl)
{
    const uint64_t tail = pl->lb + 1 - pl->se;
    return reserve(x, (size_t)pl->nsum * KVG_SUM_ITEMS, (size_t)(pl->nsum + tail), pl->ntok_max);
}

long kl_coarse_runs(const kl_layer *y, const kl_coarse_plan *pl, size_t r, long nc, kl_coarse_scratch *x)
{
    const uint64_t B = KVG_SIG_BLOCK, fb = pl->fb, ns = pl->ns, hot_lo = pl->hot_lo;
    size_t n_ch = 0;
    for (uint64_t b = 0; b < pl->nsum; b++)                     /* no summary: always scanned */
        if (!y->sum_ok[fb + b])
            x->chosen[n_ch++] = fb + b;
    for (long j = 0; j < nc; j++)
        if (y->sum_ok[fb + x->bidx[j]])
            x->chosen[n_ch++] = fb + x->bidx[j];
    kvg_sort_u64(x->chosen, n_ch, x->tmp);
    for (uint64_t b = pl->se; b <= pl->lb; b++)
        x->chosen[n_ch++] = b;
    size_t nr = 0, nt = 0;
    for (size_t c = 0; c < n_ch; c++) {
        uint64_t lo = x->chosen[c] * B, hi = lo + B;
        lo = lo < ns ? ns : lo;
        hi = hi > hot_lo ? hot_lo : hi;
        if (nr && x->runs[2 * (nr - 1)] + x->runs[2 * (nr - 1) + 1] == lo - ns)
            x->runs[2 * (nr - 1) + 1] += hi - lo;              /* adjacent: one run */
        else {
            x->runs[2 * nr] = lo - ns;
            x->runs[2 * nr + 1] = hi - lo;
            nr++;
        }
        for (uint64_t p = lo; p < hi; p++)
            x->rel[nt++] = (uint32_t)(p - ns);
    }
    x->nt = nt;
    return nt < r ? -ENOTSUP : (long)nr;
}

long kl_stage1_coarse(const kvarc_conv *cv, const kl_layer *y, size_t h, const kvg_query *qs, int G, uint64_t ns,
                      uint64_t hot_lo, const float *bb, size_t nblk, size_t r, uint32_t blocks, int runs_only,
                      kl_coarse_scratch *x, uint32_t *idx_out)
{
    kl_coarse_plan pl;
    int rc = kl_coarse_plan_of(y, ns, hot_lo, r, blocks, &pl);
    if (rc)
        return rc;
    if (kl_coarse_reserve(x, &pl))
        return -ENOMEM;
    const size_t S = KVG_SUM_ITEMS, sb = cv->m.head_dim / 8, ni = (size_t)pl.nsum * S;
    const uint64_t fb = pl.fb;
    /* 1. the summaries, each item with its block's bias; a block's best */
    for (int g = 0; g < G; g++)
        for (uint64_t b = 0; b < pl.nsum; b++)
            for (size_t s = 0; s < S; s++)
                x->ib[(size_t)g * ni + b * S + s] = bb ? bb[(size_t)g * nblk + b] : qs[g].bias;
    rc = kvg_score_items((kvg_score_mode)cv->o.score_mode, (kvg_combine)cv->o.combine, qs, G,
                         y->sum_bits[h] + fb * S * sb, y->sum_scale[h] + fb * S, ni, x->ib, x->is);
    if (rc)
        return rc;
    kvg_block_best_ref(x->is, (size_t)pl.nsum, (int)S, y->sum_ok + fb, x->bs);
    long nc = kvg_topk(x->bs, (size_t)pl.nsum, blocks, x->bidx, NULL, x->tk);
    if (nc < 0)
        return nc;
    /* 2. their tokens, and those of the blocks not summarized, in position order */
    long nr = kl_coarse_runs(y, &pl, r, nc, x);
    if (nr < 0 || runs_only)               /* the fast tier: kvarcd scans them (stage 1b) */
        return nr;
    rc = kvg_plane_score_runs((kvg_score_mode)cv->o.score_mode, (kvg_combine)cv->o.combine, qs, G, &y->sig[h], ns,
                              x->runs, (size_t)nr, bb, nblk, x->ts);
    if (rc)
        return rc;
    long got = kvg_topk(x->ts, x->nt, r, x->tidx, NULL, x->tk2);
    if (got < 0)
        return got;
    for (long j = 0; j < got; j++)
        idx_out[j] = x->rel[x->tidx[j]];
    return got;
}
