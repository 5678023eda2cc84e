/* test_engine_rollforward: an index that lost many transactions, segment
 * rolls among them, and an index lost whole: recovery replays what the
 * segments hold (storaged/replay.c) and nothing acknowledged is missing.
 *  1. Appends; the index saved; many more appends across several segment
 *     rolls, a fork and a delete; the saved index put back. Reopen: every
 *     append there, the fork and the delete too, verify clean; appends go
 *     on into a fresh segment; reopen again, still all there.
 *  2. The index directory removed: the first open rebuilds it from the
 *     segment files alone (all unlisted), with the same answers. */
#include <errno.h>

#include "engine_util.h"

#define TAG    33
#define COUNT  20
#define LAYERS 2

static int copy_file(const char *from, const char *to)
{
    FILE *in = fopen(from, "rb"), *out = in ? fopen(to, "wb") : NULL;
    char buf[65536];
    size_t n;
    int rc = in && out ? 0 : -1;
    while (!rc && (n = fread(buf, 1, sizeof buf, in)) > 0)
        rc = fwrite(buf, 1, n, out) == n ? 0 : -1;
    if (in)
        fclose(in);
    if (out && fclose(out))
        rc = -1;
    return rc;
}

static kvd_engine *open_dir(const char *dir)
{
    kvd_options o = { .dir = dir, .segment_bytes = 64 << 10 };
    kvd_engine *e;
    kvd_err err;
    if (kvd_open(&o, &e, &err)) {
        fprintf(stderr, "open %s: %s\n", dir, err.msg);
        return NULL;
    }
    return e;
}

static void append_rounds(kvd_engine *e, const kvd_conv_info *ci, int from, int to)
{
    kvd_err err;
    for (int b = from; b < to; b++)
        for (uint32_t l = 0; l < LAYERS; l++)
            CHECK_RC(eu_append(e, ci, TAG, l, (uint64_t)b * COUNT, COUNT, &err), 0);
}

/* Every layer of ns/name holds [0, len) of TAG bit-exact; verify clean. */
static void check_all(kvd_engine *e, const char *name, uint64_t len)
{
    kvd_err err;
    kvd_conv_info ci;
    CHECK_RC(kvd_conv_open(e, "rf", name, NULL, &ci, &err), 0);
    CHECK(ci.length == len, "%s: %llu tokens, want %llu", name, (unsigned long long)ci.length,
          (unsigned long long)len);
    kvd_reader *r;
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    uint64_t *pos = malloc((len + 1) * sizeof *pos);
    for (uint64_t i = 0; i < len; i++)
        pos[i] = i;
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t h = 0; h < 2 && len; h++)
            CHECK(eu_check_records(r, &ci, TAG, l, h, pos, len, &err) == 0, "%s layer %u head %u: %s", name,
                  l, h, err.msg);
    free(pos);
    kvd_reader_close(r);
    kvd_verify_report rep;
    CHECK_RC(kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err), 0);
}

int main(void)
{
    char dir[256], p[512], saved[512];
    eu_tmpdir(dir, sizeof dir, "rollfwd");
    kvd_err err;
    kvd_shape s = eu_shape(LAYERS, 2, KVARC_FMT_Q3);
    kvd_conv_info ci, gone;

    kvd_engine *e = open_dir(dir);
    CHECK(e != NULL, "open");
    if (!e)
        return tu_finish("test_engine_rollforward");
    CHECK_RC(kvd_conv_create(e, "rf", "main", &s, NULL, &ci, &err), 0);
    CHECK_RC(kvd_conv_create(e, "rf", "gone", &s, NULL, &gone, &err), 0);
    append_rounds(e, &ci, 0, 5);
    kvd_close(e);
    snprintf(p, sizeof p, "%s/index/data.mdb", dir);
    snprintf(saved, sizeof saved, "%s.saved.mdb", dir);
    CHECK_RC(copy_file(p, saved), 0);

    /* 1. many transactions later, the index loses them all */
    e = open_dir(dir);
    append_rounds(e, &ci, 5, 40);             /* ~1.4 MB: several 64 KiB segment rolls */
    kvd_conv_info fk;
    CHECK_RC(kvd_conv_fork(e, "rf", "main", 100, "rf", "fork", 0, &fk, &err), 0);
    CHECK_RC(kvd_conv_delete(e, "rf", "gone", &err), 0);
    kvd_stats st;
    CHECK_RC(kvd_stats_get(e, &st, &err), 0);
    uint64_t segs_before = st.segments;
    kvd_close(e);
    CHECK(segs_before >= 4, "the appends rolled only into %llu segments", (unsigned long long)segs_before);
    CHECK_RC(copy_file(saved, p), 0);
    snprintf(p, sizeof p, "%s/index/lock.mdb", dir);
    unlink(p);

    e = open_dir(dir);
    CHECK(e != NULL, "reopen with the old index");
    if (!e)
        return tu_finish("test_engine_rollforward");
    CHECK_RC(kvd_stats_get(e, &st, &err), 0);
    CHECK(st.rolled_forward > 0, "nothing was rolled forward");
    printf("  old index: %llu blocks replayed, %llu segments\n", (unsigned long long)st.rolled_forward,
           (unsigned long long)st.segments);
    check_all(e, "main", 40 * COUNT);
    check_all(e, "fork", 100);
    kvd_conv_info gi;
    CHECK_RC(kvd_conv_open(e, "rf", "gone", NULL, &gi, &err), -ENOENT);
    append_rounds(e, &ci, 40, 45);            /* appends go on, into segments of fresh ids */
    kvd_close(e);
    e = open_dir(dir);
    CHECK_RC(kvd_stats_get(e, &st, &err), 0);
    CHECK(st.rolled_forward == 0, "a clean reopen replayed %llu blocks", (unsigned long long)st.rolled_forward);
    check_all(e, "main", 45 * COUNT);
    kvd_close(e);

    /* 2. the index lost whole: the segments alone bring everything back */
    snprintf(p, sizeof p, "%s/index", dir);
    eu_rmrf(p);
    e = open_dir(dir);
    CHECK(e != NULL, "open without an index");
    if (!e)
        return tu_finish("test_engine_rollforward");
    check_all(e, "main", 45 * COUNT);
    check_all(e, "fork", 100);
    CHECK_RC(kvd_conv_open(e, "rf", "gone", NULL, &gi, &err), -ENOENT);
    kvd_conv_info again;                      /* ids are not given twice */
    CHECK_RC(kvd_conv_create(e, "rf", "new", &s, NULL, &again, &err), 0);
    CHECK(again.id > fk.id, "a new conversation got id %llu, not past %llu", (unsigned long long)again.id,
          (unsigned long long)fk.id);
    kvd_close(e);
    unlink(saved);
    eu_rmrf(dir);
    return tu_finish("test_engine_rollforward");
}
