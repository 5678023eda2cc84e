/* test_engine_concurrency: readers running beside appenders and beside
 * compactions always see a consistent conversation: every position below
 * the length they observed reads back bit-exact, never a torn or missing
 * record, while other threads append, delete and compact.
 *
 * The run lasts until enough of each happened (MIN_APPENDS, MIN_READS,
 * MIN_COMPACTIONS: the threads report each one, and main waits on those
 * reports), not for a fixed time: a slow disk (5 ms per fsync) gets the
 * same amount of overlap as a fast one, only later. The clock is used only
 * as a failure guard (GUARD_S). */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "engine_util.h"

#define WRITERS 3
#define READERS 2
#define MIN_APPENDS 500
#define MIN_READS 500
#define MIN_COMPACTIONS 10
#define GUARD_S 90

static kvd_engine *e;
static kvd_conv_info convs[WRITERS];
static atomic_int stop, reads_ok, appends_ok, compactions;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

/* One more of *counter (or a stop): main is woken to look. */
static void progress(atomic_int *counter)
{
    if (counter)
        atomic_fetch_add(counter, 1);
    pthread_mutex_lock(&mu);
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static void fail_and_stop(void)
{
    pthread_mutex_lock(&mu);        /* tu_failures is a plain int */
    tu_failures++;
    pthread_mutex_unlock(&mu);
    atomic_store(&stop, 1);
    progress(NULL);
}

static int enough(void)
{
    return atomic_load(&reads_ok) >= MIN_READS && atomic_load(&appends_ok) >= MIN_APPENDS &&
           atomic_load(&compactions) >= MIN_COMPACTIONS;
}

static void *writer(void *p)
{
    int i = (int)(intptr_t)p;
    kvd_err err;
    uint64_t len = 0;
    while (!atomic_load(&stop)) {
        if (eu_append(e, &convs[i], (uint64_t)(50 + i), 0, len, 16, &err)) {
            fprintf(stderr, "writer %d: %s\n", i, err.msg);
            fail_and_stop();
            return NULL;
        }
        len += 16;
        progress(&appends_ok);
    }
    return NULL;
}

static void *reader(void *p)
{
    uint64_t seed = (uint64_t)(intptr_t)p;
    kvd_reader *r;
    kvd_err err;
    if (kvd_reader_open(e, &r, &err)) {
        fprintf(stderr, "reader: %s\n", err.msg);
        fail_and_stop();
        return NULL;
    }
    uint64_t pos[64];
    while (!atomic_load(&stop)) {
        int c = (int)(kvarc_splitmix64(&seed) % WRITERS);
        uint64_t len;
        if (kvd_layer_length(e, convs[c].id, 0, &len, &err) || len == 0)
            continue;
        for (int i = 0; i < 64; i++)
            pos[i] = kvarc_splitmix64(&seed) % len;
        pos[0] = len - 1;                         /* the newest visible token */
        for (uint32_t h = 0; h < 2; h++)
            if (eu_check_records(r, &convs[c], (uint64_t)(50 + c), 0, h, pos, 64, &err)) {
                fprintf(stderr, "reader: conv %d length %llu: %s\n", c, (unsigned long long)len, err.msg);
                fail_and_stop();
            }
        progress(&reads_ok);
    }
    kvd_reader_close(r);
    return NULL;
}

static void *churner(void *p)
{
    (void)p;
    kvd_err err;
    kvd_shape s = eu_shape(1, 2, KVARC_FMT_Q3);
    for (int round = 0; !atomic_load(&stop); round++) {
        char name[32];
        snprintf(name, sizeof name, "scratch%d", round);
        kvd_conv_info ci;
        if (kvd_conv_create(e, "cc", name, &s, NULL, &ci, &err)) {
            fprintf(stderr, "churner: %s\n", err.msg);
            fail_and_stop();
            break;
        }
        for (int b = 0; b < 20; b++)
            eu_append(e, &ci, 9, 0, (uint64_t)b * 32, 32, &err);
        kvd_conv_delete(e, "cc", name, &err);
        if (kvd_compact(e, 0.95, NULL, NULL, NULL, &err)) {
            fprintf(stderr, "compaction: %s\n", err.msg);
            fail_and_stop();
            break;
        }
        progress(&compactions);
    }
    return NULL;
}

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "conc");
    kvd_options o = { .dir = dir, .segment_bytes = 64 << 10 };   /* many rolls and victims */
    kvd_err err;
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    kvd_shape s = eu_shape(1, 2, KVARC_FMT_Q3);
    for (int i = 0; i < WRITERS; i++) {
        char name[16];
        snprintf(name, sizeof name, "w%d", i);
        CHECK_RC(kvd_conv_create(e, "cc", name, &s, NULL, &convs[i], &err), 0);
    }
    pthread_t th[WRITERS + READERS + 1];
    for (int i = 0; i < WRITERS; i++)
        pthread_create(&th[i], NULL, writer, (void *)(intptr_t)i);
    for (int i = 0; i < READERS; i++)
        pthread_create(&th[WRITERS + i], NULL, reader, (void *)(intptr_t)(i + 1));
    pthread_create(&th[WRITERS + READERS], NULL, churner, NULL);
    /* until enough of each happened (or a thread failed) */
    struct timespec guard;
    clock_gettime(CLOCK_REALTIME, &guard);      /* pthread_cond_timedwait's clock */
    guard.tv_sec += GUARD_S;
    int rc = 0;
    pthread_mutex_lock(&mu);
    while (!enough() && !atomic_load(&stop) && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&cv, &mu, &guard);
    pthread_mutex_unlock(&mu);
    CHECK(rc != ETIMEDOUT, "not enough concurrency within %d s (a hang?)", GUARD_S);
    atomic_store(&stop, 1);
    for (int i = 0; i < WRITERS + READERS + 1; i++)
        pthread_join(th[i], NULL);
    printf("  %d appends, %d verified reads, %d compactions\n", atomic_load(&appends_ok),
           atomic_load(&reads_ok), atomic_load(&compactions));
    CHECK(enough(), "too little concurrency happened to mean anything");
    kvd_verify_report rep;
    CHECK_RC(kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err), 0);
    kvd_stats st;
    kvd_stats_get(e, &st, &err);
    printf("  %llu appends in %llu group commits\n", (unsigned long long)st.appends,
           (unsigned long long)st.group_commits);
    kvd_close(e);
    eu_rmrf(dir);
    return tu_finish("test_engine_concurrency");
}
