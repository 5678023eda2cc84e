/* stage1b.c - stage 1b in kvarcd: a RerankLayer item's shortlist from the
 * stored signatures of the runs of positions its client chose.
 *
 * Design notes
 * A client in fast-tier mode (kvarc_options.fast_tier) holds only the
 * coarse tier's block summaries: it scores them, picks the best blocks
 * (client/coarse.c) and sends them as runs of positions; here their
 * tokens' signatures are read (kvd_read_sig_runs: verified, a stored
 * extent's section once), scored run by run with kvg_score_pos (the
 * bits of kvg_score_pos_ref, as the client's plane scan gives them) and
 * the best n kept with kvg_topk, in kvg_topk_ref's order over the runs'
 * tokens in position order: the shortlist libkvarc's client-side coarse
 * scan makes from the same runs, bit for bit. The queries are prepared
 * as the client prepares them (kvg_query_prep_ref with the conversation's
 * rotation; remapped centered by mu_k, true uncentered with the block
 * biases the client sends, run_bias). Work space is per call (a few
 * hundred KB at 256 blocks).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvd_internal.h"
#include "kvg.h"

int kvd_stage1b(kvd_reader *r, uint64_t conv, uint32_t layer, int head_dim, const kvarc_rotation *rot,
                const float *mu_k, int remap, kvd_rerank_item *x, kvd_err *err)
{
    const size_t sb = (size_t)head_dim / 8;
    size_t nt = 0, nbt = 0;
    for (size_t q = 0; q < x->n_runs; q++) {
        uint64_t first = x->runs[2 * q], cnt = x->runs[2 * q + 1];
        if (cnt == 0 || first + cnt < first || (q && first < x->runs[2 * q - 2] + x->runs[2 * q - 1]))
            return kvd_fail(err, -EINVAL, "run %zu [%llu, +%llu): runs must be non-empty, ascending and "
                            "disjoint", q, (unsigned long long)first, (unsigned long long)cnt);
        nt += (size_t)cnt;
        nbt += (size_t)kvg_blocks_of(first, cnt);
    }
    if (nt > ((size_t)1 << 31))        /* the memory below is sized by it: a layer's runs are never this long */
        return kvd_fail(err, -E2BIG, "stage 1b over %zu tokens (runs past any layer's end)", nt);
    if (!remap != !!x->run_bias)
        return kvd_fail(err, -EINVAL, "stage 1b takes the runs' block biases in the true-position mode, and only "
                        "there");
    if (!x->sl_buf)
        return kvd_fail(err, -EINVAL, "stage 1b needs room for the shortlist");
    kvg_query qs[64];
    for (int g = 0; g < x->n_q; g++) {
        int rc = kvg_query_prep_ref(rot, remap ? mu_k : NULL, KVARC_DTYPE_F32, x->q + (size_t)g * head_dim, &qs[g]);
        if (rc)
            return kvd_fail(err, rc, "query %d: %s", g, kvarc_strerror(rc));
    }
    uint8_t *bits = malloc(nt * sb + 1);
    uint16_t *sc = malloc(nt * 2 + 1);
    float *scores = malloc(nt * 4 + 4);
    uint32_t *idx = malloc(nt * 4 + 4), *tk = malloc(nt * 4 + 4);
    int rc = bits && sc && scores && idx && tk ? 0 : kvd_fail(err, -ENOMEM, "out of memory for stage 1b over %zu "
                                                             "tokens", nt);
    if (!rc)
        rc = kvd_read_sig_runs(r, conv, layer, x->head, x->runs, x->n_runs, bits, sc, err);
    size_t off = 0, boff = 0;
    for (size_t q = 0; !rc && q < x->n_runs; q++) {
        uint64_t first = x->runs[2 * q], cnt = x->runs[2 * q + 1];
        rc = kvg_score_pos((kvg_score_mode)x->s1_mode, (kvg_combine)x->s1_combine, qs, x->n_q, bits + off * sb,
                           sc + off, (size_t)cnt, first, remap ? NULL : x->run_bias + boff, nbt, scores + off);
        if (rc)
            kvd_fail(err, rc, "stage 1b scoring: %s", kvarc_strerror(rc));
        off += (size_t)cnt;
        boff += (size_t)kvg_blocks_of(first, cnt);
    }
    long got = 0;
    if (!rc && (got = kvg_topk(scores, nt, x->n < nt ? x->n : nt, idx, NULL, tk)) < 0)
        rc = kvd_fail(err, (int)got, "stage 1b top-k: %s", kvarc_strerror((int)got));
    if (!rc) {
        /* indices into the runs' tokens -> positions: the run holding each
         * (cumulative token counts, a binary search) */
        uint64_t *cum = malloc((x->n_runs + 1) * 8);
        if (!cum)
            rc = kvd_fail(err, -ENOMEM, "out of memory");
        for (size_t q = 0; !rc && q <= x->n_runs; q++)
            cum[q] = q ? cum[q - 1] + x->runs[2 * q - 1] : 0;
        for (long j = 0; !rc && j < got; j++) {
            uint64_t t = idx[j];
            size_t lo = 0, hi = x->n_runs;       /* cum[lo] <= t < cum[hi] */
            while (hi - lo > 1) {
                size_t mid = (lo + hi) / 2;
                if (cum[mid] <= t)
                    lo = mid;
                else
                    hi = mid;
            }
            x->sl_buf[j] = x->runs[2 * lo] + (t - cum[lo]);
        }
        free(cum);
    }
    if (!rc) {
        x->shortlist = x->sl_buf;
        x->n = (size_t)got;
    }
    free(bits);
    free(sc);
    free(scores);
    free(idx);
    free(tk);
    return rc;
}
