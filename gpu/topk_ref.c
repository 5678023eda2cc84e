/* topk_ref.c - CPU reference of top-k selection, linear in n.
 *
 * Scores map to order-preserving uint32 keys (kvg_score_key). A byte-wise
 * radix select (most significant byte first) finds the key of the k-th
 * winner: one histogram pass over all n, then passes over the shrinking
 * list of candidates that share the threshold prefix. Keys above the
 * threshold win outright; among keys equal to the threshold the lowest
 * indices win (the candidate list keeps index order). The k winners are
 * then sorted by (key desc, index asc). Cost: 2n + O(candidates) + k log k. */
#include "kvg.h"

#include <errno.h>
#include <stdlib.h>

typedef struct {
    uint32_t key, idx;
} kv_pair;

static int pair_cmp(const void *a, const void *b)
{
    const kv_pair *x = a, *y = b;
    if (x->key != y->key)
        return x->key > y->key ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

long kvg_topk_ref(const float *scores, size_t n, size_t k, uint32_t *idx_out,
                  float *val_out, uint32_t *scratch)
{
    if (k > n)
        k = n;
    if (k == 0)
        return 0;
    if (!scores || !idx_out || n > UINT32_MAX)
        return -EINVAL;
    uint32_t *own = NULL;
    kv_pair *win = malloc(k * sizeof *win);
    if (!scratch)
        scratch = own = malloc(n * sizeof *scratch);
    if (!win || !scratch) {
        free(win);
        free(own);
        return -ENOMEM;
    }

    size_t nwin = 0, need = k, ncand = 0;
    uint32_t prefix = 0;                 /* threshold key bits fixed so far */
    for (int shift = 24; shift >= 0; shift -= 8) {
        uint32_t hist[256] = { 0 };
        uint32_t hi_mask = shift == 24 ? 0 : ~0u << (shift + 8);
        if (shift == 24)
            for (size_t j = 0; j < n; j++)
                hist[kvg_score_key(scores[j]) >> 24]++;
        else
            for (size_t c = 0; c < ncand; c++)
                hist[(kvg_score_key(scores[scratch[c]]) >> shift) & 0xff]++;
        unsigned b = 256;
        while (b-- > 0) {
            if (hist[b] >= need)
                break;
            need -= hist[b];
        }
        /* keys with this prefix and byte > b win; byte == b stay candidates */
        size_t kept = 0;
        size_t count = shift == 24 ? n : ncand;
        for (size_t c = 0; c < count; c++) {
            uint32_t j = shift == 24 ? (uint32_t)c : scratch[c];
            uint32_t key = kvg_score_key(scores[j]);
            if ((key & hi_mask) != prefix)
                continue;
            unsigned byte = (key >> shift) & 0xff;
            if (byte > b)
                win[nwin++] = (kv_pair){ key, j };
            else if (byte == b)
                scratch[kept++] = j;
        }
        ncand = kept;
        prefix |= (uint32_t)b << shift;
        if (need == ncand)
            break;
    }
    /* every remaining candidate has key == prefix (or the list is exactly
     * the number still needed); the lowest indices come first */
    for (size_t c = 0; c < need; c++)
        win[nwin++] = (kv_pair){ kvg_score_key(scores[scratch[c]]), scratch[c] };

    qsort(win, nwin, sizeof *win, pair_cmp);
    for (size_t i = 0; i < nwin; i++) {
        idx_out[i] = win[i].idx;
        if (val_out)
            val_out[i] = scores[win[i].idx];
    }
    free(win);
    free(own);
    return (long)nwin;
}
