/* util.c - libkvarc's small helpers that every other file uses: the clock,
 * the conversation's error message, gRPC status to return code, the codec
 * of a (layer, head), the slot of a (head, position) in an open-addressing
 * table. They call nothing else in the library, so the files
 * above them (conv.c, stage1.c, stage2.c, attend.c, the GPU backend,
 * device.c) depend on one another in one direction only. */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <time.h>

#include "kvarc_internal.h"

int64_t kl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int kl_fail(kvarc_conv *cv, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cv->err, sizeof cv->err, fmt, ap);
    va_end(ap);
    return rc;
}

kvg_codec kl_codec(const kvarc_conv *cv, uint32_t layer, uint32_t head)
{
    const float *mu = cv->means + ((size_t)layer * cv->m.n_kv_heads + head) * 2 * cv->m.head_dim;
    kvg_codec c = { cv->o.format, &cv->rot, mu, mu + cv->m.head_dim };
    return c;
}

size_t kl_slot_of(const uint64_t *keys, size_t n, size_t head, uint64_t pos)
{
    assert(n && !(n & (n - 1)) && pos < (1ull << 48));   /* a power-of-two table; the key holds pos */
    uint64_t key = ((uint64_t)head << 48 | pos) + 1, h = key;
    size_t i = (size_t)kvarc_splitmix64(&h) & (n - 1);
    while (keys[i] && keys[i] != key)
        i = (i + 1) & (n - 1);
    return i;
}
