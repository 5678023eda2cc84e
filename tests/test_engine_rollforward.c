/* test_engine_rollforward: an index that lost many transactions, segment
 * rolls among them, and an index lost whole: recovery replays what the
 * segments hold (storaged/replay.c) and nothing acknowledged is missing.
 *  1. Appends; the index saved; many more appends across several segment
 *     rolls, a fork and a delete; the saved index put back. Reopen: every
 *     append there, the fork and the delete too, verify clean; appends go
 *     on into a fresh segment; reopen again, still all there.
 *  2. The index directory removed: the first open rebuilds it from the
 *     segment files alone (all unlisted), with the same answers.
 *  3. The index behind again, and the first block it lacks damaged: the
 *     blocks after it cannot all be taken (a gap in layer 0), so the open
 *     is refused naming rebuild-index, and the segment is left byte for
 *     byte as it was; rebuild-index then serves every layer up to its gap. */
#include <errno.h>
#include <fcntl.h>

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

/* The engine on dir; a failed open ends the test (nothing after it can run). */
static kvd_engine *open_dir(const char *dir, const char *when)
{
    kvd_options o = { .dir = dir, .segment_bytes = 64 << 10 };
    kvd_engine *e;
    kvd_err err;
    if (kvd_open(&o, &e, &err)) {
        CHECK(0, "open %s %s: %s", dir, when, err.msg);
        exit(tu_finish("test_engine_rollforward"));
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

static uint8_t *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    long len = -1;
    if (f && !fseek(f, 0, SEEK_END) && (len = ftell(f)) >= 0 && !fseek(f, 0, SEEK_SET) &&
        (buf = malloc((size_t)len + 1)) && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    if (f)
        fclose(f);
    *n = len < 0 ? 0 : (size_t)len;
    return buf;
}

static void scenario_gap(void)
{
    char dir[256], mdb[512], saved[512], seg[512];
    eu_tmpdir(dir, sizeof dir, "rollfwd-gap");
    snprintf(mdb, sizeof mdb, "%s/index/data.mdb", dir);
    snprintf(saved, sizeof saved, "%s.saved.mdb", dir);
    snprintf(seg, sizeof seg, "%s/segments/%016llx.seg", dir, 1ull);
    kvd_err err;
    kvd_shape s = eu_shape(LAYERS, 2, KVARC_FMT_Q3);
    kvd_conv_info ci;
    kvd_engine *e = open_dir(dir, "new (gap)");
    CHECK_RC(kvd_conv_create(e, "rf", "main", &s, NULL, &ci, &err), 0);
    append_rounds(e, &ci, 0, 3);
    kvd_close(e);
    struct stat st;
    CHECK(stat(seg, &st) == 0, "stat %s", seg);
    uint64_t first_lost = (uint64_t)st.st_size;   /* closed cleanly: the file ends at its committed size */
    CHECK_RC(copy_file(mdb, saved), 0);
    e = open_dir(dir, "again (gap)");
    append_rounds(e, &ci, 3, 5);                 /* 4 blocks: layer 0 at 60, layer 1 at 60, 0 at 80, 1 at 80 */
    kvd_close(e);
    CHECK(stat(seg, &st) == 0 && (uint64_t)st.st_size > first_lost, "the appends stayed in segment 1");
    CHECK_RC(copy_file(saved, mdb), 0);
    int fd = open(seg, O_RDWR);
    uint8_t b = 0;
    CHECK(fd >= 0 && pread(fd, &b, 1, (off_t)first_lost + 200) == 1, "read the first lost block");
    b ^= 0x40;                                   /* in its payload: the block no longer checks */
    CHECK(pwrite(fd, &b, 1, (off_t)first_lost + 200) == 1, "damage it");
    if (fd >= 0)
        close(fd);
    size_t n_before, n_after;
    uint8_t *before = slurp(seg, &n_before);

    kvd_options o = { .dir = dir, .segment_bytes = 64 << 10 };
    memset(&err, 0, sizeof err);
    int rc = kvd_open(&o, &e, &err);
    CHECK(rc == KVARC_ECORRUPT && strstr(err.msg, "rebuild-index") && strstr(err.msg, "layer 0"),
          "a gap past the index must refuse the open naming rebuild-index (rc %d): %s", rc, err.msg);
    if (!rc)
        kvd_close(e);
    uint8_t *after = slurp(seg, &n_after);
    CHECK(before && after && n_before == n_after && !memcmp(before, after, n_before),
          "the refused open changed the segment (%zu -> %zu bytes)", n_before, n_after);
    free(before);
    free(after);

    uint64_t dropped = 0;
    CHECK_RC(kvd_rebuild_index(dir, NULL, NULL, &dropped, NULL, NULL, &err), 0);
    CHECK(dropped == 1, "rebuild left out %llu blocks, want 1 (layer 0 at 80)", (unsigned long long)dropped);
    e = open_dir(dir, "after rebuild-index (gap)");
    kvd_reader *r;
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    uint64_t want[LAYERS] = { 3 * COUNT, 5 * COUNT }, pos[5 * COUNT];
    for (uint64_t i = 0; i < 5 * COUNT; i++)
        pos[i] = i;
    for (uint32_t l = 0; l < LAYERS; l++) {
        uint64_t len;
        CHECK_RC(kvd_layer_length(e, ci.id, l, &len, &err), 0);
        CHECK(len == want[l], "layer %u: %llu tokens after the rebuild, want %llu", l, (unsigned long long)len,
              (unsigned long long)want[l]);
        for (uint32_t h = 0; h < 2 && len == want[l]; h++)
            CHECK(eu_check_records(r, &ci, TAG, l, h, pos, len, &err) == 0, "layer %u head %u: %s", l, h, err.msg);
    }
    kvd_reader_close(r);
    kvd_verify_report rep;
    CHECK_RC(kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err), KVARC_ECORRUPT);   /* the damage, still there */
    kvd_close(e);
    unlink(saved);
    eu_rmrf(dir);
}

int main(void)
{
    char dir[256], p[512], saved[512];
    eu_tmpdir(dir, sizeof dir, "rollfwd");
    kvd_err err;
    kvd_shape s = eu_shape(LAYERS, 2, KVARC_FMT_Q3);
    kvd_conv_info ci, gone;

    kvd_engine *e = open_dir(dir, "new");
    CHECK_RC(kvd_conv_create(e, "rf", "main", &s, NULL, &ci, &err), 0);
    CHECK_RC(kvd_conv_create(e, "rf", "gone", &s, NULL, &gone, &err), 0);
    append_rounds(e, &ci, 0, 5);
    kvd_close(e);
    snprintf(p, sizeof p, "%s/index/data.mdb", dir);
    snprintf(saved, sizeof saved, "%s.saved.mdb", dir);
    CHECK_RC(copy_file(p, saved), 0);

    /* 1. many transactions later, the index loses them all */
    e = open_dir(dir, "again");
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

    e = open_dir(dir, "with the old index");
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
    e = open_dir(dir, "after the roll-forward");
    CHECK_RC(kvd_stats_get(e, &st, &err), 0);
    CHECK(st.rolled_forward == 0, "a clean reopen replayed %llu blocks", (unsigned long long)st.rolled_forward);
    check_all(e, "main", 45 * COUNT);
    kvd_close(e);

    /* 2. the index lost whole: the segments alone bring everything back */
    snprintf(p, sizeof p, "%s/index", dir);
    eu_rmrf(p);
    e = open_dir(dir, "without an index");
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
    scenario_gap();
    return tu_finish("test_engine_rollforward");
}
