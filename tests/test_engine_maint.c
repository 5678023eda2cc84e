/* test_engine_maint: delete + compaction keep every live record bit-exact
 * and reclaim space; verify passes on a healthy directory and reports a
 * flipped byte, which reads then refuse (KVARC_ECORRUPT, never the bytes);
 * rebuild-index from the segments alone reproduces the same answers. */
#include <errno.h>
#include <fcntl.h>

#include "engine_util.h"

static void linelog(void *arg, const char *line)
{
    int *n = arg;
    (*n)++;
    fprintf(stderr, "  verify: %s\n", line);
}

/* Everything reader r (NULL: a new one) can see, as a checksum over records and lengths. */
static uint64_t fingerprint_r(kvd_engine *e, kvd_reader *given, const char *ns, const char *name)
{
    kvd_conv_info ci;
    kvd_err err;
    kvd_reader *r = given;
    if (kvd_conv_open(e, ns, name, NULL, &ci, &err) || (!r && kvd_reader_open(e, &r, &err)))
        return 0;
    uint64_t h = ci.length * 1000003u + ci.fork_len;
    int rb = kvarc_record_bytes(ci.shape.format, (int)ci.shape.head_dim);
    uint64_t *pos = malloc(ci.length * sizeof *pos);
    uint8_t *out = malloc(ci.length * rb);
    for (uint64_t i = 0; i < ci.length; i++)
        pos[i] = i;
    for (uint32_t l = 0; l < ci.shape.n_layers; l++)
        for (uint32_t hd = 0; hd < ci.shape.n_kv_heads; hd++) {
            if (kvd_read_records(r, ci.id, l, hd, pos, ci.length, out, &err))
                return 1;
            h ^= kvarc_crc32c((uint32_t)h, out, ci.length * rb) + l * 31 + hd;
        }
    free(pos);
    free(out);
    if (!given)
        kvd_reader_close(r);
    return h;
}

static uint64_t fingerprint(kvd_engine *e, const char *ns, const char *name)
{
    return fingerprint_r(e, NULL, ns, name);
}

static off_t first_record_offset(const char *dir, uint64_t conv, uint64_t *seg_out)
{
    /* the first data block of the lowest segment: header, then sections */
    char p[4096];
    for (uint64_t id = 1; id < 64; id++) {
        snprintf(p, sizeof p, "%s/segments/%016llx.seg", dir, (unsigned long long)id);
        int fd = open(p, O_RDONLY);
        if (fd < 0)
            continue;
        off_t off = 0;
        uint8_t hb[KVARC_BLOCK_HEADER];
        kvarc_block_header h;
        while (pread(fd, hb, sizeof hb, off) == (ssize_t)sizeof hb && !kvarc_block_header_decode(hb, &h)) {
            if (h.kind == KVARC_BLOCK_DATA && h.conv == conv) {
                close(fd);
                *seg_out = id;
                return off + (off_t)kvarc_block_slot_offset(&h, 1, 3) + 10;
            }
            off += KVARC_BLOCK_HEADER + h.payload_bytes;
        }
        close(fd);
    }
    return -1;
}

/* A progress callback that stops the work at its third call. */
static int stop_after(void *arg, uint64_t done, uint64_t total)
{
    int *calls = arg;
    (void)done;
    (void)total;
    return ++*calls >= 3;
}

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "maint");
    kvd_options o = { .dir = dir, .segment_bytes = 256 << 10 };
    kvd_engine *e;
    kvd_err err = { 0 };
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    {   /* an empty archive verifies (and compacts) clean */
        kvd_verify_report r0;
        uint64_t rec0 = 1;
        CHECK_RC(kvd_verify(e, &r0, NULL, NULL, NULL, NULL, &err), 0);
        CHECK(r0.problems == 0 && r0.records == 0, "empty archive verify");
        CHECK_RC(kvd_compact(e, 0.5, &rec0, NULL, NULL, &err), 0);
        CHECK(rec0 == 0, "empty archive compaction reclaims nothing");
    }
    kvd_shape s = eu_shape(2, 2, KVARC_FMT_Q3);
    kvd_conv_info a, b, c, d;
    CHECK_RC(kvd_conv_create(e, "ns", "a", &s, NULL, &a, &err), 0);
    CHECK_RC(kvd_conv_create(e, "ns", "c", &s, NULL, &c, &err), 0);
    CHECK_RC(kvd_conv_create(e, "ns", "d", &s, NULL, &d, &err), 0);
    /* interleave so that every segment mixes conversations */
    for (int blk = 0; blk < 30; blk++)
        for (uint32_t l = 0; l < 2; l++) {
            CHECK_RC(eu_append(e, &a, 11, l, (uint64_t)blk * 32, 32, &err), 0);
            CHECK_RC(eu_append(e, &c, 12, l, (uint64_t)blk * 32, 32, &err), 0);
            CHECK_RC(eu_append(e, &d, 13, l, (uint64_t)blk * 32, 32, &err), 0);
        }
    CHECK_RC(kvd_conv_fork(e, "ns", "a", 500, "ns", "b", 0, &b, &err), 0);
    for (uint32_t l = 0; l < 2; l++)
        CHECK_RC(eu_append(e, &b, 14, l, 500, 40, &err), 0);
    int lines = 0;
    kvd_verify_report rep;
    CHECK_RC(kvd_verify(e, &rep, linelog, &lines, NULL, NULL, &err), 0);
    CHECK(rep.problems == 0 && lines == 0 && rep.records == 3 * 30 * 2 * 32 * 2 + 2 * 40 * 2, "healthy verify: %llu problems, %llu records",
          (unsigned long long)rep.problems, (unsigned long long)rep.records);
    uint64_t fb = fingerprint(e, "ns", "b"), fd_ = fingerprint(e, "ns", "d");
    CHECK(fb > 1 && fd_ > 1, "fingerprints readable");
    /* a reader kept across the compaction below: its extent cache, filled now, must not outlive the
     * segments compaction retires (b reads its first 500 positions through a's extents) */
    kvd_reader *kept;
    CHECK_RC(kvd_reader_open(e, &kept, &err), 0);
    CHECK(fingerprint_r(e, kept, "ns", "b") == fb && fingerprint_r(e, kept, "ns", "d") == fd_,
          "a kept reader sees the same before compaction");

    /* delete a (b still shares its first 500 tokens) and c (nothing shares it) */
    kvd_stats st0, st1;
    CHECK_RC(kvd_stats_get(e, &st0, &err), 0);
    CHECK_RC(kvd_conv_delete(e, "ns", "a", &err), 0);
    CHECK_RC(kvd_conv_delete(e, "ns", "c", &err), 0);
    uint64_t reclaimed = 0;
    /* stopped by its progress callback: -ECANCELED, nothing changed */
    int calls = 0;
    kvd_stats stc;
    CHECK_RC(kvd_stats_get(e, &stc, &err), 0);
    CHECK_RC(kvd_compact(e, 0.9, &reclaimed, stop_after, &calls, &err), -ECANCELED);
    CHECK_RC(kvd_stats_get(e, &st1, &err), 0);
    CHECK(calls == 3 && st1.segment_bytes == stc.segment_bytes && st1.segments == stc.segments,
          "a stopped compaction leaves the segments as they were (%d calls)", calls);
    calls = 0;
    CHECK_RC(kvd_verify(e, &rep, linelog, &lines, stop_after, &calls, &err), -ECANCELED);
    CHECK_RC(kvd_verify(e, &rep, linelog, &lines, NULL, NULL, &err), 0);
    CHECK(rep.problems == 0, "verify after a stopped compaction and verify");
    CHECK_RC(kvd_compact(e, 0.9, &reclaimed, NULL, NULL, &err), 0);
    CHECK_RC(kvd_stats_get(e, &st1, &err), 0);
    printf("  compaction reclaimed %llu bytes: %llu -> %llu bytes in segments\n",
           (unsigned long long)reclaimed, (unsigned long long)st0.segment_bytes,
           (unsigned long long)st1.segment_bytes);
    CHECK(reclaimed > 0 && st1.segment_bytes + reclaimed / 2 < st0.segment_bytes + 4096,
          "compaction must reclaim c's records");
    CHECK(fingerprint(e, "ns", "b") == fb && fingerprint(e, "ns", "d") == fd_,
          "live records changed by compaction");
    CHECK(fingerprint_r(e, kept, "ns", "b") == fb && fingerprint_r(e, kept, "ns", "d") == fd_,
          "a reader kept across the compaction reads the moved records (its extent cache was dropped)");
    kvd_reader_close(kept);
    CHECK_RC(kvd_compact(e, 1.5, NULL, NULL, NULL, &err), -EINVAL);
    lines = 0;
    CHECK_RC(kvd_verify(e, &rep, linelog, &lines, NULL, NULL, &err), 0);
    CHECK(rep.problems == 0, "verify after compaction: %llu problems", (unsigned long long)rep.problems);
    kvd_close(e);

    /* rebuild the index from the segments: same answers */
    CHECK_RC(kvd_rebuild_index(dir, NULL, NULL, NULL, NULL, NULL, &err), 0);
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    CHECK(fingerprint(e, "ns", "b") == fb && fingerprint(e, "ns", "d") == fd_, "answers differ after rebuild");
    kvd_conv_info tmp;
    CHECK_RC(kvd_conv_open(e, "ns", "a", NULL, &tmp, &err), -ENOENT);
    CHECK_RC(kvd_conv_open(e, "ns", "c", NULL, &tmp, &err), -ENOENT);
    kvd_conv_info list[8];
    CHECK(kvd_conv_list(e, "ns", NULL, list, 8, &err) == 2, "two conversations after rebuild");
    CHECK_RC(kvd_verify(e, &rep, linelog, &lines, NULL, NULL, &err), 0);
    /* appends continue after a rebuild */
    CHECK_RC(kvd_conv_open(e, "ns", "d", NULL, &d, &err), 0);
    CHECK_RC(eu_append(e, &d, 13, 0, 960, 8, &err), 0);
    kvd_close(e);

    /* opened to be checked only: an append, and each block of kvd_append_n, is refused; nothing changes */
    {
        kvd_engine *ce;
        CHECK_RC(kvd_open_check(dir, &ce, &err), 0);
        uint64_t fd_before = fingerprint(ce, "ns", "d");
        CHECK_RC(eu_append(ce, &d, 13, 0, 968, 8, &err), -EROFS);
        CHECK(strstr(err.msg, "checked only") != NULL, "the refusal says why: %s", err.msg);
        size_t nn = (size_t)d.shape.n_kv_heads * 8;
        int rb = kvarc_record_bytes(d.shape.format, (int)d.shape.head_dim);
        uint8_t *bits = calloc(nn, d.shape.head_dim / 8), *recs = calloc(nn, (size_t)rb);
        uint16_t *sc = calloc(nn, 2);
        kvd_block_in two[2] = { { 0, 968, 8, bits, sc, recs, NULL, NULL }, { 1, 960, 8, bits, sc, recs, NULL, NULL } };
        int rcs[2] = { 0, 0 };
        CHECK_RC(kvd_append_n(ce, d.id, two, 2, rcs, NULL, &err), -EROFS);
        CHECK(rcs[0] == -EROFS && rcs[1] == -EROFS, "each block refused: %d %d", rcs[0], rcs[1]);
        CHECK(fingerprint(ce, "ns", "d") == fd_before, "the refused appends changed nothing");
        free(bits);
        free(recs);
        free(sc);
        kvd_close(ce);
    }

    /* a flipped byte: verify reports it, reads refuse it */
    uint64_t seg = 0;
    off_t off = first_record_offset(dir, d.id, &seg);
    CHECK(off > 0, "found a record to corrupt");
    char p[4096];
    snprintf(p, sizeof p, "%s/segments/%016llx.seg", dir, (unsigned long long)seg);
    int fd = open(p, O_RDWR);
    uint8_t byte;
    CHECK(pread(fd, &byte, 1, off) == 1, "read byte");
    byte ^= 0x20;
    CHECK(pwrite(fd, &byte, 1, off) == 1, "flip byte");
    close(fd);
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    lines = 0;
    CHECK_RC(kvd_verify(e, &rep, linelog, &lines, NULL, NULL, &err), KVARC_ECORRUPT);
    CHECK(rep.problems > 0 && lines > 0, "verify must report the flipped byte");
    kvd_reader *r;
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    int corrupt = 0;
    kvd_conv_info all[4];
    long n = kvd_conv_list(e, NULL, NULL, all, 4, &err);
    for (long i = 0; i < n; i++) {
        int rb = kvarc_record_bytes(all[i].shape.format, (int)all[i].shape.head_dim);
        uint8_t *out = malloc(all[i].length * rb);
        uint64_t *pp = malloc(all[i].length * sizeof *pp);
        for (uint64_t j = 0; j < all[i].length; j++)
            pp[j] = j;
        for (uint32_t l = 0; l < 2; l++) {
            int rc = kvd_read_records(r, all[i].id, l, 1, pp, all[i].length, out, &err);
            if (rc == KVARC_ECORRUPT) {
                corrupt++;
                CHECK(strstr(err.msg, "checksum") != NULL, "corruption message: %s", err.msg);
            }
        }
        free(out);
        free(pp);
    }
    CHECK(corrupt == 1, "exactly one read must hit the flipped record, %d did", corrupt);
    kvd_reader_close(r);
    kvd_close(e);
    eu_rmrf(dir);
    return tu_finish("test_engine_maint");
}
