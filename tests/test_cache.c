/* test_cache: libkvarc's LRU record cache against a plain reference model
 * (an array kept in recency order), through 200000 random gets and puts
 * over a key space 4x the capacity: every get returns the latest record
 * put for its key exactly when the model holds it; evictions take the
 * least recently used; tombstone rebuilds keep it consistent. */
#include <string.h>

#include "kvarc_internal.h"
#include "testutil.h"

#define CAP 64
#define RB 8

int main(void)
{
    kl_cache c;
    CHECK_RC(kl_cache_init(&c, CAP, RB), 0);
    uint64_t model[CAP];         /* model[0] most recent */
    uint8_t val[4 * CAP][RB];
    int nmodel = 0, bad = 0;
    tu_rng rng = { 3 };
    for (int step = 0; step < 200000 && !bad; step++) {
        uint64_t key = kl_cache_key(1, 2, (uint64_t)(tu_uniform(&rng) * 4 * CAP));
        uint64_t slot = key & 0xffff;
        int at = -1;
        for (int i = 0; i < nmodel; i++)
            if (model[i] == key)
                at = i;
        if (tu_uniform(&rng) < 0.5) {                       /* get */
            const uint8_t *r = kl_cache_get(&c, key);
            if ((r != NULL) != (at >= 0) || (r && memcmp(r, val[slot], RB))) {
                bad = 1;
                CHECK(0, "step %d: get of key %llu: cache %s, model %s", step, (unsigned long long)slot,
                      r ? "has it" : "lacks it", at >= 0 ? "has it" : "lacks it");
            }
            if (at >= 0) {
                memmove(model + 1, model, sizeof *model * (size_t)at);
                model[0] = key;
            }
            CHECK(kl_cache_has(&c, key) == (at >= 0), "has agrees with get");
        } else {                                       /* put */
            for (int b = 0; b < RB; b++)
                val[slot][b] = (uint8_t)(tu_uniform(&rng) * 256);
            kl_cache_put(&c, key, val[slot]);
            if (at < 0) {
                at = nmodel < CAP ? nmodel++ : CAP - 1;   /* the least recent falls out */
            }
            memmove(model + 1, model, sizeof *model * (size_t)at);
            model[0] = key;
        }
    }
    CHECK(c.n == CAP, "the cache filled to its capacity");
    kl_cache_free(&c);
    return tu_finish("test_cache");
}
