/* topk_ref.c - CPU reference of top-k selection, linear in n.
 *
 * Scores map to order-preserving uint32 keys (kvg_score_key). A byte-wise
 * radix select (most significant byte first) finds the key of the k-th
 * winner: one histogram pass over all n, then passes over the shrinking
 * list of candidates that share the threshold prefix. Keys above the
 * threshold win outright; among keys equal to the threshold the lowest
 * indices win (the candidate list keeps index order). The k winners are
 * then sorted by (key desc, index asc), packed into one uint64 each and
 * radix-sorted. Cost: 2n + O(candidates) + O(k). */
#include <assert.h>
#include "kvg.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* A winner packed so that ascending order is (key descending, index
 * ascending): the order the result is in. */
static inline uint64_t win_pack(uint32_t key, uint32_t idx)
{
    return (uint64_t)~key << 32 | idx;
}

/* v[0..n) by insertion (a run of at most SORT_RUN). */
static void sort_insert(uint64_t *v, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        uint64_t t = v[i];
        size_t j = i;
        for (; j > 0 && v[j - 1] > t; j--)
            v[j] = v[j - 1];
        v[j] = t;
    }
}

#define SORT_RUN 16       /* insertion-sorted runs the merge starts from */
#define SORT_MERGE_MAX 512    /* up to this many values the merge sort beats the radix passes (measured) */

/* Bottom-up merge sort of v[n] through tmp[n]. */
static void sort_merge(uint64_t *v, size_t n, uint64_t *tmp)
{
    for (size_t i = 0; i < n; i += SORT_RUN)
        sort_insert(v + i, n - i < SORT_RUN ? n - i : SORT_RUN);
    uint64_t *src = v, *dst = tmp;
    for (size_t w = SORT_RUN; w < n; w *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * w) {
            size_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            size_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi)
                dst[o++] = src[b] < src[a] ? src[b++] : src[a++];
            while (a < mid)
                dst[o++] = src[a++];
            while (b < hi)
                dst[o++] = src[b++];
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != v)
        memcpy(v, src, n * sizeof *v);
}

void kvg_sort_u64(uint64_t *v, size_t n, uint64_t *tmp)
{
    if (n <= SORT_RUN) {
        sort_insert(v, n);
        return;
    }
    if (n <= SORT_MERGE_MAX) {            /* a radix pass costs its 256 buckets whatever n */
        sort_merge(v, n, tmp);
        return;
    }
    uint64_t *src = v, *dst = tmp;
    for (int shift = 0; shift < 64; shift += 8) {
        size_t count[256] = { 0 };
        for (size_t i = 0; i < n; i++)
            count[(src[i] >> shift) & 0xff]++;
        if (count[(src[0] >> shift) & 0xff] == n)
            continue;                    /* every value has this byte */
        size_t at = 0;
        for (int b = 0; b < 256; b++) {
            size_t c = count[b];
            count[b] = at;
            at += c;
        }
        for (size_t i = 0; i < n; i++)
            dst[count[(src[i] >> shift) & 0xff]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != v)
        memcpy(v, src, n * sizeof *v);
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
    uint64_t *win = malloc(2 * k * sizeof *win);     /* [k] winners, [k] sort space */
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
            if (byte > b) {
                assert(nwin < k);             /* winners never outnumber k: hist said so */
                win[nwin++] = win_pack(key, j);
            }
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
    assert(need <= ncand && nwin + need == k);
    for (size_t c = 0; c < need; c++)
        win[nwin++] = win_pack(kvg_score_key(scores[scratch[c]]), scratch[c]);

    kvg_sort_u64(win, nwin, win + k);
    for (size_t i = 0; i < nwin; i++) {
        idx_out[i] = (uint32_t)win[i];
        if (val_out)
            val_out[i] = scores[idx_out[i]];
    }
    free(win);
    free(own);
    return (long)nwin;
}
