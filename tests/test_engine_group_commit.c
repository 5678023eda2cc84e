/* test_engine_group_commit: a submitter may return the moment its item is
 * done, whatever woke it, and its item (in its stack frame) is gone then;
 * the batch's leader must not touch an item after marking it done.
 *
 * Found by bench-load (issue 18): kvarcd crashed in gc_submit_n within a
 * second of 4 clients' traffic. A rejected item (Create of a name taken,
 * a Snapshot racing it) was marked done mid-batch without the queue's
 * lock; its submitter, woken by an earlier broadcast, saw it, returned,
 * and reused the frame; the leader then followed the dead item's next.
 *
 * Here SUBMITTERS threads submit items that prepare() rejects (Create of a
 * name taken) between accepted ones (Create of a new name, appends), and
 * each scribbles over its dead frames right after every call; a waker
 * thread broadcasts the group commit's condition variable in a loop:
 * spurious wake-ups, which POSIX allows at any time, so every waiting
 * submitter looks at its item all the time. Without the fix the leader
 * walks into the scribbled frames and the test crashes (SIGSEGV) or a
 * call's answer is wrong; with it, every call answers right and every
 * record reads back. Count-bounded (ROUNDS per thread), no timing. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "engine_util.h"
#include "kvd_internal.h"

#define SUBMITTERS 12
#define ROUNDS     150

static kvd_engine *e;
static atomic_int stop_waker, failures;

/* Overwrite the stack below the caller: what a returned submitter's next
 * calls do to the frame its item lived in. */
static __attribute__((noinline)) void scribble(void)
{
    volatile unsigned char buf[32768];
    memset((void *)buf, 0xa5, sizeof buf);
    __asm__ volatile("" : : "r"(buf) : "memory");
}

static void *waker(void *p)
{
    (void)p;
    while (!atomic_load(&stop_waker)) {
        pthread_mutex_lock(&e->gc_mu);
        pthread_cond_broadcast(&e->gc_cv);
        pthread_mutex_unlock(&e->gc_mu);
        sched_yield();
    }
    return NULL;
}

static void *submitter(void *p)
{
    int t = (int)(intptr_t)p;
    kvd_shape s = eu_shape(1, 2, KVARC_FMT_Q3);
    kvd_err err;
    kvd_conv_info ci;
    char name[32];
    snprintf(name, sizeof name, "s%d", t);
    if (kvd_conv_create(e, "g", name, &s, NULL, &ci, &err)) {
        fprintf(stderr, "submitter %d: create: %s\n", t, err.msg);
        atomic_fetch_add(&failures, 1);
        return NULL;
    }
    scribble();
    uint64_t len = 0;
    for (int r = 0; r < ROUNDS; r++) {
        kvd_conv_info dup;
        int rc = kvd_conv_create(e, "g", "taken", &s, NULL, &dup, &err);   /* rejected in prepare */
        scribble();
        if (rc != -EEXIST) {
            fprintf(stderr, "submitter %d round %d: create of a taken name: %d (%s)\n", t, r, rc, err.msg);
            atomic_fetch_add(&failures, 1);
        }
        rc = eu_append(e, &ci, (uint64_t)(100 + t), 0, len, 8, &err);
        scribble();
        if (rc) {
            fprintf(stderr, "submitter %d round %d: append: %s\n", t, r, err.msg);
            atomic_fetch_add(&failures, 1);
            break;
        }
        len += 8;
        if (r % 10 == 0) {
            char other[48];
            snprintf(other, sizeof other, "s%d-%d", t, r);
            rc = kvd_conv_create(e, "g", other, &s, NULL, &dup, &err);
            scribble();
            if (rc) {
                fprintf(stderr, "submitter %d round %d: create: %s\n", t, r, err.msg);
                atomic_fetch_add(&failures, 1);
            }
        }
    }
    kvd_reader *rd;
    if (kvd_reader_open(e, &rd, &err)) {
        atomic_fetch_add(&failures, 1);
        return NULL;
    }
    uint64_t pos[64];
    for (int i = 0; i < 64; i++)
        pos[i] = len ? (uint64_t)i * 7919 % len : 0;
    pos[0] = len ? len - 1 : 0;
    for (uint32_t h = 0; len && h < 2; h++)
        if (eu_check_records(rd, &ci, (uint64_t)(100 + t), 0, h, pos, 64, &err)) {
            fprintf(stderr, "submitter %d: records differ: %s\n", t, err.msg);
            atomic_fetch_add(&failures, 1);
        }
    kvd_reader_close(rd);
    return NULL;
}

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "gc");
    kvd_options o = { .dir = dir };
    kvd_err err;
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    kvd_shape s = eu_shape(1, 2, KVARC_FMT_Q3);
    kvd_conv_info ci;
    CHECK_RC(kvd_conv_create(e, "g", "taken", &s, NULL, &ci, &err), 0);
    pthread_t w, th[SUBMITTERS];
    CHECK_RC(pthread_create(&w, NULL, waker, NULL), 0);
    for (int t = 0; t < SUBMITTERS; t++)
        CHECK_RC(pthread_create(&th[t], NULL, submitter, (void *)(intptr_t)t), 0);
    for (int t = 0; t < SUBMITTERS; t++)
        pthread_join(th[t], NULL);
    atomic_store(&stop_waker, 1);
    pthread_join(w, NULL);
    CHECK(atomic_load(&failures) == 0, "%d call(s) answered wrong", atomic_load(&failures));
    kvd_close(e);
    if (!tu_failures)
        eu_rmrf(dir);
    return tu_finish("test_engine_group_commit");
}
