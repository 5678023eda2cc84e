/* test_engine_concurrency: readers running beside appenders and beside
 * compactions always see a consistent conversation: every position below
 * the length they observed reads back bit-exact, never a torn or missing
 * record, while other threads append, delete and compact. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "engine_util.h"

#define WRITERS 3
#define READERS 2

static kvd_engine *e;
static kvd_conv_info convs[WRITERS];
static atomic_int stop, reads_ok, appends_ok, compactions;

static void *writer(void *p)
{
    int i = (int)(intptr_t)p;
    kvd_err err;
    uint64_t len = 0;
    while (!atomic_load(&stop)) {
        if (eu_append(e, &convs[i], (uint64_t)(50 + i), 0, len, 16, &err)) {
            fprintf(stderr, "writer %d: %s\n", i, err.msg);
            tu_failures++;
            return NULL;
        }
        len += 16;
        atomic_fetch_add(&appends_ok, 1);
    }
    return NULL;
}

static void *reader(void *p)
{
    uint64_t seed = (uint64_t)(intptr_t)p;
    kvd_reader *r;
    kvd_err err;
    if (kvd_reader_open(e, &r, &err))
        return NULL;
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
                tu_failures++;
                atomic_store(&stop, 1);
            }
        atomic_fetch_add(&reads_ok, 1);
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
        if (kvd_conv_create(e, "cc", name, &s, NULL, &ci, &err))
            break;
        for (int b = 0; b < 20; b++)
            eu_append(e, &ci, 9, 0, (uint64_t)b * 32, 32, &err);
        kvd_conv_delete(e, "cc", name, &err);
        if (kvd_compact(e, 0.95, NULL, NULL, NULL, &err)) {
            fprintf(stderr, "compaction: %s\n", err.msg);
            tu_failures++;
            break;
        }
        atomic_fetch_add(&compactions, 1);
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
    /* 2 s at least; on a slow or loaded machine (a CI box with slow
     * fsyncs) longer, until enough of each happened, 30 s at most */
    struct timespec d = { 2, 0 }, tick = { 0, 100 * 1000000 };
    nanosleep(&d, NULL);
    for (int t = 0; t < 280 && !(atomic_load(&reads_ok) > 20 && atomic_load(&appends_ok) > 20 &&
                                 atomic_load(&compactions) > 2); t++)
        nanosleep(&tick, NULL);
    atomic_store(&stop, 1);
    for (int i = 0; i < WRITERS + READERS + 1; i++)
        pthread_join(th[i], NULL);
    printf("  %d appends, %d verified reads, %d compactions\n", atomic_load(&appends_ok),
           atomic_load(&reads_ok), atomic_load(&compactions));
    CHECK(atomic_load(&reads_ok) > 20 && atomic_load(&appends_ok) > 20 && atomic_load(&compactions) > 2,
          "too little concurrency happened to mean anything");
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
