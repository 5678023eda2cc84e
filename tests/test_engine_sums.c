/* test_engine_sums: the coarse tier's block summaries in the engine
 * (kvd_append_sums, kvd_read_sums; data blocks of version 2):
 * - summaries appended with a block read back byte for byte with ok = 1,
 *   whether one append completes several 64-position blocks, or appends
 *   of 10 tokens carry one only in the append that completes a block;
 *   blocks appended with plain kvd_append (or a whole layer so) read back
 *   ok = 0 and zero bytes; records and signatures read as before;
 * - a block not yet complete, or past the end, is -ERANGE;
 * - forks at lengths that are not multiples of 64 (also a fork of a fork)
 *   see their parent's summaries only for blocks wholly below the fork
 *   point, even when one data block carries summaries on both sides of
 *   it, and their own after they append (none when they complete the
 *   block with a plain append); the parent keeps its own;
 * - all of it after a restart, after a rebuild of the index from the
 *   segments, and after compaction moved the blocks;
 * - one flipped byte inside a summary section on disk: kvd_read_sums of
 *   that head is KVARC_ECORRUPT (the other head and the records still
 *   read), and kvd_verify reports it. */
#include <errno.h>
#include <fcntl.h>

#include "engine_util.h"

#define S  KVARC_SUM_ITEMS
#define SB 16                      /* signature bytes at head_dim 128 */
#define H  2

/* The summary bytes of 64-position block b of (tag, layer, head): a pure
 * function, so a read can be checked. */
static uint8_t sum_byte(uint64_t tag, uint32_t layer, uint32_t head, uint64_t b, size_t i)
{
    return eu_byte(tag + 1000, layer, head, b, 3000 + i);
}

static uint16_t sum_scale(uint64_t tag, uint32_t layer, uint32_t head, uint64_t b, size_t item)
{
    return (uint16_t)(sum_byte(tag, layer, head, b, 4000 + 2 * item) | sum_byte(tag, layer, head, b, 4001 + 2 * item)
                                                                           << 8);
}

/* Append count tokens at first with eu_fill(tag) contents and, when the
 * tokens complete blocks, tag's summaries of them (kvd_append_sums, the
 * buffers sized for kvarc_block_n_sum); sums 0: plain kvd_append. */
static int append(kvd_engine *e, const kvd_conv_info *ci, uint64_t tag, uint32_t layer, uint64_t first,
                  uint32_t count, int sums, kvd_err *err)
{
    if (!sums)
        return eu_append(e, ci, tag, layer, first, count, err);
    const kvd_shape *s = &ci->shape;
    int rb = kvarc_record_bytes(s->format, (int)s->head_dim);
    size_t n = (size_t)H * count;
    uint32_t ns = kvarc_block_n_sum(first, count);
    uint8_t *bits = malloc(n * SB), *recs = malloc(n * rb), *sbits = ns ? malloc((size_t)H * ns * S * SB) : NULL;
    uint16_t *sc = malloc(n * 2), *ssc = ns ? malloc((size_t)H * ns * S * 2) : NULL;
    eu_fill(s, tag, layer, first, count, bits, sc, recs);
    for (uint32_t h = 0; h < H; h++)
        for (uint32_t j = 0; j < ns; j++) {
            uint64_t b = first / 64 + j;
            for (size_t i = 0; i < S * SB; i++)
                sbits[((size_t)h * ns + j) * S * SB + i] = sum_byte(tag, layer, h, b, i);
            for (size_t it = 0; it < S; it++)
                ssc[((size_t)h * ns + j) * S + it] = sum_scale(tag, layer, h, b, it);
        }
    int rc = kvd_append_sums(e, ci->id, layer, first, count, bits, sc, recs, sbits, ssc, err);
    free(bits);
    free(recs);
    free(sc);
    free(sbits);
    free(ssc);
    return rc;
}

/* Read the summaries of blocks [b0, b0 + nb) of (ci, layer, head) and
 * compare: want[i] is the tag whose summaries block b0 + i must have, 0
 * for none (ok 0, zero bytes). Returns the number of wrong blocks, or the
 * read's error code. */
static int check_sums(kvd_reader *r, const kvd_conv_info *ci, uint32_t layer, uint32_t head, uint64_t b0,
                      uint64_t nb, const uint64_t *want, kvd_err *err)
{
    uint8_t *bits = malloc(nb * S * SB), *ok = malloc(nb);
    uint16_t *sc = malloc(nb * S * 2);
    memset(bits, 0xee, nb * S * SB);       /* the read must write every byte */
    memset(sc, 0xee, nb * S * 2);
    memset(ok, 0xee, nb);
    int rc = kvd_read_sums(r, ci->id, layer, head, b0, nb, bits, sc, ok, err);
    for (uint64_t i = 0; !rc && i < nb; i++) {
        int wrong = ok[i] != (want[i] != 0);
        for (size_t k = 0; k < S * SB; k++)
            wrong |= bits[i * S * SB + k] != (want[i] ? sum_byte(want[i], layer, head, b0 + i, k) : 0);
        for (size_t it = 0; it < S; it++)
            wrong |= sc[i * S + it] != (want[i] ? sum_scale(want[i], layer, head, b0 + i, it) : 0);
        if (wrong) {
            fprintf(stderr, "  conv %llu layer %u head %u block %llu: ok %u, want tag %llu\n",
                    (unsigned long long)ci->id, layer, head, (unsigned long long)(b0 + i), ok[i],
                    (unsigned long long)want[i]);
            rc++;
        }
    }
    free(bits);
    free(ok);
    free(sc);
    return rc;
}

/* Every head's summaries of blocks [0, nb) against want[nb], read whole
 * and one block at a time. */
static void check_all(kvd_reader *r, const kvd_conv_info *ci, uint32_t layer, uint64_t nb, const uint64_t *want,
                      const char *what)
{
    kvd_err err = { 0 };
    for (uint32_t h = 0; h < H; h++) {
        int rc = check_sums(r, ci, layer, h, 0, nb, want, &err);
        CHECK(rc == 0, "%s: layer %u head %u blocks [0, %llu): %d (%s)", what, layer, h, (unsigned long long)nb, rc,
              rc < 0 ? err.msg : "wrong blocks");
        for (uint64_t b = 0; b < nb; b++) {
            rc = check_sums(r, ci, layer, h, b, 1, want + b, &err);
            CHECK(rc == 0, "%s: layer %u head %u block %llu alone: %d (%s)", what, layer, h, (unsigned long long)b,
                  rc, rc < 0 ? err.msg : "wrong bytes");
        }
    }
}

/* The first position past the last complete block is out of range. */
static void check_end(kvd_reader *r, const kvd_conv_info *ci, uint32_t layer, uint64_t nb, const char *what)
{
    kvd_err err = { 0 };
    uint8_t bits[S * SB], ok[1];
    uint16_t sc[S];
    int rc = kvd_read_sums(r, ci->id, layer, 0, nb, 1, bits, sc, ok, &err);
    CHECK(rc == -ERANGE, "%s: block %llu of layer %u (not complete) gave %d, want -ERANGE", what,
          (unsigned long long)nb, layer, rc);
}

typedef struct world {
    kvd_conv_info a, b, c, d, f;
} world;

/* a: layer 0 mixes every way of appending, layer 1 has no summaries;
 * b forks a at 100 (a's block [0, 128) carries the summaries of blocks 0
 * and 1, on both sides of the fork point), d forks b at 120, c forks a at
 * 270 (a's summary of block 3 came with the 10 tokens [250, 260)); f
 * forks a at 100 too and completes block 1 with a plain append: a's
 * summary of block 1 must not show through. */
static const uint64_t want_a[7] = { 1, 1, 0, 1, 1, 1, 1 }, want_a1[7] = { 0 };
static const uint64_t want_b[3] = { 1, 2, 2 }, want_c[5] = { 1, 1, 0, 1, 3 }, want_d[2] = { 1, 4 };
static const uint64_t want_f[2] = { 1, 0 };

static void check_world(kvd_engine *e, const world *w, const char *what)
{
    kvd_reader *r;
    kvd_err err = { 0 };
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    check_all(r, &w->a, 0, 7, want_a, what);
    check_all(r, &w->a, 1, 7, want_a1, what);
    check_end(r, &w->a, 0, 7, what);
    check_end(r, &w->a, 1, 7, what);
    check_all(r, &w->b, 0, 3, want_b, what);
    check_end(r, &w->b, 0, 3, what);
    check_all(r, &w->c, 0, 5, want_c, what);
    check_end(r, &w->c, 0, 5, what);
    check_all(r, &w->d, 0, 2, want_d, what);
    check_end(r, &w->d, 0, 2, what);
    check_all(r, &w->f, 0, 2, want_f, what);
    check_end(r, &w->f, 0, 2, what);
    /* the records around the summaries read as appended */
    uint64_t pos[500];
    for (int i = 0; i < 500; i++)
        pos[i] = (uint64_t)i;
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t h = 0; h < H; h++)
            CHECK(eu_check_records(r, &w->a, 1, l, h, pos, 500, &err) == 0, "%s: a's records l%u h%u: %s", what, l,
                  h, err.msg);
    CHECK(eu_check_records(r, &w->c, 3, 0, 1, pos + 270, 60, &err) == 0, "%s: c's records: %s", what, err.msg);
    uint8_t bits[500 * SB];
    uint16_t sc[500];
    CHECK_RC(kvd_read_sigs(r, w->a.id, 0, 1, 0, 500, bits, sc, &err), 0);
    int bad = 0;
    for (int p = 0; p < 500; p++)
        for (int k = 0; k < SB; k++)
            bad += bits[p * SB + k] != eu_byte(1, 0, 1, (uint64_t)p, 1000 + (size_t)k);
    CHECK(bad == 0, "%s: a's signatures differ in %d bytes", what, bad);
    kvd_reader_close(r);
}

/* Call fn on every block header of every segment file in dir, with the
 * file open read-write and the block's offset. */
typedef void (*block_fn)(void *arg, int fd, off_t off, const kvarc_block_header *h);
static void each_block(const char *dir, block_fn fn, void *arg)
{
    char p[4096];
    for (uint64_t id = 1; id < 256; id++) {
        snprintf(p, sizeof p, "%s/segments/%016llx.seg", dir, (unsigned long long)id);
        int fd = open(p, O_RDWR);
        if (fd < 0)
            continue;
        off_t off = 0;
        uint8_t hb[KVARC_BLOCK_HEADER];
        kvarc_block_header h;
        while (pread(fd, hb, sizeof hb, off) == (ssize_t)sizeof hb && !kvarc_block_header_decode(hb, &h)) {
            fn(arg, fd, off, &h);
            off += KVARC_BLOCK_HEADER + h.payload_bytes;
        }
        close(fd);
    }
}

typedef struct flip_arg {
    uint64_t conv;
    int      head, copies;
    size_t   at;
} flip_arg;

static void flip_one(void *arg, int fd, off_t off, const kvarc_block_header *h)
{
    flip_arg *f = arg;
    if (h->kind != KVARC_BLOCK_DATA || h->conv != f->conv || h->layer != 0 || h->first_pos != 0)
        return;
    CHECK(h->n_sum == 2 && h->version == 2, "the block of [0, 128) has n_sum %u version %u", h->n_sum, h->version);
    uint8_t byte;
    off_t o = off + (off_t)(kvarc_block_sum_offset(h, f->head) + f->at);
    if (pread(fd, &byte, 1, o) == 1) {
        byte ^= 0x20;
        f->copies += pwrite(fd, &byte, 1, o) == 1;
    }
}

/* Flip bit 5 of byte `at` of every copy of a's layer-0 data block at
 * position 0 (the one that summarizes blocks 0 and 1). Returns the
 * copies changed. */
static int flip_summary(const char *dir, uint64_t conv, int head, size_t at)
{
    flip_arg f = { conv, head, 0, at };
    each_block(dir, flip_one, &f);
    return f.copies;
}

typedef struct version_arg {
    int v1, v2, bad;
} version_arg;

static void version_one(void *arg, int fd, off_t off, const kvarc_block_header *h)
{
    version_arg *v = arg;
    (void)fd;
    (void)off;
    v->v1 += h->version == 1;
    v->v2 += h->version == 2;
    v->bad += h->version != (h->n_sum ? 2 : 1);
}

/* Every block on disk: those carrying summaries are version 2, all others
 * version 1 (so that a reader from before summaries still reads them).
 * Counts of each into v1, v2; returns the blocks that break the rule. */
static int block_versions(const char *dir, int *v1, int *v2)
{
    version_arg v = { 0, 0, 0 };
    each_block(dir, version_one, &v);
    *v1 = v.v1;
    *v2 = v.v2;
    return v.bad;
}

static void linelog(void *arg, const char *line)
{
    int *summary_lines = arg;
    *summary_lines += strstr(line, "summary") != NULL;
}

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "sums");
    kvd_options o = { .dir = dir, .segment_bytes = 64 << 10 };   /* small: blocks spread over segments */
    kvd_engine *e;
    kvd_err err = { 0 };
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    if (tu_failures)
        return tu_finish("test_engine_sums");
    kvd_shape s = eu_shape(2, H, KVARC_FMT_Q3);
    world w;
    kvd_conv_info junk;
    CHECK_RC(kvd_conv_create(e, "t", "a", &s, NULL, &w.a, &err), 0);
    CHECK_RC(kvd_conv_create(e, "t", "junk", &s, NULL, &junk, &err), 0);

    /* a, layer 0: [0, 128) one append with the summaries of blocks 0 and 1;
     * [128, 192) plain; [192, 342) 10 at a time, summaries with [250, 260)
     * (block 3) and [310, 320) (block 4); [342, 492) one append completing
     * blocks 5 and 6; [492, 500) completes none. Layer 1: plain. Junk
     * appends in between, for compaction to move a's blocks later. */
    CHECK_RC(append(e, &w.a, 1, 0, 0, 128, 1, &err), 0);
    CHECK_RC(append(e, &w.a, 1, 0, 128, 64, 0, &err), 0);
    for (uint64_t p = 192; p < 342; p += 10) {
        CHECK_RC(append(e, &w.a, 1, 0, p, 10, 1, &err), 0);
        CHECK_RC(append(e, &junk, 9, 0, p - 192, 10, 0, &err), 0);
    }
    CHECK_RC(append(e, &w.a, 1, 0, 342, 150, 1, &err), 0);
    CHECK_RC(append(e, &w.a, 1, 0, 492, 8, 1, &err), 0);
    for (uint64_t p = 0; p < 500; p += 100)
        CHECK_RC(append(e, &w.a, 1, 1, p, 100, 0, &err), 0);

    /* b: a at 100; block 0 is a's, block 1 not yet complete; then its own */
    CHECK_RC(kvd_conv_fork(e, "t", "a", 100, "t", "b", 0, &w.b, &err), 0);
    kvd_reader *r;
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    CHECK(check_sums(r, &w.b, 0, 1, 0, 1, want_b, &err) == 0, "b sees a's block 0: %s", err.msg);
    check_end(r, &w.b, 0, 1, "b before its appends");
    CHECK_RC(append(e, &w.b, 2, 0, 100, 28, 1, &err), 0);        /* completes block 1 */
    CHECK_RC(append(e, &w.b, 2, 0, 128, 72, 1, &err), 0);        /* completes block 2 */
    CHECK_RC(append(e, &w.b, 2, 1, 100, 100, 0, &err), 0);       /* b's length (all layers) past 120 */
    /* d: b at 120, inside b's own block [100, 128) */
    CHECK_RC(kvd_conv_fork(e, "t", "b", 120, "t", "d", 0, &w.d, &err), 0);
    check_end(r, &w.d, 0, 1, "d before its appends");
    CHECK_RC(append(e, &w.d, 4, 0, 120, 8, 1, &err), 0);
    /* f: a at 100, block 1 completed without summaries */
    CHECK_RC(kvd_conv_fork(e, "t", "a", 100, "t", "f", 0, &w.f, &err), 0);
    CHECK_RC(append(e, &w.f, 5, 0, 100, 28, 0, &err), 0);
    /* c: a at 270; blocks 0..3 are a's (3 from the 10 tokens [250, 260)) */
    CHECK_RC(kvd_conv_fork(e, "t", "a", 270, "t", "c", 0, &w.c, &err), 0);
    CHECK(check_sums(r, &w.c, 0, 0, 0, 4, want_c, &err) == 0, "c sees a's blocks 0..3: %s", err.msg);
    check_end(r, &w.c, 0, 4, "c before its appends");
    for (uint64_t p = 270; p < 330; p += 10)
        CHECK_RC(append(e, &w.c, 3, 0, p, 10, 1, &err), 0);
    kvd_reader_close(r);
    check_world(e, &w, "as appended");
    kvd_verify_report rep;
    CHECK_RC(kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err), 0);
    CHECK(rep.problems == 0, "verify: %llu problems", (unsigned long long)rep.problems);
    int nv1, nv2, badv = block_versions(dir, &nv1, &nv2);
    CHECK(badv == 0 && nv1 > 0 && nv2 > 0, "blocks with summaries are version 2, the others 1 (%d v1, %d v2, "
          "%d wrong)", nv1, nv2, badv);

    /* restart; the index rebuilt from the segments; compaction */
    kvd_close(e);
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    if (tu_failures)
        return tu_finish("test_engine_sums");
    check_world(e, &w, "after a restart");
    kvd_close(e);
    CHECK_RC(kvd_rebuild_index(dir, NULL, NULL, NULL, NULL, NULL, &err), 0);
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    if (tu_failures)
        return tu_finish("test_engine_sums");
    check_world(e, &w, "after rebuild-index");
    CHECK_RC(kvd_conv_delete(e, "t", "junk", &err), 0);
    uint64_t reclaimed = 0;
    CHECK_RC(kvd_compact(e, 0.99, &reclaimed, NULL, NULL, &err), 0);
    CHECK(reclaimed > 0, "compaction moved nothing");
    check_world(e, &w, "after compaction");
    CHECK_RC(kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err), 0);
    kvd_close(e);

    /* a flipped byte in head 1's summary of block 0 */
    CHECK(flip_summary(dir, w.a.id, 1, 3) >= 1, "found a's block [0, 128) on disk");
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    if (tu_failures)
        return tu_finish("test_engine_sums");
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    CHECK(check_sums(r, &w.a, 0, 1, 0, 2, want_a, &err) == KVARC_ECORRUPT, "a flipped summary byte must fail");
    CHECK(strstr(err.msg, "checksum") != NULL, "corruption message: %s", err.msg);
    CHECK(check_sums(r, &w.b, 0, 1, 0, 1, want_b, &err) == KVARC_ECORRUPT, "b shares the damaged block");
    CHECK(check_sums(r, &w.a, 0, 0, 0, 2, want_a, &err) == 0, "head 0's section is intact: %s", err.msg);
    CHECK(check_sums(r, &w.a, 0, 1, 2, 5, want_a + 2, &err) == 0, "other blocks of head 1: %s", err.msg);
    uint64_t pos[128];
    for (int i = 0; i < 128; i++)
        pos[i] = (uint64_t)i;
    CHECK(eu_check_records(r, &w.a, 1, 0, 1, pos, 128, &err) == 0, "records beside the damage: %s", err.msg);
    kvd_reader_close(r);
    int summary_lines = 0;
    CHECK_RC(kvd_verify(e, &rep, linelog, &summary_lines, NULL, NULL, &err), KVARC_ECORRUPT);
    CHECK(rep.problems > 0 && summary_lines > 0, "verify must report the summary section (%llu problems, %d lines)",
          (unsigned long long)rep.problems, summary_lines);
    kvd_close(e);
    eu_rmrf(dir);
    return tu_finish("test_engine_sums");
}
