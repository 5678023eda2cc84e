/* search.c - stage 1 over stored signature planes, in bounded memory.
 *
 * Design notes
 * A layer of any length is scanned in chunks of KVD_SEARCH_CHUNK tokens:
 * read the chunk's signatures (verified), score them, select the chunk's
 * best k, and merge those with the best k so far. Memory is one chunk's
 * planes and scores plus 4k candidates, whatever the layer's length.
 * The result equals one top-k over the whole layer (kvg_topk_ref): a
 * token in the global best k is in its chunk's best k, and candidates are
 * kept in position order so ties still go to the lower position.
 * Kind-2 signatures (true positions) add a bias per 64-position block,
 * computed per chunk from the turned queries (kvd_qbias).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvd_internal.h"

/* Candidates (position, score) ordered by position, for the merge. */
typedef struct cand {
    uint64_t pos;
    float    score;
} cand;

static int by_pos(const void *a, const void *b)
{
    uint64_t x = ((const cand *)a)->pos, y = ((const cand *)b)->pos;
    return x < y ? -1 : x > y;
}

long kvd_search(kvd_reader *r, uint64_t conv, uint32_t layer, uint32_t head, uint32_t head_dim, uint64_t len,
                int mode, int combine, const kvg_query *qs, int n_q, const kvd_qbias *qb, size_t k,
                uint64_t *pos_out, float *score_out, kvd_err *err)
{
    if (k < 1 || k > KVD_SEARCH_K_MAX)
        return kvd_fail(err, -EINVAL, "search k %zu out of range 1..%d", k, KVD_SEARCH_K_MAX);
    size_t chunk = KVD_SEARCH_CHUNK, kept = 0;
    uint8_t *bits = malloc(chunk * head_dim / 8);
    uint16_t *sc = malloc(chunk * 2);
    float *scores = malloc(chunk * 4), *cscore = malloc(2 * k * 4);
    uint32_t *idx = malloc((chunk > 2 * k ? chunk : 2 * k) * 4);
    cand *best = malloc(k * sizeof *best), *merged = malloc(2 * k * sizeof *merged);
    const size_t nblk = chunk / KVG_SIG_BLOCK, per = qb ? 2 * (size_t)qb->rope->n_slow : 0;
    float *bb = qb ? malloc((size_t)n_q * nblk * 4) : NULL;
    double *cs = qb ? malloc(nblk * per * sizeof *cs + 1) : NULL;
    long rc = 0;
    if (!bits || !sc || !scores || !cscore || !idx || !best || !merged || (qb && (!bb || !cs))) {
        rc = kvd_fail(err, -ENOMEM, "out of memory for a search chunk");
        goto out;
    }
    for (uint64_t first = 0; first < len; first += chunk) {
        size_t n = len - first < chunk ? (size_t)(len - first) : chunk;
        if ((rc = kvd_read_sigs(r, conv, layer, head, first, n, bits, sc, err)))
            goto out;
        size_t nb = (n + KVG_SIG_BLOCK - 1) / KVG_SIG_BLOCK;     /* first is a multiple of the block */
        if (qb)
            kvg_block_angles_pm(qb->rope, first / KVG_SIG_BLOCK, nb, cs, nblk);
        for (int h = 0; qb && h < n_q; h++)
            if ((rc = kvg_block_bias(qb->rope, qb->mu_k, qb->q_r + (size_t)h * head_dim, first / KVG_SIG_BLOCK,
                                         nb, cs, nblk, bb + (size_t)h * nblk))) {
                rc = kvd_fail(err, (int)rc, "query %d: its bias against the centering overflows fp32", h);
                goto out;
            }
        if ((rc = kvg_score_pos((kvg_score_mode)mode, (kvg_combine)combine, qs, n_q, bits, sc, n, first, bb,
                                    nblk, scores))) {
            rc = kvd_fail(err, (int)rc, "scoring failed: %s", kvarc_strerror((int)rc));
            goto out;
        }
        long got = kvg_topk(scores, n, k, idx, NULL, NULL);
        if (got < 0) {
            rc = kvd_fail(err, (int)got, "top-k failed: %s", kvarc_strerror((int)got));
            goto out;
        }
        /* kept (all before this chunk) then the chunk's winners, each in position order */
        memcpy(merged, best, kept * sizeof *merged);
        for (long i = 0; i < got; i++) {
            merged[kept + (size_t)i].pos = first + idx[i];
            merged[kept + (size_t)i].score = scores[idx[i]];
        }
        qsort(merged + kept, (size_t)got, sizeof *merged, by_pos);
        size_t m = kept + (size_t)got;
        for (size_t i = 0; i < m; i++)
            cscore[i] = merged[i].score;
        long sel = kvg_topk(cscore, m, k, idx, NULL, NULL);
        if (sel < 0) {
            rc = kvd_fail(err, (int)sel, "top-k failed: %s", kvarc_strerror((int)sel));
            goto out;
        }
        for (long i = 0; i < sel; i++)        /* best first, as the answer wants */
            best[i] = merged[idx[i]];
        kept = (size_t)sel;
        if (first + n < len)                  /* another chunk: keep position order for the merge */
            qsort(best, kept, sizeof *best, by_pos);
    }
    for (size_t i = 0; i < kept; i++) {
        pos_out[i] = best[i].pos;
        if (score_out)
            score_out[i] = best[i].score;
    }
    rc = (long)kept;
out:
    free(bits);
    free(sc);
    free(scores);
    free(cscore);
    free(idx);
    free(best);
    free(merged);
    free(bb);
    free(cs);
    return rc;
}
