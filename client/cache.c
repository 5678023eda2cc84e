/* cache.c - libkvarc's LRU cache of fetched records.
 *
 * Design notes
 * Consecutive decode steps retrieve mostly the same tokens, so a record
 * fetched once is kept and named in the next RerankLayer's `have` list:
 * it does not cross the wire again. Invariants: 1. every slot in use is
 * in the table exactly once and on the recency list exactly once; 2. the
 * table is at least twice the capacity, so probes stay short; deleted
 * entries are tombstones until the slot is reused.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvarc_internal.h"

#define NONE UINT32_MAX

uint64_t kl_cache_key(uint32_t layer, uint32_t head, uint64_t pos)
{
    return (uint64_t)layer << 52 ^ (uint64_t)head << 40 ^ pos;
}

static size_t hash(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (size_t)k;
}

int kl_cache_init(kl_cache *c, size_t cap, size_t rb)
{
    memset(c, 0, sizeof *c);
    if (cap < 16)
        cap = 16;
    if (cap > KL_CACHE_MAX)
        return -EINVAL;
    size_t t = 16;
    while (t < 2 * cap)
        t *= 2;
    c->cap = cap;
    c->rb = rb;
    c->tab_mask = t - 1;
    c->head = c->tail = NONE;
    c->tab = calloc(t, sizeof *c->tab);
    c->key = malloc(cap * sizeof *c->key);
    c->prev = malloc(cap * sizeof *c->prev);
    c->next = malloc(cap * sizeof *c->next);
    c->rec = malloc(cap * rb);
    if (!c->tab || !c->key || !c->prev || !c->next || !c->rec) {
        kl_cache_free(c);
        return -ENOMEM;
    }
    return 0;
}

void kl_cache_free(kl_cache *c)
{
    free(c->tab);
    free(c->key);
    free(c->prev);
    free(c->next);
    free(c->rec);
    memset(c, 0, sizeof *c);
}

/* Table index holding key, or the first free one to put it (*found 0). */
static size_t probe(const kl_cache *c, uint64_t key, int *found)
{
    size_t i = hash(key) & c->tab_mask, tomb = SIZE_MAX;
    for (;;) {
        uint32_t s = c->tab[i];
        if (s == 0) {
            *found = 0;
            return tomb != SIZE_MAX ? tomb : i;
        }
        if (s == NONE) {
            if (tomb == SIZE_MAX)
                tomb = i;
        } else if (c->key[s - 1] == key) {
            *found = 1;
            return i;
        }
        i = (i + 1) & c->tab_mask;
    }
}

static void unlink_slot(kl_cache *c, uint32_t s)
{
    if (c->prev[s] != NONE)
        c->next[c->prev[s]] = c->next[s];
    else
        c->head = c->next[s];
    if (c->next[s] != NONE)
        c->prev[c->next[s]] = c->prev[s];
    else
        c->tail = c->prev[s];
}

static void push_front(kl_cache *c, uint32_t s)
{
    c->prev[s] = NONE;
    c->next[s] = c->head;
    if (c->head != NONE)
        c->prev[c->head] = s;
    c->head = s;
    if (c->tail == NONE)
        c->tail = s;
}

int kl_cache_has(const kl_cache *c, uint64_t key)
{
    int found;
    if (!c->cap)
        return 0;
    probe(c, key, &found);
    return found;
}

const uint8_t *kl_cache_get(kl_cache *c, uint64_t key)
{
    int found;
    if (!c->cap)
        return NULL;
    size_t i = probe(c, key, &found);
    if (!found)
        return NULL;
    uint32_t s = c->tab[i] - 1;
    assert(s < c->n && c->key[s] == key);
    unlink_slot(c, s);
    push_front(c, s);
    return c->rec + (size_t)s * c->rb;
}

/* Clear the table and put back every slot in use but `skip` (the one
 * being reused): tombstones gone, every probe ends at an empty entry. */
static void rebuild(kl_cache *c, uint32_t skip)
{
    memset(c->tab, 0, (c->tab_mask + 1) * sizeof *c->tab);
    c->tombs = 0;
    for (uint32_t s = 0; s < c->n; s++) {
        if (s == skip)
            continue;
        int found;
        c->tab[probe(c, c->key[s], &found)] = s + 1;
    }
}

void kl_cache_put(kl_cache *c, uint64_t key, const uint8_t *rec)
{
    int found;
    if (!c->cap)
        return;
    size_t i = probe(c, key, &found);
    uint32_t s;
    if (found) {
        s = c->tab[i] - 1;
        unlink_slot(c, s);
    } else {
        if (c->n < c->cap) {
            s = (uint32_t)c->n++;
        } else {                          /* evict the least recent */
            s = c->tail;
            assert(s != NONE && s < c->cap);
            unlink_slot(c, s);
            int f2;
            size_t j = probe(c, c->key[s], &f2);
            assert(f2 && c->tab[j] == s + 1);   /* invariant 1: a slot in use is in the table */
            c->tab[j] = NONE;
            if (++c->tombs > c->cap / 2)
                rebuild(c, s);
            i = probe(c, key, &found);    /* a tombstone may be the better place */
        }
        if (c->tab[i] == NONE)
            c->tombs--;
        c->tab[i] = s + 1;
        c->key[s] = key;
    }
    assert(c->n <= c->cap && c->tombs <= c->cap / 2 && c->tab_mask + 1 >= 2 * c->cap);   /* invariant 2 */
    memcpy(c->rec + (size_t)s * c->rb, rec, c->rb);
    push_front(c, s);
}
